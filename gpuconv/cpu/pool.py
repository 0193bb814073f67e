"""Max and average pooling in the NumPy executor's batch-innermost (C, H, W, N) layout.

Each function gives what its NCHW counterpart in :mod:`gpuconv.functional.pool` gives for
``x.transpose(3, 0, 1, 2)`` (PyTorch's rules: output size and ``ceil_mode``, windows clipped to
the input, the first maximum in row-major window order, NaN propagating and winning, the average's
divisor). A shifted window of a (C, H, W, N) array is a strided view whose innermost runs are N
contiguous floats, so every pass is one NumPy call over whole views (copied contiguous first where
NumPy's ufuncs would crawl over the strides, see _contiguous). Inputs, ``out=`` and
``indices_out=`` may be views with any strides (half the batch for a thread, say); results are
written into the buffers given. Temporaries come from per-thread scratch buffers (:func:`scratch`).

Max-pool indices are tap codes: ``dh * kw + dw``, the argmax's offset in its window counted from
the window's top-left corner (padding included), in the smallest unsigned dtype that holds
``kh * kw`` (uint8 up to 15x15), so the all-ones code names no tap. :func:`indices_nchw` turns
them into PyTorch's int64 flat indices.

:class:`MaxPool2dPlan` and :class:`AvgPool2dPlan` are what the functions run: the window of one
input shape and dtype resolved (and checked) once. A layer pooling the same shape every step
keeps one and calls it directly: no argument checks, its temporaries and the views of its buffers
kept from call to call (at a lane of 8 images the checks and view building cost as much as the
arithmetic).
"""
from __future__ import annotations

import threading

import numpy as np

from ..functional._checks import check_array, ieee_arithmetic
from ..functional.activation import select
from ..functional.pool import _Window, _avg_divisor, _window, _window_sums, _window_sums_transposed
from .kept import KeptViews

__all__ = ["max_pool2d", "max_pool2d_backward", "indices_nchw", "avg_pool2d", "avg_pool2d_backward", "code_dtype",
           "MaxPool2dPlan", "AvgPool2dPlan"]

# Above this many window taps reaching the input, max_pool2d_backward scatters the gradients of
# non-overlapping windows too, rather than making one masked pass per tap.
_MAX_TAP_PASSES = 16


_scratch_buffers = threading.local()


def _thread_buffer(name: str, shape, dtype, allocate):
    buffers = _scratch_buffers.__dict__
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if name not in buffers or buffers[name].size < nbytes:
        buffers[name] = allocate(nbytes, np.uint8)
    return buffers[name][:nbytes].view(dtype).reshape(shape)


def scratch(name: str, shape, dtype, zero: bool = False):
    """A reusable temporary of ``shape`` and ``dtype``, one per ``name`` and thread, grown as
    needed and kept: a fresh multi-MB array per call costs its page faults every training step
    (and the threads' munmaps contend). Never returned to a caller; each use has its own name."""
    array = _thread_buffer(name, shape, dtype, np.empty)
    if zero:
        array.fill(0)
    return array


def _zeros(shape, dtype):
    """A read-only array of zeros, per thread: ``np.maximum(x, zeros)`` runs several times faster
    than ``np.maximum(x, 0)``, whose scalar operand misses NumPy's SIMD loop."""
    zeros = _thread_buffer("zeros, read-only", shape, dtype, np.zeros)
    zeros.flags.writeable = False
    return zeros


def _check_input(x, name: str):
    check_array(x, name, 4, "(C, H, W, N)")
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array (the (C, H, W, N) layout is the NumPy path's), "
                        f"got {type(x).__name__} of shape {tuple(x.shape)}")
    return x


def _check_shape(input_shape) -> tuple[int, int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise ValueError(f"input_shape must be 4 non-negative ints (C, H, W, N), got {input_shape!r}")
    return tuple(int(d) for d in shape)


def _geometry(shape, kernel_size, stride, padding, ceil_mode, name: str = "input") -> _Window:
    c, h, w, n = shape
    return _window((n, c, h, w), kernel_size, stride, padding, ceil_mode,
                   name=f"{name} (C, H, W, N) = {tuple(shape)}, in NCHW terms")


def _output_shape(shape, window: _Window) -> tuple[int, int, int, int]:
    return shape[0], *window.out, shape[3]


def _check_like(array, name: str, shape, dtype) -> None:
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape) or array.dtype != dtype:
        got = f"{array.dtype} array of shape {tuple(array.shape)}" if hasattr(array, "shape") else type(array).__name__
        raise ValueError(f"{name} must be a {np.dtype(dtype)} NumPy array of shape {tuple(shape)}, got {got}")


def _workspace(array, shape, dtype, name: str):
    """``array`` checked as a caller-owned result buffer of ``shape`` and ``dtype``, or a new one."""
    if array is None:
        return np.empty(shape, dtype)
    _check_like(array, name, shape, dtype)
    if not array.flags.writeable:
        raise ValueError(f"{name} of shape {tuple(shape)} is read-only")
    return array


def _check_grad_output(grad_output, shape, input_shape) -> None:
    if grad_output.shape != shape:
        raise ValueError(f"grad_output of shape {tuple(grad_output.shape)} is not the pooling output {shape} "
                         f"of input_shape {input_shape}")


def _along(axis: int, index):
    """An index of a (C, H, W, N) array selecting ``index`` along rows (axis 0) or columns (axis 1)."""
    return (slice(None),) * (1 + axis) + (index,)


def _on_axis(vector, axis: int):
    """A vector over rows (axis 0) or columns (axis 1), shaped to broadcast against (C, H, W, N)."""
    return np.reshape(vector, (1, -1, 1, 1) if axis == 0 else (1, 1, -1, 1))


def _taps(window: _Window, axis: int, size: int):
    """``(offset, outputs, inputs)`` for every window offset along ``axis`` that reaches the input
    (``_Window.taps``, in increasing offset, with the offset itself)."""
    stride, padding = window.stride[axis], window.padding[axis]
    for outputs, inputs in window.taps(axis, size):
        yield inputs.start - outputs.start * stride + padding, outputs, inputs


def _contiguous(view, buffer):
    """``view`` itself if C-contiguous, else copied into the front of the flat ``buffer``. NumPy's
    ufuncs run several times slower on strided inputs (runs of N or W_out * N floats: a shifted
    window) than on contiguous ones, and a copy costs less than that difference."""
    if view.flags.c_contiguous:
        return view
    copy = buffer[:view.size].reshape(view.shape)
    np.copyto(copy, view)
    return copy


def code_dtype(kernel_size) -> np.dtype:
    """The dtype of :func:`max_pool2d`'s tap codes for a ``(kh, kw)`` kernel."""
    kh, kw = kernel_size
    return np.dtype(np.min_scalar_type(kh * kw))


# ------------------------------------------------------------------------------------------ max


def _max_pass(source, window: _Window, axis: int, best, codes, tap_codes, nan_aware: bool, name: str) -> None:
    """``best``: every window's first maximum of ``source`` along ``axis``; ``codes``: the code of
    the tap it came from, ``tap_codes(offsets, inputs)`` giving the candidates' codes (strictly
    increasing with the offset, so a later winner's code is the maximum of the two)."""
    taps = list(_taps(window, axis, source.shape[1 + axis]))
    offset, outputs, inputs = taps[0]
    if outputs == slice(0, window.out[axis]):  # the first tap starts every window
        np.copyto(best, source[_along(axis, inputs)])
        np.copyto(codes, tap_codes(codes.dtype.type(offset), inputs))
        taps = taps[1:]
    else:  # windows start at different taps: from -inf and the code of each window's first input
        best.fill(-np.inf)
        starts = window.starts(axis)
        np.copyto(codes, tap_codes(_on_axis(np.maximum(-starts, 0), axis), np.maximum(starts, 0)), casting="unsafe")
    copies = scratch(name, best.size, best.dtype)
    for offset, outputs, inputs in taps:
        candidate, current = _contiguous(source[_along(axis, inputs)], copies), best[_along(axis, outputs)]
        wins = np.greater(candidate, current)
        if nan_aware:  # a first NaN wins too
            wins |= np.isnan(candidate) & ~np.isnan(current)
        np.maximum(candidate, current, out=current)
        window_codes = codes[_along(axis, outputs)]
        np.maximum(window_codes, np.multiply(wins, tap_codes(codes.dtype.type(offset), inputs)), out=window_codes)


def _max_pool2d_separable(x, window: _Window, out, codes, nan_aware: bool) -> None:
    """Columns first, then rows: the first maximum of each window row, then the first row whose
    maximum wins, is the first maximum in row-major window order (and the first NaN, nan_aware)."""
    c, h, _, n = x.shape
    column_best = scratch("column maxima", (c, h, window.out[1], n), x.dtype)
    column_codes = scratch("column codes", column_best.shape, codes.dtype)
    _max_pass(x, window, 1, column_best, column_codes, lambda offsets, inputs: offsets, nan_aware, "column taps")
    kw, row_codes = window.kernel[1], scratch("row tap codes", column_best.size, codes.dtype)
    _max_pass(column_best, window, 0, out, codes,
              lambda offsets, inputs: offsets * kw + _contiguous(column_codes[:, inputs], row_codes), nan_aware, "row taps")


def _check_codes(indices, shape, window: _Window, input_shape) -> None:
    """``indices`` must be tap codes of ``shape`` naming pixels of the input (a window clipped by
    the input's edge or padding has taps that name none)."""
    _check_like(indices, "indices", shape, code_dtype(window.kernel))
    if indices.size == 0:
        return
    taps, kw = window.kernel[0] * window.kernel[1], window.kernel[1]
    if int(np.max(indices)) >= taps:
        raise ValueError(f"indices of shape {tuple(shape)} must be tap codes below {taps} for kernel_size="
                         f"{window.kernel}, got {int(np.max(indices))}")
    for axis, size in enumerate(input_shape[1:3]):  # only the clipped windows can name a pixel past the edge
        starts = window.starts(axis)
        clipped = np.flatnonzero((starts < 0) | (starts + window.kernel[axis] > size))
        if clipped.size:
            codes = np.take(indices, clipped, axis=1 + axis).astype(np.int64)
            positions = (codes // kw if axis == 0 else codes % kw) + _on_axis(starts[clipped], axis)
            if positions.min() < 0 or positions.max() >= size:
                raise ValueError(f"indices of shape {tuple(shape)} name pixels outside the input of shape "
                                 f"{input_shape} (tap codes of another geometry?)")


def _argmax_rows_columns(indices, window: _Window):
    """The input row and column (int64) each code names."""
    codes = indices.astype(np.int64)
    kw = window.kernel[1]
    return codes // kw + _on_axis(window.starts(0), 0), codes % kw + _on_axis(window.starts(1), 1)


def indices_nchw(indices, input_shape, output_shape, kernel_size, stride=None, padding=0, ceil_mode: bool = False):
    """:func:`max_pool2d`'s tap codes as the int64 (N, C, H_out, W_out) in-plane flat indices
    ``h * W + w`` that PyTorch's ``max_pool2d(..., return_indices=True)`` gives for the NCHW input."""
    input_shape = _check_shape(input_shape)
    window = _geometry(input_shape, kernel_size, stride, padding, ceil_mode, name="input_shape")
    shape = _output_shape(input_shape, window)
    if tuple(output_shape) != shape:
        raise ValueError(f"output_shape {tuple(output_shape)} is not the pooling output {shape} of input_shape {input_shape}")
    _check_codes(indices, shape, window, input_shape)
    rows, columns = _argmax_rows_columns(indices, window)
    rows *= input_shape[2]
    rows += columns
    return np.ascontiguousarray(rows.transpose(3, 0, 1, 2))


def _blocked_codes(codes, relu_output, out):
    """``codes`` with the all-ones code (no tap's) where ``relu_output <= 0`` (or NaN), into
    ``out``: the ReLU passes no gradient there."""
    blocked = np.subtract(np.greater(relu_output, 0), codes.dtype.type(1), dtype=codes.dtype, out=out)
    return np.bitwise_or(blocked, codes, out=blocked)


def _tiles(array, kernel, out, writeable: bool = True):
    """The (KH, KW, C, H_out, W_out, N) view of a (C, H, W, N) ``array`` cut into ``out`` windows of
    ``kernel`` side by side from its top-left corner: each window tap's pixels as one array."""
    (kh, kw), (oh, ow) = kernel, out
    s_c, s_h, s_w, s_n = array.strides
    return np.lib.stride_tricks.as_strided(array, shape=(kh, kw, array.shape[0], oh, ow, array.shape[3]),
                                           strides=(s_h, s_w, s_c, s_h * kh, s_w * kw, s_n), writeable=writeable)


def _max_pool2d_backward_taps(grad_output, codes, grad_input, window: _Window, row_taps, column_taps) -> None:
    """Windows that do not overlap but are not side by side from the corner (padding, gaps,
    ``ceil_mode``'s windows past the input): every pixel takes the gradient of the one window
    holding it if its code names it, one masked pass per tap (over contiguous arrays, then copied
    in place); pixels in no window take 0."""
    grad_input.fill(0)
    bits, kw = np.dtype(f"i{grad_output.itemsize}"), window.kernel[1]
    gradient = _contiguous(grad_output, scratch("gradient", grad_output.size, grad_output.dtype)).view(bits)
    codes = _contiguous(codes, scratch("codes", codes.size, codes.dtype))
    selected = scratch("tap gradient", grad_output.shape, bits)
    for row_offset, output_rows, input_rows in row_taps:
        for column_offset, output_columns, input_columns in column_taps:
            # all-ones or all-zeros words: a bitwise AND selects exactly (an inf elsewhere stays out)
            np.negative(np.equal(codes, row_offset * kw + column_offset).view(np.int8), out=selected)
            selected &= gradient
            np.copyto(grad_input[:, input_rows, input_columns],
                      selected.view(grad_output.dtype)[:, output_rows, output_columns])


def _max_pool2d_backward_scatter(grad_output, codes, grad_input, window: _Window) -> None:
    """Every window's gradient added to the pixel its code names, by ``np.add.at`` in the output's
    order: a pixel shared by overlapping windows sums them from zero in the windows' row-major
    order (PyTorch's, in the gradient's dtype). NumPy 2's ``add.at`` is a fast loop: for 3x3/2
    this beat nine masked passes (benchmarks/NOTES.md)."""
    c, h, w, n = grad_input.shape
    kw = window.kernel[1]
    # The flat (C, H, W, N) position of every window's top-left tap (padding included) ...
    corners = ((np.arange(c).reshape(-1, 1, 1, 1) * h + _on_axis(window.starts(0), 0)) * w
               + _on_axis(window.starts(1), 1)) * n + np.arange(n)
    if codes.dtype == np.uint8:  # ... plus each code's offset from it
        taps = np.arange(window.kernel[0] * kw)
        targets = np.take((taps // kw * w + taps % kw) * n, codes)
    else:
        wide = codes.astype(np.int64)
        targets = (wide // kw * w + wide % kw) * n
    targets += corners
    total = grad_input if grad_input.flags.c_contiguous else scratch("scattered gradient", grad_input.shape,
                                                                        grad_input.dtype)
    total.fill(0)
    np.add.at(total.reshape(-1), targets.reshape(-1), grad_output.reshape(-1))
    if total is not grad_input:
        np.copyto(grad_input, total)


class _PoolPlan:
    """What a pooling plan holds: the checked window of one ``input_shape`` and ``dtype``, the
    output shape, whether the windows lie side by side, the temporaries and kept views."""

    def __init__(self, input_shape, dtype, kernel_size, stride, padding, ceil_mode, keep: bool, name: str):
        self.input_shape = _check_shape(input_shape)
        self.dtype = np.dtype(dtype)
        self.window = window = _geometry(self.input_shape, kernel_size, stride, padding, ceil_mode, name=name)
        self.output_shape = _output_shape(self.input_shape, window)
        size = self.input_shape[1:3]
        # Windows side by side from the top-left corner, none reaching past the input: each tap of
        # every window is one strided view (_tiles).
        self._tiled = window.padding == (0, 0) and window.kernel == window.stride and all(
            o * k <= n for o, k, n in zip(window.out, window.kernel, size))
        self._covered = self._tiled and all(o * k == n for o, k, n in zip(window.out, window.kernel, size))
        self._keep = keep
        self._buffers, self._views = {}, KeptViews() if keep else None

    def _buffer(self, name: str, shape, dtype):
        if not self._keep:
            return scratch(name, shape, dtype)
        array = self._buffers.get(name)
        if array is None:  # one shape per name in a plan
            array = self._buffers[name] = np.empty(shape, dtype)
        return array

    def _zeros(self):
        if not self._keep:
            return _zeros(self.output_shape, self.dtype)
        zeros = self._buffers.get("zeros")
        if zeros is None:
            zeros = self._buffers["zeros"] = np.zeros(self.output_shape, self.dtype)
            zeros.flags.writeable = False
        return zeros

    def _bound(self, name: str, arrays: tuple, build):
        """``build(*arrays)``: views of ``arrays`` (and of the plan's buffers); a kept plan's from
        its last call when that was with these same arrays."""
        if self._views is None:
            return build(*arrays)
        return self._views.get(name, arrays, build)

    def _uncovered(self, grad_input):
        """The rows and columns of ``grad_input`` past the last window (side by side windows)."""
        if self._covered:
            return ()
        (kh, kw), (oh, ow) = self.window.kernel, self.window.out
        return grad_input[:, oh * kh:], grad_input[:, :oh * kh, ow * kw:]


_PLAN_DOCSTRING = """{what} on (C, H, W, N) inputs of one ``input_shape`` and ``dtype``: the
    window resolved and checked once (the functions' errors, raised here), the path chosen once.
    :meth:`forward` and :meth:`backward` check nothing: they take arrays of the plan's shapes
    (``input_shape``, ``output_shape``) and dtypes{dtypes}, any strides. Call them under
    ``np.errstate(all="ignore")`` (NaN and inf pass silently); the functions do.

    ``keep=False`` (the functions' plans): temporaries from the per-thread scratch buffers.
    ``keep=True`` (a layer's, one per lane): the plan owns its temporaries and keeps the views it
    builds of the arrays it is called with, rebuilt only when called with other arrays; such a
    plan is for one thread at a time. ``name``: what an error calls the input shape.
    """


class MaxPool2dPlan(_PoolPlan):
    __doc__ = _PLAN_DOCSTRING.format(what=":func:`max_pool2d` and its backward",
                                     dtypes=" (``dtype``, ``code_dtype``)")

    def __init__(self, input_shape, dtype, kernel_size, stride=None, padding=0, ceil_mode: bool = False, *,
                 keep: bool = False, name: str = "input_shape"):
        super().__init__(input_shape, dtype, kernel_size, stride, padding, ceil_mode, keep, name)
        window, size = self.window, self.input_shape[1:3]
        self.code_dtype = code_dtype(window.kernel)
        self._two_by_two = self._tiled and window.kernel == (2, 2)
        row_taps, column_taps = list(_taps(window, 0, size[0])), list(_taps(window, 1, size[1]))
        overlapping = any(k > s for k, s in zip(window.kernel, window.stride))
        few = len(row_taps) * len(column_taps) <= _MAX_TAP_PASSES
        self._tap_passes = (row_taps, column_taps) if few and not overlapping else None

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x, out, codes, relu: bool = False):
        """``(out, codes)``: :func:`max_pool2d` of ``x`` written into ``out`` and ``codes``."""
        if out.size:
            if self._two_by_two:
                self._forward_2x2(x, out, codes)
            else:
                _max_pool2d_separable(x, self.window, out, codes, nan_aware=False)
            # Some window holds a NaN: the compares did not find the first.
            if np.isnan(np.maximum.reduce(out, axis=None)):
                _max_pool2d_separable(x, self.window, out, codes, nan_aware=True)
        if relu:
            np.maximum(out, self._zeros(), out=out)
        return out, codes

    def _bind_2x2(self, x):
        # The four pixels of every window, copied contiguous (see _contiguous):
        # (tap row, tap column, C, H_out, W_out, N).
        quads = self._buffer("2x2 quads", (2, 2, *self.output_shape), self.dtype)
        right_wins = self._buffer("2x2 right wins", (2, *self.output_shape), np.bool_)
        bottom_wins = self._buffer("2x2 bottom wins", self.output_shape, np.bool_)
        return (_tiles(x, (2, 2), self.window.out, writeable=False), quads, quads[:, 1], quads[:, 0], quads[1, 0],
                quads[0, 0], right_wins, right_wins[0], right_wins[1], right_wins[1].view(np.uint8), bottom_wins,
                bottom_wins.view(np.uint8))

    def _forward_2x2(self, x, out, codes) -> None:
        """2x2/2 without padding (an odd last row or column dropped): a compare and a maximum in
        each window row (both rows in one call each), one of each between the rows, the codes from
        the compares' outcomes. A compare cannot see a window's first NaN: forward checks for NaN."""
        (pixels, quads, right, left, bottom, top, right_wins, right_in_top, right_in_bottom, column_code, bottom_wins,
         bottom_code) = self._bound("2x2 forward", (x,), self._bind_2x2)
        np.copyto(quads, pixels)
        # A later position wins only when strictly greater (PyTorch's first maximum). The earlier
        # operand goes second: NumPy's maximum returns its second operand of an equal pair, so a 0.0
        # tied with an earlier -0.0 comes out as -0.0, the pixel the code names.
        np.greater(right, left, out=right_wins)
        np.maximum(right, left, out=left)  # each window row's maximum: top and bottom
        np.greater(bottom, top, out=bottom_wins)
        np.maximum(bottom, top, out=out)
        column = np.bitwise_xor(right_in_top, right_in_bottom, out=right_in_bottom)  # the winning row's column
        column &= bottom_wins
        column ^= right_in_top
        np.add(bottom_code, bottom_code, out=codes)  # the row's code
        codes |= column_code

    # -- backward ---------------------------------------------------------------------------------

    def backward(self, grad_output, codes, grad_input, relu_output=None):
        """:func:`max_pool2d_backward` into ``grad_input``, returned; ``codes`` from :meth:`forward`."""
        if grad_input.size == 0:
            return grad_input
        if self._tiled:
            self._backward_tiled(grad_output, codes, grad_input, relu_output)
        elif self._tap_passes is not None:
            if relu_output is not None:
                codes = _blocked_codes(codes, relu_output, self._buffer("blocked codes", codes.shape, codes.dtype))
            _max_pool2d_backward_taps(grad_output, codes, grad_input, self.window, *self._tap_passes)
        else:
            if relu_output is not None:
                grad_output = select(relu_output > 0, grad_output)
            _max_pool2d_backward_scatter(grad_output, codes, grad_input, self.window)
        return grad_input

    def _bind_tiled(self, grad_input):
        window, (c, oh, ow, n) = self.window, self.output_shape
        kh, kw = window.kernel
        taps = np.arange(kh * kw, dtype=self.code_dtype).reshape(-1, 1, 1, 1, 1)
        selected = self._buffer("tap selected", (kh * kw, c, oh, ow, n), np.bool_)
        words = selected.view(np.int8)
        bits = np.dtype(f"i{grad_input.itemsize}")
        return (taps, selected, words, words.reshape(kh, kw, c, oh, ow, n),
                _tiles(grad_input.view(bits), window.kernel, window.out), self._uncovered(grad_input))

    def _backward_tiled(self, grad_output, codes, grad_input, relu_output) -> None:
        """Windows side by side: each pixel takes its window's gradient where the window's code
        names it, as ``gradient & -(code == tap)`` (all-ones or all-zeros words: a bitwise AND
        selects exactly, an inf elsewhere stays out), every tap in one pass straight into its
        pixels."""
        if relu_output is not None:
            codes = _blocked_codes(codes, relu_output, self._buffer("blocked codes", codes.shape, codes.dtype))
        # Not kept for grad_output: the gradient after a flatten is a new view every step.
        taps, selected, words, tap_words, target, uncovered = self._bound("tiled backward", (grad_input,),
                                                                          self._bind_tiled)
        np.equal(codes, taps, out=selected)
        np.negative(words, out=words)  # True -> -1: all bits set
        np.bitwise_and(grad_output.view(target.dtype), tap_words, out=target)
        for strip in uncovered:  # the rows and columns past the last window
            strip.fill(0)


@ieee_arithmetic
def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode: bool = False, *, relu: bool = False,
               out=None, indices_out=None):
    """Max pooling of a (C, H, W, N) ``x``: ``(out, indices)``, ``indices`` the tap codes (module
    docstring). ``relu=True`` returns ``max(pool(x), 0)``, which is ``pool(max(x, 0))`` (indices
    still the pool's of ``x``). ``out`` and ``indices_out`` are result buffers to write into."""
    _check_input(x, "input")
    plan = MaxPool2dPlan(x.shape, x.dtype, kernel_size, stride, padding, ceil_mode, name="input")
    out = _workspace(out, plan.output_shape, x.dtype, "out")
    codes = _workspace(indices_out, plan.output_shape, plan.code_dtype, "indices_out")
    return plan.forward(x, out, codes, relu=relu)


@ieee_arithmetic
def max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride=None, padding=0,
                        ceil_mode: bool = False, *, relu_output=None, out=None):
    """Gradient of :func:`max_pool2d` w.r.t. its (C, H, W, N) input of ``input_shape``, given its
    tap codes ``indices``; ``relu_output``: the pool's output when ``relu=True`` was used (no
    gradient where it is <= 0). ``out``: the result buffer to write into."""
    _check_input(grad_output, "grad_output")
    plan = MaxPool2dPlan(input_shape, grad_output.dtype, kernel_size, stride, padding, ceil_mode)
    _check_grad_output(grad_output, plan.output_shape, plan.input_shape)
    _check_codes(indices, plan.output_shape, plan.window, plan.input_shape)
    if relu_output is not None:
        _check_like(relu_output, "relu_output", plan.output_shape, grad_output.dtype)
    grad_input = _workspace(out, plan.input_shape, grad_output.dtype, "out")
    return plan.backward(grad_output, indices, grad_input, relu_output)


# ------------------------------------------------------------------------------------------ avg
# Through the NCHW path's separable window sums, on a leading axis of one: (1, C, H, W, N) puts
# rows and columns where they expect them, with the batch carried along innermost.


def _divisor(window: _Window, input_shape, count_include_pad: bool, dtype):
    c, h, w, n = input_shape
    return _avg_divisor(window, (n, c, h, w), count_include_pad).astype(dtype)[:, :, None]


def sum_in_order(terms, out):
    """``out := ((terms[0] + terms[1]) + terms[2]) + ...``: the terms summed in order, returned."""
    if len(terms) == 1:
        np.copyto(out, terms[0])
        return out
    np.add(terms[0], terms[1], out=out)
    for term in terms[2:]:
        out += term
    return out


class AvgPool2dPlan(_PoolPlan):
    __doc__ = _PLAN_DOCSTRING.format(what=":func:`avg_pool2d` and its backward", dtypes=" (``dtype``)")

    def __init__(self, input_shape, dtype, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, *, keep: bool = False, name: str = "input_shape"):
        super().__init__(input_shape, dtype, kernel_size, stride, padding, ceil_mode, keep, name)
        self._divisor = _divisor(self.window, self.input_shape, bool(count_include_pad), self.dtype)

    # The separable sums start from zero: a sum in order that starts from +0 is the same sum
    # without it, plus +0 (only -0 can tell them apart: -0 + -0 is -0, +0 + -0 is +0). So the side
    # by side windows' sums skip the zeros and add +0 once, bit for bit the general path's.

    def forward(self, x, out):
        """:func:`avg_pool2d` of ``x`` written into ``out``, returned."""
        if not self._tiled:
            sums = _window_sums(_window_sums(x[None], self.window, 1), self.window, 0)[0]
            return np.divide(sums, self._divisor, out=out)
        pixels, row_sums, total, zeros = self._bound("tiled forward", (x,), self._bind_forward)
        sum_in_order(pixels, row_sums)  # columns first, as the separable sums
        sum_in_order(row_sums, total)
        np.add(total, zeros, out=total)
        return np.divide(total, self._divisor, out=out)

    def _bind_forward(self, x):
        pixels = _tiles(x, self.window.kernel, self.window.out, writeable=False).swapaxes(0, 1)  # (KW, KH, ...)
        row_sums = self._buffer("row sums", (self.window.kernel[0], *self.output_shape), self.dtype)
        return tuple(pixels), row_sums, self._buffer("window sums", self.output_shape, self.dtype), self._zeros()

    def backward(self, grad_output, grad_input):
        """:func:`avg_pool2d_backward` into ``grad_input``, returned."""
        if not self._tiled:
            share = grad_output / self._divisor
            rows = _window_sums_transposed(share[None], self.window, 0, self.input_shape[1])
            np.copyto(grad_input, _window_sums_transposed(rows, self.window, 1, self.input_shape[2])[0])
            return grad_input
        share, zeros, target, uncovered = self._bound("tiled backward", (grad_input,), self._bind_backward)
        np.divide(grad_output, self._divisor, out=share)
        np.add(share, zeros, out=target)  # each pixel's one window's share (+0: see above)
        for strip in uncovered:
            strip.fill(0)
        return grad_input

    def _bind_backward(self, grad_input):
        share = self._buffer("share", self.output_shape, self.dtype)
        return share, self._zeros(), _tiles(grad_input, self.window.kernel, self.window.out), \
            self._uncovered(grad_input)


@ieee_arithmetic
def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True,
               *, out=None):
    """Average pooling of a (C, H, W, N) ``x`` with PyTorch's divisor; ``out``: the result buffer."""
    _check_input(x, "input")
    plan = AvgPool2dPlan(x.shape, x.dtype, kernel_size, stride, padding, ceil_mode, count_include_pad, name="input")
    return plan.forward(x, _workspace(out, plan.output_shape, x.dtype, "out"))


@ieee_arithmetic
def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                        count_include_pad: bool = True, *, out=None):
    """Gradient of :func:`avg_pool2d` w.r.t. its (C, H, W, N) input of ``input_shape``."""
    _check_input(grad_output, "grad_output")
    plan = AvgPool2dPlan(input_shape, grad_output.dtype, kernel_size, stride, padding, ceil_mode, count_include_pad)
    _check_grad_output(grad_output, plan.output_shape, plan.input_shape)
    return plan.backward(grad_output, _workspace(out, plan.input_shape, grad_output.dtype, "out"))

"""2-D max and average pooling (NCHW), forward and backward, with PyTorch's exact semantics.

Output size, per spatial dimension, is PyTorch's::

    out = floor((size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) / stride) + 1
    # ceil_mode only: a last window starting past the input and its left padding is dropped
    if ceil_mode and (out - 1) * stride >= size + padding: out -= 1

Padding is at most half the kernel, so every window overlaps the input. Max pooling never picks
a padded position; ties keep the first maximum in row-major window order (PyTorch CPU) and the
indices are int32 flat positions ``h * W + w`` in the input plane. The average divides by the
window clipped to the padded input (``count_include_pad=True``) or to the input itself: positions
that ``ceil_mode`` adds beyond the padded input are never counted, as in PyTorch.

The NumPy path pools columns, then rows, each pass visiting only the window offsets that reach
the input (``_Window.taps``), so its cost follows the input and output sizes whatever the
window and padding (PyTorch answers a 46342 x 46342 window over one pixel at once; so do we).
The kernels count window coordinates and areas in 64 bits for the same windows.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..device import common_device, contiguous, device_of, empty
from .activation import select
from ._checks import check_array, ieee_arithmetic, pair

__all__ = ["pool2d_output_size", "max_pool2d", "max_pool2d_backward", "max_pool2d_relu_backward", "avg_pool2d",
           "avg_pool2d_backward"]

# Launch plans of the max-pool kernels per (pass, argument signature, geometry arguments): a
# steady-state call of a layer checks its arrays against the signature and launches.
_plans = kernels.PlanCache()


@dataclass(frozen=True)
class _Window:
    """One pooling geometry, checked: kernel, stride, padding and the output size, per (H, W)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    out: tuple[int, int]

    def kernel_args(self, input_shape) -> tuple:
        """The geometry arguments common to every kernel of pool.cu."""
        n, c, h, w = input_shape
        return (n * c, h, w, *self.out, *self.kernel, *self.stride, *self.padding)

    def starts(self, axis: int):
        """First row (axis 0) or column (axis 1) of every window, in input coordinates (may be < 0)."""
        return np.arange(self.out[axis]) * self.stride[axis] - self.padding[axis]

    def taps(self, axis: int, size: int):
        """``(outputs, inputs)`` slice pairs along ``axis`` (0 rows, 1 columns) of an input ``size``
        long: window offset ``a`` of windows ``outputs`` reads input positions ``inputs``.

        In increasing ``a``, and only the offsets that reach the input: the cost depends on the
        input and output sizes, never on the padded size (a 46342-wide window over one pixel is one
        tap, not 46342).
        """
        k, s, p, out = self.kernel[axis], self.stride[axis], self.padding[axis], self.out[axis]
        if s <= size:  # the windows' input parts overlap or touch: their offsets are one range
            offsets = range(max(0, p - (out - 1) * s), min(k, p + size))
        else:  # disjoint runs, one per window, in increasing offset for decreasing window
            offsets = itertools.chain.from_iterable(
                range(max(0, p - o * s), min(k, p - o * s + size)) for o in reversed(range(out)))
        for a in offsets:  # each reaches the input from at least one window: first < last
            first, last = max(0, -((a - p) // s)), min(out, (p - a + size - 1) // s + 1)
            start = first * s - p + a
            yield slice(first, last), slice(start, start + (last - first - 1) * s + 1, s)


def _output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def check_window(kernel_size, stride=None, padding=0):
    """``(kernel, stride, padding)`` as pairs, checked: what every input size needs of them."""
    kernel = pair(kernel_size, "kernel_size", 1)
    stride = pair(kernel_size if stride is None else stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"padding must be at most half of kernel_size, got padding={padding} and kernel_size={kernel}")
    return kernel, stride, padding


def _window(input_shape, kernel_size, stride, padding, ceil_mode, name: str = "input") -> _Window:
    kernel, stride, padding = check_window(kernel_size, stride, padding)
    size = tuple(input_shape[-2:])
    out = tuple(_output_size(*args, bool(ceil_mode)) for args in zip(size, kernel, stride, padding))
    if min(out) < 1:
        raise ValueError(f"{name} of shape {tuple(input_shape)} is too small for kernel_size={kernel}, "
                         f"stride={stride}, padding={padding}: the output would be {out[0]}x{out[1]}")
    return _Window(kernel, stride, padding, out)


def pool2d_output_size(input_size, kernel_size, stride=None, padding=0, ceil_mode: bool = False) -> tuple[int, int]:
    """``(out_h, out_w)`` of a 2-D pooling of an ``input_size = (H, W)`` plane (PyTorch's rule)."""
    input_size = tuple(input_size)
    if len(input_size) != 2:
        raise ValueError(f"input_size must be (H, W), got {input_size!r}")
    return _window(input_size, kernel_size, stride, padding, ceil_mode, name="input_size").out


def _check_input_shape(input_shape, grad_output) -> tuple[int, int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise ValueError(f"input_shape must be 4 non-negative ints (N, C, H, W), got {input_shape!r}")
    if shape[:2] != tuple(grad_output.shape[:2]):
        raise ValueError(f"grad_output of shape {tuple(grad_output.shape)} does not match input_shape {shape} "
                         f"in batch and channels")
    return tuple(int(d) for d in shape)


def _check_grad_size(window: _Window, grad_output, input_shape):
    if tuple(grad_output.shape[2:]) != window.out:
        raise ValueError(f"grad_output of shape {tuple(grad_output.shape)} does not match the pooling output "
                         f"{window.out[0]}x{window.out[1]} of input_shape {input_shape}")


def _along(axis: int, index):
    """An index of an NCHW array selecting ``index`` along rows (axis 0) or columns (axis 1)."""
    return (slice(None),) * (2 + axis) + (index,)


def _resized(shape, axis: int, size: int) -> tuple:
    return tuple(size if d == 2 + axis else n for d, n in enumerate(shape))


def _window_sums(x, window: _Window, axis: int):
    """Every window's sum along ``axis`` over its input positions (padding adds nothing)."""
    sums = np.zeros(_resized(x.shape, axis, window.out[axis]), x.dtype)
    for outputs, inputs in window.taps(axis, x.shape[2 + axis]):
        sums[_along(axis, outputs)] += x[_along(axis, inputs)]
    return sums


def _window_sums_transposed(grad, window: _Window, axis: int, size: int):
    """The transpose of :func:`_window_sums`: each window's value added to its input positions."""
    out = np.zeros(_resized(grad.shape, axis, size), grad.dtype)
    for outputs, inputs in window.taps(axis, size):
        out[_along(axis, inputs)] += grad[_along(axis, outputs)]
    return out


def _window_max(x, positions, window: _Window, axis: int):
    """Every window's maximum along ``axis`` and the in-plane position (``positions``, int32,
    broadcast to ``x``) of the element it came from, picked as the kernel picks: starting at the
    window's first input element (so an all -inf window names a real pixel), then taking strictly
    greater values, or a first NaN, in increasing position."""
    best = np.full(_resized(x.shape, axis, window.out[axis]), -np.inf, x.dtype)
    positions = np.broadcast_to(positions, x.shape)
    at = np.take(positions, np.maximum(window.starts(axis), 0), axis=2 + axis)
    for outputs, inputs in window.taps(axis, x.shape[2 + axis]):
        candidate, current = x[_along(axis, inputs)], best[_along(axis, outputs)]
        better = (candidate > current) | (np.isnan(candidate) & ~np.isnan(current))
        np.copyto(current, candidate, where=better)
        np.copyto(at[_along(axis, outputs)], positions[_along(axis, inputs)], where=better)
    return best, at


def _avg_divisor(window: _Window, input_shape, count_include_pad: bool):
    """PyTorch's divisor of every window, ``(OH, OW)`` int64."""
    sides = []
    for axis, size in enumerate(input_shape[2:]):
        start = window.starts(axis)
        end = np.minimum(start + window.kernel[axis], size + window.padding[axis])
        if not count_include_pad:
            start, end = np.maximum(start, 0), np.minimum(end, size)
        sides.append(end - start)
    return np.outer(*sides)


# ------------------------------------------------------------------------------------------ max


def _max_pool2d_2x2_numpy(x, window: _Window):
    """:func:`_max_pool2d_numpy` for a 2x2 window, stride 2, no padding (an odd last row or column
    is dropped), or None where it does not apply: the window's four pixels as strided views of
    ``x``, two maxima and a compare per window row, one of each between the rows, and the indices
    from the compares' outcomes. ``np.maximum`` propagates NaN, so an output NaN means some window
    holds one; its index needs the first NaN, which a compare cannot see: the general path then
    answers."""
    if window.kernel != (2, 2) or window.stride != (2, 2) or window.padding != (0, 0):
        return None
    (oh, ow), (n, c, h, w) = window.out, x.shape
    if (oh, ow) != (h // 2, w // 2):  # ceil_mode added a window past the input
        return None
    quads = x[:, :, :2 * oh, :2 * ow].reshape(n, c, oh, 2, ow, 2)
    top_left, top_right = quads[:, :, :, 0, :, 0], quads[:, :, :, 0, :, 1]
    bottom_left, bottom_right = quads[:, :, :, 1, :, 0], quads[:, :, :, 1, :, 1]
    # A later position wins only when strictly greater: PyTorch's first maximum in row-major order.
    top_right_wins, bottom_right_wins = top_right > top_left, bottom_right > bottom_left
    # Later operand first: NumPy's SIMD maximum returns its second operand of an equal pair, so a
    # 0.0 tied with an earlier -0.0 comes out as -0.0, the pixel the index names.
    top, bottom = np.maximum(top_right, top_left), np.maximum(bottom_right, bottom_left)
    bottom_wins = bottom > top
    out = np.maximum(bottom, top)
    if np.isnan(out).any():
        return None
    column = top_right_wins ^ (bottom_wins & (top_right_wins ^ bottom_right_wins))  # the winning row's
    corner = (np.arange(oh, dtype=np.int32)[:, None] * np.int32(2 * w) + np.arange(ow, dtype=np.int32) * np.int32(2))
    indices = bottom_wins * np.int32(w)
    indices += column
    indices += corner
    return out, indices


def _max_pool2d_numpy(x, window: _Window):
    h, w = x.shape[2:]
    if h * w > np.iinfo(np.int32).max:  # the int32 indices would wrap (the kernels refuse such planes too)
        raise ValueError(f"input of shape {tuple(x.shape)} has planes of 2^31 pixels or more, past what "
                         f"max_pool2d's int32 indices can name")
    fast = _max_pool2d_2x2_numpy(x, window)
    if fast is not None:
        return fast
    # Separable, columns first: the first maximum of each window row, then the first row whose
    # maximum wins is the first maximum (and the first NaN) in row-major window order.
    row_best, column_at = _window_max(x, np.arange(w, dtype=np.int32), window, 1)
    return _window_max(row_best, np.arange(h, dtype=np.int32)[:, None] * w + column_at, window, 0)


def _check_plane(input_shape, window: _Window) -> None:
    """pool.cu indexes within a plane in 32-bit ints (``h * W + w``; the indices are int32 too) and
    takes the window arguments as ints: refuse, before any copy, a plane the kernels would index
    past 2^31 (out of bounds on a GPU) or a window they cannot be told."""
    (h, w), (oh, ow) = input_shape[2:], window.out
    if max(h * w, oh * ow) > np.iinfo(np.int32).max:
        raise ValueError(f"input of shape {tuple(input_shape)} is too large for the pooling kernels: "
                         f"H*W and H_out*W_out must each be below 2^31")
    if max(*window.kernel, *window.stride) > np.iinfo(np.int32).max:
        raise ValueError(f"kernel_size={window.kernel} and stride={window.stride} must be below 2^31 "
                         f"for the pooling kernels (input of shape {tuple(input_shape)})")


def _max_pool2d_kernel(x, window: _Window, key):
    _check_plane(x.shape, window)
    n, c = x.shape[:2]
    device = device_of(x)
    out = empty((n, c, *window.out), np.float32, device)
    indices = empty(out.shape, np.int32, device)
    x = contiguous(x)
    plan = kernels.LaunchPlan("pool", "max_pool2d_forward_v1", kernels.grid_stride_blocks(out.size), kernels.BLOCK,
                              (x, out, indices, *window.kernel_args(x.shape)))
    plan(x, out, indices)
    if key[1] is not None:
        _plans.remember(key, kernels.OpPlan(plan, [(out.shape, out.dtype), (indices.shape, indices.dtype)]))
    return out, indices


def max_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode: bool = False, return_indices: bool = False):
    """2-D max pooling of an NCHW ``input``; with ``return_indices``, also the int32 in-plane argmax positions."""
    key = ("forward", kernels.signature(input), kernels.arguments_key(kernel_size, stride, padding, ceil_mode))
    plan = _plans.lookup(key) if key[1] is not None else None
    out, indices = _max_pool2d(input, kernel_size, stride, padding, ceil_mode, key) if plan is None else plan(input)
    return (out, indices) if return_indices else out


@ieee_arithmetic
def _max_pool2d(input, kernel_size, stride, padding, ceil_mode, key):
    check_array(input, "input", 4, "NCHW")
    window = _window(input.shape, kernel_size, stride, padding, ceil_mode)
    if device_of(input) == "cpu":
        return _max_pool2d_numpy(input, window)
    return _max_pool2d_kernel(input, window, key)


def _check_indices(indices, grad_output) -> None:
    if not hasattr(indices, "dtype") or not hasattr(indices, "shape"):
        raise TypeError(f"indices must be the int32 array max_pool2d returned, got {type(indices).__name__}")
    common_device(grad_output=grad_output, indices=indices)
    if indices.dtype != np.int32 or indices.shape != grad_output.shape:
        raise ValueError(f"indices must be int32 of grad_output's shape {tuple(grad_output.shape)}, "
                         f"got {indices.dtype} of shape {tuple(indices.shape)}")


def _check_index_range(indices, input_shape) -> None:
    """On the CPU the gradient is scattered to the indices, so each must name a pixel of its plane.

    (The kernels gather instead: a window adds its gradient to the one input position its index
    names, so an index outside the window is dropped there, never written out of bounds; checking
    would cost a device round trip per step.)
    """
    plane = input_shape[2] * input_shape[3]
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= plane):
        raise ValueError(f"indices of shape {tuple(indices.shape)} must be in-plane positions in [0, {plane}) "
                         f"for input_shape {input_shape}, got values in [{int(indices.min())}, {int(indices.max())}]")


def _max_pool2d_backward_numpy(grad_output, indices, input_shape):
    n, c, h, w = input_shape
    # Every gradient goes to its plane's argmax; bincount sums the ones that share a position.
    target = (np.arange(n * c).reshape(n, c, 1, 1) * (h * w) + indices).ravel()
    grad = np.bincount(target, weights=grad_output.ravel(), minlength=n * c * h * w)
    return grad.reshape(input_shape).astype(grad_output.dtype, copy=False)


def _max_pool2d_backward_kernel(grad_output, indices, input_shape, window: _Window, output, key):
    _check_plane(input_shape, window)
    grad_input = empty(input_shape, np.float32, device_of(grad_output))
    kernel, arrays = "max_pool2d_backward_v1", (contiguous(grad_output), contiguous(indices))
    if output is not None:
        kernel, arrays = "max_pool2d_relu_backward_v1", (*arrays, contiguous(output))
    plan = kernels.LaunchPlan("pool", kernel, kernels.grid_stride_blocks(grad_input.size), kernels.BLOCK,
                              (*arrays, grad_input, *window.kernel_args(input_shape)))
    plan(*arrays, grad_input)
    if key[1] is not None:
        _plans.remember(key, kernels.OpPlan(plan, [(grad_input.shape, grad_input.dtype)]))
    return grad_input


def max_pool2d_relu_backward(grad_output, indices, output, input_shape, kernel_size, stride=None, padding=0,
                             ceil_mode: bool = False):
    """Gradient w.r.t. ``x`` of ``max_pool2d(relu(x))``, given the pool's ``output`` and ``indices``:
    ``relu_backward(max_pool2d_backward(...), relu(x))`` in one pass (one kernel on a device),
    bit-identical to it. The pool's output is relu(x) at each window's argmax, so its sign there
    is the ReLU's mask."""
    key = ("backward", kernels.signature(grad_output, indices, output),
           kernels.arguments_key(input_shape, kernel_size, stride, padding, ceil_mode))
    plan = _plans.lookup(key) if key[1] is not None else None
    if plan is not None:
        return plan(grad_output, indices, output)[0]
    check_array(output, "output", 4, "NCHW")
    if tuple(output.shape) != tuple(grad_output.shape):
        raise ValueError(f"output {tuple(output.shape)} must have grad_output's shape {tuple(grad_output.shape)}")
    common_device(grad_output=grad_output, output=output)
    return _max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride, padding, ceil_mode, output, key)


def max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride=None, padding=0, ceil_mode: bool = False):
    """Gradient of :func:`max_pool2d` w.r.t. its input of shape ``input_shape``, given its ``indices``."""
    key = ("backward", kernels.signature(grad_output, indices),
           kernels.arguments_key(input_shape, kernel_size, stride, padding, ceil_mode))
    plan = _plans.lookup(key) if key[1] is not None else None
    if plan is not None:
        return plan(grad_output, indices)[0]
    return _max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride, padding, ceil_mode, None, key)


@ieee_arithmetic
def _max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride, padding, ceil_mode, relu_output,
                         key):
    check_array(grad_output, "grad_output", 4, "NCHW")
    _check_indices(indices, grad_output)
    input_shape = _check_input_shape(input_shape, grad_output)
    window = _window(input_shape, kernel_size, stride, padding, ceil_mode, name="input_shape")
    _check_grad_size(window, grad_output, input_shape)
    if device_of(grad_output) == "cpu":
        _check_index_range(indices, input_shape)
        if relu_output is not None:  # the ReLU's mask at each window's argmax
            grad_output = select(relu_output > 0, grad_output)
        return _max_pool2d_backward_numpy(grad_output, indices, input_shape)
    return _max_pool2d_backward_kernel(grad_output, indices, input_shape, window, relu_output, key)


# ------------------------------------------------------------------------------------------ avg


def _avg_pool2d_numpy(x, window: _Window, count_include_pad: bool):
    sums = _window_sums(_window_sums(x, window, 1), window, 0)
    return sums / _avg_divisor(window, x.shape, count_include_pad).astype(x.dtype)


def _avg_pool2d_kernel(x, window: _Window, count_include_pad: bool):
    _check_plane(x.shape, window)
    out = empty((*x.shape[:2], *window.out), np.float32, device_of(x))
    kernels.launch("pool", "avg_pool2d_forward_v1", kernels.grid_stride_blocks(out.size), kernels.BLOCK,
                   (contiguous(x), out, *window.kernel_args(x.shape), count_include_pad))
    return out


@ieee_arithmetic
def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True):
    """2-D average pooling of an NCHW ``input``, with PyTorch's divisor."""
    check_array(input, "input", 4, "NCHW")
    window = _window(input.shape, kernel_size, stride, padding, ceil_mode)
    impl = _avg_pool2d_numpy if device_of(input) == "cpu" else _avg_pool2d_kernel
    return impl(input, window, bool(count_include_pad))


def _avg_pool2d_backward_numpy(grad_output, input_shape, window: _Window, count_include_pad: bool):
    share = grad_output / _avg_divisor(window, input_shape, count_include_pad).astype(grad_output.dtype)
    rows = _window_sums_transposed(share, window, 0, input_shape[2])
    return _window_sums_transposed(rows, window, 1, input_shape[3])


def _avg_pool2d_backward_kernel(grad_output, input_shape, window: _Window, count_include_pad: bool):
    _check_plane(input_shape, window)
    grad_input = empty(input_shape, np.float32, device_of(grad_output))
    kernels.launch("pool", "avg_pool2d_backward_v1", kernels.grid_stride_blocks(grad_input.size), kernels.BLOCK,
                   (contiguous(grad_output), grad_input, *window.kernel_args(input_shape), count_include_pad))
    return grad_input


@ieee_arithmetic
def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                        count_include_pad: bool = True):
    """Gradient of :func:`avg_pool2d` w.r.t. its input of shape ``input_shape``."""
    check_array(grad_output, "grad_output", 4, "NCHW")
    input_shape = _check_input_shape(input_shape, grad_output)
    window = _window(input_shape, kernel_size, stride, padding, ceil_mode, name="input_shape")
    _check_grad_size(window, grad_output, input_shape)
    impl = _avg_pool2d_backward_numpy if device_of(grad_output) == "cpu" else _avg_pool2d_backward_kernel
    return impl(grad_output, input_shape, window, bool(count_include_pad))

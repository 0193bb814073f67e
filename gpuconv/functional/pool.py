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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..device import common_device, contiguous, device_of, empty
from .activation import select
from ._checks import check_array, pair

__all__ = ["pool2d_output_size", "max_pool2d", "max_pool2d_backward", "max_pool2d_relu_backward", "avg_pool2d",
           "avg_pool2d_backward"]


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

    def padded_extent(self, axis: int, size: int) -> int:
        """Rows (columns) of the padded input that the windows reach, ceil_mode's extra ones included."""
        k, s, p, out = self.kernel[axis], self.stride[axis], self.padding[axis], self.out[axis]
        return max(size + 2 * p, (out - 1) * s + k)


def _output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _window(input_shape, kernel_size, stride, padding, ceil_mode, name: str = "input") -> _Window:
    kernel = pair(kernel_size, "kernel_size", 1)
    stride = pair(kernel_size if stride is None else stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"padding must be at most half of kernel_size, got padding={padding} and kernel_size={kernel}")
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


def _pad(x, window: _Window, fill):
    """``x`` padded with ``fill`` to the extent the windows reach (ceil_mode's extra rows included)."""
    (ph, pw), (h, w) = window.padding, x.shape[2:]
    return np.pad(x, ((0, 0), (0, 0), (ph, window.padded_extent(0, h) - h - ph),
                      (pw, window.padded_extent(1, w) - w - pw)), constant_values=fill)


def _offsets(window: _Window):
    """``(a, b, slices)`` per window offset in row-major order: ``padded[slices]`` is the
    ``(N, C, OH, OW)`` array of every window's element (a, b)."""
    (kh, kw), (sh, sw), (oh, ow) = window.kernel, window.stride, window.out
    for a in range(kh):
        for b in range(kw):
            yield a, b, (slice(None), slice(None), slice(a, a + (oh - 1) * sh + 1, sh), slice(b, b + (ow - 1) * sw + 1, sw))


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


def _max_pool2d_numpy(x, window: _Window):
    w = x.shape[3]
    padded = _pad(x, window, -np.inf)
    out = np.full((*x.shape[:2], *window.out), -np.inf, x.dtype)
    # As the kernel: start at the window's first input position (so an all -inf window names a
    # real pixel), then take strictly greater values, or a first NaN, in row-major offset order.
    rows, cols = window.starts(0)[:, None], window.starts(1)[None, :]
    indices = np.broadcast_to(np.maximum(rows, 0) * w + np.maximum(cols, 0), out.shape).astype(np.int32)
    for a, b, slices in _offsets(window):
        candidate = padded[slices]
        better = (candidate > out) | (np.isnan(candidate) & ~np.isnan(out))
        np.copyto(out, candidate, where=better)
        np.copyto(indices, (rows + a) * w + cols + b, where=better, casting="unsafe")
    return out, indices


def _check_plane(input_shape, window: _Window) -> None:
    """pool.cu indexes within a plane in 32-bit ints (``h * W + w``; the indices are int32 too):
    refuse, before any copy, a plane the kernels would index past 2^31 (out of bounds on a GPU)."""
    (h, w), (oh, ow) = input_shape[2:], window.out
    if max(h * w, oh * ow) > np.iinfo(np.int32).max:
        raise ValueError(f"input of shape {tuple(input_shape)} is too large for the pooling kernels: "
                         f"H*W and H_out*W_out must each be below 2^31")


def _max_pool2d_kernel(x, window: _Window):
    _check_plane(x.shape, window)
    n, c = x.shape[:2]
    device = device_of(x)
    out = empty((n, c, *window.out), np.float32, device)
    indices = empty(out.shape, np.int32, device)
    kernels.launch("pool", "max_pool2d_forward_v1", kernels.grid_stride_blocks(out.size), kernels.BLOCK,
                   (contiguous(x), out, indices, *window.kernel_args(x.shape)))
    return out, indices


def max_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode: bool = False, return_indices: bool = False):
    """2-D max pooling of an NCHW ``input``; with ``return_indices``, also the int32 in-plane argmax positions."""
    check_array(input, "input", 4, "NCHW")
    window = _window(input.shape, kernel_size, stride, padding, ceil_mode)
    impl = _max_pool2d_numpy if device_of(input) == "cpu" else _max_pool2d_kernel
    out, indices = impl(input, window)
    return (out, indices) if return_indices else out


def _max_pool2d_backward_numpy(grad_output, indices, input_shape):
    n, c, h, w = input_shape
    # Every gradient goes to its plane's argmax; bincount sums the ones that share a position.
    target = (np.arange(n * c).reshape(n, c, 1, 1) * (h * w) + indices).ravel()
    grad = np.bincount(target, weights=grad_output.ravel(), minlength=n * c * h * w)
    return grad.reshape(input_shape).astype(grad_output.dtype, copy=False)


def _max_pool2d_backward_kernel(grad_output, indices, input_shape, window: _Window, output=None):
    _check_plane(input_shape, window)
    grad_input = empty(input_shape, np.float32, device_of(grad_output))
    kernel, arrays = "max_pool2d_backward_v1", (contiguous(grad_output), contiguous(indices))
    if output is not None:
        kernel, arrays = "max_pool2d_relu_backward_v1", (*arrays, contiguous(output))
    kernels.launch("pool", kernel, kernels.grid_stride_blocks(grad_input.size), kernels.BLOCK,
                   (*arrays, grad_input, *window.kernel_args(input_shape)))
    return grad_input


def max_pool2d_relu_backward(grad_output, indices, output, input_shape, kernel_size, stride=None, padding=0,
                             ceil_mode: bool = False):
    """Gradient w.r.t. ``x`` of ``max_pool2d(relu(x))``, given the pool's ``output`` and ``indices``:
    ``relu_backward(max_pool2d_backward(...), relu(x))`` in one pass (one kernel on a device),
    bit-identical to it. The pool's output is relu(x) at each window's argmax, so its sign there
    is the ReLU's mask."""
    check_array(output, "output", 4, "NCHW")
    if tuple(output.shape) != tuple(grad_output.shape):
        raise ValueError(f"output {tuple(output.shape)} must have grad_output's shape {tuple(grad_output.shape)}")
    common_device(grad_output=grad_output, output=output)
    return _max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride, padding, ceil_mode, output)


def max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride=None, padding=0, ceil_mode: bool = False):
    """Gradient of :func:`max_pool2d` w.r.t. its input of shape ``input_shape``, given its ``indices``."""
    return _max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride, padding, ceil_mode, None)


def _max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride, padding, ceil_mode, relu_output):
    check_array(grad_output, "grad_output", 4, "NCHW")
    common_device(grad_output=grad_output, indices=indices)
    if indices.dtype != np.int32 or indices.shape != grad_output.shape:
        raise ValueError(f"indices must be int32 of grad_output's shape {tuple(grad_output.shape)}, "
                         f"got {indices.dtype} of shape {tuple(indices.shape)}")
    input_shape = _check_input_shape(input_shape, grad_output)
    window = _window(input_shape, kernel_size, stride, padding, ceil_mode, name="input_shape")
    _check_grad_size(window, grad_output, input_shape)
    if device_of(grad_output) == "cpu":
        if relu_output is not None:  # the ReLU's mask at each window's argmax
            grad_output = select(relu_output > 0, grad_output)
        return _max_pool2d_backward_numpy(grad_output, indices, input_shape)
    return _max_pool2d_backward_kernel(grad_output, indices, input_shape, window, relu_output)


# ------------------------------------------------------------------------------------------ avg


def _avg_pool2d_numpy(x, window: _Window, count_include_pad: bool):
    padded = _pad(x, window, 0)
    sums = np.zeros((*x.shape[:2], *window.out), x.dtype)
    for _, _, slices in _offsets(window):
        sums += padded[slices]
    return sums / _avg_divisor(window, x.shape, count_include_pad).astype(x.dtype)


def _avg_pool2d_kernel(x, window: _Window, count_include_pad: bool):
    _check_plane(x.shape, window)
    out = empty((*x.shape[:2], *window.out), np.float32, device_of(x))
    kernels.launch("pool", "avg_pool2d_forward_v1", kernels.grid_stride_blocks(out.size), kernels.BLOCK,
                   (contiguous(x), out, *window.kernel_args(x.shape), count_include_pad))
    return out


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True):
    """2-D average pooling of an NCHW ``input``, with PyTorch's divisor."""
    check_array(input, "input", 4, "NCHW")
    window = _window(input.shape, kernel_size, stride, padding, ceil_mode)
    impl = _avg_pool2d_numpy if device_of(input) == "cpu" else _avg_pool2d_kernel
    return impl(input, window, bool(count_include_pad))


def _avg_pool2d_backward_numpy(grad_output, input_shape, window: _Window, count_include_pad: bool):
    n, c, h, w = input_shape
    ph, pw = window.padding
    share = grad_output / _avg_divisor(window, input_shape, count_include_pad).astype(grad_output.dtype)
    grad = np.zeros((n, c, window.padded_extent(0, h), window.padded_extent(1, w)), grad_output.dtype)
    for _, _, slices in _offsets(window):
        grad[slices] += share
    return np.ascontiguousarray(grad[:, :, ph:ph + h, pw:pw + w])


def _avg_pool2d_backward_kernel(grad_output, input_shape, window: _Window, count_include_pad: bool):
    _check_plane(input_shape, window)
    grad_input = empty(input_shape, np.float32, device_of(grad_output))
    kernels.launch("pool", "avg_pool2d_backward_v1", kernels.grid_stride_blocks(grad_input.size), kernels.BLOCK,
                   (contiguous(grad_output), grad_input, *window.kernel_args(input_shape), count_include_pad))
    return grad_input


def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                        count_include_pad: bool = True):
    """Gradient of :func:`avg_pool2d` w.r.t. its input of shape ``input_shape``."""
    check_array(grad_output, "grad_output", 4, "NCHW")
    input_shape = _check_input_shape(input_shape, grad_output)
    window = _window(input_shape, kernel_size, stride, padding, ceil_mode, name="input_shape")
    _check_grad_size(window, grad_output, input_shape)
    impl = _avg_pool2d_backward_numpy if device_of(grad_output) == "cpu" else _avg_pool2d_backward_kernel
    return impl(grad_output, input_shape, window, bool(count_include_pad))

"""Local response normalisation over the channels (axis 0) of the NumPy executor's (C, H, W, N)
layout: what :mod:`gpuconv.functional.norm` (PyTorch's formula) gives for the NCHW transpose::

    scale_c = k + alpha / size * sum_{j in window(c)} x_j ** 2      (window [c - size // 2, c + (size - 1) // 2])
    out_c = x_c * scale_c ** -beta

Each channel is one contiguous plane of H * W * N values, so the channel window sum is a few adds
of whole shifted channel ranges (sums over 2, 4, 8... channels, as in functional/norm.py: not a
difference of running sums, which would cancel), every pass contiguous, its temporaries reused
per thread (:func:`gpuconv.cpu.pool.scratch`).
"""
from __future__ import annotations

import numpy as np

from ..functional._checks import ieee_arithmetic, positive_int
from .pool import _check_input, _check_like, _contiguous, _workspace, scratch, sum_in_order

__all__ = ["local_response_norm", "local_response_norm_backward"]


# Channels go in blocks of about this many bytes a plane array, so that the ten-odd passes over
# a block's squares, sums, scale and power run in the L2 cache, not from memory.
_BLOCK_BYTES = 1 << 20


def _channel_blocks(like):
    """``(first, stop)`` channel ranges of about _BLOCK_BYTES each."""
    channels = like.shape[0]
    per_block = max(1, _BLOCK_BYTES // max(1, like[0].nbytes))
    return [(first, min(channels, first + per_block)) for first in range(0, channels, per_block)]


def _channel_window_sum(fill, like, first: int, stop: int, before: int, after: int, out, name: str):
    """``out[c - first] = sum over channels [c - before, c + after]`` (zero past the edges), for c
    in [first, stop), of the array that ``fill(lo, hi, planes)`` writes (its channels [lo, hi))
    into ``planes``, part of a zero-padded scratch buffer."""
    channels = like.shape[0]
    before, after = min(before, channels - 1), min(after, channels - 1)  # past the last adds nothing
    width, count = before + after + 1, stop - first
    padded = scratch(f"{name} padded", (count + width - 1, *like.shape[1:]), like.dtype)
    lo, hi = max(0, first - before), min(channels, stop + after)
    offset = lo - (first - before)
    padded[:offset] = 0
    padded[offset + hi - lo:] = 0
    fill(lo, hi, padded[offset:offset + hi - lo])
    span, run, parts = 1, padded, []
    while span <= width:  # run[j] is the sum of padded channels [j, j + span)
        if width & span:
            start = width - (width & (2 * span - 1))
            parts.append(run[start:start + count])
        if 2 * span <= width:
            run = np.add(run[:-span], run[span:], out=scratch(f"{name} sums of {2 * span}", run[span:].shape, like.dtype))
        span *= 2
    return sum_in_order(parts, out)


def _contiguous_block(array, first: int, stop: int, name: str):
    """Channels [first, stop) of ``array``, copied contiguous if they are a strided view (see
    gpuconv.cpu.pool._contiguous)."""
    return _contiguous(array[first:stop], scratch(name, array[first:stop].size, array.dtype))


def _power(scale, beta: float, out):
    """``scale ** beta`` into ``out``; for AlexNet's 0.75 as ``sqrt(s) * sqrt(sqrt(s))``, two
    square roots costing less than a power."""
    if beta != 0.75:
        return np.power(scale, beta, out=out)
    root = np.sqrt(scale, out=scratch("lrn root", scale.shape, scale.dtype))
    np.sqrt(root, out=out)
    out *= root
    return out


@ieee_arithmetic
def local_response_norm(x, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *, out=None,
                        saved=None):
    """LRN of a (C, H, W, N) ``x`` across channels: ``(out, saved)``, ``saved`` what
    :func:`local_response_norm_backward` needs (the scale; its power is recomputed there, in
    cache, rather than kept in memory). ``out``: the result buffer; ``saved``: a previous call's
    ``saved`` to reuse as the buffer of this one's."""
    _check_input(x, "input")
    size = positive_int(size, "size")
    out = _workspace(out, x.shape, x.dtype, "out")
    scale = _workspace(saved, x.shape, x.dtype, "saved")
    if x.size == 0:
        return out, scale

    def squares(lo, hi, planes):
        block = _contiguous_block(x, lo, hi, "lrn input")
        np.multiply(block, block, out=planes)

    for first, stop in _channel_blocks(x):
        block_scale = scale[first:stop]
        block_power = scratch("lrn power", block_scale.shape, x.dtype)
        _channel_window_sum(squares, x, first, stop, size // 2, (size - 1) // 2, block_scale, "lrn")
        block_scale *= alpha / size
        block_scale += k
        np.divide(_contiguous_block(x, first, stop, "lrn input"), _power(block_scale, beta, block_power),
                  out=out[first:stop])
    return out, scale


@ieee_arithmetic
def local_response_norm_backward(grad_output, x, output, saved, /, size: int, alpha: float = 1e-4,
                                 beta: float = 0.75, k: float = 1.0, *, out=None):
    """Gradient of :func:`local_response_norm` w.r.t. ``x``, given the forward's input ``x``,
    ``output`` and ``saved`` (positional only: ``out=`` is the result buffer, never the
    forward's output)::

        grad_input_i = grad_i / scale_i ** beta
                       - 2 * alpha * beta / size * x_i * sum_{c : i in window(c)} grad_c * output_c / scale_c
    """
    for name, array in (("grad_output", grad_output), ("x", x), ("output", output)):
        _check_input(array, name)
    for name, array in (("x", x), ("output", output)):
        _check_like(array, name, grad_output.shape, grad_output.dtype)
    _check_like(saved, "saved", grad_output.shape, grad_output.dtype)  # the forward's scale
    size = positive_int(size, "size")
    grad_input = _workspace(out, x.shape, x.dtype, "out")
    if x.size == 0:
        return grad_input
    scale = saved
    factor = 2.0 * alpha * beta / size

    def through_scale(lo, hi, planes):
        np.multiply(_contiguous_block(grad_output, lo, hi, "lrn gradient"),
                    _contiguous_block(output, lo, hi, "lrn output"), out=planes)
        planes /= scale[lo:hi]

    for first, stop in _channel_blocks(x):
        # The channels whose window holds channel i are [i - (size - 1) // 2, i + size // 2]:
        # the forward window mirrored (they differ for even sizes).
        coupling = _channel_window_sum(through_scale, x, first, stop, (size - 1) // 2, size // 2,
                                       scratch("lrn coupling", x[first:stop].shape, x.dtype), "lrn backward")
        coupling *= _contiguous_block(x, first, stop, "lrn input")
        coupling *= factor
        block = grad_input[first:stop]
        power = _power(scale[first:stop], beta, scratch("lrn power", block.shape, x.dtype))
        np.divide(_contiguous_block(grad_output, first, stop, "lrn gradient"), power, out=block)
        block -= coupling
    return grad_input

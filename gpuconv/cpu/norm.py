"""Local response normalisation over the channels (axis 0) of the NumPy executor's (C, H, W, N)
layout: what :mod:`gpuconv.functional.norm` (PyTorch's formula) gives for the NCHW transpose.

Each channel is one contiguous plane of H * W * N values, so a channel window sum is a few adds
of whole shifted channel ranges.
"""
from __future__ import annotations

import numpy as np

from ..functional._checks import ieee_arithmetic, positive_int
from ..functional.norm import _channel_window_sum, _scale_power, _scale_numpy
from .pool import _check_input, _check_like, _workspace

__all__ = ["local_response_norm", "local_response_norm_backward"]


@ieee_arithmetic
def local_response_norm(x, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *, out=None):
    """LRN of a (C, H, W, N) ``x`` across channels: ``(out, saved)``, ``saved`` what
    :func:`local_response_norm_backward` needs (the scale). ``out``: the result buffer."""
    _check_input(x, "input")
    size = positive_int(size, "size")
    out = _workspace(out, x.shape, x.dtype, "out")
    scale = _scale_numpy(x[None], size, alpha, k)[0]  # channels on axis 1 of (1, C, H, W, N)
    np.divide(x, _scale_power(scale, beta), out=out)
    return out, scale


@ieee_arithmetic
def local_response_norm_backward(grad_output, x, output, saved, size: int, alpha: float = 1e-4, beta: float = 0.75,
                                 k: float = 1.0, *, out=None):
    """Gradient of :func:`local_response_norm` w.r.t. ``x``, given the forward's input ``x``,
    ``output`` and ``saved``; ``out``: the result buffer::

        grad_input_i = grad_i * scale_i ** -beta
                       - 2 * alpha * beta / size * x_i * sum_{c : i in window(c)} grad_c * output_c / scale_c
    """
    for name, array in (("grad_output", grad_output), ("x", x), ("output", output)):
        _check_input(array, name)
    for name, array in (("x", x), ("output", output), ("saved", saved)):
        _check_like(array, name, grad_output.shape, grad_output.dtype)
    size = positive_int(size, "size")
    grad_input = _workspace(out, x.shape, x.dtype, "out")
    scale = saved

    def through_scale(padded):
        np.multiply(grad_output, output, out=padded[0])
        padded[0] /= scale

    # The channels whose window holds channel i are [i - (size - 1) // 2, i + size // 2]: the
    # forward window mirrored (they differ for even sizes).
    coupling = _channel_window_sum(through_scale, (1, *x.shape), x.dtype, (size - 1) // 2, size // 2)[0]
    coupling *= x
    coupling *= 2.0 * alpha * beta / size
    np.divide(grad_output, _scale_power(scale, beta), out=grad_input)
    grad_input -= coupling
    return grad_input

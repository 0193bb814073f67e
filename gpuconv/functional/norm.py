"""Local response normalisation across channels (AlexNet's LRN), as PyTorch computes it.

For channel ``c`` the window is ``[c - size // 2, c + (size - 1) // 2]``, zero-padded at the edges
(PyTorch's padding, so an even ``size`` leans towards the lower channels), and::

    scale_c = k + alpha / size * sum_{j in window(c)} input_j ** 2
    output_c = input_c * scale_c ** -beta
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..device import common_device, device_of, empty
from ._checks import check_array, ieee_arithmetic, positive_int

__all__ = ["local_response_norm", "local_response_norm_backward"]



def _window_sum(x: np.ndarray, before: int, after: int) -> np.ndarray:
    """Sum over channels ``[c - before, c + after]`` of NCHW ``x``, zero-padded.

    A sum of shifted slices rather than a difference of cumulative sums: the window is a handful of
    channels, and a cumulative sum would lose small channels next to large ones to cancellation.
    """
    total = x.copy()
    # Shifts past the last channel add nothing: a huge size costs what size = 2 * channels does.
    before, after = min(before, x.shape[1] - 1), min(after, x.shape[1] - 1)
    for shift in range(1, before + 1):
        total[:, shift:] += x[:, :-shift]
    for shift in range(1, after + 1):
        total[:, :-shift] += x[:, shift:]
    return total


def _scale_numpy(input, size, alpha, k):
    return k + alpha / size * _window_sum(input * input, size // 2, (size - 1) // 2)


def _launch_shape(x):
    """``(elements, channels, plane, grid)`` of the kernels' one-thread-per-element launch."""
    return x.size, x.shape[1], x.shape[2] * x.shape[3], kernels.blocks_for(x.size)


@ieee_arithmetic
def local_response_norm(input, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """LRN over the channels of NCHW ``input``; matches ``torch.nn.functional.local_response_norm``."""
    check_array(input, "input", 4, "NCHW")
    size = positive_int(size, "size")
    device = device_of(input)
    if device == "cpu":
        return input * _scale_numpy(input, size, alpha, k) ** -beta
    x = input.astype(np.float32, order="C", copy=False)  # astype keeps an EmuArray on 'emu'
    output = empty(x.shape, np.float32, device)
    total, channels, plane, grid = _launch_shape(x)
    if total:
        kernels.launch("lrn", "lrn_forward_v1", grid, kernels.BLOCK,
                       (x, output, total, channels, plane, size, k, alpha / size, beta))
    return output


@ieee_arithmetic
def local_response_norm_backward(grad_output, input, output, size: int, alpha: float = 1e-4,
                                 beta: float = 0.75, k: float = 1.0):
    """Gradient of :func:`local_response_norm` with respect to ``input``.

    ``output`` is the forward's result. The scale is recomputed from ``input`` rather than kept
    from the forward pass (see ``kernels_cu/lrn.cu``)::

        grad_input_i = grad_i * scale_i ** -beta
                       - 2 * alpha * beta / size * input_i * sum_{c : i in window(c)} grad_c * output_c / scale_c
    """
    for name, array in (("grad_output", grad_output), ("input", input), ("output", output)):
        check_array(array, name, 4, "NCHW")
    if not grad_output.shape == input.shape == output.shape:
        raise ValueError(f"grad_output, input and output must have one shape, got {tuple(grad_output.shape)}, "
                         f"{tuple(input.shape)} and {tuple(output.shape)}")
    size = positive_int(size, "size")
    device = common_device(grad_output=grad_output, input=input, output=output)
    if device == "cpu":
        scale = _scale_numpy(input, size, alpha, k)
        # The channels whose window holds channel i are [i - (size - 1) // 2, i + size // 2]: the
        # forward window mirrored, which differs from it for even sizes.
        through_scales = _window_sum(grad_output * output / scale, (size - 1) // 2, size // 2)
        return grad_output * scale ** -beta - 2.0 * alpha * beta / size * input * through_scales
    arrays = [a.astype(np.float32, order="C", copy=False) for a in (input, output, grad_output)]
    grad_input = empty(input.shape, np.float32, device)
    total, channels, plane, grid = _launch_shape(input)
    if total:
        kernels.launch("lrn", "lrn_backward_v1", grid, kernels.BLOCK,
                       (*arrays, grad_input, total, channels, plane, size, k, alpha / size, beta))
    return grad_input

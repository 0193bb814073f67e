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



def _channel_window_sum(fill, shape, dtype, before: int, after: int) -> np.ndarray:
    """Sum over channels ``[c - before, c + after]`` of an NCHW array, zero-padded; ``fill(out)``
    writes the array into ``out``, the interior of a zero-padded buffer (no copy of its own).

    Sums of whole shifted channel ranges, each a few contiguous runs of planes; a window of width
    ``L`` takes about ``log2(L) + popcount(L)`` passes, from sums over 2, 4, 8... channels. Not a
    difference of cumulative (or running) sums: the window is a handful of channels, and a
    difference would lose small channels next to large ones to cancellation.
    """
    channels = shape[1]
    if channels == 0:
        return np.zeros(shape, dtype)
    # Channels past the last add nothing: a huge size costs what size = 2 * channels does.
    before, after = min(before, channels - 1), min(after, channels - 1)
    padded = np.zeros((shape[0], channels + before + after, *shape[2:]), dtype)
    fill(padded[:, before:before + channels])
    width, span, run, parts = before + after + 1, 1, padded, []
    while span <= width:  # run[:, j] is the sum of padded channels [j, j + span)
        if width & span:
            parts.append(run[:, width - (width & (2 * span - 1)):][:, :channels])
        if 2 * span <= width:
            run = run[:, :-span] + run[:, span:]
        span *= 2
    if len(parts) == 1:
        return np.array(parts[0])
    total = np.add(parts[0], parts[1])
    for part in parts[2:]:
        total += part
    return total


def _scale_numpy(input, size, alpha, k):
    square = lambda out: np.multiply(input, input, out=out)
    scale = _channel_window_sum(square, input.shape, input.dtype, size // 2, (size - 1) // 2)
    scale *= alpha / size
    scale += k
    return scale


def _scale_power(scale, beta):
    """``scale ** beta``; for AlexNet's beta = 0.75 as ``sqrt(s) * sqrt(sqrt(s))``, two square
    roots costing less than a power."""
    if beta != 0.75:
        return scale ** beta
    root = np.sqrt(scale)
    power = np.sqrt(root)
    power *= root
    return power


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
        return input / _scale_power(_scale_numpy(input, size, alpha, k), beta)
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

        def through_scale(out):
            np.multiply(grad_output, output, out=out)
            out /= scale

        # The channels whose window holds channel i are [i - (size - 1) // 2, i + size // 2]: the
        # forward window mirrored, which differs from it for even sizes.
        dtype = np.result_type(grad_output, input, output)
        coupling = _channel_window_sum(through_scale, input.shape, dtype, (size - 1) // 2, size // 2)
        coupling *= input
        coupling *= 2.0 * alpha * beta / size
        grad_input = np.divide(grad_output, _scale_power(scale, beta))
        grad_input -= coupling
        return grad_input
    arrays = [a.astype(np.float32, order="C", copy=False) for a in (input, output, grad_output)]
    grad_input = empty(input.shape, np.float32, device)
    total, channels, plane, grid = _launch_shape(input)
    if total:
        kernels.launch("lrn", "lrn_backward_v1", grid, kernels.BLOCK,
                       (*arrays, grad_input, total, channels, plane, size, k, alpha / size, beta))
    return grad_input

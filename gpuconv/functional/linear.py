"""Fully connected layers: ``input @ weight.T + bias``.

On every device this is ``array_module(input).matmul``: NumPy's BLAS on 'cpu' and 'emu', cuBLAS
through ``cupy.matmul`` on 'cuda'. That is by design: a hand-written GEMM would not beat cuBLAS on
the layer sizes of AlexNet, and the library's own kernels are the convolutions around it.
"""
from __future__ import annotations

from ..device import array_module, common_device, empty
from ..dispatch import device_call
from ._checks import check_array, check_same_dtype, ieee_arithmetic, output_array

__all__ = ["linear", "linear_backward"]


def _check_weight(input, weight):
    check_array(input, "input")
    check_array(weight, "weight", 2, "out_features, in_features")
    if input.ndim < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input (*, in_features) {tuple(input.shape)} does not match weight "
                         f"(out_features, in_features) {tuple(weight.shape)}")


@ieee_arithmetic
def linear(input, weight, bias=None):
    """``input @ weight.T + bias`` for ``input`` (*, in_features) and ``weight`` (out_features, in_features)."""
    _check_weight(input, weight)
    if bias is not None:
        check_array(bias, "bias", 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}: "
                             f"need ({weight.shape[0]},)")
    device = common_device(input=input, weight=weight, bias=bias)
    check_same_dtype(input=input, weight=weight, bias=bias)
    xp = array_module(input)
    output = empty((*input.shape[:-1], weight.shape[0]), input.dtype, device)
    device_call("matmul", device, lambda: xp.matmul(input, weight.T, out=output))
    if bias is not None:
        device_call("add_bias", device, lambda: xp.add(output, bias, out=output))
    return output


@ieee_arithmetic
def linear_backward(grad_output, input, weight, *, input_grad: bool = True, weight_grad: bool = True,
                    bias_grad: bool = True, weight_out=None, bias_out=None):
    """``(grad_input, grad_weight, grad_bias)`` of :func:`linear`; ``grad_bias`` whether or not it had one.

    ``input_grad=False`` (and the others) skip a gradient nobody needs: it comes back as None.
    ``weight_out`` and ``bias_out`` are arrays to write those gradients into (an optimizer's
    flat gradient buffer), of the weight's and the bias's shape on the same device.
    """
    _check_weight(input, weight)
    check_array(grad_output, "grad_output")
    expected = tuple(input.shape[:-1]) + (weight.shape[0],)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output must have shape {expected} for input {tuple(input.shape)} and "
                         f"weight {tuple(weight.shape)}, got {tuple(grad_output.shape)}")
    device = common_device(grad_output=grad_output, input=input, weight=weight)
    check_same_dtype(grad_output=grad_output, input=input, weight=weight)
    xp, dtype = array_module(input), input.dtype
    # Every leading dimension is a batch dimension of the weight's gradient.
    flat_grad = grad_output.reshape(-1, weight.shape[0])
    grad_input = grad_weight = grad_bias = None
    if input_grad:
        grad_input = empty(input.shape, dtype, device)
        device_call("matmul", device, lambda: xp.matmul(grad_output, weight, out=grad_input))
    if weight_grad:
        grad_weight = output_array(weight_out, "weight_out", weight.shape, dtype, device)
        flat_input = input.reshape(-1, weight.shape[1])
        device_call("matmul", device, lambda: xp.matmul(flat_grad.T, flat_input, out=grad_weight))
    if bias_grad:
        grad_bias = output_array(bias_out, "bias_out", (weight.shape[0],), dtype, device)
        device_call("sum", device, lambda: xp.sum(flat_grad, axis=0, out=grad_bias))
    return grad_input, grad_weight, grad_bias

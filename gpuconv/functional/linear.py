"""Fully connected layers: ``input @ weight.T + bias``.

On every device this is ``array_module(input).matmul``: NumPy's BLAS on 'cpu' and 'emu', cuBLAS
through ``cupy.matmul`` on 'cuda'. That is by design: a hand-written GEMM would not beat cuBLAS on
the layer sizes of AlexNet, and the library's own kernels are the convolutions around it.
"""
from __future__ import annotations

from ..device import array_module, common_device
from ._checks import check_array, check_same_dtype, ieee_arithmetic

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
    common_device(input=input, weight=weight, bias=bias)
    check_same_dtype(input=input, weight=weight, bias=bias)
    output = array_module(input).matmul(input, weight.T)
    if bias is not None:
        output += bias
    return output


@ieee_arithmetic
def linear_backward(grad_output, input, weight):
    """``(grad_input, grad_weight, grad_bias)`` of :func:`linear`; ``grad_bias`` whether or not it had one."""
    _check_weight(input, weight)
    check_array(grad_output, "grad_output")
    expected = tuple(input.shape[:-1]) + (weight.shape[0],)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output must have shape {expected} for input {tuple(input.shape)} and "
                         f"weight {tuple(weight.shape)}, got {tuple(grad_output.shape)}")
    common_device(grad_output=grad_output, input=input, weight=weight)
    check_same_dtype(grad_output=grad_output, input=input, weight=weight)
    matmul = array_module(input).matmul
    # Every leading dimension is a batch dimension of the weight's gradient.
    flat_grad = grad_output.reshape(-1, weight.shape[0])
    grad_input = matmul(grad_output, weight)
    grad_weight = matmul(flat_grad.T, input.reshape(-1, weight.shape[1]))
    grad_bias = flat_grad.sum(axis=0)
    return grad_input, grad_weight, grad_bias

"""Elementwise activations: ReLU, tanh, sigmoid and their gradients.

The gradients take the forward *output* (as cuDNN's activation backward does), so a layer keeps
one array per activation and never needs the input again: relu'(x) = [y > 0],
tanh'(x) = 1 - y^2, sigmoid'(x) = y (1 - y).
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..device import common_device, contiguous, device_of, empty
from ._checks import check_array, ieee_arithmetic

__all__ = ["relu", "tanh", "sigmoid", "relu_backward", "tanh_backward", "sigmoid_backward"]



# Launch plans per (kernel, argument signature): kernels.signature.
_plans = kernels.PlanCache()


def _launch_map(kernel: str, *arrays):
    """Run an elementwise kernel of activation.cu: ``kernel(*arrays, out, n)``; returns ``out``."""
    key = (kernel, kernels.signature(*arrays))
    plan = _plans.lookup(key) if key[1] is not None else None
    if plan is not None:
        return plan(*arrays)[0]
    out = empty(arrays[0].shape, np.float32, device_of(arrays[0]))
    arrays = tuple(contiguous(a) for a in arrays)
    # The kernels move float4s when the pointers allow, hence four elements per thread.
    plan = kernels.LaunchPlan("activation", kernel, kernels.grid_stride_blocks(out.size, 4), kernels.BLOCK,
                              (*arrays, out, out.size))
    plan(*arrays, out)
    if key[1] is not None:
        _plans.remember(key, kernels.OpPlan(plan, [(out.shape, out.dtype)]))
    return out


def _check_pair(grad_output, output):
    check_array(grad_output, "grad_output")
    check_array(output, "output")
    common_device(grad_output=grad_output, output=output)
    if grad_output.shape != output.shape:
        raise ValueError(f"grad_output and output must have one shape, got {tuple(grad_output.shape)} "
                         f"and {tuple(output.shape)}")


@ieee_arithmetic
def relu(input):
    """max(input, 0), elementwise; NaN propagates, as in PyTorch."""
    check_array(input, "input")
    if device_of(input) == "cpu":
        return np.maximum(input, 0)
    return _launch_map("relu_forward_v1", input)


@ieee_arithmetic
def tanh(input):
    """Hyperbolic tangent, elementwise."""
    check_array(input, "input")
    if device_of(input) == "cpu":
        return np.tanh(input)
    return _launch_map("tanh_forward_v1", input)


@ieee_arithmetic
def sigmoid(input):
    """1 / (1 + exp(-input)), elementwise."""
    check_array(input, "input")
    if device_of(input) == "cpu":
        return 1 / (1 + np.exp(-input))  # exp(-x) = inf for very negative x: 1 / inf = 0 is right
    return _launch_map("sigmoid_forward_v1", input)


def select(mask, values):
    """``values`` where ``mask``, +0 elsewhere: ``np.where(mask, values, 0)`` for float arrays.

    Done as a bitwise AND with an all-ones or all-zeros word per element: ``np.where`` branches
    per element and, on a mask as unpredictable as a ReLU's, runs about 10x slower. Exact as
    ``np.where`` is (a NaN or inf outside the mask still becomes 0, unlike ``values * mask``).
    """
    bits = values.view(f"i{values.itemsize}")
    return (bits & -mask.astype(bits.dtype)).view(values.dtype)


@ieee_arithmetic
def relu_backward(grad_output, output):
    """Gradient of :func:`relu` w.r.t. its input, given its ``output``: grad_output where output > 0."""
    _check_pair(grad_output, output)
    if device_of(grad_output) == "cpu":
        return select(output > 0, grad_output)
    return _launch_map("relu_backward_v1", grad_output, output)


@ieee_arithmetic
def tanh_backward(grad_output, output):
    """Gradient of :func:`tanh` w.r.t. its input, given its ``output``: grad_output * (1 - output^2)."""
    _check_pair(grad_output, output)
    if device_of(grad_output) == "cpu":
        return grad_output * (1 - output * output)
    return _launch_map("tanh_backward_v1", grad_output, output)


@ieee_arithmetic
def sigmoid_backward(grad_output, output):
    """Gradient of :func:`sigmoid` w.r.t. its input, given its ``output``: grad_output * output * (1 - output)."""
    _check_pair(grad_output, output)
    if device_of(grad_output) == "cpu":
        return grad_output * output * (1 - output)
    return _launch_map("sigmoid_backward_v1", grad_output, output)

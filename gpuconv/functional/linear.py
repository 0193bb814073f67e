"""Fully connected layers: ``input @ weight.T + bias``, optionally followed by a ReLU.

On 'cpu' NumPy's BLAS. On 'cuda' and 'emu' two implementations, chosen by the size of the layer:

* small layers (LeNet-5's 400-120-84-10) run the hand GEMM of ``kernels_cu/linear.cu``: forward
  with the bias and the ReLU in its epilogue (one launch for Linear + bias + ReLU), backward in
  one launch (input, weight and bias gradients as one grouped grid, a ReLU before the layer
  folded into the input gradient). There a step is bound by launches, not arithmetic;
* larger ones (AlexNet's 9216-4096) call cuBLAS through ``cupy.matmul``, which no hand kernel
  of ours would beat at those sizes (three launches forward, three backward).

The choice is :func:`uses_hand_gemm`, by FLOPs until a GPU measures the crossover.
"""
from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..device import array_module, common_device, contiguous, empty
from ..dispatch import device_call
from ._checks import check_array, check_same_dtype, ieee_arithmetic, output_array
from .activation import relu, relu_backward

__all__ = ["linear", "linear_backward", "uses_hand_gemm", "HAND_GEMM_MAX_FLOPS"]

# The hand GEMM up to this many FLOPs per product (2 * rows * in_features * out_features), cuBLAS
# above (decided once per argument signature, with its launch plan). Unmeasured on a GPU, so set by
# arithmetic: 2^27 (134 MFLOP, about 3 us of an H100's FP32
# FFMA peak, the order of a launch) keeps LeNet-5's largest layer (400 x 120) on the hand kernel
# up to batch 1398 and sends AlexNet's 9216 x 4096 to cuBLAS from batch 2 (at batch 1, 75 MFLOP,
# a matrix-vector product either way). benchmarks/NOTES.md says what a GPU should measure.
HAND_GEMM_MAX_FLOPS = 2 ** 27
_TILE = 32  # kernels_cu/linear.cu's output tile
_THREADS = 256
# Launch plans of the hand kernels per argument signature (types, shapes, dtypes: kernels.signature)
# and options: a steady-state call checks its arrays against its signature and launches.
_forward_plans = kernels.PlanCache()
_backward_plans = kernels.PlanCache()


def uses_hand_gemm(rows: int, in_features: int, out_features: int) -> bool:
    """Whether a layer of this shape runs kernels_cu/linear.cu on 'cuda'/'emu' (else cuBLAS)."""
    return 2 * rows * in_features * out_features <= HAND_GEMM_MAX_FLOPS


def _check_weight(input, weight):
    check_array(input, "input")
    check_array(weight, "weight", 2, "out_features, in_features")
    if input.ndim < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input (*, in_features) {tuple(input.shape)} does not match weight "
                         f"(out_features, in_features) {tuple(weight.shape)}")


def _tiles(extent: int) -> int:
    return -(-extent // _TILE)


def linear(input, weight, bias=None, *, activation=None):
    """``input @ weight.T + bias`` for ``input`` (*, in_features) and ``weight`` (out_features, in_features).

    ``activation='relu'`` applies the ReLU to the result (in the same kernel where the layer
    takes the hand GEMM), as ``conv2d``'s.
    """
    key = kernels.signature(input, weight, bias)
    plan = _forward_plans.lookup((key, activation)) if key is not None else None
    if plan is None:
        return _linear(input, weight, bias, activation, key)
    return plan(input, weight, weight if bias is None else bias)[0]


@ieee_arithmetic
def _linear(input, weight, bias, activation, key):
    """:func:`linear` checked in full; the launch plan of the hand kernel kept for ``key``."""
    _check_weight(input, weight)
    if bias is not None:
        check_array(bias, "bias", 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}: "
                             f"need ({weight.shape[0]},)")
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    device = common_device(input=input, weight=weight, bias=bias)
    check_same_dtype(input=input, weight=weight, bias=bias)
    out_features, in_features = weight.shape
    rows = math.prod(input.shape[:-1])
    output = empty((*input.shape[:-1], out_features), input.dtype, device)
    if device != "cpu" and uses_hand_gemm(rows, in_features, out_features):
        if rows:
            weight = contiguous(weight)
            args = (contiguous(input), weight, weight if bias is None else contiguous(bias), rows, in_features,
                    out_features, bias is not None, activation == "relu", output)
            plan = kernels.LaunchPlan("linear", "linear_forward_v1", (_tiles(out_features), _tiles(rows)), _THREADS,
                                      args)
            plan(*args[:3], output)
            if key is not None:
                _forward_plans.remember((key, activation), kernels.OpPlan(plan, [(output.shape, output.dtype)]))
        return output
    xp = array_module(input)
    device_call("matmul", device, lambda: xp.matmul(input, weight.T, out=output))
    if bias is not None:
        device_call("add_bias", device, lambda: xp.add(output, bias, out=output))
    if activation == "relu":
        return xp.maximum(output, 0, out=output) if device == "cpu" else relu(output)
    return output


def linear_backward(grad_output, input, weight, *, input_grad: bool = True, weight_grad: bool = True,
                    bias_grad: bool = True, weight_out=None, bias_out=None, through_relu: bool = False):
    """``(grad_input, grad_weight, grad_bias)`` of :func:`linear`; ``grad_bias`` whether or not it had one.

    ``input_grad=False`` (and the others) skip a gradient nobody needs: it comes back as None.
    ``weight_out`` and ``bias_out`` are arrays to write those gradients into (an optimizer's
    flat gradient buffer), of the weight's and the bias's shape on the same device.
    ``through_relu=True`` says ``input`` is the output of a ReLU: ``grad_input`` is then the
    gradient w.r.t. that ReLU's input (``relu_backward(grad_input, input)``, folded in).
    """
    wanted = (bool(input_grad), bool(weight_grad), bool(bias_grad), bool(through_relu))
    key = kernels.signature(grad_output, input, weight, weight_out, bias_out)
    plan = _backward_plans.lookup((key, wanted)) if key is not None else None
    if plan is None:
        return _linear_backward(grad_output, input, weight, wanted, weight_out, bias_out, key)
    device = plan.device
    grad_input = empty(input.shape, np.float32, device) if input_grad else None
    grad_weight = (empty(weight.shape, np.float32, device) if weight_out is None else weight_out) if weight_grad else None
    grad_bias = (empty(weight.shape[:1], np.float32, device) if bias_out is None else bias_out) if bias_grad else None
    plan(grad_output, input, weight, *_or_unused(grad_output, grad_input, grad_weight, grad_bias))
    return grad_input, grad_weight, grad_bias


@ieee_arithmetic
def _linear_backward(grad_output, input, weight, wanted, weight_out, bias_out, key):
    """:func:`linear_backward` checked in full; the launch plan of the hand kernel kept for ``key``."""
    input_grad, weight_grad, bias_grad, through_relu = wanted
    _check_weight(input, weight)
    check_array(grad_output, "grad_output")
    expected = tuple(input.shape[:-1]) + (weight.shape[0],)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output must have shape {expected} for input {tuple(input.shape)} and "
                         f"weight {tuple(weight.shape)}, got {tuple(grad_output.shape)}")
    device = common_device(grad_output=grad_output, input=input, weight=weight)
    check_same_dtype(grad_output=grad_output, input=input, weight=weight)
    dtype, (out_features, in_features) = input.dtype, weight.shape
    grad_input = empty(input.shape, dtype, device) if input_grad else None
    grad_weight = output_array(weight_out, "weight_out", weight.shape, dtype, device) if weight_grad else None
    grad_bias = output_array(bias_out, "bias_out", (out_features,), dtype, device) if bias_grad else None
    rows = math.prod(input.shape[:-1])
    if device != "cpu" and uses_hand_gemm(rows, in_features, out_features):
        plan = _hand_backward(grad_output, input, weight, through_relu, grad_input, grad_weight, grad_bias)
        if plan is not None and key is not None:
            _backward_plans.remember((key, wanted), plan)
        return grad_input, grad_weight, grad_bias
    xp = array_module(input)
    # Every leading dimension is a batch dimension of the weight's gradient.
    flat_grad = grad_output.reshape(-1, out_features)
    if input_grad:
        device_call("matmul", device, lambda: xp.matmul(grad_output, weight, out=grad_input))
        if through_relu:
            grad_input = relu_backward(grad_input, input)
    if weight_grad:
        flat_input = input.reshape(-1, in_features)
        device_call("matmul", device, lambda: xp.matmul(flat_grad.T, flat_input, out=grad_weight))
    if bias_grad:
        device_call("sum", device, lambda: xp.sum(flat_grad, axis=0, out=grad_bias))
    return grad_input, grad_weight, grad_bias


def _or_unused(grad_output, *outputs):
    # grad_output stands for an output not asked for: the kernel never writes it
    return tuple(grad_output if out is None else out for out in outputs)


def _hand_backward(grad_output, input, weight, through_relu, grad_input, grad_weight, grad_bias):
    """The three gradients (those not None) in one launch of linear_backward_v1; its plan (None
    when there is nothing to launch)."""
    out_features, in_features = weight.shape
    rows = math.prod(input.shape[:-1])
    input_tiles = _tiles(rows) * _tiles(in_features) if grad_input is not None else 0
    weight_from = 0 if grad_weight is not None else in_features
    weight_to = in_features + 1 if grad_bias is not None else in_features
    weight_tiles = _tiles(out_features) * _tiles(weight_to - weight_from)
    if not input_tiles + weight_tiles:
        return None
    arrays = (contiguous(grad_output), contiguous(input), contiguous(weight),
              *_or_unused(contiguous(grad_output), grad_input, grad_weight, grad_bias))
    plan = kernels.LaunchPlan("linear", "linear_backward_v1", input_tiles + weight_tiles, _THREADS,
                              (*arrays[:3], rows, in_features, out_features, input_tiles, bool(through_relu),
                               weight_from, weight_to, *arrays[3:]))
    plan(*arrays)
    return plan

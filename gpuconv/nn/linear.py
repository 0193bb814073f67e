"""Flatten and Linear."""
from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from ..functional._checks import positive_int
from .module import Module, Parameter, _shape_check, _uniform


class Flatten(Module):
    """Merge dimensions ``start_dim`` to ``end_dim`` into one (a view; backward restores the shape)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        for name, value in (("start_dim", start_dim), ("end_dim", end_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"Flatten: {name} must be an int, got {value!r}")
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)

    def output_shape(self, input_shape):
        shape = tuple(input_shape)
        start, end = (d % len(shape) if -len(shape) <= d < len(shape) else None for d in (self.start_dim, self.end_dim))
        if start is None or end is None or start > end:
            raise ValueError(
                f"Flatten: start_dim={self.start_dim}, end_dim={self.end_dim} do not fit an input of shape {shape}"
            )
        return shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]

    def forward(self, x):
        self._save(input_shape=tuple(x.shape))
        return x.reshape(self.output_shape(x.shape))

    def backward(self, grad_output):
        return grad_output.reshape(self._saved()["input_shape"])

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Linear(Module):
    """``y = x W^T + b``, input (N, in_features); initialised as ``torch.nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = positive_int(in_features, "Linear: in_features")
        self.out_features = positive_int(out_features, "Linear: out_features")
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = Parameter(_uniform((self.out_features, self.in_features), bound))
        self.bias = Parameter(_uniform((self.out_features,), bound)) if bias else None

    def forward(self, x):
        self._check_input(x)
        weight, bias = self._weight_and_bias()
        out = F.linear(x, weight.data, None if bias is None else bias.data)
        self._save(input=x)
        return out

    def forward_relu(self, x, relu):
        """``relu(self(x))`` with the ReLU in this layer's epilogue (one kernel where the layer
        takes the hand GEMM); ``relu``, the ReLU module that follows, keeps its output for its
        backward. See :class:`~gpuconv.nn.Sequential`."""
        self._check_input(x)
        weight, bias = self._weight_and_bias()
        out = F.linear(x, weight.data, None if bias is None else bias.data, activation="relu")
        self._save(input=x)
        relu._save(output=out)
        return out

    def backward(self, grad_output):
        return self._backward(grad_output, through_relu=False)

    def backward_through_relu(self, grad_output):
        """The gradient w.r.t. the input of the ReLU whose output this layer's forward took: that
        ReLU's backward folded into this layer's input gradient; see :func:`backward_chain`."""
        return self._backward(grad_output, through_relu=True)

    def _weight_and_bias(self):
        # From the parameter dict directly: every step asks, and attribute lookup of a parameter
        # goes through Module.__getattr__.
        parameters = self._parameters
        return parameters["weight"], parameters.get("bias")

    def _backward(self, grad_output, through_relu: bool):
        weight, bias = self._weight_and_bias()
        train_bias = bias is not None and bias.requires_grad
        grad_input, grad_weight, grad_bias = F.linear_backward(
            grad_output, self._saved()["input"], weight.data, input_grad=self.requires_input_grad,
            weight_grad=weight.requires_grad, bias_grad=train_bias, weight_out=weight.grad_destination(),
            bias_out=bias.grad_destination() if train_bias else None, through_relu=through_relu)
        if grad_weight is not None:
            weight.accumulate_grad(grad_weight)
        if grad_bias is not None:
            bias.accumulate_grad(grad_bias)
        return grad_input

    def output_shape(self, input_shape):
        n, features = _shape_check("Linear", input_shape, 2, "N, in_features")
        if features != self.in_features:
            raise ValueError(
                f"Linear: input has {features} features, the layer expects {self.in_features} "
                f"(input shape {input_shape})"
            )
        return n, self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

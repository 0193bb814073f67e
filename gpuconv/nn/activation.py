"""Elementwise activations: ReLU, Tanh, Sigmoid."""
from __future__ import annotations

from .. import functional as F
from .module import Module


class _Activation(Module):
    """An elementwise activation whose derivative is a function of its output.

    ``_op`` names the functional pair ``F.<op>`` / ``F.<op>_backward``, looked up at call time.
    """

    _op: str

    def forward(self, x):
        out = getattr(F, self._op)(x)
        self._save(output=out)
        return out

    def backward(self, grad_output):
        return getattr(F, f"{self._op}_backward")(grad_output, self._saved()["output"])

    def output_shape(self, input_shape):
        return tuple(input_shape)


class ReLU(_Activation):
    _op = "relu"


class Tanh(_Activation):
    _op = "tanh"


class Sigmoid(_Activation):
    _op = "sigmoid"

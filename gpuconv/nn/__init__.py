"""Layers with explicit backward passes, shaped after ``torch.nn``.

There is no autograd: every layer's ``forward(x)`` keeps what its backward needs, and
``backward(grad_output)`` returns the gradient with respect to the layer's input while
*accumulating* the gradients of its parameters into ``Parameter.grad`` (``None`` -> set, else
``+=``), as ``loss.backward()`` does in PyTorch. A model's backward is its layers' backwards in
reverse order (:class:`Sequential` does exactly that).

Layers run on the device of their parameters: ``model.to('emu')`` moves them, and an input on
another device is a ValueError. Parameters are float32, as the kernels are; ``double()`` turns a
model on the CPU to float64, for finite-difference gradient checks.

Each layer family lives in its own module: ``module`` (Parameter, Module), ``containers``
(Sequential and the backward walk), ``conv``, ``pooling``, ``activation``, ``linear`` (Flatten,
Linear), ``dropout``, ``norm``, ``loss``.
"""
from .activation import ReLU, Sigmoid, Tanh
from .containers import Sequential, backward_chain  # noqa: F401 (used as nn.backward_chain)
from .conv import Conv2d
from .dropout import Dropout
from .linear import Flatten, Linear
from .loss import CrossEntropyLoss
from .module import Module, Parameter, host_array  # noqa: F401
from .norm import LocalResponseNorm
from .pooling import AvgPool2d, MaxPool2d

__all__ = [
    "Parameter", "Module", "Sequential",
    "Conv2d", "MaxPool2d", "AvgPool2d", "ReLU", "Tanh", "Sigmoid", "Flatten", "Linear", "Dropout",
    "LocalResponseNorm", "CrossEntropyLoss",
]

"""Sequential, its forward fusions, and the backward walk over a chain of modules (with its ReLU folds)."""
from __future__ import annotations

from .. import graphs
from .activation import ReLU
from .conv import Conv2d
from .linear import Linear
from .module import Module
from .pooling import MaxPool2d

# Runs of module types that forward computes with one call of the first module's method, given
# the input and the run's other modules (which keep what their own backward needs). Where runs
# of several lengths match, the longest wins.
FORWARD_FUSIONS = {
    (Linear, ReLU): "forward_relu",  # the ReLU in the Linear's epilogue
    (Conv2d, ReLU, MaxPool2d): "forward_relu_max_pool2d",  # one kernel on 'cuda'/'emu' (2x2/2 pools)
    (Conv2d, ReLU): "forward_relu",  # the ReLU in the convolution's epilogue
}
# A ReLU followed by one of these: backward through both is one call of the second's
# ``backward_through_relu`` (the ReLU's mask folded into that kernel).
RELU_BACKWARD_FOLDS = (MaxPool2d, Linear)


class Sequential(Module):
    """Children named '0', '1'...; forward runs them in order, backward in reverse."""

    def __init__(self, *modules: Module):
        super().__init__()
        for index, module in enumerate(modules):
            if not isinstance(module, Module):
                raise TypeError(f"Sequential: argument {index} must be a Module, got {type(module).__name__}")
            setattr(self, str(index), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        modules = list(self._modules.values())
        if isinstance(index, slice):
            return Sequential(*modules[index])
        return modules[index]

    def forward(self, x):
        modules = list(self._modules.values())
        fusions = sorted(FORWARD_FUSIONS.items(), key=lambda item: -len(item[0]))  # the longest run wins
        index = 0
        while index < len(modules):
            for run, method in fusions:
                if tuple(type(m) for m in modules[index:index + len(run)]) == run:
                    first, rest = modules[index], modules[index + 1:index + len(run)]
                    x = _call_captured(first, getattr(first, method), x, *rest)
                    index += len(run)
                    break
            else:
                x = modules[index](x)
                index += 1
        return x

    def backward(self, grad_output):
        return backward_chain(list(self), grad_output, self.requires_input_grad)


def backward_chain(modules, grad_output, requires_input_grad: bool):
    """Backward through ``modules`` run in that order by forward; None if no input gradient is needed.

    A module's input needs a gradient when the chain's input does or when a module before it
    trains a parameter (as PyTorch's autograd decides it): each is told so through its
    ``requires_input_grad``, and the walk stops at the first module whose input needs none, since
    nothing before it needs anything.
    """
    needed, needs = [], bool(requires_input_grad)
    for module in modules:
        needed.append(needs)
        needs = needs or module._trains_any_parameter()
    index = len(modules) - 1
    while index >= 0:
        module, needs_input_grad = modules[index], needed[index]
        if not needs_input_grad and not module._trains_any_parameter():
            return None
        if module.requires_input_grad != needs_input_grad:
            module.requires_input_grad = needs_input_grad
        if index and needed[index - 1] and type(module) in RELU_BACKWARD_FOLDS and type(modules[index - 1]) is ReLU:
            grad_output = module._backward_captured(grad_output, module.backward_through_relu)
            index -= 2
            continue
        grad_output = module._backward_captured(grad_output)
        if not needs_input_grad:
            return None
        index -= 1
    return grad_output


def _call_captured(module, forward, x, *others):
    """``forward(x, *others)``, a forward method of ``module``, with ``module``'s static buffers
    inside a graph capture (as ``module(x)`` would)."""
    if graphs.capturing() is None:
        return forward(x, *others)
    with graphs.static_buffers(module, (forward.__name__, module.training, getattr(x, "shape", None))):
        return forward(x, *others)

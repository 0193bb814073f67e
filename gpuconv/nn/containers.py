"""Sequential and the backward walk over a chain of modules (with its ReLU folds)."""
from __future__ import annotations

from .activation import ReLU
from .module import Module
from .pooling import MaxPool2d


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
        for module in self:
            x = module(x)
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
        if index and needed[index - 1] and type(module) is MaxPool2d and type(modules[index - 1]) is ReLU:
            # ReLU then max-pool: one backward kernel for both (the pool masks by its own output).
            grad_output = module._backward_captured(grad_output, module.backward_through_relu)
            index -= 2
            continue
        grad_output = module._backward_captured(grad_output)
        if not needs_input_grad:
            return None
        index -= 1
    return grad_output

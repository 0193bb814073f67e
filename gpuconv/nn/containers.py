"""Sequential, the forward walk over a chain of modules (with its fusions) and the backward walk
(with its ReLU folds)."""
from __future__ import annotations

from .. import graphs
from ..device import device_of
from .activation import ReLU
from .conv import Conv2d
from .module import Module
from .pooling import MaxPool2d

# Runs of modules that one op computes on 'cuda' and 'emu': their exact types -> the method of the
# run's first module that takes the others and the input, returns the run's output and leaves
# each module of the run what its backward needs (backward_chain then folds the ReLUs).
FUSIONS = {
    (Conv2d, ReLU, MaxPool2d): Conv2d.forward_relu_max_pool2d,
}


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
        return forward_chain(list(self._modules.values()), x)

    def backward(self, grad_output):
        return backward_chain(list(self), grad_output, self.requires_input_grad)


def forward_chain(modules, x):
    """``modules`` run in order on ``x``; on 'cuda' and 'emu' each run of :data:`FUSIONS` as one op.
    On 'cpu' every module runs on its own."""
    fuse = device_of(x) != "cpu"
    index = 0
    while index < len(modules):
        method, run = _fusion_at(modules, index) if fuse else (None, None)
        if method is None:
            x = modules[index](x)
            index += 1
        else:
            x = _call_fused(method, run, x)
            index += len(run)
    return x


def _fusion_at(modules, index):
    """(the method, the run of modules) of the fusion that starts at ``modules[index]``, or Nones."""
    for types, method in FUSIONS.items():
        run = modules[index:index + len(types)]
        if len(run) == len(types) and all(type(m) is t for m, t in zip(run, types)):
            return method, run
    return None, None


def _call_fused(method, run, x):
    """``method(*run, x)``, inside a graph capture with the first module's static buffers for it
    (as ``Module.__call__`` gives a module's forward its own)."""
    first = run[0]
    if graphs.capturing() is None:
        return method(*run, x)
    with graphs.static_buffers(first, (method.__name__, first.training, getattr(x, "shape", None))):
        return method(*run, x)


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

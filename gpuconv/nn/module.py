"""Parameters and the Module base class: children, parameters, devices, state dicts."""
from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np

from .. import graphs
from ..device import device_of, to_device, to_numpy
from ..dispatch import device_call
from ..functional._checks import ieee_arithmetic
from ..random import generator


class Parameter:
    """A trainable array (``data``) and its accumulated gradient (``grad``, None until a backward).

    ``requires_grad=False`` freezes it, as in PyTorch: backward computes no gradient for it (its
    ``grad`` stays None), so the optimizers skip it.
    """

    __slots__ = ("data", "grad", "requires_grad", "_grad_buffer")

    def __init__(self, data, requires_grad: bool = True):
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._grad_buffer = None

    def attach_grad_buffer(self, buffer) -> None:
        """Where fresh gradients go from now on: an optimizer's slot for this parameter in its
        flat gradient buffer (see :class:`gpuconv.optim.Optimizer`)."""
        self._grad_buffer = buffer

    def grad_destination(self):
        """The array a layer writes a fresh gradient into, or None to allocate one.

        While ``grad`` is None, the attached buffer (if it still matches the data's shape and
        device): the optimizer then finds the gradient in place and copies nothing. As with
        ``zero_grad`` in PyTorch, a gradient kept from before ``zero_grad`` is overwritten.
        """
        buffer = self._grad_buffer
        if self.grad is not None or buffer is None:
            return None
        if buffer.shape != self.data.shape or device_of(buffer) != device_of(self.data):
            return None
        return buffer

    def requires_grad_(self, requires_grad: bool = True) -> "Parameter":
        self.requires_grad = bool(requires_grad)
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def device(self) -> str:
        return device_of(self.data)

    def numel(self) -> int:
        return int(self.data.size)

    def accumulate_grad(self, grad) -> None:
        if self.grad is None:  # the common case: every step's first gradient
            self.grad = grad
        else:
            self._add_grad(grad)

    @ieee_arithmetic  # inf + -inf is NaN, silently, as in torch
    def _add_grad(self, grad) -> None:
        accumulated = self.grad
        device_call("add", device_of(grad), lambda: accumulated.__iadd__(grad))

    def __repr__(self) -> str:
        frozen = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device!r}{frozen})"


def host_array(value) -> np.ndarray:
    """``value`` as a NumPy array, from any device: NumPy's own calls raise on a CuPy array."""
    try:
        return to_numpy(value)
    except TypeError:  # not an array of a device: a list, a scalar
        return np.asarray(value)


_IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:
    """Base class: parameters and sub-modules registered by attribute assignment, as in PyTorch.

    Subclasses implement ``forward`` and ``backward``; leaves also implement ``output_shape`` (the
    shape arithmetic :mod:`gpuconv.summary` uses). A container's ``output_shape`` chains its
    children in registration order, which is why containers register children in the order
    their forward runs them.
    """

    # Whether backward must return the gradient with respect to the input. A layer called on its
    # own returns it; a container sets it on its children from what their inputs are (the first
    # layer of a model sees data, which needs none), and a layer that need not skips the work.
    requires_input_grad = True

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        # Buffers this layer's captured calls use, per (pass, input shapes, mode): gpuconv.graphs.
        object.__setattr__(self, "_static_buffers", {})
        self.training = True
        self._ctx = None

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__}.__init__ must call super().__init__() before assigning {name!r}"
            )
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # Only reached when normal lookup fails: parameters and sub-modules live in their dicts.
        for store in ("_parameters", "_modules"):
            items = self.__dict__.get(store)
            if items is not None and name in items:
                return items[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- forward / backward -------------------------------------------------------------------

    def forward(self, *inputs):
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def __call__(self, *inputs):
        if graphs.capturing() is None:
            return self.forward(*inputs)
        with graphs.static_buffers(self, ("forward", self.training, *(getattr(a, "shape", None) for a in inputs))):
            return self.forward(*inputs)

    def _backward_captured(self, grad_output, backward=None):
        """``backward`` (or another backward method of this layer), with the static buffers of
        this layer inside a graph capture."""
        backward = backward or self.backward
        if graphs.capturing() is None:
            return backward(grad_output)
        key = (backward.__name__, self.training, getattr(grad_output, "shape", None))
        with graphs.static_buffers(self, key):
            return backward(grad_output)

    def _save(self, **tensors) -> None:
        """Keep what backward needs from this forward (and drop what the last one kept)."""
        self._ctx = tensors

    def _saved(self) -> dict:
        if self._ctx is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward(): there is no saved input")
        return self._ctx

    def _check_input(self, x) -> None:
        """The input must live where the parameters do: a ValueError naming both otherwise."""
        x_device = device_of(x)
        own = self.device
        if own is not None and x_device != own:
            raise ValueError(
                f"{type(self).__name__}: input of shape {tuple(x.shape)} is on {x_device!r} but the layer's "
                f"parameters are on {own!r}; move one with .to({own!r}) or gpuconv.to_device(x, {x_device!r})"
            )

    # -- structure ----------------------------------------------------------------------------

    def named_children(self):
        yield from self._modules.items()

    def children(self):
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = ""):
        for module_name, module in self.named_modules(prefix):
            for name, param in module._parameters.items():
                yield (f"{module_name}.{name}" if module_name else name), param

    def parameters(self):
        for _, param in self.named_parameters():
            yield param

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> str | None:
        """The device of the parameters; None for a module without any."""
        for param in self._parameters.values():  # a layer's own first: every forward asks
            return param.device
        for param in self.parameters():
            return param.device
        return None

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape for an input of ``input_shape``, computed without running anything."""
        if not self._modules:
            raise NotImplementedError(f"{type(self).__name__} does not implement output_shape")
        shape = tuple(input_shape)
        for child in self.children():
            shape = child.output_shape(shape)
        return shape

    # -- state --------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        for module in self.modules():
            module.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None

    def requires_grad_(self, requires_grad: bool = True):
        """Freeze (False) or unfreeze every parameter, as ``torch.nn.Module.requires_grad_``; returns self."""
        for param in self.parameters():
            param.requires_grad_(requires_grad)
        return self

    def _trains_any_parameter(self) -> bool:
        # Asked of every module at every backward: walked directly, not through parameters().
        return (any(param.requires_grad for param in self._parameters.values())
                or any(module._trains_any_parameter() for module in self._modules.values()))

    def _convert(self, convert) -> None:
        """Apply ``convert`` to every parameter and gradient; saved activations become stale."""
        for module in self.modules():
            for param in module._parameters.values():
                param.data = convert(param.data)
                if param.grad is not None:
                    param.grad = convert(param.grad)
            module._ctx = None

    def to(self, device: str):
        """Move parameters and gradients to ``device`` ('cpu', 'cuda', 'emu'); returns self."""
        self._convert(lambda a: to_device(a, device))
        return self

    def double(self):
        """float64 parameters, on the CPU only (the kernels are float32): for gradient checks."""
        if self.device not in (None, "cpu"):
            raise ValueError(f"double() needs the model on 'cpu' (float64 runs only there), it is on {self.device!r}")
        self._convert(lambda a: a.astype(np.float64))
        return self

    def float(self):
        """float32 parameters, as the kernels of every device take."""
        self._convert(lambda a: a.astype(np.float32))
        return self

    def state_dict(self) -> OrderedDict:
        """``name -> NumPy copy`` of every parameter, names dotted as in PyTorch ('features.0.weight')."""
        return OrderedDict((name, to_numpy(param.data).copy()) for name, param in self.named_parameters())

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy ``state_dict``'s arrays into the parameters' arrays (keeping their device and dtype).

        Returns ``(missing_keys, unexpected_keys)``; with ``strict`` either being non-empty is a
        ValueError. A shape mismatch is always a ValueError. Nothing is copied unless every check
        passes, so a failed load leaves the model as it was.
        """
        own = dict(self.named_parameters())
        missing = [name for name in own if name not in state_dict]
        unexpected = [name for name in state_dict if name not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        values = {name: host_array(value) for name, value in state_dict.items() if name in own}
        for name, value in values.items():
            if value.shape != own[name].shape:
                problems.append(f"{name}: expected shape {own[name].shape}, got {value.shape}")
        if problems:
            raise ValueError(f"cannot load state_dict into {type(self).__name__}:\n  " + "\n  ".join(problems))
        for name, value in values.items():
            param = own[name]
            # Copied into the existing array, as torch does: whoever holds param.data (an
            # optimizer, a view) sees the loaded values, and nothing shares the caller's memory.
            param.data[...] = to_device(value.astype(param.dtype, copy=False), param.device)
        return _IncompatibleKeys(missing, unexpected)

    # -- printing -----------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"({name}): " + repr(child).replace("\n", "\n  ") for name, child in self._modules.items()]
        head = self.extra_repr()
        return f"{type(self).__name__}(\n  " + "\n  ".join(([head] if head else []) + lines) + "\n)"


def _uniform(shape, bound: float) -> np.ndarray:
    """float32 U(-bound, bound), drawn in float32 and in place: VGG16's 25088x4096 weight has 10^8 entries."""
    values = generator().random(shape, dtype=np.float32)
    values *= 2.0 * bound
    values -= bound
    return values


def _shape_check(layer: str, input_shape, ndim: int, layout: str) -> tuple[int, ...]:
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != ndim:
        raise ValueError(f"{layer}: input must be {ndim}-D ({layout}), got shape {input_shape}")
    return input_shape

"""Layers with explicit backward passes, shaped after ``torch.nn``.

There is no autograd: every layer's ``forward(x)`` keeps what its backward needs, and
``backward(grad_output)`` returns the gradient with respect to the layer's input while
*accumulating* the gradients of its parameters into ``Parameter.grad`` (``None`` -> set, else
``+=``), as ``loss.backward()`` does in PyTorch. A model's backward is its layers' backwards in
reverse order (:class:`Sequential` does exactly that).

Layers run on the device of their parameters: ``model.to('emu')`` moves them, and an input on
another device is a ValueError. Parameters are float32, as the kernels are; ``double()`` turns a
model on the CPU to float64, for finite-difference gradient checks.
"""
from __future__ import annotations

import math
from collections import OrderedDict, namedtuple

import numpy as np

from . import functional as F
from . import graphs
from .device import copy_to_device, device_of, empty, to_device, to_numpy
from .dispatch import device_call
from .functional._checks import ieee_arithmetic, pair, positive_int, probability
from .functional.conv import check_padding
from .functional.pool import check_window
from .precision import check as check_precision
from .random import generator, next_seed

__all__ = [
    "Parameter", "Module", "Sequential",
    "Conv2d", "MaxPool2d", "AvgPool2d", "ReLU", "Tanh", "Sigmoid", "Flatten", "Linear", "Dropout",
    "LocalResponseNorm", "CrossEntropyLoss",
]


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

    @ieee_arithmetic  # inf + -inf is NaN, silently, as in torch
    def accumulate_grad(self, grad) -> None:
        if self.grad is None:
            self.grad = grad
        else:
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


class Conv2d(Module):
    """2-D convolution, NCHW input, OIHW weight; initialised as ``torch.nn.Conv2d``.

    ``precision`` ('fp32', 'tf32', 'bf16'; None: the global setting) is the internal precision of
    its three convolutions, see ``gpuconv.precision``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, precision=None):
        super().__init__()
        check_precision(precision)
        self.precision = precision
        # Refused here, not at the first forward: what torch.nn.Conv2d refuses at construction
        # (a float size, padding='same' with a stride, an unknown padding string), and sizes
        # torch accepts only to fail later (0 channels or kernel, a zero stride, negative padding).
        self.in_channels = positive_int(in_channels, "Conv2d: in_channels")
        self.out_channels = positive_int(out_channels, "Conv2d: out_channels")
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = pair(stride, "stride", 1)
        self.dilation = pair(dilation, "dilation", 1)
        check_padding(self.kernel_size, self.stride, padding, self.dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding, "padding", 0)
        # kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as does the bias.
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = Parameter(_uniform((self.out_channels, self.in_channels) + self.kernel_size, bound))
        self.bias = Parameter(_uniform((self.out_channels,), bound)) if bias else None

    def _conv_args(self):
        return self.stride, self.padding, self.dilation

    def forward(self, x):
        self._check_input(x)
        bias = None if self.bias is None else self.bias.data
        out = F.conv2d(x, self.weight.data, bias, *self._conv_args(), precision=self.precision)
        self._save(input=x)
        return out

    def backward(self, grad_output):
        x = self._saved()["input"]
        weight = self.weight.data
        if self.weight.requires_grad:
            self.weight.accumulate_grad(F.conv2d_weight(x, weight.shape, grad_output, *self._conv_args(),
                                                        out=self.weight.grad_destination(), precision=self.precision))
        if self.bias is not None and self.bias.requires_grad:
            self.bias.accumulate_grad(F.conv2d_bias(grad_output, out=self.bias.grad_destination()))
        if not self.requires_input_grad:
            return None
        return F.conv2d_input(x.shape, weight, grad_output, *self._conv_args(), precision=self.precision)

    def output_shape(self, input_shape):
        n, c, h, w = _shape_check("Conv2d", input_shape, 4, "NCHW")
        if c != self.in_channels:
            raise ValueError(
                f"Conv2d: input has {c} channels, the layer expects {self.in_channels} (input shape {input_shape})"
            )
        out_h, out_w = F.conv2d_output_size((h, w), self.kernel_size, *self._conv_args())
        return n, self.out_channels, out_h, out_w

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        if self.precision is not None:
            text += f", precision={self.precision!r}"
        return text


class _Pool2d(Module):
    """What max and average pooling share: the window arguments (stride defaults to the window)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.ceil_mode = bool(ceil_mode)
        # Checked now, but kept as the caller wrote them (2, not (2, 2)), as torch prints them.
        check_window(kernel_size, self.stride, padding)

    def output_shape(self, input_shape):
        n, c, h, w = _shape_check(type(self).__name__, input_shape, 4, "NCHW")
        out_h, out_w = F.pool2d_output_size((h, w), self.kernel_size, self.stride, self.padding, self.ceil_mode)
        return n, c, out_h, out_w

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max pooling; backward routes each gradient to the position its window's maximum came from."""

    # ceil_mode keyword-only: torch.nn.MaxPool2d's fourth argument is dilation (unsupported here),
    # so MaxPool2d(3, 2, 0, 1) must fail rather than turn ceil_mode on.
    def __init__(self, kernel_size, stride=None, padding=0, *, ceil_mode: bool = False):
        super().__init__(kernel_size, stride, padding, ceil_mode)

    def forward(self, x):
        out, indices = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, return_indices=True)
        self._save(indices=indices, input_shape=tuple(x.shape), output=out)
        return out

    def backward(self, grad_output):
        saved = self._saved()
        return F.max_pool2d_backward(grad_output, saved["indices"], saved["input_shape"], self.kernel_size,
                                     self.stride, self.padding, self.ceil_mode)

    def backward_through_relu(self, grad_output):
        """The gradient w.r.t. the input of the ReLU whose output this pool's forward took: that
        ReLU's backward folded into this one (one kernel); see :func:`backward_chain`."""
        saved = self._saved()
        return F.max_pool2d_relu_backward(grad_output, saved["indices"], saved["output"], saved["input_shape"],
                                          self.kernel_size, self.stride, self.padding, self.ceil_mode)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ceil_mode={self.ceil_mode}"


class AvgPool2d(_Pool2d):
    """Average pooling; ``count_include_pad=False`` divides by the window's in-image elements only."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x):
        out = F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        self._save(input_shape=tuple(x.shape))
        return out

    def backward(self, grad_output):
        return F.avg_pool2d_backward(grad_output, self._saved()["input_shape"], self.kernel_size, self.stride,
                                     self.padding, self.ceil_mode, self.count_include_pad)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.ceil_mode:
            text += ", ceil_mode=True"
        if not self.count_include_pad:
            text += ", count_include_pad=False"
        return text


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
        out = F.linear(x, self.weight.data, None if self.bias is None else self.bias.data)
        self._save(input=x)
        return out

    def backward(self, grad_output):
        train_bias = self.bias is not None and self.bias.requires_grad
        grad_input, grad_weight, grad_bias = F.linear_backward(
            grad_output, self._saved()["input"], self.weight.data, input_grad=self.requires_input_grad,
            weight_grad=self.weight.requires_grad, bias_grad=train_bias,
            weight_out=self.weight.grad_destination(), bias_out=self.bias.grad_destination() if train_bias else None)
        if grad_weight is not None:
            self.weight.accumulate_grad(grad_weight)
        if grad_bias is not None:
            self.bias.accumulate_grad(grad_bias)
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


class Dropout(Module):
    """Zero each element with probability ``p`` in training (scaling the rest by 1/(1-p)); identity in eval.

    Each forward draws a fresh seed from :func:`gpuconv.random.next_seed`; backward regenerates the
    same mask from it, so no mask is stored.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = probability(p, "Dropout: p")  # p = 1 zeros everything (and every gradient), as in torch
        self._seed_buffer = None

    def forward(self, x):
        if not (self.training and self.p > 0.0):
            self._save(seed=None)
            return x
        # On a device the seed lives in device memory, written by a host update, so that a
        # captured graph draws the next seed before every replay and its kernels read it there.
        seed = next_seed() if device_of(x) == "cpu" else self._device_seed(device_of(x))
        self._save(seed=seed)
        return F.dropout(x, self.p, True, seed=seed)

    def _device_seed(self, device: str):
        if self._seed_buffer is None or device_of(self._seed_buffer) != device:
            self._seed_buffer = empty((1,), np.uint64, device)
        buffer = self._seed_buffer
        graphs.host_update(lambda: copy_to_device(buffer, np.array([next_seed()], np.uint64)))
        return buffer

    def backward(self, grad_output):
        seed = self._saved()["seed"]
        return grad_output if seed is None else F.dropout_backward(grad_output, self.p, seed)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LocalResponseNorm(Module):
    """Across-channel LRN, PyTorch's formula: ``x / (k + alpha/size * sum of squares)^beta``."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size = positive_int(size, "LocalResponseNorm: size")
        self.alpha, self.beta, self.k = float(alpha), float(beta), float(k)

    def _args(self):
        return self.size, self.alpha, self.beta, self.k

    def forward(self, x):
        out = F.local_response_norm(x, *self._args())
        self._save(input=x, output=out)
        return out

    def backward(self, grad_output):
        saved = self._saved()
        return F.local_response_norm_backward(grad_output, saved["input"], saved["output"], *self._args())

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class CrossEntropyLoss(Module):
    """``loss = criterion(logits, labels)`` (log-softmax + NLL); ``criterion.backward()`` -> d loss / d logits."""

    def __init__(self, reduction: str = "mean", validate_target: bool = True):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"CrossEntropyLoss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        # False for labels checked once when loaded: saves a device round trip per step on 'cuda'.
        self.validate_target = validate_target

    def forward(self, input, target):
        # The loss and its gradient come from one pass over the scores (one kernel on the GPU).
        loss, grad = F.cross_entropy_with_grad(input, target, self.reduction, validate_target=self.validate_target)
        self._save(grad=grad)
        return loss

    @ieee_arithmetic
    def backward(self, grad_output=None):
        """d loss / d logits, times ``grad_output`` (a scalar, or one value per sample for 'none') if given."""
        grad = self._saved()["grad"]
        if grad_output is None:
            return grad
        # Per-sample factors (reduction 'none') scale their sample's row; a scalar scales everything.
        # getattr rather than np.ndim, which needs NumPy's dispatch to reach CuPy for a device array.
        return grad * (grad_output if getattr(grad_output, "ndim", 0) == 0 else grad_output[:, None])

    def extra_repr(self) -> str:
        return "" if self.reduction == "mean" else f"reduction={self.reduction!r}"

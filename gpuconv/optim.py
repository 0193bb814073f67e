"""Optimizers and a learning-rate schedule with PyTorch's update rules and names.

A parameter is any object with a ``.data`` array, updated in place, and a ``.grad`` array or
``None`` (such a parameter is skipped by :meth:`Optimizer.step`). On 'cpu' an update is a few
in-place NumPy operations; on 'cuda' and 'emu' it is one launch of a ``kernels_cu/optim.cu``
kernel per parameter tensor. ``state_dict()`` holds NumPy arrays and plain numbers, so that a
checkpoint can be saved from any device and loaded onto any other.
"""
from __future__ import annotations

import abc
import math
import numbers

import numpy as np

from . import kernels
from .device import device_of, empty, to_device, to_numpy, zeros

__all__ = ["Optimizer", "SGD", "Adam", "StepLR"]


def _check_number(value, name: str, low: float, high: float | None = None, *, high_open: bool = True):
    """``value`` as a float in ``[low, high)`` (or ``[low, high]``); a ValueError naming it otherwise."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    above = high is not None and (value >= high if high_open else value > high)
    if not value >= low or above:  # `not >=` also refuses NaN
        bound = f"[{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


class Optimizer(abc.ABC):
    """What SGD and Adam share: the parameters, their per-parameter state, ``lr``, checkpoints.

    Subclasses name their hyper-parameters in ``_hyperparameters`` and implement
    ``_update_numpy`` and ``_update_kernel`` for one parameter tensor.
    """

    _hyperparameters: tuple[str, ...] = ("lr",)

    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for index, param in enumerate(self.params):
            if not hasattr(param, "data") or not hasattr(param, "grad"):
                raise TypeError(f"parameter {index} must have .data and .grad, got {type(param).__name__}")
        self.lr = lr
        self.state: dict[int, dict] = {}

    @property
    def lr(self) -> float:
        """The learning rate; a scheduler changes it between steps."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _check_number(value, "lr", 0.0)

    def zero_grad(self) -> None:
        """Drop every gradient (sets ``.grad`` to None, PyTorch's default)."""
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient, in place."""
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            data, grad = param.data, param.grad
            if tuple(grad.shape) != tuple(data.shape):
                raise ValueError(f"parameter {index}: grad {tuple(grad.shape)} does not match data {tuple(data.shape)}")
            device = device_of(data)
            if device_of(grad) != device:
                raise ValueError(f"parameter {index}: data is on {device} but grad is on {device_of(grad)}")
            state = self.state.setdefault(index, {})
            if device == "cpu":
                with np.errstate(all="ignore"):  # a diverging run gives inf and NaN, as torch's, not warnings
                    self._update_numpy(data, grad, state)
                continue
            if data.dtype != np.float32 or not data.flags.c_contiguous:
                raise ValueError(f"parameter {index}: the kernels update float32 C-contiguous data in place, "
                                 f"got {data.dtype} {tuple(data.shape)}")
            # astype rather than ascontiguousarray: it keeps an EmuArray on the emulated device.
            grad = grad.astype(np.float32, order="C", copy=False)
            if data.size:
                self._update_kernel(data, grad, state, kernels.blocks_for(data.size))

    @abc.abstractmethod
    def _update_numpy(self, data, grad, state: dict) -> None:
        """Update one parameter on 'cpu', in place."""

    @abc.abstractmethod
    def _update_kernel(self, data, grad, state: dict, grid: int) -> None:
        """Update one float32 parameter on 'cuda' or 'emu' with one kernel launch."""

    def state_dict(self) -> dict:
        """``{'state': {index: {name: ndarray or number}}, 'hyperparameters': {name: value}}``.

        The arrays are copies (as :meth:`Module.state_dict`'s): on 'cpu' and 'emu' ``to_numpy``
        alone would return the live buffers, which the next step changes in place.
        """
        state = {index: {name: to_numpy(v).copy() if hasattr(v, "shape") else v for name, v in entry.items()}
                 for index, entry in self.state.items()}
        hyper = {name: getattr(self, name) for name in self._hyperparameters}
        return {"state": state, "hyperparameters": hyper}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s output; arrays go to each parameter's device and dtype."""
        state = {}
        for index, entry in state_dict["state"].items():
            index = int(index)
            if not 0 <= index < len(self.params):
                raise ValueError(f"state_dict has state for parameter {index}, "
                                 f"but the optimizer has {len(self.params)} parameters")
            data = self.params[index].data
            state[index] = {}
            for name, value in entry.items():
                if hasattr(value, "shape"):
                    if tuple(value.shape) != tuple(data.shape):
                        raise ValueError(f"state_dict's {name} for parameter {index} has shape "
                                         f"{tuple(value.shape)}, the parameter {tuple(data.shape)}")
                    # A copy: the caller's arrays (another optimizer's state, say) must not become
                    # buffers this optimizer updates in place.
                    value = to_device(np.array(to_numpy(value), dtype=data.dtype), device_of(data))
                state[index][name] = value
        for name, value in state_dict["hyperparameters"].items():
            if name not in self._hyperparameters:
                raise ValueError(f"state_dict has hyper-parameter {name!r}; {type(self).__name__} has "
                                 f"{', '.join(self._hyperparameters)}")
            setattr(self, name, value)
        self.state = state


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD`` with dampening 0::

        d = grad + weight_decay * param
        buf = momentum * buf + d         (buf = d at the first step)
        d = d + momentum * buf if nesterov else buf
        param -= lr * d
    """

    _hyperparameters = ("lr", "momentum", "weight_decay", "nesterov")

    # Keyword-only past momentum: torch.optim.SGD's fourth is dampening, which this SGD lacks, so
    # SGD(params, 0.1, 0.9, 0, 1e-4) must fail rather than take 0 and 1e-4 for two other settings.
    def __init__(self, params, lr: float, momentum: float = 0.0, *, weight_decay: float = 0.0,
                 nesterov: bool = False):
        self.momentum = _check_number(momentum, "momentum", 0.0)
        self.weight_decay = _check_number(weight_decay, "weight_decay", 0.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs a positive momentum, got momentum=0")
        super().__init__(params, lr)

    def _buffer(self, data, state):
        # A zero buffer makes the first update momentum * 0 + d = d, PyTorch's initial copy, exactly.
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = zeros(data.shape, data.dtype, device_of(data))
        return state["momentum_buffer"]

    def _update_numpy(self, data, grad, state):
        d = grad + self.weight_decay * data if self.weight_decay else grad
        if self.momentum:
            buffer = self._buffer(data, state)
            buffer *= self.momentum
            buffer += d
            d = d + self.momentum * buffer if self.nesterov else buffer
        data -= self.lr * d

    def _update_kernel(self, data, grad, state, grid):
        # With no momentum the kernel never reads the buffer: an empty array stands for a null pointer.
        buffer = self._buffer(data, state) if self.momentum else empty((0,), np.float32, device_of(data))
        kernels.launch("optim", "sgd_step_v1", grid, kernels.BLOCK,
                       (data, grad, buffer, data.size, self.lr, self.momentum, self.weight_decay, self.nesterov))


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (``weight_decay`` is an L2 term added to the gradient)::

        g = grad + weight_decay * param
        m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g * g
        param -= lr / (1 - beta1 ** t) * m / (sqrt(v) / sqrt(1 - beta2 ** t) + eps)
    """

    _hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.betas = betas
        self.eps = _check_number(eps, "eps", 0.0)
        self.weight_decay = _check_number(weight_decay, "weight_decay", 0.0)
        super().__init__(params, lr)

    @property
    def betas(self) -> tuple[float, float]:
        return self._betas

    @betas.setter
    def betas(self, value):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"betas must be a pair of floats, got {value!r}")
        self._betas = (_check_number(value[0], "betas[0]", 0.0, 1.0), _check_number(value[1], "betas[1]", 0.0, 1.0))

    def _moments(self, data, state):
        if "step" not in state:
            device = device_of(data)
            state.update(step=0, exp_avg=zeros(data.shape, data.dtype, device),
                         exp_avg_sq=zeros(data.shape, data.dtype, device))
        state["step"] += 1
        beta1, beta2 = self.betas
        # In double precision on the host, as PyTorch does: 1 - beta ** step cancels badly in float32.
        step_size = self.lr / (1 - beta1 ** state["step"])
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** state["step"])
        return state["exp_avg"], state["exp_avg_sq"], step_size, bias_correction2_sqrt

    def _update_numpy(self, data, grad, state):
        exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt = self._moments(data, state)
        beta1, beta2 = self.betas
        g = grad + self.weight_decay * data if self.weight_decay else grad
        exp_avg += (1 - beta1) * (g - exp_avg)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * g * g
        data -= step_size * exp_avg / (np.sqrt(exp_avg_sq) / bias_correction2_sqrt + self.eps)

    def _update_kernel(self, data, grad, state, grid):
        exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt = self._moments(data, state)
        beta1, beta2 = self.betas
        kernels.launch("optim", "adam_step_v1", grid, kernels.BLOCK,
                       (data, grad, exp_avg, exp_avg_sq, data.size, beta1, beta2, self.eps, self.weight_decay,
                        step_size, bias_correction2_sqrt))


class StepLR:
    """Multiply the optimizer's ``lr`` by ``gamma`` every ``step_size`` calls of :meth:`step`, as
    ``torch.optim.lr_scheduler.StepLR`` (call it once per epoch, after the epoch's updates)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        if not isinstance(step_size, (int, np.integer)) or isinstance(step_size, bool) or step_size < 1:
            raise ValueError(f"step_size must be a positive int, got {step_size!r}")
        self.optimizer = optimizer
        self.step_size = int(step_size)
        self.gamma = _check_number(gamma, "gamma", 0.0)
        self.last_epoch = 0
        self._last_lr = [optimizer.lr]

    def step(self) -> None:
        self.last_epoch += 1
        # Chained rather than base_lr * gamma ** k, as PyTorch, so that an lr set by hand carries on.
        if self.last_epoch % self.step_size == 0:
            self.optimizer.lr = self.optimizer.lr * self.gamma
        self._last_lr = [self.optimizer.lr]

    def get_last_lr(self) -> list[float]:
        """The learning rate the last :meth:`step` set, as a one-element list (one per group in PyTorch)."""
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {"step_size": self.step_size, "gamma": self.gamma, "last_epoch": self.last_epoch,
                "last_lr": list(self._last_lr)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step_size = state_dict["step_size"]
        self.gamma = state_dict["gamma"]
        self.last_epoch = state_dict["last_epoch"]
        self._last_lr = list(state_dict["last_lr"])

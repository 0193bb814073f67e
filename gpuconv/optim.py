"""Optimizers and a learning-rate schedule with PyTorch's update rules and names.

A parameter is any object with a ``.data`` array, updated in place, and a ``.grad`` array or
``None`` (such a parameter is skipped by :meth:`Optimizer.step`). On 'cpu' an update is a few
in-place NumPy operations; on 'cuda' and 'emu' it is one launch of a ``kernels_cu/optim.cu``
kernel for all parameters together, packed in one flat buffer (see :class:`Optimizer`).
``state_dict()`` holds NumPy arrays and plain numbers, so that a checkpoint can be saved from
any device and loaded onto any other.
"""
from __future__ import annotations

import abc
import math
import numbers

import numpy as np

from . import graphs, kernels
from .cpu import threads as cpu_threads
from .device import copy_to_device, device_of, empty, to_device, to_numpy, zeros
from .dispatch import device_call

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


class _DeviceScalars:
    """A few float32 values in device memory, which a kernel reads at each launch (or replay)."""

    def __init__(self, array):
        self.array = array
        self._last = None

    def write(self, values: tuple) -> None:
        """Copy ``values``, rounded to float32 as a kernel's float argument would be, into device
        memory, when they changed since the last write (the learning rate rarely does)."""
        values = tuple(values)
        if values != self._last:  # as given, not as float32: cheaper, and a rare extra write is harmless
            copy_to_device(self.array, np.array(values, np.float32))
            self._last = values


class _FlatGroup:
    """The parameters of one device and dtype packed into one flat buffer, with their gradients
    and optimizer state in flat buffers of the same layout.

    Each parameter's ``data`` becomes a view of the flat buffer, and its state arrays views of
    the state buffers, so one launch updates any run of neighbouring parameters. A flat buffer
    with views rather than a kernel reading a table of pointers: the kernel gets each buffer as
    one ordinary array argument, so the emulator still guards every access (a pointer read from
    a table inside the kernel would bypass its bounds checks), and the update is the same
    elementwise kernel as for one tensor, which makes it bit-identical to updating each tensor
    on its own.
    """

    def __init__(self, indices: list[int], params: list, state: dict[int, dict]):
        first = params[indices[0]].data
        self.device, self.dtype = device_of(first), first.dtype
        self.indices = indices
        self.shapes = [tuple(params[i].data.shape) for i in indices]
        sizes = [math.prod(shape) for shape in self.shapes]
        self.offsets = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.data = self._pack([params[i].data for i in indices])
        self.grad = empty((self.offsets[-1],), self.dtype, self.device)
        self.grad_views = self.views(self.grad)
        self.data_views = self.views(self.data)
        for i, view in zip(indices, self.data_views):
            params[i].data = view
        self.state: dict[str, object] = {}
        self._scalars: dict[int, tuple] = {}
        # State carried over (a rebuilt group, a loaded state_dict) is packed like the data.
        names = {name for i in indices for name, v in state.get(i, {}).items() if hasattr(v, "shape")}
        for name in sorted(names):
            buffer = self.state_buffer(name)
            for i, view in zip(indices, self.views(buffer)):
                if name in state.get(i, {}):
                    view[...] = state[i][name]
                    state[i][name] = view

    def _pack(self, arrays):
        flat = empty((self.offsets[-1],), self.dtype, self.device)
        for view, array in zip(self.views(flat), arrays):
            view[...] = array
        return flat

    def views(self, flat) -> list:
        return [flat[a:b].reshape(shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.shapes)]

    def state_buffer(self, name: str):
        """The flat state buffer ``name`` (zeros when first asked for)."""
        if name not in self.state:
            self.state[name] = zeros((self.offsets[-1],), self.dtype, self.device)
        return self.state[name]

    def scalars(self, position: int, count: int) -> "_DeviceScalars":
        """The per-step values of the update that starts at ``position``, in device memory."""
        if position not in self._scalars:
            self._scalars[position] = _DeviceScalars(empty((count,), np.float32, self.device))
        return self._scalars[position]

    def current(self, params) -> bool:
        """Whether every parameter's data is still its view (a model moved since would not be)."""
        return all(params[i].data is view for i, view in zip(self.indices, self.data_views))


# Elements per chunk of an update on 'cpu'. An update is a few elementwise passes; run over the
# whole flat buffer each pass reads and writes main memory (58M parameters: about 1 GB a pass),
# run chunk by chunk every pass after the first finds the chunk's data, gradient, state and
# scratch (about 6 arrays of 1 MB for float32) still in cache. Chunks of 16k elements kept them
# in L2 but made AlexNet's update 14k NumPy calls (63 ms on one core against 41 ms at 256k).
_CPU_CHUNK = 262144
# Launch plans of the update kernels per (kernel, argument signature, hyper-parameters).
_plans = kernels.PlanCache()


def _launch_update(kernel: str, grid: int, args: tuple) -> None:
    """Launch an update kernel of optim.cu, by the plan made at its first launch for these arrays'
    signature and these scalars (the hyper-parameters and the run's size)."""
    # The arrays are the 1-D buffers; the scalars, keyed by repr, which tells -0.0 from 0.0.
    arrays = tuple(a for a in args if getattr(a, "ndim", 0) >= 1)
    scalars = tuple(repr(a) for a in args if getattr(a, "ndim", 0) < 1)
    key = (kernel, kernels.signature(*arrays), scalars)
    plan = _plans.lookup(key) if key[1] is not None else None
    if plan is None:
        plan = kernels.LaunchPlan("optim", kernel, grid, kernels.BLOCK, args)
        if key[1] is not None:
            _plans.remember(key, plan)
    plan(*arrays)


def _cpu_chunks(size: int):
    """Slices covering ``range(size)`` in ``_CPU_CHUNK``-long steps."""
    for start in range(0, size, _CPU_CHUNK):
        yield slice(start, min(start + _CPU_CHUNK, size))


def _cpu_scratch(like, count: int) -> list:
    """``count`` chunk-sized scratch arrays for an update of flat ``like``: the temporaries of
    the update formulas, reused by every chunk instead of allocated per pass."""
    return [np.empty(min(like.size, _CPU_CHUNK), like.dtype) for _ in range(count)]


class Optimizer(abc.ABC):
    """What SGD and Adam share: the parameters, their per-parameter state, ``lr``, checkpoints.

    Parameters of one device and dtype are packed into one flat buffer at the first step (see
    :class:`_FlatGroup`; each ``param.data`` becomes a view of it, so a layer keeps reading its
    parameters as before), and one kernel launch (one NumPy pass on 'cpu') updates every run of
    neighbouring parameters that share their state: all of them, unless some have no gradient
    (skipped, as PyTorch skips a parameter whose grad is None). A gradient a layer wrote into
    the parameter's slot of the flat gradient buffer (``grad_destination``) is used in place;
    any other is copied there first.

    Subclasses name their hyper-parameters in ``_hyperparameters`` and implement
    ``_update_numpy`` and ``_update_kernel`` for one flat run of parameters.
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
        self._groups: list[_FlatGroup] | None = None
        # Packed now, so that the first backward already writes into the flat gradient buffer.
        self._flat_groups()

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

    def _flat_groups(self) -> list[_FlatGroup]:
        """The flat groups, (re)built when a parameter's data is no longer its group's view."""
        if self._groups is not None and all(group.current(self.params) for group in self._groups):
            return self._groups
        by_kind: dict[tuple, list[int]] = {}
        for index, param in enumerate(self.params):
            data = param.data
            device = device_of(data)
            if device != "cpu" and data.dtype != np.float32:
                raise ValueError(f"parameter {index}: the kernels update float32 data, got {data.dtype} {tuple(data.shape)}")
            by_kind.setdefault((device, data.dtype), []).append(index)
        self._groups = [_FlatGroup(indices, self.params, self.state) for indices in by_kind.values()]
        for group in self._groups:
            for index, view in zip(group.indices, group.grad_views):
                if hasattr(type(self.params[index]), "grad_destination"):
                    self.params[index].attach_grad_buffer(view)
        return self._groups

    def _run_key(self, index: int):
        """Neighbouring parameters with equal keys share one launch (Adam: the step count)."""
        return None

    def step(self) -> None:
        """Update every parameter that has a gradient, in place."""
        for group in self._flat_groups():
            runs: list[list[int]] = []
            for position, index in enumerate(group.indices):
                param = self.params[index]
                if param.grad is None:
                    runs.append([])
                    continue
                self._stage_grad(index, param, group, position)
                if runs and runs[-1] and self._run_key(group.indices[runs[-1][-1]]) == self._run_key(index):
                    runs[-1].append(position)
                else:
                    runs.append([position])
            for run in runs:
                if run:
                    self._update_run(group, run)

    def flat_gradients(self) -> list:
        """The flat gradient buffers (one per device and dtype), with every gradient in its slot:
        what a data-parallel all-reduce sums in one call per buffer. A trainable parameter without
        a gradient gets zeros there (a rank with no sample in a step still takes part in the sum);
        afterwards each such ``grad`` is its slot, so :meth:`step` copies nothing."""
        for group in self._flat_groups():
            for position, index in enumerate(group.indices):
                param, view = self.params[index], group.grad_views[position]
                if param.grad is not None:
                    self._stage_grad(index, param, group, position)
                elif getattr(param, "requires_grad", True):
                    view.fill(0)
                else:
                    continue  # frozen: no gradient, so step() skips it
                param.grad = view
        return [group.grad for group in self._groups]

    def _stage_grad(self, index: int, param, group: _FlatGroup, position: int) -> None:
        grad, view = param.grad, group.grad_views[position]
        if tuple(grad.shape) != tuple(view.shape):
            raise ValueError(f"parameter {index}: grad {tuple(grad.shape)} does not match data {tuple(view.shape)}")
        if device_of(grad) != group.device:
            raise ValueError(f"parameter {index}: data is on {group.device} but grad is on {device_of(grad)}")
        if grad is not view:
            device_call("copy", group.device, lambda: view.__setitem__(Ellipsis, grad))

    def _update_run(self, group: _FlatGroup, run: list[int]) -> None:
        """One update of the parameters at ``run`` (neighbouring positions of ``group``)."""
        start, stop = group.offsets[run[0]], group.offsets[run[-1] + 1]
        span = slice(start, stop)
        indices = [group.indices[position] for position in run]
        for index, position in zip(indices, run):
            entry = self.state.setdefault(index, {})
            for name in self._state_names:
                if name not in entry:
                    entry[name] = group.views(group.state_buffer(name))[position]
        state = {name: group.state_buffer(name)[span] for name in self._state_names}
        if group.device == "cpu":
            self._update_on_cpu(group.data[span], group.grad[span], state, self._advance(indices))
        elif stop > start:
            scalars = group.scalars(run[0], len(self._scalar_names))
            graphs.host_update(lambda: scalars.write(self._advance(indices)))
            self._update_kernel(group.data[span], group.grad[span], state, scalars.array,
                                kernels.blocks_for(stop - start))

    def _update_on_cpu(self, data, grad, state: dict, scalars: tuple) -> None:
        """``_update_numpy`` over the run, in whole chunks split between two threads where the run
        has two chunks or more and BLAS may use two threads (an update is elementwise, so any split
        gives the same bits): AlexNet's 58M parameters 41 -> 26-33 ms on the 2-CPU VM."""
        parts = 2 if data.size >= 2 * _CPU_CHUNK and cpu_threads.blas_threads() >= 2 else 1
        middle = -(-data.size // (parts * _CPU_CHUNK)) * _CPU_CHUNK
        spans = [slice(0, data.size)] if parts == 1 else [slice(0, middle), slice(middle, data.size)]

        def update(span):
            with np.errstate(all="ignore"):  # a diverging run gives inf and NaN, as torch's, not warnings
                self._update_numpy(data[span], grad[span], {name: array[span] for name, array in state.items()},
                                   scalars)

        cpu_threads.run_each(update, spans)

    # The flat state buffers an update reads and writes.
    _state_names: tuple[str, ...] = ()
    # The per-step values of an update, which the kernels read from device memory.
    _scalar_names: tuple[str, ...] = ("lr",)

    def _advance(self, indices: list[int]) -> tuple:
        """The per-step values (``_scalar_names``) of one update of the parameters ``indices``,
        advancing what they count (Adam: the step count)."""
        return (self.lr,)

    @abc.abstractmethod
    def _update_numpy(self, data, grad, state: dict, scalars: tuple) -> None:
        """Update one flat run of parameters on 'cpu', in place."""

    @abc.abstractmethod
    def _update_kernel(self, data, grad, state: dict, scalars, grid: int) -> None:
        """Update one flat float32 run of parameters on 'cuda' or 'emu' with one kernel launch,
        the per-step values in the float32 device array ``scalars``."""

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
        self._groups = None  # the next step packs the loaded state into flat buffers


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

    @property
    def _state_names(self):
        return ("momentum_buffer",) if self.momentum else ()

    def _update_numpy(self, data, grad, state, scalars):
        # The formulas of the docstring, operation by operation in the same order (a + b as b + a,
        # which IEEE addition makes bit-identical), chunk by chunk in place (see _CPU_CHUNK).
        (lr,) = scalars
        momentum, weight_decay = self.momentum, self.weight_decay
        decayed, step = _cpu_scratch(data, 2)
        for part in _cpu_chunks(data.size):
            p, d = data[part], grad[part]
            if weight_decay:
                d = np.multiply(p, weight_decay, out=decayed[:p.size])
                d += grad[part]
            if momentum:
                # A zero buffer makes the first update momentum * 0 + d = d, PyTorch's initial copy, exactly.
                buffer = state["momentum_buffer"][part]
                buffer *= momentum
                buffer += d
                if self.nesterov:
                    ahead = np.multiply(buffer, momentum, out=step[:p.size])
                    ahead += d
                    d = ahead
                else:
                    d = buffer
            p -= np.multiply(d, lr, out=step[:p.size])

    def _update_kernel(self, data, grad, state, scalars, grid):
        # With no momentum the kernel never reads the buffer: an empty array stands for a null pointer.
        buffer = state["momentum_buffer"] if self.momentum else data[:0]
        _launch_update("sgd_step_v2", grid, (data, grad, buffer, data.size, scalars, self.momentum, self.weight_decay,
                                             self.nesterov))


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

    _state_names = ("exp_avg", "exp_avg_sq")
    _scalar_names = ("step_size", "bias_correction2_sqrt")

    def _run_key(self, index):
        return self.state.get(index, {}).get("step", 0)

    def _advance(self, indices):
        for index in indices:
            entry = self.state[index]
            entry["step"] = entry.get("step", 0) + 1
        step = self.state[indices[0]]["step"]
        beta1, beta2 = self.betas
        # In double precision on the host, as PyTorch does: 1 - beta ** step cancels badly in float32.
        return self.lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)

    def _update_numpy(self, data, grad, state, scalars):
        step_size, bias_correction2_sqrt = scalars
        # The formulas below, operation by operation in the same order, chunk by chunk in place
        # (see _CPU_CHUNK):
        #   g = grad + weight_decay * data
        #   exp_avg += (1 - beta1) * (g - exp_avg)
        #   exp_avg_sq *= beta2;  exp_avg_sq += (1 - beta2) * g * g
        #   data -= step_size * exp_avg / (sqrt(exp_avg_sq) / bias_correction2_sqrt + eps)
        beta1, beta2 = self.betas
        weight_decay, eps = self.weight_decay, self.eps
        decayed, work = _cpu_scratch(data, 2)
        for part in _cpu_chunks(data.size):
            p, g = data[part], grad[part]
            exp_avg, exp_avg_sq = state["exp_avg"][part], state["exp_avg_sq"][part]
            t, w = decayed[:p.size], work[:p.size]
            if weight_decay:
                g = np.multiply(p, weight_decay, out=t)
                g += grad[part]
            np.subtract(g, exp_avg, out=w)
            w *= 1 - beta1
            exp_avg += w
            exp_avg_sq *= beta2
            np.multiply(g, 1 - beta2, out=w)
            w *= g
            exp_avg_sq += w
            denominator = np.sqrt(exp_avg_sq, out=w)
            denominator /= bias_correction2_sqrt
            denominator += eps
            step = np.multiply(exp_avg, step_size, out=t)  # g is not needed past this point
            step /= denominator
            p -= step

    def _update_kernel(self, data, grad, state, scalars, grid):
        beta1, beta2 = self.betas
        _launch_update("adam_step_v2", grid, (data, grad, state["exp_avg"], state["exp_avg_sq"], data.size, beta1,
                                              beta2, self.eps, self.weight_decay, scalars))


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

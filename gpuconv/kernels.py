"""Kernel compilation and launching, for the 'cuda' and 'emu' devices alike.

Knows nothing about layers; the sources themselves (where they live, their text, their
signatures) are :mod:`gpuconv.kernel_source`'s. ``launch(topic, kernel, grid, block, args)`` finds
``kernels_cu/<topic>.cu``, compiles it once per process for the device of the array arguments
(NVRTC through ``cupy.RawModule`` on 'cuda', the host compiler through :mod:`gpuconv.emu` on
'emu'), casts every scalar to the exact C type of the kernel's parameter, checks every array
argument's dtype and contiguity, and launches.

Kernel versions live side by side (``conv2d_forward_v1``, ``_v2``...): :func:`select_version`
picks one from a small registry, overridable by ``GPUCONV_KERNEL_<OP>`` (e.g.
``GPUCONV_KERNEL_CONV2D_FORWARD=1``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from . import dispatch, emu
from .device import array_module, device_of, empty
from .kernel_source import (  # noqa: F401  (re-exported: kernels.Param, kernels.kernel_path...)
    KernelArgumentError,
    Param,
    compiler_source,
    dim3,
    display_name,
    kernel_dir,
    kernel_path,
    kernel_topics,
    parse_signatures,
)

# Options CuPy itself passes to NVRTC, plus fast-math behaviour the kernels are written for.
NVRTC_OPTIONS = ("-std=c++17", "-ftz=true")


class KernelCompileError(RuntimeError):
    """A kernel source failed to compile; the message names the file and line."""


def _scalar_caster(kernel: str, param: Param):
    """``cast(arg) -> numpy scalar`` for one scalar parameter, its type facts derived once.

    Built once per kernel signature: deriving them per call (``np.iinfo``, ``np.issubdtype``)
    cost more than the rest of a launch's host work.
    """
    make = param.dtype.type
    if param.dtype.kind in "bf":
        def cast_float(arg):
            if hasattr(arg, "shape") and getattr(arg, "ndim", 0) > 0:
                raise KernelArgumentError(f"kernel {kernel}: parameter {param.name} is a scalar {param.ctype}, got an array")
            return make(arg)
        return cast_float
    info = np.iinfo(param.dtype)
    low, high = int(info.min), int(info.max)

    def cast_int(arg):
        if type(arg) is not int:  # the common case, a Python int, needs only the range check
            if hasattr(arg, "shape") and getattr(arg, "ndim", 0) > 0:
                raise KernelArgumentError(f"kernel {kernel}: parameter {param.name} is a scalar {param.ctype}, got an array")
            if isinstance(arg, (float, np.floating)) and not float(arg).is_integer():
                raise KernelArgumentError(f"kernel {kernel}: parameter {param.name} is {param.ctype}, got {arg!r}")
            arg = int(arg)
        if not low <= arg <= high:
            raise KernelArgumentError(f"kernel {kernel}: {param.name}={arg} does not fit {param.ctype}")
        return make(arg)
    return cast_int


class _ArgumentCheck:
    """What checking and casting one kernel's arguments needs, derived from its signature once.

    The scalars of a launch are the shapes of its arrays, so the same few tuples recur every
    step: scalars that are all Python ints (the sizes) are cast once and looked up after that.
    """

    _CACHE_LIMIT = 4096

    def __init__(self, kernel: str, params: tuple[Param, ...]):
        self.kernel, self.params = kernel, params
        # Per parameter: None for a pointer (its dtype is checked), else the scalar's caster.
        self.casters = tuple(None if p.pointer else _scalar_caster(kernel, p) for p in params)
        self.pointers = tuple(i for i, p in enumerate(params) if p.pointer)
        self.scalars = tuple(i for i, p in enumerate(params) if not p.pointer)
        self._pointer_dtypes = tuple((i, params[i].dtype) for i in self.pointers)
        self._cast: dict[tuple, tuple] = {}

    def __call__(self, args) -> tuple:
        params = self.params
        if len(args) != len(params):
            raise KernelArgumentError(f"kernel {self.kernel} takes {len(params)} arguments, got {len(args)}")
        if not self._arrays_fit(args):  # then named parameter by parameter
            for i in self.pointers:
                self._check_array(params[i], args[i])
        scalars = tuple([args[i] for i in self.scalars])
        # The types are part of the key: -0.0 equals 0 but casts differently.
        key = (scalars, tuple(map(type, scalars)))
        cast = self._cast.get(key)
        if cast is None:
            cast = tuple(self.casters[i](args[i]) for i in self.scalars)
            if len(self._cast) < self._CACHE_LIMIT and set(key[1]) <= {int}:
                self._cast[key] = cast
        out = list(args)
        for i, value in zip(self.scalars, cast):
            out[i] = value
        return tuple(out)

    def _arrays_fit(self, args) -> bool:
        """Whether every array argument has its parameter's dtype and is C-contiguous: the common
        case, in one pass."""
        try:
            for i, dtype in self._pointer_dtypes:
                if args[i].dtype != dtype or not args[i].flags.c_contiguous:
                    return False
        except AttributeError:
            return False
        return True

    def _check_array(self, param: Param, arg) -> None:
        dtype = getattr(arg, "dtype", None)
        if dtype is None or not hasattr(arg, "flags"):
            raise KernelArgumentError(f"kernel {self.kernel}: parameter {param.name} needs an array, got {type(arg).__name__}")
        if dtype != param.dtype:
            raise KernelArgumentError(
                f"kernel {self.kernel}: parameter {param.name} is {param.ctype}*, got an array of {dtype} {tuple(arg.shape)}"
            )
        if not arg.flags.c_contiguous:
            raise KernelArgumentError(f"kernel {self.kernel}: array for {param.name} {tuple(arg.shape)} is not C-contiguous")


@functools.lru_cache(maxsize=None)
def _argument_check(kernel: str, params: tuple[Param, ...]) -> _ArgumentCheck:
    return _ArgumentCheck(kernel, params)


def cast_args(kernel: str, params: tuple[Param, ...], args) -> tuple:
    """Check arrays and cast scalars to the kernel's exact parameter types.

    CuPy passes a Python float as an 8-byte double whatever the kernel expects; this is where
    that cannot happen: a scalar becomes ``np.float32``/``np.int32``... as the source declares,
    and an array of the wrong dtype or layout is refused before any kernel runs.
    """
    return _argument_check(kernel, tuple(params))(tuple(args))


@functools.lru_cache(maxsize=None)
def signatures(topic: str) -> dict[str, tuple[Param, ...]]:
    return parse_signatures(kernel_path(topic).read_text())


@functools.lru_cache(maxsize=None)
def _cupy_module(topic: str, options: tuple[str, ...]):
    cupy = array_module("cuda")
    module = cupy.RawModule(code=compiler_source(kernel_path(topic)), options=options)
    try:
        module.compile()
    except cupy.cuda.compiler.CompileException as exc:
        raise KernelCompileError(f"kernels_cu/{topic}.cu failed to compile with NVRTC:\n{exc}") from None
    return module


@functools.lru_cache(maxsize=None)
def _cupy_function(topic: str, kernel: str, options: tuple[str, ...]):
    return _cupy_module(topic, options).get_function(kernel)


@functools.lru_cache(maxsize=None)
def _emu_function(topic: str, kernel: str):
    return emu.module_for(kernel_path(topic)).get_function(kernel)


@functools.lru_cache(maxsize=None)
def _kernel_check(topic: str, kernel: str) -> _ArgumentCheck:
    params = signatures(topic).get(kernel)
    if params is None:
        raise KeyError(f"kernels_cu/{topic}.cu has no extern \"C\" __global__ kernel named {kernel!r}")
    return _argument_check(kernel, params)


def _checked_shape(kernel: str, grid, block) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    grid, block = dim3(grid, "grid"), dim3(block, "block")
    if min(grid + block) < 1:
        raise ValueError(f"kernel {kernel}: grid {grid} and block {block} must be positive in every dimension")
    return grid, block


_cached_shape = functools.lru_cache(maxsize=4096)(_checked_shape)


def _launch_shape(kernel: str, grid, block):
    """(grid, block) as checked triples; the same few shapes recur every step, so they are cached."""
    try:
        return _cached_shape(kernel, grid, block)
    except TypeError:  # a list: not hashable, so not cached
        return _checked_shape(kernel, grid, block)


def _function(topic: str, kernel: str, device: str, options: tuple[str, ...]):
    return _emu_function(topic, kernel) if device == "emu" else _cupy_function(topic, kernel, options)


def _prepared(topic: str, kernel: str, grid, block, args, shared_mem, options):
    """What :func:`launch` and :class:`LaunchPlan` derive from a launch: every argument checked,
    ``(check, cast args, device, grid, block, function, shared_mem)``."""
    check = _kernel_check(topic, kernel)
    args = check(tuple(args))
    device = _device_of_arrays(kernel, [args[i] for i in check.pointers])
    grid, block = _launch_shape(kernel, grid, block)
    function = _function(topic, kernel, device, tuple(options))
    shared_mem = int(shared_mem)
    if shared_mem > 48 * 1024:  # past 48 KiB, CUDA wants the kernel's explicit opt-in
        function.max_dynamic_shared_size_bytes = shared_mem
    return check, args, device, grid, block, function, shared_mem


# The device of each array type met (EmuArray: 'emu', cupy.ndarray: 'cuda'), learnt from device_of.
_device_of_type: dict[type, str] = {}


def _device_of_arrays(kernel: str, arrays) -> str:
    """The one device ('cuda' or 'emu') of a launch's arrays; a ValueError naming them otherwise."""
    types = {type(a) for a in arrays}
    if len(types) == 1:
        (array_type,) = types
        device = _device_of_type.get(array_type)
        if device is None:
            device = _device_of_type[array_type] = device_of(arrays[0])
        if device != "cpu":
            return device
    devices = sorted({device_of(a) for a in arrays})
    if len(devices) == 1 and devices[0] != "cpu":  # several array types of one device
        return devices[0]
    raise ValueError(f"kernel {kernel}: array arguments must all be on 'cuda' or all on 'emu', got {devices}")


def _issue(kernel, device, function, grid, block, args, shared_mem) -> None:
    dispatch.issue(kernel, device, lambda: function(grid, block, args, shared_mem=shared_mem), grid, block, shared_mem)


def launch(topic: str, kernel: str, grid, block, args, shared_mem: int = 0, options: tuple[str, ...] = NVRTC_OPTIONS):
    """Launch ``kernel`` from ``kernels_cu/<topic>.cu`` on the device of its array arguments.

    Everything that depends only on the kernel (its parameter types, the casters of its scalars,
    the compiled function) and on the launch shape is derived once and cached: a steady-state
    launch checks its arrays, casts its scalars and launches. A caller that repeats one launch
    with new arrays does less with a :class:`LaunchPlan`.
    """
    _, args, device, grid, block, function, shared_mem = _prepared(topic, kernel, grid, block, args, shared_mem,
                                                                   options)
    _issue(kernel, device, function, grid, block, args, shared_mem)


class LaunchPlan:
    """One launch of a kernel with its shape and scalar arguments fixed: ``plan(*arrays)``.

    Built from the arguments of a first launch, as :func:`launch` takes them (every one checked
    then; the arrays are not kept), it holds the compiled function, the checked launch shape and
    the scalars cast to their C types. A call passes the arrays of the kernel's pointer
    parameters, in order, and checks only that each has the dtype, device and C-contiguity of its
    parameter before launching: what a layer's steady-state step needs, the geometry behind the
    scalars being the caller's (keyed by its input shapes, see :func:`signature`).
    """

    __slots__ = ("kernel", "device", "grid", "block", "shared_mem", "_function", "_template", "_pointers",
                 "_dtypes", "_array_type", "_check")

    def __init__(self, topic: str, kernel: str, grid, block, args, shared_mem: int = 0,
                 options: tuple[str, ...] = NVRTC_OPTIONS):
        check, args, self.device, self.grid, self.block, self._function, self.shared_mem = _prepared(
            topic, kernel, grid, block, args, shared_mem, options)
        self.kernel, self._check, self._pointers = kernel, check, check.pointers
        self._template = [None if i in check.pointers else a for i, a in enumerate(args)]
        self._dtypes = tuple(check.params[i].dtype for i in check.pointers)
        self._array_type = type(args[check.pointers[0]])

    def __call__(self, *arrays) -> None:
        if len(arrays) != len(self._pointers):
            raise KernelArgumentError(f"kernel {self.kernel}: the plan takes {len(self._pointers)} arrays, "
                                      f"got {len(arrays)}")
        args = self._template.copy()
        array_type = self._array_type
        for i, array, dtype in zip(self._pointers, arrays, self._dtypes):
            if type(array) is not array_type or array.dtype != dtype or not array.flags.c_contiguous:
                self._refuse(args, i, array)
            args[i] = array
        _issue(self.kernel, self.device, self._function, self.grid, self.block, tuple(args), self.shared_mem)

    def _refuse(self, args, index, array):
        args[index] = array
        self._check._check_array(self._check.params[index], array)  # a wrong dtype or layout: its message
        raise ValueError(f"kernel {self.kernel}: a plan made for arrays on {self.device!r} got one on "
                         f"{device_of(array)!r} for {self._check.params[index].name}")


def signature(*arrays) -> tuple | None:
    """What a launch plan may depend on in its arrays: each one's type (its device: gpuconv runs on
    one GPU, whose arrays share one type), shape and dtype (None for None). None where an argument
    is not an array, or not C-contiguous (no plan: a plan launches the arrays themselves, where the
    full path makes contiguous copies)."""
    try:
        if not all(a is None or a.flags.c_contiguous for a in arrays):
            return None
        return tuple(None if a is None else (type(a), a.shape, a.dtype) for a in arrays)
    except AttributeError:
        return None


class OpPlan:
    """A :class:`LaunchPlan` with the outputs it allocates: ``outputs = plan(*inputs)``, the kernel's
    pointer parameters being its inputs then its outputs (fresh arrays of ``outputs``' (shape,
    dtype) each call: inside a graph capture, the layer's static buffers)."""

    __slots__ = ("launch", "outputs")

    def __init__(self, launch: LaunchPlan, outputs):
        self.launch, self.outputs = launch, tuple(outputs)

    @property
    def device(self) -> str:
        return self.launch.device

    def __call__(self, *inputs) -> tuple:
        device = self.launch.device
        outputs = tuple(empty(shape, dtype, device) for shape, dtype in self.outputs)
        self.launch(*inputs, *outputs)
        return outputs


def arguments_key(*values) -> tuple:
    """``values`` with their types, tuples element by element, for a plan's key: ``stride=True``
    or ``kernel_size=2.0`` equal 1 and 2 as keys but are refused where those are not (a list:
    unhashable, no plan)."""
    return tuple((v, tuple(map(type, v))) if type(v) is tuple else (v, type(v)) for v in values)


class PlanCache(dict):
    """``key -> plan``, a key being the :func:`signature` of an op's arrays (never None) and its
    other arguments; forgets everything past ``limit`` entries (a model sees a few shapes)."""

    def __init__(self, limit: int = 256):
        super().__init__()
        self.limit = limit

    def lookup(self, key):
        """The plan for ``key``, or None (also for a key that cannot be hashed: a list argument)."""
        try:
            return self.get(key)
        except TypeError:
            return None

    def remember(self, key, plan) -> None:
        """Keep ``plan`` for ``key`` (unless ``key`` cannot be hashed)."""
        try:
            hash(key)
        except TypeError:
            return
        if len(self) >= self.limit:
            self.clear()
        self[key] = plan


BLOCK = 256
# Grid-stride kernels are correct for any grid; past a few waves of a large GPU more blocks only
# add scheduling (and, on the emulated device, fibers), so their grid is capped.
GRID_STRIDE_CAP = 8192


def blocks_for(work_items: int, block: int = BLOCK) -> int:
    """Blocks of ``block`` threads for one thread per work item (at least one block)."""
    return max(1, -(-int(work_items) // block))


def grid_stride_blocks(work_items: int, items_per_thread: int = 1, block: int = BLOCK) -> int:
    """Blocks for a 1-D grid-stride launch over ``work_items``, capped at ``GRID_STRIDE_CAP``."""
    return min(blocks_for(-(-int(work_items) // items_per_thread), block), GRID_STRIDE_CAP)


def select_version(op: str, versions: dict, default: int):
    """Pick ``versions[n]`` for ``op``: ``GPUCONV_KERNEL_<OP>`` if set, else ``default``."""
    variable = f"GPUCONV_KERNEL_{op.upper()}"
    chosen = os.environ.get(variable)
    if chosen is None:
        return versions[default]
    try:
        return versions[int(chosen)]
    except (ValueError, KeyError):
        raise ValueError(f"{variable}={chosen!r}: {op} has versions {sorted(versions)}") from None

"""Kernel sources, compilation and launching, for the 'cuda' and 'emu' devices alike.

Knows nothing about layers. ``launch(topic, kernel, grid, block, args)`` finds
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
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dispatch
from .device import array_module, device_of

# Options CuPy itself passes to NVRTC, plus fast-math behaviour the kernels are written for.
NVRTC_OPTIONS = ("-std=c++17", "-ftz=true")

_C_TYPES = {
    "float": np.float32,
    "double": np.float64,
    "int": np.int32,
    "unsigned int": np.uint32,
    "unsigned": np.uint32,
    "long long": np.int64,
    "long long int": np.int64,
    "unsigned long long": np.uint64,
    "unsigned long long int": np.uint64,
    "char": np.int8,
    "signed char": np.int8,
    "unsigned char": np.uint8,
    "bool": np.bool_,
}


class KernelCompileError(RuntimeError):
    """A kernel source failed to compile; the message names the file and line."""


class KernelArgumentError(TypeError):
    """An argument does not match the kernel's parameter type."""


def kernel_dir() -> Path:
    """``kernels_cu/``: package data in an installed wheel, the repository's folder in a checkout."""
    packaged = Path(__file__).with_name("kernels_cu")
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "kernels_cu"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"kernels_cu/ not found beside the package ({packaged}) or in the checkout ({checkout})")


def kernel_path(topic: str) -> Path:
    path = kernel_dir() / f"{topic}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source {path.name} in {path.parent}")
    return path


def kernel_topics() -> list[str]:
    """Every kernel source file's topic, sorted."""
    return sorted(p.stem for p in kernel_dir().glob("*.cu"))


@dataclass(frozen=True)
class Param:
    """One kernel parameter as written in the source."""

    ctype: str  # base C type, e.g. 'float', 'long long'
    name: str
    pointer: bool

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_C_TYPES[self.ctype])


_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s+)?void\s+'
    r"(?:__launch_bounds__\s*\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)",
    re.S,
)
_QUALIFIERS = {"const", "__restrict__", "__restrict", "volatile"}


def _parse_param(text: str, kernel: str) -> Param:
    pointer = "*" in text
    words = [w for w in re.split(r"[\s*]+", text.strip()) if w and w not in _QUALIFIERS]
    if len(words) < 2:
        raise KernelArgumentError(f"kernel {kernel}: cannot parse parameter {text.strip()!r}")
    ctype, name = " ".join(words[:-1]), words[-1]
    if ctype not in _C_TYPES:
        raise KernelArgumentError(f"kernel {kernel}: parameter {name} has unsupported type {ctype!r}")
    return Param(ctype, name, pointer)


def parse_signatures(source: str) -> dict[str, tuple[Param, ...]]:
    """``{kernel name: parameters}`` for every ``extern "C" __global__`` kernel in ``source``."""
    source = re.sub(r"//[^\n]*|/\*.*?\*/", " ", source, flags=re.S)
    signatures = {}
    for match in _KERNEL_RE.finditer(source):
        name, params = match.group(1), match.group(2).strip()
        parts = [p for p in params.split(",") if p.strip()] if params and params != "void" else []
        signatures[name] = tuple(_parse_param(p, name) for p in parts)
    return signatures


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


@dataclass(frozen=True)
class _ArgumentCheck:
    """What checking and casting one kernel's arguments needs, derived from its signature once."""

    kernel: str
    params: tuple[Param, ...]
    # Per parameter: None for a pointer (its dtype is checked), else the scalar's caster.
    casters: tuple

    def __call__(self, args) -> tuple:
        params = self.params
        if len(args) != len(params):
            raise KernelArgumentError(f"kernel {self.kernel} takes {len(params)} arguments, got {len(args)}")
        out = []
        for param, caster, arg in zip(params, self.casters, args):
            if caster is not None:
                out.append(caster(arg))
                continue
            dtype = getattr(arg, "dtype", None)
            if dtype is None or not hasattr(arg, "flags"):
                raise KernelArgumentError(f"kernel {self.kernel}: parameter {param.name} needs an array, got {type(arg).__name__}")
            if dtype != param.dtype:
                raise KernelArgumentError(
                    f"kernel {self.kernel}: parameter {param.name} is {param.ctype}*, got an array of {dtype} {tuple(arg.shape)}"
                )
            if not arg.flags.c_contiguous:
                raise KernelArgumentError(f"kernel {self.kernel}: array for {param.name} {tuple(arg.shape)} is not C-contiguous")
            out.append(arg)
        return tuple(out)


@functools.lru_cache(maxsize=None)
def _argument_check(kernel: str, params: tuple[Param, ...]) -> _ArgumentCheck:
    return _ArgumentCheck(kernel, params, tuple(None if p.pointer else _scalar_caster(kernel, p) for p in params))


def cast_args(kernel: str, params: tuple[Param, ...], args) -> tuple:
    """Check arrays and cast scalars to the kernel's exact parameter types.

    CuPy passes a Python float as an 8-byte double whatever the kernel expects; this is where
    that cannot happen: a scalar becomes ``np.float32``/``np.int32``... as the source declares,
    and an array of the wrong dtype or layout is refused before any kernel runs.
    """
    return _argument_check(kernel, tuple(params))(tuple(args))


def dim3(value, what: str, error: type[Exception] = ValueError) -> tuple[int, int, int]:
    """A grid or block given as an int or 1 to 3 ints, as the (x, y, z) triple; ``error`` otherwise."""
    dims = (value,) if np.isscalar(value) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise error(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)


def display_name(path: Path) -> str:
    """``kernels_cu/foo.cu``: the name compiler messages use, the same on every machine."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def compiler_source(path: str | os.PathLike) -> str:
    """The text every compiler gets for a kernel file: NVRTC on 'cuda', g++ on 'emu', the gate.

    ``#include "x.cuh"`` of the kernels' own headers is expanded here, once per header, rather
    than left to each compiler's include path: the three compilers then see the same text, and
    a cache keyed on that text (the emulator's) notices a changed header. ``#line`` directives
    keep every message pointing at the real file and line.
    """
    path = Path(path)
    included: set[Path] = set()

    def expand(file: Path) -> str:
        name = display_name(file)
        lines = [f'#line 1 "{name}"']
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            match = _INCLUDE_RE.match(line)
            if not match:
                lines.append(line)
                continue
            header = (file.parent / match.group(1)).resolve()
            if not header.is_file():
                raise FileNotFoundError(f"{name}:{number}: included file {match.group(1)!r} not found beside it")
            if header not in included:
                included.add(header)
                lines.append(expand(header))
            lines.append(f'#line {number + 1} "{name}"')
        return "\n".join(lines)

    return expand(path) + "\n"


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
    from . import emu

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


def launch(topic: str, kernel: str, grid, block, args, shared_mem: int = 0, options: tuple[str, ...] = NVRTC_OPTIONS):
    """Launch ``kernel`` from ``kernels_cu/<topic>.cu`` on the device of its array arguments.

    Everything that depends only on the kernel (its parameter types, the casters of its scalars,
    the compiled function) and on the launch shape is derived once and cached: a steady-state
    launch checks its arrays, casts its scalars and launches.
    """
    check = _kernel_check(topic, kernel)
    args = check(tuple(args))
    devices = {device_of(a) for a, c in zip(args, check.casters) if c is None}
    if len(devices) != 1 or "cpu" in devices:
        raise ValueError(f"kernel {kernel}: array arguments must all be on 'cuda' or all on 'emu', got {sorted(devices)}")
    (device,) = devices
    grid, block = _launch_shape(kernel, grid, block)
    function = _function(topic, kernel, device, tuple(options))
    shared_mem = int(shared_mem)
    if shared_mem > 48 * 1024:  # past 48 KiB, CUDA wants the kernel's explicit opt-in
        function.max_dynamic_shared_size_bytes = shared_mem
    dispatch.issue(kernel, device, lambda: function(grid, block, args, shared_mem=shared_mem), grid, block, shared_mem)


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

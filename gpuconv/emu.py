"""The emulated CUDA device: the kernels of ``kernels_cu/`` compiled by the host C++ compiler.

Status: usable.

Running a kernel on the emulated device
---------------------------------------
Arrays on device ``'emu'`` (:class:`gpuconv.EmuArray`) make every op run its CUDA kernels here;
``gpuconv.kernels.launch`` is the usual way in. Directly, as with ``cupy.RawModule``::

    from gpuconv import emu, kernel_source
    fn = emu.module_for(kernel_source.kernel_path("activation")).get_function("relu_forward_v1")
    fn((blocks, 1, 1), (256, 1, 1), (x, y, np.int64(n)), shared_mem=0)

A module is compiled once by ``g++`` (``$CXX``) together with ``gpuconv/emu_runtime/cuda_emu.h``
and cached on disk by a hash of (source, header, flags, compiler version) in ``$GPUCONV_EMU_CACHE``
(default ``~/.cache/gpuconv/emu``). The threads of a block run as cooperative fibers that switch
at ``__syncthreads()`` and at warp intrinsics (a few lines of x86-64 assembly per switch; ucontext
on other Linux architectures); blocks run one after another, in the order :func:`block_order`
or ``$GPUCONV_EMU_BLOCK_ORDER`` chooses (the same names; random permutes the whole grid). The
order in which
the fibers of a block resume between barriers is chosen by :func:`thread_order` or
``$GPUCONV_EMU_ORDER`` (``forward``, ``reverse``, ``random`` or ``random:SEED``): running a
kernel in several orders exposes code that depends on an order the hardware does not promise.

What it catches (each an :class:`EmuError`)
-------------------------------------------
* under :func:`racecheck` (``$GPUCONV_EMU_RACECHECK=1``; :mod:`gpuconv.emu_racecheck`), any two
  accesses to the same shared or global memory, one a write, that no ``__syncthreads()``, warp
  intrinsic or atomic orders, within a block or between blocks, in every thread order
  (:class:`EmuRaceError`, naming both source lines, the memory, the blocks and threads);
* code that depends on the order of blocks (:func:`block_order`), such as a float-atomic sum;
* a missing ``__syncthreads()``: shared memory is poisoned with NaN (bytes 0xFF) before every
  block and threads run in the chosen order, so a read before the write gives NaN or a wrong
  answer in at least one order;
* an unwritten shared slot (NaN), an uninitialised local (``-ftrivial-auto-var-init=pattern``:
  a float starts as -1.7e38);
* barrier divergence (a ``__syncthreads()`` that returned threads never reach) and deadlock,
  naming the block and threads; warp intrinsics whose lanes disagree on the operation or mask;
* out-of-bounds global memory access: every array argument is copied into a buffer whose end
  touches a 1 MiB ``PROT_NONE`` guard region (and with another before it), so the fault names
  the kernel, the parameter, the byte offset, the block and the thread. Buffers start 16-byte
  aligned (for ``float4`` access), which leaves up to 15 bytes of slack after an array whose size
  is not a multiple of 16, and a head slack within the first page: both are filled with 0xFF (a
  read gives NaN) and checked after the launch (a write there is reported);
* writes past the dynamic shared memory size of the launch (a 1 KiB red zone);
* integer division by zero and other faults inside a kernel, and fiber stack overflow (64 KiB);
* wrong arguments, below ``kernels.cast_args``: a Python ``float``/``int`` for a scalar (CuPy would
  pass 8 bytes whatever the parameter), a NumPy scalar or array of another dtype, a non-contiguous
  array; launch shapes beyond CUDA's limits (block x, y <= 1024, z <= 64, at most 1024 threads;
  grid x < 2^31, y, z <= 65535; static plus dynamic shared memory <= 48 KiB unless the
  function's ``max_dynamic_shared_size_bytes`` is raised, up to 227 KiB in all, Hopper's opt-in
  maximum. Static shared memory is read per kernel from the library's symbol table; a
  ``__shared__`` variable of a ``__device__`` function or at file scope counts against every kernel).

What is NOT emulated
--------------------
Races between blocks outside :func:`racecheck` (blocks run one at a time), memory ordering and
fences (under racecheck atomics are relaxed and ``__threadfence()`` orders nothing), the
weaker consistency of a real GPU, warps diverging inside a warp (a warp is only synchronised at
its intrinsics), inline PTX outside ``kernels_cu/ptx.cuh``, texture memory, streams, and
performance. libm's ``expf``/``logf``/``__expf``... are more exact than the GPU's approximations,
so compare results with a tolerance. Denormals are flushed to zero while a kernel runs, as the
kernels are compiled with ``-ftz=true`` for the GPU (here for doubles as well). A shuffle that
reads a lane outside the participating set returns all-ones bits (NaN). ``__activemask()`` is
every lane that has not exited. One launch runs at a time per process.

The source is compiled as written, with one rewrite: ``extern __shared__ T name[];`` (dynamic
shared memory, not valid C++ on the host) becomes a pointer to the launch's shared arena, on the
same line so compiler messages keep their line numbers. ``GPUCONV_EMU`` is defined.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from .emu_modes import (  # noqa: F401  (the settings are part of this module's interface)
    BLOCK_ORDER_ENV,
    ORDER_ENV,
    ORDERS,
    RACECHECK_ENV,
    block_order,
    current_block_order,
    current_order,
    racecheck,
    racecheck_enabled,
    thread_order,
)
from .emu_errors import (  # noqa: F401  (re-exported)
    EmuArgumentError,
    EmuCompileError,
    EmuError,
    EmuLaunchError,
    EmuMemoryError,
    EmuRaceError,
    EmuSyncError,
)
from . import dispatch, emu_racecheck
from .emu_memory import GuardedBuffer, Region, bytes_at, regions_of
from .kernel_source import Param, compiler_source, dim3, display_name, parse_signatures

RUNTIME = Path(__file__).with_name("emu_runtime")
HEADER = RUNTIME / "cuda_emu.h"
CACHE_ENV = "GPUCONV_EMU_CACHE"
# -fstack-clash-protection probes every page of a large stack frame, so a local array too big
# for a fiber's stack faults in the guard page below it instead of landing in another stack;
# -z defs turns a function the header declares but nothing defines into a link error, not a
# failure to load.
CXX_FLAGS = (
    "-std=c++17", "-O2", "-shared", "-fPIC", "-ftrivial-auto-var-init=pattern", "-fstack-clash-protection",
    "-Wno-unknown-pragmas", "-Wl,-z,defs",
)
# The race detector's build (gpuconv/emu_runtime/racecheck.h): TSan, and line tables for its reports.
RACECHECK_FLAGS = ("-fsanitize=thread", "-g", "-DGPUCONV_EMU_RACECHECK", f"-Wl,-T,{RUNTIME / 'racecheck.ld'}")

MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
DEFAULT_SHARED_LIMIT = 48 * 1024
MAX_SHARED_LIMIT = 227 * 1024  # Hopper's opt-in maximum per block (cudaFuncAttributeMaxDynamicSharedMemorySize)



# Result codes of emu::launch (cuda_emu.h).
_OK, _SIGNAL, _DIVERGENCE, _DEADLOCK, _WARP_MISUSE, _SHARED_OVERRUN, _STACK_OVERFLOW, _NO_MEMORY = range(8)


class _Report(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_int),
        ("signal", ctypes.c_int),
        ("signal_code", ctypes.c_int),
        ("fault_address", ctypes.c_ulonglong),
        ("block", ctypes.c_uint * 3),
        ("thread", ctypes.c_uint * 3),
        ("message", ctypes.c_char * 512),
        ("dynamic_shared", ctypes.c_ulonglong * 2),
        ("static_shared", ctypes.c_ulonglong * 2),
    ]


# ---------------------------------------------------------------------------------------------
# Dry runs


@contextlib.contextmanager
def dry_run():
    """Within the ``with`` statement, launches are checked as always (argument types, launch
    limits, shared memory) and recorded, but no kernel body runs, nor any library call on 'emu'
    (the matrix products of Linear), and fresh arrays are not poisoned: the host path of a
    training step can be timed alone. Yields the list of ``(kernel, grid, block, shared_mem)``
    issued (grid and block None for a library call)."""
    from . import device, dispatch

    previous, dispatch.dry_run_launches = dispatch.dry_run_launches, []
    poison, device.poison_fresh_arrays = device.poison_fresh_arrays, False
    try:
        yield dispatch.dry_run_launches
    finally:
        dispatch.dry_run_launches = previous
        device.poison_fresh_arrays = poison


# ---------------------------------------------------------------------------------------------
# Compilation

# `extern __shared__ [__align__(n)] T name[];` on one line; see the module docstring.
_DYNAMIC_SHARED_RE = re.compile(
    r"\bextern[ \t]+__shared__[ \t]+([^;\[\n]*?)[ \t]*\b(\w+)[ \t]*\[[ \t]*\][ \t]*;"
)
_ALIGN_RE = re.compile(r"__align__[ \t]*\([ \t]*\d+[ \t]*\)")


def _rewrite_dynamic_shared(source: str) -> str:
    def pointer(match: re.Match) -> str:
        ctype = " ".join(_ALIGN_RE.sub(" ", match.group(1)).split())
        return f"{ctype}* const {match.group(2)} = reinterpret_cast<{ctype}*>(emu_dynamic_shared);"

    return _DYNAMIC_SHARED_RE.sub(pointer, source)


def _entry_points(signatures: dict[str, tuple[Param, ...]]) -> str:
    """One ``emu_launch_<kernel>`` per kernel: unpacks the argument slots and runs the kernel as
    the body of every fiber."""
    lines = ['#line 1 "<gpuconv.emu entry points>"']
    for name, params in signatures.items():
        unpacked = ", ".join(
            f"*({p.ctype}**)args[{i}]" if p.pointer else f"*({p.ctype}*)args[{i}]" for i, p in enumerate(params)
        )
        lines.append(f"static void emu_body_{name}(void** args) {{ (void)args; {name}({unpacked}); }}")
        lines.append(
            f'extern "C" int emu_launch_{name}(const long long* cfg, void** args, emu::Report* report) '
            f"{{ return emu::launch(cfg, args, emu_body_{name}, report); }}"
        )
    return "\n".join(lines) + "\n"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpuconv" / "emu")


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


@functools.cache
def _compiler_version(cxx: str) -> str:
    try:
        result = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EmuCompileError(f"the emulated device needs a C++17 compiler; {cxx!r} failed: {exc}") from None
    return result.stdout.splitlines()[0] if result.stdout else cxx


_COMPILER_ERROR_RE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:\d+:)? (?:fatal )?error: (?P<text>.*)$", re.MULTILINE)


def _compile_error(display: str, stderr: str) -> EmuCompileError:
    first = _COMPILER_ERROR_RE.search(stderr)
    headline = (
        f"{first['file']}:{first['line']}: error: {first['text']}" if first else f"{display}: compilation failed"
    )
    return EmuCompileError(f"{headline}\n(compiling {display} for the emulated device)\n{stderr.strip()}")


class EmuModule:
    """A ``.cu`` source compiled for the emulated device (as ``cupy.RawModule``).

    ``path`` names a file; ``source`` gives the text directly (``name`` then names it in compiler
    messages). ``options`` are extra compiler options, such as ``-DNAME=value``. ``compiled``
    tells whether this instance ran the compiler or found the cached shared library.
    ``racecheck=True`` builds the race detector's variant, which only a process that loaded
    ThreadSanitizer first can load (:mod:`gpuconv.emu_racecheck_worker`).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        source: str | None = None,
        name: str = "<source>.cu",
        options: tuple[str, ...] = (),
        racecheck: bool = False,
    ):
        if (path is None) == (source is None):
            raise TypeError("EmuModule takes exactly one of path= or source=")
        # What another process needs to build the same module (the race detector's worker).
        self.origin = {"path": None if path is None else str(path), "source": source, "name": name, "options": tuple(options)}
        if path is not None:
            path = Path(path)
            source = compiler_source(path)
            name = display_name(path)
        else:
            source = f'#line 1 "{name}"\n{source}'
        self.name = name
        self.signatures = parse_signatures(source)
        self.options = tuple(options)
        self.racecheck = racecheck
        self._text = f"{_rewrite_dynamic_shared(source)}\n{_entry_points(self.signatures)}"
        self.library_path, self.compiled = self._build(RACECHECK_FLAGS if racecheck else ())
        self._library = ctypes.CDLL(str(self.library_path))
        self._functions: dict[str, EmuFunction] = {}
        self._static_shared = _static_shared_bytes(self.library_path, self.signatures)

    def racecheck_library(self) -> Path:
        """The race detector's build of this module (compiled on first use, not loaded here)."""
        return self._build(RACECHECK_FLAGS)[0]

    def _build(self, flags: tuple[str, ...]) -> tuple[Path, bool]:
        """The cached shared library for ``flags``, and whether this call compiled it."""
        cxx = _compiler()
        runtime = [p.read_text() for p in sorted(RUNTIME.iterdir()) if p.suffix in (".h", ".ld")]
        key = hashlib.sha256(
            "\0".join([self._text, *runtime, " ".join(CXX_FLAGS + flags + self.options), _compiler_version(cxx)]).encode()
        ).hexdigest()[:24]
        stem = re.sub(r"[^\w.-]", "_", Path(self.name).stem)
        library = cache_dir() / f"{stem}{'-racecheck' if flags else ''}-{key}.so"
        if library.is_file():
            return library, False
        library.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a private name and rename: processes compiling the same module at once each
        # publish a complete library, never a half-written one.
        fd, temporary = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".tmp")
        os.close(fd)
        try:
            command = [cxx, *CXX_FLAGS, *flags, *self.options, "-include", str(HEADER), "-x", "c++", "-", "-o", temporary]
            result = subprocess.run(command, input=self._text, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise _compile_error(self.name, result.stderr)
            os.replace(temporary, library)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return library, True

    def get_function(self, name: str) -> EmuFunction:
        if name not in self._functions:
            if name not in self.signatures:
                raise KeyError(f"{self.name} has no extern \"C\" __global__ kernel named {name!r}")
            entry = getattr(self._library, f"emu_launch_{name}")
            entry.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_Report)]
            entry.restype = ctypes.c_int
            self._functions[name] = EmuFunction(self, name, self.signatures[name], entry, self._static_shared[name])
        return self._functions[name]


_SHARED_SYMBOL_RE = re.compile(r"^[0-9a-f]+ .*\semu_shared\s+([0-9a-f]+)\s+(\S+)$", re.MULTILINE)
_LOCAL_STATIC_RE = re.compile(r"_ZZ(\d+)")


def _static_shared_bytes(library: Path, signatures) -> dict[str, int]:
    """Static ``__shared__`` bytes per kernel, from the symbol table of the compiled library.

    A ``__shared__`` variable declared in a kernel is a static local, named ``_ZZ<len><kernel>E..``;
    one declared in a __device__ function or at file scope cannot be traced to its kernels, so it
    counts against every kernel of the file (as on a GPU for each kernel that uses it).
    """
    try:
        table = subprocess.run(["objdump", "-t", str(library)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return dict.fromkeys(signatures, 0)  # without binutils the limit applies to dynamic shared memory alone
    owned = dict.fromkeys(signatures, 0)
    everyone = 0
    for size_hex, symbol in _SHARED_SYMBOL_RE.findall(table):
        size = int(size_hex, 16)
        match = _LOCAL_STATIC_RE.match(symbol)
        owner = symbol[match.end() : match.end() + int(match.group(1))] if match else None
        if owner in owned:
            owned[owner] += size
        else:
            everyone += size
    return {name: size + everyone for name, size in owned.items()}


_modules: dict[tuple[str, str], EmuModule] = {}
_modules_lock = threading.Lock()


def module_for(path: str | os.PathLike) -> EmuModule:
    """The compiled module of the file at ``path``, once per process and file contents."""
    path = Path(path).resolve()
    key = (str(path), hashlib.sha256(compiler_source(path).encode()).hexdigest())
    with _modules_lock:
        if key not in _modules:
            _modules[key] = EmuModule(path)
        return _modules[key]


# ---------------------------------------------------------------------------------------------
# Launching

_launch_lock = threading.Lock()


class EmuFunction:
    """One kernel of an :class:`EmuModule`, called as ``cupy.RawKernel``:
    ``function(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: EmuModule, name: str, params: tuple[Param, ...], entry, static_shared_bytes: int):
        self.module = module
        self.name = name
        self.params = params
        self.static_shared_bytes = static_shared_bytes
        self._entry = entry
        self._max_dynamic_shared = max(DEFAULT_SHARED_LIMIT - static_shared_bytes, 0)
        self._passed_launches: dict = {}
        # Per parameter: the array dtype of a pointer, or the exact NumPy scalar type of a value.
        self._expected = tuple((p.pointer, p.dtype, p.dtype.type) for p in params)

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        """The most dynamic shared memory a launch may ask for (CUDA's opt-in attribute): by
        default 48 KiB less the kernel's static shared memory; at most 227 KiB less it."""
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        limit = MAX_SHARED_LIMIT - self.static_shared_bytes
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value <= limit:
            raise EmuLaunchError(
                f"{self.name}: max_dynamic_shared_size_bytes must be an int in [0, {limit}] "
                f"({MAX_SHARED_LIMIT} bytes less {self.static_shared_bytes} of static shared memory), got {value!r}"
            )
        self._max_dynamic_shared = int(value)

    def _check_launch(self, grid, block, shared_mem) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        grid, block = dim3(grid, "grid", EmuLaunchError), dim3(block, "block", EmuLaunchError)
        for what, dims, limits in (("grid", grid, MAX_GRID), ("block", block, MAX_BLOCK)):
            for axis, size, limit in zip("xyz", dims, limits):
                if not 1 <= size <= limit:
                    raise EmuLaunchError(f"{self.name}: {what} {dims}: {what}.{axis} must be in [1, {limit}], got {size}")
        if block[0] * block[1] * block[2] > MAX_THREADS_PER_BLOCK:
            raise EmuLaunchError(
                f"{self.name}: block {block} has {block[0] * block[1] * block[2]} threads, more than {MAX_THREADS_PER_BLOCK}"
            )
        if not isinstance(shared_mem, (int, np.integer)) or isinstance(shared_mem, bool) or shared_mem < 0:
            raise EmuLaunchError(f"{self.name}: shared_mem must be a non-negative int, got {shared_mem!r}")
        if shared_mem > self._max_dynamic_shared:
            raise EmuLaunchError(
                f"{self.name}: shared_mem={shared_mem} bytes exceeds the limit of {self._max_dynamic_shared} "
                f"(the kernel has {self.static_shared_bytes} bytes of static shared memory; raise "
                f"max_dynamic_shared_size_bytes, up to {MAX_SHARED_LIMIT - self.static_shared_bytes})"
            )
        return grid, block

    def _checked_launch(self, grid, block, shared_mem):
        """:meth:`_check_launch`, remembered for the launch shapes that passed: a training step
        repeats the same few."""
        try:
            key = (grid, block, shared_mem, type(shared_mem), self._max_dynamic_shared)
            hash(key)
        except TypeError:  # a list: not remembered
            return self._check_launch(grid, block, shared_mem)
        if key not in self._passed_launches:
            self._passed_launches[key] = self._check_launch(grid, block, shared_mem)
        return self._passed_launches[key]

    def _args_fit(self, args) -> bool:
        """Whether every argument is what its parameter takes: the common case, in one pass."""
        if len(args) != len(self._expected):
            return False
        for (pointer, dtype, scalar), arg in zip(self._expected, args):
            if pointer:
                if not (isinstance(arg, np.ndarray) and arg.dtype == dtype and arg.flags.c_contiguous):
                    return False
            elif type(arg) is not scalar:
                return False
        return True

    def _check_args(self, args) -> tuple:
        args = tuple(args)
        if self._args_fit(args):
            return args  # otherwise the loop below names the fault
        if len(args) != len(self.params):
            raise EmuArgumentError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        for param, arg in zip(self.params, args):
            if param.pointer:
                if not isinstance(arg, np.ndarray):
                    raise EmuArgumentError(
                        f"kernel {self.name}: parameter {param.name} is {param.ctype}*, "
                        f"needs an array, got {type(arg).__name__}"
                    )
                if arg.dtype != param.dtype:
                    raise EmuArgumentError(
                        f"kernel {self.name}: parameter {param.name} is {param.ctype}*, "
                        f"got an array of {arg.dtype} {arg.shape}"
                    )
                if not arg.flags.c_contiguous:
                    raise EmuArgumentError(
                        f"kernel {self.name}: array for parameter {param.name} {arg.shape} is not C-contiguous"
                    )
            elif not isinstance(arg, np.generic):
                raise EmuArgumentError(
                    f"kernel {self.name}: parameter {param.name} is {param.ctype}, got {type(arg).__name__} {arg!r}; "
                    f"pass np.{param.dtype.name}(...) (CuPy passes a Python scalar as 8 bytes whatever the parameter)"
                )
            elif arg.dtype != param.dtype:
                raise EmuArgumentError(
                    f"kernel {self.name}: parameter {param.name} is {param.ctype} ({param.dtype}), got {arg.dtype} {arg!r}"
                )
        return args

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        grid, block = self._checked_launch(grid, block, shared_mem)
        args = self._check_args(args)
        if dispatch.dry_run_launches is not None:
            dispatch.dry_run_launches.append((self.name, grid, block, int(shared_mem)))
            return
        order, seed = current_order()
        blocks, block_seed = current_block_order()
        config = (ctypes.c_longlong * 11)(
            *grid, *block, int(shared_mem), ORDERS.index(order), seed, ORDERS.index(blocks), block_seed
        )
        with _launch_lock:
            if racecheck_enabled() and not self.module.racecheck:
                self._launch_in_worker(config, args)
            else:
                self._launch(config, args)

    def _launch_in_worker(self, config, args: tuple) -> None:
        """The launch under the race detector, in its worker process (:mod:`gpuconv.emu_racecheck`)."""
        self.module.racecheck_library()  # compiled here, so that a compile error reads as usual
        regions = regions_of([(i, a) for i, (p, a) in enumerate(zip(self.params, args)) if p.pointer])
        described = [None] * len(args)
        for number, region in enumerate(regions):
            for index, array in region.args:
                offset = array.ctypes.data - region.start
                described[index] = ("array", number, offset, array.dtype.str, array.shape, array.flags.writeable)
        job = {
            "module": self.module.origin,
            "kernel": self.name,
            "grid": tuple(config[0:3]),
            "block": tuple(config[3:6]),
            "shared_mem": config[6],
            "max_dynamic_shared": self._max_dynamic_shared,
            "thread_order": (ORDERS[config[7]], config[8]),
            "block_order": (ORDERS[config[9]], config[10]),
            "regions": [bytes_at(r.start, r.nbytes).tobytes() for r in regions],
            "args": [d if d is not None else ("scalar", a) for d, a in zip(described, args)],
        }
        reply, last_words = emu_racecheck.run_in_worker(job)
        if reply is None:
            # The kernel faulted under TSan: run it here, where the guard pages name the access.
            self._launch(config, args)
            raise EmuError(f"kernel {self.name}: the race detector's process died, but not without it:\n{last_words}")
        if "error" in reply:
            raise reply["error"]
        for region, data in zip(regions, reply["regions"]):
            result = np.frombuffer(data, np.uint8)
            for _, array in region.args:
                if array.flags.writeable:
                    offset = array.ctypes.data - region.start
                    bytes_at(array.ctypes.data, array.nbytes)[:] = result[offset : offset + array.nbytes]

    def _launch(self, config, args: tuple) -> None:
        slots = np.zeros(max(len(args), 1), dtype=np.uint64)  # one 8-byte slot per argument
        regions = regions_of([(i, a) for i, (p, a) in enumerate(zip(self.params, args)) if p.pointer])
        buffers: list[GuardedBuffer] = []
        try:
            for region in regions:
                buffer = GuardedBuffer(region.nbytes)
                buffers.append(buffer)
                for index, array in region.args:
                    offset = array.ctypes.data - region.start
                    buffer.view(offset, array.nbytes)[:] = bytes_at(array.ctypes.data, array.nbytes)
                    slots[index] = buffer.data + offset
            for index, (param, arg) in enumerate(zip(self.params, args)):
                if not param.pointer:
                    slots[index : index + 1].view(np.uint8)[: arg.itemsize] = np.frombuffer(arg.tobytes(), np.uint8)
            slot_pointers = (ctypes.c_void_p * len(slots))(*(slots.ctypes.data + 8 * i for i in range(len(slots))))
            report = _Report()
            code = self._entry(config, slot_pointers, ctypes.byref(report))
            if self.module.racecheck:
                self._check_races(report, regions, buffers)
            if code != _OK:
                raise self._error(report, regions, buffers)
            # Every check before any copy back: a failed launch leaves the arrays as they were.
            for region, buffer in zip(regions, buffers):
                self._check_slack(region, buffer)
                for index, array in region.args:
                    result = buffer.view(array.ctypes.data - region.start, array.nbytes)
                    unchanged = np.array_equal(result, bytes_at(array.ctypes.data, array.nbytes))
                    if not array.flags.writeable and not unchanged:
                        name = self.params[index].name
                        raise EmuMemoryError(f"kernel {self.name} wrote to parameter {name}, a read-only array")
            for region, buffer in zip(regions, buffers):
                for _, array in region.args:
                    if array.flags.writeable:
                        result = buffer.view(array.ctypes.data - region.start, array.nbytes)
                        bytes_at(array.ctypes.data, array.nbytes)[:] = result
        finally:
            for buffer in buffers:
                buffer.free()

    def _check_races(self, report: _Report, regions: list[Region], buffers: list[GuardedBuffer]) -> None:
        races, other = emu_racecheck.worker_log.new_races((HEADER.name, "racecheck.h"))
        if other:
            raise EmuRaceError(f"kernel {self.name}: ThreadSanitizer reported:\n{other}")
        if not races:
            return

        def describe_memory(address: int, variable: str | None) -> str:
            for region, buffer in zip(regions, buffers):
                offset = address - buffer.data
                if 0 <= offset < region.nbytes:
                    element = offset // region.args[0][1].itemsize
                    return f"global memory, {self._describe(region)} at element {element} (byte {offset})"
            if report.dynamic_shared[0] <= address < report.dynamic_shared[1]:
                return f"dynamic shared memory, byte {address - report.dynamic_shared[0]}"
            if report.static_shared[0] <= address < report.static_shared[1]:
                return f"shared memory{f' ({variable})' if variable else ''}"
            return f"memory at {address:#x}"

        raise emu_racecheck.race_error(self.name, races, describe_memory)

    def _describe(self, region: Region) -> str:
        names = " and ".join(
            f"{self.params[i].name} ({self.params[i].ctype}*, {a.size} elements)" for i, a in region.args
        )
        return f"parameter {names}"

    def _check_slack(self, region: Region, buffer: GuardedBuffer) -> None:
        written = buffer.slack_written()
        if written is not None:
            first, last = written
            raise EmuMemoryError(
                f"kernel {self.name}: out-of-bounds write to {self._describe(region)}: bytes {first}..{last} "
                f"relative to its start, outside its {region.nbytes} bytes"
            )

    def _error(self, report: _Report, regions: list[Region], buffers: list[GuardedBuffer]) -> EmuError:
        where = f"block {tuple(report.block)} thread {tuple(report.thread)}"
        if report.code == _SIGNAL and report.signal == signal.SIGFPE:
            what = {1: "integer division by zero", 2: "integer overflow"}.get(report.signal_code, "arithmetic exception")
            return EmuError(f"kernel {self.name}: {what} (SIGFPE; a GPU returns an undefined value instead) by {where}")
        if report.code == _SIGNAL:
            return EmuMemoryError(f"kernel {self.name}: {self._locate(report.fault_address, regions, buffers)}, by {where}")
        kinds = {
            _DIVERGENCE: EmuSyncError,
            _DEADLOCK: EmuSyncError,
            _WARP_MISUSE: EmuSyncError,
            _SHARED_OVERRUN: EmuMemoryError,
            _STACK_OVERFLOW: EmuMemoryError,
            _NO_MEMORY: EmuError,
        }
        if report.code == _SHARED_OVERRUN:  # found after the block ran: the thread is unknown
            where = f"block {tuple(report.block)}"
        message = report.message.decode(errors="replace")
        return kinds.get(report.code, EmuError)(f"kernel {self.name}: {message} ({where})")

    def _locate(self, address: int, regions: list[Region], buffers: list[GuardedBuffer]) -> str:
        """Which array a faulting address belongs to, or which it lies nearest."""
        for region, buffer in zip(regions, buffers):
            side = buffer.guard_side(address)
            if side is not None:
                offset = address - buffer.data
                element = offset // region.args[0][1].itemsize
                if side == "after":
                    return (
                        f"out-of-bounds access after the end of {self._describe(region)}: byte offset {offset} "
                        f"(element {element}) of {region.nbytes} bytes"
                    )
                return (
                    f"out-of-bounds access before the start of {self._describe(region)}: "
                    f"byte offset {offset} (element {element})"
                )
        text = f"invalid memory access at address {address:#x}"
        if not regions:
            return text
        offset, region = min(((address - b.data, r) for r, b in zip(regions, buffers)), key=lambda pair: abs(pair[0]))
        return (
            f"{text}, {offset} bytes from the start of {self._describe(region)} "
            "(an index that wrapped around, a wild or null pointer, or a misaligned vector access)"
        )

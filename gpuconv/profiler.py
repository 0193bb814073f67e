"""What the library issues to a device, and how long each operation takes on 'cuda'.

``with gpuconv.profile() as prof:`` records every device operation issued inside it: each
launch of one of the library's kernels (through :func:`gpuconv.kernels.launch`) and each library
call that runs on the device, such as the cuBLAS matrix products of ``Linear`` (``cupy.matmul``)
or a memset, as :class:`Launch` entries in ``prof.launches``. On 'cuda' each is bracketed by two
CUDA events on the current stream and its time is read when the ``with`` block ends (one
synchronisation, at the end); on 'emu' the time is None (the emulator's speed says nothing about
a GPU's). ``print(prof)`` shows a table sorted by time; ``prof.counts()`` the operations per name.

Operations on 'cpu' (NumPy) are not device operations and are not recorded.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

__all__ = ["Launch", "Profile", "profile", "recording", "record"]


@dataclass
class Launch:
    """One device operation: a kernel launch (``library=False``) or a library call."""

    kernel: str
    device: str
    grid: tuple[int, int, int] | None = None
    block: tuple[int, int, int] | None = None
    shared_mem: int = 0
    library: bool = False
    time_ms: float | None = None
    _events: tuple | None = field(default=None, repr=False, compare=False)


_active: list["Profile"] = []


class Profile:
    """The operations recorded by one ``with gpuconv.profile()`` block, in issue order."""

    def __init__(self):
        self.launches: list[Launch] = []

    def __enter__(self) -> "Profile":
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        for launch in self.launches:
            if launch._events is not None:
                start, end = launch._events
                end.synchronize()
                launch.time_ms = _cupy().cuda.get_elapsed_time(start, end)
                launch._events = None

    def counts(self) -> collections.Counter:
        """How many times each kernel or library call was issued."""
        return collections.Counter(launch.kernel for launch in self.launches)

    def total_ms(self) -> float | None:
        """Summed time of the timed operations (None where nothing was timed: off 'cuda')."""
        times = [launch.time_ms for launch in self.launches if launch.time_ms is not None]
        return sum(times) if times else None

    def table(self) -> str:
        """One row per operation, the slowest first (untimed ones in issue order after them)."""
        rows = sorted(self.launches, key=lambda launch: -launch.time_ms if launch.time_ms is not None else 0.0)
        header = f"{'operation':<40} {'kind':<8} {'device':<6} {'grid':<18} {'block':<14} {'shared':>7} {'ms':>9}"
        lines = [header, "-" * len(header)]
        for launch in rows:
            grid = "x".join(map(str, launch.grid)) if launch.grid else "-"
            block = "x".join(map(str, launch.block)) if launch.block else "-"
            ms = f"{launch.time_ms:.4f}" if launch.time_ms is not None else "-"
            kind = "library" if launch.library else "kernel"
            lines.append(f"{launch.kernel:<40} {kind:<8} {launch.device:<6} {grid:<18} {block:<14} "
                         f"{launch.shared_mem:>7} {ms:>9}")
        total = self.total_ms()
        lines.append(f"{len(self.launches)} device operations" + (f", {total:.4f} ms" if total is not None else ""))
        return "\n".join(lines)

    __str__ = table


def profile() -> Profile:
    """A profiler to use as ``with gpuconv.profile() as prof:``; see the module docstring."""
    return Profile()


def recording() -> bool:
    """Whether a profile is active (the cheap test every launch makes)."""
    return bool(_active)


def _cupy():
    import cupy

    return cupy


@contextlib.contextmanager
def record(kernel: str, device: str, grid=None, block=None, shared_mem: int = 0, library: bool = False):
    """Record the device operation issued inside the ``with`` block in every active profile."""
    launch = Launch(kernel, device, grid, block, shared_mem, library)
    events = None
    if device == "cuda":
        cupy = _cupy()
        events = (cupy.cuda.Event(), cupy.cuda.Event())
        events[0].record()
    try:
        yield launch
    finally:
        if events is not None:
            events[1].record()
            launch._events = events
        for active in _active:
            active.launches.append(launch)


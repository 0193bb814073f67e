"""The errors of the emulated device (re-exported by :mod:`gpuconv.emu`)."""
from __future__ import annotations


class EmuError(RuntimeError):
    """A kernel failed on the emulated device."""


class EmuCompileError(EmuError):
    """The kernel source does not compile; the message names the file and line."""


class EmuLaunchError(EmuError, ValueError):
    """A launch configuration beyond CUDA's limits."""


class EmuArgumentError(EmuError, TypeError):
    """A kernel argument that does not match its parameter exactly."""


class EmuMemoryError(EmuError):
    """An out-of-bounds access to global or shared memory, or a fault in a kernel."""


class EmuSyncError(EmuError):
    """Barrier divergence, deadlock, or a warp intrinsic whose lanes disagree."""


class EmuRaceError(EmuError):
    """Two accesses to the same memory, at least one a write, that nothing orders (the race
    detector, :func:`gpuconv.emu.racecheck`); the message names both source lines, blocks and
    threads."""

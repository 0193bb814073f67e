"""The one door every device operation of the library goes through.

A launch of one of our kernels (:func:`gpuconv.kernels.launch`) and a library call on a device
array (``cupy.matmul``, a memset, a reduction: :func:`device_call`) both end in :func:`issue`,
which is where a graph capture records them (:mod:`gpuconv.graphs`), where the profiler records
them, and where ``gpuconv.emu.dry_run()`` leaves library calls on 'emu' undone (kernel launches
are checked and skipped by the emulator itself). NumPy work on 'cpu' is not a device operation
and runs directly.
"""
from __future__ import annotations

from . import profiler

# The launches of an active gpuconv.emu.dry_run() (kernel, grid, block, shared_mem); None outside one.
dry_run_launches: list | None = None
# Inside a graph capture, the capturing graph's recorder (gpuconv.graphs): record(name, device, run).
capture = None


def issue(name: str, device: str, run, grid=None, block=None, shared_mem: int = 0, library: bool = False) -> None:
    """Run ``run()``, the device operation ``name`` on ``device``, recorded by any active profile;
    inside a graph capture, hand it to the graph instead."""
    if capture is not None:
        capture(name, device, run)
        return
    if library and device == "emu" and dry_run_launches is not None:
        dry_run_launches.append((name, None, None, 0))
        if profiler.recording():
            with profiler.record(name, device, library=True):
                pass
        return
    if profiler.recording():
        with profiler.record(name, device, grid, block, shared_mem, library):
            run()
    else:
        run()


def device_call(name: str, device: str, run) -> None:
    """Run ``run()``, a library call that writes its result into arrays allocated beforehand.

    On 'cpu' it simply runs. Writing into preallocated outputs (``out=``) rather than returning
    fresh arrays is what lets a dry run skip the work and keep every shape right.
    """
    if device == "cpu":
        run()
    else:
        issue(name, device, run, library=True)

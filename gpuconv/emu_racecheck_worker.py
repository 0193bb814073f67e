"""The race detector's worker process: ``python -m gpuconv.emu_racecheck_worker FD`` with
libtsan preloaded (started by :mod:`gpuconv.emu_racecheck`, never by hand).

Reads launch jobs from stdin, runs each on the kernel's race-detector build with the arrays
rebuilt here (overlapping arrays overlap again), and writes the reply to file descriptor FD:
the bytes of every argument region after the launch, or the error it raised. A reply that
carries a TSan report asks to retire the worker (TSan reports a pair of lines once per process).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from . import emu, emu_racecheck


def _arguments(job) -> tuple[list[bytearray], list]:
    regions = [bytearray(data) for data in job["regions"]]
    args = []
    for arg in job["args"]:
        if arg[0] == "scalar":
            args.append(arg[1])
            continue
        _, region, offset, dtype, shape, writeable = arg
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(regions[region], dtype=dtype, count=count, offset=offset).reshape(shape)
        array.flags.writeable = writeable
        args.append(array)
    return regions, args


def _run(job, modules: dict) -> dict:
    origin = job["module"]
    key = (origin["path"], origin["source"], origin["name"], origin["options"])
    if key not in modules:
        modules[key] = emu.EmuModule(**origin, racecheck=True)
    function = modules[key].get_function(job["kernel"])
    function.max_dynamic_shared_size_bytes = job["max_dynamic_shared"]
    regions, args = _arguments(job)
    try:
        with emu.thread_order(*job["thread_order"]), emu.block_order(*job["block_order"]):
            function(job["grid"], job["block"], args, shared_mem=job["shared_mem"])
    except emu.EmuError as exc:
        return {"error": exc, "retire": isinstance(exc, emu.EmuRaceError)}
    return {"regions": [bytes(r) for r in regions]}


def main() -> None:
    replies = os.fdopen(int(sys.argv[1]), "wb")
    # Kernels' printf output goes to stderr; programs this process starts (the compiler,
    # objdump) must not load TSan.
    os.dup2(2, 1)
    os.environ.pop("LD_PRELOAD", None)
    prefix = next(o for o in os.environ["TSAN_OPTIONS"].split() if o.startswith("log_path="))
    emu_racecheck.worker_log = emu_racecheck.ReportLog(prefix.removeprefix("log_path="))
    modules: dict = {}
    jobs = sys.stdin.buffer
    while True:
        try:
            job = emu_racecheck.receive(jobs)
        except EOFError:
            return
        emu_racecheck.send(replies, _run(job, modules))


if __name__ == "__main__":
    main()

"""The emulated device's race detector: a launch run under ThreadSanitizer, in a worker process.

``emu.racecheck()`` (or ``$GPUCONV_EMU_RACECHECK=1``) makes every launch on the emulated device
run the kernel's race-detector build (``gpuconv/emu_runtime/racecheck.h``: each CUDA thread a
TSan fiber; only barriers, warp intrinsics, atomics and the launch itself order anything;
nothing orders two blocks). TSan must be the first library a process loads, which Python is
not built for, so the launch runs in a worker process started with libtsan preloaded
(:mod:`gpuconv.emu_racecheck_worker`): the arguments travel there, the results come back, the
Python API stays the same. Each report TSan writes is turned into an
:class:`~gpuconv.emu.EmuRaceError` naming the kernel, both source lines, the memory, and the
blocks and threads involved.

TSan reports a pair of source lines once per process: a worker that found a race is replaced
by a fresh one, so the next launch of the same kernel is checked in full again. A kernel that
faults under TSan ends the worker; the launch then runs again without the race detector, whose
guard pages name the array and the thread.
"""
from __future__ import annotations

import functools
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .emu_errors import EmuError, EmuRaceError

# Options of TSan in the worker. Reports go to a file of the worker's own, read after every
# launch; a report does not stop the process. (ignore_noninstrumented_modules would hide the
# memset/memcpy that the emulator's uninstrumented helpers make on a kernel's behalf, such as
# cp.async's copies in ptx.cuh; Python itself runs only between launches, ordered with them.)
TSAN_OPTIONS = (
    "halt_on_error=0", "exitcode=0", "report_thread_leaks=0", "detect_deadlocks=0", "report_signal_unsafe=0",
    "history_size=4",
)


@functools.cache
def tsan_runtime() -> str:
    """The ThreadSanitizer runtime of the host compiler, to preload into the worker."""
    cxx = os.environ.get("CXX", "g++")
    try:
        found = subprocess.run([cxx, "-print-file-name=libtsan.so"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EmuError(f"the race detector needs {cxx!r} with ThreadSanitizer: {exc}") from None
    library = Path(found.stdout.strip()).resolve()
    if not library.is_file():
        raise EmuError(f"the race detector needs ThreadSanitizer's runtime; {cxx} has no libtsan.so (install libtsan)")
    return str(library)


def available() -> bool:
    """Whether this machine can run the race detector (a host compiler with libtsan)."""
    try:
        tsan_runtime()
    except EmuError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Talking to the worker: length-prefixed pickles over its stdin and a dedicated pipe.


def send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class _Worker:
    def __init__(self):
        self.log_dir = tempfile.TemporaryDirectory(prefix="gpuconv-racecheck-")
        env = dict(os.environ)
        env["LD_PRELOAD"] = tsan_runtime()
        env["TSAN_OPTIONS"] = " ".join((*TSAN_OPTIONS, f"log_path={self.log_dir.name}/tsan"))
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"
        # The worker imports this very gpuconv, wherever it was imported from.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        read_end, write_end = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpuconv.emu_racecheck_worker", str(write_end)],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env, pass_fds=(write_end,),
        )
        os.close(write_end)
        self.replies = os.fdopen(read_end, "rb")

    def run(self, job):
        """The worker's reply to ``job``; EOFError when the worker died."""
        try:
            send(self.process.stdin, job)
            return receive(self.replies)
        except (BrokenPipeError, EOFError):
            raise EOFError from None

    def stderr_tail(self) -> str:
        self.process.wait(timeout=30)
        return self.process.stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.replies.close()
        self.process.stderr.close()
        self.log_dir.cleanup()


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def run_in_worker(job):
    """Runs ``job`` in the worker (started on first use); returns its reply, or None when the
    worker died running it (a fault under TSan), with TSan's last words in the second item."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = _Worker()
        try:
            reply = _worker.run(job)
        except EOFError:
            dead, _worker = _worker, None
            tail = dead.stderr_tail()
            dead.close()
            return None, tail
        if reply.get("retire"):
            _worker.close()
            _worker = None
        return reply, ""


# ---------------------------------------------------------------------------------------------
# Reading TSan's reports (in the worker).

_REPORT_RE = re.compile(r"^WARNING: ThreadSanitizer: (?P<kind>[^\n(]+?)(?: \(pid=\d+\))?\n(?P<body>.*?)^SUMMARY:", re.M | re.S)
_ACCESS_RE = re.compile(
    r"^  (?P<previous>Previous )?(?P<what>(?:[Aa]tomic )?(?:[Rr]ead|[Ww]rite)) of size (?P<size>\d+) at "
    r"(?P<address>0x[0-9a-f]+) by (?P<who>thread T\d+|main thread)[^:\n]*:\n(?P<stack>(?:    #\d+ .*\n)*)",
    re.M,
)
_FRAME_RE = re.compile(r"^    #\d+ (?P<function>.*?) (?P<file>[^ \n]+):(?P<line>\d+)(?::\d+)? \(", re.M)
_THREAD_RE = re.compile(r"^  Thread (?P<tid>T\d+) '(?P<name>[^']*)'", re.M)
_LOCATION_RE = re.compile(r"^  Location is global '(?P<name>[^']+)'", re.M)


@dataclass
class Access:
    what: str  # 'write', 'read', 'atomic write'...
    size: int
    address: int
    thread: str  # 'block (0,0,0) thread (3,0,0)', or TSan's own name for it
    where: str  # 'kernels_cu/file.cu:42', the innermost frame in the kernel source


@dataclass
class Race:
    first: Access
    second: Access
    variable: str | None  # TSan's name for a global (a static __shared__ variable)


class ReportLog:
    """TSan's log file of this process (``log_path`` in ``$TSAN_OPTIONS``), read incrementally."""

    def __init__(self, prefix: str):
        self.path = Path(f"{prefix}.{os.getpid()}")
        self.offset = 0

    def new_races(self, runtime_files: tuple[str, ...]) -> tuple[list[Race], str]:
        """The data races reported since the last call, and the text of any other report."""
        if not self.path.is_file():
            return [], ""
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        self.offset += len(text.encode())
        races, other = [], []
        for report in _REPORT_RE.finditer(text):
            if report["kind"] != "data race":
                other.append(report.group(0))
                continue
            race = _parse_race(report["body"], runtime_files)
            if race is None:  # a report this parser does not follow: shown as TSan wrote it
                other.append(report.group(0))
            else:
                races.append(race)
        return races, "\n".join(other)


def _parse_race(body: str, runtime_files: tuple[str, ...]) -> Race | None:
    names = {m["tid"]: m["name"] for m in _THREAD_RE.finditer(body)}
    accesses = []
    for match in _ACCESS_RE.finditer(body):
        where = "?"
        for frame in _FRAME_RE.finditer(match["stack"]):
            # The innermost frame in kernel source: not the emulator's, not TSan's interceptors.
            if not frame["file"].endswith(runtime_files) and "libsanitizer" not in frame["file"]:
                where = f"{os.path.relpath(frame['file']) if frame['file'].startswith('/') else frame['file']}:{frame['line']}"
                break
        who = match["who"]
        thread = names.get(who.removeprefix("thread "), who) if who != "main thread" else "the launching thread"
        accesses.append(Access(match["what"].lower(), int(match["size"]), int(match["address"], 16), thread, where))
    if len(accesses) < 2:
        return None
    location = _LOCATION_RE.search(body)
    return Race(accesses[0], accesses[1], location["name"] if location else None)


def race_error(kernel: str, races: list[Race], describe_memory) -> EmuRaceError:
    """The error for the races of one launch: the first in full, the count of the others.
    ``describe_memory(address, variable)`` names the memory an address belongs to."""
    race = races[0]
    a, b = race.first, race.second
    memory = describe_memory(a.address, race.variable)
    others = f"; {len(races) - 1} more race(s) in this launch" if len(races) > 1 else ""
    return EmuRaceError(
        f"kernel {kernel}: data race on {memory}: {a.what} of {a.size} bytes by {a.thread} at {a.where} "
        f"and an earlier {b.what} of {b.size} bytes by {b.thread} at {b.where}, which no __syncthreads(), "
        f"warp intrinsic or atomic orders{others}"
    )


# Set in the worker process: the log its launches' reports are read from.
worker_log: ReportLog | None = None

"""Running the rows: grouped into jobs, each job in a fresh worker process (or, with
``--in-process``, in this one), its results streamed back as JSON lines.

Why processes: on a GPU one illegal address (or any launch failure) makes every later CUDA call
of the process fail -- a sticky error -- so a faulty kernel would turn all the rows after it into
errors. Each job on 'cuda' (one case group) runs in its own worker; a worker whose device became
unusable stops at once, and one that crashes, hangs past ``--row-timeout`` or is poisoned is
replaced by a fresh worker for the rows it had not done, the row it was on reported as the error.
The CPU rows run in one worker (so NumPy and PyTorch alternate in one process, as a user's
would), started with ``OPENBLAS_THREAD_TIMEOUT`` set before NumPy loads: OpenBLAS's idle threads
otherwise spin about 0.1 s after every call and take a core from PyTorch's threads.

The protocol: the parent writes a job file (the bench's arguments, the (case, contender) names,
whether to measure the device's peaks first, the deadline, the machine info) and runs
``python -m gpuconv.bench.worker JOB EVENTS``; the worker appends one JSON object a line to EVENTS
-- ``{"start": [case, contender]}``, ``{"row": record}``, ``{"peaks": {device: peaks}}``,
``{"peaks_error": message}``, ``{"device_error": message}`` -- flushed as each happens, so
whatever it did before dying is kept.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import machine
from .reports import fmt_time, peak_line
from .rows import Row, from_record, run_row, to_record

# OpenBLAS clamps OPENBLAS_THREAD_TIMEOUT to 4..30 and spins 2**value timer ticks before an idle
# thread sleeps (the default, 28, is about 0.1 s); 4 puts them to sleep as soon as a call ends.
OPENBLAS_THREAD_TIMEOUT = "4"
DEVICE_ERROR_EXIT = 3  # a worker's exit status when its device became unusable
MAX_WORKERS_PER_JOB = 4  # fresh workers a job may use before its remaining rows are given up
POLL_SECONDS = 0.2


@dataclass
class Job:
    """Rows that share a worker: ``pairs`` of (case, contender), in run order."""

    label: str
    device: str
    pairs: list = field(default_factory=list)


def plan(pairs) -> list[Job]:
    """Group (case, contender) pairs into jobs: on 'cuda' one per case group, elsewhere one per
    device. GPU jobs first (on a GPU machine they are the table the run is for); within a job,
    and among jobs of a device, the pairs keep their run order."""
    jobs: dict[tuple, Job] = {}
    for case, contender in pairs:
        group = case.group if contender.device == "cuda" else ""
        key = (contender.device, group)
        if key not in jobs:
            jobs[key] = Job(f"{contender.device} {group}".strip(), contender.device)
        jobs[key].pairs.append((case, contender))
    return sorted(jobs.values(), key=lambda job: job.device == "cpu")


def worker_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
    env["PYTHONUNBUFFERED"] = "1"
    # The worker imports the gpuconv this process runs: from a checkout, whatever the worker's
    # path would find otherwise. An installed one is found anyway, and putting site-packages
    # ahead of the standard library could shadow it.
    package_root = Path(__file__).resolve().parents[2]
    if package_root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join([str(package_root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def progress_line(row: Row) -> str:
    timing = fmt_time(row.stats.median) if row.stats else row.status
    note = f"  ({row.note})" if row.note else ""
    return f"  {row.case.name:<46} {row.contender:<32} {timing}{note}"


def execute(pairs, args, info: dict, deadline, peaks_device, emit) -> int:
    """Run ``pairs`` here, reporting each step to ``emit(event)``; the worker's body, and the
    whole run with ``--in-process``. Returns 0, or DEVICE_ERROR_EXIT when a row left the device
    unusable (the rows after it would only repeat that error)."""
    if peaks_device:
        try:
            emit({"peaks": {peaks_device: machine.measure_peaks(peaks_device, args.quick)}})
        except Exception as exc:  # noqa: BLE001 - rows without a peak are still rows
            emit({"peaks_error": f"{type(exc).__name__}: {exc}"})
        machine.free_device_memory(peaks_device)  # the peaks' GiBs, before rows size their buffers
        why = machine.device_error(peaks_device)
        if why:
            emit({"device_error": why})
            return DEVICE_ERROR_EXIT
    for case, contender in pairs:
        if deadline is not None and time.time() > deadline:
            row = Row(case, contender.name, contender.device, contender.family, status="skipped: time budget")
        else:
            emit({"start": [case.name, contender.name]})
            row = run_row(case, contender, args, info)
        print(progress_line(row), flush=True)
        emit({"row": to_record(row)})
        if row.status.startswith("error"):
            why = contender.device_error()
            if why:
                emit({"device_error": why})
                return DEVICE_ERROR_EXIT
    return 0


class Collector:
    """The parent's view of a run: rows in arrival order, peaks, and the problems met, handed
    to ``on_change`` after each event that changes the report."""

    def __init__(self, cases_by_name: dict, on_change):
        self.cases_by_name, self.on_change = cases_by_name, on_change
        self.rows: list[Row] = []
        self.peaks: dict = {}
        self.problems: list[str] = []
        self.running = None  # (case name, contender name) of the row a worker is on
        self.running_since = 0.0
        self.device_error = ""
        self.peaks_asked: set[str] = set()  # devices whose peaks a job was asked to measure

    def peaks_for(self, device: str):
        """``device`` for the first job of a device (it measures the peaks), else None."""
        if device in self.peaks_asked:
            return None
        self.peaks_asked.add(device)
        return device

    def handle(self, event: dict, job_label: str = "") -> None:
        if "start" in event:
            self.running, self.running_since = tuple(event["start"]), time.monotonic()
            return
        if "row" in event:
            self.rows.append(from_record(event["row"], self.cases_by_name))
            self.running = None
        elif "peaks" in event:
            self.peaks.update(event["peaks"])
            print("\n".join(f"- {peak_line(device, peak)}" for device, peak in event["peaks"].items()), flush=True)
        elif "peaks_error" in event:
            self.problems.append(f"{job_label}: measuring the peaks failed ({event['peaks_error']}); "
                                 "its rows have no % peak")
        elif "device_error" in event:
            self.device_error = event["device_error"]
        self.on_change()

    def add_row(self, case, contender, status: str) -> None:
        """A row the parent reports for a worker that did not (skipped, or lost with its worker)."""
        self.rows.append(Row(case, contender.name, contender.device, contender.family, status=status))
        print(progress_line(self.rows[-1]), flush=True)
        self.on_change()


def run_in_process(jobs, args, info, deadline, collector: Collector) -> None:
    for job in jobs:
        collector.device_error = ""
        execute(job.pairs, args, info, deadline, collector.peaks_for(job.device),
                lambda event, label=job.label: collector.handle(event, label))
        if collector.device_error:
            done = {(r.case.name, r.contender) for r in collector.rows}
            left = [(c, k) for c, k in job.pairs if (c.name, k.name) not in done]
            collector.problems.append(f"{job.label}: the device became unusable ({collector.device_error}); "
                                      f"{len(left)} rows not run (--in-process cannot start a fresh process)")
            for case, contender in left:
                collector.add_row(case, contender, "error: not run: device unusable")


def _how_it_ended(returncode: int, killed_for: str) -> str:
    if killed_for:
        return killed_for
    if returncode < 0:
        try:
            return f"the worker was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"the worker was killed by signal {-returncode}"
    if returncode == DEVICE_ERROR_EXIT:
        return "the device became unusable"
    return f"the worker exited with status {returncode}"


def run_in_workers(jobs, argv, args, info, deadline, collector: Collector, worker_command=None) -> None:
    """Each job in fresh worker processes (``worker_command``, by default this Python running
    ``gpuconv.bench.worker``), replaced as often as needed (up to MAX_WORKERS_PER_JOB) when one
    dies, hangs or loses its device; problems go to ``collector.problems``."""
    command = list(worker_command or [sys.executable, "-m", "gpuconv.bench.worker"])
    env = worker_env()
    with tempfile.TemporaryDirectory(prefix="gpuconv-bench-") as scratch:
        for number, job in enumerate(jobs):
            by_name = {(c.name, k.name): (c, k) for c, k in job.pairs}
            remaining, workers = list(by_name), 0
            while remaining:
                if deadline is not None and time.time() > deadline:
                    for key in remaining:
                        collector.add_row(*by_name[key], "skipped: time budget")
                    break
                if workers == MAX_WORKERS_PER_JOB:
                    collector.problems.append(f"{job.label}: gave up after {workers} workers; "
                                              f"{len(remaining)} rows not run")
                    for key in remaining:
                        collector.add_row(*by_name[key], "error: not run: its workers kept failing")
                    break
                workers += 1
                base = Path(scratch) / f"job{number}-worker{workers}"
                spec = {"argv": list(argv), "pairs": [list(key) for key in remaining], "info": info,
                        "deadline": deadline, "peaks": collector.peaks_for(job.device)}
                base.with_suffix(".job.json").write_text(json.dumps(spec))
                returncode, killed_for = _supervise(command, base, env, args.row_timeout, deadline, collector,
                                                    job.label)
                done = {(r.case.name, r.contender) for r in collector.rows}
                failed = collector.running
                remaining = [key for key in remaining if key not in done and key != failed]
                if returncode == 0 and not killed_for:
                    if remaining:  # a worker that ends well has done every row it was given
                        collector.problems.append(f"{job.label}: its worker ended well without reporting "
                                                  f"{len(remaining)} rows")
                        for key in remaining:
                            collector.add_row(*by_name[key], "error: not reported by its worker")
                    break
                how = _how_it_ended(returncode, killed_for)
                if collector.device_error:
                    how += f" ({collector.device_error})"
                if failed in by_name:
                    collector.add_row(*by_name[failed], f"error: {how}")
                    where = f" during {failed[0]} [{failed[1]}]"
                elif collector.rows and collector.rows[-1].status.startswith("error"):
                    where = f" after {collector.rows[-1].case.name} [{collector.rows[-1].contender}] failed"
                else:
                    where = " before its first row"
                then = f"; a fresh worker runs the {len(remaining)} rows left" if remaining else ""
                collector.problems.append(f"{job.label}: {how}{where}{then}")


def _supervise(command, base: Path, env, row_timeout: float, deadline, collector: Collector, label: str):
    """Run one worker to its end, feeding its events to ``collector`` as they come; kill it when
    one row runs past ``row_timeout`` or the run past its deadline (plus a row's grace).
    Returns (exit status, why it was killed or '')."""
    events_path = base.with_suffix(".events.jsonl")
    events_path.touch()
    collector.running, collector.device_error = None, ""
    killed_for = ""
    with open(base.with_suffix(".stderr"), "wb") as stderr, open(events_path, "rb") as events:
        proc = subprocess.Popen([*command, str(base.with_suffix(".job.json")), str(events_path)], env=env,
                                stderr=stderr, stdin=subprocess.DEVNULL)
        try:
            pending = b""
            while True:
                returncode = proc.poll()
                pending = _feed(events, pending, collector, label)
                if returncode is not None:
                    break
                if collector.running and time.monotonic() - collector.running_since > row_timeout:
                    killed_for = f"the row ran past --row-timeout {row_timeout:g} s and its worker was killed"
                elif deadline is not None and time.time() > deadline + row_timeout:
                    killed_for = "the run passed its time budget and the worker was killed"
                if killed_for:
                    proc.kill()
                    returncode = proc.wait()
                    _feed(events, pending, collector, label)
                    break
                time.sleep(POLL_SECONDS)
        finally:  # interrupted here: no worker is left running on its own
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    _replay(base.with_suffix(".stderr"))
    return returncode, killed_for


def _feed(events, pending: bytes, collector: Collector, label: str) -> bytes:
    """Hand the complete lines written since the last call to ``collector``; keep a partial one."""
    pending += events.read()
    *lines, pending = pending.split(b"\n")
    for line in lines:
        if line.strip():
            collector.handle(json.loads(line), label)
    return pending


def _replay(path: Path) -> None:
    """A worker's stderr (tracebacks of failed rows) onto ours, once the worker has ended."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()

"""A row: one contender timed on one case. :func:`run_row` measures it (never raising: a failing
contender becomes a row that says why), :func:`annotate` fills the derived columns, and
:func:`to_record` / :func:`from_record` carry a row between processes as plain JSON."""
from __future__ import annotations

import dataclasses
import sys
import traceback
from dataclasses import dataclass, field

import numpy as np

from . import machine
from .cases import Case, TrainStep
from .contenders import HOST_OP, HOST_REFERENCE, NUMPY, TORCH_REFERENCE, Contender
from .timing import Stats, buffer_sets, nbytes, summarize, time_calls


@dataclass
class Row:
    case: Case  # at the batch the row ran (CPU rows may run a smaller one)
    contender: str
    device: str
    family: str
    status: str = "ok"  # 'ok', 'skipped: ...', 'error: ...'
    stats: Stats | None = None
    buffers: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)  # a workload's own facts (JSON), e.g. the kernel chosen
    achieved: float = float("nan")  # FLOP/s or bytes/s, by case.bound
    pct_peak: float = float("nan")
    vs_torch: float = float("nan")
    speedup: float = float("nan")

    @property
    def batch(self) -> int:
        return self.case.spec.batch

    @property
    def per_image(self) -> float:
        return self.stats.median / self.case.images if self.stats else float("nan")


def run_row(case: Case, contender: Contender, args, info: dict) -> Row:
    """Time one contender on one case. CPU rows run at the smaller CPU batch, and the CPU epoch on
    ``--cpu-epoch-limit`` images, extrapolated; the row's note says so."""
    spec, notes = case.spec, []
    if contender.device == "cpu" and spec.batch > args.cpu_batch[case.group]:
        spec = dataclasses.replace(spec, batch=args.cpu_batch[case.group])
        notes.append(f"batch {spec.batch}, not {case.spec.batch}")
    epoch_images = spec.images if isinstance(spec, TrainStep) else 0
    timed_images = min(epoch_images, args.cpu_epoch_limit) if contender.device == "cpu" else epoch_images
    row = Row(dataclasses.replace(case, spec=spec), contender.name, contender.device, contender.family)
    usable, why = contender.available()
    if not usable:
        row.status = f"error: unavailable: {why}"
        return row
    repeats, warmup = args.repeats, args.warmup
    if epoch_images:  # an epoch is long: fewer repeats, one warm-up epoch at most
        repeats, warmup = min(repeats, 3), min(warmup, 1)
    rng = np.random.default_rng(args.seed)
    work = first = sets = None
    try:
        with contender.selected_for(case):
            timed_case = row.case
            if epoch_images:
                timed_case = dataclasses.replace(row.case, spec=dataclasses.replace(spec, images=timed_images))
            work = contender.workload(timed_case, rng)
            first = work.make()
            count = buffer_sets(nbytes(first), machine.cache_bytes(info, contender.device),
                                machine.available_memory(contender.device))
            sets = [first] + [work.make() for _ in range(count - 1)]
            samples = time_calls(work.run, sets, contender.timer(), contender.sync, warmup, repeats,
                                 args.max_row_seconds)
        if timed_images < epoch_images:
            samples = [t * epoch_images / timed_images for t in samples]
            notes.append(f"timed on {timed_images} images, extrapolated to {epoch_images}")
        row.stats, row.buffers = summarize(samples), count
        notes.append(work.note)
        row.extra = dict(work.extra or {})
    except Exception as exc:  # noqa: BLE001 - one failing contender must not end the whole run
        message = str(exc).splitlines()[0][:160] if str(exc) else ""
        row.status = f"error: {type(exc).__name__}: {message}"
        print(f"{case.name}, {contender.name}:\n{traceback.format_exc()}", file=sys.stderr)
    finally:
        # Dropped first: the pools can only give back blocks that nothing refers to any more.
        work = first = sets = None
        machine.free_device_memory(contender.device)
    notes += [f"{key}: {value}" for key, value in row.extra.items()]
    row.note = "; ".join(n for n in notes if n)
    return row


def annotate(rows: list[Row], peaks: dict) -> None:
    """Fill the derived columns: throughput, percent of peak, ratio to PyTorch, GPU-over-CPU speedup."""
    by_key = {(r.case.name, r.contender): r for r in rows if r.stats}
    for row in rows:
        if not row.stats:
            continue
        spec, op = row.case.spec, row.case.op
        work = spec.flops(op) if row.case.bound == "flop" else spec.bytes(op)
        row.achieved = work / row.stats.median
        peak = peaks.get(row.device)
        if peak:
            row.pct_peak = 100 * row.achieved / (peak["flops"] if row.case.bound == "flop" else peak["bytes_per_s"])
        torch_name = HOST_REFERENCE if row.case.op == HOST_OP else TORCH_REFERENCE.get(row.device)
        reference = by_key.get((row.case.name, torch_name))
        if reference is not None and reference is not row:
            row.vs_torch = reference.per_image / row.per_image
        if row.device == "cuda":
            cpu = by_key.get((row.case.name, NUMPY if row.family == "gpuconv" else TORCH_REFERENCE["cpu"]))
            if cpu is not None:
                row.speedup = cpu.per_image / row.per_image


def to_record(row: Row) -> dict:
    """The measured part of ``row`` as JSON; of its spec only the fields a row changes."""
    return {"case": row.case.name, "spec": _run_fields(row.case.spec), "contender": row.contender,
            "device": row.device, "family": row.family, "status": row.status, "buffers": row.buffers,
            "note": row.note, "extra": row.extra, "stats": dataclasses.asdict(row.stats) if row.stats else None}


def from_record(record: dict, cases_by_name: dict) -> Row:
    """The :class:`Row` of a :func:`to_record` record; ``cases_by_name`` holds the run's cases."""
    case = cases_by_name[record["case"]]
    spec = dataclasses.replace(case.spec, **record["spec"])
    stats = Stats(**record["stats"]) if record["stats"] else None
    return Row(dataclasses.replace(case, spec=spec), record["contender"], record["device"], record["family"],
               record["status"], stats, record["buffers"], record["note"], dict(record["extra"]))


def _run_fields(spec) -> dict:
    """The fields of a spec a row may run differently from its case: the batch, an epoch's images."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name in ("batch", "images")}

"""What a run writes: ``results.md`` (a table per group, the machine and peaks above it),
``results.json`` (every row with raw seconds) and ``results.png`` (time per image, log scale).
Each file is written whole to a temporary name and renamed over the old one, so a reader (or a
run killed mid-write) only ever sees a complete report."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..data import atomic_write
from .machine import has_gpu_info
from .rows import Row, annotate


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else ""


def _achieved_text(row: Row) -> str:
    if not math.isfinite(row.achieved):
        return ""
    if row.case.bound == "flop":
        return f"{row.achieved / 1e12:.3g} TFLOP/s" if row.achieved >= 1e12 else f"{row.achieved / 1e9:.3g} GFLOP/s"
    return f"{row.achieved / 1e9:.3g} GB/s"


def title(info: dict) -> str:
    return info["gpu"]["name"] if has_gpu_info(info) else info["cpu"]


def missing_lines(missing: dict) -> list[str]:
    """One line per reason for the contenders that did not run at all."""
    return [f"not measured ({reason}): {', '.join(names)}" for reason, names in missing.items()]


def peak_line(device: str, peak: dict) -> str:
    return (f"measured peak, {device}: {peak['flops'] / 1e12:.3g} TFLOP/s, {peak['bytes_per_s'] / 1e9:.4g} GB/s "
            f"({peak['how']})")


def header_lines(info: dict, peaks: dict, missing: dict | None = None) -> list[str]:
    gpu = info["gpu"]
    if has_gpu_info(info):
        gpu_line = (f"- GPU: {gpu['name']} (compute capability {gpu['compute_capability']}, {gpu['sm_count']} SMs, "
                    f"L2 {gpu['l2_bytes'] >> 20} MiB, {gpu['memory_bytes'] >> 30} GiB); driver {gpu['driver']}, "
                    f"CUDA runtime {gpu['cuda_runtime']}, CuPy {gpu['cupy']}")
    else:
        gpu_line = f"- GPU: {gpu['name']} ({gpu['reason']})"
    lines = [f"- date: {info['date']}", gpu_line,
             f"- CPU: {info['cpu']} ({info['cpu_count']} logical CPUs, "
             f"last-level cache {info['cpu_cache_bytes'] >> 20} MiB)",
             f"- versions: gpuconv {info['gpuconv']}, NumPy {info['numpy']}, PyTorch {info['torch']} "
             f"(cuDNN {info['cudnn']}), Python {info['python']}"]
    if "openblas_thread_timeout" in info:
        lines.append(f"- CPU rows: OPENBLAS_THREAD_TIMEOUT={info['openblas_thread_timeout']} "
                     "(OpenBLAS's idle threads stop spinning after each call; see benchmarks/README.md)")
    lines += [f"- {peak_line(device, peak)}" for device, peak in peaks.items()]
    lines += [f"- {line}" for line in missing_lines(missing or {})]
    return lines


COLUMNS_NOTE = ("Columns: median and IQR (interquartile range) of the timed repeats, min–max beside; `achieved`: "
                "2×MACs/time for conv and training rows, compulsory bytes/time otherwise; `% peak`: of the "
                "measured FLOP/s or copy bandwidth of the row's device; `vs torch`: PyTorch's time per image on "
                "the same device (FP32) / this row's (> 1 = faster than PyTorch); `GPU/CPU`: the same family's "
                "CPU time per image / this row's.")


def markdown(info: dict, peaks: dict, rows: list[Row], missing: dict | None = None, problems=()) -> str:
    lines = [f"# gpuconv benchmark: {title(info)}", "", *header_lines(info, peaks, missing), "", COLUMNS_NOTE]
    if problems:
        lines += ["", "## Problems", "", *[f"- {p}" for p in problems]]
    header = ["| case | shape | contender | batch | median | IQR | min–max | achieved | % peak | vs torch | GPU/CPU "
              "| note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    # Rows run most important first; the report shows them by group, in run order within one.
    ordered = [r for group in dict.fromkeys(r.case.group for r in rows) for r in rows if r.case.group == group]
    group = None
    for row in ordered:
        if row.case.group != group:
            group = row.case.group
            lines += ["", f"## {group}", "", *header]
        s = row.stats
        if s:
            timing = [fmt_time(s.median), fmt_time(s.iqr), f"{fmt_time(s.min)}–{fmt_time(s.max)}"]
        else:
            timing = [row.status, "", ""]
        cells = [f"{row.case.layer} {row.case.op}", row.case.spec.describe(), row.contender, str(row.batch), *timing,
                 _achieved_text(row), _fmt(row.pct_peak, ".1f"), _fmt(row.vs_torch, ".2f"), _fmt(row.speedup, ".1f"),
                 row.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(info: dict, peaks: dict, rows: list[Row], missing: dict | None = None, problems=()) -> dict:
    out = []
    for row in rows:
        spec, op = row.case.spec, row.case.op
        entry = {"case": row.case.name, "group": row.case.group, "layer": row.case.layer, "op": op,
                 "shape": spec.describe(), "contender": row.contender, "device": row.device, "batch": row.batch,
                 "status": row.status, "note": row.note, "buffers": row.buffers, "bound": row.case.bound,
                 "flops": spec.flops(op), "bytes": spec.bytes(op)}
        if row.extra:
            entry["extra"] = row.extra
        if row.stats:
            entry.update(median_s=row.stats.median, q1_s=row.stats.q1, q3_s=row.stats.q3,
                         min_s=row.stats.min, max_s=row.stats.max, repeats=row.stats.n)
        derived = {"achieved_per_s": row.achieved, "pct_peak": row.pct_peak, "vs_torch": row.vs_torch,
                   "gpu_over_cpu": row.speedup}
        entry.update({k: v for k, v in derived.items() if math.isfinite(v)})
        out.append(entry)
    return {"machine": info, "peaks": peaks, "not_measured": missing or {}, "problems": list(problems), "rows": out}


def bar_chart(rows: list[Row], title: str):
    """Median time per image, log scale, a group of bars per case: the compute-bound cases (conv,
    training) where any ran, else every timed case. Returns the figure, for :func:`write_reports`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.stats]
    chosen = [r for r in timed if r.case.bound == "flop"] or timed
    cases = list(dict.fromkeys(r.case.name for r in chosen))
    names = list(dict.fromkeys(r.contender for r in chosen))
    height = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(10, 1.8 + len(cases) * (0.2 + 0.1 * len(names))))
    for j, name in enumerate(names):
        points = [(i + j * height, r.per_image * 1e6) for i, case in enumerate(cases)
                  for r in chosen if r.case.name == case and r.contender == name]
        if points:
            ys, xs = zip(*points)
            ax.barh(ys, xs, height=height, label=name)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.invert_yaxis()
    if chosen:
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("median time per image (µs, log scale; shorter is faster)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def write_reports(out: Path, info: dict, peaks: dict, rows: list[Row], chart: bool = True,
                  missing: dict | None = None, problems=()) -> None:
    """results.md, results.json and (with ``chart``) results.png in ``out``, each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    annotate(rows, peaks)
    text = markdown(info, peaks, rows, missing, problems)
    atomic_write(out / "results.md", lambda f: f.write(text.encode()))
    data = json.dumps(to_json(info, peaks, rows, missing, problems), indent=1) + "\n"
    atomic_write(out / "results.json", lambda f: f.write(data.encode()))
    if not chart:
        return
    import matplotlib.pyplot as plt

    fig = bar_chart(rows, f"gpuconv benchmark, {title(info)}, {info['date']}")
    try:
        atomic_write(out / "results.png", lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)

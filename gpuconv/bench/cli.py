"""``gpuconv bench``: options, the choice of cases and contenders, and the run that ties the
other modules together (machine info, jobs in worker processes, reports rewritten as rows come
in, a summary of what failed)."""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import os
import sys
import time
from pathlib import Path

from ..runs import RunDirectoryError, RunLock
from . import machine
from .cases import DEFAULT_CPU_BATCH, EPOCH_IMAGES, QUICK_CPU_BATCH, Case, all_cases, floors_markdown
from .contenders import contenders_for
from .reports import header_lines, missing_lines, write_reports
from .runner import OPENBLAS_THREAD_TIMEOUT, Collector, plan, run_in_process, run_in_workers

QUICK_PATTERNS = ("lenet5/*", "convnet-benchmarks/L3/conv2d_forward")
DEFAULT_RUNS = Path("runs/bench")
CHART_SECONDS = 30  # the chart, slower to draw than the tables, is redrawn at most this often


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="gpuconv bench", description="Every kernel and a whole training step, on every contender, side by side.")
    parser.add_argument("--quick", action="store_true",
                        help="LeNet-5 and one AlexNet layer, few repeats: under a minute on a CPU")
    parser.add_argument("--only", metavar="PATTERN", action="append",
                        help="only cases whose name (group/layer/op, e.g. alexnet/conv2/conv2d_forward) matches "
                             "this shell pattern; without wildcards, a substring. Repeatable")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="CPU contenders, GPU contenders, or both (default); without a GPU one line says "
                             "which were not measured")
    parser.add_argument("--cpu-cases", metavar="PATTERN", action="append",
                        help="the CPU contenders run only the cases matching this pattern (as --only; "
                             "repeatable): a small CPU reference for the GPU/CPU column")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default 30; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3; quick 1)")
    parser.add_argument("--max-row-seconds", type=float,
                        help="stop repeating a row after this many seconds, once 3 calls are timed "
                             "(default 5; quick 1)")
    parser.add_argument("--cpu-batch", type=int,
                        help="batch of the CPU rows (default LeNet-5 256, AlexNet shapes 16; quick 64 and 4)")
    parser.add_argument("--cpu-epoch-limit", type=int,
                        help=f"images the CPU epoch is timed on, extrapolated to {EPOCH_IMAGES} "
                             "(default 6000; quick 512)")
    parser.add_argument("--no-epoch", action="store_true", help="leave out the LeNet-5 epoch")
    parser.add_argument("--time-budget", type=float,
                        help="seconds after which no row starts; the rest are reported as skipped")
    parser.add_argument("--row-timeout", type=float, default=600.0,
                        help="a row still running after this many seconds has its worker killed and is "
                             "reported as an error; the rest go on in a fresh worker (default 600)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every row in this process instead of worker processes (no isolation "
                             "from crashes or sticky CUDA errors, no --row-timeout; for debugging)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out", type=Path, help=f"output folder (default {DEFAULT_RUNS}/NAME)")
    parser.add_argument("--name", help=f"the run's folder under {DEFAULT_RUNS}/ (default <device>-<UTC time>)")
    parser.add_argument("--floors", action="store_true",
                        help="print the H100 SXM time floors of the AlexNet conv layers (markdown) and exit")
    args = parser.parse_args(argv)
    for name, minimum in (("repeats", 1), ("warmup", 0), ("cpu_batch", 1), ("cpu_epoch_limit", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    if not args.row_timeout > 0:
        parser.error(f"--row-timeout must be positive, got {args.row_timeout}")
    if args.out is not None and args.name is not None:
        parser.error("give --out or --name, not both")
    if args.name is not None and (not args.name or os.sep in args.name or args.name in (".", "..")):
        parser.error(f"--name must be a plain folder name, got {args.name!r}")
    defaults = (dict(repeats=3, warmup=1, max_row_seconds=1.0, cpu_epoch_limit=512) if args.quick
                else dict(repeats=30, warmup=3, max_row_seconds=5.0, cpu_epoch_limit=6000))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    base = QUICK_CPU_BATCH if args.quick else DEFAULT_CPU_BATCH
    args.cpu_batch = {group: args.cpu_batch or batch for group, batch in base.items()}
    return args


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p if any(c in p for c in "*?[") else f"*{p}*") for p in patterns)


def select_cases(args) -> list[Case]:
    """The cases to run, most important first (so that a run cut short has them): the
    convnet-benchmarks convolutions, the training steps, the models' kernels, the epoch."""
    models = ["lenet5"] if args.quick else ["lenet5", "alexnet"]
    return [c for c in all_cases(models, epoch=not args.no_epoch)
            if (not args.only or matches(c.name, args.only)) and (not args.quick or matches(c.name, QUICK_PATTERNS))]


def available_contenders(device_choice: str):
    """``(contenders that can run here, {reason: names of those that cannot})``; without a GPU
    every GPU contender shares the one reason."""
    usable, missing = [], {}
    gpu, why_no_gpu = machine.cuda_status()
    for contender in contenders_for(device_choice):
        if contender.device == "cuda" and not gpu:
            ok, why = False, f"no GPU: {why_no_gpu.split(' (')[0]}"
        else:
            ok, why = contender.available()
        if ok:
            usable.append(contender)
        else:
            missing.setdefault(why, []).append(contender.name)
    return usable, missing


def _default_out(info: dict) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = DEFAULT_RUNS / f"{machine.device_slug(info)}-{stamp}"
    n = 1
    while out.exists():  # two runs in one second
        n += 1
        out = DEFAULT_RUNS / f"{machine.device_slug(info)}-{stamp}-{n}"
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.floors:
        print(floors_markdown())
        return 0
    began = time.time()
    cases = select_cases(args)
    if not cases:
        print(f"gpuconv bench: no case matches --only {' '.join(args.only)}", file=sys.stderr)
        return 2
    entrants, missing = available_contenders(args.device)
    pairs = [(case, c) for case in cases for c in entrants
             if c.applies(case) and (c.device != "cpu" or not args.cpu_cases or matches(case.name, args.cpu_cases))]
    if not pairs:
        print(f"gpuconv bench: nothing to run: {'; '.join(missing_lines(missing)) or 'no contender applies'}",
              file=sys.stderr)
        return 2
    info = machine.machine_info(use_gpu=any(c.device == "cuda" for c in entrants))
    if any(c.device == "cpu" for c in entrants):
        # What the CPU rows run with: the workers get ours unless one is set; this process has
        # whatever was set before it started (NumPy read it when it loaded).
        default = "unset (--in-process)" if args.in_process else OPENBLAS_THREAD_TIMEOUT
        info["openblas_thread_timeout"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT", default)
    out = args.out or (DEFAULT_RUNS / args.name if args.name else _default_out(info))
    lock = RunLock(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # two runs rewriting one report would each lose the other's rows
    except RunDirectoryError as exc:
        print(f"gpuconv bench: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gpuconv bench: cannot write to --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        print(f"gpuconv bench: {len(pairs)} rows of {len(cases)} cases, contenders: "
              f"{', '.join(c.name for c in entrants)}; writing to {out}")
        print("\n".join(header_lines(info, {}, missing)), flush=True)
        return _run(plan(pairs), argv, args, info, cases, missing, out, began)
    finally:
        lock.release()


def _run(jobs, argv, args, info, cases, missing, out: Path, began: float) -> int:
    """Run the jobs, rewriting the reports as rows come in; the summary's exit status."""
    charted = [time.monotonic()]

    def write(final: bool = False):
        chart = final or time.monotonic() - charted[0] > CHART_SECONDS
        write_reports(out, info, collector.peaks, collector.rows, chart=chart, missing=missing,
                      problems=collector.problems)
        charted[0] = time.monotonic() if chart else charted[0]

    collector = Collector({c.name: c for c in cases}, write)
    deadline = began + args.time_budget if args.time_budget is not None else None
    try:
        if args.in_process:
            run_in_process(jobs, args, info, deadline, collector)
        else:
            run_in_workers(jobs, argv, args, info, deadline, collector)
    except KeyboardInterrupt:  # the workers got the same Ctrl-C; what they measured is kept
        collector.problems.append("interrupted (Ctrl-C)")
        write(final=True)
        print(f"\ngpuconv bench: interrupted; the {sum(1 for r in collector.rows if r.stats)} rows measured "
              f"are in {out / 'results.md'}", file=sys.stderr)
        return 130
    write(final=True)
    return _summary(collector, out, time.time() - began)


def _summary(collector: Collector, out: Path, seconds: float) -> int:
    """Print what failed (problems of the workers, rows that errored); 1 if anything did."""
    errors = [r for r in collector.rows if r.status.startswith("error")]
    measured = sum(1 for r in collector.rows if r.stats)
    skipped = sum(1 for r in collector.rows if r.status.startswith("skipped"))
    print(f"gpuconv bench: {measured} rows measured, {len(errors)} failed, {skipped} skipped, in {seconds:.0f} s; "
          f"wrote {out / 'results.md'}, results.json and results.png")
    if not (errors or collector.problems):
        return 0
    print("gpuconv bench: what failed:")
    for problem in collector.problems:
        print(f"  - {problem}")
    for row in errors:
        print(f"  - {row.case.name} [{row.contender}]: {row.status}")
    return 1

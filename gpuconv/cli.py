"""The ``gpuconv`` command: ``train``, ``summary``, ``info``, ``bench`` and ``check-kernels``.

Expected failures (a wrong option, a missing dataset, a run directory in use, a corrupt
checkpoint, no NVRTC or no compiler for what was asked) end in one line on stderr and exit status
2, as argparse's own errors do; a diverged run exits 1 and an interrupted one 130.

``bench`` and ``check-kernels`` hand their arguments to ``gpuconv.bench.main`` and
``gpuconv.compile_check.main``, imported only when asked for, so the other commands never pay
for (or depend on) what those import.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .device import cuda_status, resolve_device
from .random import SEED_MAX, SEED_MIN

COMMAND_ENV = "GPUCONV_COMMAND"  # a wrapper's own command line, for the resume command printed at Ctrl-C

# Subcommands whose whole argument list belongs to another module's main(argv).
_FORWARDED = {
    "bench": ("gpuconv.bench", "kernel and training-step benchmarks (see `gpuconv bench --help`)"),
    "check-kernels": ("gpuconv.compile_check", "compile every kernel with NVRTC for sm_80 and sm_90"),
}


def _number(text: str, kind: type, what: str, ok) -> int | float:
    """``text`` as a ``kind`` for which ``ok(value)`` holds; argparse shows the message after the
    option's name (``argument --lr: must be a positive number, got 'x'``)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):  # comparisons with NaN are false: NaN is refused too
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def _non_negative_int(text: str) -> int:
    return _number(text, int, "a non-negative integer", lambda v: v >= 0)


def _positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: v > 0)


def _non_negative_float(text: str) -> float:
    return _number(text, float, "a non-negative number", lambda v: v >= 0)


def _seed(text: str) -> int:
    return _number(text, int, f"an integer in [{SEED_MIN}, {SEED_MAX}] (as torch.manual_seed takes)",
                   lambda v: SEED_MIN <= v <= SEED_MAX)


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .models import MODELS
    from .train import OPTIMIZERS, TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="gpuconv", description="CNN training on hand-written CUDA kernels.")
    parser.add_argument("--version", action="version", version=f"gpuconv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # No abbreviated options: the resume command printed at Ctrl-C edits the command line by name.
    train = commands.add_parser("train", help="train a model on MNIST or Fashion-MNIST", allow_abbrev=False)
    train.add_argument("--model", choices=sorted(MODELS), default=defaults.model, help="(default: %(default)s)")
    train.add_argument("--dataset", choices=sorted(DATASETS), default=defaults.dataset, help="(default: %(default)s)")
    train.add_argument("--data-dir", metavar="DIR", help="directory with the IDX files (or a DATASET/ folder in it), the only place "
                                                           "looked in (default: $GPUCONV_DATA, the Debian package, the "
                                                           "cache, a download)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda", "emu"), default=defaults.device,
                       help="(default: %(default)s: CUDA when CuPy sees a GPU, else the CPU)")
    train.add_argument("--epochs", type=_positive_int, default=defaults.epochs,
                       help="total epochs, resumed ones included (default: %(default)s)")
    train.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                       help="per process: under `mpiexec -n N` the global batch is N times this, as in "
                            "PyTorch's DistributedDataParallel (default: %(default)s)")
    train.add_argument("--lr", type=_positive_float, default=defaults.lr, help="learning rate (default: %(default)s)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer, help="(default: %(default)s)")
    train.add_argument("--momentum", type=_non_negative_float, default=defaults.momentum,
                       help="SGD momentum (default: %(default)s)")
    train.add_argument("--weight-decay", type=_non_negative_float, default=defaults.weight_decay,
                       help="(default: %(default)s)")
    train.add_argument("--lr-step-size", type=_non_negative_int, default=defaults.lr_step_size, metavar="N",
                       help="multiply the lr by --lr-gamma every N epochs, 0 for a constant lr (default: %(default)s)")
    train.add_argument("--lr-gamma", type=_positive_float, default=defaults.lr_gamma, help="(default: %(default)s)")
    train.add_argument("--seed", type=_seed, default=defaults.seed,
                       help="seeds initialisation, shuffling and dropout; negative seeds are taken as "
                            "torch.manual_seed takes them (default: %(default)s)")
    train.add_argument("--out", metavar="DIR", help="output directory for metrics, curves and checkpoints "
                                                    "(default: runs/MODEL); one that holds a run needs "
                                                    "--resume or --overwrite")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                       help="continue from CHECKPOINT (without one: the checkpoint in --out), with the "
                            "model, optimizer state and hyper-parameters, and random state saved there; "
                            "a checkpoint from inside an epoch continues at its next step")
    again.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    train.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                       help="also write the checkpoint every N training steps (always: after each epoch, "
                            "and at Ctrl-C)")
    train.add_argument("--limit-train", type=_positive_int, metavar="N", help="train on the first N images only")
    train.add_argument("--limit-test", type=_positive_int, metavar="N", help="evaluate on the first N images only")
    train.add_argument("--no-download", action="store_true", help="never download the dataset")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--dist-timeout", type=_positive_float, default=defaults.dist_timeout, metavar="SECONDS",
                       help="under mpiexec: how long a rank waits for the others in one collective before it "
                            "aborts the job, naming the ranks that did not arrive (default: %(default)s)")
    train.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                       help="replay the training step as a CUDA graph (default: on for cuda)")

    summary = commands.add_parser("summary", help="per-layer shapes, parameters and multiply-adds of a model")
    summary.add_argument("model", choices=sorted(MODELS))

    commands.add_parser("info", help="versions, devices, and whether NVRTC and g++ are available")
    for name, (_, text) in _FORWARDED.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _fail(command: str, message) -> int:
    """An expected failure: one line on stderr, exit status 2 (as argparse's own errors)."""
    print(f"gpuconv {command}: {message}", file=sys.stderr)
    return 2


def _program() -> list[str]:
    """How this process was started, to print a command the user can run again."""
    launcher = sys.argv[0] if sys.argv else ""
    if Path(launcher).name == "__main__.py" and Path(launcher).parent.name == "gpuconv":
        return [sys.executable, "-m", "gpuconv"]
    if Path(launcher).name != "gpuconv":  # called as a function (tests, another program)
        return ["gpuconv"]
    on_path = shutil.which("gpuconv")
    if on_path and os.path.samefile(on_path, launcher):
        return ["gpuconv"]
    return [os.path.abspath(launcher)]


def resume_command(argv: list[str]) -> str:
    """The command that resumes the run ``argv`` started: the same words, with ``--resume`` (the
    run's own checkpoint) instead of ``--overwrite`` or another ``--resume``.

    A wrapper script can set ``$GPUCONV_COMMAND`` to the command line it was started with
    (shell-quoted), which then stands in for ``gpuconv train ...``.
    """
    wrapper = os.environ.get(COMMAND_ENV)
    words = shlex.split(wrapper) if wrapper else [*_program(), *argv]
    kept, skip = [], False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word == "--resume":
            skip = i + 1 < len(words) and not words[i + 1].startswith("-")  # its optional CHECKPOINT
        elif word != "--overwrite" and not word.startswith("--resume="):
            kept.append(word)
    return shlex.join([*kept, "--resume"])


def _emu_compiler_missing() -> str | None:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler):
        return None
    return (f"--device emu compiles the kernels with a C++17 compiler, and {compiler!r} was not found "
            f"(install g++, or set CXX to a compiler)")


def _train(args, argv: list[str]) -> int:
    from .data import DatasetNotFoundError, IdxError
    from .distributed import DistributedError, abort_on_error, init_process_group
    from .train import (CHECKPOINT, ResumeError, RunDirectoryError, TrainConfig, TrainingDiverged,
                        TrainingInterrupted, train)

    try:
        device, _ = resolve_device(args.device)  # an unavailable --device is the user's error, not a crash
    except RuntimeError as exc:
        return _fail("train", exc)
    if device == "emu" and (missing := _emu_compiler_missing()):
        return _fail("train", missing)
    out = args.out or f"runs/{args.model}"
    resume = f"{out}/{CHECKPOINT}" if args.resume is True else args.resume
    config = TrainConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, device=args.device, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
        weight_decay=args.weight_decay, lr_step_size=args.lr_step_size or None, lr_gamma=args.lr_gamma,
        seed=args.seed, out=out, resume=resume, overwrite=args.overwrite, checkpoint_every=args.checkpoint_every,
        limit_train=args.limit_train, limit_test=args.limit_test, download=not args.no_download,
        progress=not args.no_progress, graph=args.graph, dist_timeout=args.dist_timeout,
    )
    try:
        group = init_process_group()  # in an MPI job, one rank of several failing stops them all
    except DistributedError as exc:
        return _fail("train", exc)
    try:
        with abort_on_error(expected=(DatasetNotFoundError, IdxError, ResumeError, RunDirectoryError, DistributedError),
                            collective=(TrainingInterrupted, TrainingDiverged), prog="gpuconv train"):
            history = train(config)
    except TrainingInterrupted as exc:
        launcher = f"mpiexec -n {group.world_size} " if group.is_distributed else ""
        if group.is_main:
            print(f"interrupted at epoch {exc.epoch}, step {exc.step} of {exc.steps}: saved {exc.checkpoint}; "
                  f"resume with: {launcher}{resume_command(argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        kept = f"the checkpoint {out}/{CHECKPOINT} is as it was" if Path(out, CHECKPOINT).is_file() else "nothing was saved"
        print(f"gpuconv train: stopped at once; {kept}", file=sys.stderr)
        return 130
    except TrainingDiverged as exc:  # the run failed, the command was right: status 1
        if group.is_main:
            print(f"gpuconv train: {exc}", file=sys.stderr)
        return 1
    except (DatasetNotFoundError, IdxError, ResumeError, RunDirectoryError) as exc:
        # Expected failures with messages written for the user: no traceback.
        return _fail("train", exc)
    if history and group.is_main:
        last = history[-1]
        print(f"done: test accuracy {last['test_acc']:.4f} after epoch {last['epoch']}; results in {out}")
    return 0


def _summary(args) -> int:
    from . import models
    from .summary import summary

    model = models.get_model(args.model)
    print(summary(model, model.input_shape))
    return 0


def _first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed to run ({exc})"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else f"exit status {result.returncode}"


def _cuda_versions() -> list[str]:
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return [f"CuPy: not available ({type(exc).__name__}: {exc})"]
    lines = [f"CuPy: {cupy.__version__}"]
    for what, call in (("CUDA runtime", cupy.cuda.runtime.runtimeGetVersion),
                       ("CUDA driver", cupy.cuda.runtime.driverGetVersion)):
        try:
            version = call()
            lines.append(f"{what}: {version // 1000}.{version % 1000 // 10}")
        except Exception as exc:  # no driver installed
            lines.append(f"{what}: not available ({exc})")
    return lines


def _nvrtc_bindings() -> tuple[str | None, str]:
    """(version, "") when cuda-bindings' NVRTC loads, else (None, why not)."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        return None, "cuda-bindings are not installed"
    try:
        error, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # the bindings import, but libnvrtc itself is missing
        return None, f"cuda-bindings installed, but the library does not load ({exc})"
    if error != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return None, f"cuda-bindings installed, but the library does not load ({error})"
    return f"{major}.{minor}", ""


def _nvrtc_missing() -> str | None:
    """Why the compile gate (which uses cuda-bindings' NVRTC) cannot run here, or None."""
    version, why = _nvrtc_bindings()
    return None if version else f"NVRTC is not available: {why}; pip install 'gpuconv[nvrtc]'"


def _nvrtc_status() -> str:
    version, why = _nvrtc_bindings()
    if version:
        return f"NVRTC: {version} (through cuda-bindings)"
    if why.startswith("cuda-bindings installed"):
        return f"NVRTC: {why}"
    try:
        import cupy

        major, minor = cupy.cuda.nvrtc.getVersion()
        return f"NVRTC: {major}.{minor} (through CuPy)"
    except Exception:
        return "NVRTC: not available (pip install 'gpuconv[nvrtc]' for the compile check without a GPU)"


def _info(args) -> int:
    device, why = resolve_device("auto")
    compiler = shutil.which("g++")
    lines = [
        f"gpuconv: {__version__}",
        f"python: {platform.python_version()} ({platform.platform()})",
        f"numpy: {np.__version__}",
        *_cuda_versions(),
        f"CUDA device: {'usable' if cuda_status()[0] else 'none'}",
        f"device 'auto' picks: {device} -- {why}",
        _nvrtc_status(),
        f"g++ (the emulated device 'emu'): {_first_line([compiler, '--version']) if compiler else 'not found'}",
    ]
    print("\n".join(lines))
    return 0


def _run(argv: list[str]) -> int:
    if argv and argv[0] in _FORWARDED:
        if argv[0] == "check-kernels" and not {"-h", "--help"} & set(argv) and (missing := _nvrtc_missing()):
            return _fail("check-kernels", missing)
        return importlib.import_module(_FORWARDED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args, argv)
    return {"summary": _summary, "info": _info}[args.command](args)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a training run (which handles its own): no traceback
        print(" ".join(["gpuconv", *argv[:1]]) + ": interrupted", file=sys.stderr)
        return 130

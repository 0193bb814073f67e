"""The ``gpuconv`` command: ``train``, ``summary``, ``info``, ``bench`` and ``check-kernels``.

``bench`` and ``check-kernels`` hand their arguments to ``gpuconv.bench.main`` and
``gpuconv.compile_check.main``, imported only when asked for, so the other commands never pay
for (or depend on) what those import.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import subprocess
import sys

import numpy as np

from . import __version__
from .device import cuda_status, resolve_device

# Subcommands whose whole argument list belongs to another module's main(argv).
_FORWARDED = {
    "bench": ("gpuconv.bench", "kernel and training-step benchmarks (see `gpuconv bench --help`)"),
    "check-kernels": ("gpuconv.compile_check", "compile every kernel with NVRTC for sm_80 and sm_90"),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # `not >=` also refuses NaN
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .models import MODELS
    from .train import OPTIMIZERS, TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="gpuconv", description="CNN training on hand-written CUDA kernels.")
    parser.add_argument("--version", action="version", version=f"gpuconv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model on MNIST or Fashion-MNIST")
    train.add_argument("--model", choices=sorted(MODELS), default=defaults.model, help="(default: %(default)s)")
    train.add_argument("--dataset", choices=sorted(DATASETS), default=defaults.dataset, help="(default: %(default)s)")
    train.add_argument("--data-dir", metavar="DIR", help="directory with the IDX files, searched first")
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
    train.add_argument("--seed", type=int, default=defaults.seed,
                       help="seeds initialisation, shuffling and dropout (default: %(default)s)")
    train.add_argument("--out", metavar="DIR", help="output directory for metrics, curves and checkpoints "
                                                    "(default: runs/MODEL)")
    train.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                       help="continue from CHECKPOINT (without one: the checkpoint in --out), with the "
                            "model, optimizer state and hyper-parameters, and random state saved there")
    train.add_argument("--limit-train", type=_positive_int, metavar="N", help="train on the first N images only")
    train.add_argument("--limit-test", type=_positive_int, metavar="N", help="evaluate on the first N images only")
    train.add_argument("--no-download", action="store_true", help="never download the dataset")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--dist-timeout", type=_positive_float, default=defaults.dist_timeout, metavar="SECONDS",
                       help="under mpiexec: how long a rank waits for the others in one collective before it "
                            "aborts the job, naming the ranks that did not arrive (default: %(default)s)")

    summary = commands.add_parser("summary", help="per-layer shapes, parameters and multiply-adds of a model")
    summary.add_argument("model", choices=sorted(MODELS))

    commands.add_parser("info", help="versions, devices, and whether NVRTC and g++ are available")
    for name, (_, text) in _FORWARDED.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _train(args) -> int:
    from .data import DatasetNotFoundError, IdxError
    from .distributed import DistributedError, abort_on_error, init_process_group
    from .train import CHECKPOINT, ResumeError, TrainConfig, TrainingDiverged, train

    try:
        resolve_device(args.device)  # an unavailable --device is the user's error, not a crash
    except RuntimeError as exc:
        print(f"gpuconv train: {exc}", file=sys.stderr)
        return 1
    out = args.out or f"runs/{args.model}"
    resume = f"{out}/{CHECKPOINT}" if args.resume is True else args.resume
    config = TrainConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, device=args.device, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
        weight_decay=args.weight_decay, lr_step_size=args.lr_step_size or None, lr_gamma=args.lr_gamma,
        seed=args.seed, out=out, resume=resume, limit_train=args.limit_train, limit_test=args.limit_test,
        download=not args.no_download, progress=not args.no_progress, dist_timeout=args.dist_timeout,
    )
    expected = (TrainingDiverged, DatasetNotFoundError, IdxError, ResumeError, DistributedError)
    try:
        with abort_on_error(expected, prog="gpuconv train"):  # one rank of several failing stops them all
            history = train(config)
    except expected as exc:
        # Expected failures with messages written for the user: no traceback.
        print(f"gpuconv train: {exc}", file=sys.stderr)
        return 1
    if history and init_process_group().is_main:
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


def _nvrtc_status() -> str:
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:
            import cupy

            major, minor = cupy.cuda.nvrtc.getVersion()
            return f"NVRTC: {major}.{minor} (through CuPy)"
        except Exception:
            return "NVRTC: not available (pip install 'gpuconv[nvrtc]' for the compile check without a GPU)"
    try:
        error, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # the bindings import, but libnvrtc itself is missing
        return f"NVRTC: cuda-bindings installed, but the library does not load ({exc})"
    if error != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return f"NVRTC: cuda-bindings installed, but the library does not load ({error})"
    return f"NVRTC: {major}.{minor} (through cuda-bindings)"


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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _FORWARDED:
        return importlib.import_module(_FORWARDED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return {"train": _train, "summary": _summary, "info": _info}[args.command](args)

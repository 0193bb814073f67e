"""Scaling efficiency of data-parallel training: images/s on N ranks over N times one rank.

Runs the real thing, ``mpiexec -n N python -m gpuconv train``, for each N in ``--ranks``, with
``--batch-size`` per rank (weak scaling, the convention of gpuconv and PyTorch's DDP: the global
batch grows with N), and reads the training throughput of each epoch from the run's
``metrics.json`` (``images_per_s``: training images over the wall time of the training pass,
evaluation excluded). The first epoch of each job is warm-up; the median over the other epochs
of ``--repeats`` jobs per N, run interleaved (1, 2, ..., 1, 2, ...) so that a change in the
machine's load touches every N alike, is reported.

    python benchmarks/data_parallel.py --ranks 1,2 --device cpu --threads 1
    python benchmarks/data_parallel.py --ranks 1,2,4,8 --device cuda --images 60000 --batch-size 256

On the CPU each rank gets ``--threads`` BLAS/OpenMP threads, so that N ranks use N times the
cores of one (the machine needs N x threads cores for a fair number). The images are random
Fashion-MNIST-shaped IDX files written to a temporary directory (throughput does not depend on
them) unless ``--data-dir`` names real ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpuconv import data  # noqa: E402
from gpuconv.distributed import LAUNCHER_ENV  # noqa: E402


def write_random_dataset(directory: Path, n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        data.write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(directory / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))


def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.is_file() else shutil.which("mpiexec")
    if found is None:
        raise SystemExit("no mpiexec found: pip install 'gpuconv[mpi]'")
    return found


def run(ranks: int, args, data_dir: Path, out: Path) -> list[float]:
    """The images/s of every epoch after the first, on ``ranks`` ranks."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(args.threads)
    for name in LAUNCHER_ENV:
        env.pop(name, None)
    command = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "gpuconv", "train", "--model", args.model,
               "--data-dir", str(data_dir), "--device", args.device, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--limit-train", str(args.images), "--limit-test", "64",
               "--no-download", "--no-progress", "--out", str(out)]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, timeout=args.timeout)
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    return [row["images_per_s"] for row in epochs[1:]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts; must include 1 (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "emu"))
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank (default: %(default)s)")
    parser.add_argument("--images", type=int, default=4096, help="training images per epoch (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="the first is warm-up (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="jobs per rank count (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads per rank (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, help="real IDX files (default: random ones)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write data_parallel.md and .json here")
    args = parser.parse_args(argv)
    counts = sorted({int(n) for n in args.ranks.split(",")})
    if counts[0] != 1:
        parser.error("--ranks must include 1, the baseline of the efficiency")

    rates: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = Path(tmp) / "data"
            write_random_dataset(data_dir, args.images, 64)
        for repeat in range(args.repeats):
            for n in counts:
                rates[n] += run(n, args, data_dir, Path(tmp) / f"run{n}-{repeat}")
    rows = [{"ranks": n, "images_per_s": statistics.median(r), "min": min(r), "max": max(r), "epochs_timed": len(r)}
            for n, r in rates.items()]
    single = rows[0]["images_per_s"]
    for row in rows:
        row["efficiency"] = row["images_per_s"] / (row["ranks"] * single)

    title = (f"{args.model} on {args.device}, batch {args.batch_size} per rank, {args.images} images per epoch, "
             f"{args.threads} thread(s) per rank; {platform.node()}, {os.cpu_count()} CPUs")
    table = [f"Data-parallel scaling: {title}", "",
             "| ranks | images/s (median) | min - max | epochs timed | scaling efficiency |", "|---:|---:|---:|---:|---:|"]
    table += [f"| {r['ranks']} | {r['images_per_s']:.0f} | {r['min']:.0f} - {r['max']:.0f} | {r['epochs_timed']} "
              f"| {r['efficiency']:.2f} |" for r in rows]
    print("\n".join(table))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "data_parallel.md").write_text("\n".join(table) + "\n")
        (args.out / "data_parallel.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                                 "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

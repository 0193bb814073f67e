"""gpuconv.distributed: shards, and data-parallel training on 2 ranks under mpiexec (CPU).

The multi-rank tests start real MPI jobs (`mpiexec -n 2 python -m gpuconv train ...`) on tiny
synthetic datasets; each is bounded by a subprocess timeout, so a hang fails instead of blocking.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gpuconv import data, distributed, optim, train
from gpuconv.nn import Parameter
from test_train import write_synthetic_dataset


def _find_mpiexec() -> str | None:
    # The one installed with mpi4py's MPI (the `mpich` wheel puts it next to the interpreter,
    # also in a virtual environment that is not activated) before any other on PATH.
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'gpuconv[mpi]')"
    if _find_mpiexec() is None:
        return "no mpiexec found beside the interpreter or on PATH (pip install mpich)"
    return None


MPI_MISSING = _mpi_missing()
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None, reason=f"MPI is unavailable: {MPI_MISSING}")
JOB_TIMEOUT = 180  # seconds: far above a healthy job's few seconds, far below a CI run


def mpi_env(tmp_path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env[data.OFFLINE_ENV] = "1"
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    # Open MPI refuses to start as root without these; MPICH ignores them.
    env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    for name in distributed.LAUNCHER_ENV:  # a test run itself under mpiexec starts clean jobs
        env.pop(name, None)
    return env


def run_job(tmp_path, *argv: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks python -m gpuconv <argv>`` (or a script, if argv[0] ends in .py)."""
    program = list(argv) if argv[0].endswith(".py") else ["-m", "gpuconv", *argv]
    return subprocess.run([_find_mpiexec(), "-n", str(ranks), sys.executable, *program], env=mpi_env(tmp_path),
                          capture_output=True, text=True, timeout=JOB_TIMEOUT, cwd=tmp_path)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture
def dataset(tmp_path) -> Path:
    # 91 training images: with 2 ranks x batch 8 the last global batch has 11 (6 + 5), with the
    # 2 x 13 of the resume test 13 (7 + 6), so uneven shares are tested; 37 test images, 19 + 18.
    return write_synthetic_dataset(tmp_path / "synthetic", n_train=91, n_test=37)


def train_args(root: Path, out: Path, batch: int, epochs: int = 1, *extra: str, device: str = "cpu") -> list[str]:
    return ["train", "--model", "lenet5", "--data-dir", str(root), "--device", device, "--epochs", str(epochs),
            "--batch-size", str(batch), "--lr", "0.05", "--lr-step-size", "0", "--seed", "3", "--no-progress",
            "--no-download", "--out", str(out), *extra]


def one_process(root: Path, out: Path, batch: int, epochs: int = 1, resume: Path | None = None,
                **options) -> list[dict]:
    options = {"device": "cpu", **options}
    config = train.TrainConfig(model="lenet5", dataset="fashion-mnist", data_dir=str(root), epochs=epochs,
                               batch_size=batch, lr=0.05, lr_step_size=None, seed=3, out=str(out),
                               resume=None if resume is None else str(resume), download=False, progress=False,
                               **options)
    return train.train(config, log=lambda *args: None)


def assert_same_training(ours: Path, reference: Path) -> None:
    """Weights, optimizer state and per-epoch losses equal up to float32 summation order."""
    a, b = train.load_checkpoint(ours / train.CHECKPOINT), train.load_checkpoint(reference / train.CHECKPOINT)
    assert a["epoch"] == b["epoch"]
    for name, weight in b["model_state"].items():
        np.testing.assert_allclose(a["model_state"][name], weight, rtol=1e-5, atol=1e-6, err_msg=name)
    for index, state in b["optimizer_state"]["state"].items():
        np.testing.assert_allclose(a["optimizer_state"]["state"][index]["momentum_buffer"],
                                   state["momentum_buffer"], rtol=1e-5, atol=1e-6)
    for ours_row, reference_row in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert ours_row[key] == pytest.approx(reference_row[key], rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------------------------------------
# Shards (no MPI needed)

@pytest.mark.parametrize("n,world,batch,start", [(90, 2, 8, 0), (10, 4, 2, 0), (7, 3, 5, 0), (101, 3, 4, 37),
                                                 (5, 8, 1, 0), (64, 2, 32, 0)])
def test_shards_are_disjoint_cover_the_epoch_and_form_the_single_process_batches(n, world, batch, start):
    samplers = [distributed.DistributedSampler(n, rank, world, seed=11) for rank in range(world)]
    shards = [s.indices(epoch=2, start=start) for s in samplers]
    order = data.epoch_order(n, True, 11, 2)
    together = np.concatenate(shards)
    assert len(together) == n - start and set(together) == set(order[start:])  # disjoint and covering
    steps = samplers[0].num_steps(batch, start)
    assert all(s.num_steps(batch, start) == steps for s in samplers)
    assert steps == len(range(start, n, batch * world))
    for step in range(steps):  # global step k = the k-th batch of one process with batch * world
        parts = [shard[step * batch:(step + 1) * batch] for shard in shards]
        lo = start + step * batch * world
        assert sorted(np.concatenate(parts)) == sorted(order[lo:lo + batch * world])
        assert sum(map(len, parts)) == samplers[0].global_batch(step, batch, start)


def test_shard_batches_weights_sum_to_one_and_empty_tails_are_marked():
    images = np.zeros((10, 28, 28), np.uint8)
    labels = np.arange(10) % 10
    dataset = data.DeviceDataset(images, labels, "cpu", "mnist")
    per_rank = [list(distributed.shard_batches(dataset, distributed.DistributedSampler(10, r, 4, seed=0), 2, 1))
                for r in range(4)]
    assert [len(steps) for steps in per_rank] == [2, 2, 2, 2]  # 10 samples, global batch 8: 8 + 2
    for step in range(2):
        assert sum(steps[step][2] for steps in per_rank) == pytest.approx(1.0)
    assert [steps[1][1] is None for steps in per_rank] == [False, False, True, True]


def test_a_group_of_one_process_changes_nothing():
    group = distributed.ProcessGroup()
    param = Parameter(np.ones(3, np.float32))
    param.grad = np.full(3, 2.0, np.float32)
    group.average_gradients(optim.SGD([param], lr=0.1), share=0.5)
    assert param.grad.tolist() == [2.0, 2.0, 2.0]
    assert group.broadcast_object({"a": 1}) == {"a": 1}
    assert group.allgather_object(5) == [5]
    assert group.allreduce_sum(np.array([1.5])).tolist() == [1.5]
    group.check_same({"lr": 1}, "a value")


def test_flat_gradients_hold_every_gradient_zeros_for_missing_ones_and_skip_frozen_parameters():
    rng = np.random.default_rng(0)
    params = [Parameter(rng.standard_normal(shape).astype(np.float32)) for shape in ((2, 3), (4,), (3,), (1,))]
    params[2].requires_grad_(False)
    params[0].grad = rng.standard_normal((2, 3)).astype(np.float32)
    params[3].grad = np.array([5.0], np.float32)
    optimizer = optim.SGD(params, lr=0.5)
    expected = [p.data - 0.5 * (p.grad if p.grad is not None else 0) for p in params]
    expected[2] = params[2].data.copy()  # frozen
    (flat,) = optimizer.flat_gradients()
    np.testing.assert_array_equal(flat[:6], params[0].grad.reshape(-1))
    np.testing.assert_array_equal(flat[6:10], 0)  # trainable, no gradient on this rank: zeros
    assert flat[13] == 5.0 and params[2].grad is None
    optimizer.step()
    for param, want in zip(params, expected):
        np.testing.assert_array_equal(param.data, want)


def test_sampler_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\), got 2"):
        distributed.DistributedSampler(10, 2, 2)


# ---------------------------------------------------------------------------------------------
# Jobs of 2 ranks

@needs_mpi
def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(tmp_path, dataset):
    # 2 epochs of 6 steps (the 6th global batch has 10 images): SGD with momentum, test metrics.
    result = succeeded(run_job(tmp_path, *train_args(dataset, tmp_path / "two", 8, 2)))
    one_process(dataset, tmp_path / "one", 16, 2)
    assert_same_training(tmp_path / "two", tmp_path / "one")
    assert "data-parallel over 2 MPI ranks: global batch 2 x 8 = 16" in result.stdout
    assert result.stdout.count("epoch 2/2:") == 1  # rank 0 alone logs
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        [train.CHECKPOINT, train.METRICS_JSON, train.METRICS_CSV, train.CURVES_PNG])


@needs_mpi
def test_two_ranks_on_the_emulated_device_match_one_process(tmp_path, dataset):
    # The gradient buffer is an EmuArray there; 21 images: steps of 8 + 8 and 3 + 2. The single
    # process runs first, so that the ranks find the kernels compiled.
    one_process(dataset, tmp_path / "one", 16, device="emu", limit_train=21, limit_test=8)
    succeeded(run_job(tmp_path, *train_args(dataset, tmp_path / "two", 8, 1, "--limit-train", "21",
                                            "--limit-test", "8", device="emu")))
    assert_same_training(tmp_path / "two", tmp_path / "one")


@needs_mpi
@pytest.mark.parametrize("defect", ["apart", "mean"])
def test_planted_gradient_averaging_defects_are_caught(tmp_path, dataset, defect):
    # apart: no all-reduce (each rank trains on its own shard); mean: the plain average of the
    # ranks' gradients, wrong only in the uneven last batch (6 + 5 images).
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    succeeded(run_job(tmp_path, str(script), defect, "0", *train_args(dataset, tmp_path / "two", 8)))
    one_process(dataset, tmp_path / "one", 16)
    with pytest.raises(AssertionError):
        assert_same_training(tmp_path / "two", tmp_path / "one")


@needs_mpi
def test_checkpoints_of_two_ranks_resume_on_one_and_the_reverse(tmp_path, dataset):
    straight = tmp_path / "straight"
    one_process(dataset, straight, 26, 2)
    # 2 ranks, then 1 process
    succeeded(run_job(tmp_path, *train_args(dataset, tmp_path / "a", 13)))
    one_process(dataset, tmp_path / "a", 26, 2, resume=tmp_path / "a" / train.CHECKPOINT)
    assert_same_training(tmp_path / "a", straight)
    # 1 process, then 2 ranks
    one_process(dataset, tmp_path / "b", 26, 1)
    result = succeeded(run_job(tmp_path, *train_args(dataset, tmp_path / "b", 13, 2, "--resume")))
    assert "resumed from" in result.stdout and "after epoch 1" in result.stdout
    assert_same_training(tmp_path / "b", straight)


DRIVER = textwrap.dedent("""
    # `gpuconv train` with a planted defect: a broken gradient average on every rank, or a
    # failure of rank 1 at its forward number `at`; or, for `interrupt`, rank 0 tells the test
    # (a file) at its forward number `at` to press Ctrl-C, with the metrics synced every 2 steps.
    import os, signal, sys, time
    from pathlib import Path
    from gpuconv import cli, distributed, models, train

    mode, at = sys.argv[1], int(sys.argv[2])
    average = distributed.ProcessGroup.average_gradients
    if mode == "interrupt":
        config, forward, calls = train.TrainConfig, models.ConvNet.forward, []
        train.TrainConfig = lambda **options: config(**{"sync_every": 2, **options})

        def signalling_forward(self, x):
            calls.append(1)
            if len(calls) == at and distributed.init_process_group().rank == 0:
                Path("press-ctrl-c").touch()
                time.sleep(2)
            return forward(self, x)

        models.ConvNet.forward = signalling_forward
    elif mode == "apart":
        distributed.ProcessGroup.average_gradients = lambda self, optimizer, share: None
    elif mode == "mean":
        distributed.ProcessGroup.average_gradients = (
            lambda self, optimizer, share: average(self, optimizer, 1 / self.world_size))
    elif distributed.init_process_group().rank == 1:
        forward, calls = models.ConvNet.forward, []

        def failing_forward(self, x):
            calls.append(1)
            if len(calls) == at:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif mode == "raise":
                    raise RuntimeError("planted failure on rank 1")
                else:
                    time.sleep(600)
            return forward(self, x)

        models.ConvNet.forward = failing_forward
    sys.exit(cli.main(sys.argv[3:]))
""")


def _fail_mid_epoch_2(tmp_path, dataset, mode: str, *extra: str):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    # Rank 1's forwards in epoch 1: 6 training steps and 3 test batches (19 images, batch 8).
    start = time.monotonic()
    result = run_job(tmp_path, str(script), mode, str(6 + 3 + 2), *train_args(dataset, tmp_path / "run", 8, 3, *extra))
    elapsed = time.monotonic() - start
    assert result.returncode != 0, result.stdout + result.stderr
    checkpoint = train.load_checkpoint(tmp_path / "run" / train.CHECKPOINT)
    assert checkpoint["epoch"] == 1  # the last checkpoint is whole, and no later one was written
    return result, elapsed


@needs_mpi
def test_a_rank_killed_mid_epoch_ends_the_job_naming_it(tmp_path, dataset):
    result, elapsed = _fail_mid_epoch_2(tmp_path, dataset, "kill")
    pid = re.search(r"rank 1: pid (\d+) on ", result.stdout).group(1)
    # The launcher names the dead process by PID; rank 0's table maps that PID to rank 1.
    assert re.search(rf"\b{pid}\b", result.stdout + result.stderr.replace(f"rank 1: pid {pid}", "")), result.stderr
    assert elapsed < 60


@needs_mpi
def test_a_rank_that_raises_aborts_every_rank_with_its_message(tmp_path, dataset):
    result, elapsed = _fail_mid_epoch_2(tmp_path, dataset, "raise")
    assert "gpuconv train: rank 1 of 2: Traceback" in result.stderr
    assert "RuntimeError: planted failure on rank 1" in result.stderr
    assert elapsed < 60


@needs_mpi
def test_a_hung_rank_is_named_once_the_deadline_passes(tmp_path, dataset):
    # The deadline must exceed rank 0's checkpoint save, which rank 1 waits for in its first step.
    result, elapsed = _fail_mid_epoch_2(tmp_path, dataset, "hang", "--dist-timeout", "6")
    assert re.search(r"rank 0 of 2: the gradient all-reduce did not complete within 6 s; "
                     r"rank\(s\) that never reached it: 1\.", result.stderr), result.stderr
    assert elapsed < 60


@needs_mpi
def test_ctrl_c_stops_every_rank_at_one_step_and_the_checkpoint_resumes(tmp_path, dataset):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    argv = train_args(dataset, tmp_path / "run", 4, 2)  # 12 steps per epoch of 2 x 4 images
    job = subprocess.Popen([_find_mpiexec(), "-n", "2", sys.executable, str(script), "interrupt", "4", *argv],
                           env=mpi_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (tmp_path / "press-ctrl-c").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        job.send_signal(signal.SIGINT)  # the launcher passes it to every rank
        stdout, stderr = job.communicate(timeout=JOB_TIMEOUT)
    finally:
        job.kill()
    assert job.returncode == 130, stdout + stderr
    saved = train.load_checkpoint(tmp_path / "run" / train.CHECKPOINT)
    stopped = re.search(r"interrupted at epoch 1, step (\d+) of 12: saved .*; resume with: mpiexec -n 2 ", stderr)
    assert stopped and stderr.count("interrupted at epoch") == 1, stderr  # rank 0 alone says so
    assert saved["partial"]["step"] == int(stopped.group(1)) and saved["partial"]["seen"] == 8 * int(stopped.group(1))
    assert 4 <= saved["partial"]["step"] < 12  # inside the epoch, at a step both ranks agreed on
    succeeded(run_job(tmp_path, *argv, "--resume"))
    one_process(dataset, tmp_path / "one", 8, 2)
    assert_same_training(tmp_path / "run", tmp_path / "one")


@needs_mpi
def test_ranks_started_with_different_options_refuse_to_train(tmp_path, dataset):
    common = train_args(dataset, tmp_path / "run", 8)
    env = mpi_env(tmp_path)
    result = subprocess.run([_find_mpiexec(), "-n", "1", sys.executable, "-m", "gpuconv", *common, "--lr", "0.1", ":",
                             "-n", "1", sys.executable, "-m", "gpuconv", *common, "--lr", "0.2"],
                            env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT, cwd=tmp_path)
    assert result.returncode != 0
    assert ("gpuconv train: rank 1 of 2: the training configuration differs from rank 0's "
            "(lr: 0.2 here, 0.1 on rank 0)") in result.stderr, result.stderr
    assert not (tmp_path / "run" / train.CHECKPOINT).exists()

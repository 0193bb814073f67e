"""The gpuconv command line: train, summary, info, and the forwarding of bench/check-kernels."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from gpuconv import __version__, cli, data, runs, train
from gpuconv.device import cuda_status
from test_train import write_synthetic_dataset


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """Synthetic IDX files, and no other location (Debian package, cache, network) to find data in."""
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name, info in data.DATASETS.items():
        monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(info, system_dir=None))
    return write_synthetic_dataset(tmp_path / "data", n_train=32, n_test=16)


def train_args(root, out, *extra):
    return ["train", "--model", "lenet5", "--dataset", "mnist", "--data-dir", str(root), "--device", "cpu",
            "--epochs", "1", "--batch-size", "16", "--limit-train", "32", "--limit-test", "16",
            "--out", str(out), "--no-progress", *extra]


def test_train_writes_metrics_curves_and_checkpoint(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(synthetic, out, "--optimizer", "adam", "--lr", "0.002", "--lr-step-size", "0")) == 0
    stdout = capsys.readouterr().out
    assert "device: cpu (cpu requested (argument): NumPy CPU path)" in stdout
    assert f"results in {out}" in stdout
    for name in (train.METRICS_JSON, train.METRICS_CSV, train.CURVES_PNG, train.CHECKPOINT):
        assert (out / name).is_file(), name
    metrics = json.loads((out / train.METRICS_JSON).read_text())
    assert metrics["config"]["optimizer"] == "adam" and metrics["config"]["lr"] == 0.002
    assert metrics["config"]["limit_train"] == 32 and metrics["config"]["lr_step_size"] is None
    assert len(metrics["epochs"]) == 1

    assert cli.main(train_args(synthetic, out, "--optimizer", "adam", "--epochs", "2", "--resume")) == 0
    assert f"resumed from {out / train.CHECKPOINT} after epoch 1" in capsys.readouterr().out
    assert [row["epoch"] for row in json.loads((out / train.METRICS_JSON).read_text())["epochs"]] == [1, 2]


def one_line_error(err: str, start: str) -> str:
    """The single stderr line of an expected failure, checked for what a traceback would show."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), err
    assert "Traceback" not in err and "allow_pickle" not in err
    return lines[0]


def test_expected_failures_are_one_line_and_status_2(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(train_args(synthetic, run, "--resume")) == 2
    one_line_error(capsys.readouterr().err, f"gpuconv train: cannot resume: no checkpoint at {run / train.CHECKPOINT}")

    (tmp_path / "a-file").write_text("x")
    assert cli.main(train_args(synthetic, tmp_path / "a-file")) == 2
    one_line_error(capsys.readouterr().err, f"gpuconv train: --out {tmp_path / 'a-file'} is a file, not a directory")

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a checkpoint at all")
    assert cli.main(train_args(synthetic, run, "--resume", str(garbage))) == 2
    one_line_error(capsys.readouterr().err, f"gpuconv train: cannot resume: {garbage} is not a gpuconv checkpoint "
                                            "(not an .npz archive)")

    stateless = tmp_path / "stateless.npz"
    train.save_checkpoint(stateless, {"model_state": {}})  # readable, but no training state ('config')
    assert cli.main(train_args(synthetic, run, "--resume", str(stateless))) == 2
    one_line_error(capsys.readouterr().err, f"gpuconv train: cannot resume: {stateless} holds no training state")

    assert cli.main(train_args(tmp_path / "no-such-dir", run)) == 2
    one_line_error(capsys.readouterr().err,
                   f"gpuconv train: the data directory {tmp_path / 'no-such-dir'} (--data-dir) does not exist")
    (tmp_path / "empty").mkdir()
    assert cli.main(train_args(tmp_path / "empty", run)) == 2
    line = one_line_error(capsys.readouterr().err, f"gpuconv train: the data directory {tmp_path / 'empty'} "
                                                   "(--data-dir) does not hold MNIST (train split): missing")
    assert "train-images-idx3-ubyte[.gz]" in line
    assert not run.exists() or not any(run.iterdir())  # nothing was trained or written


def test_a_dataset_found_nowhere_lists_the_places_tried(synthetic, tmp_path, capsys):
    assert cli.main(["train", "--dataset", "fashion-mnist", "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    line = one_line_error(capsys.readouterr().err, "gpuconv train: Fashion-MNIST (train split) was not found. "
                                                   "Tried, in order: 1. ")
    assert "download: disabled ($GPUCONV_OFFLINE is set). To get it: " in line


def test_says_which_files_were_loaded(synthetic, tmp_path, capsys):
    assert cli.main(train_args(synthetic, tmp_path / "run")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]
    assert lines == [f"data: MNIST from {synthetic}: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                     "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (32 train images, 16 test images)"]
    assert cli.main(train_args(synthetic, tmp_path / "run2")[:-1] + ["--limit-train", "20", "--no-progress"]) == 0
    assert "(the first 20 of 32 train images, 16 test images)" in capsys.readouterr().out


def test_a_run_directory_holding_a_run_is_refused_unless_resumed_or_overwritten(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(train_args(synthetic, run)) == 0
    before = (run / train.CHECKPOINT).read_bytes()
    assert cli.main(train_args(synthetic, run)) == 2
    one_line_error(capsys.readouterr().err, f"gpuconv train: {run} already holds a run (a checkpoint): pass --resume "
                                            "to continue it, --overwrite to replace it, or another --out")
    assert (run / train.CHECKPOINT).read_bytes() == before
    # Resuming another run's checkpoint into it would replace it just the same.
    other = tmp_path / "other"
    assert cli.main(train_args(synthetic, other, "--seed", "5")) == 0
    assert cli.main(train_args(synthetic, run, "--resume", str(other / train.CHECKPOINT))) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(train_args(synthetic, run, "--overwrite", "--seed", "5")) == 0
    assert (run / train.CHECKPOINT).read_bytes() != before
    assert json.loads((run / train.METRICS_JSON).read_text())["config"]["seed"] == 5
    assert not (run / ".lock").exists()  # released and removed at the end
    with pytest.raises(SystemExit) as info:
        cli.main(train_args(synthetic, run, "--overwrite", "--resume"))
    assert info.value.code == 2
    assert "argument --resume: not allowed with argument --overwrite" in capsys.readouterr().err


def test_a_second_run_into_a_directory_in_use_is_refused(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with runs.RunLock(run):  # as a run in another process holds it
        assert cli.main(train_args(synthetic, run)) == 2
        line = one_line_error(capsys.readouterr().err, f"gpuconv train: {run} is in use by another run (pid {os.getpid()} on ")
        assert "wait for it to end or pass another --out" in line
    assert cli.main(train_args(synthetic, run)) == 0


def test_negative_seeds_are_accepted_as_pytorch_does(synthetic, tmp_path, capsys):
    assert cli.main(train_args(synthetic, tmp_path / "a", "--seed", "-1")) == 0
    assert cli.main(train_args(synthetic, tmp_path / "b", "--seed", str(2**64 - 1))) == 0  # the same seed
    a, b = (train.load_checkpoint(tmp_path / name / train.CHECKPOINT)["model_state"] for name in "ab")
    assert all(np.array_equal(a[key], b[key]) for key in a)
    with pytest.raises(SystemExit):
        cli.main(train_args(synthetic, tmp_path / "c", "--seed", str(2**64)))
    assert ("argument --seed: must be an integer in [-9223372036854775808, 18446744073709551615] "
            "(as torch.manual_seed takes), got '18446744073709551616'") in capsys.readouterr().err


def test_emu_without_a_compiler_is_one_line(synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    assert cli.main(train_args(synthetic, tmp_path / "run")[:-1] + ["--device", "emu"]) == 2
    one_line_error(capsys.readouterr().err, f"gpuconv train: --device emu compiles the kernels with a C++17 compiler, "
                                            f"and '{tmp_path / 'no-such-g++'}' was not found")


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_summary", interrupted)
    assert cli.main(["summary", "lenet5"]) == 130
    one_line_error(capsys.readouterr().err, "gpuconv summary: interrupted")


def test_check_kernels_without_nvrtc_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_nvrtc_bindings", lambda: (None, "cuda-bindings are not installed"))
    assert cli.main(["check-kernels"]) == 2
    one_line_error(capsys.readouterr().err, "gpuconv check-kernels: NVRTC is not available: cuda-bindings are not "
                                            "installed; pip install 'gpuconv[nvrtc]'")


@pytest.mark.parametrize("argv,message", [
    (["--lr", "x"], "argument --lr: must be a positive number, got 'x'"),
    (["--lr", "-1"], "argument --lr: must be a positive number, got '-1'"),
    (["--epochs", "1.5"], "argument --epochs: must be a positive integer, got '1.5'"),
    (["--momentum", "nan"], "argument --momentum: must be a non-negative number, got 'nan'"),
    (["--lr-step-size", "-1"], "argument --lr-step-size: must be a non-negative integer, got '-1'"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: must be a positive integer, got '0'"),
    (["--seed", "one"], "argument --seed: must be an integer in"),
])
def test_argparse_messages_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"gpuconv train: error: {message}"), err
    assert "invalid" not in err and "_positive" not in err and "_non_negative" not in err  # argparse's "invalid <function name> value"


def test_expected_failures_from_a_real_process(synthetic, tmp_path):
    """What a user sees: exit status 2 and one line, through the installed entry point's code path."""
    (tmp_path / "a-file").write_text("x")
    result = subprocess.run([sys.executable, "-m", "gpuconv", *train_args(synthetic, tmp_path / "a-file")],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    one_line_error(result.stderr, "gpuconv train: --out")


INTERRUPT_AT_STEP = """
import os, signal, sys
from gpuconv import cli, optim
step, steps_done = optim.Optimizer.step, [0]
def step_then_ctrl_c(self):
    step(self)
    steps_done[0] += 1
    if steps_done[0] == {at}:
        os.kill(os.getpid(), signal.SIGINT)
optim.Optimizer.step = step_then_ctrl_c
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_saves_and_prints_the_command_that_resumes_it_exactly(synthetic, tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    argv = train_args(synthetic, straight, "--epochs", "2", "--batch-size", "4")
    assert cli.main(argv) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    argv = train_args(synthetic, run, "--epochs", "2", "--batch-size", "4")
    result = subprocess.run([sys.executable, "-c", INTERRUPT_AT_STEP.format(at=11), *argv], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 130, result.stderr
    line = one_line_error(result.stderr, f"interrupted at epoch 2, step 3 of 8: saved {run / train.CHECKPOINT}; "
                                         "resume with: ")
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command == ["gpuconv", *argv, "--resume"]
    assert cli.main(command[1:]) == 0
    assert f"resumed from {run / train.CHECKPOINT} at epoch 2, step 3 of 8" in capsys.readouterr().out
    ours, theirs = (json.loads((d / train.METRICS_JSON).read_text())["epochs"] for d in (run, straight))
    for a, b in zip(ours, theirs, strict=True):
        assert {k: v for k, v in a.items() if k not in ("seconds", "images_per_s")} == \
               {k: v for k, v in b.items() if k not in ("seconds", "images_per_s")}


@pytest.mark.parametrize("words,expected", [
    (["train", "--out", "r", "--overwrite"], "gpuconv train --out r --resume"),
    (["train", "--resume", "old/c.npz", "--out", "r"], "gpuconv train --out r --resume"),
    (["train", "--resume", "--out", "r"], "gpuconv train --out r --resume"),
    (["train", "--resume=old.npz", "--data-dir", "my data"], "gpuconv train --data-dir 'my data' --resume"),
])
def test_resume_command(words, expected, monkeypatch):
    monkeypatch.delenv(cli.COMMAND_ENV, raising=False)
    assert cli.resume_command(words) == expected
    monkeypatch.setenv(cli.COMMAND_ENV, "bash scripts/train.sh --epochs 9 --overwrite")
    assert cli.resume_command(words) == "bash scripts/train.sh --epochs 9 --resume"


@pytest.mark.skipif(cuda_status()[0], reason="a CUDA GPU is usable here")
def test_train_on_cuda_without_a_gpu_is_a_clear_error(synthetic, tmp_path, capsys):
    assert cli.main(train_args(synthetic, tmp_path / "run", "--device", "cuda")) == 2
    assert "gpuconv train: device 'cuda' was requested (argument) but is not available" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "--model", "resnet"],
    ["train", "--epochs", "0"],
    ["train", "--lr", "-1"],
    ["train", "--lr-step-size", "-1"],
    ["train", "--momentum", "-0.9"],  # the optimizer would refuse it only after loading the data
    ["train", "--weight-decay", "nan"],
    ["train", "--device", "tpu"],
    ["summary", "nosuchnet"],
    [],
])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: gpuconv" in capsys.readouterr().err


def test_summary(capsys):
    assert cli.main(["summary", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "LeNet5" in out and "(1, 1, 28, 28)" in out and "61,706" in out


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for start in (f"gpuconv: {__version__}", "python: ", "numpy: ", "CuPy: ", "device 'auto' picks: ", "NVRTC: ",
                  "g++ (the emulated device 'emu'): "):
        assert any(line.startswith(start) for line in out.splitlines()), (start, out)


@pytest.mark.parametrize("command,module", [("bench", "gpuconv.bench"), ("check-kernels", "gpuconv.compile_check")])
def test_forwarded_commands_get_their_arguments(command, module, monkeypatch):
    calls = []
    fake = types.ModuleType(module)
    fake.main = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([command, "--quick", "-h"]) == 7
    assert calls == [["--quick", "-h"]]


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "gpuconv", "--version"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == f"gpuconv {__version__}"


def test_info_survives_nvrtc_bindings_without_the_library(monkeypatch, capsys):
    """cuda-bindings raise on the first call when libnvrtc cannot be loaded: `info` says so."""
    bindings = types.ModuleType("cuda.bindings")
    nvrtc = types.ModuleType("cuda.bindings.nvrtc")

    def missing():
        raise RuntimeError("Failed to dlopen libnvrtc.so.13")

    nvrtc.nvrtcVersion = missing
    bindings.nvrtc = nvrtc
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", nvrtc)
    assert cli.main(["info"]) == 0
    assert "NVRTC: cuda-bindings installed, but the library does not load (Failed to dlopen" in capsys.readouterr().out


def test_the_readme_api_example_runs_as_written(tmp_path):
    """On any machine: it picks 'cuda' only where there is a GPU."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## The API"):]
    example = section[section.index("```python\n") + len("```python\n"):]
    example = example[:example.index("```")]
    assert "cuda_status()" in example
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    assert "Total params: 62,378,344" in result.stdout

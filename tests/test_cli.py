"""The gpuconv command line: train, summary, info, and the forwarding of bench/check-kernels."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gpuconv import __version__, cli, data, train
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


def test_train_reports_expected_failures_without_a_traceback(synthetic, tmp_path, capsys):
    assert cli.main(train_args(synthetic, tmp_path / "run", "--resume")) == 1
    assert f"gpuconv train: cannot resume: no checkpoint at {tmp_path / 'run' / train.CHECKPOINT}" in capsys.readouterr().err
    assert cli.main(train_args(tmp_path / "empty", tmp_path / "run", "--dataset", "fashion-mnist")) == 1
    err = capsys.readouterr().err
    assert "Fashion-MNIST (train split) was not found. Tried, in order:" in err
    assert "download: disabled ($GPUCONV_OFFLINE is set)" in err


@pytest.mark.skipif(cuda_status()[0], reason="a CUDA GPU is usable here")
def test_train_on_cuda_without_a_gpu_is_a_clear_error(synthetic, tmp_path, capsys):
    assert cli.main(train_args(synthetic, tmp_path / "run", "--device", "cuda")) == 1
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

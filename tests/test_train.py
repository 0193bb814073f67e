"""gpuconv.train: a real (short) training run, metrics files, checkpoints, resume, divergence."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gpuconv import data, train

DEBIAN_FASHION = Path(data.DATASETS["fashion-mnist"].system_dir)


def write_synthetic_dataset(directory: Path, n_train: int = 512, n_test: int = 128, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped IDX files of an easily separable problem: class k is noise plus a
    bright 7x7 square in cell k of a 4x4 grid."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels):
            row, col = divmod(int(label), 4)
            image[7 * row:7 * row + 7, 7 * col:7 * col + 7] = 220
        data.write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        data.write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


@pytest.fixture
def config(tmp_path, monkeypatch):
    """A small CPU run on the real Fashion-MNIST when the Debian package is installed, else on
    synthetic data written for the test (the test id does not change; the data source is printed)."""
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    if (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        print(f"training on Fashion-MNIST from {DEBIAN_FASHION}")
        root = DEBIAN_FASHION
    else:
        print("Fashion-MNIST is not installed: training on a synthetic separable dataset")
        root = write_synthetic_dataset(tmp_path / "synthetic")
    return train.TrainConfig(model="lenet5", dataset="fashion-mnist", data_dir=str(root), device="cpu", epochs=2,
                             batch_size=16, optimizer="adam", lr=3e-3, limit_train=256, limit_test=256,
                             out=str(tmp_path / "run"), progress=False, sync_every=4)


def quiet(*args):
    pass


def test_training_lowers_the_loss_and_writes_every_output(config):
    history = train.train(config, log=quiet)
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[0]["train_loss"] < math.log(10)  # below chance after one epoch already
    assert history[1]["test_acc"] > 0.4  # chance is 0.1
    for row in history:
        assert set(row) == set(train.COLUMNS)
        assert row["lr"] == 3e-3 and row["seconds"] > 0
        assert row["images_per_s"] == pytest.approx(256 / row["seconds"])

    out = Path(config.out)
    saved = json.loads((out / train.METRICS_JSON).read_text())
    assert saved["model"] == "lenet5" and saved["device"] == "cpu" and saved["epochs"] == history
    with open(out / train.METRICS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == train.COLUMNS
    assert [float(r["test_acc"]) for r in rows] == [row["test_acc"] for row in history]
    assert (out / train.CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = train.load_checkpoint(out / train.CHECKPOINT)
    assert checkpoint["epoch"] == 2 and checkpoint["model"] == "lenet5" and checkpoint["history"] == history
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_checkpoint_round_trip(tmp_path):
    tree = {
        "ints": {0: {"buffer": np.arange(6, dtype=np.float32).reshape(2, 3)}, 7: {"step": 3}},
        "strings": {"a": "b"},
        "tuple": (0.9, 0.999),
        "list": [1, None, True, 2**100, float("inf")],
        "uint8": np.array([1, 2, 255], np.uint8),
        "scalar": np.float32(0.5),
    }
    path = tmp_path / "c.npz"
    train.save_checkpoint(path, tree)
    back = train.load_checkpoint(path)
    assert set(back) == set(tree)
    assert set(back["ints"]) == {0, 7} and back["ints"][7] == {"step": 3}
    np.testing.assert_array_equal(back["ints"][0]["buffer"], tree["ints"][0]["buffer"])
    assert back["ints"][0]["buffer"].dtype == np.float32
    assert back["tuple"] == (0.9, 0.999) and back["list"] == [1, None, True, 2**100, float("inf")]
    assert back["uint8"].dtype == np.uint8 and back["scalar"] == 0.5 and back["strings"] == {"a": "b"}
    with pytest.raises(TypeError, match="cannot store a object in a checkpoint"):
        train.save_checkpoint(path, {"x": object()})


def test_unreadable_checkpoint_is_named(tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=f"{path} is not a readable gpuconv checkpoint"):
        train.load_checkpoint(path)


def test_resume_continues_exactly_where_it_stopped(config):
    # The lr drops after epoch 3, so a resume after epoch 2 must bring back the schedule too.
    config = dataclasses.replace(config, limit_train=64, limit_test=32, epochs=4, lr_step_size=3)
    straight = train.train(dataclasses.replace(config, out=config.out + "-straight"), log=quiet)
    assert [row["lr"] for row in straight] == pytest.approx([3e-3, 3e-3, 3e-3, 3e-4])
    train.train(dataclasses.replace(config, epochs=2), log=quiet)
    messages = []
    resumed = train.train(dataclasses.replace(config, resume=str(Path(config.out) / train.CHECKPOINT)),
                          log=messages.append)
    assert any(m.startswith(f"resumed from {Path(config.out) / train.CHECKPOINT} after epoch 2") for m in messages)
    assert len(resumed) == 4
    for a, b in zip(resumed, straight, strict=True):
        for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == b[key], (key, a, b)


def test_resume_refuses_another_model_and_a_missing_checkpoint(config):
    config = dataclasses.replace(config, limit_train=32, limit_test=32, epochs=1)
    train.train(config, log=quiet)
    path = Path(config.out) / train.CHECKPOINT
    checkpoint = train.load_checkpoint(path)
    checkpoint["config"]["model"] = checkpoint["model"] = "alexnet"
    train.save_checkpoint(path, checkpoint)
    with pytest.raises(train.ResumeError, match=f"checkpoint {path} is of model 'alexnet', but --model is 'lenet5'"):
        train.Trainer(dataclasses.replace(config, resume=str(path)), log=quiet)
    missing = Path(config.out) / "nope.npz"
    with pytest.raises(train.ResumeError, match=f"no checkpoint at {missing}"):
        train.Trainer(dataclasses.replace(config, resume=str(missing)), log=quiet)


def test_interrupted_checkpoint_save_keeps_the_old_one(config, monkeypatch):
    config = dataclasses.replace(config, limit_train=32, limit_test=32, epochs=1)
    train.train(config, log=quiet)
    path = Path(config.out) / train.CHECKPOINT
    before = path.read_bytes()

    def crash_midway(f, **arrays):
        f.write(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(OSError, match="No space left on device"):
        train.train(dataclasses.replace(config, epochs=2, resume=str(path)), log=quiet)
    assert path.read_bytes() == before
    assert train.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [train.CHECKPOINT, train.METRICS_JSON, train.METRICS_CSV, train.CURVES_PNG])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's warnings about the NaNs put in on purpose
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(config):
    config = dataclasses.replace(config, limit_train=32, limit_test=32, epochs=2)
    trainer = train.Trainer(dataclasses.replace(config, epochs=1), log=quiet)
    trainer.fit()
    path = trainer.checkpoint_path
    good = path.read_bytes()
    trainer.config.epochs = 2
    next(iter(trainer.model.parameters())).data[...] = np.nan  # a diverged model
    with pytest.raises(train.TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "the training loss became nan in epoch 2" in message
    assert f"the last good checkpoint (epoch 1) is kept at {path}" in message
    assert path.read_bytes() == good
    assert json.loads((path.parent / train.METRICS_JSON).read_text())["epochs"][-1]["epoch"] == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_before_any_checkpoint_says_so(config):
    trainer = train.Trainer(dataclasses.replace(config, limit_train=32, limit_test=32, epochs=1), log=quiet)
    next(iter(trainer.model.parameters())).data[...] = np.inf
    with pytest.raises(train.TrainingDiverged, match="no checkpoint had been written yet"):
        trainer.fit()
    assert not trainer.checkpoint_path.exists()


@pytest.mark.parametrize("field,value,message", [
    ("optimizer", "rmsprop", "optimizer must be one of sgd, adam; got 'rmsprop'"),
    ("dataset", "cifar", "dataset must be one of fashion-mnist, mnist; got 'cifar'"),
    ("epochs", -1, "epochs must be a non-negative int, got -1"),
    ("batch_size", 0, "batch_size must be a positive int, got 0"),
    ("limit_train", 0, "limit_train must be a positive int or None, got 0"),
    ("lr_step_size", 0, "lr_step_size must be a positive int or None, got 0"),
    ("lr", 0.0, "lr must be positive, got 0.0"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**{field: value})


def test_training_on_the_emulated_device(tmp_path, monkeypatch):
    """The kernel path end to end (the same Python as on 'cuda'): a few steps on 8 images."""
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    root = write_synthetic_dataset(tmp_path / "synthetic", n_train=8, n_test=4)
    config = train.TrainConfig(data_dir=str(root), device="emu", epochs=1, batch_size=4, optimizer="adam",
                               lr=1e-3, out=str(tmp_path / "run"), progress=False)
    history = train.train(config, log=quiet)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    state = train.load_checkpoint(Path(config.out) / train.CHECKPOINT)["model_state"]
    assert all(type(a) is np.ndarray and np.isfinite(a).all() for a in state.values())

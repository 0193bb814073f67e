"""gpuconv.train: a real (short) training run, metrics files, checkpoints, resume, divergence."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from gpuconv import data, runs, train

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
    assert f"the last good checkpoint (end of epoch 1) is kept at {path}" in message
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


# ---------------------------------------------------------------------------------------------
# Runs that never lose work

def small_net_with_dropout(name, num_classes):
    """A model whose steps draw from the random source (dropout), so resuming must restore it."""
    from gpuconv import models, nn

    return models.ConvNet(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2)),
                          nn.Sequential(nn.Dropout(0.5), nn.Linear(4 * 6 * 6, num_classes)), (1, 28, 28))


@pytest.fixture
def short(config, tmp_path, monkeypatch):
    """Two epochs of 8 steps, an lr that changes after each epoch, a model with dropout; small
    synthetic data, since each test builds several trainers."""
    monkeypatch.setattr(train, "get_model", small_net_with_dropout)
    root = write_synthetic_dataset(tmp_path / "small", n_train=64, n_test=16)
    return dataclasses.replace(config, data_dir=str(root), limit_train=None, limit_test=None, batch_size=8, epochs=2,
                               lr_step_size=1, lr_gamma=0.5, optimizer="sgd", lr=0.05)


def on_step(trainer, action):
    """Call ``action(n)`` after the trainer's n-th training step (n counts from 1)."""
    step, count = trainer._train_step, [0]

    def counted(*batch):  # (x, y, share)
        result = step(*batch)
        count[0] += 1
        action(count[0])
        return result

    trainer._train_step = counted


def without_timings(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in history]


def assert_same_run(a: train.Trainer, b: train.Trainer):
    assert without_timings(a.history) == without_timings(b.history)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)  # bit for bit
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(np.array_equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"]) for i in oa)
    assert a.optimizer.lr == b.optimizer.lr


def uninterrupted(config: train.TrainConfig) -> train.Trainer:
    """The reference: the same run, in a directory of its own, never stopped."""
    trainer = train.Trainer(dataclasses.replace(config, out=config.out + "-straight"), log=quiet)
    trainer.fit()
    return trainer


def resumed_from(config: train.TrainConfig, interrupted: train.Trainer) -> train.Trainer:
    """``config`` resumed from ``interrupted``'s checkpoint and run to its end."""
    trainer = train.Trainer(dataclasses.replace(config, resume=str(interrupted.checkpoint_path)), log=quiet)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("stop_at", [3, 8, 13])  # inside epoch 1, at its last step, inside epoch 2
def test_an_interrupted_run_resumes_bit_for_bit(short, stop_at):
    straight = uninterrupted(short)
    first = train.Trainer(short, log=quiet)
    on_step(first, lambda n: n == stop_at and first.request_stop())
    with pytest.raises(train.TrainingInterrupted) as info:
        first.fit()
    epoch, step = divmod(stop_at - 1, 8)
    assert (info.value.epoch, info.value.step, info.value.steps) == (epoch + 1, step + 1, 8)
    assert str(info.value).startswith(f"interrupted at epoch {epoch + 1}, step {step + 1} of 8: saved "
                                      f"{first.checkpoint_path}")
    assert not (Path(short.out) / ".lock").exists()
    saved = train.load_checkpoint(first.checkpoint_path)
    assert saved["partial"]["epoch"] == epoch + 1 and saved["partial"]["step"] == step + 1
    messages = []
    resumed = train.Trainer(dataclasses.replace(short, resume=str(first.checkpoint_path)), log=messages.append)
    assert f"resumed from {first.checkpoint_path} at epoch {epoch + 1}, step {step + 1} of 8" in messages[-1]
    resumed.fit()
    assert_same_run(resumed, straight)


@pytest.mark.parametrize("graph", [False, True])
def test_an_interrupted_run_resumes_bit_for_bit_on_the_kernel_path(short, graph):
    """On 'emu', the Python 'cuda' runs, eagerly and with the step captured as a CUDA graph."""
    short = dataclasses.replace(short, device="emu", graph=graph, epochs=1)
    straight = uninterrupted(short)
    first = train.Trainer(short, log=quiet)
    on_step(first, lambda n: n == 3 and first.request_stop())
    with pytest.raises(train.TrainingInterrupted):
        first.fit()
    resumed = resumed_from(short, first)
    assert_same_run(resumed, straight)


def test_fit_again_after_an_interruption_continues_in_memory(short):
    straight = uninterrupted(short)
    trainer = train.Trainer(short, log=quiet)
    on_step(trainer, lambda n: n == 5 and trainer.request_stop())
    with pytest.raises(train.TrainingInterrupted):
        trainer.fit()
    trainer.fit()
    assert_same_run(trainer, straight)


def test_an_interruption_during_evaluation_resumes_with_the_evaluation(short):
    straight = uninterrupted(short)
    first = train.Trainer(short, log=quiet)
    evaluate = first.evaluate

    def stop_then_evaluate():
        first.request_stop()
        return evaluate()

    first.evaluate = stop_then_evaluate
    with pytest.raises(train.TrainingInterrupted) as info:
        first.fit()
    assert (info.value.epoch, info.value.step) == (1, 8)
    assert train.load_checkpoint(first.checkpoint_path)["history"] == []  # epoch 1 not evaluated yet
    resumed = resumed_from(short, first)
    assert_same_run(resumed, straight)


def test_checkpoint_every_n_steps_survives_a_crash(short):
    straight = uninterrupted(short)
    config = dataclasses.replace(short, checkpoint_every=3)
    first = train.Trainer(config, log=quiet)
    saved = []
    save = train.save_checkpoint

    def power_cut(n):
        if n == 11:
            raise OSError("power cut")

    on_step(first, power_cut)
    train.save_checkpoint = lambda path, checkpoint: saved.append(checkpoint["partial"]) or save(path, checkpoint)
    try:
        with pytest.raises(OSError, match="power cut"):
            first.fit()
    finally:
        train.save_checkpoint = save
    # Global steps 3 and 6 inside epoch 1, the end of epoch 1 (step 8), then step 9 (global) = epoch 2, step 1.
    assert [p and (p["epoch"], p["step"]) for p in saved] == [(1, 3), (1, 6), None, (2, 1)]
    resumed = resumed_from(config, first)
    assert_same_run(resumed, straight)


def test_a_mid_epoch_checkpoint_needs_the_same_batches(short):
    first = train.Trainer(short, log=quiet)
    on_step(first, lambda n: n == 2 and first.request_stop())
    with pytest.raises(train.TrainingInterrupted):
        first.fit()
    with pytest.raises(train.ResumeError, match="stopped inside epoch 1 with --batch-size 8, but --batch-size is 4"):
        train.Trainer(dataclasses.replace(short, batch_size=4, resume=str(first.checkpoint_path)), log=quiet)


def test_a_directory_holding_a_run_is_refused_and_overwrite_replaces_it(short):
    train.train(dataclasses.replace(short, epochs=1), log=quiet)
    out = Path(short.out)
    before = {name: (out / name).read_bytes() for name in (train.CHECKPOINT, train.METRICS_JSON)}
    with pytest.raises(train.RunDirectoryError, match=f"^{out} already holds a run \\(a checkpoint\\): pass --resume"):
        train.Trainer(short, log=quiet)
    assert {name: (out / name).read_bytes() for name in before} == before
    (out / "notes.txt").write_text("mine")  # not one of the run's files: kept
    history = train.train(dataclasses.replace(short, epochs=1, seed=3, overwrite=True), log=quiet)
    assert json.loads((out / train.METRICS_JSON).read_text())["epochs"] == history
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        dataclasses.replace(short, resume="x", overwrite=True)


def test_a_run_that_slipped_in_after_the_check_is_not_overwritten(short):
    late = train.Trainer(short, log=quiet)  # checked: the directory was empty
    train.train(dataclasses.replace(short, epochs=1), log=quiet)  # another run finishes there meanwhile
    before = (Path(short.out) / train.CHECKPOINT).read_bytes()
    with pytest.raises(train.RunDirectoryError, match="already holds a run"):
        late.fit()
    assert (Path(short.out) / train.CHECKPOINT).read_bytes() == before


def test_the_lock_refuses_a_second_run_and_names_the_first(short, tmp_path):
    out = Path(short.out)
    out.mkdir()
    trainer = train.Trainer(short, log=quiet)
    with runs.RunLock(out):
        assert "pid " in (out / runs.LOCK).read_text()
        with pytest.raises(train.RunDirectoryError, match=f"{out} is in use by another run \\(pid {os.getpid()} on "):
            trainer.fit()
        with pytest.raises(train.RunDirectoryError, match="in use by another run"):
            runs.RunLock(out).acquire()
    assert not (out / runs.LOCK).exists()
    trainer.fit()  # free again


def test_checkpoints_without_training_state_or_unreadable_are_resume_errors(short, tmp_path):
    stateless = tmp_path / "stateless.npz"
    train.save_checkpoint(stateless, {"model_state": {}})
    with pytest.raises(train.ResumeError, match="holds no training state \\(it lacks config, epoch, "):
        train.Trainer(dataclasses.replace(short, resume=str(stateless)), log=quiet)
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([object()]), allow_pickle=True)
    with pytest.raises(train.ResumeError) as info:
        train.Trainer(dataclasses.replace(short, resume=str(pickled)), log=quiet)
    assert "allow_pickle" not in str(info.value) and "not a gpuconv checkpoint" in str(info.value)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, about the NaNs put in on purpose
def test_metrics_from_the_first_step(short):
    """The loss is read back at step 1 already (not only every sync_every steps): a NaN stops there."""
    trainer = train.Trainer(dataclasses.replace(short, sync_every=50), log=quiet)
    next(iter(trainer.model.parameters())).data[...] = np.nan
    steps = []
    on_step(trainer, steps.append)
    with pytest.raises(train.TrainingDiverged, match="training loss became nan"):
        trainer.fit()
    assert steps == [1]


def test_a_long_epoch_is_announced_with_hints(short, monkeypatch, capsys):
    monkeypatch.setattr(train, "LONG_EPOCH_S", 0.0)
    messages = []
    train.train(dataclasses.replace(short, epochs=1, batch_size=1, limit_train=24, progress=True), log=messages.append)
    notes = [m for m in messages if m.startswith("note: one epoch will take about")]
    assert len(notes) == 1, messages
    assert "s per step, 24 steps); --limit-train N trains on fewer images; a GPU (--device cuda) is far faster" in notes[0]
    assert "test: " in capsys.readouterr().err  # the evaluation has a progress bar too


def test_format_duration():
    assert [train.format_duration(s) for s in (5, 89, 600, 5399, 8280)] == ["5 s", "89 s", "10 min", "1 h 30 min", "2 h 18 min"]

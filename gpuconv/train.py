"""Training: the loop behind ``gpuconv train``, its metrics, curves and checkpoints.

One epoch trains on the whole (or ``limit_train``) training split, evaluates on the test split,
then writes, in ``out``: ``metrics.json`` and ``metrics.csv`` (one row per epoch: epoch,
train_loss, train_acc, test_loss, test_acc, seconds, images_per_s, lr), ``curves.png`` and
``checkpoint.npz``.

Device traffic: the datasets live on the training device (:class:`gpuconv.data.DeviceDataset`),
and the loss sum and the count of correct predictions are accumulated there too. The host reads
them back, two scalars, only every ``sync_every`` steps (to refresh the progress bar and to check
that the loss is finite) and at the end of the epoch: the loop itself adds no host-device round
trip to a step.
``seconds`` is the wall time of the training pass, measured after that final read-back (so it
covers the device's work), and ``images_per_s`` is training images over ``seconds``.

Checkpoints are written atomically (a temporary file in the same directory, fsynced, then
renamed), so an interrupted save leaves the previous checkpoint whole. A checkpoint is only ever
written after an epoch whose training and test losses are finite: when the loss becomes NaN or
infinite, training stops with :class:`TrainingDiverged` and the last good checkpoint stays.
The checkpoint is an ``.npz`` (arrays) with a JSON tree for everything else; it loads with
``allow_pickle=False``, so reading one never runs code.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__, data, distributed, nn, optim
from .device import array_module, resolve_device, to_numpy
from .models import get_model
from .random import generator, manual_seed

CHECKPOINT = "checkpoint.npz"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "images_per_s", "lr")
OPTIMIZERS = ("sgd", "adam")
_FORMAT = 1


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on (the CLI's options).

    The defaults (SGD, lr 0.02, momentum 0.9, batch 64, lr divided by 10 after epoch 4) take
    LeNet-5 past 89% Fashion-MNIST test accuracy in 5 epochs (see the project's measured results).
    """

    model: str = "lenet5"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    device: str = "auto"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.02
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_step_size: int | None = 4  # StepLR: multiply lr by lr_gamma every lr_step_size epochs; None: constant
    lr_gamma: float = 0.1
    seed: int = 0
    out: str | None = None  # default runs/<model>
    resume: str | None = None  # a checkpoint path
    limit_train: int | None = None
    limit_test: int | None = None
    download: bool = True
    sync_every: int = 50
    progress: bool = True
    dist_timeout: float = distributed.DEFAULT_TIMEOUT  # seconds a rank waits for the others (MPI jobs)

    def __post_init__(self):
        if self.out is None:
            self.out = f"runs/{self.model}"
        if self.dataset not in data.DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(data.DATASETS)}; got {self.dataset!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "sync_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} int, got {value!r}")
        for name in ("limit_train", "limit_test", "lr_step_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be positive, got {self.dist_timeout!r}")


class ResumeError(ValueError):
    """A checkpoint to resume from is missing or belongs to another model, dataset or optimizer."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says when and which checkpoint was kept."""


# ---------------------------------------------------------------------------------------------
# Checkpoints: arrays in an .npz, everything else in a JSON tree that refers to them by key.

def _encode(value, arrays: dict):
    if isinstance(value, dict):
        return {"dict": [[_encode(k, arrays), _encode(v, arrays)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, arrays) for v in value]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        key = f"array{len(arrays)}"
        arrays[key] = to_numpy(value)
        return {"array": key}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def _decode(node, arrays):
    if isinstance(node, dict):
        (kind, body), = node.items()
        if kind == "array":
            return arrays[body]
        if kind == "dict":
            return {_decode(k, arrays): _decode(v, arrays) for k, v in body}
        items = [_decode(v, arrays) for v in body]
        return tuple(items) if kind == "tuple" else items
    return node


def save_checkpoint(path, checkpoint: dict) -> None:
    """Write ``checkpoint`` (nested dicts, lists, scalars and arrays on any device) atomically."""
    arrays: dict = {}
    tree = json.dumps(_encode(checkpoint, arrays))
    arrays["__tree__"] = np.frombuffer(tree.encode(), dtype=np.uint8)
    data.atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; arrays come back as NumPy arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        tree = json.loads(arrays.pop("__tree__").tobytes())
    except FileNotFoundError:
        raise
    except Exception as exc:  # a zip, npy or JSON error: the file is not a whole checkpoint
        raise ValueError(f"{path} is not a readable gpuconv checkpoint ({type(exc).__name__}: {exc})") from None
    return _decode(tree, arrays)


# ---------------------------------------------------------------------------------------------
# Outputs

def write_metrics(out: Path, history: list[dict], info: dict) -> None:
    data.atomic_write(out / METRICS_JSON, lambda f: f.write(json.dumps({**info, "epochs": history}, indent=2).encode()))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    data.atomic_write(out / METRICS_CSV, lambda f: f.write(text.getvalue().encode()))


def plot_curves(path: Path, history: list[dict], title: str) -> None:
    """Loss and accuracy per epoch, train and test, as a PNG."""
    # A bare Figure draws through Agg without pyplot: no GUI backend is chosen and the caller's
    # own matplotlib backend stays as it was.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    for axes, metric, label in zip(figure.subplots(1, 2), ("loss", "acc"), ("cross-entropy loss", "accuracy")):
        for split in ("train", "test"):
            axes.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    data.atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))


# ---------------------------------------------------------------------------------------------
# The trainer

def make_optimizer(config: TrainConfig, params):
    if config.optimizer == "sgd":
        return optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


class Trainer:
    """Builds the model, optimizer and device-resident datasets of a :class:`TrainConfig`
    (resuming from ``config.resume`` if set); :meth:`fit` runs the remaining epochs.

    Started by an MPI launcher, it is one rank of a data-parallel job (:mod:`gpuconv.distributed`):
    ``batch_size`` is per rank, and only rank 0 logs and writes files."""

    def __init__(self, config: TrainConfig, log=print):
        self.config = config
        self.group = distributed.init_process_group(config.dist_timeout)
        self.log = log if self.group.is_main else _silent
        self.out = Path(config.out)
        self.device, reason = resolve_device(config.device)
        where = self.group.use_device(self.device)
        self.log(f"device: {self.device} ({reason})")
        if self.group.is_distributed:
            self.group.check_same(dataclasses.asdict(config), "the training configuration")
            world = self.group.world_size
            self.log(f"data-parallel over {world} MPI ranks: global batch {world} x {config.batch_size} = "
                     f"{world * config.batch_size}")
            for line in distributed.describe_ranks(self.group, where):
                self.log(f"  {line}")
        manual_seed(config.seed)
        self.model = get_model(config.model, num_classes=len(data.DATASETS[config.dataset].classes)).to(self.device)
        self.optimizer = make_optimizer(config, self.model.parameters())
        self.scheduler = (optim.StepLR(self.optimizer, config.lr_step_size, config.lr_gamma)
                          if config.lr_step_size else None)
        # The datasets check their labels once when loaded (DeviceDataset).
        self.criterion = nn.CrossEntropyLoss(validate_target=False)
        with self.group.main_first():  # rank 0 alone downloads a missing dataset
            self.train_set = self._dataset("train", config.limit_train)
            self.test_set = self._dataset("test", config.limit_test)
        rank, world = self.group.rank, self.group.world_size
        self.train_sampler = distributed.DistributedSampler(len(self.train_set), rank, world, seed=config.seed)
        self.test_order = (distributed.DistributedSampler(len(self.test_set), rank, world, shuffle=False).indices(0)
                           if self.group.is_distributed else None)
        self.history: list[dict] = []
        self.epochs_done = 0
        if config.resume is not None:
            self._resume(Path(config.resume))

    def _dataset(self, split: str, limit: int | None) -> data.DeviceDataset:
        c = self.config
        images, labels = data.load_dataset(c.dataset, split, root=c.data_dir, download=c.download)
        return data.DeviceDataset(images[:limit], labels[:limit], self.device, c.dataset, self.model.input_shape)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def _resume(self, path: Path) -> None:
        # Rank 0 reads the checkpoint and sends it to the others, which need no copy of the file.
        if self.group.is_main and not path.is_file():
            raise ResumeError(f"cannot resume: no checkpoint at {path}")
        checkpoint = self.group.broadcast_object(load_checkpoint(path) if self.group.is_main else None,
                                                 what=f"the checkpoint {path}")
        for key, flag in (("model", "--model"), ("dataset", "--dataset"), ("optimizer", "--optimizer")):
            theirs, ours = checkpoint["config"][key], getattr(self.config, key)
            if theirs != ours:
                raise ResumeError(f"cannot resume: checkpoint {path} is of {key} {theirs!r}, but {flag} is {ours!r}")
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.scheduler is not None:
            if checkpoint["scheduler_state"] is not None:
                self.scheduler.load_state_dict(checkpoint["scheduler_state"])
            else:  # the checkpoint's run had a constant lr: the schedule counts from here
                self.scheduler.last_epoch = checkpoint["epoch"]
        generator().bit_generator.state = checkpoint["rng_state"]
        self.history = checkpoint["history"]
        self.epochs_done = checkpoint["epoch"]
        self.log(f"resumed from {path} after epoch {self.epochs_done} (the optimizer's hyper-parameters "
                 f"are the checkpoint's: lr {self.optimizer.lr:g})")

    def _checkpoint(self) -> dict:
        return {
            "format": _FORMAT,
            "gpuconv_version": __version__,
            "model": self.config.model,
            "config": dataclasses.asdict(self.config),
            "epoch": self.epochs_done,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng_state": generator().bit_generator.state,
            "history": self.history,
        }

    def _diverged(self, what: str, value: float, epoch: int) -> TrainingDiverged:
        kept = (f"the last good checkpoint (epoch {self.epochs_done}) is kept at {self.checkpoint_path}"
                if self.epochs_done and self.checkpoint_path.is_file() else "no checkpoint had been written yet")
        return TrainingDiverged(f"training diverged: the {what} became {value} in epoch {epoch}; "
                                f"training stopped and {kept}. Try a smaller --lr.")

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """One pass over the training set: (mean loss, accuracy, seconds)."""
        c, xp = self.config, array_module(self.device)
        self.model.train()
        loss_sum, correct, seen = xp.zeros((), np.float64), xp.zeros((), np.int64), 0
        steps = self.train_sampler.num_steps(c.batch_size)
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{c.epochs}", unit="batch", leave=False,
                   disable=not c.progress or not self.group.is_main)
        start = time.perf_counter()
        with bar:
            batches = distributed.shard_batches(self.train_set, self.train_sampler, c.batch_size, epoch)
            for step, (x, y, share) in enumerate(batches, 1):
                if y is not None:  # None: this rank's shard ran out before the epoch's last global step
                    logits = self.model(x)
                    loss = self.criterion(logits, y)
                    self.model.backward(self.criterion.backward())
                    loss_sum = loss_sum + loss * len(y)
                    correct = correct + (logits.argmax(axis=1) == y).sum()
                    seen += len(y)
                self.group.average_gradients(self.optimizer, share)
                self.optimizer.step()
                self.optimizer.zero_grad()
                if step % c.sync_every == 0 or step == steps:
                    total_loss, total_correct, total_seen = self._sum_over_ranks(loss_sum, correct, seen)
                    mean_loss, accuracy = total_loss / total_seen, total_correct / total_seen
                    if not math.isfinite(mean_loss):
                        raise self._diverged("training loss", mean_loss, epoch)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{accuracy:.4f}",
                                    img_s=f"{total_seen / elapsed:.0f}", refresh=False)
                bar.update()
        return mean_loss, accuracy, time.perf_counter() - start

    def _sum_over_ranks(self, *values) -> list[float]:
        """Host values (device scalars read back) summed over the ranks: the job's metrics."""
        self.group.wait_for_device("the device work before the metrics")
        totals = np.array([float(value) for value in values], np.float64)
        return self.group.allreduce_sum(totals, what="the sum of the metrics").tolist()

    def evaluate(self) -> tuple[float, float]:
        """(mean loss, accuracy) on the test set, in evaluation mode."""
        xp = array_module(self.device)
        self.model.eval()
        loss_sum, correct = xp.zeros((), np.float64), xp.zeros((), np.int64)
        for x, y in self.test_set.batches(self.config.batch_size, order=self.test_order):
            logits = self.model(x)
            loss_sum = loss_sum + self.criterion(logits, y) * len(y)
            correct = correct + (logits.argmax(axis=1) == y).sum()
        self.model.train()
        loss_sum, correct = self._sum_over_ranks(loss_sum, correct)
        return loss_sum / len(self.test_set), correct / len(self.test_set)

    def fit(self) -> list[dict]:
        """Train until ``config.epochs`` epochs are done; returns the metrics of every epoch."""
        c = self.config
        if self.group.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.epochs_done >= c.epochs:
            self.log(f"nothing to do: {self.epochs_done} of {c.epochs} epochs are done")
        info = {"model": c.model, "dataset": c.dataset, "device": self.device, "ranks": self.group.world_size,
                "config": dataclasses.asdict(c)}
        for epoch in range(self.epochs_done + 1, c.epochs + 1):
            lr = float(self.optimizer.lr)
            train_loss, train_acc, seconds = self.train_epoch(epoch)
            if self.scheduler is not None:
                self.scheduler.step()
            test_loss, test_acc = self.evaluate()
            if not math.isfinite(test_loss):
                raise self._diverged("test loss", test_loss, epoch)
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
                   "test_acc": test_acc, "seconds": seconds, "images_per_s": len(self.train_set) / seconds,
                   "lr": lr}
            self.history.append(row)
            self.epochs_done = epoch
            if self.group.is_main:
                save_checkpoint(self.checkpoint_path, self._checkpoint())
                write_metrics(self.out, self.history, info)
                plot_curves(self.out / CURVES_PNG, self.history, f"{c.model} on {c.dataset} ({self.device})")
            self.log(f"epoch {epoch}/{c.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                     f"test loss {test_loss:.4f} acc {test_acc:.4f} | {seconds:.1f} s, "
                     f"{row['images_per_s']:.0f} images/s")
        return self.history


def _silent(*args) -> None:
    """The log of ranks other than 0."""


def train(config: TrainConfig | None = None, log=print, **overrides) -> list[dict]:
    """Run a training job: ``train(TrainConfig(...))`` or ``train(model='lenet5', epochs=5, ...)``."""
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    return Trainer(config, log=log).fit()

"""Training: the loop behind ``gpuconv train``, its metrics, curves and checkpoints.

One epoch trains on the whole (or ``limit_train``) training split, evaluates on the test split,
then writes, in ``out``: ``metrics.json`` and ``metrics.csv`` (one row per epoch: epoch,
train_loss, train_acc, test_loss, test_acc, seconds, images_per_s, lr), ``curves.png`` and
``checkpoint.npz``. A directory that already holds a run is refused unless the run resumes its
checkpoint or ``overwrite`` is set, and one run at a time holds it (:mod:`gpuconv.runs`).

Device traffic: the datasets live on the training device (:class:`gpuconv.data.DeviceDataset`),
and the loss sum and the count of correct predictions are accumulated there too. The host reads
them back, two scalars, at the first step, then about once a second and at least every
``sync_every`` steps (to refresh the progress bar and to check that the loss is finite), and at
the end of the epoch: the loop itself adds no host-device round trip to a step.
``seconds`` is the wall time of the training pass, measured after that final read-back (so it
covers the device's work), and ``images_per_s`` is training images over ``seconds``.

Stopping: :meth:`Trainer.request_stop` (what Ctrl-C calls during :meth:`Trainer.fit`; a second
Ctrl-C stops at once, saving nothing) ends the run after the step in progress, with a checkpoint
of that point: the model, optimizer, schedule, random state and the epoch's partial loss and
accuracy. Resuming it continues the same epoch at the next step, in the same data order, and
gives bit for bit the run that was never interrupted. ``checkpoint_every`` writes such a
checkpoint every N training steps as well.

A checkpoint is only ever written from finite losses: when the loss becomes NaN or infinite,
training stops with :class:`TrainingDiverged` and the last good checkpoint stays.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__, data, distributed, graphs, nn, optim
from .device import array_module, resolve_device
from .models import get_model
from .random import generator, manual_seed, normalize_seed
from .runs import (CHECKPOINT, CURVES_PNG, METRICS_CSV, METRICS_JSON, CheckpointError, RunDirectoryError, RunLock,
                   load_checkpoint, make_run_directory, prepare_run_directory, run_signature, save_checkpoint)

__all__ = ["TrainConfig", "Trainer", "train", "ResumeError", "TrainingDiverged", "TrainingInterrupted",
           "RunDirectoryError", "save_checkpoint", "load_checkpoint", "CHECKPOINT", "METRICS_JSON", "METRICS_CSV",
           "CURVES_PNG", "COLUMNS", "OPTIMIZERS"]

COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "images_per_s", "lr")
OPTIMIZERS = ("sgd", "adam")
_FORMAT = 2  # 2 adds "partial", the position inside an epoch; 1 (epoch ends only) still loads
_TRAINING_STATE = ("config", "epoch", "model_state", "optimizer_state", "scheduler_state", "rng_state", "history")
LONG_EPOCH_S = 180  # an epoch estimated to take longer than this gets a one-line warning


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on (the CLI's options).

    The defaults (SGD, lr 0.02, momentum 0.9, batch 64, lr divided by 10 after epoch 4) take
    LeNet-5 past 89% Fashion-MNIST test accuracy in 5 epochs (see the project's measured results).
    ``seed`` is any int ``torch.manual_seed`` takes, negative ones included.
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
    overwrite: bool = False  # replace the run already in ``out``
    checkpoint_every: int | None = None  # also checkpoint every N training steps
    limit_train: int | None = None
    limit_test: int | None = None
    download: bool = True
    sync_every: int = 50
    progress: bool = True
    dist_timeout: float = distributed.DEFAULT_TIMEOUT  # seconds a rank waits for the others (MPI jobs)
    graph: bool | None = None  # capture the training step as a CUDA graph; None: on 'cuda' only

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
        for name in ("limit_train", "limit_test", "lr_step_size", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be positive, got {self.dist_timeout!r}")
        normalize_seed(self.seed)
        if self.resume is not None and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: a resumed run continues the one in out")


class ResumeError(ValueError):
    """A checkpoint to resume from is missing, unreadable, or of another model, dataset or optimizer."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says when and which checkpoint was kept."""


class TrainingInterrupted(Exception):
    """:meth:`Trainer.request_stop` (Ctrl-C) ended the run; a checkpoint of that point was saved."""

    def __init__(self, message: str, checkpoint: Path, epoch: int, step: int, steps: int):
        super().__init__(message)
        self.checkpoint, self.epoch, self.step, self.steps = checkpoint, epoch, step, steps


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


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"


# ---------------------------------------------------------------------------------------------
# The trainer

def make_optimizer(config: TrainConfig, params):
    if config.optimizer == "sgd":
        return optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


@dataclasses.dataclass
class _EpochProgress:
    """Where a training pass stands: the next step's position and the sums so far."""

    epoch: int
    step: int = 0  # steps done in this epoch
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


def print_flushed(line: str) -> None:
    """The default log: each line reaches a pipe (mpiexec, tee, a CI log) when it is said, so a
    process that its launcher kills has lost none of what it printed (the rank table above all)."""
    print(line, flush=True)


class Trainer:
    """Builds the model, optimizer and device-resident datasets of a :class:`TrainConfig`
    (resuming from ``config.resume`` if set); :meth:`fit` runs the remaining epochs.

    Started by an MPI launcher, it is one rank of a data-parallel job (:mod:`gpuconv.distributed`):
    ``batch_size`` is per rank; rank 0 alone logs, owns the run directory and writes files."""

    def __init__(self, config: TrainConfig, log=print_flushed):
        self.config = config
        self.group = distributed.init_process_group(config.dist_timeout)
        main = self.group.is_main
        self.log = log if main else _silent
        self.out = Path(config.out)
        if self.group.is_distributed:
            self.group.check_same(dataclasses.asdict(config), "the training configuration")
        resume = Path(config.resume) if config.resume is not None else None
        checkpoint = self._read_checkpoint(resume) if resume is not None and main else None  # fail before loading data
        if main:
            make_run_directory(self.out)
            # Checked again under the lock in fit(); here too, so that a refused run fails before loading anything.
            with RunLock(self.out):
                self._signature = prepare_run_directory(self.out, resume, config.overwrite, remove=False)
        if resume is not None:  # rank 0 sends it: the other ranks need no copy of the file
            checkpoint = self.group.broadcast_object(checkpoint, what=f"the checkpoint {resume}")
        self.device, reason = resolve_device(config.device)
        where = self.group.use_device(self.device)
        self.log(f"device: {self.device} ({reason})")
        if self.group.is_distributed:
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
        self.history: list[dict] = []
        self.epochs_done = 0
        # CUDA graphs of the training step: default on 'cuda'; on 'emu' when asked (tests).
        self.use_graph = self.device == "cuda" if config.graph is None else bool(config.graph) and self.device != "cpu"
        if config.graph and self.device == "cpu":
            self.log("note: --graph has no effect on the cpu device (CUDA graphs replay 'cuda' or 'emu' work)")
        # Not in an MPI job yet: the gradient all-reduce sits inside the step, and NCCL inside a
        # captured graph awaits a test on several GPUs.
        self.use_graph = self.use_graph and not self.group.is_distributed
        self._graphed = None
        self._progress: _EpochProgress | None = None  # a resumed or finished-but-unevaluated epoch
        self._stop = False
        self._stop_pending = False  # a stop asked for on this rank, not yet agreed by all (MPI jobs)
        self._estimated = False
        self._saved_at: str | None = None  # where the last checkpoint written or resumed stands
        with self.group.main_first():  # rank 0 alone downloads a missing dataset
            self.train_set, self.test_set = self._load_data()
        rank, world = self.group.rank, self.group.world_size
        self.train_sampler = distributed.DistributedSampler(len(self.train_set), rank, world, seed=config.seed)
        self.test_order = (distributed.DistributedSampler(len(self.test_set), rank, world, shuffle=False).indices(0)
                           if self.group.is_distributed else None)
        if checkpoint is not None:
            self._restore(checkpoint, resume)

    def _load_data(self) -> tuple[data.DeviceDataset, data.DeviceDataset]:
        c = self.config
        sets, files, counts = [], [], []
        for split, limit in (("train", c.limit_train), ("test", c.limit_test)):
            paths = data.locate_dataset(c.dataset, split, root=c.data_dir, download=c.download)
            images, labels = data.read_split(paths, c.dataset)
            sets.append(data.DeviceDataset(images[:limit], labels[:limit], self.device, c.dataset,
                                           self.model.input_shape))
            files += paths
            first = f"the first {len(sets[-1]):,} of " if len(sets[-1]) < len(labels) else ""
            counts.append(f"{first}{len(labels):,} {split} images")
        folders = {path.parent for path in files}
        where = (f"{folders.pop()}: {', '.join(path.name for path in files)}" if len(folders) == 1
                 else ", ".join(map(str, files)))
        self.log(f"data: {data.DATASETS[c.dataset].title} from {where} ({', '.join(counts)})")
        return sets[0], sets[1]

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def _read_checkpoint(self, path: Path) -> dict:
        """The checkpoint to resume from, checked against this run's configuration."""
        if not path.is_file():
            raise ResumeError(f"cannot resume: no checkpoint at {path}")
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as exc:
            raise ResumeError(f"cannot resume: {exc}") from None
        missing = [key for key in _TRAINING_STATE if key not in checkpoint]
        if missing:
            raise ResumeError(f"cannot resume: {path} holds no training state (it lacks {', '.join(missing)}); "
                              f"it was not written by `gpuconv train`")
        if checkpoint.get("format", 1) > _FORMAT:
            raise ResumeError(f"cannot resume: {path} has checkpoint format {checkpoint['format']}, newer than this "
                              f"gpuconv {__version__} reads ({_FORMAT}); upgrade gpuconv")
        theirs_config = checkpoint["config"]
        for key, flag in (("model", "--model"), ("dataset", "--dataset"), ("optimizer", "--optimizer")):
            theirs, ours = theirs_config[key], getattr(self.config, key)
            if theirs != ours:
                raise ResumeError(f"cannot resume: checkpoint {path} is of {key} {theirs!r}, but {flag} is {ours!r}")
        partial = checkpoint.get("partial")
        if partial is not None:
            # The position inside the epoch means the same batches only with the same order and sizes.
            for key, flag in (("batch_size", "--batch-size"), ("limit_train", "--limit-train"), ("seed", "--seed")):
                theirs, ours = theirs_config[key], getattr(self.config, key)
                if theirs != ours:
                    raise ResumeError(f"cannot resume: checkpoint {path} stopped inside epoch {partial['epoch']} "
                                      f"with {flag} {theirs}, but {flag} is {ours}; resume with the same value")
        return checkpoint

    def _restore(self, checkpoint: dict, path: Path) -> None:
        partial = checkpoint.get("partial")
        if partial is not None:
            self._progress = _EpochProgress(**partial)
        self._saved_at = self._position(self._progress, checkpoint["epoch"])
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
        where = (f"at epoch {partial['epoch']}, step {partial['step']} of "
                 f"{self.train_sampler.num_steps(self.config.batch_size)}" if partial else f"after epoch {self.epochs_done}")
        self.log(f"resumed from {path} {where} (the optimizer's hyper-parameters are the checkpoint's: "
                 f"lr {self.optimizer.lr:g})")

    @staticmethod
    def _position(progress: _EpochProgress | None, epochs_done: int) -> str:
        return f"epoch {progress.epoch}, step {progress.step}" if progress is not None else f"end of epoch {epochs_done}"

    def _save_checkpoint(self, progress: _EpochProgress | None) -> None:
        if progress is not None and not math.isfinite(progress.loss_sum):
            raise self._diverged("training loss", progress.loss_sum, progress.epoch)
        if not self.group.is_main:
            return
        save_checkpoint(self.checkpoint_path, {
            "format": _FORMAT,
            "gpuconv_version": __version__,
            "model": self.config.model,
            "config": dataclasses.asdict(self.config),
            "epoch": self.epochs_done,
            "partial": dataclasses.asdict(progress) if progress is not None else None,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng_state": generator().bit_generator.state,
            "history": self.history,
        })
        self._signature = run_signature(self.out)
        self._saved_at = self._position(progress, self.epochs_done)

    def request_stop(self) -> None:
        """End :meth:`fit` after the step in progress, saving a checkpoint to resume from.

        In an MPI job, after the first step where every rank has heard of it (the next metrics
        sum, every ``sync_every`` steps): all ranks must stop at the same step."""
        if self.group.is_distributed:
            self._stop_pending = True
        else:
            self._stop = True

    def _stop_if_requested(self, progress: _EpochProgress) -> None:
        if not self._stop:
            return
        self._stop = False
        self._save_checkpoint(progress)
        self._progress = progress  # so that fit() again continues from here too
        steps = self.train_sampler.num_steps(self.config.batch_size)
        raise TrainingInterrupted(
            f"interrupted at epoch {progress.epoch}, step {progress.step} of {steps}: saved {self.checkpoint_path}; "
            f"resume with resume={str(self.checkpoint_path)!r}", self.checkpoint_path, progress.epoch,
            progress.step, steps)

    @contextlib.contextmanager
    def _ctrl_c_requests_stop(self):
        """During fit, a first SIGINT asks to stop cleanly and a second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def on_sigint(signum, frame):
            if self._stop or self._stop_pending:
                raise KeyboardInterrupt
            self.request_stop()

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _diverged(self, what: str, value: float, epoch: int) -> TrainingDiverged:
        kept = (f"the last good checkpoint ({self._saved_at}) is kept at {self.checkpoint_path}"
                if self._saved_at and self.checkpoint_path.is_file() else "no checkpoint had been written yet")
        return TrainingDiverged(f"training diverged: the {what} became {value} in epoch {epoch}; "
                                f"training stopped and {kept}. Try a smaller --lr.")

    def _warn_if_long(self, seconds_per_step: float, steps: int) -> None:
        self._estimated = True
        epoch_s = seconds_per_step * steps
        if epoch_s <= LONG_EPOCH_S:
            return
        hints = ["--limit-train N trains on fewer images"]
        if self.device == "emu":
            hints.append("--device emu runs the kernels on the CPU to test them; --device cpu or a GPU is far faster")
        elif self.device == "cpu":
            hints.append("a GPU (--device cuda) is far faster")
        with tqdm.external_write_mode():
            self.log(f"note: one epoch will take about {format_duration(epoch_s)} here ({seconds_per_step:.2f} s "
                     f"per step, {steps} steps); {'; '.join(hints)}")

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """One pass over the training set (or what is left of it after a resume inside it):
        (mean loss, accuracy, seconds)."""
        c, xp = self.config, array_module(self.device)
        progress = self._progress if self._progress is not None and self._progress.epoch == epoch else \
            _EpochProgress(epoch)
        self._progress = None
        self.model.train()
        # progress holds the job's sums (all ranks'); each rank adds its own, rank 0 from where they were.
        carried = progress if self.group.is_main else _EpochProgress(epoch)
        loss_sum, correct = xp.asarray(carried.loss_sum, np.float64), xp.asarray(carried.correct, np.int64)
        seen = carried.seen
        distributed_job = self.group.is_distributed
        steps = self.train_sampler.num_steps(c.batch_size)
        bar = tqdm(total=steps, initial=progress.step, desc=f"epoch {epoch}/{c.epochs}", unit="batch",
                   disable=not c.progress or not self.group.is_main, leave=False)
        start = last_sync = time.perf_counter() - progress.seconds
        first_step_done = None  # time and step after the first one here, whose time includes warm-up
        # From the sample where the epoch stopped (all full global batches before it), on any number of ranks.
        batches = distributed.shard_batches(self.train_set, self.train_sampler, c.batch_size, epoch, start=progress.seen)
        with bar:
            for step, (x, y, share) in enumerate(batches, progress.step + 1):
                loss, logits = self._train_step(x, y, share)
                if y is not None:  # None: this rank's shard ran out before the epoch's last global step
                    loss_sum = loss_sum + loss * len(y)
                    correct = correct + (logits.argmax(axis=1) == y).sum()
                    seen += len(y)
                progress.step = step
                now = time.perf_counter()
                # In an MPI job every rank must sync at the same steps: no clock-driven syncs.
                if first_step_done is None or step % c.sync_every == 0 or step == steps or (
                        not distributed_job and now - last_sync >= 1.0):
                    totals = self._sum_over_ranks(loss_sum, correct, seen, self._stop_pending)  # waits for the device
                    progress.loss_sum, progress.correct, progress.seen = totals[0], int(totals[1]), int(totals[2])
                    if totals[3] > 0:  # a stop any rank asked for, now agreed by all
                        self._stop, self._stop_pending = True, False
                    mean_loss = progress.loss_sum / progress.seen
                    if not math.isfinite(mean_loss):
                        raise self._diverged("training loss", mean_loss, epoch)
                    last_sync = time.perf_counter()
                    bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{progress.correct / progress.seen:.4f}",
                                    img_s=f"{progress.seen / (last_sync - start):.0f}", refresh=False)
                    if first_step_done is None:
                        first_step_done = (last_sync, step)
                    elif not self._estimated and (step - first_step_done[1] >= 20 or last_sync - first_step_done[0] >= 2):
                        self._warn_if_long((last_sync - first_step_done[0]) / (step - first_step_done[1]), steps)
                bar.update()
                global_step = (epoch - 1) * steps + step
                if self._stop or (c.checkpoint_every and global_step % c.checkpoint_every == 0 and step < steps):
                    totals = self._sum_over_ranks(loss_sum, correct, seen)
                    progress.loss_sum, progress.correct, progress.seen = totals[0], int(totals[1]), int(totals[2])
                    progress.seconds = time.perf_counter() - start
                    self._stop_if_requested(progress)  # saves and raises when a stop was asked for
                    self._save_checkpoint(progress)
        totals = self._sum_over_ranks(loss_sum, correct, seen)
        progress.loss_sum, progress.correct, progress.seen = totals[0], int(totals[1]), int(totals[2])
        progress.seconds = time.perf_counter() - start
        mean_loss = progress.loss_sum / progress.seen
        if not math.isfinite(mean_loss):
            raise self._diverged("training loss", mean_loss, epoch)
        self._progress = progress  # what an interruption during the evaluation saves
        return mean_loss, progress.correct / progress.seen, progress.seconds

    def _eager_step(self, x, y, share: float = 1.0):
        """One step; in an MPI job the gradients are summed over the ranks, each weighted by its
        ``share`` of the global batch, before the update. ``x`` None: a rank with no sample left
        in the epoch's last step still takes part in the sum and the update; (None, None)."""
        loss = logits = None
        if x is not None:
            logits = self.model(x)
            loss = self.criterion(logits, y)
            self.model.backward(self.criterion.backward())
        self.group.average_gradients(self.optimizer, share)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss, logits

    def _train_step(self, x, y, share: float = 1.0):
        """One training step: (loss, logits). With ``config.graph``, the first full batch runs
        eagerly and is captured as a CUDA graph (:class:`gpuconv.graphs.GraphedStep`), later ones
        replay it; a last partial batch runs eagerly. The losses are the eager path's."""
        if not self.use_graph or len(y) != self.config.batch_size:
            return self._eager_step(x, y, share)
        if self._graphed is None:
            self._graphed = graphs.GraphedStep(self._eager_step, x, y)
            return self._graphed.warmup_result
        return self._graphed(x, y)

    def evaluate(self) -> tuple[float, float]:
        """(mean loss, accuracy) on the test set, in evaluation mode."""
        xp = array_module(self.device)
        self.model.eval()
        loss_sum, correct = xp.zeros((), np.float64), xp.zeros((), np.int64)
        batch = self.config.batch_size
        batches = self.test_set.batches(batch, order=self.test_order)  # this rank's share of the test set
        local = len(self.test_set) if self.test_order is None else len(self.test_order)
        for x, y in tqdm(batches, total=-(-local // batch), desc="test", unit="batch",
                         disable=not self.config.progress or not self.group.is_main, leave=False):
            logits = self.model(x)
            loss_sum = loss_sum + self.criterion(logits, y) * len(y)
            correct = correct + (logits.argmax(axis=1) == y).sum()
            if self._stop and self._progress is not None:
                self.model.train()
                self._stop_if_requested(self._progress)
        self.model.train()
        loss_sum, correct = self._sum_over_ranks(loss_sum, correct)
        return loss_sum / len(self.test_set), correct / len(self.test_set)

    def _sum_over_ranks(self, *values) -> list[float]:
        """Host values (device scalars read back) summed over the ranks: the job's metrics."""
        self.group.wait_for_device("the device work before the metrics")
        totals = np.array([float(value) for value in values], np.float64)
        return self.group.allreduce_sum(totals, what="the sum of the metrics").tolist()

    def fit(self) -> list[dict]:
        """Train until ``config.epochs`` epochs are done; returns the metrics of every epoch."""
        c = self.config
        main = self.group.is_main  # the one rank that owns the run directory
        if main:
            make_run_directory(self.out)
        with RunLock(self.out) if main else contextlib.nullcontext(), self._ctrl_c_requests_stop():
            if main:
                prepare_run_directory(self.out, Path(c.resume) if c.resume else None, c.overwrite, remove=True,
                                      ours=self._signature)
            if self.epochs_done >= c.epochs:
                self.log(f"nothing to do: {self.epochs_done} of {c.epochs} epochs are done")
            info = {"model": c.model, "dataset": c.dataset, "device": self.device, "ranks": self.group.world_size,
                    "config": dataclasses.asdict(c)}
            for epoch in range(self.epochs_done + 1, c.epochs + 1):
                lr = float(self.optimizer.lr)
                train_loss, train_acc, seconds = self.train_epoch(epoch)
                test_loss, test_acc = self.evaluate()
                if not math.isfinite(test_loss):
                    raise self._diverged("test loss", test_loss, epoch)
                if self.scheduler is not None:
                    self.scheduler.step()
                row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
                       "test_acc": test_acc, "seconds": seconds, "images_per_s": len(self.train_set) / seconds,
                       "lr": lr}
                self.history.append(row)
                self.epochs_done = epoch
                self._progress = None
                self._save_checkpoint(None)
                if main:
                    write_metrics(self.out, self.history, info)
                    self._signature = run_signature(self.out)
                    plot_curves(self.out / CURVES_PNG, self.history, f"{c.model} on {c.dataset} ({self.device})")
                self.log(f"epoch {epoch}/{c.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                         f"test loss {test_loss:.4f} acc {test_acc:.4f} | {seconds:.1f} s, "
                         f"{row['images_per_s']:.0f} images/s")
        return self.history


def _silent(*args) -> None:
    """The log of ranks other than 0."""


def train(config: TrainConfig | None = None, log=print_flushed, **overrides) -> list[dict]:
    """Run a training job: ``train(TrainConfig(...))`` or ``train(model='lenet5', epochs=5, ...)``."""
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    return Trainer(config, log=log).fit()

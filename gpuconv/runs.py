"""Run directories: the checkpoint format, the lock that keeps one run per directory, and the
rule that a directory holding a run is never silently overwritten.

A checkpoint is an ``.npz`` (arrays) with a JSON tree for everything else, so it loads with
``allow_pickle=False`` and reading one never runs code. It is written atomically (a temporary
file in the same directory, fsynced, then renamed): an interrupted save leaves the previous
checkpoint whole.

A run directory "holds a run" when it has a checkpoint or metrics file. A new run into it is
refused unless it resumes that directory's own checkpoint or ``overwrite`` is given (then the
earlier run's files are removed first, so no stale metrics mix with the new ones). While a run is
going, it holds an exclusive ``flock`` on ``.lock`` in the directory: a second run there is
refused, naming the first one's process. The kernel drops the lock when the process ends, however
it ends, so a crashed run never leaves a directory locked.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import zipfile
from pathlib import Path

import numpy as np

from .data import atomic_write
from .device import to_numpy

CHECKPOINT = "checkpoint.npz"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
RUN_FILES = (CHECKPOINT, METRICS_JSON, METRICS_CSV, CURVES_PNG)
LOCK = ".lock"


class CheckpointError(ValueError):
    """A file is not a readable gpuconv checkpoint; the message names it and says why."""


class RunDirectoryError(ValueError):
    """``out`` cannot take this run: it is a file, holds another run, or a run is going there."""


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
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; arrays come back as NumPy arrays.

    A missing file raises ``FileNotFoundError``; anything else that is not such a checkpoint
    raises :class:`CheckpointError` naming the file and what is wrong with it.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise CheckpointError(f"{path} is not a gpuconv checkpoint (a single .npy array, not an .npz archive)")
            if "__tree__" not in archive.files:
                raise CheckpointError(f"{path} is an .npz archive but not a gpuconv checkpoint (it has no __tree__)")
            arrays = {key: archive[key] for key in archive.files}
        tree = json.loads(arrays.pop("__tree__").tobytes())
        return _decode(tree, arrays)
    except (FileNotFoundError, CheckpointError):
        raise
    except ValueError as exc:
        # Under allow_pickle=False NumPy refuses object arrays, and any file that is neither .npy
        # nor .npz (which it would otherwise unpickle); gpuconv writes neither.
        why = "it holds pickled object arrays" if "Object arrays" in str(exc) else "not an .npz archive"
        raise CheckpointError(f"{path} is not a gpuconv checkpoint ({why})") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable gpuconv checkpoint: truncated or corrupt "
                              f"({type(exc).__name__})") from None


# ---------------------------------------------------------------------------------------------
# The run directory

def run_signature(out: Path) -> tuple | None:
    """What identifies the run in ``out`` (its files' inode, size and mtime), or None if it holds none."""
    signature = []
    for name in (CHECKPOINT, METRICS_JSON):
        try:
            st = os.stat(out / name)
        except FileNotFoundError:
            continue
        signature.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature) or None


def make_run_directory(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission, read-only file system
        raise RunDirectoryError(f"cannot create the run directory --out {out}: {exc.strerror or exc}") from None


def prepare_run_directory(out: Path, resume: Path | None, overwrite: bool, remove: bool,
                          ours: tuple | None = None) -> tuple | None:
    """Refuse to start a run in ``out`` that would replace the run already there; returns the
    :func:`run_signature` of the run this one continues (None for a new run).

    A run continues ``out``'s run when it resumes ``out``'s own checkpoint (when first checked,
    ``ours`` None) or when that run is still the one it saw (``ours``, its signature then), so
    that a run that slipped in between is refused too. Anything else needs ``overwrite``, which
    removes the earlier run's files when ``remove`` is set.
    """
    found = run_signature(out)
    if found is None or found == ours:
        return found
    if ours is None and resume is not None and resume.resolve() == (out / CHECKPOINT).resolve():
        return found
    if overwrite:
        if remove:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        return None
    what = "a checkpoint" if (out / CHECKPOINT).is_file() else "metrics"
    where = "" if resume is None else f", and resuming {resume} into it would replace that run"
    raise RunDirectoryError(f"{out} already holds a run ({what}{where}): pass --resume to continue it, "
                            f"--overwrite to replace it, or another --out")


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``out/.lock`` for the life of a run.

    The file records who holds it (host, process id, start time), so a refused run can name the
    holder. It is removed on release; since a waiting process could have opened the file just
    before that, acquiring checks that the locked file is still the one at the path.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunDirectoryError(f"{self.path.parent} is in use by another run ({holder}); "
                                        f"wait for it to end or pass another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed it between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked, so nobody locks a removed file
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

"""MNIST and Fashion-MNIST: IDX files, where to find them, batching, and a device-resident dataset.

:func:`load_dataset` reads the IDX files (gzipped or not) from the ``root`` argument (the CLI's
``--data-dir``) when one is given, and from nowhere else: a directory that does not exist or lacks
the files is an error naming it (as torchvision's ``root`` is), never replaced by another location.
Without ``root`` it looks, in this order, in:

1. ``$GPUCONV_DATA``,
2. the Debian package's directory (``apt-get install dataset-fashion-mnist``; MNIST has none),
3. the cache, ``$XDG_CACHE_HOME/gpuconv/<dataset>`` (default ``~/.cache/gpuconv/<dataset>``),
4. a download of the official files into the cache, each checked against its published MD5.

In ``root`` and ``$GPUCONV_DATA`` a ``<dataset>/`` subfolder is tried before the folder itself,
because MNIST and Fashion-MNIST use the same file names and one folder can hold both. A location
that has the files but a broken one is an error (:class:`IdxError`), never a reason to look
further: silently training on other data than the user pointed at would be worse. When every
location fails, one :class:`DatasetNotFoundError` lists what was tried and how to get the data.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from . import functional as F
from .device import to_device
from .nn import host_array
from .random import normalize_seed

DATA_ENV = "GPUCONV_DATA"
OFFLINE_ENV = "GPUCONV_OFFLINE"

# IDX type codes (the third byte of the magic number); every multi-byte type is big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder(">") if dtype.itemsize > 1 else dtype: code for code, dtype in _IDX_DTYPES.items()}


@dataclass(frozen=True)
class DatasetInfo:
    title: str
    mean: float  # of the training images scaled to [0, 1]
    std: float
    classes: tuple[str, ...]
    system_dir: str | None  # where a distribution package installs the files
    package: str | None
    mirrors: tuple[str, ...]
    md5: dict  # file name -> MD5 of the official .gz file


DATASETS = {
    "fashion-mnist": DatasetInfo(
        title="Fashion-MNIST",
        mean=0.2860,
        std=0.3530,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        system_dir="/usr/share/datasets/fashion-mnist",
        package="dataset-fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "mnist": DatasetInfo(
        title="MNIST",
        mean=0.1307,
        std=0.3081,
        classes=tuple(str(d) for d in range(10)),
        system_dir=None,
        package=None,
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
}
SPLITS = {"train": "train", "test": "t10k"}

# mkstemp creates files 0600; written files get the permissions open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)


class IdxError(ValueError):
    """An IDX file is truncated, corrupt or not what was expected; the message names the file."""


class DatasetNotFoundError(FileNotFoundError):
    """No location held the dataset; the message lists every place tried and how to get the data."""


# ---------------------------------------------------------------------------------------------
# IDX files

def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"\x1f\x8b":  # the gzip magic: anything else is read as a raw IDX file
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise IdxError(f"{path}: corrupt gzip data ({exc})") from None


def read_idx(path) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not), in native byte order.

    Checks the magic number, the type code, the dimensions and that the payload has exactly the
    length the header announces; any failure is an :class:`IdxError` naming the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxError(f"{path}: truncated: {len(data)} bytes, shorter than the 4-byte IDX magic number")
    if data[0] != 0 or data[1] != 0:
        raise IdxError(f"{path}: not an IDX file: magic number starts {data[:2].hex()}, expected 0000")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise IdxError(f"{path}: unknown IDX type code 0x{code:02x} (known: {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})")
    if ndim == 0:
        raise IdxError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path}: truncated: {len(data)} bytes, shorter than the {header}-byte header of {ndim} dimensions")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: 255 dimensions of 2**32 - 1 do not overflow
    payload = len(data) - header
    if expected >= 2**63:  # more than any file can hold: the header is wrong, not the payload short
        raise IdxError(f"{path}: corrupt header: dimensions {shape} of {dtype.name} would need about "
                       f"2**{expected.bit_length() - 1} payload bytes, found {payload}")
    if payload < expected:
        raise IdxError(f"{path}: truncated: dimensions {shape} of {dtype.name} need {expected} payload bytes, found {payload}")
    if payload > expected:
        raise IdxError(f"{path}: corrupt: {payload - expected} bytes after the payload of dimensions {shape}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path, array) -> None:
    """Write ``array`` as an IDX file; gzipped when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    big_endian = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big_endian not in _IDX_CODES:
        raise TypeError(f"array of dtype {array.dtype} has no IDX type code (uint8, int8, int16, int32, float32, float64)")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"array must have 1 to 255 dimensions for IDX, got shape {array.shape}")
    header = bytes([0, 0, _IDX_CODES[big_endian], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=big_endian).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


# ---------------------------------------------------------------------------------------------
# Locating and downloading

def _dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(map(repr, DATASETS))}; got {name!r}")
    return DATASETS[name]


def split_files(split: str) -> tuple[str, str]:
    """The (images, labels) file names of ``split``, without the optional ``.gz``."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = SPLITS[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpuconv" / name


def _find_in(directory: Path, stems: tuple[str, ...]) -> tuple[list[Path] | None, str]:
    """The files named ``stems`` (``.gz`` or raw) in ``directory``, or None and why not."""
    if not directory.is_dir():
        return None, "no such directory"
    found, missing = [], []
    for stem in stems:
        candidates = [directory / f"{stem}.gz", directory / stem]
        hit = next((p for p in candidates if p.is_file()), None)
        (found if hit else missing).append(hit or f"{stem}[.gz]")
    if missing:
        return None, "missing " + ", ".join(missing)
    return found, ""


def _candidate_dirs(name: str) -> list[tuple[str, Path | None]]:
    """The places searched when no directory is given, in order."""
    info = _dataset_info(name)
    places: list[tuple[str, Path | None]] = []
    value = os.environ.get(DATA_ENV)
    if not value:
        places.append((f"${DATA_ENV}", None))
    else:
        places += [(f"${DATA_ENV}", Path(value).expanduser() / name), (f"${DATA_ENV}", Path(value).expanduser())]
    if info.system_dir:
        places.append((f"Debian package {info.package}", Path(info.system_dir)))
    places.append(("cache", cache_dir(name)))
    return places


def _find_in_root(root: Path, name: str, split: str, stems: tuple[str, ...]) -> list[Path]:
    """The files in the directory the caller named (``root/<name>/`` first): there or an error,
    never another location, as torchvision does with its ``root``."""
    title = f"{_dataset_info(name).title} ({split} split)"
    if not root.exists():
        raise DatasetNotFoundError(f"the data directory {root} (--data-dir) does not exist; it should hold "
                                   f"the {title} IDX files")
    if not root.is_dir():
        raise DatasetNotFoundError(f"the data directory {root} (--data-dir) is not a directory")
    why = {}
    for directory in (root / name, root):
        paths, why[directory] = _find_in(directory, stems)
        if paths:
            return paths
    looked = f" (nor does {root / name})" if (root / name).is_dir() else ""
    raise DatasetNotFoundError(f"the data directory {root} (--data-dir) does not hold {title}: "
                               f"{why[root]}{looked}")


def fetch_url(url: str, out: BinaryIO) -> None:
    """Copy the body at ``url`` into ``out`` (the default downloader)."""
    with urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            out.write(chunk)


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through ``write(fileobj)`` so that ``path`` is either the old file or the
    complete new one, even if the process dies midway: a temporary file in the same directory,
    flushed and fsynced, then ``os.replace``. A failure removes the temporary file and re-raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _HashingWriter:
    """A file wrapper that hashes what goes through it."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.md5 = hashlib.md5(usedforsecurity=False)

    def write(self, chunk: bytes) -> int:
        self.md5.update(chunk)
        return self._f.write(chunk)


def _download_file(url: str, path: Path, md5: str, downloader) -> None:
    def write(f):
        out = _HashingWriter(f)
        downloader(url, out)
        if out.md5.hexdigest() != md5:
            raise ValueError(f"checksum mismatch: MD5 {out.md5.hexdigest()}, expected {md5}")

    atomic_write(path, write)  # a failed or mismatching download never reaches the cache


def _download(name: str, stems: tuple[str, ...], downloader) -> tuple[list[Path] | None, list[str]]:
    """Download the official ``.gz`` files into the cache, trying each mirror in turn."""
    info = _dataset_info(name)
    paths, errors = [], []
    for stem in stems:
        filename = f"{stem}.gz"
        path = cache_dir(name) / filename
        for mirror in info.mirrors:
            try:
                _download_file(mirror + filename, path, info.md5[filename], downloader)
            except Exception as exc:  # any failure of one mirror: record it, try the next
                errors.append(f"{mirror + filename}: {exc}")
                continue
            paths.append(path)
            break
        else:
            return None, errors
    return paths, errors


def locate_dataset(name: str, split: str, root=None, download: bool = True,
                   downloader: Callable[[str, BinaryIO], None] = None) -> list[Path]:
    """The ``[images, labels]`` IDX files of one split (see the module's docstring for where
    they are looked for); downloads them when allowed and found nowhere.

    An explicit ``root`` is the only place looked in. ``download=False`` or ``$GPUCONV_OFFLINE``
    set (to anything but ``0``) never touches the network; ``downloader(url, fileobj)``
    replaces the HTTP client (tests use it).
    """
    info = _dataset_info(name)
    stems = split_files(split)
    if root is not None and str(root) != "":
        return _find_in_root(Path(root).expanduser(), name, split, stems)
    tried = []
    for label, directory in _candidate_dirs(name):
        if directory is None:
            tried.append(f"{label}: not set")
            continue
        paths, why = _find_in(directory, stems)
        if paths:
            return paths
        tried.append(f"{label} {directory}: {why}")
    offline = os.environ.get(OFFLINE_ENV, "0") not in ("", "0")
    if not download or offline:
        tried.append("download: disabled " + (f"(${OFFLINE_ENV} is set)" if offline else "(download=False)"))
    else:
        paths, errors = _download(name, stems, downloader or fetch_url)
        if paths:
            return paths
        tried += [f"download {e}" for e in errors]
    how = [f"apt-get install {info.package}"] if info.package else []
    how.append(f"put the IDX files {', '.join(stems)} (gzipped or not) in a directory and pass --data-dir DIR "
               f"or set {DATA_ENV}=DIR")
    raise DatasetNotFoundError(
        f"{info.title} ({split} split) was not found. Tried, in order: "
        + "; ".join(f"{i}. {t}" for i, t in enumerate(tried, 1))
        + ". To get it: " + "; or ".join(how) + "."
    )


def load_dataset(name: str, split: str, root=None, download: bool = True,
                 downloader: Callable[[str, BinaryIO], None] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one split: uint8 ``(N, 28, 28)`` and int64 ``(N,)``, from the
    files :func:`locate_dataset` finds."""
    return read_split(locate_dataset(name, split, root, download, downloader), name)


def read_split(paths: list[Path], name: str) -> tuple[np.ndarray, np.ndarray]:
    """The checked ``(images, labels)`` of one split's ``[images, labels]`` IDX files."""
    info = _dataset_info(name)
    image_path, label_path = paths
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise IdxError(f"{image_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IdxError(f"{label_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise IdxError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if labels.size and labels.max() >= len(info.classes):
        raise IdxError(f"{label_path}: label {labels.max()} out of range for {len(info.classes)} classes")
    return images, labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Normalisation and batching

def normalize(images, name: str) -> np.ndarray:
    """uint8 images to float32 ``(x / 255 - mean) / std`` with the dataset's training statistics."""
    info = _dataset_info(name)
    return ((np.asarray(images, dtype=np.float32) / 255.0 - info.mean) / info.std).astype(np.float32)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation drawn from ``(seed, epoch)`` alone, so an
    epoch's order does not depend on what ran before it (a resumed run sees the same batches)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([normalize_seed(seed), int(epoch)]).permutation(n)


def _batch_slices(n: int, batch_size: int, drop_last: bool) -> range:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    stop = n - n % batch_size if drop_last else n
    return range(0, stop, batch_size)


def batches(images, labels, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
            drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(images, labels)`` batches of one epoch, in :func:`epoch_order`; the last batch is
    smaller unless ``drop_last``."""
    if len(images) != len(labels):
        raise ValueError(f"images and labels must have the same length, got shapes {np.shape(images)} and {np.shape(labels)}")
    order = epoch_order(len(images), shuffle, seed, epoch)
    for start in _batch_slices(len(images), batch_size, drop_last):
        index = order[start:start + batch_size]
        yield images[index], labels[index]


class DeviceDataset:
    """A whole normalised dataset resident on one device, served as NCHW float32 batches.

    The images go to the device once, as float32 ``(N, 1, H, W)``; each epoch then sends only its
    permutation (N integers), and every batch is gathered, resized and channel-replicated on the
    device, so a training step moves no images between host and device.

    ``input_shape`` ``(C, H, W)`` is the model's: batches are resized bilinearly to ``(H, W)`` when
    the images differ (e.g. 28 -> 224 for AlexNet) and the one grey channel is replicated to ``C``.
    """

    def __init__(self, images, labels, device: str, name: str, input_shape=None):
        # On the host, from any device: the checks and the normalisation are NumPy, which refuses CuPy arrays.
        images, labels = host_array(images), host_array(labels)
        if images.ndim != 3:
            raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be (N,) with N = {len(images)} images, got shape {labels.shape}")
        classes = len(DATASETS[name].classes)
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"labels must lie in [0, {classes}) for {name}, got min {labels.min()}, max {labels.max()}")
        self.device = device
        self.images = to_device(normalize(images, name)[:, None], device)
        # Checked here once, so the loss need not check every batch (a device round trip each);
        # int32 is what the loss kernel reads.
        self.labels = to_device(labels.astype(np.int32), device)
        self.input_shape = tuple(input_shape) if input_shape is not None else (1,) + images.shape[1:]
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(_batch_slices(len(self), batch_size, drop_last))

    def _prepare(self, x):
        channels, height, width = self.input_shape
        if x.shape[2:] != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        if channels != 1:
            x = x.repeat(channels, axis=1)  # the method keeps the array's device class
        return x

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, start_batch: int = 0, order=None) -> Iterator[tuple[object, object]]:
        """``(x, y)`` device batches of one epoch: x ``(B, C, H, W)`` float32, y ``(B,)`` int32;
        from batch ``start_batch`` on (the same order: a run resumed mid-epoch continues it).

        ``order``: the sample indices to serve (host integers, e.g. one rank's shard of the
        epoch), in place of the epoch's order."""
        if order is None and shuffle:
            order = epoch_order(len(self), shuffle, seed, epoch)
        slices = _batch_slices(len(self) if order is None else len(order), batch_size, drop_last)[start_batch:]
        order = None if order is None else to_device(np.asarray(order), self.device)
        for start in slices:
            if order is None:
                x, y = self.images[start:start + batch_size], self.labels[start:start + batch_size]
            else:
                index = order[start:start + batch_size]
                x, y = self.images[index], self.labels[index]
            yield self._prepare(x), y

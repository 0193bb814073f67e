"""gpuconv.data: IDX files, the search order, checksummed downloads, batching, DeviceDataset.
No test touches the network: downloads go through a fake downloader."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from gpuconv import data
from gpuconv.device import device_of, to_numpy


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No real data directory, cache or network is visible to a test unless it sets one up."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.delenv(data.OFFLINE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    system = dataclasses.replace(data.DATASETS["fashion-mnist"], system_dir=str(tmp_path / "system"))
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", system)

    def no_network(url, out):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(data, "fetch_url", no_network)


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file written by hand from the format's definition, independently of write_idx."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def make_split(directory: Path, prefix: str, n: int, seed: int, gz: bool = True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(array, 0x08)
        (directory / (stem + suffix)).write_bytes(gzip.compress(raw) if gz else raw)
    return images, labels


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B),
                                        (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, code, suffix):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / f"x.idx{suffix}"
    data.write_idx(path, array)
    raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
    assert raw == idx_bytes(array, code)
    back = data.read_idx(path)
    assert back.dtype == dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_write_idx_refuses_unknown_dtype(tmp_path):
    with pytest.raises(TypeError, match="int64"):
        data.write_idx(tmp_path / "x", np.zeros(3, np.int64))


@pytest.mark.parametrize("mangle,message", [
    (lambda b: b[:-1], r"truncated: dimensions \(4, 3\) of uint8 need 12 payload bytes, found 11"),
    (lambda b: b[:10], r"truncated: 10 bytes, shorter than the 12-byte header"),
    (lambda b: b[:3], r"truncated: 3 bytes"),
    (lambda b: b + b"\0", r"corrupt: 1 bytes after the payload"),
    (lambda b: b"\x01" + b[1:], r"not an IDX file: magic number starts 0100"),
    (lambda b: b[:2] + b"\x0a" + b[3:], r"unknown IDX type code 0x0a"),
    (lambda b: b[:3] + b"\x00" + b[4:], r"0 dimensions"),
    # Dimension products past 64 bits: an int64 product would wrap (to a negative count here).
    (lambda b: b[:4] + b"\xff" * 8 + b[12:],
     r"corrupt header: dimensions \(4294967295, 4294967295\) of uint8 would need about 2\*\*63 payload bytes, found 12"),
    (lambda b: b[:3] + b"\x03" + b"\xff" * 12 + b[12:],
     r"corrupt header: dimensions \(4294967295, 4294967295, 4294967295\) of uint8 would need about 2\*\*95"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_broken_idx_files_name_file_and_fault(tmp_path, mangle, message, gz):
    good = idx_bytes(np.arange(12, dtype=np.uint8).reshape(4, 3), 0x08)
    path = tmp_path / ("bad.gz" if gz else "bad")
    broken = mangle(good)
    path.write_bytes(gzip.compress(broken) if gz else broken)
    with pytest.raises(data.IdxError, match=message) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_corrupt_gzip_is_reported(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8), 0x08))[:-20])
    with pytest.raises(data.IdxError, match=f"{path}: corrupt gzip data"):
        data.read_idx(path)


def test_load_dataset_reads_gz_and_raw(tmp_path):
    images, labels = make_split(tmp_path / "raw", "t10k", 7, seed=1, gz=False)
    got_images, got_labels = data.load_dataset("fashion-mnist", "test", root=tmp_path / "raw")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_labels, labels)
    images, labels = make_split(tmp_path / "gz", "train", 5, seed=2)
    got_images, got_labels = data.load_dataset("mnist", "train", root=tmp_path / "gz")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_load_dataset_checks_the_pair(tmp_path):
    make_split(tmp_path, "train", 5, seed=0)
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(data.IdxError, match="holds 5 images but .* holds 4 labels"):
        data.load_dataset("mnist", "train", root=tmp_path)
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(5, 10, np.uint8))
    with pytest.raises(data.IdxError, match="label 10 out of range for 10 classes"):
        data.load_dataset("mnist", "train", root=tmp_path)


def test_search_order(tmp_path, monkeypatch):
    info = data.DATASETS["fashion-mnist"]
    system = make_split(Path(info.system_dir), "train", 3, seed=10)
    cached = make_split(data.cache_dir("fashion-mnist"), "train", 3, seed=11)
    env = make_split(tmp_path / "env" / "fashion-mnist", "train", 3, seed=12)  # the per-dataset subfolder
    explicit = make_split(tmp_path / "explicit", "train", 3, seed=13)
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))

    def loaded(**kwargs):
        return data.load_dataset("fashion-mnist", "train", **kwargs)[0]

    np.testing.assert_array_equal(loaded(root=tmp_path / "explicit"), explicit[0])
    np.testing.assert_array_equal(loaded(), env[0])
    monkeypatch.delenv(data.DATA_ENV)
    np.testing.assert_array_equal(loaded(), system[0])
    for f in Path(info.system_dir).iterdir():
        f.unlink()
    np.testing.assert_array_equal(loaded(), cached[0])


def test_an_explicit_directory_is_used_or_an_error_naming_it(tmp_path, monkeypatch):
    """As torchvision's ``root``: never replaced by the other places, which here all hold the data."""
    make_split(data.cache_dir("mnist"), "train", 3, seed=0)
    make_split(tmp_path / "env", "train", 3, seed=1)
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    missing = tmp_path / "no-such-dir"
    with pytest.raises(data.DatasetNotFoundError, match=rf"^the data directory {missing} \(--data-dir\) does not exist"):
        data.load_dataset("mnist", "train", root=missing)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(data.DatasetNotFoundError, match="a-file \\(--data-dir\\) is not a directory"):
        data.load_dataset("mnist", "train", root=tmp_path / "a-file")
    partial = tmp_path / "partial"
    make_split(partial, "train", 3, seed=2)
    (partial / "train-labels-idx1-ubyte.gz").unlink()
    (partial / "mnist").mkdir()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("mnist", "train", root=partial)
    assert str(info.value) == (f"the data directory {partial} (--data-dir) does not hold MNIST (train split): missing "
                               f"train-labels-idx1-ubyte[.gz] (nor does {partial / 'mnist'})")
    # The per-dataset subfolder of an explicit directory counts as that directory.
    sub = make_split(tmp_path / "both" / "mnist", "train", 3, seed=3)
    np.testing.assert_array_equal(data.load_dataset("mnist", "train", root=tmp_path / "both")[0], sub[0])
    assert data.locate_dataset("mnist", "train", root=tmp_path / "both") == [
        tmp_path / "both" / "mnist" / "train-images-idx3-ubyte.gz", tmp_path / "both" / "mnist" / "train-labels-idx1-ubyte.gz"]


def test_a_location_with_a_broken_file_is_an_error_not_skipped(tmp_path):
    make_split(data.cache_dir("mnist"), "train", 3, seed=0)
    make_split(tmp_path, "train", 3, seed=1)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(data.IdxError, match=str(path)):
        data.load_dataset("mnist", "train", root=tmp_path)


def test_all_failed_error_lists_every_place_and_the_remedy(tmp_path, monkeypatch):
    (tmp_path / "partial").mkdir()
    data.write_idx(tmp_path / "partial" / "t10k-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8))
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("fashion-mnist", "test", download=False)
    message = str(info.value)
    for expected in ["Fashion-MNIST (test split) was not found",
                     f"$GPUCONV_DATA {tmp_path / 'env'}: no such directory",
                     f"Debian package dataset-fashion-mnist {data.DATASETS['fashion-mnist'].system_dir}",
                     f"cache {data.cache_dir('fashion-mnist')}",
                     "download: disabled (download=False)",
                     "apt-get install dataset-fashion-mnist", "--data-dir DIR"]:
        assert expected in message, (expected, message)
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    with pytest.raises(data.DatasetNotFoundError, match=r"download: disabled \(\$GPUCONV_OFFLINE is set\)"):
        data.load_dataset("fashion-mnist", "test")


def fake_server(files: dict[str, bytes], requested: list[str]):
    def downloader(url, out):
        requested.append(url)
        name = url.rsplit("/", 1)[1]
        body = files[name]
        # A partial write first, as a real stream would, so a bad download must be cleaned up.
        out.write(body[:10])
        out.write(body[10:])

    return downloader


def test_download_verifies_checksums_and_caches(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([1, 2, 3, 4], np.uint8)
    files = {"t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images, 0x08)),
             "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels, 0x08))}
    info = data.DATASETS["mnist"]
    md5 = {**info.md5, **{name: hashlib.md5(body).hexdigest() for name, body in files.items()}}
    monkeypatch.setitem(data.DATASETS, "mnist", dataclasses.replace(info, md5=md5))
    requested = []
    got_images, got_labels = data.load_dataset("mnist", "test", downloader=fake_server(files, requested))
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert requested == [info.mirrors[0] + name for name in files]
    cache = data.cache_dir("mnist")
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)
    # Now cached: a second load needs no downloader at all.
    data.load_dataset("mnist", "test", downloader=fake_server({}, requested))
    assert len(requested) == 2


def test_download_with_a_wrong_checksum_tries_every_mirror_and_caches_nothing(tmp_path):
    info = data.DATASETS["mnist"]
    tampered = {"train-images-idx3-ubyte.gz": b"not the official file" * 10}
    requested = []
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_dataset("mnist", "train", downloader=fake_server(tampered, requested))
    assert requested == [m + "train-images-idx3-ubyte.gz" for m in info.mirrors]
    message = str(error.value)
    assert message.count("checksum mismatch") == len(info.mirrors)
    assert f"expected {info.md5['train-images-idx3-ubyte.gz']}" in message
    cache = data.cache_dir("mnist")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_download_errors_are_listed(tmp_path):
    def unreachable(url, out):
        raise OSError("network is unreachable")

    expected = r"download https://\S+/train-images-idx3-ubyte.gz: network is unreachable"
    with pytest.raises(data.DatasetNotFoundError, match=expected):
        data.load_dataset("mnist", "train", downloader=unreachable)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def crash(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data.atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    data.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"


def test_atomic_write_syncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    import os
    import stat

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    data.atomic_write(tmp_path / "f.bin", lambda f: f.write(b"new"))
    expected = ["file", "rename", "dir"] if hasattr(os, "O_DIRECTORY") else ["file", "rename"]
    assert events == expected and (tmp_path / "f.bin").read_bytes() == b"new"


def test_normalize_uses_dataset_statistics():
    images = np.array([[[0, 255]]], np.uint8)
    out = data.normalize(images, "fashion-mnist")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[(0 - 0.2860) / 0.3530, (1 - 0.2860) / 0.3530]]], rtol=1e-6)
    np.testing.assert_allclose(data.normalize(images, "mnist")[0, 0, 0], -0.1307 / 0.3081, rtol=1e-6)
    with pytest.raises(ValueError, match="dataset must be one of 'fashion-mnist', 'mnist'; got 'cifar'"):
        data.normalize(images, "cifar")


def test_batches_cover_every_sample_once_and_are_seeded_per_epoch():
    images = np.arange(10)[:, None, None] * np.ones((1, 2, 2), int)
    labels = np.arange(10)
    plain = list(data.batches(images, labels, 4))
    assert [len(y) for _, y in plain] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([y for _, y in plain]), labels)
    assert [len(y) for _, y in data.batches(images, labels, 4, drop_last=True)] == [4, 4]

    def order(seed, epoch):
        out = [(x, y) for x, y in data.batches(images, labels, 3, shuffle=True, seed=seed, epoch=epoch)]
        for x, y in out:
            np.testing.assert_array_equal(x[:, 0, 0], y)  # images and labels stay paired
        return np.concatenate([y for _, y in out])

    first = order(0, 0)
    assert sorted(first) == list(range(10))
    np.testing.assert_array_equal(order(0, 0), first)
    assert not np.array_equal(order(0, 1), first)
    assert not np.array_equal(order(1, 0), first)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_batches_refuses_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        list(data.batches(np.zeros((3, 2, 2)), np.zeros(3), bad))


def test_batches_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match=r"same length, got shapes \(3, 2, 2\) and \(2,\)"):
        list(data.batches(np.zeros((3, 2, 2)), np.zeros(2), 2))


def test_device_dataset_matches_host_batches(device):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (7, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, 7)
    dataset = data.DeviceDataset(images, labels, device, "mnist")
    assert len(dataset) == 7 and dataset.num_batches(3) == 3 and dataset.num_batches(3, drop_last=True) == 2
    host = list(data.batches(data.normalize(images, "mnist")[:, None], labels, 3, shuffle=True, seed=4, epoch=2))
    got = list(dataset.batches(3, shuffle=True, seed=4, epoch=2))
    assert len(got) == len(host)
    for (x, y), (hx, hy) in zip(got, host, strict=True):
        assert device_of(x) == device and device_of(y) == device
        assert x.dtype == np.float32 and x.shape == hx.shape and x.flags.c_contiguous
        np.testing.assert_array_equal(to_numpy(x), hx)
        np.testing.assert_array_equal(to_numpy(y), hy)
        assert y.dtype == np.int32  # what the loss kernel reads: no per-step conversion


def bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), as loops in float64."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            y = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
            x = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
            y0, x0 = min(int(y), in_h - 1), min(int(x), in_w - 1)
            y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * ((1 - dx) * image[y0, x0] + dx * image[y0, x1])
                         + dy * ((1 - dx) * image[y1, x0] + dx * image[y1, x1]))
    return out


def test_device_dataset_resizes_and_replicates_channels(device):
    images = np.random.default_rng(6).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    dataset = data.DeviceDataset(images, np.array([0, 1]), device, "fashion-mnist", input_shape=(3, 5, 7))
    (x, y), = dataset.batches(2)
    assert device_of(x) == device and x.shape == (2, 3, 5, 7) and x.dtype == np.float32
    x = to_numpy(x)
    normalized = data.normalize(images, "fashion-mnist").astype(np.float64)
    for n in range(2):
        expected = bilinear_reference(normalized[n], 5, 7)
        for c in range(3):
            np.testing.assert_allclose(x[n, c], expected, rtol=1e-5, atol=1e-5)


def test_device_dataset_checks_shapes():
    with pytest.raises(ValueError, match=r"images must be \(N, H, W\), got shape \(2, 1, 3, 3\)"):
        data.DeviceDataset(np.zeros((2, 1, 3, 3), np.uint8), np.zeros(2), "cpu", "mnist")
    with pytest.raises(ValueError, match=r"labels must be \(N,\) with N = 2 images, got shape \(3,\)"):
        data.DeviceDataset(np.zeros((2, 3, 3), np.uint8), np.zeros(3), "cpu", "mnist")
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\), got \(3, 3\)"):
        data.DeviceDataset(np.zeros((2, 3, 3), np.uint8), np.zeros(2), "cpu", "mnist", input_shape=(3, 3))


def test_device_dataset_refuses_labels_outside_the_classes():
    images = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) for fashion-mnist, got min 0, max 10"):
        data.DeviceDataset(images, np.array([0, 10]), "cpu", "fashion-mnist")

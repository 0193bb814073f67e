"""Bilinear resizing: every device against float64 loops of PyTorch's formula, and PyTorch itself."""
import numpy as np
import pytest

from gpuconv.device import device_of, to_device, to_numpy
from gpuconv.functional import interpolate


def _source(dst, in_size, out_size, align_corners):
    if align_corners:
        return dst * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    return max((dst + 0.5) * in_size / out_size - 0.5, 0.0)


def bilinear_loops(x, out_h, out_w, align_corners):
    n_, c_, in_h, in_w = x.shape
    y = np.zeros((n_, c_, out_h, out_w))
    for n in range(n_):
        for c in range(c_):
            for i in range(out_h):
                for j in range(out_w):
                    hs, ws = _source(i, in_h, out_h, align_corners), _source(j, in_w, out_w, align_corners)
                    h0, w0 = int(hs), int(ws)
                    h1, w1 = min(h0 + 1, in_h - 1), min(w0 + 1, in_w - 1)
                    dh, dw = hs - h0, ws - w0
                    y[n, c, i, j] = ((1 - dh) * ((1 - dw) * x[n, c, h0, w0] + dw * x[n, c, h0, w1])
                                     + dh * ((1 - dw) * x[n, c, h1, w0] + dw * x[n, c, h1, w1]))
    return y


@pytest.mark.parametrize("in_size, size", [((3, 4), (7, 5)), ((5, 6), (2, 3)), ((4, 4), 1), ((1, 3), (4, 6))])
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_loops_on_every_device(device, rng, in_size, size, align_corners):
    x = rng.standard_normal((1, 2) + in_size).astype(np.float32)
    y = interpolate(to_device(x, device), size, align_corners=align_corners)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    assert device_of(y) == device and y.shape == (1, 2, out_h, out_w) and y.dtype == np.float32
    np.testing.assert_allclose(to_numpy(y), bilinear_loops(x, out_h, out_w, align_corners), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_size, size", [((28, 28), (224, 224)), ((17, 9), (6, 4)), ((13, 13), (40, 13)),
                                           ((8, 8), (8, 8))])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_matches_torch(rng, in_size, size, align_corners, dtype, tol):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3) + in_size).astype(dtype)
    expected = torch.nn.functional.interpolate(torch.tensor(x), size=size, mode="bilinear", align_corners=align_corners)
    y = interpolate(x, size, align_corners=align_corners)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, expected.numpy(), rtol=tol, atol=tol)


def test_mnist_to_alexnet_size_on_the_kernel_path(kernel_device, rng):
    torch = pytest.importorskip("torch")
    x = rng.random((1, 1, 28, 28), dtype=np.float32)
    expected = torch.nn.functional.interpolate(torch.tensor(x), size=(224, 224), mode="bilinear").numpy()
    np.testing.assert_allclose(to_numpy(interpolate(to_device(x, kernel_device), 224)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(size=4, mode="nearest"), ValueError, "mode must be 'bilinear'"),
    (dict(size=0), ValueError, "size must be positive, got 0"),
    (dict(size=(2, 2, 2)), TypeError, "size must be an int or a pair of ints"),
    (dict(size=4, align_corners=None), TypeError, "align_corners must be a bool, got None"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        interpolate(np.zeros((1, 1, 3, 3), np.float32), **kwargs)


def test_input_must_be_nchw():
    with pytest.raises(ValueError, match=r"input must be 4-D \(NCHW\), got shape \(3, 3\)"):
        interpolate(np.zeros((3, 3), np.float32), 4)
    with pytest.raises(ValueError, match=r"input \(1, 1, 0, 3\) has an empty image"):
        interpolate(np.zeros((1, 1, 0, 3), np.float32), 4)

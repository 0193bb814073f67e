"""Dropout: the documented counter-based mask, bit-identical on every device, its statistics,
the backward pass, the identities (eval, p = 0) and argument errors."""
from __future__ import annotations

import numpy as np
import pytest

import gpuconv
import gpuconv.functional as F
from gpuconv.device import device_of, to_device, to_numpy

MASK64 = 2**64 - 1


def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def ref_keep(n, p, seed):
    """The documented rule, on Python integers, one element at a time."""
    key = _mix64(seed)
    threshold = int(p * 2**32)
    return np.array([(_mix64((key + (i + 1) * 0x9E3779B97F4A7C15) & MASK64) >> 32) >= threshold for i in range(n)])


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 12345, 2**32 - 1, 2**64 - 1])
def test_mask_follows_documented_hash(p, seed):
    np.testing.assert_array_equal(F.dropout_mask((3, 67), p, seed).ravel(), ref_keep(3 * 67, p, seed))


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_same_output_on_every_device(device, rng, p):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)  # 210 elements: not a multiple of 4
    out = F.dropout(to_device(x, device), p, seed=987654321)
    assert device_of(out) == device and out.dtype == np.float32
    keep = ref_keep(x.size, p, 987654321).reshape(x.shape)
    want = np.where(keep, x * np.float32(1 / (1 - p)), np.float32(0))
    np.testing.assert_array_equal(to_numpy(out), want)  # bit-identical, not merely close

    g = rng.standard_normal(x.shape).astype(np.float32)
    grad = F.dropout_backward(to_device(g, device), p, 987654321)
    assert device_of(grad) == device
    np.testing.assert_array_equal(to_numpy(grad), np.where(keep, g * np.float32(1 / (1 - p)), np.float32(0)))


def test_dropped_nan_and_inf_become_nan_as_in_torch(device):
    # PyTorch multiplies by the scaled mask: a dropped NaN or inf is NaN (0 * NaN, 0 * inf), a
    # dropped negative -0. Every device computes exactly x * (keep * scale), bit for bit.
    torch = pytest.importorskip("torch")
    values = np.array([np.nan, np.inf, -np.inf, -2.5, 0.0, -0.0, 3.0, 1e38], np.float32)
    x = np.tile(values, 40)
    p, seed = 0.5, 4242
    keep = ref_keep(x.size, p, seed)
    assert keep.any() and not keep.all()
    with np.errstate(invalid="ignore"):
        want = x * (keep * np.float32(1 / (1 - p))).astype(np.float32)
    for op in (lambda a: F.dropout(a, p, seed=seed), lambda a: F.dropout_backward(a, p, seed)):
        got = to_numpy(op(to_device(x, device)))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isnan(to_numpy(F.dropout(to_device(x, device), p, seed=seed))[~keep & ~np.isfinite(x)]).all()
    nan = np.full(64, np.nan, np.float32)
    assert torch.isnan(torch.nn.functional.dropout(torch.tensor(nan), p)).all()  # the oracle's rule
    assert np.isnan(to_numpy(F.dropout(to_device(nan, device), p, seed=seed))).all()
    assert np.isnan(to_numpy(F.dropout(to_device(nan, device), 1.0, seed=seed))).all()


def test_non_contiguous_input_uses_c_order_index(device, rng):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    out = F.dropout(to_device(x, device).T, 0.5, seed=7)
    np.testing.assert_array_equal(to_numpy(out), F.dropout(np.ascontiguousarray(x.T), 0.5, seed=7))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_rate_and_independence(p):
    """Keep rate, neighbour pairs and two seeds' overlap within 6 standard deviations of the ideal."""
    n = 1_000_000
    keep = F.dropout_mask((n,), p, seed=2024)
    q = 1 - p
    assert abs(keep.mean() - q) < 6 * np.sqrt(p * q / n)
    pairs = keep[:-1] & keep[1:]
    assert abs(pairs.mean() - q * q) < 6 * np.sqrt(q * q * (1 - q * q) / n)
    both = keep & F.dropout_mask((n,), p, seed=2025)
    assert abs(both.mean() - q * q) < 6 * np.sqrt(q * q * (1 - q * q) / n)


def test_scaling_keeps_the_expectation(rng):
    x = np.ones((200, 500))
    out = F.dropout(x, 0.3, seed=5)
    assert set(np.unique(out)) == {0.0, 1 / 0.7}
    assert abs(out.mean() - 1.0) < 6 * np.sqrt(0.3 / 0.7 / x.size)


def test_seed_reproduces_and_seeds_differ(rng):
    x = rng.standard_normal((4, 50)).astype(np.float32)
    np.testing.assert_array_equal(F.dropout(x, 0.5, seed=1), F.dropout(x, 0.5, seed=1))
    assert not np.array_equal(F.dropout(x, 0.5, seed=1), F.dropout(x, 0.5, seed=2))


def test_default_seed_comes_from_manual_seed(rng):
    x = rng.standard_normal(300).astype(np.float32)
    gpuconv.manual_seed(11)
    first = F.dropout(x, 0.5)
    second = F.dropout(x, 0.5)
    gpuconv.manual_seed(11)
    np.testing.assert_array_equal(F.dropout(x, 0.5), first)
    assert not np.array_equal(first, second)


def test_identities(device, rng):
    x = to_device(rng.standard_normal((3, 4)).astype(np.float32), device)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0, seed=3) is x
    assert F.dropout_backward(x, 0.0, 3) is x
    zeros = F.dropout(x, 1.0, seed=3)
    assert device_of(zeros) == device
    np.testing.assert_array_equal(to_numpy(zeros), np.zeros((3, 4)))
    np.testing.assert_array_equal(to_numpy(F.dropout_backward(x, 1.0, 3)), np.zeros((3, 4)))


def test_matches_torch_statistics():
    torch = pytest.importorskip("torch")
    x = np.ones(200_000, np.float32)
    ours = F.dropout(x, 0.4, seed=99)
    theirs = torch.nn.functional.dropout(torch.tensor(x), 0.4).numpy()
    np.testing.assert_array_equal(np.unique(ours), np.unique(theirs))  # the same {0, 1/(1-p)} in float32
    assert abs((ours == 0).mean() - (theirs == 0).mean()) < 6 * np.sqrt(2 * 0.24 / x.size)


def test_dropout_layer_with_p_1_zeros_output_and_gradient_as_torch(device, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 5)).astype(np.float32)
    theirs = torch.nn.Dropout(1.0)(torch.tensor(x, requires_grad=True))
    layer = gpuconv.nn.Dropout(1.0)
    out = layer(to_device(x, device))
    np.testing.assert_array_equal(to_numpy(out), theirs.detach().numpy())
    np.testing.assert_array_equal(to_numpy(layer.backward(to_device(np.ones_like(x), device))), np.zeros_like(x))
    assert repr(layer) == "Dropout(p=1.0)"
    np.testing.assert_array_equal(to_numpy(layer.eval()(to_device(x, device))), x)


def test_argument_errors(rng):
    x = rng.standard_normal(10).astype(np.float32)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p must be between 0 and 1"):
            F.dropout(x, p, seed=1)
    with pytest.raises(TypeError, match="p must be a number, got str"):
        F.dropout_backward(x, "0.5", 1)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        F.dropout(x, 0.5, seed=-1)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        F.dropout_backward(x, 0.5, 1.0)
    with pytest.raises(TypeError, match=r"input must be float32 or float64 on cpu, got int32 array of shape \(10,\)"):
        F.dropout(x.astype(np.int32), 0.5, seed=1)

"""ReLU, tanh, sigmoid and their gradients: every device against float64 loop references, PyTorch
agreement, finite differences, and argument errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpuconv.functional as F
from gpuconv.device import device_of, to_device, to_numpy

REFERENCES = {  # name: (f(x), f'(x) written in terms of y = f(x)), on Python floats
    "relu": (lambda x: x if x > 0 else 0.0, lambda y: 1.0 if y > 0 else 0.0),
    "tanh": (math.tanh, lambda y: 1.0 - y * y),
    "sigmoid": (lambda x: 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0, lambda y: y * (1.0 - y)),
}


def _loop(fn, *arrays):
    flat = [a.astype(np.float64).ravel() for a in arrays]
    return np.array([fn(*values) for values in zip(*flat)]).reshape(arrays[0].shape)


# Sizes with n % 4 == 0 (float4 body only), != 0 (scalar tail), one element, and an empty array.
SHAPES = [(2, 3, 4, 5), (3, 5, 7), (1,), (0, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_forward_and_backward_match_loops(device, rng, name, shape):
    f, derivative = REFERENCES[name]
    x = (4 * rng.standard_normal(shape)).astype(np.float32)
    x.flat[:2] = [0.0, -90.0][: x.size]  # relu's kink; sigmoid's exp(-x) overflow in float32
    g = rng.standard_normal(shape).astype(np.float32)

    y = getattr(F, name)(to_device(x, device))
    assert device_of(y) == device and y.shape == shape and y.dtype == np.float32
    np.testing.assert_allclose(to_numpy(y), _loop(f, x), rtol=1e-6, atol=1e-7)

    grad = getattr(F, f"{name}_backward")(to_device(g, device), y)
    assert device_of(grad) == device and grad.shape == shape and grad.dtype == np.float32
    want = _loop(lambda gi, yi: gi * derivative(yi), g, to_numpy(y))
    np.testing.assert_allclose(to_numpy(grad), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_unaligned_and_non_contiguous_views(device, rng, name):
    """A view at an odd offset takes the kernels' scalar path; a strided one is copied first."""
    f, derivative = REFERENCES[name]
    base = to_device(rng.standard_normal(19).astype(np.float32), device)
    for x in (base[1:], base[::2]):
        y = getattr(F, name)(x)
        np.testing.assert_allclose(to_numpy(y), _loop(f, to_numpy(x)), rtol=1e-6, atol=1e-7)
        grad = getattr(F, f"{name}_backward")(x, y)
        want = _loop(lambda gi, yi: gi * derivative(yi), to_numpy(x), to_numpy(y))
        np.testing.assert_allclose(to_numpy(grad), want, rtol=1e-6, atol=1e-7)


def test_relu_propagates_nan(device):
    x = np.array([np.nan, -1.0, 2.0, -np.inf, np.inf], np.float32)
    np.testing.assert_array_equal(to_numpy(F.relu(to_device(x, device))), [np.nan, 0.0, 2.0, 0.0, np.inf])


def test_float64_on_cpu(rng):
    x = rng.standard_normal((3, 4))
    for name, (f, _) in REFERENCES.items():
        y = getattr(F, name)(x)
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, _loop(f, x), rtol=1e-14)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_torch_forward_and_autograd(rng, name):
    torch = pytest.importorskip("torch")
    x = (3 * rng.standard_normal((4, 3, 5, 5))).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = getattr(torch, name)(xt)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(getattr(F, name)(x), yt.detach().numpy(), rtol=1e-6, atol=1e-7)
    # From torch's own output: 1 - y^2 cancels where tanh saturates, amplifying ulp differences in y.
    grad = getattr(F, f"{name}_backward")(g, yt.detach().numpy())
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_backward_matches_finite_differences(rng, name):
    x = rng.standard_normal(50)
    x = x[np.abs(x) > 1e-2]  # keep relu's kink out of reach of the differences
    g = rng.standard_normal(x.shape)
    f = getattr(F, name)
    eps = 1e-6
    numeric = g * (f(x + eps) - f(x - eps)) / (2 * eps)
    np.testing.assert_allclose(getattr(F, f"{name}_backward")(g, f(x)), numeric, rtol=1e-6, atol=1e-9)


def test_argument_errors(rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(TypeError, match=r"input must be float32 or float64 on cpu, got int64 array of shape \(2, 3\)"):
        F.relu(np.ones((2, 3), np.int64))
    with pytest.raises(TypeError, match="input must be an array, got list"):
        F.tanh([1.0, 2.0])
    with pytest.raises(ValueError, match=r"grad_output and output must have one shape, got \(2, 3\) and \(3, 2\)"):
        F.sigmoid_backward(x, x.T.copy())
    with pytest.raises(TypeError, match="output must be float32 or float64"):
        F.relu_backward(x, x.astype(np.float16))


def test_emu_refuses_float64_and_mixed_devices(rng):
    pytest.importorskip("gpuconv.emu")
    x = rng.standard_normal(8)
    with pytest.raises(TypeError, match=r"input must be float32 on emu, got float64 array of shape \(8,\)"):
        F.relu(to_device(x, "emu"))
    y = x.astype(np.float32)
    with pytest.raises(ValueError, match="grad_output on emu, output on cpu"):
        F.tanh_backward(to_device(y, "emu"), y)


def test_relu_backward_zeroes_even_nan_gradients_where_the_unit_is_off(device):
    grad = np.array([np.nan, np.inf, 3.0, np.nan, -2.0], np.float32)
    output = np.array([0.0, 0.0, 0.0, 1.0, 5.0], np.float32)
    result = to_numpy(F.relu_backward(to_device(grad, device), to_device(output, device)))
    np.testing.assert_array_equal(result, [0.0, 0.0, 0.0, np.nan, -2.0])
    assert not np.signbit(result[:3]).any()

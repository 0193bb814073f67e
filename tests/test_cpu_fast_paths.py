"""The NumPy path's fast special cases against the general code they stand in for: chunked
optimizer updates (bit-identical to whole-array formulas), the 2x2/2 max-pool (identical values
and indices), LRN's channel window sums."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpuconv import optim
from gpuconv.cpu import threads
from gpuconv.functional import max_pool2d, norm, pool
from gpuconv.optim import SGD, Adam

# Sizes that leave a partial chunk, fall inside one chunk, and span several.
SIZES = [optim._CPU_CHUNK * 2 + 123, 5, optim._CPU_CHUNK - 1]


@pytest.fixture(params=[1, 2], ids=["one thread", "two threads"])
def update_threads(request, monkeypatch):
    """An update of two chunks or more split between two threads, or not."""
    monkeypatch.setattr(threads, "blas_threads", lambda: request.param)
    return request.param


def sgd_whole_arrays(data, grad, buffer, lr, momentum, weight_decay, nesterov):
    """The update as whole-array NumPy expressions (the formulas of SGD's docstring)."""
    d = grad + weight_decay * data if weight_decay else grad
    if momentum:
        buffer *= momentum
        buffer += d
        d = d + momentum * buffer if nesterov else buffer
    data -= lr * d


def adam_whole_arrays(data, grad, exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt, betas, eps, weight_decay):
    beta1, beta2 = betas
    g = grad + weight_decay * data if weight_decay else grad
    exp_avg += (1 - beta1) * (g - exp_avg)
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * g * g
    data -= step_size * exp_avg / (np.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps)


SGD_SETTINGS = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.1, weight_decay=0.1),
                dict(lr=0.05, momentum=0.9, weight_decay=0.01), dict(lr=0.05, momentum=0.9, nesterov=True),
                dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)]
ADAM_SETTINGS = [dict(lr=0.01), dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)]


def _optimizer_and_copies(rng, dtype, make, steps=3):
    """``make``'s optimizer over random parameters, copies of them, and ``steps`` steps' gradients."""
    start = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    params = [SimpleNamespace(data=w.copy(), grad=None) for w in start]
    grads = [[rng.standard_normal(n).astype(dtype) for n in SIZES] for _ in range(steps)]
    return make(params), params, start, grads


def _step(optimizer, params, grads) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()


def test_a_long_update_is_split_between_two_threads_in_whole_chunks(rng, update_threads, monkeypatch):
    optimizer, params, _, grads = _optimizer_and_copies(rng, np.float32, lambda params: SGD(params, lr=0.1), steps=1)
    sizes, real = [], SGD._update_numpy

    def recording(self, data, grad, state, scalars):
        sizes.append(data.size)
        real(self, data, grad, state, scalars)

    monkeypatch.setattr(SGD, "_update_numpy", recording)
    _step(optimizer, params, grads[0])
    total = sum(SIZES)
    assert sum(sizes) == total
    if update_threads == 1:
        assert sizes == [total]
    else:
        first, second = sizes if len(sizes) == 2 else (None, None)  # in either order: two threads
        assert first is not None and min(first, second) + max(first, second) == total
        assert (first % optim._CPU_CHUNK == 0 or second % optim._CPU_CHUNK == 0) and abs(first - second) <= optim._CPU_CHUNK


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("settings", SGD_SETTINGS)
def test_chunked_sgd_is_bit_identical_to_whole_array_formulas(rng, dtype, settings, update_threads):
    optimizer, params, expected, grads = _optimizer_and_copies(rng, dtype, lambda params: SGD(params, **settings))
    buffers = [np.zeros_like(w) for w in expected]
    for step_grads in grads:
        _step(optimizer, params, step_grads)
        for w, g, b in zip(expected, step_grads, buffers):
            sgd_whole_arrays(w, g, b, settings["lr"], settings.get("momentum", 0.0),
                             settings.get("weight_decay", 0.0), settings.get("nesterov", False))
    for index, (param, w) in enumerate(zip(params, expected)):
        np.testing.assert_array_equal(param.data, w, err_msg=f"parameter {index}")
        if settings.get("momentum"):
            np.testing.assert_array_equal(optimizer.state[index]["momentum_buffer"], buffers[index])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("settings", ADAM_SETTINGS)
def test_chunked_adam_is_bit_identical_to_whole_array_formulas(rng, dtype, settings, update_threads):
    optimizer, params, expected, grads = _optimizer_and_copies(rng, dtype, lambda params: Adam(params, **settings))
    betas, eps, weight_decay = settings.get("betas", (0.9, 0.999)), settings.get("eps", 1e-8), settings.get("weight_decay", 0.0)
    moments = [(np.zeros_like(w), np.zeros_like(w)) for w in expected]
    for step, step_grads in enumerate(grads, start=1):
        _step(optimizer, params, step_grads)
        step_size = settings["lr"] / (1 - betas[0] ** step)
        bias_correction2_sqrt = np.sqrt(1 - betas[1] ** step)
        for w, g, (m, v) in zip(expected, step_grads, moments):
            adam_whole_arrays(w, g, m, v, step_size, float(bias_correction2_sqrt), betas, eps, weight_decay)
    for index, (param, w) in enumerate(zip(params, expected)):
        np.testing.assert_array_equal(param.data, w, err_msg=f"parameter {index}")
        np.testing.assert_array_equal(optimizer.state[index]["exp_avg"], moments[index][0])
        np.testing.assert_array_equal(optimizer.state[index]["exp_avg_sq"], moments[index][1])


def _general_max_pool(x, window):
    """The separable general path, bypassing the 2x2 fast path."""
    h, w = x.shape[2:]
    row_best, column_at = pool._window_max(x, np.arange(w, dtype=np.int32), window, 1)
    return pool._window_max(row_best, np.arange(h, dtype=np.int32)[:, None] * w + column_at, window, 0)


def _tricky(rng, shape, dtype):
    """Values with many ties: small integers, signed zeros, -inf."""
    x = rng.integers(-2, 3, shape).astype(dtype)
    x[rng.random(shape) < 0.2] = -0.0
    x[rng.random(shape) < 0.1] = -np.inf
    return x


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 7, 5), (3, 1, 2, 3), (1, 1, 3, 2), (0, 2, 4, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_2x2_max_pool_fast_path_gives_the_general_paths_values_and_indices(rng, shape, dtype):
    x = _tricky(rng, shape, dtype)
    window = pool._window(x.shape, 2, 2, 0, False)
    fast = pool._max_pool2d_2x2_numpy(x, window)
    assert fast is not None
    expected = _general_max_pool(x, window)
    np.testing.assert_array_equal(fast[0], expected[0])
    np.testing.assert_array_equal(np.signbit(fast[0]), np.signbit(expected[0]))
    np.testing.assert_array_equal(fast[1], expected[1])
    assert fast[0].dtype == dtype and fast[1].dtype == np.int32
    if x.size:
        values, indices = torch.nn.functional.max_pool2d(torch.from_numpy(x), 2, return_indices=True)
        np.testing.assert_array_equal(fast[1], indices.numpy())
        np.testing.assert_array_equal(fast[0], values.numpy())


def test_2x2_max_pool_of_a_strided_view(rng):
    x = rng.standard_normal((2, 6, 9, 10)).astype(np.float32)[:, ::2, 1:, ::-1]
    out, indices = max_pool2d(x, 2, return_indices=True)
    expected = _general_max_pool(np.ascontiguousarray(x), pool._window(x.shape, 2, 2, 0, False))
    np.testing.assert_array_equal(out, expected[0])
    np.testing.assert_array_equal(indices, expected[1])


def test_2x2_max_pool_with_nan_takes_the_general_path(rng):
    """A compare cannot find a window's first NaN: the fast path declines and the index names it."""
    x = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    x[0, 0, 1, 1] = x[0, 0, 0, 3] = np.nan
    window = pool._window(x.shape, 2, 2, 0, False)
    assert pool._max_pool2d_2x2_numpy(x, window) is None
    out, indices = max_pool2d(x, 2, return_indices=True)
    assert np.isnan(out[0, 0, 0]).all() and indices[0, 0, 0].tolist() == [5, 3]


@pytest.mark.parametrize("args", [dict(kernel_size=2, stride=1), dict(kernel_size=2, padding=1),
                                  dict(kernel_size=3, stride=2), dict(kernel_size=2, ceil_mode=True)])
def test_2x2_max_pool_fast_path_declines_other_geometries(args):
    x = np.zeros((1, 1, 5, 5), np.float32)
    window = pool._window(x.shape, args.pop("kernel_size"), args.get("stride"), args.get("padding", 0),
                          args.get("ceil_mode", False))
    assert pool._max_pool2d_2x2_numpy(x, window) is None


@pytest.mark.parametrize("channels", [1, 2, 5, 13])
@pytest.mark.parametrize("before, after", [(0, 0), (1, 0), (0, 1), (2, 2), (2, 1), (3, 4), (7, 7), (30, 2)])
def test_channel_window_sum_matches_a_direct_sum(rng, channels, before, after):
    x = rng.standard_normal((2, channels, 3, 2))
    total = norm._channel_window_sum(lambda out: np.copyto(out, x), x.shape, x.dtype, before, after)
    expected = np.stack([x[:, max(c - before, 0):c + after + 1].sum(axis=1) for c in range(channels)], axis=1)
    np.testing.assert_allclose(total, expected, rtol=1e-13, atol=1e-13)


def test_scale_power_by_square_roots_is_the_power_to_float32_rounding(rng):
    scale = rng.uniform(1e-3, 1e3, 10000).astype(np.float32)
    np.testing.assert_allclose(norm._scale_power(scale, 0.75), scale.astype(np.float64) ** 0.75, rtol=4e-7)
    np.testing.assert_array_equal(norm._scale_power(scale, 0.5), scale ** 0.5)


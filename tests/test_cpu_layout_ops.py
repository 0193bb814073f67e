"""Pooling and LRN in the NumPy executor's (C, H, W, N) layout against the NCHW functional ops on
the transposed data (identical values and indices, the same gradients), PyTorch, and finite
differences; the fused ReLU; caller-owned result buffers; views as inputs; the per-shape plans
of the pool and the convolution stage, kept from step to step, against fresh ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gpuconv.functional as F
from gpuconv import nn
from gpuconv.cpu import conv as cpu_conv
from gpuconv.cpu import norm as cpu_norm
from gpuconv.cpu import pool as cpu_pool
from gpuconv.cpu.kept import KeptViews
from gpuconv.cpu.stages import ConvStage, Workspace

from gradcheck import numerical_gradient

DTYPES = [np.float32, np.float64]

# (NCHW shape, kernel, stride, padding, ceil_mode): the 2x2/2 fast path (even and odd planes),
# AlexNet's overlapping 3x3/2, kernels 1-3 and asymmetric ones, strides 1-3, padding, ceil_mode
# windows past the input, batch 1, one channel, a 1x1 plane; windows side by side (kernel =
# stride, no padding: the tiled backward) covering the plane or leaving rows and columns out.
GEOMETRIES = [
    ((3, 2, 8, 6), 2, 2, 0, False),
    ((2, 3, 7, 5), 2, 2, 0, False),
    ((2, 3, 7, 5), 2, 2, 0, True),
    ((2, 2, 11, 9), 3, 2, 0, False),
    ((1, 2, 9, 8), 3, 2, 1, True),
    ((2, 1, 6, 7), (3, 2), (1, 2), (1, 0), True),
    ((1, 1, 5, 5), (3, 3), (3, 2), (1, 1), True),
    ((3, 2, 4, 6), (1, 3), (1, 3), (0, 1), False),
    ((2, 2, 5, 4), 1, 1, 0, False),
    ((1, 1, 1, 1), 2, 2, 1, True),
    ((2, 1, 7, 7), 2, 3, 1, False),
    ((2, 3, 7, 8), 3, 3, 0, False),
    ((3, 2, 6, 5), (2, 1), (2, 1), 0, False),
]
IDS = ["2x2s2", "2x2s2-odd", "2x2s2-odd-ceil", "3x3s2", "3x3s2p1-ceil", "3x2s1x2p1x0-ceil", "3x3s3x2p1-ceil",
       "1x3s1x3p0x1", "1x1", "1x1-plane-pad", "2x2s3p1", "3x3s3-odd", "2x1s2x1"]


def chwn(x):
    """An NCHW array in the (C, H, W, N) layout, C-contiguous."""
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def nchw(x):
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))


def tricky(rng, shape, dtype):
    """Many ties: small integers, signed zeros, -inf."""
    x = rng.integers(-2, 3, shape).astype(dtype)
    x[rng.random(shape) < 0.2] = -0.0
    x[rng.random(shape) < 0.1] = -np.inf
    return x


def assert_identical(actual, expected):
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(np.signbit(actual), np.signbit(expected))


def torch_max_pool(x, k, s, p, ceil_mode, return_indices=False):
    return torch.nn.functional.max_pool2d(x, k, s, p, ceil_mode=ceil_mode, return_indices=return_indices)


def _pool_args(geometry):
    shape, k, s, p, ceil_mode = geometry
    return shape, (k, s, p, ceil_mode)


# ------------------------------------------------------------------------------------------ max


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_max_pool2d_gives_the_nchw_ops_values_and_indices(rng, geometry, dtype):
    shape, args = _pool_args(geometry)
    x = tricky(rng, shape, dtype)
    out, indices = cpu_pool.max_pool2d(chwn(x), *args)
    want, want_indices = F.max_pool2d(x, *args, return_indices=True)
    assert out.dtype == dtype and indices.dtype == np.uint8
    assert_identical(nchw(out), want)
    flat = cpu_pool.indices_nchw(indices, chwn(x).shape, out.shape, *args)
    assert flat.dtype == np.int64 and flat.flags.c_contiguous
    np.testing.assert_array_equal(flat, want_indices)
    torch_out, torch_indices = torch_max_pool(torch.from_numpy(x), *args, return_indices=True)
    np.testing.assert_array_equal(flat, torch_indices.numpy())
    np.testing.assert_array_equal(nchw(out), torch_out.numpy())


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_max_pool2d_nan_wins_at_the_first_nan(rng, geometry):
    """NaN propagates; a window's index names its first NaN in row-major order, as the NCHW op and
    the kernels do (PyTorch 2.13's CPU loop keeps the last of several; one NaN: all agree)."""
    shape, args = _pool_args(geometry)
    x = tricky(rng, shape, np.float32)
    x[rng.random(shape) < 0.15] = np.nan
    out, indices = cpu_pool.max_pool2d(chwn(x), *args)
    want, want_indices = F.max_pool2d(x, *args, return_indices=True)
    np.testing.assert_array_equal(nchw(out), want)  # NaN equal to NaN here
    np.testing.assert_array_equal(cpu_pool.indices_nchw(indices, chwn(x).shape, out.shape, *args), want_indices)


def test_max_pool2d_single_nan_and_all_minus_inf_windows_match_pytorch():
    x = np.arange(2 * 16, dtype=np.float32).reshape(1, 2, 4, 4)
    x[0, 0, :2, :2] = -np.inf
    x[0, 1, 2, 3] = x[0, 1, 0, 0] = np.nan
    for args in ((2, 2, 0, False), (3, 2, 1, False)):
        out, indices = cpu_pool.max_pool2d(chwn(x), *args)
        torch_out, torch_indices = torch_max_pool(torch.from_numpy(x), *args, return_indices=True)
        np.testing.assert_array_equal(nchw(out), torch_out.numpy())
        np.testing.assert_array_equal(cpu_pool.indices_nchw(indices, chwn(x).shape, out.shape, *args),
                                      torch_indices.numpy())
    assert nchw(out)[0, 0, 0, 0] == -np.inf


@pytest.mark.parametrize("geometry", GEOMETRIES[:5], ids=IDS[:5])
def test_max_pool2d_relu_is_pool_then_relu_with_the_pools_indices(rng, geometry):
    shape, args = _pool_args(geometry)
    x = tricky(rng, shape, np.float32)
    out, indices = cpu_pool.max_pool2d(chwn(x), *args, relu=True)
    plain, plain_indices = cpu_pool.max_pool2d(chwn(x), *args)
    np.testing.assert_array_equal(out, F.relu(plain))
    np.testing.assert_array_equal(nchw(out), F.max_pool2d(F.relu(x), *args))
    np.testing.assert_array_equal(indices, plain_indices)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_max_pool2d_backward_gives_the_nchw_gradient(rng, geometry, dtype):
    shape, args = _pool_args(geometry)
    x = tricky(rng, shape, dtype)
    out, indices = cpu_pool.max_pool2d(chwn(x), *args)
    g = rng.standard_normal(out.shape).astype(dtype)
    grad = cpu_pool.max_pool2d_backward(g, indices, chwn(x).shape, *args)
    assert grad.dtype == dtype and grad.shape == chwn(x).shape
    want = F.max_pool2d_backward(nchw(g), F.max_pool2d(x, *args, return_indices=True)[1], shape, *args)
    if dtype == np.float64:  # the same sums in the same order (overlapping windows' row-major order)
        np.testing.assert_array_equal(nchw(grad), want)
    else:  # the NCHW op sums in float64; we, like PyTorch, in float32, in the same order
        np.testing.assert_allclose(nchw(grad), want, rtol=1e-6, atol=1e-7)
        xt = torch.from_numpy(x).requires_grad_()
        torch_max_pool(xt, *args).backward(torch.from_numpy(nchw(g)))
        np.testing.assert_array_equal(nchw(grad), xt.grad.numpy())


@pytest.mark.parametrize("geometry", GEOMETRIES[:6], ids=IDS[:6])
def test_max_pool2d_relu_backward_is_the_nchw_relu_backward(rng, geometry):
    shape, args = _pool_args(geometry)
    x = tricky(rng, shape, np.float64)
    out, indices = cpu_pool.max_pool2d(chwn(x), *args, relu=True)
    g = rng.standard_normal(out.shape)
    grad = cpu_pool.max_pool2d_backward(g, indices, chwn(x).shape, *args, relu_output=out)
    _, nchw_indices = F.max_pool2d(x, *args, return_indices=True)
    want = F.max_pool2d_relu_backward(nchw(g), nchw_indices, nchw(out), shape, *args)
    np.testing.assert_array_equal(nchw(grad), want)
    assert (nchw(grad)[x <= 0] == 0).all()


@pytest.mark.parametrize("relu", [False, True])
def test_max_pool2d_backward_of_many_taps_scatters(rng, relu):
    """A 5x5 window with stride 5 (non-overlapping, but 25 taps, past the per-tap passes' limit)
    scatters as overlapping windows do."""
    x = tricky(rng, (2, 3, 12, 11), np.float64)
    args = (5, 5, 2, True)
    out, indices = cpu_pool.max_pool2d(chwn(x), *args, relu=relu)
    g = rng.standard_normal(out.shape)
    grad = cpu_pool.max_pool2d_backward(g, indices, chwn(x).shape, *args, relu_output=out if relu else None)
    _, nchw_indices = F.max_pool2d(x, *args, return_indices=True)
    backward = F.max_pool2d_relu_backward if relu else F.max_pool2d_backward
    want = backward(nchw(g), nchw_indices, *((nchw(out),) if relu else ()), x.shape, *args)
    np.testing.assert_array_equal(nchw(grad), want)


def test_max_pool2d_backward_keeps_an_infinite_gradient_to_its_pixel(rng):
    """The per-tap passes select with bitwise masks: no inf * 0 = NaN next to the argmax."""
    x = rng.standard_normal((1, 1, 6, 6))
    out, indices = cpu_pool.max_pool2d(chwn(x), 3, 2, 1)
    g = np.ones(out.shape)
    g[0, 1, 1, 0] = np.inf
    grad = cpu_pool.max_pool2d_backward(g, indices, chwn(x).shape, 3, 2, 1)
    assert np.isinf(grad).sum() >= 1 and not np.isnan(grad).any()
    np.testing.assert_array_equal(nchw(grad), F.max_pool2d_backward(
        nchw(g), F.max_pool2d(x, 3, 2, 1, return_indices=True)[1], x.shape, 3, 2, 1))


def test_max_pool2d_huge_window_over_one_pixel():
    """Cost follows the input and output, not the window (as the NCHW op's): one tap per axis."""
    x = np.array([[[[3.0, -1.0]]]])  # (C, H, W, N) = (1, 1, 1, 2)
    args = (46342, 1, 23171, False)
    out, indices = cpu_pool.max_pool2d(x, *args)
    want, want_indices = F.max_pool2d(nchw(x), *args, return_indices=True)
    assert indices.dtype == np.uint32
    np.testing.assert_array_equal(nchw(out), want)
    np.testing.assert_array_equal(cpu_pool.indices_nchw(indices, x.shape, out.shape, *args), want_indices)
    g = np.arange(out.size, dtype=np.float64).reshape(out.shape)
    grad = cpu_pool.max_pool2d_backward(g, indices, x.shape, *args)
    np.testing.assert_array_equal(nchw(grad), F.max_pool2d_backward(nchw(g), want_indices, nchw(x).shape, *args))


def _check_kept_plan(rng, geometry, relu, dtype=np.float32, kind="max"):
    """A kept plan (a layer's lane) called step after step gives what the functions give: with new
    values in the same buffers (its kept views), then with other buffers (views rebuilt).
    ``kind``: 'max' (``relu`` fused or not), or 'avg' (``relu``: count_include_pad)."""
    shape, args = _pool_args(geometry)
    x = chwn(tricky(rng, shape, dtype))
    if kind == "max":
        plan = cpu_pool.MaxPool2dPlan(x.shape, dtype, *args, keep=True)
        codes = np.empty(plan.output_shape, plan.code_dtype)
    else:
        plan = cpu_pool.AvgPool2dPlan(x.shape, dtype, *args, relu, keep=True)
    out, grad_input = np.empty(plan.output_shape, dtype), np.empty(x.shape, dtype)
    g = np.empty(out.shape, dtype)
    for step in range(4):
        if step == 2:  # the next layer's buffers are other arrays now (and strided views)
            x = np.empty(x.shape[:3] + (2 * x.shape[3],), dtype)[..., ::2]
            out, g = np.empty_like(out), np.empty(out.shape[:3] + (2 * out.shape[3],), dtype)[..., 1::2]
            grad_input = np.empty_like(grad_input)
            if kind == "max":
                codes = np.empty_like(codes)
        x[...] = chwn(tricky(rng, shape, dtype))
        g[...] = rng.standard_normal(out.shape)
        g[rng.random(out.shape) < 0.2] = -0.0
        with np.errstate(all="ignore"):
            if kind == "avg":
                assert plan.forward(x, out) is out
                assert plan.backward(g, grad_input) is grad_input
                assert_identical(out, cpu_pool.avg_pool2d(x, *args, relu))
                assert_identical(grad_input, cpu_pool.avg_pool2d_backward(g, x.shape, *args, relu))
                continue
            got = plan.forward(x, out, codes, relu=relu)
            assert got[0] is out and got[1] is codes
            assert plan.backward(g, codes, grad_input, relu_output=out if relu else None) is grad_input
        want_out, want_codes = cpu_pool.max_pool2d(x, *args, relu=relu)
        assert_identical(out, want_out)
        np.testing.assert_array_equal(codes, want_codes)
        want = cpu_pool.max_pool2d_backward(g, want_codes, x.shape, *args, relu_output=want_out if relu else None)
        assert_identical(grad_input, want)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_a_kept_plan_gives_the_functions_results_step_after_step(rng, geometry, relu):
    _check_kept_plan(rng, geometry, relu)
    _check_kept_plan(rng, geometry, relu, kind="avg")


def test_a_kept_plan_in_float64_and_one_image(rng):
    _check_kept_plan(rng, ((1, 3, 8, 6), 2, 2, 0, False), True, np.float64)
    _check_kept_plan(rng, ((1, 2, 7, 9), 3, 3, 0, False), False, np.float64)
    _check_kept_plan(rng, ((1, 2, 7, 9), 3, 3, 0, False), True, np.float64, kind="avg")


# ------------------------------------------------------------------------------------------ avg


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_avg_pool2d_and_backward_give_the_nchw_ops_results(rng, geometry, dtype, count_include_pad):
    """The same bits as the NCHW ops' sums from zero (signed zeros included: the side by side
    windows' sums skip the zeros and add +0 once), PyTorch's values to rounding."""
    shape, args = _pool_args(geometry)
    x = tricky(rng, shape, dtype)
    out = cpu_pool.avg_pool2d(chwn(x), *args, count_include_pad)
    want = F.avg_pool2d(x, *args, count_include_pad)
    assert out.dtype == dtype
    assert_identical(nchw(out), want)
    np.testing.assert_allclose(nchw(out), torch.nn.functional.avg_pool2d(
        torch.from_numpy(x), *args, count_include_pad).numpy(), rtol=1e-5 if dtype == np.float32 else 1e-12)
    g = tricky(rng, out.shape, dtype)
    g[np.isinf(g)] = 1.5
    grad = cpu_pool.avg_pool2d_backward(g, chwn(x).shape, *args, count_include_pad)
    assert_identical(nchw(grad), F.avg_pool2d_backward(nchw(g), shape, *args, count_include_pad))


@pytest.mark.parametrize("args", [(2, 2, 0, False), (3, 3, 0, False), (3, 2, 1, True)])
def test_avg_pool2d_of_negative_zeros_is_positive_zero(args):
    """Sums from zero, as the NCHW ops and PyTorch: an all -0 window averages to +0 and a -0
    gradient passes as +0 (the side by side windows' path adds the +0 explicitly)."""
    x = np.full((2, 7, 6, 3), -0.0, np.float32)
    out = cpu_pool.avg_pool2d(x, *args)
    want = torch.nn.functional.avg_pool2d(torch.from_numpy(nchw(x)), *args).numpy()
    assert_identical(nchw(out), want)
    assert not np.signbit(out).any()
    grad = cpu_pool.avg_pool2d_backward(np.full(out.shape, -0.0, np.float32), x.shape, *args)
    minus_zeros = np.full(nchw(out).shape, -0.0, np.float32)
    assert_identical(nchw(grad), F.avg_pool2d_backward(minus_zeros, nchw(x).shape, *args))
    assert not np.signbit(grad).any()


# ------------------------------------------------------------------------------------------ LRN


LRN_CASES = [((2, 7, 3, 4), 5, 1e-2, 0.75, 2.0), ((1, 1, 2, 3), 3, 1e-1, 0.5, 1.0), ((3, 6, 2, 2), 4, 0.3, 0.75, 1.5),
             ((2, 3, 3, 1), 9, 0.05, 1.2, 0.7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, size, alpha, beta, k", LRN_CASES)
def test_local_response_norm_gives_the_nchw_ops_results(rng, shape, size, alpha, beta, k, dtype):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    out, saved = cpu_norm.local_response_norm(chwn(x), size, alpha, beta, k)
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    assert out.dtype == dtype
    np.testing.assert_allclose(nchw(out), F.local_response_norm(x, size, alpha, beta, k), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(nchw(out), torch.nn.functional.local_response_norm(
        torch.from_numpy(x), size, alpha, beta, k).numpy(), rtol=10 * rtol, atol=10 * rtol)
    g = rng.standard_normal(shape).astype(dtype)
    grad = cpu_norm.local_response_norm_backward(chwn(g), chwn(x), out, saved, size, alpha, beta, k)
    want = F.local_response_norm_backward(g, x, F.local_response_norm(x, size, alpha, beta, k), size, alpha, beta, k)
    np.testing.assert_allclose(nchw(grad), want, rtol=10 * rtol, atol=10 * rtol)


@pytest.mark.parametrize("shape, size, alpha, beta, k", LRN_CASES)
def test_local_response_norm_backward_matches_finite_differences(rng, shape, size, alpha, beta, k):
    x = chwn(3 * rng.standard_normal(shape))
    g = rng.standard_normal(x.shape)
    out, saved = cpu_norm.local_response_norm(x, size, alpha, beta, k)
    grad = cpu_norm.local_response_norm_backward(g, x, out, saved, size, alpha, beta, k)
    numeric = numerical_gradient(x, lambda: float((cpu_norm.local_response_norm(x, size, alpha, beta, k)[0] * g).sum()))
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------ buffers and views


def test_result_buffers_are_written_and_returned(rng):
    x = chwn(rng.standard_normal((4, 3, 9, 9)))
    for args in ((2, 2, 0, False), (3, 2, 1, True)):
        _, (c, oh, ow, n) = x.shape, cpu_pool.max_pool2d(x, *args)[0].shape
        out, codes = np.full((c, oh, ow, n), np.nan), np.full((c, oh, ow, n), 99, np.uint8)
        got_out, got_codes = cpu_pool.max_pool2d(x, *args, relu=True, out=out, indices_out=codes)
        assert got_out is out and got_codes is codes
        want_out, want_codes = cpu_pool.max_pool2d(x, *args, relu=True)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(codes, want_codes)
        g = rng.standard_normal(out.shape)
        grad = np.full(x.shape, np.nan)
        assert cpu_pool.max_pool2d_backward(g, codes, x.shape, *args, relu_output=out, out=grad) is grad
        np.testing.assert_array_equal(grad, cpu_pool.max_pool2d_backward(g, codes, x.shape, *args, relu_output=out))
        avg = np.full(out.shape, np.nan)
        assert cpu_pool.avg_pool2d(x, *args, out=avg) is avg
        np.testing.assert_array_equal(avg, cpu_pool.avg_pool2d(x, *args))
        grad = np.full(x.shape, np.nan)
        assert cpu_pool.avg_pool2d_backward(g, x.shape, *args, out=grad) is grad
        np.testing.assert_array_equal(grad, cpu_pool.avg_pool2d_backward(g, x.shape, *args))
    out = np.full(x.shape, np.nan)
    got, saved = cpu_norm.local_response_norm(x, 5, 1e-3, 0.75, 2.0, out=out)
    assert got is out
    reused = np.full(saved.shape, np.nan)
    assert cpu_norm.local_response_norm(x, 5, 1e-3, 0.75, 2.0, saved=reused)[1] is reused
    np.testing.assert_array_equal(reused, saved)
    np.testing.assert_array_equal(out, cpu_norm.local_response_norm(x, 5, 1e-3, 0.75, 2.0)[0])
    g, grad = rng.standard_normal(x.shape), np.full(x.shape, np.nan)
    assert cpu_norm.local_response_norm_backward(g, x, out, saved, 5, 1e-3, 0.75, 2.0, out=grad) is grad
    np.testing.assert_array_equal(grad, cpu_norm.local_response_norm_backward(g, x, out, saved, 5, 1e-3, 0.75, 2.0))


@pytest.mark.parametrize("args", [(2, 2, 0, False), (3, 2, 0, False), (3, 2, 1, True)])
def test_half_batch_views_in_and_out(rng, args):
    """A thread's half of the batch: every input, result buffer and gradient a strided view."""
    x = chwn(tricky(rng, (6, 3, 9, 8), np.float32))
    out, codes = cpu_pool.max_pool2d(x, *args, relu=True)
    full_grad = cpu_pool.max_pool2d_backward(np.ones_like(out), codes, x.shape, *args, relu_output=out)
    half_out, half_codes = np.zeros_like(out), np.zeros_like(codes)
    half_grad = np.zeros_like(x)
    for part in (slice(0, 3), slice(3, 6)):
        cpu_pool.max_pool2d(x[..., part], *args, relu=True, out=half_out[..., part], indices_out=half_codes[..., part])
        cpu_pool.max_pool2d_backward(np.ones_like(out)[..., part], half_codes[..., part], x[..., part].shape, *args,
                                     relu_output=half_out[..., part], out=half_grad[..., part])
    np.testing.assert_array_equal(half_out, out)
    np.testing.assert_array_equal(half_codes, codes)
    np.testing.assert_array_equal(half_grad, full_grad)
    lrn_half = np.zeros_like(x)
    for part in (slice(0, 3), slice(3, 6)):
        cpu_norm.local_response_norm(x[..., part], 5, 1e-2, 0.75, 2.0, out=lrn_half[..., part])
    np.testing.assert_allclose(lrn_half, cpu_norm.local_response_norm(x, 5, 1e-2, 0.75, 2.0)[0], rtol=1e-6)


def test_empty_batch_and_channels():
    for shape in ((0, 4, 4, 3), (2, 4, 4, 0)):
        x = np.zeros(shape, np.float32)
        out, codes = cpu_pool.max_pool2d(x, 2)
        assert out.shape == (shape[0], 2, 2, shape[3])
        assert cpu_pool.max_pool2d_backward(out, codes, shape, 2).shape == shape
        assert cpu_pool.indices_nchw(codes, shape, out.shape, 2).shape == (shape[3], shape[0], 2, 2)
        assert cpu_pool.avg_pool2d(x, 2).shape == out.shape
        assert cpu_pool.avg_pool2d_backward(out, shape, 2).shape == shape
        assert cpu_norm.local_response_norm(x, 5)[0].shape == shape


# ----------------------------------------------------------------------------------------- errors


def test_bad_arguments_are_clear_errors(rng):
    x = np.zeros((2, 4, 4, 3), np.float32)
    out, codes = cpu_pool.max_pool2d(x, 2)
    with pytest.raises(ValueError, match=r"out must be a float32 NumPy array of shape \(2, 2, 2, 3\)"):
        cpu_pool.max_pool2d(x, 2, out=np.zeros((2, 2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="indices_out must be a uint8"):
        cpu_pool.max_pool2d(x, 2, indices_out=np.zeros(out.shape, np.int32))
    with pytest.raises(ValueError, match=r"input \(C, H, W, N\) = \(2, 1, 1, 3\), in NCHW terms of shape \(3, 2, 1, 1\) is too small"):
        cpu_pool.max_pool2d(np.zeros((2, 1, 1, 3), np.float32), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        cpu_pool.max_pool2d(x.astype(np.float16), 2)
    with pytest.raises(ValueError, match="tap codes below 4"):
        cpu_pool.max_pool2d_backward(out, np.full(out.shape, 4, np.uint8), x.shape, 2)
    padded_codes = np.zeros((2, 2, 2, 3), np.uint8)  # tap 0 of the first windows is padding
    for call in (lambda: cpu_pool.max_pool2d_backward(np.ones(padded_codes.shape, np.float32), padded_codes, x.shape, 3, 2, 1),
                 lambda: cpu_pool.indices_nchw(padded_codes, x.shape, padded_codes.shape, 3, 2, 1)):
        with pytest.raises(ValueError, match="name pixels outside the input"):
            call()
    with pytest.raises(ValueError, match="grad_output of shape"):
        cpu_pool.max_pool2d_backward(out[..., :2], codes, x.shape, 2)
    with pytest.raises(ValueError, match="output_shape"):
        cpu_pool.indices_nchw(codes, x.shape, (2, 3, 3, 3), 2)
    with pytest.raises(ValueError, match="saved must be"):
        cpu_norm.local_response_norm_backward(x, x, x, x[:1], 5)


@pytest.mark.parametrize("block_planes", [1, 2, 3])
def test_local_response_norm_in_channel_blocks_is_the_whole_computation(rng, monkeypatch, block_planes):
    """Blocks of channels (sized for the cache) recompute their edges' squares: the same sums."""
    x = chwn(3 * rng.standard_normal((3, 8, 3, 2)))[:, :, :, ::2]  # a strided view too
    g = rng.standard_normal(x.shape)
    out, saved = cpu_norm.local_response_norm(x, 5, 0.1, 0.75, 2.0)
    grad = cpu_norm.local_response_norm_backward(g, x, out, saved, 5, 0.1, 0.75, 2.0)
    monkeypatch.setattr(cpu_norm, "_BLOCK_BYTES", block_planes * x[0].nbytes)
    blocked_out, blocked_saved = cpu_norm.local_response_norm(x, 5, 0.1, 0.75, 2.0)
    np.testing.assert_array_equal(blocked_out, out)
    np.testing.assert_array_equal(blocked_saved, saved)
    np.testing.assert_array_equal(cpu_norm.local_response_norm_backward(g, x, out, saved, 5, 0.1, 0.75, 2.0), grad)
    want = F.local_response_norm_backward(nchw(g), nchw(x), nchw(out), 5, 0.1, 0.75, 2.0)
    np.testing.assert_allclose(nchw(grad), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- conv stage plan

# (NCHW input shape, C_out, kernel, stride, padding, dilation): LeNet's two layers, odd planes,
# strides, asymmetric padding and kernels, dilation, one image.
CONV_GEOMETRIES = [
    ((3, 1, 12, 12), 4, 5, 1, 2, 1),
    ((2, 3, 9, 7), 5, 3, 2, 1, 1),
    ((1, 2, 8, 11), 3, (3, 2), (1, 2), (0, 1), 1),
    ((2, 2, 10, 9), 3, 3, 1, 2, 2),
    ((1, 1, 5, 5), 2, 5, 1, 0, 1),
]


def _conv_step(stage, ws, x, g, needs_input_grad):
    out = stage.forward(ws, x, slice(None))
    grads = {}

    def target(param):
        return grads.setdefault(id(param), np.empty(param.shape, param.dtype)) if param is not None else None

    grad = np.array(g)  # backward may overwrite its gradient
    grad_input = stage.backward(ws, grad, needs_input_grad, target)
    return (np.array(out), None if grad_input is None else np.array(grad_input),
            grads[id(stage.conv.weight)], grads.get(id(stage.conv.bias)))


@pytest.mark.parametrize("block_columns", [1, cpu_conv.BLOCK_COLUMNS])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=[str(i) for i in range(len(CONV_GEOMETRIES))])
def test_a_kept_conv_plan_gives_a_fresh_ones_results_step_after_step(rng, geometry, block_columns, monkeypatch):
    """A ConvStage's lane workspace keeps its plan and views: step after step with new values in
    the same buffers, then other buffers (a strided input), the bits of a fresh stage and
    workspace; and the NCHW ops' values (float64) to float32 rounding."""
    monkeypatch.setattr(cpu_conv, "BLOCK_COLUMNS", block_columns)
    shape, c_out, k, stride, padding, dilation = geometry
    layer = nn.Conv2d(shape[1], c_out, k, stride=stride, padding=padding, dilation=dilation)
    stage, ws = ConvStage(layer, nn.ReLU()), Workspace()
    x = np.empty(shape[1:] + shape[:1], np.float32)
    for step in range(4):
        if step == 2:
            x = np.empty(shape[1:] + (2 * shape[0],), np.float32)[..., 1::2]
        nchw_x = rng.standard_normal(shape).astype(np.float32)
        x[...] = nchw_x.transpose(1, 2, 3, 0)
        g = rng.standard_normal(stage.output_shape(x.shape)).astype(np.float32)
        kept = _conv_step(stage, ws, x, g, needs_input_grad=step != 1)
        fresh = _conv_step(ConvStage(layer, nn.ReLU()), Workspace(), x, g, needs_input_grad=step != 1)
        for got, want in zip(kept, fresh):
            assert (got is None) == (want is None)
            if got is not None:
                assert_identical(got, want)
    # The last step against the NCHW ops in float64.
    weight, bias = layer.weight.data.astype(np.float64), layer.bias.data.astype(np.float64)
    x64, args = nchw_x.astype(np.float64), (stride, padding, dilation)
    y = np.maximum(F.conv2d(x64, weight, bias, *args), 0)
    g64 = nchw(g).astype(np.float64) * (y > 0)
    out, grad_input, grad_weight, grad_bias = kept
    np.testing.assert_allclose(nchw(out), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nchw(grad_input), F.conv2d_input(x64.shape, weight, g64, *args), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_weight, F.conv2d_weight(x64, weight.shape, g64, *args), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(grad_bias, g64.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-4)


def test_the_checkers_catch_views_kept_past_their_arrays(rng, monkeypatch):
    """A planted defect: plans that keep their views even when called with other arrays."""
    def stale(self, name, arrays, build):
        if name not in self._kept:
            self._kept[name] = (arrays, build(*arrays))
        return self._kept[name][1]

    monkeypatch.setattr(KeptViews, "get", stale)
    for kind in ("max", "avg"):
        with pytest.raises(AssertionError):
            _check_kept_plan(rng, GEOMETRIES[0], False, kind=kind)
    with pytest.raises(AssertionError):
        test_a_kept_conv_plan_gives_a_fresh_ones_results_step_after_step(rng, CONV_GEOMETRIES[1], 1, monkeypatch)

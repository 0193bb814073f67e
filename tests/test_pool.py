"""Max and average pooling: every device against float64 loop references, PyTorch agreement
(values, indices, gradients), finite differences, and argument errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpuconv.functional as F
from gpuconv.device import device_of, to_device, to_numpy


def _out_size(size, k, s, p, ceil_mode):
    """PyTorch's pooling output size, written out independently of the library."""
    span = size + 2 * p - k
    out = (span + s - 1) // s + 1 if ceil_mode else span // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _geometry(x_shape, k, s, p, ceil_mode):
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    return kh, kw, sh, sw, ph, pw, _out_size(x_shape[2], kh, sh, ph, ceil_mode), _out_size(x_shape[3], kw, sw, pw, ceil_mode)


def ref_max_pool(x, k, s, p, ceil_mode):
    """Loops: the first strict maximum over the window's input positions, and its h * W + w."""
    n, c, h, w = x.shape
    kh, kw, sh, sw, ph, pw, oh, ow = _geometry(x.shape, k, s, p, ceil_mode)
    out = np.empty((n, c, oh, ow))
    idx = np.empty((n, c, oh, ow), np.int64)
    for b, ch, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        best, best_at = -np.inf, None
        for r in range(i * sh - ph, i * sh - ph + kh):
            for q in range(j * sw - pw, j * sw - pw + kw):
                if 0 <= r < h and 0 <= q < w and (best_at is None or x[b, ch, r, q] > best):
                    best, best_at = x[b, ch, r, q], r * w + q
        out[b, ch, i, j], idx[b, ch, i, j] = best, best_at
    return out, idx


def _avg_windows(x_shape, k, s, p, ceil_mode, count_include_pad):
    """Yield (i, j, input positions, divisor) per window; the divisor counts padding but not the
    positions past the padded input that ceil_mode's last window may reach."""
    _, _, h, w = x_shape
    kh, kw, sh, sw, ph, pw, oh, ow = _geometry(x_shape, k, s, p, ceil_mode)
    for i, j in itertools.product(range(oh), range(ow)):
        rows = [r for r in range(i * sh - ph, i * sh - ph + kh) if r < h + ph]
        cols = [q for q in range(j * sw - pw, j * sw - pw + kw) if q < w + pw]
        inside = [(r, q) for r in rows for q in cols if 0 <= r < h and 0 <= q < w]
        yield i, j, inside, (len(rows) * len(cols) if count_include_pad else len(inside))


def ref_avg_pool(x, k, s, p, ceil_mode, count_include_pad):
    n, c = x.shape[:2]
    _, _, _, _, _, _, oh, ow = _geometry(x.shape, k, s, p, ceil_mode)
    out = np.empty((n, c, oh, ow))
    for i, j, inside, divisor in _avg_windows(x.shape, k, s, p, ceil_mode, count_include_pad):
        total = sum(x[:, :, r, q].astype(np.float64) for r, q in inside)
        out[:, :, i, j] = total / divisor
    return out


def ref_avg_pool_backward(g, x_shape, k, s, p, ceil_mode, count_include_pad):
    grad = np.zeros(x_shape)
    for i, j, inside, divisor in _avg_windows(x_shape, k, s, p, ceil_mode, count_include_pad):
        for r, q in inside:
            grad[:, :, r, q] += g[:, :, i, j] / divisor
    return grad


def ref_max_pool_backward(g, idx, x_shape):
    grad = np.zeros(x_shape)
    n, c, _, w = x_shape
    for b, ch, i, j in itertools.product(range(n), range(c), *map(range, g.shape[2:])):
        grad[b, ch, idx[b, ch, i, j] // w, idx[b, ch, i, j] % w] += g[b, ch, i, j]
    return grad


# (input shape, kernel, stride, padding, ceil_mode): odd sizes, kernel != stride, overlapping
# windows, padding, ceil_mode windows past the padded input, batch 1, 1x1 planes and kernels.
CASES = [
    ((2, 3, 7, 5), (2, 2), (2, 2), (0, 0), False),
    ((2, 3, 7, 5), (2, 2), (2, 2), (0, 0), True),
    ((1, 2, 9, 8), (3, 3), (2, 2), (1, 1), False),
    ((1, 2, 9, 8), (3, 3), (2, 2), (1, 1), True),
    ((2, 1, 6, 7), (3, 2), (1, 2), (1, 0), True),
    ((1, 1, 5, 5), (4, 3), (3, 2), (2, 1), True),
    ((1, 2, 1, 1), (1, 1), (1, 1), (0, 0), False),
    ((1, 1, 1, 1), (2, 2), (2, 2), (1, 1), True),
    ((3, 2, 4, 6), (1, 3), (1, 3), (0, 1), False),
]
CASE_IDS = ["2x2s2", "2x2s2-ceil", "3x3s2p1", "3x3s2p1-ceil", "3x2s1x2p1-ceil", "4x3s3x2p2x1-ceil", "1x1", "1x1-plane-pad",
            "1x3s1x3p0x1"]


def _input(rng, shape, ties):
    x = rng.standard_normal(shape)
    # Small integers make ties common, which tests the first-maximum rule on every device.
    return np.round(2 * x).astype(np.float32) if ties else x.astype(np.float32)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("shape,k,s,p,ceil_mode", CASES, ids=CASE_IDS)
def test_max_pool2d_matches_loops(device, rng, shape, k, s, p, ceil_mode, ties):
    x = _input(rng, shape, ties)
    out, idx = F.max_pool2d(to_device(x, device), k, s, p, ceil_mode, return_indices=True)
    assert device_of(out) == device_of(idx) == device
    want, want_idx = ref_max_pool(x.astype(np.float64), k, s, p, ceil_mode)
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(to_numpy(out), want.astype(np.float32))
    np.testing.assert_array_equal(to_numpy(idx), want_idx)
    np.testing.assert_array_equal(to_numpy(F.max_pool2d(to_device(x, device), k, s, p, ceil_mode)), to_numpy(out))

    g = rng.standard_normal(out.shape).astype(np.float32)
    grad = F.max_pool2d_backward(to_device(g, device), idx, shape, k, s, p, ceil_mode)
    assert device_of(grad) == device and grad.shape == shape
    np.testing.assert_allclose(to_numpy(grad), ref_max_pool_backward(g, want_idx, shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["include-pad", "exclude-pad"])
@pytest.mark.parametrize("shape,k,s,p,ceil_mode", CASES, ids=CASE_IDS)
def test_avg_pool2d_matches_loops(device, rng, shape, k, s, p, ceil_mode, count_include_pad):
    x = rng.standard_normal(shape).astype(np.float32)
    out = F.avg_pool2d(to_device(x, device), k, s, p, ceil_mode, count_include_pad)
    assert device_of(out) == device
    np.testing.assert_allclose(to_numpy(out), ref_avg_pool(x, k, s, p, ceil_mode, count_include_pad), rtol=1e-5, atol=1e-6)

    g = rng.standard_normal(out.shape).astype(np.float32)
    grad = F.avg_pool2d_backward(to_device(g, device), shape, k, s, p, ceil_mode, count_include_pad)
    assert device_of(grad) == device and grad.shape == shape
    want = ref_avg_pool_backward(g, shape, k, s, p, ceil_mode, count_include_pad)
    np.testing.assert_allclose(to_numpy(grad), want, rtol=1e-5, atol=1e-6)


def test_max_pool2d_all_minus_inf_window_and_nan(device):
    """A window of -inf names its first input position, never padding; NaN wins and propagates."""
    x = np.arange(2 * 16, dtype=np.float32).reshape(1, 2, 4, 4)
    x[0, 0, :2, :2] = -np.inf
    x[0, 1, 2, 3] = np.nan
    out, idx = F.max_pool2d(to_device(x, device), 3, 2, 1, return_indices=True)
    out, idx = to_numpy(out), to_numpy(idx)
    assert out[0, 0, 0, 0] == -np.inf and idx[0, 0, 0, 0] == 0
    assert np.isnan(out[0, 1, 1, 1]) and idx[0, 1, 1, 1] == 2 * 4 + 3
    assert np.isnan(out[0, 1]).sum() == 1


def test_pooling_accepts_non_contiguous_input(device, rng):
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    view = to_device(x, device).transpose(0, 1, 3, 2)
    want = np.asarray(x.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(to_numpy(F.max_pool2d(view, 2)), ref_max_pool(want, (2, 2), (2, 2), (0, 0), False)[0])
    np.testing.assert_allclose(to_numpy(F.avg_pool2d(view, 2)), ref_avg_pool(want, (2, 2), (2, 2), (0, 0), False, True),
                               rtol=1e-6)
    g = rng.standard_normal((2, 3, 2, 3, 2)).astype(np.float32)[..., 0]  # a non-contiguous gradient
    grad = F.avg_pool2d_backward(to_device(g, device), (2, 3, 5, 6), 2)
    np.testing.assert_allclose(to_numpy(grad), ref_avg_pool_backward(g, (2, 3, 5, 6), (2, 2), (2, 2), (0, 0), False, True),
                               rtol=1e-6)


def test_kernels_refuse_planes_past_their_int_indices():
    # pool.cu indexes a plane as h * W + w in an int: a 50000 x 50000 plane would read out of
    # bounds on a GPU. Broadcast from one float, so the check must come before any copy.
    from gpuconv.device import EmuArray

    huge = np.broadcast_to(np.zeros(1, np.float32), (1, 1, 50000, 50000)).view(EmuArray)
    small = np.broadcast_to(np.zeros(1, np.float32), (1, 1, 25000, 25000)).view(EmuArray)
    message = r"input of shape \(1, 1, 50000, 50000\) is too large for the pooling kernels"
    for call in (lambda: F.max_pool2d(huge, 2), lambda: F.avg_pool2d(huge, 2),
                 lambda: F.avg_pool2d_backward(small, huge.shape, 2),
                 lambda: F.max_pool2d_backward(small, np.broadcast_to(np.int32(0), small.shape).view(EmuArray), huge.shape, 2)):
        with pytest.raises(ValueError, match=message):
            call()


def test_max_pool2d_refuses_planes_its_int32_indices_cannot_name_on_the_cpu_too():
    huge = np.broadcast_to(np.zeros(1, np.float32), (1, 1, 50000, 50000))
    with pytest.raises(ValueError, match=r"input of shape \(1, 1, 50000, 50000\) has planes of 2\^31 pixels"):
        F.max_pool2d(huge, 2)
    assert F.avg_pool2d(huge[:, :, :4, :4], 2).shape == (1, 1, 2, 2)


def test_float64_cpu_matches_loops(rng):
    x = rng.standard_normal((2, 2, 7, 6))
    out, idx = F.max_pool2d(x, 3, 2, 1, True, return_indices=True)
    want, want_idx = ref_max_pool(x, (3, 3), (2, 2), (1, 1), True)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(idx, want_idx)
    avg = F.avg_pool2d(x, 3, 2, 1, True, False)
    assert avg.dtype == np.float64
    np.testing.assert_allclose(avg, ref_avg_pool(x, (3, 3), (2, 2), (1, 1), True, False), rtol=1e-12)


def _random_configs(rng, count):
    configs = []
    while len(configs) < count:
        k = tuple(int(v) for v in rng.integers(1, 5, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        p = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k)
        hw = tuple(int(v) for v in rng.integers(1, 10, 2))
        ceil_mode = bool(rng.integers(2))
        if all(_out_size(*args, ceil_mode) >= 1 for args in zip(hw, k, s, p)):
            configs.append(((2, 2, *hw), k, s, p, ceil_mode))
    return configs


def _check_against_torch(x, k, s, p, ceil_mode, g, device="cpu", atol=1e-6):
    """Values, indices and gradients of both poolings on ``device`` against PyTorch's CPU autograd;
    ``atol`` for the averages (scale it with 1 / window area: a huge window's averages are tiny)."""
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    shape = x.shape
    xt = torch.tensor(x, requires_grad=True)
    want, want_idx = tf.max_pool2d(xt, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    out, idx = F.max_pool2d(to_device(x, device), k, s, p, ceil_mode, return_indices=True)
    assert F.pool2d_output_size(shape[2:], k, s, p, ceil_mode) == tuple(want.shape[2:])
    np.testing.assert_array_equal(to_numpy(out), want.detach().numpy())
    np.testing.assert_array_equal(to_numpy(idx), want_idx.numpy())
    want.backward(torch.tensor(g))
    grad = F.max_pool2d_backward(to_device(g, device), idx, shape, k, s, p, ceil_mode)
    np.testing.assert_allclose(to_numpy(grad), xt.grad.numpy(), atol=1e-6)

    for count_include_pad in (True, False):
        xt.grad = None
        want = tf.avg_pool2d(xt, k, s, p, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
        out = F.avg_pool2d(to_device(x, device), k, s, p, ceil_mode, count_include_pad)
        np.testing.assert_allclose(to_numpy(out), want.detach().numpy(), rtol=1e-5, atol=atol)
        want.backward(torch.tensor(g))
        grad = F.avg_pool2d_backward(to_device(g, device), shape, k, s, p, ceil_mode, count_include_pad)
        np.testing.assert_allclose(to_numpy(grad), xt.grad.numpy(), rtol=1e-5, atol=atol)


def test_matches_torch_forward_and_autograd(rng):
    for shape, k, s, p, ceil_mode in _random_configs(rng, 40):
        x = _input(rng, shape, ties=bool(rng.integers(2)))
        out_shape = (*shape[:2], *F.pool2d_output_size(shape[2:], k, s, p, ceil_mode))
        _check_against_torch(x, k, s, p, ceil_mode, rng.standard_normal(out_shape).astype(np.float32))


def test_windows_larger_than_the_input_match_torch_randomized(device, rng):
    """Random kernels up to 60 wide with padding up to half of them, on planes of 1 to 6 pixels a side."""
    configs = 0
    while configs < 6:
        k = tuple(int(v) for v in rng.integers(1, 61, 2))
        s = tuple(int(v) for v in rng.integers(1, 70, 2))
        p = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k)
        shape = (1, 2, *(int(v) for v in rng.integers(1, 7, 2)))
        ceil_mode = bool(rng.integers(2))
        if not all(_out_size(*args, ceil_mode) >= 1 for args in zip(shape[2:], k, s, p)):
            continue
        configs += 1
        x = _input(rng, shape, ties=bool(rng.integers(2)))
        out_shape = (*shape[:2], *F.pool2d_output_size(shape[2:], k, s, p, ceil_mode))
        g = rng.standard_normal(out_shape).astype(np.float32)
        _check_against_torch(x, k, s, p, ceil_mode, g, device, 1e-6 / (k[0] * k[1]))


# Windows far larger than the input: a window and its padding cover more than 2^31 positions
# (46342^2 > 2^31, the sign of an int32 area flips), a ceil_mode window starting past the input
# with a stride larger than the input, and big windows over a few pixels. PyTorch answers each at
# once; so must every device (the CPU without materialising the padded plane).
HUGE_WINDOWS = [
    ((1, 1, 1, 1), 46342, None, 23171, False),
    ((1, 2, 1, 1), 46342, 1, 23171, False),
    ((1, 1, 1, 1), 2_000_000, 500_000, 1_000_000, True),
    ((2, 1, 3, 4), (46342, 5), (3, 2), (23171, 2), True),
    ((1, 2, 5, 3), (40_001, 3), (7, 1), (20_000, 1), False),
]


@pytest.mark.parametrize("shape,k,s,p,ceil_mode", HUGE_WINDOWS, ids=["46342-1x1", "46342-s1", "ceil-stride-past-input",
                                                                 "46342x5-ceil", "40001x3"])
def test_windows_larger_than_2_31_positions_match_torch(device, rng, shape, k, s, p, ceil_mode):
    x = _input(rng, shape, ties=False)
    out_shape = (*shape[:2], *F.pool2d_output_size(shape[2:], k, s, p, ceil_mode))
    area = np.prod(np.broadcast_to(k, 2), dtype=np.float64)
    _check_against_torch(x, k, s, p, ceil_mode, rng.standard_normal(out_shape).astype(np.float32), device, 1e-6 / area)


def test_cpu_cost_follows_input_and_output_not_the_padded_plane():
    # A 2e9 x 2e9 window on one pixel: padding the plane (16 EB) or looping over the window's
    # offsets would never finish; PyTorch answers at once, with the divisor in 64 bits.
    torch = pytest.importorskip("torch")
    x = np.full((1, 1, 1, 1), 3.0, np.float32)
    k, p = 2_000_000_000, 1_000_000_000
    want = torch.nn.functional.avg_pool2d(torch.tensor(x), k, 1, p).numpy()
    np.testing.assert_allclose(F.avg_pool2d(x, k, 1, p), want, rtol=1e-6)
    assert want.ravel()[0] > 0
    out, idx = F.max_pool2d(x, k, 1, p, return_indices=True)
    assert out.shape == (1, 1, 2, 2) and (out == 3).all() and (idx == 0).all()
    np.testing.assert_allclose(F.avg_pool2d_backward(np.ones((1, 1, 2, 2), np.float32), x.shape, k, 1, p),
                               [[[[4 / k**2]]]], rtol=1e-6)


def test_kernels_refuse_a_window_they_cannot_be_told():
    # As PyTorch ("value cannot be converted to type int without overflow"); the CPU path has no limit.
    from gpuconv.device import EmuArray

    x = np.zeros((1, 1, 1, 1), np.float32).view(EmuArray)
    with pytest.raises(ValueError, match=r"kernel_size=\(4000000001, 4000000001\) and stride=.* must be below 2\^31"):
        F.avg_pool2d(x, 4_000_000_001, 1, 2_000_000_000)


def test_bad_indices_name_indices_and_the_shapes(device):
    x = to_device(np.arange(32, dtype=np.float32).reshape(1, 2, 4, 4), device)
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(TypeError, match="indices must be the int32 array max_pool2d returned, got list"):
        F.max_pool2d_backward(out, to_numpy(idx).tolist(), x.shape, 2)
    with pytest.raises(ValueError, match=r"indices must be int32 of grad_output's shape \(1, 2, 2, 2\), "
                                         r"got int64 of shape \(1, 2, 2, 2\)"):
        F.max_pool2d_backward(out, idx.astype(np.int64), x.shape, 2)
    with pytest.raises(ValueError, match=r"got int32 of shape \(2, 2, 2\)"):
        F.max_pool2d_backward(out, idx[0], x.shape, 2)
    if device != "cpu":
        return
    for bad in (-1, 16):
        wrong = idx.copy()
        wrong[0, 1, 1, 0] = bad
        with pytest.raises(ValueError, match=r"indices of shape \(1, 2, 2, 2\) must be in-plane positions in "
                                             rf"\[0, 16\) for input_shape \(1, 2, 4, 4\), got values in \[{min(bad, 5)}, {max(bad, 15)}\]"):
            F.max_pool2d_backward(out, wrong, x.shape, 2)


@pytest.mark.parametrize("op", ["max", "avg-include-pad", "avg-exclude-pad"])
def test_backward_matches_finite_differences(rng, op):
    """<grad_input, v> == d/dt <g, pool(x + t v)> at t = 0, central differences in float64."""
    shape, k, s, p, ceil_mode = (2, 2, 7, 6), (3, 2), (2, 1), (1, 1), True
    # Well-separated values keep every argmax fixed under the perturbation.
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64)
    v = rng.standard_normal(shape)
    eps = 1e-3

    if op == "max":
        def forward(a):
            return F.max_pool2d(a, k, s, p, ceil_mode)
        out, idx = F.max_pool2d(x, k, s, p, ceil_mode, return_indices=True)
        g = rng.standard_normal(out.shape)
        grad = F.max_pool2d_backward(g, idx, shape, k, s, p, ceil_mode)
    else:
        count_include_pad = op == "avg-include-pad"

        def forward(a):
            return F.avg_pool2d(a, k, s, p, ceil_mode, count_include_pad)
        g = rng.standard_normal(forward(x).shape)
        grad = F.avg_pool2d_backward(g, shape, k, s, p, ceil_mode, count_include_pad)
    numeric = np.sum(g * (forward(x + eps * v) - forward(x - eps * v))) / (2 * eps)
    assert grad.dtype == np.float64
    np.testing.assert_allclose(np.sum(grad * v), numeric, rtol=1e-8)


def test_pool2d_output_size():
    assert F.pool2d_output_size((7, 5), 2) == (3, 2)
    assert F.pool2d_output_size((7, 5), 2, ceil_mode=True) == (4, 3)
    # ceil_mode drops a last window that would start in the right padding only.
    assert F.pool2d_output_size((5, 5), 2, 2, 1, ceil_mode=True) == (3, 3)
    assert F.pool2d_output_size((6, 6), 3, 1, (1, 0)) == (6, 4)
    with pytest.raises(ValueError, match=r"input_size of shape \(2, 2\) is too small"):
        F.pool2d_output_size((2, 2), 3)
    with pytest.raises(ValueError, match=r"input_size must be \(H, W\), got \(1, 2, 8, 8\)"):
        F.pool2d_output_size((1, 2, 8, 8), 3)


def test_argument_errors(rng):
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"input must be 4-D \(NCHW\), got shape \(2, 4, 4\)"):
        F.max_pool2d(x[0], 2)
    with pytest.raises(TypeError, match="input must be float32 or float64"):
        F.avg_pool2d(x.astype(np.int32), 2)
    with pytest.raises(ValueError, match=r"padding must be at most half of kernel_size, got padding=\(2, 2\)"):
        F.max_pool2d(x, 3, padding=2)
    with pytest.raises(ValueError, match=r"input of shape \(1, 2, 4, 4\) is too small"):
        F.avg_pool2d(x, 5)
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        F.max_pool2d(x, 0)
    with pytest.raises(ValueError, match="stride must be positive"):
        F.max_pool2d(x, 2, 0)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        F.max_pool2d(x, 2.0)

    out, idx = F.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(ValueError, match="indices must be int32"):
        F.max_pool2d_backward(out, idx.astype(np.int64), x.shape, 2)
    with pytest.raises(ValueError, match="indices must be int32 of grad_output's shape"):
        F.max_pool2d_backward(out, idx[:, :, :1], x.shape, 2)
    with pytest.raises(ValueError, match=r"does not match the pooling output 3x3 of input_shape \(1, 2, 5, 5\)"):
        F.max_pool2d_backward(out, idx, (1, 2, 5, 5), 3, 1)
    with pytest.raises(ValueError, match="in batch and channels"):
        F.avg_pool2d_backward(out, (1, 3, 4, 4), 2)
    with pytest.raises(ValueError, match="input_shape must be 4 non-negative ints"):
        F.avg_pool2d_backward(out, (2, 4, 4), 2)


def test_mixed_devices_are_refused(rng):
    pytest.importorskip("gpuconv.emu")
    x = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(ValueError, match="one device"):
        F.max_pool2d_backward(to_device(out, "emu"), idx, x.shape, 2)

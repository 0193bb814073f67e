"""Local response normalisation: every device against float64 loops, PyTorch, finite differences."""
import numpy as np
import pytest

from gpuconv.device import device_of, to_device, to_numpy
from gpuconv.functional import local_response_norm, local_response_norm_backward
from gradcheck import numerical_gradient

ALPHA, BETA, K = 0.4, 0.75, 1.5  # a large alpha so the channel coupling is far above rounding


def _scale_loops(x, size, alpha, k):
    n_, c_, h_, w_ = x.shape
    scale = np.empty_like(x, dtype=np.float64)
    for n in range(n_):
        for c in range(c_):
            for h in range(h_):
                for w in range(w_):
                    window = range(max(c - size // 2, 0), min(c + (size - 1) // 2, c_ - 1) + 1)
                    scale[n, c, h, w] = k + alpha / size * sum(float(x[n, j, h, w]) ** 2 for j in window)
    return scale


def lrn_loops(x, size, alpha=ALPHA, beta=BETA, k=K):
    return x.astype(np.float64) * _scale_loops(x, size, alpha, k) ** -beta


def lrn_grad_loops(g, x, size, alpha=ALPHA, beta=BETA, k=K):
    """sum_c g_c * d output_c / d input_i, from the derivative of the forward formula."""
    x = x.astype(np.float64)
    scale = _scale_loops(x, size, alpha, k)
    n_, c_, h_, w_ = x.shape
    grad = np.zeros_like(x)
    for n in range(n_):
        for h in range(h_):
            for w in range(w_):
                for c in range(c_):
                    window = range(max(c - size // 2, 0), min(c + (size - 1) // 2, c_ - 1) + 1)
                    s = scale[n, c, h, w]
                    grad[n, c, h, w] += g[n, c, h, w] * s ** -beta
                    for i in window:
                        d_scale = alpha / size * 2 * x[n, i, h, w]
                        grad[n, i, h, w] -= g[n, c, h, w] * beta * x[n, c, h, w] * s ** (-beta - 1) * d_scale
    return grad


@pytest.mark.parametrize("size", range(1, 8))
def test_forward_and_backward_match_loops_on_every_device(device, rng, size):
    shape = (2, 5, 2, 3) if size % 2 else (1, 7, 3, 1)  # odd channel counts, batch 1, a 1-wide image
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    on = lambda a: to_device(a, device)  # noqa: E731
    y = local_response_norm(on(x), size, ALPHA, BETA, K)
    assert device_of(y) == device and y.dtype == np.float32
    np.testing.assert_allclose(to_numpy(y), lrn_loops(x, size), rtol=1e-5, atol=1e-6)
    grad = local_response_norm_backward(on(g), on(x), y, size, ALPHA, BETA, K)
    assert device_of(grad) == device and grad.shape == shape
    np.testing.assert_allclose(to_numpy(grad), lrn_grad_loops(g, x, size), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_matches_torch_forward_and_autograd(rng, dtype, tol, size):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 9, 4, 5)).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.local_response_norm(xt, size, alpha=ALPHA, beta=BETA, k=K)
    yt.backward(torch.tensor(g))
    y = local_response_norm(x, size, ALPHA, BETA, K)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol, atol=tol)
    grad = local_response_norm_backward(g, x, y, size, ALPHA, BETA, K)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=tol, atol=tol)


def test_alexnet_defaults_match_torch(rng):
    torch = pytest.importorskip("torch")
    x = 10 * rng.standard_normal((2, 16, 3, 3)).astype(np.float32)
    expected = torch.nn.functional.local_response_norm(torch.tensor(x), 5, alpha=1e-4, beta=0.75, k=2.0).numpy()
    np.testing.assert_allclose(local_response_norm(x, 5, k=2.0), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [2, 5])
def test_backward_matches_finite_differences(rng, size):
    x = rng.standard_normal((1, 6, 2, 2))
    g = rng.standard_normal(x.shape)
    grad = local_response_norm_backward(g, x, local_response_norm(x, size, ALPHA, BETA, K), size, ALPHA, BETA, K)
    numeric = numerical_gradient(x, lambda: float(np.sum(g * local_response_norm(x, size, ALPHA, BETA, K))))
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_small_channels_beside_large_ones_keep_their_precision():
    # A cumulative sum over channels would leave 1e8 - 1e8 + 1e-6 here; a window sum does not.
    x = np.zeros((1, 8, 1, 1), np.float32)
    x[0, 0] = 1e4
    x[0, 7] = 1e-3
    y = local_response_norm(x, 3, ALPHA, BETA, K)
    np.testing.assert_allclose(y, lrn_loops(x, 3), rtol=1e-6)


@pytest.mark.parametrize("size", [4, 9])
def test_window_wider_than_the_channels(device, rng, size):
    x = rng.standard_normal((1, 3, 2, 2)).astype(np.float32)
    y = local_response_norm(to_device(x, device), size, ALPHA, BETA, K)
    np.testing.assert_allclose(to_numpy(y), lrn_loops(x, size), rtol=1e-5, atol=1e-6)
    grad = local_response_norm_backward(to_device(x, device), to_device(x, device), y, size, ALPHA, BETA, K)
    np.testing.assert_allclose(to_numpy(grad), lrn_grad_loops(x, x, size), rtol=1e-5, atol=1e-5)


def test_empty_batch_gives_empty_output(device):
    x = to_device(np.zeros((0, 3, 2, 2), np.float32), device)
    assert local_response_norm(x, 3).shape == (0, 3, 2, 2)


@pytest.mark.parametrize("call, error, message", [
    (lambda x: local_response_norm(x, 0), ValueError, "size must be positive, got 0"),
    (lambda x: local_response_norm(x, 2.0), TypeError, "size must be an int"),
    (lambda x: local_response_norm(x[0], 3), ValueError, r"input must be 4-D \(NCHW\), got shape \(3, 4, 4\)"),
    (lambda x: local_response_norm(x.astype(np.int32), 3), TypeError, "input must be float32"),
    (lambda x: local_response_norm_backward(x[:, :2], x, x, 3), ValueError,
     r"one shape, got \(2, 2, 4, 4\), \(2, 3, 4, 4\)"),
    (lambda x: local_response_norm_backward(x, x, to_device(x, "emu"), 3), ValueError, "output on emu"),
])
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call(np.ones((2, 3, 4, 4), np.float32))

"""Linear layers: every device against float64 loops and PyTorch."""
import numpy as np
import pytest

from gpuconv.device import device_of, to_device, to_numpy
from gpuconv.functional import linear, linear_backward


def linear_loops(x, w, b):
    rows, out_features = x.shape[0], w.shape[0]
    y = np.zeros((rows, out_features))
    for n in range(rows):
        for o in range(out_features):
            y[n, o] = sum(float(x[n, i]) * float(w[o, i]) for i in range(w.shape[1]))
            if b is not None:
                y[n, o] += float(b[o])
    return y


def linear_grad_loops(g, x, w):
    gx, gw = np.zeros(x.shape), np.zeros(w.shape)
    for n in range(x.shape[0]):
        for o in range(w.shape[0]):
            for i in range(w.shape[1]):
                gx[n, i] += float(g[n, o]) * float(w[o, i])
                gw[o, i] += float(g[n, o]) * float(x[n, i])
    return gx, gw, g.astype(np.float64).sum(axis=0)


@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_backward_match_loops_on_every_device(device, rng, with_bias):
    x = rng.standard_normal((3, 7)).astype(np.float32)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32) if with_bias else None
    g = rng.standard_normal((3, 5)).astype(np.float32)
    on = lambda a: None if a is None else to_device(a, device)  # noqa: E731
    y = linear(on(x), on(w), on(b))
    assert device_of(y) == device and y.dtype == np.float32
    np.testing.assert_allclose(to_numpy(y), linear_loops(x, w, b), rtol=1e-5, atol=1e-5)
    grads = linear_backward(on(g), on(x), on(w))
    for got, expected in zip(grads, linear_grad_loops(g, x, w)):
        assert device_of(got) == device
        np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(4,), (2, 4), (2, 3, 4)])
def test_matches_torch_for_any_leading_shape(rng, shape):
    torch = pytest.importorskip("torch")
    x, w, b = rng.standard_normal(shape), rng.standard_normal((6, 4)), rng.standard_normal(6)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.linear(xt, wt, bt)
    g = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(linear(x, w, b), yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    for got, expected in zip(linear_backward(g, x, w), (xt.grad, wt.grad, bt.grad)):
        assert got.shape == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call, error, message", [
    (lambda x, w: linear(x, w[:, :3]), ValueError,
     r"input \(\*, in_features\) \(2, 4\) does not match weight \(out_features, in_features\) \(5, 3\)"),
    (lambda x, w: linear(x, w, np.zeros(4, np.float32)), ValueError, r"bias \(4,\) does not match weight \(5, 4\)"),
    (lambda x, w: linear(x, w.astype(np.float64)), TypeError, r"one dtype, got input float32 \(2, 4\), weight float64"),
    (lambda x, w: linear(x, w[0]), ValueError, r"weight must be 2-D"),
    (lambda x, w: linear(x, to_device(w, "emu")), ValueError, "input on cpu, weight on emu"),
    (lambda x, w: linear_backward(np.zeros((2, 4), np.float32), x, w), ValueError,
     r"grad_output must have shape \(2, 5\) for input \(2, 4\) and weight \(5, 4\), got \(2, 4\)"),
])
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call(np.zeros((2, 4), np.float32), np.zeros((5, 4), np.float32))

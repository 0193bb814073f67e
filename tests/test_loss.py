"""Cross-entropy: every device against float64 loops, PyTorch, finite differences; bad labels."""
import math

import numpy as np
import pytest

from gpuconv.device import device_of, to_device, to_numpy
from gpuconv.functional import cross_entropy, cross_entropy_backward, cross_entropy_with_grad
from gradcheck import numerical_gradient


def ce_loops(x, target, reduction):
    """(loss, d loss / d x) in float64 by direct loops over rows and classes."""
    rows, classes = x.shape
    losses, grad = [], np.zeros((rows, classes))
    for n in range(rows):
        row = [float(v) for v in x[n]]
        m = max(row)
        total = sum(math.exp(v - m) for v in row)
        losses.append(math.log(total) + m - row[target[n]])
        for j in range(classes):
            grad[n, j] = math.exp(row[j] - m) / total - (j == target[n])
    if reduction == "none":
        return np.array(losses), grad
    if reduction == "sum":
        return sum(losses), grad
    return sum(losses) / rows, grad / rows


# (1, 1): one class; (3, 5): fewer classes than lanes; (9, 37): more rows than one block holds,
# more classes than a warp has lanes.
SHAPES = [(1, 1), (3, 5), (9, 37)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grad_match_loops_on_every_device(device, rng, shape, reduction):
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    target = rng.integers(0, shape[1], shape[0])
    loss_ref, grad_ref = ce_loops(x, target, reduction)
    args = to_device(x, device), to_device(target, device), reduction
    loss, grad = cross_entropy(*args), cross_entropy_backward(*args)
    assert device_of(loss) == device_of(grad) == device
    assert loss.shape == ((shape[0],) if reduction == "none" else ()) and loss.dtype == np.float32
    np.testing.assert_allclose(to_numpy(loss), loss_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(grad), grad_ref, rtol=1e-5, atol=1e-6)
    both = cross_entropy_with_grad(*args)
    np.testing.assert_array_equal(to_numpy(both[0]), to_numpy(loss))
    np.testing.assert_array_equal(to_numpy(both[1]), to_numpy(grad))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64])
def test_any_integer_label_dtype(device, rng, dtype):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    target = np.array([2, 0, 1, 2], dtype=dtype)
    loss = cross_entropy(to_device(x, device), to_device(target, device))
    np.testing.assert_allclose(to_numpy(loss), ce_loops(x, target, "mean")[0], rtol=1e-6)


def test_huge_logits_stay_finite(device):
    x = np.array([[1e4, -1e4, 0.0], [1e4, 1e4 - 1, -1e4], [-1e4, -1e4, -1e4]], np.float32)
    target = np.array([1, 1, 2])
    loss, grad = cross_entropy_with_grad(to_device(x, device), to_device(target, device), "none")
    loss_ref, grad_ref = ce_loops(x, target, "none")
    assert np.isfinite(to_numpy(loss)).all() and np.isfinite(to_numpy(grad)).all()
    np.testing.assert_allclose(to_numpy(loss), loss_ref, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(grad), grad_ref, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_matches_torch(rng, reduction, dtype, tol):
    torch = pytest.importorskip("torch")
    x = (4 * rng.standard_normal((6, 11))).astype(dtype)
    target = rng.integers(0, 11, 6)
    xt = torch.tensor(x, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(xt, torch.tensor(target), reduction=reduction)
    expected.sum().backward()
    loss, grad = cross_entropy_with_grad(x, target, reduction)
    assert loss.dtype == grad.dtype == dtype
    np.testing.assert_allclose(loss, expected.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=tol, atol=tol)


def test_backward_matches_finite_differences(rng):
    x = rng.standard_normal((4, 5))
    target = rng.integers(0, 5, 4)
    numeric = numerical_gradient(x, lambda: float(cross_entropy(x, target)))
    np.testing.assert_allclose(cross_entropy_backward(x, target), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("target, error, message", [
    (np.array([0, 3, 1]), ValueError,
     r"target \(3,\) holds labels outside \[0, 3\) \(min 0, max 3\) for input \(3, 3\)"),
    (np.array([0, -1, 1]), ValueError, r"target \(3,\) holds labels outside \[0, 3\) \(min -1, max 1\)"),
    (np.array([0, 1]), ValueError, r"target must have shape \(3,\) to match input \(3, 3\), got \(2,\)"),
    (np.array([0.0, 1.0, 2.0]), TypeError, "target must be an integer array of class indices, got float64"),
])
def test_bad_labels_are_refused_before_any_kernel(device, target, error, message):
    x = to_device(np.zeros((3, 3), np.float32), device)
    with pytest.raises(error, match=message):
        cross_entropy(x, to_device(target, device))
    with pytest.raises(error, match=message):
        cross_entropy_backward(x, to_device(target, device))


def test_bad_arguments_are_named():
    x = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="reduction must be one of .* got 'avg'"):
        cross_entropy(x, np.zeros(3, int), reduction="avg")
    with pytest.raises(ValueError, match=r"input must be 2-D \(N, C\), got shape \(3,\)"):
        cross_entropy(x[0], np.zeros(3, int))
    with pytest.raises(ValueError, match="input on emu, target on cpu"):
        cross_entropy(to_device(x, "emu"), np.zeros(3, int))


def test_unvalidated_bad_label_gives_nan_not_an_out_of_bounds_read(kernel_device):
    logits = to_device(np.zeros((3, 4), np.float32), kernel_device)
    labels = to_device(np.array([1, 7, -2], np.int32), kernel_device)
    loss, grad = cross_entropy_with_grad(logits, labels, reduction="none", validate_target=False)
    loss, grad = to_numpy(loss), to_numpy(grad)
    assert np.isfinite(loss[0]) and np.isnan(loss[1:]).all()
    assert np.isfinite(grad[0]).all() and np.isnan(grad[1:]).all()
    with pytest.raises(ValueError, match="labels outside"):
        cross_entropy(logits, labels)

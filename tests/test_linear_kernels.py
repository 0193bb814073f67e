"""The hand GEMM of kernels_cu/linear.cu (Linear + bias + ReLU forward, the one-launch backward with
a ReLU folded in) and the loss kernel's own mean: against float64, the library path and NumPy."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import gpuconv
import gpuconv.functional as F
from gpuconv import graphs, nn, optim
from gpuconv.bench.host import training_step
from gpuconv.device import to_device, to_numpy
from gpuconv.random import manual_seed

# (rows, in_features, out_features): batch 1, one output, sizes that do not divide the 32-tile,
# one K tile and several, and a Linear of LeNet-5 at a small batch.
SHAPES = [(1, 1, 1), (1, 7, 1), (5, 33, 17), (33, 65, 31), (3, 120, 84)]


def _arrays(rng, rows, in_features, out_features):
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    x[:, ::3] = np.maximum(x[:, ::3], 0)  # zeros, where a folded ReLU's mask cuts
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    b = rng.standard_normal(out_features).astype(np.float32)
    g = rng.standard_normal((rows, out_features)).astype(np.float32)
    return x, w, b, g


def _library_path(monkeypatch):
    module = importlib.import_module("gpuconv.functional.linear")
    monkeypatch.setattr(module, "HAND_GEMM_MAX_FLOPS", -1)
    for plans in ("_forward_plans", "_backward_plans"):  # the choice is made once per signature
        monkeypatch.setattr(module, plans, gpuconv.kernels.PlanCache())


@pytest.mark.parametrize("rows, in_features, out_features", SHAPES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_matches_float64(device, rng, rows, in_features, out_features, activation):
    x, w, b, _ = _arrays(rng, rows, in_features, out_features)
    for bias in (b, None):
        expected = x.astype(np.float64) @ w.T.astype(np.float64) + (0 if bias is None else bias)
        if activation:
            expected = np.maximum(expected, 0)
        on = [None if a is None else to_device(a, device) for a in (x, w, bias)]
        with gpuconv.profile() as prof:
            got = F.linear(*on, activation=activation)
        np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-5, atol=1e-5)
        if device == "emu":  # one launch for Linear + bias + ReLU
            assert prof.counts() == {"linear_forward_v1": 1}


@pytest.mark.parametrize("rows, in_features, out_features", SHAPES)
def test_backward_matches_float64_for_every_subset_of_gradients(device, rng, rows, in_features, out_features):
    x, w, _, g = _arrays(rng, rows, in_features, out_features)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    expected = ((g64 @ w64) * (x > 0), g64.T @ x64, g64.sum(axis=0))
    ex, ew, eg = (to_device(a, device) for a in (x, w, g))
    for wanted in [(True, True, True), (False, True, True), (True, False, True), (True, True, False),
                   (False, False, True), (True, False, False)]:
        with gpuconv.profile() as prof:
            got = F.linear_backward(eg, ex, ew, input_grad=wanted[0], weight_grad=wanted[1], bias_grad=wanted[2],
                                    through_relu=True)
        for name, want, value, reference in zip(("input", "weight", "bias"), wanted, got, expected):
            if not want:
                assert value is None, name
                continue
            np.testing.assert_allclose(to_numpy(value), reference, rtol=1e-5, atol=1e-5, err_msg=f"{name} {wanted}")
        if device == "emu":
            assert prof.counts() == {"linear_backward_v1": 1}, wanted


@pytest.mark.parametrize("rows, in_features, out_features", [(5, 33, 17), (2, 7, 1)])
def test_hand_kernels_equal_the_unfused_library_path(kernel_device, rng, monkeypatch, rows, in_features, out_features):
    x, w, b, g = _arrays(rng, rows, in_features, out_features)
    ex, ew, eb, eg = (to_device(a, kernel_device) for a in (x, w, b, g))
    hand = (F.linear(ex, ew, eb, activation="relu"), *F.linear_backward(eg, ex, ew, through_relu=True))
    _library_path(monkeypatch)
    with gpuconv.profile() as prof:
        library = (F.linear(ex, ew, eb, activation="relu"), *F.linear_backward(eg, ex, ew, through_relu=True))
    assert "linear_forward_v1" not in prof.counts() and prof.counts()["matmul"] == 3
    for name, got, expected in zip(("output", "input", "weight", "bias"), hand, library):
        np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_folded_relu_is_relu_backward_of_the_product_bit_for_bit(kernel_device, rng):
    x, w, _, g = _arrays(rng, 9, 40, 11)
    x[0, :4] = [0.0, -0.0, np.nan, -np.inf]  # the mask keeps only input > 0, as relu_backward_v1
    ex, ew, eg = (to_device(a, kernel_device) for a in (x, w, g))
    product = F.linear_backward(eg, ex, ew, weight_grad=False, bias_grad=False)[0]
    folded = F.linear_backward(eg, ex, ew, weight_grad=False, bias_grad=False, through_relu=True)[0]
    unfused = F.relu_backward(product, ex)
    np.testing.assert_array_equal(to_numpy(folded).view(np.uint32), to_numpy(unfused).view(np.uint32))
    assert np.count_nonzero(to_numpy(folded)) > 0 and not np.array_equal(to_numpy(folded), to_numpy(product))


def test_batch_zero_gives_empty_outputs_and_zero_weight_gradients(kernel_device, rng):
    _, w, b, _ = _arrays(rng, 1, 5, 3)
    x, g = (to_device(np.zeros(shape, np.float32), kernel_device) for shape in ((0, 5), (0, 3)))
    ew, eb = to_device(w, kernel_device), to_device(b, kernel_device)
    assert F.linear(x, ew, eb, activation="relu").shape == (0, 3)
    grad_input, grad_weight, grad_bias = F.linear_backward(g, x, ew)
    assert grad_input.shape == (0, 5)
    assert not to_numpy(grad_weight).any() and not to_numpy(grad_bias).any()


def test_the_choice_between_hand_gemm_and_library_follows_flops():
    for batch in (1, 256, 1024):  # LeNet-5's classifier takes the hand kernel
        assert all(F.uses_hand_gemm(batch, i, o) for i, o in ((400, 120), (120, 84), (84, 10)))
    assert not F.uses_hand_gemm(2, 9216, 4096) and not F.uses_hand_gemm(128, 4096, 4096)  # AlexNet


def test_sequential_fuses_linear_relu_forward_and_folds_relu_backward(rng):
    manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 9), nn.ReLU(), nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 3)).to("emu")
    layers = list(model)
    x = to_device(rng.standard_normal((4, 13)).astype(np.float32), "emu")
    g = to_device(rng.standard_normal((4, 3)).astype(np.float32), "emu")
    with gpuconv.profile() as forward:
        y = model(x)
    with gpuconv.profile() as backward:
        grad = model.backward(g)
    assert forward.counts() == {"linear_forward_v1": 3} and backward.counts() == {"linear_backward_v1": 3}
    # the layers one by one: no fusion, no fold
    unfused_out = x
    for layer in layers:
        unfused_out = layer(unfused_out)
    fused_grads = [to_numpy(p.grad).copy() for p in model.parameters()]
    model.zero_grad()
    unfused_grad = g
    for layer in reversed(layers):
        unfused_grad = layer.backward(unfused_grad)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(unfused_out))
    np.testing.assert_array_equal(to_numpy(grad), to_numpy(unfused_grad))
    for fused, p in zip(fused_grads, model.parameters()):
        np.testing.assert_array_equal(fused, to_numpy(p.grad))


def test_a_captured_classifier_step_replays_as_the_eager_steps(rng):
    batches = [(to_device(rng.standard_normal((5, 13)).astype(np.float32), "emu"),
                to_device(rng.integers(0, 3, 5).astype(np.int32), "emu")) for _ in range(3)]

    def setup():
        manual_seed(0)
        model = nn.Sequential(nn.Linear(13, 9), nn.ReLU(), nn.Linear(9, 3)).to("emu")
        model.requires_input_grad = False
        optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, training_step(model, optimizer, nn.CrossEntropyLoss(validate_target=False))

    model, step = setup()
    eager = [float(to_numpy(step(x, y))) for x, y in batches]
    eager_params = [to_numpy(p.data) for p in model.parameters()]
    model, step = setup()
    graphed = graphs.GraphedStep(step, *batches[0])
    assert graphed.graph.num_operations == 6  # Linear+ReLU, Linear, the loss with its mean, 2 backward, SGD
    replayed = [float(to_numpy(graphed.warmup_result))] + [float(to_numpy(graphed(x, y))) for x, y in batches[1:]]
    assert replayed == eager and len(set(eager)) == 3
    for expected, p in zip(eager_params, model.parameters()):
        np.testing.assert_array_equal(to_numpy(p.data), expected)


# -- the loss kernel's mean ----------------------------------------------------------------------

@pytest.mark.parametrize("rows, classes", [(1, 1), (1, 10), (7, 3), (257, 10), (20, 70)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_loss_kernel_reduces_as_numpy_in_one_launch(kernel_device, rng, rows, classes, reduction):
    logits = (3 * rng.standard_normal((rows, classes))).astype(np.float32)
    target = rng.integers(0, classes, rows).astype(np.int32)
    expected_loss, expected_grad = F.cross_entropy_with_grad(logits, target, reduction)
    with gpuconv.profile() as prof:
        loss, grad = F.cross_entropy_with_grad(to_device(logits, kernel_device), to_device(target, kernel_device),
                                               reduction)
    assert prof.counts() == {"softmax_cross_entropy_v2": 1} and loss.shape == ()
    np.testing.assert_allclose(to_numpy(loss), expected_loss, rtol=2e-6)
    np.testing.assert_allclose(to_numpy(grad), expected_grad, rtol=1e-5, atol=1e-7)
    # the fixed-order sum in double: the float64 mean of the per-sample losses, rounded once
    per_sample = to_numpy(F.cross_entropy(to_device(logits, kernel_device), to_device(target, kernel_device), "none"))
    exact = per_sample.astype(np.float64).sum() / (rows if reduction == "mean" else 1)
    assert abs(float(to_numpy(loss)) - exact) <= np.spacing(np.float32(exact))


def test_the_loss_mean_is_the_same_in_either_thread_order(rng):
    from gpuconv import emu

    logits = to_device(rng.standard_normal((300, 10)).astype(np.float32), "emu")
    target = to_device(rng.integers(0, 10, 300).astype(np.int32), "emu")
    results = []
    for order in ("forward", "reverse"):
        with emu.thread_order(order):
            results.append(to_numpy(F.cross_entropy(logits, target)).tobytes())
    assert results[0] == results[1]

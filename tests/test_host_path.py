"""Work nobody needs is not done: frozen parameters, the input gradient of a model's first layer."""
from __future__ import annotations

import numpy as np
import pytest

import gpuconv
from gpuconv import models, nn
from gpuconv.device import to_device, to_numpy
from gpuconv.random import manual_seed


def _lenet_step(device, rng, batch=2):
    manual_seed(0)
    model = models.lenet5().to(device)
    criterion = nn.CrossEntropyLoss()
    x = to_device(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), device)
    y = to_device(rng.integers(0, 10, batch).astype(np.int32), device)
    return model, criterion, x, y


def test_first_layer_of_lenet_launches_no_backward_data_kernel(rng):
    model, criterion, x, y = _lenet_step("emu", rng)
    criterion(model(x), y)
    with gpuconv.profile() as prof:
        assert model.backward(criterion.backward()) is None
    launched = prof.counts()
    # conv2 still needs one (its input gradient feeds pool1 and conv1's weight gradient); during
    # backward, the v2 lattice kernels (conv2d_gemm_*) run only for input gradients
    assert sum(n for name, n in launched.items() if name.startswith("conv2d_gemm_")) == 1
    assert sum(n for name, n in launched.items() if name.startswith("conv2d_backward_filter_v2_")) == 2
    assert all(p.grad is not None for p in model.parameters())


def test_asking_a_model_for_its_input_gradient_computes_it(rng):
    model, criterion, x, y = _lenet_step("emu", rng)
    model.requires_input_grad = True
    criterion(model(x), y)
    with gpuconv.profile() as prof:
        grad_input = model.backward(criterion.backward())
    assert sum(n for name, n in prof.counts().items() if name.startswith("conv2d_gemm_")) == 2
    assert grad_input.shape == x.shape


def test_a_standalone_layer_still_returns_its_input_gradient(rng):
    conv = nn.Conv2d(1, 2, 3).to("emu")
    x = to_device(rng.standard_normal((1, 1, 5, 5)).astype(np.float32), "emu")
    out = conv(x)
    assert conv.backward(out).shape == x.shape


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_frozen_parameters_get_no_gradient_and_no_update(device, rng):
    model, criterion, x, y = _lenet_step(device, rng)
    model.features.requires_grad_(False)
    model.classifier[0].bias.requires_grad = False
    frozen = {name: to_numpy(p.data).copy() for name, p in model.named_parameters() if not p.requires_grad}
    assert sorted(frozen) == ["classifier.0.bias", "features.0.bias", "features.0.weight",
                              "features.3.bias", "features.3.weight"]
    optimizer = gpuconv.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion(model(x), y)
    with gpuconv.profile() as prof:
        model.backward(criterion.backward())
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in frozen), name
    if device == "emu":
        # Nothing before the first trained layer needs a gradient: the features stack is skipped
        # whole, and the classifier's first layer computes no input gradient.
        launched = prof.counts()
        assert not [k for k in launched if k.startswith(("conv2d", "max_pool2d"))], launched
        # one launch per Linear, the ReLUs folded in; the first one's grid holds only the tiles of
        # its weight gradient (13 x 4 tiles of 32 of the 400 x 120 weight; its bias is frozen)
        assert launched == {"linear_backward_v1": 3}, launched
        assert prof.launches[-1].grid == (13 * 4, 1, 1)
    optimizer.step()
    for name, value in frozen.items():
        np.testing.assert_array_equal(to_numpy(dict(model.named_parameters())[name].data), value, err_msg=name)


def test_freezing_matches_torch_gradients_of_the_rest(rng):
    torch = pytest.importorskip("torch")
    layer = nn.Linear(4, 3)
    layer.weight.requires_grad = False
    reference = torch.nn.Linear(4, 3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(layer.weight.data))
        reference.bias.copy_(torch.tensor(layer.bias.data))
    reference.weight.requires_grad_(False)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    g = rng.standard_normal((2, 3)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    reference(xt).backward(torch.tensor(g))
    layer(x)
    grad_input = layer.backward(g)
    assert layer.weight.grad is None and reference.weight.grad is None
    np.testing.assert_allclose(layer.bias.grad, reference.bias.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad_input, xt.grad.numpy(), rtol=1e-6)


# -- ReLU backward folded into max-pool backward ---------------------------------------------------

FUSED_POOLS = [  # (input shape, kernel, stride, padding, ceil_mode): odd sizes, edge windows, batch 1
    ((1, 3, 7, 5), 2, 2, 0, True),
    ((2, 2, 6, 6), 3, 2, 1, False),
    ((1, 1, 5, 7), 3, 1, 1, True),
    ((3, 2, 4, 4), 2, None, 0, False),
]


@pytest.mark.parametrize("shape, kernel, stride, padding, ceil_mode", FUSED_POOLS)
def test_max_pool_relu_backward_is_the_unfused_sequence_bit_for_bit(device, rng, shape, kernel, stride, padding,
                                                                    ceil_mode):
    import gpuconv.functional as F

    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 0, :] = 0.0  # ties at zero, where the ReLU's mask and the pool's choice meet
    x.flat[3] = np.nan
    relu_out = F.relu(to_device(x, device))
    pooled, indices = F.max_pool2d(relu_out, kernel, stride, padding, ceil_mode, return_indices=True)
    g = to_device(rng.standard_normal(pooled.shape).astype(np.float32), device)
    unfused = F.relu_backward(F.max_pool2d_backward(g, indices, shape, kernel, stride, padding, ceil_mode), relu_out)
    fused = F.max_pool2d_relu_backward(g, indices, pooled, shape, kernel, stride, padding, ceil_mode)
    np.testing.assert_array_equal(to_numpy(fused).view(np.uint32), to_numpy(unfused).view(np.uint32))
    assert np.count_nonzero(to_numpy(fused)) > 0


def test_a_model_folds_each_relu_into_the_backward_kernel_of_the_pool_or_linear_after_it(rng):
    model, criterion, x, y = _lenet_step("emu", rng)
    model.requires_input_grad = True
    reference = models.lenet5().to("emu")
    reference.load_state_dict(model.state_dict())
    reference.requires_input_grad = True
    criterion(model(x), y)
    with gpuconv.profile() as prof:
        grad_input = model.backward(criterion.backward())
    launched = prof.counts()
    assert launched["max_pool2d_relu_backward_v1"] == 2 and "max_pool2d_backward_v1" not in launched
    # the classifier's ReLUs go into the input-gradient epilogue of the Linear after each
    assert "relu_backward_v1" not in launched and launched["linear_backward_v1"] == 3
    # against the layers' own backwards, one by one
    layers = list(reference.features) + [reference.flatten] + list(reference.classifier)
    out = x
    for layer in layers:
        out = layer(out)
    criterion(out, y)
    grad = criterion.backward()
    for layer in reversed(layers):
        grad = layer.backward(grad)
    np.testing.assert_array_equal(to_numpy(grad_input), to_numpy(grad))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        np.testing.assert_array_equal(to_numpy(p.grad), to_numpy(q.grad), err_msg=name)


# -- the device operations of a training step --------------------------------------------------------

def test_a_lenet5_training_step_on_emu_makes_15_device_operations(rng):
    from gpuconv.bench.host import _lenet_step, device_operations

    step, inputs = _lenet_step(256, rng)
    ops = device_operations(step, inputs)  # a steady-state step, under emu.dry_run()
    tally = dict(item.rsplit(" x", 1) if " x" in item else (item, "1") for item in ops["ops"].split(", "))
    # the classifier: Linear (+ReLU) forward one launch each, backward one launch each (the ReLUs
    # folded in); the loss with its mean one launch; no library call anywhere in the step
    assert tally["linear_forward_v1"] == "3" and tally["linear_backward_v1"] == "3", tally
    assert tally["softmax_cross_entropy_v2"] == "1" and "relu_backward_v1" not in tally, tally
    assert not {"matmul", "add_bias", "sum", "mean"} & set(tally), tally
    # the convolution blocks' forward: conv + bias + ReLU + max-pool one launch each; conv2's
    # input gradient one launch; the weights read in place by both (no re-layout)
    assert tally["conv2d_relu_max_pool2x2_v2_32x128"] == "2" and "conv2d_weight_rows_v2" not in tally, tally
    assert tally["conv2d_gemm_v2_32x128_transposed_weight"] == "1", tally
    # 15 = the classifier's 6 and the loss + the optimizer's one launch each, and the features':
    # the blocks' forward 2, the folded ReLU/max-pool backward 2, conv2's input gradient 1,
    # backward-filter 2 (the bias gradients and the split-K reduce in the same launches)
    assert not {"conv2d_bias_grad_v1", "conv2d_split_k_reduce_v2"} & set(tally), tally
    assert ops["device_ops"] == 15, ops


# -- launch plans ------------------------------------------------------------------------------------

def _counting(monkeypatch, module, name):
    """Wrap ``module.name`` (an op's fully checked path) to count its calls."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def test_steady_state_calls_take_the_plan_and_give_the_first_calls_results(monkeypatch, rng):
    import importlib

    import gpuconv.functional as F

    linear, loss, pool = (importlib.import_module(f"gpuconv.functional.{m}") for m in ("linear", "loss", "pool"))
    for module in (linear, loss, pool):  # plans made by other tests would hide the first call
        monkeypatch.setattr(module, "_forward_plans" if module is linear else "_plans", gpuconv.kernels.PlanCache())
    monkeypatch.setattr(linear, "_backward_plans", gpuconv.kernels.PlanCache())
    full = {name: _counting(monkeypatch, module, name) for module, name in
            ((linear, "_linear"), (linear, "_linear_backward"), (loss, "_checked_loss_and_grad"),
             (pool, "_max_pool2d"), (pool, "_max_pool2d_backward"))}
    x, w, b = (to_device(rng.standard_normal(s).astype(np.float32), "emu") for s in ((6, 9), (5, 9), (5,)))
    images = to_device(rng.standard_normal((2, 3, 6, 6)).astype(np.float32), "emu")
    labels = to_device(rng.integers(0, 5, 6).astype(np.int32), "emu")

    def step():
        y = F.linear(x, w, b, activation="relu")
        loss_value, grad = F.cross_entropy_with_grad(y, labels)
        pooled, indices = F.max_pool2d(images, 2, return_indices=True)
        return [y, loss_value, grad, *F.linear_backward(grad, x, w, through_relu=True), pooled, indices,
                F.max_pool2d_relu_backward(pooled, indices, pooled, images.shape, 2)]

    first = [to_numpy(a) for a in step()]
    assert all(len(calls) == 1 for calls in full.values()), full
    for _ in range(2):
        with gpuconv.profile() as prof:
            again = [to_numpy(a) for a in step()]
        for got, expected in zip(again, first):
            np.testing.assert_array_equal(got, expected)
    assert all(len(calls) == 1 for calls in full.values()), full  # the full checks ran once per signature
    assert len(prof.launches) == 5
    F.linear(x[:4], w, b)  # another shape: checked in full, a plan of its own
    assert len(full["_linear"]) == 2


def test_a_planned_op_refuses_bad_input_as_its_first_call_does(rng):
    import gpuconv.functional as F

    x, w = (to_device(rng.standard_normal(s).astype(np.float32), "emu") for s in ((4, 7), (3, 7)))
    F.linear(x, w)
    F.linear(x, w)  # planned from here
    with pytest.raises(ValueError, match=r"input \(\*, in_features\) \(4, 7\) does not match weight .* \(3, 6\)"):
        F.linear(x, w[:, :6].copy())
    with pytest.raises(ValueError, match="one device"):
        F.linear(x, to_numpy(w))
    with pytest.raises(TypeError, match="float32"):
        F.linear(x.astype(np.float64), w)
    labels = to_device(np.array([0, 1, 2, 9], np.int32), "emu")
    for _ in range(2):  # the labels' range is checked on every call, planned or not
        with pytest.raises(ValueError, match=r"labels outside \[0, 3\)"):
            F.cross_entropy(F.linear(x, w), labels)


def test_a_planned_pool_refuses_arguments_equal_to_its_plans_but_of_another_type(rng):
    """2.0 == 2 and True == 1 as keys, but max_pool2d refuses a float size (as torch does)."""
    import gpuconv.functional as F

    x = to_device(rng.standard_normal((1, 2, 4, 4)).astype(np.float32), "emu")
    out, indices = F.max_pool2d(x, 2, return_indices=True)
    F.max_pool2d(x, 2)  # planned from here
    F.max_pool2d_backward(out, indices, x.shape, 2)
    F.max_pool2d_backward(out, indices, x.shape, 2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints, got 2.0"):
        F.max_pool2d(x, 2.0)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints, got 2.0"):
        F.max_pool2d_backward(out, indices, x.shape, 2.0)


def test_an_op_on_a_non_contiguous_array_is_right_and_makes_no_plan(rng):
    import gpuconv.functional as F

    x = rng.standard_normal((7, 4)).astype(np.float32)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    strided = to_device(x, "emu").T  # (4, 7), not C-contiguous
    assert gpuconv.kernels.signature(strided) is None
    for _ in range(2):
        np.testing.assert_allclose(to_numpy(F.linear(strided, to_device(w, "emu"))), x.T @ w.T, rtol=1e-5, atol=1e-5)


def test_a_launch_plan_checks_each_array_it_launches(rng):
    from gpuconv.kernels import KernelArgumentError, LaunchPlan

    x = to_device(rng.standard_normal(10).astype(np.float32), "emu")
    out = to_device(np.zeros(10, np.float32), "emu")
    plan = LaunchPlan("activation", "relu_forward_v1", 1, 256, (x, out, 10))
    plan(x, out)
    np.testing.assert_array_equal(to_numpy(out), np.maximum(to_numpy(x), 0))
    with pytest.raises(KernelArgumentError, match="parameter y is float\\*, got an array of float64"):
        plan(x, out.astype(np.float64))
    with pytest.raises(ValueError, match="made for arrays on 'emu' got one on 'cpu' for x"):
        plan(to_numpy(x), out)
    with pytest.raises(KernelArgumentError, match="takes 2 arrays, got 1"):
        plan(x)


def test_the_alternating_host_step_measure_reports_each_round():
    pytest.importorskip("torch")
    from gpuconv.bench.host import alternating_ratio

    result = alternating_ratio(rounds=2, calls=2)
    assert len(result["ratio"]) == 2 and result["device_ops"] > 0
    assert all(r == g / t for r, g, t in zip(result["ratio"], result["gpuconv"], result["torch"]))

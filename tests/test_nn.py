"""Layers: forward and backward against torch.nn with copied weights, against finite differences,
and against a float64 loop reference on every device; parameter bookkeeping and state."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpuconv.functional as F
from gpuconv import nn
from gpuconv.device import device_of, to_device, to_numpy
from gpuconv.random import manual_seed, next_seed
from gradcheck import numerical_gradient


# -- torch.nn equivalence ---------------------------------------------------------------------

LAYER_CASES = [
    # (our layer, torch layer, input shape)
    ("Conv2d(3, 4, 3)", lambda t: t.nn.Conv2d(3, 4, 3), (2, 3, 7, 6)),
    ("Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False)",
     lambda t: t.nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False), (2, 3, 8, 7)),
    ("Conv2d(2, 3, 3, padding='same')", lambda t: t.nn.Conv2d(2, 3, 3, padding="same"), (1, 2, 5, 4)),
    ("MaxPool2d(2)", lambda t: t.nn.MaxPool2d(2), (2, 3, 6, 7)),
    ("MaxPool2d(3, 2, padding=1, ceil_mode=True)",
     lambda t: t.nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), (1, 2, 8, 9)),
    ("AvgPool2d(2)", lambda t: t.nn.AvgPool2d(2), (2, 3, 6, 6)),
    ("AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)",
     lambda t: t.nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), (1, 2, 8, 9)),
    ("ReLU()", lambda t: t.nn.ReLU(), (2, 3, 4, 5)),
    ("Tanh()", lambda t: t.nn.Tanh(), (2, 3, 4, 5)),
    ("Sigmoid()", lambda t: t.nn.Sigmoid(), (2, 3, 4, 5)),
    ("Flatten()", lambda t: t.nn.Flatten(), (2, 3, 4, 5)),
    ("Flatten(0, 2)", lambda t: t.nn.Flatten(0, 2), (2, 3, 4, 5)),
    ("Linear(7, 4)", lambda t: t.nn.Linear(7, 4), (5, 7)),
    ("Linear(7, 3, bias=False)", lambda t: t.nn.Linear(7, 3, bias=False), (5, 7)),
    ("LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)",
     lambda t: t.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0), (2, 7, 3, 4)),
    ("LocalResponseNorm(2)", lambda t: t.nn.LocalResponseNorm(2), (1, 4, 3, 3)),
]


def _copy_parameters(ours: nn.Module, theirs, torch) -> None:
    for name, param in ours.named_parameters():
        getattr(theirs, name).data = torch.from_numpy(to_numpy(param.data).copy())


@pytest.mark.parametrize("spec, make_torch, shape", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer_matches_torch(spec, make_torch, shape, rng):
    torch = pytest.importorskip("torch")
    ours = eval(f"nn.{spec}")
    theirs = make_torch(torch)
    _copy_parameters(ours, theirs, torch)
    # Spread values apart so max pooling has no near-ties that float rounding could flip.
    x = rng.permutation(np.linspace(-3, 3, math.prod(shape))).reshape(shape).astype(np.float32)
    x_t = torch.from_numpy(x.copy()).requires_grad_(True)

    out = ours(x)
    out_t = theirs(x_t)
    np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert out.dtype == np.float32 and out.shape == ours.output_shape(shape)

    grad_output = rng.standard_normal(out.shape).astype(np.float32)
    grad_input = ours.backward(grad_output)
    out_t.backward(torch.from_numpy(grad_output))
    np.testing.assert_allclose(grad_input, x_t.grad.numpy(), rtol=1e-4, atol=1e-5)
    for name, param in ours.named_parameters():
        np.testing.assert_allclose(param.grad, getattr(theirs, name).grad.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


REPR_CASES = [c[0] for c in LAYER_CASES if c[0].startswith(("Conv2d", "Linear", "LocalResponseNorm", "Flatten"))] + [
    "MaxPool2d(2)", "AvgPool2d(2)", "ReLU()", "Tanh()", "Sigmoid()", "CrossEntropyLoss()", "Dropout(0.3)"]


@pytest.mark.parametrize("spec", REPR_CASES)
def test_repr_matches_torch_where_the_arguments_do(spec):
    torch = pytest.importorskip("torch")
    ours = repr(eval(f"nn.{spec}"))
    theirs = repr(eval(f"torch.nn.{spec}"))
    if spec.startswith("MaxPool2d"):  # our pooling has no dilation argument
        theirs = theirs.replace(", dilation=1", "")
    if spec.startswith("Dropout"):  # nor in-place dropout
        theirs = theirs.replace(", inplace=False", "")
    assert ours == theirs


def test_sequential_repr_nests_like_torch():
    torch = pytest.importorskip("torch")
    ours = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    theirs = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5), torch.nn.ReLU(),
                                 torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_matches_torch(reduction, rng):
    torch = pytest.importorskip("torch")
    logits = rng.standard_normal((5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=5)
    criterion = nn.CrossEntropyLoss(reduction)
    loss = criterion(logits, labels.astype(np.int32))
    logits_t = torch.from_numpy(logits.copy()).requires_grad_(True)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(labels), reduction=reduction)
    np.testing.assert_allclose(loss, loss_t.detach().numpy(), rtol=1e-5)

    scale = rng.standard_normal(loss_t.shape).astype(np.float32)
    loss_t.backward(torch.from_numpy(scale))
    np.testing.assert_allclose(criterion.backward(scale), logits_t.grad.numpy(), rtol=1e-5, atol=1e-6)
    if reduction != "none":
        np.testing.assert_allclose(criterion.backward() * scale, logits_t.grad.numpy(), rtol=1e-5, atol=1e-6)


# -- layers are the functional ops plus bookkeeping -------------------------------------------

def test_dropout_draws_one_fresh_seed_per_forward_and_reuses_it_backward(rng):
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    layer = nn.Dropout(0.25)
    manual_seed(7)
    first = layer(x)
    manual_seed(7)
    seed = next_seed()
    np.testing.assert_array_equal(first, F.dropout(x, 0.25, True, seed=seed))
    grad = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(layer.backward(grad), F.dropout_backward(grad, 0.25, seed))
    kept = first != 0
    np.testing.assert_allclose(layer.backward(grad), np.where(kept, grad / 0.75, 0), rtol=1e-6)
    assert 0.6 < kept.mean() < 0.9
    second = layer(x)
    assert not np.array_equal(second != 0, kept)  # a fresh mask


def test_train_and_eval_toggle_dropout_everywhere(rng):
    model = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Dropout(0.5), nn.ReLU()))
    x = rng.standard_normal((4, 6)).astype(np.float32)
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    expected = np.maximum(F.linear(x, model[0].weight.data, model[0].bias.data), 0)
    np.testing.assert_array_equal(model(x), expected)
    grad = np.ones((4, 6), np.float32)
    np.testing.assert_array_equal(model[1][0].backward(grad), grad)
    model.train()
    assert all(m.training for m in model.modules())
    assert np.count_nonzero(model[1][0](x)) < x.size  # dropout is back


# -- whole-model gradients: finite differences in float64 --------------------------------------

def _small_model():
    return nn.Sequential(
        # 6x6 -> 6x6 -> 4x4 -> 3x3 -> 2x2 (ceil mode) -> 16 features
        nn.Conv2d(2, 3, 3, padding=2, dilation=2), nn.Tanh(), nn.AvgPool2d(2, padding=1, count_include_pad=False),
        nn.Conv2d(3, 4, 2), nn.ReLU(), nn.LocalResponseNorm(3, alpha=0.1, k=1.5),
        nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(16, 5), nn.Sigmoid(), nn.Linear(5, 3),
    )


def test_finite_differences_check_input_and_every_parameter_gradient(rng):
    manual_seed(3)
    model = _small_model().double()
    criterion = nn.CrossEntropyLoss()
    x = rng.standard_normal((2, 2, 6, 6))
    labels = np.array([0, 2], np.int32)

    def loss_at(x_value):
        manual_seed(11)  # the same dropout mask for every evaluation
        return float(criterion(model(x_value), labels))

    loss_at(x)
    grad_input = model.backward(criterion.backward())
    assert grad_input.dtype == np.float64
    np.testing.assert_allclose(grad_input, numerical_gradient(x, lambda: loss_at(x)), rtol=1e-5, atol=1e-8)
    for name, param in model.named_parameters():
        assert param.grad.dtype == np.float64, name
        np.testing.assert_allclose(param.grad, numerical_gradient(param.data, lambda: loss_at(x)), rtol=1e-5, atol=1e-8,
                                   err_msg=name)


def test_gradients_accumulate_over_backwards_until_zero_grad(rng):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    grad = rng.standard_normal((2, 3)).astype(np.float32)
    assert all(p.grad is None for p in model.parameters())
    model(x)
    model.backward(grad)
    once = {name: p.grad.copy() for name, p in model.named_parameters()}
    model(x)
    model.backward(grad)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, 2 * once[name], rtol=1e-6, err_msg=name)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# -- every device against a float64 loop reference ---------------------------------------------

def _reference_forward(x, conv_w, conv_b, fc_w, fc_b):
    """conv 3x3 (padding 1) -> ReLU -> max pool 2 -> flatten -> linear, as float64 loops."""
    n, c_in, h, w = x.shape
    c_out = conv_w.shape[0]
    padded = np.zeros((n, c_in, h + 2, w + 2))
    padded[:, :, 1:-1, 1:-1] = x
    conv = np.zeros((n, c_out, h, w))
    for b in range(n):
        for o in range(c_out):
            for i in range(h):
                for j in range(w):
                    total = conv_b[o]
                    for c in range(c_in):
                        for di in range(3):
                            for dj in range(3):
                                total += padded[b, c, i + di, j + dj] * conv_w[o, c, di, dj]
                    conv[b, o, i, j] = max(total, 0.0)
    pooled = np.zeros((n, c_out, h // 2, w // 2))
    for b, o, i, j in np.ndindex(pooled.shape):
        pooled[b, o, i, j] = max(conv[b, o, 2 * i + di, 2 * j + dj] for di in range(2) for dj in range(2))
    flat = pooled.reshape(n, -1)
    out = np.zeros((n, fc_w.shape[0]))
    for b in range(n):
        for k in range(fc_w.shape[0]):
            out[b, k] = fc_b[k] + sum(flat[b, f] * fc_w[k, f] for f in range(flat.shape[1]))
    return out


def test_tiny_model_on_every_device(device, rng):
    def build():
        manual_seed(5)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4))

    model, reference = build(), build().double()
    state = model.state_dict()
    x = rng.permutation(np.linspace(-2, 2, 2 * 2 * 4 * 4)).reshape(2, 2, 4, 4).astype(np.float32)
    grad = rng.standard_normal((2, 4)).astype(np.float32)

    model.to(device)
    assert {p.device for p in model.parameters()} == {device}
    out = model(to_device(x, device))
    assert device_of(out) == device and out.dtype == np.float32
    expected = _reference_forward(x.astype(np.float64), *(state[k].astype(np.float64) for k in state))
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=1e-5)

    grad_input = model.backward(to_device(grad, device))
    reference(x.astype(np.float64))
    expected_grad_input = reference.backward(grad.astype(np.float64))
    np.testing.assert_allclose(to_numpy(grad_input), expected_grad_input, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert device_of(p.grad) == device, name
        np.testing.assert_allclose(to_numpy(p.grad), q.grad, rtol=1e-4, atol=1e-5, err_msg=name)


def test_every_layer_on_every_device_matches_float64_cpu(device, rng):
    """All layer types, dropout included (one seed draws one mask on every device), and the loss."""
    manual_seed(3)
    model = _small_model().to(device)
    manual_seed(3)
    reference = _small_model().double()
    criterion, reference_criterion = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    x = rng.standard_normal((2, 2, 6, 6))
    labels = np.array([1, 2], np.int32)

    manual_seed(11)
    loss = criterion(model(to_device(x.astype(np.float32), device)), to_device(labels, device))
    grad_input = model.backward(criterion.backward())
    manual_seed(11)
    expected_loss = reference_criterion(reference(x), labels)
    expected_grad_input = reference.backward(reference_criterion.backward())

    assert device_of(loss) == device_of(grad_input) == device
    np.testing.assert_allclose(to_numpy(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(grad_input), expected_grad_input, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        np.testing.assert_allclose(to_numpy(p.grad), q.grad, rtol=1e-4, atol=1e-6, err_msg=name)


# -- parameters, modules, state --------------------------------------------------------------

def test_initialisation_follows_torch_bounds_and_the_library_seed():
    manual_seed(0)
    conv = nn.Conv2d(4, 8, (3, 2))
    linear = nn.Linear(50, 10)
    assert conv.weight.shape == (8, 4, 3, 2) and conv.bias.shape == (8,)
    assert linear.weight.shape == (10, 50) and linear.bias.shape == (10,)
    for param, fan_in in [(conv.weight, 24), (conv.bias, 24), (linear.weight, 50), (linear.bias, 50)]:
        bound = 1 / math.sqrt(fan_in)
        assert param.dtype == np.float32 and param.grad is None
        assert np.abs(param.data).max() <= bound
    # U(-b, b) has standard deviation b/sqrt(3); 500 draws land well within 10% of it.
    assert linear.weight.data.std() == pytest.approx(1 / math.sqrt(50) / math.sqrt(3), rel=0.1)
    manual_seed(0)
    np.testing.assert_array_equal(nn.Conv2d(4, 8, (3, 2)).weight.data, conv.weight.data)


def test_named_parameters_use_dotted_torch_names():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "2.1.weight", "2.1.bias"]
    assert len(list(model.parameters())) == 3 and model.num_parameters() == 18 + 10
    assert [name for name, _ in model.named_modules()] == ["", "0", "1", "2", "2.0", "2.1"]
    assert len(model) == 3 and isinstance(model[2], nn.Sequential) and isinstance(model[-1][1], nn.Linear)
    assert [type(m).__name__ for m in model[1:]] == ["ReLU", "Sequential"]


def test_state_dict_round_trip_copies_arrays():
    manual_seed(1)
    source = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(3, 2))
    manual_seed(2)
    target = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(3, 2))
    state = source.state_dict()
    assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    weight = target[0].weight.data
    assert target.load_state_dict(state) == ([], [])
    assert target[0].weight.data is weight  # loaded in place
    for (name, p), q in zip(target.named_parameters(), source.parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    state["0.weight"][...] = 0  # a copy: the models are untouched
    assert np.all(source[0].weight.data != 0) and np.all(target[0].weight.data != 0)


def test_load_state_dict_names_missing_unexpected_and_mismatched_keys():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(3, 2))
    before = model.state_dict()
    bad = dict(before)
    del bad["0.bias"]
    bad["2.weight"] = np.zeros(3, np.float32)
    bad["1.weight"] = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError) as error:
        model.load_state_dict(bad)
    message = str(error.value)
    assert "missing keys: 0.bias" in message
    assert "unexpected keys: 2.weight" in message
    assert "1.weight: expected shape (2, 3), got (2, 4)" in message
    np.testing.assert_array_equal(model[1].weight.data, before["1.weight"])  # nothing was loaded

    del bad["1.weight"]
    missing, unexpected = model.load_state_dict(bad, strict=False)
    assert missing == ["0.bias", "1.weight"] and unexpected == ["2.weight"]
    np.testing.assert_array_equal(model[0].weight.data, before["0.weight"])


def test_load_state_dict_keeps_each_parameter_device_and_dtype():
    model = nn.Linear(3, 2).to("emu")
    model.load_state_dict({"weight": np.ones((2, 3)), "bias": np.zeros(2)})
    assert model.weight.device == "emu" and model.weight.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(model.weight.data), np.ones((2, 3)))
    # Values from another device, or plain nested lists, load too.
    model.load_state_dict({"weight": [[2.0] * 3] * 2, "bias": to_device(np.full(2, 3.0, np.float32), "emu")})
    np.testing.assert_array_equal(to_numpy(model.weight.data), np.full((2, 3), 2.0))
    np.testing.assert_array_equal(to_numpy(model.bias.data), [3.0, 3.0])


def test_to_moves_parameters_and_gradients_and_returns_self(rng):
    model = nn.Sequential(nn.Linear(3, 2))
    model(rng.standard_normal((4, 3)).astype(np.float32))
    model.backward(np.ones((4, 2), np.float32))
    assert model.to("emu") is model
    assert model.device == "emu"
    assert all(device_of(p.data) == device_of(p.grad) == "emu" for p in model.parameters())
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(np.ones((4, 2), np.float32))  # activations saved on the old device are dropped
    with pytest.raises(ValueError, match="double\\(\\) needs the model on 'cpu'"):
        model.double()
    model.to("cpu")
    assert model.device == "cpu" and type(model[0].weight.data) is np.ndarray


def test_input_on_another_device_is_a_value_error():
    layer = nn.Conv2d(1, 2, 3)
    x = to_device(np.zeros((1, 1, 4, 4), np.float32), "emu")
    with pytest.raises(ValueError, match=r"Conv2d: input of shape \(1, 1, 4, 4\) is on 'emu' "
                                         r"but the layer's parameters are on 'cpu'"):
        layer(x)
    with pytest.raises(ValueError, match="on 'emu' but .* on 'cpu'"):
        nn.Linear(4, 2)(to_device(np.zeros((1, 4), np.float32), "emu"))


@pytest.mark.parametrize("layer", [nn.Conv2d(1, 1, 1), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(2, 2), nn.LocalResponseNorm(2), nn.CrossEntropyLoss()],
                         ids=lambda layer: type(layer).__name__)
def test_backward_before_forward_is_a_clear_error(layer):
    with pytest.raises(RuntimeError, match=f"{type(layer).__name__}.backward\\(\\) called before forward\\(\\)"):
        layer.backward(np.ones((1, 1, 2, 2), np.float32))


def test_argument_errors_name_the_argument():
    with pytest.raises(TypeError, match="kernel_size"):
        nn.Conv2d(1, 2, 2.5)
    with pytest.raises(ValueError, match="stride must be positive"):
        nn.MaxPool2d(2, stride=0)
    with pytest.raises(TypeError):  # torch's fourth argument is dilation: never silently ceil_mode
        nn.MaxPool2d(3, 2, 0, 1)
    with pytest.raises(ValueError, match="Linear: in_features must be positive, got 0"):
        nn.Linear(0, 3)
    with pytest.raises(ValueError, match=r"Dropout: p must be between 0 and 1, got 1.5"):
        nn.Dropout(1.5)
    with pytest.raises(TypeError, match="argument 1 must be a Module"):
        nn.Sequential(nn.ReLU(), "relu")
    with pytest.raises(ValueError, match=r"input has 3 channels, the layer expects 2 \(input shape \(1, 3, 8, 8\)\)"):
        nn.Conv2d(2, 4, 3).output_shape((1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"Linear: input must be 2-D \(N, in_features\), got shape \(1, 3, 8\)"):
        nn.Linear(8, 4).output_shape((1, 3, 8))

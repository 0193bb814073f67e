"""Inputs at the edges, held to PyTorch's answers: an empty batch through every op and through a
whole model (forward and backward), layer constructors that refuse what torch.nn refuses (and
accept what it accepts), NaN/inf/empty inputs without NumPy RuntimeWarnings, and LRN sizes far
past the channel count."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpuconv.functional as F
from gpuconv import nn, optim
from gpuconv.device import device_of, to_device, to_numpy

torch = pytest.importorskip("torch")
tf = torch.nn.functional


def _t(a):
    return torch.tensor(np.asarray(a), requires_grad=np.asarray(a).dtype.kind == "f")


def _same(ours, theirs):
    """Shape, dtype and values (NaN where PyTorch has NaN) of ``ours`` equal PyTorch's ``theirs``."""
    ours = to_numpy(ours)
    theirs = theirs.detach().numpy()
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


# ------------------------------------------------------------------------------------ batch 0


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's note on its copy
def test_empty_batch_through_convolution_matches_torch(device):
    x = np.zeros((0, 3, 7, 6), np.float32)
    weight = np.ones((4, 3, 3, 2), np.float32)
    bias = np.ones(4, np.float32)
    xt, wt, bt = _t(x), _t(weight), _t(bias)
    for stride, padding in ((1, 0), (2, 1), (1, "same")):
        want = torch.relu(tf.conv2d(xt, wt, bt, stride, padding))
        out = F.conv2d(*(to_device(a, device) for a in (x, weight, bias)), stride, padding, activation="relu")
        assert device_of(out) == device
        _same(out, want)
        g = np.zeros(tuple(want.shape), np.float32)
        wt.grad = bt.grad = xt.grad = None
        want.backward(torch.tensor(g))
        gd, wd = to_device(g, device), to_device(weight, device)
        _same(F.conv2d_input(x.shape, wd, gd, stride, padding), xt.grad)
        _same(F.conv2d_weight(to_device(x, device), weight.shape, gd, stride, padding), wt.grad)
        _same(F.conv2d_bias(gd), bt.grad)
        assert (to_numpy(F.conv2d_weight(to_device(x, device), weight.shape, gd, stride, padding)) == 0).all()


def test_empty_batch_through_pooling_activations_lrn_dropout_and_resize_match_torch(device):
    x = np.zeros((0, 3, 6, 5), np.float32)
    xd = to_device(x, device)
    xt = _t(x)
    out, idx = F.max_pool2d(xd, 3, 2, 1, True, return_indices=True)
    want, want_idx = tf.max_pool2d(xt, 3, 2, 1, ceil_mode=True, return_indices=True)
    _same(out, want)
    _same(idx.astype(np.int64), want_idx)
    _same(F.max_pool2d_backward(out, idx, x.shape, 3, 2, 1, True), torch.zeros(x.shape))
    _same(F.avg_pool2d(xd, 3, 2, 1, True, False), tf.avg_pool2d(xt, 3, 2, 1, True, False))
    _same(F.avg_pool2d_backward(out, x.shape, 3, 2, 1, True, False), torch.zeros(x.shape))
    for name in ("relu", "tanh", "sigmoid"):
        _same(getattr(F, name)(xd), getattr(torch, name)(xt))
        _same(getattr(F, f"{name}_backward")(xd, xd), torch.zeros(x.shape))
    _same(F.local_response_norm(xd, 3), tf.local_response_norm(xt, 3))
    _same(F.local_response_norm_backward(xd, xd, xd, 3), torch.zeros(x.shape))
    _same(F.dropout(xd, 0.5, seed=3), tf.dropout(xt, 0.5))
    _same(F.dropout_backward(xd, 0.5, 3), torch.zeros(x.shape))
    _same(F.interpolate(xd, (4, 9)), tf.interpolate(xt, (4, 9), mode="bilinear", align_corners=False))


def test_empty_batch_through_linear_and_loss_matches_torch(device):
    x, weight, bias = np.zeros((0, 5), np.float32), np.ones((3, 5), np.float32), np.ones(3, np.float32)
    xt, wt, bt = _t(x), _t(weight), _t(bias)
    want = tf.linear(xt, wt, bt)
    _same(F.linear(*(to_device(a, device) for a in (x, weight, bias))), want)
    want.sum().backward()
    grads = F.linear_backward(to_device(np.zeros((0, 3), np.float32), device), to_device(x, device),
                              to_device(weight, device))
    for ours, theirs in zip(grads, (xt.grad, wt.grad, bt.grad)):
        _same(ours, theirs)

    logits, labels = np.zeros((0, 10), np.float32), np.zeros(0, np.int64)
    for reduction in ("mean", "sum", "none"):
        lt = _t(logits)
        want = tf.cross_entropy(lt, torch.tensor(labels), reduction=reduction)  # 'mean' of nothing: NaN
        loss, grad = F.cross_entropy_with_grad(to_device(logits, device), to_device(labels, device), reduction)
        _same(loss, want)
        want.sum().backward()
        _same(grad, lt.grad)


def _small_net(ours: bool):
    """The same small CNN in gpuconv and in torch.nn (every layer kind the models use)."""
    lib = nn if ours else torch.nn
    return lib.Sequential(lib.Conv2d(2, 4, 3, padding=1), lib.ReLU(), lib.LocalResponseNorm(3),
                          lib.MaxPool2d(2), lib.AvgPool2d(2, padding=1), lib.Tanh(), lib.Flatten(),
                          lib.Dropout(0.5), lib.Linear(4 * 3 * 3, 6), lib.Sigmoid(), lib.Linear(6, 5))


def test_empty_batch_through_a_whole_model_matches_torch(device):
    ours, theirs = _small_net(True), _small_net(False)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    ours.to(device)
    criterion = nn.CrossEntropyLoss()
    x, labels = np.zeros((0, 2, 10, 10), np.float32), np.zeros(0, np.int64)
    out = ours(to_device(x, device))
    want = theirs(torch.tensor(x))
    _same(out, want)
    loss = criterion(out, to_device(labels, device))
    want_loss = tf.cross_entropy(want, torch.tensor(labels))
    _same(loss, want_loss)
    want_loss.backward()
    grad_input = ours.backward(criterion.backward())
    assert tuple(grad_input.shape) == x.shape
    theirs_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        _same(param.grad, theirs_grads[name].grad)  # zeros, as torch's
    optimizer = optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    before = ours.state_dict()
    optimizer.step()
    for name, value in ours.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


# ------------------------------------------------------------------------------- constructors

# (gpuconv call, torch.nn call, expected error type, what our message says): torch.nn refuses
# these at construction, and so do we, naming the argument and the value.
REFUSED_AS_IN_TORCH = [
    ("Conv2d(3, 4, 3, stride=2, padding='same')", ValueError, r"padding='same' needs stride 1.*stride=\(2, 2\)"),
    ("Conv2d(3, 4, 3, stride=(2, 1), padding='same')", ValueError, r"padding='same' needs stride 1"),
    ("Conv2d(3, 4, 3, padding='full')", ValueError, r"padding must be an int, a pair, 'same' or 'valid', got 'full'"),
    ("Conv2d(3.5, 4, 3)", TypeError, r"Conv2d: in_channels must be an int, got 3.5"),
    ("Conv2d(3, 4.0, 3)", TypeError, r"Conv2d: out_channels must be an int, got 4.0"),
    ("Conv2d(3, 4, 3.0)", TypeError, r"kernel_size must be an int or a pair of ints, got 3.0"),
    ("Conv2d(-1, 4, 3)", ValueError, r"Conv2d: in_channels must be positive, got -1"),
    ("Linear(4.7, 3)", TypeError, r"Linear: in_features must be an int, got 4.7"),
    ("Linear(4.0, 3)", TypeError, r"Linear: in_features must be an int, got 4.0"),
    ("Linear(3, -1)", ValueError, r"Linear: out_features must be positive, got -1"),
    ("Linear('4', 3)", TypeError, r"Linear: in_features must be an int, got '4'"),
    ("Dropout(1.5)", ValueError, r"Dropout: p must be between 0 and 1, got 1.5"),
    ("Dropout(-0.1)", ValueError, r"Dropout: p must be between 0 and 1, got -0.1"),
    ("Dropout('0.5')", TypeError, r"Dropout: p must be a number, got str"),
]

# torch.nn builds these and fails (or silently computes nothing) only at the first forward; we
# refuse them at construction, because no input could make them work.
REFUSED_EARLIER_THAN_TORCH = [
    ("Conv2d(0, 4, 3)", ValueError, r"Conv2d: in_channels must be positive, got 0"),
    ("Conv2d(3, 4, 0)", ValueError, r"kernel_size must be positive, got 0"),
    ("Conv2d(3, 4, (3,))", TypeError, r"kernel_size must be an int or a pair of ints, got \(3,\)"),
    ("Conv2d(3, 4, 3, stride=0)", ValueError, r"stride must be positive, got 0"),
    ("Conv2d(3, 4, 3, padding=-1)", ValueError, r"padding must be at least 0, got -1"),
    ("Conv2d(3, 4, 3, dilation=0)", ValueError, r"dilation must be positive, got 0"),
    ("Conv2d(True, 4, 3)", TypeError, r"Conv2d: in_channels must be an int, got True"),
    ("Linear(0, 3)", ValueError, r"Linear: in_features must be positive, got 0"),
    ("MaxPool2d(0)", ValueError, r"kernel_size must be positive, got 0"),
    ("MaxPool2d(2.5)", TypeError, r"kernel_size must be an int or a pair of ints, got 2.5"),
    ("MaxPool2d(3, padding=2)", ValueError, r"padding must be at most half of kernel_size"),
    ("AvgPool2d(3, 2, padding=2)", ValueError, r"padding must be at most half of kernel_size"),
    ("LocalResponseNorm(0)", ValueError, r"LocalResponseNorm: size must be positive, got 0"),
    ("LocalResponseNorm(2.5)", TypeError, r"LocalResponseNorm: size must be an int, got 2.5"),
    ("Flatten(1.5)", TypeError, r"Flatten: start_dim must be an int, got 1.5"),
    ("Dropout(float('nan'))", ValueError, r"Dropout: p must be between 0 and 1, got nan"),
]

ACCEPTED_AS_IN_TORCH = [
    "Conv2d(3, 4, 3, padding='same', dilation=2)", "Conv2d(3, 4, 2, padding='same')",
    "Conv2d(3, 4, 3, stride=2, padding='valid')", "Conv2d(3, 4, (3, 1), padding=(1, 0), bias=False)",
    "Conv2d(np.int64(3), 4, 3)", "Linear(np.int32(4), 3)", "Dropout(1.0)", "Dropout(0)", "Dropout(0.0)",
    "MaxPool2d(3, 2, 1)", "AvgPool2d((2, 3), padding=(1, 1))", "LocalResponseNorm(5)", "Flatten(0, -1)",
]


def _build(lib, call: str):
    return eval(f"lib.{call}", {"lib": lib, "np": np})


@pytest.mark.parametrize("call,error,message", REFUSED_AS_IN_TORCH, ids=[c for c, _, _ in REFUSED_AS_IN_TORCH])
def test_constructors_refuse_what_torch_refuses(call, error, message):
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        _build(torch.nn, call)
    with pytest.raises(error, match=message):
        _build(nn, call)


@pytest.mark.parametrize("call,error,message", REFUSED_EARLIER_THAN_TORCH,
                         ids=[c for c, _, _ in REFUSED_EARLIER_THAN_TORCH])
def test_constructors_refuse_at_once_what_could_never_run(call, error, message):
    with pytest.raises(error, match=message):
        _build(nn, call)


@pytest.mark.parametrize("call", ACCEPTED_AS_IN_TORCH)
def test_constructors_accept_what_torch_accepts(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notes are not ours to judge
        _build(torch.nn, call)
    _build(nn, call)


def test_dropout_p_1_and_same_padding_run_as_in_torch(rng):
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    conv = nn.Conv2d(3, 4, 2, padding="same", dilation=2)
    theirs = torch.nn.Conv2d(3, 4, 2, padding="same", dilation=2)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in conv.state_dict().items()})
    np.testing.assert_allclose(conv(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nn.Dropout(1.0)(x), torch.nn.Dropout(1.0)(torch.tensor(x)).numpy())


# ----------------------------------------------------------------------------------- warnings


def _special_values(rng, shape):
    values = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0, 1.0, -1.0, 1e-40], np.float32)
    return rng.choice(values, size=shape).astype(np.float32)


def test_no_numpy_warning_on_nan_inf_or_empty_inputs(device, rng):
    """Every op on NaN, +-inf, float32's extremes and subnormals, and on empty inputs, with warnings as errors."""
    def d(a):
        return to_device(a, device)

    for batch in (2, 0):
        x, w = d(_special_values(rng, (batch, 3, 6, 6))), d(_special_values(rng, (4, 3, 3, 3)))
        go = d(_special_values(rng, (batch, 4, 4, 4)))
        flat, fw = d(_special_values(rng, (batch, 12))), d(_special_values(rng, (5, 12)))
        logits = d(_special_values(rng, (batch, 5)))
        labels = d(rng.integers(0, 5, batch))
        ops = [
            lambda: F.conv2d(x, w, d(_special_values(rng, (4,))), activation="relu"),
            lambda: F.conv2d_input(x.shape, w, go), lambda: F.conv2d_weight(x, w.shape, go),
            lambda: F.conv2d_bias(go),
            lambda: F.max_pool2d_backward(*F.max_pool2d(x, 3, 1, 1, return_indices=True), x.shape, 3, 1, 1),
            lambda: F.avg_pool2d(x, 3, 1, 1), lambda: F.avg_pool2d_backward(x, x.shape, 3, 1, 1),
            lambda: F.relu_backward(x, F.relu(x)), lambda: F.tanh_backward(x, F.tanh(x)),
            lambda: F.sigmoid_backward(x, F.sigmoid(x)),
            lambda: F.local_response_norm_backward(x, x, F.local_response_norm(x, 5), 5),
            lambda: F.local_response_norm(x, 3, k=0.0),
            lambda: F.linear_backward(d(_special_values(rng, (batch, 5))), flat, fw),
            lambda: F.linear(flat, fw, d(_special_values(rng, (5,)))),
            lambda: F.dropout_backward(F.dropout(x, 0.5, seed=1), 0.5, 1), lambda: F.dropout(x, 1.0),
            lambda: F.cross_entropy_with_grad(logits, labels), lambda: F.cross_entropy(logits, labels, "sum"),
            lambda: F.interpolate(x, 5),
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for op in ops:
                op()


def test_layers_accumulate_and_scale_inf_gradients_without_warnings(device):
    criterion = nn.CrossEntropyLoss(reduction="none")
    # exp(-inf) = 0: the loss gradient holds exact zeros, and 0 * inf is NaN.
    criterion(to_device(np.array([[0.0, -np.inf], [1.0, 2.0]], np.float32), device), to_device(np.array([0, 1]), device))
    param = nn.Parameter(to_device(np.zeros(2, np.float32), device))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad = to_numpy(criterion.backward(to_device(np.array([np.inf, 1.0], np.float32), device)))
        for value in (np.inf, -np.inf):  # inf + -inf is NaN
            param.accumulate_grad(to_device(np.full(2, value, np.float32), device))
    assert np.isnan(grad[0]).any() and np.isnan(to_numpy(param.grad)).all()


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_diverging_step_gives_inf_and_nan_without_warnings(name):
    layer = nn.Linear(3, 2)
    optimizer = optim.SGD(layer.parameters(), lr=0.1, momentum=0.9) if name == "SGD" else optim.Adam(layer.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for grad in (np.inf, 3e38, np.nan):
            for param in layer.parameters():
                param.grad = np.full(param.shape, grad, np.float32)
            optimizer.step()
    assert np.isnan(layer.weight.data).all()


# ----------------------------------------------------------------------------------- siblings


def test_lrn_size_far_past_the_channels_costs_what_the_channels_do(device, rng):
    # A window wider than the channels sums all of them; size only scales alpha. A size near 2^31
    # used to loop size/2 times on the CPU and overflow c + size / 2 in the kernels.
    x = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
    size, alpha = 2**31 - 1, 1e-4
    xx = x.astype(np.float64)
    scale = 1.0 + alpha / size * (xx * xx).sum(axis=1, keepdims=True)
    want = xx * scale ** -0.75
    out = F.local_response_norm(to_device(x, device), size, alpha)
    np.testing.assert_allclose(to_numpy(out), want, rtol=1e-6)
    g = rng.standard_normal(x.shape).astype(np.float32)
    got = F.local_response_norm_backward(to_device(g, device), to_device(x, device), out, size, alpha)
    want_grad = F.local_response_norm_backward(g.astype(np.float64), xx, want, 2 * 5 + 1, alpha * (2 * 5 + 1) / size)
    np.testing.assert_allclose(to_numpy(got), want_grad, rtol=1e-5, atol=1e-7)

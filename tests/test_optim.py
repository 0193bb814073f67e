"""Optimizers and the learning-rate schedule: every device against float64 loops and torch.optim."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from gpuconv.device import device_of, to_device, to_numpy
from gpuconv.optim import SGD, Adam, StepLR

SHAPES = [(7, 3), (5,)]


def sgd_loops(weights, grads, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """PyTorch's documented SGD rule, element by element in float64, over a list of steps."""
    p = [float(v) for v in weights.ravel()]
    buf = None
    for grad in grads:
        d = [float(g) + weight_decay * v for g, v in zip(grad.ravel(), p)]
        if momentum:
            buf = list(d) if buf is None else [momentum * b + di for b, di in zip(buf, d)]
            d = [di + momentum * b for di, b in zip(d, buf)] if nesterov else buf
        p = [v - lr * di for v, di in zip(p, d)]
    return np.array(p).reshape(weights.shape)


def adam_loops(weights, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Adam with bias correction (Kingma and Ba, PyTorch's form), element by element in float64."""
    (b1, b2), p = betas, [float(v) for v in weights.ravel()]
    m, v = [0.0] * len(p), [0.0] * len(p)
    for t, grad in enumerate(grads, start=1):
        for i, g in enumerate(grad.ravel()):
            g = float(g) + weight_decay * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(p).reshape(weights.shape)


def _params(rng, device, dtype=np.float32):
    return [SimpleNamespace(data=to_device(rng.standard_normal(s).astype(dtype), device), grad=None) for s in SHAPES]


def _run(optimizer, params, grads_per_step, device):
    for grads in grads_per_step:
        for param, grad in zip(params, grads):
            param.grad = to_device(grad, device)
        optimizer.step()


def _grads(rng, steps, dtype=np.float32):
    return [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]


SGD_SETTINGS = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.1, weight_decay=0.1),
                dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)]
ADAM_SETTINGS = [dict(lr=0.01), dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)]


@pytest.mark.parametrize("settings", SGD_SETTINGS)
def test_sgd_matches_loops_on_every_device(device, rng, settings):
    params = _params(rng, device)
    start = [to_numpy(p.data).copy() for p in params]
    grads = _grads(rng, 4)
    _run(SGD(params, **settings), params, grads, device)
    for index, (param, weights) in enumerate(zip(params, start)):
        assert device_of(param.data) == device
        expected = sgd_loops(weights, [step[index] for step in grads], **settings)
        np.testing.assert_allclose(to_numpy(param.data), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", ADAM_SETTINGS)
def test_adam_matches_loops_on_every_device(device, rng, settings):
    params = _params(rng, device)
    start = [to_numpy(p.data).copy() for p in params]
    grads = _grads(rng, 4)
    _run(Adam(params, **settings), params, grads, device)
    for index, (param, weights) in enumerate(zip(params, start)):
        expected = adam_loops(weights, [step[index] for step in grads], **settings)
        np.testing.assert_allclose(to_numpy(param.data), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, settings", [("SGD", s) for s in SGD_SETTINGS] + [("Adam", s) for s in ADAM_SETTINGS])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_matches_torch_optim_over_several_steps(rng, name, settings, dtype, tol):
    torch = pytest.importorskip("torch")
    params = _params(rng, "cpu", dtype)
    twins = [torch.nn.Parameter(torch.tensor(p.data.copy())) for p in params]
    ours = {"SGD": SGD, "Adam": Adam}[name](params, **settings)
    theirs = getattr(torch.optim, name)(twins, **settings)
    for grads in _grads(rng, 6, dtype):
        for param, twin, grad in zip(params, twins, grads):
            param.grad, twin.grad = grad, torch.tensor(grad)
        ours.step()
        theirs.step()
    for param, twin in zip(params, twins):
        np.testing.assert_allclose(param.data, twin.detach().numpy(), rtol=tol, atol=tol)


def test_parameters_without_grad_are_skipped_and_zero_grad_drops_grads(rng):
    params = _params(rng, "cpu")
    frozen = params[1].data.copy()
    params[0].grad = np.ones(SHAPES[0], np.float32)
    optimizer = SGD(params, lr=0.5, momentum=0.9)
    optimizer.step()
    np.testing.assert_array_equal(params[1].data, frozen)
    assert set(optimizer.state_dict()["state"]) == {0}
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True), lambda p: Adam(p, lr=0.01)])
def test_state_dict_resumes_exactly_across_devices(device, rng, make):
    """Two steps on a device, a checkpoint, two more on the CPU equal four uninterrupted CPU steps."""
    start = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = _grads(rng, 4)
    straight = [SimpleNamespace(data=w.copy(), grad=None) for w in start]
    _run(make(straight), straight, grads, "cpu")

    on_device = [SimpleNamespace(data=to_device(w, device), grad=None) for w in start]
    first = make(on_device)
    _run(first, on_device, grads[:2], device)
    checkpoint = first.state_dict()
    saved = [v for entry in checkpoint["state"].values() for v in entry.values() if hasattr(v, "shape")]
    assert saved and all(type(v) is np.ndarray for v in saved)

    resumed = [SimpleNamespace(data=to_numpy(p.data).copy(), grad=None) for p in on_device]
    second = make(resumed)
    second.load_state_dict(checkpoint)
    _run(second, resumed, grads[2:], "cpu")
    for got, expected in zip(resumed, straight):
        np.testing.assert_allclose(got.data, expected.data, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: Adam(p, lr=0.01)])
def test_state_dict_is_a_snapshot_and_loading_it_shares_no_buffer(device, rng, make):
    """state_dict() does not change with later steps, and two optimizers loaded from one do not
    update each other's buffers (on 'cpu' and 'emu' a plain conversion would alias them)."""
    params = _params(rng, device)
    first = make(params)
    _run(first, params, _grads(rng, 1), device)
    checkpoint = first.state_dict()
    saved = {(i, k): v.copy() for i, entry in checkpoint["state"].items() for k, v in entry.items() if hasattr(v, "shape")}
    _run(first, params, _grads(rng, 1), device)
    for (i, k), v in saved.items():
        np.testing.assert_array_equal(checkpoint["state"][i][k], v)

    copies = [[SimpleNamespace(data=to_device(to_numpy(p.data), device), grad=None) for p in params] for _ in range(2)]
    twins = [make(c) for c in copies]
    for twin in twins:
        twin.load_state_dict(checkpoint)
    _run(twins[0], copies[0], _grads(rng, 1), device)
    for (i, k), v in saved.items():
        np.testing.assert_array_equal(to_numpy(twins[1].state[i][k]), v)
        np.testing.assert_array_equal(checkpoint["state"][i][k], v)


def test_load_state_dict_checks_shapes(rng):
    params = _params(rng, "cpu")
    optimizer = SGD(params, lr=0.1, momentum=0.9)
    bad = {"state": {0: {"momentum_buffer": np.zeros((3, 7), np.float32)}}, "hyperparameters": {"lr": 0.1}}
    with pytest.raises(ValueError, match=r"momentum_buffer for parameter 0 has shape \(3, 7\), the parameter \(7, 3\)"):
        optimizer.load_state_dict(bad)
    with pytest.raises(ValueError, match="state for parameter 5, but the optimizer has 2 parameters"):
        optimizer.load_state_dict({"state": {5: {}}, "hyperparameters": {}})


def test_step_lr_matches_torch():
    torch = pytest.importorskip("torch")
    ours = SGD([SimpleNamespace(data=np.zeros(2), grad=None)], lr=0.01)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.01)
    schedule = StepLR(ours, step_size=3, gamma=0.5)
    reference = torch.optim.lr_scheduler.StepLR(theirs, step_size=3, gamma=0.5)
    for _ in range(10):
        theirs.step()
        schedule.step()
        reference.step()
        assert schedule.get_last_lr() == pytest.approx(reference.get_last_lr(), rel=1e-15)
        assert ours.lr == schedule.get_last_lr()[0]
    restored = StepLR(SGD([SimpleNamespace(data=np.zeros(2), grad=None)], lr=1.0), step_size=1)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict()


@pytest.mark.parametrize("make, error, message", [
    (lambda p: SGD(p, lr=-0.1), ValueError, r"lr must be >= 0.0, got -0.1"),
    (lambda p: SGD(p, lr="fast"), TypeError, "lr must be a real number, got 'fast'"),
    (lambda p: SGD(p, lr=0.1, momentum=-0.5), ValueError, "momentum must be >= 0.0, got -0.5"),
    (lambda p: SGD(p, lr=0.1, nesterov=True), ValueError, "nesterov=True needs a positive momentum"),
    (lambda p: SGD(p, lr=0.1, weight_decay=float("nan")), ValueError, "weight_decay must be >= 0.0, got nan"),
    (lambda p: Adam(p, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be \[0.0, 1.0\), got 1.0"),
    (lambda p: Adam(p, betas=0.9), TypeError, "betas must be a pair of floats"),
    (lambda p: Adam(p, eps=-1.0), ValueError, "eps must be >= 0.0"),
    (lambda p: SGD([], lr=0.1), ValueError, "empty parameter list"),
    (lambda p: SGD([np.zeros(2)], lr=0.1), TypeError, "parameter 0 must have .data and .grad, got ndarray"),
    (lambda p: StepLR(SGD(p, lr=0.1), step_size=0), ValueError, "step_size must be a positive int, got 0"),
])
def test_bad_hyperparameters_are_named(rng, make, error, message):
    with pytest.raises(error, match=message):
        make(_params(rng, "cpu"))


def test_sgd_arguments_past_momentum_are_keyword_only(rng):
    """torch.optim.SGD's fourth argument is dampening: a positional call written for torch must
    fail here, not take its dampening for weight_decay and its weight_decay for nesterov."""
    with pytest.raises(TypeError):
        SGD(_params(rng, "cpu"), 0.1, 0.9, 0.0, 1e-4)


def test_a_grad_of_the_wrong_shape_is_named(rng):
    params = _params(rng, "cpu")
    params[1].grad = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"parameter 1: grad \(4,\) does not match data \(5,\)"):
        SGD(params, lr=0.1).step()


# -- one launch for every parameter ------------------------------------------------------------

FLAT_SHAPES = [(6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (10, 40), (10,), (3,)]
ONE_LAUNCH = [
    lambda p: SGD(p, lr=0.05),
    lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: Adam(p, lr=0.01, weight_decay=0.1),
]


@pytest.mark.parametrize("make", ONE_LAUNCH)
@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_one_update_of_all_parameters_is_bit_identical_to_updating_each_alone(device, rng, make):
    """Several steps, with a parameter left without a gradient in one of them (its Adam step count
    then differs from its neighbours'), against one optimizer per parameter."""
    import gpuconv

    start = [rng.standard_normal(s).astype(np.float32) for s in FLAT_SHAPES]
    together = [SimpleNamespace(data=to_device(w, device), grad=None) for w in start]
    alone = [SimpleNamespace(data=to_device(w, device), grad=None) for w in start]
    optimizer, singles = make(together), [make([p]) for p in alone]
    for step in range(4):
        grads = [rng.standard_normal(s).astype(np.float32) for s in FLAT_SHAPES]
        skipped = 2 if step == 1 else None
        for index, (a, b, g) in enumerate(zip(together, alone, grads)):
            a.grad = b.grad = None if index == skipped else to_device(g, device)
        with gpuconv.profile() as prof:
            optimizer.step()
        if device == "emu":
            # One launch; one on each side of the parameter without a gradient; and for Adam,
            # whose step counts then differ, one per run of equal counts from then on.
            expected = 2 if step == 1 else (3 if step > 1 and isinstance(optimizer, Adam) else 1)
            assert len([x for x in prof.launches if not x.library]) == expected
        for single in singles:
            single.step()
    for index, (a, b) in enumerate(zip(together, alone)):
        np.testing.assert_array_equal(to_numpy(a.data), to_numpy(b.data), err_msg=f"parameter {index}")
        for name, value in optimizer.state[index].items():
            expected = singles[index].state[0][name]
            np.testing.assert_array_equal(to_numpy(value) if hasattr(value, "shape") else value,
                                          to_numpy(expected) if hasattr(expected, "shape") else expected)


def test_a_gradient_written_into_its_flat_slot_is_not_copied(rng):
    """A model's layers write gradients straight into the optimizer's flat buffer: the step is
    the update's one launch and nothing else."""
    import gpuconv
    from gpuconv import models, nn

    model = models.lenet5().to("emu")
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    x = to_device(rng.standard_normal((2, 1, 28, 28)).astype(np.float32), "emu")
    y = to_device(np.array([1, 7], np.int32), "emu")
    for step in range(2):
        criterion(model(x), y)
        model.backward(criterion.backward())
        with gpuconv.profile() as prof:
            optimizer.step()
        optimizer.zero_grad()
        # (the first step also zeroes the new momentum buffer and copies the learning rate in)
        assert [x.kernel for x in prof.launches] == ["memset", "copy_to_device"] * (step == 0) + ["sgd_step_v2"]
    assert len({p.data.base.ctypes.data if p.data.base is not None else None for p in model.parameters()}) == 1

"""The batch-innermost CPU executor (gpuconv.cpu) against the module path it replaces: logits and
every parameter gradient to float32 rounding and against float64 references, dropout masks,
frozen parameters, accumulation, optimizer steps, lanes, and which models it declines."""
from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from gpuconv import cpu, models, nn, optim
from gpuconv.cpu import executor as executor_module
from gpuconv.cpu import lane_process, threads
from gpuconv.random import manual_seed


def small_alexnet(classes: int = 7) -> models.ConvNet:
    """AlexNet's layer kinds on a 3x23x19 input: a strided padded conv, LRN, overlapping 3x3/2
    pools (one padded, in ceil mode), a dilated conv, a sigmoid, dropout in both parts."""
    features = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=5, stride=2, padding=2), nn.ReLU(),
        nn.LocalResponseNorm(5, alpha=5e-2, beta=0.75, k=2.0), nn.MaxPool2d(3, 2),
        nn.Conv2d(8, 12, kernel_size=3, padding=2, dilation=2), nn.ReLU(), nn.Dropout(0.3),
        nn.Conv2d(12, 10, kernel_size=(3, 2), padding=(1, 0)), nn.Sigmoid(),
        nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
    )
    classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(10 * 3 * 2, 16), nn.ReLU(),
        nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, classes),
    )
    return models.ConvNet(features, classifier, (3, 23, 19))


MODELS = {
    "lenet5": lambda: models.lenet5(),
    "lenet5-classic": lambda: models.lenet5(classic=True),
    "small-alexnet": small_alexnet,
}


def build(name: str, dtype=np.float32):
    manual_seed(7)
    model = MODELS[name]()
    return model.double() if dtype == np.float64 else model


def batch(model, n: int, dtype=np.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *model.input_shape)).astype(dtype)
    return x, rng.integers(0, 7, n).astype(np.int32)


def step(model, x, y, executor: bool, seed: int = 11):
    """Forward, loss, backward; the logits, the input gradient and every gradient by name."""
    model.cpu_executor = executor
    model.zero_grad()
    manual_seed(seed)  # the same dropout seeds on both paths
    criterion = nn.CrossEntropyLoss()
    logits = model(x)
    assert (model._executed_by is not None) == executor
    criterion(logits, y)
    grad_input = model.backward(criterion.backward())
    grads = {name: None if p.grad is None else p.grad.copy() for name, p in model.named_parameters()}
    return logits.copy(), grad_input, grads


def assert_close(actual, expected, rtol, what=""):
    """Equal to ``rtol`` of the largest magnitude (a gradient's small entries carry the rounding
    of its large ones)."""
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    error = float(np.max(np.abs(np.asarray(actual, np.float64) - expected), initial=0.0))
    assert error <= rtol * scale, f"{what}: error {error:.3g} over {rtol:.1g} of {scale:.3g}"


def assert_same_step(a, b, rtol):
    (logits_a, input_a, grads_a), (logits_b, input_b, grads_b) = a, b
    assert_close(logits_a, logits_b, rtol, "logits")
    assert (input_a is None) == (input_b is None)
    if input_a is not None:
        assert_close(input_a, input_b, rtol, "input gradient")
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert (grads_a[name] is None) == (grads_b[name] is None), name
        if grads_a[name] is not None:
            assert_close(grads_a[name], grads_b[name], rtol, name)


@pytest.fixture(params=["process", "thread"])
def two_lanes(request, monkeypatch):
    """The batch split into two lanes, whatever the machine's BLAS thread count: the second in the
    helper process, or on a second thread."""
    monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    monkeypatch.setenv(lane_process.LANES_SWITCH, request.param)
    return request.param


@pytest.fixture
def thread_lanes(monkeypatch):
    """Two lanes on threads: for a test that patches the stages' code, which the helper process
    does not see."""
    monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    monkeypatch.setenv(lane_process.LANES_SWITCH, "thread")


@pytest.fixture
def own_helper(monkeypatch):
    """A helper process of this test's own (the shared one is restored after it)."""
    monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    monkeypatch.setenv(lane_process.LANES_SWITCH, "process")
    monkeypatch.setattr(lane_process.LaneProcess, "_current", None)
    monkeypatch.setattr(lane_process.LaneProcess, "_failure", None)
    yield
    helper = lane_process.LaneProcess._current
    if helper is not None:
        helper.close()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n", [1, 5, 16])
def test_executor_matches_the_module_path_and_float64(name, n, two_lanes):
    model = build(name)
    x, y = batch(model, n)
    ours = step(model, x, y, executor=True)
    assert_same_step(ours, step(model, x, y, executor=False), 2e-5)
    reference = build(name, np.float64)
    assert_same_step(ours, step(reference, x.astype(np.float64), y, executor=False), 1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_output_row_a_block_matches_the_module_path(name, thread_lanes, monkeypatch):
    """The forward and the weight gradient in blocks of a single output row (uneven blocks at the
    default size are covered above: LeNet's conv1 at 8 images a lane is 18 + 10 rows)."""
    monkeypatch.setattr(executor_module.stage_types.conv_ops, "BLOCK_COLUMNS", 1)
    model = build(name)
    x, y = batch(model, 7)
    assert_same_step(step(model, x, y, executor=True), step(model, x, y, executor=False), 2e-5)


@pytest.mark.parametrize("block_columns", [1, executor_module.stage_types.conv_ops.BLOCK_COLUMNS])
@pytest.mark.parametrize("name", ["lenet5", "small-alexnet"])
def test_a_second_backward_of_one_forward_rebuilds_the_columns(name, block_columns, thread_lanes, monkeypatch):
    """The column gradients overwrite the forward's columns (in its one block) or not (several):
    a second backward of the same forward must give the same gradients again."""
    monkeypatch.setattr(executor_module.stage_types.conv_ops, "BLOCK_COLUMNS", block_columns)
    model = build(name)
    x, y = batch(model, 6)
    model.requires_input_grad = True
    logits, grad_input, grads = step(model, x, y, executor=True)
    criterion = nn.CrossEntropyLoss()
    criterion(logits, y)
    again = model.backward(criterion.backward())
    np.testing.assert_array_equal(again, grad_input)
    for name, param in model.named_parameters():
        assert_close(param.grad, 2 * grads[name], 1e-6, name)


@pytest.mark.parametrize("name", list(MODELS))
def test_float64_executor_matches_the_float64_module_path(name, two_lanes):
    """float64 models take the module path by default; the executor itself runs them too, which
    holds it to the module path at float64 rounding (differences of order, nothing else)."""
    model = build(name, np.float64)
    x, y = batch(model, 6, np.float64)
    criterion = nn.CrossEntropyLoss()
    manual_seed(11)
    assert cpu.executor_for(model, x) is None
    executor = cpu.ModelExecutor(model)
    criterion(executor.forward(x), y)
    grad_input = executor.backward(criterion.backward(), True)
    ours = ({n: p.grad.copy() for n, p in model.named_parameters()}, grad_input)
    model.zero_grad()
    model.requires_input_grad = True
    _, reference_input, reference = step(model, x, y, executor=False)
    for key, value in reference.items():
        assert_close(ours[0][key], value, 1e-12, key)
    assert_close(ours[1], reference_input, 1e-12, "input gradient")


@pytest.mark.parametrize("classifier_in_lanes", [True, False])
def test_lanes_match_one_pass(classifier_in_lanes, monkeypatch):
    """Two lanes (every stage in them, or the features only, as for a large model) against one."""
    if not classifier_in_lanes:
        monkeypatch.setattr(executor_module, "SPLIT_MAX_PARAMETERS", 0)
    model = build("small-alexnet")
    x, y = batch(model, 9)
    monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    split = step(model, x, y, executor=True)
    lanes, whole = model._executed_by._last[:2]
    assert len(lanes) == 2 and (whole is None) == classifier_in_lanes
    if isinstance(lanes[1], lane_process.ProcessLane):  # the helper gets the weights of what it runs only
        expected = model.parameters() if classifier_in_lanes else model.features.parameters()
        assert {id(p) for p in lanes[1].parameters.values()} == {id(p) for p in expected}
    monkeypatch.setattr(threads, "blas_threads", lambda: 1)
    one = step(model, x, y, executor=True)
    assert len(model._executed_by._last[0]) == 1
    assert_same_step(split, one, 2e-6)
    assert_same_step(split, step(model, x, y, executor=False), 2e-5)


def test_input_gradient_and_frozen_parameters(two_lanes):
    model = build("small-alexnet")
    x, y = batch(model, 6)
    model.features[0].weight.requires_grad_(False)
    model.classifier[1].bias.requires_grad_(False)
    model.requires_input_grad = True
    ours = step(model, x, y, executor=True)
    assert ours[2]["features.0.weight"] is None and ours[2]["classifier.1.bias"] is None
    assert ours[2]["features.0.bias"] is not None and ours[1].shape == x.shape
    assert_same_step(ours, step(model, x, y, executor=False), 2e-5)
    # Nothing before the classifier trains and the input needs nothing: the features run no backward.
    model.requires_input_grad = False
    model.features.requires_grad_(False)
    ours = step(model, x, y, executor=True)
    assert all(ours[2][name] is None for name in ours[2] if name.startswith("features"))
    assert_same_step(ours, step(model, x, y, executor=False), 2e-5)


def test_gradients_accumulate_and_returned_arrays_stay_the_callers(two_lanes):
    model = build("lenet5")
    x, y = batch(model, 4)
    once = step(model, x, y, executor=True)
    logits_kept, grads_kept = once[0], {n: p.grad for n, p in model.named_parameters()}
    kept_values = {n: g.copy() for n, g in grads_kept.items()}
    logits = model(x)
    criterion = nn.CrossEntropyLoss()
    criterion(logits, y)
    model.backward(criterion.backward())  # no zero_grad: added to the gradients held
    for name, param in model.named_parameters():
        assert param.grad is grads_kept[name]
        assert_close(param.grad, 2 * kept_values[name], 1e-6, name)
    doubled = {n: g.copy() for n, g in grads_kept.items()}
    other, _ = batch(model, 4, seed=5)
    model.zero_grad()
    fresh = model(other)
    assert not np.shares_memory(fresh, logits)
    np.testing.assert_array_equal(logits, logits_kept)  # the next forward wrote elsewhere
    criterion(fresh, y)
    model.backward(criterion.backward())
    for name, param in model.named_parameters():  # a kept gradient is never a workspace
        np.testing.assert_array_equal(grads_kept[name], doubled[name])
        assert not np.shares_memory(param.grad, grads_kept[name])


@pytest.mark.parametrize("make_optimizer", [
    lambda params: optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda params: optim.Adam(params, lr=1e-3),
], ids=["sgd", "adam"])
def test_steps_with_an_optimizer_equal_the_module_path(make_optimizer, two_lanes):
    trained = {}
    for executor in (True, False):
        model = build("small-alexnet")
        optimizer = make_optimizer(model.parameters())
        for number in range(3):
            x, y = batch(model, 8, seed=number)
            step(model, x, y, executor=executor, seed=number)
            optimizer.step()
            optimizer.zero_grad()
        trained[executor] = model.state_dict()
    for name, value in trained[False].items():
        assert_close(trained[True][name], value, 1e-5, name)


def test_the_optimizers_flat_buffer_receives_the_gradients(two_lanes):
    model = build("lenet5")
    optimizer = optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(model, 4)
    step(model, x, y, executor=True)
    flat = optimizer._flat_groups()[0].grad
    assert all(np.shares_memory(p.grad, flat) for p in model.parameters())


def test_the_executor_is_chosen_only_where_it_applies(monkeypatch):
    model = build("lenet5")
    x, _ = batch(model, 3)
    assert cpu.executor_for(model, x) is not None
    assert cpu.executor_for(model, x[:0]) is None  # an empty batch: the module path
    assert cpu.executor_for(model, x.astype(np.float64)) is None
    model.cpu_executor = False
    assert cpu.executor_for(model, x) is None
    model.cpu_executor = True
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    assert cpu.executor_for(model, x) is None
    monkeypatch.delenv(cpu.ENV_SWITCH)
    unsupported = models.ConvNet(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU())),
                                 nn.Sequential(nn.Linear(2 * 26 * 26, 3)), (1, 28, 28))
    assert cpu.executor_for(unsupported, x) is None
    assert unsupported(x).shape == (3, 3)
    empty = model(x[:0])  # the module path's answer for an empty batch
    assert empty.shape == (0, 10) and model._executed_by is None


def test_the_checker_catches_a_wrong_col2im(monkeypatch):
    """A planted defect: col2im that drops the last kernel offset's contribution."""
    model = build("lenet5")
    x, y = batch(model, 4)
    reference = step(model, x, y, executor=False)
    real = executor_module.stage_types.conv_ops.col2im

    def dropping_one_offset(cols, g, rows, padded):
        real(cols, g, rows, padded)
        count = rows.stop - rows.start
        last = cols.reshape(g.c_in, g.kernel_h, g.kernel_w, count, g.out_w, g.batch)[:, -1, -1]
        top = rows.start * g.stride_h + (g.kernel_h - 1) * g.dilation_h
        left = (g.kernel_w - 1) * g.dilation_w
        padded[:, top:top + (count - 1) * g.stride_h + 1:g.stride_h,
               left:left + (g.out_w - 1) * g.stride_w + 1:g.stride_w] -= last

    monkeypatch.setattr(executor_module.stage_types.conv_ops, "col2im", dropping_one_offset)
    with pytest.raises(AssertionError, match="features.0"):
        assert_same_step(step(model, x, y, executor=True), reference, 2e-5)


def test_a_forked_child_runs_lanes_of_its_own(two_lanes):
    model = build("lenet5")
    x, y = batch(model, 4)
    expected = step(model, x, y, executor=True)[0]  # the parent's worker thread now exists
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if its step ends (within a minute) and matches
        ok = False
        try:
            signal.alarm(60)  # a child waiting on the parent's threads would hang: it dies instead
            ok = np.array_equal(step(model, x, y, executor=True)[0], expected)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_second_lane_runs_in_a_helper_process(own_helper):
    model = build("lenet5")
    x, y = batch(model, 6)
    ours = step(model, x, y, executor=True)
    lanes = model._executed_by._last[0]
    assert isinstance(lanes[1], lane_process.ProcessLane) and lanes[1].rows == slice(3, 6)
    helper = lane_process.LaneProcess._current
    assert helper.process.pid != os.getpid() and helper.process.poll() is None
    assert "helper process" in model._executed_by.describe(6)
    assert_same_step(ours, step(model, x, y, executor=False), 2e-5)


@pytest.mark.parametrize("when", ["before forward", "between forward and backward"])
def test_a_lost_helper_process_is_replaced_by_a_thread(when, own_helper):
    """The helper killed: that step's lane runs again here (a warning says so), later ones on a thread."""
    model = build("small-alexnet")
    x, y = batch(model, 8)
    reference = step(model, x, y, executor=False)
    step(model, x, y, executor=True)  # the helper now holds this model's replica

    def kill():
        helper = lane_process.LaneProcess._current
        helper.process.kill()
        helper.process.wait()

    model.zero_grad()
    manual_seed(11)
    criterion = nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning, match="helper process"):
        if when == "before forward":
            kill()
        logits = model(x)
        if when != "before forward":
            kill()
        criterion(logits, y)
        grad_input = model.backward(criterion.backward())
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    assert_same_step((logits, grad_input, grads), reference, 2e-5)
    assert lane_process.LaneProcess.get() is None  # not restarted: this process uses threads now
    assert_same_step(step(model, x, y, executor=True), reference, 2e-5)
    assert type(model._executed_by._last[0][1]) is executor_module.Lane
    assert "second thread" in model._executed_by.describe(8)


def test_the_lane_switch(monkeypatch):
    monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    model = build("lenet5")
    x, y = batch(model, 4)
    monkeypatch.setenv(lane_process.LANES_SWITCH, "one")
    ours = step(model, x, y, executor=True)
    assert len(model._executed_by._last[0]) == 1
    assert_same_step(ours, step(model, x, y, executor=False), 2e-5)
    monkeypatch.setenv(lane_process.LANES_SWITCH, "many")
    model.cpu_executor = True
    with pytest.raises(ValueError, match="GPUCONV_CPU_LANES must be one of process, thread, one, got 'many'"):
        model(x)


class _SequentialOfThisFile(nn.Sequential):
    """A container the helper process cannot import (this test file is not on its path)."""


def test_a_model_the_helper_cannot_build_runs_its_lanes_on_threads(own_helper):
    model = build("lenet5")
    model.features = _SequentialOfThisFile(*model.features)
    x, y = batch(model, 6)
    with pytest.warns(RuntimeWarning, match="helper process raised"):
        ours = step(model, x, y, executor=True)
    assert type(model._executed_by._last[0][1]) is executor_module.Lane
    assert_same_step(ours, step(model, x, y, executor=False), 2e-5)
    other = build("lenet5")  # the helper serves on
    step(other, x, y, executor=True)
    assert isinstance(other._executed_by._last[0][1], lane_process.ProcessLane)


def test_a_model_that_cannot_be_pickled_runs_its_lanes_on_threads(own_helper):
    model = build("lenet5")
    model.features[0].lock = threading.Lock()
    x, y = batch(model, 6)
    with pytest.warns(RuntimeWarning, match="cannot be sent to the helper process"):
        ours = step(model, x, y, executor=True)
    assert type(model._executed_by._last[0][1]) is executor_module.Lane
    assert_same_step(ours, step(model, x, y, executor=False), 2e-5)


def test_an_interrupted_step_leaves_no_reply_for_the_next(own_helper, monkeypatch):
    """Ctrl-C while the parent waits for the helper: the helper is given up (its reply would be
    read as the next request's), the step raises, and the next steps are right, on a thread."""
    model = build("lenet5")
    x, y = batch(model, 6)
    reference = step(model, x, y, executor=False)
    step(model, x, y, executor=True)
    real = lane_process.wait_for_message
    calls = []

    def interrupted(connection):
        calls.append(connection)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(connection)

    monkeypatch.setattr(lane_process, "wait_for_message", interrupted)
    with pytest.raises(KeyboardInterrupt):
        step(model, x, y, executor=True)
    ours = step(model, x, y, executor=True)
    assert_same_step(ours, reference, 2e-5)
    assert lane_process.LaneProcess.get() is None
    assert type(model._executed_by._last[0][1]) is executor_module.Lane

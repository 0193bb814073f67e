"""CUDA graphs on the emulated device: replays equal eager steps, and the capture rules hold."""
from __future__ import annotations

import numpy as np
import pytest

import gpuconv
from gpuconv import graphs, nn, optim
from gpuconv.device import to_device, to_numpy
from gpuconv.random import manual_seed

STEPS = 4


def _setup(make_optimizer):
    manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3),
                          nn.Linear(18, 8), nn.ReLU(), nn.Linear(8, 4)).to("emu")
    model.requires_input_grad = False
    optimizer = make_optimizer(model.parameters())
    return model, nn.CrossEntropyLoss(validate_target=False), optimizer, optim.StepLR(optimizer, 2, 0.5)


def _step(model, criterion, optimizer):
    def step(x, y):
        logits = model(x)
        loss = criterion(logits, y)
        model.backward(criterion.backward())
        optimizer.step()
        optimizer.zero_grad()
        return loss, logits
    return step


def _batches(seed=7):
    rng = np.random.default_rng(seed)
    return [(to_device(rng.standard_normal((3, 1, 8, 8)).astype(np.float32), "emu"),
             to_device(rng.integers(0, 4, 3).astype(np.int32), "emu")) for _ in range(STEPS)]


OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: optim.Adam(p, lr=0.01, weight_decay=1e-3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_replays_equal_eager_steps_with_dropout_and_a_schedule(name):
    batches = _batches()
    model, criterion, optimizer, schedule = _setup(OPTIMIZERS[name])
    step = _step(model, criterion, optimizer)
    eager = []
    for x, y in batches:
        loss, logits = step(x, y)
        eager.append((to_numpy(loss), to_numpy(logits)))
        schedule.step()
    eager_params = [to_numpy(p.data) for p in model.parameters()]

    model, criterion, optimizer, schedule = _setup(OPTIMIZERS[name])
    graphed = graphs.GraphedStep(_step(model, criterion, optimizer), *batches[0])
    captured = [tuple(map(to_numpy, graphed.warmup_result))]
    schedule.step()
    for x, y in batches[1:]:
        captured.append(tuple(map(to_numpy, graphed(x, y))))
        schedule.step()
    for index, ((loss, logits), (graph_loss, graph_logits)) in enumerate(zip(eager, captured)):
        np.testing.assert_array_equal(graph_loss, loss, err_msg=f"step {index}")
        np.testing.assert_array_equal(graph_logits, logits, err_msg=f"step {index}")
    for expected, param in zip(eager_params, model.parameters()):
        np.testing.assert_array_equal(to_numpy(param.data), expected)
    # the schedule really changed the learning rate under the replays, and the losses differ
    assert optimizer.lr < OPTIMIZERS[name]([nn.Parameter(np.zeros(1, np.float32))]).lr
    assert len({float(loss) for loss, _ in eager}) == STEPS


def test_capture_records_and_runs_nothing():
    model, criterion, optimizer, _ = _setup(OPTIMIZERS["sgd"])
    x, y = _batches()[0]
    step = _step(model, criterion, optimizer)
    step(x, y)
    before = [to_numpy(p.data) for p in model.parameters()]
    g = gpuconv.CUDAGraph()
    with gpuconv.profile() as prof, gpuconv.graph(g):
        loss, _ = step(x, y)
    assert not prof.launches and g.num_operations > 10
    for param, value in zip(model.parameters(), before):
        np.testing.assert_array_equal(to_numpy(param.data), value)
    with gpuconv.profile() as prof:
        g.replay()
    assert len(prof.launches) == g.num_operations + 1  # and the learning rate's copy: nothing else
    assert np.isfinite(to_numpy(loss))


@pytest.mark.parametrize("what, body, message", [
    ("an allocation", lambda x: gpuconv.device.empty((4,), np.float32, "emu"), "device allocation"),
    ("a host copy in", lambda x: to_device(np.zeros(3, np.float32), "emu"), "a copy to 'emu'"),
    ("a sync", lambda x: float(x.sum()), "NumPy's reduction|reading"),
    ("a sync", lambda x: to_numpy(x), "a copy to the host"),
    ("a NumPy operation", lambda x: x * 2, "NumPy's multiply"),
    ("a copy", lambda x: x.copy(), "a copy of an emu array"),
])
def test_a_capture_that_allocates_or_syncs_raises(what, body, message):
    x = to_device(np.ones(3, np.float32), "emu")
    with pytest.raises(graphs.GraphCaptureError, match=message):
        with gpuconv.graph(gpuconv.CUDAGraph()):
            body(x)
    assert graphs.capturing() is None  # a failed capture leaves no capture behind
    x * 2  # and host operations work again


def test_an_optimizer_captured_before_its_first_step_is_refused():
    model, criterion, optimizer, _ = _setup(OPTIMIZERS["adam"])
    x, y = _batches()[0]
    with pytest.raises(graphs.GraphCaptureError, match="outside any layer.*run one eager step first"):
        with gpuconv.graph(gpuconv.CUDAGraph()):
            _step(model, criterion, optimizer)(x, y)


def test_bad_input_to_a_captured_step_is_a_clear_error():
    model, criterion, optimizer, _ = _setup(OPTIMIZERS["sgd"])
    x, y = _batches()[0]
    graphed = graphs.GraphedStep(_step(model, criterion, optimizer), x, y)
    with pytest.raises(ValueError, match=r"argument 0 .* \(2, 1, 8, 8\) on 'emu', but the graph was captured for "
                                         r"float32 \(3, 1, 8, 8\)"):
        graphed(x[:2], y[:2])
    with pytest.raises(ValueError, match=r"argument 1 .* on 'cpu'"):
        graphed(x, to_numpy(y))
    with pytest.raises(ValueError, match="takes 2 arguments, got 1"):
        graphed(x)


def test_replay_before_capture_and_nested_capture_are_errors():
    with pytest.raises(graphs.GraphCaptureError, match="replay\\(\\) before a capture"):
        gpuconv.CUDAGraph().replay()
    with pytest.raises(graphs.GraphCaptureError, match="do not nest"):
        with gpuconv.graph(gpuconv.CUDAGraph()), gpuconv.graph(gpuconv.CUDAGraph()):
            pass


def test_training_with_graphs_gives_the_eager_losses(tmp_path, monkeypatch):
    """`gpuconv train --graph` on 'emu': captured once, replayed, a last partial batch eager."""
    # (one epoch: every LeNet-5 launch on the emulated device costs tens of milliseconds)
    from gpuconv import data, train
    from test_train import quiet, write_synthetic_dataset

    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    root = write_synthetic_dataset(tmp_path / "synthetic", n_train=20, n_test=4)
    histories = {}
    for graph in (False, True):
        config = train.TrainConfig(model="lenet5", dataset="fashion-mnist", data_dir=str(root), device="emu",
                                   epochs=1, batch_size=8, optimizer="adam", lr=3e-3,
                                   out=str(tmp_path / f"run-{graph}"), progress=False, graph=graph)
        trainer = train.Trainer(config, log=quiet)
        # batches of 8, 8 and 4: the first eager and captured, the second replayed, the last eager
        histories[graph] = trainer.train_epoch(1)[:2]
        assert (trainer._graphed is not None) == graph
    assert histories[True] == histories[False]

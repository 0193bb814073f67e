"""The host path alone: what a training step costs the CPU before any kernel runs.

The case ``lenet5/train/host_step`` is one LeNet-5 training step at batch 256 (forward, loss,
backward, SGD with momentum) on the emulated device under :func:`gpuconv.emu.dry_run`: every
launch is checked as on a GPU (argument types, launch limits, shared memory) but no kernel body
and no library call runs, so the time is the Python and launch overhead a GPU step pays on the
host, measurable on any machine. Its rows:

* ``gpuconv emu host (dry run)``: the eager step;
* ``gpuconv emu graph replay (dry run)``: the same step captured once as a CUDA graph and
  replayed (what is left: the host updates of the per-step values, and the replay call);
* ``torch cpu batch 1``, the reference of the ratio column for this case: PyTorch's CPU training
  step at batch 1, whose time is almost all dispatch, the floor PyTorch eager pays per step on a
  GPU too. Targets: the eager host step at most 0.5x of it, the replay at most 0.05x (``vs
  torch`` at least 2 and 20).

Each gpuconv row also reports, in its ``extra``, the device operations one step issues (kernel
launches and library calls, counted by :func:`gpuconv.profile`) and which.

On a shared machine the rows, measured one after the other, see different loads; ``python -m
gpuconv.bench.host`` alternates the eager step and PyTorch's in one process instead
(:func:`alternating_ratio`) and prints each round's medians and ratio.
"""
from __future__ import annotations

import contextlib
import dataclasses

from .cases import Case, TrainStep, model_layers
from .contenders import HOST_OP, HOST_REFERENCE, Contender
from .training import torch_train
from .workloads import Workload

HOST_BATCH = 256
DISPATCH_BATCH = 1  # PyTorch's reference step: at batch 1 its time is its dispatch


def host_cases(models) -> list[Case]:
    """The host-path case of LeNet-5, when LeNet-5 is in the run."""
    if "lenet5" not in models:
        return []
    return [Case("lenet5", "train", HOST_OP, TrainStep(HOST_BATCH, "lenet5", model_layers("lenet5")[2]))]


def training_step(model, optimizer, criterion):
    """``step(x, y) -> loss``: forward, loss, backward, the optimizer's step and ``zero_grad``."""
    def step(x, y):
        loss = criterion(model(x), y)
        model.backward(criterion.backward())
        optimizer.step()
        optimizer.zero_grad()
        return loss
    return step


def _lenet_step(batch: int, rng):
    """A LeNet-5 training step on 'emu' and one input set for it."""
    import numpy as np

    from .. import models, nn, optim
    from ..device import to_device

    model = models.lenet5().to("emu")
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = training_step(model, optimizer, nn.CrossEntropyLoss(validate_target=False))
    x = to_device(rng.standard_normal((batch, *model.input_shape), dtype=np.float32), "emu")
    y = to_device(rng.integers(0, 10, batch, dtype=np.int32), "emu")
    return step, (x, y)


def device_operations(step, inputs) -> dict:
    """The device operations one steady-state call of ``step(*inputs)`` issues (after a first
    call, which also makes the optimizer's state): their count and a tally."""
    from .. import emu, profile

    with emu.dry_run():
        step(*inputs)
        with profile() as prof:
            step(*inputs)
    counts = prof.counts()
    return {"device_ops": len(prof.launches),
            "ops": ", ".join(f"{name} x{n}" if n > 1 else name for name, n in sorted(counts.items()))}


class EmuHost(Contender):
    """gpuconv's LeNet-5 step on 'emu' under a dry run: eager, or replayed as a captured graph."""

    device = "cpu"  # the emulated device's host work runs on the CPU and is timed by its clock
    family = "gpuconv"

    def __init__(self, graph: bool):
        self.graph = graph
        self.name = "gpuconv emu graph replay (dry run)" if graph else "gpuconv emu host (dry run)"

    def applies(self, case):
        return case.op == HOST_OP

    def workload(self, case, rng):
        from .. import emu, graphs

        step, inputs = _lenet_step(case.spec.batch, rng)
        extra = device_operations(step, inputs)
        if self.graph:
            with emu.dry_run():
                step = graphs.GraphedStep(step, *inputs)
            extra = {"replay_ops": step.graph.num_operations}

        def run(*arrays):
            with emu.dry_run():
                step(*arrays)

        return Workload(lambda: inputs, run, "host time only: no kernel body runs", extra)


class TorchDispatch(Contender):
    """PyTorch's CPU training step of LeNet-5 at batch 1: the per-step dispatch floor."""

    device = "cpu"
    family = "torch"
    name = HOST_REFERENCE

    def available(self):
        try:
            import torch  # noqa: F401
        except ImportError:
            return False, "PyTorch is not installed"
        return True, ""

    def applies(self, case):
        return case.op == HOST_OP

    @contextlib.contextmanager
    def selected_for(self, case):
        # One intra-op thread: at batch 1 there is no work to share, and on a busy machine a
        # second thread's spin-waits make the dispatch floor look tens of times higher.
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def workload(self, case, rng):
        import torch

        torch.manual_seed(int(rng.integers(2**31)))
        small = dataclasses.replace(case, spec=dataclasses.replace(case.spec, batch=DISPATCH_BATCH))
        work = torch_train(small, torch, "cpu", rng)
        return work._replace(note=f"batch {DISPATCH_BATCH}, one thread: PyTorch's dispatch cost per step")


def host_contenders() -> list[Contender]:
    return [EmuHost(graph=False), EmuHost(graph=True), TorchDispatch()]


def alternating_ratio(rounds: int = 9, calls: int = 50, seed: int = 0) -> dict:
    """The eager dry-run step and PyTorch's batch-1 step timed in alternation, ``rounds`` rounds of
    ``calls`` calls each (after a warm-up), in one process: per round, each one's median (seconds)
    and their ratio, so that both see the same load."""
    import time

    import numpy as np

    case = host_cases(["lenet5"])[0]
    rng = np.random.default_rng(seed)
    ours, reference = EmuHost(graph=False), TorchDispatch()
    work = [ours.workload(case, rng), reference.workload(case, rng)]
    inputs = [w.make() for w in work]

    def median_time(w, args):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            w.run(*args)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    with reference.selected_for(case):
        for _ in range(10):
            for w, args in zip(work, inputs):
                w.run(*args)
        medians = [[median_time(w, args) for w, args in zip(work, inputs)] for _ in range(rounds)]
    return {"gpuconv": [m[0] for m in medians], "torch": [m[1] for m in medians],
            "ratio": [m[0] / m[1] for m in medians], "device_ops": work[0].extra["device_ops"]}


if __name__ == "__main__":
    import statistics

    result = alternating_ratio()
    for name in ("gpuconv", "torch"):
        print(f"{name:8} " + " ".join(f"{t * 1e6:5.0f}" for t in result[name]) + " us")
    ratios = result["ratio"]
    print("ratio    " + " ".join(f"{r:5.2f}" for r in ratios))
    print(f"median ratio {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); "
          f"{result['device_ops']} device operations per step")

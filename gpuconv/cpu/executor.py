"""The model executor: a ConvNet's forward and backward on 'cpu' in the batch-innermost layout.

The input is converted NCHW -> (C, H, W, N) once (straight into the first convolution's padded
buffer), every stage runs in that layout, and only the logits (and an input gradient, if one is
asked for) go back to batch-major. Small models split the batch into two lanes, each a Python
thread with its own workspaces and OpenBLAS on one thread; their parameter gradients are added
at the end. Large models run one lane and let BLAS keep its threads.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from . import stages as stage_types
from . import threads
from .stages import Unsupported, Workspace

__all__ = ["ModelExecutor", "executor_for", "enabled", "ENV_SWITCH"]

ENV_SWITCH = "GPUCONV_CPU_EXECUTOR"

# Batch split into lanes only for models with at most this many parameters: each lane reads every
# weight and writes a whole weight gradient that the lanes then add, which for AlexNet's 58M
# classifier weights costs more than the second thread gains.
SPLIT_MAX_PARAMETERS = 4_000_000
# Workspace sets kept per lane: the training batch and the last, partial one of an epoch (or an
# evaluation batch) each keep theirs instead of reallocating every step.
_KEPT_BATCH_SIZES = 2


def enabled(model) -> bool:
    """Whether ``model`` may run on the executor: not when its ``cpu_executor`` attribute is
    False, nor when the environment variable ``GPUCONV_CPU_EXECUTOR`` is ``0``."""
    return bool(getattr(model, "cpu_executor", True)) and os.environ.get(ENV_SWITCH, "1").strip() != "0"


def _runs_here(array) -> bool:
    return type(array) is np.ndarray and array.dtype == np.float32


def executor_for(model, x):
    """The executor that runs ``model`` on ``x``, or None where the module path does: the executor
    off, an input or a parameter not a float32 NumPy array ('emu', 'cuda', float64), an empty
    batch, a layer it does not run."""
    if not (enabled(model) and _runs_here(x) and x.ndim == 4 and x.shape[0] > 0):
        return None
    if not all(_runs_here(p.data) for p in model.parameters()):
        return None
    layers = (*model.features, model.flatten, *model.classifier)
    cached = model.__dict__.get("_cpu_executor_plan")
    if cached is not None and cached[0] == layers:
        return cached[1]
    try:
        executor = ModelExecutor(model)
    except Unsupported:
        executor = None
    object.__setattr__(model, "_cpu_executor_plan", (layers, executor))
    return executor


class _Lane:
    """A run of the batch (``rows``) and the workspaces it runs in: one per stage, one of its own."""

    def __init__(self, index: int, rows: slice, stage_count: int):
        self.index, self.rows = index, rows
        self.workspaces = [Workspace() for _ in range(stage_count)]
        self.own = Workspace()
        self.grad_target = None  # this lane's array for a parameter's gradient (set per backward)


class ModelExecutor:
    """Runs a ConvNet's ``forward`` and ``backward`` on its stages (see :mod:`gpuconv.cpu`)."""

    def __init__(self, model):
        self.model = model
        self.stages = stage_types.build(model.features, model.flatten, model.classifier)
        shape = model.input_shape + (1,)
        for stage in self.stages:  # every size fits (an Unsupported or a ValueError here, not mid-step)
            shape = stage.output_shape(shape)
        self.parameters = [p for stage in self.stages for p in stage.parameters() if p is not None]
        self.split = sum(p.numel() for p in self.parameters) <= SPLIT_MAX_PARAMETERS
        self._lanes: OrderedDict = OrderedDict()  # (lane count, batch) -> lanes
        self._gradients = Workspace()  # lane 0's gradients where a parameter accumulates into its .grad
        self._last = None  # the lanes of the last forward: what backward runs on

    def _lane_count(self, batch: int) -> int:
        if not self.split or batch < 2:
            return 1
        return min(2, threads.blas_threads())

    def _lanes_for(self, batch: int) -> list[_Lane]:
        count = self._lane_count(batch)
        key = (count, batch)
        lanes = self._lanes.pop(key, None)
        if lanes is None:
            bounds = [batch * i // count for i in range(count + 1)]
            lanes = [_Lane(i, slice(a, b), len(self.stages)) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        self._lanes[key] = lanes
        while len(self._lanes) > _KEPT_BATCH_SIZES:
            self._lanes.popitem(last=False)
        return lanes

    def _run(self, work, lanes) -> None:
        def quietly(lane):
            with np.errstate(all="ignore"):  # NaN and inf pass silently, as through the module path
                work(lane)

        if len(lanes) == 1:
            quietly(lanes[0])
            return
        with threads.single_threaded_blas():
            threads.run_each(quietly, lanes)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x) -> np.ndarray:
        """The logits (N, classes) of an NCHW float32 batch: a fresh array."""
        batch = x.shape[0]
        lanes = self._lanes_for(batch)
        shape = tuple(x.shape)
        for stage in self.stages:
            stage.start_step(shape, x.dtype, self.model.training)
            shape = self._batch_major_shape(stage, shape)
        logits = np.empty(shape, x.dtype)

        def forward_lane(lane):
            y = x[lane.rows].transpose(1, 2, 3, 0)  # (C, H, W, n), converted by the first stage's copy
            if not self.stages[0].takes_strided_input:
                buffer = lane.own.array("input", y.shape, y.dtype)
                np.copyto(buffer, y)
                y = buffer
            for stage, ws in zip(self.stages, lane.workspaces):
                y = stage.forward(ws, y, lane.rows)
            logits[lane.rows] = y.T

        self._run(forward_lane, lanes)
        self._last = (lanes, tuple(x.shape))
        self._logits_shape = logits.shape
        return logits

    @staticmethod
    def _batch_major_shape(stage, shape):
        """The batch-major shape of ``stage``'s output for a batch-major input ``shape`` (what the
        module path would see: a dropout's mask is drawn in it)."""
        moved = stage.output_shape((*shape[1:], shape[0]))
        return (moved[-1], *moved[:-1])

    # -- backward -----------------------------------------------------------------------------

    def backward(self, grad_output, requires_input_grad: bool):
        """Gradients of the last forward: each trainable parameter's accumulated into its
        ``grad`` as the module path does; returns the NCHW input gradient, or None when
        ``requires_input_grad`` is False."""
        if self._last is None:
            raise RuntimeError(f"{type(self.model).__name__}.backward() called before forward()")
        lanes, input_shape = self._last
        if tuple(grad_output.shape) != self._logits_shape:
            raise ValueError(f"grad_output must have the logits' shape {self._logits_shape} (the last forward's "
                             f"input was {input_shape}), got {tuple(grad_output.shape)}")
        trains = [stage.trains() for stage in self.stages]
        needs = [requires_input_grad or any(trains[:i]) for i in range(len(self.stages))]
        targets = self._gradient_targets(lanes)
        grad_input = np.empty(input_shape, grad_output.dtype) if requires_input_grad else None

        def backward_lane(lane):
            rows = grad_output[lane.rows].T
            grad = lane.own.array("grad", rows.shape, rows.dtype)
            np.copyto(grad, rows)
            for i in reversed(range(len(self.stages))):
                if not (needs[i] or trains[i]):
                    return
                grad = self.stages[i].backward(lane.workspaces[i], grad, needs[i], lane.grad_target)
                if not needs[i]:
                    return
            grad_input[lane.rows] = grad.transpose(3, 0, 1, 2)

        self._run(backward_lane, lanes)
        for param, target in targets.items():
            for lane in lanes[1:]:
                target += lane.grad_target(param)
            param.accumulate_grad(target)
        return grad_input

    def _gradient_targets(self, lanes) -> dict:
        """``{parameter: array}`` for every trainable parameter: where lane 0 writes its gradient
        and the other lanes' are added, then handed to ``accumulate_grad``: the optimizer's slot
        (``grad_destination``), a fresh array for a first gradient, or a workspace when the
        gradient is added to one the parameter already holds."""
        targets = {}
        for index, param in enumerate(self.parameters):
            if not param.requires_grad:
                continue
            target = param.grad_destination()
            if target is None:
                if param.grad is None:
                    target = np.empty(param.shape, param.dtype)
                else:
                    target = self._gradients.array(str(index), param.shape, param.dtype)
            targets[param] = target
        lane_arrays = {id(p): i for i, p in enumerate(self.parameters)}
        for lane in lanes:
            if lane.index == 0:
                lane.grad_target = lambda p, targets=targets: targets.get(p)
            else:
                lane.grad_target = (lambda p, lane=lane: None if p not in targets else
                                    lane.own.array(f"grad {lane_arrays[id(p)]}", p.shape, p.dtype))
        return targets

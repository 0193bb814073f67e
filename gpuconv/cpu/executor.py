"""The model executor: a ConvNet's forward and backward on 'cpu' in the batch-innermost layout.

The input is converted NCHW -> (C, H, W, N) once (straight into the first convolution's padded
buffer), every stage runs in that layout, and only the logits (and an input gradient, if one is
asked for) go back to batch-major. The batch is split into two lanes, each a Python thread with
its own workspaces and OpenBLAS on one thread (NumPy releases the GIL in its loops and BLAS
calls); the lanes' parameter gradients are added at the end. A large model runs only its
features in the lanes and its classifier once on the whole batch, with BLAS's threads.
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

# The classifier runs in the lanes too only for models with at most this many parameters: each
# lane reads every weight and writes a whole weight gradient that the lanes then add, which for
# AlexNet's 58M classifier weights costs more than the second thread gains.
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
        self.grad_target = None  # (parameter) -> this lane's array for its gradient (set per backward)
        self.written = {}  # parameter -> the gradient this lane wrote for it in the last backward


class ModelExecutor:
    """Runs a ConvNet's ``forward`` and ``backward`` on its stages (see :mod:`gpuconv.cpu`).

    With two or more BLAS threads and a batch of two or more, the batch is split into two lanes,
    each on its own thread with BLAS single-threaded. A small model runs every stage in the
    lanes; a large one only the features (and the flatten): the lanes' features are joined into
    one (F, N) array and the classifier runs once on the whole batch with BLAS's threads, so its
    large weights are read once and their gradients not added across lanes.
    """

    def __init__(self, model):
        self.model = model
        self.stages = stage_types.build(model.features, model.flatten, model.classifier)
        shape = model.input_shape + (1,)
        for stage in self.stages:  # every size fits (an Unsupported or a ValueError here, not mid-step)
            shape = stage.output_shape(shape)
        self.parameters = [p for stage in self.stages for p in stage.parameters() if p is not None]
        small = sum(p.numel() for p in self.parameters) <= SPLIT_MAX_PARAMETERS
        flatten = next(i for i, stage in enumerate(self.stages) if isinstance(stage, stage_types.FlattenStage))
        # How many leading stages run in lanes when there are several.
        self.lane_stages = len(self.stages) if small else flatten + 1
        self._plans: OrderedDict = OrderedDict()  # (lane count, batch) -> (lanes, whole-batch lane or None)
        self._gradients = Workspace()  # lane 0's gradients where a parameter accumulates into its .grad
        self._last = None  # the plan of the last forward and its input shape: what backward runs on

    def _plan(self, batch: int):
        """``(lanes, whole)``: the lanes of the batch and, when only the leading ``lane_stages``
        run in them, the lane of the whole batch that runs the rest (else None)."""
        count = 1 if batch < 2 else min(2, threads.blas_threads())
        key = (count, batch)
        plan = self._plans.pop(key, None)
        if plan is None:
            bounds = [batch * i // count for i in range(count + 1)]
            lanes = [_Lane(i, slice(a, b), len(self.stages)) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
            whole = None
            if count > 1 and self.lane_stages < len(self.stages):
                whole = _Lane(0, slice(0, batch), len(self.stages))
            plan = lanes, whole
        self._plans[key] = plan
        while len(self._plans) > _KEPT_BATCH_SIZES:
            self._plans.popitem(last=False)
        return plan

    def describe(self, batch: int) -> str:
        """How a batch of ``batch`` runs: lanes, what runs in them, BLAS threads."""
        lanes, whole = self._plan(batch)
        if len(lanes) == 1:
            return f"one lane, BLAS on {threads.blas_threads()} threads"
        if whole is None:
            return f"{len(lanes)} lanes of the whole model, BLAS on 1 thread each"
        return (f"{len(lanes)} lanes of the features (BLAS on 1 thread each), the classifier on the whole batch "
                f"(BLAS on {threads.blas_threads()} threads)")

    def _in_lanes(self, whole) -> range:
        return range(self.lane_stages if whole is not None else len(self.stages))

    @staticmethod
    def _run(work, lanes) -> None:
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
        lanes, whole = self._plan(batch)
        in_lanes = self._in_lanes(whole)
        shapes = [tuple(x.shape)]  # batch-major, as the module path sees them (a dropout mask is drawn in it)
        for stage in self.stages:
            stage.start_step(shapes[-1], x.dtype, self.model.training)
            shapes.append(self._batch_major_shape(stage, shapes[-1]))
        logits = np.empty(shapes[-1], x.dtype)
        joined = None if whole is None else whole.own.array("joined", shapes[len(in_lanes)][::-1], x.dtype)

        def forward_lane(lane):
            y = x[lane.rows].transpose(1, 2, 3, 0)  # (C, H, W, n), converted by the first stage's copy
            if not self.stages[0].takes_strided_input:
                buffer = lane.own.array("input", y.shape, y.dtype)
                np.copyto(buffer, y)
                y = buffer
            for i in in_lanes:
                y = self.stages[i].forward(lane.workspaces[i], y, lane.rows)
            if joined is None:
                logits[lane.rows] = y.T
            else:
                joined[:, lane.rows] = y

        self._run(forward_lane, lanes)
        if whole is not None:
            def forward_whole(lane):
                y = joined
                for i in range(len(in_lanes), len(self.stages)):
                    y = self.stages[i].forward(lane.workspaces[i], y, lane.rows)
                logits[...] = y.T

            self._run(forward_whole, [whole])
        self._last = (lanes, whole, tuple(x.shape), logits.shape)
        return logits

    @staticmethod
    def _batch_major_shape(stage, shape):
        """The batch-major shape of ``stage``'s output for a batch-major input ``shape``."""
        moved = stage.output_shape((*shape[1:], shape[0]))
        return (moved[-1], *moved[:-1])

    # -- backward -----------------------------------------------------------------------------

    def backward(self, grad_output, requires_input_grad: bool):
        """Gradients of the last forward: each trainable parameter's accumulated into its
        ``grad`` as the module path does; returns the NCHW input gradient, or None when
        ``requires_input_grad`` is False."""
        if self._last is None:
            raise RuntimeError(f"{type(self.model).__name__}.backward() called before forward()")
        lanes, whole, input_shape, logits_shape = self._last
        if tuple(grad_output.shape) != logits_shape:
            raise ValueError(f"grad_output must have the logits' shape {logits_shape} (the last forward's "
                             f"input was {input_shape}), got {tuple(grad_output.shape)}")
        trains = [stage.trains() for stage in self.stages]
        needs = [requires_input_grad or any(trains[:i]) for i in range(len(self.stages))]
        targets = self._gradient_targets(lanes, whole)
        grad_input = np.empty(input_shape, grad_output.dtype) if requires_input_grad else None
        in_lanes = self._in_lanes(whole)

        def walk(lane, grad, indices):
            """Backward through the stages ``indices`` (in reverse); None once nothing before needs more."""
            for i in reversed(indices):
                if not (needs[i] or trains[i]):
                    return None
                grad = self.stages[i].backward(lane.workspaces[i], grad, needs[i], lane.grad_target)
                if not needs[i]:
                    return None
            return grad

        def start(lane, rows):
            grad = lane.own.array("grad", rows.shape, rows.dtype)
            np.copyto(grad, rows)
            return grad

        top = None
        if whole is not None:
            def backward_whole(lane):
                nonlocal top
                top = walk(lane, start(lane, grad_output.T), range(len(in_lanes), len(self.stages)))

            self._run(backward_whole, [whole])

        def backward_lane(lane):
            grad = start(lane, grad_output[lane.rows].T if whole is None else top[:, lane.rows])
            grad = walk(lane, grad, in_lanes)
            if grad is not None:
                grad_input[lane.rows] = grad.transpose(3, 0, 1, 2)

        if whole is None or top is not None:
            self._run(backward_lane, lanes)
        for lane in lanes[1:]:
            for param, gradient in lane.written.items():
                targets[param] += gradient
        for param, target in targets.items():
            param.accumulate_grad(target)
        return grad_input

    def _gradient_targets(self, lanes, whole) -> dict:
        """``{parameter: array}`` for every trainable parameter: where lane 0 (and the whole-batch
        lane) writes its gradient and the other lanes' are added, then handed to
        ``accumulate_grad``: the optimizer's slot (``grad_destination``), a fresh array for a first
        gradient, or a workspace when the gradient is added to one the parameter already holds."""
        targets, names = {}, {}
        for index, param in enumerate(self.parameters):
            names[param] = str(index)
            if not param.requires_grad:
                continue
            target = param.grad_destination()
            if target is None:
                if param.grad is None:
                    target = np.empty(param.shape, param.dtype)
                else:
                    target = self._gradients.array(str(index), param.shape, param.dtype)
            targets[param] = target
        for lane in lanes + ([whole] if whole is not None else []):
            lane.written = {}
            if lane.index == 0:
                lane.grad_target = targets.get
            else:
                def own_target(param, lane=lane):
                    if param not in targets:
                        return None
                    gradient = lane.own.array(f"grad {names[param]}", param.shape, param.dtype)
                    lane.written[param] = gradient
                    return gradient

                lane.grad_target = own_target
        return targets

"""The model executor: a ConvNet's forward and backward on 'cpu' in the batch-innermost layout.

The input is converted NCHW -> (C, H, W, N) once (straight into the first convolution's padded
buffer), every stage runs in that layout, and only the logits (and an input gradient, if one is
asked for) go back to batch-major. The batch is split into two lanes, each with its own
workspaces and OpenBLAS on one thread: the first runs in this process, the second in a helper
process (:mod:`.lane_process`; on a thread of this one where the helper cannot run, or with
``GPUCONV_CPU_LANES=thread``); the lanes' parameter gradients are added at the end. A large model
runs only its features in the lanes and its classifier once on the whole batch, with BLAS's threads.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict

import numpy as np

from . import lane_process
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


class Lane:
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
        self._parameter_index = {p: i for i, p in enumerate(self.parameters)}
        small = sum(p.numel() for p in self.parameters) <= SPLIT_MAX_PARAMETERS
        flatten = next(i for i, stage in enumerate(self.stages) if isinstance(stage, stage_types.FlattenStage))
        # How many leading stages run in lanes when there are several.
        self.lane_stages = len(self.stages) if small else flatten + 1
        self._plans: OrderedDict = OrderedDict()  # (lane count, batch, lane mode, dtype) -> (lanes, whole lane or None)
        self._gradients = Workspace()  # lane 0's gradients where a parameter accumulates into its .grad
        self._last = None  # the plan of the last forward and its input shape: what backward runs on
        self._replica = None  # (helper process, the replica of this model there), once a lane runs there
        self._helper_failed = False  # the helper could not run this model's lanes: threads from then on

    def _plan(self, batch: int, dtype=np.dtype(np.float32)):
        """``(lanes, whole)``: the lanes of the batch and, when only the leading ``lane_stages``
        run in them, the lane of the whole batch that runs the rest (else None)."""
        mode = lane_process.lane_mode()
        count = 1 if batch < 2 or mode == "one" else min(2, threads.blas_threads())
        key = (count, batch, mode, np.dtype(dtype))
        plan = self._plans.pop(key, None)
        if plan is not None and not all(getattr(lane, "usable", True) for lane in plan[0]):
            plan = None  # its helper process is gone (or belongs to the process this was forked from)
        if plan is None:
            plan = self._new_plan(count, batch, mode, np.dtype(dtype))
        self._plans[key] = plan
        while len(self._plans) > _KEPT_BATCH_SIZES:
            self._plans.popitem(last=False)
        return plan

    def _new_plan(self, count: int, batch: int, mode: str, dtype):
        bounds = [batch * i // count for i in range(count + 1)]
        rows = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        lanes = [Lane(0, rows[0], len(self.stages))]
        for index, lane_rows in enumerate(rows[1:], 1):
            remote = self._process_lane(index, lane_rows, dtype) if mode == "process" else None
            lanes.append(remote or Lane(index, lane_rows, len(self.stages)))
        whole = None
        if count > 1 and self.lane_stages < len(self.stages):
            whole = Lane(0, slice(0, batch), len(self.stages))
        return lanes, whole

    def _process_lane(self, index: int, rows: slice, dtype):
        """A lane run by the helper process, or None where it cannot run."""
        process = None if self._helper_failed else lane_process.LaneProcess.get()
        if process is None:
            return None
        try:
            if self._replica is None or self._replica[0] is not process:
                self._replica = (process, process.add_replica(self, self.model, self.parameters, self.lane_stages))
            shape, in_lane = self.model.input_shape + (1,), set()
            for i in self.lane_stage_range(split=True):
                shape = self.stages[i].output_shape(shape)
                in_lane.update(id(p) for p in self.stages[i].parameters() if p is not None)
            parameters = {i: p for i, p in enumerate(self.parameters) if id(p) in in_lane}
            return lane_process.ProcessLane(process, self._replica[1], index, rows, parameters,
                                            self.model.input_shape, shape[:-1], dtype)
        except lane_process.LaneProcessError as exc:
            self._lost_helper(exc)
            return None

    def describe(self, batch: int) -> str:
        """How a batch of ``batch`` runs: lanes, what runs in them, BLAS threads."""
        lanes, whole = self._plan(batch)
        if len(lanes) == 1:
            return f"one lane, BLAS on {threads.blas_threads()} threads"
        where = "a helper process" if isinstance(lanes[1], lane_process.ProcessLane) else "a second thread"
        what = "the whole model" if whole is None else "the features"
        text = f"{len(lanes)} lanes of {what} (the second in {where}), BLAS on 1 thread each"
        if whole is not None:
            text += f", the classifier on the whole batch (BLAS on {threads.blas_threads()} threads)"
        return text

    def lane_stage_range(self, split: bool) -> range:
        """The stages a lane runs: the leading ``lane_stages`` when the batch is ``split`` into
        lanes (all of them for a small model), every stage when the batch is one lane."""
        return range(self.lane_stages if split else len(self.stages))

    @staticmethod
    def _run(work, lanes) -> None:
        """``work(lane)`` for the lanes of this process: the first here, the others on threads."""
        def quietly(lane):
            with np.errstate(all="ignore"):  # NaN and inf pass silently, as through the module path
                work(lane)

        threads.run_each(quietly, lanes)

    def _in_parallel(self, lanes, start, here, finish, redo) -> None:
        """``start`` every helper-process lane, run ``here`` on each lane of this process (BLAS on
        one thread while there are several lanes), then ``finish`` the helper's lanes -- every one
        started, also when the work here raised, so that no reply is left unread. A helper lane
        that fails is replaced in the plan by a lane of this process, which ``redo`` runs."""
        local = [lane for lane in lanes if isinstance(lane, Lane)]
        started, lost, error = [], [], None
        try:
            for lane in lanes:
                if not isinstance(lane, Lane):
                    try:
                        start(lane)
                        started.append(lane)
                    except lane_process.LaneProcessError as exc:
                        lost.append((lane, exc))
            with threads.single_threaded_blas() if len(lanes) > 1 else contextlib.nullcontext():
                self._run(here, local)
        finally:
            for lane in started:
                try:
                    finish(lane)
                except lane_process.LaneProcessError as exc:
                    lost.append((lane, exc))
                except BaseException as exc:
                    error = error or exc
        if error is not None:
            raise error
        for lane, exc in lost:
            self._lost_helper(exc)
            replacement = Lane(lane.index, lane.rows, len(self.stages))
            lanes[lanes.index(lane)] = replacement  # the plan's list: later steps use it too
            self._run(redo, [replacement])

    def _lost_helper(self, error) -> None:
        if not self._helper_failed:
            warnings.warn(f"gpuconv.cpu: {error}; this model's second lane runs on a thread from now on",
                          RuntimeWarning, stacklevel=5)
        self._helper_failed = True

    # -- one lane (also what the helper process runs) ----------------------------------------

    def lane_forward(self, lane, x_rows, split: bool = True) -> np.ndarray:
        """The lane's output ((F, n) or (classes, n)) from its NCHW rows of the input."""
        y = x_rows.transpose(1, 2, 3, 0)  # (C, H, W, n), converted by the first stage's copy
        if not self.stages[0].takes_strided_input:
            buffer = lane.own.array("input", y.shape, y.dtype)
            np.copyto(buffer, y)
            y = buffer
        for i in self.lane_stage_range(split):
            y = self.stages[i].forward(lane.workspaces[i], y, lane.rows)
        return y

    def _needs(self, requires_input_grad: bool):
        """Per stage: whether it trains, and whether it must compute its input's gradient."""
        trains = [stage.trains() for stage in self.stages]
        needs = [requires_input_grad or any(trains[:i]) for i in range(len(self.stages))]
        return trains, needs

    def _walk_back(self, lane, grad, indices, requires_input_grad: bool):
        """Backward through the stages ``indices`` (in reverse); None once nothing before needs more."""
        trains, needs = self._needs(requires_input_grad)
        for i in reversed(indices):
            if not (needs[i] or trains[i]):
                return None
            grad = self.stages[i].backward(lane.workspaces[i], grad, needs[i], lane.grad_target)
            if not needs[i]:
                return None
        return grad

    @staticmethod
    def _own_copy(lane, grad):
        """The incoming gradient in the lane's own array: the stages may overwrite theirs."""
        own = lane.own.array("grad", grad.shape, grad.dtype)
        np.copyto(own, grad)
        return own

    def lane_backward(self, lane, grad, requires_input_grad: bool, split: bool = True):
        """Backward of the lane's last forward from the gradient of its output; the input
        gradient (C, H, W, n), or None when nothing before needs it. Parameter gradients go to
        ``lane.grad_target(param)``."""
        return self._walk_back(lane, self._own_copy(lane, grad), self.lane_stage_range(split),
                               requires_input_grad)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x) -> np.ndarray:
        """The logits (N, classes) of an NCHW float32 batch: a fresh array."""
        batch = x.shape[0]
        lanes, whole = self._plan(batch, x.dtype)
        split = whole is not None or len(lanes) > 1
        in_lanes = self.lane_stage_range(split)
        shapes = [tuple(x.shape)]  # batch-major, as the module path sees them (a dropout mask is drawn in it)
        for stage in self.stages:
            stage.start_step(shapes[-1], x.dtype, self.model.training)
            shapes.append(self._batch_major_shape(stage, shapes[-1]))
        logits = np.empty(shapes[-1], x.dtype)
        joined = None if whole is None else whole.own.array("joined", shapes[len(in_lanes)][::-1], x.dtype)

        def deliver(lane, y):
            if joined is None:
                logits[lane.rows] = y.T
            else:
                joined[:, lane.rows] = y

        step_arrays = {}
        if any(not isinstance(lane, Lane) for lane in lanes):
            step_arrays = {i: arrays for i in in_lanes if (arrays := self.stages[i].step_arrays())}

        def here(lane):
            deliver(lane, self.lane_forward(lane, x[lane.rows], split))

        self._in_parallel(lanes, lambda lane: lane.start_forward(x, step_arrays), here,
                          lambda lane: deliver(lane, lane.finish_forward()), here)
        if whole is not None:
            def forward_whole(lane):
                y = joined
                for i in range(len(in_lanes), len(self.stages)):
                    y = self.stages[i].forward(lane.workspaces[i], y, lane.rows)
                logits[...] = y.T

            self._run(forward_whole, [whole])
        self._last = (lanes, whole, x, logits.shape)
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
        lanes, whole, x, logits_shape = self._last
        if tuple(grad_output.shape) != logits_shape:
            raise ValueError(f"grad_output must have the logits' shape {logits_shape} (the last forward's "
                             f"input was {tuple(x.shape)}), got {tuple(grad_output.shape)}")
        targets = self._gradient_targets(lanes, whole)
        grad_input = np.empty(x.shape, grad_output.dtype) if requires_input_grad else None
        split = whole is not None or len(lanes) > 1

        top = grad_output.T  # (classes, N), or the features' gradient once the classifier ran on the whole batch
        if whole is not None:
            def backward_whole(lane):
                nonlocal top
                top = self._walk_back(lane, self._own_copy(lane, grad_output.T),
                                      range(self.lane_stages, len(self.stages)), requires_input_grad)

            self._run(backward_whole, [whole])

        def here(lane):
            grad = self.lane_backward(lane, top[:, lane.rows], requires_input_grad, split)
            if grad is not None:
                grad_input[lane.rows] = grad.transpose(3, 0, 1, 2)

        def finish(lane):
            grad = lane.finish_backward()
            if grad is not None:
                grad_input[lane.rows] = grad

        def redo(lane):  # a lane the helper lost: its forward again here, then its backward
            self.lane_forward(lane, x[lane.rows], split)
            self._set_gradient_target(lane, targets)
            here(lane)

        if top is not None:
            self._in_parallel(lanes, lambda lane: lane.start_backward(top[:, lane.rows], requires_input_grad),
                              here, finish, redo)
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
        for lane in lanes + ([whole] if whole is not None else []):
            lane.written = {}
            if isinstance(lane, Lane):  # a helper-process lane's gradients come back in its arena
                self._set_gradient_target(lane, targets)
        return targets

    def _set_gradient_target(self, lane, targets) -> None:
        """Lane 0 writes its gradients into ``targets``; another lane into arrays of its own,
        recorded in ``lane.written`` to be added."""
        if lane.index == 0:
            lane.grad_target = targets.get
            return

        def own_target(param):
            if param not in targets:
                return None
            gradient = lane.own.array(f"grad {self._parameter_index[param]}", param.shape, param.dtype)
            lane.written[param] = gradient
            return gradient

        lane.grad_target = own_target

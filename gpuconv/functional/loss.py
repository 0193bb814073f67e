"""Cross-entropy over class scores: log-softmax followed by the negative log-likelihood."""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..device import array_module, common_device, device_of, empty
from ..dispatch import device_call
from ._checks import check_array, ieee_arithmetic

__all__ = ["cross_entropy", "cross_entropy_backward", "cross_entropy_with_grad"]

_REDUCTIONS = ("mean", "sum", "none")
_BLOCK = 256
_ROWS_PER_BLOCK = _BLOCK // 32  # one warp per row
# The kernel's launch plans per (argument signature, reduction): kernels.signature.
_plans = kernels.PlanCache()


def _check_arguments(input, target, reduction: str, validate_target: bool) -> str:
    """Check the arguments; return the device. Labels are checked on the device they live on."""
    check_array(input, "input", 2, "N, C")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not hasattr(target, "dtype") or not np.issubdtype(target.dtype, np.integer):
        kind = target.dtype if hasattr(target, "dtype") else type(target).__name__
        raise TypeError(f"target must be an integer array of class indices, got {kind}")
    rows, classes = input.shape
    if target.shape != (rows,):
        raise ValueError(f"target must have shape ({rows},) to match input {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    device = common_device(input=input, target=target)
    if validate_target:
        _check_labels(input, target)
    return device


def _check_labels(input, target) -> None:
    """Every label in [0, C): one fused reduction (a single device round trip on 'cuda') before any
    kernel reads a label. A training loop whose labels were checked once when loaded skips it
    (validate_target=False): the kernel then turns a bad label into a NaN loss rather than
    reading out of bounds."""
    rows, classes = input.shape
    if rows and bool(((target < 0) | (target >= classes)).any()):
        raise ValueError(f"target {tuple(target.shape)} holds labels outside [0, {classes}) "
                         f"(min {int(target.min())}, max {int(target.max())}) for input {tuple(input.shape)}")


def _reduce(losses, reduction: str):
    """The per-sample ``losses`` reduced as asked; a 0-d array on their device for 'mean'/'sum'."""
    if reduction == "none":
        return losses
    # Into a shape (1,) array, reshaped last: NumPy turns 0-d results of arithmetic into scalars.
    device, xp = device_of(losses), array_module(losses)
    total = empty((1,), losses.dtype, device)
    if reduction == "mean" and not losses.shape[0]:  # the mean of nothing is NaN, as in PyTorch
        device_call("fill", device, lambda: total.fill(np.nan))
    else:
        reduce = xp.mean if reduction == "mean" else xp.sum
        device_call(reduce.__name__, device, lambda: reduce(losses, keepdims=True, out=total))
    return total.reshape(())

def _numpy(input, target, reduction, want_grad):
    rows = np.arange(input.shape[0])
    shifted = input - input.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sums = exp.sum(axis=1)
    losses = np.log(sums) - shifted[rows, target]
    if not want_grad:
        return losses, None
    grad = exp / sums[:, None]
    grad[rows, target] -= 1
    if reduction == "mean":
        grad /= input.shape[0]
    return losses, grad


def _kernel(input, target, reduction, device, key):
    """The per-sample losses, the gradient and, for 'mean'/'sum', their reduction, in one launch
    (None where the launch has nothing to reduce: no rows, or no classes). The launch's plan is
    kept for ``key`` when the arrays are the kernel's as they are."""
    rows, classes = input.shape
    # astype rather than ascontiguousarray: it keeps an EmuArray on the emulated device.
    logits = input.astype(np.float32, order="C", copy=False)
    labels = target.astype(np.int32, order="C", copy=False)
    losses = empty((rows,), np.float32, device)
    grad = empty((rows, classes), np.float32, device)
    if not (rows and classes):
        return losses, grad, None
    reduce = reduction != "none"
    total = empty((1,), np.float32, device) if reduce else losses  # not written without a reduction
    grad_scale = 1.0 / rows if reduction == "mean" else 1.0
    # One block sums the whole batch in a fixed order; without a sum the rows spread over blocks.
    grid = 1 if reduce else kernels.blocks_for(rows, _ROWS_PER_BLOCK)
    plan = kernels.LaunchPlan("softmax_cross_entropy", "softmax_cross_entropy_v2", grid, _BLOCK,
                              (logits, labels, rows, classes, grad_scale, grad_scale, reduce, losses, grad, total))
    plan(logits, labels, losses, grad, total)
    if key is not None and logits is input and labels is target:
        _plans.remember((key, reduction), plan)
    return losses, grad, total.reshape(()) if reduce else None


def _planned(plan, input, target, reduction):
    """:func:`_kernel` by its plan: the arguments' signature has passed every check already."""
    rows, classes = input.shape
    device = plan.device
    losses = empty((rows,), np.float32, device)
    grad = empty((rows, classes), np.float32, device)
    if reduction == "none":
        plan(input, target, losses, grad, losses)
        return losses, grad
    total = empty((1,), np.float32, device)
    plan(input, target, losses, grad, total)
    return total.reshape(()), grad


def _loss_and_grad(input, target, reduction, want_grad, validate_target):
    """``(loss, grad)``: the losses reduced as asked, and their gradient (None if not wanted, on 'cpu')."""
    key = kernels.signature(input, target)
    plan = _plans.lookup((key, reduction)) if key is not None else None
    if plan is not None:
        if validate_target:
            _check_labels(input, target)
        return _planned(plan, input, target, reduction)
    return _checked_loss_and_grad(input, target, reduction, want_grad, validate_target, key)


@ieee_arithmetic
def _checked_loss_and_grad(input, target, reduction, want_grad, validate_target, key):
    device = _check_arguments(input, target, reduction, validate_target)
    if device == "cpu":
        losses, grad = _numpy(input, target, reduction, want_grad)
        return _reduce(losses, reduction), grad
    losses, grad, reduced = _kernel(input, target, reduction, device, key)
    return (_reduce(losses, reduction) if reduced is None else reduced), grad


def cross_entropy(input, target, reduction: str = "mean", *, validate_target: bool = True):
    """Cross-entropy of scores ``input`` (N, C) against integer labels ``target`` (N,).

    ``reduction`` 'mean' or 'sum' gives a 0-d array on ``input``'s device, 'none' the (N,) losses.
    Stable for logits of any magnitude (the row maximum is subtracted before ``exp``).
    ``validate_target=False`` skips the label range check, which costs a device-to-host round trip
    on 'cuda'; only for labels already checked (a bad label then gives NaN on the kernel devices).
    """
    return _loss_and_grad(input, target, reduction, False, validate_target)[0]


def cross_entropy_backward(input, target, reduction: str = "mean", *, validate_target: bool = True):
    """d loss / d input: ``softmax(input) - onehot(target)``, divided by N for 'mean'.

    For 'none' it is the gradient of each sample's own loss (the same as for 'sum').
    """
    return _loss_and_grad(input, target, reduction, True, validate_target)[1]


def cross_entropy_with_grad(input, target, reduction: str = "mean", *, validate_target: bool = True):
    """``(cross_entropy(...), cross_entropy_backward(...))`` from one pass over the scores.

    On 'cuda' and 'emu' every call of this module runs the one kernel that computes the loss, its
    gradient and the mean or sum together; a training step that needs both should call this
    rather than both functions.
    """
    return _loss_and_grad(input, target, reduction, True, validate_target)

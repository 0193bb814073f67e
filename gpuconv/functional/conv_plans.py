"""Launch plans of the convolution ops: the key a steady-state call is looked up by.

A convolution op's first call for a key runs every check, plans the kernel (tile, phases,
K split), derives its launch arguments and keeps the result as an op object (``conv_gemm``'s
``*Op`` classes); a later call with the same key checks its arrays against the op's launch plan
(type, dtype, C-contiguity) and launches. The key holds everything the checks, the plan and the
launch arguments depend on: the arrays' :func:`kernels.signature` (type, shape, dtype; None, so no
plan, for a non-contiguous array), every other argument with its type (``stride=True`` equals 1
as a key but is refused where 1 is not), the resolved precision and the kernel version that
``GPUCONV_KERNEL_<OP>`` selects. Alignment-dependent choices (the large tiles' weight copy) are
made per call inside the op.
"""
from __future__ import annotations

import os

from .. import kernels
from ..precision import resolve as resolve_precision


# One cache per op, conv_gemm's op objects per plan_key.
FORWARD_RELU_MAX_POOL = kernels.PlanCache()
BACKWARD_FILTER = kernels.PlanCache()
BACKWARD_DATA = kernels.PlanCache()


def clear() -> None:
    """Forget every convolution plan (a test that replaces the planner's choices calls this)."""
    for cache in (FORWARD_RELU_MAX_POOL, BACKWARD_FILTER, BACKWARD_DATA):
        cache.clear()


def plan_key(arrays, values, precision, op: str):
    """The key of a convolution op's plan, or None where no plan may be kept (an array that is not
    C-contiguous, or not an array). ``arrays``: those the op reads and writes (None allowed),
    ``values``: its other arguments; ``op``: the ``GPUCONV_KERNEL_<OP>`` it dispatches on. A bad
    ``precision`` raises its own error here."""
    arrays_key = kernels.signature(*arrays)
    if arrays_key is None:
        return None
    dtype = next(a.dtype for a in arrays if a is not None)
    return (arrays_key, kernels.arguments_key(*values), resolve_precision(precision, dtype),
            os.environ.get(f"GPUCONV_KERNEL_{op.upper()}"))

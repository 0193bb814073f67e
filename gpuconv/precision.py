"""Internal precision of float32 convolutions: FP32, TF32 or BF16 tensor-core operands.

As in PyTorch, ``set_float32_matmul_precision`` names the global choice:

=========== ============== ==============================================================
name        ``precision=`` what a float32 convolution computes with
=========== ============== ==============================================================
'highest'   'fp32'         FP32 operands, FP32 accumulate (the default)
'high'      'tf32'         operands rounded to TF32 (10 mantissa bits), FP32 accumulate
'medium'    'bf16'         operands rounded to BF16 (7 mantissa bits), FP32 accumulate
=========== ============== ==============================================================

The setting starts from ``$GPUCONV_FLOAT32_MATMUL_PRECISION`` when that is set (so that
``gpuconv train`` and ``gpuconv bench`` can run at TF32 without a flag of their own), else
'highest'. The conv functions and ``nn.Conv2d`` also take ``precision='fp32'|'tf32'|'bf16'`` explicitly;
``None`` (their default) means the global setting. On 'cuda' and 'emu', TF32 and BF16 run the
tensor-core kernels (``kernels_cu/conv2d_tensorcore.cu``); on 'cpu' the same operands are rounded
exactly as those kernels round them (TF32: round to nearest, ties away from zero, as
``cvt.rna.tf32.f32``; BF16: round to nearest even, as ``cvt.rn.bf16x2.f32``) and multiplied in
FP32, whose products of such operands are exact, so every device computes the same rounded
problem and the CPU stays the reference. (PyTorch ignores the setting on the CPU for float32
except BF16 in 'medium'; an exact emulation is what lets 'cpu' check the kernels.) float64 is
always computed in float64, as PyTorch's setting concerns float32 only. The setting governs
gpuconv's convolutions; ``linear`` is not affected.
"""
from __future__ import annotations

import os

import numpy as np

from .device import array_module

__all__ = ["set_float32_matmul_precision", "get_float32_matmul_precision", "resolve", "round_operand"]

PRECISIONS = ("fp32", "tf32", "bf16")
_BY_NAME = {"highest": "fp32", "high": "tf32", "medium": "bf16"}
# Unit roundoff of the operand formats: half an ulp of 1 (FP32 2^-24, TF32 2^-11, BF16 2^-8).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8}

ENV = "GPUCONV_FLOAT32_MATMUL_PRECISION"
_global: str | None = None  # None: not set in this process, $GPUCONV_FLOAT32_MATMUL_PRECISION or 'highest'


def _checked_name(precision, where: str) -> str:
    if precision not in _BY_NAME:
        raise ValueError(f"{where} must be one of {sorted(_BY_NAME)} (as torch names them), got {precision!r}")
    return precision


def set_float32_matmul_precision(precision: str) -> None:
    """Set the internal precision of float32 convolutions: 'highest' (FP32, the default),
    'high' (TF32) or 'medium' (BF16), as ``torch.set_float32_matmul_precision``."""
    global _global
    _global = _checked_name(precision, "precision")


def get_float32_matmul_precision() -> str:
    """The global setting: 'highest', 'high' or 'medium'."""
    if _global is not None:
        return _global
    return _checked_name(os.environ.get(ENV, "highest"), f"${ENV}")


def check(precision) -> None:
    """Refuse a ``precision=`` argument that is not None, 'fp32', 'tf32' or 'bf16'."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None (the global setting), 'fp32', 'tf32' or 'bf16', got {precision!r}")


def resolve(precision, dtype) -> str:
    """'fp32', 'tf32' or 'bf16': the argument, else the global setting; 'fp32' for float64 data."""
    check(precision)
    if np.dtype(dtype) != np.float32:
        return "fp32"
    return _BY_NAME[get_float32_matmul_precision()] if precision is None else precision


def round_operand(a, precision: str):
    """``a`` (float32) with every element rounded as the tensor-core kernels round an operand."""
    if precision == "fp32":
        return a
    xp = array_module(a)
    bits = xp.ascontiguousarray(a, dtype=xp.float32).view(xp.uint32)
    special = (bits & 0x7F800000) == 0x7F800000  # NaN and infinity keep their class
    quiet = xp.where((bits & 0x007FFFFF) != 0, bits | 0x00400000, bits)
    if precision == "tf32":
        # Half an ulp of the 10-bit mantissa added to the magnitude, then truncated: ties away from zero.
        rounded = xp.where(special, quiet, bits + 0x1000) & xp.uint32(0xFFFFE000)
    elif precision == "bf16":
        rounded = xp.where(special, quiet, bits + 0x7FFF + ((bits >> 16) & 1)) & xp.uint32(0xFFFF0000)
    else:
        raise ValueError(f"precision must be 'fp32', 'tf32' or 'bf16', got {precision!r}")
    out = rounded.astype(xp.uint32).view(xp.float32)
    return out.view(type(a)) if isinstance(a, np.ndarray) and type(a) is not np.ndarray else out

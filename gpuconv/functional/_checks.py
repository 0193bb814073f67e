"""Argument checks shared by every functional op: one wording for every error message."""
from __future__ import annotations

import functools

import numpy as np

from ..device import device_of, empty


def check_array(x, name: str, ndim: int | None = None, layout: str = ""):
    """Return ``x`` if it is a float array on some device with ``ndim`` dimensions.

    float32 everywhere, float64 on the CPU; anything else is a TypeError naming ``name`` and the
    shape. ``layout`` (e.g. 'NCHW') only improves the message.
    """
    try:
        device = device_of(x)
    except TypeError:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from None
    if np.isscalar(x) or not hasattr(x, "ndim"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    shape = tuple(x.shape)
    allowed = (np.float32, np.float64) if device == "cpu" else (np.float32,)
    if x.dtype not in allowed:
        kinds = "float32 or float64" if device == "cpu" else "float32"
        raise TypeError(f"{name} must be {kinds} on {device}, got {x.dtype} array of shape {shape}")
    if ndim is not None and x.ndim != ndim:
        what = f"{ndim}-D ({layout})" if layout else f"{ndim}-D"
        raise ValueError(f"{name} must be {what}, got shape {shape}")
    return x


def check_same_dtype(**arrays) -> None:
    """A TypeError naming each array, its dtype and shape unless all (None skipped) share one dtype."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} {arrays[name].dtype} {tuple(arrays[name].shape)}" for name in dtypes)
        raise TypeError(f"arrays must have one dtype, got {listing}")


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``, as a pair."""
    items = (value, value) if np.isscalar(value) else tuple(value)
    if len(items) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        bound = "positive" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return int(items[0]), int(items[1])


def positive_int(value, name: str) -> int:
    """``value`` as an int if it is a positive int (a bool or a float is a TypeError, as in torch.nn)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def probability(value, name: str = "p") -> float:
    """``value`` as a float if it is a number in [0, 1] (NaN and bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    return float(value)


def ieee_arithmetic(op):
    """Run ``op`` with NumPy's floating-point warnings off: NaN and infinities go through every op
    silently, as through PyTorch's and our kernels (an overflow is inf, 0/0 NaN, the mean of an
    empty batch NaN), rather than as a RuntimeWarning per op. CuPy never warns."""
    @functools.wraps(op)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return op(*args, **kwargs)
    return quiet


def output_array(out, name: str, shape, dtype, device: str):
    """``out`` checked to take a result of ``shape`` (an ``out=`` argument); a fresh array when None."""
    if out is None:
        return empty(shape, dtype, device)
    if (tuple(out.shape) != tuple(shape) or out.dtype != dtype or device_of(out) != device
            or not out.flags.c_contiguous):
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)} on "
                         f"{device}, got {out.dtype} {tuple(out.shape)} on {device_of(out)}")
    return out

"""Inverted dropout whose mask is a counter-based hash of ``(seed, element index)``.

For element ``i`` (C-order flat index) and a seed below 2^64, with all arithmetic modulo 2^64::

    mix64(z)    = SplitMix64's finaliser: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
                                          z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
    bits(i)     = mix64(mix64(seed) + (i + 1) * 0x9E3779B97F4A7C15) >> 32       (32 bits)
    keep(i)     = bits(i) >= floor(p * 2^32)                                     P(keep) = 1 - p (to 2^-32)
    output[i]   = input[i] * (1 / (1 - p) if keep(i) else 0)

A dropped NaN or infinity therefore becomes NaN, as in PyTorch (which multiplies by the mask),
and a dropped negative number -0.

The NumPy code below and ``kernels_cu/dropout.cu`` compute exactly this, so every device draws the
bit-identical mask from one seed, no mask is stored, and the backward pass (the same map applied
to the gradient) re-derives it.
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..device import contiguous, device_of, empty
from ..random import next_seed
from ._checks import check_array, ieee_arithmetic, probability

__all__ = ["dropout", "dropout_backward", "dropout_mask"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z):
    """SplitMix64's finaliser, in place on a uint64 array (wrapping arithmetic, as the kernel's)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _check_seed(seed, x=None):
    if x is not None and hasattr(seed, "shape") and device_of(x) != "cpu":
        if seed.shape != (1,) or seed.dtype != np.uint64 or device_of(seed) != device_of(x):
            raise ValueError(f"a seed in device memory must be a (1,) uint64 array on {device_of(x)}, "
                             f"got {seed.dtype} {tuple(seed.shape)} on {device_of(seed)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


def _threshold(p: float) -> int:
    # p * 2^32 is exact in float64 (a power-of-two scaling); p < 1 keeps it below 2^32.
    return int(np.floor(p * 2.0**32))


def dropout_mask(shape, p: float, seed: int) -> np.ndarray:
    """The boolean keep-mask (a NumPy array of ``shape``) that :func:`dropout` draws for ``(p, seed)``."""
    p, seed = probability(p), _check_seed(seed)
    if p == 1.0:
        return np.zeros(shape, bool)
    # Wrapping uint64 arithmetic on arrays is silent; the key is computed on a 1-element array
    # because NumPy warns on overflow of uint64 *scalars*.
    key = _mix64(np.array([seed], np.uint64))
    z = np.arange(1, int(np.prod(shape)) + 1, dtype=np.uint64)
    z *= _GOLDEN
    z += key
    bits = _mix64(z) >> np.uint64(32)
    return (bits >= np.uint64(_threshold(p))).reshape(shape)


def _apply(x, p: float, seed: int):
    """``x * (keep * 1/(1-p))`` for 0 < p < 1, on the device of ``x``."""
    if device_of(x) == "cpu":
        factor = dropout_mask(x.shape, p, seed).astype(x.dtype)
        factor *= x.dtype.type(1.0 / (1.0 - p))
        factor *= x
        return factor
    out = empty(x.shape, np.float32, device_of(x))
    # A seed in device memory (see dropout()) is read by the kernel at each launch.
    kernel = "dropout_v1" if isinstance(seed, (int, np.integer)) else "dropout_device_seed_v1"
    kernels.launch("dropout", kernel, kernels.grid_stride_blocks(out.size), kernels.BLOCK,
                   (contiguous(x), out, out.size, seed, _threshold(p), 1.0 / (1.0 - p)))
    return out


@ieee_arithmetic
def dropout(input, p: float = 0.5, training: bool = True, *, seed: int | None = None):
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    ``training=False`` or ``p == 0`` returns ``input`` itself; ``p == 1`` returns zeros. ``seed``
    (default: :func:`gpuconv.random.next_seed`) fixes the mask; pass the same seed to
    :func:`dropout_backward`. On 'cuda' and 'emu' the seed may be a (1,) uint64 array in device
    memory, which the kernel reads when it runs (what a captured CUDA graph needs).
    """
    check_array(input, "input")
    p = probability(p)
    if seed is not None:
        _check_seed(seed, input)
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input * 0  # zeros of input's shape, dtype and device (NaN stays NaN, as in PyTorch)
    return _apply(input, p, next_seed() if seed is None else seed)


@ieee_arithmetic
def dropout_backward(grad_output, p: float, seed: int):
    """Gradient of :func:`dropout` (in training) w.r.t. its input, for the same ``p`` and ``seed``."""
    check_array(grad_output, "grad_output")
    p, seed = probability(p), _check_seed(seed, grad_output)
    if p == 0.0:
        return grad_output
    if p == 1.0:
        return grad_output * 0
    return _apply(grad_output, p, seed)

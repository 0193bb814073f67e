"""Bilinear resizing of NCHW images, exactly as ``torch.nn.functional.interpolate(mode='bilinear')``.

It is the input pipeline of the ImageNet-shaped models (28x28 digits to 224x224 per batch, on the
training device), so it runs forward only.
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..device import device_of, empty
from ._checks import check_array, ieee_arithmetic, pair

__all__ = ["interpolate"]



def _scale(in_size: int, out_size: int, align_corners: bool, dtype) -> np.floating:
    """PyTorch's area_pixel_compute_scale, in the input's precision as PyTorch computes it."""
    if align_corners:
        return dtype.type(in_size - 1) / dtype.type(out_size - 1) if out_size > 1 else dtype.type(0)
    return dtype.type(in_size) / dtype.type(out_size)


def _neighbours(in_size: int, out_size: int, scale, align_corners: bool):
    """Per output position: the two source indices and their weights (PyTorch's order of operations)."""
    dst = np.arange(out_size).astype(scale.dtype)
    if align_corners:
        src = scale * dst
    else:
        src = np.maximum(scale * (dst + scale.dtype.type(0.5)) - scale.dtype.type(0.5), 0)
    low = src.astype(np.int64)  # truncation is floor: src >= 0
    high = np.where(low < in_size - 1, low + 1, low)
    high_weight = src - low.astype(scale.dtype)
    return low, high, 1 - high_weight, high_weight


@ieee_arithmetic
def interpolate(input, size, mode: str = "bilinear", align_corners: bool = False):
    """Resize NCHW ``input`` to ``size`` (an int or an (H, W) pair) by bilinear interpolation.

    Source coordinates are half-pixel centres clamped at 0 (``align_corners=False``, PyTorch's
    default) or corner-aligned (``align_corners=True``).
    """
    check_array(input, "input", 4, "NCHW")
    if mode != "bilinear":
        raise ValueError(f"mode must be 'bilinear' (the only mode implemented), got {mode!r}")
    if not isinstance(align_corners, (bool, np.bool_)):
        raise TypeError(f"align_corners must be a bool, got {align_corners!r}")
    out_h, out_w = pair(size, "size", 1)
    n, c, in_h, in_w = input.shape
    if in_h == 0 or in_w == 0:
        raise ValueError(f"input {tuple(input.shape)} has an empty image to resize to {(out_h, out_w)}")
    scale_h = _scale(in_h, out_h, align_corners, input.dtype)
    scale_w = _scale(in_w, out_w, align_corners, input.dtype)
    device = device_of(input)
    if device == "cpu":
        h0, h1, h0_weight, h1_weight = _neighbours(in_h, out_h, scale_h, align_corners)
        w0, w1, w0_weight, w1_weight = _neighbours(in_w, out_w, scale_w, align_corners)
        row0, row1 = input[:, :, h0, :], input[:, :, h1, :]
        h0_weight, h1_weight = h0_weight[:, None], h1_weight[:, None]
        return (h0_weight * (w0_weight * row0[..., w0] + w1_weight * row0[..., w1])
                + h1_weight * (w0_weight * row1[..., w0] + w1_weight * row1[..., w1]))
    x = input.astype(np.float32, order="C", copy=False)  # astype keeps an EmuArray on 'emu'
    output = empty((n, c, out_h, out_w), np.float32, device)
    total = output.size
    if total:
        kernels.launch("resize", "bilinear_resize_v1", kernels.blocks_for(total), kernels.BLOCK,
                       (x, output, total, in_h, in_w, out_h, out_w, scale_h, scale_w, bool(align_corners)))
    return output

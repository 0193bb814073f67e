"""Convolution + bias + ReLU + max-pool as one op: the forward pass of a CNN's convolution block."""
from __future__ import annotations

from .. import kernels
from . import conv as _conv
from . import conv_gemm
from ._checks import ieee_arithmetic
from .conv import check_conv2d, conv2d
from .conv_plans import FORWARD_RELU_MAX_POOL as _plans
from .conv_plans import plan_key
from .pool import _check_plane, _window, max_pool2d

__all__ = ["conv2d_relu_max_pool2d"]


@ieee_arithmetic
def conv2d_relu_max_pool2d(input, weight, bias=None, stride=1, padding=0, dilation=1, pool_kernel_size=2,
                           pool_stride=None, pool_padding=0, ceil_mode: bool = False, *, precision=None):
    """``max_pool2d(relu(conv2d(input, weight, bias, stride, padding, dilation)), pool_kernel_size,
    pool_stride, pool_padding, ceil_mode, return_indices=True)``: ``(out, indices)``, the indices
    in the format and with the tie rule of :func:`max_pool2d` (int32 positions in the convolution
    output's plane, the first maximum in row-major window order, NaN propagating).

    On 'cpu' it runs that unfused sequence (NumPy). On 'cuda' and 'emu', a 2x2 pool of stride 2
    (any pool padding, ``ceil_mode`` either) after an FP32 convolution that the version-2 kernels
    take runs as one kernel (``conv2d_relu_max_pool2x2_v2``, the convolution output never
    stored), bit-identical to the unfused kernels; everything else — another pool window or
    stride, ``precision`` 'tf32'/'bf16', ``GPUCONV_KERNEL_CONV2D_FORWARD`` other than 2, an empty
    batch, shapes past the v2 kernels' 32-bit limits — runs the unfused kernels (the
    convolution with its ReLU in one, then the pool).
    """
    key = plan_key((input, weight, bias), (stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding,
                                            ceil_mode), precision, "conv2d_forward")
    op = _plans.lookup(key) if key is not None else None
    if op is not None:
        return op(input, weight, bias)
    g, device, precision = check_conv2d(input, weight, bias, stride, padding, dilation, precision)
    window = _window(g.output_shape, pool_kernel_size, pool_stride, pool_padding, ceil_mode,
                     name="the convolution's output")
    plan = _fused_plan(g, window, device, precision)
    if isinstance(plan, str):
        y = conv2d(input, weight, bias, stride, padding, dilation, activation="relu", precision=precision)
        return max_pool2d(y, pool_kernel_size, pool_stride, pool_padding, ceil_mode, return_indices=True)
    result, op = conv_gemm.conv2d_relu_max_pool2x2_v2(input, weight, bias, g, window.out, window.padding, plan)
    if key is not None:
        _plans.remember(key, op)
    return result


def _fused_plan(g, window, device: str, precision: str):
    """The fused kernel's plan, or why the unfused sequence runs."""
    if device == "cpu":
        return "the NumPy path runs the unfused sequence"
    if window.kernel != (2, 2) or window.stride != (2, 2):
        return f"a {window.kernel} pool of stride {window.stride}: the fused kernel pools 2x2 windows of stride 2"
    if precision != "fp32":
        return f"precision {precision!r}: the tensor-core convolution"
    version = kernels.select_version("conv2d_forward", {0: 0, 1: 1, 2: 2},
                                     default=_conv._DEFAULT_VERSION["conv2d_forward"])
    if version != 2:
        return f"conv2d_forward version {version}"
    if g.batch == 0:
        return "an empty batch"
    _check_plane(g.output_shape, window)
    return conv_gemm.plan_relu_max_pool2x2(g, window.out, window.padding)

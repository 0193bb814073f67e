"""2-D convolution (cross-correlation, as ``torch.nn.functional.conv2d``) and its gradients.

Two implementations of every op sit side by side:

* im2col + one matrix product per batch chunk, written against ``array_module(x)``: the NumPy
  path on 'cpu' (float32 and float64) and kernel version 0, the library baseline, on 'cuda'
  (CuPy gather + cuBLAS) and on 'emu';
* the implicit-GEMM CUDA kernels of ``kernels_cu/conv2d_*.cu``: version 1 (64x64 tiles) and
  version 2 (the default on 'cuda' and 'emu': the block-tile GEMM core of ``gemm_core.cuh``, with
  a tile chosen per shape, backward-data split into stride phases, backward-filter split over K
  with a deterministic reduction; planned in :mod:`.conv_gemm`); backward-filter's default is
  version 3, version 2 with the split-K reduce done by the last block of each tile (the same
  bits, one launch). ``GPUCONV_KERNEL_CONV2D_FORWARD=1``
  and friends select an older version, ``=0`` the baseline.

Padding is carried as (top, left) plus the output size, never as a symmetric amount, so PyTorch's
``padding='same'`` with an even kernel extent (one more row at the bottom than at the top) is the
same code path as every other padding.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..device import array_module, common_device, contiguous, device_of, empty, zero_, zeros
from ..precision import resolve as resolve_precision
from ..precision import round_operand
from . import conv_gemm, conv_plans, conv_tensorcore
from ._checks import check_array, check_same_dtype, ieee_arithmetic, output_array, pair

__all__ = ["conv2d", "conv2d_input", "conv2d_weight", "conv2d_bias", "conv2d_output_size", "conv2d_plan"]

# Largest im2col buffer one chunk of the batch may materialise; the batch is split to stay under it.
IM2COL_BUDGET_BYTES = 256 * 2**20

# Implicit-GEMM tile shape shared by the three kernels (see the .cu headers).
_TILE_M, _TILE_N, _TILE_K, _THREADS = 64, 64, 16, 256
# Backward-filter splits K = batch*H_out*W_out across blocks until about this many are in flight.
_TARGET_BLOCKS = 256
# CUDA's limit on gridDim.y (and z), where the kernels put their channel tiles.
_MAX_GRID_Y = 65535


@dataclass(frozen=True)
class _Geometry:
    """Every size of one convolution, padding resolved to (top, left) offsets."""

    batch: int
    c_in: int
    height: int
    width: int
    c_out: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    dilation_h: int
    dilation_w: int
    out_h: int
    out_w: int

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.c_in, self.height, self.width

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return self.c_out, self.c_in, self.kernel_h, self.kernel_w

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.c_out, self.out_h, self.out_w

    @property
    def patch_size(self) -> int:
        """K of the forward GEMM: the length of one im2col column."""
        return self.c_in * self.kernel_h * self.kernel_w

    def kernel_sizes(self) -> tuple[int, ...]:
        """The size arguments every conv kernel takes, in their common order."""
        return (self.batch, self.c_in, self.height, self.width, self.c_out, self.kernel_h, self.kernel_w,
                self.stride_h, self.stride_w, self.pad_top, self.pad_left, self.dilation_h, self.dilation_w,
                self.out_h, self.out_w)


def _resolve_padding(kernel, stride, padding, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """((pad_top, pad_bottom), (pad_left, pad_right)) for an int, a pair, 'same' or 'valid'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in PyTorch), got stride={stride}")
        # PyTorch's split: the larger half of an odd total goes to the bottom/right.
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple((t // 2, t - t // 2) for t in totals)
    pad_h, pad_w = pair(padding, "padding", 0)
    return (pad_h, pad_h), (pad_w, pad_w)


def check_padding(kernel_size, stride, padding, dilation) -> None:
    """Refuse a ``padding`` that no input size could make valid, as torch.nn.Conv2d does at construction."""
    _resolve_padding(kernel_size, stride, padding, dilation)


def _geometry(input_shape, weight_shape, stride, padding, dilation) -> _Geometry:
    """Check that the sizes make a convolution and compute its output size (once per shape)."""
    key = (tuple(input_shape), tuple(weight_shape), stride, padding, dilation)
    try:
        # The types too: stride=True equals 1 as a key, but is refused where 1 is not.
        return _cached_geometry(tuple(map(type, key[2:])), *key)
    except TypeError:  # a list among the arguments: not hashable, so not cached
        return _compute_geometry(*key)


def _compute_geometry(input_shape, weight_shape, stride, padding, dilation) -> _Geometry:
    batch, c_in, height, width = input_shape
    c_out, w_in, kernel_h, kernel_w = weight_shape
    if w_in != c_in:
        raise ValueError(
            f"weight {tuple(weight_shape)} (OIHW) expects {w_in} input channels, but input "
            f"{tuple(input_shape)} (NCHW) has {c_in}"
        )
    if min(weight_shape) < 1 or min(input_shape[1:]) < 1 or batch < 0:
        raise ValueError(f"input {tuple(input_shape)} and weight {tuple(weight_shape)} must have no empty dimension "
                         f"but the batch")
    stride = pair(stride, "stride", 1)
    dilation = pair(dilation, "dilation", 1)
    (top, bottom), (left, right) = _resolve_padding((kernel_h, kernel_w), stride, padding, dilation)
    extent_h, extent_w = dilation[0] * (kernel_h - 1) + 1, dilation[1] * (kernel_w - 1) + 1
    padded_h, padded_w = height + top + bottom, width + left + right
    if extent_h > padded_h or extent_w > padded_w:
        raise ValueError(
            f"kernel extent {(extent_h, extent_w)} (weight {tuple(weight_shape)}, dilation {dilation}) is larger "
            f"than the padded input {(padded_h, padded_w)} (input {tuple(input_shape)}, padding {padding!r})"
        )
    return _Geometry(
        batch, c_in, height, width, c_out, kernel_h, kernel_w, stride[0], stride[1], top, left,
        dilation[0], dilation[1],
        (padded_h - extent_h) // stride[0] + 1, (padded_w - extent_w) // stride[1] + 1,
    )


@functools.lru_cache(maxsize=1024)
def _cached_geometry(types, *key) -> _Geometry:
    return _compute_geometry(*key)


def conv2d_output_size(input_size, kernel_size, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution of an ``(H, W)`` input with an ``(KH, KW)`` kernel."""
    height, width = pair(input_size, "input_size", 1)
    kernel_h, kernel_w = pair(kernel_size, "kernel_size", 1)
    g = _geometry((1, 1, height, width), (1, 1, kernel_h, kernel_w), stride, padding, dilation)
    return g.out_h, g.out_w


def _shape4(shape, name: str) -> tuple[int, int, int, int]:
    items = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if items is None or len(items) != 4 or not all(isinstance(v, (int, np.integer)) for v in items):
        raise TypeError(f"{name} must be a tuple of 4 ints, got {shape!r}")
    return tuple(int(v) for v in items)


def _check_grad_output(grad_output, g: _Geometry) -> None:
    if tuple(grad_output.shape) != g.output_shape:
        raise ValueError(
            f"grad_output has shape {tuple(grad_output.shape)}, but input {g.input_shape} and weight "
            f"{g.weight_shape} give an output of shape {g.output_shape}"
        )



# --------------------------------------------------------------------------------------------
# im2col + matrix product: the 'cpu' path, and version 0 on 'cuda' and 'emu'.


def _batch_chunks(g: _Geometry, itemsize: int):
    """Batch slices whose im2col buffer (K x chunk*H_out*W_out) stays under IM2COL_BUDGET_BYTES."""
    per_image = g.patch_size * g.out_h * g.out_w * itemsize
    step = max(1, IM2COL_BUDGET_BYTES // per_image)
    return [slice(start, min(start + step, g.batch)) for start in range(0, g.batch, step)]


def _padded_extent(g: _Geometry) -> tuple[int, int]:
    """Rows and columns of the padded input the windows reach, or the input itself, whichever is larger."""
    reach_h = (g.out_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1
    reach_w = (g.out_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w + 1
    return max(reach_h, g.pad_top + g.height), max(reach_w, g.pad_left + g.width)


def _windows(padded, g: _Geometry):
    """The (n, C, KH, KW, H_out, W_out) view of every kernel window of a padded input: im2col, uncopied."""
    xp = array_module(padded)
    s_n, s_c, s_h, s_w = padded.strides
    return xp.lib.stride_tricks.as_strided(
        padded,
        shape=(padded.shape[0], g.c_in, g.kernel_h, g.kernel_w, g.out_h, g.out_w),
        strides=(s_n, s_c, s_h * g.dilation_h, s_w * g.dilation_w, s_h * g.stride_h, s_w * g.stride_w),
    )


def _im2col(x, g: _Geometry):
    """(K, n*H_out*W_out) patch matrix of a batch chunk, rows ordered as the weight's (C, KH, KW)."""
    xp = array_module(x)
    full_h, full_w = _padded_extent(g)
    padded = x
    if (full_h, full_w) != (g.height, g.width):
        padded = xp.zeros((x.shape[0], g.c_in, full_h, full_w), dtype=x.dtype)
        padded[:, :, g.pad_top:g.pad_top + g.height, g.pad_left:g.pad_left + g.width] = x
    cols = _windows(padded, g).transpose(1, 2, 3, 0, 4, 5)
    return xp.ascontiguousarray(cols).reshape(g.patch_size, -1)


def _rows_by_channel(a, channels: int):
    """(n, channels, H_out, W_out) -> (channels, n*H_out*W_out), the GEMM's layout."""
    xp = array_module(a)
    return xp.ascontiguousarray(a.reshape(a.shape[0], channels, -1).transpose(1, 0, 2)).reshape(channels, -1)


def _conv2d_im2col(x, weight, bias, g: _Geometry, relu: bool):
    xp = array_module(x)
    out = empty(g.output_shape, x.dtype, device_of(x))
    w2 = weight.reshape(g.c_out, g.patch_size)
    for chunk in _batch_chunks(g, x.dtype.itemsize):
        y = w2 @ _im2col(x[chunk], g)
        out[chunk] = y.reshape(g.c_out, -1, g.out_h, g.out_w).transpose(1, 0, 2, 3)
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    if relu:
        xp.maximum(out, 0, out=out)
    return out


def _conv2d_input_im2col(weight, grad_output, g: _Geometry):
    xp = array_module(grad_output)
    grad_input = empty(g.input_shape, grad_output.dtype, device_of(grad_output))
    w2t = weight.reshape(g.c_out, g.patch_size).T
    full_h, full_w = _padded_extent(g)
    for chunk in _batch_chunks(g, grad_output.dtype.itemsize):
        go = grad_output[chunk]
        cols = (w2t @ _rows_by_channel(go, g.c_out)).reshape(
            g.c_in, g.kernel_h, g.kernel_w, go.shape[0], g.out_h, g.out_w)
        # col2im: each kernel offset scatters one strided lattice of the padded input; the lattices
        # of different offsets overlap, so they are added one offset at a time.
        padded = xp.zeros((go.shape[0], g.c_in, full_h, full_w), dtype=go.dtype)
        for i in range(g.kernel_h):
            rows = slice(i * g.dilation_h, i * g.dilation_h + (g.out_h - 1) * g.stride_h + 1, g.stride_h)
            for j in range(g.kernel_w):
                columns = slice(j * g.dilation_w, j * g.dilation_w + (g.out_w - 1) * g.stride_w + 1, g.stride_w)
                padded[:, :, rows, columns] += cols[:, i, j].transpose(1, 0, 2, 3)
        grad_input[chunk] = padded[:, :, g.pad_top:g.pad_top + g.height, g.pad_left:g.pad_left + g.width]
    return grad_input


def _conv2d_weight_im2col(x, grad_output, g: _Geometry, out):
    grad_weight = zero_(output_array(out, "out", g.weight_shape, x.dtype, device_of(x))).reshape(g.c_out, g.patch_size)
    for chunk in _batch_chunks(g, x.dtype.itemsize):
        # (K x NP) @ (NP x C_out), transposed afterwards: BLAS runs this orientation about 1.5x
        # faster than (C_out x NP) @ (NP x K) when C_out and K are small (LeNet).
        grad_weight += (_im2col(x[chunk], g) @ _rows_by_channel(grad_output[chunk], g.c_out).T).T
    return grad_weight.reshape(g.weight_shape)


def _conv2d_bias_sum(grad_output, out):
    grad_bias = output_array(out, "out", (grad_output.shape[1],), grad_output.dtype, device_of(grad_output))
    grad_bias[...] = grad_output.sum(axis=(0, 2, 3))
    return grad_bias


# --------------------------------------------------------------------------------------------
# Implicit-GEMM kernels (version 1) on 'cuda' and 'emu'.


def _check_kernel_limits(g: _Geometry) -> None:
    """The kernels count pixels and weights in 32-bit ints (element offsets are 64-bit).

    A tile's indices run up to one tile past the last real one (``n0 + 63``, ``k0 + 16``) before
    they are masked, so the counts must stay a tile below 2^31, not merely below it. The channel
    tiles go in gridDim.y, which CUDA caps at 65535 (a launch past it fails only on a GPU).
    """
    largest = max(g.batch * g.height * g.width, g.batch * g.out_h * g.out_w, g.c_out * g.patch_size)
    if largest > np.iinfo(np.int32).max - max(_TILE_M, _TILE_N, _TILE_K):
        raise ValueError(
            f"input {g.input_shape} with weight {g.weight_shape} is too large for the conv2d kernels: "
            f"batch*H*W, batch*H_out*W_out and the weight's element count must each be below 2^31 - 64"
        )
    if max(g.c_in, g.c_out) > _MAX_GRID_Y * _TILE_M:
        raise ValueError(
            f"input {g.input_shape} with weight {g.weight_shape} has too many channels for the conv2d kernels: "
            f"C_in and C_out must each be at most {_MAX_GRID_Y * _TILE_M} (gridDim.y <= {_MAX_GRID_Y} tiles of {_TILE_M})"
        )


def _conv2d_kernel(x, weight, bias, g: _Geometry, relu: bool):
    _check_kernel_limits(g)
    device = device_of(x)
    out = empty(g.output_shape, np.float32, device)
    if bias is None:
        bias = zeros((g.c_out,), np.float32, device)
    grid = (math.ceil(g.batch * g.out_h * g.out_w / _TILE_N), math.ceil(g.c_out / _TILE_M))
    kernels.launch("conv2d_forward", "conv2d_forward_v1", grid, _THREADS,
                   (contiguous(x), contiguous(weight), contiguous(bias), out, *g.kernel_sizes(), int(relu)))
    return out


def _conv2d_input_kernel(weight, grad_output, g: _Geometry):
    _check_kernel_limits(g)
    grad_input = empty(g.input_shape, np.float32, device_of(grad_output))
    grid = (math.ceil(g.batch * g.height * g.width / _TILE_N), math.ceil(g.c_in / _TILE_M))
    kernels.launch("conv2d_backward_data", "conv2d_backward_data_v1", grid, _THREADS,
                   (contiguous(weight), contiguous(grad_output), grad_input, *g.kernel_sizes()))
    return grad_input


def _conv2d_weight_kernel(x, grad_output, g: _Geometry, out):
    _check_kernel_limits(g)
    # Blocks add their partial sums into a zeroed result (split-K over batch*H_out*W_out).
    grad_weight = zero_(output_array(out, "out", g.weight_shape, np.float32, device_of(x)))
    tiles = math.ceil(g.c_out / _TILE_M) * math.ceil(g.patch_size / _TILE_N)
    k_tiles = math.ceil(g.batch * g.out_h * g.out_w / _TILE_K)
    splits = min(k_tiles, max(1, _TARGET_BLOCKS // tiles))
    k_per_split = math.ceil(k_tiles / splits) * _TILE_K
    splits = math.ceil(g.batch * g.out_h * g.out_w / k_per_split)
    grid = (math.ceil(g.patch_size / _TILE_N), math.ceil(g.c_out / _TILE_M), splits)
    kernels.launch("conv2d_backward_filter", "conv2d_backward_filter_v1", grid, _THREADS,
                   (contiguous(x), contiguous(grad_output), grad_weight, *g.kernel_sizes(), k_per_split))
    return grad_weight


def _conv2d_bias_kernel(grad_output, out):
    batch, c_out, height, width = grad_output.shape
    grad_bias = output_array(out, "out", (c_out,), np.float32, device_of(grad_output))
    kernels.launch("conv2d_backward_filter", "conv2d_bias_grad_v1", c_out, _THREADS,
                   (contiguous(grad_output), grad_bias, batch, c_out, height * width))
    return grad_bias


# Version 2 runs each shape as conv_gemm plans it: on the v2 kernels, or on version 1 where they
# cannot take the shape (the plan says why).


def _conv2d_v2(x, weight, bias, g: _Geometry, relu: bool):
    plan = conv_gemm.plan_forward(g)
    if plan.version == 1:
        return _conv2d_kernel(x, weight, bias, g, relu)
    return conv_gemm.conv2d_forward_v2(x, weight, bias, g, relu, plan)


def _conv2d_input_v2(weight, grad_output, g: _Geometry, key=None):
    """``key``: the :func:`conv_plans.plan_key` to keep the op's plan under (None: keep none)."""
    plan = conv_gemm.plan_backward_data(g)
    if plan.version == 1:
        return _conv2d_input_kernel(weight, grad_output, g)
    grad_input, op = conv_gemm.conv2d_backward_data_v2(weight, grad_output, g, plan)
    if key is not None:
        conv_plans.BACKWARD_DATA.remember(key, op)
    return grad_input


class _WeightGradOp:
    """A planned :func:`conv2d_weight` call: ``op(input, grad_output, out, bias_out)``, the
    outputs allocated where not given, the result as conv2d_weight returns it."""

    __slots__ = ("op", "weight_shape", "bias_grad")

    def __init__(self, op: conv_gemm.BackwardFilterOp, weight_shape, bias_grad: bool):
        self.op, self.weight_shape, self.bias_grad = op, weight_shape, bias_grad

    def __call__(self, input, grad_output, out, bias_out):
        device = self.op.device
        grad_weight = empty(self.weight_shape, np.float32, device) if out is None else out
        if not self.bias_grad:
            self.op(input, grad_output, grad_weight, None)
            return grad_weight
        grad_bias = empty(self.weight_shape[:1], np.float32, device) if bias_out is None else bias_out
        self.op(input, grad_output, grad_weight, grad_bias)
        return grad_weight, grad_bias


def _conv2d_weight_v2(x, grad_output, g: _Geometry, out, grad_bias=None, last_block_reduce=False, key=None):
    """The weight gradient; with ``grad_bias`` (a checked (C_out,) array) also the bias gradient
    into it, from the same launch (version 1, where the plan falls back, runs its bias kernel).
    ``last_block_reduce``: version 3, the splits added by the last block of each tile. ``key``:
    the :func:`conv_plans.plan_key` to keep the op's plan under (None: keep none)."""
    plan = conv_gemm.plan_backward_filter(g, last_block_reduce)
    if plan.version == 1:
        grad_weight = _conv2d_weight_kernel(x, grad_output, g, out)
        if grad_bias is not None:
            _conv2d_bias_kernel(grad_output, grad_bias)
        return grad_weight
    grad_weight = output_array(out, "out", g.weight_shape, np.float32, device_of(x))
    grad_weight, op = conv_gemm.conv2d_backward_filter_v2(x, grad_output, g, plan, grad_weight, grad_bias)
    if key is not None:
        conv_plans.BACKWARD_FILTER.remember(key, _WeightGradOp(op, g.weight_shape, grad_bias is not None))
    return grad_weight


_FORWARD = {0: _conv2d_im2col, 1: _conv2d_kernel, 2: _conv2d_v2}
_BACKWARD_DATA = {0: _conv2d_input_im2col, 1: _conv2d_input_kernel, 2: _conv2d_input_v2}
def _conv2d_weight_v3(x, grad_output, g: _Geometry, out, grad_bias=None, key=None):
    return _conv2d_weight_v2(x, grad_output, g, out, grad_bias, last_block_reduce=True, key=key)


_BACKWARD_FILTER = {0: _conv2d_weight_im2col, 1: _conv2d_weight_kernel, 2: _conv2d_weight_v2, 3: _conv2d_weight_v3}
_BIAS_GRAD = {0: _conv2d_bias_sum, 1: _conv2d_bias_kernel}
_DEFAULT_VERSION = {"conv2d_forward": 2, "conv2d_backward_data": 2, "conv2d_backward_filter": 3, "conv2d_bias_grad": 1}


def _implementation(device: str, op: str, versions: dict):
    """The im2col path on 'cpu'; on 'cuda'/'emu' the version chosen by ``GPUCONV_KERNEL_<OP>``."""
    return versions[0] if device == "cpu" else kernels.select_version(op, versions, default=_DEFAULT_VERSION[op])


_PLANS = {"conv2d_forward": conv_gemm.plan_forward, "conv2d_backward_data": conv_gemm.plan_backward_data,
          "conv2d_backward_filter": conv_gemm.plan_backward_filter}


def conv2d_plan(op: str, input_shape, weight_shape, stride=1, padding=0, dilation=1) -> conv_gemm.Plan:
    """How ``op`` runs on 'cuda' for these shapes under the current ``GPUCONV_KERNEL_<OP>``: the
    kernel, tile, stride phases and K split, and the useful share of the multiply-adds it
    executes (``plan.describe()`` says it in one line). ``op`` is 'conv2d_forward',
    'conv2d_backward_data' or 'conv2d_backward_filter'.
    """
    if op not in _PLANS:
        raise ValueError(f"op must be one of {sorted(_PLANS)}, got {op!r}")
    g = _geometry(_shape4(input_shape, "input_shape"), _shape4(weight_shape, "weight_shape"), stride, padding,
                  dilation)
    versions = {0: 0, 1: 1, 2: 2, 3: 3} if op == "conv2d_backward_filter" else {0: 0, 1: 1, 2: 2}
    version = kernels.select_version(op, versions, default=_DEFAULT_VERSION[op])
    name = op.removeprefix("conv2d_")
    if version == 0:
        # cuBLAS's own tiling is not counted: the product it is given has exactly the conv's MACs.
        return conv_gemm.Plan(name, 0, "im2col + cuBLAS", None, 1, 1, 1.0, "version 0")
    if version == 1:
        return conv_gemm.plan_v1(name, g, "version 1")
    if op == "conv2d_backward_filter":
        return conv_gemm.plan_backward_filter(g, last_block_reduce=version == 3)
    return _PLANS[op](g)


# --------------------------------------------------------------------------------------------
# Public API: check once, then dispatch.


def check_conv2d(input, weight, bias, stride, padding, dilation, precision):
    """``conv2d``'s argument checks: ``(geometry, device, precision resolved)``, or a clear error."""
    check_array(input, "input", 4, "NCHW")
    check_array(weight, "weight", 4, "OIHW")
    if bias is not None:
        check_array(bias, "bias", 1)
    device = common_device(input=input, weight=weight, bias=bias)
    check_same_dtype(input=input, weight=weight, bias=bias)
    precision = resolve_precision(precision, input.dtype)
    g = _geometry(input.shape, weight.shape, stride, padding, dilation)
    if bias is not None and tuple(bias.shape) != (g.c_out,):
        raise ValueError(f"bias must have shape ({g.c_out},) for weight {g.weight_shape}, got {tuple(bias.shape)}")
    return g, device, precision


@ieee_arithmetic
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, *, activation=None, precision=None):
    """2-D cross-correlation of ``input`` (N, C_in, H, W) with ``weight`` (C_out, C_in, KH, KW).

    ``padding`` is an int, a pair, ``'valid'`` or ``'same'`` (stride 1 only; an odd total padding
    puts the extra row/column at the bottom/right, as PyTorch does). ``activation='relu'`` applies
    the ReLU in the same pass. ``precision`` ('fp32', 'tf32', 'bf16'; None: the global
    ``gpuconv.set_float32_matmul_precision``) is the internal precision of float32 operands, see
    ``gpuconv.precision``. Returns (N, C_out, H_out, W_out) on the device of ``input``.
    """
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    g, device, precision = check_conv2d(input, weight, bias, stride, padding, dilation, precision)
    if g.batch == 0:  # as PyTorch: an empty output, and no kernel launched on an empty grid
        return empty(g.output_shape, input.dtype, device)
    if precision != "fp32":
        if device != "cpu":
            return conv_tensorcore.conv2d(input, weight, bias, g, activation == "relu", precision)
        input, weight = round_operand(input, precision), round_operand(weight, precision)
    return _implementation(device, "conv2d_forward", _FORWARD)(input, weight, bias, g, activation == "relu")


@ieee_arithmetic
def conv2d_input(input_shape, weight, grad_output, stride=1, padding=0, dilation=1, *, precision=None):
    """Gradient of ``conv2d`` with respect to its input, of shape ``input_shape``.

    As ``torch.nn.grad.conv2d_input``; ``padding`` also takes ``'same'`` and ``'valid'``;
    ``precision`` as for ``conv2d``.
    """
    key = conv_plans.plan_key((weight, grad_output), (input_shape, stride, padding, dilation), precision,
                              "conv2d_backward_data")
    op = conv_plans.BACKWARD_DATA.lookup(key) if key is not None else None
    if op is not None:
        return op(weight, grad_output)
    input_shape = _shape4(input_shape, "input_shape")
    check_array(weight, "weight", 4, "OIHW")
    check_array(grad_output, "grad_output", 4, "NCHW")
    device = common_device(weight=weight, grad_output=grad_output)
    check_same_dtype(weight=weight, grad_output=grad_output)
    precision = resolve_precision(precision, weight.dtype)
    g = _geometry(input_shape, weight.shape, stride, padding, dilation)
    _check_grad_output(grad_output, g)
    if g.batch == 0:
        return empty(g.input_shape, grad_output.dtype, device)
    if precision != "fp32":
        if device != "cpu":
            return conv_tensorcore.conv2d_input(weight, grad_output, g, precision)
        weight, grad_output = round_operand(weight, precision), round_operand(grad_output, precision)
    implementation = _implementation(device, "conv2d_backward_data", _BACKWARD_DATA)
    if implementation is _conv2d_input_v2:
        return implementation(weight, grad_output, g, key)
    return implementation(weight, grad_output, g)


@ieee_arithmetic
def conv2d_weight(input, weight_shape, grad_output, stride=1, padding=0, dilation=1, *, out=None, precision=None,
                  bias_grad=False, bias_out=None):
    """Gradient of ``conv2d`` with respect to its weight, of shape ``weight_shape``.

    As ``torch.nn.grad.conv2d_weight``; ``padding`` also takes ``'same'`` and ``'valid'``.
    ``out``: an array of ``weight_shape`` on the input's device to write the gradient into.
    ``precision`` as for ``conv2d``.
    ``bias_grad=True`` also returns the bias gradient (what ``conv2d_bias`` computes), as
    ``(grad_weight, grad_bias)``, written into ``bias_out`` (a (C_out,) array) if given: the
    default FP32 kernel sums it in the weight-gradient launch (no second kernel); other versions
    and precisions run ``conv2d_bias``.
    The default FP32 kernel (version 2) writes each K split's partial sums to a workspace and adds
    them in a fixed order, so the result is bit-identical from run to run; version 1 adds them
    with float ``atomicAdd`` (the last bits vary, as cuDNN's non-deterministic algorithms).
    """
    key = conv_plans.plan_key((input, grad_output, out, bias_out), (weight_shape, stride, padding, dilation, bias_grad),
                              precision, "conv2d_backward_filter")
    op = conv_plans.BACKWARD_FILTER.lookup(key) if key is not None else None
    if op is not None:
        return op(input, grad_output, out, bias_out)
    check_array(input, "input", 4, "NCHW")
    weight_shape = _shape4(weight_shape, "weight_shape")
    check_array(grad_output, "grad_output", 4, "NCHW")
    device = common_device(input=input, grad_output=grad_output)
    check_same_dtype(input=input, grad_output=grad_output)
    precision = resolve_precision(precision, input.dtype)
    g = _geometry(input.shape, weight_shape, stride, padding, dilation)
    _check_grad_output(grad_output, g)
    grad_bias = output_array(bias_out, "bias_out", (g.c_out,), grad_output.dtype, device) if bias_grad else None
    if bias_out is not None and not bias_grad:
        raise ValueError("bias_out is given but bias_grad is False: pass bias_grad=True to compute the bias gradient")
    if g.batch == 0:  # as PyTorch: nothing to sum, a zero gradient
        grad_weight = zero_(output_array(out, "out", g.weight_shape, grad_output.dtype, device))
        return (grad_weight, zero_(grad_bias)) if bias_grad else grad_weight
    implementation = _implementation(device, "conv2d_backward_filter", _BACKWARD_FILTER)
    if precision == "fp32" and implementation in (_conv2d_weight_v2, _conv2d_weight_v3):
        grad_weight = implementation(input, grad_output, g, out, grad_bias, key=key)
        return (grad_weight, grad_bias) if bias_grad else grad_weight
    if precision != "fp32":
        if device != "cpu":
            grad_weight = conv_tensorcore.conv2d_weight(input, grad_output, g, precision, out)
            return (grad_weight, conv2d_bias(grad_output, out=grad_bias)) if bias_grad else grad_weight
        input, rounded = round_operand(input, precision), round_operand(grad_output, precision)
    else:
        rounded = grad_output
    grad_weight = implementation(input, rounded, g, out)
    # The bias gradient sums the unrounded grad_output, as conv2d_bias does.
    return (grad_weight, conv2d_bias(grad_output, out=grad_bias)) if bias_grad else grad_weight


@ieee_arithmetic
def conv2d_bias(grad_output, *, out=None):
    """Gradient of ``conv2d`` with respect to its bias: ``grad_output`` summed over N, H and W
    (written into ``out``, a (C_out,) array on the same device, if given)."""
    check_array(grad_output, "grad_output", 4, "NCHW")
    device = device_of(grad_output)
    if grad_output.size == 0:  # an empty batch (or plane): a zero gradient, no kernel launch
        return zero_(output_array(out, "out", (grad_output.shape[1],), grad_output.dtype, device))
    return _implementation(device, "conv2d_bias_grad", _BIAS_GRAD)(grad_output, out)

"""Version 2 of the convolution kernels: planning and launching the block-tile GEMM core of
``kernels_cu/gemm_core.cuh`` (see ``conv_tiles.cuh`` for how a convolution becomes its GEMMs).

A *plan* is decided in Python per shape, before anything is launched: the tile (128x128 and the
narrow 128x64, 64x128 and 32x128), from a small cost model of waves on an H100/H200
(:data:`SMS` SMs, the resident blocks each tile's launch bounds allow); for backward-filter the
K split that fills the GPU :data:`WAVES` deep; for backward-data the stride_h x stride_w output
phases, each meeting only the kernel taps that land on it. :func:`plan` returns the decision
with the useful share of the multiply-adds it executes (tile padding and zero taps are the
waste), which ``gpuconv bench`` prints; shapes the v2 kernels cannot take (more than
:data:`MAX_TAPS` kernel taps, tensors past 32-bit offsets) are planned on version 1, with the
reason.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..device import array_module, contiguous, device_of, empty, to_device, zeros

# An H100 / H200 SXM: the wave model behind the tile choice and the backward-filter split.
SMS = 132
# Backward-filter splits K until this many waves of blocks are in flight (a deeper queue evens
# out the blocks' uneven finishing times; more splits cost workspace and reduce traffic).
WAVES = 4
# Largest partial-sum workspace of backward-filter's split K, in bytes.
WORKSPACE_BYTES = 64 * 2**20
MAX_TAPS = 256  # conv_tiles.cuh's shared tap table
BK = 8
# (BM, BN) -> (threads, resident blocks per SM from the kernels' __launch_bounds__)
TILES = {(128, 128): (256, 2), (128, 64): (128, 3), (64, 128): (128, 3), (32, 128): (64, 6)}
# Measured by `gpuconv check-kernels --sass` (hot-loop FFMA share on sm_90): the cost model's
# price of a tile's overhead.
FFMA_SHARE = {(128, 128): 0.81, (128, 64): 0.81, (64, 128): 0.76, (32, 128): 0.67}
# Offsets inside the v2 kernels are 32-bit ints, with a tile of headroom.
INT_LIMIT = np.iinfo(np.int32).max - 128
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class Plan:
    """How one convolution op runs: kernel, tile, launches, and the work it wastes."""

    op: str  # 'forward', 'backward_data', 'backward_filter'
    version: int
    kernel: str
    tile: tuple[int, int] | None
    launches: int  # backward-data: one per output phase with taps
    splits: int  # backward-filter's K split (1 elsewhere)
    useful: float  # useful multiply-adds over executed ones
    reason: str  # why this kernel and tile

    @property
    def kernel_text(self) -> str:
        """The kernel with its tile, phases and split: 'conv2d_gemm_v2 32x128, 16 phases'."""
        tile = f" {self.tile[0]}x{self.tile[1]}" if self.tile else ""
        extra = f", {self.launches} phases" if self.launches > 1 else ""
        extra += f", split-K {self.splits}" if self.splits > 1 else ""
        return f"{self.kernel}{tile}{extra}"

    def describe(self) -> str:
        return f"{self.kernel_text} ({self.useful:.0%} useful; {self.reason})"


def _cost(tile, rows: int, columns: int) -> float:
    """Time of a rows x columns GEMM on ``tile``, in units of one warp's share of the K loop.

    Every warp of every tile computes 32 threads x 64 outputs, so the work of a tile shape is
    its padded warp count; the busiest SM runs ceil(blocks / SMS) blocks on 4 schedulers (a warp
    with 64 independent accumulators keeps one busy), at the tile's FFMA share of issue slots.
    """
    bm, bn = tile
    warps = TILES[tile][0] // 32
    blocks = math.ceil(rows / bm) * math.ceil(columns / bn)
    return math.ceil(math.ceil(blocks / SMS) * warps / 4) / FFMA_SHARE[tile]


def choose_tile(rows: int, columns: int) -> tuple[tuple[int, int], str]:
    """The cheapest tile for a rows x columns output by :func:`_cost`; ties go to the larger tile
    (fewer loads per multiply-add)."""
    best = min(sorted(TILES, key=lambda t: -t[0] * t[1]), key=lambda t: _cost(t, rows, columns))
    if best == (128, 128):
        return best, "large M and N"
    if best[0] < 128 and rows <= best[0]:
        return best, f"M = {rows} fits {best[0]} rows"
    return best, "less padding than 128x128"


def _padded(count: int, step: int) -> int:
    return math.ceil(count / step) * step


def _executed(tile, rows: int, columns: int, depth: int) -> int:
    return _padded(rows, tile[0]) * _padded(columns, tile[1]) * _padded(depth, BK)


@functools.lru_cache(maxsize=256)
def _tap_offsets(offsets: tuple, device: str):
    """The (n_taps, 2) int32 table of (dh, dw) on ``device``, uploaded once per shape."""
    return to_device(np.array(offsets, np.int32).reshape(-1, 2), device)


def _forward_taps(g) -> tuple:
    return tuple(v for i in range(g.kernel_h) for j in range(g.kernel_w) for v in (i * g.dilation_h, j * g.dilation_w))


def _aligned_rows(a, depth: int):
    """``a`` (rows x depth) as kernels' RowMajorA reads it: 16-byte aligned, pitch a multiple of 4,
    zeros past ``depth``. The weights are small, so re-laying them costs next to nothing."""
    pitch = _padded(depth, 4)
    interface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    if pitch == depth and interface["data"][0] % 16 == 0 and a.flags.c_contiguous:
        return a, pitch
    padded = zeros((a.shape[0], pitch), np.float32, device_of(a))
    padded[:, :depth] = a
    return padded, pitch


V1_TILE = (64, 64, 16)  # implicit_gemm.cuh


def plan_v1(op: str, g, reason: str) -> Plan:
    """Version 1 of ``op``: one 64x64x16 implicit GEMM; backward-data multiplies every tap."""
    rows, columns, depth = {
        "forward": (g.c_out, g.batch * g.out_h * g.out_w, g.patch_size),
        "backward_data": (g.c_in, g.batch * g.height * g.width, g.c_out * g.kernel_h * g.kernel_w),
        "backward_filter": (g.c_out, g.patch_size, g.batch * g.out_h * g.out_w),
    }[op]
    bm, bn, bk = V1_TILE
    executed = _padded(rows, bm) * _padded(columns, bn) * _padded(depth, bk)
    return Plan(op, 1, f"conv2d_{op}_v1", (bm, bn), 1, 1, _macs(g) / executed, reason)


def _macs(g) -> int:
    """Multiply-adds of the convolution (the same for all three ops)."""
    return g.c_out * g.patch_size * g.batch * g.out_h * g.out_w


def _v2_refusal(g, n_taps: int) -> str | None:
    """Why the v2 kernels cannot take this geometry, or None."""
    if n_taps > MAX_TAPS:
        return f"{n_taps} kernel taps > {MAX_TAPS}"
    sizes = (g.batch * g.c_in * g.height * g.width, g.batch * g.c_out * g.out_h * g.out_w,
             g.c_out * g.patch_size, g.batch * g.out_h * g.out_w, g.batch * g.height * g.width)
    if max(sizes) > INT_LIMIT:
        return "a tensor past 32-bit offsets"
    if max(g.c_in, g.c_out) > MAX_GRID_Y * min(bm for bm, _ in TILES):
        return f"more than {MAX_GRID_Y} channel tiles"
    return None


# --------------------------------------------------------------------------------------------
# Forward and backward-data: conv2d_gemm_v2, the lattice GEMM.


def _launch_lattice(tile, a, pitch, src, taps, n_taps, bias, dst, rows, channels, src_hw, lattice, src_step,
                    src_origin, dst_hw, dst_step, dst_origin, relu: bool):
    bm, bn = tile
    batch, lattice_h, lattice_w = lattice
    grid = (math.ceil(batch * lattice_h * lattice_w / bn), math.ceil(rows / bm))
    has_bias = bias is not None
    if bias is None:
        bias = dst  # never read
    kernels.launch("conv2d_gemm", f"conv2d_gemm_v2_{bm}x{bn}", grid, TILES[tile][0],
                   (a, src, taps, bias, dst, rows, channels, n_taps, *src_hw, batch, lattice_h, lattice_w, *src_step,
                    *src_origin, *dst_hw, *dst_step, *dst_origin, int(has_bias), int(relu), pitch))


def plan_forward(g) -> Plan:
    refusal = _v2_refusal(g, g.kernel_h * g.kernel_w)
    if refusal:
        return plan_v1("forward", g, refusal)
    columns = g.batch * g.out_h * g.out_w
    tile, reason = choose_tile(g.c_out, columns)
    return Plan("forward", 2, "conv2d_gemm_v2", tile, 1, 1, _macs(g) / _executed(tile, g.c_out, columns, g.patch_size),
                reason)


def conv2d_forward_v2(x, weight, bias, g, relu: bool, plan: Plan):
    device = device_of(x)
    out = empty(g.output_shape, np.float32, device)
    a, pitch = _aligned_rows(contiguous(weight).reshape(g.c_out, g.patch_size), g.patch_size)
    _launch_lattice(plan.tile, a, pitch, contiguous(x), _tap_offsets(_forward_taps(g), device),
                    g.kernel_h * g.kernel_w, None if bias is None else contiguous(bias), out, g.c_out, g.c_in,
                    (g.height, g.width), (g.batch, g.out_h, g.out_w), (g.stride_h, g.stride_w),
                    (-g.pad_top, -g.pad_left), (g.out_h, g.out_w), (1, 1), (0, 0), relu)
    return out


@dataclass(frozen=True)
class _Phase:
    """The input pixels y = first + stride*q (q < count) along one axis, and the kernel taps that
    reach them: tap i with output row oh = q + origin - shift."""

    first: int
    count: int
    origin: int
    taps: tuple  # (i, shift) pairs


def _phases(size: int, out_size: int, kernel: int, stride: int, pad: int, dilation: int) -> list[_Phase]:
    """The ``stride`` output phases of the input gradient along one axis.

    y + pad - i*dilation = stride*oh: the phase r = (y + pad) mod stride meets the taps with
    i*dilation = r (mod stride), at oh = (y + pad - r)/stride - (i*dilation - r)/stride.
    """
    phases = []
    for r in range(stride):
        first = (r - pad) % stride
        count = max(0, math.ceil((size - first) / stride))
        taps = tuple((i, (i * dilation - r) // stride) for i in range(kernel) if (i * dilation) % stride == r)
        phases.append(_Phase(first, count, (first + pad - r) // stride, taps))
    return phases


def _data_phases(g):
    """Every (row phase, column phase) pair with pixels."""
    rows = _phases(g.height, g.out_h, g.kernel_h, g.stride_h, g.pad_top, g.dilation_h)
    cols = _phases(g.width, g.out_w, g.kernel_w, g.stride_w, g.pad_left, g.dilation_w)
    return [(ph, pw) for ph in rows for pw in cols if ph.count and pw.count]


def plan_backward_data(g) -> Plan:
    refusal = _v2_refusal(g, g.kernel_h * g.kernel_w)
    if refusal:
        return plan_v1("backward_data", g, refusal)
    phases = [(ph, pw) for ph, pw in _data_phases(g) if ph.taps and pw.taps]
    largest = max((ph.count * pw.count for ph, pw in phases), default=1)
    tile, reason = choose_tile(g.c_in, g.batch * largest)
    executed = sum(_executed(tile, g.c_in, g.batch * ph.count * pw.count, g.c_out * len(ph.taps) * len(pw.taps))
                   for ph, pw in phases)
    if g.stride_h * g.stride_w > 1:
        reason += f", {g.stride_h}x{g.stride_w} stride phases"
    return Plan("backward_data", 2, "conv2d_gemm_v2", tile, len(phases), 1, _macs(g) / max(executed, 1), reason)


def conv2d_backward_data_v2(weight, grad_output, g, plan: Plan):
    device = device_of(grad_output)
    xp = array_module(weight)
    phases = _data_phases(g)
    every_pixel_reached = all(ph.taps and pw.taps for ph, pw in phases) and len(phases) == g.stride_h * g.stride_w
    # Pixels no tap reaches (a phase without taps, or one past every window) have zero gradient.
    grad_input = (empty if every_pixel_reached else zeros)(g.input_shape, np.float32, device)
    w = contiguous(weight).reshape(g.c_out, g.c_in, g.kernel_h * g.kernel_w)
    grad_output = contiguous(grad_output)
    for ph, pw in phases:
        if not (ph.taps and pw.taps):
            continue
        taps = [(i * g.kernel_w + j, -sh, -sw) for i, sh in ph.taps for j, sw in pw.taps]
        n_taps = len(taps)
        # A = the weight as C_in x (C_out, phase taps): row ci, column co*n_taps + t.
        index = xp.asarray(np.array([t[0] for t in taps], np.intp))
        a = contiguous(w[:, :, index].transpose(1, 0, 2)).reshape(g.c_in, g.c_out * n_taps)
        a, pitch = _aligned_rows(a, g.c_out * n_taps)
        offsets = tuple(v for _, dh, dw in taps for v in (dh, dw))
        _launch_lattice(plan.tile, a, pitch, grad_output, _tap_offsets(offsets, device), n_taps, None, grad_input,
                        g.c_in, g.c_out, (g.out_h, g.out_w), (g.batch, ph.count, pw.count), (1, 1),
                        (ph.origin, pw.origin), (g.height, g.width), (g.stride_h, g.stride_w), (ph.first, pw.first),
                        False)
    return grad_input


# --------------------------------------------------------------------------------------------
# Backward-filter: conv2d_backward_filter_v2 into a split-K workspace, then a fixed-order reduce.


def _filter_splits(tile, g) -> int:
    k_tiles = math.ceil(g.batch * g.out_h * g.out_w / BK)
    tiles = math.ceil(g.c_out / tile[0]) * math.ceil(g.patch_size / tile[1])
    target = SMS * TILES[tile][1] * WAVES
    by_memory = max(1, WORKSPACE_BYTES // (4 * g.c_out * g.patch_size))
    return max(1, min(k_tiles, math.ceil(target / tiles), by_memory))


FILTER_TILES = ((128, 128), (128, 64), (64, 128))  # 32x128 would spill: 4 columns x 3 registers x 4 runs


def plan_backward_filter(g) -> Plan:
    depth = g.batch * g.out_h * g.out_w
    refusal = _v2_refusal(g, g.kernel_h * g.kernel_w)
    if refusal:
        return plan_v1("backward_filter", g, refusal)
    # Split K fills the GPU whatever the tile, so pick the tile that wastes least padding.
    tile = min(FILTER_TILES, key=lambda t: (_executed(t, g.c_out, g.patch_size, BK) / FFMA_SHARE[t], -t[0] * t[1]))
    splits = _filter_splits(tile, g)
    k_per_split = _padded(math.ceil(depth / splits), BK)
    splits = math.ceil(depth / k_per_split)
    executed = _padded(g.c_out, tile[0]) * _padded(g.patch_size, tile[1]) * splits * k_per_split
    reason = f"least padding of {g.c_out}x{g.patch_size}; K split to fill {WAVES} waves of {SMS} SMs"
    return Plan("backward_filter", 2, "conv2d_backward_filter_v2", tile, 1, splits, _macs(g) / executed, reason)


def conv2d_backward_filter_v2(x, grad_output, g, plan: Plan, grad_weight):
    device = device_of(x)
    depth = g.batch * g.out_h * g.out_w
    k_per_split = _padded(math.ceil(depth / plan.splits), BK)
    bm, bn = plan.tile
    size = g.c_out * g.patch_size
    partials = grad_weight if plan.splits == 1 else empty((plan.splits, size), np.float32, device)
    grid = (math.ceil(g.patch_size / bn), math.ceil(g.c_out / bm), plan.splits)
    kernels.launch("conv2d_backward_filter", f"conv2d_backward_filter_v2_{bm}x{bn}", grid, TILES[plan.tile][0],
                   (contiguous(x), contiguous(grad_output), _tap_offsets(_forward_taps(g), device), partials,
                    g.batch, g.c_in, g.height, g.width, g.c_out, g.kernel_h * g.kernel_w, g.stride_h, g.stride_w,
                    g.pad_top, g.pad_left, g.out_h, g.out_w, k_per_split))
    if plan.splits > 1:
        kernels.launch("conv2d_backward_filter", "conv2d_split_k_reduce_v2", kernels.blocks_for(size), kernels.BLOCK,
                       (partials, grad_weight, plan.splits, size))
    return grad_weight

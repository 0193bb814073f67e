"""Version 2 of the convolution kernels: planning and launching the block-tile GEMM core of
``kernels_cu/gemm_core.cuh`` (see ``conv_tiles.cuh`` for how a convolution becomes its GEMMs).

A *plan* is decided in Python per shape, before anything is launched: the tile (128x128 and the
narrow 128x64, 64x128 and 32x128; a direct kernel for at most 4 rows), from a small cost model of waves on an H100/H200
(:data:`SMS` SMs, the resident blocks each tile's launch bounds allow); for backward-filter the
K split that fills the GPU :data:`WAVES` deep; for backward-data the stride_h x stride_w output
phases, each meeting only the kernel taps that land on it. :func:`plan` returns the decision
with the useful share of the multiply-adds it executes (tile padding and zero taps are the
waste), which ``gpuconv bench`` prints; shapes the v2 kernels cannot take (more than
:data:`MAX_TAPS` kernel taps, tensors past 32-bit offsets) are planned on version 1, with the
reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..device import _fresh, contiguous, device_of, empty, zeros

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
# conv2d_gemm_narrow_v2: a direct kernel for at most 4 rows (C_in 1-4 in backward-data, C_out
# 1-4 forward), one thread per pixel: planned as this pseudo-tile.
NARROW_TILE = (4, 256)
# Measured by `gpuconv check-kernels --sass` (hot-loop FFMA share on sm_90): the cost model's
# price of a tile's overhead.
FFMA_SHARE = {(128, 128): 0.81, (128, 64): 0.81, (64, 128): 0.75, (32, 128): 0.65}
# The tiles whose kernels read A with 32-bit loads, at any pitch (conv2d_gemm.cu's VECTOR_A_*,
# and the narrow kernel): the forward pass gives them the weights as they are, with no re-layout
# launch; the large tiles' 128-bit loads need K % 4 == 0 and 16-byte alignment (see NOTES).
SCALAR_A_TILES = frozenset({(64, 128), (32, 128), NARROW_TILE})
# The tiles whose backward-data GEMM reads the OIHW weight in place along C_out
# (conv2d_gemm_v2_<tile>_transposed_weight: 32-bit loads, a tap table lookup per K row; the
# narrow kernel's conv2d_gemm_narrow_v2_transposed_weight stages its A so), with no
# per-call transposed re-layout launch. The large tiles keep 128-bit loads of the re-laid copy:
# in place, 128x128 spills 16 B and 128x64 loses 4 points of FFMA share (benchmarks/NOTES.md).
IN_PLACE_DATA_TILES = frozenset({(64, 128), (32, 128), NARROW_TILE})
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
    (fewer loads per multiply-add). M <= 64 takes one of the small tiles: a 128-row one would
    waste half its rows, and only the small ones read unpadded weights (:data:`SCALAR_A_TILES`:
    no re-layout launch for LeNet's K = 25 and 150, even at a batch so small that one wave of
    any tile is enough)."""
    if rows <= NARROW_TILE[0]:
        return NARROW_TILE, f"M = {rows} <= {NARROW_TILE[0]}: the direct narrow kernel"
    candidates = [t for t in TILES if t[0] <= 64] if rows <= 64 else TILES
    best = min(sorted(candidates, key=lambda t: -t[0] * t[1]), key=lambda t: _cost(t, rows, columns))
    if best == (128, 128):
        return best, "large M and N"
    if best[0] < 128 and rows <= best[0]:
        return best, f"M = {rows} fits {best[0]} rows"
    return best, "fewer warps on the busiest SM than 128x128"


def _padded(count: int, step: int) -> int:
    return math.ceil(count / step) * step


def _executed(tile, rows: int, columns: int, depth: int) -> int:
    if tile == NARROW_TILE:  # 4 accumulators a pixel, every tap that lands inside (borders skip)
        return NARROW_TILE[0] * columns * depth
    return _padded(rows, tile[0]) * _padded(columns, tile[1]) * _padded(depth, BK)


def _weight_rows(weight, g, rows_taps, cols_taps, transpose: bool, tile=None):
    """The A operand of conv2d_gemm_v2 on ``tile`` (None: one with 128-bit loads) from an OIHW weight: rows C_out (C_in when
    ``transpose``), columns (channel, tap) over the tap grid ``rows_taps`` x ``cols_taps``
    ((first, step, count) along each axis); returns it with its pitch.

    The forward weight as it is where the tile reads A with 32-bit loads (:data:`SCALAR_A_TILES`),
    or where it already suits 128-bit loads (K % 4 == 0, 16-byte aligned). Otherwise a kernel
    re-lays it with the pitch a multiple of 4 and zeros past K (a kernel, not an array operation,
    so that a CUDA graph replays it after each weight update); backward-data's transposed,
    per-phase weight always is such a copy (asked for only by tiles outside
    :data:`IN_PLACE_DATA_TILES`, whose kernels read the OIHW weight along C_out in place)."""
    n_taps = rows_taps[2] * cols_taps[2]
    rows, depth = (g.c_in, g.c_out * n_taps) if transpose else (g.c_out, g.c_in * n_taps)
    weight = contiguous(weight)
    if not transpose and n_taps == g.kernel_h * g.kernel_w:
        if tile in SCALAR_A_TILES or (depth % 4 == 0 and _address(weight) % 16 == 0):
            return weight.reshape(rows, depth), depth
    pitch = _padded(depth, 4)
    out = empty((rows, pitch), np.float32, device_of(weight))
    kernels.launch("conv2d_gemm", "conv2d_weight_rows_v2", kernels.grid_stride_blocks(rows * pitch), kernels.BLOCK,
                   (weight, out, g.c_out, g.c_in, g.kernel_h, g.kernel_w, rows_taps[2], cols_taps[2], rows_taps[0],
                    rows_taps[1], cols_taps[0], cols_taps[1], int(transpose), pitch))
    return out, pitch


def _address(a) -> int:
    interface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return interface["data"][0]


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


def _lattice_family(tile) -> str:
    return "conv2d_gemm_narrow_v2" if tile == NARROW_TILE else "conv2d_gemm_v2"


def _lattice_kernel(tile) -> str:
    return _lattice_family(tile) if tile == NARROW_TILE else f"conv2d_gemm_v2_{tile[0]}x{tile[1]}"


def _launch_lattice(tile, a, a_layout, src, tap_grid, n_taps, bias, dst, rows, channels, src_hw, lattice, src_step,
                    src_origin, dst_hw, dst_step, dst_origin, relu: bool, kernel=None):
    """One lattice GEMM launch; ``a_layout``: the kernel's last arguments, which say how it reads
    ``a`` (the pitch of a row-major A, or the weight's kernel taps for ``kernel`` =
    ``..._transposed_weight``)."""
    bm, bn = tile
    batch, lattice_h, lattice_w = lattice
    grid = (math.ceil(batch * lattice_h * lattice_w / bn), math.ceil(rows / bm))
    has_bias = bias is not None
    if bias is None:
        bias = dst  # never read
    kernels.launch("conv2d_gemm", kernel or _lattice_kernel(tile), grid, bn if tile == NARROW_TILE else TILES[tile][0],
                   (a, src, bias, dst, rows, channels, n_taps, *tap_grid, *src_hw, batch, lattice_h, lattice_w,
                    *src_step, *src_origin, *dst_hw, *dst_step, *dst_origin, int(has_bias), int(relu), *a_layout))


def _forward_taps(g) -> tuple[int, ...]:
    """Taps (i*dil_h, j*dil_w): the grid of kernel_w columns from (0, 0) in steps of the dilation."""
    return g.kernel_w, 0, g.dilation_h, 0, g.dilation_w


def plan_forward(g) -> Plan:
    refusal = _v2_refusal(g, g.kernel_h * g.kernel_w)
    if refusal:
        return plan_v1("forward", g, refusal)
    columns = g.batch * g.out_h * g.out_w
    tile, reason = choose_tile(g.c_out, columns)
    useful = _macs(g) / _executed(tile, g.c_out, columns, g.patch_size)
    return Plan("forward", 2, _lattice_family(tile), tile, 1, 1, useful, reason)


def conv2d_forward_v2(x, weight, bias, g, relu: bool, plan: Plan):
    out = empty(g.output_shape, np.float32, device_of(x))
    a, pitch = _weight_rows(weight, g, (0, 1, g.kernel_h), (0, 1, g.kernel_w), transpose=False, tile=plan.tile)
    _launch_lattice(plan.tile, a, (pitch,), contiguous(x), _forward_taps(g), g.kernel_h * g.kernel_w,
                    None if bias is None else contiguous(bias), out, g.c_out, g.c_in, (g.height, g.width),
                    (g.batch, g.out_h, g.out_w), (g.stride_h, g.stride_w), (-g.pad_top, -g.pad_left),
                    (g.out_h, g.out_w), (1, 1), (0, 0), relu)
    return out


def plan_relu_max_pool2x2(g, pool_out, pool_padding) -> Plan | str:
    """conv2d_relu_max_pool2x2_v2 for a convolution of geometry ``g`` followed by a ReLU and a
    2x2/2 max-pool of output ``pool_out`` (H, W) and ``pool_padding``: the plan, or why the
    fused kernel cannot take it (the caller then runs the unfused kernels).

    Its GEMM has 4 columns per pool window (conv_pool_epilogue.cuh), on the tile
    :func:`choose_tile` picks for that N, the 32x128 one where it picks the narrow kernel.
    """
    forward = plan_forward(g)
    if forward.version != 2:
        return forward.reason
    columns = 4 * g.batch * pool_out[0] * pool_out[1]
    if columns > INT_LIMIT:
        return "4 GEMM columns per pool window pass 32-bit offsets"
    tile, reason = choose_tile(g.c_out, columns)
    if tile == NARROW_TILE:
        tile, reason = (32, 128), f"M = {g.c_out}: the smallest GEMM tile (no fused narrow kernel)"
    useful = _macs(g) / _executed(tile, g.c_out, columns, g.patch_size)
    return Plan("forward_relu_max_pool", 2, "conv2d_relu_max_pool2x2_v2", tile, 1, 1, useful, reason)


def conv2d_relu_max_pool2x2_v2(x, weight, bias, g, pool_out, pool_padding, plan: Plan):
    """(out, indices) of max_pool2d(relu(conv2d(x, weight, bias)), 2, 2, pool_padding, ...) as
    planned by :func:`plan_relu_max_pool2x2`: one launch, the convolution output never stored."""
    device = device_of(x)
    out = empty((g.batch, g.c_out, *pool_out), np.float32, device)
    indices = empty(out.shape, np.int32, device)
    a, pitch = _weight_rows(weight, g, (0, 1, g.kernel_h), (0, 1, g.kernel_w), transpose=False, tile=plan.tile)
    bm, bn = plan.tile
    grid = (math.ceil(4 * g.batch * pool_out[0] * pool_out[1] / bn), math.ceil(g.c_out / bm))
    kernels.launch("conv2d_gemm", f"conv2d_relu_max_pool2x2_v2_{bm}x{bn}", grid, TILES[plan.tile][0],
                   (a, contiguous(x), out if bias is None else contiguous(bias), out, indices, g.c_out, g.c_in,
                    g.kernel_h * g.kernel_w, *_forward_taps(g), g.height, g.width, g.batch, g.out_h, g.out_w,
                    g.stride_h, g.stride_w, -g.pad_top, -g.pad_left, *pool_out, *pool_padding, int(bias is not None),
                    pitch))
    return out, indices


@dataclass(frozen=True)
class _Phase:
    """The input pixels y = first + stride*q (q < count) along one axis, and the kernel taps that
    reach them: tap i with output row oh = q + origin - shift."""

    first: int
    count: int
    origin: int
    taps: tuple  # (i, shift) pairs, both arithmetic progressions in i

    def tap_progression(self) -> tuple[tuple[int, int, int], tuple[int, int]]:
        """((first i, step of i, taps), (first shift, step of shift))."""
        i0, s0 = self.taps[0]
        if len(self.taps) == 1:
            return (i0, 1, 1), (s0, 0)
        i1, s1 = self.taps[1]
        return (i0, i1 - i0, len(self.taps)), (s0, s1 - s0)


def _phases(size: int, out_size: int, kernel: int, stride: int, pad: int, dilation: int) -> list[_Phase]:
    """The ``stride`` output phases of the input gradient along one axis.

    y + pad - i*dilation = stride*oh: the phase r = (y + pad) mod stride meets the taps with
    i*dilation = r (mod stride), at oh = (y + pad - r)/stride - (i*dilation - r)/stride; those i
    step by stride/gcd(stride, dilation), their shifts by dilation/gcd.
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
    if tile in IN_PLACE_DATA_TILES:
        reason += ", weight read in place"
    return Plan("backward_data", 2, _lattice_family(tile), tile, len(phases), 1, _macs(g) / max(executed, 1), reason)


def conv2d_backward_data_v2(weight, grad_output, g, plan: Plan):
    phases = _data_phases(g)
    reached = [(ph, pw) for ph, pw in phases if ph.taps and pw.taps]
    # Pixels no tap reaches (a phase without taps, or one past every window) have zero gradient.
    every_pixel = len(reached) == len(phases) == g.stride_h * g.stride_w
    grad_input = (empty if every_pixel else zeros)(g.input_shape, np.float32, device_of(grad_output))
    grad_output = contiguous(grad_output)
    in_place = plan.tile in IN_PLACE_DATA_TILES
    kernel = f"{_lattice_kernel(plan.tile)}_transposed_weight" if in_place else None
    if in_place:
        weight = contiguous(weight)
    for ph, pw in reached:
        (rows_taps, (shift_h, shift_h_step)), (cols_taps, (shift_w, shift_w_step)) = ph.tap_progression(), pw.tap_progression()
        # A = the weight as C_in x (C_out, phase taps); B gathers grad_out at (q - shift, r - shift).
        if in_place:
            a, a_layout = weight, (g.kernel_h, g.kernel_w, rows_taps[0], rows_taps[1], cols_taps[0], cols_taps[1])
        else:
            a, pitch = _weight_rows(weight, g, rows_taps, cols_taps, transpose=True, tile=plan.tile)
            a_layout = (pitch,)
        tap_grid = (cols_taps[2], -shift_h, -shift_h_step, -shift_w, -shift_w_step)
        _launch_lattice(plan.tile, a, a_layout, grad_output, tap_grid, rows_taps[2] * cols_taps[2], None, grad_input,
                        g.c_in, g.c_out, (g.out_h, g.out_w), (g.batch, ph.count, pw.count), (1, 1),
                        (ph.origin, pw.origin), (g.height, g.width), (g.stride_h, g.stride_w), (ph.first, pw.first),
                        False, kernel)
    return grad_input


# --------------------------------------------------------------------------------------------
# Backward-filter: conv2d_backward_filter_v2 into a split-K workspace, then a fixed-order reduce.


def _filter_splits(tile, g) -> int:
    k_tiles = math.ceil(g.batch * g.out_h * g.out_w / BK)
    tiles = math.ceil(g.c_out / tile[0]) * math.ceil(g.patch_size / tile[1])
    target = SMS * TILES[tile][1] * WAVES
    by_memory = max(1, WORKSPACE_BYTES // (4 * g.c_out * (g.patch_size + 1)))
    return max(1, min(k_tiles, math.ceil(target / tiles), by_memory))


FILTER_TILES = ((128, 128), (128, 64), (64, 128))  # 32x128 would spill: 4 columns x 3 registers x 4 runs
# Hot-loop FFMA share of conv2d_backward_filter_v2 on sm_90 (`gpuconv check-kernels --sass`), for
# C_in % 4 == 0 (the _c4 kernels: a thread's 4 columns are one tap of 4 channels, one bounds test)
# and for other C_in (a bounds test per column).
FILTER_FFMA_SHARE = {
    True: {(128, 128): 0.82, (128, 64): 0.79, (64, 128): 0.80},
    False: {(128, 128): 0.80, (128, 64): 0.77, (64, 128): 0.76},
}


def _same_tap_runs(g) -> bool:
    return g.c_in % 4 == 0


def plan_backward_filter(g, last_block_reduce: bool = True) -> Plan:
    """Version 3 (``last_block_reduce``): the last block of each output tile to finish adds the
    splits; version 2: a second kernel does."""
    depth = g.batch * g.out_h * g.out_w
    refusal = _v2_refusal(g, g.kernel_h * g.kernel_w)
    if refusal:
        return plan_v1("backward_filter", g, refusal)
    # Split K fills the GPU whatever the tile, so pick the tile that wastes least padding.
    share = FILTER_FFMA_SHARE[_same_tap_runs(g)]
    tile = min(FILTER_TILES, key=lambda t: (_executed(t, g.c_out, g.patch_size, BK) / share[t], -t[0] * t[1]))
    splits = _filter_splits(tile, g)
    k_per_split = _padded(math.ceil(depth / splits), BK)
    splits = math.ceil(depth / k_per_split)
    executed = _padded(g.c_out, tile[0]) * _padded(g.patch_size, tile[1]) * splits * k_per_split
    reason = f"least padding of {g.c_out}x{g.patch_size}; K split to fill {WAVES} waves of {SMS} SMs"
    if _same_tap_runs(g):
        reason += f"; C_in {g.c_in} in runs of 4 channels"
    if splits > 1:
        reason += "; the last block of a tile adds its splits" if last_block_reduce else "; a reduce kernel adds the splits"
    return Plan("backward_filter", 3 if last_block_reduce else 2, "conv2d_backward_filter_v2", tile, 1, splits,
                _macs(g) / executed, reason)


def filter_walk_steps(g) -> tuple[int, ...]:
    """conv_tiles.cuh's PixelSteps for this geometry: what one step of BK output pixels adds to a
    backward-filter thread's pixel offsets, where its carries happen and what they add."""
    plane = g.out_h * g.out_w
    d_image, rest = divmod(BK, plane)
    d_h, d_w = divmod(rest, g.out_w)
    x_image = g.c_in * g.height * g.width
    d_ih, d_iw = d_h * g.stride_h, d_w * g.stride_w
    ih_wrap, iw_wrap = g.out_h * g.stride_h, g.out_w * g.stride_w
    return (d_image * g.c_out * plane + rest, d_image * x_image + d_ih * g.width + d_iw, d_ih, d_iw,
            ih_wrap - g.pad_top, iw_wrap - g.pad_left, ih_wrap, iw_wrap, (g.c_out - 1) * plane,
            g.stride_h * g.width - iw_wrap, x_image - ih_wrap * g.width)


def filter_kernel(plan: Plan, g) -> str:
    """The entry point of conv2d_backward_filter.cu that runs ``plan``."""
    bm, bn = plan.tile
    return f"conv2d_backward_filter_v2_{bm}x{bn}" + ("_c4" if _same_tap_runs(g) else "")


# Per device, the split-K tickets of conv2d_backward_filter_v2 (one int per output tile): zero
# when no launch runs, since the last block of a tile resets its ticket. Kept across calls (no
# zero-fill per call, no allocation in a graph capture after the first); dropped when a launch
# fails, which may leave tickets taken.
_TICKETS: dict = {}


def _tickets(device: str, count: int):
    tickets = _TICKETS.get(device)
    if tickets is None or tickets.size < count:
        tickets = _fresh(_padded(max(count, 1), 1024), np.int32, device)
        tickets.fill(0)
        _TICKETS[device] = tickets
    return tickets


def conv2d_backward_filter_v2(x, grad_output, g, plan: Plan, grad_weight, grad_bias=None):
    """grad_weight (and grad_bias, when given: the bias gradient from the same launch, summed by
    the blocks of the first column tile) as ``plan`` says; bit-identical from run to run, and the
    same bits whether a reduce kernel (version 2) or the last block of each tile (3) adds the
    splits."""
    device = device_of(x)
    depth = g.batch * g.out_h * g.out_w
    k_per_split = _padded(math.ceil(depth / plan.splits), BK)
    bm, bn = plan.tile
    size = g.c_out * g.patch_size
    stride = size + (g.c_out if grad_bias is not None else 0)  # one split's weights, then its biases
    if plan.splits == 1:
        partials, bias_partials = grad_weight, grad_bias
    else:
        workspace = empty((plan.splits * stride,), np.float32, device)
        partials, bias_partials = workspace, workspace[size:]
    grid = (math.ceil(g.patch_size / bn), math.ceil(g.c_out / bm), plan.splits)
    has_bias = grad_bias is not None
    last_block_reduce = plan.version == 3
    tickets = _tickets(device, grid[0] * grid[1])
    try:
        kernels.launch("conv2d_backward_filter", filter_kernel(plan, g), grid, TILES[plan.tile][0],
                       (contiguous(x), contiguous(grad_output), partials, bias_partials if has_bias else partials,
                        *g.kernel_sizes(), k_per_split, stride, int(has_bias), grad_weight,
                        grad_bias if has_bias else grad_weight, tickets, int(last_block_reduce), *filter_walk_steps(g)))
    except BaseException:
        _TICKETS.pop(device, None)
        raise
    if plan.splits > 1 and not last_block_reduce:
        kernels.launch("conv2d_backward_filter", "conv2d_split_k_reduce_v2", kernels.blocks_for(stride), kernels.BLOCK,
                       (partials, grad_weight, grad_bias if has_bias else grad_weight, plan.splits, stride, size))
    return grad_weight

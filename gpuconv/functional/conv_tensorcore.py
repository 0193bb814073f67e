"""The tensor-core convolutions (``kernels_cu/conv2d_tensorcore.cu``) on 'cuda' and 'emu':
TF32 or BF16 operands, FP32 accumulate. ``functional.conv`` dispatches here when a float32
convolution's precision (``gpuconv.precision``) is not 'fp32'; its checks have run by then."""
from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..device import array_module, contiguous, device_of, empty, zero_, zeros
from ._checks import output_array

TOPIC = "conv2d_tensorcore"
# The block tile of tensorcore_gemm.cuh: BM x BN outputs, BK values of K per step, 128 threads.
TILE_M, TILE_N, TILE_K, THREADS = 64, 64, 16, 128
# Backward-filter splits K = batch*H_out*W_out across blocks until about this many are in flight.
TARGET_BLOCKS = 256
_PRECISION_CODE = {"tf32": 0, "bf16": 1}
_MAX_GRID_Y = 65535
_INT_LIMIT = np.iinfo(np.int32).max - max(TILE_M, TILE_N, TILE_K)


# mma.sync m16n8k8 TF32, m16n8k16 BF16 and cp.async need sm_80.
MIN_COMPUTE_CAPABILITY = 80


def _compute_capability() -> int:
    """The current CUDA device's compute capability as an int (e.g. 90 for sm_90)."""
    return int(array_module("cuda").cuda.Device().compute_capability)


def _check_device(device: str, precision: str) -> None:
    """A GPU older than Ampere would fail inside NVRTC on the tensor-core instructions: say so first."""
    if device == "cuda" and (capability := _compute_capability()) < MIN_COMPUTE_CAPABILITY:
        raise RuntimeError(
            f"precision={precision!r} runs tensor-core kernels that need a GPU of compute capability 8.0 or "
            f"newer (Ampere); this GPU is sm_{capability}: use precision='fp32'"
        )


def _check_limits(g, rows: int) -> None:
    """The kernels count GEMM indices in 32-bit ints, with a tile of headroom for the unmasked
    indices of the last tile, and put the ``rows`` (M) tiles in gridDim.y."""
    largest = max(g.batch * g.c_in * g.height * g.width, g.batch * g.c_out * g.out_h * g.out_w,
                  g.c_out * g.patch_size, g.batch * g.height * g.width)
    if largest > _INT_LIMIT:
        raise ValueError(
            f"input {g.input_shape} with weight {g.weight_shape} is too large for the tensor-core conv2d kernels: "
            f"every tensor's element count must be below 2^31 - {max(TILE_M, TILE_N, TILE_K)}"
        )
    if math.ceil(rows / TILE_M) > _MAX_GRID_Y:
        raise ValueError(
            f"input {g.input_shape} with weight {g.weight_shape} has too many channels for the tensor-core conv2d "
            f"kernels: at most {_MAX_GRID_Y * TILE_M} (gridDim.y <= {_MAX_GRID_Y} tiles of {TILE_M})"
        )


def conv2d(x, weight, bias, g, relu: bool, precision: str):
    device = device_of(x)
    _check_device(device, precision)
    _check_limits(g, g.c_out)
    out = empty(g.output_shape, np.float32, device)
    if bias is None:
        bias = zeros((g.c_out,), np.float32, device)
    grid = (math.ceil(g.batch * g.out_h * g.out_w / TILE_N), math.ceil(g.c_out / TILE_M))
    kernels.launch(TOPIC, "conv2d_forward_tc", grid, THREADS,
                   (contiguous(x), contiguous(weight), contiguous(bias), out, *g.kernel_sizes(), int(relu),
                    _PRECISION_CODE[precision]))
    return out


def conv2d_input(weight, grad_output, g, precision: str):
    _check_device(device_of(grad_output), precision)
    _check_limits(g, g.c_in)
    grad_input = empty(g.input_shape, np.float32, device_of(grad_output))
    grid = (math.ceil(g.batch * g.height * g.width / TILE_N), math.ceil(g.c_in / TILE_M))
    kernels.launch(TOPIC, "conv2d_backward_data_tc", grid, THREADS,
                   (contiguous(weight), contiguous(grad_output), grad_input, *g.kernel_sizes(),
                    _PRECISION_CODE[precision]))
    return grad_input


def conv2d_weight(x, grad_output, g, precision: str, out=None):
    _check_device(device_of(x), precision)
    _check_limits(g, g.c_out)
    # Blocks add their partial sums into a zeroed result (split-K over batch*H_out*W_out).
    grad_weight = zero_(output_array(out, "out", g.weight_shape, np.float32, device_of(x)))
    depth = g.batch * g.out_h * g.out_w
    tiles = math.ceil(g.c_out / TILE_M) * math.ceil(g.patch_size / TILE_N)
    k_tiles = math.ceil(depth / TILE_K)
    splits = min(k_tiles, max(1, TARGET_BLOCKS // tiles))
    k_per_split = math.ceil(k_tiles / splits) * TILE_K
    grid = (math.ceil(g.patch_size / TILE_N), math.ceil(g.c_out / TILE_M), math.ceil(depth / k_per_split))
    kernels.launch(TOPIC, "conv2d_backward_filter_tc", grid, THREADS,
                   (contiguous(x), contiguous(grad_output), grad_weight, *g.kernel_sizes(), k_per_split,
                    _PRECISION_CODE[precision]))
    return grad_weight

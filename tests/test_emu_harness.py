"""The emulated CUDA device itself: known kernels give NumPy's answers in every thread order, and
each classic kernel defect is caught (tests/emu_kernels/harness.cu)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuconv import emu, emu_racecheck

KERNELS = Path(__file__).with_name("emu_kernels")
HARNESS = KERNELS / "harness.cu"
BROKEN = KERNELS / "broken.cu"
ORDERS = ("forward", "reverse", "random")

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no host C++ compiler for the emulated device"
)


@pytest.fixture(scope="module")
def harness():
    return emu.module_for(HARNESS)


@pytest.fixture(params=ORDERS)
def order(request):
    with emu.thread_order(request.param, seed=7):
        yield request.param


def run(harness, kernel, grid, block, *args, shared_mem=0):
    harness.get_function(kernel)(grid, block, args, shared_mem=shared_mem)


def ceil_div(a, b):
    return -(-a // b)


def matmul_loops(a, b):
    m, k = a.shape
    n = b.shape[1]
    c = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            c[i, j] = sum(float(a[i, t]) * float(b[t, j]) for t in range(k))
    return c


def run_matmul(harness, kernel, a, b):
    (m, k), n = a.shape, b.shape[1]
    c = np.zeros((m, n), np.float32)
    run(harness, kernel, (ceil_div(n, 16), ceil_div(m, 16), 1), (16, 16, 1), a, b, c, np.int32(m), np.int32(n), np.int32(k))
    return c


def block_sums_loops(x, block):
    return np.array([sum(float(v) for v in x[s : s + block]) for s in range(0, len(x), block)])


# --- known kernels give the right answer in every order ---


@pytest.mark.parametrize("shape", [(16, 16, 16), (17, 19, 33), (5, 40, 3)], ids=lambda s: "x".join(map(str, s)))
def test_tiled_matmul_matches_loops(harness, order, rng, shape):
    m, n, k = shape
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    np.testing.assert_allclose(run_matmul(harness, "matmul_tiled", a, b), matmul_loops(a, b), rtol=1e-5, atol=1e-5)


def test_shared_tree_reduction_matches_loops(harness, order, rng):
    x = rng.standard_normal(300).astype(np.float32)
    out = np.zeros(3, np.float32)
    run(harness, "block_sum", (3, 1, 1), (128, 1, 1), x, out, np.int32(x.size), shared_mem=128 * 4)
    np.testing.assert_allclose(out, block_sums_loops(x, 128), rtol=1e-5, atol=1e-5)


def test_warp_shuffle_reduction_matches_loops(harness, order, rng):
    x = rng.standard_normal(100).astype(np.float32)
    out = np.zeros(1, np.float32)
    run(harness, "warp_sum", (2, 1, 1), (64, 1, 1), x, out, np.int32(x.size))
    np.testing.assert_allclose(out[0], sum(float(v) for v in x), rtol=1e-5, atol=1e-5)


def test_ballot_and_votes_match_loops(harness, order, rng):
    x = rng.standard_normal(96).astype(np.float32)
    x[32:64] = np.abs(x[32:64]) + 1  # one warp all positive, for __all_sync
    x[64:96] = -np.abs(x[64:96]) - 1  # one all negative, for __any_sync
    warps = x.size // 32
    masks, counts = np.zeros(warps, np.uint32), np.zeros(warps, np.int32)
    any_all = np.zeros(2 * warps, np.int32)
    run(harness, "warp_ballot", (1, 1, 1), (96, 1, 1), x, masks, counts, any_all, np.int32(x.size))
    for w in range(warps):
        lanes = [int(x[32 * w + lane] > 0) for lane in range(32)]
        assert masks[w] == sum(bit << lane for lane, bit in enumerate(lanes))
        assert counts[w] == sum(lanes)
        assert list(any_all[2 * w : 2 * w + 2]) == [int(any(lanes)), int(all(lanes))]


def test_scheduler_resumes_threads_in_the_chosen_order(harness):
    ranks = {}
    for order in ORDERS:
        with emu.thread_order(order, seed=3):
            counter, rank = np.zeros(1, np.int32), np.zeros(64, np.int32)
            run(harness, "arrival_rank", (1, 1, 1), (64, 1, 1), counter, rank)
        ranks[order] = rank
    np.testing.assert_array_equal(ranks["forward"], np.arange(64))
    np.testing.assert_array_equal(ranks["reverse"], np.arange(64)[::-1])
    assert sorted(ranks["random"]) == list(range(64))
    assert not np.array_equal(ranks["random"], np.arange(64))


def test_random_order_is_reproducible_from_its_seed(harness):
    def ranks(seed):
        with emu.thread_order("random", seed=seed):
            counter, rank = np.zeros(1, np.int32), np.zeros(64, np.int32)
            run(harness, "arrival_rank", (1, 1, 1), (64, 1, 1), counter, rank)
        return rank

    np.testing.assert_array_equal(ranks(11), ranks(11))
    assert not np.array_equal(ranks(11), ranks(12))


@pytest.mark.parametrize(
    "variable, statement, current",
    [(emu.ORDER_ENV, emu.thread_order, emu.current_order), (emu.BLOCK_ORDER_ENV, emu.block_order, emu.current_block_order)],
    ids=["threads", "blocks"],
)
def test_order_from_the_environment(monkeypatch, variable, statement, current):
    monkeypatch.setenv(variable, "random:42")
    assert current() == ("random", 42)
    with statement("reverse"):
        assert current() == ("reverse", 0)
    monkeypatch.setenv(variable, "sideways")
    with pytest.raises(ValueError, match=variable):
        current()
    with pytest.raises(ValueError, match="order"), statement("sideways"):
        pass


def test_many_barriers_and_blocks(harness, order):
    out = np.zeros(3, np.float32)
    run(harness, "barrier_loop", (3, 1, 1), (256, 1, 1), out, np.int32(200))
    np.testing.assert_array_equal(out, 200)


# --- defects are caught ---


def test_missing_barrier_in_matmul_is_caught_by_the_order_sweep(harness, rng):
    a = rng.standard_normal((17, 33)).astype(np.float32)
    b = rng.standard_normal((33, 19)).astype(np.float32)
    expected = matmul_loops(a, b)
    wrong = []
    for order in ORDERS:
        with emu.thread_order(order, seed=7):
            c = run_matmul(harness, "matmul_tiled_no_second_sync", a, b)
        wrong.append(not np.allclose(c, expected, rtol=1e-5, atol=1e-5))
    assert any(wrong), "removing a __syncthreads() went unnoticed in every thread order"


def test_missing_barrier_in_tree_reduction_is_caught_by_the_order_sweep(harness, rng):
    x = rng.standard_normal(256).astype(np.float32)
    expected = block_sums_loops(x, 128)
    wrong = []
    for order in ORDERS:
        with emu.thread_order(order, seed=7):
            out = np.zeros(2, np.float32)
            run(harness, "block_sum_no_sync", (2, 1, 1), (128, 1, 1), x, out, np.int32(x.size), shared_mem=128 * 4)
        wrong.append(not np.allclose(out, expected, rtol=1e-5, atol=1e-5))
    assert any(wrong), "removing a __syncthreads() went unnoticed in every thread order"


def test_early_return_before_barrier_is_reported(harness, order):
    y = np.zeros(64, np.float32)
    with pytest.raises(emu.EmuSyncError, match=r"barrier divergence.*63 thread.*\[\(3,0,0\)\].*block \(0, 0, 0\)"):
        run(harness, "early_return_before_barrier", (1, 1, 1), (64, 1, 1), y)
    np.testing.assert_array_equal(y, 0)  # a failed launch leaves the arrays as they were


def test_unwritten_shared_slot_reads_nan_in_every_block(harness, order):
    y = np.zeros((2, 64), np.float32)
    run(harness, "unwritten_shared_slot", (2, 1, 1), (64, 1, 1), y)
    np.testing.assert_array_equal(y[0], np.arange(64))
    np.testing.assert_array_equal(y[1, :63], np.arange(1, 64))
    assert np.isnan(y[1, 63]), "shared memory must be poisoned again before every block"


def test_uninitialised_accumulator_is_far_off(harness, order, rng):
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = np.zeros(32, np.float32)
    run(harness, "uninitialised_accumulator", (1, 1, 1), (32, 1, 1), x, y, np.int32(4))
    assert np.all(np.abs(y) > 1e30), "an uninitialised float should start from the 0xFE.. pattern (-1.7e38)"


@pytest.mark.parametrize(
    "n, offset, pattern",
    [
        (16, 1, (r"after the end of parameter y \(float\*, 16 elements\): byte offset 64 \(element 16\).*"
                 r"thread \(15, 0, 0\)")),
        (16, 5000, r"after the end of parameter y .*element 5000\)"),
        (10, 1, r"write to parameter y \(float\*, 10 elements\): bytes 40\.\.43"),
        (16, -1, r"write to parameter y .*bytes -4\.\.-1"),
        (16, -2000, r"before the start of parameter y .*element -2000\).*thread \(0, 0, 0\)"),
    ],
    ids=["past-end", "far-past-end", "in-slack", "before-start", "far-before-start"],
)
def test_out_of_bounds_write_is_reported(harness, n, offset, pattern):
    x = np.ones(n, np.float32)
    y = np.zeros(n, np.float32)
    with pytest.raises(emu.EmuMemoryError, match=f"kernel out_of_bounds_write: .*{pattern}"):
        run(harness, "out_of_bounds_write", (1, 1, 1), (32, 1, 1), x, y, np.int32(n), np.int32(offset))
    np.testing.assert_array_equal(y, 0)


def test_wild_access_names_the_nearest_array(harness):
    x = np.ones(32, np.float32)
    y = np.zeros(32, np.float32)
    # i + offset overflows int inside the kernel: gigabytes away from y, beyond every guard region.
    pattern = r"invalid memory access at address 0x[0-9a-f]+, -?\d+ bytes from the start of parameter"
    with pytest.raises(emu.EmuMemoryError, match=pattern):
        run(harness, "out_of_bounds_write", (1, 1, 1), (32, 1, 1), x, y, np.int32(32), np.int32(2**31 - 1))


def test_aliased_arguments_share_one_buffer(harness):
    x = np.arange(16, dtype=np.float32)
    run(harness, "out_of_bounds_write", (1, 1, 1), (16, 1, 1), x, x, np.int32(16), np.int32(0))
    np.testing.assert_array_equal(x, np.arange(16))
    buffer = np.zeros(32, np.float32)
    buffer[:16] = np.arange(16)
    run(harness, "out_of_bounds_write", (1, 1, 1), (16, 1, 1), buffer[:16], buffer[16:], np.int32(16), np.int32(0))
    np.testing.assert_array_equal(buffer, np.tile(np.arange(16), 2))


def test_write_to_read_only_array_is_reported(harness):
    x = np.ones(16, np.float32)
    y = np.zeros(16, np.float32)
    y.flags.writeable = False
    with pytest.raises(emu.EmuMemoryError, match="parameter y, a read-only array"):
        run(harness, "out_of_bounds_write", (1, 1, 1), (16, 1, 1), x, y, np.int32(16), np.int32(0))


def test_dynamic_shared_overrun_is_reported(harness):
    x = np.ones(128, np.float32)
    out = np.zeros(1, np.float32)
    with pytest.raises(emu.EmuMemoryError, match="dynamic shared memory at byte 256, past the 256 bytes"):
        run(harness, "block_sum", (1, 1, 1), (128, 1, 1), x, out, np.int32(128), shared_mem=64 * 4)


def test_integer_division_by_zero_is_reported(harness):
    with pytest.raises(emu.EmuError, match=r"kernel integer_divide: integer division by zero .*thread \(0, 0, 0\)"):
        run(harness, "integer_divide", (1, 1, 1), (4, 1, 1), np.ones(4, np.int32), np.int32(0))


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((2.0, np.int64(8)), r"parameter alpha is float, got float 2\.0; pass np\.float32"),
        ((np.float32(2), 8), r"parameter n is long long, got int 8; pass np\.int64"),
        ((np.float64(2), np.int64(8)), r"parameter alpha is float \(float32\), got float64"),
        ((np.float32(2), np.int32(8)), r"parameter n is long long \(int64\), got int32"),
        ((np.float32(2),), r"takes 3 arguments, got 2"),
    ],
    ids=["python-float", "python-int", "float64-scalar", "int32-for-long-long", "missing"],
)
def test_wrongly_typed_scalar_is_refused(harness, args, pattern):
    x = np.ones(8, np.float32)
    with pytest.raises(emu.EmuArgumentError, match=pattern) as info:
        run(harness, "scale", (1, 1, 1), (8, 1, 1), x, *args)
    assert isinstance(info.value, TypeError)
    np.testing.assert_array_equal(x, 1)


@pytest.mark.parametrize(
    "array, pattern",
    [
        (np.ones(8, np.float64), r"parameter x is float\*, got an array of float64 \(8,\)"),
        (np.ones((8, 2), np.float32)[:, 0], r"array for parameter x \(8,\) is not C-contiguous"),
        ([1.0] * 8, r"parameter x is float\*, needs an array, got list"),
    ],
    ids=["dtype", "strided", "list"],
)
def test_wrong_array_is_refused(harness, array, pattern):
    with pytest.raises(emu.EmuArgumentError, match=pattern):
        run(harness, "scale", (1, 1, 1), (8, 1, 1), array, np.float32(2), np.int64(8))


def test_scale_with_exact_types(harness):
    x = np.arange(40, dtype=np.float32)
    run(harness, "scale", (2, 1, 1), (32, 1, 1), x, np.float32(0.5), np.int64(40))
    np.testing.assert_array_equal(x, np.arange(40) * 0.5)


@pytest.mark.parametrize(
    "grid, block, shared_mem, pattern",
    [
        ((1, 1, 1), (1025, 1, 1), 0, r"block\.x must be in \[1, 1024\], got 1025"),
        ((1, 1, 1), (1, 1, 65), 0, r"block\.z must be in \[1, 64\], got 65"),
        ((1, 1, 1), (32, 32, 2), 0, r"block \(32, 32, 2\) has 2048 threads, more than 1024"),
        ((1, 65536, 1), (32, 1, 1), 0, r"grid\.y must be in \[1, 65535\], got 65536"),
        ((2**31, 1, 1), (32, 1, 1), 0, r"grid\.x must be in \[1, 2147483647\]"),
        ((0, 1, 1), (32, 1, 1), 0, r"grid\.x must be in \[1, 2147483647\], got 0"),
        ((1, 1, 1, 1), (32, 1, 1), 0, r"grid must be an int or a tuple of 1 to 3 ints"),
        ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1, r"shared_mem=49153 bytes exceeds the limit of 49152"),
        ((1, 1, 1), (32, 1, 1), -1, r"shared_mem must be a non-negative int"),
    ],
    ids=["block-x", "block-z", "threads", "grid-y", "grid-x", "zero", "rank", "shared", "negative-shared"],
)
def test_bad_launch_shape_is_refused(harness, grid, block, shared_mem, pattern):
    with pytest.raises(emu.EmuLaunchError, match=pattern):
        run(harness, "barrier_loop", grid, block, np.zeros(1, np.float32), np.int32(1), shared_mem=shared_mem)


def test_static_shared_memory_counts_against_the_limit(harness):
    assert harness.get_function("matmul_tiled").static_shared_bytes == 2 * 16 * 16 * 4
    assert harness.get_function("unwritten_shared_slot").static_shared_bytes == 65 * 4
    assert harness.get_function("block_sum").static_shared_bytes == 0
    a = np.zeros((16, 16), np.float32)
    with pytest.raises(emu.EmuLaunchError, match="limit of 47104 .*2048 bytes of static shared memory"):
        run(harness, "matmul_tiled", (1, 1, 1), (16, 16, 1), a, a, a, np.int32(16), np.int32(16), np.int32(16),
            shared_mem=47104 + 1)


def test_opt_in_shared_memory_limit():
    module = emu.module_for(HARNESS)
    function = emu.EmuModule(path=HARNESS).get_function("block_sum")  # a fresh function: its own attribute
    x = np.ones(128, np.float32)
    out = np.zeros(1, np.float32)
    with pytest.raises(emu.EmuLaunchError):
        function((1, 1, 1), (128, 1, 1), (x, out, np.int32(128)), shared_mem=100 * 1024)
    function.max_dynamic_shared_size_bytes = 100 * 1024
    function((1, 1, 1), (128, 1, 1), (x, out, np.int32(128)), shared_mem=100 * 1024)
    assert out[0] == 128
    with pytest.raises(emu.EmuLaunchError, match="max_dynamic_shared_size_bytes"):
        function.max_dynamic_shared_size_bytes = 228 * 1024
    assert module.get_function("block_sum").max_dynamic_shared_size_bytes == emu.DEFAULT_SHARED_LIMIT


def test_ucontext_fallback_runs_the_same_kernels(tmp_path, monkeypatch, rng):
    monkeypatch.setenv(emu.CACHE_ENV, str(tmp_path))
    module = emu.EmuModule(path=HARNESS, options=("-DGPUCONV_EMU_UCONTEXT",))
    a = rng.standard_normal((17, 33)).astype(np.float32)
    b = rng.standard_normal((33, 19)).astype(np.float32)
    np.testing.assert_allclose(run_matmul(module, "matmul_tiled", a, b), matmul_loops(a, b), rtol=1e-5, atol=1e-5)
    x = rng.standard_normal(100).astype(np.float32)
    out = np.zeros(1, np.float32)
    run(module, "warp_sum", (2, 1, 1), (64, 1, 1), x, out, np.int32(x.size))
    np.testing.assert_allclose(out[0], sum(float(v) for v in x), rtol=1e-5, atol=1e-5)
    with pytest.raises(emu.EmuSyncError, match="barrier divergence"):
        run(module, "early_return_before_barrier", (1, 1, 1), (64, 1, 1), np.zeros(64, np.float32))


# --- compilation and the cache ---


def test_compile_error_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv(emu.CACHE_ENV, str(tmp_path))
    with pytest.raises(emu.EmuCompileError, match=r"^emu_kernels/broken\.cu:6: error: .*undeclared_value"):
        emu.EmuModule(path=BROKEN)
    assert not list(tmp_path.iterdir()), "a failed compilation must leave nothing in the cache"


def test_shared_library_cache_is_hit_the_second_time(tmp_path, monkeypatch):
    monkeypatch.setenv(emu.CACHE_ENV, str(tmp_path))
    source = 'extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }\n'
    first = emu.EmuModule(source=source, name="twice.cu")
    second = emu.EmuModule(source=source, name="twice.cu")
    assert first.compiled and not second.compiled
    assert first.library_path == second.library_path and first.library_path.parent == tmp_path
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]
    x = np.ones(4, np.float32)
    second.get_function("twice")((1, 1, 1), (4, 1, 1), (x,))
    np.testing.assert_array_equal(x, 2)
    changed = emu.EmuModule(source=source.replace("2.0f", "3.0f"), name="twice.cu")
    assert changed.compiled and changed.library_path != first.library_path


def test_module_for_is_memoised_per_path():
    assert emu.module_for(HARNESS) is emu.module_for(str(HARNESS))


def test_unknown_kernel_name(harness):
    with pytest.raises(KeyError, match="has no extern .* kernel named"):
        harness.get_function("nope")


# --- intrinsics, one by one (tests/emu_kernels/intrinsics.cu) ---


@pytest.fixture(scope="module")
def intrinsics():
    return emu.module_for(KERNELS / "intrinsics.cu")


def shuffle_loops(x, width, delta):
    """CUDA's documented __shfl*_sync results for every lane, width and delta."""
    out = np.zeros((len(x), 4), np.int64)
    for t in range(len(x)):
        warp, lane = t - t % 32, t % 32
        start = lane - lane % width
        up = lane - delta if lane - delta >= start else lane
        down = lane + delta if lane + delta < start + width else lane
        xor = lane ^ delta if (lane ^ delta) < start + width else lane
        out[t] = [x[warp + start + (5 * t) % width], x[warp + up], x[warp + down], x[warp + xor]]
    return out


@pytest.mark.parametrize("width, delta", [(32, 1), (32, 5), (8, 3), (8, 9), (4, 2)])
def test_shuffles_follow_cuda_semantics(intrinsics, order, width, delta):
    x = np.arange(100, 164, dtype=np.int32)
    d = np.arange(64, dtype=np.float64) / 4
    out, dout = np.zeros(4 * 64, np.int32), np.zeros(64, np.float64)
    run(intrinsics, "shuffles", (1, 1, 1), (64, 1, 1), x, d, out, dout, np.int32(width), np.int32(delta))
    np.testing.assert_array_equal(out.reshape(64, 4), shuffle_loops(x, width, delta))
    np.testing.assert_array_equal(dout, [d[t ^ 1] for t in range(64)])


def test_shuffle_from_a_lane_outside_the_block_is_nan(harness, order):
    # 48 threads: the second warp has 16 lanes, so its lane 0 adds lane 16's missing value.
    x = np.ones(48, np.float32)
    out = np.zeros(1, np.float32)
    run(harness, "warp_sum", (1, 1, 1), (48, 1, 1), x, out, np.int32(48))
    assert np.isnan(out[0])


def test_block_wide_votes(intrinsics, order):
    out = np.zeros(3 * 96, np.int32)
    run(intrinsics, "block_votes", (1, 1, 1), (96, 1, 1), out)
    expected = [sum(t % 3 == 0 for t in range(96)), 1, 1]
    np.testing.assert_array_equal(out.reshape(96, 3), [expected] * 96)


def test_atomics(intrinsics, order):
    fsum, dsum = np.zeros(1, np.float32), np.zeros(1, np.float64)
    imax, counter, last = np.full(1, -5, np.int32), np.zeros(1, np.uint32), np.full(1, -1, np.int32)
    run(intrinsics, "atomics", (3, 1, 1), (64, 1, 1), fsum, dsum, imax, counter, last)
    assert (fsum[0], dsum[0], imax[0], counter[0]) == (192, 96, max((7 * t) % 50 for t in range(192)), 384)
    assert 0 <= last[0] < 192


def test_math_intrinsics(intrinsics, order, rng):
    x = rng.uniform(-1.5, 1.5, 32).astype(np.float32)
    out = np.zeros(8 * 32, np.float32)
    run(intrinsics, "math", (1, 1, 1), (32, 1, 1), x, out)
    rows = []
    for t, v in enumerate(x.astype(np.float64)):
        rows.append([np.exp(v), np.exp(v), np.log(v + 2), 1 / np.sqrt(v + 2), min(max(v, 0.0), 1.0),
                     float(np.rint(np.float32(10) * np.float32(v))), min(t, 3), max(v, 0.25)])
    np.testing.assert_allclose(out.reshape(32, 8), rows, rtol=1e-6, atol=1e-6)


def test_dynamic_shared_declarations_share_one_poisoned_arena(intrinsics, order):
    out, unwritten = np.zeros(32, np.float32), np.zeros(32, np.float32)
    run(intrinsics, "dynamic_shared_forms", (1, 1, 1), (32, 1, 1), out, unwritten, shared_mem=32 * 32)
    np.testing.assert_array_equal(out, np.arange(32))
    assert np.isnan(unwritten).all()


def test_deadlock_is_reported(intrinsics):
    with pytest.raises(emu.EmuSyncError, match=r"deadlock: .*1 at __syncthreads\(\), 31 at a warp intrinsic \[\(1,0,0\)"):
        run(intrinsics, "warp_deadlock", (1, 1, 1), (32, 1, 1), np.zeros(32, np.float32))


def test_lanes_at_different_warp_intrinsics_are_reported(intrinsics):
    with pytest.raises(emu.EmuSyncError, match=r"warp 0: lane \d+ is at __\w+_sync .* while lane \d+ is at __\w+_sync"):
        run(intrinsics, "warp_disagree", (1, 1, 1), (32, 1, 1), np.zeros(32, np.int32))


def test_fiber_stacks_keep_the_abi_alignment(intrinsics, order):
    ok = np.zeros(64, np.int32)
    run(intrinsics, "stack_alignment", (1, 1, 1), (64, 1, 1), ok)
    np.testing.assert_array_equal(ok, 1)


# --- block order (tests/emu_kernels/races.cu) ---


@pytest.fixture(scope="module")
def races():
    return emu.module_for(KERNELS / "races.cu")


def block_ranks(races, order, seed=0, grid=(2, 3, 4)):
    counter, rank = np.zeros(1, np.int32), np.zeros(int(np.prod(grid)), np.int32)
    with emu.block_order(order, seed=seed):
        run(races, "block_rank", grid, (4, 1, 1), counter, rank)
    return rank


def test_blocks_run_in_the_chosen_order(races):
    n = 24
    np.testing.assert_array_equal(block_ranks(races, "forward"), np.arange(n))
    np.testing.assert_array_equal(block_ranks(races, "reverse"), np.arange(n)[::-1])
    shuffled = block_ranks(races, "random", seed=5)
    assert sorted(shuffled) == list(range(n)) and not np.array_equal(shuffled, np.arange(n))
    np.testing.assert_array_equal(block_ranks(races, "random", seed=5), shuffled)
    assert not np.array_equal(block_ranks(races, "random", seed=6), shuffled)
    assert sorted(block_ranks(races, "random", seed=1, grid=(1000, 1, 1))) == list(range(1000))


def test_block_reading_another_blocks_write_shows_in_reverse_block_order(races):
    x = np.arange(32, dtype=np.float32)
    results = {}
    for order in ("forward", "reverse"):
        data, out = np.zeros(32, np.float32), np.zeros(32, np.float32)
        with emu.block_order(order):
            run(races, "neighbour_block_read", (2, 1, 1), (32, 1, 1), x, data, out)
        results[order] = out
    np.testing.assert_array_equal(results["forward"], x + 1)  # the old, fixed order hid the defect
    np.testing.assert_array_equal(results["reverse"], 0)


def test_float_atomic_sum_depends_on_block_order(races):
    x = np.array([1e8, 1, -1e8, 1, 1, 1, 1, 1], np.float32)
    sums = set()
    for order, seed in [("forward", 0), ("reverse", 0), ("random", 5)]:
        total = np.zeros(1, np.float32)
        with emu.block_order(order, seed=seed):
            run(races, "float_atomic_sum", (8, 1, 1), (1, 1, 1), x, total)
        sums.add(float(total[0]))
    assert len(sums) > 1, "a float atomicAdd reduction gave one answer in every block order"


# --- the race detector ---

needs_tsan = pytest.mark.skipif(not emu_racecheck.available(), reason="no ThreadSanitizer runtime (libtsan)")


@pytest.fixture
def racecheck():
    with emu.racecheck():
        yield


@needs_tsan
@pytest.mark.parametrize("order", ORDERS)
def test_missing_barrier_in_tree_reduction_is_caught_in_every_thread_order(harness, order, rng):
    x = rng.standard_normal(256).astype(np.float32)
    out = np.zeros(2, np.float32)
    pattern = (r"kernel block_sum_no_sync: data race on dynamic shared memory, byte \d+: .* by block \(\d,0,0\) "
               r"thread \(\d+,0,0\) at emu_kernels/harness\.cu:71 .* at emu_kernels/harness\.cu:71")
    with emu.thread_order(order, seed=7), emu.racecheck(), pytest.raises(emu.EmuRaceError, match=pattern):
        run(harness, "block_sum_no_sync", (2, 1, 1), (128, 1, 1), x, out, np.int32(x.size), shared_mem=128 * 4)
    np.testing.assert_array_equal(out, 0)  # a failed launch leaves the arrays as they were


@needs_tsan
def test_race_free_kernels_pass_the_race_detector(harness, races, racecheck, rng):
    x = rng.standard_normal(256).astype(np.float32)
    out = np.zeros(2, np.float32)
    run(harness, "block_sum", (2, 1, 1), (128, 1, 1), x, out, np.int32(x.size), shared_mem=128 * 4)
    np.testing.assert_allclose(out, block_sums_loops(x, 128), rtol=1e-5, atol=1e-5)
    a = rng.standard_normal((17, 33)).astype(np.float32)
    b = rng.standard_normal((33, 19)).astype(np.float32)
    np.testing.assert_allclose(run_matmul(harness, "matmul_tiled", a, b), matmul_loops(a, b), rtol=1e-5, atol=1e-5)
    total = np.zeros(1, np.float32)
    run(harness, "warp_sum", (2, 1, 1), (64, 1, 1), x, total, np.int32(100))
    np.testing.assert_allclose(total[0], sum(float(v) for v in x[:100]), rtol=1e-5, atol=1e-5)
    ints, itotal = np.arange(150, dtype=np.int32), np.zeros(1, np.int32)
    run(races, "block_sum_atomic_total", (3, 1, 1), (64, 1, 1), ints, itotal, np.int32(150), shared_mem=64 * 4)
    assert itotal[0] == ints.sum()
    exchanged = np.zeros(64, np.int32)
    run(races, "warp_exchange", (1, 1, 1), (64, 1, 1), np.arange(64, dtype=np.int32), exchanged)
    np.testing.assert_array_equal(exchanged, np.arange(64) ^ 1)


@needs_tsan
@pytest.mark.parametrize(
    "kernel, grid, block, make_args, pattern",
    [
        ("neighbour_block_read", 2, 32, lambda: (np.arange(32, dtype=np.float32), np.zeros(32, np.float32),
                                                 np.zeros(32, np.float32)),
         r"global memory, parameter data \(float\*, 32 elements\) at element \d+ .*read of 4 bytes by block \(1,0,0\) "
         r"thread \(\d+,0,0\) at emu_kernels/races\.cu:31 and an earlier write of 4 bytes by block \(0,0,0\) "
         r"thread \(\d+,0,0\) at emu_kernels/races\.cu:30"),
        ("shared_counter_plain_add", 1, 64, lambda: (np.zeros(1, np.int32),),
         r"shared memory \(shared_counter_plain_add::count\).*races\.cu:54 .*races\.cu:54"),
        ("unsynchronised_flag", 1, 64, lambda: (np.zeros(1, np.int32),),
         r"shared memory \(unsynchronised_flag::flag\): read .* thread \(32,0,0\) at emu_kernels/races\.cu:70 .*"
         r"write .* thread \(0,0,0\) at emu_kernels/races\.cu:68"),
    ],
    ids=["between-blocks", "plain-add-in-shared", "syncwarp-across-warps"],
)
def test_race_is_reported_with_lines_blocks_and_threads(races, racecheck, kernel, grid, block, make_args, pattern):
    with pytest.raises(emu.EmuRaceError, match=f"kernel {kernel}: data race on {pattern}"):
        run(races, kernel, grid, block, *make_args())


@needs_tsan
def test_each_launch_is_checked_afresh(races, racecheck):
    # TSan reports a pair of lines once per process: the worker that found one is replaced.
    for _ in range(2):
        with pytest.raises(emu.EmuRaceError):
            run(races, "shared_counter_plain_add", 1, 64, np.zeros(1, np.int32))


@needs_tsan
def test_other_errors_still_raise_under_the_race_detector(harness, racecheck):
    with pytest.raises(emu.EmuSyncError, match="barrier divergence"):
        run(harness, "early_return_before_barrier", (1, 1, 1), (64, 1, 1), np.zeros(64, np.float32))
    y = np.zeros(32, np.float32)
    # A fault ends the worker; the launch runs again without TSan, whose guard pages name it.
    with pytest.raises(emu.EmuMemoryError, match=r"after the end of parameter y .*thread \(31, 0, 0\)"):
        run(harness, "out_of_bounds_write", (1, 1, 1), (32, 1, 1), np.ones(32, np.float32), y, np.int32(32), np.int32(1))
    np.testing.assert_array_equal(y, 0)
    x = np.arange(16, dtype=np.float32)  # aliased arguments stay aliased in the worker
    run(harness, "out_of_bounds_write", (1, 1, 1), (16, 1, 1), x, x, np.int32(16), np.int32(0))
    np.testing.assert_array_equal(x, np.arange(16))


def test_racecheck_from_the_environment(monkeypatch):
    monkeypatch.setenv(emu.RACECHECK_ENV, "1")
    assert emu.racecheck_enabled()
    with emu.racecheck(False):
        assert not emu.racecheck_enabled()
    monkeypatch.setenv(emu.RACECHECK_ENV, "maybe")
    with pytest.raises(ValueError, match="GPUCONV_EMU_RACECHECK"):
        emu.racecheck_enabled()

"""kernels_cu/ptx.cuh on the emulated device: cp.async groups, TF32/BF16 rounding, mma.sync
fragments and ldmatrix against the PTX ISA's definitions, and the defects each one catches
(tests/emu_kernels/ptx.cu)."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuconv import emu
from gpuconv.kernels import kernel_dir
from gpuconv.precision import round_operand

KERNELS = Path(__file__).with_name("emu_kernels")
ORDERS = ("forward", "reverse", "random")

needs_cxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no host C++ compiler for the emulated device"
)


@pytest.fixture(scope="module")
def ptx():
    return emu.module_for(KERNELS / "ptx.cu")


@pytest.fixture(params=ORDERS)
def order(request):
    with emu.thread_order(request.param, seed=5):
        yield request.param


def run(module, kernel, grid, block, *args):
    module.get_function(kernel)(grid, block, args)


def test_inline_ptx_lives_only_in_ptx_cuh():
    # Every kernel must run on 'emu', which cannot execute inline PTX: asm goes through ptx.cuh.
    offenders = []
    for path in sorted(kernel_dir().glob("*.cu*")):
        if path.name == "ptx.cuh":
            continue
        code = re.sub(r"//[^\n]*|/\*.*?\*/", " ", path.read_text(), flags=re.S)
        if re.search(r"\b(asm|__asm__)\b", code):
            offenders.append(path.name)
    assert offenders == [], f"inline PTX outside kernels_cu/ptx.cuh in {offenders}"


# --- cp.async ---


@needs_cxx
@pytest.mark.parametrize("src_bytes", [16, 8, 0])
def test_cp_async_lands_at_its_wait_and_zero_fills(ptx, order, rng, src_bytes):
    src = rng.standard_normal(448).astype(np.float32)
    out, early = np.zeros(448, np.float32), np.zeros(128, np.float32)
    run(ptx, "cp_async_groups", 1, 64, src, out, early, np.int32(src_bytes))
    expected = src.copy()
    chunks = expected[192:].reshape(64, 4)
    chunks[:, src_bytes // 4:] = 0.0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(early[0::2], src[:64])  # its group was waited for
    # The group still in flight at the read: poison on 'emu' (a GPU gives whatever is there).
    assert np.isnan(early[1::2]).all()


@needs_cxx
def test_pipelined_copies_give_the_sum(ptx, order, rng):
    x = rng.standard_normal(5 * 64).astype(np.float32)
    out = np.zeros(64, np.float32)
    run(ptx, "pipelined_sum", 1, 64, x, out, np.int32(5), np.int32(0))
    np.testing.assert_allclose(out, x.reshape(5, 64)[:, ::-1].sum(axis=0), rtol=1e-6, atol=1e-6)


@needs_cxx
def test_reading_a_copy_before_its_wait_is_caught(ptx, order, rng):
    # Planted defect: wait_group 2 where the pipeline needs 1. A copy made at issue (what a
    # plain load would do) hides it; the emulator lands copies at their wait and poisons until.
    x = rng.standard_normal(5 * 64).astype(np.float32)
    out = np.zeros(64, np.float32)
    run(ptx, "pipelined_sum", 1, 64, x, out, np.int32(5), np.int32(1))
    assert np.isnan(out).all()


@needs_cxx
def test_copies_left_in_flight_do_not_reach_the_next_block(ptx, rng):
    out = np.zeros(64, np.float32)
    run(ptx, "abandoned_copies", 2, 64, rng.standard_normal(64).astype(np.float32), out)
    np.testing.assert_array_equal(out, 7.0)


# --- rounding ---


def _bits(values) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.uint32)


TIES = np.array([
    1 + 2**-11,              # TF32 tie: away from zero gives 1 + 2^-10 (nearest even would give 1)
    -(1 + 2**-11),
    1 + 2**-11 - 2**-23,     # just below the tie: 1
    1 + 3 * 2**-11,          # TF32 tie between odd and even: away from zero, 1 + 2^-9
    1 + 2**-8,               # BF16 tie: nearest even gives 1
    1 + 3 * 2**-8,           # BF16 tie: nearest even gives 1 + 2^-6
    3.4028235e38,            # rounds up past the largest finite value: infinity
    np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40,
], dtype=np.float32)


def test_tf32_rounding_is_nearest_ties_away():
    expected = np.array([1 + 2**-10, -(1 + 2**-10), 1, 1 + 2**-9], np.float32)
    np.testing.assert_array_equal(round_operand(TIES[:4], "tf32"), expected)
    assert np.isinf(round_operand(TIES[6:7], "tf32")).all()
    assert np.isnan(round_operand(TIES[9:10], "tf32")).all()
    assert (_bits(round_operand(TIES, "tf32")) & 0x1FFF == 0).all()


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.concatenate([TIES, np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 1e3])
    expected = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(round_operand(x, "bf16"), expected)


@needs_cxx
def test_kernel_rounding_matches_the_numpy_rounding(ptx, rng):
    x = np.concatenate([TIES, rng.standard_normal(200).astype(np.float32) * 100])
    tf32, bf16 = np.zeros(x.size, np.uint32), np.zeros(x.size, np.uint32)
    run(ptx, "round_operands", 2, 128, x, tf32, bf16, np.int32(x.size))
    finite = np.isfinite(x)
    np.testing.assert_array_equal(tf32[finite], _bits(round_operand(x, "tf32"))[finite])
    np.testing.assert_array_equal(bf16[finite] & 0xFFFF, _bits(round_operand(x, "bf16"))[finite] >> 16)
    np.testing.assert_array_equal(bf16[finite] >> 16, _bits(round_operand(-x, "bf16"))[finite] >> 16)
    assert np.isnan(tf32.view(np.float32)[np.isnan(x)]).all()


# --- mma.sync ---


def _mma(ptx, kernel, shape_k, rng, defect=0):
    a = rng.standard_normal((16, shape_k)).astype(np.float32)
    b = rng.standard_normal((shape_k, 8)).astype(np.float32)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = np.zeros((16, 8), np.float32)
    run(ptx, kernel, 1, 32, a, b, c, d, np.int32(defect))
    precision = "tf32" if shape_k == 8 else "bf16"
    expected = c + round_operand(a, precision).astype(np.float64) @ round_operand(b, precision).astype(np.float64)
    return d, expected, a, b, c


@needs_cxx
@pytest.mark.parametrize("kernel, k", [("mma_tf32_tile", 8), ("mma_bf16_tile", 16)])
def test_mma_matches_the_rounded_product(ptx, order, rng, kernel, k):
    d, expected, a, b, c = _mma(ptx, kernel, k, rng)
    # Exact products summed in double and rounded once: within an ulp of float.
    np.testing.assert_allclose(d, expected, rtol=2**-23, atol=2**-23 * np.abs(expected).max())
    # And it is the rounded product, not the FP32 one.
    assert np.abs(d - (c + a.astype(np.float64) @ b)).max() > 1e-4


@needs_cxx
@pytest.mark.parametrize("kernel, k, defect", [("mma_tf32_tile", 8, 1), ("mma_tf32_tile", 8, 2), ("mma_bf16_tile", 16, 1)])
def test_wrong_fragment_index_gives_a_wrong_answer(ptx, rng, kernel, k, defect):
    d, expected, *_ = _mma(ptx, kernel, k, rng, defect)
    wrong = ~np.isclose(d, expected, rtol=1e-3, atol=1e-3)
    assert wrong.sum() >= 16, "a fragment mixed up must show in the result"


@needs_cxx
@pytest.mark.parametrize("threads, active", [(32, 16), (32, 31), (16, 16), (64, 48)])
def test_mma_by_fewer_than_32_lanes_is_refused(ptx, threads, active):
    d = np.zeros(threads, np.float32)
    with pytest.raises(emu.EmuSyncError, match=r"mma\.sync\.aligned\.m16n8k8.*only lanes 0x[0-9a-f]+ of warp \d .*all 32 lanes"):
        run(ptx, "mma_some_lanes", 1, threads, d, np.int32(active))


@needs_cxx
def test_mma_by_whole_warps_runs(ptx):
    d = np.full(64, np.nan, np.float32)
    run(ptx, "mma_some_lanes", 1, 64, d, np.int32(64))
    np.testing.assert_array_equal(d, 0.0)


# --- ldmatrix ---


@needs_cxx
def test_ldmatrix_gives_the_isa_fragments(ptx, order, rng):
    m = rng.integers(0, 2**16, size=(4, 8, 8), dtype=np.uint16)
    out = np.zeros((6, 32, 4), np.uint32)
    run(ptx, "ldmatrix_all", 1, 32, m.reshape(-1).astype(np.uint32), out.reshape(-1))
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for variant, (count, trans) in enumerate([(1, False), (2, False), (4, False), (1, True), (2, True), (4, True)]):
        for i in range(4):
            if i >= count:
                np.testing.assert_array_equal(out[variant, :, i], 0)
                continue
            matrix = m[i].T if trans else m[i]
            expected = matrix[g, 2 * t].astype(np.uint32) | matrix[g, 2 * t + 1].astype(np.uint32) << 16
            np.testing.assert_array_equal(out[variant, :, i], expected, err_msg=f"x{count} trans={trans} register {i}")

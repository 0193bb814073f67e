"""Every kernel of kernels_cu/ once under the race detector, on a small shape; and each
__syncthreads() of kernels_cu/ removed in turn, which the race detector must notice.

The ops below are the library's own (gpuconv.functional, gpuconv.optim) on 'emu' arrays, under
``emu.racecheck()``; a recorder notes which kernels they launched, and every kernel of every
kernels_cu file must be among them (a new kernel needs a small op here). Each op's result is also
compared with the NumPy path, so a racecheck run that returned garbage would not pass.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

import gpuconv.functional as F
from gpuconv import emu, emu_racecheck, kernels
from gpuconv.device import to_device, to_numpy
from gpuconv.functional import conv_gemm, conv_plans
from gpuconv.optim import SGD, Adam

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None or not emu_racecheck.available(),
    reason="no host C++ compiler with ThreadSanitizer (libtsan) for the race detector",
)


def small(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def on_emu(*arrays):
    return [to_device(a, "emu") for a in arrays]


def conv_ops(rng):
    x, w, b = small(rng, 2, 3, 6, 6), small(rng, 4, 3, 3, 3), small(rng, 4)
    gy = small(rng, 2, 4, 6, 6)
    ex, ew, eb, egy = on_emu(x, w, b, gy)
    return [
        (F.conv2d(ex, ew, eb, padding=1), F.conv2d(x, w, b, padding=1)),
        (F.conv2d_input(x.shape, ew, egy, padding=1), F.conv2d_input(x.shape, w, gy, padding=1)),
        (F.conv2d_weight(ex, w.shape, egy, padding=1), F.conv2d_weight(x, w.shape, gy, padding=1)),
        (F.conv2d_bias(egy), F.conv2d_bias(gy)),
        *zip(F.conv2d_relu_max_pool2d(ex, ew, eb, padding=1, pool_padding=1, ceil_mode=True),
             F.conv2d_relu_max_pool2d(x, w, b, padding=1, pool_padding=1, ceil_mode=True)),
    ]


def conv_v1(rng, monkeypatch):
    for op in ("CONV2D_FORWARD", "CONV2D_BACKWARD_DATA", "CONV2D_BACKWARD_FILTER"):
        monkeypatch.setenv(f"GPUCONV_KERNEL_{op}", "1")
    return conv_ops(rng)


def filter_with_bias(rng):
    # C_in 4: the backward-filter kernels whose columns run over 4 channels of one tap (_c4),
    # with the bias gradient from the same launch (in one split and in three, the splits added
    # by the last block of each tile: version 3, the default).
    x, gy = small(rng, 2, 4, 5, 5), small(rng, 2, 3, 5, 5)
    ex, egy = on_emu(x, gy)
    expected = (F.conv2d_weight(x, (3, 4, 3, 3), gy, padding=1), F.conv2d_bias(gy))
    return [(got, want) for got, want in zip(F.conv2d_weight(ex, (3, 4, 3, 3), egy, padding=1, bias_grad=True), expected)]


def filter_reduce_kernel(rng, monkeypatch):
    # Version 2: the splits added by conv2d_split_k_reduce_v2, weights and biases.
    monkeypatch.setenv("GPUCONV_KERNEL_CONV2D_BACKWARD_FILTER", "2")
    monkeypatch.setattr(conv_gemm, "_filter_splits", lambda tile, g: 3)
    return filter_with_bias(rng)


def conv_v2_tile(tile):
    def ops(rng, monkeypatch):
        monkeypatch.setattr(conv_gemm, "choose_tile", lambda rows, columns: (tile, "the tile under test"))
        if tile not in conv_gemm.FILTER_TILES:
            return conv_ops(rng)
        monkeypatch.setattr(conv_gemm, "FILTER_TILES", (tile,))
        pairs = conv_ops(rng) + filter_with_bias(rng)
        monkeypatch.setattr(conv_gemm, "_filter_splits", lambda tile, g: 3)
        return pairs + filter_with_bias(rng)

    return ops


def conv_v2_narrow(rng, monkeypatch):
    # C_out 4 and C_in 3 fit the narrow kernel's 4 rows; the second input gradient's K (130
    # channels x 9 taps) takes two passes through its shared stage of 1024.
    w, gy = small(rng, 130, 2, 3, 3), small(rng, 1, 130, 3, 3)
    ew, egy = on_emu(w, gy)
    deep = (F.conv2d_input((1, 2, 3, 3), ew, egy, padding=1), F.conv2d_input((1, 2, 3, 3), w, gy, padding=1))
    return conv_v2_tile(conv_gemm.NARROW_TILE)(rng, monkeypatch) + [deep]


def conv_tensorcore(rng, monkeypatch):
    x, w = small(rng, 1, 8, 4, 4), small(rng, 8, 8, 3, 3)
    gy = small(rng, 1, 8, 4, 4)
    ex, ew, egy = on_emu(x, w, gy)
    loose = dict(rtol=2e-2, atol=2e-2)  # TF32 operands
    return [
        (F.conv2d(ex, ew, padding=1, precision="tf32"), F.conv2d(x, w, padding=1), loose),
        (F.conv2d_input(x.shape, ew, egy, padding=1, precision="tf32"), F.conv2d_input(x.shape, w, gy, padding=1), loose),
        (F.conv2d_weight(ex, w.shape, egy, padding=1, precision="tf32"), F.conv2d_weight(x, w.shape, gy, padding=1), loose),
    ]


def elementwise(rng, monkeypatch):
    x, g = small(rng, 3, 70), small(rng, 3, 70)
    ex, eg = on_emu(x, g)
    pairs = []
    for forward, backward in [(F.relu, F.relu_backward), (F.tanh, F.tanh_backward), (F.sigmoid, F.sigmoid_backward)]:
        y, ey = forward(x), forward(ex)
        pairs += [(ey, y), (backward(eg, ey), backward(g, y))]
    pairs.append((F.dropout(ex, 0.3, seed=5), F.dropout(x, 0.3, seed=5)))
    device_seed = to_device(np.array([5], np.uint64), "emu")
    pairs.append((F.dropout(ex, 0.3, seed=device_seed), F.dropout(x, 0.3, seed=5)))
    return pairs


def pooling_and_norm(rng, monkeypatch):
    x = small(rng, 1, 6, 5, 5)
    ex = to_device(x, "emu")
    y, indices = F.max_pool2d(x, 2, return_indices=True)
    ey, eindices = F.max_pool2d(ex, 2, return_indices=True)
    g = small(rng, *y.shape)
    eg = to_device(g, "emu")
    lrn, elrn = F.local_response_norm(x, 3), F.local_response_norm(ex, 3)
    gl = small(rng, *x.shape)
    return [
        (ey, y),
        (F.max_pool2d_backward(eg, eindices, x.shape, 2), F.max_pool2d_backward(g, indices, x.shape, 2)),
        (F.max_pool2d_relu_backward(eg, eindices, ey, x.shape, 2), F.max_pool2d_relu_backward(g, indices, y, x.shape, 2)),
        (F.avg_pool2d(ex, 2), F.avg_pool2d(x, 2)),
        (F.avg_pool2d_backward(eg, x.shape, 2), F.avg_pool2d_backward(g, x.shape, 2)),
        (elrn, lrn),
        (F.local_response_norm_backward(to_device(gl, "emu"), ex, elrn, 3), F.local_response_norm_backward(gl, x, lrn, 3)),
        (F.interpolate(ex, (7, 3)), F.interpolate(x, (7, 3))),
    ]


def linear(rng, monkeypatch):
    # 33 rows and 40 features: two tiles of 32 each way, a partial K tile
    x, w, b, g = small(rng, 33, 40), small(rng, 7, 40), small(rng, 7), small(rng, 33, 7)
    ex, ew, eb, eg = on_emu(x, w, b, g)
    hand = F.linear_backward(eg, ex, ew, through_relu=True)
    numpy = F.linear_backward(g, x, w, through_relu=True)
    return [(F.linear(ex, ew, eb, activation="relu"), F.linear(x, w, b, activation="relu")), *zip(hand, numpy)]


def loss(rng, monkeypatch):
    logits, target = small(rng, 5, 7), rng.integers(0, 7, 5)
    pairs = []
    for reduction in ("mean", "none"):
        ours = F.cross_entropy_with_grad(to_device(logits, "emu"), to_device(target, "emu"), reduction)
        pairs += zip(ours, F.cross_entropy_with_grad(logits, target, reduction))
    return pairs


def optimizers(rng, monkeypatch):
    pairs = []
    for make in (lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: Adam(p, lr=0.01)):
        start, grad = small(rng, 3, 50), small(rng, 3, 50)
        results = []
        for device in ("emu", "cpu"):
            params = [SimpleNamespace(data=to_device(start, device), grad=to_device(grad, device))]
            make(params).step()
            results.append(params[0].data)
        pairs.append(tuple(results))
    return pairs


OPS = {
    "conv-v1": conv_v1,
    **{f"conv-v2-{a}x{b}": conv_v2_tile((a, b)) for a, b in conv_gemm.TILES},
    "conv-v2-narrow": conv_v2_narrow,
    "conv-v2-filter-reduce-kernel": filter_reduce_kernel,
    "conv-tensorcore": conv_tensorcore,
    "elementwise": elementwise,
    "pooling-and-norm": pooling_and_norm,
    "linear": linear,
    "loss": loss,
    "optimizers": optimizers,
}

class RacedOps(dict):
    launches: dict

    def __init__(self):
        super().__init__()
        self.launches = {}


# Every kernel of every kernels_cu file, as ``topic/kernel``.
ALL_KERNELS = [f"{topic}/{kernel}" for topic in kernels.kernel_topics() for kernel in kernels.signatures(topic)]


def _copies(args):
    return [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args]


@dataclass
class Launch:
    """One recorded launch: its shape, its arguments before, and its arrays after."""

    grid: tuple
    block: tuple
    shared_mem: int
    max_dynamic_shared: int
    before: list
    after: list


@pytest.fixture(scope="module")
def raced():
    """Runs every op once under the race detector: ``{op: (kernels it launched, failure or None)}``,
    and the first launch of each kernel (``raced.launches``)."""
    results = RacedOps()
    calls = []
    original = emu.EmuFunction.__call__

    def recording(self, grid, block, args, shared_mem=0):
        key = f"{Path(self.module.name).stem}/{self.name}"
        calls.append(key)
        if key in results.launches:
            return original(self, grid, block, args, shared_mem=shared_mem)
        before = _copies(args)
        original(self, grid, block, args, shared_mem=shared_mem)
        results.launches[key] = Launch(grid, block, shared_mem, self.max_dynamic_shared_size_bytes, before, _copies(args))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(emu.EmuFunction, "__call__", recording)
        for name, ops in OPS.items():
            calls.clear()
            conv_plans.clear()  # ops patch the planner's choices (the K split), which a kept plan would not see
            failure = None
            with pytest.MonkeyPatch.context() as op_patch:
                try:
                    rng = np.random.default_rng(5)
                    with emu.racecheck():
                        pairs = ops(rng, op_patch)
                    for got, expected, *tolerance in pairs:
                        np.testing.assert_allclose(to_numpy(got), to_numpy(expected), **(tolerance[0] if tolerance else
                                                                                       dict(rtol=1e-4, atol=1e-5)))
                except Exception as exc:  # noqa: BLE001  (reported by the kernel's own test)
                    failure = exc
            results[name] = (set(calls), failure)
    return results


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_kernel_runs_race_free_under_racecheck(raced, kernel):
    ran = [name for name, (launched, _) in raced.items() if kernel in launched]
    assert ran, f"no op of tests/test_emu_racecheck.py launches {kernel}: add a small one to OPS"
    for name in ran:
        failure = raced[name][1]
        if failure is not None:
            raise AssertionError(f"op {name} (which launches {kernel}) failed under racecheck: {failure}") from failure


# --- each __syncthreads() of kernels_cu removed in turn ---

_BARRIER_RE = re.compile(r"^(?!\s*//).*\b__syncthreads\(\)", re.M)


def barriers():
    """(file, line) of every __syncthreads() call in kernels_cu (comments aside)."""
    found = []
    for source in sorted(kernels.kernel_dir().iterdir()):
        if source.suffix in (".cu", ".cuh"):
            text = source.read_text()
            found += [(source.name, text.count("\n", 0, m.start()) + 1) for m in _BARRIER_RE.finditer(text)]
    return found


def users(header: str) -> list[str]:
    """The kernel files whose compiler text includes ``header`` (itself, for a .cu)."""
    if header.endswith(".cu"):
        return [header[:-3]]
    return [t for t in kernels.kernel_topics() if f'"kernels_cu/{header}"' in kernels.compiler_source(kernels.kernel_path(t))]


BARRIERS = barriers()


def test_kernels_have_barriers_to_remove():
    assert len(BARRIERS) >= 5 and {"implicit_gemm.cuh", "gemm_core.cuh"} <= {f for f, _ in BARRIERS}


@pytest.mark.parametrize("source, line", BARRIERS, ids=[f"{f}:{n}" for f, n in BARRIERS])
def test_removing_any_barrier_is_caught(raced, tmp_path, source, line):
    """Each barrier of kernels_cu removed alone (the line keeps its number): some kernel built on
    that file, replaying the launch recorded above, raises EmuRaceError or changes its result.
    Every barrier, not a sample: a mutated file compiles in about 3 s and one block runs in one."""
    copy = tmp_path / "kernels_cu"
    shutil.copytree(kernels.kernel_dir(), copy)
    lines = (copy / source).read_text().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].replace("__syncthreads()", "((void)0)", 1)
    (copy / source).write_text("".join(lines))
    candidates = [key for key in raced.launches if key.split("/")[0] in users(source)]
    assert candidates, f"no recorded launch of a kernel that uses {source}"
    outcomes = []
    for key in candidates:
        topic, kernel = key.split("/")
        recorded = raced.launches[key]
        function = emu.EmuModule(path=copy / f"{topic}.cu").get_function(kernel)
        function.max_dynamic_shared_size_bytes = recorded.max_dynamic_shared
        args = _copies(recorded.before)
        try:
            with emu.racecheck():
                function(recorded.grid, recorded.block, args, shared_mem=recorded.shared_mem)
        except emu.EmuRaceError as exc:
            assert f"kernels_cu/{source}:" in str(exc) or "kernels_cu/" in str(exc)
            return
        changed = any(isinstance(a, np.ndarray) and not np.array_equal(a, b, equal_nan=True)
                      for a, b in zip(args, recorded.after))
        if changed:
            return
        outcomes.append(key)
    pytest.fail(f"removing the __syncthreads() at kernels_cu/{source}:{line} went unnoticed by {outcomes}")


# --- __threadfence() as the race detector models it: the last-block ticket pattern -----------

TICKET_SOURCE = r"""
// Each block writes its partial sum, takes a ticket; the last block to arrive adds the partials.
extern "C" __global__ void last_block_sum(const float* in, float* partials, float* out, int* ticket)
{
    if (threadIdx.x != 0) return;
    float sum = 0.0f;
    for (int i = 0; i < 4; ++i) sum += in[blockIdx.x * 4 + i];
    partials[blockIdx.x] = sum;
    RELEASE_FENCE;
    const int arrived = atomicAdd(ticket, 1);
    if (arrived != (int)gridDim.x - 1) return;
    ACQUIRE_FENCE;
    float total = 0.0f;
    for (unsigned b = 0; b < gridDim.x; ++b) total += partials[b];
    out[0] = total;
    atomicExch(ticket, 0);
}
"""


@pytest.mark.parametrize("release, acquire", [(True, True), (False, True), (True, False)],
                         ids=["both fences", "no fence before the ticket", "no fence after it"])
def test_threadfence_orders_the_last_block_ticket_and_its_absence_is_a_race(release, acquire):
    defines = "".join(f"#define {name} {'__threadfence()' if on else '((void)0)'}\n"
                      for name, on in (("RELEASE_FENCE", release), ("ACQUIRE_FENCE", acquire)))
    name = f"ticket_{int(release)}{int(acquire)}.cu"
    function = emu.EmuModule(source=defines + TICKET_SOURCE, name=name).get_function("last_block_sum")
    values = np.arange(16, dtype=np.float32)
    args = [to_device(values, "emu"), to_device(np.zeros(4, np.float32), "emu"),
            to_device(np.zeros(1, np.float32), "emu"), to_device(np.zeros(1, np.int32), "emu")]
    with emu.racecheck():
        if release and acquire:
            function((4, 1, 1), (32, 1, 1), args)
            assert to_numpy(args[2])[0] == values.sum() and to_numpy(args[3])[0] == 0
            return
        with pytest.raises(emu.EmuRaceError, match="data race"):
            function((4, 1, 1), (32, 1, 1), args)


FENCES = [(source.name, text.count("\n", 0, m.start()) + 1)
          for source in sorted(kernels.kernel_dir().iterdir()) if source.suffix in (".cu", ".cuh")
          for text in [source.read_text()] for m in re.finditer(r"^(?!\s*//).*\b__threadfence\(\)", text, re.M)]


def test_backward_filter_has_its_ticket_fences():
    assert [f for f, _ in FENCES].count("conv_tiles.cuh") == 2


@pytest.mark.parametrize("source, line", FENCES, ids=[f"{f}:{n}" for f, n in FENCES])
def test_removing_a_fence_of_the_split_k_ticket_is_caught(tmp_path, monkeypatch, source, line):
    """Either __threadfence() of backward-filter's last-block reduce removed: a split launch (C_in
    4, three splits, the bias too) replayed under the race detector reports the race between a
    block's partial sums and the last block's reads of them."""
    copy = tmp_path / "kernels_cu"
    shutil.copytree(kernels.kernel_dir(), copy)
    lines = (copy / source).read_text().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].replace("__threadfence()", "((void)0)", 1)
    (copy / source).write_text("".join(lines))
    launched = []
    original = emu.EmuFunction.__call__

    def recording(self, grid, block, args, shared_mem=0):
        launched.append((self.name, grid, block, _copies(args)))
        return original(self, grid, block, args, shared_mem=shared_mem)

    monkeypatch.setattr(conv_gemm, "_filter_splits", lambda tile, g: 3)
    with monkeypatch.context() as patch:
        patch.setattr(emu.EmuFunction, "__call__", recording)
        filter_with_bias(np.random.default_rng(5))
    (kernel, grid, block, args), = [call for call in launched if call[0].startswith("conv2d_backward_filter_v2_")]
    assert grid[2] == 3 and kernel.endswith("_c4")
    function = emu.EmuModule(path=copy / "conv2d_backward_filter.cu").get_function(kernel)
    with emu.racecheck(), pytest.raises(emu.EmuRaceError, match="data race"):
        function(grid, block, args)

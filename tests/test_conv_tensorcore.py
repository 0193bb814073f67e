"""The TF32/BF16 convolutions (kernels_cu/conv2d_tensorcore.cu on 'emu' and 'cuda', the rounding
emulation on 'cpu') and the precision switch (gpuconv.precision).

Error bounds. With operands rounded to a format of unit roundoff u (TF32 2^-11, BF16 2^-8), every
product of two rounded operands is exact in FP32 (11 x 11 and 8 x 8 significant bits), and a sum
of K of them in FP32, in any order, is off by at most gamma_K = K 2^-24 / (1 - K 2^-24) times the
sum of their magnitudes. So against the exact (float64) result y of the unrounded problem

    |y_hat - y| <= ((1 + u)^2 - 1 + gamma_K (1 + u)^2) * sum |w| |x|

elementwise, sum |w| |x| being the same convolution of the magnitudes; and two devices that round
the operands identically differ by at most 2 gamma_K (1 + u)^2 * sum |w| |x|.
"""
from __future__ import annotations

import os
import re
import shutil
import types
from dataclasses import dataclass

import numpy as np
import pytest

import gpuconv
import gpuconv.functional as F
from gpuconv import emu, kernels, nn, to_device, to_numpy
from gpuconv.functional import conv_tensorcore
from gpuconv.functional.conv import _geometry
from gpuconv.device import cuda_status
from gpuconv import precision as precision_module
from gpuconv.precision import UNIT_ROUNDOFF, round_operand

HAVE_GPU = cuda_status()[0]
HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None

# (input shape, weight shape, conv arguments): no extent a multiple of the 64 x 64 x 16 tile.
CASES = [
    ((2, 5, 9, 11), (7, 5, 3, 3), dict(stride=(2, 1), padding=1)),
    ((1, 3, 7, 6), (4, 3, 2, 3), dict(padding=(0, 2), dilation=(1, 2))),
    ((2, 17, 5, 4), (70, 17, 1, 1), dict()),
    ((1, 4, 8, 8), (3, 4, 4, 4), dict(padding="same")),
]
CASE_IDS = ["stride2x1-pad1", "batch1-dilated", "70-channels", "same-even-kernel"]
OPS = ("forward", "input", "weight")


@pytest.fixture(autouse=True)
def default_precision(monkeypatch):
    # Every test starts from the default, whatever the environment or an earlier test set.
    monkeypatch.delenv(precision_module.ENV, raising=False)
    monkeypatch.setattr(precision_module, "_global", None)


def _problem(index, seed=0):
    x_shape, w_shape, args = CASES[index]
    rng = np.random.default_rng(seed + index)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    g = _geometry(x_shape, w_shape, args.get("stride", 1), args.get("padding", 0), args.get("dilation", 1))
    dy = rng.standard_normal(g.output_shape).astype(np.float32)
    return x, w, dy, args


def _run(op, x, w, dy, args, device, **kwargs):
    """One of the three convolutions of the problem on ``device`` (arrays moved there)."""
    if op == "forward":
        return to_numpy(F.conv2d(to_device(x, device), to_device(w, device), **args, **kwargs))
    if op == "input":
        return to_numpy(F.conv2d_input(x.shape, to_device(w, device), to_device(dy, device), **args, **kwargs))
    return to_numpy(F.conv2d_weight(to_device(x, device), w.shape, to_device(dy, device), **args, **kwargs))


def _depth(op, x, w, dy) -> int:
    """K of the op's GEMM: the number of products summed into one output."""
    return {"forward": w[0].size, "input": w.shape[0] * w.shape[2] * w.shape[3], "weight": dy[:, 0].size}[op]


@dataclass
class _Bounds:
    """Elementwise error bounds of one op of a problem at one precision (see the module docstring)."""

    exact: np.ndarray  # the float64 result of the unrounded problem
    rounding: np.ndarray  # |result - exact| at this precision stays below this
    summation: np.ndarray  # two devices rounding the operands alike stay this close
    fp32: np.ndarray  # an FP32 computation would stay this close to `exact`


def _bounds(op, x, w, dy, args, precision) -> _Bounds:
    exact = _run(op, x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64), args, "cpu")
    magnitude = _run(op, np.abs(x).astype(np.float64), np.abs(w).astype(np.float64),
                     np.abs(dy).astype(np.float64), args, "cpu")
    k = _depth(op, x, w, dy)
    u, gamma = UNIT_ROUNDOFF[precision], k * 2.0**-24 / (1 - k * 2.0**-24)
    return _Bounds(exact, ((1 + u) ** 2 - 1 + gamma * (1 + u) ** 2) * magnitude,
                   2 * gamma * (1 + u) ** 2 * magnitude, gamma * magnitude)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_reduced_precision_within_its_error_bound(device, index, op, precision):
    x, w, dy, args = _problem(index)
    bounds = _bounds(op, x, w, dy, args, precision)
    result = _run(op, x, w, dy, args, device, precision=precision)
    assert result.dtype == np.float32 and result.shape == bounds.exact.shape
    error = np.abs(result - bounds.exact)
    assert (error <= bounds.rounding).all(), f"max error {error.max()}"
    # The operands were rounded: an FP32 computation would sit within gamma of the exact result.
    assert (error > 4 * bounds.fp32).any()


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_kernels_compute_the_problem_the_cpu_rounds(kernel_device, index, op, precision):
    # The CPU rounds the operands exactly as the kernels do, so the two differ only by FP32
    # summation order: far inside the TF32/BF16 bound.
    x, w, dy, args = _problem(index)
    on_cpu = _run(op, x, w, dy, args, "cpu", precision=precision)
    on_device = _run(op, x, w, dy, args, kernel_device, precision=precision)
    assert (np.abs(on_device - on_cpu) <= _bounds(op, x, w, dy, args, precision).summation).all()


def test_forward_bias_and_fused_relu(kernel_device):
    x, w, _, args = _problem(0)
    bias = np.linspace(-3, 3, w.shape[0]).astype(np.float32)
    plain = to_numpy(F.conv2d(to_device(x, kernel_device), to_device(w, kernel_device), **args, precision="tf32"))
    with_bias = to_numpy(F.conv2d(to_device(x, kernel_device), to_device(w, kernel_device), to_device(bias, kernel_device),
                                  **args, precision="tf32", activation="relu"))
    np.testing.assert_allclose(with_bias, np.maximum(plain + bias.reshape(1, -1, 1, 1), 0), rtol=1e-6, atol=1e-5)


def test_weight_gradient_over_several_splits(kernel_device, monkeypatch):
    # 2 x 5 x 11 = 110 pixels of K, 7 tiles of 16: two blocks of splits, the last partial.
    monkeypatch.setattr(conv_tensorcore, "TARGET_BLOCKS", 2)
    x, w, dy, args = _problem(0)
    on_cpu = _run("weight", x, w, dy, args, "cpu", precision="bf16")
    on_device = _run("weight", x, w, dy, args, kernel_device, precision="bf16")
    assert (np.abs(on_device - on_cpu) <= _bounds("weight", x, w, dy, args, "bf16").summation).all()


def _forward_with_source(source: str, name: str) -> np.ndarray:
    """conv2d_forward_tc (TF32) on case 0, compiled for 'emu' from ``source``."""
    x, w, _, args = _problem(0)
    g = _geometry(x.shape, w.shape, args["stride"], args["padding"], 1)
    out = np.zeros(g.output_shape, np.float32)
    grid = (-(-g.batch * g.out_h * g.out_w // 64), -(-g.c_out // 64))
    emu.EmuModule(source=source, name=name).get_function("conv2d_forward_tc")(
        grid, 128, (x, w, np.zeros(g.c_out, np.float32), out, *map(np.int32, g.kernel_sizes()), np.int32(0), np.int32(0)))
    return out


@pytest.mark.skipif(not HAVE_CXX, reason="no host C++ compiler for the emulated device")
def test_reading_the_tile_before_its_cp_async_wait_is_caught():
    # Planted defect in the real kernel: the pipeline's wait_group removed. Copies made when
    # issued would hide it; on 'emu' they land at the wait, so the tiles read are poison (NaN).
    source = kernels.compiler_source(kernels.kernel_path("conv2d_tensorcore"))
    assert source.count("cp_async_wait<1>();") == 1
    out = _forward_with_source(source.replace("cp_async_wait<1>();", ""), "conv2d_tensorcore_no_wait.cu")
    assert np.isnan(out).mean() > 0.5


@pytest.mark.skipif(not HAVE_CXX, reason="no host C++ compiler for the emulated device")
@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_reading_other_threads_copies_before_the_barrier_is_caught(order):
    # Planted defect: the barrier after the wait removed, so a thread reads the copies of other
    # warps' threads that have not reached their wait yet: poison. (The other barrier, which keeps
    # the next load off a stage still being read, needs the race detector: warps stay in step.)
    source = kernels.compiler_source(kernels.kernel_path("conv2d_tensorcore"))
    anchor, replacement = _BARRIERS["after-the-wait"]
    with emu.thread_order(order, seed=1):
        out = _forward_with_source(source.replace(anchor, replacement), "conv2d_tensorcore_no_barrier.cu")
    assert np.isnan(out).any()


# Removing either barrier of the K loop: the first lets a thread read the copies of threads that
# have not waited yet, the second lets the next load overwrite a stage other warps still read.
_BARRIERS = {
    "after-the-wait": ("cp_async_wait<1>();\n        __syncthreads();", "cp_async_wait<1>();"),
    "after-the-multiply": ("multiply_stage(acc, stages[current], precision);\n        __syncthreads();",
                           "multiply_stage(acc, stages[current], precision);"),
}


@pytest.mark.skipif(not HAVE_CXX, reason="no host C++ compiler for the emulated device")
@pytest.mark.parametrize("barrier", sorted(_BARRIERS))
def test_race_detector_catches_either_missing_barrier(barrier):
    source = kernels.compiler_source(kernels.kernel_path("conv2d_tensorcore"))
    anchor, replacement = _BARRIERS[barrier]
    assert source.count(anchor) == 1
    pattern = r"kernel conv2d_forward_tc: data race on shared memory \(conv2d_forward_tc::stages\)"
    with emu.racecheck(), pytest.raises(emu.EmuRaceError, match=pattern):
        _forward_with_source(source.replace(anchor, replacement), f"conv2d_tensorcore_no_barrier_{barrier}.cu")


@pytest.mark.skipif(not HAVE_CXX, reason="no host C++ compiler for the emulated device")
def test_tensor_core_kernels_pass_the_race_detector():
    x, w, dy, args = _problem(0)
    with emu.racecheck():
        for op in OPS:
            for precision in ("tf32", "bf16"):
                on_emu = _run(op, x, w, dy, args, "emu", precision=precision)
                on_cpu = _run(op, x, w, dy, args, "cpu", precision=precision)
                assert (np.abs(on_emu - on_cpu) <= _bounds(op, x, w, dy, args, precision).summation).all()


# --- the precision switch ---


def test_global_precision_names_follow_torch():
    assert gpuconv.get_float32_matmul_precision() == "highest"
    x, w, _, args = _problem(0)
    for name, precision in [("high", "tf32"), ("medium", "bf16"), ("highest", "fp32")]:
        gpuconv.set_float32_matmul_precision(name)
        assert gpuconv.get_float32_matmul_precision() == name
        np.testing.assert_array_equal(F.conv2d(x, w, **args), F.conv2d(x, w, **args, precision=precision))
    assert not np.array_equal(F.conv2d(x, w, **args, precision="tf32"), F.conv2d(x, w, **args))
    with pytest.raises(ValueError, match=r"precision must be one of \['high', 'highest', 'medium'\].*'tf32'"):
        gpuconv.set_float32_matmul_precision("tf32")


def test_global_precision_from_the_environment(monkeypatch):
    monkeypatch.setenv(precision_module.ENV, "medium")
    assert gpuconv.get_float32_matmul_precision() == "medium"
    x, w, _, args = _problem(0)
    np.testing.assert_array_equal(F.conv2d(x, w, **args), F.conv2d(x, w, **args, precision="bf16"))
    gpuconv.set_float32_matmul_precision("highest")  # the call wins over the environment
    np.testing.assert_array_equal(F.conv2d(x, w, **args), F.conv2d(x, w, **args, precision="fp32"))
    monkeypatch.setattr(precision_module, "_global", None)
    monkeypatch.setenv(precision_module.ENV, "tf32")
    with pytest.raises(ValueError, match=r"\$GPUCONV_FLOAT32_MATMUL_PRECISION must be one of .*got 'tf32'"):
        F.conv2d(x, w, **args)


def test_explicit_precision_overrides_the_global_one():
    gpuconv.set_float32_matmul_precision("medium")
    x, w, dy, args = _problem(1)
    for op in OPS:
        exact = _run(op, x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64), args, "cpu")
        np.testing.assert_allclose(_run(op, x, w, dy, args, "cpu", precision="fp32"), exact, rtol=1e-5, atol=1e-5)


def test_float64_ignores_the_precision():
    x, w, dy, args = _problem(1)
    x, w, dy = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    for op in OPS:
        np.testing.assert_array_equal(_run(op, x, w, dy, args, "cpu", precision="bf16"), _run(op, x, w, dy, args, "cpu"))


@pytest.mark.parametrize("op", OPS)
def test_bad_precision_is_refused(op):
    x, w, dy, args = _problem(1)
    with pytest.raises(ValueError, match=r"precision must be None \(the global setting\), 'fp32', 'tf32' or 'bf16', got 'high'"):
        _run(op, x, w, dy, args, "cpu", precision="high")


def test_round_operand_keeps_the_emulated_device():
    x = to_device(np.ones(4, np.float32) / 3, "emu")
    assert isinstance(round_operand(x, "tf32"), gpuconv.EmuArray)


def test_conv2d_layer_runs_at_its_precision(kernel_device):
    gpuconv.manual_seed(0)
    layer = nn.Conv2d(5, 7, 3, stride=(2, 1), padding=1, precision="bf16")
    assert "precision='bf16'" in repr(layer)
    x, _, dy, _ = _problem(0)
    w, b = layer.weight.data.copy(), layer.bias.data.copy()
    args = CASES[0][2]
    expected_y = F.conv2d(x, w, b, **args, precision="bf16")
    expected_dx = F.conv2d_input(x.shape, w, dy, **args, precision="bf16")
    expected_dw = F.conv2d_weight(x, w.shape, dy, **args, precision="bf16")
    layer.to(kernel_device)
    y = layer(to_device(x, kernel_device))
    dx = layer.backward(to_device(dy, kernel_device))
    for actual, expected in [(y, expected_y), (dx, expected_dx), (layer.weight.grad, expected_dw)]:
        np.testing.assert_allclose(to_numpy(actual), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="precision must be"):
        nn.Conv2d(5, 7, 3, precision="half")


# --- against cuDNN on a GPU ---


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU (CuPy)")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_tf32_matches_cudnn_tf32(index, op):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    torch.backends.cudnn.allow_tf32 = True
    x, w, dy, args = _problem(index)
    xt, wt = (torch.from_numpy(a).cuda().requires_grad_() for a in (x, w))
    yt = torch.nn.functional.conv2d(xt, wt, **args)
    yt.backward(torch.from_numpy(dy).cuda())
    reference = {"forward": yt, "input": xt.grad, "weight": wt.grad}[op].detach()
    ours = _run(op, x, w, dy, args, "cuda", precision="tf32")
    # Each within the TF32 bound of the exact result, so within twice it of each other.
    assert (np.abs(ours - reference.cpu().numpy()) <= 2 * _bounds(op, x, w, dy, args, "tf32").rounding).all()


def test_kernels_refuse_sizes_past_their_int_indices():
    # Broadcast from one float: the check must come before any copy.
    huge = np.broadcast_to(np.zeros(1, np.float32), (1, 1, 50000, 50000)).view(gpuconv.EmuArray)
    with pytest.raises(ValueError, match=r"input \(1, 1, 50000, 50000\) .* too large for the tensor-core conv2d kernels"):
        F.conv2d(huge, to_device(np.ones((1, 1, 1, 1), np.float32), "emu"), precision="tf32")
    channels = 65536 * 64
    many = np.broadcast_to(np.zeros(1, np.float32), (channels, 1, 1, 1)).view(gpuconv.EmuArray)
    with pytest.raises(ValueError, match="too many channels for the tensor-core conv2d kernels: at most 4194240"):
        F.conv2d(to_device(np.ones((1, 1, 1, 1), np.float32), "emu"), many, precision="bf16")


@pytest.mark.skipif(not HAVE_CXX, reason="no host C++ compiler for the emulated device")
def test_random_thread_order():
    x, w, dy, args = _problem(2)
    on_cpu = _run("input", x, w, dy, args, "cpu", precision="tf32")
    with emu.thread_order("random", seed=11):
        on_emu = _run("input", x, w, dy, args, "emu", precision="tf32")
    assert (np.abs(on_emu - on_cpu) <= _bounds("input", x, w, dy, args, "tf32").summation).all()


def _lenet5_step(device):
    """Loss and parameter gradients of one LeNet-5 step on ``device`` from fixed weights and data."""
    from gpuconv import models

    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((2, 1, 28, 28)).astype(np.float32), np.array([3, 7])
    gpuconv.manual_seed(0)
    model, loss_fn = models.lenet5().to(device), nn.CrossEntropyLoss()
    loss = loss_fn(model(to_device(x, device)), to_device(labels, device))
    model.backward(loss_fn.backward())
    return float(to_numpy(loss)), [to_numpy(p.grad) for p in model.parameters()]


@pytest.mark.skipif(not HAVE_CXX, reason="no host C++ compiler for the emulated device")
def test_global_switch_reaches_a_whole_model():
    gpuconv.set_float32_matmul_precision("high")
    loss_cpu, grads_cpu = _lenet5_step("cpu")
    loss_emu, grads_emu = _lenet5_step("emu")
    gpuconv.set_float32_matmul_precision("highest")
    _, grads_fp32 = _lenet5_step("cpu")
    assert loss_emu == pytest.approx(loss_cpu, rel=1e-6)
    # The devices differ in FP32 summation order, and a last-bit difference upstream can flip an
    # operand's TF32 rounding downstream: agreement to a few TF32 ulps of the largest gradient.
    for emu_grad, cpu_grad in zip(grads_emu, grads_cpu):
        np.testing.assert_allclose(emu_grad, cpu_grad, rtol=0, atol=4 * 2.0**-11 * np.abs(cpu_grad).max())
    # TF32 moved the convolution gradients (the first parameters) away from FP32's.
    assert np.abs(grads_cpu[0] - grads_fp32[0]).max() > 1e-4 * np.abs(grads_fp32[0]).max()


def test_gpus_before_ampere_are_refused_clearly(monkeypatch):
    monkeypatch.setattr(conv_tensorcore, "_compute_capability", lambda: 75)
    with pytest.raises(RuntimeError, match=r"precision='tf32' .* compute capability 8.0 .* this GPU is sm_75"):
        conv_tensorcore._check_device("cuda", "tf32")
    monkeypatch.setattr(conv_tensorcore, "_compute_capability", lambda: 90)
    conv_tensorcore._check_device("cuda", "bf16")
    conv_tensorcore._check_device("emu", "tf32")  # the emulator runs them on any machine


def test_bench_has_tensor_core_rows():
    from gpuconv.bench import contenders

    rows = {c.name: c for c in contenders.contenders_for("cuda")}
    tf32 = rows["gpuconv cuda tf32 (tensor cores)"]
    assert "gpuconv cuda bf16 (tensor cores)" in rows
    case = types.SimpleNamespace(op="conv2d_forward")
    assert tf32.applies(case) and not tf32.applies(types.SimpleNamespace(op="relu_forward"))
    with tf32.selected_for(case):
        assert gpuconv.get_float32_matmul_precision() == "high"
    assert gpuconv.get_float32_matmul_precision() == "highest"


def _nvrtc_ptx(path, arch="sm_80") -> str:
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    source = kernels.compiler_source(path)
    _, program = nvrtc.nvrtcCreateProgram(source.encode(), path.name.encode(), 0, [], [])
    try:
        options = [o.encode() for o in (*kernels.NVRTC_OPTIONS, f"--gpu-architecture=compute_{arch[3:]}")]
        (status,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS
        _, size = nvrtc.nvrtcGetPTXSize(program)
        ptx = b" " * size
        nvrtc.nvrtcGetPTX(program, ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return ptx.rstrip(b"\0 ").decode()


def test_shared_tiles_are_aligned_for_ldmatrix():
    # A GPU-only hazard the emulator cannot see (the host compiler aligns large arrays anyway):
    # ldmatrix needs 16-byte aligned rows, so the shared stages must be declared 16-aligned.
    ptx = _nvrtc_ptx(kernels.kernel_path("conv2d_tensorcore"))
    assert "ldmatrix" in ptx
    alignments = [int(a) for a in re.findall(r"\.shared \.align (\d+)", ptx)]
    assert alignments and min(alignments) >= 16, alignments


def test_empty_batch_at_reduced_precision(device):
    # As at FP32 (and PyTorch): no kernel launched on an empty grid, an empty output, a zero gradient.
    x, w = np.zeros((0, 5, 9, 11), np.float32), np.ones((7, 5, 3, 3), np.float32)
    dy = np.zeros((0, 7, 9, 11), np.float32)
    for op, shape in [("forward", (0, 7, 9, 11)), ("input", (0, 5, 9, 11)), ("weight", (7, 5, 3, 3))]:
        result = _run(op, x, w, dy, dict(padding=1), device, precision="tf32")
        assert result.shape == shape and not result.any()

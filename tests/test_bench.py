"""The benchmark suite: its FLOP/byte accounting, its statistics, its timing loop, its worker
processes (a crashing, hanging or poisoned worker costs one row), atomic reports, the GPU check
script, and tiny `gpuconv bench --quick` runs on the CPU. Nothing here asserts on speed."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from gpuconv import bench
from gpuconv.bench import cli, contenders, machine, reports, runner


def _loop_conv_counts(batch, c_in, h, w, c_out, kh, kw, stride, pad):
    """Multiply-adds of a direct convolution, counted one by one, and its output size: every
    output pixel whose window lies inside the padded input, times every tap of every channel."""
    macs, out_h, out_w = 0, 0, 0
    for oh in range(h + 2 * pad):
        if oh * stride + kh > h + 2 * pad:
            break
        out_h += 1
    for ow in range(w + 2 * pad):
        if ow * stride + kw > w + 2 * pad:
            break
        out_w += 1
    for _n in range(batch):
        for _co in range(c_out):
            for _ in range(out_h * out_w):
                for _ci in range(c_in):
                    for _i in range(kh):
                        for _j in range(kw):
                            macs += 1
    return macs, out_h, out_w


CONV_SHAPES = [  # batch, C_in, H, W, C_out, KH, KW, stride, pad
    (2, 3, 11, 9, 4, 3, 3, 1, 1),
    (1, 2, 13, 13, 5, 5, 3, 2, 2),
    (3, 1, 8, 10, 2, 4, 4, 3, 0),
]


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_flops_and_bytes_match_an_independent_count(shape):
    batch, c_in, h, w, c_out, kh, kw, stride, pad = shape
    macs, out_h, out_w = _loop_conv_counts(*shape)
    spec = bench.Conv(batch, (c_in, h, w), (c_out, c_in, kh, kw), (c_out, out_h, out_w), (stride, stride), (pad, pad))
    assert spec.macs == macs
    for op in spec.ops:
        assert spec.flops(op) == 2 * macs
    x, y = batch * c_in * h * w, batch * c_out * out_h * out_w
    weight = c_out * c_in * kh * kw
    assert spec.bytes("conv2d_forward") == 4 * (x + weight + c_out + y)
    assert spec.bytes("conv2d_backward_data") == 4 * (y + weight + x)
    assert spec.bytes("conv2d_backward_filter") == 4 * (x + y + weight)


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_accounting_agrees_with_torch_flop_counter(shape):
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    batch, c_in, h, w, c_out, kh, kw, stride, pad = shape
    x = torch.randn(batch, c_in, h, w, requires_grad=True)
    weight = torch.randn(c_out, c_in, kh, kw, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        y = torch.nn.functional.conv2d(x, weight, stride=stride, padding=pad)
    with FlopCounterMode(display=False) as backward:  # grad-input and grad-weight together
        y.backward(torch.ones_like(y))
    spec = bench.Conv(batch, (c_in, h, w), (c_out, c_in, kh, kw), tuple(y.shape[1:]), (stride, stride), (pad, pad))
    assert spec.flops("conv2d_forward") == forward.get_total_flops()
    assert spec.flops("conv2d_backward_data") + spec.flops("conv2d_backward_filter") == backward.get_total_flops()


def test_convnet_benchmarks_layers_are_the_classic_table():
    layers = dict(bench.convnet_benchmarks_layers())
    assert list(layers) == ["L1", "L2", "L3", "L4", "L5"]
    assert [s.out_chw for s in layers.values()] == [(64, 55, 55), (192, 27, 27), (384, 13, 13), (256, 13, 13),
                                                     (256, 13, 13)]
    # L1: 128 images x 64 maps x 55 x 55 outputs x 3 x 11 x 11 taps.
    assert layers["L1"].macs == 128 * 64 * 55 * 55 * 3 * 11 * 11


def test_model_shapes_are_read_off_the_models():
    _, layers, macs = bench.model_layers("alexnet")
    specs = {name: spec for name, _, spec in layers}
    assert specs["conv1"].macs == 105_415_200  # 96 maps of 55x55, 11x11x3 kernels, per image
    assert specs["lrn1"].chw == (96, 55, 55)
    assert specs["pool3"].out_chw == (256, 6, 6)
    _, lenet, lenet_macs = bench.model_layers("lenet5")
    conv = [spec for _, _, spec in lenet if isinstance(spec, bench.Conv)]
    assert [c.out_chw for c in conv] == [(6, 28, 28), (16, 10, 10)]
    # conv1 + conv2 + the three fully connected layers, per image
    assert lenet_macs == 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    cases = bench.kernel_cases(["lenet5"])
    assert all(c.spec.batch == 256 for c in cases)
    assert {c.op for c in cases} >= {"conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter",
                                     "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
                                     "avg_pool2d_backward", "relu_forward", "relu_backward"}
    assert len({c.name for c in cases}) == len(cases)


def test_floors_are_flops_over_peak_and_bytes_over_bandwidth():
    l1 = bench.kernel_cases(["convnet-benchmarks"])[0]
    (row,) = bench.floors([l1], peak_flops=1e12, peak_bytes_per_s=1e9)
    assert row["flop_floor_s"] == pytest.approx(2 * 128 * 64 * 55 * 55 * 363 / 1e12)
    assert row["byte_floor_s"] == pytest.approx(4 * (128 * 3 * 224 * 224 + 64 * 363 + 64 + 128 * 64 * 55 * 55) / 1e9)
    assert row["floor_s"] == max(row["flop_floor_s"], row["byte_floor_s"])
    assert row["bound"] == "memory"
    text = bench.floors_markdown()
    assert text.count("convnet-benchmarks/L") == 15 and "67 TFLOP/s" in text


def test_statistics_on_known_samples():
    stats = bench.summarize([9.0, 1.0, 5.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0])
    assert (stats.median, stats.q1, stats.q3, stats.min, stats.max, stats.n) == (5.0, 3.0, 7.0, 1.0, 9.0, 9)
    assert stats.iqr == 4.0
    # Even count: the quartiles interpolate between neighbours (positions 0.75, 1.5, 2.25 of 0..3).
    stats = bench.summarize([4.0, 1.0, 3.0, 2.0])
    assert (stats.q1, stats.median, stats.q3) == (1.75, 2.5, 3.25)
    assert bench.summarize([0.5]).iqr == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        bench.summarize([])


class _FakeTimer:
    def __init__(self):
        self.calls = 0

    def start(self):
        pass

    def stop(self):
        self.calls += 1

    def seconds(self):
        return [float(i) for i in range(self.calls)]


def test_timing_loop_warms_up_then_rotates_buffers():
    seen = []
    timer = _FakeTimer()
    times = bench.time_calls(lambda tag: seen.append(tag), [("a",), ("b",), ("c",)], timer, lambda: None,
                             warmup=2, repeats=4, max_seconds=60.0)
    assert seen == ["a", "b", "c", "a", "b", "c"]
    assert times == [0.0, 1.0, 2.0, 3.0]


class _FakeEvent:
    """Records a position in a fake stream; a pair's elapsed time is the gap in milliseconds."""

    clock = 0.0
    synchronized = 0

    def record(self):
        _FakeEvent.clock += 2.5
        self.at = _FakeEvent.clock

    def synchronize(self):
        _FakeEvent.synchronized += 1


def test_event_timer_reads_every_pair_once_at_the_end():
    timer = bench.EventTimer(_FakeEvent, lambda start, stop: stop.at - start.at)
    times = bench.time_calls(lambda: None, [()], timer, lambda: None, warmup=1, repeats=3, max_seconds=60.0)
    assert times == [2.5e-3] * 3  # milliseconds from `elapsed`, reported in seconds
    assert _FakeEvent.synchronized == 1


def test_buffer_sets_exceed_twice_the_cache_within_limits():
    mib = 1 << 20
    assert bench.buffer_sets(40 * mib, 50 * mib, 64 << 30) == 3
    assert bench.buffer_sets(200 * mib, 50 * mib, 64 << 30) == 1
    assert bench.buffer_sets(1 * mib, 50 * mib, 64 << 30) == bench.MAX_BUFFER_SETS
    assert bench.buffer_sets(40 * mib, 50 * mib, 100 * mib) == 1  # memory-bound: no more than a quarter


def test_cases_run_most_important_first():
    names = [c.name for c in bench.select_cases(bench.parse_args([]))]
    first_model_kernel = names.index("lenet5/conv1/conv2d_forward")
    assert names[:15] == [c.name for c in bench.kernel_cases(["convnet-benchmarks"])]
    assert names[15:18] == ["lenet5/train/step", "alexnet/train/step", "lenet5/train/host_step"]
    assert first_model_kernel == 18
    assert names[-1] == "lenet5/train/epoch" and "alexnet/lrn2/lrn_backward" in names
    quick = [c.name for c in bench.select_cases(bench.parse_args(["--quick", "--no-epoch"]))]
    assert quick[0] == "convnet-benchmarks/L3/conv2d_forward" and "lenet5/train/step" in quick
    assert not any(n.startswith("alexnet") or n.endswith("epoch") for n in quick)
    only = bench.select_cases(bench.parse_args(["--only", "alexnet/conv2/*", "--only", "L1/conv2d_forward"]))
    assert [c.name for c in only] == ["convnet-benchmarks/L1/conv2d_forward", "alexnet/conv2/conv2d_forward",
                                      "alexnet/conv2/conv2d_backward_data", "alexnet/conv2/conv2d_backward_filter"]


def test_only_patterns_and_device_slug():
    assert cli.matches("alexnet/conv2/conv2d_forward", ["conv2d_forward"])
    assert cli.matches("alexnet/conv2/conv2d_forward", ["alexnet/conv*/conv2d_*"])
    assert not cli.matches("lenet5/conv2/conv2d_forward", ["alexnet/*"])
    info = {"gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "13.0"}, "cpu": "x"}
    assert bench.device_slug(info) == "nvidia-h100-80gb-hbm3"
    assert bench.device_slug({"gpu": {"name": "no device"}, "cpu": "AMD EPYC 7B13"}) == "cpu-amd-epyc-7b13"


TINY = [
    bench.Conv(2, (3, 7, 6), (4, 3, 3, 3), (4, 4, 3), (2, 2), (1, 1)),
    bench.Pool(2, "max", (3, 7, 7), (3, 3, 3), (3, 3), (2, 2), (0, 0)),
    bench.Pool(2, "avg", (3, 7, 7), (3, 3, 3), (3, 3), (2, 2), (0, 0)),
    bench.Relu(2, (3, 4, 5)),
    bench.LRN(2, (6, 3, 3), 5, 5e-4, 0.75, 2.0),
]


@pytest.mark.parametrize("spec", TINY, ids=lambda s: type(s).__name__ + getattr(s, "kind", ""))
def test_contenders_run_the_same_op(spec):
    """Each op's gpuconv workload and PyTorch workload give results of one shape, so the rows
    put side by side compare like with like."""
    torch = pytest.importorskip("torch")
    for op in spec.ops:
        case = bench.Case("tiny", "layer", op, spec)
        ours = bench.Gpuconv("cpu").workload(case, np.random.default_rng(0))
        theirs = bench.Torch("cpu").workload(case, np.random.default_rng(0))
        mine, reference = ours.run(*ours.make()), theirs.run(*theirs.make())
        mine = mine if isinstance(mine, tuple) else (mine,)
        reference = reference if isinstance(reference, tuple) else (reference,)
        assert [tuple(a.shape) for a in mine] == [tuple(t.shape) for t in reference], op
        assert all(torch.isfinite(t).all() for t in reference if t.is_floating_point())


def test_kernel_versions_come_from_the_sources():
    versions = bench.kernel_versions()
    assert set(versions) == set(bench.BENCHMARKED_OPS)
    for op in bench.BASELINE_VERSION_OPS:
        assert versions[op][0] == 0  # the im2col + cuBLAS baseline
    with contenders.environ("GPUCONV_KERNEL_TEST_ONLY", 3):
        assert os.environ["GPUCONV_KERNEL_TEST_ONLY"] == "3"
    assert "GPUCONV_KERNEL_TEST_ONLY" not in os.environ


def test_gpu_conv_rows_carry_the_chosen_kernel_and_useful_share():
    # Planned without a GPU: the row's extra names the kernel each AlexNet conv op runs.
    alexnet = [c for c in bench.kernel_cases(["alexnet"]) if c.op.startswith("conv2d") and c.layer == "conv1"]
    gpu = contenders.Gpuconv("cuda", "gpuconv cuda")
    extras = {case.op: gpu._plan(case) for case in alexnet}
    assert extras["conv2d_backward_data"]["kernel"].endswith("16 phases")
    assert all(0 < e["useful_macs"] <= 1 for e in extras.values())
    assert contenders.Gpuconv("cpu")._plan(alexnet[0]) is None


@pytest.fixture
def no_gpu(monkeypatch):
    """The CPU-only machine, also where a GPU is present: CuPy and PyTorch both see no device."""
    monkeypatch.setattr(machine, "cuda_status", lambda: (False, "CuPy is not installed (test)"))
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_quick_run_on_cpu_writes_reports_and_says_no_device_once(tmp_path, no_gpu, capsys):
    out = tmp_path / "results"
    code = bench.main(["--quick", "--in-process", "--only", "lenet5/conv2/conv2d_forward", "--only",
                       "lenet5/train/step", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    # One line names every GPU contender that was not measured, instead of rows for each.
    (missing,) = [line for line in printed.splitlines() if "not measured" in line]
    assert "no GPU: CuPy is not installed" in missing and "gpuconv cuda" in missing and "torch cuda" in missing
    text = (out / "results.md").read_text()
    assert "| numpy |" in text and "GPU: no device" in text and "gpuconv cuda |" not in text
    assert text.count("not measured") == 1
    data = json.loads((out / "results.json").read_text())
    rows = {(r["case"], r["contender"]): r for r in data["rows"]}
    assert set(rows) == {(case, who) for case in ("lenet5/conv2/conv2d_forward", "lenet5/train/step")
                         for who in ("numpy", "torch cpu (oneDNN)")}
    numpy_row = rows[("lenet5/conv2/conv2d_forward", "numpy")]
    assert numpy_row["status"] == "ok" and numpy_row["repeats"] == 2
    assert numpy_row["min_s"] <= numpy_row["q1_s"] <= numpy_row["median_s"] <= numpy_row["q3_s"] <= numpy_row["max_s"]
    assert numpy_row["flops"] == 2 * 64 * 16 * 10 * 10 * 6 * 25  # the quick CPU batch, 64
    assert numpy_row["pct_peak"] > 0 and "vs_torch" in numpy_row
    assert list(data["not_measured"]) == ["no GPU: CuPy is not installed"] and data["problems"] == []
    assert rows[("lenet5/train/step", "numpy")]["status"] == "ok"
    assert data["peaks"]["cpu"]["flops"] > 0 and data["machine"]["numpy"] == np.__version__
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_processes_run_the_cpu_rows_with_the_openblas_timeout(tmp_path, capsys, monkeypatch):
    """The default run: rows in a worker process started with OPENBLAS_THREAD_TIMEOUT (which
    must be set before NumPy loads, so only a fresh process can have it), into runs/bench/NAME."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    code = bench.main(["--quick", "--device", "cpu", "--only", "lenet5/relu1/relu_forward", "--repeats", "2",
                       "--warmup", "0", "--name", "tiny"])
    assert code == 0
    out = tmp_path / "runs" / "bench" / "tiny"
    data = json.loads((out / "results.json").read_text())
    assert [(r["contender"], r["status"]) for r in data["rows"]] == [("numpy", "ok"), ("torch cpu (oneDNN)", "ok")]
    assert data["machine"]["openblas_thread_timeout"] == runner.OPENBLAS_THREAD_TIMEOUT
    assert runner.worker_env()["OPENBLAS_THREAD_TIMEOUT"] == runner.OPENBLAS_THREAD_TIMEOUT
    assert "OPENBLAS_THREAD_TIMEOUT=4" in (out / "results.md").read_text()
    assert "numpy" in capsys.readouterr().out
    assert not list(tmp_path.glob("benchmarks")), "nothing is written into the source tree"


def test_cpu_epoch_is_extrapolated_and_says_so(no_gpu):
    args = bench.parse_args(["--quick", "--cpu-epoch-limit", "64", "--repeats", "1", "--warmup", "0"])
    (case,) = [c for c in bench.training_cases(["lenet5"], epoch=True) if c.op == "epoch"]
    info = {"cpu_cache_bytes": 1 << 20, "gpu": {"name": "no device"}}
    row = bench.run_row(case, bench.Gpuconv("cpu"), args, info)
    assert row.status == "ok", row.status
    assert "timed on 64 images, extrapolated to 60000" in row.note
    assert row.case.spec.images == 60000 and row.per_image == pytest.approx(row.stats.median / 60000)


def test_bad_arguments_are_refused(capsys, tmp_path, no_gpu):
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert bench.main(["--only", "no-such-case"]) == 2
    assert bench.main(["--device", "cuda"]) == 2
    assert "nothing to run: not measured (no GPU: CuPy is not installed)" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert bench.main(["--quick", "--only", "relu1/relu_forward", "--out", str(tmp_path / "file")]) == 2
    assert f"cannot write to --out {tmp_path / 'file'}" in capsys.readouterr().err
    from gpuconv.runs import RunLock

    with RunLock(tmp_path):  # another bench writing there
        assert bench.main(["--quick", "--only", "relu1/relu_forward", "--out", str(tmp_path)]) == 2
    assert "is in use by another run (pid" in capsys.readouterr().err


def test_annotate_ratios_use_time_per_image():
    conv = bench.convnet_benchmarks_layers()[2][1]
    case = bench.Case("g", "L3", "conv2d_forward", conv)
    small = bench.Case("g", "L3", "conv2d_forward", dataclasses.replace(conv, batch=16))
    rows = [bench.Row(small, bench.NUMPY, "cpu", "gpuconv", stats=bench.summarize([1.6])),
            bench.Row(small, bench.TORCH_REFERENCE["cpu"], "cpu", "torch", stats=bench.summarize([0.8])),
            bench.Row(case, "gpuconv cuda", "cuda", "gpuconv", stats=bench.summarize([0.01])),
            bench.Row(case, bench.TORCH_REFERENCE["cuda"], "cuda", "torch", stats=bench.summarize([0.005]))]
    bench.annotate(rows, {"cpu": {"flops": 1e12, "bytes_per_s": 1e10}, "cuda": {"flops": 5e13, "bytes_per_s": 3e12}})
    numpy_row, torch_cpu, ours, torch_gpu = rows
    assert numpy_row.vs_torch == pytest.approx(0.5) and math.isnan(torch_cpu.vs_torch)
    assert ours.vs_torch == pytest.approx(0.5)
    assert ours.speedup == pytest.approx((1.6 / 16) / (0.01 / 128))
    assert torch_gpu.speedup == pytest.approx((0.8 / 16) / (0.005 / 128))
    assert ours.achieved == pytest.approx(conv.flops("conv2d_forward") / 0.01)
    assert ours.pct_peak == pytest.approx(100 * conv.flops("conv2d_forward") / 0.01 / 5e13)


def test_notes_hold_the_floors_the_code_computes():
    from pathlib import Path

    notes = Path(__file__).resolve().parent.parent / "benchmarks" / "NOTES.md"
    if not notes.is_file():
        pytest.skip("benchmarks/NOTES.md is not beside the tests (installed package)")
    assert bench.floors_markdown() in notes.read_text(), "regenerate the table with `gpuconv bench --floors`"


@pytest.mark.gpu
@pytest.mark.skipif(not machine.cuda_status()[0], reason="no CUDA GPU (CuPy)")
def test_quick_run_on_the_gpu_times_every_gpu_contender(tmp_path):
    out = tmp_path / "results"
    assert bench.main(["--quick", "--device", "cuda", "--only", "lenet5/conv2/conv2d_forward",
                       "--only", "lenet5/pool1/max_pool2d_backward", "--only", "lenet5/train/step",
                       "--repeats", "3", "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert all(r["device"] == "cuda" for r in data["rows"])
    ours = [r for r in data["rows"] if r["contender"].startswith("gpuconv")]
    assert ours and all(r["status"] == "ok" and r["repeats"] == 3 and r["median_s"] > 0 for r in ours), ours
    assert all(r["status"] in ("ok", "no device") for r in data["rows"] if r["contender"].startswith("torch"))
    versions = bench.kernel_versions()["conv2d_forward"]
    expected = {"gpuconv cuda v0 (im2col+cuBLAS)" if n == 0 else f"gpuconv cuda v{n}" for n in versions}
    assert {r["contender"] for r in ours if r["case"] == "lenet5/conv2/conv2d_forward"} == expected
    assert data["peaks"]["cuda"]["flops"] > 1e12 and data["machine"]["gpu"]["l2_bytes"] > 0


def test_gpuconv_training_step_runs_as_the_trainer_does(monkeypatch):
    """int32 labels and no per-step label check: on 'cuda' that check is a device round trip,
    which the trainer does not make (its labels are checked once, when loaded)."""
    from gpuconv import functional

    calls = []
    loss_with_grad = functional.cross_entropy_with_grad

    def spy(input, target, reduction="mean", *, validate_target=True):
        calls.append((target.dtype, validate_target))
        return loss_with_grad(input, target, reduction, validate_target=validate_target)

    monkeypatch.setattr(functional, "cross_entropy_with_grad", spy)
    rng = np.random.default_rng(0)
    for case in bench.training_cases(["lenet5"], epoch=True):
        spec = dataclasses.replace(case.spec, batch=8, images=16 if case.spec.images else 0)
        work = bench.Gpuconv("cpu").workload(dataclasses.replace(case, spec=spec), rng)
        work.run(*work.make())
    assert len(calls) == 1 + 2 and set(calls) == {(np.dtype(np.int32), False)}


_FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python3 in benchmarks/gpu_check.sh: logs each call, answers as told.
echo "$*" >> "$FAKE_LOG"
case "$1 $2" in
    "-c "*cuda_status*) exit "$FAKE_GPU_STATUS" ;;
    "-c "*pytest_timeout*) exit 0 ;;
    "-c "*) echo "machine info" ;;
    "-m pytest") [ "${FAKE_HANG:-}" = tests ] && sleep 30; exit "$FAKE_TESTS_STATUS" ;;
    "-m gpuconv.bench")
        [ "${FAKE_HANG:-}" = bench ] && sleep 30
        while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
        for name in results.md results.json results.png; do echo x > "$out/$name"; done
        echo "gpuconv bench: 3 rows measured, 1 failed, 0 skipped, in 1 s; wrote it"
        echo "gpuconv bench: what failed:"
        echo "  - cuda lenet5: the worker was killed by SIGSEGV during lenet5/conv1/conv2d_forward"
        exit "$FAKE_BENCH_STATUS" ;;
esac
"""


def _run_gpu_check(tmp_path, python=None, timeout=60, **env):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    if not script.is_file():
        pytest.skip("benchmarks/gpu_check.sh is not beside the tests (installed package)")
    out = tmp_path / "out"
    full_env = {**os.environ, "OUT": str(out), **{k: str(v) for k, v in env.items()}}
    if python is None:
        fake = tmp_path / "python"
        fake.write_text(_FAKE_PYTHON)
        fake.chmod(0o755)
        full_env.update(PYTHON=str(fake), FAKE_LOG=str(tmp_path / "calls.log"))
    result = subprocess.run(["bash", str(script)], env=full_env, capture_output=True, text=True, timeout=timeout)
    assert "unbound variable" not in result.stdout + result.stderr
    return result, out


@pytest.mark.parametrize("gpu, tests, bench_status, expected", [(0, 0, 0, 0), (0, 3, 1, 3), (0, 0, 1, 1),
                                                                 (1, 0, 0, 1)])
def test_gpu_check_script_exit_status_and_outputs(tmp_path, gpu, tests, bench_status, expected):
    """The script's own logic, with python faked: its status is the GPU tests', then the
    benchmark's (1 without a GPU); it leaves few files, at most one folder deep, as a machine that
    returns $OUT needs, and a summary of each step and of what failed."""
    result, out = _run_gpu_check(tmp_path, FAKE_GPU_STATUS=gpu, FAKE_TESTS_STATUS=tests,
                                 FAKE_BENCH_STATUS=bench_status)
    assert result.returncode == expected, result.stdout + result.stderr
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(f.count("/") <= 1 for f in files), files
    assert {"summary.txt", "machine.txt", "pytest-gpu.log", "bench.log", "bench/results.md"} <= set(files)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    (bench_call,) = [line for line in calls if line.startswith("-m gpuconv.bench")]
    assert "--time-budget 240" in bench_call and "--cpu-cases train/" in bench_call and "--device all" in bench_call
    (pytest_call,) = [line for line in calls if line.startswith("-m pytest")]
    assert "-m gpu" in pytest_call and "--timeout 60" in pytest_call and "-rA" in pytest_call
    assert f"--junitxml {out}/pytest-gpu.xml" in pytest_call
    summary = (out / "summary.txt").read_text()
    assert "killed by SIGSEGV during lenet5/conv1" in summary and summary in result.stdout
    assert ("no usable GPU" in summary) == bool(gpu)


def test_gpu_check_steps_are_time_boxed(tmp_path):
    """A step that hangs is killed at its limit, recorded as timed out, and the next step runs."""
    result, out = _run_gpu_check(tmp_path, FAKE_GPU_STATUS=0, FAKE_TESTS_STATUS=0, FAKE_BENCH_STATUS=0,
                                 FAKE_HANG="bench", BENCH_SECONDS=2)
    summary = (out / "summary.txt").read_text()
    assert "bench    timed out after 2 s" in summary
    assert "tests    ok" in summary
    assert result.returncode == 124


def test_gpu_check_without_a_gpu_reports_no_device_and_still_writes_the_table(tmp_path):
    """The real script on this machine, cut down by its knobs: with no GPU it says so, fails,
    and still leaves the CPU rows of the table and the test reports."""
    if machine.cuda_status()[0]:
        pytest.skip("this machine has a GPU")
    result, out = _run_gpu_check(
        tmp_path, python=os.sys.executable, timeout=240, PYTHON=os.sys.executable,
        BENCH_ARGS="--quick --only lenet5/relu1/relu_forward --cpu-cases lenet5/relu1 --repeats 2 --warmup 0",
        PYTEST_ARGS="tests/test_activation.py")
    assert result.returncode == 1, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text()
    assert "no usable GPU" in summary and "bench    ok" in summary and "tests    ok" in summary
    data = json.loads((out / "bench" / "results.json").read_text())
    assert [r["contender"] for r in data["rows"]] == ["numpy", "torch cpu (oneDNN)"]
    assert any(reason.startswith("no GPU") for reason in data["not_measured"])
    assert "skipped" in (out / "pytest-gpu.xml").read_text()


def test_a_broken_pytorch_install_does_not_end_the_run(monkeypatch):
    """`import torch` raising OSError (CUDA libraries missing): its rows say so, the rest run."""
    import builtins
    import sys

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise OSError("libcudnn.so.9: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    assert bench.machine_info(use_gpu=False)["torch"] == "does not import (OSError)"
    usable, why = bench.Torch("cpu").available()
    assert not usable and "libcudnn" in why
    machine.free_device_memory("cuda")  # a cleanup, never an error


_FAKE_WORKER = r"""
import json, os, signal, sys, time

job_path, events_path = sys.argv[1:]
job = json.load(open(job_path))
plan = json.loads(os.environ["FAKE_PLAN"])
events = open(events_path, "a")


def emit(event):
    events.write(json.dumps(event) + "\n")
    events.flush()


if job["peaks"]:
    emit({"peaks": {job["peaks"]: {"flops": 1e12, "bytes_per_s": 1e11, "how": "fake"}}})
for case, contender in job["pairs"]:
    emit({"start": [case, contender]})
    what = plan.get(f"{case} [{contender}]", "ok")
    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if what == "hang":
        time.sleep(60)
    stats = {"median": 1e-3, "q1": 1e-3, "q3": 1e-3, "min": 1e-3, "max": 1e-3, "n": 3}
    status = "error: CUDARuntimeError: cudaErrorIllegalAddress" if what == "poison" else "ok"
    emit({"row": {"case": case, "spec": {"batch": 128}, "contender": contender, "device": "cuda",
                  "family": "gpuconv", "status": status, "buffers": 1, "note": os.environ["OPENBLAS_THREAD_TIMEOUT"],
                  "extra": {}, "stats": None if what == "poison" else stats}})
    if what == "poison":
        emit({"device_error": "CUDARuntimeError: cudaErrorIllegalAddress"})
        sys.exit(3)
"""


class _FakeGpuContender(contenders.Contender):
    device = "cuda"

    def __init__(self, name):
        self.name = name


@pytest.mark.parametrize("failure, status, problem", [
    ("crash", "error: the worker was killed by SIGSEGV", "killed by SIGSEGV during convnet-benchmarks/L2/"),
    ("hang", "error: the row ran past --row-timeout 2 s", "ran past --row-timeout 2 s"),
    ("poison", "error: CUDARuntimeError: cudaErrorIllegalAddress", "the device became unusable (CUDARuntimeError"),
])
def test_a_failing_worker_costs_one_row_and_the_rest_are_measured(tmp_path, monkeypatch, failure, status, problem):
    """Simulated with a stand-in worker: a row that crashes its process (SIGSEGV), hangs, or
    leaves the device unusable (a sticky CUDA error) is reported as that row's error; the rest of
    its group runs in a fresh worker, the other groups are untouched, the summary names it."""
    cases = [c for c in bench.kernel_cases(["convnet-benchmarks", "lenet5"])
             if c.op == "conv2d_forward"]  # L1..L5, then lenet5 conv1, conv2: two jobs on 'cuda'
    broken = "convnet-benchmarks/L2/conv2d_forward"
    script = tmp_path / "worker.py"
    script.write_text(_FAKE_WORKER)
    monkeypatch.setenv("FAKE_PLAN", json.dumps({f"{broken} [ours]": failure}))
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    pairs = [(c, k) for c in cases for k in (_FakeGpuContender("ours"), _FakeGpuContender("theirs"))]
    jobs = runner.plan(pairs)
    assert [(j.label, len(j.pairs)) for j in jobs] == [("cuda convnet-benchmarks", 10), ("cuda lenet5", 4)]
    writes = []
    collector = runner.Collector({c.name: c for c in cases}, lambda: writes.append(len(collector.rows)))
    args = bench.parse_args(["--row-timeout", "2"])
    runner.run_in_workers(jobs, [], args, {}, None, collector, worker_command=[os.sys.executable, str(script)])
    rows = {(r.case.name, r.contender): r for r in collector.rows}
    assert len(collector.rows) == len(rows) == 14
    failed = {key: r.status for key, r in rows.items() if r.status != "ok"}
    assert list(failed) == [(broken, "ours")] and failed[(broken, "ours")].startswith(status)
    assert all(r.stats and r.note == runner.OPENBLAS_THREAD_TIMEOUT for key, r in rows.items() if key not in failed)
    assert len(collector.problems) == 1 and problem in collector.problems[0]
    assert "a fresh worker runs the 7 rows left" in collector.problems[0]
    assert collector.peaks["cuda"]["how"] == "fake"  # measured once, by the first worker
    assert writes == sorted(writes) and writes[-1] == 14  # the report was rewritten as rows came in


def test_a_job_whose_workers_keep_failing_is_given_up(tmp_path, monkeypatch):
    cases = [c for c in bench.kernel_cases(["lenet5"]) if c.op.startswith("conv2d")]
    script = tmp_path / "worker.py"
    script.write_text(_FAKE_WORKER)
    monkeypatch.setenv("FAKE_PLAN", json.dumps({f"{c.name} [ours]": "crash" for c in cases}))
    jobs = runner.plan([(c, _FakeGpuContender("ours")) for c in cases])
    collector = runner.Collector({c.name: c for c in cases}, lambda: None)
    runner.run_in_workers(jobs, [], bench.parse_args([]), {}, None, collector,
                          worker_command=[os.sys.executable, str(script)])
    assert len(collector.rows) == len(cases) == 6
    crashed = [r for r in collector.rows if "SIGSEGV" in r.status]
    given_up = [r for r in collector.rows if r.status == "error: not run: its workers kept failing"]
    assert len(crashed) == runner.MAX_WORKERS_PER_JOB and len(given_up) == 6 - runner.MAX_WORKERS_PER_JOB
    assert collector.problems[-1] == f"cuda lenet5: gave up after {runner.MAX_WORKERS_PER_JOB} workers; 2 rows not run"


def test_the_summary_lists_what_failed_and_sets_the_exit_status(capsys, tmp_path):
    case = bench.kernel_cases(["lenet5"])[0]
    collector = runner.Collector({case.name: case}, lambda: None)
    assert cli._summary(collector, tmp_path, 1.0) == 0
    collector.add_row(case, _FakeGpuContender("ours"), "error: the worker was killed by SIGSEGV")
    collector.problems.append("cuda lenet5: the worker was killed by SIGSEGV during lenet5/conv1/conv2d_forward")
    assert cli._summary(collector, tmp_path, 1.0) == 1
    out = capsys.readouterr().out
    assert "0 rows measured, 1 failed" in out and "what failed:" in out
    assert "  - cuda lenet5: the worker was killed by SIGSEGV" in out
    assert f"  - {case.name} [ours]: error: the worker was killed by SIGSEGV" in out


def test_reports_are_written_atomically(tmp_path, monkeypatch):
    """A report is replaced whole or not at all: a chart that fails midway leaves the previous
    results.png, and no temporary file behind."""
    case = bench.kernel_cases(["lenet5"])[0]
    rows = [bench.Row(case, "numpy", "cpu", "gpuconv", stats=bench.summarize([1e-3]))]
    info = {"date": "2026-12-01 00:00 UTC", "cpu": "x", "cpu_count": 1, "cpu_cache_bytes": 1 << 20,
            "gpuconv": "0", "numpy": "0", "torch": "0", "cudnn": "n/a", "python": "3",
            "gpu": {"name": "no device", "reason": "test"}}
    bench.write_reports(tmp_path, info, {}, rows)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(first) == ["results.json", "results.md", "results.png"]

    class HalfAChart:
        def savefig(self, f, **kwargs):
            f.write(b"\x89PNG half of a chart")
            raise KeyboardInterrupt

    monkeypatch.setattr(reports, "bar_chart", lambda rows, title: HalfAChart())
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig: None)
    rows.append(bench.Row(case, "torch cpu (oneDNN)", "cpu", "torch", stats=bench.summarize([2e-3])))
    with pytest.raises(KeyboardInterrupt):
        bench.write_reports(tmp_path, info, {}, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(first)  # no temporary left
    assert (tmp_path / "results.png").read_bytes() == first["results.png"]
    assert "torch cpu (oneDNN)" in (tmp_path / "results.md").read_text()  # the tables were complete


class _FailingGpuContender(_FakeGpuContender):
    """A contender whose rows fail and whose device is then unusable, as after an illegal address."""

    def __init__(self, name, device_error):
        super().__init__(name)
        self.why = device_error

    def available(self):
        return True, ""

    def workload(self, case, rng):
        raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")

    def device_error(self):
        return self.why


def test_a_worker_stops_when_its_device_is_poisoned(capsys):
    """The worker's own loop: after a failed row it asks the device; a sticky error ends the
    worker at once (its parent starts a fresh one), a plain error does not."""
    cases = bench.kernel_cases(["lenet5"])[:3]
    args = bench.parse_args(["--repeats", "1", "--warmup", "0"])
    for why, expected_rows, expected_status in (("", 3, 0), ("CUDARuntimeError: illegal address", 1, 3)):
        events = []
        status = runner.execute([(c, _FailingGpuContender("ours", why)) for c in cases], args, {}, None, None,
                                events.append)
        rows = [e["row"] for e in events if "row" in e]
        assert status == expected_status and len(rows) == expected_rows
        assert all(r["status"].startswith("error: RuntimeError: cudaErrorIllegalAddress") for r in rows)
        assert ({"device_error": why} in events) == bool(why)
    assert "cudaErrorIllegalAddress" in capsys.readouterr().err  # each failure's traceback


def test_peaks_and_gpu_info_failures_do_not_end_the_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cuBLAS failed to initialise")

    monkeypatch.setattr(machine, "measure_peaks", broken)
    case = bench.kernel_cases(["lenet5"])[0]
    events = []
    args = bench.parse_args(["--quick", "--repeats", "1", "--warmup", "0"])
    info = {"cpu_cache_bytes": 1 << 20, "gpu": {"name": "no device"}}
    assert runner.execute([(case, bench.Gpuconv("cpu"))], args, info, None, "cpu", events.append) == 0
    assert events[0] == {"peaks_error": "RuntimeError: cuBLAS failed to initialise"}
    assert events[-1]["row"]["status"] == "ok"
    collector = runner.Collector({case.name: case}, lambda: None)
    for event in events:
        collector.handle(event, "cpu")
    assert collector.problems == ["cpu: measuring the peaks failed (RuntimeError: cuBLAS failed to initialise); "
                                  "its rows have no % peak"]

    monkeypatch.setattr(machine, "cuda_status", lambda: (True, "a GPU (test)"))
    monkeypatch.setattr(machine, "_gpu_info", broken)
    info = machine.machine_info(use_gpu=True)
    assert info["gpu"]["reason"] == "GPU info failed: RuntimeError: cuBLAS failed to initialise"
    assert machine.cache_bytes(info, "cuda") == machine.UNKNOWN_L2_BYTES
    assert "GPU: GPU (not described) (GPU info failed" in "\n".join(reports.header_lines(info, {}))


def test_host_path_rows_time_the_dry_run_and_the_replay_and_count_device_operations():
    from gpuconv.bench import host

    (case,) = host.host_cases(["lenet5"])
    small = dataclasses.replace(case, spec=dataclasses.replace(case.spec, batch=2))
    rng = np.random.default_rng(0)
    eager, replay = host.EmuHost(graph=False), host.EmuHost(graph=True)
    assert eager.applies(case) and not bench.Gpuconv("cpu").applies(case) and not bench.Torch("cpu").applies(case)
    work = eager.workload(small, rng)
    # LeNet-5's steady-state step: one optimizer launch, and a replay issues exactly its operations
    tally = dict(item.rsplit(" x", 1) if " x" in item else (item, "1") for item in work.extra["ops"].split(", "))
    assert tally["sgd_step_v2"] == "1" and sum(map(int, tally.values())) == work.extra["device_ops"]
    work.run(*work.make())
    graphed = replay.workload(small, rng)
    assert graphed.extra["replay_ops"] == work.extra["device_ops"]
    graphed.run(*graphed.make())

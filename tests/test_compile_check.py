"""The NVRTC compile gate: every kernel source compiles for sm_80 and sm_90, ptxas's report is
parsed per kernel, and a broken source fails with its file and line."""
from __future__ import annotations

from pathlib import Path

import pytest

from gpuconv import compile_check, sass
from gpuconv.kernels import kernel_dir, parse_signatures

KERNELS = Path(__file__).with_name("emu_kernels")
HARNESS = KERNELS / "harness.cu"
BROKEN = KERNELS / "broken.cu"


def _nvrtc_missing() -> str | None:
    try:
        from cuda.bindings import nvrtc

        nvrtc.nvrtcVersion()
    except Exception as exc:  # not installed, or the NVRTC library cannot be loaded
        return f"NVRTC is not usable through cuda.bindings: {exc}"
    return None


needs_nvrtc = pytest.mark.skipif(_nvrtc_missing() is not None, reason=_nvrtc_missing() or "")


def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'conv_v2' for 'sm_80'
ptxas info    : Function properties for conv_v2
ptxas         .     24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8256 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'relu' for 'sm_80'
ptxas info    : Function properties for relu
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 364 bytes cmem[0]
"""
    assert compile_check.parse_ptxas_log(log) == [
        compile_check.KernelUsage("conv_v2", 255, 16, 12, 8256, 24),
        compile_check.KernelUsage("relu", 8, 0, 0, 0, 0),
    ]


def test_parse_errors():
    log = 'kernels_cu/a.cu(12): error: expected a ";"\nkernels_cu/a.cu(3): warning #177-D: unused\n'
    assert compile_check.parse_errors(log) == ['kernels_cu/a.cu:12: error: expected a ";"']


@needs_nvrtc
def test_good_source_reports_every_kernel():
    results = compile_check.check([HARNESS], ["sm_80", "sm_90"])
    assert [(r.arch, r.ok, r.errors) for r in results] == [("sm_80", True, []), ("sm_90", True, [])]
    kernels = set(parse_signatures(HARNESS.read_text()))
    for result in results:
        usage = {k.name: k for k in result.kernels}
        assert set(usage) == kernels
        assert usage["matmul_tiled"].shared_bytes == 2 * 16 * 16 * 4
        assert usage["block_sum"].shared_bytes == 0  # dynamic shared memory is not static
        assert all(k.registers > 0 for k in result.kernels)


@needs_nvrtc
def test_broken_source_names_file_and_line():
    (result,) = compile_check.check([BROKEN], ["sm_80"])
    assert not result.ok and not result.kernels
    assert result.errors == ['emu_kernels/broken.cu:6: error: identifier "undeclared_value" is undefined']


@needs_nvrtc
def test_command_line(capsys):
    assert compile_check.main(["--arch", "sm_80", str(HARNESS)]) == 0
    table = capsys.readouterr().out
    assert "matmul_tiled" in table and "sm_80" in table and "sm_90" not in table
    assert compile_check.main(["--arch", "sm_90", str(BROKEN), str(HARNESS)]) == 1
    captured = capsys.readouterr()
    assert "emu_kernels/broken.cu:6: error:" in captured.err
    assert "FAILED" in captured.out


def test_bad_arch_is_refused():
    with pytest.raises(ValueError, match="arch must look like 'sm_80', got 'ampere'"):
        compile_check.check([HARNESS], ["ampere"])


@needs_nvrtc
@pytest.mark.parametrize("path", sorted(kernel_dir().glob("*.cu")), ids=lambda p: p.name)
def test_library_kernels_compile(path):
    results = compile_check.check([path], compile_check.DEFAULT_ARCHS)
    for result in results:
        assert result.ok, "\n".join(result.errors) or result.log
        assert {k.name for k in result.kernels} == set(parse_signatures(path.read_text())), result.arch


# ------------------------------------------------------------------------------------------
# check-kernels --sass: the static reading of sm_90 machine code (gpuconv.sass).

def _nvdisasm_missing() -> str | None:
    try:
        sass.find_nvdisasm()
    except sass.DisassemblerMissing as exc:
        return str(exc)
    return None


needs_nvdisasm = pytest.mark.skipif(_nvrtc_missing() is not None or _nvdisasm_missing() is not None,
                                    reason=_nvrtc_missing() or _nvdisasm_missing() or "")

# Two loops, one nested in the other, and a trap loop after EXIT: the hot loop is the inner one,
# found by its backward branch; the outer one holds it and the trap has no body.
DISASSEMBLY = """
//--------------------- .text.k   --------------------------
	.section	.text.k,"ax",@progbits
k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0020*/                   FFMA R3, R4, R5, R3 ;
        /*0030*/                   FFMA R6, R4, R5, R6 ;
        /*0040*/                   LDS.128 R8, [R9] ;
        /*0050*/              @!P0 BRA `(.L_x_1) ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
.L_x_2:
        /*0080*/                   BRA `(.L_x_2);
//--------------------- .nv.info  --------------------------
	.section	.nv.info,"",@"SHT_CUDA_INFO"
        /*0090*/                   FFMA R3, R4, R5, R3 ;
"""


def test_parse_disassembly_and_hot_loop():
    functions = sass.parse_disassembly(DISASSEMBLY)
    assert list(functions) == ["k"]
    assert [i.opcode for i in functions["k"]] == ["MOV", "IADD3", "FFMA", "FFMA", "LDS", "BRA", "BRA", "EXIT", "BRA"]
    loop = sass.hot_loop(functions["k"], sass._label_addresses(DISASSEMBLY))
    assert (loop.start, loop.end, loop.instructions, loop.math) == (0x20, 0x50, 4, 2)
    assert loop.math_share == 0.5 and loop.opcodes == {"FFMA": 2, "LDS": 1, "BRA": 1}
    assert sass.hot_loop(functions["k"][:1], {}) is None  # no loop at all


def test_launch_threads_from_ptx():
    ptx = """.visible .entry tiled(.param .u64 a, .param .u32 n)
.maxntid 256, 1, 1
.minnctapersm 2
{ ret; }
.visible .entry plain(.param .u64 a)
{ ret; }
.visible .entry shaped(.param .u64 a) .maxntid 16, 8, 2 { ret; }"""
    assert sass.launch_threads(ptx) == {"tiled": 256, "shaped": 256}


@pytest.mark.parametrize("threads, registers, shared, expected", [
    (256, 128, 20_000, (2, "registers")),   # 128 x 256 = 32K registers a block
    (256, 24, 0, (8, "threads")),            # 2048 threads
    (32, 16, 0, (32, "blocks")),             # the 32-block cap
    (256, 32, 100 * 1024, (2, "shared")),    # 228 KiB / (100 KiB + the runtime's 1 KiB)
    (256, 63, 0, (4, "registers")),          # 63 registers allocate as 64
])
def test_resident_blocks(threads, registers, shared, expected):
    assert sass.resident_blocks(threads, registers, shared) == expected


def test_conv_spills_fail_the_gate():
    # A planted defect: a convolution kernel that spills is an error, a spill elsewhere is not.
    spilling = compile_check.KernelUsage("conv2d_x", 128, 16, 16, 0, 16)
    results = [compile_check.CompileResult(kernel_dir() / "conv2d_forward.cu", "sm_90", True, kernels=[spilling]),
               compile_check.CompileResult(kernel_dir() / "pool.cu", "sm_90", True,
                                           kernels=[spilling.__class__("pool", 40, 8, 8, 0, 8)])]
    assert compile_check.spilling_conv_kernels(results) == [
        "kernels_cu/conv2d_forward.cu conv2d_x sm_90: 16 bytes spill stores, 16 loads"]


def test_sass_without_disassembler_is_a_clear_error(monkeypatch, capsys):
    def missing():
        raise sass.DisassemblerMissing("check-kernels --sass needs nvdisasm (...)")

    monkeypatch.setattr(sass, "find_nvdisasm", missing)
    assert compile_check.main(["--sass", str(HARNESS)]) == 2
    assert "error: check-kernels --sass needs nvdisasm" in capsys.readouterr().err


@needs_nvdisasm
def test_sass_report_of_a_tiled_kernel(capsys):
    assert compile_check.main(["--arch", "sm_80", "--sass", str(HARNESS)]) == 0
    out = capsys.readouterr().out
    assert "FFMA/HMMA" in out and "matmul_tiled" in out
    reports = {r.usage.name: r for r in compile_check.sass_reports(compile_check.check([HARNESS], ["sm_90"]))}
    loop = reports["matmul_tiled"].loop
    assert loop is not None and loop.math > 0 and 0 < loop.math_share < 1


@needs_nvdisasm
def test_conv_kernels_meet_the_sass_targets():
    # The CPU-side targets for the default convolution kernels of AlexNet-sized layers:
    # no spills anywhere (the gate), at least 2 resident blocks per SM, and a hot loop of at
    # least 80% FFMA for the big forward / backward-data tile.
    paths = sorted(kernel_dir().glob("conv2d_*.cu"))
    results = compile_check.check(paths, compile_check.DEFAULT_ARCHS)
    assert all(r.ok for r in results)
    assert compile_check.spilling_conv_kernels(results) == []
    reports = {r.usage.name: r for r in compile_check.sass_reports(results)}
    for name, report in reports.items():
        if "_v2_" in name and name != "conv2d_split_k_reduce_v2":
            assert report.blocks_per_sm >= 2, (name, report.blocks_per_sm, report.limiter)
    assert reports["conv2d_gemm_v2_128x128"].loop.math_share >= 0.80

"""The NVRTC compile gate: every kernel source compiles for sm_80 and sm_90, ptxas's report is
parsed per kernel, and a broken source fails with its file and line."""
from __future__ import annotations

from pathlib import Path

import pytest

from gpuconv import compile_check
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

"""The kernel loader: signature parsing, argument casting, version selection, package data."""
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from gpuconv import kernels

SOURCE = r'''
// a comment mentioning extern "C" __global__ void ignored(int x)
extern "C" __global__ void __launch_bounds__(256) scale(const float* __restrict__ x, float* y,
                                                        float alpha, long long n, unsigned int flags) {}
extern "C" __global__ void nothing() {}
'''


def test_parse_signatures_reads_types_and_pointers():
    sigs = kernels.parse_signatures(SOURCE)
    assert set(sigs) == {"scale", "nothing"}
    assert [(p.ctype, p.name, p.pointer) for p in sigs["scale"]] == [
        ("float", "x", True), ("float", "y", True), ("float", "alpha", False),
        ("long long", "n", False), ("unsigned int", "flags", False),
    ]
    assert sigs["nothing"] == ()


def test_parse_signatures_reads_a_parameter_list_macro_as_the_compiler_does():
    """A kernel family's tiles share their parameter list through object-like macros (nested,
    continued over lines, beside other parameters); a function-like macro is not one."""
    source = r'''
#define SHAPE int rows, \
    int cols
#define PARAMS const float* __restrict__ a, SHAPE
#define TWICE(x) (2 * (x))
extern "C" __global__ void __launch_bounds__(64, 6) tile_64(PARAMS) {}
extern "C" __global__ void tile_pitch(PARAMS, int pitch) {}
'''
    sigs = kernels.parse_signatures(source)
    assert [(p.ctype, p.name, p.pointer) for p in sigs["tile_64"]] == [
        ("float", "a", True), ("int", "rows", False), ("int", "cols", False)]
    assert [p.name for p in sigs["tile_pitch"]] == ["a", "rows", "cols", "pitch"]
    with pytest.raises(kernels.KernelArgumentError, match="cannot parse parameter 'TWICE'"):
        kernels.parse_signatures('extern "C" __global__ void k(TWICE) {}\n#define TWICE(x) x\n')


def test_cast_args_gives_exact_scalar_types():
    params = kernels.parse_signatures(SOURCE)["scale"]
    x = np.zeros(4, np.float32)
    args = kernels.cast_args("scale", params, (x, x, 0.5, 4, 1))
    assert [type(a) for a in args[2:]] == [np.float32, np.int64, np.uint32]


@pytest.mark.parametrize("args, message", [
    ((np.zeros(4, np.float64), np.zeros(4, np.float32), 1.0, 4, 0), "x is float\\*, got an array of float64"),
    ((np.zeros((4, 4), np.float32).T, np.zeros(4, np.float32), 1.0, 4, 0), "not C-contiguous"),
    ((np.zeros(4, np.float32), np.zeros(4, np.float32), 1.0, 2.5, 0), "n is long long, got 2.5"),
    ((np.zeros(4, np.float32), np.zeros(4, np.float32), 1.0, 4, -1), "flags=-1 does not fit unsigned int"),
    ((np.zeros(4, np.float32), 3.0, 1.0, 4, 0), "y needs an array"),
    ((np.zeros(4, np.float32),), "takes 5 arguments, got 1"),
])
def test_cast_args_refuses_mismatches(args, message):
    params = kernels.parse_signatures(SOURCE)["scale"]
    with pytest.raises(kernels.KernelArgumentError, match=message):
        kernels.cast_args("scale", params, args)


def test_launch_refuses_host_arrays_and_unknown_kernels():
    topic = kernels.kernel_topics()[0]
    with pytest.raises(KeyError, match="no extern"):
        kernels.launch(topic, "no_such_kernel", 1, 1, ())
    name, params = next(iter(kernels.signatures(topic).items()))
    host_args = [np.zeros(1, p.dtype) if p.pointer else 1 for p in params]
    with pytest.raises(ValueError, match="all be on 'cuda' or all on 'emu'"):
        kernels.launch(topic, name, 1, 1, host_args)


def test_select_version_reads_the_environment(monkeypatch):
    versions = {0: "baseline", 1: "tiled"}
    assert kernels.select_version("conv2d_forward", versions, default=1) == "tiled"
    monkeypatch.setenv("GPUCONV_KERNEL_CONV2D_FORWARD", "0")
    assert kernels.select_version("conv2d_forward", versions, default=1) == "baseline"
    monkeypatch.setenv("GPUCONV_KERNEL_CONV2D_FORWARD", "7")
    with pytest.raises(ValueError, match=r"has versions \[0, 1\]"):
        kernels.select_version("conv2d_forward", versions, default=1)


@pytest.mark.parametrize("topic", kernels.kernel_topics())
def test_every_kernel_file_documents_itself_and_parses(topic):
    text = kernels.kernel_path(topic).read_text()
    assert text.lstrip().startswith(("//", "/*")), f"{topic}.cu must open with its header comment"
    assert re.search(r"[Ll]aunch", text.split("extern")[0]), f"{topic}.cu header must state the launch shape"
    assert not re.search(r"#\s*include\s*<", text), "NVRTC has no host headers"
    for header in re.findall(r'#\s*include\s*"([^"]+)"', text):
        assert (kernels.kernel_dir() / header).is_file(), f"{topic}.cu includes {header}, which is not in kernels_cu/"
    assert kernels.signatures(topic), f"{topic}.cu has no extern \"C\" __global__ kernel"


def test_wheel_ships_the_kernel_sources(tmp_path):
    pytest.importorskip("hatchling")
    root = kernels.kernel_dir().parent
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("gpuconv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in kernels.kernel_dir().iterdir():
        assert f"gpuconv/kernels_cu/{source.name}" in names
    assert any(n.startswith("gpuconv/emu_runtime/") for n in names)


def test_compiler_source_expands_local_headers_once_with_line_markers(tmp_path):
    folder = tmp_path / "kernels_cu"
    folder.mkdir()
    (folder / "tile.cuh").write_text("constexpr int TILE = 16;\n")
    (folder / "a.cu").write_text('#include "tile.cuh"\n#include "tile.cuh"\nint x = TILE;\n')
    text = kernels.compiler_source(folder / "a.cu")
    assert text.count("constexpr int TILE") == 1
    assert text.splitlines() == [
        '#line 1 "kernels_cu/a.cu"', '#line 1 "kernels_cu/tile.cuh"', "constexpr int TILE = 16;",
        '#line 2 "kernels_cu/a.cu"', '#line 3 "kernels_cu/a.cu"', "int x = TILE;",
    ]
    (folder / "b.cu").write_text('\n#include "missing.cuh"\n')
    with pytest.raises(FileNotFoundError, match="kernels_cu/b.cu:2: included file 'missing.cuh'"):
        kernels.compiler_source(folder / "b.cu")

"""The NVRTC compile gate: every kernel source must compile for the GPUs gpuconv targets.

Compiles each ``kernels_cu/*.cu`` (or the files named) with NVRTC, the compiler CuPy uses at run
time, called directly through ``cuda.bindings.nvrtc`` so that no GPU is needed, with the options
of :data:`gpuconv.kernels.NVRTC_OPTIONS` for each target architecture (default sm_80 and sm_90),
and reads ptxas's verbose report: registers, spill stores/loads, static shared memory and stack
frame per kernel. ::

    python -m gpuconv.compile_check [--arch sm_80 sm_90] [files...]

prints one row per kernel and architecture and exits with status 1, naming ``file:line`` of each
error, when a source does not compile, and when a convolution kernel (``conv2d_*.cu``) spills
registers: those are the kernels held to FP32 peak, and a spill there is a performance bug.
Needs ``pip install 'gpuconv[nvrtc]'``.

``--sass`` adds, from the sm_90 machine code NVRTC produced (the cubin CuPy would load), a second
table per kernel: the hot loop's instruction count and FFMA/HMMA share, threads per block,
resident blocks per SM and what limits them (see :mod:`gpuconv.sass`). It needs nvdisasm
(``pip install 'gpuconv[sass]'``). NVRTC runs the same ptxas back end as ``nvcc -cubin``, and its
cubin is the one that runs, so the figures are those of the deployed code.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import sass
from .kernels import NVRTC_OPTIONS, compiler_source, display_name, kernel_dir

DEFAULT_ARCHS = ("sm_80", "sm_90")
SASS_ARCH = "sm_90"
# Kernels that must not spill: the implicit-GEMM convolutions.
SPILL_FREE_FILES = "conv2d_*.cu"


@dataclass(frozen=True)
class KernelUsage:
    """What ptxas reports for one kernel on one architecture."""

    name: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int  # static shared memory
    stack_frame_bytes: int


@dataclass
class CompileResult:
    """One source compiled for one architecture."""

    path: Path
    arch: str
    ok: bool
    errors: list[str] = field(default_factory=list)  # 'file:line: error: message'
    kernels: list[KernelUsage] = field(default_factory=list)
    log: str = ""
    cubin: bytes = b""  # the machine code, for check-kernels --sass
    ptx: str = ""


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise RuntimeError(f"the compile gate needs NVRTC: pip install 'gpuconv[nvrtc]' ({exc})") from None
    return nvrtc


_ARCH_RE = re.compile(r"sm_\d+a?")
_ENTRY_RE = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")
_ERROR_RE = re.compile(r"^(?P<file>.+?)\((?P<line>\d+)\): (?P<kind>(?:catastrophic )?error): (?P<text>.*)$", re.MULTILINE)


def parse_ptxas_log(log: str) -> list[KernelUsage]:
    """The per-kernel numbers of a ``-Xptxas=-v`` log, in the order ptxas reports them."""
    usages = []
    name = None
    frame = (0, 0, 0)
    for line in log.splitlines():
        if (match := _ENTRY_RE.search(line)) is not None:
            name, frame = match.group(1), (0, 0, 0)
        elif name and (match := _FRAME_RE.search(line)) is not None:
            frame = tuple(int(g) for g in match.groups())
        elif name and (match := _USED_RE.search(line)) is not None:
            registers, shared = int(match.group(1)), int(match.group(2) or 0)
            usages.append(KernelUsage(name, registers, frame[1], frame[2], shared, frame[0]))
            name = None
    return usages


def parse_errors(log: str) -> list[str]:
    """NVRTC's ``file(line): error: text`` lines as ``file:line: error: text``."""
    return [f"{m['file']}:{m['line']}: error: {m['text']}" for m in _ERROR_RE.finditer(log)]


def compile_source(path: Path, arch: str, options: tuple[str, ...] = NVRTC_OPTIONS) -> CompileResult:
    """Compile one file for one architecture (e.g. 'sm_80') with NVRTC."""
    nvrtc = _nvrtc()
    path = Path(path)
    name = display_name(path)
    source = compiler_source(path)
    status, program = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"nvrtcCreateProgram failed for {name}: {status}")
    try:
        flags = [*options, f"--gpu-architecture={arch}", "-Xptxas=-v"]
        (status,) = nvrtc.nvrtcCompileProgram(program, len(flags), [f.encode() for f in flags])
        _, size = nvrtc.nvrtcGetProgramLogSize(program)
        buffer = b" " * size
        nvrtc.nvrtcGetProgramLog(program, buffer)
        log = buffer.rstrip(b"\0 ").decode(errors="replace")
        ok = status == nvrtc.nvrtcResult.NVRTC_SUCCESS
        cubin, ptx = (_program_output(nvrtc, program, "CUBIN"), _program_output(nvrtc, program, "PTX").decode()) if ok else (b"", "")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    errors = [] if ok else parse_errors(log) or [f"{name}: error: NVRTC failed ({status.name})"]
    return CompileResult(path, arch, ok, errors, parse_ptxas_log(log) if ok else [], log, cubin, ptx.rstrip("\0"))


def _program_output(nvrtc, program, kind: str) -> bytes:
    """The compiled program's CUBIN or PTX (nvrtcGetCUBIN / nvrtcGetPTX)."""
    _, size = getattr(nvrtc, f"nvrtcGet{kind}Size")(program)
    buffer = b" " * size
    getattr(nvrtc, f"nvrtcGet{kind}")(program, buffer)
    return buffer


def default_paths() -> list[Path]:
    return sorted(kernel_dir().glob("*.cu"))


def check(paths=None, archs=DEFAULT_ARCHS) -> list[CompileResult]:
    """Compile every file in ``paths`` (default: all of ``kernels_cu/``) for every architecture."""
    paths = default_paths() if paths is None else [Path(p) for p in paths]
    for arch in archs:
        if not _ARCH_RE.fullmatch(arch):
            raise ValueError(f"arch must look like 'sm_80', got {arch!r}")
    return [compile_source(path, arch) for path in paths for arch in archs]


def format_table(results: list[CompileResult]) -> str:
    header = ("file", "kernel", "arch", "registers", "spill st/ld (B)", "smem (B)", "stack (B)")
    rows = [
        (display_name(r.path), k.name, r.arch, str(k.registers), f"{k.spill_stores}/{k.spill_loads}",
         str(k.shared_bytes), str(k.stack_frame_bytes))
        for r in results
        for k in r.kernels
    ]
    rows.sort(key=lambda row: row[:3])
    rows += [(display_name(r.path), "-", r.arch, "FAILED", "", "", "") for r in results if not r.ok]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


@dataclass(frozen=True)
class SassReport:
    """One kernel's machine code read statically (see :mod:`gpuconv.sass`)."""

    file: str
    usage: KernelUsage
    threads: int | None  # from __launch_bounds__; None when the kernel declares none
    blocks_per_sm: int | None
    limiter: str
    loop: sass.HotLoop | None


def sass_reports(results: list[CompileResult]) -> list[SassReport]:
    """A :class:`SassReport` for every kernel of the sm_90 results."""
    reports = []
    for result in results:
        if result.arch != SASS_ARCH or not result.ok:
            continue
        functions, labels = sass.disassemble(result.cubin)
        threads = sass.launch_threads(result.ptx)
        for usage in result.kernels:
            block = threads.get(usage.name)
            blocks, limiter = sass.resident_blocks(block, usage.registers, usage.shared_bytes) if block else (None, "")
            reports.append(SassReport(display_name(result.path), usage, block, blocks, limiter,
                                      sass.hot_loop(functions.get(usage.name, []), labels)))
    return sorted(reports, key=lambda r: (r.file, r.usage.name))


def format_sass_table(reports: list[SassReport]) -> str:
    header = ("file", "kernel", "registers", "spills (B)", "smem (B)", "threads", "blocks/SM", "loop instr", "FFMA/HMMA")
    rows = [header]
    for r in reports:
        u, loop = r.usage, r.loop
        rows.append((r.file, u.name, str(u.registers), str(u.spill_stores + u.spill_loads), str(u.shared_bytes),
                     str(r.threads or "-"), f"{r.blocks_per_sm} ({r.limiter})" if r.blocks_per_sm else "-",
                     str(loop.instructions) if loop else "-", f"{loop.math_share:.0%}" if loop and loop.math else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def spilling_conv_kernels(results: list[CompileResult]) -> list[str]:
    """'file kernel arch: N bytes' for each convolution kernel that spills registers."""
    return [f"{display_name(r.path)} {k.name} {r.arch}: {k.spill_stores} bytes spill stores, {k.spill_loads} loads"
            for r in results if r.path.match(SPILL_FREE_FILES) for k in r.kernels if k.spill_stores or k.spill_loads]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuconv.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="target architectures (default: %(default)s)")
    parser.add_argument("--sass", action="store_true",
                        help=f"also read the {SASS_ARCH} machine code: hot-loop FFMA share, blocks per SM (needs nvdisasm)")
    parser.add_argument("files", nargs="*", type=Path, help="kernel sources (default: every kernels_cu/*.cu)")
    args = parser.parse_args(argv)
    # `--arch sm_80 sm_90 a.cu` : argparse gives all three words to --arch; the files are the
    # words that do not name an architecture.
    archs = [a for a in args.arch if _ARCH_RE.fullmatch(a)]
    files = [Path(a) for a in args.arch if not _ARCH_RE.fullmatch(a)] + args.files
    if not archs:
        parser.error("--arch needs at least one architecture such as sm_80")
    if args.sass and SASS_ARCH not in archs:
        archs.append(SASS_ARCH)
    if args.sass:
        try:
            sass.find_nvdisasm()
        except sass.DisassemblerMissing as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    results = check(files or None, archs)
    print(format_table(results))
    if args.sass:
        print()
        print(format_sass_table(sass_reports(results)))
    failures = [error for r in results for error in r.errors]
    failures += [f"error: {spill} (convolution kernels must not spill)" for spill in spilling_conv_kernels(results)]
    for error in dict.fromkeys(failures):  # once per error, not once per architecture
        print(error, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

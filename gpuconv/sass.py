"""A static reading of a kernel's sm_90 machine code (SASS): the hot loop's instruction mix and
how many blocks of the kernel an SM holds at once.

On Hopper every issued instruction that is not an FFMA takes an FFMA's issue slot, so the share
of FFMA (or HMMA) among the instructions of the innermost K loop bounds a GEMM kernel's fraction
of FP32 peak before any memory effect. The loop is found by its backward branch: among the
backward branches of a function whose span holds no other backward branch (innermost loops), the
one with the most multiply-adds; every instruction between its target and the branch counts as
issued once per trip (predicated-off ones take their slot too).

Resident blocks per SM come from ptxas's registers and static shared memory and the block size
the kernel declares with ``__launch_bounds__`` (read from the PTX ``.maxntid``), against the
limits of :data:`SM90`, as the CUDA occupancy calculator does them. A kernel without launch
bounds, or one that also takes dynamic shared memory, is reported at what its source declares.

The disassembler is ``nvdisasm``, found on PATH, in the CUDA toolkit or in the
``nvidia-cuda-nvdisasm`` wheel (``pip install 'gpuconv[sass]'``).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Multiply-add mnemonics whose share of the hot loop is the figure of merit.
MATH_OPCODES = frozenset({"FFMA", "HMMA", "HGMMA"})


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of one architecture, as the occupancy calculator uses them."""

    registers: int
    register_unit: int  # registers are allocated per warp in units of this many
    shared_bytes: int
    shared_reserved_per_block: int  # the runtime's own shared memory per resident block
    shared_unit: int
    threads: int
    blocks: int


# Hopper (sm_90): 64K registers, 228 KiB shared memory (1 KiB of it reserved per block),
# 2048 threads and 32 blocks per SM.
SM90 = SmLimits(registers=65536, register_unit=256, shared_bytes=228 * 1024, shared_reserved_per_block=1024,
                shared_unit=128, threads=2048, blocks=32)

WARP = 32


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # the mnemonic without predicate or modifiers: 'FFMA', 'LDS', 'BRA'
    text: str
    target: str | None  # the label a branch jumps to


@dataclass(frozen=True)
class HotLoop:
    start: int  # address of the first instruction (the backward branch's target)
    end: int  # address of the backward branch
    instructions: int
    math: int  # FFMA / HMMA among them
    opcodes: dict  # mnemonic -> count, for the report

    @property
    def math_share(self) -> float:
        return self.math / self.instructions


class DisassemblerMissing(RuntimeError):
    """nvdisasm is not installed."""


def find_nvdisasm() -> str:
    """The path of nvdisasm, or :class:`DisassemblerMissing` saying how to install it."""
    try:
        from cuda.pathfinder import find_nvidia_binary_utility  # wheels, CUDA_HOME, PATH
    except ImportError:  # cuda-bindings (which brings it) is not installed: PATH only
        found = shutil.which("nvdisasm")
    else:
        found = find_nvidia_binary_utility("nvdisasm")
    if not found:
        raise DisassemblerMissing(
            "check-kernels --sass needs nvdisasm (CUDA toolkit, or pip install 'gpuconv[sass]' for the "
            "nvidia-cuda-nvdisasm wheel)"
        )
    return found


_SECTION_RE = re.compile(r"^\s*\.section\s+(\S+?),")
_LABEL_RE = re.compile(r"^(\.L\w+):")
_INSTRUCTION_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET_RE = re.compile(r"`\((\.L\w+)\)")
_PREDICATE_RE = re.compile(r"^@!?U?P\w+\s+")


def parse_disassembly(text: str) -> dict[str, list[Instruction]]:
    """``{function: instructions}`` from ``nvdisasm -c`` output; labels resolve to addresses."""
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        if (match := _SECTION_RE.match(line)) is not None:
            section = match.group(1)
            current = functions.setdefault(section[6:], []) if section.startswith(".text.") else None
            continue
        if current is None:
            continue
        if (match := _INSTRUCTION_RE.match(line)) is not None:
            body = _PREDICATE_RE.sub("", match.group(2))
            target = _TARGET_RE.search(body)
            current.append(Instruction(int(match.group(1), 16), body.split()[0].split(".")[0], body,
                                       target.group(1) if target else None))
    return functions


def _label_addresses(text: str) -> dict[str, int]:
    """Each ``.L_x_N`` label's address: that of the instruction after it."""
    labels, pending = {}, []
    for line in text.splitlines():
        if (match := _LABEL_RE.match(line)) is not None:
            pending.append(match.group(1))
        elif (match := _INSTRUCTION_RE.match(line)) is not None:
            for label in pending:
                labels[label] = int(match.group(1), 16)
            pending = []
    return labels


def hot_loop(instructions: list[Instruction], labels: dict[str, int]) -> HotLoop | None:
    """The innermost loop with the most multiply-adds (ties: the longest), or None without loops."""
    loops = [(labels[i.target], i.address) for i in instructions
             if i.opcode == "BRA" and i.target in labels and labels[i.target] < i.address]
    innermost = [(s, e) for s, e in loops if not any((s, e) != (s2, e2) and s <= s2 and e2 <= e for s2, e2 in loops)]
    best = None
    for start, end in innermost:
        body = [i for i in instructions if start <= i.address <= end and i.opcode != "NOP"]
        opcodes: dict[str, int] = {}
        for i in body:
            opcodes[i.opcode] = opcodes.get(i.opcode, 0) + 1
        loop = HotLoop(start, end, len(body), sum(opcodes.get(op, 0) for op in MATH_OPCODES),
                       dict(sorted(opcodes.items(), key=lambda kv: -kv[1])))
        if best is None or (loop.math, loop.instructions) > (best.math, best.instructions):
            best = loop
    return best


def disassemble(cubin: bytes) -> tuple[dict[str, list[Instruction]], dict[str, int]]:
    """Disassemble a cubin with nvdisasm: per-function instructions and label addresses."""
    nvdisasm = find_nvdisasm()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        run = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvdisasm failed ({run.returncode}): {run.stderr.strip()}")
    return parse_disassembly(run.stdout), _label_addresses(run.stdout)


_MAXNTID_RE = re.compile(r"\.entry\s+(\w+)\s*\([^)]*\)\s*((?:\.\w+[^{]*?)*)\{", re.S)


def launch_threads(ptx: str) -> dict[str, int]:
    """Threads per block each kernel declares through ``__launch_bounds__`` (PTX ``.maxntid``)."""
    threads = {}
    for match in _MAXNTID_RE.finditer(ptx):
        maxntid = re.search(r"\.maxntid\s+(\d+)\s*,\s*(\d+)\s*,\s*(\d+)", match.group(2))
        if maxntid:
            x, y, z = (int(v) for v in maxntid.groups())
            threads[match.group(1)] = x * y * z
    return threads


def resident_blocks(threads: int, registers: int, shared_bytes: int, limits: SmLimits = SM90) -> tuple[int, str]:
    """(blocks of this kernel one SM holds at once, the resource that limits it)."""
    warps = -(-threads // WARP)
    per_warp = -(-registers * WARP // limits.register_unit) * limits.register_unit
    shared = -(-shared_bytes // limits.shared_unit) * limits.shared_unit + limits.shared_reserved_per_block
    bounds = {
        "registers": (limits.registers // per_warp) // warps if per_warp else limits.blocks,
        "shared": limits.shared_bytes // shared,
        "threads": limits.threads // (warps * WARP),
        "blocks": limits.blocks,
    }
    limiter = min(bounds, key=bounds.get)
    return bounds[limiter], limiter

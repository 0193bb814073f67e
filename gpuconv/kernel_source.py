"""Kernel sources: where they live, the text every compiler gets, and their signatures.

Shared by :mod:`gpuconv.kernels` (launching on 'cuda' and 'emu'), :mod:`gpuconv.emu` (the
emulated device) and :mod:`gpuconv.compile_check` (the NVRTC gate); it imports none of them.
"""
from __future__ import annotations

import functools

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_C_TYPES = {
    "float": np.float32,
    "double": np.float64,
    "int": np.int32,
    "unsigned int": np.uint32,
    "unsigned": np.uint32,
    "long long": np.int64,
    "long long int": np.int64,
    "unsigned long long": np.uint64,
    "unsigned long long int": np.uint64,
    "char": np.int8,
    "signed char": np.int8,
    "unsigned char": np.uint8,
    "bool": np.bool_,
}


class KernelArgumentError(TypeError):
    """An argument does not match the kernel's parameter type."""


def kernel_dir() -> Path:
    """``kernels_cu/``: package data in an installed wheel, the repository's folder in a checkout."""
    packaged = Path(__file__).with_name("kernels_cu")
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "kernels_cu"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"kernels_cu/ not found beside the package ({packaged}) or in the checkout ({checkout})")


def kernel_path(topic: str) -> Path:
    path = kernel_dir() / f"{topic}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source {path.name} in {path.parent}")
    return path


def kernel_topics() -> list[str]:
    """Every kernel source file's topic, sorted."""
    return sorted(p.stem for p in kernel_dir().glob("*.cu"))


@dataclass(frozen=True)
class Param:
    """One kernel parameter as written in the source."""

    ctype: str  # base C type, e.g. 'float', 'long long'
    name: str
    pointer: bool

    @functools.cached_property  # asked for every argument of every launch
    def dtype(self) -> np.dtype:
        return np.dtype(_C_TYPES[self.ctype])


_DEFINE_RE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)[ \t]+([^\n]*)$", re.M)
_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s+)?void\s+'
    r"(?:__launch_bounds__\s*\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)",
    re.S,
)
_QUALIFIERS = {"const", "__restrict__", "__restrict", "volatile"}


def _parse_param(text: str, kernel: str) -> Param:
    pointer = "*" in text
    words = [w for w in re.split(r"[\s*]+", text.strip()) if w and w not in _QUALIFIERS]
    if len(words) < 2:
        raise KernelArgumentError(f"kernel {kernel}: cannot parse parameter {text.strip()!r}")
    ctype, name = " ".join(words[:-1]), words[-1]
    if ctype not in _C_TYPES:
        raise KernelArgumentError(f"kernel {kernel}: parameter {name} has unsupported type {ctype!r}")
    return Param(ctype, name, pointer)


def parse_signatures(source: str) -> dict[str, tuple[Param, ...]]:
    """``{kernel name: parameters}`` for every ``extern "C" __global__`` kernel in ``source``."""
    source = re.sub(r"//[^\n]*|/\*.*?\*/", " ", source, flags=re.S).replace("\\\n", " ")
    # A parameter may be an object-like macro of the file standing for several (the tiles of one
    # kernel family share their list that way): it is read as its text, as the compilers read it.
    macros = {m.group(1): m.group(2).strip() for m in _DEFINE_RE.finditer(source)}

    def expand(params: str, seen: frozenset = frozenset()) -> list[str]:
        parts = []
        for part in params.split(","):
            part = part.strip()
            if part in macros and part not in seen:
                parts += expand(macros[part], seen | {part})
            elif part:
                parts.append(part)
        return parts

    signatures = {}
    for match in _KERNEL_RE.finditer(source):
        name, params = match.group(1), match.group(2).strip()
        parts = expand(params) if params != "void" else []
        signatures[name] = tuple(_parse_param(p, name) for p in parts)
    return signatures


def dim3(value, what: str, error: type[Exception] = ValueError) -> tuple[int, int, int]:
    """A grid or block given as an int or 1 to 3 ints, as the (x, y, z) triple; ``error`` otherwise."""
    dims = (value,) if np.isscalar(value) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise error(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)


def display_name(path: Path) -> str:
    """``kernels_cu/foo.cu``: the name compiler messages use, the same on every machine."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def compiler_source(path: str | os.PathLike) -> str:
    """The text every compiler gets for a kernel file: NVRTC on 'cuda', g++ on 'emu', the gate.

    ``#include "x.cuh"`` of the kernels' own headers is expanded here, once per header, rather
    than left to each compiler's include path: the three compilers then see the same text, and
    a cache keyed on that text (the emulator's) notices a changed header. ``#line`` directives
    keep every message pointing at the real file and line.
    """
    path = Path(path)
    included: set[Path] = set()

    def expand(file: Path) -> str:
        name = display_name(file)
        lines = [f'#line 1 "{name}"']
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            match = _INCLUDE_RE.match(line)
            if not match:
                lines.append(line)
                continue
            header = (file.parent / match.group(1)).resolve()
            if not header.is_file():
                raise FileNotFoundError(f"{name}:{number}: included file {match.group(1)!r} not found beside it")
            if header not in included:
                included.add(header)
                lines.append(expand(header))
            lines.append(f'#line {number + 1} "{name}"')
        return "\n".join(lines)

    return expand(path) + "\n"

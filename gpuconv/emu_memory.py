"""Host memory for the emulated device's array arguments: each array copied next to guard
pages, so that an out-of-bounds access faults, and arrays that overlap grouped into one buffer."""
from __future__ import annotations

import ctypes
import mmap
import sys
from dataclasses import dataclass

import numpy as np

# Room kept inaccessible on each side of an array argument: an index that runs up to 1 MiB past
# either end faults instead of touching another allocation.
_GUARD_BYTES = 1 << 20
_ALIGN = 16
_POISON = 0xFF

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_PAGE = mmap.PAGESIZE
_PROT_NONE, _PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
# Guard regions are never touched, so they need no swap reservation (MAP_NORESERVE, Linux's value).
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (0x4000 if sys.platform.startswith("linux") else 0)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bytes_at(address: int, nbytes: int) -> np.ndarray:
    if not nbytes:
        return np.empty(0, np.uint8)
    return np.frombuffer((ctypes.c_ubyte * nbytes).from_address(address), dtype=np.uint8)


@dataclass
class Region:
    """A span of host memory covered by one or more array arguments (several when they alias)."""

    start: int
    nbytes: int
    args: list  # (parameter index, array)


class GuardedBuffer:
    """``nbytes`` of memory whose end touches a PROT_NONE guard region, with another before it.

    The start is 16-byte aligned, so the last ``round_up(nbytes, 16) - nbytes`` bytes before the
    guard, and the head of the first page, are slack: filled with 0xFF and checked afterwards.
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.body = _round_up(_round_up(nbytes, _ALIGN), _PAGE)
        self.total = 2 * _GUARD_BYTES + self.body
        base = _libc.mmap(None, self.total, _PROT_NONE, _MAP_FLAGS, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise MemoryError(f"cannot map {self.total} bytes for a kernel argument of {nbytes} bytes")
        self.base = base
        self.body_start = base + _GUARD_BYTES
        if self.body and _libc.mprotect(self.body_start, self.body, _PROT_RW) != 0:
            self.free()
            raise MemoryError(f"mprotect failed with errno {ctypes.get_errno()}")
        self.data = self.body_start + self.body - _round_up(nbytes, _ALIGN)
        self.memory = bytes_at(self.body_start, self.body)
        self.memory[:] = _POISON

    @property
    def offset(self) -> int:
        return self.data - self.body_start

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """The ``nbytes`` bytes at ``offset`` from the start of the data."""
        return self.memory[self.offset + offset : self.offset + offset + nbytes]

    def guard_side(self, address: int) -> str | None:
        """'before' or 'after' when ``address`` is in a guard region of this buffer."""
        if self.base <= address < self.body_start:
            return "before"
        if self.body_start + self.body <= address < self.base + self.total:
            return "after"
        return None

    def slack_written(self) -> tuple[int, int] | None:
        """(first, last) byte offsets relative to the data of slack bytes a kernel overwrote."""
        head = np.flatnonzero(self.memory[: self.offset] != _POISON)
        tail = np.flatnonzero(self.memory[self.offset + self.nbytes :] != _POISON)
        if not head.size and not tail.size:
            return None
        offsets = np.concatenate([head - self.offset, tail + self.nbytes])
        return int(offsets.min()), int(offsets.max())

    def free(self) -> None:
        self.memory = None
        _libc.munmap(self.base, self.total)


def regions_of(arrays: list[tuple[int, np.ndarray]]) -> list[Region]:
    """Group array arguments whose memory overlaps, so an in-place kernel sees one buffer."""
    spans = sorted(((a.ctypes.data, a.nbytes, i, a) for i, a in arrays), key=lambda s: (s[0], s[1]))
    regions: list[Region] = []
    for start, nbytes, index, array in spans:
        last = regions[-1] if regions else None
        if last is not None and nbytes and last.nbytes and start < last.start + last.nbytes:
            last.nbytes = max(last.nbytes, start + nbytes - last.start)
            last.args.append((index, array))
        else:
            regions.append(Region(start, nbytes, [(index, array)]))
    return regions

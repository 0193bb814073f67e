"""Devices and data movement.

Three devices share one API:

* ``cpu``  -- plain NumPy arrays; ops run as vectorised NumPy (the reference path).
* ``cuda`` -- CuPy arrays; ops run the CUDA kernels of ``kernels_cu/`` through ``cupy.RawModule``.
* ``emu``  -- :class:`EmuArray`, NumPy arrays marked as living on the emulated CUDA device; ops run
  the *same* CUDA kernels, compiled by the host C++ compiler (see :mod:`gpuconv.emu`).

The device of an op is the device of its array arguments, as in PyTorch and CuPy.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from . import dispatch

DEVICES = ("cpu", "cuda", "emu")
DEVICE_ENV = "GPUCONV_DEVICE"


# The graph being captured (gpuconv.graphs), which serves allocations and refuses host round
# trips; None outside a capture.
capture = None


class EmuArray(np.ndarray):
    """A NumPy array that lives on the emulated CUDA device.

    It behaves as an ``ndarray`` in every respect (NumPy ufuncs and methods keep the subclass),
    so the glue that is common to ``cuda`` and ``emu`` can use ``array_module()`` for both; the
    marker only decides which launcher runs the kernels. Inside a graph capture, where an
    operation must be recorded to run on every replay, a NumPy operation on it, a copy of it, or
    a read of its value is refused (:mod:`gpuconv.graphs`).
    """

    def __array_finalize__(self, obj):
        if capture is not None and self.base is None:
            capture.refuse("a copy of an emu array")

    def __array_wrap__(self, array, context=None, *rest):
        # *rest: NumPy 2 passes return_scalar, NumPy 1 does not take it.
        if capture is not None:
            capture.refuse(f"NumPy's {context[0].__name__ if context else 'reduction'} on an emu array")
        return super().__array_wrap__(array, context, *rest)

    def _read(self, method: str, *args):
        if capture is not None:
            capture.refuse(f"reading an emu array's value ({method})")
        return getattr(super(), method)(*args)

    def __float__(self):
        return self._read("__float__")

    def __int__(self):
        return self._read("__int__")

    def __bool__(self):
        return self._read("__bool__")

    def item(self, *args):
        return self._read("item", *args)

    def tolist(self):
        return self._read("tolist")


@functools.lru_cache(maxsize=1)
def _import_cupy():
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install raising at import time
        return None
    return cupy


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether CuPy imports and sees at least one CUDA device, and why not."""
    cupy = _import_cupy()
    if cupy is None:
        return False, "CuPy is not installed (pip install 'gpuconv[cuda13]' or 'gpuconv[cuda12]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return False, f"CuPy is installed but no CUDA device is usable ({exc})"
    if count == 0:
        return False, "CuPy is installed but no CUDA device was found"
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return True, f"CuPy {cupy.__version__} sees {count} CUDA device(s); using device 0: {name}"


def resolve_device(device: str | None = None) -> tuple[str, str]:
    """Turn a user's device choice into ``('cpu'|'cuda'|'emu', reason)``.

    ``None`` reads ``GPUCONV_DEVICE`` (default ``'auto'``). ``'auto'`` picks CUDA only when CuPy and a
    GPU are both present. An explicit ``'cuda'`` without them is an error, never a silent fallback.
    """
    source = "argument"
    if device is None:
        device, source = os.environ.get(DEVICE_ENV, "auto"), f"${DEVICE_ENV}"
    device = str(device).lower()
    if device == "gpu":
        device = "cuda"
    if device not in DEVICES + ("auto",):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', 'emu'; got {device!r} (from {source})")
    usable, why = cuda_status()
    if device == "auto":
        return ("cuda", f"auto: {why}") if usable else ("cpu", f"auto: no GPU, so the NumPy CPU path ({why})")
    if device == "cuda" and not usable:
        raise RuntimeError(f"device 'cuda' was requested ({source}) but is not available: {why}")
    reasons = {"cpu": "NumPy CPU path", "cuda": why, "emu": "CUDA kernels on the emulated device (host CPU)"}
    return device, f"{device} requested ({source}): {reasons[device]}"


def device_of(x) -> str:
    """The device an array lives on: 'emu' for EmuArray, 'cuda' for CuPy arrays, else 'cpu'."""
    if isinstance(x, EmuArray):
        return "emu"
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return "cpu"
    cupy = _import_cupy()
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cuda"
    raise TypeError(f"expected a NumPy or CuPy array, got {type(x).__name__}")


def array_module(device_or_array):
    """``numpy`` for 'cpu' and 'emu', ``cupy`` for 'cuda' (a device name or an array)."""
    device = device_or_array if isinstance(device_or_array, str) else device_of(device_or_array)
    if device == "cuda":
        cupy = _import_cupy()
        if cupy is None:
            raise RuntimeError(cuda_status()[1])
        return cupy
    return np


def to_device(x, device: str):
    """``x`` on ``device``: a NumPy array for 'cpu', CuPy for 'cuda', EmuArray for 'emu'.

    As ``torch.Tensor.to``: ``x`` itself when it is already there, otherwise a copy, so kernels
    writing in place on the emulated device (optimizer updates) never touch the caller's array.
    """
    device = resolve_device(device)[0]
    if capture is not None and not (device == device_of(x) != "cpu"):
        capture.refuse(f"a copy to {device!r} (to_device)")
    if device == "cuda":
        return array_module("cuda").asarray(x)
    if device == "emu":
        return x if isinstance(x, EmuArray) else np.array(to_numpy(x), order="C", copy=True).view(EmuArray)
    return to_numpy(x)


def to_numpy(x) -> np.ndarray:
    """A plain NumPy array with the contents of ``x``: ``x`` itself on 'cpu', a copy from a device."""
    device = device_of(x)
    if capture is not None and device != "cpu":
        capture.refuse("a copy to the host (to_numpy)")
    if device == "cuda":
        return x.get()
    return np.array(x, copy=True) if device == "emu" else np.asarray(x)


# False only under gpuconv.emu.dry_run(), where no kernel writes anything and the fill would be
# the only memory traffic left in a step timed for its host work.
poison_fresh_arrays = True


def empty(shape, dtype, device: str):
    """An uninitialised C-contiguous array on ``device``.

    On 'emu' it is filled with 0xFF bytes (NaN as floats): NumPy's fresh memory is often zeros,
    which would let a kernel that forgets to write part of its output pass. Inside a graph
    capture it is the calling layer's static buffer (see :mod:`gpuconv.graphs`).
    """
    if capture is not None and device != "cpu":
        return capture.allocate(shape, dtype, device, _fresh)
    return _fresh(shape, dtype, device)


def _fresh(shape, dtype, device: str):
    out = array_module(device).empty(shape, dtype=dtype)
    if device != "emu":
        return out
    if poison_fresh_arrays:
        out.view(np.uint8).fill(0xFF)
    return out.view(EmuArray)


def zeros(shape, dtype, device: str):
    """A zero-filled C-contiguous array on ``device`` (a memset on a device: a profiled operation)."""
    if device == "cpu":
        return np.zeros(shape, dtype=dtype)
    return zero_(empty(shape, dtype, device))


def copy_to_device(out, values: np.ndarray) -> None:
    """Copy the host array ``values`` into the device array ``out`` of its shape, in place."""
    device = device_of(out)
    copy = out.set if device == "cuda" else (lambda v: out.__setitem__(Ellipsis, v))
    dispatch.device_call("copy_to_device", device, lambda: copy(values))


def zero_(out):
    """``out`` filled with zeros, in place (a memset on a device: a profiled operation); returns it."""
    dispatch.device_call("memset", device_of(out), lambda: out.fill(0))
    return out


def contiguous(x):
    """``x`` if C-contiguous, else a C-contiguous copy on the same device.

    ``numpy.ascontiguousarray`` would drop the :class:`EmuArray` subclass (and with it the
    device), while ``.copy()`` keeps it on every device.
    """
    return x if x.flags.c_contiguous else x.copy()


def common_device(**arrays) -> str:
    """The one device all named arrays (None skipped) live on; a ValueError naming them otherwise."""
    devices = {name: device_of(a) for name, a in arrays.items() if a is not None}
    found = set(devices.values())
    if len(found) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"arrays must be on one device, got {listing}")
    return found.pop() if found else "cpu"

"""gpuconv: hand-written CUDA kernels for training CNNs, with an exact NumPy path and an emulated
CUDA device that runs the same kernel source on the CPU."""
from __future__ import annotations

import importlib

from .device import EmuArray, array_module, cuda_status, device_of, resolve_device, to_device, to_numpy

__version__ = "0.1.0"
__all__ = [
    "EmuArray", "array_module", "cuda_status", "device_of", "resolve_device", "to_device", "to_numpy",
    "functional", "nn", "models", "optim", "data", "summary", "manual_seed",
]

_SUBMODULES = {"functional", "nn", "models", "optim", "data", "train", "bench", "emu", "kernels"}


def __getattr__(name):
    # Submodules load on first use so that `import gpuconv` stays light and never needs CuPy.
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "summary":
        return importlib.import_module(".summary", __name__).summary
    if name == "manual_seed":
        return importlib.import_module(".random", __name__).manual_seed
    raise AttributeError(f"module 'gpuconv' has no attribute {name!r}")

"""gpuconv: hand-written CUDA kernels for training CNNs, with an exact NumPy path and an emulated
CUDA device that runs the same kernel source on the CPU."""
from __future__ import annotations

import importlib

from .device import EmuArray, array_module, cuda_status, device_of, resolve_device, to_device, to_numpy
from .graphs import CUDAGraph, graph
from .precision import get_float32_matmul_precision, set_float32_matmul_precision
from .profiler import profile
from .random import manual_seed
# Bound eagerly: a lazily imported submodule named `summary` would replace the function with
# the module on the package the first time it loads.
from .summary import summary

__version__ = "0.1.0"
__all__ = [
    "EmuArray", "array_module", "cuda_status", "device_of", "resolve_device", "to_device", "to_numpy",
    "functional", "nn", "models", "optim", "data", "summary", "manual_seed", "profile", "CUDAGraph", "graph",
    "set_float32_matmul_precision", "get_float32_matmul_precision",
]

_SUBMODULES = {"functional", "nn", "models", "optim", "data", "train", "bench", "emu", "kernels", "compile_check"}


def __getattr__(name):
    # The heavier submodules load on first use; `import gpuconv` never needs CuPy.
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gpuconv' has no attribute {name!r}")

"""The machine a run is on: CPU and GPU description, versions, free memory, and the peaks every
row is put against (FP32 FLOP/s and copy bandwidth, measured in the same run). Nothing here may
end a run: a GPU that cannot be described or measured is reported as such."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
from pathlib import Path

import numpy as np

from ..device import cuda_status  # looked up here at call time, so tests can stand in a machine
from .timing import CpuTimer, cupy_sync, cupy_timer, summarize, time_calls


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_cache_bytes() -> int:
    """The last-level cache size (Linux sysfs), 32 MiB where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 << 20)


def _gpu_info() -> dict:
    """The GPU's description from its properties alone: no CUDA context is made, so the process
    that plans a run takes no GPU memory from the workers that measure it."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    driver = cupy.cuda.runtime.driverGetVersion()
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    return {"name": name, "driver": f"{driver // 1000}.{driver % 1000 // 10}",
            "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}", "cupy": cupy.__version__,
            "l2_bytes": int(props.get("l2CacheSize", 50 << 20)), "memory_bytes": int(props.get("totalGlobalMem", 0)),
            "sm_count": int(props.get("multiProcessorCount", 0)),
            "compute_capability": f"{props.get('major', '?')}.{props.get('minor', '?')}"}


# Where the GPU could not be described, rows size their buffer sets for an H100's L2.
UNKNOWN_L2_BYTES = 50 << 20


def machine_info(use_gpu: bool) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "cpu_cache_bytes": _cpu_cache_bytes(),
            "python": platform.python_version(), "numpy": np.__version__}
    from .. import __version__

    info["gpuconv"] = __version__
    try:
        import torch

        info["torch"] = torch.__version__
        info["cudnn"] = str(torch.backends.cudnn.version()) if torch.cuda.is_available() else "n/a"
    except ImportError:
        info["torch"], info["cudnn"] = "not installed", "n/a"
    except Exception as exc:  # a broken install: its rows say so, the run goes on
        info["torch"], info["cudnn"] = f"does not import ({type(exc).__name__})", "n/a"
    usable, why = cuda_status()
    if not (use_gpu and usable):
        info["gpu"] = {"name": "no device", "reason": why if not usable else "not measured (--device cpu)"}
        return info
    try:
        info["gpu"] = _gpu_info()
    except Exception as exc:  # noqa: BLE001 - a GPU that cannot be described is still measured
        info["gpu"] = {"name": "GPU (not described)", "reason": f"GPU info failed: {type(exc).__name__}: {exc}",
                       "l2_bytes": UNKNOWN_L2_BYTES}
    return info


def has_gpu_info(info: dict) -> bool:
    return "driver" in info["gpu"]


def device_slug(info: dict) -> str:
    """A file-name-safe name of the device the run is about (the GPU's, else the CPU's)."""
    name = info["gpu"]["name"] if has_gpu_info(info) else f"cpu {info['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def cache_bytes(info: dict, device: str) -> int:
    """The cache a row's input sets must exceed: the GPU's L2 on 'cuda', the CPU's last level else."""
    if device == "cuda":
        return int(info["gpu"].get("l2_bytes", UNKNOWN_L2_BYTES))
    return int(info["cpu_cache_bytes"])


def measure_peaks(device: str, quick: bool, repeats: int = 5) -> dict:
    """Peak FP32 FLOP/s (a large matmul: on the GPU CuPy's cuBLAS SGEMM, which uses no TF32 unless
    CUPY_TF32 is set) and bandwidth (a large copy: bytes read plus bytes written) of ``device``,
    each the median of ``repeats`` calls."""
    if device == "cuda":
        import cupy as xp

        timer, sync = cupy_timer, cupy_sync
        n, copy_bytes = (4096, 256 << 20) if quick else (8192, 1 << 30)
    else:
        xp, timer, sync = np, CpuTimer, lambda: None
        n, copy_bytes = (1024, 64 << 20) if quick else (2048, 256 << 20)
    rng = xp.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = xp.empty((n, n), dtype=np.float32)
    matmul = summarize(time_calls(lambda: xp.matmul(a, b, out=c), [()], timer(), sync, 2, repeats, 30.0))
    src = xp.ones(copy_bytes // 4, dtype=np.float32)
    dst = xp.empty_like(src)
    copy = summarize(time_calls(lambda: xp.copyto(dst, src), [()], timer(), sync, 2, repeats, 30.0))
    return {"flops": 2 * n**3 / matmul.median, "bytes_per_s": 2 * copy_bytes / copy.median,
            "how": f"FP32 matmul {n}x{n}x{n}; copy of {copy_bytes >> 20} MiB, read + written"}


def available_memory(device: str) -> int:
    if device == "cuda":
        import cupy

        return cupy.cuda.runtime.memGetInfo()[0]
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 4 << 30


def free_device_memory(device: str) -> None:
    """Give cached blocks back between rows, so one contender's pool does not starve the next."""
    if device != "cuda":
        return
    with contextlib.suppress(ImportError):
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    with contextlib.suppress(Exception):  # best effort: PyTorch may be missing or broken
        import torch

        torch.cuda.empty_cache()


def device_error(device: str) -> str:
    """Why ``device`` can no longer run anything ('' while it can): after an illegal address or a
    launch failure every later CUDA call in this process fails the same way (a sticky error)."""
    if device != "cuda":
        return ""
    try:
        import cupy

        cupy.cuda.runtime.deviceSynchronize()
        (cupy.arange(4, dtype=cupy.float32) + 1).sum().get()
    except Exception as exc:  # noqa: BLE001 - any failure here means the context is unusable
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return ""

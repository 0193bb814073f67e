"""The contenders: one implementation on one device each -- the NumPy CPU path, every registered
version of our CUDA kernels (version 0 of convolution is the CuPy im2col + cuBLAS baseline), and
PyTorch on the same device (oneDNN on the CPU; cuDNN in strict FP32 and in TF32 on the GPU).

A contender says whether it can run here (``available``), which cases it applies to, the context
its choices are in force in (kernel version, TF32), how it times and synchronises its device,
and builds a :class:`~gpuconv.bench.workloads.Workload` for a case. A new contender is a
subclass and one line in :func:`contenders_for`.
"""
from __future__ import annotations

import contextlib
import os
import re

from . import machine
from .cases import LRN, Case, Conv, Relu, TrainStep
from .timing import CpuTimer, EventTimer, cupy_sync, cupy_timer
from .training import gpuconv_train, torch_train
from .workloads import Workload, gpuconv_op, torch_op

BENCHMARKED_OPS = (*Conv.ops, "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
                   "avg_pool2d_backward", *Relu.ops, *LRN.ops)
BASELINE_VERSION_OPS = Conv.ops  # version 0: im2col + matmul (CuPy + cuBLAS on 'cuda')
HOST_OP = "host_step"  # the host-path case (host.py), which only its own contenders run
HOST_REFERENCE = "torch cpu batch 1"  # its PyTorch reference

NUMPY = "numpy"
TORCH_REFERENCE = {"cpu": "torch cpu (oneDNN)", "cuda": "torch cuda fp32 (cuDNN)"}


def kernel_versions() -> dict[str, list[int]]:
    """``{op: versions}`` from the kernel sources: version N exists where a ``kernels_cu`` file
    defines ``<op>_vN``; convolution also has version 0, the im2col + cuBLAS baseline. Selected at run
    time through ``GPUCONV_KERNEL_<OP>`` (:func:`gpuconv.kernels.select_version`)."""
    from .. import kernels

    found = {}
    with contextlib.suppress(FileNotFoundError):
        for topic in kernels.kernel_topics():
            for kernel in kernels.signatures(topic):
                match = re.fullmatch(r"(\w+)_v(\d+)", kernel)
                if match:
                    found.setdefault(match.group(1), set()).add(int(match.group(2)))
    return {op: sorted(found.get(op, set()) | ({0} if op in BASELINE_VERSION_OPS else set()))
            for op in BENCHMARKED_OPS}


@contextlib.contextmanager
def environ(name: str, value):
    """Set (or, for None, leave alone) one environment variable for the duration."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = str(value)
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


class Contender:
    """One implementation on one device. ``workload(case, rng)`` returns its :class:`Workload`
    for a case; ``family`` pairs a GPU row with its CPU row for the speedup column."""

    name = ""
    device = "cpu"  # 'cpu' or 'cuda' (rows on 'cuda' run in a process per case group)
    family = "gpuconv"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def applies(self, case: Case) -> bool:
        return True

    def selected_for(self, case: Case):
        """A context in which this contender's choices (kernel version, TF32) are in force."""
        return contextlib.nullcontext()

    def sync(self):
        pass

    def timer(self):
        return CpuTimer()

    def device_error(self) -> str:
        """After a row failed: why this process can no longer use the device ('' if it can)."""
        return machine.device_error(self.device)

    def workload(self, case: Case, rng) -> Workload:
        raise NotImplementedError


class Gpuconv(Contender):
    """gpuconv's functional API: the NumPy path on 'cpu', our kernels on 'cuda'. ``versions``
    forces a kernel version per op (only those ops run); ``exclude`` leaves ops out;
    ``precision`` (a ``set_float32_matmul_precision`` name) runs the convolutions alone at it."""

    def __init__(self, device: str, label: str = NUMPY, versions=None, exclude=(), precision=None):
        self.device, self.name = device, label
        self.versions, self.exclude = dict(versions or {}), frozenset(exclude)
        self.precision = precision

    def available(self):
        return (True, "") if self.device == "cpu" else machine.cuda_status()

    def applies(self, case):
        if self.precision:
            return case.op in Conv.ops
        if self.versions:
            return case.op in self.versions
        return case.op not in self.exclude and case.op != HOST_OP

    @contextlib.contextmanager
    def selected_for(self, case):
        with environ(f"GPUCONV_KERNEL_{case.op.upper()}", self.versions.get(case.op)), \
                environ("GPUCONV_FLOAT32_MATMUL_PRECISION", self.precision):
            yield

    def sync(self):
        if self.device == "cuda":
            cupy_sync()

    def timer(self):
        return cupy_timer() if self.device == "cuda" else CpuTimer()

    def workload(self, case, rng):
        if isinstance(case.spec, TrainStep):
            return gpuconv_train(case, self.device, rng)
        return Workload(*gpuconv_op(case, self.device, rng), extra=self._plan(case))

    def _plan(self, case):
        """For a conv row on 'cuda': the kernel the shape runs and its useful share of multiply-adds."""
        if self.device != "cuda" or not isinstance(case.spec, Conv):
            return None
        from ..functional import conv2d_plan

        s = case.spec
        plan = conv2d_plan(case.op, (s.batch, *s.in_chw), s.weight_shape, s.stride, s.padding, s.dilation)
        return {"kernel": plan.kernel_text, "useful_macs": round(plan.useful, 3)}


class Torch(Contender):
    family = "torch"

    def __init__(self, device: str, tf32: bool = False):
        self.device, self.tf32 = device, tf32
        self.name = TORCH_REFERENCE[device] if not tf32 else "torch cuda tf32 (cuDNN)"

    def applies(self, case):
        return case.op != HOST_OP  # the host-path case has its own PyTorch reference (host.py)

    def available(self):
        try:
            import torch
        except ImportError:
            return False, "PyTorch is not installed"
        except Exception as exc:  # a broken install (CUDA libraries missing) must not end the run
            return False, f"PyTorch does not import ({type(exc).__name__}: {exc})"
        if self.device == "cuda" and not torch.cuda.is_available():
            return False, "PyTorch sees no CUDA device"
        return True, ""

    @contextlib.contextmanager
    def selected_for(self, case):
        import torch

        backends = torch.backends
        saved = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark)
        # cudnn.benchmark: cuDNN tries its algorithms during warm-up and keeps the fastest, as in
        # every published cuDNN benchmark.
        backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = self.tf32
        backends.cudnn.benchmark = True
        try:
            yield
        finally:
            backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark = saved

    def sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def timer(self):
        if self.device != "cuda":
            return CpuTimer()
        import torch

        return EventTimer(lambda: torch.cuda.Event(enable_timing=True), lambda start, stop: start.elapsed_time(stop))

    def workload(self, case, rng):
        import torch

        torch.manual_seed(int(rng.integers(2**31)))
        if isinstance(case.spec, TrainStep):
            return torch_train(case, torch, self.device, rng)
        make, run = torch_op(case, torch, self.device)
        # Kernels alone: no autograd graph, except where the backward *is* autograd (LRN).
        if case.op == "lrn_backward":
            return Workload(make, run)
        return Workload(torch.no_grad()(make), torch.no_grad()(run))


def contenders_for(device_choice: str) -> list[Contender]:
    """The contenders of ``--device`` ('cpu', 'cuda' or 'all'), in the order their rows are shown;
    on 'cuda' one row per registered kernel version of every op that has more than one."""
    from .host import host_contenders  # host.py builds on this module

    chosen = []
    if device_choice in ("cpu", "all"):
        chosen += [Gpuconv("cpu"), Torch("cpu"), *host_contenders()]
    if device_choice in ("cuda", "all"):
        several = {op: v for op, v in kernel_versions().items() if len(v) > 1}
        chosen.append(Gpuconv("cuda", "gpuconv cuda", exclude=several))
        for n in sorted(set().union(*several.values())):
            label = "gpuconv cuda v0 (im2col+cuBLAS)" if n == 0 else f"gpuconv cuda v{n}"
            chosen.append(Gpuconv("cuda", label, versions={op: n for op, v in several.items() if n in v}))
        chosen += [Gpuconv("cuda", "gpuconv cuda tf32 (tensor cores)", precision="high"),
                   Gpuconv("cuda", "gpuconv cuda bf16 (tensor cores)", precision="medium")]
        chosen += [Torch("cuda", tf32=False), Torch("cuda", tf32=True)]
    return chosen

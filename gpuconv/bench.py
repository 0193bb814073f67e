"""Benchmarks: every kernel and a whole training step, on every contender, side by side.

``gpuconv bench`` (or ``python -m gpuconv.bench``) measures, in one run on one machine:

* kernels -- conv2d forward, backward-data (``conv2d_input``) and backward-filter
  (``conv2d_weight``), max/avg pooling forward and backward, ReLU and LRN forward and backward --
  on the layer shapes of ``models.lenet5`` (batch 256) and ``models.alexnet`` (batch 128), read off
  the models themselves, and on the five convolutions of the classic convnet-benchmarks AlexNet
  table (batch 128);
* a training step (forward, backward, SGD update) of LeNet-5 and AlexNet, and one LeNet-5 epoch
  over Fashion-MNIST (60,000 images; on the CPU timed on ``--cpu-epoch-limit`` images and
  extrapolated, which the row says);

for each contender: the NumPy CPU path, every registered version of our CUDA kernels (version 0
of convolution is the CuPy im2col + cuBLAS baseline), and PyTorch on the same device (oneDNN on
the CPU; cuDNN in strict FP32 and in TF32 on the GPU).

Method: warm-up calls first; then each repeat is timed on its own, by a pair of device events
around the call on the GPU (so the time is what the stream spent, launch overheads of small ops
included) and by ``time.perf_counter`` on the CPU; rows report the median and the spread (IQR and
min/max). Inputs are fresh random normals, rotated among up to 8 buffer sets so that, where the
sets together exceed twice the last-level cache, each call reads its inputs from memory and not
from the cache the previous call warmed. Peak FLOP/s and bandwidth are measured in the same run
(a large FP32 matmul and a large copy) and every row is put against them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import functools
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .device import cuda_status

FLOAT_BYTES = 4  # every benchmarked array is float32 (indices: int32, the same size)

# H100 SXM5: FP32 on the CUDA cores (no tensor cores) and HBM3 bandwidth, from NVIDIA's datasheet.
H100_SXM_FP32_FLOPS = 67e12
H100_SXM_HBM_BYTES_PER_S = 3.35e12

DEFAULT_BATCH = {"lenet5": 256, "alexnet": 128, "convnet-benchmarks": 128}
# The NumPy path and PyTorch on the CPU run these batches instead (rows say so); time per image
# is what the speedup column compares.
DEFAULT_CPU_BATCH = {"lenet5": 256, "alexnet": 16, "convnet-benchmarks": 16}
QUICK_CPU_BATCH = {"lenet5": 64, "alexnet": 4, "convnet-benchmarks": 4}
EPOCH_IMAGES = 60_000
MAX_BUFFER_SETS = 8


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings (seconds); quartiles by linear interpolation (NumPy's default)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def summarize(samples) -> Stats:
    values = np.asarray(samples, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"samples must be a non-empty 1-D sequence, got shape {values.shape}")
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return Stats(float(median), float(q1), float(q3), float(values.min()), float(values.max()), int(values.size))


# --------------------------------------------------------------------------------------------
# Workloads and their FLOP / byte accounting


@dataclass(frozen=True)
class Conv:
    """A convolution layer at some batch: per-image shapes (C, H, W) and the OIHW weight shape."""

    batch: int
    in_chw: tuple
    weight_shape: tuple
    out_chw: tuple
    stride: tuple = (1, 1)
    padding: object = (0, 0)  # as the layer has it: a pair, or 'same' / 'valid'
    dilation: tuple = (1, 1)
    ops = ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter")

    @property
    def macs(self) -> int:
        """Multiply-adds of the forward pass; backward-data and backward-filter do as many."""
        c_out, c_in, kh, kw = self.weight_shape
        return self.batch * c_out * self.out_chw[1] * self.out_chw[2] * c_in * kh * kw

    def flops(self, op: str) -> int:
        return 2 * self.macs

    def bytes(self, op: str) -> int:
        """Compulsory traffic: every operand read once and the result written once."""
        x, y = self.batch * math.prod(self.in_chw), self.batch * math.prod(self.out_chw)
        w, bias = math.prod(self.weight_shape), self.weight_shape[0]
        return FLOAT_BYTES * {"conv2d_forward": x + w + bias + y,
                              "conv2d_backward_data": y + w + x,
                              "conv2d_backward_filter": x + y + w}[op]

    def describe(self) -> str:
        c_out, c_in, kh, kw = self.weight_shape
        pad = self.padding if isinstance(self.padding, str) else "x".join(map(str, self.padding))
        return (f"{c_in}->{c_out} {kh}x{kw}/{'x'.join(map(str, self.stride))} pad {pad} "
                f"on {self.in_chw[1]}x{self.in_chw[2]}")


@dataclass(frozen=True)
class Pool:
    batch: int
    kind: str  # 'max' or 'avg'
    in_chw: tuple
    out_chw: tuple
    kernel_size: tuple
    stride: tuple
    padding: tuple
    ceil_mode: bool = False
    count_include_pad: bool = True

    @property
    def ops(self):
        return (f"{self.kind}_pool2d_forward", f"{self.kind}_pool2d_backward")

    def flops(self, op: str) -> int:
        return self.batch * math.prod(self.out_chw) * math.prod(self.kernel_size)

    def bytes(self, op: str) -> int:
        """Input and output once; max pooling also writes (forward) and reads (backward) int32 indices."""
        x, y = self.batch * math.prod(self.in_chw), self.batch * math.prod(self.out_chw)
        return FLOAT_BYTES * (x + y + (y if self.kind == "max" else 0))

    def describe(self) -> str:
        k, s = "x".join(map(str, self.kernel_size)), "x".join(map(str, self.stride))
        return f"{self.kind} {k}/{s} on {self.in_chw[0]}x{self.in_chw[1]}x{self.in_chw[2]}"


@dataclass(frozen=True)
class Relu:
    batch: int
    chw: tuple
    ops = ("relu_forward", "relu_backward")

    def flops(self, op: str) -> int:
        return self.batch * math.prod(self.chw)

    def bytes(self, op: str) -> int:
        """Forward reads x and writes y; backward reads grad_output and output, writes grad_input."""
        return FLOAT_BYTES * self.batch * math.prod(self.chw) * (2 if op == "relu_forward" else 3)

    def describe(self) -> str:
        return "x".join(map(str, self.chw))


@dataclass(frozen=True)
class LRN:
    batch: int
    chw: tuple
    size: int
    alpha: float
    beta: float
    k: float
    ops = ("lrn_forward", "lrn_backward")

    def flops(self, op: str) -> int:
        # A window sum of squares, then a power and a multiply, per element (backward twice that).
        per_element = 2 * self.size + 3
        return self.batch * math.prod(self.chw) * per_element * (1 if op == "lrn_forward" else 2)

    def bytes(self, op: str) -> int:
        """Forward reads x, writes y; backward reads grad_output, input, output, writes grad_input."""
        return FLOAT_BYTES * self.batch * math.prod(self.chw) * (2 if op == "lrn_forward" else 4)

    def describe(self) -> str:
        return f"size {self.size} on {'x'.join(map(str, self.chw))}"


@dataclass(frozen=True)
class TrainStep:
    """One SGD training step of a model; FLOPs are 3x the forward conv + linear multiply-adds x 2
    (forward, grad-input and grad-weight each do the forward's multiply-adds)."""

    batch: int
    model: str
    forward_macs_per_image: int
    images: int = 0  # > 0: a whole epoch over this many images instead of one step

    def flops(self, op: str) -> int:
        return 3 * 2 * self.forward_macs_per_image * (self.images or self.batch)

    def bytes(self, op: str) -> int:
        return 0

    def describe(self) -> str:
        what = f"epoch of {self.images} images" if self.images else "forward+backward+SGD"
        return f"{self.model}, {what}"


@dataclass(frozen=True)
class Case:
    group: str  # 'lenet5', 'alexnet', 'convnet-benchmarks'
    layer: str  # 'conv1', 'L3', 'train'
    op: str  # a kernel op, or 'step' / 'epoch' for training
    spec: object

    @property
    def name(self) -> str:
        return f"{self.group}/{self.layer}/{self.op}"

    @property
    def bound(self) -> str:
        """Which peak a row is measured against: 'flop' for conv and training, 'byte' otherwise."""
        return "flop" if isinstance(self.spec, (Conv, TrainStep)) else "byte"


CONVNET_BENCHMARKS = (  # (name, C_in, C_out, input H=W, kernel, stride, padding), batch 128
    ("L1", 3, 64, 224, 11, 4, 2),
    ("L2", 64, 192, 27, 5, 1, 2),
    ("L3", 192, 384, 13, 3, 1, 1),
    ("L4", 384, 256, 13, 3, 1, 1),
    ("L5", 256, 256, 13, 3, 1, 1),
)


def convnet_benchmarks_layers(batch: int = DEFAULT_BATCH["convnet-benchmarks"]) -> list[tuple[str, Conv]]:
    from .functional import conv2d_output_size

    layers = []
    for name, c_in, c_out, size, k, s, p in CONVNET_BENCHMARKS:
        out_hw = conv2d_output_size((size, size), k, s, p)
        layers.append((name, Conv(batch, (c_in, size, size), (c_out, c_in, k, k), (c_out, *out_hw), (s, s), (p, p))))
    return layers


def _pair(value) -> tuple:
    return value if isinstance(value, str) else tuple(value) if np.ndim(value) else (int(value), int(value))


def _leaves(module):
    """The layers of a model in forward order: containers flattened, children taken in the order
    they were registered, which gpuconv's models keep equal to the order forward runs them."""
    children = list(module.children())
    if not children:
        yield module
        return
    for child in children:
        yield from _leaves(child)


@functools.lru_cache(maxsize=None)
def model_layers(name: str):
    """``(model, ((layer name, leaf module, spec at batch 1 or None), ...), forward MACs per image)``
    for ``models.get_model(name)``, the shapes propagated through its layers by their
    ``output_shape``, so that the benchmark's shapes are the model's own. Layer names count per
    kind: conv1, pool1, relu1, lrn1, linear1..."""
    from . import models

    model = models.get_model(name)
    shape = (1, *model.input_shape)
    counts, layers, macs = {}, [], 0
    for leaf in _leaves(model):
        kind = type(leaf).__name__
        out_shape = tuple(leaf.output_shape(shape))
        in_chw, out_chw = shape[1:], out_shape[1:]
        spec, short = None, kind.lower()
        if kind == "Conv2d":
            w = tuple(leaf.weight.data.shape)
            spec = Conv(1, in_chw, w, out_chw, _pair(leaf.stride), _pair(leaf.padding), _pair(leaf.dilation))
            macs += math.prod(out_chw) * math.prod(w[1:])
            short = "conv"
        elif kind in ("MaxPool2d", "AvgPool2d"):
            kernel = _pair(leaf.kernel_size)
            stride = _pair(leaf.stride if leaf.stride is not None else kernel)
            spec = Pool(1, kind[:3].lower(), in_chw, out_chw, kernel, stride, _pair(leaf.padding),
                        bool(leaf.ceil_mode), bool(getattr(leaf, "count_include_pad", True)))
            short = "pool"
        elif kind == "ReLU":
            spec = Relu(1, in_chw)
        elif kind == "LocalResponseNorm":
            spec, short = LRN(1, in_chw, int(leaf.size), float(leaf.alpha), float(leaf.beta), float(leaf.k)), "lrn"
        elif kind == "Linear":
            macs += math.prod(leaf.weight.data.shape)
        counts[short] = counts.get(short, 0) + 1
        layers.append((f"{short}{counts[short]}", leaf, spec))
        shape = out_shape
    return model, tuple(layers), macs


def kernel_cases(groups) -> list[Case]:
    """Every kernel case of the named groups. Each max pooling layer is also benchmarked as
    average pooling over the same windows (the models pool by max only); a layer shape that
    repeats within a group (AlexNet's ReLUs after conv3 and conv4) is benchmarked once."""
    cases = []
    for group in groups:
        batch = DEFAULT_BATCH[group]
        if group == "convnet-benchmarks":
            named = convnet_benchmarks_layers(batch)
        else:
            named = []
            for name, _, spec in model_layers(group)[1]:
                if spec is not None:
                    named.append((name, dataclasses.replace(spec, batch=batch)))
                if isinstance(spec, Pool) and spec.kind == "max":
                    named.append((name, dataclasses.replace(spec, batch=batch, kind="avg")))
        seen = set()
        for layer, spec in named:
            for op in spec.ops:
                key = (op, dataclasses.replace(spec, batch=0))
                if key not in seen:
                    seen.add(key)
                    cases.append(Case(group, layer, op, spec))
    return cases


def training_cases(groups, epoch: bool) -> list[Case]:
    cases = []
    for group in groups:
        macs = model_layers(group)[2]
        cases.append(Case(group, "train", "step", TrainStep(DEFAULT_BATCH[group], group, macs)))
        if epoch and group == "lenet5":
            cases.append(Case(group, "train", "epoch", TrainStep(DEFAULT_BATCH[group], group, macs, EPOCH_IMAGES)))
    return cases


def floors(cases, peak_flops: float = H100_SXM_FP32_FLOPS, peak_bytes_per_s: float = H100_SXM_HBM_BYTES_PER_S):
    """The time no implementation can beat, per case: max(FLOPs / peak FLOP/s, bytes / bandwidth)."""
    rows = []
    for case in cases:
        flops, nbytes = case.spec.flops(case.op), case.spec.bytes(case.op)
        t_flop, t_byte = flops / peak_flops, nbytes / peak_bytes_per_s
        rows.append({"case": case.name, "flops": flops, "bytes": nbytes, "flop_floor_s": t_flop,
                     "byte_floor_s": t_byte, "floor_s": max(t_flop, t_byte),
                     "bound": "compute" if t_flop >= t_byte else "memory"})
    return rows


def floors_markdown(cases=None, peak_flops: float = H100_SXM_FP32_FLOPS,
                    peak_bytes_per_s: float = H100_SXM_HBM_BYTES_PER_S) -> str:
    """The floors of ``cases`` as a markdown table; by default the AlexNet conv layers, both the
    convnet-benchmarks table's and ``models.alexnet``'s, at batch 128."""
    if cases is None:
        cases = [c for c in kernel_cases(["convnet-benchmarks", "alexnet"]) if isinstance(c.spec, Conv)]
    lines = [f"Floors at {peak_flops / 1e12:g} TFLOP/s FP32 and {peak_bytes_per_s / 1e12:g} TB/s:", "",
             "| case | shape | GFLOP | MB | FLOP floor (ms) | byte floor (ms) | bound |",
             "|---|---|---:|---:|---:|---:|---|"]
    for case, row in zip(cases, floors(cases, peak_flops, peak_bytes_per_s)):
        lines.append(f"| {row['case']} | {case.spec.describe()} | {row['flops'] / 1e9:.2f} | {row['bytes'] / 1e6:.1f} "
                     f"| {row['flop_floor_s'] * 1e3:.3f} | {row['byte_floor_s'] * 1e3:.3f} | {row['bound']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Contenders: how each one builds inputs and runs an op


BENCHMARKED_OPS = (*Conv.ops, "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
                   "avg_pool2d_backward", *Relu.ops, *LRN.ops)
BASELINE_VERSION_OPS = Conv.ops  # version 0: im2col + matmul (CuPy + cuBLAS on 'cuda')


def kernel_versions() -> dict[str, list[int]]:
    """``{op: versions}`` from the kernel sources: version N exists where a ``kernels_cu`` file
    defines ``<op>_vN``; convolution also has version 0, the im2col + cuBLAS baseline. Selected at run
    time through ``GPUCONV_KERNEL_<OP>`` (:func:`gpuconv.kernels.select_version`)."""
    from . import kernels

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
def _environ(name: str, value):
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


class Workload(NamedTuple):
    make: Callable  # () -> one input set (a tuple of arrays)
    run: Callable  # (*set) -> the op's results
    note: str = ""


def _normal_source(device: str, rng):
    """``randn(*shape)``: float32 standard normals made on ``device`` (on the GPU by CuPy's own
    generator, seeded from ``rng``: drawing AlexNet-sized inputs on the host costs seconds)."""
    from .device import array_module

    generator = array_module(device).random.default_rng(int(rng.integers(2**31)))
    return lambda *shape: generator.standard_normal(shape, dtype=np.float32)


def _gpuconv_workload(case: Case, device: str, rng) -> tuple[Callable, Callable]:
    """(make one input set, run on a set) through gpuconv's API on NumPy or CuPy arrays."""
    from . import functional as F

    s, op = case.spec, case.op
    randn = _normal_source(device, rng)

    if isinstance(s, Conv):
        x_shape, y_shape = (s.batch, *s.in_chw), (s.batch, *s.out_chw)
        conv = dict(stride=s.stride, padding=s.padding, dilation=s.dilation)
        if op == "conv2d_forward":
            return (lambda: (randn(*x_shape), randn(*s.weight_shape), randn(s.weight_shape[0])),
                    lambda x, w, b: F.conv2d(x, w, b, **conv))
        if op == "conv2d_backward_data":
            return (lambda: (randn(*s.weight_shape), randn(*y_shape)),
                    lambda w, gy: F.conv2d_input(x_shape, w, gy, **conv))
        return (lambda: (randn(*x_shape), randn(*y_shape)),
                lambda x, gy: F.conv2d_weight(x, s.weight_shape, gy, **conv))
    if isinstance(s, Pool):
        x_shape, y_shape = (s.batch, *s.in_chw), (s.batch, *s.out_chw)
        window = dict(kernel_size=s.kernel_size, stride=s.stride, padding=s.padding, ceil_mode=s.ceil_mode)
        if s.kind == "max":
            if op == "max_pool2d_forward":
                return (lambda: (randn(*x_shape),), lambda x: F.max_pool2d(x, return_indices=True, **window))
            return (lambda: (randn(*y_shape), F.max_pool2d(randn(*x_shape), return_indices=True, **window)[1]),
                    lambda gy, idx: F.max_pool2d_backward(gy, idx, x_shape, **window))
        window["count_include_pad"] = s.count_include_pad
        if op == "avg_pool2d_forward":
            return (lambda: (randn(*x_shape),), lambda x: F.avg_pool2d(x, **window))
        return (lambda: (randn(*y_shape),), lambda gy: F.avg_pool2d_backward(gy, x_shape, **window))
    if isinstance(s, Relu):
        shape = (s.batch, *s.chw)
        if op == "relu_forward":
            return (lambda: (randn(*shape),), F.relu)
        return (lambda: (randn(*shape), F.relu(randn(*shape))), F.relu_backward)
    if isinstance(s, LRN):
        shape, lrn = (s.batch, *s.chw), dict(size=s.size, alpha=s.alpha, beta=s.beta, k=s.k)
        if op == "lrn_forward":
            return (lambda: (randn(*shape),), lambda x: F.local_response_norm(x, **lrn))

        def make():
            x = randn(*shape)
            return randn(*shape), x, F.local_response_norm(x, **lrn)

        return make, lambda gy, x, y: F.local_response_norm_backward(gy, x, y, **lrn)
    raise TypeError(f"no gpuconv workload for {case.name}")


def _torch_workload(case: Case, torch, device: str) -> tuple[Callable, Callable]:
    """(make one input set, run on a set) through PyTorch's own kernels for the same op."""
    functional, aten = torch.nn.functional, torch.ops.aten
    s, op = case.spec, case.op

    def randn(*shape):
        return torch.randn(shape, device=device, dtype=torch.float32)

    if isinstance(s, Conv):
        x_shape, y_shape = (s.batch, *s.in_chw), (s.batch, *s.out_chw)
        conv = dict(stride=s.stride, padding=s.padding, dilation=s.dilation)
        if op == "conv2d_forward":
            return (lambda: (randn(*x_shape), randn(*s.weight_shape), randn(s.weight_shape[0])),
                    lambda x, w, b: functional.conv2d(x, w, b, **conv))
        if op == "conv2d_backward_data":
            return (lambda: (randn(*s.weight_shape), randn(*y_shape)),
                    lambda w, gy: torch.nn.grad.conv2d_input(x_shape, w, gy, **conv))
        return (lambda: (randn(*x_shape), randn(*y_shape)),
                lambda x, gy: torch.nn.grad.conv2d_weight(x, s.weight_shape, gy, **conv))
    if isinstance(s, Pool):
        x_shape, y_shape = (s.batch, *s.in_chw), (s.batch, *s.out_chw)
        k, st, p = list(s.kernel_size), list(s.stride), list(s.padding)
        if s.kind == "max":
            if op == "max_pool2d_forward":
                return (lambda: (randn(*x_shape),),
                        lambda x: functional.max_pool2d(x, k, st, p, ceil_mode=s.ceil_mode, return_indices=True))

            def make():
                x = randn(*x_shape)
                indices = functional.max_pool2d(x, k, st, p, ceil_mode=s.ceil_mode, return_indices=True)[1]
                return randn(*y_shape), x, indices

            return make, lambda gy, x, idx: aten.max_pool2d_with_indices_backward(gy, x, k, st, p, [1, 1],
                                                                                    s.ceil_mode, idx)
        if op == "avg_pool2d_forward":
            return (lambda: (randn(*x_shape),),
                    lambda x: functional.avg_pool2d(x, k, st, p, s.ceil_mode, s.count_include_pad))
        return ((lambda: (randn(*y_shape), randn(*x_shape))),
                lambda gy, x: aten.avg_pool2d_backward(gy, x, k, st, p, s.ceil_mode, s.count_include_pad, None))
    if isinstance(s, Relu):
        shape = (s.batch, *s.chw)
        if op == "relu_forward":
            return (lambda: (randn(*shape),), torch.relu)
        return (lambda: (randn(*shape), torch.relu(randn(*shape))), lambda gy, y: aten.threshold_backward(gy, y, 0))
    if isinstance(s, LRN):
        shape, lrn = (s.batch, *s.chw), dict(size=s.size, alpha=s.alpha, beta=s.beta, k=s.k)
        if op == "lrn_forward":
            return (lambda: (randn(*shape),), lambda x: functional.local_response_norm(x, **lrn))

        def make():  # PyTorch's LRN is a composite op: its backward is autograd through the graph
            x = randn(*shape).requires_grad_()
            return randn(*shape), x, functional.local_response_norm(x, **lrn)

        return make, lambda gy, x, y: torch.autograd.grad(y, x, gy, retain_graph=True)
    raise TypeError(f"no PyTorch workload for {case.name}")


def _torch_model(layers, torch):
    """The PyTorch twin of a gpuconv model, built from its layers (same hyper-parameters)."""
    nn = torch.nn
    modules = []
    for _, leaf, _spec in layers:
        kind = type(leaf).__name__
        if kind == "Conv2d":
            c_out, c_in, kh, kw = leaf.weight.data.shape
            modules.append(nn.Conv2d(c_in, c_out, (kh, kw), leaf.stride, leaf.padding, leaf.dilation,
                                     bias=leaf.bias is not None))
        elif kind == "Linear":
            out_features, in_features = leaf.weight.data.shape
            modules.append(nn.Linear(in_features, out_features, bias=leaf.bias is not None))
        elif kind == "MaxPool2d":
            modules.append(nn.MaxPool2d(leaf.kernel_size, leaf.stride, leaf.padding, ceil_mode=leaf.ceil_mode))
        elif kind == "AvgPool2d":
            modules.append(nn.AvgPool2d(leaf.kernel_size, leaf.stride, leaf.padding, leaf.ceil_mode,
                                        leaf.count_include_pad))
        elif kind == "LocalResponseNorm":
            modules.append(nn.LocalResponseNorm(leaf.size, leaf.alpha, leaf.beta, leaf.k))
        elif kind == "Dropout":
            modules.append(nn.Dropout(leaf.p))
        elif kind == "Flatten":
            modules.append(nn.Flatten(getattr(leaf, "start_dim", 1)))
        elif kind in ("ReLU", "Tanh", "Sigmoid"):
            modules.append(getattr(nn, kind)())
        else:
            raise TypeError(f"no PyTorch equivalent for layer {kind}")
    return nn.Sequential(*modules)


class Contender:
    """One implementation on one device. ``workload(case, rng)`` returns its :class:`Workload`
    for a case; ``family`` pairs a GPU row with its CPU row for the speedup column."""

    name = ""
    device = "cpu"  # 'cpu' or 'cuda'
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


NUMPY = "numpy"
TORCH_REFERENCE = {"cpu": "torch cpu (oneDNN)", "cuda": "torch cuda fp32 (cuDNN)"}


class Gpuconv(Contender):
    """gpuconv's functional API: the NumPy path on 'cpu', our kernels on 'cuda'. ``versions``
    forces a kernel version per op (only those ops run); ``exclude`` leaves ops out."""

    def __init__(self, device: str, label: str = NUMPY, versions=None, exclude=()):
        self.device, self.name = device, label
        self.versions, self.exclude = dict(versions or {}), frozenset(exclude)

    def available(self):
        return (True, "") if self.device == "cpu" else cuda_status()

    def applies(self, case):
        if self.versions:
            return case.op in self.versions
        return case.op not in self.exclude

    def selected_for(self, case):
        return _environ(f"GPUCONV_KERNEL_{case.op.upper()}", self.versions.get(case.op))

    def sync(self):
        if self.device == "cuda":
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def timer(self):
        if self.device != "cuda":
            return CpuTimer()
        import cupy

        return EventTimer(cupy.cuda.Event, cupy.cuda.get_elapsed_time)

    def workload(self, case, rng):
        if isinstance(case.spec, TrainStep):
            return _gpuconv_train(case, self.device, rng)
        return Workload(*_gpuconv_workload(case, self.device, rng))


class Torch(Contender):
    family = "torch"

    def __init__(self, device: str, tf32: bool = False):
        self.device, self.tf32 = device, tf32
        self.name = TORCH_REFERENCE[device] if not tf32 else "torch cuda tf32 (cuDNN)"

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
            return _torch_train(case, torch, self.device, rng)
        make, run = _torch_workload(case, torch, self.device)
        # Kernels alone: no autograd graph, except where the backward *is* autograd (LRN).
        if case.op == "lrn_backward":
            return Workload(make, run)
        return Workload(torch.no_grad()(make), torch.no_grad()(run))


# --------------------------------------------------------------------------------------------
# Training steps and the epoch


def _gpuconv_train(case: Case, device: str, rng) -> Workload:
    """A training step (or an epoch of them) of gpuconv's model: forward, loss, backward, SGD
    with momentum 0.9, gradients cleared as PyTorch's ``zero_grad`` does."""
    from . import models, nn, optim
    from .device import to_device

    s = case.spec
    model = models.get_model(s.model).to(device)
    model.train()
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # As the trainer runs it: labels int32 (what the loss kernel reads) and range-checked once,
    # not per step, so a step has no device round trip (the check is one on 'cuda').
    criterion = nn.CrossEntropyLoss(validate_target=False)

    def step(x, y):
        criterion(model(x), y)
        model.backward(criterion.backward())
        optimizer.step()
        optimizer.zero_grad()

    if s.images:
        images, labels, what = _epoch_data(model.input_shape, s.images, rng)
        return _epoch((images, labels.astype(np.int32), what), s.batch, lambda a: to_device(a, device), step, rng)
    randn = _normal_source(device, rng)
    return Workload(lambda: (randn(s.batch, *model.input_shape),
                             to_device(rng.integers(0, 10, s.batch, dtype=np.int32), device)), step)


def _torch_train(case: Case, torch, device: str, rng) -> Workload:
    """The same training step with PyTorch's twin of the model (autograd, torch.optim.SGD)."""
    s = case.spec
    reference, layers, _ = model_layers(s.model)
    model = _torch_model(layers, torch).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()

    def step(x, y):
        criterion(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if s.images:
        return _epoch(_epoch_data(reference.input_shape, s.images, rng), s.batch,
                      lambda a: torch.from_numpy(a).to(device), step, rng)
    shape = (s.batch, *reference.input_shape)
    return Workload(lambda: (torch.randn(shape, device=device), torch.randint(0, 10, (s.batch,), device=device)), step)


def _epoch_data(input_shape, images: int, rng):
    """``(images, labels, what)``: Fashion-MNIST's training set, normalised, when its files are
    found (never downloaded here); random images of the same shape otherwise, and ``what`` says so."""
    try:
        from . import data

        x, y = data.load_dataset("fashion-mnist", "train", download=False)
        x = data.normalize(x[:images], "fashion-mnist")
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, *input_shape)
        return x, np.asarray(y[:images], dtype=np.int64), f"Fashion-MNIST train, {len(x)} images"
    except Exception as exc:  # noqa: BLE001 - whatever failed, the row says the data was random
        x = rng.standard_normal((images, *input_shape), dtype=np.float32)
        return x, rng.integers(0, 10, images), f"random images (Fashion-MNIST not loaded: {type(exc).__name__})"


def _epoch(data, batch: int, to_device, step, rng) -> Workload:
    """One epoch as a workload: the whole set moved to the device once, then batches of a fresh
    shuffle sliced there (an input set is a permutation)."""
    images, labels, what = data
    x, y = to_device(images), to_device(labels)

    def run(order):
        for start in range(0, len(images), batch):
            index = order[start:start + batch]
            step(x[index], y[index])

    return Workload(lambda: (to_device(rng.permutation(len(images))),), run, what)


# --------------------------------------------------------------------------------------------
# Timing


class CpuTimer:
    """``time.perf_counter`` around each call."""

    def __init__(self):
        self._start, self._times = 0.0, []

    def start(self):
        self._start = time.perf_counter()

    def stop(self):
        self._times.append(time.perf_counter() - self._start)

    def seconds(self) -> list[float]:
        return self._times


class EventTimer:
    """A pair of device events around each call, read once at the end, so calls queue back to
    back and the host never waits between them. ``elapsed(start, stop)`` is in milliseconds."""

    def __init__(self, make_event, elapsed):
        self._make, self._elapsed, self._pairs = make_event, elapsed, []

    def _record(self):
        event = self._make()
        event.record()
        return event

    def start(self):
        self._pairs.append((self._record(), None))

    def stop(self):
        self._pairs[-1] = (self._pairs[-1][0], self._record())

    def seconds(self) -> list[float]:
        self._pairs[-1][1].synchronize()
        return [self._elapsed(start, stop) / 1e3 for start, stop in self._pairs]


def buffer_sets(set_bytes: int, cache_bytes: int, memory_bytes: int) -> int:
    """How many input sets to rotate: enough to exceed twice the cache, at most MAX_BUFFER_SETS,
    and no more than a quarter of the free memory holds."""
    wanted = math.ceil(2 * cache_bytes / max(set_bytes, 1))
    fits = memory_bytes // 4 // max(set_bytes, 1)
    return int(max(1, min(wanted, MAX_BUFFER_SETS, fits)))


def time_calls(run, sets, timer, sync, warmup: int, repeats: int, max_seconds: float) -> list[float]:
    """Time ``run(*sets[i % len(sets)])``: up to ``warmup`` untimed calls (fewer once half of
    ``max_seconds`` is spent), then up to ``repeats`` timed ones, stopping early (after at least
    3) once ``max_seconds`` of wall time are spent."""
    began = time.perf_counter()
    for i in range(warmup):
        run(*sets[i % len(sets)])
        if time.perf_counter() - began > max_seconds / 2:  # a slow row needs little warming
            break
    sync()
    began = time.perf_counter()
    for i in range(repeats):
        timer.start()
        run(*sets[(warmup + i) % len(sets)])
        timer.stop()
        if i >= 2 and time.perf_counter() - began > max_seconds:
            break
    return timer.seconds()


def _nbytes(arrays) -> int:
    return sum(int(a.nbytes) for a in arrays)


# --------------------------------------------------------------------------------------------
# Machine description and peaks


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
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    driver = cupy.cuda.runtime.driverGetVersion()
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    free, total = cupy.cuda.runtime.memGetInfo()
    return {"name": name, "driver": f"{driver // 1000}.{driver % 1000 // 10}",
            "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}", "cupy": cupy.__version__,
            "l2_bytes": int(props.get("l2CacheSize", 50 << 20)), "memory_bytes": int(total),
            "free_bytes": int(free), "sm_count": int(props.get("multiProcessorCount", 0)),
            "compute_capability": f"{props.get('major', '?')}.{props.get('minor', '?')}"}


def machine_info(use_gpu: bool) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "cpu_cache_bytes": _cpu_cache_bytes(),
            "python": platform.python_version(), "numpy": np.__version__}
    from . import __version__

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
    if use_gpu and usable:
        info["gpu"] = _gpu_info()
    else:
        info["gpu"] = {"name": "no device", "reason": why if not usable else "not measured (--device cpu)"}
    return info


def device_slug(info: dict) -> str:
    """A file-name-safe name of the device the run is about (the GPU's, else the CPU's)."""
    name = info["gpu"]["name"] if "driver" in info["gpu"] else f"cpu {info['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def measure_peaks(device: str, quick: bool, repeats: int = 5) -> dict:
    """Peak FP32 FLOP/s (a large matmul: on the GPU CuPy's cuBLAS SGEMM, which uses no TF32 unless
    CUPY_TF32 is set) and bandwidth (a large copy: bytes read plus bytes written) of ``device``,
    each the median of ``repeats`` calls."""
    timing = Gpuconv(device)
    if device == "cuda":
        import cupy as xp

        n, copy_bytes = (4096, 256 << 20) if quick else (8192, 1 << 30)
    else:
        xp = np
        n, copy_bytes = (1024, 64 << 20) if quick else (2048, 256 << 20)
    rng = xp.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = xp.empty((n, n), dtype=np.float32)
    matmul = summarize(time_calls(lambda: xp.matmul(a, b, out=c), [()], timing.timer(), timing.sync, 2, repeats, 30.0))
    src = xp.ones(copy_bytes // 4, dtype=np.float32)
    dst = xp.empty_like(src)
    copy = summarize(time_calls(lambda: xp.copyto(dst, src), [()], timing.timer(), timing.sync, 2, repeats, 30.0))
    return {"flops": 2 * n**3 / matmul.median, "bytes_per_s": 2 * copy_bytes / copy.median,
            "how": f"FP32 matmul {n}x{n}x{n}; copy of {copy_bytes >> 20} MiB, read + written"}


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class Row:
    case: Case  # at the batch the row ran (CPU rows may run a smaller one)
    contender: str
    device: str
    family: str
    status: str = "ok"  # 'ok', 'no device', 'unavailable', 'skipped: ...', 'error: ...'
    stats: Stats | None = None
    buffers: int = 0
    note: str = ""
    achieved: float = float("nan")  # FLOP/s or bytes/s, by case.bound
    pct_peak: float = float("nan")
    vs_torch: float = float("nan")
    speedup: float = float("nan")

    @property
    def batch(self) -> int:
        return self.case.spec.batch

    @property
    def per_image(self) -> float:
        spec = self.case.spec
        images = spec.images if isinstance(spec, TrainStep) and spec.images else spec.batch
        return self.stats.median / images if self.stats else float("nan")


def contenders(device_choice: str) -> list[Contender]:
    """The contenders of ``--device`` ('cpu', 'cuda' or 'all'); on 'cuda' one row per registered
    kernel version of every op that has more than one."""
    chosen = []
    if device_choice in ("cpu", "all"):
        chosen += [Gpuconv("cpu"), Torch("cpu")]
    if device_choice in ("cuda", "all"):
        several = {op: v for op, v in kernel_versions().items() if len(v) > 1}
        chosen.append(Gpuconv("cuda", "gpuconv cuda", exclude=several))
        for n in sorted(set().union(*several.values())):
            label = "gpuconv cuda v0 (im2col+cuBLAS)" if n == 0 else f"gpuconv cuda v{n}"
            chosen.append(Gpuconv("cuda", label, versions={op: n for op, v in several.items() if n in v}))
        chosen += [Torch("cuda", tf32=False), Torch("cuda", tf32=True)]
    return chosen


def _available_memory(device: str) -> int:
    if device == "cuda":
        import cupy

        return cupy.cuda.runtime.memGetInfo()[0]
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 4 << 30


def run_row(case: Case, contender: Contender, args, info: dict) -> Row:
    """Time one contender on one case. CPU rows run at the smaller CPU batch, and the CPU epoch on
    ``--cpu-epoch-limit`` images, extrapolated; the row's note says so."""
    spec, notes = case.spec, []
    if contender.device == "cpu" and spec.batch > args.cpu_batch[case.group]:
        spec = dataclasses.replace(spec, batch=args.cpu_batch[case.group])
        notes.append(f"batch {spec.batch}, not {case.spec.batch}")
    epoch_images = spec.images if isinstance(spec, TrainStep) else 0
    timed_images = min(epoch_images, args.cpu_epoch_limit) if contender.device == "cpu" else epoch_images
    row = Row(dataclasses.replace(case, spec=spec), contender.name, contender.device, contender.family)
    usable, why = contender.available()
    if not usable:
        # The reason's first clause: the header says the rest.
        row.status, row.note = ("no device" if contender.device == "cuda" else "unavailable"), why.split(" (")[0]
        return row
    repeats, warmup = args.repeats, args.warmup
    if epoch_images:  # an epoch is long: fewer repeats, one warm-up epoch at most
        repeats, warmup = min(repeats, 3), min(warmup, 1)
    rng = np.random.default_rng(args.seed)
    work = first = sets = None
    try:
        with contender.selected_for(case):
            timed_case = row.case
            if epoch_images:
                timed_case = dataclasses.replace(row.case, spec=dataclasses.replace(spec, images=timed_images))
            work = contender.workload(timed_case, rng)
            first = work.make()
            cache = info["gpu"]["l2_bytes"] if contender.device == "cuda" else info["cpu_cache_bytes"]
            count = buffer_sets(_nbytes(first), cache, _available_memory(contender.device))
            sets = [first] + [work.make() for _ in range(count - 1)]
            samples = time_calls(work.run, sets, contender.timer(), contender.sync, warmup, repeats,
                                 args.max_row_seconds)
        if timed_images < epoch_images:
            samples = [t * epoch_images / timed_images for t in samples]
            notes.append(f"timed on {timed_images} images, extrapolated to {epoch_images}")
        row.stats, row.buffers = summarize(samples), count
        notes.append(work.note)
    except Exception as exc:  # noqa: BLE001 - one failing contender must not end the whole run
        message = str(exc).splitlines()[0][:160] if str(exc) else ""
        row.status = f"error: {type(exc).__name__}: {message}"
        print(f"{case.name}, {contender.name}:\n{traceback.format_exc()}", file=sys.stderr)
    finally:
        # Dropped first: the pools can only give back blocks that nothing refers to any more.
        work = first = sets = None
        _free_device_memory(contender.device)
    row.note = "; ".join(n for n in notes if n)
    return row


def _free_device_memory(device: str):
    """Give cached blocks back between rows, so one contender's pool does not starve the next."""
    if device != "cuda":
        return
    with contextlib.suppress(ImportError):
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    with contextlib.suppress(Exception):  # best effort: PyTorch may be missing or broken
        import torch

        torch.cuda.empty_cache()


def annotate(rows: list[Row], peaks: dict) -> None:
    """Fill the derived columns: throughput, percent of peak, ratio to PyTorch, GPU-over-CPU speedup."""
    by_key = {(r.case.name, r.contender): r for r in rows if r.stats}
    for row in rows:
        if not row.stats:
            continue
        spec, op = row.case.spec, row.case.op
        work = spec.flops(op) if row.case.bound == "flop" else spec.bytes(op)
        row.achieved = work / row.stats.median
        peak = peaks.get(row.device)
        if peak:
            row.pct_peak = 100 * row.achieved / (peak["flops"] if row.case.bound == "flop" else peak["bytes_per_s"])
        reference = by_key.get((row.case.name, TORCH_REFERENCE[row.device]))
        if reference is not None and reference is not row:
            row.vs_torch = reference.per_image / row.per_image
        if row.device == "cuda":
            cpu = by_key.get((row.case.name, NUMPY if row.family == "gpuconv" else TORCH_REFERENCE["cpu"]))
            if cpu is not None:
                row.speedup = cpu.per_image / row.per_image


# --------------------------------------------------------------------------------------------
# Reports


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else ""


def _achieved_text(row: Row) -> str:
    if not math.isfinite(row.achieved):
        return ""
    if row.case.bound == "flop":
        return f"{row.achieved / 1e12:.3g} TFLOP/s" if row.achieved >= 1e12 else f"{row.achieved / 1e9:.3g} GFLOP/s"
    return f"{row.achieved / 1e9:.3g} GB/s"


def _header_lines(info: dict, peaks: dict) -> list[str]:
    gpu = info["gpu"]
    if "driver" in gpu:
        gpu_line = (f"- GPU: {gpu['name']} (compute capability {gpu['compute_capability']}, {gpu['sm_count']} SMs, "
                    f"L2 {gpu['l2_bytes'] >> 20} MiB, {gpu['memory_bytes'] >> 30} GiB); driver {gpu['driver']}, "
                    f"CUDA runtime {gpu['cuda_runtime']}, CuPy {gpu['cupy']}")
    else:
        gpu_line = f"- GPU: no device ({gpu['reason']})"
    lines = [f"- date: {info['date']}", gpu_line,
             f"- CPU: {info['cpu']} ({info['cpu_count']} logical CPUs, "
             f"last-level cache {info['cpu_cache_bytes'] >> 20} MiB)",
             f"- versions: gpuconv {info['gpuconv']}, NumPy {info['numpy']}, PyTorch {info['torch']} "
             f"(cuDNN {info['cudnn']}), Python {info['python']}"]
    for device, peak in peaks.items():
        lines.append(f"- measured peak, {device}: {peak['flops'] / 1e12:.3g} TFLOP/s, "
                     f"{peak['bytes_per_s'] / 1e9:.4g} GB/s ({peak['how']})")
    return lines


COLUMNS_NOTE = ("Columns: median and IQR (interquartile range) of the timed repeats, min–max beside; `achieved`: "
                "2×MACs/time for conv and training rows, compulsory bytes/time otherwise; `% peak`: of the "
                "measured FLOP/s or copy bandwidth of the row's device; `vs torch`: PyTorch's time per image on "
                "the same device (FP32) / this row's (> 1 = faster than PyTorch); `GPU/CPU`: the same family's "
                "CPU time per image / this row's.")


def markdown(info: dict, peaks: dict, rows: list[Row]) -> str:
    title = info["gpu"]["name"] if "driver" in info["gpu"] else info["cpu"]
    lines = [f"# gpuconv benchmark: {title}", "", *_header_lines(info, peaks), "", COLUMNS_NOTE]
    header = ["| case | shape | contender | batch | median | IQR | min–max | achieved | % peak | vs torch | GPU/CPU "
              "| note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    # Rows run most important first; the report shows them by group, in run order within one.
    ordered = [r for group in dict.fromkeys(r.case.group for r in rows) for r in rows if r.case.group == group]
    group = None
    for row in ordered:
        if row.case.group != group:
            group = row.case.group
            lines += ["", f"## {group}", "", *header]
        s = row.stats
        if s:
            timing = [_fmt_time(s.median), _fmt_time(s.iqr), f"{_fmt_time(s.min)}–{_fmt_time(s.max)}"]
        else:
            timing = [row.status, "", ""]
        cells = [f"{row.case.layer} {row.case.op}", row.case.spec.describe(), row.contender, str(row.batch), *timing,
                 _achieved_text(row), _fmt(row.pct_peak, ".1f"), _fmt(row.vs_torch, ".2f"), _fmt(row.speedup, ".1f"),
                 row.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(info: dict, peaks: dict, rows: list[Row]) -> dict:
    out = []
    for row in rows:
        spec, op = row.case.spec, row.case.op
        entry = {"case": row.case.name, "group": row.case.group, "layer": row.case.layer, "op": op,
                 "shape": spec.describe(), "contender": row.contender, "device": row.device, "batch": row.batch,
                 "status": row.status, "note": row.note, "buffers": row.buffers, "bound": row.case.bound,
                 "flops": spec.flops(op), "bytes": spec.bytes(op)}
        if row.stats:
            entry.update(median_s=row.stats.median, q1_s=row.stats.q1, q3_s=row.stats.q3,
                         min_s=row.stats.min, max_s=row.stats.max, repeats=row.stats.n)
        derived = {"achieved_per_s": row.achieved, "pct_peak": row.pct_peak, "vs_torch": row.vs_torch,
                   "gpu_over_cpu": row.speedup}
        entry.update({k: v for k, v in derived.items() if math.isfinite(v)})
        out.append(entry)
    return {"machine": info, "peaks": peaks, "rows": out}


def bar_chart(rows: list[Row], path: Path, title: str) -> None:
    """Median time per image, log scale, a group of bars per case: the compute-bound cases (conv,
    training) where any ran, else every timed case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.stats]
    chosen = [r for r in timed if r.case.bound == "flop"] or timed
    cases = list(dict.fromkeys(r.case.name for r in chosen))
    names = list(dict.fromkeys(r.contender for r in chosen))
    height = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(10, 1.8 + len(cases) * (0.2 + 0.1 * len(names))))
    for j, name in enumerate(names):
        points = [(i + j * height, r.per_image * 1e6) for i, case in enumerate(cases)
                  for r in chosen if r.case.name == case and r.contender == name]
        if points:
            ys, xs = zip(*points)
            ax.barh(ys, xs, height=height, label=name)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.invert_yaxis()
    if chosen:
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("median time per image (µs, log scale; shorter is faster)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(out: Path, info: dict, peaks: dict, rows: list[Row], chart: bool = True) -> None:
    """results.md, results.json and (with ``chart``) results.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    annotate(rows, peaks)
    (out / "results.md").write_text(markdown(info, peaks, rows))
    (out / "results.json").write_text(json.dumps(to_json(info, peaks, rows), indent=1) + "\n")
    if not chart:
        return
    title = info["gpu"]["name"] if "driver" in info["gpu"] else info["cpu"]
    bar_chart(rows, out / "results.png", f"gpuconv benchmark, {title}, {info['date']}")


# --------------------------------------------------------------------------------------------
# Command line

QUICK_PATTERNS = ("lenet5/*", "convnet-benchmarks/L3/conv2d_forward")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="gpuconv bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="LeNet-5 and one AlexNet layer, few repeats: under a minute on a CPU")
    parser.add_argument("--only", metavar="PATTERN", action="append",
                        help="only cases whose name (group/layer/op, e.g. alexnet/conv2/conv2d_forward) matches "
                             "this shell pattern; without wildcards, a substring. Repeatable")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="CPU contenders, GPU contenders, or both (default); without a GPU, its rows say "
                             "'no device'")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default 30; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3; quick 1)")
    parser.add_argument("--max-row-seconds", type=float,
                        help="stop repeating a row after this many seconds, once 3 calls are timed "
                             "(default 5; quick 1)")
    parser.add_argument("--cpu-batch", type=int,
                        help="batch of the CPU rows (default LeNet-5 256, AlexNet shapes 16; quick 64 and 4)")
    parser.add_argument("--cpu-epoch-limit", type=int,
                        help=f"images the CPU epoch is timed on, extrapolated to {EPOCH_IMAGES} "
                             "(default 6000; quick 512)")
    parser.add_argument("--no-epoch", action="store_true", help="leave out the LeNet-5 epoch")
    parser.add_argument("--time-budget", type=float,
                        help="seconds after which no row starts; the rest are reported as skipped")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<device>-<date>/)")
    parser.add_argument("--floors", action="store_true",
                        help="print the H100 SXM time floors of the AlexNet conv layers (markdown) and exit")
    args = parser.parse_args(argv)
    for name, minimum in (("repeats", 1), ("warmup", 0), ("cpu_batch", 1), ("cpu_epoch_limit", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    defaults = (dict(repeats=3, warmup=1, max_row_seconds=1.0, cpu_epoch_limit=512) if args.quick
                else dict(repeats=30, warmup=3, max_row_seconds=5.0, cpu_epoch_limit=6000))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    base = QUICK_CPU_BATCH if args.quick else DEFAULT_CPU_BATCH
    args.cpu_batch = {group: args.cpu_batch or batch for group, batch in base.items()}
    return args


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p if any(c in p for c in "*?[") else f"*{p}*") for p in patterns)


def select_cases(args) -> list[Case]:
    """The cases to run, most important first (so that a run cut short has them): the
    convnet-benchmarks convolutions, the training steps, the models' kernels, the epoch."""
    groups = ["lenet5"] if args.quick else ["lenet5", "alexnet"]
    kernel = kernel_cases(["convnet-benchmarks", *groups])
    training = training_cases(groups, epoch=not args.no_epoch)
    ordered = ([c for c in kernel if c.group == "convnet-benchmarks"] + [c for c in training if c.op == "step"]
               + [c for c in kernel if c.group != "convnet-benchmarks"] + [c for c in training if c.op == "epoch"])
    return [c for c in ordered
            if (not args.only or _matches(c.name, args.only)) and (not args.quick or _matches(c.name, QUICK_PATTERNS))]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.floors:
        print(floors_markdown())
        return 0
    began = time.perf_counter()
    cases = select_cases(args)
    if not cases:
        print(f"gpuconv bench: no case matches --only {' '.join(args.only)}", file=sys.stderr)
        return 2
    entrants = contenders(args.device)
    use_gpu = args.device != "cpu" and cuda_status()[0]
    info = machine_info(use_gpu)
    out = args.out or Path("benchmarks/results") / f"{device_slug(info)}-{info['date'][:10]}"
    print(f"gpuconv bench: {len(cases)} cases, contenders: {', '.join(c.name for c in entrants)}; writing to {out}")
    peaks = {}
    if args.device != "cuda":
        peaks["cpu"] = measure_peaks("cpu", args.quick)
    if use_gpu:
        peaks["cuda"] = measure_peaks("cuda", args.quick)
        _free_device_memory("cuda")  # the peaks' GiBs of operands, before the rows size their buffers
    print("\n".join(_header_lines(info, peaks)), flush=True)
    rows, charted = [], time.perf_counter()
    for case in cases:
        for contender in (c for c in entrants if c.applies(case)):
            if args.time_budget is not None and time.perf_counter() - began > args.time_budget:
                row = Row(case, contender.name, contender.device, contender.family, status="skipped: time budget")
            else:
                row = run_row(case, contender, args, info)
            rows.append(row)
            timing = _fmt_time(row.stats.median) if row.stats else row.status
            note = f"  ({row.note})" if row.note else ""
            print(f"  {case.name:<46} {contender.name:<32} {timing}{note}", flush=True)
        # Rewritten after every case (the chart, slower to draw, every half minute): a run cut
        # short still leaves what it measured.
        chart = time.perf_counter() - charted > 30 or case is cases[-1]
        write_reports(out, info, peaks, rows, chart=chart)
        charted = time.perf_counter() if chart else charted
    print(f"wrote {out / 'results.md'}, results.json and results.png in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

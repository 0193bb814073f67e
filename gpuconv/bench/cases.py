"""The workloads: layer shapes (specs) with their FLOP and byte accounting, and the cases built
from them -- the layers of ``models.lenet5`` and ``models.alexnet`` read off the models, the
convnet-benchmarks AlexNet convolutions, and training steps and the LeNet-5 epoch.

A spec is a frozen dataclass with ``batch``, ``ops`` (the ops a case of it can run),
``flops(op)``, ``bytes(op)`` and ``describe()``; a :class:`Case` is a spec, one op, and the
group/layer it belongs to. :data:`SECTIONS` lists, most important first, where the cases of a
run come from.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

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

    @property
    def images(self) -> int:
        """Images one call processes: the epoch's for an epoch, else the batch."""
        return getattr(self.spec, "images", 0) or self.spec.batch


CONVNET_BENCHMARKS = (  # (name, C_in, C_out, input H=W, kernel, stride, padding), batch 128
    ("L1", 3, 64, 224, 11, 4, 2),
    ("L2", 64, 192, 27, 5, 1, 2),
    ("L3", 192, 384, 13, 3, 1, 1),
    ("L4", 384, 256, 13, 3, 1, 1),
    ("L5", 256, 256, 13, 3, 1, 1),
)


def convnet_benchmarks_layers(batch: int = DEFAULT_BATCH["convnet-benchmarks"]) -> list[tuple[str, Conv]]:
    from ..functional import conv2d_output_size

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
    from .. import models

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


# Where a run's cases come from, in run order: most important first, so that a run cut short by
# its time budget has them. Each entry: (models, with_epoch) -> cases; ``models`` are the model
# groups of the run (LeNet-5 alone with --quick). A new kind of case is one more entry here (and
# its ops in the contenders' workloads).
SECTIONS = (
    lambda models, epoch: kernel_cases(["convnet-benchmarks"]),
    lambda models, epoch: training_cases(models, epoch=False),
    lambda models, epoch: _host_cases(models),
    lambda models, epoch: kernel_cases(models),
    lambda models, epoch: [c for c in training_cases(models, epoch) if c.op == "epoch"],
)


def _host_cases(models) -> list[Case]:
    from .host import host_cases  # host.py builds on this module

    return host_cases(models)


def all_cases(models, epoch: bool) -> list[Case]:
    """Every case of :data:`SECTIONS`, in run order."""
    return [case for section in SECTIONS for case in section(models, epoch)]


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

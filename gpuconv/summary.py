"""The per-layer table of a CNN: output shapes, activation sizes, parameters, multiply-adds.

Everything comes from shape arithmetic (each layer's ``output_shape``), nothing is run, so the
summary of VGG16 at 224x224 is instant on any device.

Conventions, those of the usual lecture tables:

* multiply-adds (MACs) are counted for convolutions, ``N * C_out * H_out * W_out * C_in * KH * KW``,
  and fully connected layers, ``N * out * in``; bias additions, pooling, activations, LRN and
  dropout count zero;
* activations are the elements of each layer's output, and the activation memory of a forward
  pass is the sum over the input and every layer's output, at the parameters' element size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import nn

__all__ = ["LayerSummary", "Summary", "summary"]


@dataclass(frozen=True)
class LayerSummary:
    """One row: a leaf layer, its dotted name, and what it produces for the summarised input."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    activations: int
    params: int
    macs: int


@dataclass(frozen=True)
class Summary:
    """The table; ``str()`` draws it."""

    model: str
    input_shape: tuple[int, ...]
    rows: tuple[LayerSummary, ...]
    itemsize: int

    @property
    def total_params(self) -> int:
        return sum(row.params for row in self.rows)

    @property
    def total_macs(self) -> int:
        return sum(row.macs for row in self.rows)

    @property
    def activation_elements(self) -> int:
        """Input plus every layer output, in elements."""
        return math.prod(self.input_shape) + sum(row.activations for row in self.rows)

    @property
    def activation_bytes(self) -> int:
        return self.activation_elements * self.itemsize

    @property
    def param_bytes(self) -> int:
        return self.total_params * self.itemsize

    def __str__(self) -> str:
        header = ("Layer (type)", "Output shape", "Activations", "Params", "MACs")
        body = [("input", _shape(self.input_shape), f"{math.prod(self.input_shape):,}", "0", "0")]
        body += [(f"{r.name} ({r.kind})", _shape(r.output_shape), f"{r.activations:,}", f"{r.params:,}", f"{r.macs:,}")
                 for r in self.rows]
        widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

        def format_line(cells):
            # The name column reads left-aligned, the numbers right-aligned so their digits line up.
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        rule = "=" * len(format_line(header))
        dtype = f"float{8 * self.itemsize}"
        batch = self.input_shape[0]
        lines = [f"{self.model} for input {_shape(self.input_shape)}", rule, format_line(header), rule]
        lines += [format_line(cells) for cells in body]
        lines += [
            rule,
            f"Total params: {self.total_params:,} ({_mebibytes(self.param_bytes)} as {dtype})",
            f"Total MACs: {self.total_macs:,} ({_metric(self.total_macs)}) for a batch of {batch}",
            f"Activations: {self.activation_elements:,} elements ({_mebibytes(self.activation_bytes)} as {dtype}) "
            f"for one forward pass of a batch of {batch}",
        ]
        return "\n".join(lines)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _metric(count: int) -> str:
    for value, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= value:
            return f"{count / value:.2f} {prefix}"
    return str(count)


def _mebibytes(count: int) -> str:
    return f"{count / 2**20:,.2f} MiB"


def _macs(layer: nn.Module, output_shape) -> int:
    if isinstance(layer, nn.Conv2d):
        kernel_h, kernel_w = layer.kernel_size
        return math.prod(output_shape) * layer.in_channels * kernel_h * kernel_w
    if isinstance(layer, nn.Linear):
        return math.prod(output_shape) * layer.in_features
    return 0


def _walk(module: nn.Module, name: str, input_shape, rows: list) -> tuple[int, ...]:
    """Append a row per leaf of ``module`` (containers run their children in registration order)."""
    children = list(module.named_children())
    if not children:
        output_shape = tuple(module.output_shape(input_shape))
        params = sum(p.numel() for p in module.parameters())
        rows.append(LayerSummary(name or type(module).__name__, type(module).__name__, output_shape,
                                 math.prod(output_shape), params, _macs(module, output_shape)))
        return output_shape
    for child_name, child in children:
        input_shape = _walk(child, f"{name}.{child_name}" if name else child_name, input_shape, rows)
    return input_shape


def summary(model: nn.Module, input_shape=None) -> Summary:
    """Summarise ``model`` for ``input_shape``.

    ``input_shape`` is one sample's (C, H, W), summarised as a batch of 1, or a full shape with its
    batch, (N, C, H, W) (or (N, features) for a fully connected model); None takes the model's
    ``input_shape`` attribute (every model of :mod:`gpuconv.models` has one).
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(f"summary: {type(model).__name__} has no input_shape attribute; pass input_shape")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise ValueError(f"summary: input_shape must be positive ints, got {input_shape!r}")
    if len(shape) == 3:
        shape = (1,) + shape
    shape = tuple(int(d) for d in shape)
    rows: list[LayerSummary] = []
    _walk(model, "", shape, rows)
    own = {p.dtype.itemsize for p in model.parameters()}
    itemsize = own.pop() if len(own) == 1 else np.dtype(np.float32).itemsize
    return Summary(type(model).__name__, shape, tuple(rows), itemsize)

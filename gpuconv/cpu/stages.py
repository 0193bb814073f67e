"""The executor's stages: one or a few layers of a model run on one lane of the batch in the
batch-innermost layout, images (C, H, W, N) and features (F, N).

A stage holds its layers (it reads their parameters at every call: an optimizer may have moved
them into a flat buffer) and no per-batch state; that lives in the :class:`Workspace` the
executor hands it, one per stage and lane, reused from step to step. ``forward(ws, x, rows)``
returns the output, an array of ``ws`` that stays intact until the next forward (the next stage
and this stage's backward read it); ``backward(ws, grad, needs_input_grad, grads)`` writes each
trainable parameter's gradient for this lane into ``grads(param)`` and returns the input
gradient (an array of ``ws``) or None. It may overwrite ``grad``: every gradient handed between
stages is the executor's own.

Folds: an activation after a convolution or a linear layer runs in place on its output (its
derivative in place on the incoming gradient); a ReLU before a max-pool runs as the pool's
``relu=True`` (max(pool(x), 0) equals pool(max(x, 0)); the pool masks its gradient by its own
output), which also covers Conv2d -> ReLU -> MaxPool2d.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..functional.dropout import dropout_mask
from ..nn import (AvgPool2d, Conv2d, Dropout, Flatten, Linear, LocalResponseNorm, MaxPool2d, ReLU, Sigmoid,
                  Tanh)
from ..precision import resolve as resolve_precision
from ..random import next_seed
from . import conv as conv_ops
from . import norm, pool

_ACTIVATIONS = {ReLU: "relu", Tanh: "tanh", Sigmoid: "sigmoid"}


class Unsupported(Exception):
    """The model holds a layer (or a setting of one) the executor does not run."""


class Workspace:
    """The arrays one stage keeps for one lane from step to step, and what its last forward saved."""

    def __init__(self):
        self._arrays = {}
        self.saved = {}

    def array(self, name: str, shape, dtype, zeroed: bool = False) -> np.ndarray:
        """The array ``name`` of ``shape`` and ``dtype``: the one from the last call if it fits
        (its contents as left), else a new one, zero-filled if ``zeroed``."""
        shape = tuple(shape)
        array = self._arrays.get(name)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = (np.zeros if zeroed else np.empty)(shape, dtype)
            self._arrays[name] = array
        return array


# ---------------------------------------------------------------------------------- activations


def activate(kind: str | None, y) -> None:
    """``y := activation(y)`` in place, with the module path's operations (bit-identical)."""
    if kind == "relu":
        np.maximum(y, 0, out=y)
    elif kind == "tanh":
        np.tanh(y, out=y)
    elif kind == "sigmoid":  # 1 / (1 + exp(-y)), as F.sigmoid
        np.negative(y, out=y)
        np.exp(y, out=y)
        y += 1
        np.divide(1, y, out=y)


def differentiate(kind: str | None, grad, y, ws: Workspace) -> None:
    """``grad := grad * activation'`` in place, from the activation's output ``y``, with the
    module path's operations: ReLU keeps ``grad`` where ``y > 0`` and writes +0 elsewhere (also
    over a NaN or inf, as F.relu_backward does), by a bitwise AND rather than a branch."""
    if kind == "relu":
        keep = np.greater(y, 0, out=ws.array("keep", y.shape, np.bool_)).view(np.int8)
        np.negative(keep, out=keep)  # 1 -> -1: all bits set
        bits = grad.view(f"i{grad.itemsize}")
        np.bitwise_and(bits, keep, out=bits)
    elif kind == "tanh":  # grad * (1 - y * y)
        scratch = np.multiply(y, y, out=ws.array("scratch", y.shape, y.dtype))
        np.subtract(1, scratch, out=scratch)
        grad *= scratch
    elif kind == "sigmoid":  # grad * y * (1 - y)
        grad *= y
        grad *= np.subtract(1, y, out=ws.array("scratch", y.shape, y.dtype))


class Stage:
    """What every stage has: its layers, their trainable parameters, and the defaults."""

    layers: tuple = ()
    # Whether forward takes a strided input (the first stage gets the NCHW batch, transposed).
    takes_strided_input = False

    def parameters(self):
        for layer in self.layers:
            yield from layer._parameters.values()

    def trains(self) -> bool:
        return any(p is not None and p.requires_grad for p in self.parameters())

    def start_step(self, input_shape, dtype, training: bool) -> None:
        """Called once per forward on the whole batch, before the lanes run (draws randomness)."""

    def step_arrays(self) -> dict:
        """What ``start_step`` drew for the whole batch, batch-major, by name: a helper-process
        lane is sent its rows of each (see :meth:`use_step_arrays`). Nothing for most stages."""
        return {}

    def use_step_arrays(self, arrays: dict) -> None:
        """In a helper process: the lane's rows of this step's :meth:`step_arrays`, as if
        ``start_step`` had drawn them for a batch of just those rows."""


class ActivationStage(Stage):
    def __init__(self, layer):
        self.layers, self.kind = (layer,), _ACTIVATIONS[type(layer)]

    def output_shape(self, shape):
        return shape

    def forward(self, ws, x, rows):
        out = ws.array("out", x.shape, x.dtype)
        np.copyto(out, x)
        activate(self.kind, out)
        ws.saved = {"output": out}
        return out

    def backward(self, ws, grad, needs_input_grad, grads):
        differentiate(self.kind, grad, ws.saved["output"], ws)
        return grad


class ConvStage(Stage):
    """Conv2d (and the activation after it, in place on its output)."""

    takes_strided_input = True

    def __init__(self, layer, activation=None):
        if resolve_precision(layer.precision, np.dtype(np.float32)) != "fp32":
            raise Unsupported(f"Conv2d with precision={layer.precision!r}")
        self.conv = layer
        self.layers = (layer,) if activation is None else (layer, activation)
        self.kind = None if activation is None else _ACTIVATIONS[type(activation)]

    def output_shape(self, shape):
        g = conv_ops.geometry(shape, self.conv)
        return g.c_out, g.out_h, g.out_w, g.batch

    def _source(self, ws, x, plan):
        """The padded input the windows read (the input itself where nothing pads it)."""
        if plan.pads:
            padded = ws.array("padded", plan.padded_shape, x.dtype, zeroed=True)  # the border stays 0
            np.copyto(plan.interior(padded, "input"), x)
            return padded
        if x.flags.c_contiguous:
            return x
        copy = ws.array("input", x.shape, x.dtype)
        np.copyto(copy, x)
        return copy

    def forward(self, ws, x, rows):
        plan = ws.saved.get("plan")
        if plan is None or plan.input_shape != x.shape or plan.itemsize != x.itemsize:
            plan = conv_ops.ConvPlan(x.shape, self.conv, x.itemsize)
        source = self._source(ws, x, plan)
        block = ws.array("cols", plan.block_shape, x.dtype)
        out = ws.array("out", plan.output_shape, x.dtype)
        weight = self.conv.weight.data.reshape(plan.geometry.c_out, -1)
        bias = None if self.conv.bias is None else self.conv.bias.data[:, None]
        for cols, destination, windows, output in plan.forward_views(source, block, out):
            np.copyto(destination, windows)  # im2col
            np.matmul(weight, cols, out=output)
            if bias is not None:
                output += bias
        activate(self.kind, out)
        # block_holds: the block whose columns ``block`` holds (None: overwritten)
        ws.saved = {"plan": plan, "source": source, "block_holds": len(plan.blocks) - 1, "output": out}
        return out

    def backward(self, ws, grad, needs_input_grad, grads):
        saved = ws.saved
        plan, weight, bias = saved["plan"], self.conv.weight, self.conv.bias
        g = plan.geometry
        differentiate(self.kind, grad, saved["output"], ws)
        block = ws.array("cols", plan.block_shape, grad.dtype)
        gradient = plan.gradient_columns(grad, block)
        grad_weight = grads(weight)
        if grad_weight is not None:
            # cols (K, P) @ grad.T (P, C_out), then transposed: OpenBLAS runs this orientation up to
            # 3x faster than grad (C_out, P) @ cols.T when P is long (AlexNet's conv1: 68 against 213 ms).
            # Last block first: the forward left its columns in ``block``.
            transposed = ws.array("grad_weight_t", (g.patch_size, g.c_out), grad.dtype)
            partial = ws.array("grad_weight_block", transposed.shape, grad.dtype)
            columns = plan.forward_views(saved["source"], block, saved["output"])
            last = len(plan.blocks) - 1
            for index in range(last, -1, -1):
                cols, destination, windows, _ = columns[index]
                if saved["block_holds"] != index:
                    np.copyto(destination, windows)
                    saved["block_holds"] = index
                np.matmul(cols, gradient[index][0].T, out=transposed if index == last else partial)
                if index != last:
                    transposed += partial
            np.copyto(grad_weight.reshape(g.c_out, -1), transposed.T)
        grad_bias = grads(bias)
        if grad_bias is not None:
            np.add.reduce(grad.reshape(g.c_out, -1), axis=1, out=grad_bias)
        if not needs_input_grad:
            return None
        # The column gradients block by block into ``block`` (a rerun rebuilds the columns), each
        # added into the input gradient while in cache.
        saved["block_holds"] = None
        target = ws.array("grad_padded", plan.padded_shape, grad.dtype) if plan.pads else \
            ws.array("grad_input", plan.input_shape, grad.dtype)
        target.fill(0)
        weight_t = weight.data.reshape(g.c_out, -1).T
        for (output_rows, _), (grad_columns, grad_cols) in zip(plan.blocks, gradient):
            np.matmul(weight_t, grad_columns, out=grad_cols)
            conv_ops.col2im(grad_cols, g, output_rows, target)
        if not plan.pads:
            return target
        grad_input = ws.array("grad_input", plan.input_shape, grad.dtype)
        np.copyto(grad_input, plan.interior(target, "gradient"))
        return grad_input


class LinearStage(Stage):
    """Linear on (in_features, N) (and the activation after it, in place on its output)."""

    def __init__(self, layer, activation=None):
        self.linear = layer
        self.layers = (layer,) if activation is None else (layer, activation)
        self.kind = None if activation is None else _ACTIVATIONS[type(activation)]

    def output_shape(self, shape):
        if shape[0] != self.linear.in_features:
            raise Unsupported(f"Linear with {self.linear.in_features} inputs after {shape[0]} features")
        return self.linear.out_features, shape[1]

    def forward(self, ws, x, rows):
        out = ws.array("out", (self.linear.out_features, x.shape[1]), x.dtype)
        np.matmul(self.linear.weight.data, x, out=out)
        if self.linear.bias is not None:
            out += self.linear.bias.data[:, None]
        activate(self.kind, out)
        ws.saved = {"input": x, "output": out}
        return out

    def backward(self, ws, grad, needs_input_grad, grads):
        x, weight = ws.saved["input"], self.linear.weight
        differentiate(self.kind, grad, ws.saved["output"], ws)
        grad_weight = grads(weight)
        if grad_weight is not None:
            np.matmul(grad, x.T, out=grad_weight)
        grad_bias = grads(self.linear.bias)
        if grad_bias is not None:
            np.sum(grad, axis=1, out=grad_bias)
        if not needs_input_grad:
            return None
        return np.matmul(weight.data.T, grad, out=ws.array("grad_input", x.shape, grad.dtype))


class FlattenStage(Stage):
    """(C, H, W, N) -> (C*H*W, N): free in this layout, the features in NCHW's flatten order."""

    def __init__(self, layer):
        self.layers = (layer,)

    def output_shape(self, shape):
        return int(np.prod(shape[:-1])), shape[-1]

    def forward(self, ws, x, rows):
        ws.saved = {"input_shape": x.shape}
        return x.reshape(x.shape[0] if x.ndim == 2 else -1, x.shape[-1])

    def backward(self, ws, grad, needs_input_grad, grads):
        return grad.reshape(ws.saved["input_shape"])


class _PoolStage(Stage):
    def __init__(self, layer):
        self.pool = layer
        self.layers = (layer,)
        self.window = (layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode)
        self._output_shapes = {}  # the executor asks at every forward

    def output_shape(self, shape):
        shape = tuple(shape)
        output = self._output_shapes.get(shape)
        if output is None:
            c, h, w, n = shape
            output = self._output_shapes[shape] = (c, *F.pool2d_output_size((h, w), *self.window), n)
        return output


class MaxPoolStage(_PoolStage):
    """MaxPool2d, with the ReLU before it (``relu``) folded in. Each lane's workspace keeps the
    :class:`~gpuconv.cpu.pool.MaxPool2dPlan` of its input shape from step to step: the window
    checked once, the views of the same buffers built once."""

    def __init__(self, layer, relu=None):
        super().__init__(layer)
        self.relu = relu is not None
        if self.relu:
            self.layers = (relu, layer)

    def forward(self, ws, x, rows):
        plan = ws.saved.get("plan")
        if plan is None or plan.input_shape != x.shape or plan.dtype != x.dtype:
            plan = pool.MaxPool2dPlan(x.shape, x.dtype, *self.window, keep=True)
        out = ws.array("out", plan.output_shape, x.dtype)
        indices = ws.array("indices", plan.output_shape, plan.code_dtype)
        plan.forward(x, out, indices, relu=self.relu)
        ws.saved = {"plan": plan, "indices": indices, "output": out}
        return out

    def backward(self, ws, grad, needs_input_grad, grads):
        saved = ws.saved
        plan = saved["plan"]
        return plan.backward(grad, saved["indices"], ws.array("grad_input", plan.input_shape, grad.dtype),
                             relu_output=saved["output"] if self.relu else None)


class AvgPoolStage(_PoolStage):
    """AvgPool2d; each lane's workspace keeps the :class:`~gpuconv.cpu.pool.AvgPool2dPlan` of its
    input shape (see MaxPoolStage)."""

    def forward(self, ws, x, rows):
        plan = ws.saved.get("plan")
        if plan is None or plan.input_shape != x.shape or plan.dtype != x.dtype:
            plan = pool.AvgPool2dPlan(x.shape, x.dtype, *self.window, self.pool.count_include_pad, keep=True)
        ws.saved = {"plan": plan}
        return plan.forward(x, ws.array("out", plan.output_shape, x.dtype))

    def backward(self, ws, grad, needs_input_grad, grads):
        plan = ws.saved["plan"]
        return plan.backward(grad, ws.array("grad_input", plan.input_shape, grad.dtype))


class LRNStage(Stage):
    def __init__(self, layer):
        self.layers = (layer,)
        self.args = layer._args()

    def output_shape(self, shape):
        return shape

    def forward(self, ws, x, rows):
        out, saved = norm.local_response_norm(x, *self.args, out=ws.array("out", x.shape, x.dtype))
        ws.saved = {"input": x, "output": out, "saved": saved}
        return out

    def backward(self, ws, grad, needs_input_grad, grads):
        s = ws.saved
        return norm.local_response_norm_backward(grad, s["input"], s["output"], s["saved"], *self.args,
                                                 out=ws.array("grad_input", grad.shape, grad.dtype))


class DropoutStage(Stage):
    """Dropout with the module path's masks: one seed per forward from ``next_seed`` (drawn in
    layer order before the lanes run), the mask of the whole batch in its NCHW / (N, F) shape as
    F.dropout draws it, each lane multiplying by its rows of it."""

    def __init__(self, layer):
        self.dropout = layer
        self.layers = (layer,)
        self._factor = None

    def output_shape(self, shape):
        return shape

    def start_step(self, input_shape, dtype, training):
        p = self.dropout.p
        if not (training and p > 0.0):
            self._factor = None
            return
        seed = next_seed()
        if p == 1.0:
            factor = np.zeros(input_shape, dtype)
        else:
            factor = dropout_mask(input_shape, p, seed).astype(dtype)
            factor *= dtype.type(1.0 / (1.0 - p))
        self._factor = factor

    def step_arrays(self):
        return {} if self._factor is None else {"factor": self._factor}

    def use_step_arrays(self, arrays):
        self._factor = arrays.get("factor")

    def _lane_factor(self, rows):
        return np.moveaxis(self._factor[rows], 0, -1)  # batch-major rows -> the lane's batch-innermost view

    def forward(self, ws, x, rows):
        if self._factor is None:
            ws.saved = {"factor": None}
            return x
        factor = self._lane_factor(rows)
        ws.saved = {"factor": factor}
        return np.multiply(factor, x, out=ws.array("out", x.shape, x.dtype))

    def backward(self, ws, grad, needs_input_grad, grads):
        factor = ws.saved["factor"]
        if factor is None:
            return grad
        return np.multiply(factor, grad, out=grad)


def build(features, flatten, classifier) -> list[Stage]:
    """The stages of ``classifier(flatten(features(x)))``, with the folds; :class:`Unsupported`
    for any layer the executor does not run."""
    if type(flatten) is not Flatten or (flatten.start_dim, flatten.end_dim) != (1, -1):
        raise Unsupported("the flatten must be Flatten(1, -1)")
    stages = _chain(list(features), image=True)
    stages.append(FlattenStage(flatten))
    return stages + _chain(list(classifier), image=False)


def _chain(layers, image: bool) -> list[Stage]:
    stages, i = [], 0
    while i < len(layers):
        layer, kind = layers[i], type(layers[i])
        after = type(layers[i + 1]) if i + 1 < len(layers) else None
        if kind in (Conv2d, Linear) and (kind is Conv2d) == image:
            stage = ConvStage if kind is Conv2d else LinearStage
            pool_follows = i + 2 < len(layers) and type(layers[i + 2]) is MaxPool2d
            if after in _ACTIVATIONS and not (after is ReLU and pool_follows):
                stages.append(stage(layer, layers[i + 1]))
                i += 2
            else:
                stages.append(stage(layer))
                i += 1
        elif kind is ReLU and after is MaxPool2d and image:
            stages.append(MaxPoolStage(layers[i + 1], relu=layer))
            i += 2
        elif kind in _ACTIVATIONS:
            stages.append(ActivationStage(layer))
            i += 1
        elif kind is MaxPool2d and image:
            stages.append(MaxPoolStage(layer))
            i += 1
        elif kind is AvgPool2d and image:
            stages.append(AvgPoolStage(layer))
            i += 1
        elif kind is LocalResponseNorm and image:
            stages.append(LRNStage(layer))
            i += 1
        elif kind is Dropout:
            stages.append(DropoutStage(layer))
            i += 1
        else:
            where = "features" if image else "classifier"
            raise Unsupported(f"{kind.__name__} in the {where}")
    return stages

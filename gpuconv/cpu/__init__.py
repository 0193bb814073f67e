"""The NumPy path's model executor in the batch-innermost layout.

When a :class:`~gpuconv.models.ConvNet` runs forward and backward on 'cpu' in float32 and every
layer is one the executor runs (Conv2d, ReLU, Tanh, Sigmoid, MaxPool2d, AvgPool2d,
LocalResponseNorm, Dropout in ``features``; Linear, the activations and Dropout in
``classifier``), the model converts its NCHW input to (C, H, W, N) once, runs every layer in that
layout ((F, N) for the classifier, which makes the flatten free) and converts only the logits
back. Each parameter's gradient is written as the module path writes it (accumulated into
``.grad``; frozen parameters get none; into the optimizer's flat buffer when it has one).
Anything else -- another device, float64 (gradient checks), an empty batch, another layer --
runs the module path, layer by layer in NCHW, unchanged. The public functional API stays NCHW.

Turn it off with ``model.cpu_executor = False`` on a model, or ``GPUCONV_CPU_EXECUTOR=0`` in the
environment for every model; both paths compute the same values to float32 rounding (the sums
run in another order), dropout masks included.

A batch of two or more is split into two lanes: the first runs here, the second in a helper
process (``lane_process``; ``GPUCONV_CPU_LANES=thread`` puts it on a thread of this process,
``GPUCONV_CPU_LANES=one`` runs the batch as one lane).

Modules: ``conv`` (im2col, col2im in this layout), ``pool`` and ``norm`` (pooling and LRN in this
layout), ``stages`` (the layers as the executor runs them, with their folds), ``executor`` (lanes,
workspaces, gradients), ``threads`` (BLAS threads, worker threads), ``lane_process`` and
``lane_worker`` (the helper process's two sides).
"""
from .executor import ENV_SWITCH, ModelExecutor, enabled, executor_for

__all__ = ["ModelExecutor", "executor_for", "enabled", "ENV_SWITCH"]

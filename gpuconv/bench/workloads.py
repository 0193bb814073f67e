"""What each contender runs for a kernel case: ``(make, run)`` -- make one input set (a tuple of
arrays on the contender's device), run the op on a set -- through gpuconv's functional API or
through PyTorch's own kernels for the same op. A new op is a branch in both functions."""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .cases import LRN, Case, Conv, Pool, Relu


class Workload(NamedTuple):
    """What a contender times for a case: ``run(*make())``. ``note`` goes into the row's note;
    ``extra`` (JSON-serialisable: the kernel chosen, a useful-work share...) into the row's
    ``extra`` field of the JSON and, as ``key: value``, into its note."""

    make: Callable  # () -> one input set (a tuple of arrays)
    run: Callable  # (*set) -> the op's results
    note: str = ""
    extra: dict | None = None


def normal_source(device: str, rng):
    """``randn(*shape)``: float32 standard normals made on ``device`` (on the GPU by CuPy's own
    generator, seeded from ``rng``: drawing AlexNet-sized inputs on the host costs seconds)."""
    from ..device import array_module

    generator = array_module(device).random.default_rng(int(rng.integers(2**31)))
    return lambda *shape: generator.standard_normal(shape, dtype=np.float32)


def conv_op(s: Conv, op: str, randn, conv2d, conv2d_input, conv2d_weight) -> tuple[Callable, Callable]:
    """(make, run) of a convolution case through an API with PyTorch's signatures (gpuconv's
    functional module, or ``torch.nn.functional.conv2d`` with ``torch.nn.grad``'s two gradients)."""
    x_shape, y_shape = (s.batch, *s.in_chw), (s.batch, *s.out_chw)
    conv = dict(stride=s.stride, padding=s.padding, dilation=s.dilation)
    if op == "conv2d_forward":
        return (lambda: (randn(*x_shape), randn(*s.weight_shape), randn(s.weight_shape[0])),
                lambda x, w, b: conv2d(x, w, b, **conv))
    if op == "conv2d_backward_data":
        return (lambda: (randn(*s.weight_shape), randn(*y_shape)),
                lambda w, gy: conv2d_input(x_shape, w, gy, **conv))
    return (lambda: (randn(*x_shape), randn(*y_shape)),
            lambda x, gy: conv2d_weight(x, s.weight_shape, gy, **conv))


def gpuconv_op(case: Case, device: str, rng) -> tuple[Callable, Callable]:
    """(make one input set, run on a set) through gpuconv's API on NumPy or CuPy arrays."""
    from .. import functional as F

    s, op = case.spec, case.op
    randn = normal_source(device, rng)

    if isinstance(s, Conv):
        return conv_op(s, op, randn, F.conv2d, F.conv2d_input, F.conv2d_weight)
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


def torch_op(case: Case, torch, device: str) -> tuple[Callable, Callable]:
    """(make one input set, run on a set) through PyTorch's own kernels for the same op."""
    functional, aten = torch.nn.functional, torch.ops.aten
    s, op = case.spec, case.op

    def randn(*shape):
        return torch.randn(shape, device=device, dtype=torch.float32)

    if isinstance(s, Conv):
        return conv_op(s, op, randn, functional.conv2d, torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight)
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

"""Training workloads: a step (forward, loss, backward, SGD with momentum 0.9) of a gpuconv model
and of its PyTorch twin, and a whole epoch of such steps over Fashion-MNIST."""
from __future__ import annotations

import numpy as np

from .cases import Case, model_layers
from .workloads import Workload, normal_source


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


def gpuconv_train(case: Case, device: str, rng) -> Workload:
    """A training step (or an epoch of them) of gpuconv's model: forward, loss, backward, SGD
    with momentum 0.9, gradients cleared as PyTorch's ``zero_grad`` does."""
    from .. import models, nn, optim
    from ..device import to_device

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
    randn = normal_source(device, rng)
    return Workload(lambda: (randn(s.batch, *model.input_shape),
                             to_device(rng.integers(0, 10, s.batch, dtype=np.int32), device)), step,
                    _cpu_path(model, s.batch) if device == "cpu" else "")


def _cpu_path(model, batch: int) -> str:
    """The row's note on 'cpu': how the NumPy path runs the step (gpuconv.cpu's executor or not)."""
    from .. import cpu

    executor = cpu.executor_for(model, np.empty((batch, *model.input_shape), np.float32))
    return "module path" if executor is None else f"cpu executor: {executor.describe(batch)}"


def torch_train(case: Case, torch, device: str, rng) -> Workload:
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
        from .. import data

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

"""Dropout."""
from __future__ import annotations

import numpy as np

from .. import functional as F
from .. import graphs
from ..device import copy_to_device, device_of, empty
from ..functional._checks import probability
from ..random import next_seed
from .module import Module


class Dropout(Module):
    """Zero each element with probability ``p`` in training (scaling the rest by 1/(1-p)); identity in eval.

    Each forward draws a fresh seed from :func:`gpuconv.random.next_seed`; backward regenerates the
    same mask from it, so no mask is stored.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = probability(p, "Dropout: p")  # p = 1 zeros everything (and every gradient), as in torch
        self._seed_buffer = None

    def forward(self, x):
        if not (self.training and self.p > 0.0):
            self._save(seed=None)
            return x
        # On a device the seed lives in device memory, written by a host update, so that a
        # captured graph draws the next seed before every replay and its kernels read it there.
        seed = next_seed() if device_of(x) == "cpu" else self._device_seed(device_of(x))
        self._save(seed=seed)
        return F.dropout(x, self.p, True, seed=seed)

    def _device_seed(self, device: str):
        if self._seed_buffer is None or device_of(self._seed_buffer) != device:
            self._seed_buffer = empty((1,), np.uint64, device)
        buffer = self._seed_buffer
        graphs.host_update(lambda: copy_to_device(buffer, np.array([next_seed()], np.uint64)))
        return buffer

    def backward(self, grad_output):
        seed = self._saved()["seed"]
        return grad_output if seed is None else F.dropout_backward(grad_output, self.p, seed)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"

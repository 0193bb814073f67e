"""LocalResponseNorm."""
from __future__ import annotations

from .. import functional as F
from ..functional._checks import positive_int
from .module import Module


class LocalResponseNorm(Module):
    """Across-channel LRN, PyTorch's formula: ``x / (k + alpha/size * sum of squares)^beta``."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size = positive_int(size, "LocalResponseNorm: size")
        self.alpha, self.beta, self.k = float(alpha), float(beta), float(k)

    def _args(self):
        return self.size, self.alpha, self.beta, self.k

    def forward(self, x):
        out = F.local_response_norm(x, *self._args())
        self._save(input=x, output=out)
        return out

    def backward(self, grad_output):
        saved = self._saved()
        return F.local_response_norm_backward(grad_output, saved["input"], saved["output"], *self._args())

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"

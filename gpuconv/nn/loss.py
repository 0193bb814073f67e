"""CrossEntropyLoss."""
from __future__ import annotations

from .. import functional as F
from ..functional._checks import ieee_arithmetic
from .module import Module


class CrossEntropyLoss(Module):
    """``loss = criterion(logits, labels)`` (log-softmax + NLL); ``criterion.backward()`` -> d loss / d logits."""

    def __init__(self, reduction: str = "mean", validate_target: bool = True):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"CrossEntropyLoss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        # False for labels checked once when loaded: saves a device round trip per step on 'cuda'.
        self.validate_target = validate_target

    def forward(self, input, target):
        # The loss and its gradient come from one pass over the scores (one kernel on the GPU).
        loss, grad = F.cross_entropy_with_grad(input, target, self.reduction, validate_target=self.validate_target)
        self._save(grad=grad)
        return loss

    @ieee_arithmetic
    def backward(self, grad_output=None):
        """d loss / d logits, times ``grad_output`` (a scalar, or one value per sample for 'none') if given."""
        grad = self._saved()["grad"]
        if grad_output is None:
            return grad
        # Per-sample factors (reduction 'none') scale their sample's row; a scalar scales everything.
        # getattr rather than np.ndim, which needs NumPy's dispatch to reach CuPy for a device array.
        return grad * (grad_output if getattr(grad_output, "ndim", 0) == 0 else grad_output[:, None])

    def extra_repr(self) -> str:
        return "" if self.reduction == "mean" else f"reduction={self.reduction!r}"

"""MaxPool2d and AvgPool2d."""
from __future__ import annotations

from .. import functional as F
from ..functional.pool import check_window
from .module import Module, _shape_check


class _Pool2d(Module):
    """What max and average pooling share: the window arguments (stride defaults to the window)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.ceil_mode = bool(ceil_mode)
        # Checked now, but kept as the caller wrote them (2, not (2, 2)), as torch prints them.
        check_window(kernel_size, self.stride, padding)

    def output_shape(self, input_shape):
        n, c, h, w = _shape_check(type(self).__name__, input_shape, 4, "NCHW")
        out_h, out_w = F.pool2d_output_size((h, w), self.kernel_size, self.stride, self.padding, self.ceil_mode)
        return n, c, out_h, out_w

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max pooling; backward routes each gradient to the position its window's maximum came from."""

    # ceil_mode keyword-only: torch.nn.MaxPool2d's fourth argument is dilation (unsupported here),
    # so MaxPool2d(3, 2, 0, 1) must fail rather than turn ceil_mode on.
    def __init__(self, kernel_size, stride=None, padding=0, *, ceil_mode: bool = False):
        super().__init__(kernel_size, stride, padding, ceil_mode)

    def forward(self, x):
        out, indices = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, return_indices=True)
        self._save(indices=indices, input_shape=tuple(x.shape), output=out)
        return out

    def backward(self, grad_output):
        saved = self._saved()
        return F.max_pool2d_backward(grad_output, saved["indices"], saved["input_shape"], self.kernel_size,
                                     self.stride, self.padding, self.ceil_mode)

    def backward_through_relu(self, grad_output):
        """The gradient w.r.t. the input of the ReLU whose output this pool's forward took: that
        ReLU's backward folded into this one (one kernel); see :func:`backward_chain`."""
        saved = self._saved()
        return F.max_pool2d_relu_backward(grad_output, saved["indices"], saved["output"], saved["input_shape"],
                                          self.kernel_size, self.stride, self.padding, self.ceil_mode)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ceil_mode={self.ceil_mode}"


class AvgPool2d(_Pool2d):
    """Average pooling; ``count_include_pad=False`` divides by the window's in-image elements only."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x):
        out = F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        self._save(input_shape=tuple(x.shape))
        return out

    def backward(self, grad_output):
        return F.avg_pool2d_backward(grad_output, self._saved()["input_shape"], self.kernel_size, self.stride,
                                     self.padding, self.ceil_mode, self.count_include_pad)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.ceil_mode:
            text += ", ceil_mode=True"
        if not self.count_include_pad:
            text += ", count_include_pad=False"
        return text

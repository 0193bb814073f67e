"""Conv2d."""
from __future__ import annotations

import math

from .. import functional as F
from ..device import device_of
from ..functional._checks import pair, positive_int
from ..functional.conv import check_padding
from ..precision import check as check_precision
from .module import Module, Parameter, _shape_check, _uniform


class Conv2d(Module):
    """2-D convolution, NCHW input, OIHW weight; initialised as ``torch.nn.Conv2d``.

    ``precision`` ('fp32', 'tf32', 'bf16'; None: the global setting) is the internal precision of
    its three convolutions, see ``gpuconv.precision``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, precision=None):
        super().__init__()
        check_precision(precision)
        self.precision = precision
        # Refused here, not at the first forward: what torch.nn.Conv2d refuses at construction
        # (a float size, padding='same' with a stride, an unknown padding string), and sizes
        # torch accepts only to fail later (0 channels or kernel, a zero stride, negative padding).
        self.in_channels = positive_int(in_channels, "Conv2d: in_channels")
        self.out_channels = positive_int(out_channels, "Conv2d: out_channels")
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = pair(stride, "stride", 1)
        self.dilation = pair(dilation, "dilation", 1)
        check_padding(self.kernel_size, self.stride, padding, self.dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding, "padding", 0)
        # kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as does the bias.
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = Parameter(_uniform((self.out_channels, self.in_channels) + self.kernel_size, bound))
        self.bias = Parameter(_uniform((self.out_channels,), bound)) if bias else None

    def _conv_args(self):
        return self.stride, self.padding, self.dilation

    def forward(self, x):
        return self._forward(x, activation=None)

    def _forward(self, x, activation):
        self._check_input(x)
        bias = None if self.bias is None else self.bias.data
        out = F.conv2d(x, self.weight.data, bias, *self._conv_args(), activation=activation, precision=self.precision)
        self._save(input=x)
        return out

    def forward_relu(self, x, relu):
        """``relu(self(x))`` with the ReLU in the convolution's epilogue (one kernel), for
        ``Sequential``'s fusion table; ``relu``, the ReLU that follows, keeps its output for its
        backward."""
        out = self._forward(x, activation="relu")
        relu._save(output=out)
        return out

    def forward_relu_max_pool2d(self, x, relu, pool):
        """``pool(relu(self(x)))``, for ``Sequential``'s fusion table; ``relu`` is a ReLU, ``pool`` a
        MaxPool2d. On 'cuda' and 'emu' one op (``F.conv2d_relu_max_pool2d``: one kernel where it
        applies), leaving each what its backward needs: this layer its input, the pool its
        indices, input shape and output; the ReLU nothing (its output, the convolution's, is
        never stored): its backward runs folded into the pool's (``backward_chain``). On 'cpu'
        the three layers run one by one."""
        if device_of(x) == "cpu":
            return pool(relu(self(x)))
        self._check_input(x)
        bias = None if self.bias is None else self.bias.data
        out, indices = F.conv2d_relu_max_pool2d(x, self.weight.data, bias, *self._conv_args(), pool.kernel_size,
                                                pool.stride, pool.padding, pool.ceil_mode, precision=self.precision)
        self._save(input=x)
        relu._ctx = None
        pool._save(indices=indices, input_shape=self.output_shape(x.shape), output=out)
        return out

    def backward(self, grad_output):
        x = self._saved()["input"]
        weight = self.weight.data
        bias_grad = self.bias is not None and self.bias.requires_grad
        if self.weight.requires_grad:
            # With the bias: one call, which the default kernel serves with one launch.
            grads = F.conv2d_weight(x, weight.shape, grad_output, *self._conv_args(), out=self.weight.grad_destination(),
                                    precision=self.precision, bias_grad=bias_grad,
                                    bias_out=self.bias.grad_destination() if bias_grad else None)
            grad_weight, grad_bias = grads if bias_grad else (grads, None)
            self.weight.accumulate_grad(grad_weight)
            if bias_grad:
                self.bias.accumulate_grad(grad_bias)
        elif bias_grad:
            self.bias.accumulate_grad(F.conv2d_bias(grad_output, out=self.bias.grad_destination()))
        if not self.requires_input_grad:
            return None
        return F.conv2d_input(x.shape, weight, grad_output, *self._conv_args(), precision=self.precision)

    def output_shape(self, input_shape):
        n, c, h, w = _shape_check("Conv2d", input_shape, 4, "NCHW")
        if c != self.in_channels:
            raise ValueError(
                f"Conv2d: input has {c} channels, the layer expects {self.in_channels} (input shape {input_shape})"
            )
        out_h, out_w = F.conv2d_output_size((h, w), self.kernel_size, *self._conv_args())
        return n, self.out_channels, out_h, out_w

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        if self.precision is not None:
            text += f", precision={self.precision!r}"
        return text

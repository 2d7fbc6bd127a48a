"""A conv for CPU inference: its weight reordered once for oneDNN, with ReLU and a residual add fused in.

`nn.Conv2d` on the CPU hands its plain weight to oneDNN on every call, which reorders it into the
blocked layout its kernels read, and a ReLU or a residual add after the conv is one more pass over
the activations. `FusedConv2d` keeps the reordered weight from the first call (the same
`mkldnn._reorder_convolution_weight` that inductor's freezing pass uses) and asks oneDNN to apply the
add and the ReLU as post-ops of the conv (`mkldnn._convolution_pointwise`). It is an `nn.Conv2d`
with the same parameters and state dict; only its forward differs:

    y = relu(conv(x) + residual)    (each part optional)

The oneDNN path runs for float32 CPU inputs when no gradient is needed, autocast is off and the
model is not being traced by `torch.compile`; anywhere else (CUDA, half precision, autocast,
training, tracing) the same result comes from `F.conv2d`, `add` and `relu`. The reordered weight is rebuilt when the weight changes
(a new tensor, another device or dtype, or an in-place update), and is never saved.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FusedConv2d", "cpu_kernels_available"]

ACTIVATIONS = (None, "relu")


@functools.cache  # asked on every forward of every conv
def cpu_kernels_available() -> bool:
    """Whether this build of torch has the oneDNN (mkldnn) fused-conv ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class FusedConv2d(nn.Conv2d):
    """`relu(conv(x) + residual)` with a once-reordered weight on the CPU; see the module docstring.

    Build it from a conv with `FusedConv2d.from_conv(conv, activation="relu")`; it shares that conv's
    parameters. `forward(x, residual=None)`: `residual` has the conv output's shape and is added
    before the activation.
    """

    activation: str | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: str | None = None) -> FusedConv2d:
        if type(conv) not in (nn.Conv2d, cls) or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"FusedConv2d takes a plain nn.Conv2d with numeric zero padding, got {conv!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"FusedConv2d activation must be one of {ACTIVATIONS}, got {activation!r}")
        fused = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, device="meta",
        )  # fmt: skip
        fused.weight, fused.bias = conv.weight, conv.bias  # shared, not copied
        fused.train(conv.training)
        fused.activation = activation
        return fused

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: tuple[tuple, Tensor] | None = None

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")

    def __getstate__(self):
        state = super().__getstate__()
        state["_packed"] = None  # an opaque oneDNN tensor: rebuilt on the first call instead of copied
        return state

    def _use_cpu_kernel(self, x: Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.dim() == 4
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.is_autocast_enabled("cpu")  # autocast picks the dtype: leave it to F.conv2d
            and not torch.compiler.is_compiling()
            and cpu_kernels_available()
        )

    def _packed_weight(self, x: Tensor) -> Tensor:
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        if self._packed is None or self._packed[0] != key:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape)
            )
            self._packed = (key, packed)
        return self._packed[1]

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self._use_cpu_kernel(x) and (residual is None or residual.dtype == x.dtype):
            weight = self._packed_weight(x)
            conv_args = (weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *conv_args, self.activation or "none", [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, *conv_args, "add", 1.0, self.activation, [], ""
            )
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            out = out + residual
        return F.relu(out) if self.activation == "relu" else out

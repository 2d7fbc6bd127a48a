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
training, tracing) the same result comes from `F.conv2d`, `add` and `relu`. The reordered weight is
rebuilt when the weight changes (a new tensor, another device or dtype, or an in-place update), and is
never saved.

Both ops are private to torch. Before the first use, `cpu_kernels_available` calls them once on a
tiny input as we call them and compares with `F.conv2d`; if they are missing, take other arguments
or give another result (a new torch), it warns once and every conv takes the public path.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FusedConv2d", "cpu_kernels_available"]

ACTIVATIONS = (None, "relu")


@functools.cache  # asked on every forward of every conv
def cpu_kernels_available() -> bool:
    """Whether this build of torch has the oneDNN (mkldnn) fused-conv ops, and they work as we call them."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    try:
        matches = _check_cpu_kernels()
    except Exception as error:  # a private op whose signature changed: fall back rather than fail a user's run
        matches, why = False, f"{type(error).__name__}: {error}"
    else:
        why = "their results differ from F.conv2d's"
    if not matches:
        warnings.warn(
            f"torch {torch.__version__}: oneDNN's fused conv ops do not work as FusedConv2d calls them ({why}); "
            "using F.conv2d, add and relu instead (correct, about 1.5x slower on the CPU)",
            stacklevel=2,
        )
    return matches


def _check_cpu_kernels() -> bool:
    """Runs both fused calls on a small conv and compares them with conv + relu and conv + add + relu."""
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((1, 4, 7, 7), (8, 4, 3, 3), (8,)))
    geometry = ([1], [2], [1], 1)  # padding, stride, dilation, groups
    with torch.no_grad():
        reference = F.conv2d(x, weight, bias, 2, 1)
        residual = torch.randn(reference.shape, generator=generator)
        packed = _reorder_weight(weight, *geometry, x)
        plain = _fused_conv(x, packed, bias, *geometry, "relu", None)
        added = _fused_conv(x, packed, bias, *geometry, "relu", residual)
    return torch.allclose(plain, reference.relu(), atol=1e-4) and torch.allclose(
        added, (reference + residual).relu(), atol=1e-4
    )


def _reorder_weight(weight: Tensor, padding: list, stride: list, dilation: list, groups: int, x: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight.detach(), padding, stride, dilation, groups, list(x.shape)
    )


def _fused_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: list, stride: list, dilation: list, groups: int,
    activation: str | None, residual: Tensor | None,
) -> Tensor:  # fmt: skip
    """The two private oneDNN calls: `activation(conv(x))` and `activation(conv(x) + residual)`."""
    conv_args = (weight, bias, padding, stride, dilation, groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, *conv_args, activation or "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *conv_args, "add", 1.0, activation, [], "")


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

    def _geometry(self) -> tuple[list, list, list, int]:
        return list(self.padding), list(self.stride), list(self.dilation), self.groups

    def _packed_weight(self, x: Tensor) -> Tensor:
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, _reorder_weight(weight, *self._geometry(), x))
        return self._packed[1]

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self._use_cpu_kernel(x) and (residual is None or residual.dtype == x.dtype):
            weight = self._packed_weight(x)
            return _fused_conv(x, weight, self.bias, *self._geometry(), self.activation, residual)
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            out = out + residual
        return F.relu(out) if self.activation == "relu" else out

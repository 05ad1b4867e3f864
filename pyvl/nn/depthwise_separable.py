"""DepthwiseSeparableConv2d: MobileNetV1's block as a drop-in module over pyvl.ops.

Parameter names follow timm's DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2) so a timm block's state_dict
loads as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._checks import pair
from ..ops.depthwise_conv2d import _check_activation

__all__ = ["DepthwiseSeparableConv2d"]

_ACTIVATIONS = {"none": lambda x: x, "relu": F.relu, "relu6": F.relu6}


class DepthwiseSeparableConv2d(nn.Module):
    """depthwise kxk conv -> BN -> act -> pointwise 1x1 conv -> BN -> act, without bias or skip connection.

    Training (or whenever a batch norm uses batch statistics) runs the unfused path, pyvl.ops.depthwise_conv2d
    and F.conv2d with the two BatchNorm2d modules, so running statistics update as usual. In eval mode both batch
    norms are folded into the convolutions and the block runs as one fused pyvl.ops.dsconv2d.

    The fold is recomputed on every eval forward rather than cached: it costs O(C*k*k + C_out*C) element-wise work,
    small next to the convolution itself, and a cache would go stale silently whenever an optimizer step,
    load_state_dict, .to() or an in-place edit touches the weights or the running statistics.

    Args:
        in_channels, out_channels: C and C_out.
        kernel_size, stride, dilation: of the depthwise conv (int or pair).
        padding: as pyvl.ops.depthwise_conv2d; None pads dilation*(k-1)//2 (PyTorch/timm's symmetric padding).
        activation: "relu6" (default, as timm and TF-slim), "relu" (the paper) or "none"; after both batch norms.
        eps: batch-norm epsilon (timm 1e-5; TF-slim 1e-3).
        backend: passed to the ops (None: PYVL_BACKEND or the fastest).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=None, dilation=1,
                 activation: str = "relu6", eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        kernel_size = pair("kernel_size", kernel_size, minimum=1)
        stride, dilation = pair("stride", stride, minimum=1), pair("dilation", dilation, minimum=1)
        if padding is None:
            padding = (dilation[0] * (kernel_size[0] - 1) // 2, dilation[1] * (kernel_size[1] - 1) // 2)
        self.activation = _check_activation("activation", activation)
        self.backend = backend
        self.stride, self.padding, self.dilation = stride, padding, dilation
        # nn.Conv2d as the parameter holders: timm's key names and PyTorch's default init, and the submodules stay
        # usable on their own; forward reads only their weights.
        self.conv_dw = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation,
                                 groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels, eps=eps)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=eps)

    @property
    def in_channels(self) -> int:
        return self.conv_dw.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv_pw.out_channels

    def _uses_batch_stats(self) -> bool:
        return any(bn.training or bn.running_mean is None or bn.running_var is None for bn in (self.bn1, self.bn2))

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused path (what training runs); in eval mode it uses the running statistics, like the fused one."""
        act = _ACTIVATIONS[self.activation]
        x = ops.depthwise_conv2d(x, self.conv_dw.weight, None, self.stride, self.padding, self.dilation,
                                 backend=self.backend)
        x = act(self.bn1(x))
        return act(self.bn2(F.conv2d(x, self.conv_pw.weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_batch_stats():
            return self.forward_unfused(x)
        dw_weight, dw_bias = ops.fold_batch_norm(self.conv_dw.weight, None, self.bn1)
        pw_weight, pw_bias = ops.fold_batch_norm(self.conv_pw.weight, None, self.bn2)
        return ops.dsconv2d(x, dw_weight, pw_weight, dw_bias, pw_bias, self.stride, self.padding, self.dilation,
                            dw_activation=self.activation, pw_activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, backend={self.backend!r}"

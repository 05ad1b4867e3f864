"""Pure-PyTorch references for the depthwise-separable convolution family.

Simple and obviously right: they are the ground truth for the tests and the `reference` backend. They take
already-validated arguments (pairs for stride / padding / dilation); the public ops in pyvl.ops check inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "relu6")


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(x)
    if activation == "relu6":
        return torch.clamp(x, 0.0, 6.0)
    if activation == "none":
        return x
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def depthwise_conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Depthwise convolution: weight [C, 1, KH, KW] applied per channel of x [N, C, H, W]."""
    return F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=x.shape[1])


def dsconv2d(x, dw_weight, dw_bias, pw_weight, pw_bias, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
             dw_activation="relu", pw_activation="relu"):
    """Depthwise -> bias -> activation -> pointwise 1x1 (pw_weight [C_out, C]) -> bias -> activation."""
    h = activate(depthwise_conv2d(x, dw_weight, dw_bias, stride, padding, dilation), dw_activation)
    y = F.conv2d(h, pw_weight.reshape(pw_weight.shape[0], -1, 1, 1), pw_bias)
    return activate(y, pw_activation)


def fold_batch_norm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps):
    """Fold an eval-mode BatchNorm that follows a convolution into the convolution's weight and bias.

    BN(conv(x) + b) = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta, so the per-output-channel scale
    gamma / sqrt(var + eps) multiplies the weight and the bias becomes (b - mean) * scale + beta.
    """
    scale = (bn_weight if bn_weight is not None else torch.ones_like(running_var)) * torch.rsqrt(running_var + eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    b = bias if bias is not None else torch.zeros_like(running_mean)
    beta = bn_bias if bn_bias is not None else torch.zeros_like(running_mean)
    return weight * scale.reshape(shape), (b - running_mean) * scale + beta

"""MobileNetV1: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", 2017, arXiv:1704.04861.

Layout (paper Table 1): a full 3x3 stride-2 conv to 32 channels, then 13 depthwise-separable blocks
    64 s1, 128 s2, 128, 256 s2, 256, 512 s2, 5 x 512, 1024 s2, 1024 s1,
global average pooling and a linear classifier. Every conv is followed by batch norm and the activation.
The paper's table lists the last depthwise conv as "s2"; that is a typo (the feature map is already 7x7 at 224
and the table's own output size stays 7x7), and TF-slim's mobilenet_v1.py and timm both use stride 1 there.

Width multiplier alpha (`width_mult`): every layer's channels, the stem and the head included, become
make_divisible(c * alpha, 8) as in timm's mobilenetv1_* (timm.models.efficientnet._gen_mobilenet_v1 with
round_channels): round c * alpha to the nearest multiple of 8 (halves up), at least 8, and add 8 more if that
rounding lost over 10% of c * alpha. TF-slim instead uses max(int(c * alpha), 8); the two agree for the paper's
alphas 1, 0.75, 0.5, 0.25 (all channel counts are then multiples of 8) and differ for others (alpha 0.3: timm
gives 16 stem channels where TF-slim gives 9). Resolution multiplier rho: the network is fully convolutional up
to the global pool, so any input size works; feed the reduced-resolution image.

Defaults follow timm (ReLU6, BN eps 1e-5, symmetric padding) so that pyvl.interop.from_timm is a load_state_dict;
the paper uses ReLU (activation="relu") and TF-slim BN eps 1e-3 (eps=1e-3). Parameter names mirror timm's
EfficientNet: conv_stem, bn1, blocks.{stage}.{i}.{conv_dw, bn1, conv_pw, bn2}, [conv_head, bn2,] classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import DepthwiseSeparableConv2d
from ..nn.depthwise_separable import _ACTIVATIONS
from ..ops.depthwise_conv2d import _check_activation

__all__ = ["MobileNetV1", "mobilenet_v1", "round_channels", "STAGES"]

# (out_channels, stride of the first block, number of blocks) per stage; timm's stage grouping, which fixes the
# state_dict keys blocks.{stage}.{i}.
STAGES = ((64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 2, 6), (1024, 2, 2))
STEM_CHANNELS = 32


def round_channels(channels: int, width_mult: float = 1.0, divisor: int = 8) -> int:
    """timm's make_divisible(channels * width_mult, divisor): nearest multiple of divisor, >= divisor, and never
    more than 10% below channels * width_mult."""
    v = channels * width_mult
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * v:
        rounded += divisor
    return rounded


class MobileNetV1(nn.Module):
    """MobileNetV1 from explicit widths; mobilenet_v1() computes them from the paper's table and alpha.

    Args:
        stem_channels: output channels of the 3x3 stride-2 stem conv.
        stages: per stage, (out_channels, first block's stride, number of blocks).
        num_classes: classifier outputs; 0 leaves the pooled features (classifier = Identity), as timm.
        head_channels: if given, a 1x1 conv + BN + act to this many channels before the pool (timm's
            mobilenetv1_100h); not in the paper.
        activation: "relu6", "relu" or "none".
        eps: batch-norm epsilon.
        drop_rate: dropout before the classifier (timm's drop_rate; TF-slim keeps 0.999).
        in_chans: input channels.
        backend: passed to the depthwise-separable blocks' ops.
    """

    def __init__(self, stem_channels: int = STEM_CHANNELS, stages=STAGES, num_classes: int = 1000,
                 head_channels: int | None = None, activation: str = "relu6", eps: float = 1e-5,
                 drop_rate: float = 0.0, in_chans: int = 3, backend: str | None = None):
        super().__init__()
        self.activation = _check_activation("activation", activation)
        self.drop_rate = drop_rate
        self.conv_stem = nn.Conv2d(in_chans, stem_channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels, eps=eps)
        channels = stem_channels
        blocks = []
        for out_channels, stride, depth in stages:
            stage = []
            for i in range(depth):
                stage.append(DepthwiseSeparableConv2d(channels, out_channels, 3, stride if i == 0 else 1,
                                                      activation=activation, eps=eps, backend=backend))
                channels = out_channels
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)
        if head_channels:
            self.conv_head = nn.Conv2d(channels, head_channels, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(head_channels, eps=eps)
            channels = head_channels
        else:
            self.conv_head = self.bn2 = None
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        # TF-slim draws convs from a truncated normal (std 0.09); He init, as torchvision's MobileNets, trains the
        # same architecture from scratch without tuning that constant.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _runs_fused(self) -> bool:
        """True when every block runs the fused dsconv2d (eval mode, running statistics): see the blocks."""
        return not any(b._uses_batch_stats() for b in self.blocks.modules()
                       if isinstance(b, DepthwiseSeparableConv2d))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        fused = self._runs_fused()
        if fused and x.device.type == "cpu" and x.dim() == 4:
            # The fused block's C++ kernel runs channels_last 1.5-1.9x faster than NCHW on MobileNet's layers (its
            # pointwise GEMM then writes whole pixel rows, and its strips run across images), so on the CPU the
            # eval forward converts the input image once (3 channels: the cheapest tensor to convert) and every
            # layer after it runs channels_last. The logits do not depend on the layout.
            x = x.contiguous(memory_format=torch.channels_last)
        if fused and not (self.bn1.training or self.bn1.running_mean is None or self.bn1.running_var is None):
            # The stem's batch norm folded into its conv, as the blocks do (BN over 32 x 112 x 112 cost more than
            # the conv itself at batch 8 on the CPU).
            w, b = ops.fold_batch_norm(self.conv_stem.weight, None, self.bn1)
            x = act(F.conv2d(x, w, b, self.conv_stem.stride, self.conv_stem.padding))
        else:
            x = act(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        if self.conv_head is not None:
            x = act(self.bn2(self.conv_head(x)))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def mobilenet_v1(width_mult: float = 1.0, num_classes: int = 1000, activation: str = "relu6", *,
                 head_conv: bool = False, eps: float = 1e-5, drop_rate: float = 0.0, in_chans: int = 3,
                 backend: str | None = None) -> MobileNetV1:
    """MobileNetV1 with width multiplier alpha = width_mult (channels rounded as timm's, see the module docstring).

    width_mult 1.0 has 4,231,976 parameters (timm's mobilenetv1_100; the paper's 4.2M); 1.25 is timm's
    mobilenetv1_125. head_conv=True adds timm's 1x1 head conv to max(1024, round(1024 * alpha)) channels
    (mobilenetv1_100h).
    """
    if not width_mult > 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    stages = tuple((round_channels(c, width_mult), s, n) for c, s, n in STAGES)
    head_channels = max(1024, round_channels(1024, width_mult)) if head_conv else None
    return MobileNetV1(round_channels(STEM_CHANNELS, width_mult), stages, num_classes, head_channels, activation,
                       eps, drop_rate, in_chans, backend)

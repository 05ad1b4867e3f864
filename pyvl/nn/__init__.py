"""Drop-in nn.Modules that only call pyvl.ops."""
from .depthwise_separable import DepthwiseSeparableConv2d
from .window_attention import ContinuousPositionBias, WindowAttention, WindowAttention3D, WindowAttentionV2

__all__ = ["ContinuousPositionBias", "DepthwiseSeparableConv2d", "WindowAttention", "WindowAttention3D",
           "WindowAttentionV2"]

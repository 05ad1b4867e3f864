"""Drop-in nn.Modules that only call pyvl.ops."""
from .depthwise_separable import DepthwiseSeparableConv2d

__all__ = ["DepthwiseSeparableConv2d"]

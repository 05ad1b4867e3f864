"""One model per paper, built on pyvl.nn and pyvl.ops."""
from .clip import CLIP, ZeroShotClassifier, create_clip, zero_shot_weights
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .swin import (SwinTransformer, swin_b, swin_l, swin_s, swin_t, swin_v2_b, swin_v2_s, swin_v2_t)
from .video_swin import VideoSwinTransformer, video_swin_b, video_swin_s, video_swin_t

__all__ = ["MobileNetV1", "mobilenet_v1", "SwinTransformer", "swin_t", "swin_s", "swin_b", "swin_l", "swin_v2_t",
           "swin_v2_s", "swin_v2_b", "VideoSwinTransformer", "video_swin_t", "video_swin_s", "video_swin_b",
           "CLIP", "ZeroShotClassifier", "create_clip", "zero_shot_weights"]
from .graphormer import Graphormer, graphormer_base, graphormer_slim  # noqa: E402

__all__ += ["Graphormer", "graphormer_base", "graphormer_slim"]

"""One model per paper, built on pyvl.nn and pyvl.ops."""
from .mobilenet_v1 import MobileNetV1, mobilenet_v1

__all__ = ["MobileNetV1", "mobilenet_v1"]
from .clip import CLIP, ZeroShotClassifier, create_clip, zero_shot_weights  # noqa: E402

__all__ += ["CLIP", "ZeroShotClassifier", "create_clip", "zero_shot_weights"]

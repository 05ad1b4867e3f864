"""One model per paper, built on pyvl.nn and pyvl.ops."""
from .clip import CLIP, ZeroShotClassifier, create_clip, zero_shot_weights
from .coop import CoOp, PromptLearner, load_coop_checkpoint, train_coop
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .swin import (SwinTransformer, swin_b, swin_l, swin_s, swin_t, swin_v2_b, swin_v2_s, swin_v2_t)
from .video_swin import VideoSwinTransformer, video_swin_b, video_swin_s, video_swin_t

__all__ = ["MobileNetV1", "mobilenet_v1", "SwinTransformer", "swin_t", "swin_s", "swin_b", "swin_l", "swin_v2_t",
           "swin_v2_s", "swin_v2_b", "VideoSwinTransformer", "video_swin_t", "video_swin_s", "video_swin_b",
           "CLIP", "ZeroShotClassifier", "create_clip", "zero_shot_weights"]
from .probvlm import ProbAdapter, ProbVLM  # noqa: E402
__all__ += ["ProbAdapter", "ProbVLM"]
from .stylegan2 import Generator as StyleGAN2Generator  # noqa: E402
from .styleclip import LatentOptimizer, LevelsMapper, optimize_latent  # noqa: E402

__all__ += ["StyleGAN2Generator", "LatentOptimizer", "LevelsMapper", "optimize_latent"]
from .pretrain_gnn import GNN, GNNGraphPred  # noqa: E402
__all__ += ["GNN", "GNNGraphPred"]
__all__ += ["CoOp", "PromptLearner", "load_coop_checkpoint", "train_coop"]

"""One model per paper, built on pyvl.nn and pyvl.ops."""
from .clip import CLIP, ZeroShotClassifier, create_clip, zero_shot_weights
from .coop import CoOp, PromptLearner, load_coop_checkpoint, train_coop
from .graphormer import Graphormer, graphormer_base, graphormer_slim
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .pretrain_gnn import GNN, GNNGraphPred
from .probvlm import ProbAdapter, ProbVLM
from .styleclip import LatentOptimizer, LevelsMapper, optimize_latent
from .stylegan2 import Generator as StyleGAN2Generator
from .swin import (SwinTransformer, swin_b, swin_l, swin_s, swin_t, swin_v2_b, swin_v2_s, swin_v2_t)
from .video_swin import VideoSwinTransformer, video_swin_b, video_swin_s, video_swin_t

__all__ = [
    # MobileNetV1
    "MobileNetV1", "mobilenet_v1",
    # Swin, Swin V2, Video Swin
    "SwinTransformer", "swin_t", "swin_s", "swin_b", "swin_l", "swin_v2_t", "swin_v2_s", "swin_v2_b",
    "VideoSwinTransformer", "video_swin_t", "video_swin_s", "video_swin_b",
    # CLIP and the papers on top of it
    "CLIP", "ZeroShotClassifier", "create_clip", "zero_shot_weights",
    "CoOp", "PromptLearner", "load_coop_checkpoint", "train_coop",
    "ProbAdapter", "ProbVLM",
    "StyleGAN2Generator", "LatentOptimizer", "LevelsMapper", "optimize_latent",
    # graphs
    "Graphormer", "graphormer_base", "graphormer_slim", "GNN", "GNNGraphPred",
]

"""Video Swin Transformer on pyvl.nn's 3D window attention.

Paper: Ze Liu, Jia Ning, Yue Cao, Yixuan Wei, Zheng Zhang, Stephen Lin, Han Hu, "Video Swin Transformer",
CVPR 2022, arXiv:2106.13230.

Architecture: a 2x4x4 patch embedding (Conv3d, the input zero-padded to a multiple of the patch, LayerNorm), four
stages of pre-norm blocks with 3D windows P x M x M (8 x 7 x 7) and 3D relative position bias table
(2P-1)(2M-1)(2M-1), odd blocks shifted by window // 2 in all three dims, a 2x2 spatial patch merging (time is not
merged) before every stage but the first, a final LayerNorm, global average pooling over T, H, W and a linear head.

Peer mirrored: torchvision.models.video.swin_transformer (0.29), which follows the official Video Swin code: on
every forward, where the input is no larger than the window (size <= window) the window shrinks to the input and
that dim's shift becomes 0; sizes the window does not divide are padded (zero tokens, whose key and value are the
qkv bias) before the roll. With a shrunk window both take the bias from the full window's relative position index
cut to [:N, :N] (N the shrunk window's volume), which does not hold the shrunk window's own relative positions;
pyvl reproduces that (WindowAttention3D with shrink_to_input=True).

State_dict keys: patch_embed.{proj,norm}, layers.{i}.downsample.{norm,reduction}, layers.{i}.blocks.{j}.{norm1,
attn.{qkv,proj,relative_position_bias_table},norm2,mlp.fc1,mlp.fc2}, norm, head.fc (pyvl.interop.from_torchvision
renames torchvision's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.window_attention import WindowAttention3D
from ..ops.window_attention import _per_dim
from .swin import ClassifierHead, PatchMerging, SwinBlock, SwinStage, drop_path_rates

__all__ = ["VideoSwinTransformer", "video_swin_t", "video_swin_s", "video_swin_b"]


class VideoSwinTransformer(nn.Module):
    """Video Swin Transformer classifier.

    Args:
        embed_dim, depths, num_heads: as Swin.
        window_size: (P, M, M), default (8, 7, 7).
        patch_size: (2, 4, 4) by default.
        in_chans, num_classes (400, Kinetics-400; 0: pooled features), mlp_ratio, qkv_bias.
        drop_rate (after the patch embedding, as torchvision's pos_drop, and before the head), proj_drop_rate,
            drop_path_rate (0 by default; torchvision trains with 0.1-0.3).
        eps: LayerNorm epsilon.
        backend: passed to pyvl.ops.window_attention.
    Input (B, in_chans, T, H, W), any sizes; output (B, num_classes).
    """

    def __init__(self, embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=(8, 7, 7),
                 *, patch_size=(2, 4, 4), in_chans: int = 3, num_classes: int = 400, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths and num_heads must have one entry per stage, got {depths} and {num_heads}")
        window = _per_dim("window_size", window_size, 3, 1)
        self.patch_size = _per_dim("patch_size", patch_size, 3, 1)
        self.num_classes, self.backend = num_classes, backend
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(in_chans, embed_dim, self.patch_size, self.patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = iter(drop_path_rates(drop_path_rate, depths))
        shifted = tuple(w // 2 for w in window)
        layers = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2 ** i
            blocks = [SwinBlock(dim, WindowAttention3D(dim, heads, window, shifted if j % 2 else 0, qkv_bias=qkv_bias,
                                                       proj_drop=proj_drop_rate, backend=backend),
                                mlp_ratio=mlp_ratio, drop_path=next(rates), proj_drop=proj_drop_rate, eps=eps)
                      for j in range(depth)]
            layers.append(SwinStage(PatchMerging(dim // 2, dim, eps=eps) if i > 0 else None, blocks))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(self.num_features, eps=eps)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, T, H, W) -> (B, T', H', W', num_features) after the final norm."""
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, T, H, W), got shape {tuple(x.shape)}")
        pad = [(-s) % p for s, p in zip(x.shape[2:], self.patch_size)]
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 4, 1))
        return self.norm(self.layers(self.pos_drop(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


_SIZES = {"t": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
          "b": (128, (2, 2, 18, 2), (4, 8, 16, 32))}


def video_swin_t(**kwargs) -> VideoSwinTransformer:
    """Swin-T for video (torchvision swin3d_t): C=96, depths (2, 2, 6, 2), window 8x7x7, patch 2x4x4."""
    return VideoSwinTransformer(*_SIZES["t"], **kwargs)


def video_swin_s(**kwargs) -> VideoSwinTransformer:
    """Swin-S for video (torchvision swin3d_s): C=96, depths (2, 2, 18, 2)."""
    return VideoSwinTransformer(*_SIZES["s"], **kwargs)


def video_swin_b(**kwargs) -> VideoSwinTransformer:
    """Swin-B for video (torchvision swin3d_b): C=128, depths (2, 2, 18, 2), heads (4, 8, 16, 32)."""
    return VideoSwinTransformer(*_SIZES["b"], **kwargs)

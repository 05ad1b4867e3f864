"""Swin Transformer and Swin Transformer V2 on pyvl.nn's window attention.

Papers:
- Ze Liu, Yutong Lin, Yue Cao, Han Hu, Yixuan Wei, Zheng Zhang, Stephen Lin, Baining Guo, "Swin Transformer:
  Hierarchical Vision Transformer using Shifted Windows", ICCV 2021, arXiv:2103.14030.
- Ze Liu, Han Hu, Yutong Lin, Zhuliang Yao, Zhenda Xie, Yixuan Wei, Jia Ning, Yue Cao, Zheng Zhang, Li Dong, Furu
  Wei, Baining Guo, "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022, arXiv:2111.09883.

Architecture: a 4x4 patch embedding (stride-4 conv, LayerNorm), four stages of blocks at 1/4, 1/8, 1/16, 1/32 of the
input, a 2x2 patch merging (concat 4C -> Linear to 2C) before every stage but the first, a final LayerNorm, global
average pooling and a linear head. Blocks alternate regular windows (W-MSA) and windows shifted by window // 2
(SW-MSA). V1 blocks are pre-norm: x + attn(norm1(x)), x + mlp(norm2(x)); V2 blocks are res-post-norm:
x + norm1(attn(x)), x + norm2(mlp(x)), with scaled cosine attention (per-head logit scale clamped at log 100),
the log-spaced continuous position bias (CPB MLP) and a patch merging that normalizes after the reduction. Swin V2's
"sequential self-attention" is a memory-saving execution of the same attention (the paper gives no algorithm and
the official code has none); it is not a model option here.

Peers mirrored (`flavor`), whose semantics differ where an input size is not a multiple of the window or is smaller:
- flavor="torchvision" (torchvision.models.swin_transformer, 0.29): windows never shrink; a feature map is padded to a
  multiple of the window and then rolled (pad_first=True), and a dim's shift is dropped where the window covers the
  padded size; V2's qkv has one bias (qkv.bias) whose k third is zeroed on every forward; CPB coordinates are
  normalized by the window itself (no pretrained window size).
- flavor="timm" (timm.models.swin_transformer / swin_transformer_v2, 1.0): each stage's window shrinks to the
  stage's resolution where that is no larger than the window, and the shift is then 0; that resolution comes from
  `img_size` at construction, as in timm (the model still accepts any input size, like timm's dynamic_img_size);
  the feature map is rolled and then padded (pad_first=False); V2 has q_bias / v_bias (zero k bias) and supports
  pretrained_window_sizes.
Both: padding tokens are zero tokens (their key and value are the qkv bias) and are not masked; the shift mask adds
-100; LayerNorm eps 1e-5; stochastic depth grows linearly from 0 to drop_path_rate over all blocks.

State_dict keys follow timm (patch_embed.{proj,norm}, layers.{i}.downsample.{reduction,norm},
layers.{i}.blocks.{j}.{norm1,attn.*,norm2,mlp.fc1,mlp.fc2}, norm, head.fc), so pyvl.interop.from_timm is a
load_state_dict and from_torchvision renames keys.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..nn.window_attention import WindowAttention, WindowAttentionV2
from ..ops._checks import pair

__all__ = ["SwinTransformer", "swin_t", "swin_s", "swin_b", "swin_l", "swin_v2_t", "swin_v2_s", "swin_v2_b",
           "stage_windows"]

FLAVORS = ("torchvision", "timm")


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p and scale the rest by
    1 / (1 - p) (torchvision's StochasticDepth "row", timm's DropPath)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 - GELU - dropout - fc2 - dropout (timm's Mlp names)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop)
        self.fc2, self.drop2 = nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchMerging(nn.Module):
    """2x2 patch merging over the last two spatial dims of (..., H, W, C): odd sizes are zero-padded, the four
    neighbours concatenated in the order (0,0), (1,0), (0,1), (1,1) (row, column offsets, as every peer), then
    Linear(4C, out, bias=False). V1 normalizes the 4C input (norm_after=False), V2 the output (norm_after=True)."""

    def __init__(self, dim: int, out_dim: int | None = None, *, norm_after: bool = False, eps: float = 1e-5):
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.norm_after = norm_after
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim if norm_after else 4 * dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-3], x.shape[-2]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.norm(self.reduction(x)) if self.norm_after else self.reduction(self.norm(x))


class SwinBlock(nn.Module):
    """One Swin block over (B, *S, C) tokens; `attn` is a pyvl.nn window attention module.

    post_norm=False (V1, Video Swin): x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)));
    post_norm=True (V2): x + drop_path(norm1(attn(x))), then x + drop_path(norm2(mlp(x))).
    """

    def __init__(self, dim: int, attn: nn.Module, *, mlp_ratio: float = 4.0, post_norm: bool = False,
                 drop_path: float = 0.0, proj_drop: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.drop_path1(self.norm1(self.attn(x)))
            return x + self.drop_path2(self.norm2(self.mlp(x)))
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Optional patch merging (downsample) followed by the stage's blocks."""

    def __init__(self, downsample: nn.Module | None, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """Global average pool over every spatial dim of (B, *S, C), dropout, Linear (Identity for 0 classes)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean(dim=tuple(range(1, x.dim() - 1)))))


def drop_path_rates(drop_path_rate: float, depths) -> list[float]:
    """Linear from 0 to drop_path_rate over all blocks (torchvision and timm)."""
    total = sum(depths)
    return [drop_path_rate * i / max(total - 1, 1) for i in range(total)]


def _per_stage(name: str, value, stages: int) -> list[tuple[int, int]]:
    """An int or (h, w) for every stage, or a list with one int or (h, w) per stage (a list of two ints is one
    (h, w), as timm reads it)."""
    if isinstance(value, (tuple, list)) and len(value) == stages and not (
            len(value) == 2 and all(isinstance(v, int) for v in value)):
        return [pair(name, v, minimum=0) for v in value]
    return [pair(name, value, minimum=0)] * stages


def stage_windows(flavor: str, windows, depths, img_size=None, patch_size=(4, 4)):
    """Per stage: (window, (shift of even blocks, shift of odd blocks)) as the flavor's peer sets them.

    torchvision: the windows as given, odd blocks shifted by window // 2. timm: stage i runs at
    ceil(img_size // patch / 2^i); where that is no larger than the window, the window shrinks to it and the
    shift is 0.
    """
    out = []
    grid = None
    if flavor == "timm":
        grid = tuple(s // p for s, p in zip(pair("img_size", img_size, minimum=1), patch_size))
    for i, window in enumerate(windows):
        shift = tuple(w // 2 for w in window)
        if flavor == "timm":
            res = tuple(-(-g // 2 ** i) for g in grid)
            shift = tuple(0 if r <= w else s for r, w, s in zip(res, window, shift))
            window = tuple(min(r, w) for r, w in zip(res, window))
        out.append((window, ((0, 0), shift)))
    return out


class SwinTransformer(nn.Module):
    """Swin Transformer (version=1) or Swin Transformer V2 (version=2) image classifier.

    Args:
        embed_dim: channels of the first stage (doubled at every patch merging).
        depths, num_heads: blocks and heads per stage.
        window_size: int or (h, w) for all stages, or one per stage.
        version: 1 (Swin) or 2 (Swin V2).
        flavor: "torchvision" or "timm": whose semantics to follow where they differ (see the module docstring).
        img_size: (timm flavor only) the input size the windows are shrunk for, as timm's img_size.
        patch_size, in_chans, num_classes (0: pooled features), mlp_ratio, qkv_bias.
        pretrained_window_sizes: (V2, timm flavor) per stage or one for all, the CPB coordinates' normalizer.
        drop_rate (before the head), proj_drop_rate, drop_path_rate (stochastic depth; 0 by default here, the
            peers' default training values are 0.1-0.5).
        eps: LayerNorm epsilon.
        backend: passed to pyvl.ops.window_attention.
    Input (B, in_chans, H, W), any H, W >= patch_size; output (B, num_classes).
    """

    def __init__(self, embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, *,
                 version: int = 1, flavor: str = "torchvision", img_size=224, patch_size=4, in_chans: int = 3,
                 num_classes: int = 1000, mlp_ratio: float = 4.0, qkv_bias: bool = True, pretrained_window_sizes=0,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"version must be 1 (Swin) or 2 (Swin V2), got {version!r}")
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths and num_heads must have one entry per stage, got {depths} and {num_heads}")
        stages = len(depths)
        pretrained = _per_stage("pretrained_window_sizes", pretrained_window_sizes, stages)
        if flavor == "torchvision" and any(max(p) > 0 for p in pretrained):
            raise ValueError("pretrained_window_sizes needs flavor='timm' (torchvision has no pretrained window size)")
        self.version, self.flavor, self.backend = version, flavor, backend
        self.patch_size = pair("patch_size", patch_size, minimum=1)
        self.img_size = pair("img_size", img_size, minimum=1) if flavor == "timm" else None
        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (stages - 1)
        geometry = stage_windows(flavor, _per_stage("window_size", window_size, stages), depths, self.img_size,
                                 self.patch_size)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim, eps=eps)
        rates = iter(drop_path_rates(drop_path_rate, depths))
        layers = []
        for i, (depth, heads, (window, shifts)) in enumerate(zip(depths, num_heads, geometry)):
            dim = embed_dim * 2 ** i
            blocks = []
            for j in range(depth):
                shift = shifts[j % 2]
                if version == 1:
                    attn = WindowAttention(dim, heads, window, shift, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                                           pad_first=flavor == "torchvision", backend=backend)
                else:
                    bias = ("fused" if flavor == "torchvision" else "split") if qkv_bias else False
                    attn = WindowAttentionV2(dim, heads, window, shift, qkv_bias=bias, proj_drop=proj_drop_rate,
                                             pretrained_window_size=pretrained[i], pad_first=flavor == "torchvision",
                                             backend=backend)
                blocks.append(SwinBlock(dim, attn, mlp_ratio=mlp_ratio, post_norm=version == 2,
                                        drop_path=next(rates), proj_drop=proj_drop_rate, eps=eps))
            down = PatchMerging(dim // 2, dim, norm_after=version == 2, eps=eps) if i > 0 else None
            layers.append(SwinStage(down, blocks))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(self.num_features, eps=eps)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # The peers' init: Linear weights trunc-normal std 0.02, biases 0; V2's res-post-norm LayerNorms start
        # from the usual (1, 0) in torchvision and from (0, 0) in timm.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.version == 2 and self.flavor == "timm":
            for stage in self.layers:
                for block in stage.blocks:
                    for norm in (block.norm1, block.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, H / 32, W / 32, num_features) after the final norm."""
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] < self.patch_size[0] or x.shape[-1] < self.patch_size[1]:
            raise ValueError(f"x must be at least the patch size {self.patch_size}, got {tuple(x.shape[-2:])}")
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))
        return self.norm(self.layers(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# Configurations of the papers' Table 7 (V1) and the torchvision / timm V2 models (window 8 at 256px).
_V1 = {"t": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
       "b": (128, (2, 2, 18, 2), (4, 8, 16, 32)), "l": (192, (2, 2, 18, 2), (6, 12, 24, 48))}


def _build(size: str, version: int, window: int, kwargs) -> SwinTransformer:
    embed_dim, depths, heads = _V1[size]
    kwargs.setdefault("window_size", window)
    if version == 2 and kwargs.get("flavor") == "timm":
        kwargs.setdefault("img_size", 256)
    return SwinTransformer(embed_dim, depths, heads, version=version, **kwargs)


def swin_t(**kwargs) -> SwinTransformer:
    """Swin-T: C=96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7 (28.3M parameters)."""
    return _build("t", 1, 7, kwargs)


def swin_s(**kwargs) -> SwinTransformer:
    """Swin-S: C=96, depths (2, 2, 18, 2), heads (3, 6, 12, 24), window 7."""
    return _build("s", 1, 7, kwargs)


def swin_b(**kwargs) -> SwinTransformer:
    """Swin-B: C=128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 7."""
    return _build("b", 1, 7, kwargs)


def swin_l(**kwargs) -> SwinTransformer:
    """Swin-L: C=192, depths (2, 2, 18, 2), heads (6, 12, 24, 48), window 7."""
    return _build("l", 1, 7, kwargs)


def swin_v2_t(**kwargs) -> SwinTransformer:
    """SwinV2-T: C=96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 8 (torchvision swin_v2_t, timm
    swinv2_tiny_window8_256)."""
    return _build("t", 2, 8, kwargs)


def swin_v2_s(**kwargs) -> SwinTransformer:
    """SwinV2-S: C=96, depths (2, 2, 18, 2), heads (3, 6, 12, 24), window 8."""
    return _build("s", 2, 8, kwargs)


def swin_v2_b(**kwargs) -> SwinTransformer:
    """SwinV2-B: C=128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 8."""
    return _build("b", 2, 8, kwargs)

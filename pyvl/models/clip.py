"""CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021,
arXiv:2103.00020.

Follows OpenAI's released code (github.com/openai/CLIP, clip/model.py) and open_clip's port of it
(github.com/mlfoundations/open_clip, src/open_clip/model.py, transformer.py, modified_resnet.py,
zero_shot_classifier.py), whose parameter names it keeps so that `pyvl.interop.from_open_clip` is a
load_state_dict:

- Image encoder, Vision Transformer (paper section 2.4): a stride-p conv patch embedding `conv1` without bias, a
  learned `class_embedding` prepended, a learned `positional_embedding`, the extra LayerNorm `ln_pre` the paper adds
  before the transformer, pre-LN residual attention blocks (`transformer.resblocks.N.{ln_1, attn, ln_2, mlp}`),
  `ln_post` on the class token and the projection `proj` (a [width, embed_dim] matrix, no bias).
- Image encoder, ModifiedResNet (section 2.4): a 3-conv stem (3x3 convs to width/2, width/2, width; the first with
  stride 2) followed by a 2x2 average pool instead of a max pool; bottleneck blocks made anti-aliased (Zhang 2019)
  by an average pool before the stride-2 step (after conv2 in the main path, before the 1x1 conv in the
  downsample path, whose conv has stride 1); and attention pooling in place of global average pooling: one
  multi-head attention whose query is the mean-pooled feature and whose keys/values are that mean plus the spatial
  features, all with a learned positional embedding, then the output projection `c_proj` to embed_dim. Only the
  mean token's query is computed: the other queries' outputs are discarded by OpenAI/open_clip (`x[0]`), so the
  result is the same.
- Text encoder (section 2.4): token embedding, learned positional embedding, a causal (masked) pre-LN transformer,
  `ln_final`, the features at the [EOS] token (found, as in OpenAI/open_clip, as the position of the largest token
  id, the EOT token being the last id of the vocabulary) and the projection `text_projection` (no bias).
- `logit_scale` is initialised to log(1/0.07) (section 2.5: "initialized to the equivalent of 0.07").
- MLPs use GELU (open_clip's default) or QuickGELU, x * sigmoid(1.702 x), with which OpenAI trained its models
  (`quick_gelu=True`, open_clip's *-quickgelu configs).
- `CLIP.forward(image, text)` returns what open_clip's CLIP.forward returns (output_dict=False):
  (normalized image features, normalized text features, logit_scale.exp()); with output_dict=True the dict
  {"image_features", "text_features", "logit_scale"}. Either input may be None (its features are then None).
- Zero-shot classification with prompt ensembling (section 3.1.4): every class name is put into every template,
  the prompts encoded and L2-normalized, averaged over templates and renormalized (open_clip's
  build_zero_shot_classifier; the paper: "we construct the ensemble over the embedding space ... cache a single set
  of averaged text embeddings"); an image's logits are scale * cos(image, class embedding) with scale 100 as in
  OpenAI's and open_clip's zero-shot evaluation, or the model's logit_scale.exp().

Cosine logits (the zero-shot classifier and `CLIP.get_logits`) come from pyvl.ops.similarity_logits (normalize +
matmul + scale in one pass). Attention is plain PyTorch (F.scaled_dot_product_attention) for now.

Where pyvl differs from open_clip (results equal up to rounding): open_clip builds the text/vision attention with
nn.MultiheadAttention and an additive -inf causal mask buffer; pyvl calls F.scaled_dot_product_attention with
is_causal=True and has no mask buffer (open_clip's is non-persistent, so the state_dicts agree). Text may be shorter
than context_length (positions beyond it are never attended to by the causal EOT token, so trailing padding can be
cut); open_clip requires exactly context_length tokens.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIP", "VisionConfig", "TextConfig", "CONFIGS", "create_clip", "VisionTransformer", "ModifiedResNet",
           "AttentionPool2d", "QuickGELU", "tokenize", "zero_shot_weights",
           "ZeroShotClassifier"]


@dataclass(frozen=True)
class VisionConfig:
    """The image tower, as open_clip's CLIPVisionCfg: `layers` an int builds a ViT, a 4-tuple a ModifiedResNet.

    heads = width // head_width for the ViT and width * 32 // head_width for the ResNet (open_clip's rule).
    """
    layers: int | tuple[int, int, int, int] = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int | tuple[int, int] | None = 16
    image_size: int | tuple[int, int] = 224


@dataclass(frozen=True)
class TextConfig:
    """The text tower, as open_clip's CLIPTextCfg."""
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


# open_clip's model_configs/*.json (the -quickgelu variants are these with quick_gelu=True).
CONFIGS = {
    "ViT-B-32": dict(embed_dim=512, vision_cfg=VisionConfig(12, 768, patch_size=32), text_cfg=TextConfig()),
    "ViT-B-16": dict(embed_dim=512, vision_cfg=VisionConfig(12, 768, patch_size=16), text_cfg=TextConfig()),
    "ViT-L-14": dict(embed_dim=768, vision_cfg=VisionConfig(24, 1024, patch_size=14),
                     text_cfg=TextConfig(width=768, heads=12)),
    "RN50": dict(embed_dim=1024, vision_cfg=VisionConfig((3, 4, 6, 3), 64, patch_size=None), text_cfg=TextConfig()),
    "RN101": dict(embed_dim=512, vision_cfg=VisionConfig((3, 4, 23, 3), 64, patch_size=None), text_cfg=TextConfig()),
}


def _pair(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return tuple(value)
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _positive(value, name):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _as_config(cfg, cls, name):
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"{name} has keys {unknown} that pyvl's CLIP does not support; known: {sorted(known)}")
        return cls(**cfg)
    raise TypeError(f"{name} must be a {cls.__name__} or a dict, got {type(cfg).__name__}")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 for half-precision inputs and cast back (open_clip's LayerNormFp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            weight = self.weight.float() if self.weight is not None else None
            bias = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        return super().forward(x)


def _attend(q, k, v, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head attention of [B, Nq, C] queries over [B, Nk, C] keys/values -> [B, Nq, C]."""
    B, Nq, C = q.shape
    q = q.view(B, Nq, heads, C // heads).transpose(1, 2)
    k = k.view(B, k.shape[1], heads, C // heads).transpose(1, 2)
    v = v.view(B, v.shape[1], heads, C // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(B, Nq, C)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameters (in_proj_weight/bias, out_proj)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_attend(q, k, v, self.heads, causal))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with mlp = c_fc -> act -> c_proj."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act_layer: Callable[[], nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()), ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act_layer):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal)
        return x


def _check_image(x, dtype, size, name="image"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != tuple(size):
        raise ValueError(f"{name} must be [batch, 3, {size[0]}, {size[1]}] (the model's image_size), "
                         f"got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the image encoder's weights are {dtype}")


class VisionTransformer(nn.Module):
    """CLIP's ViT image encoder; keys as open_clip's VisionTransformer."""

    def __init__(self, image_size, patch_size, width: int, layers: int, heads: int, mlp_ratio: float,
                 output_dim: int, act_layer=nn.GELU):
        super().__init__()
        self.image_size = _pair(image_size, "image_size")
        self.patch_size = _pair(patch_size, "patch_size")
        if any(i % p for i, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        self.grid_size = tuple(i // p for i, p in zip(self.image_size, self.patch_size))
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, self.patch_size, self.patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.conv1.weight.dtype, self.image_size)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck, anti-aliased: the stride is an average pool (after conv2; before the downsample conv)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # "-1" keeps OpenAI's key numbering: the conv and BN of the shortcut are downsample.0 / downsample.1.
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean token attends over [mean, spatial tokens] (+ positional embedding)."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"feature width {embed_dim} must be divisible by the number of heads {num_heads}")
        self.spatial_dim = spatial_dim
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        out = _attend(self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.c_proj(out[:, 0])


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image encoder; keys as open_clip's ModifiedResNet."""

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, image_size: int = 224, width: int = 64):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give the number of blocks of the 4 stages, got {layers!r}")
        image_size = _pair(image_size, "image_size")
        if image_size[0] != image_size[1] or image_size[0] % 32:
            raise ValueError(f"ModifiedResNet needs a square image_size divisible by 32, got {image_size}")
        self.image_size = image_size
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = AttentionPool2d(image_size[0] // 32, width * 32, heads, output_dim)
        # open_clip's (and OpenAI's) initialisation.
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for name, param in self.named_parameters():
            if name.startswith("layer") and name.endswith("bn3.weight"):
                nn.init.zeros_(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.conv1.weight.dtype, self.image_size)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.act3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


def _init_text(model, width: int, layers: int):
    """open_clip's TextTransformer.init_parameters (OpenAI's initialisation)."""
    nn.init.normal_(model.token_embedding.weight, std=0.02)
    nn.init.normal_(model.positional_embedding, std=0.01)
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    for block in model.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(model.text_projection, std=width ** -0.5)


class CLIP(nn.Module):
    """CLIP with open_clip's constructor and state_dict keys.

    Args:
        embed_dim: the joint embedding width.
        vision_cfg: VisionConfig or a dict of its fields (open_clip's model_configs/*.json "vision_cfg" for the
            OpenAI-style models): `layers` an int builds a VisionTransformer, a 4-tuple a ModifiedResNet.
        text_cfg: TextConfig or a dict of its fields. Keys pyvl does not support raise a ValueError.
        quick_gelu: QuickGELU in the transformers' MLPs (OpenAI's trained models) instead of GELU.
        init_logit_scale: initial log of the logit scale, log(1/0.07) as in the paper.
        output_dict: forward returns a dict instead of a tuple (as open_clip's flag).
    """

    def __init__(self, embed_dim: int, vision_cfg=None, text_cfg=None, quick_gelu: bool = False,
                 init_logit_scale: float = math.log(1 / 0.07), output_dict: bool = False):
        super().__init__()
        _positive(embed_dim, "embed_dim")
        vision_cfg = _as_config(VisionConfig() if vision_cfg is None else vision_cfg, VisionConfig, "vision_cfg")
        text_cfg = _as_config(TextConfig() if text_cfg is None else text_cfg, TextConfig, "text_cfg")
        self.vision_cfg, self.text_cfg, self.quick_gelu = vision_cfg, text_cfg, bool(quick_gelu)
        self.embed_dim = embed_dim
        self.output_dict = output_dict
        act_layer = QuickGELU if quick_gelu else nn.GELU

        _positive(vision_cfg.width, "vision_cfg.width")
        _positive(vision_cfg.head_width, "vision_cfg.head_width")
        if isinstance(vision_cfg.layers, (tuple, list)):
            self.visual = ModifiedResNet(tuple(vision_cfg.layers), embed_dim,
                                         vision_cfg.width * 32 // vision_cfg.head_width,
                                         vision_cfg.image_size, vision_cfg.width)
        else:
            _positive(vision_cfg.layers, "vision_cfg.layers")
            if vision_cfg.patch_size is None:
                raise ValueError("vision_cfg.patch_size must be given for a Vision Transformer (int layers)")
            self.visual = VisionTransformer(vision_cfg.image_size, vision_cfg.patch_size, vision_cfg.width,
                                            vision_cfg.layers, vision_cfg.width // vision_cfg.head_width,
                                            vision_cfg.mlp_ratio, embed_dim, act_layer)

        for name in ("context_length", "vocab_size", "width", "heads", "layers"):
            _positive(getattr(text_cfg, name), f"text_cfg.{name}")
        self.context_length = text_cfg.context_length
        self.vocab_size = text_cfg.vocab_size
        self.transformer = Transformer(text_cfg.width, text_cfg.layers, text_cfg.heads, text_cfg.mlp_ratio, act_layer)
        self.token_embedding = nn.Embedding(text_cfg.vocab_size, text_cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(text_cfg.context_length, text_cfg.width))
        self.ln_final = LayerNorm(text_cfg.width)
        self.text_projection = nn.Parameter(torch.empty(text_cfg.width, embed_dim))
        _init_text(self, text_cfg.width, text_cfg.layers)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, embed_dim] features (L2-normalized if `normalize`)."""
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, L] token ids (L <= context_length, EOT the largest id of each row) -> [B, embed_dim] features."""
        if not isinstance(text, torch.Tensor) or text.is_floating_point() or text.is_complex() \
                or text.dtype == torch.bool:
            raise TypeError(f"text must be an integer tensor of token ids, got "
                            f"{text.dtype if isinstance(text, torch.Tensor) else type(text).__name__}")
        if text.dim() != 2 or not 0 < text.shape[1] <= self.context_length:
            raise ValueError(f"text must be [batch, L] with 0 < L <= context_length {self.context_length}, got "
                             f"{tuple(text.shape)}")
        return self.encode_text_embeddings(self.token_embedding(text), text, normalize=normalize)

    def encode_text_embeddings(self, embeddings: torch.Tensor, text: torch.Tensor,
                               normalize: bool = False) -> torch.Tensor:
        """[B, L, width] token embeddings (what token_embedding gives, or learned prompt vectors in their place,
        as CoOp feeds them) -> [B, embed_dim] features, pooled at text.argmax(-1) of the [B, L] token ids (the EOT
        position, as CLIP does). encode_text(text) is encode_text_embeddings(token_embedding(text), text)."""
        width = self.token_embedding.weight.shape[1]
        if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be a floating-point tensor, got "
                            f"{embeddings.dtype if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__}")
        if embeddings.dim() != 3 or embeddings.shape[2] != width or \
                not 0 < embeddings.shape[1] <= self.context_length:
            raise ValueError(f"embeddings must be [batch, L, {width}] with 0 < L <= context_length "
                             f"{self.context_length}, got {tuple(embeddings.shape)}")
        if not isinstance(text, torch.Tensor) or tuple(text.shape) != tuple(embeddings.shape[:2]):
            raise ValueError(f"text must be the [batch, L] = {tuple(embeddings.shape[:2])} token ids of the embeddings "
                             f"(their argmax marks the EOT position), got "
                             f"{tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__}")
        dtype = self.token_embedding.weight.dtype
        x = embeddings.to(dtype) + self.positional_embedding[: embeddings.shape[1]].to(dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def get_logits(self, image: torch.Tensor, text: torch.Tensor):
        """(image_logits [B_img, B_txt], text_logits = its transpose): logit_scale.exp() * cosine similarity."""
        logits = _cosine_logits(self.encode_image(image), self.encode_text(text), self.logit_scale.exp())
        return logits, logits.T

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.output_dict:
            return {"image_features": image_features, "text_features": text_features,
                    "logit_scale": self.logit_scale.exp()}
        return image_features, text_features, self.logit_scale.exp()


def create_clip(name: str, quick_gelu: bool = False, **kwargs) -> CLIP:
    """A randomly initialised CLIP of one of open_clip's configurations (CONFIGS: ViT-B-32, ViT-B-16, ViT-L-14,
    RN50, RN101); a "-quickgelu" suffix sets quick_gelu as open_clip's names do."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    base = name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name
    if base not in CONFIGS:
        raise ValueError(f"name must be one of {sorted(CONFIGS)} (optionally with -quickgelu), got {name!r}")
    return CLIP(**CONFIGS[base], quick_gelu=quick_gelu or base != name, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and zero-shot classification


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """[len(texts), context_length] token ids from CLIP's byte-pair tokenizer (open_clip's SimpleTokenizer, whose
    vocabulary ships in its wheel): [SOT] tokens [EOT] then zeros, truncated to context_length with EOT kept last.

    Needs open_clip: `pip install open_clip_torch`.
    """
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise ImportError("pyvl.models.clip.tokenize uses open_clip's CLIP tokenizer: "
                          "pip install open_clip_torch") from e
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a str or a sequence of str")
    _positive(context_length, "context_length")
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER(list(texts), context_length=context_length)


_TOKENIZER = None


def _cosine_logits(a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """scale * cos(a_i, b_j) from pyvl.ops.similarity_logits (batched similarity logits family); scale a float
    or a one-element tensor, which then gets a gradient."""
    from .. import ops

    similarity_logits = getattr(ops, "similarity_logits", None)
    if similarity_logits is None:
        raise NotImplementedError(
            "CLIP's cosine logits (CLIP.get_logits, the zero-shot classifier) call pyvl.ops.similarity_logits, "
            "the batched similarity-logits op, which this pyvl does not have yet (it lands with the contrastive "
            "op family); encode_image / encode_text / forward work without it")
    return similarity_logits(a, b, scale=scale, bias=None, normalize=True)


def _format(template, classname: str) -> str:
    return template.format(classname) if isinstance(template, str) else template(classname)


def zero_shot_weights(model: CLIP, classnames: Sequence[str], templates: Sequence, tokenizer=None,
                      classes_per_batch: int | None = 10) -> torch.Tensor:
    """[num_classes, embed_dim] class embeddings with prompt ensembling (paper section 3.1.4).

    Each class name goes into every template (a str with "{}" or a callable), the prompts are encoded and
    L2-normalized, averaged over the templates and renormalized. `tokenizer` (default: tokenize) maps a list of
    strings to token ids; `classes_per_batch` bounds how many classes' prompts are encoded at once (None: all).
    Note the orientation: open_clip's build_zero_shot_classifier returns the transpose, [embed_dim, num_classes].
    """
    if isinstance(classnames, str) or not isinstance(classnames, Sequence) or len(classnames) == 0:
        raise ValueError("classnames must be a non-empty sequence of str")
    if isinstance(templates, str) or not isinstance(templates, Sequence) or len(templates) == 0:
        raise ValueError("templates must be a non-empty sequence of format strings or callables")
    if not all(isinstance(t, str) or callable(t) for t in templates):
        raise TypeError("templates must be format strings (with '{}') or callables classname -> str")
    if classes_per_batch is not None:
        _positive(classes_per_batch, "classes_per_batch")
    tokenizer = tokenize if tokenizer is None else tokenizer
    step = classes_per_batch or len(classnames)
    device = model.logit_scale.device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(classnames), step):
            batch = classnames[start:start + step]
            prompts = [_format(t, c) for c in batch for t in templates]
            features = model.encode_text(tokenizer(prompts).to(device), normalize=True)
            mean = features.view(len(batch), len(templates), -1).mean(dim=1)
            chunks.append(F.normalize(mean, dim=-1))
    return torch.cat(chunks)


class ZeroShotClassifier(nn.Module):
    """Zero-shot image classifier: logits = logit_scale * cos(image features, class embeddings).

    Args:
        model: a CLIP.
        classnames, templates, tokenizer, classes_per_batch: as zero_shot_weights.
        logit_scale: the multiplier of the cosine similarities, 100 as in OpenAI's and open_clip's zero-shot
            evaluation; None uses the model's logit_scale.exp() (about 100 for trained models).
    """

    def __init__(self, model: CLIP, classnames: Sequence[str], templates: Sequence, tokenizer=None,
                 classes_per_batch: int | None = 10, logit_scale: float | None = 100.0):
        super().__init__()
        if not isinstance(model, CLIP):
            raise TypeError(f"model must be a pyvl CLIP, got {type(model).__name__}")
        if logit_scale is not None and not (isinstance(logit_scale, (int, float)) and logit_scale > 0):
            raise ValueError(f"logit_scale must be a positive number or None, got {logit_scale!r}")
        self.model = model
        self.classnames = list(classnames)
        self.register_buffer("class_embeddings",
                             zero_shot_weights(model, classnames, templates, tokenizer, classes_per_batch))
        self.logit_scale = logit_scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, num_classes] logits."""
        scale = self.model.logit_scale.exp() if self.logit_scale is None else float(self.logit_scale)
        features = self.model.encode_image(image)
        return _cosine_logits(features, self.class_embeddings.to(features.dtype), scale)

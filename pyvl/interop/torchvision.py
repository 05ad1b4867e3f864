"""from_torchvision: a torchvision model in, the pyvl model of the same paper out, carrying its weights.

Supported: torchvision.models.SwinTransformer (swin_t/s/b, swin_v2_t/s/b and any configuration built from its
constructor with the default blocks, norm and downsample layers) and torchvision.models.video.SwinTransformer3d
(swin3d_t/s/b). The configuration is read off the model and every difference pyvl cannot reproduce is refused with
a ValueError naming it; the state_dict is renamed to pyvl's keys (timm's layout) and loaded strictly.

torchvision is imported only inside the converters; pyvl itself does not depend on it.
"""
from __future__ import annotations

import re

from torch import nn

from .timm import _build_uninitialized, _describe, _load, _Unsupported

__all__ = ["from_torchvision"]

_SUPPORTED = ("torchvision.models.SwinTransformer (swin_t, swin_s, swin_b, swin_v2_t, swin_v2_s, swin_v2_b) and "
              "torchvision.models.video.SwinTransformer3d (swin3d_t, swin3d_s, swin3d_b)")


def _stages(features, is_3d: bool):
    """(stages as lists of blocks, patch-merging modules) from torchvision's `features` Sequential."""
    first = 0 if is_3d else 1  # the 2D model's features[0] is the patch embedding
    stages = [list(features[i]) for i in range(first, len(features), 2)]
    merges = [features[i] for i in range(first + 1, len(features), 2)]
    return stages, merges


def _check_layer_norm(norm, where, eps):
    if type(norm) is not nn.LayerNorm or not norm.elementwise_affine or norm.eps != eps:
        raise _Unsupported(f"{where} is {norm!r}; pyvl needs an affine LayerNorm with the stem's eps {eps}")


def _swin_config(model, is_3d: bool) -> dict:
    from torchvision.models.swin_transformer import (PatchMerging, PatchMergingV2, ShiftedWindowAttention,
                                                     ShiftedWindowAttentionV2, SwinTransformerBlockV2)

    if is_3d:
        from torchvision.models.video.swin_transformer import PatchEmbed3d, ShiftedWindowAttention3d

        if type(model.patch_embed) is not PatchEmbed3d:
            raise _Unsupported(f"patch_embed is {type(model.patch_embed).__name__}, not PatchEmbed3d")
        conv, stem_norm = model.patch_embed.proj, model.patch_embed.norm
    else:
        stem = model.features[0]
        conv, stem_norm = stem[0], stem[2]
    eps = stem_norm.eps
    _check_layer_norm(stem_norm, "the patch embedding's norm", eps)
    if conv.kernel_size != conv.stride or conv.padding != (0,) * len(conv.padding) or conv.bias is None:
        raise _Unsupported(f"the patch embedding conv {conv!r} is not a patch_size-stride conv with bias")
    stages, merges = _stages(model.features, is_3d)
    embed_dim = conv.out_channels
    first = stages[0][0]
    version = 2 if isinstance(first, SwinTransformerBlockV2) else 1
    attn_types = {1: ShiftedWindowAttention3d if is_3d else ShiftedWindowAttention, 2: ShiftedWindowAttentionV2}
    merge_type = PatchMergingV2 if version == 2 else PatchMerging
    window = list(first.attn.window_size)
    depths, heads, rates = [], [], []
    for i, blocks in enumerate(stages):
        dim = embed_dim * 2 ** i
        depths.append(len(blocks))
        heads.append(blocks[0].attn.num_heads)
        for j, block in enumerate(blocks):
            where = f"stage {i} block {j}"
            if type(block.attn) is not attn_types[version]:
                raise _Unsupported(f"{where} has attention {type(block.attn).__name__}")
            if list(block.attn.window_size) != window:
                raise _Unsupported(f"{where} has window {block.attn.window_size}, the first block's is {window}")
            if list(block.attn.shift_size) != [0 if j % 2 == 0 else w // 2 for w in window]:
                raise _Unsupported(f"{where} has shift {block.attn.shift_size}; pyvl shifts odd blocks by window // 2")
            if block.attn.attention_dropout:
                raise _Unsupported(f"{where} has attention dropout {block.attn.attention_dropout}; pyvl has none")
            if block.attn.num_heads != heads[-1] or block.attn.qkv.in_features != dim:
                raise _Unsupported(f"{where} has {block.attn.num_heads} heads and {block.attn.qkv.in_features} "
                                   f"channels; expected {heads[-1]} and {dim}")
            if block.attn.proj.bias is None:
                raise _Unsupported(f"{where} has no output projection bias")
            for name in ("norm1", "norm2"):
                _check_layer_norm(getattr(block, name), f"{where}.{name}", eps)
            mlp = block.mlp
            if len(mlp) != 5 or type(mlp[1]) is not nn.GELU or mlp[1].approximate != "none":
                raise _Unsupported(f"{where}.mlp is not Linear - GELU - Dropout - Linear - Dropout")
            rates.append(block.stochastic_depth.p)
        if i > 0:
            merge = merges[i - 1]
            if type(merge) is not merge_type:
                raise _Unsupported(f"the patch merging before stage {i} is {type(merge).__name__}")
            _check_layer_norm(merge.norm, f"the patch merging before stage {i}", eps)
    _check_layer_norm(model.norm, "the final norm", eps)
    mlp = stages[0][0].mlp
    config = dict(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads),
                  window_size=tuple(window), patch_size=tuple(conv.kernel_size), in_chans=conv.in_channels,
                  num_classes=model.head.out_features, mlp_ratio=mlp[0].out_features / embed_dim,
                  qkv_bias=first.attn.qkv.bias is not None, proj_drop_rate=float(first.attn.dropout),
                  drop_path_rate=float(rates[-1]), eps=eps)
    if is_3d:
        config["drop_rate"] = float(model.pos_drop.p)
    else:
        config.update(version=version, flavor="torchvision")
    return config


def _rename(key: str, is_3d: bool) -> str | None:
    """torchvision's state_dict key -> pyvl's (None: a buffer pyvl recomputes)."""
    if key.endswith(("relative_position_index", "relative_coords_table")):
        return None
    if key.startswith("head."):
        return "head.fc." + key[5:]
    if not is_3d:
        key = re.sub(r"^features\.0\.0\.", "patch_embed.proj.", key)
        key = re.sub(r"^features\.0\.2\.", "patch_embed.norm.", key)
    m = re.match(r"^features\.(\d+)\.(.*)$", key)
    if m:
        f, rest = int(m.group(1)), m.group(2)
        index = f if not is_3d else f + 1  # features index with the 2D model's stem counted
        if index % 2 == 1:  # a stage's blocks
            rest = re.sub(r"^(\d+)\.mlp\.0\.", r"\1.mlp.fc1.", rest)
            rest = re.sub(r"^(\d+)\.mlp\.3\.", r"\1.mlp.fc2.", rest)
            return f"layers.{index // 2}.blocks.{rest}"
        return f"layers.{index // 2}.downsample.{rest}"
    return key


def from_torchvision(model: nn.Module) -> nn.Module:
    """The pyvl model equivalent to the torchvision model `model`, carrying its weights, in its mode and dtype.

    Raises TypeError for a non-module and ValueError, naming what differs, for a model pyvl cannot reproduce.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_torchvision supports {_SUPPORTED}; got {_describe(model)}")
    name = type(model).__name__
    if not type(model).__module__.startswith("torchvision.") or name not in ("SwinTransformer", "SwinTransformer3d"):
        raise ValueError(f"from_torchvision supports {_SUPPORTED}; got {_describe(model)}")
    is_3d = name == "SwinTransformer3d"
    try:
        config = _swin_config(model, is_3d)
    except (_Unsupported, AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"from_torchvision supports {_SUPPORTED}; got {_describe(model)} whose {e}") from None
    if is_3d:
        from ..models.video_swin import VideoSwinTransformer as cls
    else:
        from ..models.swin import SwinTransformer as cls
    state = {}
    for key, value in model.state_dict().items():
        new = _rename(key, is_3d)
        if new is not None:
            state[new] = value
    return _load(_build_uninitialized(cls, config), model, state)

"""from_timm: a timm model in, the pyvl model of the same paper out, with the same weights.

Converters live in a registry keyed by family name: each has a cheap `matches(model)` that recognizes its family
and a `convert(model)` that checks the exact structure and refuses, naming the difference, whatever pyvl's model
cannot reproduce. Swin / Swin V2 converters register the same way (register_timm_converter).

timm is imported only inside the converters; pyvl itself does not depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["from_timm", "register_timm_converter", "timm_architecture"]


@dataclass(frozen=True)
class _Converter:
    name: str
    matches: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module], nn.Module]
    supported: str


_CONVERTERS: dict[str, _Converter] = {}


def register_timm_converter(name: str, matches: Callable[[nn.Module], bool], supported: str):
    """Decorator: register `convert(timm_model) -> pyvl model` for the models `matches` accepts.

    `supported` names the variants it takes, for from_timm's error message.
    """
    def decorator(convert):
        _CONVERTERS[name] = _Converter(name, matches, convert, supported)
        return convert

    return decorator


def timm_architecture(model: nn.Module) -> str | None:
    """timm's architecture name of a model (e.g. 'mobilenetv1_100'), from its pretrained_cfg, or None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def _describe(model) -> str:
    arch = timm_architecture(model) if isinstance(model, nn.Module) else None
    return f"{type(model).__name__}" + (f" (architecture {arch!r})" if arch else "")


def _supported() -> str:
    return "; ".join(f"{c.name} ({c.supported})" for c in _CONVERTERS.values())


def from_timm(model: nn.Module) -> nn.Module:
    """The pyvl model equivalent to the timm model `model`, carrying its weights, in the same mode and dtype.

    Raises TypeError for a non-module and ValueError, naming what differs, for a model no converter supports.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_timm supports timm models (torch.nn.Module): {_supported()}; got {_describe(model)}")
    for converter in _CONVERTERS.values():
        if converter.matches(model):
            return converter.convert(model)
    raise ValueError(f"from_timm supports {_supported()}; got {_describe(model)}")


def _build_uninitialized(cls, config: dict) -> nn.Module:
    """cls(**config) without running its weight init (every parameter is about to be loaded): built on the meta
    device, then given real storage; non-persistent buffers are recomputed by the modules that own them
    (init_non_persistent_buffers). Saves the init of large models (seconds for Swin-B)."""
    with torch.device("meta"):
        model = cls(**config)
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "init_non_persistent_buffers"):
            m.init_non_persistent_buffers()
    return model


def _load(pyvl_model: nn.Module, model: nn.Module, state_dict: dict | None = None) -> nn.Module:
    """pyvl_model on model's device and dtype, loaded strictly with state_dict (default: model's), in model's mode."""
    param = next(model.parameters(), None)
    if param is not None:
        pyvl_model.to(device=param.device, dtype=param.dtype)
    pyvl_model.load_state_dict(model.state_dict() if state_dict is None else state_dict, strict=True)
    return pyvl_model.train(model.training)


# ----------------------------------------------------------------------------------------------------------------
# MobileNetV1: timm builds it as an EfficientNet of 'dsa' DepthwiseSeparableConv blocks (_gen_mobilenet_v1).

_MOBILENET_V1_SUPPORTED = ("mobilenetv1_100, mobilenetv1_100h, mobilenetv1_125 and any _gen_mobilenet_v1 width "
                           "with ReLU/ReLU6, 3x3 symmetric padding and depth multiplier 1")


def _is_mobilenet_v1(model: nn.Module) -> bool:
    arch = timm_architecture(model)
    if arch is not None:
        return arch.startswith("mobilenetv1")
    # Built without a pretrained_cfg: recognize timm's layout, an EfficientNet made only of DepthwiseSeparableConv.
    blocks = getattr(model, "blocks", None)
    return (type(model).__name__ == "EfficientNet" and isinstance(blocks, nn.Sequential) and len(blocks) > 0
            and all(type(b).__name__ == "DepthwiseSeparableConv" for stage in blocks for b in stage))


class _Unsupported(ValueError):
    pass


def _activation_of(norm_act, where) -> str:
    act = getattr(norm_act, "act", None)
    for cls, name in ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.Identity, "none")):
        if type(act) is cls:
            return name
    raise _Unsupported(f"{where} uses activation {type(act).__name__}; pyvl supports ReLU, ReLU6 or none")


def _check_conv(conv, where, kernel, stride, groups):
    if type(conv) is not nn.Conv2d:
        raise _Unsupported(f"{where} is {type(conv).__name__} (e.g. TF 'same' padding); pyvl needs a plain Conv2d")
    pad = (kernel - 1) // 2
    got = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias is None)
    want = ((kernel, kernel), (stride, stride), (pad, pad), (1, 1), groups, True)
    if got != want:
        raise _Unsupported(f"{where} has (kernel, stride, padding, dilation, groups, no bias) {got}, expected {want}")


def _check_norm(bn, where, eps):
    if not isinstance(bn, nn.BatchNorm2d) or not bn.affine or not bn.track_running_stats:
        raise _Unsupported(f"{where} is {type(bn).__name__}; pyvl needs an affine BatchNorm2d with running stats")
    if bn.eps != eps:
        raise _Unsupported(f"{where} has eps {bn.eps}, the stem's is {eps}; pyvl uses one eps throughout")
    if type(getattr(bn, "drop", nn.Identity())) is not nn.Identity:
        raise _Unsupported(f"{where} has a dropout/drop-block inside the norm")


def _mobilenet_v1_config(model) -> dict:
    """MobileNetV1's constructor arguments read off timm's model, refusing anything that differs in structure."""
    from ..models.mobilenet_v1 import STAGES

    _check_conv(model.conv_stem, "conv_stem", 3, 2, 1)
    eps = model.bn1.eps
    _check_norm(model.bn1, "bn1", eps)
    activation = _activation_of(model.bn1, "bn1")
    depths = tuple(len(stage) for stage in model.blocks)
    if depths != tuple(n for _, _, n in STAGES):
        raise _Unsupported(f"stage depths {depths}, the paper's are {tuple(n for _, _, n in STAGES)} "
                           "(a depth multiplier other than 1)")
    stages = []
    for s, (stage, (_, stride, _)) in enumerate(zip(model.blocks, STAGES)):
        for i, block in enumerate(stage):
            where = f"blocks.{s}.{i}"
            if type(block).__name__ != "DepthwiseSeparableConv":
                raise _Unsupported(f"{where} is {type(block).__name__}, not DepthwiseSeparableConv")
            if block.has_skip or not block.has_pw_act or getattr(block, "conv_s2d", None) is not None:
                raise _Unsupported(f"{where} has a skip connection, no pointwise activation or a space-to-depth "
                                   "stem; MobileNetV1's block has none of these")
            for extra in ("aa", "se"):
                if type(getattr(block, extra, nn.Identity())) is not nn.Identity:
                    raise _Unsupported(f"{where}.{extra} is {type(getattr(block, extra)).__name__}, not Identity")
            _check_conv(block.conv_dw, f"{where}.conv_dw", 3, stride if i == 0 else 1, block.conv_dw.in_channels)
            _check_conv(block.conv_pw, f"{where}.conv_pw", 1, 1, 1)
            for bn_name in ("bn1", "bn2"):
                bn = getattr(block, bn_name)
                _check_norm(bn, f"{where}.{bn_name}", eps)
                if _activation_of(bn, f"{where}.{bn_name}") != activation:
                    raise _Unsupported(f"{where}.{bn_name} has a different activation from the stem's")
        stages.append((stage[0].conv_pw.out_channels, stride, len(stage)))
    head_channels = None
    if type(model.conv_head) is not nn.Identity:
        _check_conv(model.conv_head, "conv_head", 1, 1, 1)
        _check_norm(model.bn2, "bn2", eps)
        if _activation_of(model.bn2, "bn2") != activation:
            raise _Unsupported("bn2 has a different activation from the stem's")
        head_channels = model.conv_head.out_channels
    elif type(model.bn2) is not nn.Identity:
        raise _Unsupported(f"bn2 is {type(model.bn2).__name__} without a conv_head")
    pool = model.global_pool
    if getattr(pool, "pool_type", None) != "avg" or type(getattr(pool, "flatten", None)) is not nn.Flatten:
        raise _Unsupported(f"global_pool is {pool!r}; pyvl averages over all positions")
    if type(model.classifier) is nn.Linear:
        num_classes = model.classifier.out_features
    elif type(model.classifier) is nn.Identity:
        num_classes = 0
    else:
        raise _Unsupported(f"classifier is {type(model.classifier).__name__}, not Linear or Identity")
    return dict(stem_channels=model.conv_stem.out_channels, stages=tuple(stages), num_classes=num_classes,
                head_channels=head_channels, activation=activation, eps=eps, drop_rate=float(model.drop_rate),
                in_chans=model.conv_stem.in_channels)


@register_timm_converter("mobilenetv1", _is_mobilenet_v1, _MOBILENET_V1_SUPPORTED)
def _convert_mobilenet_v1(model: nn.Module) -> nn.Module:
    from ..models.mobilenet_v1 import MobileNetV1

    try:
        config = _mobilenet_v1_config(model)
    except _Unsupported as e:
        raise ValueError(f"from_timm supports timm's mobilenetv1 ({_MOBILENET_V1_SUPPORTED}); got "
                         f"{_describe(model)} whose {e}") from None
    except AttributeError as e:  # named mobilenetv1 but not laid out like timm's EfficientNet
        raise ValueError(f"from_timm supports timm's mobilenetv1 ({_MOBILENET_V1_SUPPORTED}); got "
                         f"{_describe(model)} without timm's EfficientNet layout ({e})") from None
    return _load(MobileNetV1(**config), model)


# ----------------------------------------------------------------------------------------------------------------
# Swin and Swin V2: timm.models.swin_transformer.SwinTransformer and swin_transformer_v2.SwinTransformerV2.

_SWIN_SUPPORTED = ("swin_* and swinv2_* (SwinTransformer / SwinTransformerV2: GELU, LayerNorm, average pooling, "
                   "head_dim = dim / heads, windows shrunk to the stage resolution as timm does by default, "
                   "no attention dropout)")
_SWIN_CLASSES = {"SwinTransformer": ("timm.models.swin_transformer", 1),
                 "SwinTransformerV2": ("timm.models.swin_transformer_v2", 2)}


def _is_swin(model: nn.Module) -> bool:
    entry = _SWIN_CLASSES.get(type(model).__name__)
    return entry is not None and type(model).__module__ == entry[0]


def _is_exact_gelu(act: nn.Module) -> bool:
    """torch's nn.GELU() or timm's GELU (F.gelu without approximation)."""
    if type(act) is nn.GELU:
        return act.approximate == "none"
    return type(act).__name__ == "GELU" and type(act).__module__ == "timm.layers.activations"


def _swin_config(model, version: int) -> dict:
    from ..models.swin import stage_windows

    embed = model.patch_embed
    conv = embed.proj
    if type(conv) is not nn.Conv2d or conv.kernel_size != conv.stride or conv.padding != (0, 0):
        raise _Unsupported(f"patch_embed.proj is {conv!r}, not a patch_size-stride conv")
    if getattr(embed, "dynamic_img_pad", False) or type(embed.norm) is not nn.LayerNorm:
        raise _Unsupported("patch_embed pads dynamically or has no LayerNorm")
    eps = embed.norm.eps
    embed_dim = conv.out_channels
    depths, heads, windows, pretrained, rates = [], [], [], [], []
    for i, stage in enumerate(model.layers):
        dim = embed_dim * 2 ** i
        blocks = list(stage.blocks)
        depths.append(len(blocks))
        heads.append(blocks[0].attn.num_heads)
        windows.append(tuple(blocks[0].window_size))
        if version == 2:
            pretrained.append(tuple(blocks[0].attn.pretrained_window_size))
        if (i > 0) != (type(stage.downsample) is not nn.Identity):
            raise _Unsupported(f"layers.{i}.downsample is {type(stage.downsample).__name__}")
        if i > 0 and (type(stage.downsample.norm) is not nn.LayerNorm or stage.downsample.out_dim != dim):
            raise _Unsupported(f"layers.{i}.downsample has a {type(stage.downsample.norm).__name__} norm or "
                               f"{stage.downsample.out_dim} output channels (expected LayerNorm, {dim})")
        for j, block in enumerate(blocks):
            where = f"layers.{i}.blocks.{j}"
            attn = block.attn
            if block.always_partition:
                raise _Unsupported(f"{where} has always_partition=True")
            if attn.qkv.out_features != 3 * dim or attn.num_heads != heads[-1]:
                raise _Unsupported(f"{where}.attn has head_dim * heads != dim or a different head count")
            if attn.attn_drop.p:
                raise _Unsupported(f"{where}.attn has attention dropout {attn.attn_drop.p}; pyvl has none")
            if not _is_exact_gelu(block.mlp.act) or type(block.mlp.norm) is not nn.Identity:
                raise _Unsupported(f"{where}.mlp is not fc1 - GELU - fc2")
            for name in ("norm1", "norm2"):
                norm = getattr(block, name)
                if type(norm) is not nn.LayerNorm or norm.eps != eps:
                    raise _Unsupported(f"{where}.{name} is {norm!r}, not LayerNorm(eps={eps})")
            rates.append(float(getattr(block.drop_path1, "drop_prob", 0.0)))
    if getattr(model.head, "pool_type", "avg") != "avg" or model.global_pool != "avg":
        raise _Unsupported(f"global_pool is {model.global_pool!r}; pyvl averages")
    fc = model.head.fc
    num_classes = fc.out_features if type(fc) is nn.Linear else 0
    first = model.layers[0].blocks[0]
    config = dict(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=windows,
                  version=version, flavor="timm", img_size=tuple(embed.img_size), patch_size=tuple(conv.kernel_size),
                  in_chans=conv.in_channels, num_classes=num_classes,
                  mlp_ratio=first.mlp.fc1.out_features / embed_dim,
                  qkv_bias=(first.attn.q_bias is not None) if version == 2 else (first.attn.qkv.bias is not None),
                  drop_rate=float(model.head.drop.p), proj_drop_rate=float(first.attn.proj_drop.p),
                  drop_path_rate=rates[-1], eps=eps)
    if version == 2:
        config["pretrained_window_sizes"] = pretrained
    # pyvl recomputes each block's window and shift from img_size; they must come out as timm's.
    for i, (window, shifts) in enumerate(stage_windows("timm", windows, depths, config["img_size"],
                                                       config["patch_size"])):
        for j, block in enumerate(model.layers[i].blocks):
            if (tuple(block.window_size), tuple(block.shift_size)) != (window, shifts[j % 2]):
                raise _Unsupported(f"layers.{i}.blocks.{j} has window {block.window_size} and shift "
                                   f"{block.shift_size}, not the {window} and {shifts[j % 2]} its resolution gives")
    return config


@register_timm_converter("swin", _is_swin, _SWIN_SUPPORTED)
def _convert_swin(model: nn.Module) -> nn.Module:
    from ..models.swin import SwinTransformer

    try:
        config = _swin_config(model, _SWIN_CLASSES[type(model).__name__][1])
    except _Unsupported as e:
        raise ValueError(f"from_timm supports timm's {_SWIN_SUPPORTED}; got {_describe(model)} whose {e}") from None
    except (AttributeError, IndexError) as e:
        raise ValueError(f"from_timm supports timm's {_SWIN_SUPPORTED}; got {_describe(model)} without timm's "
                         f"Swin layout ({e})") from None
    return _load(_build_uninitialized(SwinTransformer, config), model)

"""from_open_clip: an open_clip CLIP in, pyvl's CLIP (pyvl.models.clip) out, with the same weights.

Supports open_clip's `CLIP` class with its own towers: a VisionTransformer or a ModifiedResNet image encoder and
the built-in causal text transformer, as built by open_clip.create_model for the OpenAI-style configs (ViT-B-32,
ViT-B-16, ViT-L-14, RN50, RN101, ... and their -quickgelu variants) or by open_clip.CLIP(embed_dim, vision_cfg,
text_cfg). The configuration is read off the modules, every feature pyvl's CLIP does not reproduce is refused with
a ValueError naming it (layer scale, patch dropout, attentional pooling, custom attention blocks, a logit bias, a
text pooling other than argmax, ...), and the state_dict is loaded strictly.

open_clip is imported only here; pyvl itself does not depend on it.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["from_open_clip"]

_SUPPORTED = ("open_clip.CLIP with a VisionTransformer or ModifiedResNet image tower and the built-in text "
              "transformer (e.g. ViT-B-32, ViT-B-16, ViT-L-14, RN50, RN101 and their -quickgelu variants)")


class _Unsupported(ValueError):
    pass


def _activation(module, where) -> bool:
    """True for QuickGELU, False for exact GELU; refuses anything else."""
    from open_clip.transformer import QuickGELU

    if type(module) is QuickGELU:
        return True
    if type(module) is nn.GELU and module.approximate == "none":
        return False
    raise _Unsupported(f"{where} is {module!r}; pyvl's CLIP supports QuickGELU or nn.GELU()")


def _check_norm(norm, where, width):
    if not isinstance(norm, nn.LayerNorm) or norm.normalized_shape != (width,) or norm.eps != 1e-5 \
            or not norm.elementwise_affine or norm.bias is None:
        raise _Unsupported(f"{where} is {norm!r}; pyvl's CLIP uses an affine LayerNorm({width}, eps=1e-5)")


def _check_transformer(transformer, where, width) -> tuple[int, int, float, bool]:
    """(layers, heads, mlp_ratio, quick_gelu) of an open_clip Transformer of default ResidualAttentionBlocks."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = transformer.resblocks
    if len(blocks) == 0:
        raise _Unsupported(f"{where} has no blocks")
    heads = mlp_width = quick = None
    for i, block in enumerate(blocks):
        at = f"{where}.resblocks.{i}"
        if type(block) is not ResidualAttentionBlock:
            raise _Unsupported(f"{at} is {type(block).__name__} (custom block: qk_norm, scaled cosine attention, "
                               "scale_heads, ...); pyvl supports open_clip's default ResidualAttentionBlock")
        for name in ("ls_1", "ls_2"):
            if type(getattr(block, name)) is not nn.Identity:
                raise _Unsupported(f"{at}.{name} is a layer scale (ls_init_value); pyvl's CLIP has none")
        if hasattr(block, "ln_1_kv"):
            raise _Unsupported(f"{at} is a cross-attention block")
        _check_norm(block.ln_1, f"{at}.ln_1", width)
        _check_norm(block.ln_2, f"{at}.ln_2", width)
        attn = block.attn
        if (attn.embed_dim != width or attn.in_proj_weight is None or attn.in_proj_bias is None
                or attn.bias_k is not None or attn.add_zero_attn or attn.dropout != 0.0 or not attn.batch_first):
            raise _Unsupported(f"{at}.attn is {attn!r} with (separate projections, no bias, bias_k, add_zero_attn, "
                               "dropout or not batch_first); pyvl needs a plain batch-first MultiheadAttention")
        fc, act, proj = block.mlp.c_fc, block.mlp.gelu, block.mlp.c_proj
        q = _activation(act, f"{at}.mlp.gelu")
        if (heads, mlp_width, quick) != (None, None, None) and (attn.num_heads, fc.out_features, q) != \
                (heads, mlp_width, quick):
            raise _Unsupported(f"{at} differs from block 0 in heads, MLP width or activation")
        heads, mlp_width, quick = attn.num_heads, fc.out_features, q
        if fc.bias is None or proj.bias is None or fc.in_features != width or proj.out_features != width:
            raise _Unsupported(f"{at}.mlp is not Linear({width}, h) -> act -> Linear(h, {width}) with biases")
    if getattr(transformer, "batch_first", True) is not True:
        raise _Unsupported(f"{where} is not batch-first")
    return len(blocks), heads, mlp_width / width, quick


def _vit_config(visual):
    width = visual.conv1.out_channels
    conv = visual.conv1
    if conv.in_channels != 3 or conv.bias is not None or conv.kernel_size != conv.stride or conv.padding != (0, 0):
        raise _Unsupported(f"visual.conv1 is {conv!r}; CLIP's patch embedding is a bias-free conv with stride = "
                           "kernel = patch_size")
    if getattr(visual, "attn_pool", None) is not None:
        raise _Unsupported("visual has an attentional pooler (attentional_pool); pyvl's ViT pools the class token")
    if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
        raise _Unsupported(f"visual pools with pool_type={visual.pool_type!r}, final_ln_after_pool="
                           f"{visual.final_ln_after_pool}; pyvl's ViT uses the class token ('tok') after ln_post")
    if getattr(visual, "output_tokens", False):
        raise _Unsupported("visual returns tokens (output_tokens=True); pyvl's ViT returns the pooled features")
    if type(visual.patch_dropout) is not nn.Identity:
        raise _Unsupported("visual uses patch dropout; pyvl's ViT has none")
    if type(visual.ln_pre) is nn.Identity:
        raise _Unsupported("visual has no ln_pre (no_ln_pre=True); CLIP's ViT has one")
    _check_norm(visual.ln_pre, "visual.ln_pre", width)
    _check_norm(visual.ln_post, "visual.ln_post", width)
    if visual.proj is None:
        raise _Unsupported("visual has no projection (proj is None)")
    layers, heads, mlp_ratio, quick = _check_transformer(visual.transformer, "visual.transformer", width)
    head_width = width // heads
    if head_width * heads != width:
        raise _Unsupported(f"visual width {width} is not divisible by its {heads} heads")
    from ..models.clip import VisionConfig

    cfg = VisionConfig(layers=layers, width=width, head_width=head_width, mlp_ratio=mlp_ratio,
                       patch_size=tuple(visual.patch_size), image_size=tuple(visual.image_size))
    return cfg, visual.proj.shape[1], quick


def _resnet_config(visual):
    from open_clip.modified_resnet import AttentionPool2d, Bottleneck

    width = visual.conv3.out_channels
    layers = []
    for i in range(1, 5):
        stage = getattr(visual, f"layer{i}")
        if not all(type(b) is Bottleneck for b in stage):
            raise _Unsupported(f"visual.layer{i} holds blocks other than open_clip's Bottleneck")
        layers.append(len(stage))
    for name in ("bn1", "bn2", "bn3"):
        bn = getattr(visual, name)
        if type(bn) is not nn.BatchNorm2d or bn.eps != 1e-5 or not bn.affine or not bn.track_running_stats:
            raise _Unsupported(f"visual.{name} is {bn!r} (frozen or changed batch norm); pyvl uses "
                               "BatchNorm2d(eps=1e-5) with running statistics")
    pool = visual.attnpool
    if type(pool) is not AttentionPool2d:
        raise _Unsupported(f"visual.attnpool is {type(pool).__name__}, not open_clip's AttentionPool2d")
    heads = pool.num_heads
    embed = pool.c_proj.in_features
    if embed != width * 32 or embed % heads:
        raise _Unsupported(f"visual.attnpool has width {embed} and {heads} heads; expected width {width * 32} "
                           "divisible by the heads")
    image_size = visual.image_size
    from ..models.clip import VisionConfig

    cfg = VisionConfig(layers=tuple(layers), width=width, head_width=embed // heads, patch_size=None,
                       image_size=image_size)
    return cfg, pool.c_proj.out_features


def _text_config(model):
    from ..models.clip import TextConfig

    if getattr(model, "text_pool_type", "argmax") != "argmax":
        raise _Unsupported(f"text_pool_type is {model.text_pool_type!r}; pyvl's CLIP pools at the argmax (EOT) token")
    if model.attn_mask is None:
        raise _Unsupported("the text transformer has no causal mask (no_causal_mask=True)")
    if not isinstance(model.text_projection, nn.Parameter):
        raise _Unsupported(f"text_projection is {type(model.text_projection).__name__} (proj_bias or proj_type); "
                           "pyvl's CLIP uses a bias-free [width, embed_dim] matrix")
    width = model.token_embedding.embedding_dim
    _check_norm(model.ln_final, "ln_final", width)
    layers, heads, mlp_ratio, quick = _check_transformer(model.transformer, "transformer", width)
    cfg = TextConfig(context_length=model.positional_embedding.shape[0],
                     vocab_size=model.token_embedding.num_embeddings, width=width, heads=heads, layers=layers,
                     mlp_ratio=mlp_ratio)
    return cfg, model.text_projection.shape[1], quick


def _config(model) -> dict:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if getattr(model, "logit_bias", None) is not None:
        raise _Unsupported("it has a logit_bias (SigLIP-style); pyvl's CLIP has none")
    if model.logit_scale.dim() != 0:
        raise _Unsupported("its logit_scale is not a scalar (nonscalar_logit_scale=True)")
    text_cfg, text_dim, text_quick = _text_config(model)
    visual = model.visual
    if type(visual) is VisionTransformer:
        vision_cfg, vision_dim, vision_quick = _vit_config(visual)
        if vision_quick != text_quick:
            raise _Unsupported("its towers use different activations (QuickGELU in one, GELU in the other)")
    elif type(visual) is ModifiedResNet:
        vision_cfg, vision_dim = _resnet_config(visual)
    else:
        raise _Unsupported(f"its image tower is {type(visual).__name__} (e.g. a timm model); pyvl supports "
                           "VisionTransformer and ModifiedResNet")
    if vision_dim != text_dim:
        raise _Unsupported(f"its image and text embeddings differ in width ({vision_dim} vs {text_dim})")
    return dict(embed_dim=text_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=text_quick,
                output_dict=bool(getattr(model, "output_dict", False)))


def from_open_clip(model: nn.Module) -> nn.Module:
    """pyvl's CLIP equivalent to the open_clip CLIP `model`, with its weights, mode (train/eval), dtype and device.

    Raises TypeError for anything but open_clip's CLIP class and ValueError, naming the feature, for a CLIP that
    pyvl's model cannot reproduce.
    """
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("from_open_clip needs open_clip: pip install open_clip_torch") from e
    if type(model) is not open_clip.CLIP:
        raise TypeError(f"from_open_clip supports {_SUPPORTED}; got {type(model).__name__} "
                        "(CustomTextCLIP / CoCa have a different text tower)")
    from ..models.clip import CLIP

    try:
        config = _config(model)
    except _Unsupported as e:
        raise ValueError(f"from_open_clip supports {_SUPPORTED}; got a CLIP whose {e}") from None
    param = model.logit_scale
    state = model.state_dict()
    # open_clip may hold a mixed-precision model (OpenAI state dicts are partly float16); pyvl's has one dtype.
    mixed = [k for k, v in state.items() if v.is_floating_point() and v.dtype != param.dtype]
    if mixed:
        raise ValueError(f"from_open_clip needs one floating dtype throughout; logit_scale is {param.dtype} but "
                         f"{mixed[0]} is {state[mixed[0]].dtype} (call .float() on the open_clip model first)")
    # Built on the meta device and allocated uninitialised: every tensor is then overwritten by the strict load
    # (pyvl's CLIP has no non-persistent buffers), which saves the random initialisation of ~100M parameters.
    with torch.device("meta"):
        pyvl_model = CLIP(**config)
    pyvl_model = pyvl_model.to(dtype=param.dtype).to_empty(device=param.device)
    pyvl_model.load_state_dict(state, strict=True)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for name, p in pyvl_model.named_parameters():
        p.requires_grad_(name not in frozen)
    return pyvl_model.train(model.training)

"""pyvl.patch(model): swap, in place, the attention of a torchvision or timm Swin / Swin V2 / Video Swin model for
pyvl's.

The pyvl modules share the peer's parameters (the same nn.Linear modules and nn.Parameter objects), so an optimizer
built before or after patching trains them, and the outputs and gradients are those of the peer up to rounding.
The state_dict keeps its keys: the peer's persistent buffers that pyvl recomputes (torchvision's
relative_position_index, relative_coords_table) are carried over unchanged, so checkpoints load both ways.

- torchvision ShiftedWindowAttention / ShiftedWindowAttentionV2 -> pyvl.nn.WindowAttention / WindowAttentionV2
  (pad before roll, fused qkv bias for V2); ShiftedWindowAttention3d -> WindowAttention3D (window shrunk to the
  input on every forward, as torchvision).
- timm SwinTransformerBlock / SwinTransformerV2Block: the block's roll / pad / partition / mask code (_attn) is
  bypassed and block.attn becomes the pyvl module with the block's (already shrunk) window and shift, rolling
  before padding as timm.
"""
from __future__ import annotations

from torch import nn

from ..nn.window_attention import WindowAttention, WindowAttention3D, WindowAttentionV2

__all__ = ["patch"]


def _share(ours: nn.Module, peer: nn.Module, names) -> nn.Module:
    """Point ours' submodules / parameters `names` at the peer's and carry over the peer's other persistent
    buffers; ours follows the peer's device."""
    param = next(peer.parameters())
    ours.to(device=param.device)
    for name in names:
        setattr(ours, name, getattr(peer, name))
    non_persistent = getattr(peer, "_non_persistent_buffers_set", set())
    for name, buf in peer.named_buffers(recurse=False):
        if name not in non_persistent and name not in dict(ours.named_buffers(recurse=False)):
            ours.register_buffer(name, buf)
    return ours.train(peer.training)


def _share_cpb(ours: WindowAttentionV2, peer_mlp: nn.Sequential) -> None:
    ours.cpb_mlp[0], ours.cpb_mlp[2] = peer_mlp[0], peer_mlp[2]


def _torchvision_attention(attn: nn.Module) -> nn.Module | None:
    name = type(attn).__name__
    if name not in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2", "ShiftedWindowAttention3d") or \
            not type(attn).__module__.startswith("torchvision."):
        return None
    if attn.attention_dropout:
        raise ValueError(f"pyvl.patch: {name} has attention dropout {attn.attention_dropout}; pyvl has none")
    dim, heads = attn.qkv.in_features, attn.num_heads
    common = dict(proj_drop=attn.dropout, pad_first=True)
    if name == "ShiftedWindowAttentionV2":
        ours = WindowAttentionV2(dim, heads, tuple(attn.window_size), tuple(attn.shift_size),
                                 qkv_bias="fused" if attn.qkv.bias is not None else False, **common)
        _share_cpb(ours, attn.cpb_mlp)
        return _share(ours, attn, ("qkv", "proj", "logit_scale"))
    cls = WindowAttention3D if name == "ShiftedWindowAttention3d" else WindowAttention
    ours = cls(dim, heads, tuple(attn.window_size), tuple(attn.shift_size), qkv_bias=attn.qkv.bias is not None,
               shrink_to_input=cls is WindowAttention3D, **common)
    return _share(ours, attn, ("qkv", "proj", "relative_position_bias_table"))


def _timm_attention(block: nn.Module) -> nn.Module | None:
    name = type(block).__name__
    if name not in ("SwinTransformerBlock", "SwinTransformerV2Block") or \
            not type(block).__module__.startswith("timm."):
        return None
    attn = block.attn
    if isinstance(attn, (WindowAttention, WindowAttentionV2)):
        return None  # already patched
    if attn.attn_drop.p:
        raise ValueError(f"pyvl.patch: {name}.attn has attention dropout {attn.attn_drop.p}; pyvl has none")
    dim, heads = attn.qkv.in_features, attn.num_heads
    if attn.qkv.out_features != 3 * dim:
        raise ValueError(f"pyvl.patch: {name}.attn has head_dim * heads != dim; pyvl needs head_dim = dim / heads")
    common = dict(proj_drop=attn.proj_drop.p, pad_first=False)
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    if name == "SwinTransformerV2Block":
        split = attn.q_bias is not None
        ours = WindowAttentionV2(dim, heads, window, shift, qkv_bias="split" if split else False,
                                 pretrained_window_size=tuple(attn.pretrained_window_size), **common)
        _share_cpb(ours, attn.cpb_mlp)
        return _share(ours, attn, ("qkv", "proj", "logit_scale") + (("q_bias", "v_bias") if split else ()))
    ours = WindowAttention(dim, heads, window, shift, qkv_bias=attn.qkv.bias is not None, **common)
    return _share(ours, attn, ("qkv", "proj", "relative_position_bias_table"))


class _BlockAttn:
    """Stands in for a patched timm block's _attn (roll, pad, partition, attention, reverse): pyvl's module does it
    all. A module-level class holding the block, so that copy.deepcopy and pickle (torch.save of the whole model)
    bind the copy to the copied block."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, x):
        return self.block.attn(x)


def patch(model: nn.Module) -> nn.Module:
    """Swap, in place, every torchvision / timm Swin, Swin V2 and Video Swin attention in `model` for pyvl's
    (sharing the peer's parameters) and return `model`. Raises TypeError for a non-module and ValueError if it
    holds no such attention or one pyvl cannot reproduce (attention dropout, head_dim * heads != dim)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pyvl.patch takes a torch.nn.Module, got {type(model).__name__}")
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            ours = _torchvision_attention(child)
            if ours is not None:
                setattr(module, child_name, ours)
                swapped += 1
        ours = _timm_attention(module)
        if ours is not None:
            module.attn = ours
            # An instance attribute shadows the block's _attn method; object.__setattr__ keeps nn.Module from
            # treating it as anything but a plain attribute.
            object.__setattr__(module, "_attn", _BlockAttn(module))
            swapped += 1
    if swapped == 0 and not any(isinstance(m, (WindowAttention, WindowAttentionV2)) for m in model.modules()):
        raise ValueError(f"pyvl.patch found no torchvision or timm Swin / Swin V2 / Video Swin attention in "
                         f"{type(model).__name__}")
    return model

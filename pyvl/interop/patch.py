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
- open_clip ClipLoss / SigLipLoss (the instance itself, or found among a module's submodules or an object's
  attributes, e.g. a training script's loss holder): the instance's forward becomes pyvl.ops.contrastive_loss (the
  N x N logits are never stored), same arguments, same return (a 0-dim loss, or {"contrastive_loss": loss} with
  output_dict=True). Exactness by setting (world_size > 1 runs over torch.distributed's default group, as
  open_clip does, and needs it initialized with open_clip's rank / world_size):
    * world_size 1, any local_loss / gather_with_grad / cache_labels: the same value and gradients.
    * ClipLoss(local_loss=False, gather_with_grad=True): every rank gathers both feature matrices with gradient
      and computes the global loss; the same value and gradients on each rank (the features' gradients are
      world_size times the global loss's, as open_clip's all_gather backward sums them).
    * ClipLoss(local_loss=False, gather_with_grad=False): gathered without gradient, the rank's own rows put back
      in its slot as open_clip does; the same value and gradients on each rank.
    * ClipLoss(local_loss=True, gather_with_grad=True): pyvl.ops.contrastive_loss(group=WORLD); the same value
      and feature gradients on each rank. The logit_scale / logit_bias gradient is split differently between
      ranks (pyvl's column log-sum-exps are combined across ranks), so it equals open_clip's summed (or averaged,
      as DDP does) over ranks, not rank by rank.
    * SigLipLoss, every dist_impl ('bidir', 'shift', 'reduce', 'gather' compute the same loss):
      pyvl.ops.contrastive_loss(kind="sigmoid", group=WORLD); the same value and gradients on each rank
      (logit_bias None is a bias of 0, as in open_clip).
  Refused with a ValueError naming the setting (no silent change of the math): use_horovod=True with world_size > 1
  (pyvl gathers with torch.distributed only); local_loss=True with gather_with_grad=False (each rank's features
  get only the gradient of its own rows of its own loss, which pyvl's gathered computation does not reproduce);
  subclasses with their own forward (CoCaLoss, DistillClipLoss) are left alone.
"""
from __future__ import annotations

import torch
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


# ----------------------------------------------------------------------------------------------------------------
# open_clip's losses


def _open_clip_loss_kind(obj) -> str | None:
    """"softmax" for open_clip's ClipLoss, "sigmoid" for its SigLipLoss, None for anything else (subclasses with
    their own forward, CoCaLoss and DistillClipLoss, included)."""
    cls = type(obj)
    if not cls.__module__.startswith("open_clip"):
        return None
    return {"ClipLoss": "softmax", "SigLipLoss": "sigmoid"}.get(cls.__name__)


def _check_loss_settings(loss, kind: str) -> None:
    """Raise a ValueError naming the first setting of `loss` whose math pyvl does not reproduce exactly."""
    name = type(loss).__name__
    world_size, rank = int(loss.world_size), int(loss.rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"pyvl.patch: {name} has rank={rank}, world_size={world_size}; expected 0 <= rank < "
                         "world_size")
    if world_size == 1 or kind == "sigmoid":
        return
    if getattr(loss, "use_horovod", False):
        raise ValueError(f"pyvl.patch: {name}(use_horovod=True) with world_size={world_size} is not supported: pyvl "
                         "gathers over torch.distributed, not horovod")
    if loss.local_loss and not loss.gather_with_grad:
        raise ValueError(f"pyvl.patch: {name}(local_loss=True, gather_with_grad=False) is not supported: there each "
                         "rank's features get the gradient of its own rows of its own loss only, which pyvl cannot "
                         "reproduce; use gather_with_grad=True (the same loss values, the exact gradients)")


def _world(loss):
    """torch.distributed's default group, checked against the loss's rank and world_size (open_clip's ClipLoss and
    SigLipLoss communicate over the default group)."""
    import torch.distributed as dist

    name = type(loss).__name__
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"pyvl.patch: {name} has world_size={loss.world_size} but torch.distributed is not "
                         "initialized (init_process_group first)")
    if dist.get_world_size() != loss.world_size or dist.get_rank() != loss.rank:
        raise ValueError(f"pyvl.patch: {name} has rank={loss.rank}, world_size={loss.world_size}; torch.distributed's "
                         f"default group has rank {dist.get_rank()} of {dist.get_world_size()}")
    return dist.group.WORLD


def _gather_keep_local(x, rank, group):
    """Every rank's x concatenated, without gradient except through this rank's own slot (open_clip's
    gather_features with gather_with_grad=False, local_loss=False)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[rank] = x
    return torch.cat(parts)


class _LossForward:
    """Stands in for a patched open_clip ClipLoss / SigLipLoss instance's forward. A module-level class holding the
    loss, so that copy.deepcopy and pickle bind the copy to the copied loss."""

    def __init__(self, loss: nn.Module, kind: str):
        self.loss, self.kind = loss, kind

    def __call__(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        from ..ops.contrastive import _AllGather, contrastive_loss

        loss, kind = self.loss, self.kind
        _check_loss_settings(loss, kind)
        if kind == "sigmoid" and logit_bias is None:
            logit_bias = 0.0  # open_clip adds no bias: the same logits
        if loss.world_size == 1:
            value = contrastive_loss(image_features, text_features, logit_scale, logit_bias, kind)
        elif kind == "sigmoid" or loss.local_loss:
            value = contrastive_loss(image_features, text_features, logit_scale, logit_bias, kind, group=_world(loss))
        else:
            group = _world(loss)
            if loss.gather_with_grad:
                images, texts = _AllGather.apply(image_features, group), _AllGather.apply(text_features, group)
            else:
                images = _gather_keep_local(image_features, loss.rank, group)
                texts = _gather_keep_local(text_features, loss.rank, group)
            value = contrastive_loss(images, texts, logit_scale, logit_bias, kind)
        return {"contrastive_loss": value} if output_dict else value


def _patch_loss(loss) -> bool:
    """Swap `loss`'s forward if it is an open_clip ClipLoss / SigLipLoss; True if it is one (patched now or
    before)."""
    kind = _open_clip_loss_kind(loss)
    if kind is None:
        return False
    _check_loss_settings(loss, kind)
    if not isinstance(loss.__dict__.get("forward"), _LossForward):
        # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up on the instance.
        object.__setattr__(loss, "forward", _LossForward(loss, kind))
    return True


def _patch_losses_in(obj, seen: set) -> int:
    """Patch the open_clip losses in obj: obj itself, its submodules, and (for plain objects, lists, tuples and
    dicts) what they hold, recursively."""
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.Tensor)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        return sum(_patch_loss(m) for m in obj.modules())
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__ != "builtins":
        children = list(vars(obj).values())
    else:
        return 0
    return sum(_patch_losses_in(c, seen) for c in children)


# ----------------------------------------------------------------------------------------------------------------


def patch(model):
    """Swap, in place, every torchvision / timm Swin, Swin V2 and Video Swin attention in `model` for pyvl's
    (sharing the peer's parameters), and the forward of every open_clip ClipLoss / SigLipLoss it is or holds for
    pyvl.ops.contrastive_loss (see the module docstring for which settings are exact); return `model`.

    `model` is an nn.Module, or any object holding open_clip losses among its attributes (lists, tuples and dicts
    are searched too). Raises TypeError for anything else, ValueError if it holds nothing pyvl swaps or something
    pyvl cannot reproduce (attention dropout, head_dim * heads != dim, an unsupported loss setting, named).
    """
    if not isinstance(model, nn.Module):
        if _patch_losses_in(model, set()) == 0:
            raise TypeError(f"pyvl.patch takes a torch.nn.Module or an object holding open_clip ClipLoss / "
                            f"SigLipLoss instances, got {type(model).__name__}")
        return model
    swapped = _patch_losses_in(model, set())
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
        raise ValueError(f"pyvl.patch found no torchvision or timm Swin / Swin V2 / Video Swin attention and no "
                         f"open_clip ClipLoss / SigLipLoss in {type(model).__name__}")
    return model

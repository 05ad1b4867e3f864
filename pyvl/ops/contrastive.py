"""Batched similarity logits and CLIP's / SigLIP's contrastive losses without an N x N matrix.

    logits = pyvl.ops.similarity_logits(a, b, scale=1.0, bias=None, normalize=True, *, backend=None)
    loss = pyvl.ops.contrastive_loss(image_features, text_features, logit_scale, logit_bias=None, kind="softmax",
                                     group=None, *, backend=None)

Backends: "reference" (pyvl.reference.contrastive: PyTorch, the N x N logits materialized as open_clip does),
"cpu" (the C++ kernels in csrc/cpu/similarity.cpp and csrc/cpu/contrastive.cpp) and "triton" (pyvl.kernels.contrastive,
through the custom ops pyvl::similarity_logits_triton, pyvl::contrastive_stats_triton and
pyvl::contrastive_stats_backward_triton; float16 / bfloat16 / float32 on CUDA, or on the CPU under TRITON_INTERPRET=1;
float64 runs on the other two). Every backend shares the autograd below and the distributed scheme, which lives above
the statistics op.

contrastive_loss is assembled from per-row and per-column statistics of the logits block (torch.ops.pyvl.
contrastive_stats: the row and column log-sum-exps for softmax, the row sums of softplus for sigmoid, and the
matched pairs' logits); the kernel computes the statistics tile by tile and its backward recomputes each tile's
logits, so neither direction stores an N x N matrix (memory O(N d)). Autograd through the statistics is exact:
their backward takes any cotangents, which is what makes the distributed scheme below exact.

Distributed (group = a torch.distributed process group; every rank passes its local rows, the same count on every
rank): the rank gathers every rank's text rows (all_gather, whose backward all-reduces the gradient and keeps the
rank's slice), computes the statistics of its image rows against all texts, and, for softmax, gathers the column
log-sum-exps' partials over ranks. Per-rank value and gradients follow open_clip's
ClipLoss(local_loss=True, gather_with_grad=True) and SigLipLoss:
  * each rank returns its share: softmax (CE of its images' rows + CE of its texts' columns) / 2, each a mean over
    its n rows against the global batch; sigmoid sum over its images' rows against every text, / n. The mean over
    ranks of the returned values is the single-process loss over the global batch of N = n * world_size rows.
  * backward gives each rank's features d(sum over ranks of the returned values) / d(its rows), which includes the
    contributions through the other ranks' losses: world_size times the rows of the global loss's gradient. DDP
    averages gradients over ranks, so training with DDP sees exactly the global loss's gradient, as with open_clip.
  * the logit_scale / logit_bias gradient of a rank is a share; their sum over ranks is the gradient of the sum of
    the returned values (world_size times the global loss's), which DDP's averaging turns into the global one.
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _ext  # noqa: F401  (_ext registers the C++ schemas)
from ..reference import contrastive as ref
from ._checks import check_tensor

__all__ = ["similarity_logits", "contrastive_loss", "KINDS"]

KINDS = {"softmax": 0, "sigmoid": 1}


# ----------------------------------------------------------------------------------------------------------------
# Argument checks


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_scalar(name, value, like, *, allow_none=False):
    """A finite Python float or a one-element floating-point tensor on like's device; returns it unchanged."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a float or a one-element tensor, got None")
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"{name} must have one element (a 0-dim tensor), got shape {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{name} must be on {like.device} like the features, got {value.device}")
        if not _is_compiling() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite, got {value.item()}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _as_tensor(value, like):
    if value is None or isinstance(value, torch.Tensor):
        return value
    # In the compute dtype: a Python float scale is not rounded to bfloat16 / float16 before it scales the logits.
    return torch.full((), value, dtype=_stats_dtype(like.dtype), device=like.device)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# The compiled ops' fakes and autograd


def _fake_similarity(a, b, scale, bias, normalize):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]))


def _similarity_setup(ctx, inputs, output):
    a, b, scale, bias, normalize = inputs
    ctx.save_for_backward(a, b, scale)
    ctx.has_bias = bias is not None
    ctx.normalize = normalize


def _normalize_with_norm(t):
    norm = t.norm(dim=-1, keepdim=True)
    return t / norm.clamp_min(ref.EPS), norm


def _normalize_backward(grad, unit, norm):
    """Gradient of t / max(||t||, eps) at t, given the result `unit` and ||t||."""
    denom = norm.clamp_min(ref.EPS)
    radial = (unit * grad).sum(-1, keepdim=True) * (norm > ref.EPS)
    return (grad - unit * radial) / denom


def _similarity_backward(ctx, grad):
    # Two batched matmuls (what any GEMM library does best) and the normalization's Jacobian, all O(B (N + M) d)
    # memory besides the gradient itself.
    a, b, scale = ctx.saved_tensors
    cd = _stats_dtype(a.dtype)
    g = grad.to(cd)
    a_, b_ = a.to(cd), b.to(cd)
    if ctx.normalize:
        an, na = _normalize_with_norm(a_)
        bn, nb = _normalize_with_norm(b_)
    else:
        an, bn = a_, b_
    g_b = g @ bn  # [B, N, d]: sum_j grad_ij bn_j
    g_a = g.transpose(-1, -2) @ an  # [B, M, d]
    s = scale.to(cd).reshape(())
    grad_scale = (g_b * an).sum().reshape(scale.shape).to(scale.dtype)
    grad_an, grad_bn = s * g_b, s * g_a
    if ctx.normalize:
        grad_a, grad_b = _normalize_backward(grad_an, an, na), _normalize_backward(grad_bn, bn, nb)
    else:
        grad_a, grad_b = grad_an, grad_bn
    grad_bias = g.sum().reshape(()) if ctx.has_bias else None
    return grad_a.to(a.dtype), grad_b.to(b.dtype), grad_scale, grad_bias, None


def _fake_stats(x, y, logit_scale, logit_bias, kind, diag_offset):
    sd = _stats_dtype(x.dtype)
    return (x.new_empty((x.shape[0],), dtype=sd), x.new_empty((y.shape[0] if kind == 0 else 0,), dtype=sd),
            x.new_empty((x.shape[0],), dtype=sd))


def _fake_stats_backward(grad_row, grad_col, grad_diag, x, y, logit_scale, logit_bias, row, col, kind, diag_offset):
    gb = torch.empty_like(logit_bias) if logit_bias is not None else x.new_empty((0,))
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(logit_scale), gb)


def _stats_setup(ctx, inputs, output):
    x, y, logit_scale, logit_bias, kind, diag_offset = inputs
    ctx.save_for_backward(x, y, logit_scale, logit_bias, output[0], output[1])
    ctx.static = (kind, diag_offset)


def _make_stats_backward(backward_op: str):
    def backward(ctx, grad_row, grad_col, grad_diag):
        x, y, logit_scale, logit_bias, row, col = ctx.saved_tensors
        grad_row = torch.zeros_like(row) if grad_row is None else grad_row
        grad_col = torch.zeros_like(col) if grad_col is None else grad_col
        grad_diag = torch.zeros_like(row) if grad_diag is None else grad_diag
        gx, gy, gs, gb = getattr(torch.ops.pyvl, backward_op)(grad_row, grad_col, grad_diag, x, y, logit_scale,
                                                              logit_bias, row, col, *ctx.static)
        return gx, gy, gs, (gb if logit_bias is not None else None), None, None

    return backward


# ----------------------------------------------------------------------------------------------------------------
# Triton ops (custom_op rather than triton_op: the latter fails under torch.compile and opcheck in the interpreter,
# see STYLE.md). Same schemas as the C++ ops in csrc/registration.cpp.


def _triton():
    from ..kernels import contrastive as kernels

    return kernels


@torch.library.custom_op("pyvl::similarity_logits_triton", mutates_args=())
def _similarity_triton(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       normalize: bool) -> torch.Tensor:
    return _triton().similarity_logits(a, b, scale, bias, normalize)


@torch.library.custom_op("pyvl::contrastive_stats_triton", mutates_args=())
def _stats_triton(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None,
                  kind: int, diag_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().contrastive_stats(x, y, logit_scale, logit_bias, kind, diag_offset)


@torch.library.custom_op("pyvl::contrastive_stats_backward_triton", mutates_args=())
def _stats_backward_triton(grad_row: torch.Tensor, grad_col: torch.Tensor, grad_diag: torch.Tensor, x: torch.Tensor,
                           y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None,
                           row: torch.Tensor, col: torch.Tensor, kind: int, diag_offset: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().contrastive_stats_backward(grad_row, grad_col, grad_diag, x, y, logit_scale, logit_bias, row, col,
                                                kind, diag_offset)


# backend family: (similarity op, statistics op, statistics backward op)
_OPS = {
    "compiled": ("similarity_logits", "contrastive_stats", "contrastive_stats_backward"),
    "triton": ("similarity_logits_triton", "contrastive_stats_triton", "contrastive_stats_backward_triton"),
}


def _register():
    for sim, stats, stats_bwd in _OPS.values():
        torch.library.register_fake(f"pyvl::{sim}")(_fake_similarity)
        torch.library.register_autograd(f"pyvl::{sim}", _similarity_backward, setup_context=_similarity_setup)
        torch.library.register_fake(f"pyvl::{stats}")(_fake_stats)
        torch.library.register_fake(f"pyvl::{stats_bwd}")(_fake_stats_backward)
        torch.library.register_autograd(f"pyvl::{stats}", _make_stats_backward(stats_bwd), setup_context=_stats_setup)


if _ext.LOAD_ERROR is not None:  # no compiled ops to register for; the Triton ops need no extension
    _OPS.pop("compiled")
_register()


def _family(backend: str) -> str:
    return "triton" if backend == "triton" else "compiled"


def _stats_fn(backend: str):
    if backend == "reference":
        return ref.contrastive_stats
    return getattr(torch.ops.pyvl, _OPS[_family(backend)][1]).default


# ----------------------------------------------------------------------------------------------------------------
# similarity_logits


def similarity_logits(a: torch.Tensor, b: torch.Tensor, scale=1.0, bias=None, normalize: bool = True, *,
                      backend: str | None = None) -> torch.Tensor:
    """scale * normalize(a) @ normalize(b)^T + bias: a [..., N, d] against b [..., M, d] -> [..., N, M].

    Leading dims broadcast (text features [templates, classes, d] against images [N, d] give
    [templates, classes, N]). normalize: L2 over the last dim with F.normalize's semantics (eps 1e-12), folded into
    the GEMM's epilogue by the CPU and Triton kernels (the Triton kernel sums the squares in the same loop over d as
    the dot products). scale: a float or a one-element tensor (it gets a gradient); bias: None, a float or a
    one-element tensor. The output has a's dtype; gradients flow to a, b, scale and bias (for every backend the
    backward is two batched matmuls in PyTorch, see _similarity_backward).
    """
    check_tensor("a", a)
    check_tensor("b", b, like=a)
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"a and b must have at least 2 dims ([..., N, d] and [..., M, d]), got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"b must have a's feature size d = {a.shape[-1]} in its last dim, got {b.shape[-1]}")
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(f"the leading dims of a {tuple(a.shape[:-2])} and b {tuple(b.shape[:-2])} do not "
                         "broadcast") from None
    scale = _check_scalar("scale", scale, a)
    bias = _check_scalar("bias", bias, a, allow_none=True)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    chosen = _backend.choose("similarity_logits", backend, a)
    if chosen == "reference":
        return ref.similarity_logits(a, b, scale, bias, normalize)
    N, M, d = a.shape[-2], b.shape[-2], a.shape[-1]
    B = math.prod(batch)
    a3 = a.expand(*batch, N, d).reshape(B, N, d)
    b3 = b.expand(*batch, M, d).reshape(B, M, d)
    op = getattr(torch.ops.pyvl, _OPS[_family(chosen)][0])
    out = op(a3, b3, _as_tensor(scale, a), _as_tensor(bias, a), normalize)
    return out.reshape(*batch, N, M)


# ----------------------------------------------------------------------------------------------------------------
# contrastive_loss


class _AllGather(torch.autograd.Function):
    """Concatenates every rank's x along dim 0; the backward all-reduces the gradient and keeps this rank's rows, so
    each rank's rows get the contributions of every rank's use of them."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        n = grad.shape[0] // dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * n:(rank + 1) * n], None


def _check_group_shapes(image_features, text_features, group):
    """Every rank must pass the same n and d: checked on the gathered sizes, so that every rank raises alike."""
    import torch.distributed as dist

    sizes = torch.tensor([*image_features.shape, *text_features.shape], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        sizes = sizes.to(image_features.device)
    every = [torch.empty_like(sizes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, sizes, group=group)
    every = torch.stack(every).cpu().tolist()
    for name, col in (("image_features", 1), ("text_features", 3)):
        ds = [r[col] for r in every]
        if len(set(ds)) != 1:
            raise ValueError(f"{name} must have the same feature size d on every rank of the group, got d = {ds} "
                             "by rank")
    for name, col in (("image_features", 0), ("text_features", 2)):
        ns = [r[col] for r in every]
        if len(set(ns)) != 1:
            raise ValueError(f"{name} must have the same number of rows on every rank of the group, got {ns} by rank")


def _check_features(image_features, text_features):
    check_tensor("image_features", image_features, dim=2)
    check_tensor("text_features", text_features, dim=2)
    if text_features.device != image_features.device:
        raise ValueError(f"text_features must be on {image_features.device} like image_features, got "
                         f"{text_features.device}")
    if text_features.dtype != image_features.dtype:
        raise TypeError(f"text_features must have dtype {image_features.dtype} like image_features, got "
                        f"{text_features.dtype}")


def _check_pair(image_features, text_features):
    if image_features.shape[0] < 1:
        raise ValueError("image_features must have at least one row")
    if text_features.shape[0] != image_features.shape[0]:
        raise ValueError(f"text_features must have as many rows as image_features ({image_features.shape[0]} "
                         f"matched pairs), got {text_features.shape[0]}")
    if text_features.shape[1] != image_features.shape[1]:
        raise ValueError(f"text_features must have image_features' feature size d = {image_features.shape[1]}, got "
                         f"{text_features.shape[1]}")


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None,
                     kind: str = "softmax", group=None, *, backend: str | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (kind="softmax") or SigLIP's sigmoid loss (kind="sigmoid"), without N x N memory.

    Semantics are open_clip's (src/open_clip/loss.py), ClipLoss and SigLipLoss:
      logits = logit_scale * image_features @ text_features^T (+ logit_bias), [N, N], pair i matches pair i;
      softmax: (cross_entropy(logits, arange(N)) + cross_entropy(logits^T, arange(N))) / 2;
      sigmoid: -sum(logsigmoid(labels * logits)) / N, labels = 2 * eye(N) - 1.
    logit_scale is used as given, not exponentiated: pass model.logit_scale.exp() as open_clip's models do.
    The features are NOT normalized here (open_clip's models normalize them); pass unit rows for CLIP's cosine
    logits. For softmax, logit_bias cancels (its gradient is 0); sigmoid needs it (SigLIP initializes it to -10).

    Args:
        image_features, text_features: [N, d] each (N matched pairs), same dtype and device, any strides.
        logit_scale: a finite float or a one-element tensor (it gets a gradient).
        logit_bias: None, a float or a one-element tensor; required for kind="sigmoid".
        kind: "softmax" or "sigmoid".
        group: None, or a torch.distributed process group over which the batch is split (every rank passes its n
            local rows, the same n and d everywhere); see the module docstring for what each rank's value and
            gradients are. All ranks must call with the same kind, backend and scale.
        backend: None (PYVL_BACKEND, else the fastest that can run), "reference", "cpu" or "triton".

    Returns a 0-dim tensor of the features' dtype (computed in float32, or float64 for float64 features).
    """
    _check_features(image_features, text_features)
    if group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group was given but torch.distributed is not initialized (init_process_group first)")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
        _check_group_shapes(image_features, text_features, group)
    _check_pair(image_features, text_features)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    logit_scale = _check_scalar("logit_scale", logit_scale, image_features)
    logit_bias = _check_scalar("logit_bias", logit_bias, image_features, allow_none=True)
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("logit_bias is required for kind='sigmoid' (SigLIP's learnable bias, initialized to -10)")
    chosen = _backend.choose("contrastive_loss", backend, image_features)
    x, y = image_features, text_features
    scale_t, bias_t = _as_tensor(logit_scale, x), _as_tensor(logit_bias, x)
    if chosen == "reference" and group is None:
        return ref.contrastive_loss(x, y, scale_t, bias_t, kind)
    return _from_stats(x, y, scale_t, bias_t, KINDS[kind], _stats_fn(chosen), group)


def _from_stats(x, y, logit_scale, logit_bias, kind, stats, group):
    n = x.shape[0]
    if group is None:
        world, rank, y_all = 1, 0, y
    else:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        y_all = _AllGather.apply(y, group)
    # diag: image i's logit against its own text, column rank * n + i of the gathered texts.
    row, col, diag = stats(x, y_all, logit_scale, logit_bias, kind, rank * n)
    if kind == 0:
        if group is not None:  # col holds this rank's rows' partial log-sum-exps: combine over ranks
            col = torch.logsumexp(_AllGather.apply(col[None], group), 0)[rank * n:(rank + 1) * n]
        loss = (row.sum() + col.sum() - 2 * diag.sum()) / (2 * n)
    else:
        loss = (row.sum() - diag.sum()) / n
    return loss.to(x.dtype)

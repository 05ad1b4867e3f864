"""Sequential (memory-bounded) attention with an additive bias: Swin V2's "sequential self-attention" and
Graphormer's biased attention.

Public op: `sequential_attention`. It checks its arguments, chooses a backend (pyvl._backend.choose) and calls one of:
  reference  pyvl.reference.sequential_attention (PyTorch; materializes the [B, heads, N, M] scores)
  cpu        torch.ops.pyvl.sequential_attention / _backward, C++ kernels in csrc/cpu/sequential_attention.cpp
  triton     torch.ops.pyvl.sequential_attention_triton / _backward_triton, custom ops over pyvl.kernels
The compiled and Triton ops get fake kernels and autograd here, so they work under torch.compile(fullgraph=True).
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _ext  # noqa: F401  (_ext registers the C++ schemas)
from ..reference import sequential_attention as ref
from ._checks import check_tensor

__all__ = ["sequential_attention"]


# ----------------------------------------------------------------------------------------------------------------
# Argument checks


def _check(q, k, v, bias, scale, deterministic):
    """Checks every argument; returns (bias as a 4-D view [1 or B, 1 or H, 1 or N, 1 or M] or None, scale)."""
    check_tensor("q", q, dim=4)
    check_tensor("k", k, dim=4, like=q, like_name="q")
    check_tensor("v", v, dim=4, like=q, like_name="q")
    B, H, N, d = q.shape
    if min(q.shape) < 1:
        raise ValueError(f"q must be a non-empty [B, heads, N, d], got shape {tuple(q.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != d or k.shape[2] < 1:
        raise ValueError(f"k must have shape [B, heads, M, d] = [{B}, {H}, M >= 1, {d}] like q, "
                         f"got {tuple(k.shape)}")
    M = k.shape[2]
    if v.shape[:3] != k.shape[:3] or v.shape[3] < 1:
        raise ValueError(f"v must have shape [B, heads, M, dv] = [{B}, {H}, {M}, dv >= 1] like k, got {tuple(v.shape)}")
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if bias is None:
        return None, float(scale)
    check_tensor("bias", bias, like=q, like_name="q")
    full = (B, H, N, M)
    if not 2 <= bias.dim() <= 4:
        raise ValueError(f"bias must have 2, 3 or 4 dimensions ([N, M], [heads, N, M] or [B, heads, N, M]), "
                         f"got shape {tuple(bias.shape)}")
    bias4 = bias[(None,) * (4 - bias.dim())]  # a view, so autograd sums the gradient back to bias's own shape
    if any(s not in (1, f) for s, f in zip(bias4.shape, full)):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to [B, heads, N, M] = {list(full)} "
                         f"(each dim must be 1 or the full size)")
    return bias4, float(scale)


# ----------------------------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes, mirroring the C++ binding and the Triton launchers.


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, bias, scale, deterministic):
    B, H, N, _ = q.shape
    return q.new_empty((B, H, N, v.shape[3])), q.new_empty((B, H, N), dtype=_lse_dtype(q))


def _fake_backward(grad_out, q, k, v, bias, out, lse, scale, bias_requires_grad, deterministic):
    gb = bias.new_empty(bias.shape) if bias is not None and bias_requires_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gb


# ----------------------------------------------------------------------------------------------------------------
# Triton ops (custom_op rather than triton_op: the latter fails under torch.compile and opcheck in the interpreter,
# see STYLE.md).


def _triton():
    from ..kernels import sequential_attention as kernels

    return kernels


@torch.library.custom_op("pyvl::sequential_attention_triton", mutates_args=())
def _forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                    deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton().sequential_attention_forward(q, k, v, bias, scale)


@torch.library.custom_op("pyvl::sequential_attention_backward_triton", mutates_args=())
def _backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, scale: float,
                     bias_requires_grad: bool, deterministic: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().sequential_attention_backward(grad_out, q, k, v, bias, out, lse, scale, bias_requires_grad,
                                                   deterministic)


# ----------------------------------------------------------------------------------------------------------------
# Autograd, shared by the compiled and the Triton ops.

_OPS = {
    # backend family: (forward, backward)
    "compiled": ("sequential_attention", "sequential_attention_backward"),
    "triton": ("sequential_attention_triton", "sequential_attention_backward_triton"),
}


def _op(family: str, i: int):
    return getattr(torch.ops.pyvl, _OPS[family][i]).default


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.scale, ctx.deterministic = scale, deterministic
    ctx.mark_non_differentiable(lse)


def _make_backward(family):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        gq, gk, gv, gb = _op(family, 1)(grad_out, q, k, v, bias, out, lse, ctx.scale, bias_grad, ctx.deterministic)
        return gq, gk, gv, gb if bias_grad else None, None, None

    return backward


def _register():
    for family in _OPS:
        fwd, bwd = (f"pyvl::{name}" for name in _OPS[family])
        torch.library.register_fake(fwd)(_fake_forward)
        torch.library.register_fake(bwd)(_fake_backward)
        torch.library.register_autograd(fwd, _make_backward(family), setup_context=_setup_context)


if _ext.LOAD_ERROR is not None:  # no compiled ops to register for; the Triton ops need no extension
    _OPS.pop("compiled")
_register()


# ----------------------------------------------------------------------------------------------------------------
# Public op


def sequential_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, *,
                         scale: float | None = None, deterministic: bool = False,
                         backend: str | None = None) -> torch.Tensor:
    """softmax((q k^T) * scale + bias) v, block by block, without a [N, M] scores tensor.

    Args:
        q: [B, heads, N, d]; k: [B, heads, M, d]; v: [B, heads, M, dv] (F.scaled_dot_product_attention's layout,
            any strides), float16/bfloat16/float32/float64, all of one dtype and device.
        bias: None or an additive bias broadcastable to [B, heads, N, M]: [N, M], [heads, N, M] or
            [1 or B, 1 or heads, N, M] (size-1 dims broadcast, also along N or M). Its gradient comes back in its
            own shape, summed over the dims it is broadcast along (Graphormer learns a [B, heads, N+1, N+1] bias).
        scale: the factor on q k^T, default d ** -0.5.
        deterministic: bitwise reproducible bias gradients run to run. The bias gradient of a bias broadcast over
            batch or heads is a sum over those dims. cpu backend: always deterministic (every output has one owner
            and sums run in a fixed order, whatever the thread count); the flag changes nothing. triton backend: by
            default that sum uses atomic adds (more programs in flight, order not fixed); deterministic=True has
            each program own its bias-gradient tile and loop over the broadcast dims in a fixed order. A bias that
            is not broadcast over batch or heads never needs atomics. reference: PyTorch's own (deterministic on
            the CPU).
        backend: None (PYVL_BACKEND, else the fastest that can run), "reference", "cpu" or "triton".

    Memory: the forward keeps only the output and the per-row log-sum-exp; the backward recomputes the
    probabilities block by block, so beyond the bias and its gradient memory is O(N d) (the reference backend
    materializes the scores). A bias broadcast along N or M gets its gradient as a dense [.., N, M] before the
    reduction.

    NaN policy: a row whose scores are all -inf (a bias row of -inf) gives NaN, as torch.softmax and
    F.scaled_dot_product_attention do, and NaN gradients; -inf entries elsewhere get zero weight; NaN inputs
    propagate.
    """
    bias4, scale = _check(q, k, v, bias, scale, deterministic)
    chosen = _backend.choose("sequential_attention", backend, q)
    if chosen == "reference":
        return ref.sequential_attention(q, k, v, bias, scale)
    family = "triton" if chosen == "triton" else "compiled"
    return _op(family, 0)(q, k, v, bias4, scale, deterministic)[0]

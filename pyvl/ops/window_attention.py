"""Window attention: Swin's W-MSA / SW-MSA, Swin V2's scaled cosine attention, Video Swin's 3D windows.

    out = pyvl.ops.window_attention(q, k, v, window_size, shift_size=0, *, rel_bias_table=None, rel_bias=None,
                                    logit_scale=None, scale=None, pad_kv=None, pad_first=True,
                                    mask_value=-100.0, backend=None)

q, k, v are tokens in their natural layout, (B, H, W, heads, d) for 2D or (B, T, H, W, heads, d) for 3D, with any
strides (for example the three views of one qkv projection output reshaped to (B, H, W, 3, heads, d)). The output
has q's shape, is contiguous, and has q's dtype. The kernels read the tokens where they lie: the cyclic shift, the
window partition and its reverse, the padding of sizes that the window does not divide, the shift mask and the
relative-position-bias gather are index arithmetic, never tensors.

Geometry, per spatial dim (S its size, w the window, s the shift, Sp = ceil(S / w) * w):
  * The window grid has Sp positions r, cut into Sp / w windows of w consecutive positions.
  * pad_first=True (torchvision, official Swin): pad to Sp, then roll by -s. Position r holds padded position
    p = (r + s) mod Sp: token p if p < S, else a padding token.
  * pad_first=False (timm): roll the S tokens by -s, then pad. Position r holds token (r + s) mod S if r < S, else
    a padding token.
  * With pad_first=True the shift is ignored in a dim where w >= Sp (one window: torchvision's rule); with
    pad_first=False it is kept (timm models with a dynamic image size shift a dim that one window covers). The op
    never shrinks a window; models shrink it where their peer does.
  * With a shift, each grid position has a region label per dim: 0 for r < Sp - w, 1 for r < Sp - s, else 2. A query
    and a key of one window whose label tuples differ get `mask_value` added to their logit (-100, as every peer
    does; float("-inf") excludes the pair).
  * Padding tokens have key and value pad_kv = (k_pad, v_pad), each [heads, d] (what a zero token projects to:
    the qkv bias); None means zeros. They are not masked, as in the peers; their outputs are dropped.
Logits of query i and key j of a window (N = prod(window) tokens in row-major order):
  * (q_i * scale) . k_j, scale = d ** -0.5 by default; or, when logit_scale ([heads] elements) is given, Swin V2's
    cos(q_i, k_j) * exp(min(logit_scale, log 100)) (F.normalize's eps 1e-12), and scale must be None.
  * plus rel_bias_table[idx(i, j), head] with idx = sum over dims of (c_i - c_j + w - 1) * prod of (2w' - 1) over
    the later dims (table [(2w0-1)(2w1-1)[(2w2-1)], heads]), or a dense rel_bias [heads, N, N]; not both.
Gradients flow to q, k, v, the bias (table or dense), logit_scale and pad_kv.

NaN policy: NaN and inf in the inputs propagate as in the peers' eager code; nothing is checked.
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _ext  # noqa: F401  (_ext registers the C++ schemas)
from ..reference import window_attention as ref
from ._checks import check_tensor

__all__ = ["window_attention", "normalize_window_args", "relative_position_index"]

relative_position_index = ref.relative_position_index  # for modules that keep the peers' index buffers

OP = "window_attention"


def _per_dim(name, value, nd, minimum):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {nd} ints, got {value!r}")
    if isinstance(value, int):
        value = (value,) * nd
    if not (isinstance(value, (tuple, list)) and len(value) == nd and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a tuple of {nd} ints (one per spatial dim), got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return tuple(int(v) for v in value)


def normalize_window_args(q, window_size, shift_size,
                          pad_first: bool = True) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Checks window_size and shift_size against q's spatial sizes; returns (window, shift) per spatial dim, with
    pad_first (torchvision's order) the shift zeroed where the window covers the padded size."""
    nd = q.dim() - 3
    window = _per_dim("window_size", window_size, nd, 1)
    shift = _per_dim("shift_size", shift_size, nd, 0)
    for w, s in zip(window, shift):
        if s >= w:
            raise ValueError(f"shift_size must be smaller than window_size in every dim, got shift {shift} for "
                             f"window {window}")
    sizes = q.shape[1:1 + nd]
    if pad_first:
        shift = tuple(0 if w >= ref.padded_size(n, w) else s for n, w, s in zip(sizes, window, shift))
    return window, shift


def _check(q, k, v, window_size, shift_size, rel_bias_table, rel_bias, logit_scale, scale, pad_kv, pad_first,
           mask_value):
    check_tensor("q", q)
    if q.dim() not in (5, 6):
        raise ValueError(f"q must be (B, H, W, heads, d) or (B, T, H, W, heads, d), got shape {tuple(q.shape)}")
    if min(q.shape) < 1:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, like=q)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    window, shift = normalize_window_args(q, window_size, shift_size, pad_first)
    heads, d = q.shape[-2], q.shape[-1]
    N = math.prod(window)
    if rel_bias_table is not None and rel_bias is not None:
        raise ValueError("pass rel_bias_table or rel_bias, not both")
    if rel_bias_table is not None:
        check_tensor("rel_bias_table", rel_bias_table, like=q)
        rows = math.prod([2 * w - 1 for w in window])
        if tuple(rel_bias_table.shape) != (rows, heads):
            raise ValueError(f"rel_bias_table must have shape [{rows}, {heads}] (prod(2w - 1) over window "
                             f"{window}, heads), got {tuple(rel_bias_table.shape)}")
    if rel_bias is not None:
        check_tensor("rel_bias", rel_bias, like=q)
        if tuple(rel_bias.shape) != (heads, N, N):
            raise ValueError(f"rel_bias must have shape [{heads}, {N}, {N}] (heads, window tokens, window tokens), "
                             f"got {tuple(rel_bias.shape)}")
    if logit_scale is not None:
        check_tensor("logit_scale", logit_scale, like=q)
        if logit_scale.numel() != heads:
            raise ValueError(f"logit_scale must have {heads} elements (one per head), got shape "
                             f"{tuple(logit_scale.shape)}")
        if scale is not None:
            raise ValueError("scale must be None with logit_scale (cosine attention has no dot-product scale)")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if pad_kv is not None:
        if not (isinstance(pad_kv, (tuple, list)) and len(pad_kv) == 2):
            raise TypeError(f"pad_kv must be a pair (k_pad, v_pad) of [heads, d] tensors or None, got {pad_kv!r}")
        for name, t in zip(("pad_kv[0]", "pad_kv[1]"), pad_kv):
            check_tensor(name, t, like=q)
            if tuple(t.shape) != (heads, d):
                raise ValueError(f"{name} must have shape [{heads}, {d}] (heads, d), got {tuple(t.shape)}")
    if isinstance(mask_value, bool) or not isinstance(mask_value, (int, float)) or math.isnan(mask_value) \
            or mask_value > 0:
        raise ValueError(f"mask_value must be a float <= 0 (-100 like the peers, or -inf), got {mask_value!r}")
    return window, shift


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size, shift_size=0, *,
                     rel_bias_table: torch.Tensor | None = None, rel_bias: torch.Tensor | None = None,
                     logit_scale: torch.Tensor | None = None, scale: float | None = None,
                     pad_kv: tuple[torch.Tensor, torch.Tensor] | None = None, pad_first: bool = True,
                     mask_value: float = -100.0, backend: str | None = None) -> torch.Tensor:
    """Shifted-window attention over 2D or 3D tokens; see the module docstring for the exact semantics."""
    window, shift = _check(q, k, v, window_size, shift_size, rel_bias_table, rel_bias, logit_scale, scale, pad_kv,
                           pad_first, mask_value)
    if logit_scale is None and scale is None:
        scale = q.shape[-1] ** -0.5
    pad_k, pad_v = pad_kv if pad_kv is not None else (None, None)
    args = (q, k, v, list(window), list(shift), rel_bias_table, rel_bias,
            logit_scale.reshape(-1) if logit_scale is not None else None, None if scale is None else float(scale),
            pad_k, pad_v, bool(pad_first), float(mask_value))
    name = _backend.choose(OP, backend, q)
    return _IMPLEMENTATIONS[name](*args)


# ----------------------------------------------------------------------------------------------------------------
# Kernel backends. Every kernel family (the C++ ops in csrc/, the Triton custom ops over pyvl.kernels) provides two
# ops with one schema, and register_kernel_family gives them fake kernels and autograd:
#
#   window_attention(Tensor q, Tensor k, Tensor v, int[] window, int[] shift, Tensor? rel_bias_table,
#       Tensor? rel_bias, Tensor? logit_scale, float? scale, Tensor? pad_k, Tensor? pad_v, bool pad_first,
#       float mask_value) -> (Tensor out, Tensor lse)
#     out: q's shape, contiguous, q's dtype. lse: (B, *S, heads), float32 (float64 for float64 inputs), the
#     log-sum-exp of every real query's logits (what the backward needs to rebuild the probabilities).
#   window_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int[] window,
#       int[] shift, Tensor? rel_bias_table, Tensor? rel_bias, Tensor? logit_scale, float? scale, Tensor? pad_k,
#       Tensor? pad_v, bool pad_first, float mask_value, bool[] needs) -> (Tensor dq, Tensor dk, Tensor dv,
#       Tensor d_rel_bias_table, Tensor d_rel_bias, Tensor d_logit_scale, Tensor d_pad_k, Tensor d_pad_v)
#     needs: 8 flags, which of the 8 gradients to compute; a gradient not needed (or whose input is None) comes back
#     as an empty tensor of shape [0]. Gradients have their input's shape and dtype (dq, dk, dv contiguous).
#
# The arguments the ops see are normalized by window_attention() below: window and shift per spatial dim (shift
# already zeroed where the window covers the padded size), logit_scale flattened to [heads], scale a float unless
# logit_scale is given. q, k, v may have any strides with a unit stride on d.

_IMPLEMENTATIONS = {"reference": ref.window_attention}
_GRAD_INPUTS = (0, 1, 2, 5, 6, 7, 9, 10)  # positions in the forward's arguments of q, k, v, table, bias, ls, pk, pv


def _fake_forward(q, k, v, window, shift, table, bias, logit_scale, scale, pad_k, pad_v, pad_first, mask_value):
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=stats)


def _fake_backward(grad_out, q, k, v, out, lse, window, shift, table, bias, logit_scale, scale, pad_k, pad_v,
                   pad_first, mask_value, needs):
    inputs = (q, k, v, table, bias, logit_scale, pad_k, pad_v)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None and need
                 else q.new_empty((0,)) for t, need in zip(inputs, needs))


def register_kernel_family(backend: str, forward_op: str, backward_op: str) -> None:
    """Registers fake kernels and autograd for a (forward, backward) pair of ops with the schema above, and makes
    `backend` run window_attention through them. forward_op / backward_op: qualified names ("pyvl::...")."""
    torch.library.register_fake(forward_op)(_fake_forward)
    torch.library.register_fake(backward_op)(_fake_backward)
    fwd = getattr(torch.ops.pyvl, forward_op.split("::")[1]).default
    bwd = getattr(torch.ops.pyvl, backward_op.split("::")[1]).default

    def setup_context(ctx, inputs, output):
        q, k, v, window, shift, table, bias, logit_scale, scale, pad_k, pad_v, pad_first, mask_value = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], table, bias, logit_scale, pad_k, pad_v)
        ctx.static = (window, shift, scale, pad_first, mask_value)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, table, bias, logit_scale, pad_k, pad_v = ctx.saved_tensors
        window, shift, scale, pad_first, mask_value = ctx.static
        needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
        grads = bwd(grad_out.contiguous(), q, k, v, out, lse, window, shift, table, bias, logit_scale, scale, pad_k,
                    pad_v, pad_first, mask_value, needs)
        g = [gr if need else None for gr, need in zip(grads, needs)]
        return g[0], g[1], g[2], None, None, g[3], g[4], g[5], None, g[6], g[7], None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    _IMPLEMENTATIONS[backend] = lambda *args: fwd(*args)[0]


if _ext.LOAD_ERROR is None:
    register_kernel_family("cpu", "pyvl::window_attention", "pyvl::window_attention_backward")


# ----------------------------------------------------------------------------------------------------------------
# Triton ops: custom ops over the launchers in pyvl.kernels.window_attention (custom_op rather than triton_op: the
# latter fails under torch.compile and opcheck in the interpreter, see STYLE.md).


def _triton():
    from ..kernels import window_attention as kernels

    return kernels


@torch.library.custom_op("pyvl::window_attention_triton", mutates_args=())
def _window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: list[int], shift: list[int],
                             rel_bias_table: torch.Tensor | None, rel_bias: torch.Tensor | None,
                             logit_scale: torch.Tensor | None, scale: float | None, pad_k: torch.Tensor | None,
                             pad_v: torch.Tensor | None, pad_first: bool,
                             mask_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton().window_attention_forward(q, k, v, window, shift, rel_bias_table, rel_bias, logit_scale, scale,
                                              pad_k, pad_v, pad_first, mask_value)


@torch.library.custom_op("pyvl::window_attention_backward_triton", mutates_args=())
def _window_attention_backward_triton(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, window: list[int], shift: list[int], rel_bias_table: torch.Tensor | None,
        rel_bias: torch.Tensor | None, logit_scale: torch.Tensor | None, scale: float | None,
        pad_k: torch.Tensor | None, pad_v: torch.Tensor | None, pad_first: bool, mask_value: float,
        needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().window_attention_backward(grad_out, q, k, v, out, lse, window, shift, rel_bias_table, rel_bias,
                                               logit_scale, scale, pad_k, pad_v, pad_first, mask_value, needs)


register_kernel_family("triton", "pyvl::window_attention_triton", "pyvl::window_attention_backward_triton")

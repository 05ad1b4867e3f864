"""Reference window attention (Swin, Swin V2, Video Swin): the peers' algorithm written out in PyTorch.

Pad, roll, partition into windows, logits (+ relative position bias + shift mask), softmax, values, reverse:
every step materialized, nothing fused. It is the ground truth for the kernels, and its autograd gives every
gradient. The geometry is described in pyvl.ops.window_attention; the arguments here are already checked and
normalized by that op (tuples per spatial dim, effective shifts, scale a float).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_MAX_LOGIT_SCALE = math.log(100.0)


def padded_size(size: int, window: int) -> int:
    return -(-size // window) * window


def region_labels(padded: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Per window-grid position along one dim: 0, 1 or 2, the shift-mask region (all 0 without a shift)."""
    r = torch.arange(padded, device=device)
    if shift == 0:
        return torch.zeros_like(r)
    return (r >= padded - window).long() + (r >= padded - shift).long()


def relative_position_index(window: tuple[int, ...], device=None) -> torch.Tensor:
    """[N, N] index into the relative position bias table, N = prod(window), windows in row-major order."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij"))
    coords = coords.flatten(1)  # [nd, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [nd, N, N]
    index = torch.zeros(rel.shape[1:], dtype=torch.long, device=device)
    for dim, w in enumerate(window):
        later = math.prod([2 * v - 1 for v in window[dim + 1:]])
        index += (rel[dim] + w - 1) * later
    return index


def _to_grid(t: torch.Tensor, fill: torch.Tensor | None, window, shift, pad_first: bool) -> torch.Tensor:
    """(B, *S, heads, d) -> (B, *Sp, heads, d): the tokens as the window grid holds them (padded and rolled)."""
    nd = len(window)
    sizes = t.shape[1:1 + nd]
    padded = [padded_size(s, w) for s, w in zip(sizes, window)]
    dims = tuple(range(1, 1 + nd))
    shape = (t.shape[0], *padded, *t.shape[-2:])
    grid = (fill.to(t.dtype).expand(shape) if fill is not None else t.new_zeros(()).expand(shape)).clone()
    inner = (slice(None),) + tuple(slice(0, s) for s in sizes)
    if pad_first:
        grid[inner] = t
        return torch.roll(grid, [-s for s in shift], dims) if any(shift) else grid
    grid[inner] = torch.roll(t, [-s for s in shift], dims) if any(shift) else t
    return grid


def _from_grid(grid: torch.Tensor, sizes, window, shift, pad_first: bool) -> torch.Tensor:
    nd = len(window)
    dims = tuple(range(1, 1 + nd))
    inner = (slice(None),) + tuple(slice(0, s) for s in sizes)
    if pad_first:
        grid = torch.roll(grid, list(shift), dims) if any(shift) else grid
        return grid[inner]
    out = grid[inner]
    return torch.roll(out, list(shift), dims) if any(shift) else out


def _partition(grid: torch.Tensor, window) -> torch.Tensor:
    """(B, *Sp, heads, d) -> (B, nW, heads, N, d)."""
    nd = len(window)
    B, heads, d = grid.shape[0], grid.shape[-2], grid.shape[-1]
    counts = [grid.shape[1 + i] // w for i, w in enumerate(window)]
    split = [B]
    for c, w in zip(counts, window):
        split += [c, w]
    x = grid.reshape(*split, heads, d)
    # dims: 0 B, (1 + 2i) count_i, (2 + 2i) w_i, 1 + 2nd heads, 2 + 2nd d
    perm = [0] + [1 + 2 * i for i in range(nd)] + [1 + 2 * nd] + [2 + 2 * i for i in range(nd)] + [2 + 2 * nd]
    return x.permute(perm).reshape(B, math.prod(counts), heads, math.prod(window), d)


def _reverse(windows: torch.Tensor, padded, window) -> torch.Tensor:
    """(B, nW, heads, N, d) -> (B, *Sp, heads, d)."""
    nd = len(window)
    B, heads, d = windows.shape[0], windows.shape[2], windows.shape[-1]
    counts = [p // w for p, w in zip(padded, window)]
    x = windows.reshape(B, *counts, heads, *window, d)
    # dims: 0 B, 1..nd counts, nd+1 heads, nd+2..2nd+1 window, 2nd+2 d
    perm = [0]
    for i in range(nd):
        perm += [1 + i, nd + 2 + i]
    perm += [nd + 1, 2 * nd + 2]
    return x.permute(perm).reshape(B, *padded, heads, d)


def shift_mask(padded, window, shift, device=None) -> torch.Tensor | None:
    """[nW, N, N] bool, True where query and key of a window lie in different shift regions; None if no shift."""
    if not any(shift):
        return None
    labels = None
    for p, w, s in zip(padded, window, shift):
        lab = region_labels(p, w, s, device)
        labels = lab if labels is None else labels[..., None] * 3 + lab
    lab = _partition(labels.reshape(1, *padded, 1, 1), window).reshape(-1, math.prod(window))  # [nW, N]
    return lab[:, :, None] != lab[:, None, :]


def window_attention(q, k, v, window_size, shift_size, rel_bias_table=None, rel_bias=None, logit_scale=None,
                     scale=None, pad_k=None, pad_v=None, pad_first=True, mask_value=-100.0):
    """Window attention of q, k, v (B, *S, heads, d) with S two or three sizes; returns (B, *S, heads, d).

    window_size, shift_size: tuples with one entry per spatial dim, shift already zeroed where window >= padded
    size. logit_scale: [heads] (cosine attention) or None; scale: float used when logit_scale is None.
    """
    window, shift = tuple(window_size), tuple(shift_size)
    nd = len(window)
    sizes = tuple(q.shape[1:1 + nd])
    padded = [padded_size(s, w) for s, w in zip(sizes, window)]
    B, heads, d = q.shape[0], q.shape[-2], q.shape[-1]
    N = math.prod(window)
    qw = _partition(_to_grid(q, None, window, shift, pad_first), window)
    kw = _partition(_to_grid(k, pad_k, window, shift, pad_first), window)
    vw = _partition(_to_grid(v, pad_v, window, shift, pad_first), window)
    if logit_scale is not None:
        tau = torch.clamp(logit_scale.reshape(heads), max=LOG_MAX_LOGIT_SCALE).exp()
        attn = F.normalize(qw, dim=-1) @ F.normalize(kw, dim=-1).transpose(-2, -1)
        attn = attn * tau.to(attn.dtype).view(heads, 1, 1)
    else:
        attn = (qw * scale) @ kw.transpose(-2, -1)
    if rel_bias_table is not None:
        index = relative_position_index(window, q.device)
        attn = attn + rel_bias_table[index.reshape(-1)].reshape(N, N, heads).permute(2, 0, 1).to(attn.dtype)
    elif rel_bias is not None:
        attn = attn + rel_bias.to(attn.dtype)
    mask = shift_mask(padded, window, shift, q.device)
    if mask is not None:
        attn = attn + torch.zeros(mask.shape, dtype=attn.dtype, device=q.device).masked_fill(mask, mask_value)[
            None, :, None]
    out = attn.softmax(dim=-1) @ vw  # (B, nW, heads, N, d)
    return _from_grid(_reverse(out, padded, window), sizes, window, shift, pad_first).contiguous()

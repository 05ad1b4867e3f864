"""Tier 1: the window-attention reference against the contract written out token by token, and against
torchvision's own functional shifted_window_attention (2D, V2 cosine) and shifted_window_attention_3d."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pyvl.ops.window_attention import normalize_window_args
from pyvl.reference import window_attention as ref


def _direct(q, k, v, window, shift, table=None, dense=None, logit_scale=None, scale=None, pad_k=None, pad_v=None,
            pad_first=True, mask_value=-100.0):
    """Every query token of the window grid visits the keys of its window: index arithmetic, no roll, no view."""
    nd = len(window)
    B, sizes, heads, d = q.shape[0], q.shape[1:1 + nd], q.shape[-2], q.shape[-1]
    padded = [-(-s // w) * w for s, w in zip(sizes, window)]
    pad_k = torch.zeros(heads, d, dtype=q.dtype) if pad_k is None else pad_k
    pad_v = torch.zeros(heads, d, dtype=q.dtype) if pad_v is None else pad_v

    def token(r):  # the token a grid position holds, or None for padding
        idx = []
        for ri, S, Sp, s in zip(r, sizes, padded, shift):
            if pad_first:
                p = (ri + s) % Sp
                if p >= S:
                    return None
                idx.append(p)
            else:
                if ri >= S:
                    return None
                idx.append((ri + s) % S)
        return tuple(idx)

    def label(r):
        return tuple(0 if s == 0 else (0 if ri < Sp - w else 1 if ri < Sp - s else 2)
                     for ri, Sp, w, s in zip(r, padded, window, shift))

    out = torch.full_like(q, float("nan"))
    for b in range(B):
        for r in itertools.product(*[range(p) for p in padded]):
            tq = token(r)
            if tq is None:
                continue
            start = [ri - ri % w for ri, w in zip(r, window)]
            keys = list(itertools.product(*[range(s0, s0 + w) for s0, w in zip(start, window)]))
            logits = torch.empty(heads, len(keys), dtype=q.dtype)
            vals = torch.empty(len(keys), heads, d, dtype=q.dtype)
            qi = q[(b,) + tq]
            for j, rk in enumerate(keys):
                tk = token(rk)
                kj = k[(b,) + tk] if tk is not None else pad_k
                vals[j] = v[(b,) + tk] if tk is not None else pad_v
                if logit_scale is not None:
                    cos = (qi * kj).sum(-1) / (qi.norm(dim=-1).clamp_min(1e-12) * kj.norm(dim=-1).clamp_min(1e-12))
                    logit = cos * logit_scale.clamp(max=math.log(100)).exp()
                else:
                    logit = (qi * kj).sum(-1) * scale
                ci = [ri % w for ri, w in zip(r, window)]
                cj = [ri % w for ri, w in zip(rk, window)]
                if table is not None:
                    idx = sum((a - c + w - 1) * math.prod(2 * x - 1 for x in window[i + 1:])
                              for i, (a, c, w) in enumerate(zip(ci, cj, window)))
                    logit = logit + table[idx]
                if dense is not None:
                    flat = lambda c: sum(x * math.prod(window[i + 1:]) for i, x in enumerate(c))  # noqa: E731
                    logit = logit + dense[:, flat(ci), flat(cj)]
                if label(r) != label(rk):
                    logit = logit + mask_value
                logits[:, j] = logit
            p = logits.softmax(-1)
            out[(b,) + tq] = torch.einsum("hj,jhd->hd", p, vals)
    return out


def _inputs(shape, heads, d, window, seed, cosine=False, table=True, pad=True):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = (rnd(*shape, heads, d) for _ in range(3))
    rows = math.prod(2 * w - 1 for w in window)
    N = math.prod(window)
    extra = dict(table=rnd(rows, heads) if table else None, dense=None if table else rnd(heads, N, N),
                 logit_scale=rnd(heads).abs() * 3 if cosine else None, scale=None if cosine else d ** -0.5,
                 pad_k=rnd(heads, d) if pad else None, pad_v=rnd(heads, d) if pad else None)
    return q, k, v, extra


CASES = [
    # (spatial shape, window, shift, pad_first, cosine, table, pad_kv, mask_value)
    ((5, 7), (3, 4), (1, 2), True, False, True, True, -100.0),
    ((5, 7), (3, 4), (1, 2), False, False, True, True, -100.0),
    ((6, 8), (3, 4), (2, 1), True, True, True, False, -100.0),
    ((4, 5), (4, 3), (0, 1), False, False, False, True, float("-inf")),
    ((2, 3), (3, 3), (1, 1), True, False, True, True, -100.0),  # smaller than the window: shift ignored
    ((2, 3), (3, 3), (1, 2), False, False, True, True, -100.0),  # timm keeps it: roll 2 tokens, pad, mask
    ((3, 5, 4), (2, 3, 3), (1, 1, 1), True, False, True, True, -100.0),
    ((3, 5, 4), (2, 3, 3), (1, 2, 1), False, True, False, True, -100.0),
]


@pytest.mark.parametrize("shape,window,shift,pad_first,cosine,table,pad,mask_value", CASES)
def test_reference_matches_token_by_token_contract(shape, window, shift, pad_first, cosine, table, pad, mask_value):
    q, k, v, e = _inputs((2,) + shape, 3, 5, window, seed=len(shape) + sum(shift), cosine=cosine, table=table,
                         pad=pad)
    window, shift = normalize_window_args(q, window, shift, pad_first)
    got = ref.window_attention(q, k, v, window, shift, e["table"], e["dense"], e["logit_scale"], e["scale"],
                               e["pad_k"], e["pad_v"], pad_first, mask_value)
    want = _direct(q, k, v, window, shift, mask_value=mask_value, pad_first=pad_first, **e)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_shift_is_zeroed_where_the_window_covers_the_padded_size():
    q = torch.zeros(1, 5, 9, 1, 2)
    assert normalize_window_args(q, (7, 3), (3, 1)) == ((7, 3), (0, 1))
    assert normalize_window_args(q, 5, 2) == ((5, 5), (0, 2))
    assert normalize_window_args(q, (7, 3), (3, 1), pad_first=False) == ((7, 3), (3, 1))


def _qkv_views(x, qkv_weight, qkv_bias, heads):
    """The kernel-facing q, k, v views of one projection of tokens x (B, *S, C): (B, *S, heads, d) each."""
    C = x.shape[-1]
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(*x.shape[:-1], 3, heads, C // heads)
    pad = qkv_bias.reshape(3, heads, C // heads) if qkv_bias is not None else None
    return qkv.unbind(-3), pad


@pytest.mark.parametrize("size,shift,v2", [((10, 9), (2, 2), False), ((14, 14), (3, 3), False),
                                           ((5, 6), (0, 0), False), ((11, 8), (2, 2), True)])
def test_reference_matches_torchvision_2d(size, shift, v2):
    from torchvision.models.swin_transformer import shifted_window_attention

    g = torch.Generator().manual_seed(3)
    heads, C, window = 2, 8, (7, 7)
    x = torch.randn(2, *size, C, generator=g, dtype=torch.float64)
    qkv_w = torch.randn(3 * C, C, generator=g, dtype=torch.float64) / C ** 0.5
    qkv_b = torch.randn(3 * C, generator=g, dtype=torch.float64)
    table = torch.randn(13 * 13, heads, generator=g, dtype=torch.float64)
    logit_scale = torch.randn(heads, 1, 1, generator=g, dtype=torch.float64).abs() + 1 if v2 else None
    if v2:  # torchvision zeroes the key part of the qkv bias in V2
        qkv_b[C:2 * C] = 0
    index = ref.relative_position_index(window)
    bias = table[index.reshape(-1)].reshape(49, 49, heads).permute(2, 0, 1)
    eye = torch.eye(C, dtype=torch.float64)
    want = shifted_window_attention(x, qkv_w, eye, bias[None], list(window), heads, list(shift), qkv_bias=qkv_b,
                                    logit_scale=logit_scale, training=False)
    (q, k, v), pad = _qkv_views(x, qkv_w, qkv_b, heads)
    w, s = normalize_window_args(q, window, shift)
    got = ref.window_attention(q, k, v, w, s, table, None, logit_scale.reshape(-1) if v2 else None,
                               None if v2 else (C // heads) ** -0.5, pad[1], pad[2], True, -100.0)
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size,window,shift", [((4, 10, 9), (2, 7, 7), (1, 3, 3)), ((3, 6, 8), (2, 3, 4), (1, 1, 2))])
def test_reference_matches_torchvision_3d(size, window, shift):
    from torchvision.models.video.swin_transformer import shifted_window_attention_3d

    g = torch.Generator().manual_seed(4)
    heads, C = 2, 8
    x = torch.randn(1, *size, C, generator=g, dtype=torch.float64)
    qkv_w = torch.randn(3 * C, C, generator=g, dtype=torch.float64) / C ** 0.5
    qkv_b = torch.randn(3 * C, generator=g, dtype=torch.float64)
    rows = math.prod(2 * w - 1 for w in window)
    N = math.prod(window)
    table = torch.randn(rows, heads, generator=g, dtype=torch.float64)
    bias = table[ref.relative_position_index(window).reshape(-1)].reshape(N, N, heads).permute(2, 0, 1)
    want = shifted_window_attention_3d(x, qkv_w, torch.eye(C, dtype=torch.float64), bias[None], list(window), heads,
                                       list(shift), qkv_bias=qkv_b, training=False)
    (q, k, v), pad = _qkv_views(x, qkv_w, qkv_b, heads)
    w, s = normalize_window_args(q, window, shift)
    got = ref.window_attention(q, k, v, w, s, table, None, None, (C // heads) ** -0.5, pad[1], pad[2], True, -100.0)
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-9, atol=1e-9)

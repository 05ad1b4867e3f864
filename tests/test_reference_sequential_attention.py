"""Tier 1: the sequential-attention reference against float64 math written out row by row."""
import math

import pytest
import torch

from pyvl.reference.sequential_attention import sequential_attention


def _direct(q, k, v, bias, scale):
    """Each output row as sum_j exp(s_j - max) v_j / sum_j exp(s_j - max), in Python floats."""
    B, H, N, d = q.shape
    M, dv = k.shape[2], v.shape[3]
    full = bias.expand(B, H, N, M) if bias is not None else None
    out = torch.empty(B, H, N, dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                s = [scale * sum(float(q[b, h, i, c]) * float(k[b, h, j, c]) for c in range(d))
                     + (float(full[b, h, i, j]) if full is not None else 0.0) for j in range(M)]
                top = max(s)
                w = [math.exp(x - top) for x in s]
                total = sum(w)
                for c in range(dv):
                    out[b, h, i, c] = sum(w[j] * float(v[b, h, j, c]) for j in range(M)) / total
    return out


@pytest.mark.parametrize("bias_shape", [None, (5, 7), (3, 5, 7), (2, 1, 5, 7), (1, 3, 5, 7), (2, 3, 5, 7),
                                        (2, 3, 1, 7)])
def test_matches_rowwise_softmax(bias_shape):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(bias_shape, generator=g, dtype=torch.float64) if bias_shape else None
    got = sequential_attention(q, k, v, bias)
    torch.testing.assert_close(got, _direct(q, k, v, bias, 4 ** -0.5), rtol=1e-12, atol=1e-12)
    scaled = sequential_attention(q, k, v, bias, scale=0.3)
    torch.testing.assert_close(scaled, _direct(q, k, v, bias, 0.3), rtol=1e-12, atol=1e-12)


def test_matches_sdpa_with_float_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 9, 9, generator=g, dtype=torch.float64)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(sequential_attention(q, k, v, bias), want, rtol=1e-12, atol=1e-12)


def test_nan_policy():
    # A row whose bias is all -inf has no key to attend to: NaN, like torch.softmax and SDPA. The other rows are
    # untouched, -inf entries get zero weight, and a NaN in q poisons only its own row.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.zeros(4, 4, dtype=torch.float64)
    bias[1] = -math.inf
    bias[2, :3] = -math.inf
    out = sequential_attention(q, k, v, bias)
    assert torch.isnan(out[0, 0, 1]).all()
    assert torch.isfinite(out[0, 0, [0, 2, 3]]).all()
    torch.testing.assert_close(out[0, 0, 2], v[0, 0, 3], rtol=1e-12, atol=1e-12)
    q2 = q.clone()
    q2[0, 0, 3, 0] = math.nan
    out2 = sequential_attention(q2, k, v)
    assert torch.isnan(out2[0, 0, 3]).all() and torch.isfinite(out2[0, 0, :3]).all()


def test_bias_gradient_reduces_to_the_bias_shape():
    # d out / d bias for a bias shared over batch and heads is the sum of the per-(b, h) gradients.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 6, 2, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 3, 5, 2, generator=g, dtype=torch.float64)
    shared = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    full = shared.detach().expand(2, 3, 5, 6).clone().requires_grad_()
    g_shared, = torch.autograd.grad(sequential_attention(q, k, v, shared), shared, grad)
    g_full, = torch.autograd.grad(sequential_attention(q, k, v, full), full, grad)
    assert g_shared.shape == (5, 6)
    torch.testing.assert_close(g_shared, g_full.sum((0, 1)), rtol=1e-12, atol=1e-12)

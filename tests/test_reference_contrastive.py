"""Tier 1: pyvl.reference.contrastive against float64 formulas written element by element, and against open_clip's
ClipLoss / SigLipLoss where open_clip is installed."""
import math

import pytest
import torch

from pyvl.reference import contrastive as ref


def _features(N, d, seed=0, unit=True, M=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = torch.randn(M or N, d, generator=g, dtype=torch.float64)
    if unit:
        x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    return x, y


def _logit(x, y, i, j, scale, bias):
    return scale * sum(float(x[i, k]) * float(y[j, k]) for k in range(x.shape[1])) + (bias or 0.0)


def _lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _softmax_loss_loop(x, y, scale, bias):
    N = x.shape[0]
    L = [[_logit(x, y, i, j, scale, bias) for j in range(N)] for i in range(N)]
    rows = sum(_lse(L[i]) - L[i][i] for i in range(N)) / N
    cols = sum(_lse([L[i][j] for i in range(N)]) - L[j][j] for j in range(N)) / N
    return (rows + cols) / 2


def _sigmoid_loss_loop(x, y, scale, bias):
    N = x.shape[0]
    total = 0.0
    for i in range(N):
        for j in range(N):
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * _logit(x, y, i, j, scale, bias)))  # -log sigmoid(z * logit)
    return total / N


@pytest.mark.parametrize("N,d", [(1, 3), (5, 7), (9, 4)])
@pytest.mark.parametrize("bias", [None, -1.5])
def test_softmax_loss_matches_loops(N, d, bias):
    x, y = _features(N, d, seed=N)
    out = ref.contrastive_loss(x, y, torch.tensor(14.3, dtype=torch.float64), bias, "softmax")
    assert math.isclose(float(out), _softmax_loss_loop(x, y, 14.3, bias), rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("N,d", [(1, 3), (6, 5), (8, 2)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.5)])
def test_sigmoid_loss_matches_loops(N, d, scale, bias):
    x, y = _features(N, d, seed=N + 1)
    out = ref.contrastive_loss(x, y, scale, bias, "sigmoid")
    assert math.isclose(float(out), _sigmoid_loss_loop(x, y, scale, bias), rel_tol=1e-12, abs_tol=1e-12)


def test_softmax_bias_cancels():
    x, y = _features(7, 5)
    a = ref.contrastive_loss(x, y, 10.0, None, "softmax")
    b = ref.contrastive_loss(x, y, 10.0, 3.0, "softmax")
    assert math.isclose(float(a), float(b), rel_tol=1e-13)


@pytest.mark.parametrize("kind", [0, 1])
def test_stats_match_loops(kind):
    x, y = _features(6, 4, seed=3, M=9)
    row, col, diag = ref.contrastive_stats(x, y, 5.0, -0.5, kind, 4)
    L = [[_logit(x, y, i, j, 5.0, -0.5) for j in range(9)] for i in range(6)]
    want_diag = [L[i][i + 4] if i + 4 < 9 else 0.0 for i in range(6)]
    torch.testing.assert_close(diag, torch.tensor(want_diag, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    if kind == 0:
        want_row = [_lse(r) for r in L]
        want_col = [_lse([L[i][j] for i in range(6)]) for j in range(9)]
        torch.testing.assert_close(col, torch.tensor(want_col, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    else:
        want_row = [sum(math.log1p(math.exp(v)) for v in r) for r in L]  # softplus
        assert col.numel() == 0
    torch.testing.assert_close(row, torch.tensor(want_row, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_similarity_matches_loops_with_broadcast(normalize):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)  # [templates, classes-ish, N, d]
    b = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)  # [3, M, d] broadcast against a's leading (2, 3)
    a[0, 0, 1] = 0.0  # a zero row: F.normalize keeps it zero (eps), so its logits are the bias
    out = ref.similarity_logits(a, b, 2.5, -1.0, normalize)
    assert out.shape == (2, 3, 4, 6)
    for t in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(6):
                    u, v = a[t, c, i], b[c, j]
                    if normalize:
                        u = u / max(float(u.norm()), 1e-12)
                        v = v / max(float(v.norm()), 1e-12)
                    want = 2.5 * float((u * v).sum()) - 1.0
                    assert math.isclose(float(out[t, c, i, j]), want, rel_tol=1e-12, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# open_clip parity (the reference is what pyvl's kernels are tested against, so it must be open_clip's loss)


@pytest.mark.parametrize("N,d", [(1, 8), (13, 16), (32, 7)])
@pytest.mark.parametrize("bias", [None, 2.0])
def test_softmax_matches_open_clip(N, d, bias):
    loss_mod = pytest.importorskip("open_clip.loss")
    x, y = _features(N, d, seed=d)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64).exp()  # open_clip passes logit_scale.exp()
    b = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    want = loss_mod.ClipLoss()(x, y, scale, b)
    torch.testing.assert_close(ref.contrastive_loss(x, y, scale, b, "softmax"), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("N,d", [(1, 8), (13, 16), (32, 7)])
def test_sigmoid_matches_open_clip(N, d):
    loss_mod = pytest.importorskip("open_clip.loss")
    x, y = _features(N, d, seed=d + 1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    want = loss_mod.SigLipLoss()(x, y, scale, bias)
    torch.testing.assert_close(ref.contrastive_loss(x, y, scale, bias, "sigmoid"), want, rtol=1e-13, atol=1e-13)

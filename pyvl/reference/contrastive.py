"""Pure-PyTorch references for the similarity logits and CLIP's / SigLIP's contrastive losses.

They materialize the N x M logits, as open_clip does; pyvl's kernels compute the same numbers tile by tile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12  # F.normalize's default


def similarity_logits(a, b, scale=1.0, bias=None, normalize=True):
    """scale * normalize(a) @ normalize(b)^T + bias over the last two dims, leading dims broadcast."""
    if normalize:
        a = F.normalize(a, dim=-1, eps=EPS)
        b = F.normalize(b, dim=-1, eps=EPS)
    out = (a @ b.transpose(-1, -2)) * scale
    return out if bias is None else out + bias


def logits(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip's logits_per_image: logit_scale * image @ text^T (+ logit_bias); [N, M]."""
    out = logit_scale * image_features @ text_features.T
    return out if logit_bias is None else out + logit_bias


def contrastive_loss(image_features, text_features, logit_scale, logit_bias=None, kind="softmax"):
    """open_clip's ClipLoss (kind="softmax") or SigLipLoss (kind="sigmoid") on one process.

    softmax: (CE(logits, arange) + CE(logits^T, arange)) / 2, logits = logit_scale * image @ text^T (+ bias).
    sigmoid: -sum(logsigmoid(labels * logits)) / N with labels = 2 * eye(N) - 1.
    logit_scale is used as given (open_clip passes model.logit_scale.exp()); features are not normalized here.
    """
    L = logits(image_features, text_features, logit_scale, logit_bias)
    N = L.shape[0]
    if kind == "softmax":
        labels = torch.arange(N, device=L.device)
        return (F.cross_entropy(L, labels) + F.cross_entropy(L.T, labels)) / 2
    labels = 2 * torch.eye(N, device=L.device, dtype=L.dtype) - 1
    return -F.logsigmoid(labels * L).sum() / N


def contrastive_stats(x, y, logit_scale, logit_bias, kind: int, diag_offset: int = 0):
    """What the kernels' contrastive_stats op computes, with the block of logits L materialized:
    kind 0: (logsumexp over columns [n], logsumexp over rows [m], diag); kind 1: (sum of softplus over columns [n],
    an empty [0], diag); diag[i] = L[i, i + diag_offset] (0 where that column is outside the block)."""
    L = logits(x, y, logit_scale, logit_bias)
    n, m = L.shape
    i = torch.arange(n, device=L.device)
    inside = (i + diag_offset >= 0) & (i + diag_offset < m)
    diag = torch.where(inside, L[i, (i + diag_offset).clamp(0, max(m - 1, 0))], L.new_zeros(()))
    if kind == 0:
        return L.logsumexp(1), L.logsumexp(0), diag
    return (-F.logsigmoid(-L)).sum(1), L.new_empty((0,)), diag

"""Pure-PyTorch reference for sequential (memory-bounded) attention: it materializes the [B, heads, N, M] scores.

Simple and obviously right: the ground truth for the tests and the `reference` backend of
pyvl.ops.sequential_attention. It takes already-validated arguments (the op checks them).

NaN policy, shared by every backend: a row whose scores are all -inf (a bias row of -inf) gives NaN, as
torch.softmax and F.scaled_dot_product_attention do; NaN inputs propagate.
"""
from __future__ import annotations

import torch


def sequential_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                         scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q [B, H, N, d], k [B, H, M, d], v [B, H, M, dv]; bias broadcastable
    to [B, H, N, M]; scale defaults to d ** -0.5."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)

"""Helpers for model-parity tests (a pyvl model against a peer library's)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize_norms"]


def randomize_norms(model: nn.Module, seed: int = 0, layer_norms: bool = False) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (and, with layer_norms, LayerNorm affine parameters).

    Freshly initialised norms are identities (weight 1, bias 0, mean 0, var 1), and some models zero-init a norm's
    weight (ResNet's last BN of a block), which would hide a whole branch from a parity test; random values make
    every parameter matter. Returns `model`, changed in place.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
            elif layer_norms and isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model

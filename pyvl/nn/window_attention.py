"""Window attention modules for Swin, Swin V2 and Video Swin: drop-in modules over pyvl.ops.window_attention.

Each module takes tokens in their natural layout, (B, H, W, C) or (B, T, H, W, C), projects them with one qkv
Linear, views the result as (B, *S, 3, heads, d) and hands the q, k, v views straight to the op: no roll, no
window partition, no mask here. Only the window geometry (window, shift, padding order) and the bias source are
decided here, following the peer named by the arguments:

- pad_first=True: pad, then roll (torchvision, the official Swin code); False: roll, then pad (timm).
- Padding tokens (sizes the window does not divide) are zero tokens in every peer, so their key and value are the
  qkv bias; the modules pass that bias to the op as pad_kv.
- shrink_to_input=True (torchvision / official Video Swin): where the input is no larger than the window
  (size <= window) the window shrinks to the input and that dim's shift becomes 0, decided on every forward.
  The bias is then taken, as those peers do, from the full window's relative position index cut to [:N, :N]
  (N the shrunk window's volume), which for a shrunk window is not the shrunk window's own relative positions;
  pyvl reproduces that with a dense rel_bias. timm shrinks 2D windows once, at construction, from its img_size:
  the models do that and pass the shrunk window here. timm models built with dynamic_img_size then keep that
  window for every input, and still shift a dim that one window covers; the op keeps such a shift with
  pad_first=False, as timm does.

Parameter names follow the peers (qkv, proj, relative_position_bias_table; V2: logit_scale, cpb_mlp, q_bias /
v_bias as timm or qkv.bias as torchvision), so peer state_dicts load as they are. Attention dropout is not
supported (the op has none); output dropout (proj_drop) is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.window_attention import _per_dim, relative_position_index, window_attention

__all__ = ["ContinuousPositionBias", "WindowAttention", "WindowAttention3D", "WindowAttentionV2",
           "relative_position_index"]


def _window_and_shift(window_size, shift_size, nd: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if nd not in (2, 3):
        raise ValueError(f"window_size must have 2 (image) or 3 (video) entries, got {window_size!r}")
    window, shift = _per_dim("window_size", window_size, nd, 1), _per_dim("shift_size", shift_size, nd, 0)
    if any(not 0 <= s < w for s, w in zip(shift, window)):
        raise ValueError(f"shift_size must satisfy 0 <= shift < window in every dim, got {shift} for {window}")
    return window, shift


def _nd_of(window_size) -> int:
    return len(window_size) if isinstance(window_size, (tuple, list)) else 2


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    n = index.shape[0]
    return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)


class _WindowAttentionBase(nn.Module):
    """Shared geometry and projection logic; subclasses define the bias and the logits' kind."""

    def __init__(self, dim: int, num_heads: int, window_size, shift_size, proj_drop: float, attn_drop: float,
                 pad_first: bool, shrink_to_input: bool, backend: str | None):
        super().__init__()
        if not (isinstance(dim, int) and isinstance(num_heads, int) and num_heads > 0 and dim % num_heads == 0):
            raise ValueError(f"dim must be a multiple of num_heads, got dim={dim!r}, num_heads={num_heads!r}")
        if attn_drop:
            raise ValueError(f"attn_drop must be 0 (pyvl.ops.window_attention has no attention dropout), "
                             f"got {attn_drop}")
        self.dim, self.num_heads = dim, num_heads
        self.window_size, self.shift_size = _window_and_shift(window_size, shift_size, _nd_of(window_size))
        self.pad_first, self.shrink_to_input, self.backend = bool(pad_first), bool(shrink_to_input), backend
        self._proj_drop = proj_drop

    def _make_projections(self, qkv_bias: bool) -> None:
        self.qkv = nn.Linear(self.dim, 3 * self.dim, bias=qkv_bias)
        self.proj = nn.Linear(self.dim, self.dim)
        self.proj_drop = nn.Dropout(self._proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, pad_first={self.pad_first}, shrink_to_input={self.shrink_to_input}")

    def geometry(self, sizes) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(window, shift) used for spatial sizes `sizes`, after this module's peer's shrink rule."""
        if not self.shrink_to_input:
            return self.window_size, self.shift_size
        window = tuple(min(s, w) for s, w in zip(sizes, self.window_size))
        shift = tuple(0 if s <= w else sh for s, w, sh in zip(sizes, self.window_size, self.shift_size))
        return window, shift

    def _qkv_bias(self) -> torch.Tensor | None:
        return self.qkv.bias

    def _bias_table(self) -> torch.Tensor:
        raise NotImplementedError

    def _logit_kwargs(self) -> dict:
        return {}

    def _bias(self, sizes, window, shift) -> tuple[tuple[int, ...], dict]:
        """(shift passed to the op, its bias arguments) for this input."""
        table = self._bias_table()
        if window != self.window_size:
            # A shrunk window (shrink_to_input): the peers' [:N, :N] cut of the full window's index.
            n = math.prod(window)
            return shift, {"rel_bias": _gather(table, relative_position_index(self.window_size, table.device)[:n, :n])}
        return shift, {"rel_bias_table": table}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.window_size)
        if x.dim() != nd + 2 or x.shape[-1] != self.dim:
            layout = "(B, H, W, C)" if nd == 2 else "(B, T, H, W, C)"
            raise ValueError(f"x must be {layout} with C={self.dim}, got shape {tuple(x.shape)}")
        B, *sizes, C = x.shape
        heads, d = self.num_heads, C // self.num_heads
        bias = self._qkv_bias()
        qkv = F.linear(x, self.qkv.weight, bias).view(B, *sizes, 3, heads, d)
        q, k, v = qkv.unbind(-3)
        window, shift = self.geometry(sizes)
        shift, bias_kwargs = self._bias(sizes, window, shift)
        pad_kv = None
        if bias is not None and any(s % w for s, w in zip(sizes, window)):
            pad_kv = (bias[C:2 * C].view(heads, d), bias[2 * C:].view(heads, d))
        out = window_attention(q, k, v, window, shift, pad_kv=pad_kv, pad_first=self.pad_first,
                               backend=self.backend, **bias_kwargs, **self._logit_kwargs())
        return self.proj_drop(self.proj(out.view(B, *sizes, C)))


class WindowAttention(_WindowAttentionBase):
    """Swin (V1) and Video Swin window attention: scaled dot product plus a learned relative position bias table.

    Args:
        dim, num_heads: channels and heads (d = dim // num_heads, scale d ** -0.5).
        window_size, shift_size: int or one entry per spatial dim; 2 entries for images, 3 for video
            (table [(2P-1)(2M-1)(2M-1), heads]).
        qkv_bias: a bias in the qkv projection (every peer's default).
        proj_drop: dropout on the output projection; attn_drop must be 0.
        pad_first, shrink_to_input: the peer's geometry (see the module docstring).
        backend: passed to pyvl.ops.window_attention.
    """

    def __init__(self, dim: int, num_heads: int, window_size=7, shift_size=0, *, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, pad_first: bool = True,
                 shrink_to_input: bool = False, backend: str | None = None):
        super().__init__(dim, num_heads, window_size, shift_size, proj_drop, attn_drop, pad_first, shrink_to_input,
                         backend)
        rows = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._make_projections(qkv_bias)

    def _bias_table(self) -> torch.Tensor:
        return self.relative_position_bias_table


class WindowAttention3D(WindowAttention):
    """Video Swin's 3D window attention (window P x M x M, table (2P-1)(2M-1)(2M-1)); shrink_to_input defaults to
    True, the rule of torchvision's SwinTransformer3d and the official Video Swin code."""

    def __init__(self, dim: int, num_heads: int, window_size=(8, 7, 7), shift_size=0, *, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, pad_first: bool = True,
                 shrink_to_input: bool = True, backend: str | None = None):
        if _nd_of(window_size) != 3:
            raise ValueError(f"window_size must have 3 entries (T, H, W), got {window_size!r}")
        super().__init__(dim, num_heads, window_size, shift_size, qkv_bias=qkv_bias, proj_drop=proj_drop,
                         attn_drop=attn_drop, pad_first=pad_first, shrink_to_input=shrink_to_input, backend=backend)


class ContinuousPositionBias(nn.Sequential):
    """Swin V2's log-spaced continuous position bias: Linear(2, 512) - ReLU - Linear(512, heads, bias=False)
    evaluated on the table of relative coordinates of a window, then 16 * sigmoid.

    Calling it (no input) gives the bias table [(2w0-1)(2w1-1), heads] that pyvl.ops.window_attention gathers.
    Coordinates dy, dx are divided by (pretrained_window - 1) (the window itself when pretrained_window_size is 0;
    at least 1, as timm), times 8, then sign * log2(|x| + 1) / log2(8). They are computed in float32 and kept in a
    non-persistent float32 buffer, as the peers compute them, so .double() gives the peers' float64 values.
    It is an nn.Sequential so its parameters are named like the peers' cpb_mlp (0.weight, 0.bias, 2.weight).
    """

    def __init__(self, window_size, num_heads: int, pretrained_window_size=0, hidden: int = 512):
        window = _per_dim("window_size", window_size, 2, 1)
        pretrained = _per_dim("pretrained_window_size", pretrained_window_size, 2, 0)
        super().__init__(nn.Linear(2, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_heads, bias=False))
        self.window_size, self.pretrained_window_size, self.num_heads = window, pretrained, num_heads
        self.register_buffer("relative_coords_table", self._coords(), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the coordinates table (after to_empty, as timm's modules of the same name)."""
        self.relative_coords_table = self._coords().to(self.relative_coords_table.device)

    def _coords(self) -> torch.Tensor:
        ref = self.pretrained_window_size if self.pretrained_window_size[0] > 0 else self.window_size
        axes = [torch.arange(-(w - 1), w, dtype=torch.float32) / max(r - 1, 1)
                for w, r in zip(self.window_size, ref)]
        table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2) * 8
        return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)

    def forward(self) -> torch.Tensor:
        coords = self.relative_coords_table.to(self[0].weight.dtype)
        return 16 * torch.sigmoid(super().forward(coords))


class WindowAttentionV2(_WindowAttentionBase):
    """Swin V2 window attention: scaled cosine attention (per-head logit_scale, clamped at log 100 by the op, as
    both peers clamp) plus the continuous position bias table.

    Args:
        dim, num_heads, window_size, shift_size, proj_drop, attn_drop, pad_first, backend: as WindowAttention
            (2D only).
        qkv_bias: "split" (timm: q_bias and v_bias parameters, a zero k bias), "fused" (torchvision: one qkv.bias
            whose k third is zeroed on every forward, so it never acts and gets no gradient), True (= "split") or
            False (no bias).
        pretrained_window_size: the window the CPB coordinates are normalized to (timm); 0 = the window itself.
    """

    def __init__(self, dim: int, num_heads: int, window_size=8, shift_size=0, *, qkv_bias="split",
                 pretrained_window_size=0, proj_drop: float = 0.0, attn_drop: float = 0.0, pad_first: bool = True,
                 backend: str | None = None):
        if _nd_of(window_size) != 2:
            raise ValueError(f"WindowAttentionV2 is 2D: window_size must have 2 entries, got {window_size!r}")
        super().__init__(dim, num_heads, window_size, shift_size, proj_drop, attn_drop, pad_first, False, backend)
        if qkv_bias is True:
            qkv_bias = "split"
        if qkv_bias not in ("split", "fused", False):
            raise ValueError(f"qkv_bias must be 'split', 'fused', True or False, got {qkv_bias!r}")
        self.qkv_bias_style = qkv_bias or None
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = ContinuousPositionBias(self.window_size, num_heads, pretrained_window_size)
        self._make_projections(qkv_bias == "fused")
        if qkv_bias == "fused":
            nn.init.zeros_(self.qkv.bias)
        if qkv_bias == "split":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))

    def _qkv_bias(self) -> torch.Tensor | None:
        if self.qkv_bias_style == "split":
            return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        if self.qkv_bias_style == "fused":
            b = self.qkv.bias
            return torch.cat((b[:self.dim], torch.zeros_like(b[:self.dim]), b[2 * self.dim:]))
        return None

    def _bias_table(self) -> torch.Tensor:
        return self.cpb_mlp()

    def _logit_kwargs(self) -> dict:
        return {"logit_scale": self.logit_scale}

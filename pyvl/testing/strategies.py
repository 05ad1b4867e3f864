"""Hypothesis strategies that draw whole kernel problems: shapes (odd and non-divisible), kernel geometry,
dtypes, layouts and non-contiguous inputs, under a byte cap so that every example stays small.

    from hypothesis import given
    from pyvl.testing import strategies as pst

    @given(pst.depthwise_problems())
    def test_my_kernel(problem):
        x, weight, bias = problem.make_inputs()
        ...
"""
from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

LAYOUTS = ("nchw", "channels_last", "sliced")


@dataclasses.dataclass(frozen=True)
class DepthwiseProblem:
    """One depthwise (or depthwise-separable) convolution problem."""

    N: int
    C: int
    H: int
    W: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    dtype: torch.dtype
    layout: str  # "nchw", "channels_last" or "sliced" (a non-contiguous view)
    bias: bool
    C_out: int = 1
    seed: int = 0

    def output_size(self) -> tuple[int, int]:
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip((self.H, self.W), self.kernel_size, self.stride, self.padding,
                                        self.dilation))

    def _tensor(self, gen, shape, device):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=self.dtype)

    def make_x(self, device="cpu") -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        if self.layout == "sliced":
            # Every other column of a wider tensor: strides no dense layout has.
            return self._tensor(gen, (self.N, self.C, self.H, 2 * self.W), device)[..., ::2]
        x = self._tensor(gen, (self.N, self.C, self.H, self.W), device)
        return x.contiguous(memory_format=torch.channels_last) if self.layout == "channels_last" else x

    def make_inputs(self, device="cpu"):
        """(x, weight [C, 1, KH, KW], bias [C] or None) for depthwise_conv2d."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        weight = self._tensor(gen, (self.C, 1) + self.kernel_size, device)
        bias = self._tensor(gen, (self.C,), device) if self.bias else None
        return self.make_x(device), weight, bias

    def make_pointwise(self, device="cpu"):
        """(pw_weight [C_out, C], pw_bias [C_out] or None) for dsconv2d."""
        gen = torch.Generator().manual_seed(self.seed + 2)
        pw_weight = self._tensor(gen, (self.C_out, self.C), device) / max(1.0, self.C ** 0.5)
        pw_bias = self._tensor(gen, (self.C_out,), device) if self.bias else None
        return pw_weight, pw_bias


@st.composite
def depthwise_problems(draw, *, dtypes=(torch.float32, torch.float64), kernel_sizes=(1, 3, 5, 7),
                       layouts=LAYOUTS, max_elements: int = 6000, max_stride: int = 3, max_dilation: int = 2,
                       C_out: bool = False) -> DepthwiseProblem:
    """A depthwise problem whose input has at most max_elements elements and whose output is not empty."""
    k = (draw(st.sampled_from(kernel_sizes)), draw(st.sampled_from(kernel_sizes)))
    dilation = (draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation)))
    stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
    padding = tuple(draw(st.integers(0, d * (kk - 1) // 2 + 1)) for kk, d in zip(k, dilation))
    # The smallest input with a non-empty output, then some more (odd sizes are as likely as even ones).
    min_hw = [max(1, d * (kk - 1) + 1 - 2 * p) for kk, d, p in zip(k, dilation, padding)]
    H = draw(st.integers(min_hw[0], min_hw[0] + 12))
    W = draw(st.integers(min_hw[1], min_hw[1] + 12))
    N = draw(st.integers(1, 3))
    C = draw(st.integers(1, max(1, min(40, max_elements // max(1, N * H * W)))))
    return DepthwiseProblem(
        N=N, C=C, H=H, W=W, kernel_size=k, stride=stride, padding=padding, dilation=dilation,
        dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(layouts)), bias=draw(st.booleans()),
        C_out=draw(st.integers(1, 24)) if C_out else 1, seed=draw(st.integers(0, 2**16)))


ATTENTION_LAYOUTS = ("contiguous", "bnhd", "sliced")


@dataclasses.dataclass(frozen=True)
class AttentionProblem:
    """One attention problem: q [B, H, N, d], k [B, H, M, d], v [B, H, M, dv] and a bias of `bias_shape`."""

    B: int
    H: int
    N: int
    M: int
    d: int
    dv: int
    bias_shape: tuple | None
    dtype: torch.dtype
    layout: str  # "contiguous", "bnhd" ([B, N, H, d] transposed, as models produce it) or "sliced"
    bias_layout: str  # "contiguous" or "sliced" (every other key column of a wider tensor)
    seed: int = 0

    def _tensor(self, gen, shape, layout, device):
        def make(s):
            return torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=self.dtype)

        if layout == "bnhd":
            B, H, L, E = shape
            return make((B, L, H, E)).transpose(1, 2)
        if layout == "sliced":
            return make(shape[:-1] + (2 * shape[-1],))[..., ::2]
        return make(shape)

    def make_inputs(self, device="cpu"):
        """(q, k, v, bias or None)."""
        gen = torch.Generator().manual_seed(self.seed)
        q = self._tensor(gen, (self.B, self.H, self.N, self.d), self.layout, device)
        k = self._tensor(gen, (self.B, self.H, self.M, self.d), self.layout, device)
        v = self._tensor(gen, (self.B, self.H, self.M, self.dv), self.layout, device)
        bias = None
        if self.bias_shape is not None:
            bias = self._tensor(gen, tuple(self.bias_shape), self.bias_layout, device)
        return q, k, v, bias


def _bias_shapes(B, H, N, M):
    return (None, (N, M), (H, N, M), (1, 1, N, M), (B, 1, N, M), (1, H, N, M), (B, H, N, M), (B, 1, 1, M))


@st.composite
def attention_problems(draw, *, dtypes=(torch.float32, torch.float64), max_n: int = 110, max_m: int = 200,
                       max_d: int = 40, max_scores: int = 40000, layouts=ATTENTION_LAYOUTS,
                       bias: bool | None = None) -> AttentionProblem:
    """An attention problem with at most max_scores elements in [B, H, N, M]: sizes on both sides of typical
    block sizes (48, 64, 96, 128), odd head dims, every bias form of pyvl.ops.sequential_attention. bias: True
    (always one), False (never) or None (either)."""
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    N = draw(st.integers(1, max_n))
    M = draw(st.integers(1, max(1, min(max_m, max_scores // (B * H * N)))))
    shapes = _bias_shapes(B, H, N, M)
    if bias is True:
        shapes = shapes[1:]
    elif bias is False:
        shapes = shapes[:1]
    return AttentionProblem(
        B=B, H=H, N=N, M=M, d=draw(st.integers(1, max_d)), dv=draw(st.integers(1, max_d)),
        bias_shape=draw(st.sampled_from(shapes)), dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(layouts)), bias_layout=draw(st.sampled_from(("contiguous", "sliced"))),
        seed=draw(st.integers(0, 2**16)))


WINDOW_LAYOUTS = ("contiguous", "qkv", "sliced")


@dataclasses.dataclass(frozen=True)
class WindowProblem:
    """One window-attention problem (pyvl.ops.window_attention): 2D or 3D tokens and the whole geometry."""

    B: int
    sizes: tuple[int, ...]  # (H, W) or (T, H, W)
    heads: int
    d: int
    window: tuple[int, ...]
    shift: tuple[int, ...]
    bias: str  # "none", "table" or "dense"
    cosine: bool  # Swin V2: logit_scale given
    pad_kv: bool
    pad_first: bool
    mask_value: float
    dtype: torch.dtype
    layout: str  # "contiguous", "qkv" (views of one (…, 3, heads, d) projection) or "sliced" (strided heads)
    seed: int = 0

    @property
    def N(self) -> int:
        n = 1
        for w in self.window:
            n *= w
        return n

    def _rand(self, gen, shape, device, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=self.dtype)

    def make_inputs(self, device="cpu"):
        """(q, k, v, kwargs): call pyvl.ops.window_attention(q, k, v, **kwargs) or ref_args(q, k, v, kwargs)."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.B, *self.sizes)
        if self.layout == "qkv":
            q, k, v = self._rand(gen, shape + (3, self.heads, self.d), device).unbind(-3)
        elif self.layout == "sliced":
            q, k, v = (self._rand(gen, shape + (2 * self.heads, self.d), device)[..., ::2, :] for _ in range(3))
        else:
            q, k, v = (self._rand(gen, shape + (self.heads, self.d), device) for _ in range(3))
        kwargs = dict(window_size=self.window, shift_size=self.shift, pad_first=self.pad_first,
                      mask_value=self.mask_value)
        if self.bias == "table":
            rows = 1
            for w in self.window:
                rows *= 2 * w - 1
            kwargs["rel_bias_table"] = self._rand(gen, (rows, self.heads), device)
        elif self.bias == "dense":
            kwargs["rel_bias"] = self._rand(gen, (self.heads, self.N, self.N), device)
        if self.cosine:
            kwargs["logit_scale"] = (torch.rand(self.heads, 1, 1, generator=gen, dtype=torch.float64) * 5).to(
                device=device, dtype=self.dtype)
        if self.pad_kv:
            kwargs["pad_kv"] = (self._rand(gen, (self.heads, self.d), device),
                                self._rand(gen, (self.heads, self.d), device))
        return q, k, v, kwargs


@st.composite
def window_problems(draw, *, dims=(2, 3), dtypes=(torch.float32, torch.float64), layouts=WINDOW_LAYOUTS,
                    max_tokens: int = 600, max_window: int = 7, max_d: int = 16,
                    mask_values=(-100.0, float("-inf"))) -> WindowProblem:
    """A window-attention problem with at most max_tokens tokens per head: sizes smaller than, equal to and not
    divisible by the window, shifted or not, every bias kind, plain or cosine, with or without pad_kv."""
    nd = draw(st.sampled_from(dims))
    window = tuple(draw(st.integers(1, max_window if i == nd - 1 or nd == 2 else 4)) for i in range(nd))
    shift = tuple(draw(st.integers(0, w - 1)) for w in window)
    budget = max_tokens
    sizes = []
    for w in window:
        cap = max(1, min(3 * w + 2, budget))
        s = draw(st.integers(1, cap))
        sizes.append(s)
        budget = max(1, budget // s)
    B = draw(st.integers(1, 2))
    return WindowProblem(
        B=B, sizes=tuple(sizes), heads=draw(st.integers(1, 3)), d=draw(st.integers(1, max_d)), window=window,
        shift=shift, bias=draw(st.sampled_from(("none", "table", "dense"))), cosine=draw(st.booleans()),
        pad_kv=draw(st.booleans()), pad_first=draw(st.booleans()), mask_value=draw(st.sampled_from(mask_values)),
        dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(layouts)), seed=draw(st.integers(0, 2**16)))


CONTRASTIVE_LAYOUTS = ("contiguous", "sliced", "transposed")


def _feature_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The [..., n, d] features of a layout from the tensor made by ContrastiveProblem/SimilarityProblem: "sliced"
    keeps every other feature of a [..., n, 2d] tensor, "transposed" is the transpose of a [..., d, n] tensor."""
    if layout == "sliced":
        return t[..., ::2]
    if layout == "transposed":
        return t.transpose(-1, -2)
    return t


def _feature_storage(gen, lead, n, d, layout, dtype, device, unit):
    """A tensor whose _feature_view(layout) is [*lead, n, d] random features (unit rows if `unit`)."""
    t = torch.randn((*lead, n, d), generator=gen, dtype=torch.float64)
    if unit:  # unit rows, as CLIP's models hand them to the loss
        t = t / t.norm(dim=-1, keepdim=True)
    if layout == "sliced":
        wide = torch.randn((*lead, n, 2 * d), generator=gen, dtype=torch.float64)
        wide[..., ::2] = t
        t = wide
    elif layout == "transposed":
        t = t.transpose(-1, -2).contiguous()
    return t.to(device=device, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class ContrastiveProblem:
    """One pyvl.ops.contrastive_loss problem: N pairs of d features, the loss kind and the logit scale and bias."""

    N: int
    d: int
    kind: str  # "softmax" or "sigmoid"
    logit_scale: float
    logit_bias: float | None
    scalar_tensors: bool  # logit_scale / logit_bias as 0-dim tensors (with gradients) or Python floats
    unit: bool  # unit-norm features (what open_clip's models pass) or raw ones
    dtype: torch.dtype
    layout: str  # see CONTRASTIVE_LAYOUTS
    seed: int = 0

    def make_storage(self, device="cpu"):
        """(image storage, text storage, logit_scale, logit_bias): view the storages with `view`."""
        gen = torch.Generator().manual_seed(self.seed)
        img = _feature_storage(gen, (), self.N, self.d, self.layout, self.dtype, device, self.unit)
        txt = _feature_storage(gen, (), self.N, self.d, self.layout, self.dtype, device, self.unit)
        scale, bias = self.logit_scale, self.logit_bias
        if self.scalar_tensors:
            scale = torch.tensor(scale, dtype=self.dtype, device=device)
            bias = None if bias is None else torch.tensor(bias, dtype=self.dtype, device=device)
        return img, txt, scale, bias

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return _feature_view(t, self.layout)


@st.composite
def contrastive_problems(draw, *, dtypes=(torch.float32, torch.float64, torch.bfloat16), max_N: int = 70,
                         max_d: int = 40, kinds=("softmax", "sigmoid"), layouts=CONTRASTIVE_LAYOUTS):
    kind = draw(st.sampled_from(kinds))
    unit = draw(st.booleans())
    # Raw features give dot products of size ~d: keep the logits in the range training sees (|logit| <~ 100).
    scale = draw(st.sampled_from((1.0, 14.3, 100.0) if unit else (0.05, 0.5, 1.0)))
    bias = draw(st.sampled_from((-10.0, 0.0, 2.5))) if kind == "sigmoid" else draw(st.sampled_from((None, 1.5)))
    return ContrastiveProblem(N=draw(st.integers(1, max_N)), d=draw(st.integers(1, max_d)), kind=kind,
                              logit_scale=scale, logit_bias=bias, scalar_tensors=draw(st.booleans()), unit=unit,
                              dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(layouts)),
                              seed=draw(st.integers(0, 2**16)))


@dataclasses.dataclass(frozen=True)
class SimilarityProblem:
    """One pyvl.ops.similarity_logits problem: a [*a_lead, N, d] against b [*b_lead, M, d], leading dims broadcast."""

    a_lead: tuple[int, ...]
    b_lead: tuple[int, ...]
    N: int
    M: int
    d: int
    scale: float
    bias: float | None
    scalar_tensors: bool
    normalize: bool
    dtype: torch.dtype
    layout: str
    seed: int = 0

    def make_storage(self, device="cpu"):
        gen = torch.Generator().manual_seed(self.seed)
        a = _feature_storage(gen, self.a_lead, self.N, self.d, self.layout, self.dtype, device, False)
        b = _feature_storage(gen, self.b_lead, self.M, self.d, self.layout, self.dtype, device, False)
        scale, bias = self.scale, self.bias
        if self.scalar_tensors:
            scale = torch.tensor(scale, dtype=self.dtype, device=device)
            bias = None if bias is None else torch.tensor(bias, dtype=self.dtype, device=device)
        return a, b, scale, bias

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return _feature_view(t, self.layout)


@st.composite
def similarity_problems(draw, *, dtypes=(torch.float32, torch.float64, torch.bfloat16), max_rows: int = 40,
                        max_d: int = 40, layouts=CONTRASTIVE_LAYOUTS):
    # Leading dims: none, one side only (CLIP's [templates, classes, d] against [N, d]), or both with 1s that
    # broadcast against the other side.
    lead = draw(st.sampled_from(((), (2,), (3, 2))))
    a_lead = tuple(draw(st.sampled_from((s, 1))) for s in lead)
    b_lead = tuple(draw(st.sampled_from((s, 1))) for s in lead)
    if draw(st.booleans()):
        b_lead = b_lead[len(b_lead) // 2:] if draw(st.booleans()) else ()
    normalize = draw(st.booleans())
    return SimilarityProblem(a_lead=a_lead, b_lead=b_lead, N=draw(st.integers(1, max_rows)),
                             M=draw(st.integers(1, max_rows)), d=draw(st.integers(1, max_d)),
                             scale=draw(st.sampled_from((1.0, 100.0) if normalize else (0.3, 1.0))),
                             bias=draw(st.sampled_from((None, -2.0))), scalar_tensors=draw(st.booleans()),
                             normalize=normalize, dtype=draw(st.sampled_from(dtypes)),
                             layout=draw(st.sampled_from(layouts)), seed=draw(st.integers(0, 2**16)))

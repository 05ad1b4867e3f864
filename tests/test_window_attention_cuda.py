"""The GPU kernels of window attention against the reference backend, on CUDA tensors.

Forward and every gradient (q, k, v, the bias table or dense bias, logit_scale, pad_kv) of backend="triton" (and
backend="cuda" once pyvl._C has CUDA window-attention kernels) in float32 / float16 / bfloat16, at the stage shapes
of Swin-T (224 input: 56/28/14/7 tokens, heads 3/6/12/24, window 7, shift 3, d 32) and Video Swin-T (32x224 input:
16x56x56 and 16x14x14 tokens, window 8x7x7, shift 4x3x3), with q, k, v as the views of one qkv projection the
models produce. Accuracy by the error criterion of DESIGN.md: with ref in float64, max|out - ref| <=
2 * max|torch_same_dtype - ref| + atol.

Each (window, dtype, bias kind, cosine, pad_kv, pad_first) is a separate Triton compile, so the cases share them:
the whole file is about 22 compiles
(a forward and a backward kernel each), which dominate its time on a GPU.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import pyvl  # noqa: F401
from pyvl import _backend
from pyvl.ops import window_attention
from pyvl.testing import check_error_criterion

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_BACKENDS = ["triton", "cuda"]

# (name, B, token sizes, heads, window, shift)
SWIN_T = [
    ("swin_t-s1", 2, (56, 56), 3, (7, 7), (3, 3)),
    ("swin_t-s2", 2, (28, 28), 6, (7, 7), (3, 3)),
    ("swin_t-s3", 2, (14, 14), 12, (7, 7), (3, 3)),
    ("swin_t-s4", 2, (7, 7), 24, (7, 7), (3, 3)),  # one window: the shift is dropped
]
VIDEO_SWIN_T = [
    ("swin3d_t-s1", 1, (16, 56, 56), 3, (8, 7, 7), (4, 3, 3)),
    ("swin3d_t-s3", 1, (16, 14, 14), 12, (8, 7, 7), (4, 3, 3)),
]


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _skip_unless_runs(backend, dtype):
    why = _backend.reason(backend, "window_attention", torch.device("cuda"), dtype)
    if why is not None:
        pytest.skip(f"backend {backend!r}: {why}")


def _problem(B, sizes, heads, window, *, d=32, bias="table", cosine=False, pad_kv=False, seed=0):
    """fp32 tensors on the GPU: q, k, v as views of one (B, *sizes, 3, heads, d) projection, and the rest."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, *sizes, 3, heads, d, generator=gen, device="cuda")
    q, k, v = qkv.unbind(-3)
    N = math.prod(window)
    table = dense = ls = pad_k = pad_v = None
    if bias == "table":
        table = torch.randn(math.prod(2 * w - 1 for w in window), heads, generator=gen, device="cuda")
    elif bias == "dense":
        dense = torch.randn(heads, N, N, generator=gen, device="cuda")
    if cosine:
        ls = torch.rand(heads, 1, 1, generator=gen, device="cuda") * 5
    if pad_kv:
        pad_k = torch.randn(heads, d, generator=gen, device="cuda")
        pad_v = torch.randn(heads, d, generator=gen, device="cuda")
    return q, k, v, table, dense, ls, pad_k, pad_v


def _leaf(t, dtype):
    """A leaf copy of t in `dtype` that keeps t's strides (the qkv views stay strided)."""
    if t is None:
        return None
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
    out.copy_(t)
    return out.requires_grad_()


def _forward_and_grads(fn, args, dtype):
    leaves = [_leaf(a, dtype) for a in args]
    out = fn(*leaves)
    gen = torch.Generator(device="cuda").manual_seed(0)
    g = torch.randn(out.shape, generator=gen, device="cuda").to(out.dtype)
    out.backward(g)
    return out.detach(), [a.grad if a is not None else None for a in leaves]


NAMES = ("q", "k", "v", "rel_bias_table", "rel_bias", "logit_scale", "pad_k", "pad_v")


def _check(args, window, shift, dtype, backend, pad_first=True, mask_value=-100.0):
    def fn(q, k, v, table, dense, ls, pad_k, pad_v, backend):
        return window_attention(q, k, v, window, shift, rel_bias_table=table, rel_bias=dense, logit_scale=ls,
                                pad_kv=None if pad_k is None else (pad_k, pad_v), pad_first=pad_first,
                                mask_value=mask_value, backend=backend)

    out, grads = _forward_and_grads(lambda *a: fn(*a, backend=backend), args, dtype)
    ref, ref_grads = _forward_and_grads(lambda *a: fn(*a, backend="reference"), args, torch.float64)
    torch_out, torch_grads = _forward_and_grads(lambda *a: fn(*a, backend="reference"), args, dtype)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert torch.isfinite(out).all()
    check_error_criterion(out, ref, torch_out, name="output")
    for name, g, r, t in zip(NAMES, grads, ref_grads, torch_grads):
        if r is None:
            continue
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == dtype and g.shape == r.shape
        check_error_criterion(g, r, t, name=f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SWIN_T + VIDEO_SWIN_T, ids=lambda s: s[0])
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
def test_window_attention_cuda_swin(shape, dtype, gpu_backend):
    """Swin / Video Swin W-MSA and SW-MSA: dot-product attention with the relative position bias table."""
    _skip_unless_runs(gpu_backend, dtype)
    name, B, sizes, heads, window, shift = shape
    args = _problem(B, sizes, heads, window, seed=_seed(name))
    _check(args, window, shift, dtype, gpu_backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SWIN_T[0], VIDEO_SWIN_T[1]], ids=lambda s: s[0])
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
def test_window_attention_cuda_swin_v2(shape, dtype, gpu_backend):
    """Swin V2: scaled cosine attention (clamped logit_scale) with the CPB bias as a table."""
    _skip_unless_runs(gpu_backend, dtype)
    name, B, sizes, heads, window, shift = shape
    args = _problem(B, sizes, heads, window, cosine=True, seed=_seed(name, "v2"))
    _check(args, window, shift, dtype, gpu_backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
def test_window_attention_cuda_padded_timm(dtype, gpu_backend):
    """Sizes the window does not divide, timm's pad-after-roll, padding tokens with the qkv bias (pad_kv), -inf
    shift mask, a dense bias."""
    _skip_unless_runs(gpu_backend, dtype)
    args = _problem(2, (30, 45), 4, (7, 7), bias="dense", pad_kv=True, seed=_seed("timm"))
    _check(args, (7, 7), (3, 3), dtype, gpu_backend, pad_first=False, mask_value=float("-inf"))


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
def test_window_attention_cuda_video_padded(gpu_backend):
    """Video Swin with T, H, W not multiples of the window (torchvision pads first), pad_kv, bf16."""
    _skip_unless_runs(gpu_backend, torch.bfloat16)
    args = _problem(1, (10, 20, 17), 3, (8, 7, 7), pad_kv=True, seed=_seed("video-pad"))
    _check(args, (8, 7, 7), (4, 3, 3), torch.bfloat16, gpu_backend)

"""The Triton kernels of the contrastive family against the reference backend, on CUDA tensors.

contrastive_loss (softmax and sigmoid) forward and every gradient (both feature matrices, logit_scale, logit_bias) and
similarity_logits forward and gradients, backend="triton" in float32 / float16 / bfloat16, at CLIP's feature sizes
(d = 512, 768) and batches up to N = 4096, by the error criterion of DESIGN.md (ref in float64: max|out - ref| <=
2 * max|torch_same_dtype - ref| + atol); and the loss's memory: forward + backward at N = 16384 allocates far less
than one N x N float32 matrix. Test names carry "triton" and "similarity" / "loss": scripts/gpu_check_results.py
files each under triton/similarity_logits or triton/contrastive_loss.
"""
from __future__ import annotations

import pytest
import torch

import pyvl  # noqa: F401
from pyvl import _backend
from pyvl.ops import contrastive_loss, similarity_logits
from pyvl.reference import contrastive as ref
from pyvl.testing import assert_gradients_close_to_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_unless_runs(op, dtype):
    why = _backend.reason("triton", op, torch.device("cuda"), dtype)
    if why is not None:
        pytest.skip(f"backend 'triton': {why}")


def _unit_features(N, d, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(N, d, generator=gen, device="cuda"), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(N, d, generator=gen, device="cuda"), dim=-1)
    # pairs that match (as trained CLIP features do) make the diagonal stand out
    y = torch.nn.functional.normalize(y + 2 * x, dim=-1)
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("N,d", [(1000, 512), (4096, 768), (333, 100)])
def test_triton_loss_matches_reference(N, d, kind, dtype):
    _skip_unless_runs("contrastive_loss", dtype)
    x, y = _unit_features(N, d, dtype, seed=N + d)
    scale = torch.tensor(100.0 if kind == "softmax" else 10.0, dtype=dtype, device="cuda")
    bias = torch.tensor(-10.0 if kind == "sigmoid" else 0.0, dtype=dtype, device="cuda")
    assert_gradients_close_to_reference(lambda *t: contrastive_loss(*t, kind=kind, backend="triton"),
                                        lambda *t: ref.contrastive_loss(*t, kind=kind), [x, y, scale, bias])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_loss_strided_features_and_blocks(dtype):
    # features as column slices of a wider projection, and a rank's off-diagonal block as the distributed scheme has
    _skip_unless_runs("contrastive_loss", dtype)
    x, y = _unit_features(1500, 2 * 512, dtype, seed=3)
    x, y = x[:, ::2], y[:, 1::2]
    scale = torch.tensor(50.0, dtype=dtype, device="cuda")
    assert_gradients_close_to_reference(lambda *t: contrastive_loss(*t, backend="triton"), ref.contrastive_loss,
                                        [x, y, scale])
    for kind in (0, 1):
        def cat(stats):
            return lambda *t: torch.cat(stats(*t, kind, 500))

        assert_gradients_close_to_reference(cat(torch.ops.pyvl.contrastive_stats_triton), cat(ref.contrastive_stats),
                                            [x[:500], y, scale, torch.tensor(-3.0, dtype=dtype, device="cuda")])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((), 1000, 256, 512), ((7,), 100, 256, 768), ((2, 1), 37, 29, 24)])
def test_triton_similarity_matches_reference(shape, dtype):
    _skip_unless_runs("similarity_logits", dtype)
    lead, classes, images, d = shape
    gen = torch.Generator(device="cuda").manual_seed(classes)
    text = torch.randn(*lead, classes, d, generator=gen, device="cuda").to(dtype)
    image = torch.randn(images, d, generator=gen, device="cuda").to(dtype)
    scale = torch.tensor(100.0, dtype=dtype, device="cuda")
    bias = torch.tensor(-2.0, dtype=dtype, device="cuda")
    assert_gradients_close_to_reference(lambda *t: similarity_logits(*t, backend="triton"), ref.similarity_logits,
                                        [text, image, scale, bias])


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_triton_loss_memory_is_linear_in_n(kind):
    _skip_unless_runs("contrastive_loss", torch.bfloat16)
    N, d = 16384, 512
    x, y = _unit_features(N, d, torch.bfloat16, seed=1)
    x.requires_grad_()
    y.requires_grad_()
    scale = torch.tensor(100.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True) if kind == "sigmoid" else None
    leaves = [t for t in (x, y, scale, bias) if t is not None]
    small = [t[:64].detach().requires_grad_() for t in (x, y)]
    torch.autograd.grad(contrastive_loss(*small, scale, bias, kind=kind, backend="triton"), small)  # compiles
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = contrastive_loss(x, y, scale, bias, kind=kind, backend="triton")
    grads = torch.autograd.grad(loss, leaves)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert all(torch.isfinite(g).all() for g in grads)
    nn_bytes = N * N * 4
    # the gradients themselves are 2 N d bf16 (32 MiB); the softmax column partials [N / 128, N] float32 twice
    assert peak < nn_bytes / 8, f"forward + backward peaked {peak / 2**20:.1f} MiB above the inputs at N = {N}"


def test_triton_is_a_candidate_for_cuda_tensors():
    for op in ("similarity_logits", "contrastive_loss"):
        for dtype in DTYPES:
            assert _backend.reason("triton", op, torch.device("cuda"), dtype) is None
        assert "float64" in _backend.reason("triton", op, torch.device("cuda"), torch.float64)

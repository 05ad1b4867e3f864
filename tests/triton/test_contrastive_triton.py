"""Triton kernels of the contrastive family against the PyTorch references, through the public ops and the custom ops.

Tiny shapes past one tile and not multiples of it (the interpreter runs a program per tile in numpy), float32 and
float16 (the interpreter has no bfloat16 math), both loss kinds, strided features, every gradient by the error
criterion; the statistics op alone with any cotangents and the off-diagonal blocks the distributed scheme computes;
opcheck, torch.compile(fullgraph=True) and two gloo processes with backend="triton".
"""
import json

import pytest
import torch
from hypothesis import given, settings

pytest.importorskip("triton")

from pyvl.ops import contrastive_loss, similarity_logits  # noqa: E402
from pyvl.reference import contrastive as ref  # noqa: E402
from pyvl.testing import assert_gradients_close_to_reference  # noqa: E402
from pyvl.testing import strategies as pst  # noqa: E402

pytestmark = pytest.mark.triton

from _triton_env import DEVICE  # noqa: E402

DTYPES = (torch.float32, torch.float16)


def _unit(n, d, dtype, gen, transposed=False):
    t = torch.randn(n, d, generator=gen, dtype=torch.float64)
    t = t / t.norm(dim=1, keepdim=True)
    if transposed:  # [d, n] storage viewed as [n, d]: feature stride n, row stride 1
        t = t.T.contiguous().T
    return t.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("N,d", [(37, 24), (70, 5)])
def test_loss_forward_and_gradients(N, d, kind, dtype):
    gen = torch.Generator().manual_seed(N + d)
    x, y = _unit(N, d, dtype, gen), _unit(N, d, dtype, gen, transposed=True)
    scale = torch.tensor(14.3, dtype=dtype, device=DEVICE)
    bias = torch.tensor(-10.0 if kind == "sigmoid" else 1.5, dtype=dtype, device=DEVICE)
    assert_gradients_close_to_reference(lambda *t: contrastive_loss(*t, kind=kind, backend="triton"),
                                        lambda *t: ref.contrastive_loss(*t, kind=kind), [x, y, scale, bias])


def _on_views(problem, fn, scale, bias):
    """fn on the problem's feature views, the tensor scalars replaced by the autograd leaves that follow a, b."""
    def call(a, b, *scalars):
        it = iter(scalars)
        s = next(it) if isinstance(scale, torch.Tensor) else scale
        c = next(it) if isinstance(bias, torch.Tensor) else bias
        return fn(problem.view(a), problem.view(b), s, c)

    return call


def _leaves(first, second, scale, bias):
    return [first, second] + [t for t in (scale, bias) if isinstance(t, torch.Tensor)]


@settings(max_examples=8)
@given(pst.contrastive_problems(dtypes=DTYPES, max_N=40, max_d=24))
def test_loss_problems(problem):
    first, second, scale, bias = problem.make_storage(DEVICE)
    ours = _on_views(problem, lambda *t: contrastive_loss(*t, kind=problem.kind, backend="triton"), scale, bias)
    want = _on_views(problem, lambda *t: ref.contrastive_loss(*t, problem.kind), scale, bias)
    assert_gradients_close_to_reference(ours, want, _leaves(first, second, scale, bias), name=str(problem))


@settings(max_examples=8)
@given(pst.similarity_problems(dtypes=DTYPES, max_rows=40, max_d=24))
def test_similarity_problems(problem):
    first, second, scale, bias = problem.make_storage(DEVICE)
    ours = _on_views(problem, lambda *t: similarity_logits(*t, normalize=problem.normalize, backend="triton"),
                     scale, bias)
    want = _on_views(problem, lambda *t: ref.similarity_logits(*t, problem.normalize), scale, bias)
    assert_gradients_close_to_reference(ours, want, _leaves(first, second, scale, bias), name=str(problem))


@pytest.mark.parametrize("kind", [0, 1])
@pytest.mark.parametrize("n,m,offset", [(21, 42, 21), (21, 42, 0), (30, 19, -3)])
def test_stats_blocks_any_cotangent(n, m, offset, kind):
    # A rank's block (its rows against every rank's texts, matched from `offset` on), m > n and m < n, the three
    # statistics concatenated so that the fixed random cotangent reaches each of them.
    gen = torch.Generator().manual_seed(n * m + kind)
    x, y = _unit(n, 12, torch.float32, gen), _unit(m, 12, torch.float32, gen)
    scale = torch.tensor(9.0, device=DEVICE)
    bias = torch.tensor(-2.0, device=DEVICE)

    def cat(stats):
        return lambda *t: torch.cat(stats(*t, kind, offset))

    assert_gradients_close_to_reference(cat(torch.ops.pyvl.contrastive_stats_triton), cat(ref.contrastive_stats),
                                        [x, y, scale, bias])


def test_fp16_large_logits_and_small_gradients():
    # CLIP's clamped scale 100 on fp16 features and a batch whose ~1/(2N) probabilities float16 would flush to
    # subnormals without the backward's power-of-two rescaling.
    gen = torch.Generator().manual_seed(5)
    x, y = _unit(130, 16, torch.float16, gen), _unit(130, 16, torch.float16, gen)
    y[:65] = x[:65]  # half the pairs match exactly: large diagonal logits
    scale = torch.tensor(100.0, dtype=torch.float16, device=DEVICE)
    loss = contrastive_loss(x, y, scale, backend="triton")
    assert torch.isfinite(loss)
    assert_gradients_close_to_reference(lambda *t: contrastive_loss(*t, backend="triton"), ref.contrastive_loss,
                                        [x, y, scale])


def test_float64_is_refused_with_a_reason():
    x = torch.zeros(3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float16, bfloat16 and float32"):
        contrastive_loss(x, x, 1.0, backend="triton")
    with pytest.raises(RuntimeError, match="float16, bfloat16 and float32"):
        similarity_logits(x, x, backend="triton")


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    x, y = _unit(19, 6, torch.float32, gen), _unit(23, 6, torch.float32, gen)
    s, b = torch.tensor(5.0, device=DEVICE), torch.tensor(-1.0, device=DEVICE)
    for kind in (0, 1):
        torch.library.opcheck(torch.ops.pyvl.contrastive_stats_triton.default,
                              (x.clone().requires_grad_(), y.clone().requires_grad_(), s.clone().requires_grad_(),
                               b.clone().requires_grad_(), kind, 2))
        row, col, diag = torch.ops.pyvl.contrastive_stats_triton(x, y, s, b, kind, 2)
        torch.library.opcheck(torch.ops.pyvl.contrastive_stats_backward_triton.default,
                              (torch.ones_like(row), torch.ones_like(col), torch.ones_like(diag), x, y, s, b, row, col,
                               kind, 2))
    a3 = torch.randn(2, 4, 6, generator=gen).to(DEVICE).requires_grad_()
    b3 = torch.randn(1, 3, 6, generator=gen).to(DEVICE).expand(2, 3, 6).detach().requires_grad_()
    torch.library.opcheck(torch.ops.pyvl.similarity_logits_triton.default, (a3, b3, s, b, True))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_compile_fullgraph(kind):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    x, y = _unit(11, 8, torch.float32, gen), _unit(11, 8, torch.float32, gen)
    s, b = torch.tensor(10.0, device=DEVICE), torch.tensor(-2.0, device=DEVICE)

    def fn(x, y, s, b):
        loss = contrastive_loss(x, y, s, b, kind=kind, backend="triton")
        return loss + similarity_logits(x, y, s, b, backend="triton").mean()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, y, s, b)]
    out = compiled(*leaves)
    eager_leaves = [t.clone().requires_grad_() for t in (x, y, s, b)]
    want = fn(*eager_leaves)
    torch.testing.assert_close(out, want)
    for g, w in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(want, eager_leaves)):
        torch.testing.assert_close(g, w)


@pytest.mark.skipif(DEVICE != "cpu", reason="gloo on CPU tensors (the interpreter)")
def test_distributed_two_processes(tmp_path):
    import torch.multiprocessing as mp

    from _contrastive_dist import worker  # tests/, on sys.path through its conftest

    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path), 9, 8, False, ("triton",), torch.float32, 2e-5),
             nprocs=2, join=True)
    failures = []
    for r in range(2):
        failures += json.loads((tmp_path / f"rank{r}.json").read_text())
    assert not failures, failures

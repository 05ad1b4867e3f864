"""Tier 2: the C++ CPU kernels of sequential attention against the reference, plus the op contract (gradcheck,
opcheck, torch.compile, determinism, memory, argument errors, backend choice)."""
import math

import pytest
import torch
from hypothesis import given

import pyvl
from pyvl import bench
from pyvl.ops import sequential_attention
from pyvl.reference import sequential_attention as ref
from pyvl.testing import assert_close_to_reference, assert_gradients_close_to_reference
from pyvl.testing import strategies as pst

BACKEND = "cpu"
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@given(pst.attention_problems(dtypes=ALL_DTYPES))
def test_forward(problem):
    q, k, v, bias = problem.make_inputs()
    out = sequential_attention(q, k, v, bias, backend=BACKEND)
    assert out.dtype == q.dtype and out.shape == (problem.B, problem.H, problem.N, problem.dv)
    assert_close_to_reference(out, ref.sequential_attention, (q, k, v, bias))


@given(pst.attention_problems(dtypes=ALL_DTYPES, max_scores=20000))
def test_gradients(problem):
    q, k, v, bias = problem.make_inputs()
    args = (q, k, v) if bias is None else (q, k, v, bias)
    scale = 0.7 / math.sqrt(problem.d)
    assert_gradients_close_to_reference(
        lambda *a: sequential_attention(*a, scale=scale, backend=BACKEND),
        lambda *a: ref.sequential_attention(*a, scale=scale), args)


@pytest.mark.parametrize("bias_shape", [None, (5, 11), (2, 1, 5, 11), (2, 1, 1, 11)])
def test_gradcheck_float64(bias_shape):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    q, k, v = t(2, 1, 5, 4), t(2, 1, 11, 4), t(2, 1, 11, 3)
    args = (q, k, v) + ((t(*bias_shape),) if bias_shape else ())
    assert torch.autograd.gradcheck(lambda *a: sequential_attention(*a, backend=BACKEND), args, fast_mode=True)


@pytest.mark.parametrize("B, H, bias_shape", [(1, 1, (50, 100)), (2, 3, (2, 3, 50, 100))])
def test_gradcheck_across_blocks(B, H, bias_shape):
    # N and M past one query block (48) and one key block (96) of the C++ kernels, so partial tiles and the
    # online softmax's rescaling are exercised; one bias group takes the two-pass backward, six (a bias per head)
    # the single-pass one.
    g = torch.Generator().manual_seed(1)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    args = (t(B, H, 50, 3), t(B, H, 100, 3), t(B, H, 100, 2), t(*bias_shape))
    assert torch.autograd.gradcheck(lambda *a: sequential_attention(*a, backend=BACKEND), args, fast_mode=True)


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 7, 5, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 9, 5, generator=g, requires_grad=True)
    v = torch.randn(2, 3, 9, 4, generator=g, requires_grad=True)
    bias = torch.randn(1, 3, 7, 9, generator=g, requires_grad=True) if with_bias else None
    torch.library.opcheck(torch.ops.pyvl.sequential_attention.default, (q, k, v, bias, 0.4, False))
    det = [t.detach() if t is not None else None for t in (q, k, v, bias)]
    out, lse = torch.ops.pyvl.sequential_attention(*det, 0.4, False)
    go = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pyvl.sequential_attention_backward.default,
                          (go, *det, out, lse, 0.4, with_bias, True))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 30, 2, 8, generator=g)[..., 0, :].requires_grad_()  # non-contiguous
    k = torch.randn(1, 4, 40, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 4, 40, 6, generator=g, requires_grad=True)
    bias = torch.randn(4, 30, 40, generator=g, requires_grad=True)

    def block(q, k, v, bias):
        return sequential_attention(q * 2, k, v, bias, backend=BACKEND).relu()

    compiled = torch.compile(block, fullgraph=True)
    out, want = compiled(q, k, v, bias), block(q, k, v, bias)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    for a, b in zip(grads, torch.autograd.grad(want.sum(), (q, k, v, bias))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("N, M", [(40, 70), (100, 130)])
@pytest.mark.parametrize("bias_shape", ["NM", "B1NM", "BHNM"])
def test_deterministic_bitwise(N, M, bias_shape):
    # Run to run, and across thread counts: the C++ backward takes a single pass when there are at least two bias
    # groups per thread and two passes otherwise, so 1 and 2 threads can take different
    # paths for the same problem. Both add in the same order, so the results must be bitwise equal.
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 3, N, 16, generator=g), torch.randn(2, 3, M, 16, generator=g), \
        torch.randn(2, 3, M, 16, generator=g)
    bias = torch.randn({"NM": (N, M), "B1NM": (2, 1, N, M), "BHNM": (2, 3, N, M)}[bias_shape], generator=g)
    grad = torch.randn(2, 3, N, 16, generator=g)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = sequential_attention(*leaves, deterministic=True, backend=BACKEND)
        return (out,) + torch.autograd.grad(out, leaves, grad)

    threads = torch.get_num_threads()
    try:
        runs = [run(), run()]
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            runs.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_nan_policy():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 60, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = torch.randn(1, 2, 200, 8, generator=g, dtype=torch.float64), torch.randn(1, 2, 200, 8, generator=g,
                                                                                   dtype=torch.float64)
    bias = torch.randn(60, 200, generator=g, dtype=torch.float64)
    bias[3] = -math.inf  # a row with no key: NaN
    bias[7, :150] = -math.inf  # the first key blocks fully masked, later ones not: finite
    bias[9, ::2] = -math.inf
    out = sequential_attention(q, k, v, bias, backend=BACKEND)
    want = ref.sequential_attention(q, k, v, bias)
    assert torch.isnan(out[:, :, 3]).all()
    assert torch.isfinite(out[:, :, [i for i in range(60) if i != 3]]).all()
    torch.testing.assert_close(out, want, equal_nan=True)
    q2 = q.clone()
    q2[0, 1, 5, 0] = math.nan
    out2 = sequential_attention(q2, k, v, backend=BACKEND)
    assert torch.isnan(out2[0, 1, 5]).all() and torch.isfinite(out2[0, 0]).all()
    # gradients of the masked rows: NaN like the reference's, the rest of the other head finite
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    gq = torch.autograd.grad(sequential_attention(*leaves, backend=BACKEND).sum(), leaves[0])[0]
    assert torch.isnan(gq[:, :, 3]).all()


def test_memory_is_not_quadratic():
    # Peak resident-set growth of one forward + backward (of q, k, v) at N = 4096, one head, with a dense [N, N]
    # bias, each in a fresh process (pyvl.bench.subprocess_peak_memory), against the size of one N x N float32
    # matrix (64 MiB). The reference backend materializes the scores, so it must grow by more than that (the
    # measurement sees such buffers); the C++ kernels keep O(N d) and per-thread tiles.
    N, nn_bytes = 4096, 4096 * 4096 * 4
    kwargs, warmup = {"N": N, "heads": 1, "backward": True}, {"N": 64, "heads": 1, "backward": True}

    def growth(backend):
        got = bench.subprocess_peak_memory("pyvl.bench:attention_problem", kwargs, "pyvl", "cpu", torch.float32,
                                           backend, warmup)
        if got is None:
            pytest.skip("no peak resident-set measurement on this platform")
        return got

    ours, theirs = growth("cpu"), growth("reference")
    assert theirs > nn_bytes, f"the reference grew only {theirs / 2**20:.1f} MiB"
    assert ours < nn_bytes // 8, f"pyvl grew {ours / 2**20:.1f} MiB (one N x N float32 is 64 MiB)"


# --------------------------------------------------------------------------------------------------------------
# Bad inputs: an error that names the argument, never a crash or a silent wrong answer.


def _ok():
    return torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v: ((q[0], k, v), {}), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: ((q, k[0], v), {}), ValueError, "k must have 4 dimensions"),
    (lambda q, k, v: ((q, k, v[0]), {}), ValueError, "v must have 4 dimensions"),
    (lambda q, k, v: ((q, k[:1], v), {}), ValueError, r"k must have shape \[B, heads, M, d\]"),
    (lambda q, k, v: ((q, k[:, :2], v), {}), ValueError, r"k must have shape \[B, heads, M, d\]"),
    (lambda q, k, v: ((q, k[..., :3], v), {}), ValueError, r"k must have shape \[B, heads, M, d\]"),
    (lambda q, k, v: ((q, k, v[:, :, :6]), {}), ValueError, r"v must have shape \[B, heads, M, dv\]"),
    (lambda q, k, v: ((q, k, v[:1]), {}), ValueError, r"v must have shape"),
    (lambda q, k, v: ((q[:, :, :0], k, v), {}), ValueError, "q must be a non-empty"),
    (lambda q, k, v: ((q, k, v, torch.randn(5, 8)), {}), ValueError, "bias of shape .* does not broadcast"),
    (lambda q, k, v: ((q, k, v, torch.randn(2, 5, 7)), {}), ValueError, "bias of shape .* does not broadcast"),
    (lambda q, k, v: ((q, k, v, torch.randn(7)), {}), ValueError, "bias must have 2, 3 or 4 dimensions"),
    (lambda q, k, v: ((q, k, v, torch.randn(1, 2, 3, 5, 7)), {}), ValueError, "bias must have 2, 3 or 4"),
    (lambda q, k, v: ((q, k, v, torch.randn(5, 7).double()), {}), TypeError, "bias must have dtype torch.float32"),
    (lambda q, k, v: ((q, k.double(), v), {}), TypeError, "k must have dtype torch.float32 like q"),
    (lambda q, k, v: ((q, k, v.to("meta")), {}), ValueError, "v must be on cpu like q"),
    (lambda q, k, v: ((q.int(), k, v), {}), TypeError, "q must be float16, bfloat16, float32 or float64"),
    (lambda q, k, v: ((q, k, v, torch.zeros(5, 7, dtype=torch.int64)), {}), TypeError, "bias must be float16"),
    (lambda q, k, v: ((q.numpy(), k, v), {}), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: ((q, k, v), {"scale": "big"}), TypeError, "scale must be a float"),
    (lambda q, k, v: ((q, k, v), {"scale": math.inf}), ValueError, "scale must be finite"),
    (lambda q, k, v: ((q, k, v), {"deterministic": 1}), TypeError, "deterministic must be a bool"),
    (lambda q, k, v: ((q, k, v), {"backend": "gpu"}), ValueError, "backend must be one of"),
    (lambda q, k, v: ((q, k, v), {"backend": "cuda"}), RuntimeError, "backend 'cuda' cannot run this input"),
])
def test_bad_inputs(make, exc, match):
    args, kwargs = make(*_ok())
    with pytest.raises(exc, match=match):
        sequential_attention(*args, **kwargs)


def test_scale_and_backends_agree():
    q, k, v = _ok()
    bias = torch.randn(3, 5, 7)
    want = ref.sequential_attention(q, k, v, bias, 0.25)
    torch.testing.assert_close(sequential_attention(q, k, v, bias, scale=0.25, backend=BACKEND), want)
    torch.testing.assert_close(sequential_attention(q, k, v, bias, scale=0.25, backend="reference"), want)


def test_default_backend_on_cpu_follows_the_measurements():
    # pyvl bench --ops sequential_attention: the C++ kernels beat the materializing reference and SDPA.
    assert pyvl._backend.choose("sequential_attention", None, torch.empty(1)) == "cpu"

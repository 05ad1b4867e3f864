"""Triton kernels of window attention (kernels/window_attention.py) against the PyTorch reference.

Whole problems are drawn by pyvl.testing.strategies.window_problems (2D and 3D, sizes smaller than and not
divisible by the window, shifts, every bias kind, cosine, pad_kv, pad_first, -100 / -inf masks, layouts that are
views of one qkv projection or strided heads); forward and every gradient go through the error criterion. The
interpreter runs one program per (batch, window, head) in numpy, so problems stay small: the strategy's token
budget is low and a window of more than 64 tokens (the multi-block path) appears in a few fixed cases.
"""

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402

import pyvl.testing  # noqa: E402
from pyvl.ops import window_attention  # noqa: E402
from pyvl.testing import strategies as pst  # noqa: E402

pytestmark = pytest.mark.triton

from _triton_env import DEVICE  # noqa: E402

DTYPES = (torch.float32, torch.float16)


def _op(problem, backend, relayout=True):
    """fn(q, k, v, table, bias, logit_scale, pad_k, pad_v) for the problem's geometry. With relayout, the problem's
    layout is rebuilt inside fn from dense leaves, so that gradients also flow through the strided views the kernel
    reads."""

    def fn(q, k, v, table, bias, logit_scale, pad_k, pad_v):
        if relayout and problem.layout == "qkv":
            q, k, v = torch.stack([q, k, v], dim=-3).unbind(-3)
        elif relayout and problem.layout == "sliced":
            q, k, v = (torch.cat([t, t], dim=-2)[..., ::2, :] for t in (q, k, v))
        return window_attention(q, k, v, problem.window, problem.shift, rel_bias_table=table, rel_bias=bias,
                                logit_scale=logit_scale, pad_kv=None if pad_k is None else (pad_k, pad_v),
                                pad_first=problem.pad_first, mask_value=problem.mask_value, backend=backend)

    return fn


def _args(problem):
    """(q, k, v in the problem's layout, the 8 tensor arguments of _op with dense q, k, v)."""
    q, k, v, kw = problem.make_inputs(DEVICE)
    pad_k, pad_v = kw.get("pad_kv", (None, None))
    rest = (kw.get("rel_bias_table"), kw.get("rel_bias"), kw.get("logit_scale"), pad_k, pad_v)
    return (q, k, v) + rest, (q.contiguous(), k.contiguous(), v.contiguous()) + rest


def _check_problem(problem):
    drawn, dense = _args(problem)
    # forward on the drawn layout itself (views of one qkv tensor, strided heads), by the criterion
    out = _op(problem, "triton", relayout=False)(*drawn)
    q = drawn[0]
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    pyvl.testing.assert_close_to_reference(out, _op(problem, "reference", relayout=False), drawn)
    if problem.dtype == torch.float16:
        # no overflow where the float32 reference is finite
        ref32 = _op(problem, "reference", relayout=False)(*(t.float() if t is not None else None for t in drawn))
        assert torch.isfinite(out[torch.isfinite(ref32)]).all()
    # every gradient (q, k, v, the bias, logit_scale, pad_kv) through the views, by the criterion
    if _torch_gradients_finite(problem, dense):
        pyvl.testing.assert_gradients_close_to_reference(_op(problem, "triton"), _op(problem, "reference"), dense)
    else:
        # PyTorch's own fp16 gradients overflow here (the criterion would count its NaN error as 0 and allow only
        # atol): the kernel must stay finite and within fp16 rounding of the float64 truth instead.
        _, grads = pyvl.testing.gradients(_op(problem, "triton"), _leaves(dense))
        _, truth = pyvl.testing.gradients(_op(problem, "reference"), _leaves(dense, torch.float64))
        for g, r in zip(grads, truth):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=2e-2 * max(1.0, float(r.abs().max())))


def _leaves(args, dtype=None):
    return [a.detach().to(dtype or a.dtype).requires_grad_() if a is not None else None for a in args]


def _torch_gradients_finite(problem, dense):
    if problem.dtype != torch.float16:
        return True
    _, grads = pyvl.testing.gradients(_op(problem, "reference"), _leaves(dense))
    return all(torch.isfinite(g).all() for g in grads if g is not None)


@settings(max_examples=6)
@given(pst.window_problems(dtypes=DTYPES, max_tokens=24, max_window=4, max_d=8))
def test_window_problems_forward_and_gradients(problem):
    _check_problem(problem)


# Windows of more than 64 tokens: key blocks streamed through the online softmax, the two-pass backward.
LARGE = [
    # 2D 9x9 = 81 tokens, H shifted by 1: in the last window the bottom row's keys all lie in the second key
    # block, so with -inf the first block is fully masked for them (the online softmax's all-masked block)
    pst.WindowProblem(B=1, sizes=(18, 9), heads=1, d=8, window=(9, 9), shift=(1, 0), bias="table", cosine=False,
                      pad_kv=False, pad_first=True, mask_value=float("-inf"), dtype=torch.float32,
                      layout="contiguous", seed=1),
    # 3D 2x6x6 = 72 tokens: T padded (3 -> 4) and shifted after timm's roll, cosine with a dense bias, pad_kv,
    # q, k, v as views of one qkv projection
    pst.WindowProblem(B=1, sizes=(3, 6, 6), heads=1, d=6, window=(2, 6, 6), shift=(1, 0, 0), bias="dense",
                      cosine=True, pad_kv=True, pad_first=False, mask_value=-100.0, dtype=torch.float32,
                      layout="qkv", seed=2),
]


@pytest.mark.parametrize("problem", LARGE, ids=lambda p: f"{'x'.join(map(str, p.window))}-{p.dtype}")
def test_windows_beyond_one_block(problem):
    _check_problem(problem)


def test_swin_shape_fp16_no_overflow():
    """Swin's 7x7 window with its shift at d = 32, fp16, with large logits (cosine at the clamped scale 100)."""
    problem = pst.WindowProblem(B=1, sizes=(7, 10), heads=1, d=32, window=(7, 7), shift=(3, 3), bias="table",
                                cosine=True, pad_kv=False, pad_first=True, mask_value=-100.0,
                                dtype=torch.float16, layout="qkv", seed=4)
    drawn, _ = _args(problem)
    ls = torch.full_like(drawn[5], 6.0).requires_grad_()  # above log(100): clamped, so no gradient
    drawn = drawn[:5] + (ls,) + drawn[6:]
    out = _op(problem, "triton", relayout=False)(*drawn)
    assert torch.isfinite(out).all()
    pyvl.testing.assert_close_to_reference(out, _op(problem, "reference", relayout=False), drawn)
    out.sum().backward()
    assert torch.equal(ls.grad, torch.zeros_like(ls))


def test_float64_is_refused_with_a_reason():
    q = torch.zeros(1, 4, 4, 1, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float16, bfloat16 and float32"):
        window_attention(q, q, q, 2, backend="triton")


def _op_args(problem):
    q, k, v, kw = problem.make_inputs(DEVICE)
    window, shift = list(problem.window), list(problem.shift)
    pad_k, pad_v = kw["pad_kv"]
    ls = kw.get("logit_scale")
    return (q, k, v, window, shift, kw.get("rel_bias_table"), kw.get("rel_bias"),
            ls.reshape(-1) if ls is not None else None, None if ls is not None else problem.d ** -0.5, pad_k, pad_v,
            problem.pad_first, problem.mask_value)


# one window of one head, padded: opcheck runs each op a dozen times
OPCHECK = pst.WindowProblem(B=1, sizes=(3, 2), heads=1, d=4, window=(3, 3), shift=(0, 0), bias="table",
                            cosine=True, pad_kv=True, pad_first=True, mask_value=-100.0, dtype=torch.float32,
                            layout="qkv", seed=5)


def test_opcheck_forward():
    args = _op_args(OPCHECK)
    args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.pyvl.window_attention_triton.default, args)


def test_opcheck_backward():
    args = _op_args(OPCHECK)
    out, lse = torch.ops.pyvl.window_attention_triton(*args)
    grad = torch.randn_like(out)
    q, k, v, window, shift, table, bias, ls, scale, pad_k, pad_v, pad_first, mask_value = args
    bargs = (grad, q, k, v, out, lse, window, shift, table, bias, ls, scale, pad_k, pad_v, pad_first, mask_value,
             [True, False, True, True, False, True, False, True])
    torch.library.opcheck(torch.ops.pyvl.window_attention_backward_triton.default, bargs)
    grads = torch.ops.pyvl.window_attention_backward_triton(*bargs)
    assert [tuple(g.shape) for g in grads] == [tuple(q.shape), (0,), tuple(v.shape), tuple(table.shape), (0,),
                                               tuple(ls.shape), (0,), tuple(pad_v.shape)]


def test_torch_compile_fullgraph_forward_and_backward():
    problem = pst.WindowProblem(B=1, sizes=(2, 5), heads=1, d=4, window=(2, 3), shift=(0, 1), bias="dense",
                                cosine=False, pad_kv=True, pad_first=False, mask_value=-100.0, dtype=torch.float32,
                                layout="contiguous", seed=6)
    _, args = _args(problem)
    fn = _op(problem, "triton")
    compiled = torch.compile(fn, fullgraph=True)
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    out = compiled(*leaves)
    out.backward(torch.ones_like(out))
    ref_leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    ref = _op(problem, "reference")(*ref_leaves)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(leaves, ref_leaves):
        if a is not None:
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)


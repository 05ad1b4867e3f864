"""Tier 2: pyvl.ops.window_attention's argument checks and the reference backend's gradients.

Kernel backends add their own tests (test_cpu_* here, tests/triton/ for Triton).
"""
import math

import pytest
import torch

import pyvl
from pyvl.ops import window_attention


def _qkv(shape=(2, 5, 6, 2, 4), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


BAD = [
    # (description, modify(q, k, v, kwargs), error type, words the message must contain)
    ("q 4-D", lambda q, k, v, kw: (q[0], k[0], v[0], kw), ValueError, ["q", "(B, H, W, heads, d)"]),
    ("k shape", lambda q, k, v, kw: (q, k[:, :4], v, kw), ValueError, ["k", "q's shape"]),
    ("v dtype", lambda q, k, v, kw: (q, k, v.double(), kw), TypeError, ["v", "dtype"]),
    ("integer q", lambda q, k, v, kw: (q.long(), k, v, kw), TypeError, ["q", "float"]),
    ("not a tensor", lambda q, k, v, kw: (q, k.tolist(), v, kw), TypeError, ["k", "torch.Tensor"]),
    ("window 0", lambda q, k, v, kw: (q, k, v, {**kw, "window_size": 0}), ValueError, ["window_size", ">= 1"]),
    ("window len", lambda q, k, v, kw: (q, k, v, {**kw, "window_size": (3, 3, 3)}), TypeError,
     ["window_size", "2 ints"]),
    ("shift >= window", lambda q, k, v, kw: (q, k, v, {**kw, "shift_size": 3}), ValueError,
     ["shift_size", "smaller than window_size"]),
    ("negative shift", lambda q, k, v, kw: (q, k, v, {**kw, "shift_size": -1}), ValueError, ["shift_size", ">= 0"]),
    ("table rows", lambda q, k, v, kw: (q, k, v, {**kw, "rel_bias_table": torch.zeros(24, 2)}), ValueError,
     ["rel_bias_table", "[25, 2]"]),
    ("dense shape", lambda q, k, v, kw: (q, k, v, {**kw, "rel_bias": torch.zeros(2, 9, 8)}), ValueError,
     ["rel_bias", "[2, 9, 9]"]),
    ("both biases", lambda q, k, v, kw: (q, k, v, {**kw, "rel_bias": torch.zeros(2, 9, 9),
                                                   "rel_bias_table": torch.zeros(25, 2)}), ValueError,
     ["rel_bias_table", "not both"]),
    ("logit_scale heads", lambda q, k, v, kw: (q, k, v, {**kw, "logit_scale": torch.zeros(3)}), ValueError,
     ["logit_scale", "2 elements"]),
    ("scale with cosine", lambda q, k, v, kw: (q, k, v, {**kw, "logit_scale": torch.zeros(2), "scale": 0.5}),
     ValueError, ["scale", "logit_scale"]),
    ("scale nan", lambda q, k, v, kw: (q, k, v, {**kw, "scale": float("nan")}), TypeError, ["scale", "finite"]),
    ("pad_kv single", lambda q, k, v, kw: (q, k, v, {**kw, "pad_kv": torch.zeros(2, 4)}), TypeError,
     ["pad_kv", "pair"]),
    ("pad_kv shape", lambda q, k, v, kw: (q, k, v, {**kw, "pad_kv": (torch.zeros(2, 4), torch.zeros(4, 2))}),
     ValueError, ["pad_kv[1]", "[2, 4]"]),
    ("positive mask", lambda q, k, v, kw: (q, k, v, {**kw, "mask_value": 5.0}), ValueError, ["mask_value", "<= 0"]),
    ("bias device", lambda q, k, v, kw: (q, k, v, {**kw, "rel_bias_table": torch.zeros(25, 2, device="meta")}),
     ValueError, ["rel_bias_table", "cpu"]),
    ("unknown backend", lambda q, k, v, kw: (q, k, v, {**kw, "backend": "tpu"}), ValueError, ["backend", "tpu"]),
]


@pytest.mark.parametrize("desc,modify,error,words", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(desc, modify, error, words):
    q, k, v = _qkv()
    q, k, v, kw = modify(q, k, v, {"window_size": 3})
    with pytest.raises(error) as info:
        window_attention(q, k, v, **kw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unrunnable_backend_says_why():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="triton"):
        window_attention(q, k, v, 3, backend="triton")


def test_reference_gradients_reach_every_input_gradcheck():
    """float64 gradcheck through the reference (the ground truth the kernels' gradients are held to)."""
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = (rnd(1, 4, 5, 2, 3) for _ in range(3))
    table, pk, pv = rnd(25, 2), rnd(2, 3), rnd(2, 3)
    ls = torch.tensor([0.3, 5.0], dtype=torch.float64, requires_grad=True)  # the second head is clamped
    dense = rnd(2, 9, 9)

    def plain(q, k, v, table, pk, pv):
        return window_attention(q, k, v, 3, 1, rel_bias_table=table, pad_kv=(pk, pv), backend="reference")

    def cosine(q, k, v, ls, dense):
        return window_attention(q, k, v, 3, 1, rel_bias=dense, logit_scale=ls, pad_first=False, backend="reference")

    assert torch.autograd.gradcheck(plain, (q, k, v, table, pk, pv))
    assert torch.autograd.gradcheck(cosine, (q, k, v, ls, dense))
    out = cosine(q, k, v, ls, dense)
    (gls,) = torch.autograd.grad(out.sum(), ls)
    assert gls[1] == 0 and gls[0] != 0  # clamp(max=log 100) passes no gradient where it clamps


def test_output_layout_and_3d():
    q, k, v = _qkv((1, 3, 4, 5, 2, 4))
    out = window_attention(q, k, v, (2, 3, 3), (1, 1, 1))
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    q2, k2, v2 = (t.transpose(-2, -3).contiguous().transpose(-2, -3) for t in (q, k, v))  # other strides
    torch.testing.assert_close(window_attention(q2, k2, v2, (2, 3, 3), (1, 1, 1)), out)


def test_dense_bias_equals_table_bias():
    from pyvl.reference.window_attention import relative_position_index

    q, k, v = _qkv((1, 7, 6, 2, 4))
    table = torch.randn(5 * 7, 2)
    dense = table[relative_position_index((3, 4)).reshape(-1)].reshape(12, 12, 2).permute(2, 0, 1)
    torch.testing.assert_close(window_attention(q, k, v, (3, 4), (1, 2), rel_bias_table=table),
                               window_attention(q, k, v, (3, 4), (1, 2), rel_bias=dense.contiguous()))


def test_unshifted_divisible_problem_is_plain_attention_per_window():
    """No shift, no padding: each window is softmax(q k^T / sqrt(d)) v of its tokens, as SDPA computes it."""
    q, k, v = _qkv((1, 4, 6, 2, 8))
    out = window_attention(q, k, v, (2, 3))

    def windows(t):  # (1, 4, 6, h, d) -> (4 windows, h, 6 tokens, d)
        return t.reshape(1, 2, 2, 2, 3, 2, 8).permute(0, 1, 3, 5, 2, 4, 6).reshape(4, 2, 6, 8)

    want = torch.nn.functional.scaled_dot_product_attention(windows(q), windows(k), windows(v))
    want = want.reshape(1, 2, 2, 2, 2, 3, 8).permute(0, 1, 4, 2, 5, 3, 6).reshape(out.shape)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_reference_compiles_fullgraph():
    q, k, v = (t.requires_grad_() for t in _qkv((1, 5, 5, 2, 4)))
    table = torch.randn(25, 2, requires_grad=True)
    fn = torch.compile(lambda q, k, v, t: window_attention(q, k, v, 3, 1, rel_bias_table=t, backend="reference"),
                       fullgraph=True, backend="eager")
    out = fn(q, k, v, table)
    out.sum().backward()
    assert math.isfinite(float(table.grad.abs().sum())) and table.grad.abs().sum() > 0


def test_public_namespace():
    assert pyvl.ops.window_attention is window_attention


# --------------------------------------------------------------------------------------------------------------
# The C++ CPU kernels (backend="cpu") against the reference: whole problems drawn by hypothesis, the error
# criterion for the output and every gradient, float64 gradcheck, opcheck, torch.compile.

import functools  # noqa: E402

from hypothesis import given, settings  # noqa: E402

from pyvl.testing import assert_close_to_reference, assert_gradients_close_to_reference  # noqa: E402
from pyvl.testing import strategies as pst  # noqa: E402

cpu_only = pytest.mark.skipif(pyvl._ext.LOAD_ERROR is not None or not pyvl._ext.has_kernel("window_attention", "CPU"),
                              reason="pyvl._C with the window-attention CPU kernels is not built")
_reference = functools.partial(window_attention, backend="reference")
_cpu = functools.partial(window_attention, backend="cpu")


def _positional(problem):
    """(tensors, fn(backend_op)): every tensor of the problem as a positional argument (so each gets a gradient),
    and a function of them calling the op with the problem's geometry."""
    q, k, v, kw = problem.make_inputs()
    names = [n for n in ("rel_bias_table", "rel_bias", "logit_scale") if n in kw]
    tensors = [q, k, v] + [kw.pop(n) for n in names]
    pad = kw.pop("pad_kv", None)
    if pad is not None:
        tensors += list(pad)

    def call(op):
        def fn(q, k, v, *rest):
            extra = dict(zip(names, rest))
            if pad is not None:
                extra["pad_kv"] = tuple(rest[len(names):])
            return op(q, k, v, **kw, **extra)
        return fn

    return tuple(tensors), call


@cpu_only
@given(pst.window_problems())
def test_cpu_forward_matches_reference(problem):
    tensors, call = _positional(problem)
    out = call(_cpu)(*tensors)
    q = tensors[0]
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_close_to_reference(out, call(_reference), tensors)


@cpu_only
@settings(max_examples=20)
@given(pst.window_problems(max_tokens=300))
def test_cpu_gradients_match_reference(problem):
    tensors, call = _positional(problem)
    assert_gradients_close_to_reference(call(_cpu), call(_reference), tensors)


@cpu_only
@settings(max_examples=10)
@given(pst.window_problems(dtypes=(torch.float16, torch.bfloat16), max_tokens=200, mask_values=(-100.0,)))
def test_cpu_half_precision(problem):
    tensors, call = _positional(problem)
    assert_gradients_close_to_reference(call(_cpu), call(_reference), tensors)


@cpu_only
def test_cpu_gradcheck_every_input():
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = (rnd(1, 4, 5, 2, 2) for _ in range(3))
    table, pk, pv = rnd(5 * 7, 2), rnd(2, 2), rnd(2, 2)

    def plain_2d(q, k, v, table, pk, pv):
        return _cpu(q, k, v, (3, 4), (1, 2), rel_bias_table=table, pad_kv=(pk, pv))

    assert torch.autograd.gradcheck(plain_2d, (q, k, v, table, pk, pv), fast_mode=True)
    q3, k3, v3 = (rnd(1, 2, 3, 4, 2, 2) for _ in range(3))
    dense = rnd(2, 12, 12)
    ls = torch.tensor([0.7, 5.0], dtype=torch.float64, requires_grad=True)  # the second head is clamped

    def cosine_3d(q, k, v, ls, dense, pk, pv):
        return _cpu(q, k, v, (2, 2, 3), (1, 1, 2), rel_bias=dense, logit_scale=ls, pad_kv=(pk, pv), pad_first=False,
                    mask_value=float("-inf"))

    assert torch.autograd.gradcheck(cosine_3d, (q3, k3, v3, ls, dense, pk, pv), fast_mode=True)
    (gls,) = torch.autograd.grad(cosine_3d(q3, k3, v3, ls, dense, pk, pv).sum(), ls)
    assert gls[1] == 0 and gls[0] != 0
    table3 = rnd(3 * 3 * 5, 2)
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: _cpu(q, k, v, (2, 2, 3), (1, 1, 2), rel_bias_table=t), (q3, k3, v3, table3),
        fast_mode=True)


@cpu_only
def test_cpu_opcheck():
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(1, 4, 5, 3, 2, 4, generator=g, requires_grad=True)
    q, k, v = qkv.unbind(-3)
    table, pk, pv = torch.randn(25, 2, generator=g), torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    ls = torch.rand(2, generator=g)
    fwd, bwd = torch.ops.pyvl.window_attention.default, torch.ops.pyvl.window_attention_backward.default
    torch.library.opcheck(fwd, (q, k, v, [3, 3], [1, 1], table, None, None, 0.5, pk, pv, True, -100.0))
    torch.library.opcheck(fwd, (q, k, v, [3, 3], [1, 1], None, None, ls, None, None, None, False, float("-inf")))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), [3, 3], [1, 1], table, None, None, 0.5, pk, pv, True, -100.0)
    go = torch.randn_like(out)
    torch.library.opcheck(bwd, (go, q.detach(), k.detach(), v.detach(), out, lse, [3, 3], [1, 1], table, None, None,
                                0.5, pk, pv, True, -100.0, [True, False, True, True, False, False, True, False]))


@cpu_only
def test_cpu_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(1, 3, 9, 10, 3, 2, 4, generator=g, requires_grad=True)
    table = torch.randn(3 * 5 * 5, 2, generator=g, requires_grad=True)

    def attn(qkv, table):
        q, k, v = qkv.unbind(-3)
        return _cpu(q, k, v, (2, 3, 3), (1, 1, 2), rel_bias_table=table)

    # aot_eager: dynamo's whole-graph capture and AOT autograd through the fake kernels and register_autograd
    # (what fullgraph depends on), without Inductor's C++ codegen, which costs tens of seconds on the CI machine.
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    out, want = compiled(qkv, table), attn(qkv, table)
    torch.testing.assert_close(out, want)
    for a, b in zip(torch.autograd.grad(out.square().sum(), (qkv, table)),
                    torch.autograd.grad(want.square().sum(), (qkv, table))):
        torch.testing.assert_close(a, b)


@cpu_only
def test_cpu_float16_stays_finite_where_float32_is():
    """Large logits overflow float16 arithmetic; the kernel computes in float32 and rounds once."""
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 9, 9, 2, 32, generator=g) * 6 for _ in range(3))
    want = _reference(q, k, v, 7, 3)
    assert torch.isfinite(want).all()
    out = _cpu(q.half(), k.half(), v.half(), 7, 3)
    assert torch.isfinite(out).all()
    qh, kh, vh = (t.half().requires_grad_() for t in (q, k, v))
    _cpu(qh, kh, vh, 7, 3).float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (qh, kh, vh))


@cpu_only
def test_cpu_is_the_cpu_default():
    q, k, v = _qkv()
    assert pyvl._backend.choose("window_attention", None, q) == "cpu"
    torch.testing.assert_close(window_attention(q, k, v, 3, 1), _cpu(q, k, v, 3, 1), rtol=0, atol=0)

"""Triton kernels of sequential attention against the PyTorch reference, through the public op.

Shapes stay small and parametrizations few: the interpreter runs a program per tile in numpy.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from pyvl.ops import sequential_attention  # noqa: E402
from pyvl.reference import sequential_attention as ref  # noqa: E402
from pyvl.testing import assert_close_to_reference, assert_gradients_close_to_reference  # noqa: E402

pytestmark = pytest.mark.triton

from _triton_env import DEVICE  # noqa: E402

BACKEND = "triton"

# (B, H, N, M, d, dv, bias shape): N, M past one 16/32/64 tile and not multiples of it, odd head dims, every bias form
CASES = [
    (2, 3, 19, 37, 5, 7, None),
    (1, 2, 70, 33, 16, 8, (70, 33)),
    (2, 3, 21, 45, 8, 3, (3, 21, 45)),
    (2, 2, 17, 20, 4, 4, (2, 1, 17, 20)),
    (2, 2, 9, 66, 6, 5, (1, 2, 9, 66)),
    (2, 1, 12, 30, 3, 9, (2, 1, 12, 30)),
    (2, 2, 10, 24, 4, 4, (2, 1, 1, 24)),
]


def _inputs(case, dtype, strided=False, seed=0):
    B, H, N, M, d, dv, bias_shape = case
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if strided:  # [B, N, H, E] transposed to [B, H, N, E]: the layout models produce
            x = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g, dtype=torch.float64).transpose(1, 2)
        return x.to(device=DEVICE, dtype=dtype)

    q, k, v = t(B, H, N, d), t(B, H, M, d), t(B, H, M, dv)
    bias = None
    if bias_shape is not None:
        bias = torch.randn(bias_shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    return q, k, v, bias


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_gradients(case, dtype):
    q, k, v, bias = _inputs(case, dtype, strided=case[0] == 2)
    out = sequential_attention(q, k, v, bias, backend=BACKEND)
    assert out.shape == q.shape[:3] + (v.shape[3],) and out.dtype == dtype
    assert_close_to_reference(out, ref.sequential_attention, (q, k, v, bias))
    args = (q, k, v) if bias is None else (q, k, v, bias)
    assert_gradients_close_to_reference(lambda *a: sequential_attention(*a, scale=0.3, backend=BACKEND),
                                        lambda *a: ref.sequential_attention(*a, scale=0.3), args)


@pytest.mark.parametrize("bias_shape", [(2, 1, 12, 20), (12, 20)])
def test_deterministic_bias_gradient(bias_shape):
    q, k, v, bias = _inputs((2, 2, 12, 20, 4, 4, bias_shape), torch.float32)
    grad = torch.randn(2, 2, 12, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(deterministic):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = sequential_attention(*leaves, deterministic=deterministic, backend=BACKEND)
        return (out,) + torch.autograd.grad(out, leaves, grad)

    first, second = run(True), run(True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # the atomic default computes the same sums in another order
    for a, b in zip(first, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nan_policy():
    q, k, v, bias = _inputs((1, 2, 20, 40, 4, 4, (20, 40)), torch.float32)
    bias[3] = -math.inf
    bias[7, :35] = -math.inf
    out = sequential_attention(q, k, v, bias, backend=BACKEND)
    assert torch.isnan(out[:, :, 3]).all()
    rows = [i for i in range(20) if i != 3]
    assert torch.isfinite(out[:, :, rows]).all()
    torch.testing.assert_close(out, ref.sequential_attention(q, k, v, bias), equal_nan=True)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    args = (t(2, 1, 5, 3), t(2, 1, 18, 3), t(2, 1, 18, 2), t(1, 1, 5, 18))
    assert torch.autograd.gradcheck(lambda *a: sequential_attention(*a, deterministic=True, backend=BACKEND), args,
                                    fast_mode=True)


def test_opcheck():
    q, k, v, bias = _inputs((1, 2, 9, 20, 4, 4, (1, 2, 9, 20)), torch.float32)
    torch.library.opcheck(torch.ops.pyvl.sequential_attention_triton.default, (q, k, v, bias, 0.5, False))
    out, lse = torch.ops.pyvl.sequential_attention_triton(q, k, v, bias, 0.5, False)
    torch.library.opcheck(torch.ops.pyvl.sequential_attention_backward_triton.default,
                          (torch.randn_like(out), q, k, v, bias, out, lse, 0.5, True, True))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v, bias = _inputs((1, 2, 9, 20, 4, 4, (2, 9, 20)), torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]

    def block(q, k, v, bias):
        return sequential_attention(q, k, v, bias, backend=BACKEND) * 2

    compiled = torch.compile(block, fullgraph=True)
    out, want = compiled(*leaves), block(*leaves)
    torch.testing.assert_close(out, want)
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        torch.testing.assert_close(a, b)

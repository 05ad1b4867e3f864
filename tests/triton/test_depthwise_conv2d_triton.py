"""Triton kernels of the depthwise-separable conv family against the PyTorch reference.

Shapes stay tiny and parametrizations few: the interpreter runs a program per tile in numpy.
"""
import importlib

import pytest
import torch

pytest.importorskip("triton")

import pyvl.testing  # noqa: E402

D = importlib.import_module("pyvl.ops.depthwise_conv2d")

pytestmark = pytest.mark.triton

from _triton_env import DEVICE  # noqa: E402

_assert_close = pyvl.testing.assert_close_to_reference  # the error criterion of DESIGN.md


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # non-contiguous: every other column of a wider tensor
        return torch.cat([x, x], dim=3)[..., ::2]
    return x


def _expected_format(x):
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    return fmt


# (N, C, H, W, kernel, stride, dilation): odd sizes, both strides and dilations, kernels 3 and 5
CASES = [
    (2, 5, 9, 7, 3, 1, 1),
    (1, 12, 8, 9, 5, 2, 1),
    (2, 3, 7, 9, 3, 2, 2),
    (1, 7, 9, 8, (3, 5), 1, 2),
]


def _problem(case, dtype, layout, seed=0):
    N, C, H, W, k, stride, dil = case
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float32).to(dtype=dtype, device=DEVICE)
    w = torch.randn(C, 1, kh, kw, generator=g, dtype=torch.float32).to(dtype=dtype, device=DEVICE)
    b = torch.randn(C, generator=g, dtype=torch.float32).to(dtype=dtype, device=DEVICE)
    return _layout(x, layout), w, b, stride, dil


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("case", CASES)
def test_forward(case, layout, dtype):
    x, w, b, stride, dil = _problem(case, dtype, layout)
    bias = b if case[0] == 2 else None  # with and without bias

    def run(x, w, b, backend):
        return D.depthwise_conv2d(x, w, b, stride=stride, dilation=dil, backend=backend)

    out = run(x, w, bias, "triton")
    assert out.dtype == dtype
    if layout != "sliced":
        assert out.is_contiguous(memory_format=_expected_format(x))
    _assert_close(out, lambda x, w, b: run(x, w, b, "reference"), (x, w, bias))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES[:3])
def test_gradients(case, layout):
    x, w, b, stride, dil = _problem(case, torch.float32, layout)

    def run(backend):
        return lambda x, w, b: D.depthwise_conv2d(x, w, b, stride=stride, dilation=dil, backend=backend)

    pyvl.testing.assert_gradients_close_to_reference(run("triton"), run("reference"), (x, w, b))
    # grad x comes back in grad_out's layout
    xs = x.detach().requires_grad_()
    out = run("triton")(xs, w, b)
    (gx,) = torch.autograd.grad(out, xs, torch.ones_like(out))
    assert gx.is_contiguous(memory_format=_expected_format(out))


def test_gradcheck_float64():
    x, w, b, stride, dil = _problem((1, 2, 5, 4, 3, 2, 1), torch.float64, "contiguous")
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: D.depthwise_conv2d(x, w, b, stride=stride, dilation=dil, backend="triton"),
        inputs, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_dsconv2d(activation, dtype):
    # channels_last for relu, NCHW otherwise; stride 2 with relu6; C_out above one 16-wide dot block
    layout = "channels_last" if activation == "relu" else "contiguous"
    stride = 2 if activation == "relu6" else 1
    x, w, b, _, _ = _problem((2, 12, 9, 7, 3, stride, 1), dtype, layout)
    g = torch.Generator().manual_seed(2)
    pw = (torch.randn(19, 12, generator=g) / 3).to(dtype=dtype, device=DEVICE)
    pb = torch.randn(19, generator=g).to(dtype=dtype, device=DEVICE)

    def run(x, w, b, pw, pb, backend):
        return D.dsconv2d(x, w, pw, b, pb, stride=stride, dw_activation=activation, pw_activation=activation,
                          backend=backend)

    out = run(x, w, b, pw, pb, "triton")
    assert out.shape == (2, 19, *out.shape[2:]) and out.dtype == dtype
    assert out.is_contiguous(memory_format=_expected_format(x))
    _assert_close(out, lambda *a: run(*a, "reference"), (x, w, b, pw, pb))


def test_dsconv2d_gradients():
    x, w, b, _, _ = _problem((1, 5, 6, 7, 3, 1, 1), torch.float32, "contiguous")
    g = torch.Generator().manual_seed(3)
    pw, pb = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)

    def run(backend):
        return lambda x, w, b, pw, pb: D.dsconv2d(x, w, pw, b, pb, dw_activation="relu6", pw_activation="relu",
                                                  backend=backend)

    pyvl.testing.assert_gradients_close_to_reference(run("triton"), run("reference"), (x, w, b, pw, pb))


def test_opcheck_depthwise():
    x, w, b, _, _ = _problem((1, 3, 5, 6, 3, 1, 1), torch.float32, "contiguous")
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [2, 1], [1, 1], [1, 2])
    torch.library.opcheck(torch.ops.pyvl.depthwise_conv2d_triton.default, args)


def test_opcheck_dsconv2d():
    x, w, b, _, _ = _problem((1, 4, 5, 6, 3, 1, 1), torch.float32, "channels_last")
    pw, pb = torch.randn(5, 4), torch.randn(5)
    args = (x.requires_grad_(), w.requires_grad_(), b, pw.requires_grad_(), pb, [1, 1], [1, 1], [1, 1], 1, 2)
    torch.library.opcheck(torch.ops.pyvl.dsconv2d_triton.default, args)

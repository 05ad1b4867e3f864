"""The CUDA kernels of the depthwise family (csrc/cuda/depthwise_conv2d.cu) against the reference backend.

Forward, every gradient (through backend="cuda": the CUDA forward, backward_input and backward_weight kernels) and
the fused dsconv2d, in float32/float16/bfloat16 (and float64 for the exact path), over odd sizes, stride 1/2,
dilation 1/2, kernels 3/5/7, NCHW and channels_last, and non-contiguous inputs. Accuracy by the error criterion of
DESIGN.md: with ref in float64, max|out - ref| <= 2 * max|torch_same_dtype - ref| + atol.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import pyvl  # noqa: F401  (loads pyvl._C, which registers the CUDA kernels)
from pyvl import _backend
from pyvl.ops import depthwise_conv2d, dsconv2d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from pyvl.testing import check_error_criterion

# The Triton kernels run here on CUDA tensors too: this file is what verifies both GPU backends on a GPU.
GPU_BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, C, H, W, kernel (KH, KW), stride, dilation, padding); padding None = MobileNet's dilation*(K-1)//2.
SHAPES = [
    (2, 5, 7, 9, (3, 3), (1, 1), (1, 1), None),
    (1, 8, 13, 11, (3, 3), (2, 2), (1, 1), None),
    (2, 3, 15, 10, (5, 5), (1, 1), (2, 2), None),
    (1, 6, 17, 19, (7, 7), (2, 2), (2, 2), None),
    (3, 7, 9, 9, (3, 5), (1, 2), (2, 1), (0, 3)),
    (1, 33, 6, 5, (3, 3), (2, 1), (1, 1), (2, 0)),
    (4, 3, 40, 40, (3, 3), (1, 1), (1, 1), None),  # enough points for the split weight-gradient reduction
    (2, 40, 12, 14, (3, 3), (1, 1), (1, 1), None),  # NHWC weight gradient over two 32-channel blocks
]
LAYOUTS = ["nchw", "channels_last", "strided", "channels_last_strided"]


def _seed(*key):
    """A seed that is the same in every process (hash() of a str is not)."""
    return zlib.crc32(repr(key).encode())


def _shape_id(shape):
    N, C, H, W, k, s, d, p = shape
    return f"{N}x{C}x{H}x{W}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-d{d[0]}{d[1]}-p{p}"


def _input(N, C, H, W, dtype, layout, gen):
    """x [N, C, H, W] in `layout`: dense NCHW or NHWC, or a strided view of a wider tensor."""
    if layout in ("strided", "channels_last_strided"):
        base = torch.randn(N, C, H, 2 * W, generator=gen, device="cuda").to(dtype)
        if layout == "channels_last_strided":
            base = base.contiguous(memory_format=torch.channels_last)
        x = base[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x
    x = torch.randn(N, C, H, W, generator=gen, device="cuda").to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _leaf(t, dtype):
    """A leaf copy of t in `dtype` that keeps t's strides (so float64 copies see the same layout)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
    out.copy_(t)
    return out.requires_grad_()


def _forward_and_grads(fn, args, dtype, cotangent_seed=0):
    leaves = [_leaf(a, dtype) if a is not None else None for a in args]
    out = fn(*leaves)
    gen = torch.Generator(device="cuda").manual_seed(cotangent_seed)
    g = torch.randn(out.shape, generator=gen, device="cuda").to(out.dtype)
    out.backward(g)
    return out.detach(), [a.grad if a is not None else None for a in leaves]


def _check_against_reference(fn, args, dtype, names, backend="cuda"):
    """fn(*args, backend) in dtype with the GPU backend against backend="reference" (float64 and dtype)."""
    out, grads = _forward_and_grads(lambda *a: fn(*a, backend=backend), args, dtype)
    ref, ref_grads = _forward_and_grads(lambda *a: fn(*a, backend="reference"), args, torch.float64)
    torch_out, torch_grads = _forward_and_grads(lambda *a: fn(*a, backend="reference"), args, dtype)
    assert out.dtype == dtype
    check_error_criterion(out, ref, torch_out, name="output")
    for name, g, r, t in zip(names, grads, ref_grads, torch_grads):
        if r is None:
            continue
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == dtype and g.shape == r.shape
        check_error_criterion(g, r, t, name=f"grad {name}")
    return out


def test_cuda_backend_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyvl::depthwise_conv2d", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyvl::dsconv2d", "CUDA")
    assert _backend.availability("cuda") is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
def test_depthwise_conv2d_cuda(shape, layout, dtype, gpu_backend):
    N, C, H, W, (KH, KW), stride, dilation, padding = shape
    gen = torch.Generator(device="cuda").manual_seed(_seed(shape, layout))
    x = _input(N, C, H, W, torch.float32, layout, gen)
    weight = torch.randn(C, 1, KH, KW, generator=gen, device="cuda")
    bias = torch.randn(C, generator=gen, device="cuda")

    def fn(x, weight, bias, backend):
        return depthwise_conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, backend=backend)

    out = _check_against_reference(fn, (x, weight, bias), dtype, ("x", "weight", "bias"), gpu_backend)
    # The output keeps the caller's layout, as the CPU kernels and torch do.
    if layout in ("channels_last", "channels_last_strided") and C > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif layout == "nchw":
        assert out.is_contiguous()


@pytest.mark.parametrize("shape", SHAPES[:4], ids=_shape_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_depthwise_conv2d_cuda_float64_exact(shape, layout):
    """float64 accumulates in float64: the CUDA result matches F.conv2d to rounding, without the 2x allowance."""
    N, C, H, W, (KH, KW), stride, dilation, padding = shape
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = _input(N, C, H, W, torch.float64, layout, gen)
    weight = torch.randn(C, 1, KH, KW, generator=gen, device="cuda", dtype=torch.float64)
    out = depthwise_conv2d(x, weight, None, stride=stride, padding=padding, dilation=dilation, backend="cuda")
    ref = depthwise_conv2d(x, weight, None, stride=stride, padding=padding, dilation=dilation, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_backward_ops_directly():
    """The backward ops on their own, with grad_out in a different layout from x (as autograd can hand it)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, 9, 11, 13, generator=gen, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(9, 1, 5, 3, generator=gen, device="cuda")
    stride, padding, dilation = [2, 1], [1, 2], [1, 2]
    out_ref = torch.nn.functional.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups=9)
    g = torch.randn(out_ref.shape, generator=gen, device="cuda")  # NCHW while x is channels_last
    gx = torch.ops.pyvl.depthwise_conv2d_backward_input(g, w, list(x.shape[2:]), stride, padding, dilation)
    gw = torch.ops.pyvl.depthwise_conv2d_backward_weight(g, x, [5, 3], stride, padding, dilation)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    torch.nn.functional.conv2d(xd, wd, None, stride, padding, dilation, groups=9).backward(g.double())
    torch.testing.assert_close(gx.double(), xd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), wd.grad, rtol=1e-4, atol=1e-4)
    assert gx.is_contiguous()  # backward_input answers in grad_out's layout
    assert gw.shape == (9, 1, 5, 3)


DSCONV_CASES = [
    # (N, C, H, W, kernel, stride, dilation, C_out, dw_activation, pw_activation)
    (2, 5, 7, 9, (3, 3), (1, 1), (1, 1), 7, "relu", "relu"),
    (1, 17, 13, 11, (3, 3), (2, 2), (1, 1), 70, "relu6", "none"),  # C not a multiple of 16, two C_out tiles
    (2, 3, 15, 10, (5, 5), (1, 1), (2, 2), 1, "none", "relu6"),
    (1, 40, 9, 12, (7, 7), (2, 1), (1, 2), 130, "relu", "relu6"),  # three input-channel steps, three C_out tiles
    (3, 32, 8, 8, (3, 3), (1, 1), (1, 1), 64, "relu6", "relu6"),  # exact tile multiples
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DSCONV_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-k{c[4][0]}-co{c[7]}")
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
def test_dsconv2d_cuda(case, layout, dtype, with_bias, gpu_backend):
    N, C, H, W, (KH, KW), stride, dilation, C_out, dw_act, pw_act = case
    gen = torch.Generator(device="cuda").manual_seed(_seed(case, layout))
    x = _input(N, C, H, W, torch.float32, layout, gen)
    dw_weight = torch.randn(C, 1, KH, KW, generator=gen, device="cuda") / (KH * KW) ** 0.5
    pw_weight = torch.randn(C_out, C, generator=gen, device="cuda") / C ** 0.5
    dw_bias = torch.randn(C, generator=gen, device="cuda") if with_bias else None
    pw_bias = torch.randn(C_out, generator=gen, device="cuda") if with_bias else None

    def fn(x, dw_weight, pw_weight, dw_bias, pw_bias, backend):
        return dsconv2d(x, dw_weight, pw_weight, dw_bias, pw_bias, stride=stride, dilation=dilation,
                        dw_activation=dw_act, pw_activation=pw_act, backend=backend)

    out = _check_against_reference(fn, (x, dw_weight, pw_weight, dw_bias, pw_bias), dtype,
                                   ("x", "dw_weight", "pw_weight", "dw_bias", "pw_bias"), gpu_backend)
    if layout == "channels_last" and C_out > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_dsconv2d_relu_propagates_nan():
    x = torch.zeros(1, 4, 5, 5, device="cuda")
    x[0, 1, 2, 2] = float("nan")
    dw = torch.ones(4, 1, 3, 3, device="cuda")
    pw = torch.ones(3, 4, device="cuda")
    out = dsconv2d(x, dw, pw, backend="cuda")
    ref = dsconv2d(x, dw, pw, backend="reference")
    assert torch.equal(out.isnan(), ref.isnan())


def test_cpu_path_unchanged():
    x = torch.randn(2, 5, 9, 7)
    w = torch.randn(5, 1, 3, 3)
    torch.testing.assert_close(depthwise_conv2d(x, w, backend="cpu"), depthwise_conv2d(x, w, backend="reference"))


def test_other_stream_and_device_guard():
    """Kernels run on the caller's current stream."""
    x = torch.randn(2, 8, 16, 16, device="cuda")
    w = torch.randn(8, 1, 3, 3, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = depthwise_conv2d(x, w, backend="cuda")
    s.synchronize()
    torch.testing.assert_close(out, depthwise_conv2d(x, w, backend="reference"), rtol=1e-5, atol=1e-5)


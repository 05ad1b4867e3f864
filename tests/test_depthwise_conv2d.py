"""Tier 2: the C++ CPU kernels of the depthwise-separable family against the references, plus the op contract
(gradcheck, opcheck, torch.compile, argument errors, backend choice)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyvl
from pyvl.ops import depthwise_conv2d, dsconv2d
from pyvl.reference import depthwise_conv2d as ref
from pyvl.testing import assert_close_to_reference, assert_gradients_close_to_reference
from pyvl.testing import strategies as pst

BACKEND = "cpu"


def _geometry(p):
    return dict(stride=p.stride, padding=p.padding, dilation=p.dilation)


@given(pst.depthwise_problems(dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16)))
def test_depthwise_forward(problem):
    x, w, b = problem.make_inputs()
    out = depthwise_conv2d(x, w, b, **_geometry(problem), backend=BACKEND)
    assert out.dtype == x.dtype
    assert out.shape[2:] == problem.output_size()
    assert_close_to_reference(out, ref.depthwise_conv2d, (x, w, b, problem.stride, problem.padding,
                                                          problem.dilation))
    if problem.layout == "channels_last" and min(out.shape[1:]) > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


@given(pst.depthwise_problems(dtypes=(torch.float32, torch.float64)))
def test_depthwise_gradients(problem):
    _check_gradients(problem)


def _check_gradients(problem):
    x, w, b = problem.make_inputs()
    g = _geometry(problem)
    args = (x, w) if b is None else (x, w, b)
    assert_gradients_close_to_reference(
        lambda *a: depthwise_conv2d(*a, **g, backend=BACKEND),
        lambda *a: ref.depthwise_conv2d(*(a + (None,) * (3 - len(a))), problem.stride, problem.padding,
                                        problem.dilation), args)


@given(pst.depthwise_problems(dtypes=(torch.float32, torch.float64), kernel_sizes=(3,), layouts=("channels_last",),
                              max_stride=2, max_dilation=1, max_elements=20000))
def test_depthwise_gradients_3x3_channels_last(problem):
    # MobileNet's case has kernels of its own in the C++ backward (register-blocked weight gradient at stride 1
    # and 2, the input gradient through the forward strips at stride 1 and through their transposed column taps at
    # stride 2): drawn here on every run, with channel counts past one 8-wide vector and the band split of the
    # weight gradient.
    _check_gradients(problem)


@given(pst.depthwise_problems(dtypes=(torch.float32, torch.float64), kernel_sizes=(3,), layouts=("nchw",),
                              max_stride=2, max_dilation=1, max_elements=20000))
def test_depthwise_3x3_nchw(problem):
    # MobileNet's NCHW case: under AVX-512 and AVX2 the forward's 3x3 register tiles (stride_h = stride_w,
    # dilation 1; under AVX2 on a zero-padded copy of each plane) and, for rows of at most half a vector (8 outputs,
    # 4 under AVX2), two planes per vector (odd N*C leaves one plane alone; the two planes of a vector may come from
    # different images). The general draw reaches these in well under 1% of its problems.
    x, w, b = problem.make_inputs()
    out = depthwise_conv2d(x, w, b, **_geometry(problem), backend=BACKEND)
    assert_close_to_reference(out, ref.depthwise_conv2d, (x, w, b, problem.stride, problem.padding,
                                                          problem.dilation))
    _check_gradients(problem)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C, H, W, past_prefetch", [(40, 101, 97, True), (520, 15, 13, False), (1030, 9, 22, False)])
def test_channels_last_strip_variants(stride, C, H, W, past_prefetch):
    """Channels-last 3x3 cases of the C++ strips that the drawn problems are too small to reach (csrc/cpu/
    depthwise_conv2d.cpp): an input above the row-ahead prefetch threshold (4 MiB per thread; the prefetch runs on
    AMD processors), and pixels of 2 KiB and more (C >= 512 floats), which run 8-pixel strips under AVX-512. C is not
    a multiple of the 32-channel block. Forward, and every gradient (grad_x at stride 1 runs the same strips)."""
    N = (4 << 20) * torch.get_num_threads() // (C * H * W * 4) + 1 if past_prefetch else 2
    g = torch.Generator().manual_seed(stride)
    x = torch.randn(N, C, H, W, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(C, 1, 3, 3, generator=g).requires_grad_()
    b = torch.randn(C, generator=g).requires_grad_()
    out = depthwise_conv2d(x, w, b, stride=stride, padding=1, backend=BACKEND)
    assert_close_to_reference(out, ref.depthwise_conv2d, (x, w, b, stride, 1, 1))
    assert_gradients_close_to_reference(lambda x, w, b: depthwise_conv2d(x, w, b, stride=stride, padding=1,
                                                                         backend=BACKEND),
                                        lambda x, w, b: ref.depthwise_conv2d(x, w, b, stride, 1, 1), (x, w, b))


@given(pst.depthwise_problems(dtypes=(torch.float32, torch.float64), kernel_sizes=(1, 3, 5), C_out=True),
       st.sampled_from(["none", "relu", "relu6"]), st.sampled_from(["none", "relu", "relu6"]))
def test_dsconv_forward_and_gradients(problem, dw_act, pw_act):
    x, w, b = problem.make_inputs()
    pw, pb = problem.make_pointwise()
    g = _geometry(problem)

    def fused(x, w, pw, b=None, pb=None):
        return dsconv2d(x, w, pw, b, pb, **g, dw_activation=dw_act, pw_activation=pw_act, backend=BACKEND)

    def reference(x, w, pw, b=None, pb=None):
        return ref.dsconv2d(x, w, b, pw, pb, problem.stride, problem.padding, problem.dilation, dw_act, pw_act)

    args = (x, w, pw) + ((b, pb) if problem.bias else ())
    assert_gradients_close_to_reference(fused, reference, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dsconv_low_precision(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 11, 9, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 1, 3, 3, generator=g).to(dtype)
    pw = (torch.randn(24, 16, generator=g) / 4).to(dtype)
    out = dsconv2d(x, w, pw, stride=2, backend=BACKEND)
    assert_close_to_reference(out, lambda x, w, pw: ref.dsconv2d(x, w, None, pw, None, (2, 2), (1, 1), (1, 1),
                                                                 "relu", "relu"), (x, w, pw))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    pw = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    pb = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: depthwise_conv2d(x, w, b, stride=(2, 1), dilation=(1, 2), backend=BACKEND), (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b, pw, pb: dsconv2d(x, w, pw, b, pb, stride=2, dw_activation="none", pw_activation="none",
                                         backend=BACKEND), (x, w, b, pw, pb))
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: depthwise_conv2d(x, w, backend=BACKEND), (xc, w))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_opcheck(layout):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 7, 5, generator=g).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(4, 1, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    pw = torch.randn(6, 4, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.pyvl.depthwise_conv2d.default, (x, w, b, [2, 2], [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.pyvl.dsconv2d.default, (x, w, b, pw, None, [1, 2], [1, 1], [1, 1], 2, 1))
    go = torch.randn(2, 4, 4, 3, generator=g)
    torch.library.opcheck(torch.ops.pyvl.depthwise_conv2d_backward_input.default,
                          (go, w.detach(), [7, 5], [2, 2], [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.pyvl.depthwise_conv2d_backward_weight.default,
                          (go, x.detach(), [3, 3], [2, 2], [1, 1], [1, 1]))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 10, 10, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, 1, 3, 3, generator=g, requires_grad=True)
    pw = torch.randn(5, 8, generator=g, requires_grad=True)

    def block(x, w, pw):
        return dsconv2d(x, w, pw, stride=2, backend=BACKEND) + depthwise_conv2d(x, w, stride=2, backend=BACKEND).sum(
            1, keepdim=True)

    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, w, pw)
    want = block(x, w, pw)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.sum(), (x, w, pw))
    want_grads = torch.autograd.grad(want.sum(), (x, w, pw))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------------------
# Bad inputs: an error that names the argument, never a crash or a silent wrong answer.

def _ok():
    return torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)


@pytest.mark.parametrize("make,exc,match", [
    (lambda x, w: ((x, torch.randn(4, 1, 2, 2)), {}), ValueError, "weight must have odd kernel sizes"),
    (lambda x, w: ((x, torch.randn(3, 1, 3, 3)), {}), ValueError, r"weight must have shape \[C, 1, KH, KW\]"),
    (lambda x, w: ((x, torch.randn(4, 3, 3)), {}), ValueError, "weight must have 4 dimensions"),
    (lambda x, w: ((x[0], w), {}), ValueError, "x must have 4 dimensions"),
    (lambda x, w: ((x.double(), w), {}), TypeError, "weight must have dtype torch.float64"),
    (lambda x, w: ((x.int(), w), {}), TypeError, "x must be float16, bfloat16, float32 or float64"),
    (lambda x, w: ((x, w.to("meta")), {}), ValueError, "weight must be on cpu"),
    (lambda x, w: ((x.numpy(), w), {}), TypeError, "x must be a torch.Tensor"),
    (lambda x, w: ((x, w, torch.randn(5)), {}), ValueError, r"bias must have shape \[4\]"),
    (lambda x, w: ((x, w), {"padding": 0, "dilation": 5}), ValueError, "padding .* is too small"),
    (lambda x, w: ((x, w), {"stride": 0}), ValueError, "stride must be >= 1"),
    (lambda x, w: ((x, w), {"stride": 1.5}), TypeError, "stride must be an int or a pair"),
    (lambda x, w: ((x, w), {"padding": -1}), ValueError, "padding must be >= 0"),
    (lambda x, w: ((x, w), {"padding": "same", "stride": 2}), ValueError, "padding='same' needs stride 1"),
    (lambda x, w: ((x, w), {"backend": "gpu"}), ValueError, "backend must be one of"),
    (lambda x, w: ((x, w), {"backend": "cuda"}), RuntimeError, "backend 'cuda' cannot run this input"),
])
def test_depthwise_bad_inputs(make, exc, match):
    args, kwargs = make(*_ok())
    with pytest.raises(exc, match=match):
        depthwise_conv2d(*args, **kwargs)


@pytest.mark.parametrize("make,exc,match", [
    (lambda x, w: ((x, w, torch.randn(6, 5)), {}), ValueError, r"pw_weight must have shape \[C_out, 4\]"),
    (lambda x, w: ((x, w, torch.randn(6, 4).double()), {}), TypeError, "pw_weight must have dtype"),
    (lambda x, w: ((x, w, torch.randn(6, 4)), {"pw_bias": torch.randn(4)}), ValueError,
     r"pw_bias must have shape \[6\]"),
    (lambda x, w: ((x, w, torch.randn(6, 4)), {"dw_activation": "gelu"}), ValueError, "dw_activation must be one"),
    (lambda x, w: ((x, torch.randn(4, 1, 4, 3), torch.randn(6, 4)), {}), ValueError, "dw_weight must have odd"),
])
def test_dsconv_bad_inputs(make, exc, match):
    args, kwargs = make(*_ok())
    with pytest.raises(exc, match=match):
        dsconv2d(*args, **kwargs)


def test_env_backend(monkeypatch):
    x, w = _ok()
    monkeypatch.setenv("PYVL_BACKEND", "nope")
    with pytest.raises(ValueError, match="PYVL_BACKEND must be one of"):
        depthwise_conv2d(x, w)
    monkeypatch.setenv("PYVL_BACKEND", "reference")
    torch.testing.assert_close(depthwise_conv2d(x, w), depthwise_conv2d(x, w, backend=BACKEND))


def test_default_backend_on_cpu_follows_the_measurements(monkeypatch):
    # The fused block's C++ kernel is faster than PyTorch; the depthwise kernel alone wins in NCHW (forward, and
    # forward + backward) but not yet in channels_last (see _CPU_ORDER), so the default depends on the layout.
    monkeypatch.delenv(pyvl._backend.ENV_VAR, raising=False)
    nchw = torch.empty(2, 3, 4, 5)
    channels_last = nchw.contiguous(memory_format=torch.channels_last)
    assert pyvl._backend.choose("dsconv2d", None, channels_last) == "cpu"
    assert pyvl._backend.choose("depthwise_conv2d", None, nchw) == "cpu"
    assert pyvl._backend.choose("depthwise_conv2d", None, channels_last) == "reference"
    # Training (a gradient will be taken): the C++ forward + backward wins in NCHW, not yet in channels_last.
    assert pyvl._backend.choose("depthwise_conv2d", None, nchw, training=True) == "cpu"
    assert pyvl._backend.choose("depthwise_conv2d", None, channels_last, training=True) == "reference"
    assert pyvl._backend.choose("depthwise_conv2d", "cpu", channels_last) == "cpu"
    assert pyvl._backend.choose("depthwise_conv2d", "reference", nchw, training=True) == "reference"
    # A tensor dense in both formats (one channel, or 1x1 planes) counts as NCHW.
    assert pyvl._backend.layout_of(torch.empty(2, 1, 4, 5).contiguous(memory_format=torch.channels_last)) == "nchw"

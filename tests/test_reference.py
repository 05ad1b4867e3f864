"""Tier 1: the references against float64 math written out directly (loops, formulas)."""
import itertools

import pytest
import torch

from pyvl.reference import depthwise_conv2d as ref


def _direct_depthwise(x, w, b, stride, padding, dilation):
    N, C, H, W = x.shape
    KH, KW = w.shape[2:]
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    out = torch.zeros(N, C, OH, OW, dtype=torch.float64)
    for n, c, oh, ow in itertools.product(range(N), range(C), range(OH), range(OW)):
        acc = float(b[c]) if b is not None else 0.0
        for kh, kw in itertools.product(range(KH), range(KW)):
            ih = oh * stride[0] - padding[0] + kh * dilation[0]
            iw = ow * stride[1] - padding[1] + kw * dilation[1]
            if 0 <= ih < H and 0 <= iw < W:
                acc += float(x[n, c, ih, iw]) * float(w[c, 0, kh, kw])
        out[n, c, oh, ow] = acc
    return out


@pytest.mark.parametrize("stride,padding,dilation,k", [
    ((1, 1), (1, 1), (1, 1), (3, 3)), ((2, 1), (0, 2), (1, 2), (3, 5)), ((3, 2), (3, 1), (2, 1), (7, 1))])
def test_depthwise_reference_matches_loops(stride, padding, dilation, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    w = torch.randn(3, 1, *k, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    got = ref.depthwise_conv2d(x, w, b, stride, padding, dilation)
    torch.testing.assert_close(got, _direct_depthwise(x, w, b, stride, padding, dilation), rtol=1e-12, atol=1e-12)


def test_dsconv_reference_is_the_composition():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    pw = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b1, b2 = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    h = _direct_depthwise(x, w, b1, (2, 2), (1, 1), (1, 1)).clamp(0, 6)
    want = (torch.einsum("oc,nchw->nohw", pw, h) + b2[None, :, None, None]).clamp(min=0)
    got = ref.dsconv2d(x, w, b1, pw, b2, (2, 2), (1, 1), (1, 1), "relu6", "relu")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fold_batch_norm_equals_conv_then_bn():
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True).double()
    bn = torch.nn.BatchNorm2d(6, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, generator=g))
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(6, generator=g))
        bn.bias.copy_(torch.randn(6, generator=g))
    x = torch.randn(2, 6, 5, 5, generator=g, dtype=torch.float64)
    w, b = ref.fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(ref.depthwise_conv2d(x, w, b, (1, 1), (1, 1), (1, 1)), bn(conv(x)), rtol=1e-12,
                               atol=1e-12)


def test_activations():
    x = torch.tensor([-1.0, 0.0, 3.0, 6.0, 7.5], dtype=torch.float64)
    assert ref.activate(x, "relu").tolist() == [0.0, 0.0, 3.0, 6.0, 7.5]
    assert ref.activate(x, "relu6").tolist() == [0.0, 0.0, 3.0, 6.0, 6.0]
    assert ref.activate(x, "none").tolist() == x.tolist()
    with pytest.raises(ValueError, match="activation"):
        ref.activate(x, "gelu")

"""MobileNetV1 (pyvl.models.mobilenet_v1), its block (pyvl.nn.DepthwiseSeparableConv2d) and from_timm, against
timm's mobilenetv1 family built with pretrained=False."""
from __future__ import annotations

import copy

import pytest
import torch

import pyvl.interop
import pyvl.models
from pyvl.nn import DepthwiseSeparableConv2d
from pyvl.testing import assert_close_to_reference, check_error_criterion, randomize_norms

timm = pytest.importorskip("timm")
from timm.models.efficientnet import _gen_mobilenet_v1  # noqa: E402

# For comparisons with no float64 truth at hand (gradients, running statistics, block paths): float32, where the
# fused and folded path only reorders sums.
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def timm_v1():
    torch.manual_seed(0)
    return randomize_norms(timm.create_model("mobilenetv1_100", pretrained=False)).eval()


def test_parameter_count():
    assert sum(p.numel() for p in pyvl.models.mobilenet_v1().parameters()) == 4_231_976


def test_state_dict_matches_timm(timm_v1):
    ours = pyvl.models.mobilenet_v1().state_dict()
    theirs = timm_v1.state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def _in_dtype_of(model):
    """ref_fn for assert_close_to_reference: the timm model, run in the dtype of its input (float64 for the truth)."""
    models = {torch.float32: model, torch.float64: copy.deepcopy(model).double()}
    return lambda x: models[x.dtype](x)


@pytest.mark.parametrize("resolution", [96, 64])
def test_from_timm_eval_parity(timm_v1, resolution):
    ours = pyvl.interop.from_timm(timm_v1)
    assert isinstance(ours, pyvl.models.MobileNetV1) and not ours.training
    x = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(resolution))
    with torch.no_grad():
        out = ours(x)
        print(f"max |pyvl - timm| at {resolution}: {(out - timm_v1(x)).abs().max().item():.3g}")
    assert_close_to_reference(out, _in_dtype_of(timm_v1), (x,), name=f"logits at {resolution}px")


def test_train_mode_matches_timm():
    """Train mode: parameter gradients and updated running statistics match timm's plain PyTorch by the error
    criterion against timm run in float64 (the gradients sum over a 28-layer network, so float32 differences grow
    with depth: a fixed 1e-4 tolerance failed on the stem's weight on an AMD EPYC that passed on a Xeon)."""
    torch.manual_seed(1)
    theirs = randomize_norms(timm.create_model("mobilenetv1_100", pretrained=False, num_classes=10)).train()
    truth = copy.deepcopy(theirs).double()
    ours = pyvl.interop.from_timm(theirs)
    assert ours.training
    x = torch.randn(2, 3, 48, 48)
    target = torch.tensor([3, 7])
    for model, inp in ((ours, x), (theirs, x), (truth, x.double())):
        torch.nn.functional.cross_entropy(model(inp), target).backward()
    grads, true_grads = dict(theirs.named_parameters()), dict(truth.named_parameters())
    for name, p in ours.named_parameters():
        check_error_criterion(p.grad, true_grads[name].grad, grads[name].grad, name=f"{name}.grad")
    buffers, true_buffers = dict(theirs.named_buffers()), dict(truth.named_buffers())
    for name, b in ours.named_buffers():
        if b.is_floating_point():
            check_error_criterion(b, true_buffers[name], buffers[name], name=name)
        else:
            assert torch.equal(b, buffers[name]), name


@pytest.mark.parametrize("width_mult", [0.5, 0.75, 0.25, 1.25])
def test_width_mult_matches_timm_rounding(width_mult):
    theirs = _gen_mobilenet_v1(f"mobilenetv1_{int(width_mult * 100):03d}", width_mult)
    ours = pyvl.models.mobilenet_v1(width_mult)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in theirs.state_dict().items()}
    assert pyvl.interop.from_timm(theirs).blocks[-1][-1].out_channels == theirs.num_features


@pytest.mark.parametrize("name", ["mobilenetv1_100h", "mobilenetv1_125"])
def test_from_timm_variants(name):
    theirs = randomize_norms(timm.create_model(name, pretrained=False)).eval()
    ours = pyvl.interop.from_timm(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_paper_variant_builds():
    model = pyvl.models.mobilenet_v1(0.5, num_classes=0, activation="relu", eps=1e-3)
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 512)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("activation", ["relu6", "relu", "none"])
def test_block_fused_equals_unfused(stride, activation):
    torch.manual_seed(2)
    block = randomize_norms(DepthwiseSeparableConv2d(12, 20, 3, stride, activation=activation)).eval()
    x = torch.randn(2, 12, 11, 13, requires_grad=True)
    fused = block(x)
    unfused = block.forward_unfused(x)
    torch.testing.assert_close(fused, unfused, **TOL)
    # The fused op's backward must give the unfused path's gradients through the fold too.
    g = torch.randn_like(fused)
    got = torch.autograd.grad(fused, [x, *block.parameters()], g)
    want = torch.autograd.grad(unfused, [x, *block.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_block_tracks_weight_updates():
    """No stale fold: the eval output follows in-place edits of the weights and running statistics."""
    block = randomize_norms(DepthwiseSeparableConv2d(4, 6)).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        before = block(x)
        block.bn2.running_mean.add_(1.0)
        block.conv_dw.weight.mul_(2.0)
        after = block(x)
        torch.testing.assert_close(after, block.forward_unfused(x), **TOL)
    assert not torch.allclose(before, after)


def test_from_timm_rejects_other_models():
    with pytest.raises(ValueError, match=r"from_timm supports .*mobilenetv1.*got EfficientNet \(architecture "
                                         r"'mobilenetv2_050'\)"):
        pyvl.interop.from_timm(timm.create_model("mobilenetv2_050", pretrained=False))
    with pytest.raises(TypeError, match="from_timm supports .* got dict"):
        pyvl.interop.from_timm({})


@pytest.mark.parametrize("kwargs, what", [
    (dict(act_layer="gelu"), "activation GELU"),
    (dict(depth_multiplier=2.0), "stage depths"),
    (dict(pad_type="same"), "Conv2dSame"),
])
def test_from_timm_rejects_mobilenetv1_that_differs(kwargs, what):
    theirs = _gen_mobilenet_v1("mobilenetv1_100", **kwargs)
    with pytest.raises(ValueError, match=f"from_timm supports timm's mobilenetv1 .*{what}"):
        pyvl.interop.from_timm(theirs)

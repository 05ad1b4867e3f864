"""Swin, Swin V2 and Video Swin (pyvl.models, pyvl.nn window attention, pyvl.interop) against randomly initialised
torchvision and timm peers: logits by the error criterion against the peer in float64, at sizes the window divides,
does not divide, and that are smaller than the window; pyvl.patch keeps outputs and gradients; parameter counts."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import pyvl
import pyvl.interop
import pyvl.models
from pyvl.nn import WindowAttention, WindowAttention3D, WindowAttentionV2
from pyvl.testing import assert_close_to_reference, check_error_criterion

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from timm.models.swin_transformer import SwinTransformer as TimmSwin  # noqa: E402
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2  # noqa: E402
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2  # noqa: E402
from torchvision.models.swin_transformer import SwinTransformer as TvSwin  # noqa: E402
from torchvision.models.video.swin_transformer import SwinTransformer3d as TvSwin3d  # noqa: E402

SMALL = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4))


def _randomize(model, seed=0):
    """Weights large enough that attention is sharp and padding, shift and bias semantics show in the logits
    (the peers' init makes attention nearly uniform); every bias, norm and table random; one V2 head's logit
    scale above the log(100) clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(math.log(10) + torch.randn(p.shape, generator=g))
                p.view(-1)[0] = 5.0
            elif p.dim() >= 2 and "relative_position_bias_table" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p[0].numel()))
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or ".norm.weight" in name \
                    or name == "norm.weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _in_dtype_of(model):
    """ref_fn for the criterion: the peer run in its input's dtype (float64: the truth)."""
    models = {torch.float32: model, torch.float64: copy.deepcopy(model).double()}
    return lambda x: models[x.dtype](x)


def _input(*shape, seed=0):
    return torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(seed))


def _check_logits(ours, peer, x, name):
    with torch.no_grad():
        out = ours(x)
    assert_close_to_reference(out, _in_dtype_of(peer), (x,), name=name)


# -- torchvision -------------------------------------------------------------------------------------------------

def _tv_v1(window=7):
    torch.manual_seed(0)
    return _randomize(TvSwin([4, 4], window_size=[window, window], num_classes=10, stochastic_depth_prob=0.0,
                             **SMALL))


def _tv_v2(window=8):
    torch.manual_seed(0)
    return _randomize(TvSwin([4, 4], window_size=[window, window], num_classes=10, stochastic_depth_prob=0.0,
                             block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2, **SMALL))


def _tv_3d():
    torch.manual_seed(0)
    return _randomize(TvSwin3d([2, 4, 4], window_size=[4, 7, 7], num_classes=10, stochastic_depth_prob=0.0,
                               **SMALL))


# (H, W): divisible by the window at stage 0; not divisible (100x90 -> 25x22 tokens); smaller than the window
# (20x24 -> 5x6); mixed (one dim smaller, one larger).
SIZES_2D = [(56, 56), (100, 90), (20, 24), (24, 60)]


@pytest.mark.parametrize("size", SIZES_2D)
@pytest.mark.parametrize("version", [1, 2])
def test_from_torchvision_logits(version, size):
    peer = _tv_v1() if version == 1 else _tv_v2()
    ours = pyvl.interop.from_torchvision(peer)
    assert isinstance(ours, pyvl.models.SwinTransformer) and ours.flavor == "torchvision" and not ours.training
    _check_logits(ours, peer, _input(*size), f"torchvision Swin V{version} at {size}")


@pytest.mark.parametrize("size", [(8, 32, 32), (5, 30, 41), (3, 20, 24), (9, 12, 60)])
def test_from_torchvision_3d_logits(size):
    """Video Swin: T, H, W divisible, not divisible, no larger than the window (the shrunk window and its [:N, :N]
    bias), and mixed."""
    peer = _tv_3d()
    ours = pyvl.interop.from_torchvision(peer)
    assert isinstance(ours, pyvl.models.VideoSwinTransformer)
    _check_logits(ours, peer, _input(*size)[:1], f"torchvision Video Swin at {size}")


def test_real_swin_t_config():
    """torchvision's swin_t itself (28M parameters) at 64x64, where every stage is smaller than the window."""
    torch.manual_seed(0)
    peer = _randomize(torchvision.models.swin_t())
    ours = pyvl.interop.from_torchvision(peer)
    _check_logits(ours, peer, _input(64, 64)[:1], "swin_t at 64x64")


# -- timm ----------------------------------------------------------------------------------------------------------

def _timm(version, img_size, **kw):
    torch.manual_seed(0)
    cls = TimmSwin if version == 1 else TimmSwinV2
    window = 7 if version == 1 else 8
    return _randomize(cls(img_size=img_size, window_size=window, num_classes=10, drop_path_rate=0.0, **SMALL, **kw))


@pytest.mark.parametrize("size", SIZES_2D)
@pytest.mark.parametrize("version", [1, 2])
def test_from_timm_logits(version, size):
    peer = _timm(version, size)
    ours = pyvl.interop.from_timm(peer)
    assert isinstance(ours, pyvl.models.SwinTransformer) and ours.flavor == "timm"
    _check_logits(ours, peer, _input(*size), f"timm Swin V{version} at {size}")


def test_from_timm_dynamic_size_and_pretrained_window():
    """A timm V2 with pretrained_window_sizes and dynamic_img_size, run at a size other than its img_size: the
    windows stay those of img_size, as in timm."""
    peer = _timm(2, (64, 64), pretrained_window_sizes=(6, 6, 4), dynamic_img_size=True)
    ours = pyvl.interop.from_timm(peer)
    for size in [(64, 64), (100, 88), (24, 40)]:
        _check_logits(ours, peer, _input(*size), f"dynamic timm Swin V2 at {size}")


def test_padding_order_matters_at_non_divisible_sizes():
    """The sizes above exercise the peers' differences: timm's model with torchvision's padding order (pad, then
    roll) fails the criterion at 100x90."""
    peer = _timm(1, (100, 90))
    ours = pyvl.interop.from_timm(peer)
    flipped = [m for m in ours.modules() if isinstance(m, WindowAttention)]
    for m in flipped:
        m.pad_first = True
    with pytest.raises(AssertionError, match="exceeds"):
        _check_logits(ours, peer, _input(100, 90), "timm weights with torchvision's padding order")


# -- patch -----------------------------------------------------------------------------------------------------------

def _grads(model, x):
    model.zero_grad()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


PATCH_CASES = {
    "torchvision V1": (_tv_v1, (60, 52)),
    "torchvision V2": (_tv_v2, (60, 52)),
    "torchvision 3D": (_tv_3d, (5, 30, 41)),
    "timm V1": (lambda: _timm(1, (60, 52)), (60, 52)),
    "timm V2": (lambda: _timm(2, (60, 52)), (60, 52)),
}


@pytest.mark.parametrize("case", list(PATCH_CASES))
def test_patch_keeps_outputs_and_gradients(case):
    make, size = PATCH_CASES[case]
    peer = make()
    x = _input(*size)[:1]
    ref64, grads64 = _grads(copy.deepcopy(peer).double(), x.double())
    ref32, grads32 = _grads(copy.deepcopy(peer), x)
    keys = list(peer.state_dict())
    assert pyvl.patch(peer) is peer
    pyvl_attn = [m for m in peer.modules() if isinstance(m, (WindowAttention, WindowAttentionV2))]
    assert len(pyvl_attn) == sum(SMALL["depths"])
    assert sorted(peer.state_dict()) == sorted(keys), "patch changed the state_dict's keys"
    out, grads = _grads(peer, x)
    check_error_criterion(out, ref64, ref32, name=f"{case} patched output")
    assert grads.keys() == grads64.keys()
    for name, g in grads.items():
        check_error_criterion(g, grads64[name], grads32[name], name=f"{case} gradient of {name}")


def test_patch_shares_parameters_and_survives_deepcopy_and_pickle():
    peer = _tv_v2()
    params = {id(p) for p in peer.parameters()}
    pyvl.patch(peer)
    assert {id(p) for p in peer.parameters()} == params
    timm_peer = pyvl.patch(_timm(1, (56, 56)))
    clone = copy.deepcopy(timm_peer)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)  # the clone's blocks must run the clone's (changed) attention, not the original's
        x = _input(56, 56)
        assert not torch.allclose(clone(x), timm_peer(x))
        buffer = io.BytesIO()
        torch.save(timm_peer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(x), timm_peer(x), rtol=0, atol=0)


def test_patch_rejects_models_without_swin_attention():
    with pytest.raises(ValueError, match="no torchvision or timm Swin"):
        pyvl.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        pyvl.patch("swin_t")


# -- parameter counts and configs -------------------------------------------------------------------------------------

def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_equal_the_peers():
    with torch.device("meta"):  # counts need no weights
        _check_parameter_counts()


def _check_parameter_counts():
    assert _count(pyvl.models.swin_t()) == _count(torchvision.models.swin_t()) \
        == torchvision.models.Swin_T_Weights.IMAGENET1K_V1.meta["num_params"]
    assert _count(pyvl.models.swin_v2_t()) == _count(torchvision.models.swin_v2_t()) \
        == torchvision.models.Swin_V2_T_Weights.IMAGENET1K_V1.meta["num_params"]
    assert _count(pyvl.models.swin_v2_t(flavor="timm")) == _count(timm.create_model("swinv2_tiny_window8_256"))
    assert _count(pyvl.models.swin_t(flavor="timm")) == _count(timm.create_model("swin_tiny_patch4_window7_224"))
    assert _count(pyvl.models.video_swin_t()) == _count(torchvision.models.video.swin3d_t()) \
        == torchvision.models.video.Swin3D_T_Weights.KINETICS400_V1.meta["num_params"]


def test_state_dict_keys_match_timm():
    with torch.device("meta"):
        _check_state_dict_keys()


def _check_state_dict_keys():
    ours = pyvl.models.swin_v2_t(flavor="timm").state_dict()
    theirs = timm.create_model("swinv2_tiny_window8_256").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_from_torchvision_keeps_mode_and_zeroes_v2_key_bias_gradient():
    peer = _tv_v2().train()
    ours = pyvl.interop.from_torchvision(peer)
    assert ours.training
    ours(_input(32, 32)).sum().backward()
    attn = ours.layers[0].blocks[0].attn
    dim = attn.dim
    assert attn.qkv.bias.grad[dim:2 * dim].abs().max() == 0 and attn.qkv.bias.grad[:dim].abs().max() > 0


# -- argument checks -----------------------------------------------------------------------------------------------

def test_bad_arguments_raise_named_errors():
    with pytest.raises(ValueError, match="attn_drop"):
        WindowAttention(16, 2, 7, attn_drop=0.1)
    with pytest.raises(ValueError, match="shift_size"):
        WindowAttention(16, 2, 7, 7)
    with pytest.raises(ValueError, match="dim must be a multiple of num_heads"):
        WindowAttention(15, 2, 7)
    with pytest.raises(ValueError, match="qkv_bias"):
        WindowAttentionV2(16, 2, 8, qkv_bias="both")
    with pytest.raises(ValueError, match="window_size must have 3"):
        WindowAttention3D(16, 2, 7)
    with pytest.raises(ValueError, match="x must be"):
        WindowAttention(16, 2, 7)(torch.randn(1, 5, 5, 8))
    with pytest.raises(ValueError, match="flavor"):
        pyvl.models.SwinTransformer(flavor="official")
    with pytest.raises(ValueError, match="pretrained_window_sizes"):
        pyvl.models.swin_v2_t(pretrained_window_sizes=12)
    with pytest.raises(ValueError, match="from_torchvision supports"):
        pyvl.interop.from_torchvision(torchvision.models.resnet18())
    with pytest.raises(ValueError, match="attention dropout"):
        pyvl.interop.from_torchvision(TvSwin([4, 4], window_size=[7, 7], attention_dropout=0.1, **SMALL))


def test_compiles_fullgraph():
    """The modules' Python (geometry, bias gathers, timm's rolled-window bias) traces into one graph, forward and
    backward. aot_eager checks the capture without Inductor's code generation (minutes on 2 cores)."""
    torch.manual_seed(0)
    model = pyvl.models.SwinTransformer(16, (2,), (2,), window_size=8, version=2, flavor="timm", img_size=(64, 64),
                                        num_classes=5)
    x = _input(24, 40)  # 6x10 tokens: the stage keeps timm's 8x8 window and its shift in a dim one window covers
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, grads = _grads(compiled, x)
    ref, ref_grads = _grads(model, x)
    torch.testing.assert_close(out, ref)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name.removeprefix("_orig_mod.")], msg=name)

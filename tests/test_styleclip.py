"""StyleGAN2 (pyvl.models.stylegan2) and StyleCLIP's three methods (pyvl.models.styleclip) on tiny random models.

The generator is checked against independent formulations (the per-sample-weight "fused" modulated convolution of
the StyleGAN2 paper, a direct-sum upfirdn2d), against the rosinality state_dict layout, and for its latent-space
round trips; the StyleCLIP methods for what they must do (the losses fall, beta thresholds monotonically, the
relevance of a channel is what its definition says).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from pyvl.models import styleclip as sc
from pyvl.models.clip import CLIP, TextConfig, VisionConfig
from pyvl.models.stylegan2 import Generator, ModulatedConv2d, make_kernel, upfirdn2d
from pyvl.testing import assert_close_to_reference

STYLE_DIM = 32
SMALL = {4: 16, 8: 16, 16: 8, 32: 8, 64: 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: with several OpenMP threads on a loaded 2-core machine the thread synchronisation costs
    # up to 100x the arithmetic (measured: 2.4 s vs 0.025 s per 32px forward). Restored afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_generator(size=32, seed=0):
    torch.manual_seed(seed)
    g = Generator(size, STYLE_DIM, n_mlp=2, channels=SMALL)
    with torch.no_grad():  # nonzero noise weights, so that noise handling is exercised
        for name, p in g.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.1)
    return g.eval().requires_grad_(False)


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    model = CLIP(16, VisionConfig(1, 32, head_width=16, patch_size=8, image_size=32), TextConfig(8, 50, 32, 2, 1))
    return model.eval().requires_grad_(False)


def toy_tokenize(texts):
    """Deterministic word ids (1..47), EOT = 49 (the largest id, as CLIP's tokenizer), zero padding."""
    out = torch.zeros(len(texts), 8, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [sum(map(ord, w)) % 47 + 1 for w in t.split()][:7]
        out[i, :len(ids)] = torch.tensor(ids)
        out[i, len(ids)] = 49
    return out


# ------------------------------------------------------------------------------------------------------------
# The generator: layout


def test_style_space_channel_count_1024():
    with torch.device("meta"):
        g = Generator(1024)  # config-f: 512, 8 mapping layers, channel_multiplier 2
    layers = g.style_layers()
    assert len(layers) == 26 and g.n_latent == 18
    # StyleCLIP: 6048 style channels outside the ToRGB layers, 9088 with them.
    assert sum(layer.channels for layer in layers if not layer.is_torgb) == g.style_channels(False) == 6048
    assert sum(layer.channels for layer in layers) == g.style_channels() == 9088
    # Every third layer from index 1 is a ToRGB (the code's STYLESPACE_INDICES_WITHOUT_TORGB).
    assert [i for i, layer in enumerate(layers) if layer.is_torgb] == list(range(1, 26, 3))


def rosinality_keys(size, n_mlp):
    """The key names of rosinality's Generator(size, style_dim, n_mlp).state_dict(), written from its model.py."""
    log_size = int(math.log2(size))
    num_layers = (log_size - 2) * 2 + 1
    keys = [f"style.{i}.{p}" for i in range(1, n_mlp + 1) for p in ("weight", "bias")]
    keys += ["input.input"]
    styled = ["conv.weight", "conv.modulation.weight", "conv.modulation.bias", "noise.weight", "activate.bias"]
    keys += [f"conv1.{k}" for k in styled]
    keys += ["to_rgb1.bias", "to_rgb1.conv.weight", "to_rgb1.conv.modulation.weight", "to_rgb1.conv.modulation.bias"]
    for i in range((log_size - 2) * 2):
        keys += [f"convs.{i}.{k}" for k in styled]
        if i % 2 == 0:
            keys.append(f"convs.{i}.conv.blur.kernel")
    for i in range(log_size - 2):
        keys += [f"to_rgbs.{i}.{k}" for k in ("bias", "upsample.kernel", "conv.weight", "conv.modulation.weight",
                                             "conv.modulation.bias")]
    keys += [f"noises.noise_{i}" for i in range(num_layers)]
    return keys


@pytest.mark.parametrize("size", [32, 1024])
def test_state_dict_keys_are_rosinality_g_ema(size):
    n_mlp = 8 if size == 1024 else 2
    with torch.device("meta"):
        g = Generator(size) if size == 1024 else Generator(size, STYLE_DIM, n_mlp, channels=SMALL)
    expected = rosinality_keys(size, n_mlp)
    assert len(expected) == len(set(expected))
    assert sorted(g.state_dict()) == sorted(expected)


def test_rosinality_state_dict_loads_strict():
    g = tiny_generator()
    own = g.state_dict()
    gen = torch.Generator().manual_seed(1)
    # A checkpoint as rosinality writes it: the reference layout's names, the shapes of this configuration.
    g_ema = {k: torch.randn(own[k].shape, generator=gen) for k in rosinality_keys(32, 2)}
    result = g.load_state_dict(g_ema, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in g.state_dict().items():
        assert torch.equal(v, g_ema[k]), k
    # The shapes rosinality's modules give their tensors.
    assert own["conv1.conv.weight"].shape == (1, 16, 16, 3, 3)
    assert own["to_rgbs.0.conv.weight"].shape == (1, 3, 16, 1, 1)
    assert own["to_rgb1.bias"].shape == (1, 3, 1, 1) and own["input.input"].shape == (1, 16, 4, 4)
    assert own["noises.noise_6"].shape == (1, 1, 32, 32) and own["convs.2.conv.blur.kernel"].shape == (4, 4)


# ------------------------------------------------------------------------------------------------------------
# The generator: arithmetic against independent formulations


def upfirdn2d_direct(x, kernel, up, down, pad):
    """Direct sum: out[y, x] = sum_{i,j} k[i, j] * u[y*down + kh-1-i - p0, x*down + kw-1-j - p0], u the zero-inserted
    upsampled input (true convolution with the kernel)."""
    N, C, H, W = x.shape
    kh, kw = kernel.shape
    p0, p1 = pad
    u = torch.zeros(N, C, H * up, W * up, dtype=x.dtype)
    u[:, :, ::up, ::up] = x
    Hp, Wp = H * up + p0 + p1, W * up + p0 + p1
    Ho, Wo = (Hp - kh) // down + 1, (Wp - kw) // down + 1
    out = torch.zeros(N, C, Ho, Wo, dtype=x.dtype)
    for oy in range(Ho):
        for ox in range(Wo):
            for i in range(kh):
                for j in range(kw):
                    sy, sx = oy * down + (kh - 1 - i) - p0, ox * down + (kw - 1 - j) - p0
                    if 0 <= sy < H * up and 0 <= sx < W * up:
                        out[:, :, oy, ox] += kernel[i, j] * u[:, :, sy, sx]
    return out


@settings(max_examples=12)
@given(st.data())
def test_upfirdn2d_matches_direct_sum(data):
    up, down = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 2]))
    H, W = data.draw(st.integers(3, 7)), data.draw(st.integers(3, 7))
    kh, kw = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    pad = (data.draw(st.integers(-1, 2)), data.draw(st.integers(0, 2)))
    channels_last = data.draw(st.booleans())
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    x = torch.randn(2, 3, H, W, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kernel = torch.randn(kh, kw, generator=gen)  # asymmetric: catches a missing flip
    if H * up + sum(pad) < kh or W * up + sum(pad) < kw:
        return
    out = upfirdn2d(x, kernel, up, down, pad)
    assert_close_to_reference(out, upfirdn2d_direct, (x, kernel, up, down, pad))


def modulated_conv_fused(x, style, weight, scale, demodulate, upsample, blur_kernel):
    """The StyleGAN2 paper's formulation (rosinality's fused path): one weight per sample, w' = w * s (* d), as a
    grouped convolution (grouped transposed convolution + blur when upsampling)."""
    B, Cin, H, W = x.shape
    Cout, k = weight.shape[1], weight.shape[-1]
    w = scale * weight * style.view(B, 1, Cin, 1, 1)
    if demodulate:
        w = w * torch.rsqrt(w.pow(2).sum([2, 3, 4]) + 1e-8).view(B, Cout, 1, 1, 1)
    xg = x.reshape(1, B * Cin, H, W)
    if upsample:
        wt = w.transpose(1, 2).reshape(B * Cin, Cout, k, k)
        out = F.conv_transpose2d(xg, wt, stride=2, groups=B).view(B, Cout, 2 * H + k - 2, 2 * W + k - 2)
        p = len(blur_kernel) - 2 - (k - 1)
        return upfirdn2d(out, blur_kernel * 4, pad=((p + 1) // 2 + 1, p // 2 + 1))
    out = F.conv2d(xg, w.reshape(B * Cout, Cin, k, k), padding=k // 2, groups=B)
    return out.view(B, Cout, H, W)


@settings(max_examples=12)
@given(st.data())
def test_modulated_conv_matches_per_sample_weights(data):
    B, Cin, Cout = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
    k = data.draw(st.sampled_from([1, 3]))
    upsample = data.draw(st.booleans()) and k == 3
    demodulate = data.draw(st.booleans())
    H = data.draw(st.integers(2, 6))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(data.draw(st.integers(0, 99)))
    conv = ModulatedConv2d(Cin, Cout, k, 8, demodulate=demodulate, upsample=upsample).to(dtype)
    x = torch.randn(B, Cin, H, H + 1, dtype=dtype)
    x = x.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous
    style = conv.modulation(torch.randn(B, 8, dtype=dtype))
    with torch.no_grad():
        out = conv(x, style)
    assert_close_to_reference(out, modulated_conv_fused,
                              (x, style, conv.weight.detach(), conv.scale, demodulate, upsample, make_kernel([1, 3, 3, 1])))


@pytest.mark.parametrize("size", [32, 64])
def test_generator_output_and_latent_round_trips(size):
    g = tiny_generator(size)
    z = torch.randn(3, STYLE_DIM)
    w = g.mapping(z)
    image = g.synthesis(w)
    assert image.shape == (3, 3, size, size) and torch.isfinite(image).all()
    assert torch.equal(g(z), image)  # forward = mapping + synthesis, fixed noise by default
    # W -> W+ -> image equals W -> image; W+ -> S -> image equals W+ -> image.
    w_plus = g.w_plus(w)
    assert w_plus.shape == (3, g.n_latent, STYLE_DIM)
    torch.testing.assert_close(g.synthesis(w_plus), image, rtol=0, atol=0)
    styles = g.styles(w_plus)
    assert [s.shape[1] for s in styles] == [layer.channels for layer in g.style_layers()]
    torch.testing.assert_close(g.synthesis_s(styles), image, rtol=0, atol=0)
    # A change of one W+ entry moves exactly the style vectors of the layers that read it.
    edited = w_plus.clone()
    edited[:, 3] += 1
    moved = [not torch.equal(a, b) for a, b in zip(g.styles(edited), styles)]
    assert moved == [layer.w_index == 3 for layer in g.style_layers()]
    # Fresh noise changes the image; fixed noise is the stored buffers.
    assert not torch.equal(g.synthesis(w, randomize_noise=True), image)
    noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
    assert torch.equal(g.synthesis(w, noise=noise), image)


def test_truncation_and_mean_latent():
    g = tiny_generator()
    z = torch.randn(2, STYLE_DIM)
    mean = g.mean_latent(64, generator=torch.Generator().manual_seed(0))
    assert mean.shape == (1, STYLE_DIM)
    torch.testing.assert_close(g(z, truncation=0.0, truncation_latent=mean), g.synthesis(mean.expand(2, -1)))
    with pytest.raises(ValueError, match="truncation_latent"):
        g(z, truncation=0.5)


def test_generator_gradcheck_float64():
    torch.manual_seed(0)
    g = Generator(8, 4, n_mlp=1, channels={4: 2, 8: 2}).double().eval()
    w_plus = torch.randn(1, g.n_latent, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(g.synthesis, (w_plus,))
    # Parameter gradients through the whole chain (mapping, modulation, demodulation, blur, skip upsampling).
    z = torch.randn(2, 4, dtype=torch.float64)
    names = ["style.1.weight", "convs.0.conv.weight", "to_rgbs.0.conv.modulation.weight", "input.input"]
    own = dict(g.named_parameters())
    inputs = tuple(own[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(lambda *ps: torch.func.functional_call(g, dict(zip(names, ps)), (z,)), inputs)

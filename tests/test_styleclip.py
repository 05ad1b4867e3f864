"""StyleGAN2 (pyvl.models.stylegan2) and StyleCLIP's three methods (pyvl.models.styleclip) on tiny random models.

The generator is checked against independent formulations (the per-sample-weight "fused" modulated convolution of
the StyleGAN2 paper, a direct-sum upfirdn2d), against the rosinality state_dict layout, and for its latent-space
round trips; the StyleCLIP methods for what they must do (the losses fall, beta thresholds monotonically, the
relevance of a channel is what its definition says).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from pyvl.models import styleclip as sc
from pyvl.models.clip import CLIP, TextConfig, VisionConfig
from pyvl.models.stylegan2 import Generator, ModulatedConv2d, make_kernel, upfirdn2d
from pyvl.testing import assert_close_to_reference, check_error_criterion, default_atol

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


@pytest.fixture(scope="module")
def config_f():
    # config-f, 1024px: style_dim 512, 8 mapping layers, channel_multiplier 2 (built for real: under
    # torch.device("meta") the first construction took 8 s of one-time dispatch set-up, the real one 2 s).
    return Generator(1024)


def test_style_space_channel_count_1024(config_f):
    g = config_f
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
def test_state_dict_keys_are_rosinality_g_ema(size, config_f):
    n_mlp = 8 if size == 1024 else 2
    g = config_f if size == 1024 else tiny_generator(size)
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
                              (x, style, conv.weight.detach(), conv.scale, demodulate, upsample,
                               make_kernel([1, 3, 3, 1])))


def synthesis_fused(g, w_plus):
    """rosinality's Generator.forward on W+ with fixed noise, written with the per-sample-weight convolution
    (modulated_conv_fused) and explicit bias / noise / activation arithmetic: an independent path through the
    generator's wiring (which W+ entry feeds which layer, the skip upsampling)."""
    blur = make_kernel([1, 3, 3, 1])
    noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]

    def style(conv, w):
        m = conv.modulation
        return F.linear(w, m.weight * m.scale, m.bias * m.lr_mul)

    def styled(layer, x, w, n):
        c = layer.conv
        out = modulated_conv_fused(x, style(c, w), c.weight, c.scale, True, c.upsample, blur)
        out = out + layer.noise.weight * n
        return F.leaky_relu(out + layer.activate.bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    def to_rgb(layer, x, w, skip):
        out = modulated_conv_fused(x, style(layer.conv, w), layer.conv.weight, layer.conv.scale, False, False, blur)
        out = out + layer.bias
        return out if skip is None else out + upfirdn2d(skip, blur * 4, up=2, pad=(2, 1))

    x = g.input.input.expand(w_plus.shape[0], -1, -1, -1)
    x = styled(g.conv1, x, w_plus[:, 0], noise[0])
    skip = to_rgb(g.to_rgb1, x, w_plus[:, 1], None)
    for j, rgb in enumerate(g.to_rgbs):
        x = styled(g.convs[2 * j], x, w_plus[:, 2 * j + 1], noise[2 * j + 1])
        x = styled(g.convs[2 * j + 1], x, w_plus[:, 2 * j + 2], noise[2 * j + 2])
        skip = to_rgb(rgb, x, w_plus[:, 2 * j + 3], skip)
    return skip


@settings(max_examples=6)
@given(size=st.sampled_from([8, 16, 32]), batch=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 99))
def test_generator_matches_the_fused_formulation(size, batch, dtype, seed):
    g = tiny_generator(size, seed).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    # W+ as a non-contiguous view (layers-major storage)
    w_plus = torch.randn(g.n_latent, batch, STYLE_DIM, generator=gen).to(dtype).transpose(0, 1)
    out = g.synthesis(w_plus)
    with torch.no_grad():
        ref = synthesis_fused(copy.deepcopy(g).double(), w_plus.double())
        torch_out = synthesis_fused(g, w_plus)
    check_error_criterion(out, ref, torch_out, atol=default_atol(dtype, ref), name=f"{size}px image")


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
    z = torch.randn(1, 4, dtype=torch.float64)
    names = ["style.1.weight", "convs.0.conv.weight", "to_rgbs.0.conv.modulation.weight"]
    own = dict(g.named_parameters())
    inputs = tuple(own[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(lambda *ps: torch.func.functional_call(g, dict(zip(names, ps)), (z,)), inputs)


# ------------------------------------------------------------------------------------------------------------
# StyleCLIP: the CLIP loss and latent optimization


def test_clip_image_input_follows_the_official_resize():
    image = torch.randn(2, 3, 64, 64)
    # 1024 -> 224 in the code is nearest x7 then average pool /32; here 64 -> 224: x7 then /2.
    expected = F.avg_pool2d(F.interpolate(image, scale_factor=7, mode="nearest"), 2)
    torch.testing.assert_close(sc.clip_image_input(image, 224), expected, rtol=0, atol=0)
    assert sc.clip_image_input(image, 32).shape == (2, 3, 32, 32)
    assert sc.clip_image_input(torch.randn(1, 3, 32, 32), 48).shape == (1, 3, 48, 48)
    normed = sc.clip_image_input(torch.zeros(1, 3, 32, 32), 32, clip_normalize=True)
    torch.testing.assert_close(normed[0, :, 0, 0], (0.5 - torch.tensor(sc.CLIP_MEAN)) / torch.tensor(sc.CLIP_STD))


def test_clip_loss_is_one_minus_cosine():
    clip, g = tiny_clip(), tiny_generator()
    image = g.synthesis(g.mapping(torch.randn(3, STYLE_DIM)))
    text = clip.encode_text(toy_tokenize(["a smiling face"]))[0]
    expected = 1 - F.cosine_similarity(clip.encode_image(image), text[None], dim=-1)
    torch.testing.assert_close(sc.clip_loss(clip, image, text), expected)
    per_image = torch.randn(3, 16)
    expected = 1 - F.cosine_similarity(clip.encode_image(image), per_image, dim=-1)
    torch.testing.assert_close(sc.clip_loss(clip, image, per_image), expected)


def test_lr_schedule_is_the_official_one():
    lr = 0.1
    assert sc.get_lr(0.0, lr) == 0.0
    assert math.isclose(sc.get_lr(0.025, lr), lr / 2)  # half-way up the 5% warm-up
    assert math.isclose(sc.get_lr(0.5, lr), lr)
    assert math.isclose(sc.get_lr(0.875, lr), lr / 2)  # half-way down the cosine over the last 25%
    assert math.isclose(sc.get_lr(1.0, lr), 0.0, abs_tol=1e-12)


def test_latent_optimization_lowers_the_clip_loss():
    g, clip = tiny_generator(), tiny_clip()
    text = toy_tokenize(["a face with purple hair"])
    w = g.mapping(torch.randn(1, STYLE_DIM, generator=torch.Generator().manual_seed(3)))
    seen = []

    def id_loss(image, source):
        seen.append((image.shape, source.shape))
        return (image - source).pow(2).mean()

    opt = sc.LatentOptimizer(g, clip, text, w, steps=12, id_loss=id_loss, id_lambda=0.01)
    first = opt.step()
    assert first["l2"] == 0.0 and "id" in first  # starts at the source
    history = [first] + [opt.step() for _ in range(11)]
    with torch.no_grad():
        _, final, _ = opt.loss()
    assert float(final["clip"]) < first["clip"] - 1e-3, [h["clip"] for h in history]
    assert float(final["l2"]) > 0
    assert seen[0] == ((1, 3, 32, 32), (1, 3, 32, 32))
    # The generator and CLIP stay untouched; only the latent moved.
    assert all(p.grad is None for p in g.parameters()) and all(p.grad is None for p in clip.parameters())
    latent, hist = sc.optimize_latent(g, clip, text, w, steps=3)
    assert latent.shape == (1, g.n_latent, STYLE_DIM) and len(hist) == 3


def test_latent_optimization_in_style_space():
    g, clip = tiny_generator(), tiny_clip()
    text = toy_tokenize(["a face with purple hair"])
    w = g.mapping(torch.randn(1, STYLE_DIM, generator=torch.Generator().manual_seed(3)))
    opt = sc.LatentOptimizer(g, clip, text, w, steps=12, space="s")
    source = [s.clone() for s in opt.latent]
    history = [opt.step() for _ in range(12)]
    with torch.no_grad():
        _, final, _ = opt.loss()
    assert float(final["clip"]) < history[0]["clip"] - 1e-3, [h["clip"] for h in history]
    for layer, before, after in zip(g.style_layers(), source, opt.latent):
        # the ToRGB layers' style vectors stay frozen (the code's STYLESPACE_INDICES_WITHOUT_TORGB)
        assert torch.equal(before, after) == layer.is_torgb, layer.name
    torch.testing.assert_close(final["l2"], sum((a - b).pow(2).sum() for a, b in zip(source, opt.latent)))
    with pytest.raises(ValueError, match="space must be"):
        sc.LatentOptimizer(g, clip, text, w, space="z")


# ------------------------------------------------------------------------------------------------------------
# StyleCLIP: the latent mapper


def test_mapper_layout_matches_the_official_one():
    mapper = sc.LevelsMapper(STYLE_DIM)
    keys = set(mapper.state_dict())
    expected = {f"{level}.mapping.{i}.{p}" for level in ("course_mapping", "medium_mapping", "fine_mapping")
                for i in range(1, 5) for p in ("weight", "bias")}
    assert keys == expected
    assert mapper.course_mapping.mapping[1].lr_mul == 0.01
    # A disabled level leaves its W+ entries unchanged.
    only_medium = sc.LevelsMapper(STYLE_DIM, coarse=False, fine=False)
    w = torch.randn(2, 10, STYLE_DIM)
    delta = only_medium(w)
    assert not delta[:, :4].any() and not delta[:, 8:].any()
    assert delta[:, 4:8].abs().sum() > 0
    torch.testing.assert_close(only_medium.edit(w), w + 0.1 * delta)


@pytest.mark.parametrize("size", [32, 64])
def test_mapper_trains(size):
    g, clip = tiny_generator(size), tiny_clip()
    torch.manual_seed(0)
    mapper = sc.LevelsMapper(STYLE_DIM)
    text = toy_tokenize(["a face with purple hair"])
    w_plus = g.w_plus(g.mapping(torch.randn(4, STYLE_DIM)))
    opt = torch.optim.Adam(mapper.parameters(), lr=0.5)  # the code's lr (with Ranger)
    losses = []
    for _ in range(8):
        loss, parts = sc.mapper_loss(mapper, g, clip, text, w_plus)
        assert set(parts) == {"clip", "l2"}  # no identity network given
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final, _ = sc.mapper_loss(mapper, g, clip, text, w_plus)
    assert float(final) < losses[0] - 1e-3, losses
    assert all(p.grad is None for p in g.parameters())


# ------------------------------------------------------------------------------------------------------------
# StyleCLIP: global directions


@pytest.fixture(scope="module")
def relevance_setup():
    g, clip = tiny_generator(), tiny_clip()
    means, stds = sc.style_statistics(g, n=512, batch=200, generator_rng=torch.Generator().manual_seed(0))
    styles = g.styles(g.mapping(torch.randn(2, STYLE_DIM, generator=torch.Generator().manual_seed(1))))
    relevance = sc.channel_relevance(g, clip, styles, means, stds, chunk=24)
    delta_t = sc.text_direction(clip, "face with purple hair", "face", templates=["a {}.", "a photo of a {}."],
                                tokenizer=toy_tokenize)
    return g, clip, means, stds, styles, relevance, delta_t


def test_style_statistics():
    g = tiny_generator()
    means, stds = sc.style_statistics(g, n=300, batch=128, generator_rng=torch.Generator().manual_seed(0))
    z = torch.randn(300, STYLE_DIM, generator=torch.Generator().manual_seed(0))
    styles = g.styles(g.mapping(z))
    for m, s, ref in zip(means, stds, styles):
        torch.testing.assert_close(m, ref.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, ref.std(0, unbiased=False), atol=1e-4, rtol=1e-4)


def test_channel_relevance_is_its_definition(relevance_setup):
    g, clip, means, stds, styles, relevance, _ = relevance_setup
    non_rgb = [i for i, layer in enumerate(g.style_layers()) if not layer.is_torgb]
    assert relevance.shape == (g.style_channels(False), 16)
    torch.testing.assert_close(relevance.norm(dim=-1), torch.ones(len(relevance)))
    # Recompute one channel (the last channel of the third non-ToRGB layer) by hand.
    li = non_rgb[2]
    c = styles[li].shape[1] - 1
    row = sum(styles[i].shape[1] for i in non_rgb[:2]) + c
    feats = []
    for sign in (-1, 1):
        edited = [s.clone() for s in styles]
        edited[li][:, c] = means[li][c] + sign * 5 * stds[li][c]
        feats.append(F.normalize(clip.encode_image(g.synthesis_s(edited)), dim=-1))
    expected = F.normalize(F.normalize(feats[1] - feats[0], dim=-1).mean(0), dim=0)
    torch.testing.assert_close(relevance[row], expected, atol=1e-5, rtol=1e-4)


def test_text_direction_is_the_prompt_ensemble_difference(relevance_setup):
    clip, delta_t = relevance_setup[1], relevance_setup[6]
    templates = ["a {}.", "a photo of a {}."]
    feats = {}
    for text in ("face with purple hair", "face"):
        e = F.normalize(clip.encode_text(toy_tokenize([t.format(text) for t in templates])), dim=-1)
        feats[text] = F.normalize(e.mean(0), dim=0)
    torch.testing.assert_close(delta_t, F.normalize(feats["face with purple hair"] - feats["face"], dim=0))


def test_larger_beta_moves_fewer_channels(relevance_setup):
    g, _, _, stds, styles, relevance, delta_t = relevance_setup
    r = (relevance @ delta_t).abs()
    betas = [0.0, *torch.quantile(r, torch.tensor([0.25, 0.5, 0.75, 0.95])).tolist(), float(r.max()) + 1e-3]
    counts, moved = [], []
    for beta in betas:
        direction, count = sc.global_direction(relevance, delta_t, stds, beta, g)
        counts.append(count)
        moved.append(sum(int((d != 0).sum()) for d in direction))
        for layer, d in zip(g.style_layers(), direction):
            if layer.is_torgb:
                assert not d.any()
        if count:
            # the largest |relevance| maps to exactly one std of its channel
            ratios = torch.cat([d / s for d, s, layer in zip(direction, stds, g.style_layers()) if not layer.is_torgb])
            assert math.isclose(float(ratios.abs().max()), 1.0, rel_tol=1e-5)
    assert counts[0] == g.style_channels(False)
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[-1] == 0
    assert len(set(counts)) >= 4  # strictly fewer along the way
    assert counts == moved
    # The edit: s + alpha * direction; alpha 0 leaves the image unchanged, alpha != 0 changes it.
    direction, _ = sc.global_direction(relevance, delta_t, stds, betas[2], g)
    image = g.synthesis_s(styles)
    torch.testing.assert_close(g.synthesis_s(sc.apply_direction(styles, direction, 0.0)), image, rtol=0, atol=0)
    assert not torch.allclose(g.synthesis_s(sc.apply_direction(styles, direction, 3.0)), image)


# ------------------------------------------------------------------------------------------------------------
# Capture and argument checks


def test_compiles_fullgraph():
    """torch.compile(fullgraph=True) captures the generator and the latent-optimization loss (including pyvl's
    similarity_logits op) without graph breaks; the "eager" backend checks the capture only."""
    g, clip = tiny_generator(), tiny_clip()
    text = clip.encode_text(toy_tokenize(["a face"]))[0]
    w_plus = g.w_plus(g.mapping(torch.randn(2, STYLE_DIM))).clone().requires_grad_(True)

    def loss_fn(w):
        return sc.clip_loss(clip, g.synthesis(w), text).mean() + 0.008 * w.pow(2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    out, ref = compiled(w_plus), loss_fn(w_plus)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, w_plus)[0], torch.autograd.grad(ref, w_plus)[0])


def test_argument_errors():
    g, clip = tiny_generator(), tiny_clip()
    with pytest.raises(ValueError, match="power of 2"):
        Generator(48)
    with pytest.raises(ValueError, match="size"):
        Generator(2048)
    with pytest.raises(ValueError, match=r"z must be \[batch, 32\]"):
        g.mapping(torch.randn(2, 31))
    with pytest.raises(TypeError, match="z must be a floating-point tensor"):
        g.mapping(torch.zeros(2, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="w must be"):
        g.synthesis(torch.randn(2, 3, STYLE_DIM))
    with pytest.raises(ValueError, match="styles must be a list of 11"):
        g.synthesis_s([torch.randn(1, 16)])
    with pytest.raises(ValueError, match="styles for conv1 must be"):
        g.synthesis_s([torch.randn(1, 5)] * 11)
    with pytest.raises(ValueError, match="noise must be a list of 7"):
        g.synthesis(torch.randn(1, STYLE_DIM), noise=[None])
    with pytest.raises(TypeError, match="channels must be a dict"):
        Generator(32, channels=[1, 2])
    with pytest.raises(ValueError, match="image must be"):
        sc.clip_image_input(torch.randn(1, 3, 32, 16), 32)
    with pytest.raises(ValueError, match="text_features must be"):
        sc.clip_loss(clip, torch.randn(2, 3, 32, 32), torch.randn(3, 16))
    with pytest.raises(TypeError, match="clip_model must be a CLIP"):
        sc.clip_loss(g, torch.randn(2, 3, 32, 32), torch.randn(16))
    with pytest.raises(ValueError, match="l2_lambda"):
        sc.LatentOptimizer(g, clip, torch.randn(16), torch.randn(1, STYLE_DIM), l2_lambda=-1)
    with pytest.raises(TypeError, match="id_loss must be a callable"):
        sc.LatentOptimizer(g, clip, torch.randn(16), torch.randn(1, STYLE_DIM), id_loss=3)
    with pytest.raises(ValueError, match="steps"):
        sc.LatentOptimizer(g, clip, torch.randn(16), torch.randn(1, STYLE_DIM), steps=0)
    with pytest.raises(ValueError, match="w_plus must be"):
        sc.LevelsMapper(STYLE_DIM)(torch.randn(2, STYLE_DIM))
    with pytest.raises(ValueError, match="beta"):
        sc.global_direction(torch.randn(88, 16), torch.randn(16), [torch.ones(16)] * 11, -1.0, g)
    with pytest.raises(ValueError, match="relevance must be"):
        sc.global_direction(torch.randn(5, 16), torch.randn(16), [torch.ones(s.channels) for s in g.style_layers()],
                            0.1, g)
    with pytest.raises(ValueError, match="layers must hold"):
        sc.channel_relevance(g, clip, g.styles(torch.randn(1, STYLE_DIM)), None, None, layers=[99])

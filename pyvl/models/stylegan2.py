"""A minimal StyleGAN2 generator (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020,
arXiv:1912.04958), as StyleCLIP uses it.

StyleCLIP (github.com/orpatashnik/StyleCLIP, models/stylegan2/model.py) runs the widely used PyTorch port
github.com/rosinality/stylegan2-pytorch (model.py) and loads its checkpoints' `g_ema` entry. This module keeps that
port's module tree and therefore its state_dict keys, so a rosinality `g_ema` state_dict loads with strict=True:

    style.{1..n_mlp}.{weight,bias}                  mapping network (style.0 is the PixelNorm, no parameters)
    input.input                                     the learned constant [1, C4, 4, 4]
    conv1.{conv.weight, conv.modulation.{weight,bias}, noise.weight, activate.bias}
    to_rgb1.{bias, conv.weight, conv.modulation.{weight,bias}}
    convs.N.{conv.weight, conv.modulation.*, noise.weight, activate.bias} (+ conv.blur.kernel for even N: upsampling)
    to_rgbs.N.{bias, upsample.kernel, conv.weight, conv.modulation.*}
    noises.noise_{0..num_layers-1}                  the fixed per-layer noise images (buffers)

What the generator computes (rosinality's port of the official TF code):
- Mapping z -> w: PixelNorm, then n_mlp EqualLinear layers (equalized learning rate: weights stored divided by
  lr_mul and scaled by lr_mul / sqrt(fan_in) at run time; lr_mul 0.01), each followed by the fused leaky ReLU
  (bias, leaky ReLU slope 0.2, times sqrt(2)).
- Synthesis from W+ (one w per layer, n_latent = 2 log2(size) - 2 of them): a learned 4x4 constant, then per
  resolution an upsampling StyledConv, a StyledConv and a ToRGB whose output is added to the upsampled RGB skip.
  StyledConv = modulated 3x3 conv with demodulation, noise injection (a learned per-layer weight times a noise
  image), bias + leaky ReLU(0.2) * sqrt(2). ToRGB = modulated 1x1 conv without demodulation + bias.
- Style space S (Wu et al., "StyleSpace Analysis", CVPR 2021; StyleCLIP section 6): the outputs of every layer's
  modulation (an affine map of that layer's w), one vector per modulated conv, in the order
  conv1, to_rgb1, then per resolution convs[2i], convs[2i+1], to_rgbs[i] -- StyleCLIP's `style_vector` order. For the
  1024px config that is 26 vectors, 9088 channels, 6048 of them outside the ToRGB layers.

Implementation choices (results equal rosinality's up to rounding):
- upfirdn2d and fused_leaky_relu are plain PyTorch here (rosinality ships CUDA extensions for them plus a
  "native" PyTorch fallback). upfirdn2d = zero-insertion upsampling, padding (negative: cropping), correlation with
  the flipped FIR kernel, downsampling; the blur kernel [1, 3, 3, 1] is separable and symmetric.
- The modulated convolution uses the non-fused formulation, which rosinality also carries (fused=False): scale the
  input channels by the style s, convolve with the shared weight, scale the output channels by the demodulation
  coefficients d = rsqrt(sum (w * s)^2 + 1e-8). Since conv(x * s, w) * d == conv(x, w * s * d) per sample, this is
  the grouped-conv ("fused") formulation without building a weight per sample; it is one ordinary (batched) conv.
  Upsampling is a stride-2 transposed conv followed by the blur (as rosinality), with demodulation after the blur
  (both are linear per output channel, so the order does not matter).
- Noise: every synthesis entry point takes `noise` (a list of num_layers tensors, or None); with
  randomize_noise=False (the default here, and what StyleCLIP passes everywhere) the stored noise buffers are used,
  so an image is a deterministic function of its latent; randomize_noise=True draws fresh noise (rosinality's
  default).
- The call interface is pyvl's own (forward(z), synthesis(W+), synthesis_s(S)), not rosinality's
  forward(list of style inputs, input_is_latent=..., return_latents=...); style mixing between two latents is a
  W+ tensor built by the caller.
- `channels` may override the per-resolution widths (rosinality's fixed table of 512 ... 16 * channel_multiplier)
  to build small generators for tests.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Generator", "PixelNorm", "EqualLinear", "ModulatedConv2d", "StyledConv", "ToRGB", "upfirdn2d",
           "fused_leaky_relu", "default_channels", "StyleLayer"]

SQRT2 = math.sqrt(2.0)


def default_channels(channel_multiplier: int = 2) -> dict[int, int]:
    """rosinality's per-resolution widths (config-f: channel_multiplier 2)."""
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = SQRT2) -> torch.Tensor:
    """leaky_relu(x + bias, negative_slope) * scale, the bias broadcast along dim 1 (channels / features)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return F.leaky_relu(x + bias.view(shape).to(x.dtype), negative_slope) * scale


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample (zero insertion) by `up`, pad by pad = (before, after) on both spatial dims (negative crops),
    filter with the 2D FIR `kernel` (true convolution, i.e. correlation with the flipped kernel), downsample by
    `down`. x [N, C, H, W] -> [N, C, (H*up + p0 + p1 - kh) // down + 1, ...]."""
    N, C, H, W = x.shape
    if up > 1:
        # Each sample followed by up - 1 zeros, as the reference upfirdn2d: H -> H * up.
        x = F.pad(x.reshape(N, C, H, 1, W, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(N, C, H * up, W * up)
    p0, p1 = pad
    x = F.pad(x, [p0, p1, p0, p1])
    kh, kw = kernel.shape
    weight = kernel.flip([0, 1]).to(x.dtype).expand(C, 1, kh, kw)
    x = F.conv2d(x, weight, groups=C)
    return x[:, :, ::down, ::down] if down > 1 else x


def make_kernel(k: Sequence[float]) -> torch.Tensor:
    """A 1D FIR (outer product with itself) or 2D one, normalized to sum 1."""
    k = torch.tensor(k, dtype=torch.float32)
    if k.dim() == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


class PixelNorm(nn.Module):
    """x / sqrt(mean(x^2 over dim 1) + 1e-8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    """2x upsampling of the RGB skip: upfirdn2d with the blur kernel times factor^2."""

    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor ** 2)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate; with activation=True the fused leaky ReLU follows."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation
        self.in_features, self.out_features = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.lr_mul
        if self.activation:
            out = F.linear(x, self.weight * self.scale)
            return fused_leaky_relu(out, bias) if bias is not None else F.leaky_relu(out, 0.2) * SQRT2
        return F.linear(x, self.weight * self.scale, bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, lr_mul={self.lr_mul}, activation={self.activation}"


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (StyleGAN2 section 2.2): `modulation` maps w to the style s (one scale per input
    channel; bias initialised to 1), weights scaled by s and, with demodulate, normalized per output channel."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x [B, in_channel, H, W] modulated by style s [B, in_channel] (a style-space vector, not w)."""
        B = x.shape[0]
        weight = (self.scale * self.weight[0]).to(x.dtype)  # [out, in, k, k]
        x = x * style.reshape(B, self.in_channel, 1, 1)
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # sum over (in, k, k) of (w * s)^2 = (w^2 summed over k, k) @ s^2
            demod = torch.rsqrt(style.pow(2) @ weight.pow(2).sum((2, 3)).T + 1e-8)  # [B, out]
            out = out * demod.reshape(B, self.out_channel, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, upsample={self.upsample}, "
                f"demodulate={self.demodulate}")


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, x.shape[2], x.shape[3]).normal_()
        return x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated conv (demodulated, optionally upsampling) -> noise injection -> bias + leaky ReLU * sqrt(2)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, upsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB without demodulation, + bias, + the upsampled RGB skip of the previous block."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        return out if skip is None else out + self.upsample(skip)


class StyleLayer(tuple):
    """(name, modulated conv, w index, is_torgb) of one style-space vector."""
    __slots__ = ()

    name = property(lambda self: self[0])
    conv = property(lambda self: self[1])
    w_index = property(lambda self: self[2])
    is_torgb = property(lambda self: self[3])

    @property
    def channels(self) -> int:
        return self[1].in_channel


def _check_int(value, name, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Generator(nn.Module):
    """StyleGAN2 generator with rosinality's constructor and state_dict keys.

    Args:
        size: output resolution, a power of 2 from 8 to 1024 (StyleCLIP's FFHQ model: 1024).
        style_dim: width of z and w (512).
        n_mlp: number of mapping layers (8).
        channel_multiplier: widths from 64px up (2 = config-f).
        blur_kernel: the FIR of up-sampling ([1, 3, 3, 1]).
        lr_mlp: the mapping network's learning-rate multiplier (0.01).
        channels: optional {resolution: width} overriding the default widths (small generators for tests).

    Latent spaces: z [B, style_dim] -> `mapping` -> w [B, style_dim] -> `w_plus` -> W+ [B, n_latent, style_dim]
    -> `styles` -> S (list of [B, C_l], see `style_layers`) -> `synthesis_s` -> image [B, 3, size, size].
    `synthesis(w_plus)` is `synthesis_s(styles(w_plus))`; `forward(z)` runs the whole chain (with truncation).
    """

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), lr_mlp: float = 0.01, channels: dict | None = None):
        super().__init__()
        _check_int(size, "size", 8)
        if size & (size - 1) or size > 1024:
            raise ValueError(f"size must be a power of 2 from 8 to 1024, got {size}")
        _check_int(style_dim, "style_dim")
        _check_int(n_mlp, "n_mlp")
        _check_int(channel_multiplier, "channel_multiplier")
        self.size, self.style_dim = size, style_dim
        self.log_size = int(math.log2(size))
        widths = default_channels(channel_multiplier)
        if channels is not None:
            if not isinstance(channels, dict):
                raise TypeError(f"channels must be a dict {{resolution: width}}, got {type(channels).__name__}")
            for res, width in channels.items():
                _check_int(width, f"channels[{res}]")
            widths.update(channels)
        self.channels = widths

        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True)
                                                  for _ in range(n_mlp)])
        self.input = ConstantInput(widths[4])
        self.conv1 = StyledConv(widths[4], widths[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(widths[4], style_dim, upsample=False)
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2 ** res, 2 ** res))
        in_channel = widths[4]
        for i in range(3, self.log_size + 1):
            out_channel = widths[2 ** i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, blur_kernel=blur_kernel))
            in_channel = out_channel
        self.n_latent = self.log_size * 2 - 2

    # ---- the layer list of style space ------------------------------------------------------------------------

    def style_layers(self) -> list[StyleLayer]:
        """Every modulated conv in style-space order (StyleCLIP's style_vector order) with its W+ index."""
        out = [StyleLayer(("conv1", self.conv1.conv, 0, False)), StyleLayer(("to_rgb1", self.to_rgb1.conv, 1, True))]
        for i, to_rgb in enumerate(self.to_rgbs):
            out.append(StyleLayer((f"convs.{2 * i}", self.convs[2 * i].conv, 2 * i + 1, False)))
            out.append(StyleLayer((f"convs.{2 * i + 1}", self.convs[2 * i + 1].conv, 2 * i + 2, False)))
            out.append(StyleLayer((f"to_rgbs.{i}", to_rgb.conv, 2 * i + 3, True)))
        return out

    def style_channels(self, include_torgb: bool = True) -> int:
        """Number of style-space channels (1024px config-f: 9088 with the ToRGB layers, 6048 without)."""
        return sum(layer.channels for layer in self.style_layers() if include_torgb or not layer.is_torgb)

    # ---- latent spaces -----------------------------------------------------------------------------------------

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, style_dim] -> w [B, style_dim]."""
        self._check_latent(z, "z", 2)
        return self.style(z)

    def mean_latent(self, n: int = 4096, generator: torch.Generator | None = None) -> torch.Tensor:
        """The mean w of n random z's [1, style_dim] (rosinality's mean_latent; used for truncation)."""
        _check_int(n, "n")
        weight = self.input.input
        z = torch.randn(n, self.style_dim, generator=generator, device="cpu").to(weight.device, weight.dtype)
        return self.style(z).mean(0, keepdim=True)

    def w_plus(self, w: torch.Tensor) -> torch.Tensor:
        """w [B, style_dim] -> W+ [B, n_latent, style_dim] (the same w for every layer); W+ passes through."""
        if isinstance(w, torch.Tensor) and w.dim() == 3:
            self._check_latent(w, "w", 3)
            return w
        self._check_latent(w, "w", 2)
        return w.unsqueeze(1).expand(-1, self.n_latent, -1)

    def styles(self, w_plus: torch.Tensor) -> list[torch.Tensor]:
        """W+ [B, n_latent, style_dim] (or w [B, style_dim]) -> style space: one [B, C_l] per style layer."""
        w_plus = self.w_plus(w_plus)
        return [layer.conv.modulation(w_plus[:, layer.w_index]) for layer in self.style_layers()]

    # ---- synthesis ---------------------------------------------------------------------------------------------

    def _noise(self, noise, randomize_noise: bool):
        if noise is not None:
            if not isinstance(noise, (list, tuple)) or len(noise) != self.num_layers:
                raise ValueError(f"noise must be a list of {self.num_layers} tensors (or None entries), got "
                                 f"{type(noise).__name__} of length {len(noise) if hasattr(noise, '__len__') else '?'}")
            return list(noise)
        if randomize_noise:
            return [None] * self.num_layers
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def synthesis_s(self, styles: Sequence[torch.Tensor], noise=None, randomize_noise: bool = False) -> torch.Tensor:
        """Style space (the list `styles` returns) -> image [B, 3, size, size]."""
        layers = self.style_layers()
        if not isinstance(styles, (list, tuple)) or len(styles) != len(layers):
            raise ValueError(f"styles must be a list of {len(layers)} tensors (one per style layer), got "
                             f"{type(styles).__name__} of length {len(styles) if hasattr(styles, '__len__') else '?'}")
        for s, layer in zip(styles, layers):
            if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[1] != layer.channels:
                raise ValueError(f"styles for {layer.name} must be [batch, {layer.channels}], got "
                                 f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
        noise = self._noise(noise, randomize_noise)
        out = self.conv1(self.input(styles[0].shape[0]), styles[0], noise[0])
        skip = self.to_rgb1(out, styles[1])
        for i, to_rgb in enumerate(self.to_rgbs):
            out = self.convs[2 * i](out, styles[3 * i + 2], noise[2 * i + 1])
            out = self.convs[2 * i + 1](out, styles[3 * i + 3], noise[2 * i + 2])
            skip = to_rgb(out, styles[3 * i + 4], skip)
        return skip

    def synthesis(self, w_plus: torch.Tensor, noise=None, randomize_noise: bool = False) -> torch.Tensor:
        """W+ [B, n_latent, style_dim] or w [B, style_dim] -> image [B, 3, size, size]."""
        return self.synthesis_s(self.styles(w_plus), noise, randomize_noise)

    def forward(self, z: torch.Tensor, truncation: float = 1.0, truncation_latent: torch.Tensor | None = None,
                noise=None, randomize_noise: bool = False) -> torch.Tensor:
        """z [B, style_dim] -> image, with the truncation trick w' = w_avg + truncation * (w - w_avg)."""
        w = self.mapping(z)
        if truncation != 1.0:
            if truncation_latent is None:
                raise ValueError("truncation_latent (e.g. generator.mean_latent()) is needed when truncation != 1")
            w = truncation_latent + truncation * (w - truncation_latent)
        return self.synthesis(w, noise, randomize_noise)

    def _check_latent(self, x, name, dims):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        expect = (f"[batch, {self.style_dim}]" if dims == 2
                  else f"[batch, {self.n_latent}, {self.style_dim}]")
        if x.dim() != dims or x.shape[-1] != self.style_dim or (dims == 3 and x.shape[1] != self.n_latent):
            raise ValueError(f"{name} must be {expect}, got {tuple(x.shape)}")

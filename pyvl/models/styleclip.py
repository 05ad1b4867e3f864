"""StyleCLIP: Patashnik, Wu, Shechtman, Cohen-Or, Lischinski, "StyleCLIP: Text-Driven Manipulation of StyleGAN
Imagery", ICCV 2021, arXiv:2103.17249. Official code: github.com/orpatashnik/StyleCLIP.

The three methods of the paper, on pyvl's StyleGAN2 generator (pyvl.models.stylegan2) and pyvl's CLIP
(pyvl.models.clip); every CLIP similarity goes through pyvl.ops.similarity_logits.

1. Latent optimization (paper section 4; optimization/run_optimization.py):
   argmin_w  D_CLIP(G(w), t) + lambda_L2 ||w - w_s||^2 + lambda_ID L_ID(w)   over W+,
   D_CLIP = 1 - cos(CLIP image embedding, CLIP text embedding). Defaults follow the code: Adam, lr 0.1 with the
   code's schedule get_lr (cosine ramp-down over the last 25% of the steps, linear ramp-up over the first 5%),
   300 steps, l2_lambda 0.008 (the squared norm is a sum over all W+ entries), id_lambda 0 (the code's default;
   the paper adds the identity term for some face edits). The identity term is a hook: any callable
   (edited image, source image) -> scalar, e.g. 1 - cos of ArcFace features as in the code's IDLoss; pyvl ships
   no face network.
   The image reaches CLIP as the code does it: nearest upsampling by 7 then average pooling by size / 32 (1024 ->
   224), generalized here to any generator size and CLIP input size R: upsample by R / g, pool by size / g with
   g = gcd(size, R). The code feeds the generator's [-1, 1] output to CLIP without CLIP's mean/std normalization;
   pyvl does the same by default (`clip_normalize=False`).
   The code computes 1 - logits / 100 with OpenAI's logit_scale (exactly 100 for the released models), i.e.
   1 - cos; pyvl computes 1 - cos directly so that a CLIP with another logit_scale gives the same loss.
   space="s" optimizes in style space instead of W+ (the code's --work_in_stylespace; ToRGB vectors frozen).

2. Latent mapper (section 5; mapper/latent_mappers.py, mapper/training/coach.py): three mappers for the coarse
   (W+ entries [:4]), medium ([4:8]) and fine ([8:]) layers, each PixelNorm + 4 EqualLinear(style_dim, style_dim,
   lr_mul 0.01) with the fused leaky ReLU. The edit is w_hat = w + 0.1 * M(w) (the code's 0.1 step; the paper
   writes w + M_t(w)). Loss (code defaults): clip_lambda 1.0 * D_CLIP(G(w_hat), t) (mean over the batch) +
   latent_l2_lambda 0.8 * MSE(w_hat, w) (a mean, unlike the optimization's sum) + id_lambda 0.1 * L_ID(G(w_hat),
   G(w)); the identity term is again a callable hook, omitted when none is given. The code trains with Ranger at
   lr 0.5, batch 2; pyvl only defines the module and the loss (use any optimizer). The coarse mapper's attribute is
   `course_mapping`, the code's spelling, so that its checkpoints' `mapper.*` state_dicts load.

3. Global directions (section 6; global_torch/SingleChannel.py, global_torch/StyleCLIP.py, manipulate.py):
   - style statistics: mean and std of every style-space channel over random z (the code: 100,000 samples);
   - channel relevance: for each channel c of the non-ToRGB style layers and each of num_images images, the channel
     set to its mean, then moved to mean -+ alpha * std (alpha = 5 in the code); the CLIP image embeddings of the
     two images are L2-normalized and their difference normalized, averaged over the images and normalized again
     -> a unit vector per channel in CLIP space (the code's fs3, [channels, embed_dim]); relevance R_c = <fs3_c,
     delta_t>;
   - delta_t: CLIP text embeddings of the target and neutral texts with prompt ensembling over templates (each text
     in every template, embeddings normalized, averaged, renormalized; the code uses the 80 ImageNet templates of
     CLIP's notebook), delta_t = normalize(t_target - t_neutral);
   - the direction: channels with |R_c| < beta set to zero, the rest divided by max |R_c| and multiplied by the
     channel's std; the edit is s + alpha * direction (alpha the manipulation strength).
   When no channel passes beta, the direction is zero (the code divides by zero there).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIP, zero_shot_weights
from .stylegan2 import EqualLinear, Generator, PixelNorm

__all__ = ["clip_image_input", "clip_loss", "get_lr", "LatentOptimizer", "optimize_latent", "LevelsMapper",
           "Mapper", "mapper_loss", "style_statistics", "channel_relevance", "text_direction", "global_direction",
           "apply_direction", "IMAGENET_TEMPLATES", "CLIP_MEAN", "CLIP_STD"]

# OpenAI CLIP's preprocessing statistics (used only with clip_normalize=True).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The prompt templates StyleCLIP's global-direction code ensembles over (CLIP's ImageNet templates; the code drops
# 'a photo of many {}.').
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.',
)


def _check_type(value, cls, name):
    if not isinstance(value, cls):
        names = cls.__name__ if isinstance(cls, type) else " or ".join(c.__name__ for c in cls)
        raise TypeError(f"{name} must be a {names}, got {type(value).__name__}")
    return value


def _nonneg(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# CLIP loss


def clip_image_input(image: torch.Tensor, clip_size: int, clip_normalize: bool = False) -> torch.Tensor:
    """The generator's image [B, 3, S, S] resized to CLIP's input the way StyleCLIP's CLIPLoss does: nearest
    upsampling by clip_size / g, average pooling by S / g, g = gcd(S, clip_size) (1024 -> 224: x7 then /32).
    clip_normalize applies CLIP's mean/std to the [-1, 1] image mapped to [0, 1] (the code does not)."""
    _check_type(image, torch.Tensor, "image")
    if image.dim() != 4 or image.shape[1] != 3 or image.shape[2] != image.shape[3]:
        raise ValueError(f"image must be [batch, 3, S, S], got {tuple(image.shape)}")
    size = image.shape[-1]
    g = math.gcd(size, clip_size)
    up, down = clip_size // g, size // g
    if up > 1:
        image = F.interpolate(image, scale_factor=up, mode="nearest")
    if down > 1:
        image = F.avg_pool2d(image, down)
    if clip_normalize:
        mean = image.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = image.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        image = ((image + 1) / 2 - mean) / std
    return image


def _clip_size(clip_model: CLIP) -> int:
    size = clip_model.visual.image_size
    if size[0] != size[1]:
        raise ValueError(f"StyleCLIP needs a CLIP with a square image_size, got {size}")
    return size[0]


def clip_loss(clip_model: CLIP, image: torch.Tensor, text_features: torch.Tensor, clip_normalize: bool = False,
              backend: str | None = None) -> torch.Tensor:
    """D_CLIP per image: 1 - cos(CLIP(resized image), text feature) -> [B].

    text_features: [embed_dim] (one text for every image) or [B, embed_dim] (one per image); need not be
    normalized. The cosine comes from pyvl.ops.similarity_logits (`backend` passes through to it).
    """
    from .. import ops

    _check_type(clip_model, CLIP, "clip_model")
    _check_type(text_features, torch.Tensor, "text_features")
    features = clip_model.encode_image(clip_image_input(image, _clip_size(clip_model), clip_normalize))
    if text_features.dim() == 1:
        text_features = text_features.unsqueeze(0)
    if text_features.dim() != 2 or text_features.shape[0] not in (1, features.shape[0]) \
            or text_features.shape[1] != features.shape[1]:
        raise ValueError(f"text_features must be [{features.shape[1]}] or [{features.shape[0]}, {features.shape[1]}] "
                         f"(the CLIP's embed_dim, one per image), got {tuple(text_features.shape)}")
    text_features = text_features.to(features.dtype)
    if text_features.shape[0] == 1:
        cos = ops.similarity_logits(features, text_features, 1.0, backend=backend)[:, 0]
    else:  # one text per image: a batch of 1 x 1 similarities
        cos = ops.similarity_logits(features.unsqueeze(1), text_features.unsqueeze(1), 1.0, backend=backend)[:, 0, 0]
    return 1 - cos


def _encode_text(clip_model: CLIP, text) -> torch.Tensor:
    """text features [embed_dim] from token ids [1, L] / [L] or features [embed_dim] / [1, embed_dim]."""
    _check_type(text, torch.Tensor, "text")
    if text.is_floating_point():
        if text.dim() == 2 and text.shape[0] == 1:
            text = text[0]
        if text.dim() != 1 or text.shape[0] != clip_model.embed_dim:
            raise ValueError(f"text features must be [{clip_model.embed_dim}], got {tuple(text.shape)}")
        return text.detach()
    if text.dim() == 1:
        text = text.unsqueeze(0)
    with torch.no_grad():
        return clip_model.encode_text(text)[0]


# ----------------------------------------------------------------------------------------------------------------
# 1. Latent optimization


def get_lr(t: float, initial_lr: float, rampdown: float = 0.25, rampup: float = 0.05) -> float:
    """StyleCLIP's schedule at progress t = step / steps: cosine ramp-down over the last `rampdown` of the run,
    linear ramp-up over the first `rampup` (the lr is 0 at step 0, as in the code)."""
    ramp = min(1.0, (1 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return initial_lr * ramp * min(1.0, t / rampup)


class LatentOptimizer:
    """Latent optimization of a W+ code against a text (StyleCLIP section 4), one `step()` at a time.

    Args:
        generator: a pyvl StyleGAN2 Generator (kept frozen: only the latent gets gradients).
        clip_model: a pyvl CLIP (frozen).
        text: token ids [1, L] (e.g. pyvl.models.clip.tokenize("a person with purple hair")) or CLIP text features
            [embed_dim].
        w_source: the source latent, w [B, style_dim] or W+ [B, n_latent, style_dim]; the optimization starts there.
        steps: the length of the run the lr schedule spans (300).
        lr: Adam's initial lr (0.1). l2_lambda: weight of ||w - w_source||^2 (0.008; 0 for free generation).
        id_loss: optional callable (image, source image) -> scalar; id_lambda its weight (code default 0).
        clip_normalize: CLIP mean/std normalization of the image (off, as the code).
        backend: passed to pyvl.ops.similarity_logits.
        space: "w+" (default) optimizes the W+ code; "s" optimizes the style-space code instead (the code's
            --work_in_stylespace): the list generator.styles(w_source), the ToRGB layers' vectors frozen, the l2
            term summed over every layer. `latent` is then that list.
    """

    def __init__(self, generator: Generator, clip_model: CLIP, text: torch.Tensor, w_source: torch.Tensor,
                 steps: int = 300, lr: float = 0.1, l2_lambda: float = 0.008,
                 id_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, id_lambda: float = 0.0,
                 clip_normalize: bool = False, backend: str | None = None, space: str = "w+"):
        self.generator = _check_type(generator, Generator, "generator")
        if space not in ("w+", "s"):
            raise ValueError(f"space must be 'w+' or 's', got {space!r}")
        self.space = space
        self.clip_model = _check_type(clip_model, CLIP, "clip_model")
        self.steps = _positive_int(steps, "steps")
        self.lr = _nonneg(lr, "lr")
        self.l2_lambda = _nonneg(l2_lambda, "l2_lambda")
        self.id_lambda = _nonneg(id_lambda, "id_lambda")
        if id_loss is not None and not callable(id_loss):
            raise TypeError(f"id_loss must be a callable (image, source image) -> loss, got {type(id_loss).__name__}")
        self.id_loss = id_loss
        self.clip_normalize, self.backend = clip_normalize, backend
        self.text_features = _encode_text(clip_model, text)
        with torch.no_grad():
            self.w_source = generator.w_plus(w_source).detach().clone()
            self.source_image = generator.synthesis(self.w_source) if id_loss is not None and id_lambda > 0 else None
            if space == "w+":
                self.source = self.w_source
                self.latent = self.w_source.clone().requires_grad_(True)
                params = [self.latent]
            else:
                self.source = [s.detach().clone() for s in generator.styles(self.w_source)]
                self.latent = [s.clone().requires_grad_(not layer.is_torgb)
                               for s, layer in zip(self.source, generator.style_layers())]
                params = [s for s in self.latent if s.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.lr)
        self.step_index = 0

    def loss(self, latent: torch.Tensor | None = None):
        """(total loss, {"clip": ..., "l2": ..., "id": ...}, image) at `latent` (default: the current one)."""
        latent = self.latent if latent is None else latent
        if self.space == "w+":
            image = self.generator.synthesis(latent)
            l2 = (self.source - latent).pow(2).sum()
        else:
            image = self.generator.synthesis_s(latent)
            l2 = sum((src - cur).pow(2).sum() for src, cur in zip(self.source, latent))
        c_loss = clip_loss(self.clip_model, image, self.text_features, self.clip_normalize, self.backend).mean()
        parts = {"clip": c_loss, "l2": l2}
        total = c_loss + self.l2_lambda * l2
        if self.id_loss is not None and self.id_lambda > 0:
            parts["id"] = self.id_loss(image, self.source_image)
            total = total + self.id_lambda * parts["id"]
        return total, parts, image

    def step(self) -> dict:
        """One Adam step at the scheduled lr; returns the losses before the step (floats)."""
        for group in self.optimizer.param_groups:
            group["lr"] = get_lr(self.step_index / self.steps, self.lr)
        total, parts, _ = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.step_index += 1
        return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in parts.items()}}


def optimize_latent(generator: Generator, clip_model: CLIP, text: torch.Tensor, w_source: torch.Tensor,
                    steps: int = 300, **kwargs):
    """Run `steps` latent-optimization steps (LatentOptimizer's arguments); returns (the latent: W+, or the list of
    style vectors with space="s"; the history of the per-step losses)."""
    opt = LatentOptimizer(generator, clip_model, text, w_source, steps=steps, **kwargs)
    history = [opt.step() for _ in range(steps)]
    latent = opt.latent.detach() if opt.space == "w+" else [s.detach() for s in opt.latent]
    return latent, history


# ----------------------------------------------------------------------------------------------------------------
# 2. Latent mapper


class Mapper(nn.Module):
    """PixelNorm + 4 EqualLinear(style_dim, style_dim, lr_mul 0.01, fused leaky ReLU): keys mapping.{1..4}.*"""

    def __init__(self, style_dim: int = 512, n_layers: int = 4, lr_mul: float = 0.01):
        super().__init__()
        self.mapping = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mul, activation=True)
                                                    for _ in range(n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PixelNorm normalizes dim 1: fold the W+ entries into the batch so each w is normalized on its own.
        shape = x.shape
        return self.mapping(x.reshape(-1, shape[-1])).reshape(shape)


class LevelsMapper(nn.Module):
    """StyleCLIP's latent mapper on W+: coarse [:4], medium [4:8] and fine [8:] mappers; a disabled level outputs
    zeros (no change). forward(w_plus) is the residual M(w); `edit(w_plus)` = w + step * M(w) with step 0.1."""

    def __init__(self, style_dim: int = 512, coarse: bool = True, medium: bool = True, fine: bool = True,
                 step: float = 0.1):
        super().__init__()
        self.style_dim, self.step = style_dim, _nonneg(step, "step")
        if coarse:
            self.course_mapping = Mapper(style_dim)  # the official attribute name (sic)
        if medium:
            self.medium_mapping = Mapper(style_dim)
        if fine:
            self.fine_mapping = Mapper(style_dim)

    def forward(self, w_plus: torch.Tensor) -> torch.Tensor:
        _check_type(w_plus, torch.Tensor, "w_plus")
        if w_plus.dim() != 3 or w_plus.shape[-1] != self.style_dim:
            raise ValueError(f"w_plus must be [batch, n_latent, {self.style_dim}], got {tuple(w_plus.shape)}")
        out = []
        for name, part in (("course_mapping", w_plus[:, :4]), ("medium_mapping", w_plus[:, 4:8]),
                           ("fine_mapping", w_plus[:, 8:])):
            mapper = getattr(self, name, None)
            out.append(torch.zeros_like(part) if mapper is None or part.shape[1] == 0 else mapper(part))
        return torch.cat(out, dim=1)

    def edit(self, w_plus: torch.Tensor) -> torch.Tensor:
        return w_plus + self.step * self(w_plus)


def mapper_loss(mapper: LevelsMapper, generator: Generator, clip_model: CLIP, text: torch.Tensor,
                w_plus: torch.Tensor, clip_lambda: float = 1.0, latent_l2_lambda: float = 0.8, id_lambda: float = 0.1,
                id_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                clip_normalize: bool = False, backend: str | None = None):
    """The mapper's training loss on a batch of W+ codes (StyleCLIP's Coach.calc_loss with its defaults):
    clip_lambda * mean D_CLIP(G(w_hat), t) + latent_l2_lambda * MSE(w_hat, w) + id_lambda * id_loss(G(w_hat), G(w)),
    w_hat = mapper.edit(w). The identity term needs `id_loss` (a callable); without one it is left out.
    Returns (loss, {"clip", "l2", "id"?} floats)."""
    _check_type(mapper, LevelsMapper, "mapper")
    _check_type(generator, Generator, "generator")
    for value, name in ((clip_lambda, "clip_lambda"), (latent_l2_lambda, "latent_l2_lambda"), (id_lambda, "id_lambda")):
        _nonneg(value, name)
    if id_loss is not None and not callable(id_loss):
        raise TypeError(f"id_loss must be a callable (image, source image) -> loss, got {type(id_loss).__name__}")
    text_features = _encode_text(clip_model, text)
    w = generator.w_plus(w_plus).detach()
    w_hat = mapper.edit(w)
    x_hat = generator.synthesis(w_hat)
    loss = x_hat.new_zeros(())
    parts = {}
    if id_loss is not None and id_lambda > 0:
        with torch.no_grad():
            x = generator.synthesis(w)
        parts["id"] = id_loss(x_hat, x)
        loss = loss + id_lambda * parts["id"]
    if clip_lambda > 0:
        parts["clip"] = clip_loss(clip_model, x_hat, text_features, clip_normalize, backend).mean()
        loss = loss + clip_lambda * parts["clip"]
    if latent_l2_lambda > 0:
        parts["l2"] = F.mse_loss(w_hat, w)
        loss = loss + latent_l2_lambda * parts["l2"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------------------------
# 3. Global directions


def style_statistics(generator: Generator, n: int = 100_000, batch: int = 1000,
                     generator_rng: torch.Generator | None = None):
    """(means, stds): per style layer, the mean and std [C_l] of its style channels over n random z's."""
    _check_type(generator, Generator, "generator")
    _positive_int(n, "n")
    _positive_int(batch, "batch")
    ref = generator.input.input
    sums = sq = None
    with torch.no_grad():
        for start in range(0, n, batch):
            m = min(batch, n - start)
            z = torch.randn(m, generator.style_dim, generator=generator_rng).to(ref.device, ref.dtype)
            styles = [s.double() for s in generator.styles(generator.mapping(z))]
            part_sum = [s.sum(0) for s in styles]
            part_sq = [s.pow(2).sum(0) for s in styles]
            sums = part_sum if sums is None else [a + b for a, b in zip(sums, part_sum)]
            sq = part_sq if sq is None else [a + b for a, b in zip(sq, part_sq)]
    means = [s / n for s in sums]
    stds = [(q / n - mu.pow(2)).clamp_min(0).sqrt() for q, mu in zip(sq, means)]
    return [m.to(ref.dtype) for m in means], [s.to(ref.dtype) for s in stds]


def _layer_indices(generator: Generator, layers) -> list[int]:
    style_layers = generator.style_layers()
    if layers is None:
        return [i for i, layer in enumerate(style_layers) if not layer.is_torgb]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError("layers must be a sequence of style-layer indices (see Generator.style_layers) or None")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(style_layers):
            raise ValueError(f"layers must hold style-layer indices in [0, {len(style_layers)}), got {i!r}")
    return sorted(set(layers))


def channel_relevance(generator: Generator, clip_model: CLIP, styles: Sequence[torch.Tensor],
                      means: Sequence[torch.Tensor], stds: Sequence[torch.Tensor], alpha: float = 5.0,
                      layers: Sequence[int] | None = None, chunk: int = 64, clip_normalize: bool = False):
    """The code's fs3: a unit CLIP-space vector per style channel, [num_channels, embed_dim], with the channel order
    of `layers` (default: every non-ToRGB style layer, in style-space order) and, within a layer, channel order.

    styles: the style-space codes of the num_images images the effect is averaged over (generator.styles(w)).
    means / stds: style_statistics. For a channel, every image is generated with that channel at mean - alpha * std
    and at mean + alpha * std; chunk bounds how many images go through the generator and CLIP at once.
    """
    _check_type(generator, Generator, "generator")
    _check_type(clip_model, CLIP, "clip_model")
    _nonneg(alpha, "alpha")
    _positive_int(chunk, "chunk")
    indices = _layer_indices(generator, layers)
    n_img = styles[0].shape[0]
    clip_size = _clip_size(clip_model)
    jobs = [(li, c) for li in indices for c in range(styles[li].shape[1])]
    out = []
    with torch.no_grad():
        # One job = one channel of one layer, which costs 2 * n_img images; jobs are batched up to `chunk` images.
        per = max(1, chunk // (2 * n_img))
        for start in range(0, len(jobs), per):
            group = jobs[start:start + per]
            batch = [s.expand(len(group), 2, *s.shape).clone() for s in styles]  # [J, 2, n_img, C]
            for j, (li, c) in enumerate(group):
                batch[li][j, 0, :, c] = means[li][c] - alpha * stds[li][c]
                batch[li][j, 1, :, c] = means[li][c] + alpha * stds[li][c]
            flat = [b.reshape(-1, b.shape[-1]) for b in batch]
            image = generator.synthesis_s(flat)
            feats = clip_model.encode_image(clip_image_input(image, clip_size, clip_normalize))
            feats = F.normalize(feats.float(), dim=-1).view(len(group), 2, n_img, -1)
            diff = F.normalize(feats[:, 1] - feats[:, 0], dim=-1).mean(dim=1)
            out.append(F.normalize(diff, dim=-1))
    return torch.cat(out)


def text_direction(clip_model: CLIP, target: str, neutral: str, templates: Sequence = IMAGENET_TEMPLATES,
                   tokenizer=None) -> torch.Tensor:
    """delta_t = normalize(t_target - t_neutral), each t the prompt ensemble over `templates` (zero_shot_weights)."""
    for value, name in ((target, "target"), (neutral, "neutral")):
        _check_type(value, str, name)
    t = zero_shot_weights(clip_model, [target, neutral], templates, tokenizer)
    return F.normalize(t[0] - t[1], dim=0)


def global_direction(relevance: torch.Tensor, delta_t: torch.Tensor, stds: Sequence[torch.Tensor], beta: float,
                     generator: Generator, layers: Sequence[int] | None = None):
    """(direction, number of channels moved): the style-space edit direction of StyleCLIP's GetBoundary.

    relevance: channel_relevance's [num_channels, embed_dim] over `layers` (the same layers argument); delta_t: the
    text direction [embed_dim]. Channels with |<relevance_c, delta_t>| < beta are zeroed, the rest divided by the
    largest |.| and multiplied by the channel's std. The direction is a list like generator.styles' output (one
    [C_l] per style layer; zeros in layers not covered, e.g. the ToRGB layers)."""
    _check_type(relevance, torch.Tensor, "relevance")
    _check_type(delta_t, torch.Tensor, "delta_t")
    _nonneg(beta, "beta")
    indices = _layer_indices(generator, layers)
    sizes = [stds[i].shape[0] for i in indices]
    if relevance.dim() != 2 or relevance.shape[0] != sum(sizes):
        raise ValueError(f"relevance must be [{sum(sizes)}, embed_dim] (one row per channel of the chosen layers), got "
                         f"{tuple(relevance.shape)}")
    if delta_t.dim() != 1 or delta_t.shape[0] != relevance.shape[1]:
        raise ValueError(f"delta_t must be [{relevance.shape[1]}], got {tuple(delta_t.shape)}")
    r = relevance @ delta_t.to(relevance.dtype)
    keep = r.abs() >= beta
    count = int(keep.sum())
    r = torch.where(keep, r, torch.zeros_like(r))
    if count:
        r = r / r.abs().max()
    direction = [torch.zeros_like(s) for s in stds]
    for i, part in zip(indices, r.split(sizes)):
        direction[i] = part.to(stds[i].dtype) * stds[i]
    return direction, count


def apply_direction(styles: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], alpha: float):
    """s + alpha * direction, layer by layer (alpha: the manipulation strength, negative to reverse)."""
    if len(styles) != len(direction):
        raise ValueError(f"styles and direction must have the same number of layers, got {len(styles)} and "
                         f"{len(direction)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    return [s + alpha * d.to(s.dtype) for s, d in zip(styles, direction)]

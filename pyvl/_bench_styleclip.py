"""`pyvl bench` case of the StyleCLIP model (imported by pyvl.bench).

  styleclip_step   one step of StyleCLIP's latent optimization (pyvl.models.styleclip): StyleGAN2 synthesis from W+,
      the image resized to CLIP's input as the official CLIPLoss does, CLIP's image encoder, the loss
      1 - cos(image, text) + 0.008 ||w - w_src||^2, and the backward pass to the latent (torch.autograd.grad: no
      optimizer state changes between repeats). pyvl: the cosine from pyvl.ops.similarity_logits (its default
      backend, what a user of the model gets); peer: the same step with the cosine in plain PyTorch
      (F.normalize + matmul). Both share the generator and CLIP modules, so the ratio isolates what pyvl's ops
      change in the step.
      quick: config-f widths (512 channels, style_dim 512, 8 mapping layers) at 32px and CLIP ViT-B-32 at 224;
      full adds 64px; tiny: small random models (tests).

The text features are a fixed random unit vector: the step never encodes text (StyleCLIP encodes the prompt once),
and tokenizing needs open_clip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STYLECLIP_OPS = ("styleclip_step",)

# (generator size, generator widths, CLIP config, batch)
STEP_SIZES = {
    "quick": [(32, "config-f", "ViT-B-32", 1)],
    "full": [(32, "config-f", "ViT-B-32", 1), (64, "config-f", "ViT-B-32", 1)],
    "tiny": [(32, "tiny", "tiny", 1)],
}
L2_LAMBDA = 0.008


def _models(size, widths, clip_name, device, dtype):
    from pyvl.models.clip import CLIP, TextConfig, VisionConfig, create_clip
    from pyvl.models.stylegan2 import Generator

    torch.manual_seed(0)
    if widths == "tiny":
        g = Generator(size, 32, n_mlp=2, channels={4: 16, 8: 16, 16: 8, 32: 8, 64: 8})
    else:
        g = Generator(size)
    if clip_name == "tiny":
        clip = CLIP(16, VisionConfig(1, 32, head_width=16, patch_size=8, image_size=32), TextConfig(8, 50, 32, 2, 1))
    else:
        clip = create_clip(clip_name)
    g = g.eval().requires_grad_(False).to(device, dtype)
    clip = clip.eval().requires_grad_(False).to(device, dtype)
    return g, clip


def step_built(device, dtype, backend, *, size, widths, clip_name, batch):
    """The styleclip_step case, built: pyvl's step and the plain-PyTorch one over the same models and latent."""
    from pyvl.bench import Built, _chosen_backend
    from pyvl.models import styleclip as sc

    g, clip = _models(size, widths, clip_name, device, dtype)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, g.style_dim, generator=gen).to(device, dtype)
    text = F.normalize(torch.randn(clip.embed_dim, generator=gen), dim=0).to(device, dtype)
    with torch.no_grad():
        w_src = g.w_plus(g.mapping(z)).clone()
    # a latent a few steps away from the source, as mid-optimization
    latent = (w_src + 0.01 * torch.randn(w_src.shape, generator=gen).to(device, dtype)).requires_grad_(True)
    chosen = _chosen_backend("similarity_logits", backend, text[None])
    clip_size = clip.visual.image_size[0]

    def ours():
        loss = sc.clip_loss(clip, g.synthesis(latent), text, backend=backend).mean() \
            + L2_LAMBDA * (w_src - latent).pow(2).sum()
        return torch.autograd.grad(loss, latent)

    def plain():
        features = clip.encode_image(sc.clip_image_input(g.synthesis(latent), clip_size))
        cos = F.normalize(features, dim=-1) @ F.normalize(text, dim=0)
        loss = (1 - cos).mean() + L2_LAMBDA * (w_src - latent).pow(2).sum()
        return torch.autograd.grad(loss, latent)

    # A whole model's traffic depends on what stays in cache: times and ratio only (no GB/s).
    return Built(ours, {"torch (plain cosine)": plain}, None, chosen)


def styleclip_cases(sizes: str, device, ops):
    from pyvl.bench import Case

    out = []
    if "styleclip_step" in ops:
        for size, widths, clip_name, batch in STEP_SIZES[sizes]:
            kwargs = {"size": size, "widths": widths, "clip_name": clip_name, "batch": batch}
            out.append(Case("styleclip_step", "nchw", f"G{size}px {widths} + CLIP {clip_name} B{batch} fwd+bwd", batch,
                            1, lambda dev, dt, be, kw=kwargs: step_built(dev, dt, be, **kw),
                            {"generator_size": size, "generator_widths": widths, "clip": clip_name, "batch": batch}))
    return out

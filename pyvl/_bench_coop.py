"""`pyvl bench` cases of CoOp (pyvl.models.coop; imported by pyvl.bench).

  coop_step    one CoOp training step: the prompt learner's embeddings for every class through CLIP's text tower,
      the cosine logits against a batch of image features, cross-entropy, and the backward to the context vectors.
      pyvl: CoOp.logits_from_features (pyvl.ops.similarity_logits); "plain PyTorch": the same method written with
      F.normalize + matmul as the official code (and any CoOp reimplementation) does. The image features are given
      (the frozen image tower's output; it takes no part in the backward), so the step is what CoOp trains.
      The text tower of ViT-B (width 512, 8 heads, 12 layers, context 77) with 10 / 100 / 1000 classes in full;
      quick keeps the paper's 16 context vectors, batch 32 and context 77 on a narrower, shallower tower (width 256,
      4 layers, 10 classes: ViT-B's tower alone takes seconds per step on 2 CPU cores); tiny: a 1-layer width-32 one.
      The text tower dominates the step: both sides run it identically, so the ratio tells what pyvl's logits save
      of a whole step, not of the logits alone (similarity_logits has its own case).
"""
from __future__ import annotations

import torch

COOP_OPS = ("coop_step",)

# (classes, text width, heads, layers, context length, batch)
COOP_SIZES = {
    "quick": [(10, 256, 4, 4, 77, 32)],
    "full": [(10, 512, 8, 12, 77, 32), (100, 512, 8, 12, 77, 32), (1000, 512, 8, 12, 77, 32)],
    "tiny": [(5, 32, 2, 1, 24, 8)],
}
NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _coop(classes, width, heads, layers, context, device, dtype):
    from pyvl.models.clip import CLIP, TextConfig, VisionConfig
    from pyvl.models.coop import CoOp

    torch.manual_seed(0)
    # The image tower is not part of the step (its features are given): the smallest one CLIP builds.
    clip = CLIP(512 if width >= 256 else 16, VisionConfig(layers=1, width=32, head_width=16, patch_size=8,
                                                          image_size=16),
                TextConfig(context_length=context, width=width, heads=heads, layers=layers))
    names = [f"{NAMES[i % len(NAMES)]} {i // len(NAMES)}" if classes > len(NAMES) else NAMES[i]
             for i in range(classes)]
    return CoOp(clip.to(device, dtype), names, n_ctx=16 if context >= 32 else 4)


def _step_case(classes, width, heads, layers, context, batch):
    def build(device, dtype, backend):
        import torch.nn.functional as F

        from pyvl.bench import Built, _chosen_backend

        model = _coop(classes, width, heads, layers, context, device, dtype)
        g = torch.Generator().manual_seed(1)
        features = torch.randn(batch, model.clip.embed_dim, generator=g).to(device, dtype)
        labels = torch.randint(0, classes, (batch,), generator=g).to(device)
        ctx = model.prompt_learner.ctx
        chosen = _chosen_backend("similarity_logits", backend, features)

        def ours():
            loss = F.cross_entropy(model.logits_from_features(features), labels)
            return torch.autograd.grad(loss, [ctx])

        def plain():
            text = model.text_features()
            logits = model.clip.logit_scale.exp() * F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T
            return torch.autograd.grad(F.cross_entropy(logits, labels), [ctx])

        return Built(ours, {"plain PyTorch": plain}, None, chosen)

    return build


def coop_cases(sizes: str, device, ops):
    from pyvl.bench import Case

    out = []
    if "coop_step" in ops:
        for classes, width, heads, layers, context, batch in COOP_SIZES[sizes]:
            shape = f"{classes} classes, text w{width} L{layers} ctx{context}, batch {batch}, fwd+bwd"
            out.append(Case("coop_step", "rows", shape, batch, 1,
                            _step_case(classes, width, heads, layers, context, batch),
                            {"classes": classes, "width": width, "heads": heads, "layers": layers,
                             "context_length": context, "batch": batch, "n_ctx": 16 if context >= 32 else 4}))
    return out

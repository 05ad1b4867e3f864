"""`pyvl bench` cases of ProbVLM (imported by pyvl.bench).

  probvlm_step   one training step of ProbVLM's two adapters on a batch of frozen CLIP embeddings (forward,
      probvlm_loss with the official weights, backward, Adam step) followed by the in-batch retrieval similarity
      of the predicted image means against the predicted text means (what a training loop computes to monitor
      Recall@1): pyvl (similarity through pyvl.ops.similarity_logits) against the same step with the similarity in
      plain PyTorch (F.normalize + matmul). Everything else is identical, so the ratio shows what the similarity op
      changes in a whole step. quick: B = 512 embeddings of d = 512 (ViT-B/32), hidden 256 (the official
      BayesCap_for_CLIP); full adds B = 256, 1024, 4096 and d = 768.
"""
from __future__ import annotations

import torch

PROBVLM_OPS = ("probvlm_step",)

STEP_SIZES = {
    "quick": [(512, 512, 256)],
    "full": [(256, 512, 256), (512, 512, 256), (1024, 512, 256), (4096, 512, 256), (1024, 768, 384)],
    "tiny": [(8, 16, 8)],
}


def _step_fn(B, d, hidden, device, dtype, similarity):
    """A callable that runs one training step and returns the in-batch similarity; its own model and optimizer
    (same seed for every implementation, so every one does the same arithmetic)."""
    from pyvl.models import probvlm as P

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1).to(device, dtype)
    txt = torch.nn.functional.normalize(img.float().cpu() + 0.3 * torch.randn(B, d, generator=g), dim=-1)
    txt = txt.to(device, dtype)
    torch.manual_seed(0)
    model = P.ProbVLM(dim=d, hidden_dim=hidden).to(device, dtype).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        i_out, t_out = model(img, txt)
        P.probvlm_loss(i_out, t_out, img, txt).backward()
        opt.step()
        with torch.no_grad():
            return similarity(i_out.mu.detach(), t_out.mu.detach())

    return step


def _step_case(B, d, hidden):
    def build(device, dtype, backend):
        from pyvl.bench import Built, _chosen_backend
        from pyvl.models.probvlm import retrieval_similarity

        probe = torch.zeros(2, d, device=device, dtype=dtype)
        chosen = _chosen_backend("similarity_logits", backend, probe)

        def torch_similarity(a, b):
            return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

        ours = _step_fn(B, d, hidden, device, dtype, lambda a, b: retrieval_similarity(a, b, backend=backend))
        peer = _step_fn(B, d, hidden, device, dtype, torch_similarity)
        return Built(ours, {"torch (F.normalize + matmul)": peer}, None, chosen)

    return build


def probvlm_cases(sizes: str, device, ops):
    from pyvl.bench import Case

    out = []
    if "probvlm_step" in ops:
        for B, d, hidden in STEP_SIZES[sizes]:
            out.append(Case("probvlm_step", "rows", f"B{B} d{d} hidden{hidden} train step", B, 1,
                            _step_case(B, d, hidden), {"B": B, "d": d, "hidden": hidden}))
    return out

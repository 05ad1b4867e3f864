"""`pyvl bench` cases of the contrastive family (imported by pyvl.bench).

  contrastive_loss     CLIP's loss, forward + backward (gradients of both feature matrices and logit_scale), on
      unit-norm fp features as open_clip's models hand them over, logit_scale = 1 / 0.07: pyvl's op against
      open_clip's ClipLoss (single process) and Inf-CL's cal_inf_loss where it is installed and a GPU is present.
      N = 1024, 4096, 8192 (quick) and up to 65536 (full); d = 512 (ViT-B) and 768 (ViT-L).
  similarity_logits    CLIP's zero-shot classifier logits, forward: 100 * normalize(text) @ normalize(image)^T for
      prompt-ensembled class embeddings against a batch of images, against the same in eager PyTorch.

Peak memory on the CPU (torch keeps no CPU allocator statistics): pyvl.bench.subprocess_peak_memory runs each
implementation once more in a fresh process after a small warm-up call (the case's memory_probe); the figure
includes the gradients every implementation must return.
"""
from __future__ import annotations


import torch

CONTRASTIVE_OPS = ("contrastive_loss", "similarity_logits")

LOSS_SIZES = {
    "quick": [(n, d) for n in (1024, 4096, 8192) for d in (512, 768)],
    "full": [(n, d) for n in (1024, 4096, 8192, 16384, 32768, 65536) for d in (512, 768)],
    "tiny": [(64, 16)],
}
# (text leading dims, classes, images, d): ImageNet-like 1000 classes with one prompt, and a 7-template ensemble.
SIM_SIZES = {
    "quick": [((), 1000, 256, 512), ((7,), 100, 256, 512)],
    "full": [((), 1000, 1024, 512), ((7,), 1000, 256, 768), ((80,), 100, 256, 512)],
    "tiny": [((3,), 5, 7, 16)],
}
LOGIT_SCALE = 1 / 0.07


def _features(N, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=-1)
    return x.to(device, dtype).requires_grad_(), y.to(device, dtype).requires_grad_()


def _loss_fns(N, d, device, dtype, backend):
    """name -> a callable that runs one forward + backward; what both the timing and the memory runs call."""
    x, y = _features(N, d, device, dtype)
    scale = torch.tensor(LOGIT_SCALE, device=device, dtype=dtype, requires_grad=True)
    leaves = (x, y, scale)

    def pyvl_fn():
        import pyvl

        return torch.autograd.grad(pyvl.ops.contrastive_loss(x, y, scale, backend=backend), leaves)

    fns = {"pyvl": pyvl_fn}
    try:
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        fns["open_clip ClipLoss"] = lambda: torch.autograd.grad(clip_loss(x, y, scale), leaves)
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        try:
            from inf_cl import cal_inf_loss

            def inf_cl_fn():
                labels = torch.arange(N, device=device)
                # cal_inf_loss is one direction (image -> text); CLIP's loss is the mean of both directions.
                loss = (cal_inf_loss(x, y, labels=labels, scale=scale).mean()
                        + cal_inf_loss(y, x, labels=labels, scale=scale).mean()) / 2
                return torch.autograd.grad(loss, (x, y))

            fns["Inf-CL"] = inf_cl_fn
        except ImportError:
            pass
    return fns


def loss_built(device, dtype, backend, N, d):
    """The contrastive_loss case of size N x d, built: what the timing and, in a fresh process, the CPU peak memory
    measurement (the case's memory_probe) both run."""
    return _loss_case(N, d)(device, dtype, backend)


def _loss_case(N, d):
    def build(device, dtype, backend):
        from pyvl.bench import Built, Skip, _chosen_backend

        x, _ = _features(2, d, device, dtype)
        chosen = _chosen_backend("contrastive_loss", backend, x)
        fns = _loss_fns(N, d, device, dtype, backend)
        if len(fns) == 1:
            raise Skip("no peer installed (pip install open_clip_torch; inf-cl needs a CUDA device)")
        pyvl_fn = fns.pop("pyvl")
        # A perfect kernel reads both feature matrices once and writes both gradients once.
        nbytes = 4 * N * d * torch.empty((), dtype=dtype).element_size()
        return Built(pyvl_fn, fns, nbytes, chosen)

    return build


def _similarity_case(lead, classes, images, d):
    def build(device, dtype, backend):
        import pyvl
        from pyvl.bench import Built, _chosen_backend

        g = torch.Generator().manual_seed(0)
        text = torch.randn(*lead, classes, d, generator=g).to(device, dtype)
        image = torch.randn(images, d, generator=g).to(device, dtype)
        chosen = _chosen_backend("similarity_logits", backend, text)

        def ours():
            with torch.no_grad():
                return pyvl.ops.similarity_logits(text, image, 100.0, backend=backend)

        def eager():
            with torch.no_grad():
                t = torch.nn.functional.normalize(text, dim=-1)
                i = torch.nn.functional.normalize(image, dim=-1)
                return 100.0 * t @ i.T

        out_elems = text[..., 0].numel() * images
        nbytes = (text.numel() + image.numel() + out_elems) * text.element_size()
        return Built(ours, {"torch eager": eager}, nbytes, chosen)

    return build


def contrastive_cases(sizes: str, device, ops):
    from pyvl.bench import Case

    out = []
    if "contrastive_loss" in ops:
        for N, d in LOSS_SIZES[sizes]:
            probe = None if sizes == "tiny" else ("pyvl._bench_contrastive:loss_built", {"N": N, "d": d},
                                                  {"N": 64, "d": d})
            out.append(Case("contrastive_loss", "rows", f"N{N} d{d} fwd+bwd", N, 1, _loss_case(N, d),
                            {"N": N, "d": d, "kind": "softmax", "logit_scale": LOGIT_SCALE}, memory_probe=probe))
    if "similarity_logits" in ops:
        for lead, classes, images, d in SIM_SIZES[sizes]:
            shape = f"text {'x'.join(map(str, (*lead, classes)))} x img {images} d{d}"
            out.append(Case("similarity_logits", "rows", shape, images, 1, _similarity_case(lead, classes, images, d),
                            {"text": [*lead, classes, d], "images": [images, d]}))
    return out

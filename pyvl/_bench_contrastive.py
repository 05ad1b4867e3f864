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

On a CUDA device pyvl's ops run their Triton kernels (backend "triton": pyvl has no CUDA kernels for this family, so
a bench run whose kernel backend is "cuda" times "triton" here); time them in bfloat16 as CLIP trains
(`pyvl bench --device cuda --dtype bfloat16 --ops contrastive_loss,similarity_logits --sizes full`; the "full" set
goes to N = 65536 at d = 512 and 768).

The largest batch that fits (GPU): `python -m pyvl._bench_contrastive --max-n [--d 512] [--dtype bfloat16]` measures
each implementation's peak CUDA memory for forward + backward at N = 2048, 4096, 8192 (torch.cuda.max_memory_allocated
above the inputs), fits peak(N) = a + b N + c N^2 by least squares and solves peak(N) = free device memory (less the
inputs and gradients, 4 N d elements): pyvl's loss is linear in N (c ~ 0), open_clip's quadratic. The figure is an
extrapolation, printed with the fit; `--verify` also runs pyvl's loss once at 90% of its predicted N.
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


def _loss_backend(backend, device):
    """On a CUDA device, "triton" where the asked-for backend is the absent "cuda" (or none was asked for)."""
    if torch.device(device).type == "cuda" and backend in (None, "cuda"):
        return "triton"
    return backend


def loss_built(device, dtype, backend, N, d):
    """The contrastive_loss case of size N x d, built: what the timing and, in a fresh process, the CPU peak memory
    measurement (the case's memory_probe) both run."""
    return _loss_case(N, d)(device, dtype, backend)


def _loss_case(N, d):
    def build(device, dtype, backend):
        from pyvl.bench import Built, Skip, _chosen_backend

        x, _ = _features(2, d, device, dtype)
        backend = _loss_backend(backend, device)
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
        backend = _loss_backend(backend, device)
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


# ----------------------------------------------------------------------------------------------------------------
# The largest batch that fits on the GPU (see the module docstring)


def _peak_bytes(fn, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def max_batch(d=512, dtype=torch.bfloat16, device="cuda", sizes=(2048, 4096, 8192), verify=False, out=print):
    """{implementation: predicted largest N} from peaks at `sizes`, fitted a + b N + c N^2 (see the docstring)."""
    import numpy as np

    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    elem = torch.empty((), dtype=dtype).element_size()
    peaks = {}
    for N in sizes:
        for name, fn in _loss_fns(N, d, device, dtype, "triton").items():
            fn()  # compiles / warms up
            peaks.setdefault(name, []).append(_peak_bytes(fn, device))
        torch.cuda.empty_cache()
    best = {}
    for name, ys in peaks.items():
        c, b, a = np.polyfit(np.array(sizes, dtype=float), np.array(ys, dtype=float), 2)
        c = max(c, 0.0)
        # peak(N) + 4 N d elements (features and gradients) <= free
        b_total = b + 4 * d * elem
        if c * 1e12 < b_total:  # linear in practice
            n_max = (free - a) / b_total
        else:
            n_max = (-b_total + (b_total ** 2 + 4 * c * (free - a)) ** 0.5) / (2 * c)
        best[name] = int(n_max)
        out(f"{name:<22} peak(N) = {a / 2**20:.1f} MiB + {b / 2**10:.2f} KiB N + {c:.3g} B N^2 "
            f"-> largest N ~ {int(n_max):,} in {free / 2**30:.1f} GiB free (d = {d}, {dtype})")
    if verify:
        N = int(0.9 * best["pyvl"])
        fn = _loss_fns(N, d, device, dtype, "triton")["pyvl"]
        out(f"pyvl at N = {N:,}: peak {_peak_bytes(fn, device) / 2**30:.2f} GiB above the inputs")
    return best


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="largest contrastive-loss batch that fits on the GPU")
    parser.add_argument("--max-n", action="store_true", required=True)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args()
    max_batch(args.d, getattr(torch, args.dtype), verify=args.verify)

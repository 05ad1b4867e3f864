"""The per-process body of tests/test_contrastive.py's distributed test (a light module: every spawned process
imports it), and of tests/triton/test_contrastive_triton.py's with backends=("triton",) in float32. Each rank writes
the list of its failed checks to out_dir/rank<r>.json."""
import os

import torch

from _dist_exit import write_results_and_exit
from pyvl import _ext
from pyvl.ops import contrastive_loss
from pyvl.reference import contrastive as ref


def worker(rank, world, init_file, out_dir, n, d, with_open_clip, backends=None, dtype=torch.float64, tol=1e-10):
    """backends: those to check (default: reference, and cpu where the extension loads); dtype: of the per-rank
    inputs (the single-process truth is float64); tol: relative tolerance of the loss and feature gradients."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    failures = []

    def close(name, got, want, tol=tol):
        err = float((got.detach().double() - want.detach()).abs().max())
        if not err <= tol * max(1.0, float(want.detach().abs().max())):
            failures.append(f"rank {rank}: {name}: max error {err:.3e}")

    group = dist.group.WORLD
    g = torch.Generator().manual_seed(123)
    X = torch.randn(world * n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(world * n, d, generator=g, dtype=torch.float64)
    X, Y = X / X.norm(dim=1, keepdim=True), Y / Y.norm(dim=1, keepdim=True)
    rows = slice(rank * n, (rank + 1) * n)
    if backends is None:
        backends = ["reference"] + (["cpu"] if _ext.LOAD_ERROR is None else [])
    for kind in ("softmax", "sigmoid"):
        # The single-process loss over the global batch, and its gradients.
        leaves = [X.clone().requires_grad_(), Y.clone().requires_grad_(),
                  torch.tensor(7.0, dtype=torch.float64, requires_grad=True),
                  torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)]
        single = ref.contrastive_loss(*leaves, kind)
        g_single = torch.autograd.grad(single, leaves)
        for backend in backends:
            local = [X[rows].to(dtype).requires_grad_(), Y[rows].to(dtype).requires_grad_(),
                     torch.tensor(7.0, dtype=dtype, requires_grad=True),
                     torch.tensor(-3.0, dtype=dtype, requires_grad=True)]
            loss = contrastive_loss(*local, kind=kind, group=group, backend=backend)
            grads = torch.autograd.grad(loss, local)
            total = loss.detach().clone()
            dist.all_reduce(total)
            close(f"{kind}/{backend} mean loss over ranks", total / world, single)
            close(f"{kind}/{backend} grad image rows", grads[0] / world, g_single[0][rows])
            close(f"{kind}/{backend} grad text rows", grads[1] / world, g_single[1][rows])
            for i, name in ((2, "logit_scale"), (3, "logit_bias")):
                summed = grads[i].detach().clone()
                dist.all_reduce(summed)
                close(f"{kind}/{backend} grad {name} summed over ranks", summed / world, g_single[i],
                      tol=10 * tol)
            if kind == "softmax" and with_open_clip:
                try:
                    from open_clip.loss import ClipLoss
                except ImportError:
                    continue
                oc = [X[rows].clone().requires_grad_(), Y[rows].clone().requires_grad_(),
                      torch.tensor(7.0, dtype=torch.float64, requires_grad=True)]
                try:
                    want = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(*oc)
                    want_grads = torch.autograd.grad(want, oc)
                except RuntimeError as e:  # gloo without all_to_all (open_clip's gather backward needs it)
                    failures.append(f"SKIP open_clip: {e}")
                    continue
                loss_nb = contrastive_loss(*oc, kind=kind, group=group, backend=backend)
                grads_nb = torch.autograd.grad(loss_nb, oc)
                close(f"open_clip per-rank loss ({backend})", loss_nb, want)
                close(f"open_clip grad image ({backend})", grads_nb[0], want_grads[0])
                close(f"open_clip grad text ({backend})", grads_nb[1], want_grads[1])
    # Ranks that pass different d: every rank raises, naming the argument.
    d_bad = d + 1 if rank == world - 1 else d
    try:
        contrastive_loss(torch.randn(n, d_bad), torch.randn(n, d_bad), 1.0, group=group)
        failures.append(f"rank {rank}: mismatched d raised nothing")
    except ValueError as e:
        if "image_features" not in str(e) or "every rank" not in str(e):
            failures.append(f"rank {rank}: mismatched d: unexpected message {e}")
    dist.destroy_process_group()
    write_results_and_exit(os.path.join(out_dir, f"rank{rank}.json"), failures)

"""The per-process body of tests/test_patch_open_clip.py's distributed test (a light module: every spawned process
imports it). Each rank writes its failed checks and the number of checks it made to out_dir/rank<r>.json."""
import os

import torch
from _dist_exit import write_results_and_exit


def worker(rank, world, init_file, out_dir, n, d):
    import torch.distributed as dist
    from open_clip.loss import ClipLoss, SigLipLoss

    import pyvl

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    failures, checked = [], 0
    g = torch.Generator().manual_seed(321)
    X = torch.nn.functional.normalize(torch.randn(world * n, d, generator=g, dtype=torch.float64), dim=-1)
    Y = torch.nn.functional.normalize(torch.randn(world * n, d, generator=g, dtype=torch.float64), dim=-1)
    rows = slice(rank * n, (rank + 1) * n)

    def leaves():
        return [X[rows].clone().requires_grad_(), Y[rows].clone().requires_grad_(),
                torch.tensor(9.0, dtype=torch.float64, requires_grad=True),
                torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)]

    def close(name, got, want, tol=1e-10):
        nonlocal checked
        checked += 1
        err = float((got.detach() - want.detach()).abs().max())
        if not err <= tol * max(1.0, float(want.detach().abs().max())):
            failures.append(f"rank {rank}: {name}: max error {err:.3e}")

    settings = [("ClipLoss", dict(local_loss=False, gather_with_grad=True), True),
                ("ClipLoss", dict(local_loss=False, gather_with_grad=False), True),
                # pyvl combines the column log-sum-exps over ranks: the scale / bias gradients match once summed.
                ("ClipLoss", dict(local_loss=True, gather_with_grad=True), False)]
    settings += [("SigLipLoss", dict(dist_impl=impl), True) for impl in ("bidir", "shift", "reduce", "gather")]
    for cls_name, kw, scalars_per_rank in settings:
        cls = ClipLoss if cls_name == "ClipLoss" else SigLipLoss
        label = f"{cls_name}({kw})"
        a, b = leaves(), leaves()
        try:
            want = cls(rank=rank, world_size=world, **kw)(*b)
            want_grads = torch.autograd.grad(want, b, allow_unused=True)
        except RuntimeError as e:
            failures.append(f"rank {rank}: unpatched open_clip {label} failed under gloo: {e}")
            continue
        got = pyvl.patch(cls(rank=rank, world_size=world, **kw))(*a, output_dict=True)["contrastive_loss"]
        got_grads = torch.autograd.grad(got, a, allow_unused=True)
        close(f"{label} loss", got, want)
        for i, name in enumerate(("image grad", "text grad", "logit_scale grad", "logit_bias grad")):
            gg = torch.zeros_like(a[i]) if got_grads[i] is None else got_grads[i].detach().clone()
            wg = torch.zeros_like(a[i]) if want_grads[i] is None else want_grads[i].detach().clone()
            if i >= 2 and not scalars_per_rank:
                dist.all_reduce(gg)
                dist.all_reduce(wg)
                name += " summed over ranks"
            close(f"{label} {name}", gg, wg, tol=1e-9)
    # A rank / world_size that disagrees with the process group is refused on the call.
    try:
        pyvl.patch(SigLipLoss(rank=(rank + 1) % world, world_size=world))(*leaves())
        failures.append(f"rank {rank}: a wrong rank raised nothing")
    except ValueError as e:
        if "default group" not in str(e):
            failures.append(f"rank {rank}: wrong rank: unexpected message {e}")
    dist.destroy_process_group()
    write_results_and_exit(os.path.join(out_dir, f"rank{rank}.json"), {"failures": failures, "checked": checked})

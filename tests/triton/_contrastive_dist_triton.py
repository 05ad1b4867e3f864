"""Per-process body of test_contrastive_triton.py's distributed test: backend="triton" over gloo (the kernels in the
interpreter, float32) against the single-process float64 reference over the global batch. Each rank writes its
failed checks to out_dir/rank<r>.json."""
import json
import os

import torch


def worker(rank, world, init_file, out_dir, n, d):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.distributed as dist

    from pyvl.ops import contrastive_loss
    from pyvl.reference import contrastive as ref

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    failures = []
    gen = torch.Generator().manual_seed(7)
    X = torch.nn.functional.normalize(torch.randn(world * n, d, generator=gen, dtype=torch.float64), dim=1)
    Y = torch.nn.functional.normalize(torch.randn(world * n, d, generator=gen, dtype=torch.float64), dim=1)
    rows = slice(rank * n, (rank + 1) * n)
    for kind in ("softmax", "sigmoid"):
        full = [X.clone().requires_grad_(), Y.clone().requires_grad_(),
                torch.tensor(7.0, dtype=torch.float64, requires_grad=True),
                torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)]
        single = ref.contrastive_loss(*full, kind)
        g_single = torch.autograd.grad(single, full)
        local = [X[rows].float().requires_grad_(), Y[rows].float().requires_grad_(),
                 torch.tensor(7.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)]
        loss = contrastive_loss(*local, kind=kind, group=dist.group.WORLD, backend="triton")
        grads = torch.autograd.grad(loss, local)
        total = loss.detach().double().clone()
        dist.all_reduce(total)
        checks = [("mean loss over ranks", total / world, single),
                  ("grad image rows", grads[0].double() / world, g_single[0][rows]),
                  ("grad text rows", grads[1].double() / world, g_single[1][rows])]
        for i, name in ((2, "logit_scale"), (3, "logit_bias")):
            summed = grads[i].detach().double().clone()
            dist.all_reduce(summed)
            checks.append((f"grad {name} summed over ranks", summed / world, g_single[i]))
        for name, got, want in checks:
            err = float((got - want.detach()).abs().max())
            if not err <= 2e-5 * max(1.0, float(want.detach().abs().max())):
                failures.append(f"rank {rank}: {kind} {name}: max error {err:.3e}")
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(failures, f)

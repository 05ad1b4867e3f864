"""`pyvl bench` cases of the message-passing family (Pre-training GNNs; imported by pyvl.bench).

  gather_scatter_add   GIN's aggregation out_i = sum over bonds (j -> i) of (h_j + e_ji) on batches of
      molecule-like graphs (ZINC-like sizes: 12-34 atoms, trees with 6-rings, ~2.2 directed edges per atom) at
      d = 300 (the paper's emb_dim): pyvl's op against index_select + add + index_add_ (what the reference and
      torch_geometric's "add" aggregation do) and torch_geometric's MessagePassing.propagate with message
      x_j + edge_attr (pretrain-gnns' GINConv without its MLP) where installed. Forward, and forward + backward
      (gradients of h and of the edge embeddings).
  gin_pretrain_step    One attribute-masking pre-training step (forward, backward, Adam) of the paper's GIN
      (5 layers, emb_dim 300, BatchNorm, masked-atom head): pyvl's default backend against the same model with
      every aggregation on index_add_ (plain PyTorch).

The graphs are synthetic (no rdkit needed): `molecule_batch` draws them with a seeded generator.
"""
from __future__ import annotations

import torch

GNN_OPS = ("gather_scatter_add", "gin_pretrain_step")
GNN_MODEL_OPS = ("gin_pretrain_step",)

# (molecules, d) per size set.
AGG_SIZES = {"quick": [(256, 300)], "full": [(64, 300), (256, 300), (1024, 300)], "tiny": [(8, 16)]}
STEP_SIZES = {"quick": [(64, 300)], "full": [(256, 300)], "tiny": [(4, 16)]}


def molecule_batch(num_molecules: int, seed: int = 0):
    """(x [n, 2], edge_index [2, E], edge_attr [E, 2], batch [n]) of random molecule-like graphs: each molecule a
    random tree over 12-34 atoms (each atom bonded to one of the three before it) with a 6-ring closed every sixth
    atom; both directions of each bond; atom types weighted towards C, N, O like drug-like molecules."""
    g = torch.Generator().manual_seed(seed)
    xs, edges, attrs, batch = [], [], [], []
    start = 0
    elements = torch.tensor([5, 6, 7, 8, 15, 16])  # C, N, O, F, S, Cl (atomic number - 1)
    weights = torch.tensor([0.72, 0.12, 0.11, 0.02, 0.02, 0.01])
    for m in range(num_molecules):
        n = int(torch.randint(12, 35, (1,), generator=g))
        atoms = elements[torch.multinomial(weights, n, replacement=True, generator=g)]
        xs.append(torch.stack([atoms, torch.zeros(n, dtype=torch.long)], 1))
        bonds = []
        for i in range(1, n):
            bonds.append((i - 1 - int(torch.randint(min(i, 3), (1,), generator=g)), i))
            if i % 6 == 5:
                bonds.append((i - 5, i))
        b = torch.tensor(bonds, dtype=torch.long)
        types = torch.randint(4, (b.shape[0],), generator=g)
        e = torch.stack([torch.cat([b[:, 0], b[:, 1]]), torch.cat([b[:, 1], b[:, 0]])]) + start
        edges.append(e)
        attrs.append(torch.stack([types.repeat(2), torch.zeros(2 * b.shape[0], dtype=torch.long)], 1))
        batch.append(torch.full((n,), m, dtype=torch.long))
        start += n
    return torch.cat(xs), torch.cat(edges, 1), torch.cat(attrs), torch.cat(batch)


def torch_geometric_edge_sum():
    """torch_geometric's MessagePassing(aggr="add") with message x_j + edge_attr (pretrain-gnns' GINConv without
    its self-loops and MLP), or None where torch_geometric is not installed. Also tier 1's peer."""
    try:
        from torch_geometric.nn import MessagePassing
    except ImportError:
        return None

    class EdgeSum(MessagePassing):
        def __init__(self):
            super().__init__(aggr="add")

        def forward(self, x, edge_index, edge_attr):
            return self.propagate(edge_index, x=x, edge_attr=edge_attr)

        def message(self, x_j, edge_attr):
            return x_j + edge_attr

    return EdgeSum()


def _aggregation_case(num_molecules, d, backward):
    def build(device, dtype, backend):
        import pyvl
        from pyvl.bench import Built, _chosen_backend
        from pyvl.reference import message_passing as ref

        _, edge_index, _, batch = molecule_batch(num_molecules)
        n, E = batch.shape[0], edge_index.shape[1]
        g = torch.Generator().manual_seed(1)
        h = torch.randn(n, d, generator=g).to(device, dtype)
        e = torch.randn(E, d, generator=g).to(device, dtype)
        edge_index = edge_index.to(device)
        chosen = _chosen_backend("gather_scatter_add", backend, h)
        if backward:
            h.requires_grad_(True)
            e.requires_grad_(True)
        grad = torch.randn(n, d, generator=g).to(device, dtype)

        def wrap(fn):
            if not backward:
                def forward():
                    with torch.no_grad():
                        return fn()
                return forward
            return lambda: torch.autograd.grad(fn(), (h, e), grad)

        peers = {"torch index_add_": wrap(lambda: ref.gather_scatter_add(h, edge_index, e))}
        skipped = {}
        conv = torch_geometric_edge_sum()
        if conv is None:
            skipped["torch_geometric propagate"] = "torch_geometric is not installed"
        else:
            peers["torch_geometric propagate"] = wrap(lambda: conv(h, edge_index, e))
        ours = wrap(lambda: pyvl.ops.gather_scatter_add(h, edge_index, e, backend=backend))
        # A perfect kernel reads h and the edge rows once and writes the output once (and the same for gradients).
        nbytes = (2 * n + E) * d * h.element_size() * (2 if backward else 1)
        return Built(ours, peers, nbytes, chosen, skipped)

    return build


def _step_case(num_molecules, d):
    def build(device, dtype, backend):
        from pyvl.bench import Built, _chosen_backend
        from pyvl.graph.pretrain import MASK_ATOM_TYPE, num_masked_atoms
        from pyvl.models.pretrain_gnn import GNN, AttributeMasking

        x, edge_index, edge_attr, batch = molecule_batch(num_molecules)
        # The official masking: int(n * 0.15 + 1) atoms per molecule.
        g = torch.Generator().manual_seed(2)
        counts = torch.bincount(batch)
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
        masked = torch.cat([ptr[i] + torch.randperm(int(c), generator=g)[:num_masked_atoms(int(c), 0.15)]
                            for i, c in enumerate(counts)])
        label = x[masked].clone()
        x = x.clone()
        x[masked] = torch.tensor([MASK_ATOM_TYPE, 0])

        class Batch:
            pass

        b = Batch()
        b.x, b.edge_index, b.edge_attr = x.to(device), edge_index.to(device), edge_attr.to(device)
        b.masked_atom_indices, b.mask_node_label = masked.to(device), label.to(device)
        chosen = _chosen_backend("gather_scatter_add", backend,
                                 torch.empty(0, device=device, dtype=dtype))

        def make(model_backend):
            torch.manual_seed(0)
            task = AttributeMasking(GNN(5, d, backend=model_backend)).to(device, dtype)
            opt = torch.optim.Adam(task.parameters(), lr=1e-3)

            def step():
                loss, _ = task(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss

            return step

        return Built(make(backend), {"torch index_add_": make("reference")}, None, chosen)

    return build


def gnn_cases(sizes: str, device, ops):
    from pyvl.bench import Case

    out = []
    if "gather_scatter_add" in ops:
        for mols, d in AGG_SIZES[sizes]:
            _, edge_index, _, batch = molecule_batch(mols)
            shape = f"{mols} mols N{batch.shape[0]} E{edge_index.shape[1]} d{d}"
            for backward in (False, True):
                out.append(Case("gather_scatter_add", "fwd+bwd" if backward else "fwd", shape, mols, 1,
                                _aggregation_case(mols, d, backward),
                                {"molecules": mols, "nodes": batch.shape[0], "edges": edge_index.shape[1], "d": d}))
    if "gin_pretrain_step" in ops:
        for mols, d in STEP_SIZES[sizes]:
            out.append(Case("gin_pretrain_step", "masking", f"{mols} mols GIN 5x{d} Adam", mols, 1,
                            _step_case(mols, d), {"molecules": mols, "layers": 5, "emb_dim": d}))
    return out


def _interleaved(num_molecules: int = 256, d: int = 300, repeats: int = 15) -> None:
    """The figures behind _CPU_ORDER["gather_scatter_add"]: pyvl's C++ kernel, index_add_ and torch_geometric taking
    turns (the order reversed every repeat) in one process; medians of wall time and of this thread's CPU time
    (the latter is the stable figure on a shared machine at OMP_NUM_THREADS=1)."""
    import statistics
    import time

    import pyvl
    from pyvl.reference import message_passing as ref

    _, edge_index, _, batch = molecule_batch(num_molecules)
    n, E = batch.shape[0], edge_index.shape[1]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    e = torch.randn(E, d, generator=g, requires_grad=True)
    grad = torch.randn(n, d, generator=g)
    impls = {"pyvl cpu": lambda: pyvl.ops.gather_scatter_add(h, edge_index, e, backend="cpu"),
             "torch index_add_": lambda: ref.gather_scatter_add(h, edge_index, e)}
    conv = torch_geometric_edge_sum()
    if conv is not None:
        impls["torch_geometric"] = lambda: conv(h, edge_index, e)
    print(f"{num_molecules} molecules: N {n}, E {E}, d {d}, {torch.get_num_threads()} threads")
    for mode in ("fwd", "fwd+bwd"):
        def call(fn):
            if mode == "fwd":
                with torch.no_grad():
                    return fn()
            return torch.autograd.grad(fn(), (h, e), grad)

        times = {k: ([], []) for k in impls}
        for fn in impls.values():
            call(fn)
        for r in range(repeats):
            for k in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
                t0, c0 = time.perf_counter(), time.thread_time()
                call(impls[k])
                times[k][0].append(time.perf_counter() - t0)
                times[k][1].append(time.thread_time() - c0)
        wall0, cpu0 = (statistics.median(v) for v in times["pyvl cpu"])
        for k, (wall, cpu) in times.items():
            w, c = statistics.median(wall), statistics.median(cpu)
            print(f"  {mode:8s} {k:17s} wall {w * 1e3:8.2f} ms ({w / wall0:5.2f}x pyvl)   "
                  f"thread CPU {c * 1e3:8.2f} ms ({c / cpu0:5.2f}x pyvl)")


if __name__ == "__main__":  # OMP_NUM_THREADS=1 python -m pyvl._bench_gnn [molecules d repeats]
    import sys

    _interleaved(*(int(a) for a in sys.argv[1:4]))

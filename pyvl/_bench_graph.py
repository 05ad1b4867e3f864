"""`pyvl bench` cases of the Graphormer family (imported by pyvl.bench).

  shortest_paths    all-pairs distances and the path matrix of a padded batch of molecule-like graphs (random trees
      of degree <= 4 with a few ring closures, the sparsity of real molecules): pyvl's op against the plain
      PyTorch Floyd-Warshall (pyvl.reference, the official algorithm vectorized), the same in NumPy, SciPy's
      csgraph BFS (distances and predecessors, one call per graph) and networkx (distances only, one call per
      graph) where installed. 256 graphs of 10-45 nodes (a Graphormer batch of molecules) and 4 of 150-250
      (proteins-sized) in the quick set; the PyTorch Floyd-Warshall only up to 64 padded nodes (it takes tens of
      seconds per call beyond, on 2 cores).
  graphormer_step   one training step (forward, MSE loss, backward to every parameter) of Graphormer on a padded
      batch of such graphs, the model's attention on pyvl.ops.sequential_attention against the same model and
      weights on plain PyTorch attention softmax(q k^T * scale + bias) v. Dropout off (the fused op has no attention
      dropout). Graphormer-Slim (12 layers, 80 wide, 8 heads) on 8 graphs in the quick set.
"""
from __future__ import annotations

import random

import torch

GRAPH_OPS = ("shortest_paths", "graphormer_step")
GRAPH_MODEL_OPS = ("graphormer_step",)

# (graphs, fewest nodes, most nodes)
SP_SIZES = {
    "quick": [(256, 10, 45), (4, 150, 250)],
    "full": [(256, 10, 45), (1024, 10, 45), (16, 150, 250), (4, 400, 500)],
    "tiny": [(4, 3, 12)],
}
TORCH_FW_MAX_N = 64
# (graphs, fewest nodes, most nodes, model config)
_SLIM = dict(num_hidden_layers=12, embedding_dim=80, ffn_embedding_dim=80, num_attention_heads=8)
STEP_SIZES = {
    "quick": [(8, 10, 45, "slim")],
    "full": [(64, 10, 45, "slim"), (256, 10, 45, "slim"), (32, 10, 45, "base")],
    "tiny": [(3, 3, 9, "tiny")],
}
CONFIGS = {"slim": _SLIM, "base": dict(num_hidden_layers=12, embedding_dim=768, ffn_embedding_dim=768,
                                       num_attention_heads=32),
           "tiny": dict(num_hidden_layers=1, embedding_dim=16, ffn_embedding_dim=16, num_attention_heads=2)}


def molecule_like_edges(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Undirected edges of a random tree on n nodes with degree <= 4 plus about n / 8 ring closures."""
    degree = [0] * n
    edges = set()
    for v in range(1, n):
        u = rng.choice([u for u in range(v) if degree[u] < 4] or [v - 1])
        edges.add((u, v))
        degree[u] += 1
        degree[v] += 1
    for _ in range(n // 8):
        u, v = rng.randrange(n), rng.randrange(n)
        if u != v and degree[u] < 4 and degree[v] < 4 and (min(u, v), max(u, v)) not in edges:
            edges.add((min(u, v), max(u, v)))
            degree[u] += 1
            degree[v] += 1
    return sorted(edges)


def molecule_like_batch(B: int, n_min: int, n_max: int, seed: int = 0):
    """(padded bool adjacency [B, N, N], node counts, edge lists) of B molecule-like graphs."""
    rng = random.Random(seed)
    sizes = [rng.randint(n_min, n_max) for _ in range(B)]
    edges = [molecule_like_edges(n, rng) for n in sizes]
    adj = torch.zeros(B, max(sizes), max(sizes), dtype=torch.bool)
    for b, es in enumerate(edges):
        if es:
            e = torch.tensor(es).T
            adj[b, e[0], e[1]] = adj[b, e[1], e[0]] = True
    return adj, sizes, edges


def numpy_floyd_warshall(adj):
    """Graphormer's algos.pyx floyd_warshall vectorized over the batch and (i, j) in NumPy: (dist, path)."""
    import numpy as np

    a = adj.numpy()
    B, N, _ = a.shape
    dist = np.where(a, 1, 510).astype(np.int64)
    dist[:, np.arange(N), np.arange(N)] = 0
    path = np.full((B, N, N), -1, dtype=np.int64)
    for k in range(N):
        through = dist[:, :, k:k + 1] + dist[:, k:k + 1, :]
        better = through < dist
        np.minimum(dist, through, out=dist)
        path[better] = k
    path[dist >= 510] = 510
    return dist, path


def _sp_case(B, n_min, n_max):
    def build(device, dtype, backend):
        import pyvl
        from pyvl.bench import Built, _chosen_backend
        from pyvl.reference.shortest_paths import shortest_paths as torch_fw

        adj, sizes, edges = molecule_like_batch(B, n_min, n_max)
        adj = adj.to(device)
        chosen = _chosen_backend("shortest_paths", backend, adj)
        peers, skipped = {}, {}
        if adj.shape[1] <= TORCH_FW_MAX_N:
            peers["torch Floyd-Warshall"] = lambda: torch_fw(adj)
        else:
            skipped["torch Floyd-Warshall"] = f"only up to {TORCH_FW_MAX_N} nodes (seconds per call beyond)"
        if adj.device.type == "cpu":
            peers["numpy Floyd-Warshall"] = lambda: numpy_floyd_warshall(adj)
        try:
            import numpy as np
            from scipy.sparse import csr_matrix
            from scipy.sparse.csgraph import shortest_path

            mats = [csr_matrix((np.ones(2 * len(es)), (np.array([u for u, v in es] + [v for u, v in es], dtype=int),
                                                       np.array([v for u, v in es] + [u for u, v in es], dtype=int))),
                               shape=(n, n)) for n, es in zip(sizes, edges)]
            peers["scipy csgraph BFS"] = lambda: [shortest_path(m, method="D", unweighted=True,
                                                                return_predecessors=True) for m in mats]
        except ImportError:
            skipped["scipy csgraph BFS"] = "scipy is not installed"
        try:
            import networkx as nx

            nx_graphs = []
            for n, es in zip(sizes, edges):
                G = nx.Graph()
                G.add_nodes_from(range(n))
                G.add_edges_from(es)
                nx_graphs.append(G)
            peers["networkx (lengths only)"] = lambda: [dict(nx.all_pairs_shortest_path_length(G))
                                                        for G in nx_graphs]
        except ImportError:
            skipped["networkx (lengths only)"] = "networkx is not installed"

        def ours():
            return pyvl.ops.shortest_paths(adj, backend=backend)

        N = adj.shape[1]
        return Built(ours, peers, B * N * N * (1 + 8 + 8), chosen, skipped)

    return build


def _random_molecules(B, n_min, n_max, seed=0):
    """OGB-style graphs (9 atom and 3 bond feature columns, small integer values) on molecule-like topologies."""
    adj, sizes, edges = molecule_like_batch(B, n_min, n_max, seed)
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for n, es in zip(sizes, edges):
        e = torch.tensor(es, dtype=torch.int64).reshape(-1, 2).T
        feat = torch.randint(0, 4, (e.shape[1], 3), generator=g)
        graphs.append({"node_feat": torch.randint(0, 10, (n, 9), generator=g),
                       "edge_index": torch.cat([e, e.flip(0)], dim=1), "edge_feat": torch.cat([feat, feat])})
    return graphs


def _step_case(B, n_min, n_max, config):
    def build(device, dtype, backend):
        from pyvl.bench import Built, _chosen_backend, _pyvl_backend_env
        from pyvl.graph import graphormer_batch
        from pyvl.models.graphormer import Graphormer

        batch = graphormer_batch(_random_molecules(B, n_min, n_max)).to(device)
        y = torch.randn(B, 1, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        models = {}
        for attention in ("pyvl", "eager"):
            torch.manual_seed(0)  # the same weights in both
            models[attention] = Graphormer(**CONFIGS[config], dropout=0.0, attention_dropout=0.0,
                                           activation_dropout=0.0, attention=attention).to(device, dtype).train()
        chosen = _chosen_backend("sequential_attention", backend, y)

        def step(model):
            loss = torch.nn.functional.mse_loss(model(batch), y)
            return torch.autograd.grad(loss, [p for p in model.parameters()])

        def ours():
            with _pyvl_backend_env(backend):
                return step(models["pyvl"])

        return Built(ours, {"torch eager attention": lambda: step(models["eager"])}, None, chosen)

    return build


def graph_cases(sizes: str, device, ops):
    from pyvl.bench import Case

    out = []
    if "shortest_paths" in ops:
        for B, lo, hi in SP_SIZES[sizes]:
            out.append(Case("shortest_paths", "padded", f"B{B} nodes {lo}-{hi}", B, 1, _sp_case(B, lo, hi),
                            {"graphs": B, "nodes": [lo, hi], "graph": "random tree, degree <= 4, n/8 ring closures"}))
    if "graphormer_step" in ops:
        for B, lo, hi, config in STEP_SIZES[sizes]:
            out.append(Case("graphormer_step", "padded", f"{config} B{B} nodes {lo}-{hi} fwd+bwd", B, 1,
                            _step_case(B, lo, hi, config), {"graphs": B, "nodes": [lo, hi], "config": config,
                                                            **CONFIGS[config]}))
    return out

"""All-pairs shortest paths of a batch of unweighted graphs, with the path matrix that recovers one shortest path
per pair: Graphormer's spatial encoding (the distances) and its multi-hop edge encoding (the edges along the path).

Public ops:
  shortest_paths(adj)                       -> (dist, path), int64 [B, N, N]
  shortest_path_nodes(dist, path, max_hops) -> the nodes along each pair's path, int64 [B, N, N, max_hops + 1]

Backends of shortest_paths (pyvl._backend.choose):
  reference  pyvl.reference.shortest_paths: Floyd-Warshall in PyTorch, O(B N^3), any device
  cpu        torch.ops.pyvl.shortest_paths: one BFS per source in C++ (csrc/cpu/shortest_paths.cpp), O(B N E),
             OpenMP over (graph, source)
Both return identical matrices (the tie-breaking below). The outputs are integers: there is no gradient and no
autograd registration; the compiled op has a fake kernel, so it runs under torch.compile(fullgraph=True).
"""
from __future__ import annotations

import torch

from .. import _backend, _ext  # noqa: F401  (_ext registers the C++ schemas)
from ..reference import shortest_paths as ref

__all__ = ["UNREACHABLE", "shortest_path_nodes", "shortest_paths"]

UNREACHABLE = ref.UNREACHABLE  # 510, the sentinel of Graphormer's algos.pyx


def _fake(adj):
    B, N, _ = adj.shape
    return adj.new_empty((B, N, N), dtype=torch.int64), adj.new_empty((B, N, N), dtype=torch.int64)


if _ext.LOAD_ERROR is None:
    torch.library.register_fake("pyvl::shortest_paths")(_fake)


def _check_adj(adj) -> None:
    if not isinstance(adj, torch.Tensor):
        raise TypeError(f"adj must be a torch.Tensor, got {type(adj).__name__}")
    if adj.dtype != torch.bool:
        raise TypeError(f"adj must be a bool tensor (True where an edge i -> j exists), got {adj.dtype}")
    if adj.dim() not in (2, 3) or adj.shape[-1] != adj.shape[-2]:
        raise ValueError(f"adj must have shape [N, N] or [B, N, N] (square), got {tuple(adj.shape)}")


def shortest_paths(adj: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs shortest paths (hop counts) of a batch of unweighted graphs.

    Args:
        adj: bool [B, N, N] (or [N, N] for one graph), True at [b, i, j] for an edge i -> j (give both directions
            for an undirected graph). Graphs of different sizes are padded to a common N with isolated nodes
            (all False rows and columns), which change nothing for the real nodes; pyvl.graph builds this tensor
            from edge lists. Any strides; N up to a few hundred (the output is dense).
        backend: None (PYVL_BACKEND, else the fastest that runs: "cpu" on the CPU), "reference" or "cpu".

    Returns:
        (dist, path), int64 tensors of adj's shape, exactly Graphormer's algos.pyx floyd_warshall per graph:
        dist[b, i, j]: hops from i to j; 0 on the diagonal; UNREACHABLE (510) when j cannot be reached from i in
            fewer than 510 hops (padding nodes are unreachable from and to everything but themselves).
        path[b, i, j]: -1 when i == j or j is one hop from i; UNREACHABLE when unreachable; else an intermediate
            node k of the chosen shortest path, which is path(i, k) + [k] + path(k, j) recursively
            (pyvl.reference.shortest_paths.path_nodes spells the recursion; shortest_path_nodes expands all pairs
            at once).

    Tie-breaking between equal-length paths (the multi-hop edge features depend on it), the same in every
    backend and in the official code: Floyd-Warshall with strict improvement keeps, for each pair, the shortest
    path whose largest intermediate node index is the smallest, recursively on both halves. Those paths are
    closed under prefixes and suffixes, so they form one shortest-path tree per source.

    No gradient: the outputs are integer tensors.
    """
    _check_adj(adj)
    one = adj.dim() == 2
    a = adj[None] if one else adj
    chosen = _backend.choose("shortest_paths", backend, a)
    if chosen == "reference":
        dist, path = ref.shortest_paths(a)
    else:
        dist, path = torch.ops.pyvl.shortest_paths.default(a)
    return (dist[0], path[0]) if one else (dist, path)


def shortest_path_nodes(dist: torch.Tensor, path: torch.Tensor, max_hops: int) -> torch.Tensor:
    """The first max_hops + 1 nodes of the shortest path from i to j that (dist, path) of shortest_paths encode.

    Returns int64 [B, N, N, max_hops + 1] (or [N, N, max_hops + 1]): nodes[b, i, j, t] is the node t hops from i on
    the path to j (t = 0 is i, t = dist is j), -1 for t > dist[b, i, j] and for unreachable pairs. The edges of the
    path are (nodes[..., t], nodes[..., t + 1]) where both are >= 0. Pure PyTorch on any device: the path matrix
    gives each pair's first hop (succ(i, j) = j for a direct edge, else succ(i, path[i, j])), and because the
    chosen paths are suffix-closed the walk continues with succ(node, j); O(N^2) work per hop.
    """
    if not isinstance(dist, torch.Tensor) or not isinstance(path, torch.Tensor):
        raise TypeError("dist and path must be the tensors shortest_paths returns")
    if dist.dtype != torch.int64 or path.dtype != torch.int64:
        raise TypeError(f"dist and path must be int64 as shortest_paths returns them, got {dist.dtype}, {path.dtype}")
    if dist.shape != path.shape or dist.dim() not in (2, 3) or dist.shape[-1] != dist.shape[-2]:
        raise ValueError(f"dist and path must have one shape [N, N] or [B, N, N], got {tuple(dist.shape)} and "
                         f"{tuple(path.shape)}")
    if isinstance(max_hops, bool) or not isinstance(max_hops, int) or max_hops < 0:
        raise ValueError(f"max_hops must be an int >= 0, got {max_hops!r}")
    one = dist.dim() == 2
    if one:
        dist, path = dist[None], path[None]
    B, N, _ = dist.shape
    ar = torch.arange(N, device=dist.device)
    col = ar.view(1, 1, N).expand(B, N, N)
    eye = (ar.view(N, 1) == ar.view(1, N)).expand(B, N, N)
    reachable = dist < UNREACHABLE
    # succ[b, i, j]: the node after i on the path to j; i on the diagonal, so a walk that reached j stays there.
    succ = torch.where(eye, ar.view(1, N, 1).expand(B, N, N), torch.where((path == -1) & reachable, col, -1))
    pending = reachable & (path >= 0)
    via = path.clamp(0, max(N - 1, 0))
    for _ in range(N):  # each round settles every pair whose left half is settled: <= max distance rounds
        if not bool(pending.any()):
            break
        first = torch.gather(succ, 2, via)  # succ[b, i, path[b, i, j]]
        settle = pending & (first >= 0)
        succ = torch.where(settle, first, succ)
        pending &= ~settle
    nodes = [torch.where(reachable, ar.view(1, N, 1).expand(B, N, N), -1)]
    cur = nodes[0].clamp(min=0)
    for t in range(1, max_hops + 1):
        cur = torch.gather(succ, 1, cur).clamp(min=0)  # succ[b, cur[b, i, j], j]
        nodes.append(torch.where(reachable & (dist >= t), cur, -1))
    out = torch.stack(nodes, dim=-1)
    return out[0] if one else out

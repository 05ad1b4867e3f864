"""Pure-PyTorch reference for all-pairs shortest paths: Graphormer's Floyd-Warshall, batched.

The ground truth for the tests and the `reference` backend of pyvl.ops.shortest_paths; it takes an
already-validated bool adjacency [B, N, N] (the op checks it). It follows microsoft/Graphormer
graphormer/data/algos.pyx `floyd_warshall` step for step, vectorized over the batch and over (i, j):
edges weigh 1, the diagonal is 0, non-edges start at the sentinel 510 (UNREACHABLE), a pair improves only on a
strictly shorter path through k, and `path[i][j]` keeps the last k that improved it (-1: never, i.e. i == j or a
direct edge). Distances still >= 510 at the end are unreachable: dist and path both 510.

O(B N^3) work in N steps of [B, N, N] tensor ops; the C++ backend's BFS gives the same matrices in O(N E).
"""
from __future__ import annotations

import torch

UNREACHABLE = 510


def shortest_paths(adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dist, path), both int64 [B, N, N], of the bool adjacency adj [B, N, N] (edge i -> j where adj[b, i, j])."""
    B, N, _ = adj.shape
    eye = torch.eye(N, dtype=torch.bool, device=adj.device)
    dist = torch.full((B, N, N), UNREACHABLE, dtype=torch.int64, device=adj.device)
    dist = dist.masked_fill(adj, 1).masked_fill(eye, 0)
    path = torch.full_like(dist, -1)
    for k in range(N):
        # Row k and column k do not change in step k (dist[k, k] = 0), so this out-of-place step equals the
        # official in-place loop.
        through_k = dist[:, :, k:k + 1] + dist[:, k:k + 1, :]
        better = dist > through_k
        dist = torch.minimum(dist, through_k)
        path.masked_fill_(better, k)
    unreachable = dist >= UNREACHABLE
    return dist.masked_fill(unreachable, UNREACHABLE), path.masked_fill(unreachable, UNREACHABLE)


def path_nodes(path, i: int, j: int) -> list[int]:
    """The nodes of the shortest path from i to j that `path` (one graph's [N, N] path matrix) encodes, i and j
    included, by algos.pyx's recursion: path(i, k) + [k] + path(k, j). [] when j is unreachable from i."""
    k = int(path[i][j])
    if k == UNREACHABLE:
        return []
    if i == j:
        return [i]

    def inner(a, b):
        m = int(path[a][b])
        return [] if m == -1 else inner(a, m) + [m] + inner(m, b)

    return [i] + inner(i, j) + [j]

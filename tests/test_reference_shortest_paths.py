"""Tier 1: the shortest-paths reference (batched Floyd-Warshall in PyTorch) against the official algorithm written
out as Python loops, and against networkx."""
import random

import pytest
import torch

from pyvl.reference.shortest_paths import UNREACHABLE, path_nodes, shortest_paths

from _molecules import loop_floyd_warshall


def _random_adj(rng, B, N, p, directed):
    adj = torch.rand(B, N, N, generator=rng) < p
    return adj if directed else adj | adj.transpose(1, 2)


@pytest.mark.parametrize("directed", [False, True])
@pytest.mark.parametrize("N,p", [(1, 0.5), (7, 0.3), (13, 0.15), (24, 0.08), (30, 0.3)])
def test_matches_loop_floyd_warshall(N, p, directed):
    rng = torch.Generator().manual_seed(N)
    adj = _random_adj(rng, 3, N, p, directed)
    adj[0, 0, 0] = True  # a self-loop changes nothing
    dist, path = shortest_paths(adj)
    assert dist.dtype == path.dtype == torch.int64
    for b in range(3):
        M, P = loop_floyd_warshall(adj[b].tolist())
        assert dist[b].tolist() == M
        assert path[b].tolist() == P


def test_lengths_match_networkx():
    nx = pytest.importorskip("networkx")
    rng = random.Random(0)
    for trial in range(20):
        n = rng.randint(1, 35)
        directed = trial % 2 == 1
        g = nx.gnp_random_graph(n, rng.uniform(0.02, 0.3), seed=trial, directed=directed)
        adj = torch.zeros(1, n, n, dtype=torch.bool)
        for u, v in g.edges:
            adj[0, u, v] = True
            if not directed:
                adj[0, v, u] = True
        dist, path = shortest_paths(adj)
        lengths = dict(nx.all_pairs_shortest_path_length(g))
        for i in range(n):
            for j in range(n):
                want = lengths[i].get(j, UNREACHABLE)
                assert int(dist[0, i, j]) == want
                nodes = path_nodes(path[0], i, j)
                if want == UNREACHABLE:
                    assert nodes == [] and int(path[0, i, j]) == UNREACHABLE
                else:  # one valid shortest path: right ends, right length, every step an edge
                    assert nodes[0] == i and nodes[-1] == j and len(nodes) == want + 1
                    assert all(adj[0, a, b] for a, b in zip(nodes, nodes[1:]))


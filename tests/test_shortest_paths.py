"""Tier 2: pyvl.ops.shortest_paths (the C++ BFS against the Floyd-Warshall reference: same distances, same path
matrix), the path expansion shortest_path_nodes, real molecules against networkx, the op contract (opcheck,
torch.compile, argument errors, backend choice)."""
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyvl
from pyvl.ops import shortest_path_nodes, shortest_paths
from pyvl.ops.shortest_paths import UNREACHABLE
from pyvl.reference import shortest_paths as ref

from _molecules import SMILES

LAYOUTS = ("contiguous", "transposed", "sliced")


@dataclass
class GraphProblem:
    """A batch of random graphs padded to one size: B graphs of n[b] <= N real nodes, edge probability p."""

    B: int
    N: int
    n: tuple
    p: float
    directed: bool
    layout: str
    seed: int

    def make_adj(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        adj = torch.rand(self.B, self.N, self.N, generator=g) < self.p
        if not self.directed:
            adj = adj | adj.transpose(1, 2)
        real = torch.arange(self.N)[None, :] < torch.tensor(self.n)[:, None]
        adj &= real[:, :, None] & real[:, None, :]  # padding nodes are isolated
        if self.layout == "transposed":  # the same graphs with non-unit inner strides
            return adj.transpose(1, 2).contiguous().transpose(1, 2)
        if self.layout == "sliced":
            big = torch.zeros(self.B, self.N + 3, 2 * self.N + 1, dtype=torch.bool)
            big[:, 1:self.N + 1, 1:2 * self.N + 1:2] = adj
            return big[:, 1:self.N + 1, 1:2 * self.N + 1:2]
        return adj


@st.composite
def graph_problems(draw, max_n=40):
    B = draw(st.integers(1, 4))
    N = draw(st.integers(1, max_n))
    n = tuple(draw(st.integers(1, N)) for _ in range(B))
    return GraphProblem(B, N, n, draw(st.sampled_from((0.02, 0.06, 0.15, 0.4))), draw(st.booleans()),
                        draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 2**16)))


def _adj_of(edges, n):
    adj = torch.zeros(n, n, dtype=torch.bool)
    for u, v in edges:
        adj[u, v] = adj[v, u] = True
    return adj


@given(graph_problems())
def test_cpu_equals_reference(problem):
    adj = problem.make_adj()
    dist, path = shortest_paths(adj, backend="cpu")
    want_dist, want_path = ref.shortest_paths(adj)
    assert dist.dtype == path.dtype == torch.int64 and dist.shape == adj.shape
    assert torch.equal(dist, want_dist)
    assert torch.equal(path, want_path)
    # Padding nodes reach only themselves.
    for b, nb in enumerate(problem.n):
        pad = dist[b, nb:, :]
        assert bool((pad[:, :nb] == UNREACHABLE).all())


@pytest.mark.parametrize("B,N", [(40, 30), (2, 140)])
def test_cpu_threaded_schedules_equal_reference(B, N):
    # Past 2^15 output entries the kernel runs threaded: whole graphs per thread when there are many, sources per
    # thread when there are few.
    problem = GraphProblem(B, N, tuple(range(N - B + 1, N + 1)) if B < N else (N,) * B, 0.04, False, "contiguous",
                           B * N)
    adj = problem.make_adj()
    got, want = shortest_paths(adj, backend="cpu"), ref.shortest_paths(adj)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@given(graph_problems(max_n=25), st.integers(0, 7))
def test_path_nodes_follow_the_path_matrix(problem, max_hops):
    adj = problem.make_adj()
    dist, path = shortest_paths(adj)
    nodes = shortest_path_nodes(dist, path, max_hops)
    assert nodes.shape == (problem.B, problem.N, problem.N, max_hops + 1)
    for b in range(problem.B):
        for i in range(problem.N):
            for j in range(problem.N):
                full = ref.path_nodes(path[b], i, j)
                want = (full + [-1] * (max_hops + 1))[: max_hops + 1]
                assert nodes[b, i, j].tolist() == want
                assert all(adj[b, u, v] for u, v in zip(full, full[1:]))
                assert len(full) == (0 if dist[b, i, j] == UNREACHABLE else int(dist[b, i, j]) + 1)


def test_tie_breaking_is_the_official_one():
    # A 6-cycle 0-1-2-3-4-5-0: from 0 to 3 there are two shortest paths, 0-1-2-3 and 0-5-4-3. Floyd-Warshall keeps
    # the one whose largest intermediate node is smallest: 0-1-2-3 (max 2 < max 5).
    adj = _adj_of([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0)], 6)
    for backend in ("cpu", "reference"):
        dist, path = shortest_paths(adj, backend=backend)
        assert int(dist[0, 3]) == 3 and ref.path_nodes(path, 0, 3) == [0, 1, 2, 3]
        assert ref.path_nodes(path, 3, 0) == [3, 2, 1, 0]
    # Relabelled so the other side has the small labels: 0-5-4-3 becomes the choice.
    adj = _adj_of([(0, 4), (4, 5), (5, 3), (3, 2), (2, 1), (1, 0)], 6)
    dist, path = shortest_paths(adj, backend="cpu")
    assert ref.path_nodes(path, 0, 3) == [0, 1, 2, 3]
    # Ties below a shared node (0-9-{1,2}-3): both paths pass 9, the choice between 1 and 2 is made under it.
    adj = _adj_of([(0, 9), (9, 1), (9, 2), (1, 3), (2, 3)], 10)
    for backend in ("cpu", "reference"):
        _, path = shortest_paths(adj, backend=backend)
        assert ref.path_nodes(path, 0, 3) == [0, 9, 1, 3]


def test_long_chain_is_cut_at_the_sentinel():
    # A 515-node path: pairs 510 or more hops apart are "unreachable", as in the official code.
    n = 515
    idx = torch.arange(n - 1)
    adj = torch.zeros(n, n, dtype=torch.bool)
    adj[idx, idx + 1] = adj[idx + 1, idx] = True
    dist, path = shortest_paths(adj, backend="cpu")
    hops = (torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)).abs()
    assert torch.equal(dist, hops.masked_fill(hops >= UNREACHABLE, UNREACHABLE))
    assert int(path[0, 510]) == UNREACHABLE and int(path[0, 509]) == 508


def test_molecules_match_networkx():
    nx = pytest.importorskip("networkx")
    pytest.importorskip("ogb")
    from pyvl.graph import padded_adjacency, smiles_to_graph

    graphs = [smiles_to_graph(s) for s in SMILES]
    adj = padded_adjacency([g["edge_index"] for g in graphs], [g["num_nodes"] for g in graphs])
    dist, path = shortest_paths(adj)
    assert torch.equal((dist, path)[0], ref.shortest_paths(adj)[0])
    nodes = shortest_path_nodes(dist, path, adj.shape[1])
    for b, g in enumerate(graphs):
        n = g["num_nodes"]
        G = nx.Graph()
        G.add_nodes_from(range(n))
        G.add_edges_from(g["edge_index"].T.tolist())
        lengths = dict(nx.all_pairs_shortest_path_length(G))
        want = torch.tensor([[lengths[i].get(j, UNREACHABLE) for j in range(n)] for i in range(n)])
        assert torch.equal(dist[b, :n, :n], want), SMILES[b]
        for i in range(n):
            for j in range(n):
                seq = [u for u in nodes[b, i, j].tolist() if u >= 0]
                if want[i, j] == UNREACHABLE:
                    assert seq == []
                else:
                    assert len(seq) == want[i, j] + 1 and seq[0] == i and seq[-1] == j
                    assert all(G.has_edge(u, v) for u, v in zip(seq, seq[1:]))


def test_single_graph_and_empty_batch():
    adj = _adj_of([(0, 1), (1, 2)], 3)
    dist, path = shortest_paths(adj)
    assert dist.tolist() == [[0, 1, 2], [1, 0, 1], [2, 1, 0]] and path.tolist() == [[-1, -1, 1], [-1, -1, -1],
                                                                                       [1, -1, -1]]
    for backend in ("cpu", "reference"):
        d, p = shortest_paths(torch.zeros(0, 5, 5, dtype=torch.bool), backend=backend)
        assert d.shape == p.shape == (0, 5, 5)
        d, p = shortest_paths(torch.zeros(2, 0, 0, dtype=torch.bool), backend=backend)
        assert d.shape == (2, 0, 0)
    assert shortest_path_nodes(dist, path, 2)[0, 2].tolist() == [0, 1, 2]


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    adj = torch.rand(3, 9, 9, generator=g) < 0.3
    torch.library.opcheck(torch.ops.pyvl.shortest_paths.default, (adj,))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_fullgraph(backend):
    g = torch.Generator().manual_seed(1)
    adj = torch.rand(2, 7, 7, generator=g) < 0.3
    adj = adj | adj.transpose(1, 2)

    def fn(a):
        dist, path = shortest_paths(a, backend=backend)
        return dist.float().mean(), path

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(adj), fn(adj)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_argument_errors():
    adj = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="adj must be a bool tensor"):
        shortest_paths(adj.long())
    with pytest.raises(TypeError, match="adj must be a torch.Tensor"):
        shortest_paths([[True]])
    with pytest.raises(ValueError, match=r"adj must have shape \[N, N\] or \[B, N, N\]"):
        shortest_paths(torch.zeros(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="adj must have shape"):
        shortest_paths(torch.zeros(1, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="backend .triton. cannot run"):
        shortest_paths(adj, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        shortest_paths(adj, backend="gpu")
    dist, path = shortest_paths(adj)
    with pytest.raises(ValueError, match="max_hops must be an int >= 0"):
        shortest_path_nodes(dist, path, -1)
    with pytest.raises(TypeError, match="int64"):
        shortest_path_nodes(dist.int(), path, 2)
    with pytest.raises(ValueError, match="one shape"):
        shortest_path_nodes(dist, path[:, :3, :3], 2)


def test_default_backend_is_the_cpu_kernel():
    x = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert pyvl._backend.choose("shortest_paths", None, x) == "cpu"
    assert "shortest_paths" in pyvl._backend.OPS

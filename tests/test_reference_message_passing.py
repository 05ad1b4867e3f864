"""Tier 1: pyvl.reference.message_passing against float64 sums written edge by edge, and against torch_geometric's
MessagePassing(aggr="add") with message x_j + edge_attr (pretrain-gnns' GINConv before its MLP) where installed."""
import pytest
import torch

from pyvl.reference import message_passing as ref


def _loop(x, edge_index, edge_attr, num_nodes):
    out = [[0.0] * x.shape[1] for _ in range(num_nodes)]
    for e, (j, i) in enumerate(edge_index.T.tolist()):
        for k in range(x.shape[1]):
            out[i][k] += float(x[j, k]) + (float(edge_attr[e, k]) if edge_attr is not None else 0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(num_nodes, x.shape[1])


def _graph(N, E, d, seed, num_nodes=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    edge_index = torch.stack([torch.randint(N, (E,), generator=g),
                              torch.randint(num_nodes or N, (E,), generator=g)])
    edge_attr = torch.randn(E, d, generator=g, dtype=torch.float64)
    return x, edge_index, edge_attr


@pytest.mark.parametrize("N,E,d,num_nodes", [(7, 15, 3, None), (5, 0, 4, None), (6, 4, 2, 9), (1, 3, 5, None)])
@pytest.mark.parametrize("with_edge", [True, False])
def test_reference_matches_loop(N, E, d, num_nodes, with_edge):
    x, edge_index, edge_attr = _graph(N, E, d, seed=N + E, num_nodes=num_nodes)
    edge_attr = edge_attr if with_edge else None
    want = _loop(x, edge_index, edge_attr, num_nodes or N)
    torch.testing.assert_close(ref.gather_scatter_add(x, edge_index, edge_attr, num_nodes), want, rtol=0, atol=1e-12)


def test_reference_matches_torch_geometric_propagate():
    pytest.importorskip("torch_geometric")
    from pyvl._bench_gnn import torch_geometric_edge_sum

    x, edge_index, edge_attr = _graph(30, 80, 6, seed=3)
    torch.testing.assert_close(ref.gather_scatter_add(x, edge_index, edge_attr),
                               torch_geometric_edge_sum()(x, edge_index, edge_attr))

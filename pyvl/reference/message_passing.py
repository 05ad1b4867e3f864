"""Pure-PyTorch reference for message passing by gather + add + scatter-sum (GIN with edge features).

It materializes the [E, d] messages x[src] + edge_attr and sums them into their destinations with index_add_, as
torch_geometric's MessagePassing(aggr="add") does; pyvl's kernel computes the same sums without the messages.
"""
from __future__ import annotations

import torch


def gather_scatter_add(x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor | None = None,
                       num_nodes: int | None = None) -> torch.Tensor:
    """out[i] = sum over edges e with edge_index[1, e] == i of (x[edge_index[0, e]] + edge_attr[e]).

    x [N, d]; edge_index int64 [2, E] (row 0 the source j, row 1 the destination i, torch_geometric's
    "source_to_target" flow); edge_attr [E, d] or None; out [num_nodes (default N), d].
    """
    src, dst = edge_index[0], edge_index[1]
    messages = x.index_select(0, src)
    if edge_attr is not None:
        messages = messages + edge_attr
    rows = x.shape[0] if num_nodes is None else num_nodes
    return x.new_zeros((rows, x.shape[1])).index_add_(0, dst, messages)

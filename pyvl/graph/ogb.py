"""Molecules as OGB graphs, and Graphormer's input built from them.

`smiles_to_graph` runs OGB's featurization (`ogb.utils.smiles2graph`: 9 integer atom features and 3 bond features
per directed edge, both directions listed). ogb and rdkit are needed only there and are imported lazily: pyvl
itself imports without them.

`graphormer_batch` turns a list of such graphs into one padded batch the way microsoft/Graphormer does
(graphormer/data/wrapper.py `preprocess_item` per graph, then graphormer/data/collator.py `collator`), with the
shortest paths of the whole batch computed by one call of pyvl.ops.shortest_paths and every per-pair tensor
built by tensor ops instead of Python loops. The values are the official ones:

  x              [B, N, 9]        atom features + 1 + 512 * column (convert_to_single_emb: one embedding table for
                                  all columns), + 1 for the padding shift; 0 = padding
  in_degree      [B, N]           in-degree + 1 (adj summed over sources, as the official code); 0 = padding
  out_degree     [B, N]           out-degree + 1; the official code copies in_degree, the same for undirected graphs
  spatial_pos    [B, N, N]        shortest-path distance + 1 (unreachable: 510 + 1); 0 = padding
  attn_edge_type [B, N, N, 3]     bond features + 1 + 512 * column, + 1, at (i, j) for each edge i -> j; else 0
  edge_input     [B, N, N, D, 3]  attn_edge_type of the h-th edge along the chosen shortest path from i to j
                                  (pyvl.ops.shortest_paths' tie-breaking = the official Floyd-Warshall's), + 1;
                                  0 past the path's end, for unreachable pairs and for padding.
                                  D = min(multi_hop_max_dist, the largest distance in the batch, 510 when a
                                  graph is disconnected), as the official collator sizes it
  attn_bias      [B, N+1, N+1]    float32, index 0 is the virtual graph token: 0, except -inf at node pairs whose
                                  distance is >= spatial_pos_max and, per the official padding, -inf in every
                                  column of a padding node (padding rows keep 0 for the real columns)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

OFFSET = 512  # per-column offset of convert_to_single_emb; the embedding tables are 512 * columns + 1 long


def smiles_to_graph(smiles: str) -> dict:
    """OGB's molecular graph of a SMILES string: {"node_feat": int64 [N, 9], "edge_index": int64 [2, E],
    "edge_feat": int64 [E, 3], "num_nodes": N} as torch tensors (E counts both directions of each bond)."""
    if not isinstance(smiles, str):
        raise TypeError(f"smiles must be a str, got {type(smiles).__name__}")
    try:
        from ogb.utils import smiles2graph
    except ImportError as e:
        raise ImportError("pyvl.graph.smiles_to_graph needs ogb and rdkit (pip install ogb rdkit); "
                          f"importing them failed: {e}") from e
    try:
        g = smiles2graph(smiles)
    except Exception as e:  # rdkit returns None for an unparsable SMILES and smiles2graph then fails on it
        raise ValueError(f"smiles {smiles!r} is not a molecule rdkit can parse ({type(e).__name__}: {e})") from e
    return {"node_feat": torch.as_tensor(g["node_feat"], dtype=torch.int64),
            "edge_index": torch.as_tensor(g["edge_index"], dtype=torch.int64),  # [2, 0] without bonds
            "edge_feat": torch.as_tensor(g["edge_feat"], dtype=torch.int64),  # [0, 3] without bonds
            "num_nodes": int(g["num_nodes"])}


def convert_to_single_emb(x: torch.Tensor, offset: int = OFFSET) -> torch.Tensor:
    """x + 1 + offset * column for integer features x [..., F] (or [...] for one column), as Graphormer's
    wrapper.py does, so that all columns index one embedding table with 0 free for padding."""
    if x.dim() == 1:
        return x + 1
    return x + 1 + offset * torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)


@dataclass
class GraphormerBatch:
    """A padded batch of graphs in Graphormer's input convention (see the module docstring for the values)."""

    x: torch.Tensor
    in_degree: torch.Tensor
    out_degree: torch.Tensor
    spatial_pos: torch.Tensor
    attn_edge_type: torch.Tensor
    edge_input: torch.Tensor
    attn_bias: torch.Tensor
    num_nodes: torch.Tensor  # int64 [B], the real node count of each graph

    def to(self, device) -> "GraphormerBatch":
        return GraphormerBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def hf_inputs(self) -> dict:
        """The keyword arguments of HuggingFace's GraphormerModel / GraphormerForGraphClassification."""
        return {"input_nodes": self.x, "input_edges": self.edge_input, "attn_bias": self.attn_bias,
                "in_degree": self.in_degree, "out_degree": self.out_degree, "spatial_pos": self.spatial_pos,
                "attn_edge_type": self.attn_edge_type}


def _graph_parts(g, index: int):
    """(node_feat [n, F], edge_index [2, E], edge_feat [E, Fe]) of an OGB-style dict or a PyG-style object."""
    if isinstance(g, Mapping):
        try:
            x, ei, ea = g["node_feat"], g["edge_index"], g["edge_feat"]
        except KeyError as e:
            raise ValueError(f"graphs[{index}] must have the keys node_feat, edge_index and edge_feat "
                             f"(as smiles_to_graph gives), missing {e}") from None
    elif all(hasattr(g, a) for a in ("x", "edge_index", "edge_attr")):
        x, ei, ea = g.x, g.edge_index, g.edge_attr
    else:
        raise TypeError(f"graphs[{index}] must be a dict like smiles_to_graph's or have x, edge_index and "
                        f"edge_attr (a torch_geometric Data), got {type(g).__name__}")
    x, ei, ea = (torch.as_tensor(t) for t in (x, ei, ea))
    if x.dim() == 1:
        x = x[:, None]
    if ea.dim() == 1:
        ea = ea[:, None]
    for name, t in (("node features", x), ("edge_index", ei), ("edge features", ea)):
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"graphs[{index}]: {name} must be integer, got {t.dtype}")
    n = x.shape[0]
    if n < 1:
        raise ValueError(f"graphs[{index}] has no nodes")
    if ei.dim() != 2 or ei.shape[0] != 2:
        raise ValueError(f"graphs[{index}]: edge_index must have shape [2, E], got {tuple(ei.shape)}")
    if ea.shape[0] != ei.shape[1]:
        raise ValueError(f"graphs[{index}]: {ei.shape[1]} edges but {ea.shape[0]} rows of edge features")
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= n):
        raise ValueError(f"graphs[{index}]: edge_index must hold node indices in [0, {n}), got "
                         f"[{int(ei.min())}, {int(ei.max())}]")
    return x.long(), ei.long(), ea.long()


def padded_adjacency(edge_indices: Sequence[torch.Tensor], num_nodes: Sequence[int]) -> torch.Tensor:
    """bool [B, max(num_nodes), max(num_nodes)] with adj[b, i, j] = True for each column (i, j) of
    edge_indices[b]; the input of pyvl.ops.shortest_paths for graphs given as edge lists."""
    if len(edge_indices) != len(num_nodes) or not len(num_nodes):
        raise ValueError("edge_indices and num_nodes must be non-empty and of one length")
    N = max(int(n) for n in num_nodes)
    adj = torch.zeros(len(num_nodes), N, N, dtype=torch.bool)
    for b, ei in enumerate(edge_indices):
        ei = torch.as_tensor(ei, dtype=torch.int64)
        adj[b, ei[0], ei[1]] = True
    return adj


def graphormer_batch(graphs: Sequence, *, multi_hop_max_dist: int = 5, spatial_pos_max: int = 1024,
                     backend: str | None = None) -> GraphormerBatch:
    """Graphormer's padded input for a list of graphs (dicts as smiles_to_graph returns, or objects with x,
    edge_index and edge_attr such as torch_geometric Data).

    multi_hop_max_dist: the hops of edge_input kept per pair (official task default 5; the collator's own default
        is 20). spatial_pos_max: pairs at distance >= this get -inf attention bias (official task default 1024,
        which masks nothing; unreachable pairs are at 510). backend: for pyvl.ops.shortest_paths.
    """
    if isinstance(graphs, (Mapping, str)) or not isinstance(graphs, Sequence) or not len(graphs):
        raise TypeError("graphs must be a non-empty list of graphs (dicts like smiles_to_graph's, or Data objects)")
    for name, v in (("multi_hop_max_dist", multi_hop_max_dist), ("spatial_pos_max", spatial_pos_max)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    from ..ops.shortest_paths import shortest_path_nodes, shortest_paths

    parts = [_graph_parts(g, i) for i, g in enumerate(graphs)]
    F = parts[0][0].shape[1]
    Fe = max(p[2].shape[1] for p in parts)
    for i, (x, _, ea) in enumerate(parts):
        if x.shape[1] != F:
            raise ValueError(f"graphs[{i}] has {x.shape[1]} node feature columns, graphs[0] has {F}")
        if ea.shape[0] and ea.shape[1] != Fe:
            raise ValueError(f"graphs[{i}] has {ea.shape[1]} edge feature columns, others have {Fe}")
    B = len(parts)
    n = torch.tensor([p[0].shape[0] for p in parts])
    N = int(n.max())
    adj = padded_adjacency([p[1] for p in parts], n.tolist())
    x = torch.zeros(B, N, F, dtype=torch.int64)
    attn_edge_type = torch.zeros(B, N, N, Fe, dtype=torch.int64)
    for b, (xb, ei, ea) in enumerate(parts):
        x[b, : xb.shape[0]] = convert_to_single_emb(xb) + 1
        if ea.shape[0]:
            attn_edge_type[b, ei[0], ei[1]] = convert_to_single_emb(ea) + 1

    dist, path = shortest_paths(adj, backend=backend)
    real = torch.arange(N)[None, :] < n[:, None]  # [B, N]
    pair = real[:, :, None] & real[:, None, :]
    spatial_pos = torch.where(pair, dist + 1, 0)
    in_degree = torch.where(real, adj.sum(1) + 1, 0)
    out_degree = torch.where(real, adj.sum(2) + 1, 0)

    # The official edge_input of a graph has amax(dist) hops (510 for a disconnected graph), cut to
    # multi_hop_max_dist; the collator pads to the batch's largest.
    longest = int(torch.where(pair, dist, 0).amax())
    D = min(multi_hop_max_dist, longest)
    nodes = shortest_path_nodes(dist, path, D)  # [B, N, N, D + 1]
    u, v = nodes[..., :-1], nodes[..., 1:]
    on_path = (u >= 0) & (v >= 0)  # [B, N, N, D]
    bidx = torch.arange(B).view(B, 1, 1, 1)
    edge_input = attn_edge_type[bidx, u.clamp(min=0), v.clamp(min=0)] + 1  # [B, N, N, D, Fe]
    edge_input = edge_input.masked_fill(~on_path[..., None], 0)

    attn_bias = torch.zeros(B, N + 1, N + 1)
    far = pair & (dist >= spatial_pos_max)
    attn_bias[:, 1:, 1:].masked_fill_(far, float("-inf"))
    pad_col = torch.arange(N + 1)[None, :] > n[:, None]  # [B, N + 1]; column 0 is the graph token
    attn_bias.masked_fill_(pad_col[:, None, :], float("-inf"))
    return GraphormerBatch(x=x, in_degree=in_degree, out_degree=out_degree, spatial_pos=spatial_pos,
                           attn_edge_type=attn_edge_type, edge_input=edge_input, attn_bias=attn_bias, num_nodes=n)

"""Pre-training GNNs (Hu et al., "Strategies for Pre-training Graph Neural Networks", ICLR 2020).

GIN with edge features as in the official code (snap-stanford/pretrain-gnns chem/model.py), its graph-level head,
and the pre-training objectives of chem/pretrain_masking.py, pretrain_contextpred.py, pretrain_supervised.py and
finetune.py. Parameter names follow the official modules, so its state_dicts load as they are.

Message passing runs on pyvl.ops.gather_scatter_add: out_i = sum over bonds (j -> i) of (h_j + e_ji), plus the
self-loop term h_i + e_self with e_self = edge_embedding1[4] + edge_embedding2[0]. The official code appends N
self-loop edges (bond type 4, direction 0) and lets index_add_ add them after every bond; adding h_i + e_self to
the kernel's result is the same sum in the same order, without N more edges.

Where the official code and pyvl differ: JK = "sum" sums the layer outputs (the official line indexes the sum with
[0] and so returns only the first node's row, a bug).
Inputs are pyvl.graph.pretrain's GraphBatch (x [n, 2], edge_index [2, E], edge_attr [E, 2], batch [n]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..graph.pretrain import (MASK_ATOM_TYPE, NUM_ATOM_TYPE, NUM_BOND_DIRECTION, NUM_BOND_TYPE, NUM_CHIRALITY_TAG,
                              SELF_LOOP_BOND_TYPE)

JK_MODES = ("last", "concat", "max", "sum")
POOLINGS = ("mean", "sum", "max")

__all__ = ["GINConv", "GNN", "GNNGraphPred", "AttributeMasking", "ContextPrediction", "cycle_index",
           "masked_bce_loss", "roc_auc", "mean_roc_auc", "global_pool"]


def global_pool(h: torch.Tensor, batch: torch.Tensor, num_graphs: int, mode: str = "mean") -> torch.Tensor:
    """Per-graph sum, mean or max of node rows h [n, d] by graph index batch [n] -> [num_graphs, d]."""
    if mode not in POOLINGS:
        raise ValueError(f"mode must be one of {POOLINGS}, got {mode!r}")
    if mode == "max":
        index = batch.unsqueeze(1).expand_as(h)
        return h.new_full((num_graphs, h.shape[1]), float("-inf")).scatter_reduce(0, index, h, "amax")
    out = h.new_zeros((num_graphs, h.shape[1])).index_add_(0, batch, h)
    if mode == "mean":
        count = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(h.dtype)
        out = out / count.unsqueeze(1)
    return out


class GINConv(nn.Module):
    """GIN layer with edge features: mlp(sum over (j -> i) and the self loop of (h_j + e_ji)), mlp d -> 2d -> d."""

    def __init__(self, emb_dim: int, backend: str | None = None):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(emb_dim, 2 * emb_dim), nn.ReLU(), nn.Linear(2 * emb_dim, emb_dim))
        self.edge_embedding1 = nn.Embedding(NUM_BOND_TYPE, emb_dim)
        self.edge_embedding2 = nn.Embedding(NUM_BOND_DIRECTION, emb_dim)
        nn.init.xavier_uniform_(self.edge_embedding1.weight)
        nn.init.xavier_uniform_(self.edge_embedding2.weight)
        self.backend = backend

    def forward(self, x, edge_index, edge_attr):
        edge_emb = self.edge_embedding1(edge_attr[:, 0]) + self.edge_embedding2(edge_attr[:, 1])
        self_emb = self.edge_embedding1.weight[SELF_LOOP_BOND_TYPE] + self.edge_embedding2.weight[0]
        aggr = ops.gather_scatter_add(x, edge_index, edge_emb, x.shape[0], backend=self.backend)
        return self.mlp(aggr + (x + self_emb))


class GNN(nn.Module):
    """The official GNN (gnn_type "gin"): atom embeddings, num_layer GIN layers each followed by BatchNorm, ReLU
    (not after the last layer) and dropout; node representations combined across layers by JK."""

    def __init__(self, num_layer: int = 5, emb_dim: int = 300, JK: str = "last", drop_ratio: float = 0.0,
                 backend: str | None = None):
        super().__init__()
        if isinstance(num_layer, bool) or not isinstance(num_layer, int) or num_layer < 1:
            raise ValueError(f"num_layer must be an int >= 1, got {num_layer!r}")
        if JK not in JK_MODES:
            raise ValueError(f"JK must be one of {JK_MODES}, got {JK!r}")
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must lie in [0, 1), got {drop_ratio}")
        self.num_layer, self.emb_dim, self.JK, self.drop_ratio = num_layer, emb_dim, JK, drop_ratio
        self.x_embedding1 = nn.Embedding(NUM_ATOM_TYPE, emb_dim)
        self.x_embedding2 = nn.Embedding(NUM_CHIRALITY_TAG, emb_dim)
        nn.init.xavier_uniform_(self.x_embedding1.weight)
        nn.init.xavier_uniform_(self.x_embedding2.weight)
        self.gnns = nn.ModuleList(GINConv(emb_dim, backend) for _ in range(num_layer))
        self.batch_norms = nn.ModuleList(nn.BatchNorm1d(emb_dim) for _ in range(num_layer))

    @property
    def out_dim(self) -> int:
        return (self.num_layer + 1) * self.emb_dim if self.JK == "concat" else self.emb_dim

    def set_backend(self, backend: str | None) -> GNN:
        for conv in self.gnns:
            conv.backend = backend
        return self

    def forward(self, x, edge_index, edge_attr):
        h = self.x_embedding1(x[:, 0]) + self.x_embedding2(x[:, 1])
        h_list = [h]
        for layer in range(self.num_layer):
            h = self.batch_norms[layer](self.gnns[layer](h_list[layer], edge_index, edge_attr))
            if layer < self.num_layer - 1:
                h = F.relu(h)
            h_list.append(F.dropout(h, self.drop_ratio, training=self.training))
        if self.JK == "concat":
            return torch.cat(h_list, 1)
        if self.JK == "last":
            return h_list[-1]
        stacked = torch.stack(h_list, 0)
        return stacked.max(0).values if self.JK == "max" else stacked.sum(0)


class GNNGraphPred(nn.Module):
    """GNN_graphpred: GNN, graph pooling (mean by default) and a linear head to num_tasks logits."""

    def __init__(self, num_layer: int = 5, emb_dim: int = 300, num_tasks: int = 1, JK: str = "last",
                 drop_ratio: float = 0.0, graph_pooling: str = "mean", backend: str | None = None):
        super().__init__()
        if graph_pooling not in POOLINGS:
            raise ValueError(f"graph_pooling must be one of {POOLINGS}, got {graph_pooling!r}")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        self.gnn = GNN(num_layer, emb_dim, JK, drop_ratio, backend)
        self.graph_pooling, self.num_tasks = graph_pooling, num_tasks
        self.graph_pred_linear = nn.Linear(self.gnn.out_dim, num_tasks)

    def from_pretrained(self, state_dict_or_path) -> GNNGraphPred:
        """Fine-tuning start (finetune.py): load pre-trained GNN weights (a state_dict of GNN, or a path that
        torch.load reads, such as the official model_gin/*.pth) into self.gnn; the head stays as initialized."""
        state = state_dict_or_path
        if not isinstance(state, dict):
            state = torch.load(state, map_location="cpu", weights_only=True)
        self.gnn.load_state_dict(state)
        return self

    def forward(self, batch):
        h = self.gnn(batch.x, batch.edge_index, batch.edge_attr)
        return self.graph_pred_linear(global_pool(h, batch.batch, batch.num_graphs, self.graph_pooling))


# ----------------------------------------------------------------------------------------------------------------
# Pre-training objectives


class AttributeMasking(nn.Module):
    """Attribute masking (pretrain_masking.py): a linear head on the masked atoms' representations predicts their
    atom type (119 classes) with cross-entropy; `gnn` sees the masked input (atom type 119, chirality 0). With
    mask_edge (batches from mask_atoms(..., mask_edge=True)), a second head on h_u + h_v of each masked bond predicts
    its bond type (4 classes), and the two cross-entropies add."""

    def __init__(self, gnn: GNN, mask_edge: bool = False):
        super().__init__()
        self.gnn = gnn
        self.mask_edge = mask_edge
        self.linear_pred_atoms = nn.Linear(gnn.out_dim, MASK_ATOM_TYPE)
        self.linear_pred_bonds = nn.Linear(gnn.out_dim, 4) if mask_edge else None

    def forward(self, batch):
        """(loss, accuracy) for a batch from pyvl.graph.pretrain.collate_masked."""
        if batch.masked_atom_indices is None:
            raise ValueError("batch must come from collate_masked (it has no masked_atom_indices)")
        h = self.gnn(batch.x, batch.edge_index, batch.edge_attr)
        logits = self.linear_pred_atoms(h[batch.masked_atom_indices])
        target = batch.mask_node_label[:, 0]
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.argmax(1) == target).float().mean()
        if self.mask_edge:
            if batch.connected_edge_indices is None:
                raise ValueError("mask_edge needs a batch of mask_atoms(..., mask_edge=True) graphs")
            if batch.connected_edge_indices.numel():
                u, v = batch.edge_index[:, batch.connected_edge_indices]
                loss = loss + F.cross_entropy(self.linear_pred_bonds(h[u] + h[v]), batch.mask_edge_label[:, 0])
        return loss, accuracy


def cycle_index(num: int, shift: int) -> torch.Tensor:
    """The official negative sampler's permutation: i -> (i + shift) mod num."""
    return (torch.arange(num) + shift) % num


class ContextPrediction(nn.Module):
    """Context prediction, CBOW mode (pretrain_contextpred.py): the main GNN (K layers) embeds the substructure's
    centre; the context GNN (r2 - r1 layers) embeds the context graph and its anchor nodes are pooled (mean) per
    pair; positives pair each centre with its own context, neg_samples negatives pair it with the contexts shifted
    by 1..neg_samples in the batch (cycle_index); loss = BCE(pos, 1) + neg_samples * BCE(neg, 0) on the dot
    products."""

    def __init__(self, gnn: GNN, context_gnn: GNN, neg_samples: int = 1, context_pooling: str = "mean"):
        super().__init__()
        if context_pooling not in POOLINGS:
            raise ValueError(f"context_pooling must be one of {POOLINGS}, got {context_pooling!r}")
        if isinstance(neg_samples, bool) or not isinstance(neg_samples, int) or neg_samples < 1:
            raise ValueError(f"neg_samples must be an int >= 1, got {neg_samples!r}")
        self.gnn, self.context_gnn = gnn, context_gnn
        self.neg_samples, self.context_pooling = neg_samples, context_pooling

    def forward(self, batch):
        """(loss, balanced accuracy) for a batch from pyvl.graph.pretrain.collate_context."""
        sub, ctx = batch.substruct, batch.context
        substruct_rep = self.gnn(sub.x, sub.edge_index, sub.edge_attr)[batch.center_substruct_idx]
        anchors = self.context_gnn(ctx.x, ctx.edge_index, ctx.edge_attr)[batch.overlap_context_substruct_idx]
        context_rep = global_pool(anchors, batch.batch_overlapped_context, substruct_rep.shape[0],
                                  self.context_pooling)
        G = context_rep.shape[0]
        neg_rep = torch.cat([context_rep[cycle_index(G, i + 1).to(context_rep.device)]
                             for i in range(self.neg_samples)], 0)
        pred_pos = (substruct_rep * context_rep).sum(1)
        pred_neg = (substruct_rep.repeat(self.neg_samples, 1) * neg_rep).sum(1)
        loss_pos = F.binary_cross_entropy_with_logits(pred_pos.double(), torch.ones_like(pred_pos, dtype=torch.double))
        loss_neg = F.binary_cross_entropy_with_logits(pred_neg.double(), torch.zeros_like(pred_neg,
                                                                                          dtype=torch.double))
        accuracy = 0.5 * ((pred_pos > 0).float().mean() + (pred_neg < 0).float().mean())
        return loss_pos + self.neg_samples * loss_neg, accuracy


def masked_bce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-task BCE with missing labels (pretrain_supervised.py, finetune.py): y in {-1, 0, 1}, 0 = missing;
    BCE-with-logits on (y + 1) / 2 averaged over the present labels (y^2 > 0). In float64, as the official code."""
    if logits.shape != y.shape:
        raise ValueError(f"logits and y must have the same shape, got {tuple(logits.shape)} and {tuple(y.shape)}")
    y = y.to(torch.float64)
    is_valid = y * y > 0
    loss = F.binary_cross_entropy_with_logits(logits.double(), (y + 1) / 2, reduction="none")
    loss = torch.where(is_valid, loss, torch.zeros_like(loss))
    return loss.sum() / is_valid.sum().clamp_min(1)


def roc_auc(y_true: torch.Tensor, y_score: torch.Tensor) -> float:
    """Area under the ROC curve of scores for binary labels y_true in {0, 1} (ties count one half, as
    sklearn.metrics.roc_auc_score): the Mann-Whitney U statistic over average ranks."""
    y_true = torch.as_tensor(y_true).reshape(-1)
    y_score = torch.as_tensor(y_score, dtype=torch.float64).reshape(-1)
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true and y_score must have the same length, got {y_true.numel()} and {y_score.numel()}")
    pos = y_true == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both classes in y_true")
    order = torch.argsort(y_score)
    sorted_scores = y_score[order]
    ranks = torch.empty_like(sorted_scores)
    # Average rank (1-based) of each group of tied scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2
    ranks[order] = average[inverse]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def mean_roc_auc(y: torch.Tensor, scores: torch.Tensor) -> float:
    """finetune.py's eval: ROC-AUC of each task that has both a positive (1) and a negative (-1) label, on its
    present labels (y != 0), averaged over those tasks."""
    if y.shape != scores.shape or y.dim() != 2:
        raise ValueError(f"y and scores must both be [graphs, tasks], got {tuple(y.shape)} and {tuple(scores.shape)}")
    values = []
    for t in range(y.shape[1]):
        col = y[:, t]
        if (col == 1).any() and (col == -1).any():
            valid = col != 0
            values.append(roc_auc((col[valid] + 1) // 2, scores[valid, t]))
    if not values:
        raise ValueError("no task has both a positive and a negative label")
    return sum(values) / len(values)

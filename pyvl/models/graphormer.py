"""Graphormer on pyvl.ops.sequential_attention, with a learned attention bias and its gradient.

Paper: Chengxuan Ying, Tianle Cai, Shengjie Luo, Shuxin Zheng, Guolin Ke, Di He, Yanming Shen, Tie-Yan Liu,
"Do Transformers Really Perform Bad for Graph Representation?", NeurIPS 2021, arXiv:2106.05234.
Official code: microsoft/Graphormer (v1: graphormer/model.py; v2: graphormer/modules/graphormer_layers.py,
graphormer_graph_encoder.py, models/graphormer.py); HuggingFace port: transformers 4.x models/graphormer
(checked against 4.40.2; later releases moved it to models/deprecated/graphormer).

Input: pyvl.graph.graphormer_batch (OGB molecules, the official collator's padded tensors). The model:
- node features: the sum of the embeddings of the 9 offset atom features (one table, padding row 0) plus the
  centrality encoding (in- and out-degree embeddings), and a learned virtual graph token in front;
- attention bias [B, heads, N+1, N+1], computed once per forward and shared by all layers: the collator's
  attn_bias (0 / -inf), the spatial encoding (an embedding of the shortest-path distance per head), the edge
  encoding and the virtual token's learned distance (graph_token_virtual_distance) on the token's row and column;
  edge_type="multi_hop": the edge features along the shortest path embedded per hop (mean over the 3 features),
  multiplied by a per-hop [heads, heads] matrix (edge_dis_encoder), summed over the hops and divided by the path
  length, both cut at multi_hop_max_dist; any other edge_type: the mean embedding of the edge features of (i, j);
- transformer layers (pre-LN by default, the v1 code's choice; pre_layernorm=False is post-LN, v2 / HF's
  default); attention is softmax(q k^T / sqrt(d) + bias) v through pyvl.ops.sequential_attention;
- graph representation: the virtual token's final state; head as the v2 code and HF: LayerNorm(act(Linear)),
  then Linear(embedding_dim, num_classes, bias=False) + a learned scalar bias.

Where pyvl departs from the official code, on purpose:
- pre_layernorm=True applies the encoder's final LayerNorm to the last layer's output, as v1's `final_ln` does; v2
  and HF create `graph_encoder.final_layer_norm` but never apply it (apply_final_layer_norm=False reproduces that).
- A query row whose bias is -inf everywhere gives NaN in the official code (softmax of -inf); here its attention
  output is 0. The official padding never makes such rows (the graph token's column is never masked), so this
  only matters for hand-made biases.
- Attention dropout: the fused op has none; in training with attention_dropout > 0 the layers use the eager
  softmax path (the official config uses 0.1; set attention_dropout=0 to train on pyvl's op).
- Not implemented: quant noise, layerdrop, embed_scale, FLAG perturbations.

State_dict: the module tree and names are HuggingFace's GraphormerForGraphClassification (encoder.graph_encoder.
graph_node_feature.atom_encoder, ..., encoder.graph_encoder.layers.N.self_attn.q_proj, ..., encoder.
lm_head_transform_weight, encoder.layer_norm, classifier.classifier, classifier.lm_output_learned_bias), so an HF
state_dict loads with load_state_dict; from_fairseq_state_dict renames the official v2 checkpoints' keys.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["Graphormer", "from_fairseq_state_dict", "graphormer_base", "graphormer_slim"]

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
ATTENTION = ("pyvl", "eager")


class GraphNodeFeature(nn.Module):
    """Atom encoder (sum over the offset feature columns) + in/out-degree encoders, and the graph token."""

    def __init__(self, num_atoms, num_in_degree, num_out_degree, embedding_dim):
        super().__init__()
        self.atom_encoder = nn.Embedding(num_atoms + 1, embedding_dim, padding_idx=0)
        self.in_degree_encoder = nn.Embedding(num_in_degree, embedding_dim, padding_idx=0)
        self.out_degree_encoder = nn.Embedding(num_out_degree, embedding_dim, padding_idx=0)
        self.graph_token = nn.Embedding(1, embedding_dim)

    def forward(self, x, in_degree, out_degree):
        nodes = self.atom_encoder(x).sum(-2) + self.in_degree_encoder(in_degree) + self.out_degree_encoder(out_degree)
        token = self.graph_token.weight.expand(x.shape[0], 1, -1)
        return torch.cat([token, nodes], dim=1)


class GraphAttnBias(nn.Module):
    """The learned attention bias [B, heads, N+1, N+1]: spatial, edge and virtual-distance encodings."""

    def __init__(self, num_heads, num_edges, num_spatial, num_edge_dis, edge_type, multi_hop_max_dist):
        super().__init__()
        self.num_heads = num_heads
        self.edge_type = edge_type
        self.multi_hop_max_dist = multi_hop_max_dist
        self.edge_encoder = nn.Embedding(num_edges + 1, num_heads, padding_idx=0)
        if edge_type == "multi_hop":
            self.edge_dis_encoder = nn.Embedding(num_edge_dis * num_heads * num_heads, 1)
        self.spatial_pos_encoder = nn.Embedding(num_spatial, num_heads, padding_idx=0)
        self.graph_token_virtual_distance = nn.Embedding(1, num_heads)

    def edge_bias(self, spatial_pos, edge_input, attn_edge_type):
        """[B, N, N, heads]: the edge encoding."""
        H = self.num_heads
        if self.edge_type != "multi_hop":
            return self.edge_encoder(attn_edge_type).mean(-2)
        # Path length per pair, 1 for padding and i == j (spatial_pos is distance + 1, 0 = padding).
        hops = torch.where(spatial_pos > 1, spatial_pos - 1, torch.ones_like(spatial_pos))
        if self.multi_hop_max_dist > 0:
            hops = hops.clamp(max=self.multi_hop_max_dist)
            edge_input = edge_input[..., : self.multi_hop_max_dist, :]
        per_hop = self.edge_encoder(edge_input).mean(-2)  # [B, N, N, D, heads]
        D = per_hop.shape[-2]
        weight = self.edge_dis_encoder.weight.reshape(-1, H, H)[:D]  # [D, heads, heads]
        summed = torch.einsum("bijdh,dhk->bijk", per_hop, weight)
        return summed / hops.unsqueeze(-1).to(summed.dtype)

    def forward(self, attn_bias, spatial_pos, edge_input, attn_edge_type):
        B, T, _ = attn_bias.shape
        H = self.num_heads
        inner = self.spatial_pos_encoder(spatial_pos) + self.edge_bias(spatial_pos, edge_input, attn_edge_type)
        bias = attn_bias.unsqueeze(1) + F.pad(inner.permute(0, 3, 1, 2), (1, 0, 1, 0))
        # The virtual token's distance: on its whole row and on its column below the row (once at [0, 0]).
        token_cells = torch.zeros(T, T, dtype=bias.dtype, device=bias.device)
        token_cells[0, :] = 1
        token_cells[1:, 0] = 1
        bias = bias + self.graph_token_virtual_distance.weight.view(1, H, 1, 1) * token_cells
        return bias + attn_bias.unsqueeze(1)  # the official code adds attn_bias twice ("reset"): -inf stays -inf


class GraphormerMultiheadAttention(nn.Module):
    def __init__(self, embedding_dim, num_heads, attention_dropout, bias=True, attention="pyvl"):
        super().__init__()
        if embedding_dim % num_heads:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be divisible by num_attention_heads "
                             f"({num_heads})")
        self.num_heads = num_heads
        self.head_dim = embedding_dim // num_heads
        self.attention_dropout = attention_dropout
        self.attention = attention
        self.k_proj = nn.Linear(embedding_dim, embedding_dim, bias=bias)
        self.v_proj = nn.Linear(embedding_dim, embedding_dim, bias=bias)
        self.q_proj = nn.Linear(embedding_dim, embedding_dim, bias=bias)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim, bias=bias)

    def forward(self, x, bias, dead_rows):
        B, T, C = x.shape

        def heads(t):
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scale = self.head_dim ** -0.5
        dropout = self.attention_dropout if self.training else 0.0
        if self.attention == "pyvl" and dropout == 0.0:
            out = ops.sequential_attention(q, k, v, bias, scale=scale)
        else:
            probs = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale + bias, dim=-1)
            out = torch.matmul(F.dropout(probs, dropout, self.training), v)
        out = out.masked_fill(dead_rows, 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class GraphormerGraphEncoderLayer(nn.Module):
    def __init__(self, embedding_dim, ffn_embedding_dim, num_heads, dropout, attention_dropout, activation_dropout,
                 activation_fn, pre_layernorm, attention):
        super().__init__()
        self.pre_layernorm = pre_layernorm
        self.dropout = dropout
        self.activation_dropout = activation_dropout
        self.activation_fn = ACTIVATIONS[activation_fn]
        self.self_attn = GraphormerMultiheadAttention(embedding_dim, num_heads, attention_dropout,
                                                      attention=attention)
        self.self_attn_layer_norm = nn.LayerNorm(embedding_dim)
        self.fc1 = nn.Linear(embedding_dim, ffn_embedding_dim)
        self.fc2 = nn.Linear(ffn_embedding_dim, embedding_dim)
        self.final_layer_norm = nn.LayerNorm(embedding_dim)

    def forward(self, x, bias, dead_rows):
        residual = x
        if self.pre_layernorm:
            x = self.self_attn_layer_norm(x)
        x = F.dropout(self.self_attn(x, bias, dead_rows), self.dropout, self.training)
        x = residual + x
        if not self.pre_layernorm:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.pre_layernorm:
            x = self.final_layer_norm(x)
        x = F.dropout(self.activation_fn(self.fc1(x)), self.activation_dropout, self.training)
        x = residual + F.dropout(self.fc2(x), self.dropout, self.training)
        if not self.pre_layernorm:
            x = self.final_layer_norm(x)
        return x


class GraphormerGraphEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dropout = cfg["dropout"]
        self.apply_final_layer_norm = cfg["apply_final_layer_norm"]
        self.graph_node_feature = GraphNodeFeature(cfg["num_atoms"], cfg["num_in_degree"], cfg["num_out_degree"],
                                                   cfg["embedding_dim"])
        self.graph_attn_bias = GraphAttnBias(cfg["num_attention_heads"], cfg["num_edges"], cfg["num_spatial"],
                                             cfg["num_edge_dis"], cfg["edge_type"], cfg["multi_hop_max_dist"])
        self.emb_layer_norm = nn.LayerNorm(cfg["embedding_dim"]) if cfg["encoder_normalize_before"] else None
        if cfg["pre_layernorm"]:
            self.final_layer_norm = nn.LayerNorm(cfg["embedding_dim"])
        self.layers = nn.ModuleList(
            GraphormerGraphEncoderLayer(cfg["embedding_dim"], cfg["ffn_embedding_dim"], cfg["num_attention_heads"],
                                        cfg["dropout"], cfg["attention_dropout"], cfg["activation_dropout"],
                                        cfg["activation_fn"], cfg["pre_layernorm"], cfg["attention"])
            for _ in range(cfg["num_hidden_layers"]))

    def attention_bias(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(bias [B, heads, N+1, N+1] with padding keys at -inf, rows that are -inf everywhere [B, heads, N+1, 1])."""
        bias = self.graph_attn_bias(batch["attn_bias"], batch["spatial_pos"], batch["edge_input"],
                                    batch["attn_edge_type"])
        x = batch["x"]
        padding = torch.cat([torch.zeros_like(x[:, :1, 0], dtype=torch.bool), x[:, :, 0].eq(0)], dim=1)
        bias = bias.masked_fill(padding[:, None, None, :], float("-inf"))  # the official key_padding_mask
        dead_rows = torch.isneginf(bias).all(-1, keepdim=True)
        return bias.masked_fill(dead_rows, 0.0), dead_rows

    def forward(self, batch):
        x = self.graph_node_feature(batch["x"], batch["in_degree"], batch["out_degree"])
        bias, dead_rows = self.attention_bias(batch)
        bias = bias.to(x.dtype)
        if self.emb_layer_norm is not None:
            x = self.emb_layer_norm(x)
        x = F.dropout(x, self.dropout, self.training)
        for layer in self.layers:
            x = layer(x, bias, dead_rows)
        if self.apply_final_layer_norm:
            x = self.final_layer_norm(x)
        return x


class GraphormerModel(nn.Module):
    """HF's GraphormerModel: the graph encoder and the head's transform (Linear, activation, LayerNorm)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.graph_encoder = GraphormerGraphEncoder(cfg)
        self.lm_head_transform_weight = nn.Linear(cfg["embedding_dim"], cfg["embedding_dim"])
        self.activation_fn = ACTIVATIONS[cfg["activation_fn"]]
        self.layer_norm = nn.LayerNorm(cfg["embedding_dim"])

    def forward(self, batch):
        return self.graph_encoder(batch)


class GraphormerDecoderHead(nn.Module):
    def __init__(self, embedding_dim, num_classes):
        super().__init__()
        self.lm_output_learned_bias = nn.Parameter(torch.zeros(1))
        self.classifier = nn.Linear(embedding_dim, num_classes, bias=False)

    def forward(self, x):
        return self.classifier(x) + self.lm_output_learned_bias


_BATCH_KEYS = ("x", "in_degree", "out_degree", "spatial_pos", "attn_edge_type", "edge_input", "attn_bias")


def _as_mapping(batch) -> Mapping:
    if isinstance(batch, Mapping):
        missing = [k for k in _BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch is missing {missing} (pyvl.graph.graphormer_batch builds every key)")
        return batch
    if all(hasattr(batch, k) for k in _BATCH_KEYS):
        return {k: getattr(batch, k) for k in _BATCH_KEYS}
    raise TypeError(f"batch must be a pyvl.graph.GraphormerBatch or a dict with {_BATCH_KEYS}, got "
                    f"{type(batch).__name__}")


class Graphormer(nn.Module):
    """Graphormer for graph-level regression or classification; see the module docstring.

    Arguments mirror HuggingFace's GraphormerConfig (same names and meanings); `pre_layernorm` defaults to True
    (v1), `apply_final_layer_norm` (None: = pre_layernorm) applies v1's final LayerNorm, `attention` picks
    pyvl.ops.sequential_attention ("pyvl") or the plain softmax(q k^T * scale + bias) v ("eager"), and
    `graphormer_init` (the official apply_graphormer_init) draws every Linear and Embedding weight from N(0, 0.02)
    with zero biases and zero padding rows (else PyTorch's default initialization).
    """

    def __init__(self, *, num_classes: int = 1, num_atoms: int = 512 * 9, num_edges: int = 512 * 3,
                 num_in_degree: int = 512, num_out_degree: int = 512, num_spatial: int = 512,
                 num_edge_dis: int = 128, multi_hop_max_dist: int = 5, edge_type: str = "multi_hop",
                 num_hidden_layers: int = 12, embedding_dim: int = 768, ffn_embedding_dim: int = 768,
                 num_attention_heads: int = 32, dropout: float = 0.1, attention_dropout: float = 0.1,
                 activation_dropout: float = 0.1, encoder_normalize_before: bool = False,
                 pre_layernorm: bool = True, apply_final_layer_norm: bool | None = None,
                 activation_fn: str = "gelu", attention: str = "pyvl", graphormer_init: bool = True):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("num_atoms", num_atoms), ("num_edges", num_edges),
                        ("num_in_degree", num_in_degree), ("num_out_degree", num_out_degree),
                        ("num_spatial", num_spatial), ("num_edge_dis", num_edge_dis),
                        ("num_hidden_layers", num_hidden_layers), ("embedding_dim", embedding_dim),
                        ("ffn_embedding_dim", ffn_embedding_dim), ("num_attention_heads", num_attention_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(multi_hop_max_dist, bool) or not isinstance(multi_hop_max_dist, int) or multi_hop_max_dist < 0:
            raise ValueError(f"multi_hop_max_dist must be an int >= 0 (0: no cut), got {multi_hop_max_dist!r}")
        if edge_type == "multi_hop" and multi_hop_max_dist > num_edge_dis:
            raise ValueError(f"multi_hop_max_dist ({multi_hop_max_dist}) must be <= num_edge_dis ({num_edge_dis})")
        if embedding_dim % num_attention_heads:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be divisible by num_attention_heads "
                             f"({num_attention_heads})")
        for name, p in (("dropout", dropout), ("attention_dropout", attention_dropout),
                        ("activation_dropout", activation_dropout)):
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
        if activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn must be one of {tuple(ACTIVATIONS)}, got {activation_fn!r}")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if not isinstance(edge_type, str):
            raise TypeError(f"edge_type must be a str ('multi_hop' or another name for the single-edge type), got "
                            f"{type(edge_type).__name__}")
        if apply_final_layer_norm is None:
            apply_final_layer_norm = pre_layernorm
        if apply_final_layer_norm and not pre_layernorm:
            raise ValueError("apply_final_layer_norm needs pre_layernorm=True (post-LN layers end in a LayerNorm)")
        cfg = dict(num_classes=num_classes, num_atoms=num_atoms, num_edges=num_edges, num_in_degree=num_in_degree,
                   num_out_degree=num_out_degree, num_spatial=num_spatial, num_edge_dis=num_edge_dis,
                   multi_hop_max_dist=multi_hop_max_dist, edge_type=edge_type, num_hidden_layers=num_hidden_layers,
                   embedding_dim=embedding_dim, ffn_embedding_dim=ffn_embedding_dim,
                   num_attention_heads=num_attention_heads, dropout=float(dropout),
                   attention_dropout=float(attention_dropout), activation_dropout=float(activation_dropout),
                   encoder_normalize_before=encoder_normalize_before, pre_layernorm=pre_layernorm,
                   apply_final_layer_norm=apply_final_layer_norm, activation_fn=activation_fn, attention=attention)
        self.config = cfg
        self.encoder = GraphormerModel(cfg)
        self.classifier = GraphormerDecoderHead(embedding_dim, num_classes)
        if graphormer_init:
            self.apply(_graphormer_init)

    def forward_features(self, batch) -> torch.Tensor:
        """The encoder's last states [B, N+1, embedding_dim]; index 0 is the virtual graph token."""
        return self.encoder(_as_mapping(batch))

    def forward(self, batch) -> torch.Tensor:
        """Logits [B, num_classes] from the virtual token's final state."""
        token = self.forward_features(batch)[:, 0]
        enc = self.encoder
        return self.classifier(enc.layer_norm(enc.activation_fn(enc.lm_head_transform_weight(token))))

    @classmethod
    def from_hf_config(cls, config, **overrides) -> "Graphormer":
        """The model of a transformers GraphormerConfig (pre_layernorm and the final-norm quirk as HF has them)."""
        names = ("num_classes", "num_atoms", "num_edges", "num_in_degree", "num_out_degree", "num_spatial",
                 "num_edge_dis", "multi_hop_max_dist", "edge_type", "num_hidden_layers", "embedding_dim",
                 "ffn_embedding_dim", "num_attention_heads", "dropout", "attention_dropout", "activation_dropout",
                 "encoder_normalize_before", "pre_layernorm", "activation_fn")
        kwargs = {n: getattr(config, n) for n in names}
        kwargs["apply_final_layer_norm"] = False
        kwargs.update(overrides)
        return cls(**kwargs)


def _graphormer_init(module):
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def from_fairseq_state_dict(state_dict: Mapping) -> dict:
    """An official v2 (fairseq) Graphormer checkpoint's model state_dict in this model's (HF's) names:
    encoder.embed_out -> classifier.classifier, encoder.lm_output_learned_bias -> classifier.lm_output_learned_bias;
    encoder.masked_lm_pooler (unused by graph prediction) is dropped."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("encoder.masked_lm_pooler."):
            continue
        if key == "encoder.embed_out.weight":
            key = "classifier.classifier.weight"
        elif key == "encoder.lm_output_learned_bias":
            key = "classifier.lm_output_learned_bias"
        out[key] = value
    return out


def graphormer_base(**kwargs) -> Graphormer:
    """Graphormer-Base of the paper (PCQM4M): 12 layers, 768 wide, 32 heads, FFN 768."""
    return Graphormer(**{**dict(num_hidden_layers=12, embedding_dim=768, ffn_embedding_dim=768,
                                num_attention_heads=32), **kwargs})


def graphormer_slim(**kwargs) -> Graphormer:
    """Graphormer-Slim of the official code: 12 layers, 80 wide, 8 heads, FFN 80."""
    return Graphormer(**{**dict(num_hidden_layers=12, embedding_dim=80, ffn_embedding_dim=80,
                                num_attention_heads=8), **kwargs})

"""Tier 2: Graphormer's input (pyvl.graph: OGB featurization, official preprocessing and collation) and the model
(pyvl.models.graphormer): the batch against the official algorithms written out as loops, the attention bias
against a direct loop over node pairs and hops, padding invariance, gradients into the bias embeddings, pyvl's
sequential_attention path against plain softmax attention, HuggingFace parity and state_dict names."""
import math
from types import SimpleNamespace

import pytest
import torch

from pyvl.graph import GraphormerBatch, convert_to_single_emb, graphormer_batch, smiles_to_graph
from pyvl.models.graphormer import Graphormer, from_fairseq_state_dict
from pyvl.reference.shortest_paths import UNREACHABLE, path_nodes

from _molecules import SMILES, loop_floyd_warshall

# A mix with a salt, single atoms, fused rings and a chain longer than multi_hop_max_dist.
BATCH = ("CC(=O)Oc1ccccc1C(=O)O", "[Na+].[Cl-]", "C", "CCCCCCCCCCCC", "C12C3C4C1C5C2C3C45", "N.N.Cl[Pt]Cl",
         "[O-][N+](=O)c1ccccc1")


@pytest.fixture(scope="module")
def graphs():
    pytest.importorskip("ogb")
    return {s: smiles_to_graph(s) for s in SMILES + BATCH}


def _tiny(**kw):
    cfg = dict(num_hidden_layers=2, embedding_dim=24, ffn_embedding_dim=40, num_attention_heads=3, num_classes=2,
               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    model = Graphormer(**cfg)
    with torch.no_grad():  # larger bias embeddings than the 0.02 init, so that the bias shapes the attention
        enc = model.encoder.graph_encoder.graph_attn_bias
        for emb in (enc.spatial_pos_encoder, enc.edge_encoder, enc.graph_token_virtual_distance):
            emb.weight.normal_(0, 1.0)
            if emb.padding_idx is not None:
                emb.weight[emb.padding_idx] = 0
        if hasattr(enc, "edge_dis_encoder"):
            enc.edge_dis_encoder.weight.normal_(0, 0.5)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# The input: the official preprocess_item + collator, written out with loops over lists


def _official_item(g):
    """wrapper.py's preprocess_item on one OGB graph, as nested lists."""
    x = g["node_feat"].tolist()
    n, F = len(x), len(x[0])
    ei, ea = g["edge_index"].T.tolist(), g["edge_feat"].tolist()
    Fe = 3
    adj = [[False] * n for _ in range(n)]
    aet = [[[0] * Fe for _ in range(n)] for _ in range(n)]
    for (u, v), f in zip(ei, ea):
        adj[u][v] = True
        aet[u][v] = [f[c] + 1 + 512 * c + 1 for c in range(Fe)]
    M, P = loop_floyd_warshall(adj)
    max_dist = max(max(r) for r in M)
    edge_input = [[[[-1] * Fe for _ in range(max_dist)] for _ in range(n)] for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j or P[i][j] == 510:
                continue
            nodes = path_nodes(P, i, j)
            for k in range(len(nodes) - 1):
                edge_input[i][j][k] = aet[nodes[k]][nodes[k + 1]]
    return dict(x=[[x[i][c] + 1 + 512 * c for c in range(F)] for i in range(n)], aet=aet, spd=M,
                degree=[sum(adj[i][j] for i in range(n)) for j in range(n)], edge_input=edge_input, n=n)


def _official_collate(items, multi_hop_max_dist, spatial_pos_max):
    B, N = len(items), max(it["n"] for it in items)
    D = max(min(len(it["edge_input"][0][0]), multi_hop_max_dist) for it in items)
    x = torch.zeros(B, N, 9, dtype=torch.long)
    deg = torch.zeros(B, N, dtype=torch.long)
    sp = torch.zeros(B, N, N, dtype=torch.long)
    aet = torch.zeros(B, N, N, 3, dtype=torch.long)
    edge_input = torch.zeros(B, N, N, D, 3, dtype=torch.long)
    bias = torch.full((B, N + 1, N + 1), -math.inf)
    for b, it in enumerate(items):
        n = it["n"]
        bias[b, n + 1:, : n + 1] = 0
        bias[b, : n + 1, : n + 1] = 0
        for i in range(n):
            x[b, i] = torch.tensor(it["x"][i]) + 1
            deg[b, i] = it["degree"][i] + 1
            for j in range(n):
                sp[b, i, j] = it["spd"][i][j] + 1
                aet[b, i, j] = torch.tensor(it["aet"][i][j])
                if it["spd"][i][j] >= spatial_pos_max:
                    bias[b, 1 + i, 1 + j] = -math.inf
                for k in range(min(len(it["edge_input"][i][j]), multi_hop_max_dist)):
                    edge_input[b, i, j, k] = torch.tensor(it["edge_input"][i][j][k]) + 1
    return dict(x=x, in_degree=deg, out_degree=deg, spatial_pos=sp, attn_edge_type=aet, edge_input=edge_input,
                attn_bias=bias)


@pytest.mark.parametrize("multi_hop_max_dist,spatial_pos_max", [(5, 1024), (20, 3), (2, 20)])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_batch_matches_official_preprocessing(graphs, multi_hop_max_dist, spatial_pos_max, backend):
    chosen = BATCH if multi_hop_max_dist != 5 else SMILES
    batch = graphormer_batch([graphs[s] for s in chosen], multi_hop_max_dist=multi_hop_max_dist,
                             spatial_pos_max=spatial_pos_max, backend=backend)
    want = _official_collate([_official_item(graphs[s]) for s in chosen], multi_hop_max_dist, spatial_pos_max)
    for key, value in want.items():
        got = getattr(batch, key)
        assert got.shape == value.shape and torch.equal(got, value), key
    assert batch.num_nodes.tolist() == [graphs[s]["num_nodes"] for s in chosen]


def test_batch_accepts_pyg_style_objects(graphs):
    # Anything with x, edge_index and edge_attr, as a torch_geometric Data has (not imported: it takes seconds).
    gs = [graphs[s] for s in BATCH]
    data = [SimpleNamespace(x=g["node_feat"], edge_index=g["edge_index"], edge_attr=g["edge_feat"]) for g in gs]
    a, b = graphormer_batch(gs), graphormer_batch(data)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in vars(a))


def test_smiles_without_ogb_says_what_to_install(monkeypatch):
    # pyvl.graph itself imports without ogb and rdkit (this module imported it); only smiles_to_graph needs them.
    monkeypatch.setitem(__import__("sys").modules, "ogb.utils", None)
    with pytest.raises(ImportError, match=r"pip install ogb rdkit"):
        smiles_to_graph("CCO")


def test_input_errors(graphs):
    with pytest.raises(ValueError, match="not a molecule rdkit can parse"):
        smiles_to_graph("C1CC(")
    with pytest.raises(TypeError, match="smiles must be a str"):
        smiles_to_graph(None)
    with pytest.raises(TypeError, match="graphs must be a non-empty list"):
        graphormer_batch([])
    with pytest.raises(ValueError, match="multi_hop_max_dist must be an int >= 1"):
        graphormer_batch([graphs["C"]], multi_hop_max_dist=0)
    with pytest.raises(ValueError, match=r"graphs\[1\] must have the keys"):
        graphormer_batch([graphs["C"], {"node_feat": graphs["C"]["node_feat"]}])
    bad = dict(graphs["CC(=O)Nc1ccc(O)cc1"], edge_index=graphs["CC(=O)Nc1ccc(O)cc1"]["edge_index"] + 50)
    with pytest.raises(ValueError, match="edge_index must hold node indices"):
        graphormer_batch([bad])
    with pytest.raises(TypeError, match="must be integer"):
        graphormer_batch([dict(graphs["C"], node_feat=graphs["C"]["node_feat"].float())])
    assert convert_to_single_emb(torch.tensor([[0, 1], [2, 3]])).tolist() == [[1, 514], [3, 516]]


# ----------------------------------------------------------------------------------------------------------------
# The attention bias against a direct loop over node pairs and hops


def _loop_bias(model, graphs_in_batch, multi_hop_max_dist, spatial_pos_max, N):
    enc = model.encoder.graph_encoder.graph_attn_bias
    H = enc.num_heads
    W_sp, W_edge = enc.spatial_pos_encoder.weight, enc.edge_encoder.weight
    t = enc.graph_token_virtual_distance.weight[0]
    out = torch.full((len(graphs_in_batch), H, N + 1, N + 1), -math.inf, dtype=W_sp.dtype)
    for b, g in enumerate(graphs_in_batch):
        n = g["num_nodes"]
        feat = {(u, v): f for (u, v), f in zip(g["edge_index"].T.tolist(), g["edge_feat"].tolist())}
        adj = [[(i, j) in feat for j in range(n)] for i in range(n)]
        M, P = loop_floyd_warshall(adj)
        out[b, :, 0, :] = t[:, None]  # the token's row (its padding columns stay -inf below)
        out[b, :, 1:, 0] = t[:, None]
        for i in range(n):
            for j in range(n):
                d = M[i][j]
                value = W_sp[d + 1].clone()
                if enc.edge_type == "multi_hop":
                    nodes = path_nodes(P, i, j)
                    hops = list(zip(nodes, nodes[1:]))[:multi_hop_max_dist]
                    acc = torch.zeros(H, dtype=W_sp.dtype)
                    for k, (u, v) in enumerate(hops):
                        e = torch.stack([W_edge[feat[u, v][c] + 512 * c + 3] for c in range(3)]).mean(0)
                        acc = acc + e @ enc.edge_dis_encoder.weight.view(-1, H, H)[k]
                    length = multi_hop_max_dist if d == UNREACHABLE else max(1, min(d, multi_hop_max_dist))
                    value = value + acc / length
                elif (i, j) in feat:
                    value = value + torch.stack([W_edge[feat[i, j][c] + 512 * c + 2] for c in range(3)]).mean(0)
                out[b, :, 1 + i, 1 + j] = -math.inf if d >= spatial_pos_max else value
        out[b, :, n + 1:, : n + 1] = 0  # padding rows: 0 towards the real keys (their token column gets t below)
        out[b, :, n + 1:, 0] = t[:, None]
        out[b, :, :, n + 1:] = -math.inf
    return out


@pytest.mark.parametrize("edge_type,multi_hop_max_dist,spatial_pos_max", [("multi_hop", 5, 1024),
                                                                          ("multi_hop", 3, 4), ("single", 5, 6)])
def test_attention_bias_matches_loop(graphs, edge_type, multi_hop_max_dist, spatial_pos_max):
    model = _tiny(edge_type=edge_type, multi_hop_max_dist=multi_hop_max_dist).double()
    gs = [graphs[s] for s in BATCH]
    batch = graphormer_batch(gs, multi_hop_max_dist=multi_hop_max_dist, spatial_pos_max=spatial_pos_max)
    with torch.no_grad():
        bias, dead = model.encoder.graph_encoder.attention_bias(vars(batch))
        want = _loop_bias(model, gs, multi_hop_max_dist, spatial_pos_max, batch.x.shape[1])
    assert not dead.any()
    torch.testing.assert_close(bias, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# The model


def test_padding_and_batching_invariance(graphs):
    model = _tiny().double()
    batch = graphormer_batch([graphs[s] for s in BATCH])
    with torch.no_grad():
        together = model(batch)
        feats = model.forward_features(batch)
        for b, s in enumerate(BATCH):
            alone = graphormer_batch([graphs[s]])
            torch.testing.assert_close(model(alone)[0], together[b], rtol=1e-10, atol=1e-10)
            n = graphs[s]["num_nodes"]
            torch.testing.assert_close(model.forward_features(alone)[0], feats[b, : n + 1], rtol=1e-10, atol=1e-10)
    assert torch.isfinite(feats).all()  # padding query rows attend to the real keys: no NaN anywhere


@pytest.mark.parametrize("pre_layernorm", [True, False])
def test_pyvl_attention_equals_plain_softmax(graphs, pre_layernorm):
    batch = graphormer_batch([graphs[s] for s in BATCH])
    results = {}
    for attention in ("pyvl", "eager"):
        model = _tiny(attention=attention, pre_layernorm=pre_layernorm, encoder_normalize_before=True)
        model.train()  # no dropout configured: training mode only takes the gradient path
        y = model(batch)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
        loss.backward()
        results[attention] = (y.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                           if p.grad is not None})
    (y1, g1), (y2, g2) = results["pyvl"], results["eager"]
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)
    bias_params = ("spatial_pos_encoder", "edge_encoder", "edge_dis_encoder", "graph_token_virtual_distance")
    for name in bias_params:
        g = g1[f"encoder.graph_encoder.graph_attn_bias.{name}.weight"]
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_gradcheck_bias_embeddings_float64(graphs):
    # The gradient of the logits with respect to the bias embeddings goes through sequential_attention's bias
    # gradient; the tables are cut to the rows this batch uses so that gradcheck stays small.
    model = _tiny(num_hidden_layers=1, embedding_dim=6, ffn_embedding_dim=6, num_attention_heads=2).double()
    batch = vars(graphormer_batch([graphs[s] for s in ("CC(=O)Nc1ccc(O)cc1", "[Na+].[Cl-]")]))
    prefix = "encoder.graph_encoder.graph_attn_bias."
    rows = {"spatial_pos_encoder": 8, "edge_dis_encoder": 5 * 2 * 2, "graph_token_virtual_distance": 1}
    params = dict(model.named_parameters())
    leaves = [params[prefix + n + ".weight"].detach()[:r].clone().requires_grad_() for n, r in rows.items()]

    def logits(*heads):
        weights = {prefix + n + ".weight": torch.cat([h, params[prefix + n + ".weight"].detach()[r:]])
                   for (n, r), h in zip(rows.items(), heads)}
        return torch.func.functional_call(model, weights, (batch,))

    assert torch.autograd.gradcheck(logits, leaves, fast_mode=True)


def test_matches_huggingface(graphs):
    transformers = pytest.importorskip("transformers")
    try:
        from transformers import GraphormerConfig, GraphormerForGraphClassification
    except ImportError:
        from transformers.models.deprecated.graphormer import GraphormerConfig, GraphormerForGraphClassification
    batch = graphormer_batch([graphs[s] for s in BATCH])
    for pre in (False, True):
        cfg = GraphormerConfig(num_hidden_layers=2, embedding_dim=32, ffn_embedding_dim=48, num_attention_heads=4,
                               num_classes=3, pre_layernorm=pre, encoder_normalize_before=pre,
                               apply_graphormer_init=True)
        torch.manual_seed(1)
        hf = GraphormerForGraphClassification(cfg).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.05 * torch.randn_like(p))  # non-zero biases, LayerNorm affines, learned output bias
        ours = Graphormer.from_hf_config(cfg).eval()
        ours.load_state_dict(hf.state_dict(), strict=True)
        with torch.no_grad():
            want = hf(**batch.hf_inputs()).logits
            torch.testing.assert_close(ours(batch), want, rtol=1e-5, atol=1e-6)
    assert transformers.__version__


def test_state_dict_names_are_huggingface_names():
    model = Graphormer(num_hidden_layers=1, embedding_dim=8, ffn_embedding_dim=8, num_attention_heads=2)
    keys = set(model.state_dict())
    enc = "encoder.graph_encoder."
    want = {enc + "graph_node_feature." + n + ".weight" for n in ("atom_encoder", "in_degree_encoder",
                                                                   "out_degree_encoder", "graph_token")}
    want |= {enc + "graph_attn_bias." + n + ".weight" for n in ("edge_encoder", "edge_dis_encoder",
                                                                 "spatial_pos_encoder",
                                                                 "graph_token_virtual_distance")}
    layer = enc + "layers.0."
    want |= {layer + m + "." + p for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.out_proj", "self_attn_layer_norm", "fc1", "fc2",
                                           "final_layer_norm") for p in ("weight", "bias")}
    want |= {enc + "final_layer_norm.weight", enc + "final_layer_norm.bias"}
    want |= {"encoder.lm_head_transform_weight.weight", "encoder.lm_head_transform_weight.bias",
             "encoder.layer_norm.weight", "encoder.layer_norm.bias", "classifier.classifier.weight",
             "classifier.lm_output_learned_bias"}
    assert keys == want
    shapes = model.state_dict()
    assert shapes[enc + "graph_node_feature.atom_encoder.weight"].shape == (512 * 9 + 1, 8)
    assert shapes[enc + "graph_attn_bias.edge_dis_encoder.weight"].shape == (128 * 2 * 2, 1)
    # The official fairseq checkpoint names map onto these.
    fairseq = {("encoder.embed_out.weight" if k == "classifier.classifier.weight" else
                "encoder.lm_output_learned_bias" if k == "classifier.lm_output_learned_bias" else k): v
               for k, v in model.state_dict().items()}
    fairseq["encoder.masked_lm_pooler.weight"] = torch.zeros(8, 8)
    model.load_state_dict(from_fairseq_state_dict(fairseq), strict=True)


def test_fully_masked_rows_give_zero_not_nan(graphs):
    model = _tiny()
    batch = graphormer_batch([graphs[s] for s in BATCH[:3]])
    bias = batch.attn_bias.clone()
    bias[0, 2, :] = -math.inf  # a hand-made row with no key left
    hand = GraphormerBatch(**dict(vars(batch), attn_bias=bias))
    with torch.no_grad():
        for attention in ("pyvl", "eager"):
            model.encoder.graph_encoder.layers[0].self_attn.attention = attention
            assert torch.isfinite(model.forward_features(hand)).all()


def test_attention_dropout_in_training_takes_the_eager_path(graphs):
    # The fused op has no dropout on the probabilities: with attention_dropout > 0 a training step runs the plain
    # softmax path (different draws each call); in eval both paths give the same logits.
    model = _tiny(attention_dropout=0.5).train()
    batch = graphormer_batch([graphs[s] for s in BATCH[:3]])
    a, b = model(batch), model(batch)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    model.eval()
    eager = _tiny(attention_dropout=0.5, attention="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), eager(batch), rtol=1e-5, atol=1e-6)


def test_compile_fullgraph(graphs):
    model = _tiny(num_hidden_layers=1)
    batch = vars(graphormer_batch([graphs[s] for s in BATCH[:3]]))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), model(batch), rtol=1e-5, atol=1e-6)


def test_model_errors(graphs):
    with pytest.raises(ValueError, match="embedding_dim .* divisible"):
        Graphormer(embedding_dim=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="attention must be one of"):
        Graphormer(num_hidden_layers=1, embedding_dim=8, num_attention_heads=2, attention="flash")
    with pytest.raises(ValueError, match="multi_hop_max_dist .* num_edge_dis"):
        Graphormer(num_hidden_layers=1, embedding_dim=8, num_attention_heads=2, multi_hop_max_dist=200)
    with pytest.raises(ValueError, match="apply_final_layer_norm needs pre_layernorm"):
        Graphormer(num_hidden_layers=1, embedding_dim=8, num_attention_heads=2, pre_layernorm=False,
                   apply_final_layer_norm=True)
    model = _tiny()
    batch = vars(graphormer_batch([graphs["C"]]))
    with pytest.raises(ValueError, match="batch is missing"):
        model({k: v for k, v in batch.items() if k != "edge_input"})
    with pytest.raises(TypeError, match="batch must be"):
        model(3)

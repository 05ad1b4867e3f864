"""Tier 2: Pre-training GNNs (Hu et al. 2020) on real molecules: the official featurization (against rdkit read
directly), batching, attribute masking (the official count), the context ring (against networkx shortest paths),
GIN on pyvl's gather_scatter_add against GIN on index_add_ and against the official self-loop-edge formulation,
ROC-AUC against sklearn, and the three pre-training losses falling over a short run."""
import random

import pytest
import torch

from pyvl import _ext
from pyvl.graph import pretrain as gp
from pyvl.models import pretrain_gnn as pg

Chem = pytest.importorskip("rdkit.Chem")

needs_ext = pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason="pyvl._C is not built")

SMILES = [
    # drugs
    "CC(=O)Oc1ccccc1C(=O)O",  # aspirin
    "Cn1cnc2c1c(=O)n(C)c(=O)n2C",  # caffeine
    "CC(C)Cc1ccc(cc1)[C@@H](C)C(=O)O",  # (S)-ibuprofen
    "CC(=O)Nc1ccc(O)cc1",  # paracetamol
    "CC1([C@@H](N2[C@H](S1)[C@@H](C2=O)NC(=O)Cc3ccccc3)C(=O)O)C",  # penicillin G
    "CN1CCC[C@H]1c2cccnc2",  # nicotine
    "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc12",  # diazepam
    "CN1CC[C@]23[C@@H]4[C@H]1CC5=C2C(=C(C=C5)O)O[C@H]3[C@H](C=C4)O",  # morphine
    "CCCc1nn(C)c2c(=O)[nH]c(-c3cc(S(=O)(=O)N4CCN(C)CC4)ccc3OCC)nc12",  # sildenafil
    "CN(C)C(=N)N=C(N)N",  # metformin
    "Cc1ccc(NC(=O)c2ccc(CN3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1",  # imatinib
    "CC(C)CCC[C@@H](C)[C@H]1CC[C@H]2[C@@H]3CC=C4C[C@@H](O)CC[C@]4(C)[C@H]3CC[C@@]21C",  # cholesterol
    "NCCc1ccc(O)c(O)c1",  # dopamine
    "NCCc1c[nH]c2ccc(O)cc12",  # serotonin
    "CCN(CC)CC(=O)Nc1c(C)cccc1C",  # lidocaine
    "CC(=O)CC(c1ccccc1)c1c(O)c2ccccc2oc1=O",  # warfarin
    "CCN(CC)CCCC(C)Nc1ccnc2cc(Cl)ccc12",  # chloroquine
    # rings
    "C1CCCCC1", "c1ccc2ccccc2c1", "C1C2CC3CC1CC(C2)C3", "c1ccncc1", "c1ccoc1", "c1ccsc1",
    "C12C3C4C1C5C2C3C45", "C1CCC2(CC1)CCCC2", "c1ccc(cc1)-c1ccccc1",
    # salts and charged atoms
    "[Na+].[Cl-]", "CC(=O)[O-].[Na+]", "[NH4+]", "O=[N+]([O-])c1ccccc1", "[NH3+]CC(=O)[O-]", "C[N+](C)(C)C",
    "c1cc[nH+]cc1", "[Ca+2].[Cl-].[Cl-]",
    # double-bond stereo, triple bonds, tiny and long molecules
    "C/C=C/C", "F/C=C\\F", "C#N", "C#CC", "C", "O", "CCCCCCCCCCCCCCCC",
]


def _graphs():
    return [gp.smiles_to_graph(s) for s in SMILES]


# ---------------------------------------------------------------------------------------------------------------
# Featurization and batching


def test_featurization_of_acetic_acid_and_trans_butene():
    g = gp.smiles_to_graph("CC(=O)O")
    assert g.x.tolist() == [[5, 0], [5, 0], [7, 0], [7, 0]]  # C, C, O, O: atomic number - 1, no chirality
    assert g.edge_index.tolist() == [[0, 1, 1, 2, 1, 3], [1, 0, 2, 1, 3, 1]]
    assert g.edge_attr.tolist() == [[0, 0], [0, 0], [1, 0], [1, 0], [0, 0], [0, 0]]  # single, double, single
    g = gp.smiles_to_graph("C/C=C/C")
    # The single bonds next to the double bond carry rdkit's directions ENDUPRIGHT = 1 (as parsed from "/").
    assert g.edge_attr[:, 1].tolist() == [1, 1, 0, 0, 1, 1]
    g = gp.smiles_to_graph("N[C@@H](C)C(=O)O")
    assert g.x[1].tolist() == [5, 1]  # @@ = clockwise
    assert gp.smiles_to_graph("c1ccccc1").edge_attr[:, 0].eq(3).all()  # aromatic


@pytest.mark.parametrize("smiles", SMILES)
def test_featurization_matches_rdkit(smiles):
    mol = Chem.MolFromSmiles(smiles)
    g = gp.mol_to_graph(mol)
    chir = [Chem.ChiralType.CHI_UNSPECIFIED, Chem.ChiralType.CHI_TETRAHEDRAL_CW, Chem.ChiralType.CHI_TETRAHEDRAL_CCW]
    bonds = [Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC]
    dirs = [Chem.BondDir.NONE, Chem.BondDir.ENDUPRIGHT, Chem.BondDir.ENDDOWNRIGHT]
    assert g.x.tolist() == [[a.GetAtomicNum() - 1, chir.index(a.GetChiralTag())] for a in mol.GetAtoms()]
    want_edges, want_attr = [], []
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        want_edges += [(i, j), (j, i)]
        want_attr += [[bonds.index(b.GetBondType()), dirs.index(b.GetBondDir())]] * 2
    assert g.edge_index.shape == (2, 2 * mol.GetNumBonds()) and g.edge_attr.shape == (2 * mol.GetNumBonds(), 2)
    assert [tuple(e) for e in g.edge_index.T.tolist()] == want_edges
    assert g.edge_attr.tolist() == want_attr


def test_featurization_refuses_what_the_embeddings_cannot_hold():
    with pytest.raises(ValueError, match="smiles"):
        gp.smiles_to_graph("not a molecule(")
    with pytest.raises(TypeError, match="mol"):
        gp.mol_to_graph("CCO")
    with pytest.raises(ValueError, match="atomic number 0"):
        gp.smiles_to_graph("*C")


def test_collate_offsets_edges_and_builds_the_batch_vector():
    graphs = _graphs()[:5] + [gp.smiles_to_graph("[Na+].[Cl-]")]
    b = gp.collate(graphs)
    sizes = [g.num_nodes for g in graphs]
    assert b.num_graphs == len(graphs) and b.x.shape[0] == sum(sizes)
    assert b.batch.tolist() == [i for i, n in enumerate(sizes) for _ in range(n)]
    start = 0
    e = 0
    for g in graphs:
        E = g.edge_index.shape[1]
        assert torch.equal(b.edge_index[:, e:e + E], g.edge_index + start)
        assert torch.equal(b.x[start:start + g.num_nodes], g.x)
        start, e = start + g.num_nodes, e + E
    with pytest.raises(ValueError, match="graphs"):
        gp.collate([])


# ---------------------------------------------------------------------------------------------------------------
# Attribute masking


def test_masking_masks_the_official_count():
    gen = torch.Generator().manual_seed(0)
    masked = [gp.mask_atoms(g, 0.15, gen) for g in _graphs()]
    for g, m in zip(_graphs(), masked):
        n = g.num_nodes
        k = min(n, int(n * 0.15 + 1))  # the official rounding: at least one atom
        idx = m.masked_atom_indices
        assert idx.numel() == k and idx.unique().numel() == k
        assert m.graph.x[idx].tolist() == [[119, 0]] * k
        assert torch.equal(m.mask_node_label, g.x[idx])
        keep = torch.ones(n, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(m.graph.x[keep], g.x[keep]) and torch.equal(m.graph.edge_attr, g.edge_attr)
    assert [gp.num_masked_atoms(n, 0.15) for n in (1, 6, 7, 20, 40)] == [1, 1, 2, 4, 7]
    b = gp.collate_masked(masked)
    assert b.x[b.masked_atom_indices, 0].eq(119).all()
    assert b.mask_node_label.shape == (b.masked_atom_indices.numel(), 2)
    with pytest.raises(ValueError, match="mask_rate"):
        gp.mask_atoms(_graphs()[0], 1.5)


def test_edge_masking_masks_the_bonds_at_masked_atoms():
    g = gp.smiles_to_graph("CC(=O)Oc1ccccc1C(=O)O")  # aspirin
    m = gp.mask_atoms(g, masked_atom_indices=[1, 4], mask_edge=True)
    touching = [e for e, (u, v) in enumerate(g.edge_index.T.tolist()) if u in (1, 4) or v in (1, 4)]
    # Bonds 0-1, 1-2, 1-3 at atom 1 and 3-4, 4-5, 4-9 at atom 4 (3-4 counted once): 6 bonds, 12 directed edges.
    assert len(touching) == 12 and m.connected_edge_indices.tolist() == touching[::2]
    assert m.graph.edge_attr[touching].tolist() == [[5, 0]] * 12
    untouched = [e for e in range(g.edge_index.shape[1]) if e not in touching]
    assert torch.equal(m.graph.edge_attr[untouched], g.edge_attr[untouched])
    assert torch.equal(m.mask_edge_label, g.edge_attr[touching[::2]])
    graphs = _graphs()[:6]
    b = gp.collate_masked([gp.mask_atoms(x, 0.15, torch.Generator().manual_seed(i), mask_edge=True)
                           for i, x in enumerate(graphs)])
    assert b.edge_attr[b.connected_edge_indices, 0].eq(5).all()
    ends = b.edge_index[:, b.connected_edge_indices]
    is_masked = torch.zeros(b.x.shape[0], dtype=torch.bool)
    is_masked[b.masked_atom_indices] = True
    assert is_masked[ends].any(0).all()  # every labelled bond touches a masked atom of its own molecule
    task = pg.AttributeMasking(pg.GNN(num_layer=2, emb_dim=16), mask_edge=True)
    loss, _ = task(b)
    loss.backward()
    assert task.linear_pred_bonds.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Context prediction


@pytest.mark.parametrize("k,r1,r2", [(5, 4, 7), (2, 1, 3)])
def test_context_ring_is_the_nodes_between_r1_and_r2(k, r1, r2):
    nx = pytest.importorskip("networkx")
    rng = random.Random(0)
    for smiles, g in zip(SMILES, _graphs()):
        G = nx.Graph()
        G.add_nodes_from(range(g.num_nodes))
        G.add_edges_from(g.edge_index.T.tolist())
        for root in rng.sample(range(g.num_nodes), min(3, g.num_nodes)):
            dist = nx.single_source_shortest_path_length(G, root)
            pair = gp.substructure_context(g, k, r1, r2, root=root)
            ring = sorted(v for v, d in dist.items() if r1 < d <= r2)
            sub = sorted(v for v, d in dist.items() if d <= k)
            assert pair.substruct_nodes == sub, smiles
            assert pair.substruct.x.tolist() == g.x[sub].tolist()
            assert pair.substruct_nodes[pair.center_substruct_idx] == root
            assert pair.substruct.edge_index.shape[1] == 2 * G.subgraph(sub).number_of_edges()
            if not ring:
                assert pair.context is None
                continue
            assert pair.context_nodes == ring, smiles
            assert pair.context.x.tolist() == g.x[ring].tolist()
            assert pair.context.edge_index.shape[1] == 2 * G.subgraph(ring).number_of_edges()
            anchors = [ring[i] for i in pair.overlap_context_substruct_idx.tolist()]
            assert anchors == sorted(set(ring) & set(sub)) and anchors  # a ring always touches the substructure


def test_collate_context_skips_pairs_without_context():
    graphs = _graphs()
    pairs = [gp.substructure_context(g, 3, 2, 5, root=0) for g in graphs]
    b = gp.collate_context(pairs)
    kept = [p for p in pairs if p.context is not None]
    assert 0 < len(kept) < len(pairs) and b.substruct.num_graphs == b.context.num_graphs == len(kept)
    assert b.center_substruct_idx.tolist() == [int(b.substruct.ptr[i]) + p.center_substruct_idx
                                               for i, p in enumerate(kept)]
    assert b.batch_overlapped_context.tolist() == [i for i, p in enumerate(kept)
                                                   for _ in range(len(p.overlap_context_substruct_idx))]
    assert b.context.batch[b.overlap_context_substruct_idx].tolist() == b.batch_overlapped_context.tolist()


def test_cycle_index_is_the_official_shift():
    assert pg.cycle_index(5, 1).tolist() == [1, 2, 3, 4, 0]
    assert pg.cycle_index(5, 2).tolist() == [2, 3, 4, 0, 1]


# ---------------------------------------------------------------------------------------------------------------
# GIN on pyvl's kernel


def _official_gin_conv(conv, x, edge_index, edge_attr):
    """pretrain-gnns' GINConv.forward written out: N self-loop edges (bond type 4, direction 0) appended, messages
    x_j + edge embedding summed at their destinations by index_add_, then the MLP."""
    N = x.shape[0]
    loops = torch.arange(N)
    edge_index = torch.cat([edge_index, torch.stack([loops, loops])], 1)
    loop_attr = torch.zeros(N, 2, dtype=torch.long)
    loop_attr[:, 0] = 4
    edge_attr = torch.cat([edge_attr, loop_attr], 0)
    emb = conv.edge_embedding1(edge_attr[:, 0]) + conv.edge_embedding2(edge_attr[:, 1])
    aggr = x.new_zeros(x.shape).index_add_(0, edge_index[1], x[edge_index[0]] + emb)
    return conv.mlp(aggr)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_gin_conv_equals_the_official_formulation(backend):
    torch.manual_seed(0)
    b = gp.collate(_graphs()[:8])
    conv = pg.GINConv(16, backend=backend)
    x = torch.randn(b.x.shape[0], 16)
    torch.testing.assert_close(conv(x, b.edge_index, b.edge_attr), _official_gin_conv(conv, x, b.edge_index, b.edge_attr))


@needs_ext
@pytest.mark.parametrize("JK", pg.JK_MODES)
def test_gin_on_pyvl_kernel_equals_gin_on_index_add(JK):
    torch.manual_seed(1)
    b = gp.collate(_graphs())
    y = torch.randn(b.num_graphs, 3)
    grads = {}
    outs = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(2)
        model = pg.GNNGraphPred(num_layer=3, emb_dim=24, num_tasks=3, JK=JK, backend=backend)
        out = model(b)
        ((out - y) ** 2).mean().backward()
        outs[backend] = out.detach()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(outs["cpu"], outs["reference"])
    for name, g in grads["cpu"].items():
        torch.testing.assert_close(g, grads["reference"][name], msg=name)


def test_state_dict_keys_follow_the_official_names():
    keys = set(pg.GNNGraphPred(num_layer=2, emb_dim=8, num_tasks=2).state_dict())
    for key in ("gnn.x_embedding1.weight", "gnn.x_embedding2.weight", "gnn.gnns.1.mlp.0.weight",
                "gnn.gnns.1.mlp.2.bias", "gnn.gnns.0.edge_embedding1.weight", "gnn.gnns.0.edge_embedding2.weight",
                "gnn.batch_norms.1.running_mean", "graph_pred_linear.weight"):
        assert key in keys
    model = pg.GNN()
    assert (model.x_embedding1.num_embeddings, model.x_embedding2.num_embeddings) == (120, 3)
    assert (model.gnns[0].edge_embedding1.num_embeddings, model.gnns[0].edge_embedding2.num_embeddings) == (6, 3)
    assert model.num_layer == 5 and model.emb_dim == 300
    assert pg.GNNGraphPred(num_layer=2, emb_dim=8, JK="concat").graph_pred_linear.in_features == 24
    for kwargs, word in (({"JK": "mean"}, "JK"), ({"num_layer": 0}, "num_layer"), ({"drop_ratio": 1.0}, "drop_ratio")):
        with pytest.raises(ValueError, match=word):
            pg.GNN(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# ROC-AUC and the supervised loss


def test_roc_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for n in (2, 7, 50, 301):
        y = torch.randint(2, (n,), generator=g)
        y[0], y[1] = 0, 1
        scores = torch.randint(5, (n,), generator=g).double() if n > 7 else torch.randn(n, generator=g)  # ties
        assert pg.roc_auc(y, scores) == pytest.approx(metrics.roc_auc_score(y.numpy(), scores.numpy()), abs=1e-12)
    y = torch.randint(-1, 2, (40, 4), generator=g)
    y[:, 3] = 1  # one class only: left out of the mean, as in finetune.py
    scores = torch.randn(40, 4, generator=g)
    want = [metrics.roc_auc_score((y[y[:, t] != 0, t] + 1) // 2, scores[y[:, t] != 0, t]) for t in range(3)]
    assert pg.mean_roc_auc(y, scores) == pytest.approx(sum(want) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        pg.roc_auc(torch.ones(3), torch.randn(3))


def test_masked_bce_ignores_missing_labels():
    logits = torch.tensor([[0.3, -2.0], [1.5, 7.0]], dtype=torch.float64)
    y = torch.tensor([[1, 0], [-1, 1]])
    want = (torch.nn.functional.softplus(-logits[0, 0]) + torch.nn.functional.softplus(logits[1, 0])
            + torch.nn.functional.softplus(-logits[1, 1])) / 3
    torch.testing.assert_close(pg.masked_bce_loss(logits, y), want)


# ---------------------------------------------------------------------------------------------------------------
# The pre-training losses fall over a short run (fixed seed)


def _train(module, loss_of_step, steps=20):
    """Adam at 3e-3 for `steps` steps; asserts the mean loss of the last five is below 0.7 x that of the first."""
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        loss = loss_of_step(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_attribute_masking_loss_falls():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    graphs = _graphs()
    task = pg.AttributeMasking(pg.GNN(num_layer=3, emb_dim=32))
    _train(task, lambda step: task(gp.collate_masked([gp.mask_atoms(g, 0.15, gen) for g in graphs]))[0])


def test_context_prediction_loss_falls():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    k, r1, r2 = 3, 2, 5
    pairs = [gp.substructure_context(g, k, r1, r2, generator=gen) for g in _graphs() for _ in range(2)]
    batch = gp.collate_context(pairs)
    task = pg.ContextPrediction(pg.GNN(num_layer=k, emb_dim=32), pg.GNN(num_layer=r2 - r1, emb_dim=32))
    _train(task, lambda step: task(batch)[0])


def _labels(smiles):
    """Three tasks the graph determines (nitrogen, aromatic ring, halogen) with some labels missing (0)."""
    ys = []
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        atoms = [a.GetSymbol() for a in mol.GetAtoms()]
        y = [1 if "N" in atoms else -1, 1 if any(a.GetIsAromatic() for a in mol.GetAtoms()) else -1,
             1 if any(a in ("Cl", "F") for a in atoms) else -1]
        if i % 4 == 1:
            y[i % 3] = 0
        ys.append(y)
    return ys


def test_supervised_pretraining_loss_falls_and_auc_is_high():
    torch.manual_seed(0)
    graphs = [gp.smiles_to_graph(s, y) for s, y in zip(SMILES, _labels(SMILES))]
    batch = gp.collate(graphs)
    torch.manual_seed(0)
    pretrained = pg.AttributeMasking(pg.GNN(num_layer=3, emb_dim=32))  # a stand-in for a pre-trained GNN
    model = pg.GNNGraphPred(num_layer=3, emb_dim=32, num_tasks=3).from_pretrained(pretrained.gnn.state_dict())
    torch.testing.assert_close(model.gnn.gnns[2].mlp[0].weight, pretrained.gnn.gnns[2].mlp[0].weight)
    _train(model, lambda step: pg.masked_bce_loss(model(batch), batch.y), steps=30)
    model.eval()
    with torch.no_grad():
        assert pg.mean_roc_auc(batch.y, model(batch)) > 0.9

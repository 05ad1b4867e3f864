"""Molecule graphs for "Strategies for Pre-training Graph Neural Networks" (Hu et al., ICLR 2020).

Follows the official code (snap-stanford/pretrain-gnns, chem/loader.py, chem/util.py, chem/batch.py) without
needing torch_geometric; rdkit is needed only to featurize (imported lazily).

Featurization (loader.py's mol_to_graph_data_obj_simple):
  x          int64 [n, 2]: atom type = atomic number - 1 (0..117; 118 for atomic number 119, 119 the mask token, so
             an embedding of NUM_ATOM_TYPE = 120) and chirality tag (unspecified, CW, CCW = 0..2; 3 chirality
             embeddings, so CHI_OTHER is refused).
  edge_index int64 [2, 2B]: both directions of each of the B bonds, (i, j) then (j, i), in rdkit's bond order.
  edge_attr  int64 [2B, 2]: bond type (single, double, triple, aromatic = 0..3; 4 the self-loop the GIN adds,
             5 the mask token: NUM_BOND_TYPE = 6 embeddings) and bond direction (none, end-up-right,
             end-down-right = 0..2).

Transforms: mask_atoms (util.py's MaskAtom, atom part) and substructure_context (ExtractSubstructureContextPair);
batching: collate, collate_masked, collate_context (batch.py's Batch / BatchMasking / BatchSubstructContext).
"""
from __future__ import annotations

import dataclasses
from collections import deque

import torch

NUM_ATOM_TYPE = 120  # 119 atom types (atomic number - 1) + the mask token
MASK_ATOM_TYPE = 119
NUM_CHIRALITY_TAG = 3
NUM_BOND_TYPE = 6  # single, double, triple, aromatic, self-loop, mask
SELF_LOOP_BOND_TYPE = 4
MASK_BOND_TYPE = 5
NUM_BOND_DIRECTION = 3

_CHIRALITY = ("CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW")
_BOND_TYPES = ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC")
_BOND_DIRS = ("NONE", "ENDUPRIGHT", "ENDDOWNRIGHT")


def _rdkit():
    try:
        from rdkit import Chem
    except ImportError as e:  # pragma: no cover - rdkit is a dev dependency
        raise ImportError("pyvl.graph.pretrain needs rdkit to featurize molecules (pip install rdkit)") from e
    return Chem


@dataclasses.dataclass
class MolGraph:
    """One molecule: x [n, 2], edge_index [2, E], edge_attr [E, 2] (all int64); y: optional graph labels."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor
    y: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]


@dataclasses.dataclass
class GraphBatch:
    """Graphs concatenated: node rows stacked, edge_index offset by each graph's first node, batch [n] the graph
    of each node, ptr [G + 1] each graph's first node."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor
    batch: torch.Tensor
    ptr: torch.Tensor
    y: torch.Tensor | None = None
    masked_atom_indices: torch.Tensor | None = None  # collate_masked: batch-level node indices
    mask_node_label: torch.Tensor | None = None  # collate_masked: the masked atoms' original [k, 2] features
    connected_edge_indices: torch.Tensor | None = None  # collate_masked with mask_edge: batch-level edge indices
    mask_edge_label: torch.Tensor | None = None  # their bonds' original [b, 2] features

    @property
    def num_graphs(self) -> int:
        return self.ptr.shape[0] - 1

    def to(self, device) -> GraphBatch:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self) if getattr(self, f.name) is not None})


def mol_to_graph(mol, y=None) -> MolGraph:
    """The official featurization of an rdkit Mol (see the module docstring)."""
    Chem = _rdkit()
    if not isinstance(mol, Chem.Mol):
        raise TypeError(f"mol must be an rdkit.Chem.Mol, got {type(mol).__name__}")
    chirality = {getattr(Chem.rdchem.ChiralType, name): i for i, name in enumerate(_CHIRALITY)}
    bond_types = {getattr(Chem.rdchem.BondType, name): i for i, name in enumerate(_BOND_TYPES)}
    bond_dirs = {getattr(Chem.rdchem.BondDir, name): i for i, name in enumerate(_BOND_DIRS)}
    atoms = []
    for atom in mol.GetAtoms():
        z = atom.GetAtomicNum()
        if not 1 <= z <= 119:
            raise ValueError(f"atom {atom.GetIdx()} has atomic number {z}; the featurization covers 1..119")
        tag = atom.GetChiralTag()
        if tag not in chirality:
            raise ValueError(f"atom {atom.GetIdx()} has chirality tag {tag}; the featurization covers {_CHIRALITY}")
        atoms.append((z - 1, chirality[tag]))
    edges, attrs = [], []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        if bond.GetBondType() not in bond_types:
            raise ValueError(f"bond {bond.GetIdx()} has type {bond.GetBondType()}; the featurization covers "
                             f"{_BOND_TYPES}")
        if bond.GetBondDir() not in bond_dirs:
            raise ValueError(f"bond {bond.GetIdx()} has direction {bond.GetBondDir()}; the featurization covers "
                             f"{_BOND_DIRS}")
        feature = (bond_types[bond.GetBondType()], bond_dirs[bond.GetBondDir()])
        edges += [(i, j), (j, i)]
        attrs += [feature, feature]
    x = torch.tensor(atoms, dtype=torch.long).reshape(-1, 2)
    edge_index = torch.tensor(edges, dtype=torch.long).reshape(-1, 2).T.contiguous()
    edge_attr = torch.tensor(attrs, dtype=torch.long).reshape(-1, 2)
    if y is not None:
        y = torch.as_tensor(y).reshape(1, -1)
    return MolGraph(x, edge_index, edge_attr, y)


def smiles_to_graph(smiles: str, y=None) -> MolGraph:
    """mol_to_graph(Chem.MolFromSmiles(smiles)); raises ValueError for a SMILES rdkit cannot parse."""
    if not isinstance(smiles, str):
        raise TypeError(f"smiles must be a str, got {type(smiles).__name__}")
    mol = _rdkit().MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"smiles {smiles!r} could not be parsed by rdkit")
    return mol_to_graph(mol, y)


def _check_graphs(name, graphs, cls=MolGraph):
    if not isinstance(graphs, (list, tuple)) or not graphs:
        raise ValueError(f"{name} must be a non-empty list of {cls.__name__}, got {graphs!r:.80}")
    for i, g in enumerate(graphs):
        if not isinstance(g, cls):
            raise TypeError(f"{name}[{i}] must be a {cls.__name__}, got {type(g).__name__}")


def _concat(xs, edge_indices, edge_attrs):
    """Stacked nodes, offset edges, the batch vector and ptr of graphs given as parts."""
    sizes = torch.tensor([x.shape[0] for x in xs], dtype=torch.long)
    ptr = torch.zeros(len(xs) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(sizes, 0)
    x = torch.cat(xs, 0)
    edge_index = torch.cat([e + ptr[i] for i, e in enumerate(edge_indices)], 1)
    edge_attr = torch.cat(edge_attrs, 0)
    batch = torch.repeat_interleave(torch.arange(len(xs)), sizes)
    return x, edge_index, edge_attr, batch, ptr


def collate(graphs: list[MolGraph]) -> GraphBatch:
    """One batch of graphs of any sizes (torch_geometric's Batch.from_data_list for x, edge_index, edge_attr, y)."""
    _check_graphs("graphs", graphs)
    x, edge_index, edge_attr, batch, ptr = _concat([g.x for g in graphs], [g.edge_index for g in graphs],
                                                   [g.edge_attr for g in graphs])
    ys = [g.y for g in graphs]
    y = None if any(v is None for v in ys) else torch.cat(ys, 0)
    return GraphBatch(x, edge_index, edge_attr, batch, ptr, y)


# ----------------------------------------------------------------------------------------------------------------
# Attribute masking


@dataclasses.dataclass
class MaskedGraph:
    """A graph whose masked atoms carry the mask features [119, 0]; mask_node_label holds their originals."""

    graph: MolGraph
    masked_atom_indices: torch.Tensor
    mask_node_label: torch.Tensor
    connected_edge_indices: torch.Tensor | None = None  # mask_edge: one directed edge per masked bond
    mask_edge_label: torch.Tensor | None = None  # mask_edge: those bonds' original features


def num_masked_atoms(num_atoms: int, mask_rate: float) -> int:
    """The official count: int(num_atoms * mask_rate + 1), so at least one atom per molecule."""
    return int(num_atoms * mask_rate + 1)


def mask_atoms(graph: MolGraph, mask_rate: float = 0.15, generator: torch.Generator | None = None,
               masked_atom_indices=None, mask_edge: bool = False) -> MaskedGraph:
    """MaskAtom: int(n * mask_rate + 1) distinct atoms (at most n) drawn uniformly get atom type 119 and chirality
    0; their original features are the labels. With mask_edge (the official option, off by default in
    pretrain_masking.py), every directed edge at a masked atom gets bond features [5, 0] too; the labels are the
    original features of the first direction of each such bond (edge ids in increasing order, every second one, as
    the official code takes them, relying on the two directions of a bond being adjacent)."""
    if not isinstance(graph, MolGraph):
        raise TypeError(f"graph must be a MolGraph, got {type(graph).__name__}")
    if not 0.0 <= mask_rate <= 1.0:
        raise ValueError(f"mask_rate must lie in [0, 1], got {mask_rate}")
    n = graph.num_nodes
    if n == 0:
        raise ValueError("graph must have at least one atom to mask")
    if masked_atom_indices is None:
        k = min(n, num_masked_atoms(n, mask_rate))
        masked_atom_indices = torch.randperm(n, generator=generator)[:k]
    masked_atom_indices = torch.as_tensor(masked_atom_indices, dtype=torch.long)
    label = graph.x[masked_atom_indices].clone()
    x = graph.x.clone()
    x[masked_atom_indices] = torch.tensor([MASK_ATOM_TYPE, 0])
    if not mask_edge:
        return MaskedGraph(dataclasses.replace(graph, x=x), masked_atom_indices, label)
    is_masked = torch.zeros(n, dtype=torch.bool)
    is_masked[masked_atom_indices] = True
    connected = torch.nonzero(is_masked[graph.edge_index].any(0)).reshape(-1)
    edge_attr = graph.edge_attr.clone()
    edge_attr[connected] = torch.tensor([MASK_BOND_TYPE, 0])
    first = connected[::2]
    return MaskedGraph(dataclasses.replace(graph, x=x, edge_attr=edge_attr), masked_atom_indices, label, first,
                       graph.edge_attr[first].clone())


def collate_masked(masked: list[MaskedGraph]) -> GraphBatch:
    """BatchMasking: collate plus masked_atom_indices (and connected_edge_indices) offset into the batch and the
    stacked labels."""
    _check_graphs("masked", masked, MaskedGraph)
    out = collate([m.graph for m in masked])
    out.masked_atom_indices = torch.cat([m.masked_atom_indices + out.ptr[i] for i, m in enumerate(masked)])
    out.mask_node_label = torch.cat([m.mask_node_label for m in masked], 0)
    if all(m.connected_edge_indices is not None for m in masked):
        edge_start = torch.cumsum(torch.tensor([0] + [m.graph.edge_index.shape[1] for m in masked[:-1]]), 0)
        out.connected_edge_indices = torch.cat([m.connected_edge_indices + edge_start[i]
                                                for i, m in enumerate(masked)])
        out.mask_edge_label = torch.cat([m.mask_edge_label for m in masked], 0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Context prediction


def hop_distances(num_nodes: int, edge_index: torch.Tensor, root: int) -> list[int]:
    """Shortest-path lengths (in bonds) from root by breadth-first search; -1 for nodes it cannot reach."""
    neighbours = [[] for _ in range(num_nodes)]
    for u, v in edge_index.T.tolist():
        neighbours[u].append(v)
    dist = [-1] * num_nodes
    dist[root] = 0
    queue = deque([root])
    while queue:
        u = queue.popleft()
        for v in neighbours[u]:
            if dist[v] < 0:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def induced_subgraph(graph: MolGraph, nodes: list[int]) -> MolGraph:
    """The subgraph on `nodes` (in increasing order, renumbered 0..len-1) with every edge between two of them."""
    nodes = sorted(nodes)
    new_index = torch.full((graph.num_nodes,), -1, dtype=torch.long)
    new_index[torch.tensor(nodes, dtype=torch.long)] = torch.arange(len(nodes))
    mapped = new_index[graph.edge_index]
    keep = (mapped >= 0).all(0)
    return MolGraph(graph.x[nodes], mapped[:, keep], graph.edge_attr[keep])


@dataclasses.dataclass
class SubstructContext:
    """ExtractSubstructureContextPair's output for one molecule and centre (context is None when the ring is
    empty: a molecule with no atom farther than r1 from the centre; collate_context skips those)."""

    substruct: MolGraph
    center_substruct_idx: int
    context: MolGraph | None
    overlap_context_substruct_idx: torch.Tensor | None
    substruct_nodes: list[int] = dataclasses.field(default_factory=list)  # the molecule's atom of each row
    context_nodes: list[int] = dataclasses.field(default_factory=list)


def substructure_context(graph: MolGraph, k: int = 5, r1: int = 4, r2: int = 7, root: int | None = None,
                         generator: torch.Generator | None = None) -> SubstructContext:
    """The substructure (atoms within k bonds of the centre `root`, drawn uniformly if None) and the context ring
    (atoms at distance d with r1 < d <= r2, as the official code computes it: the symmetric difference of the
    r1- and r2-hop neighbourhoods), each as an induced subgraph, and the context anchors: the ring atoms that also
    lie in the substructure (distance r1 + 1 .. k), as indices into the context graph.

    The official pre-training uses k = num_layer = 5, r1 = num_layer - 1 = 4, r2 = r1 + csize = 7, so the ring is
    distances 5..7 and the anchors the atoms at distance 5."""
    if not isinstance(graph, MolGraph):
        raise TypeError(f"graph must be a MolGraph, got {type(graph).__name__}")
    for name, v in (("k", k), ("r1", r1), ("r2", r2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if r2 <= r1:
        raise ValueError(f"r2 must be greater than r1, got r1 = {r1}, r2 = {r2}")
    n = graph.num_nodes
    if n == 0:
        raise ValueError("graph must have at least one atom")
    if root is None:
        root = int(torch.randint(n, (1,), generator=generator))
    elif not 0 <= root < n:
        raise ValueError(f"root must lie in [0, {n}), got {root}")
    dist = hop_distances(n, graph.edge_index, root)
    sub_nodes = [v for v in range(n) if 0 <= dist[v] <= k]
    ring = [v for v in range(n) if r1 < dist[v] <= r2]
    substruct = induced_subgraph(graph, sub_nodes)
    center = sub_nodes.index(root)
    if not ring:
        return SubstructContext(substruct, center, None, None, sub_nodes, [])
    context = induced_subgraph(graph, ring)
    overlap = torch.tensor([i for i, v in enumerate(ring) if dist[v] <= k], dtype=torch.long)
    return SubstructContext(substruct, center, context, overlap, sub_nodes, ring)


@dataclasses.dataclass
class ContextBatch:
    """BatchSubstructContext: the substructures and the contexts of the pairs that have a context, each batched;
    center_substruct_idx [G] and overlap_context_substruct_idx index the batched node rows, and
    batch_overlapped_context [A] is the pair of each anchor."""

    substruct: GraphBatch
    center_substruct_idx: torch.Tensor
    context: GraphBatch
    overlap_context_substruct_idx: torch.Tensor
    batch_overlapped_context: torch.Tensor

    def to(self, device) -> ContextBatch:
        return ContextBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def collate_context(pairs: list[SubstructContext]) -> ContextBatch:
    """Batches the pairs that have a context (the others are skipped, as in the official collater)."""
    _check_graphs("pairs", pairs, SubstructContext)
    kept = [p for p in pairs if p.context is not None]
    if not kept:
        raise ValueError("no pair in pairs has a context (every centre is within r1 bonds of all atoms)")
    sub = collate([p.substruct for p in kept])
    ctx = collate([p.context for p in kept])
    center = torch.tensor([p.center_substruct_idx for p in kept], dtype=torch.long) + sub.ptr[:-1]
    overlap = torch.cat([p.overlap_context_substruct_idx + ctx.ptr[i] for i, p in enumerate(kept)])
    owner = torch.repeat_interleave(torch.arange(len(kept)),
                                    torch.tensor([len(p.overlap_context_substruct_idx) for p in kept]))
    return ContextBatch(sub, center, ctx, overlap, owner)

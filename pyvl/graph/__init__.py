"""Graph inputs for the graph papers: molecules from SMILES, featurization, batching and pre-training transforms.

pyvl.graph.ogb: OGB featurization (ogb.utils.smiles2graph) and Graphormer's batching.
pyvl.graph.pretrain: the pre-training GNNs paper's featurization, batching, attribute masking and context pairs.
"""
from . import pretrain  # noqa: F401
from .ogb import GraphormerBatch, convert_to_single_emb, graphormer_batch, padded_adjacency, smiles_to_graph

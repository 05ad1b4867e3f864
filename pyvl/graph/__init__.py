"""Graph inputs for pyvl's graph models: molecules from SMILES (OGB featurization) and their batching."""
from .ogb import GraphormerBatch, convert_to_single_emb, graphormer_batch, padded_adjacency, smiles_to_graph

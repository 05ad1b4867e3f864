"""Graph inputs for the graph papers: featurization, batching and pre-training transforms."""
from . import pretrain  # noqa: F401

"""pyvl's public functional ops. Each checks its arguments, picks a backend and calls it."""
from .depthwise_conv2d import dsconv2d, depthwise_conv2d, fold_batch_norm
from .sequential_attention import sequential_attention
from .window_attention import window_attention
from .contrastive import contrastive_loss, similarity_logits
from .shortest_paths import shortest_path_nodes, shortest_paths

__all__ = ["contrastive_loss", "depthwise_conv2d", "dsconv2d", "fold_batch_norm", "sequential_attention",
           "similarity_logits", "window_attention"]
__all__ += ["shortest_path_nodes", "shortest_paths"]

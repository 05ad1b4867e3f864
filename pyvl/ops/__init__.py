"""pyvl's public functional ops. Each checks its arguments, picks a backend and calls it."""
from .depthwise_conv2d import dsconv2d, depthwise_conv2d, fold_batch_norm
from .sequential_attention import sequential_attention
from .window_attention import window_attention
from .contrastive import contrastive_loss, similarity_logits
from .message_passing import gather_scatter_add
from .shortest_paths import shortest_path_nodes, shortest_paths

__all__ = ["contrastive_loss", "depthwise_conv2d", "dsconv2d", "fold_batch_norm", "gather_scatter_add",
           "sequential_attention", "shortest_path_nodes", "shortest_paths", "similarity_logits", "window_attention"]

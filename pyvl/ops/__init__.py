"""pyvl's public functional ops. Each checks its arguments, picks a backend and calls it."""
from .depthwise_conv2d import dsconv2d, depthwise_conv2d, fold_batch_norm
from .window_attention import window_attention
from .contrastive import contrastive_loss, similarity_logits

__all__ = ["depthwise_conv2d", "dsconv2d", "fold_batch_norm", "window_attention", "similarity_logits",
           "contrastive_loss"]

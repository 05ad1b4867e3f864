"""Loads the compiled extension pyvl._C, which registers the C++ (and, where built, CUDA) kernels."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)

    LOAD_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    LOAD_ERROR = (
        f"the compiled extension pyvl._C is not built or does not load ({e}); build it with "
        "`pip install --no-build-isolation -e .` from a pyvl checkout (see README.md)"
    )


# The ops the extension declares (csrc/registration.cpp). Their kernels are looked up once, at import, so that
# the lookup is a dict access that torch.compile traces without a graph break.
COMPILED_OPS = ("depthwise_conv2d", "dsconv2d", "sequential_attention", "sequential_attention_backward",
                "window_attention", "similarity_logits", "contrastive_stats", "contrastive_stats_backward")
COMPILED_OPS += ("gather_scatter_add", "shortest_paths")
# The compiled ops that have CUDA sources (csrc/cuda/); a CUDA build must carry a CUDA kernel for each. The others
# are CPU-only (their GPU backend is Triton, or the reference where there is none).
CUDA_OPS = ("depthwise_conv2d", "dsconv2d")
# Public ops whose kernels have another name in pyvl._C.
KERNEL_OF = {"contrastive_loss": "contrastive_stats"}
_KERNELS = {
    (op, key): LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"pyvl::{op}", key)
    for op in COMPILED_OPS
    for key in ("CPU", "CUDA")
}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether pyvl::<op> has a kernel registered for the dispatch key ("CPU" or "CUDA")."""
    return _KERNELS.get((KERNEL_OF.get(op, op), dispatch_key), False)

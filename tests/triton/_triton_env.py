"""Where the Triton tier runs: in the interpreter on CPU tensors (TRITON_INTERPRET=1, the default conftest sets),
or compiled on CUDA tensors (TRITON_INTERPRET=0 and a GPU). conftest.py skips the tier when neither is possible."""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
RUNNABLE = INTERPRET or DEVICE == "cuda"

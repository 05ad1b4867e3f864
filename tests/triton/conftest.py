"""The Triton tier: runs in its own process so TRITON_INTERPRET=1 is set before anything imports triton.

Without a GPU the kernels run in the Triton interpreter on CPU tensors; with TRITON_INTERPRET=0 set by the
caller (and a GPU) the same tests run the compiled kernels on CUDA tensors.
"""
import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    from _triton_env import RUNNABLE

    if not RUNNABLE:  # TRITON_INTERPRET=0 and no CUDA device: nothing here can run
        collect_ignore_glob = ["test_*.py"]

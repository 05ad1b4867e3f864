"""Backend choice: the `backend=` argument, else PYVL_BACKEND, else the measured default; `reference` last.

Every backend states why it cannot run a problem (`reason`), in the manner of NATTEN's can_run_<backend>;
`pyvl info` prints the same reasons. The default on a GPU uses only kernels verified on a GPU (see
pyvl/_verified.py): a kernel that nobody has run on a GPU is used only when asked for by name.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import _ext, _verified

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "PYVL_BACKEND"

# Every public op (pyvl.ops), as `pyvl info` lists them; an op family appends its names when it lands.
OPS = ("depthwise_conv2d", "dsconv2d", "window_attention")
# Ops that have Triton kernels (in pyvl.kernels); an op family adds its names here when its kernels land.
TRITON_OPS = ("depthwise_conv2d", "dsconv2d", "window_attention")

def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def availability(backend: str) -> str | None:
    """None when the backend is usable on this machine for some device, else the reason it is not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return _ext.LOAD_ERROR
    if backend == "cuda":
        if _ext.LOAD_ERROR is not None:
            return _ext.LOAD_ERROR
        if not _ext.has_kernel("depthwise_conv2d", "CUDA"):
            return "pyvl._C was built without CUDA kernels (needs a CUDA build of torch and nvcc at build time)"
        if not torch.cuda.is_available():
            return "built, but no CUDA device is visible"
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err is not None:
            return err
        if not torch.cuda.is_available() and not triton_interpreting():
            return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run in the interpreter)"
        return None
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def reason(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `backend` can run `op` for tensors on `device` of `dtype`, else why not."""
    why = availability(backend)
    if why is not None:
        return why
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors, got a tensor on {device}"
        if not _ext.has_kernel(op, "CPU"):
            return f"pyvl._C has no CPU kernel for {op}"
    elif backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, got a tensor on {device}"
        if not _ext.has_kernel(op, "CUDA"):
            return f"pyvl._C has no CUDA kernel for {op}"
    elif backend == "triton":
        if op not in TRITON_OPS:
            return f"pyvl has no Triton kernel for {op}"
        if op == "window_attention" and dtype == torch.float64:
            return ("the Triton window-attention kernels run float16, bfloat16 and float32; float64 runs on the "
                    "reference backend")
        if device.type == "cuda":
            return None
        if device.type != "cpu" or not triton_interpreting():
            return f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
        if dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16 math"
    return None


def default_order(op: str, device: torch.device) -> tuple[str, ...]:
    """Backends to try, fastest first, from measurements (benchmarks/ and benchmarks/results/).

    On a GPU only kernels verified there are candidates, ordered by their measured speed; `reference` (cuDNN)
    follows. On the CPU the order per op is _CPU_ORDER, from `pyvl bench`.
    """
    if device.type == "cuda":
        return tuple(_verified.fastest_verified(op, ("cuda", "triton"))) + ("reference",)
    if device.type == "cpu":
        return _CPU_ORDER.get(op, ("cpu", "reference"))
    return ("reference",)


# From `pyvl bench` on the 2-core AMD EPYC development machine (fp32, batch 8, MobileNetV1 shapes, 2026-11-23):
# the fused C++ block beats torch's channels_last dw + relu + 1x1 + relu (geometric mean 1.16x), while the C++
# depthwise kernel alone is still slower than torch's oneDNN convolution (0.86x NCHW, 0.58x channels_last), so
# the depthwise op defaults to the reference until the kernel wins.
_CPU_ORDER = {"depthwise_conv2d": ("reference", "cpu"), "dsconv2d": ("cpu", "reference")}


def choose(op: str, backend: str | None, x: torch.Tensor) -> str:
    """The backend that runs `op` on tensors like `x`; raises RuntimeError if a named backend cannot."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if requested is not None:
        if requested not in BACKENDS:
            src = "backend" if backend is not None else ENV_VAR
            raise ValueError(f"{src} must be one of {BACKENDS}, got {requested!r}")
        why = reason(requested, op, x.device, x.dtype)
        if why is not None:
            raise RuntimeError(f"pyvl.ops.{op}: backend {requested!r} cannot run this input: {why}")
        return requested
    for name in default_order(op, x.device):
        if reason(name, op, x.device, x.dtype) is None:
            return name
    return "reference"

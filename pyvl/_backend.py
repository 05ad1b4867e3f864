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
OPS = ("depthwise_conv2d", "dsconv2d", "window_attention", "sequential_attention", "similarity_logits",
       "contrastive_loss")
OPS += ("gather_scatter_add", "shortest_paths")
# Ops that have Triton kernels (in pyvl.kernels); an op family adds its names here when its kernels land.
TRITON_OPS = ("depthwise_conv2d", "dsconv2d", "sequential_attention", "window_attention")
TRITON_OPS += ("similarity_logits", "contrastive_loss")
# Ops whose Triton kernels run float16 / bfloat16 / float32 only (float64 goes to the cpu / reference backends).
TRITON_NO_FLOAT64 = ("window_attention",)
TRITON_NO_FLOAT64 += ("similarity_logits", "contrastive_loss")

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
        if op in TRITON_NO_FLOAT64 and dtype == torch.float64:
            return (f"the Triton {op.replace('_', '-')} kernels run float16, bfloat16 and float32; float64 runs on "
                    "the reference backend")
        if device.type == "cuda":
            return None
        if device.type != "cpu" or not triton_interpreting():
            return f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
        if dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16 math"
    return None


def layout_of(x: torch.Tensor) -> str:
    """"channels_last" for a 4-D tensor dense in that memory format (and not also plain contiguous), else "nchw"."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "nchw"


def default_order(op: str, device: torch.device, layout: str = "nchw", training: bool = False) -> tuple[str, ...]:
    """Backends to try, fastest first, from measurements (benchmarks/ and benchmarks/results/).

    On a GPU only kernels verified there are candidates, ordered by their measured speed; `reference` (cuDNN)
    follows. On the CPU the order per op is _CPU_ORDER, from `pyvl bench`; an entry may be a dict by input
    layout ("nchw" / "channels_last"), with "<layout>_train" entries where forward + backward measured otherwise
    than the forward alone (training: a gradient will be taken).
    """
    if device.type == "cuda":
        return tuple(_verified.fastest_verified(op, ("cuda", "triton"))) + ("reference",)
    if device.type == "cpu":
        order = _CPU_ORDER.get(op, ("cpu", "reference"))
        if not isinstance(order, dict):
            return order
        return order.get(f"{layout}_train", order[layout]) if training else order[layout]
    return ("reference",)


# From the 2-core AMD EPYC (Zen 3) development machine, fp32, batch 8, MobileNetV1 shapes, 2026-11-23. The fused C++
# block beats torch's channels_last dw + relu + 1x1 + relu (geometric mean 1.16x). The C++ depthwise forward, per
# layout, from torch_time / pyvl_time measured interleaved in one process, single-threaded in thread CPU time (the
# machine was shared at load 10-13, where 2-thread wall times are scheduler noise): NCHW 1.36-1.44x (vectorized
# small planes; 0.96-1.9x per shape), channels_last 0.84-0.95x (register-blocked strips win the 7x7..28x28 layers,
# lose 0.6-0.9x on the 56x56 and 112x112 ones), so NCHW defaults to the kernel and channels_last to the reference.
# Forward + backward (`pyvl bench --ops depthwise_fwd_bwd`, quiet machine, 2 threads, 2026-11-23): NCHW 0.76x, so
# training stays on the reference. channels_last forward + backward, after the register-blocked 3x3 weight gradient
# and the stride-1 input gradient through the forward strips (stop 10): geometric mean 0.95-1.00 in three runs (was
# 0.64); 1.14-1.50x on the 112x112 to 28x28 stride-1 layers, 0.65-0.97x on the stride-2 and 14x14 / 7x7 ones. Not a
# clear win, so channels_last training stays on the reference too (backend="cpu" selects the kernels). NCHW forward
# + backward after the flat weight gradient and the upsampled strided input gradient of small planes (stop 10): 1.15
# and 1.30 in two runs (1.27 / 1.31 weighted by MobileNetV1's layer counts; 1.1-3.4x on the large layers, 0.63-0.96x
# on some 28x28 to 7x7 ones), so NCHW training now takes the C++ kernels.
# AVX-512 forward kernels (stop 11, a 2-core Sapphire Rapids VM with AVX-512, 2026-12-02, `pyvl bench --ops
# depthwise_fwd`, two runs): NCHW 1.77 / 2.05x torch, channels_last 0.95 / 1.00x (weighted 0.92 / 1.07): parity, not
# a clear win, so channels_last keeps the reference; NCHW keeps the kernels. Machines without AVX-512 run the AVX2
# kernels measured above.
# The fused block (stop 12, same AVX-512 VM, 2026-12-03, `pyvl bench --ops dsconv2d_fwd,mobilenet_v1`): after strips
# of the whole batch, the tile epilogue on the registers, the 3x3 register-blocked depthwise runs and the threads
# packing the weight, channels_last 1.24x torch channels_last (weighted 1.17; was 0.95), 1.64x torch NCHW; MobileNetV1
# eval (which now runs channels_last on the CPU) 1.52x timm NCHW and 1.25x timm channels_last. Defaults unchanged.
_CPU_ORDER = {
    "depthwise_conv2d": {"nchw": ("cpu", "reference"), "nchw_train": ("cpu", "reference"),
                         "channels_last": ("reference", "cpu")},
    "dsconv2d": ("cpu", "reference"),
}
# sequential_attention (B1 H4 N1024 d32, dense [N, N] bias, fp32, same run, 2026-11-23): the C++ forward is 2.8x the
# materializing reference (198 vs 548 ms), forward + backward on par (887 vs 824 ms), and its memory is O(N d)
# where the reference holds the [B, H, N, N] scores and probabilities; so the C++ kernels go first. Stop 10 (the
# single-pass backward, the bias read once per query block, k and v packed once): against
# F.scaled_dot_product_attention with the same bias, forward 0.85 / 1.11x and forward + backward 1.20 / 1.07x at
# N = 1024 / 4096; Graphormer's training step (slim, 8 molecules) 1.14x the eager-attention model (0.87x before).
_CPU_ORDER["sequential_attention"] = ("cpu", "reference")
# Window attention (OMP_NUM_THREADS=1 benchmarks/window_attention_cpu.py --clock process, fp32, 2026-11-23): the C++
# kernel against the eager torchvision algorithm, forward / forward+backward: Swin-T stage 1-4 at B=2 2.9/1.5,
# 1.7/1.2, 1.9/1.2, 2.0/1.3; Video Swin-T stage 1 at B=1 7.0/3.5. Faster everywhere, so it is the default.
_CPU_ORDER["window_attention"] = ("cpu", "reference")
# Contrastive family (same machine at load 10-12, fp32, 2026-11-23, pyvl bench's contrastive cases): the C++ loss
# forward + backward ran 1.04-1.15x faster than open_clip's ClipLoss at N = 8192, d = 512 (1.4x at N = 4096) with
# 32 MiB of peak RSS growth against its 1061 MiB; the C++ similarity logits ran 2.4x faster than eager
# normalize + matmul on CLIP zero-shot shapes (1000 or 7 x 100 classes against 256 images, d = 512).
# Stop 12 (the 2-core AVX-512 VM, 2026-12-03, `pyvl bench --ops contrastive_loss,similarity_logits`), with the tiles
# on the 12 x 32 AVX-512 micro-kernel: the loss forward + backward 1.35-1.82x open_clip's ClipLoss over N 1024-8192,
# d 512 / 768 (1.59x at N 8192, d 512; 32 MiB against 1057 MiB). The similarity logits forward alone ran 0.72 / 0.61x
# eager normalize + matmul there (and 0.92x in stop 10's bench on the Zen 3 machine): torch's BLAS wins that one-shot
# GEMM, so similarity_logits now defaults to the reference on the CPU (backend="cpu" still selects the kernel).
_CPU_ORDER.update({"similarity_logits": ("reference", "cpu"), "contrastive_loss": ("cpu", "reference")})
# gather_scatter_add (same machine at load ~10, fp32, 256 ZINC-like molecules: N 5817, E 12836, d 300): against
# index_select + add + index_add_, forward 3.9-7.4x and forward + backward 2.4-2.8x in single-thread CPU time
# (`OMP_NUM_THREADS=1 python -m pyvl._bench_gnn`, interleaved in one process, two runs), 6.1x / 4.7x in `pyvl bench --ops
# gather_scatter_add` at 2 threads; torch_geometric's propagate no faster than index_add_. GIN pre-training step
# (`pyvl bench --ops gin_pretrain_step`, 128 molecules) 1.57x. So the C++ kernel goes first.
_CPU_ORDER["gather_scatter_add"] = ("cpu", "reference")
# shortest_paths (OMP_NUM_THREADS=1 pyvl bench --ops shortest_paths --repeats 5, 2-core machine at load 7,
# 2026-11-23): on 256 molecule-sized graphs (10-45 nodes) the C++ BFS took 16.8 ms, 29x less than the PyTorch
# Floyd-Warshall reference, 17x NumPy Floyd-Warshall, 10x SciPy's csgraph BFS; on 4 graphs of 150-250 nodes 51x NumPy
# Floyd-Warshall, 7x SciPy. So the C++ kernel goes first.
_CPU_ORDER["shortest_paths"] = ("cpu", "reference")


def choose(op: str, backend: str | None, x: torch.Tensor, training: bool = False) -> str:
    """The backend that runs `op` on tensors like `x`; raises RuntimeError if a named backend cannot. training: a
    gradient will be taken (the default may then differ, see default_order)."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if requested is not None:
        if requested not in BACKENDS:
            src = "backend" if backend is not None else ENV_VAR
            raise ValueError(f"{src} must be one of {BACKENDS}, got {requested!r}")
        why = reason(requested, op, x.device, x.dtype)
        if why is not None:
            raise RuntimeError(f"pyvl.ops.{op}: backend {requested!r} cannot run this input: {why}")
        return requested
    for name in default_order(op, x.device, layout_of(x), training):
        if reason(name, op, x.device, x.dtype) is None:
            return name
    return "reference"

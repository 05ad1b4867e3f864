"""`pyvl bench`: pyvl against the peers a user would otherwise run, side by side in one run.

    pyvl bench                       # quick: every MobileNetV1 depthwise shape + the whole model, a few minutes
    pyvl bench --sizes full --out results/
    pyvl bench --ops depthwise_fwd,dsconv2d_fwd --dtype bfloat16 --backend cpu

The case definitions live here rather than in benchmarks/: `pyvl bench` must work from an installed wheel,
which ships no benchmarks/ folder. benchmarks/bench_depthwise_conv2d.py (pytest-benchmark) imports them from
here, so both runners time exactly the same problems.

Every number is a ratio peer_time / pyvl_time (> 1: pyvl is faster); absolute times hold only for the machine
they were taken on, which the JSON records with them.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ._bench_window import WINDOW_OPS, window_cases
from ._bench_contrastive import CONTRASTIVE_OPS, contrastive_cases
from ._bench_coop import COOP_OPS, coop_cases
from ._bench_probvlm import PROBVLM_OPS, probvlm_cases
from ._bench_styleclip import STYLECLIP_OPS, styleclip_cases
from ._bench_gnn import GNN_MODEL_OPS, GNN_OPS, gnn_cases
from ._bench_graph import GRAPH_MODEL_OPS, GRAPH_OPS, graph_cases

OPS = ("depthwise_fwd", "depthwise_fwd_bwd", "dsconv2d_fwd", "mobilenet_v1") + WINDOW_OPS + ("sequential_attention",) \
    + CONTRASTIVE_OPS + COOP_OPS + PROBVLM_OPS + STYLECLIP_OPS + GRAPH_OPS + GNN_OPS
# Whole-model cases: fewer repeats, and pyvl's default backend choice (what a user of the model gets).
MODEL_OPS = ("mobilenet_v1", "swin_model") + COOP_OPS + PROBVLM_OPS + STYLECLIP_OPS + GRAPH_MODEL_OPS + GNN_MODEL_OPS
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Skip(Exception):
    """A case that cannot run here (a missing model, a backend that refuses the dtype); the reason is reported."""


# --------------------------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class DwShape:
    """One depthwise layer of MobileNetV1 (3x3, pad 1) and the 1x1 convolution that follows it."""

    C: int
    H: int
    stride: int
    C_out: int  # the pointwise layer's output channels, for the fused block
    count: int = 1  # how many MobileNetV1 layers have this shape

    def label(self, N: int) -> str:
        return f"N{N} C{self.C} {self.H}x{self.H} s{self.stride}"


# MobileNetV1 (Howard et al. 2017, Table 1), input 224: the 13 depthwise layers. The five 512x14 stride-1 layers
# are one shape, timed once; `count` weighs it 5x in the network-weighted geometric mean, so that figure says
# what the network sees, while the plain geometric mean treats every distinct shape alike.
MOBILENET_V1_DW = (
    DwShape(32, 112, 1, 64),
    DwShape(64, 112, 2, 128),
    DwShape(128, 56, 1, 128),
    DwShape(128, 56, 2, 256),
    DwShape(256, 28, 1, 256),
    DwShape(256, 28, 2, 512),
    DwShape(512, 14, 1, 512, count=5),
    DwShape(512, 14, 2, 1024),
    DwShape(1024, 7, 1, 1024),
)


@dataclass(frozen=True)
class SizeSet:
    shapes: tuple[DwShape, ...]
    batches: dict  # device type -> batch sizes to run
    warmup: int
    repeats: int
    model_batch: dict
    model_resolution: int
    model_repeats: int
    copy_mib: dict  # the copy-bandwidth probe: large enough to leave the last-level cache
    max_case_s: float = math.inf  # timed seconds per case beyond which repeats shrink (see time_interleaved)
    min_repeat_s: float = 0.02  # shortest timed repeat; scheduler noise on a shared machine is a few ms
    attention_n: dict = field(default_factory=lambda: {"cpu": (1024, 4096), "cuda": (1024, 4096, 16384)})


SIZES = {
    # quick (default): one batch per device, few repeats, at most ~2.5 s of timing per case (46 cases + the
    # model); about 2-3 minutes on 2 CPU cores even while a kernel is still slow.
    "quick": SizeSet(MOBILENET_V1_DW, {"cpu": (8,), "cuda": (64,)}, warmup=1, repeats=5,
                     model_batch={"cpu": 8, "cuda": 64}, model_resolution=224, model_repeats=2,
                     copy_mib={"cpu": 128, "cuda": 1024}, max_case_s=2.5),
    # full: adds batch 1 (latency: per-call overhead such as custom_op's ~10 us shows there) and more repeats.
    "full": SizeSet(MOBILENET_V1_DW, {"cpu": (1, 8), "cuda": (1, 64)}, warmup=3, repeats=15,
                    model_batch={"cpu": 8, "cuda": 64}, model_resolution=224, model_repeats=5,
                    copy_mib={"cpu": 256, "cuda": 2048},
                    attention_n={"cpu": (1024, 4096, 16384), "cuda": (1024, 4096, 16384)}),
    # tiny: for tests/test_bench.py only (hidden from --help); every code path in a few seconds.
    "tiny": SizeSet((DwShape(8, 16, 1, 16), DwShape(16, 16, 2, 32, count=2)), {"cpu": (2,), "cuda": (2,)},
                    warmup=1, repeats=2, model_batch={"cpu": 1, "cuda": 1}, model_resolution=64, model_repeats=1,
                    copy_mib={"cpu": 8, "cuda": 64}, min_repeat_s=0.0, attention_n={"cpu": (64,), "cuda": (64,)}),
}


@dataclass
class Built:
    """The callables of one case, ready to time: pyvl's and each peer's, over tensors made once."""

    pyvl: Callable[[], object]
    peers: dict  # peer name -> callable
    nbytes: int | None  # bytes a perfect kernel moves once (inputs + weights + outputs); None: not meaningful
    backend: str | None = None  # the pyvl backend that runs, as pyvl chose it
    skipped: dict = field(default_factory=dict)  # peer name -> why that peer cannot run here (the others still do)
    # name -> callable: yardsticks for the fastest any kernel could be, timed in the same run beside pyvl and the
    # peers; the memory-bound ops give a copy of their bytes (copy_floor). A floor may instead be a dict of
    # alternatives (name -> callable), ways of doing the same work, of which the fastest counts. The row's ceiling
    # is the peer's time over the slowest floor.
    floors: dict = field(default_factory=dict)


@dataclass
class Case:
    op: str
    layout: str  # the layout of pyvl's input
    shape: str
    N: int
    count: int
    build: Callable[[torch.device, torch.dtype, str | None], Built]
    params: dict = field(default_factory=dict)
    # ("module:function", kwargs, warmup kwargs): how a fresh process rebuilds this case (the function is called as
    # function(device, dtype, backend, **kwargs) and returns a Built), so that its CPU peak memory can be measured
    # there (subprocess_peak_memory). None: no CPU peak memory for this case.
    memory_probe: tuple | None = None


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _chosen_backend(op, backend, x):
    from pyvl import _backend

    try:
        return _backend.choose(op, backend, x)
    except (RuntimeError, ValueError) as e:
        raise Skip(str(e)) from None


def _dw_tensors(N, s: DwShape, device, dtype, layout):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, s.C, s.H, s.H, generator=gen).to(device, dtype)
    w = torch.randn(s.C, 1, 3, 3, generator=gen).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w


def _depthwise_fwd(N, s: DwShape, layout):
    def build(device, dtype, backend):
        import pyvl

        x, w = _dw_tensors(N, s, device, dtype, layout)
        chosen = _chosen_backend("depthwise_conv2d", backend, x)
        y = F.conv2d(x, w, None, s.stride, 1, 1, s.C)

        def run_pyvl():
            return pyvl.ops.depthwise_conv2d(x, w, stride=s.stride, padding=1, backend=backend)

        def run_torch():
            return F.conv2d(x, w, None, s.stride, 1, 1, s.C)

        nbytes = _nbytes(x, w, y)
        return Built(run_pyvl, {f"torch {layout}": run_torch}, nbytes, chosen,
                     floors=copy_floor(nbytes, device, dtype))

    return build


def _depthwise_fwd_bwd(N, s: DwShape, layout):
    def build(device, dtype, backend):
        import pyvl

        x, w = _dw_tensors(N, s, device, dtype, layout)
        chosen = _chosen_backend("depthwise_conv2d", backend, x)
        x.requires_grad_(True)
        w.requires_grad_(True)
        y = F.conv2d(x, w, None, s.stride, 1, 1, s.C).detach()
        grad = torch.randn_like(y)  # randn_like keeps y's layout

        # autograd.grad rather than .backward(): nothing accumulates into .grad between repeats.
        def run_pyvl():
            out = pyvl.ops.depthwise_conv2d(x, w, stride=s.stride, padding=1, backend=backend)
            return torch.autograd.grad(out, (x, w), grad)

        def run_torch():
            return torch.autograd.grad(F.conv2d(x, w, None, s.stride, 1, 1, s.C), (x, w), grad)

        # Forward reads x, w and writes y; backward reads grad, x, w and writes grad_x, grad_w.
        nbytes = 3 * _nbytes(x, w) + 2 * _nbytes(y)
        return Built(run_pyvl, {f"torch {layout}": run_torch}, nbytes, chosen,
                     floors=copy_floor(nbytes, device, dtype))

    return build


def _dsconv2d_fwd(N, s: DwShape):
    # pyvl runs channels_last (the layout of its fused CPU/GPU kernels: channels are the contiguous, vectorised
    # axis of the 1x1 matmul) and meets two peers: torch in channels_last (the fast eager choice) and torch in
    # NCHW (what a model runs unless someone changes its layout).
    def build(device, dtype, backend):
        import pyvl

        x, dw = _dw_tensors(N, s, device, dtype, "channels_last")
        gen = torch.Generator().manual_seed(1)
        dw_b = torch.randn(s.C, generator=gen).to(device, dtype)
        pw = (torch.randn(s.C_out, s.C, 1, 1, generator=gen) / math.sqrt(s.C)).to(device, dtype)
        pw_b = torch.randn(s.C_out, generator=gen).to(device, dtype)
        chosen = _chosen_backend("dsconv2d", backend, x)
        x_nchw = x.contiguous()

        def torch_depthwise(inp):
            return F.relu(F.conv2d(inp, dw, dw_b, s.stride, 1, 1, s.C))

        def torch_block(inp):
            return F.relu(F.conv2d(torch_depthwise(inp), pw, pw_b))

        def run_pyvl():
            return pyvl.ops.dsconv2d(x, dw, pw, dw_b, pw_b, stride=s.stride, padding=1, backend=backend)

        # The pointwise 1x1 alone: the block cannot run faster than its matmul does in PyTorch, unless pyvl's
        # micro-kernel beat PyTorch's fastest GEMM (the floor would then show it). Two ways, the faster counts:
        # one torch.mm into a preallocated output (the BLAS), and torch's own 1x1 convolution of the channels_last
        # intermediate (oneDNN). On a 2-core AMD EPYC (Zen 5) the convolution ran 1.5-2x faster than torch.mm (460
        # GFLOP/s at C 512 14x14), so torch.mm alone put the floor above torch's whole block.
        mid = torch_depthwise(x)
        y = F.relu(F.conv2d(mid, pw, pw_b))  # torch_block(x), from the intermediate the floor needs anyway
        a = mid.permute(0, 2, 3, 1).reshape(-1, s.C).contiguous()
        pw_t = pw.reshape(s.C_out, s.C).t().contiguous()
        mm_out = torch.empty(a.shape[0], s.C_out, device=device, dtype=dtype)
        nbytes = _nbytes(x, dw, dw_b, pw, pw_b, y)
        return Built(run_pyvl, {"torch channels_last": lambda: torch_block(x),
                                "torch nchw": lambda: torch_block(x_nchw)}, nbytes, chosen,
                     floors={**copy_floor(nbytes, device, dtype),
                             "pointwise": {"torch.mm": lambda: torch.mm(a, pw_t, out=mm_out),
                                           "conv 1x1": lambda: F.conv2d(mid, pw, pw_b)}})

    return build


def _mobilenet_v1(N, resolution):
    def build(device, dtype, backend):
        # pyvl's side first: importing timm costs seconds, wasted when the conversion is missing anyway.
        try:
            from pyvl.interop import from_timm
        except ImportError:
            raise Skip("pyvl.interop.from_timm does not exist in this pyvl") from None
        try:
            import timm
        except ImportError:
            raise Skip("timm is not installed (pip install timm)") from None
        # Random weights: the time does not depend on their values, and nothing is downloaded.
        peer = timm.create_model("mobilenetv1_100", pretrained=False).eval().to(device, dtype)
        try:
            with _pyvl_backend_env(backend):
                # a copy: a conversion that swaps modules in place must not turn the peer into pyvl too
                model = from_timm(copy.deepcopy(peer)).eval().to(device, dtype)
        except (NotImplementedError, ValueError) as e:  # from_timm's refusal names what it does not support
            raise Skip(f"pyvl.interop.from_timm cannot convert mobilenetv1_100: {e}") from None
        x = torch.randn(N, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(device, dtype)

        def run_pyvl():
            with torch.inference_mode(), _pyvl_backend_env(backend):
                return model(x)

        def run_timm():
            with torch.inference_mode():
                return peer(x)

        # timm's fastest layout as a second peer: the same model and image in channels_last, which oneDNN prefers
        # on the CPU (pyvl's model picks its layout itself, so it gets the NCHW image as a user would pass it).
        peer_cl = copy.deepcopy(peer).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def run_timm_cl():
            with torch.inference_mode():
                return peer_cl(x_cl)

        chosen = _chosen_backend("dsconv2d", backend, x)
        # A whole network's traffic depends on what it keeps in cache, so GB/s would mislead; times and ratio only.
        return Built(run_pyvl, {"timm nchw": run_timm, "timm channels_last": run_timm_cl}, None, chosen)

    return build


def attention_problem(device, dtype, backend, *, N: int, heads: int = 4, d: int = 32, batch: int = 1,
                      backward: bool = False) -> Built:
    """Sequential attention with a dense float bias [N, N] shared by the heads (Swin V2's relative position bias,
    Graphormer's spatial bias) against F.scaled_dot_product_attention with the same bias as attn_mask; backward:
    gradients of q, k, v (the bias a constant). Module-level, so that subprocess_peak_memory can rebuild it."""
    import pyvl

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, N, d, generator=gen).to(device, dtype) for _ in range(3))
    bias = torch.randn(N, N, generator=gen).to(device, dtype)
    chosen = _chosen_backend("sequential_attention", backend, q)

    def pyvl_fwd():
        return pyvl.ops.sequential_attention(q, k, v, bias, backend=backend)

    def sdpa_fwd():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    if not backward:
        return Built(pyvl_fwd, {"torch sdpa": sdpa_fwd}, _nbytes(q, k, v, bias, q), chosen)
    for t in (q, k, v):
        t.requires_grad_(True)
    grad = torch.randn(batch, heads, N, d, generator=gen).to(device, dtype)
    # Forward reads q, k, v, bias, writes out; backward reads grad, q, k, v, out, bias, writes three gradients.
    nbytes = _nbytes(q, k, v, bias, q) + _nbytes(grad, q, k, v, q, bias) + 3 * _nbytes(q)
    return Built(lambda: torch.autograd.grad(pyvl_fwd(), (q, k, v), grad),
                 {"torch sdpa": lambda: torch.autograd.grad(sdpa_fwd(), (q, k, v), grad)}, nbytes, chosen)


def _attention_cases(sizes) -> list:
    out = []
    for backward in (False, True):
        op = "sequential_attention_fwd_bwd" if backward else "sequential_attention_fwd"
        for N in sizes:
            kwargs = {"N": N, "backward": backward}
            params = {"B": 1, "heads": 4, "N": N, "M": N, "d": 32, "bias": [N, N], "cpu_peak": "subprocess"}
            out.append(Case(op, "bhnd", f"B1 H4 N{N} d32 bias[N,N]", 1, 1,
                            lambda dev, dt, be, kw=kwargs: attention_problem(dev, dt, be, **kw), params,
                            ("pyvl.bench:attention_problem", kwargs, {"N": 64, "backward": backward})))
    return out


def _kernel_backend(requested, device):
    """The backend whose kernels the op cases time: the one asked for, else the device's own kernels. (pyvl's
    default picks the PyTorch reference where a kernel is not yet the faster, which would time torch against
    itself; the whole-model case keeps pyvl's default, since that is what a user of the model gets.)"""
    if requested is not None:
        return requested
    from pyvl import _backend

    candidates = ("cuda", "triton") if torch.device(device).type == "cuda" else ("cpu",)
    for name in candidates:
        if _backend.availability(name) is None:
            return name
    return None


@contextmanager
def _pyvl_backend_env(backend):
    # A model has no backend= argument; PYVL_BACKEND is how a user would pick the backend for all its layers.
    if backend is None:
        yield
        return
    old = os.environ.get("PYVL_BACKEND")
    os.environ["PYVL_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYVL_BACKEND", None)
        else:
            os.environ["PYVL_BACKEND"] = old


def cases(sizes: str = "quick", device: str | torch.device = "cpu", ops=OPS) -> list[Case]:
    """The benchmark cases of a size set on a device, in running order. Shared with benchmarks/."""
    size = SIZES[sizes]
    dev = torch.device(device).type
    out = []
    for N in size.batches[dev]:
        for s in size.shapes:
            label = s.label(N)
            params = {"N": N, "C": s.C, "H": s.H, "W": s.H, "stride": s.stride, "kernel": 3, "padding": 1}
            for layout in ("nchw", "channels_last"):
                if "depthwise_fwd" in ops:
                    out.append(Case("depthwise_fwd", layout, label, N, s.count, _depthwise_fwd(N, s, layout), params))
                if "depthwise_fwd_bwd" in ops:
                    out.append(Case("depthwise_fwd_bwd", layout, label, N, s.count,
                                    _depthwise_fwd_bwd(N, s, layout), params))
            if "dsconv2d_fwd" in ops:
                out.append(Case("dsconv2d_fwd", "channels_last", label, N, s.count, _dsconv2d_fwd(N, s),
                                dict(params, C_out=s.C_out)))
    if "mobilenet_v1" in ops:
        N, r = size.model_batch[dev], size.model_resolution
        out.append(Case("mobilenet_v1", "nchw", f"N{N} 3x{r}x{r} eval", N, 1, _mobilenet_v1(N, r),
                        {"N": N, "resolution": r, "model": "timm mobilenetv1_100"}))
    out += window_cases(sizes, device, ops)
    if "sequential_attention" in ops:
        out += _attention_cases(size.attention_n[dev])
    out += contrastive_cases(sizes, device, ops)
    out += probvlm_cases(sizes, device, ops)
    out += styleclip_cases(sizes, device, ops)
    out += gnn_cases(sizes, device, ops)
    out += coop_cases(sizes, device, ops)
    out += graph_cases(sizes, device, ops)
    # Stable order: the ops in the order asked, then the shapes in network order.
    return sorted(out, key=lambda c: ops.index(c.op) if c.op in ops else ops.index("sequential_attention"))


# --------------------------------------------------------------------------------------------------------------
# Timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device) -> float:
    """Seconds for one call; CUDA events on a GPU (launches are asynchronous), perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(fns: dict, device, warmup: int, repeats: int, min_repeat_s: float = 0.0,
                     max_case_s: float = math.inf, min_repeats: int = 1) -> tuple[dict, bool]:
    """Per name, a list of timed repeats (seconds per call); and whether those are the warmup calls.

    The implementations take turns within every repeat, in an order reversed each repeat, so that a noisy
    neighbour or a clock change hits all of them alike.

    Calls shorter than `min_repeat_s` run several times per timed repeat (the same count for every name): one
    sub-millisecond call is below what perf_counter and a shared machine's scheduler let us resolve. Cases whose
    repeats would take longer than `max_case_s` in all get fewer repeats, down to `min_repeats`: it keeps the
    quick run quick when a kernel is still seconds a call, where one repeat already shows a 10x gap. Every row
    records how many repeats it got."""
    names = list(fns)
    first = {}
    for _ in range(max(1, warmup)):
        for n in names:
            t = time_once(fns[n], device)
            first[n] = min(first.get(n, math.inf), t)
    inner = max(1, min(1000, math.ceil(min_repeat_s / max(min(first.values()), 1e-7))))
    per_repeat = inner * sum(first.values())
    if per_repeat * repeats > max_case_s:
        repeats = max(min(min_repeats, repeats), int(max_case_s // per_repeat))
    _sync(device)
    if per_repeat > 4 * max_case_s:
        # Far over budget (a whole model on a slow kernel: a minute a call): the warmup calls are the sample.
        # A first call's one-off costs are small beside such a time; the row says so (one repeat, warmup_only).
        return {n: [first[n]] for n in names}, True
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            fn = fns[n]
            if inner == 1:
                times[n].append(time_once(fn, device))
            else:
                def many(fn=fn):
                    for _ in range(inner):
                        fn()
                times[n].append(time_once(many, device) / inner)
    return times, False


def peak_memory(fn, device) -> int | None:
    """Bytes allocated at the peak of one call beyond what was held before it; None on the CPU, where torch
    keeps no allocator statistics (tracemalloc does not see torch's allocations)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def peak_rss_growth(fn) -> int | None:
    """Bytes by which this process's peak resident set (VmHWM) rose above its resident set during one call of
    fn(): every allocation, torch's or a kernel's own (std::vector scratch, OpenMP stacks), that was touched.
    Linux only (the peak is reset through /proc/self/clear_refs); None elsewhere.

    Memory the process freed earlier but kept (glibc reuses its heap) is reused without growing the resident set,
    so run it in a fresh process (subprocess_peak_memory) for a figure that does not depend on history."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _proc_status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _proc_status_kib("VmHWM") - before) * 1024


def _memory_probe_main(spec_json: str) -> None:
    """The child side of subprocess_peak_memory: prints {"bytes": ...} as its last line."""
    import importlib

    spec = json.loads(spec_json)
    module, func = spec["builder"].split(":")
    builder = getattr(importlib.import_module(module), func)
    device, dtype, backend = torch.device(spec["device"]), DTYPES[spec["dtype"]], spec["backend"]

    def pick(built):
        return built.pyvl if spec["name"] == "pyvl" else built.peers[spec["name"]]

    if spec["warmup_kwargs"] is not None:  # one-off first-call costs (thread pools, dispatch caches) go first
        pick(builder(device, dtype, backend, **spec["warmup_kwargs"]))()
    fn = pick(builder(device, dtype, backend, **spec["kwargs"]))
    print(json.dumps({"bytes": peak_rss_growth(fn)}))


def subprocess_peak_memory(builder: str, kwargs: dict, name: str, device, dtype, backend,
                           warmup_kwargs: dict | None = None, timeout: float = 900) -> int | None:
    """CPU peak memory of one call: bytes by which the peak resident set grows during one call of implementation
    `name` ("pyvl" or a peer's name) of the case that `builder` makes, in a fresh Python process.

    builder is "module:function", called as function(device, dtype, backend, **kwargs) and returning a Built; its
    inputs are made before the measurement starts, so they do not count, and with warmup_kwargs (a small problem)
    a first call runs before it. torch keeps no CPU allocator statistics and tracemalloc does not see its
    allocations; the resident set sees every allocation, torch's and a C++ kernel's own. None when the child
    fails or the platform cannot tell."""
    spec = {"builder": builder, "kwargs": kwargs, "warmup_kwargs": warmup_kwargs, "name": name,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "backend": backend}
    code = "import sys; from pyvl.bench import _memory_probe_main; _memory_probe_main(sys.argv[1])"
    try:
        res = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                             timeout=timeout)
        return json.loads(res.stdout.strip().splitlines()[-1])["bytes"] if res.returncode == 0 else None
    except (subprocess.SubprocessError, OSError, ValueError, IndexError, KeyError):
        return None


def _copy_fn(nbytes: int, device, dtype):
    """A copy that moves `nbytes` (half read, half written) between two preallocated buffers."""
    n = max(1, nbytes // (2 * torch.empty((), dtype=dtype).element_size()))
    src = torch.ones(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_floor(nbytes: int, device, dtype) -> dict:
    """The floor of a memory-bound case: a copy of its bytes, with the same footprint and so from the same cache
    level as the case's own tensors."""
    return {"copy": _copy_fn(nbytes, device, dtype)}


def copy_bandwidth(device, dtype, mib: int, repeats: int = 5) -> float:
    """The machine's main-memory copy GB/s in this run: dst.copy_(src) over preallocated buffers larger than the
    last-level cache, counting one read and one write. (x.clone() measured 3-4x lower on the development machine:
    each call mmaps fresh pages and pays their first-touch faults, which the ops' outputs, reused by the
    allocator, do not.) Every case with a byte count also times a copy of its own size, in cache or not as the
    case is; that is the yardstick its "of copy" and "ceiling" columns use."""
    fn = _copy_fn(2 * mib * 2**20, device, dtype)
    times = time_interleaved({"copy": fn}, device, warmup=1, repeats=repeats)[0]["copy"]
    return 2 * mib * 2**20 / statistics.median(times) / 1e9


# --------------------------------------------------------------------------------------------------------------
# Environment


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device, dtype) -> dict:
    import pyvl

    return {
        "device": str(device),
        "device_name": _device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "pyvl": pyvl.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------------------------------------------
# Running and reporting


def run_case(case: Case, device, dtype, backend, warmup, repeats, copy_gbps, max_case_s=math.inf,
             min_repeat_s=0.02) -> list[dict]:
    """One row per peer; a case that cannot run gives rows with status "skipped" or "error" and the reason."""
    base = {"op": case.op, "layout": case.layout, "shape": case.shape, "count": case.count, "params": case.params}
    try:
        built = case.build(device, dtype, backend)
    except Skip as e:
        return [dict(base, peer=None, status="skipped", reason=str(e))]
    except Exception as e:  # noqa: BLE001  (one broken case must not lose the others' results)
        return [dict(base, peer=None, status="error", reason=f"{type(e).__name__}: {e}")]
    skipped = [dict(base, peer=p, status="skipped", reason=r) for p, r in built.skipped.items()]
    # every floor as {alternative: callable}; a plain floor is its own single alternative
    floors = {k: f if isinstance(f, dict) else {k: f} for k, f in built.floors.items()}
    fns = {"pyvl": built.pyvl, **built.peers,
           **{f"floor: {k}: {a}": f for k, alts in floors.items() for a, f in alts.items()}}
    try:
        times, warmup_only = time_interleaved(fns, device, warmup, repeats, min_repeat_s=min_repeat_s,
                                              max_case_s=max_case_s)
        timed = {"pyvl": built.pyvl, **built.peers}
        peaks = {n: peak_memory(f, device) for n, f in timed.items()}
        if device.type == "cpu" and case.memory_probe is not None:
            builder, kwargs, warmup_kwargs = case.memory_probe
            peaks = {n: subprocess_peak_memory(builder, kwargs, n, device, dtype, backend, warmup_kwargs)
                     for n in timed}
    except Exception as e:  # noqa: BLE001
        return [dict(base, peer=p, status="error", reason=f"{type(e).__name__}: {e}") for p in built.peers] + skipped
    finally:
        del fns

    alt_ms = {k: {a: statistics.median(times[f"floor: {k}: {a}"]) * 1e3 for a in alts} for k, alts in floors.items()}
    floor_ms = {k: min(ms.values()) for k, ms in alt_ms.items()}  # the fastest way of doing each floor's work
    floor = max(floor_ms.values()) if floor_ms else None

    def stats(name):
        t = statistics.median(times[name])
        gbps = built.nbytes / t / 1e9 if built.nbytes else None
        return {"ms": t * 1e3, "repeats": len(times[name]), "times_ms": [x * 1e3 for x in times[name]], "gbps": gbps,
                # the speed of a copy of the same bytes (same footprint, so the same cache level) over this speed
                "frac_copy": floor_ms["copy"] / (t * 1e3) if "copy" in floor_ms else None,
                "peak_mib": peaks[name] / 2**20 if peaks[name] is not None else None}

    ours = stats("pyvl")
    rows = []
    for peer in built.peers:
        theirs = stats(peer)
        # ceiling: the ratio pyvl would show if it ran as fast as the slowest floor (a kernel that moves its bytes
        # at copy speed and, for the fused block, does its matmul as fast as PyTorch's fastest); no kernel gets
        # above it.
        rows.append(dict(base, peer=peer, status="ok", backend=built.backend, bytes=built.nbytes,
                         warmup_only=warmup_only, floors_ms=floor_ms,
                         floor_alternatives_ms={k: ms for k, ms in alt_ms.items() if len(ms) > 1},
                         ceiling=theirs["ms"] / floor if floor else None,
                         pyvl=ours, peer_stats=theirs, ratio=theirs["ms"] / ours["ms"]))
    return rows + skipped


def group_key(row) -> str:
    return f"{row['op']} | pyvl {row['layout']} vs {row['peer']}"


def geomeans(rows) -> dict:
    """Per (op, layout, peer) group: the geometric mean of the ratios over distinct shapes, and the same weighted
    by how many MobileNetV1 layers have each shape (what the network sees)."""
    groups = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault(group_key(r), []).append(r)
    out = {}
    for key, rs in groups.items():
        logs = [math.log(r["ratio"]) for r in rs]
        weights = [r["count"] for r in rs]
        out[key] = {"geomean": math.exp(sum(logs) / len(logs)),
                    "geomean_network_weighted": math.exp(sum(w * l for w, l in zip(weights, logs)) / sum(weights)),
                    "shapes": len(rs)}
        if all(r.get("ceiling") for r in rs):
            out[key]["ceiling_geomean"] = math.exp(sum(math.log(r["ceiling"]) for r in rs) / len(rs))
    return out


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def format_table(rows, means, copy_gbps) -> str:
    header = ("op", "pyvl layout", "peer", "shape", "x", "pyvl ms", "peer ms", "ratio", "ceiling", "pyvl GB/s",
              "of copy", "peer GB/s", "pyvl peak MiB", "peer peak MiB")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            # a skipped or failed case: its reason runs on to the end of the line, outside the columns
            lines.append((r["op"], r["layout"], r["peer"] or "-", r["shape"], str(r["count"]),
                          f"{r['status']}: {r['reason'][:120]}"))
            continue
        p, q = r["pyvl"], r["peer_stats"]
        lines.append((r["op"], r["layout"], r["peer"], r["shape"], str(r["count"]), _fmt(p["ms"], ".3f"),
                      _fmt(q["ms"], ".3f"), _fmt(r["ratio"], ".2f"), _fmt(r.get("ceiling"), ".2f"),
                      _fmt(p["gbps"], ".3g"),
                      _fmt(p["frac_copy"], ".0%"), _fmt(q["gbps"], ".3g"), _fmt(p["peak_mib"], ".1f"),
                      _fmt(q["peak_mib"], ".1f")))
    widths = [len(h) for h in header]
    for ln in lines:
        cells = ln if len(ln) == len(header) else ln[:-1]
        for i, cell in enumerate(cells):
            widths[i] = max(widths[i], len(cell))

    def render(cells):
        out = [c.rjust(widths[i]) if i >= 4 else c.ljust(widths[i]) for i, c in enumerate(cells[:len(header)])]
        if len(cells) < len(header):
            out[-1] = cells[-1]
        return "  ".join(out).rstrip()

    text = [render(header), render(tuple("-" * w for w in widths))] + [render(ln) for ln in lines]
    text.append("")
    text.append("ratio = peer time / pyvl time (> 1: pyvl faster); times are medians; x = MobileNetV1 layers "
                "with that shape")
    text.append(f"GB/s counts inputs + weights + outputs once (fwd+bwd: also grad_out, grad_x, grad_w); "
                f"of copy = pyvl's speed over that of a copy of the same bytes timed in the same case "
                f"(main-memory copy this run: {copy_gbps:.1f} GB/s)")
    text.append("ceiling = peer time / floor time: the ratio a kernel running at the floor would show; the floor is a "
                "copy of the case's bytes (and, for dsconv2d, its pointwise matmul: the faster of torch.mm and torch's "
                "1x1 conv), whichever is slower")
    slow = [f"{r['op']} {r['shape']}" for r in rows if r.get("warmup_only")]
    if slow:
        text.append(f"timed from the warmup call only (one call far over the per-case budget): {', '.join(slow)}")
    if rows and all(r.get("pyvl", {}).get("peak_mib") is None for r in rows if r["status"] == "ok"):
        text.append("peak memory: n/a on the CPU (torch keeps no CPU allocator statistics)")
    elif any(r.get("params", {}).get("cpu_peak") for r in rows if r["status"] == "ok"):
        text.append("CPU peak memory: growth of the peak resident set during one call, each in a fresh process "
                    "(subprocess_peak_memory); n/a for the other ops")
    text.append("")
    text.append("geometric mean of ratios per group (distinct shapes / weighted by MobileNetV1 layer count; "
                "ceiling over distinct shapes):")
    kw = max((len(k) for k in means), default=0)
    for key, m in means.items():
        ceiling = f"   ceiling {m['ceiling_geomean']:6.2f}" if "ceiling_geomean" in m else ""
        text.append(f"  {key.ljust(kw)}  {m['geomean']:6.2f}  {m['geomean_network_weighted']:6.2f}"
                    f"   ({m['shapes']} shapes){ceiling}")
    return "\n".join(text)


def plot(rows, means, path, title):
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also on a headless server
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    groups = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault(group_key(r), []).append(r)
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.6 * len(groups)), squeeze=False)
    for ax, (key, rs) in zip(axes[:, 0], groups.items()):
        ratios = [r["ratio"] for r in rs]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in ratios]
        # Bars grow from the 1.0 line, up where pyvl is faster, down where slower: on a log axis a bar from the
        # bottom edge would make 0.8 look like 0.1.
        ax.bar(range(len(rs)), [v - 1 for v in ratios], bottom=1, color=colors)
        ax.set_yscale("log")
        ax.set_ylim(min(min(ratios), 1) / 1.4, max(max(ratios), 1) * 1.4)
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["shape"] + (f" (x{r['count']})" if r["count"] > 1 else "") for r in rs],
                           rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{key}   geomean {means[key]['geomean']:.2f}", fontsize=9)
        ax.set_ylabel("peer / pyvl time")
        # log scale with ratios near 1 shows no ticks by default; label the bars instead
        for i, v in enumerate(ratios):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class _Progress:
    """tqdm where installed, else one printed line per case."""

    def __init__(self, total, enabled=True):
        self.total, self.i, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, label):
        """Names the case about to run; the count moves on when it is done (done())."""
        self.i += 1
        if self.bar is not None:
            self.bar.set_description(label[:50])
        elif self.enabled:
            print(f"[{self.i}/{self.total}] {label}", file=sys.stderr, flush=True)

    def done(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _parse_ops(text):
    ops = tuple(o.strip() for o in text.split(",") if o.strip())
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise argparse.ArgumentTypeError(f"--ops takes a comma-separated subset of {','.join(OPS)}, got {text!r}")
    return ops


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvl bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_parse_ops, default=OPS, help=f"comma-separated, default all: {','.join(OPS)}")
    p.add_argument("--sizes", default="quick", choices=tuple(SIZES), metavar="{quick,full}",
                   help="quick (default, a few minutes on 2 CPU cores) or full (adds batch 1, more repeats)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--backend", default=None, help="pyvl backend to time (default: pyvl's own choice)")
    p.add_argument("--out", default="bench-out", help="folder for results.json and ratios.png (default ./bench-out)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default: from --sizes)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("pyvl bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print("pyvl bench: --repeats must be >= 1", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    size = SIZES[args.sizes]
    repeats = args.repeats or size.repeats
    # The whole model is seconds per call on a small CPU: its own, smaller repeat count unless fewer are asked.
    model_repeats = min(repeats, size.model_repeats)
    wall0 = time.perf_counter()

    env = environment(device, dtype)
    copy_gbps = copy_bandwidth(device, dtype, size.copy_mib[device.type])
    todo = cases(args.sizes, device, args.ops)
    print(f"pyvl bench: {len(todo)} cases on {env['device_name']} ({device}, {env['dtype']}, "
          f"{env['cpu_threads']} CPU threads); copy {copy_gbps:.1f} GB/s", flush=True)

    kernel_backend = _kernel_backend(args.backend, device)
    rows = []
    progress = _Progress(len(todo), enabled=not args.no_progress)
    try:
        for case in todo:
            progress.start(f"{case.op} {case.layout} {case.shape}")
            n = model_repeats if case.op in MODEL_OPS else repeats
            budget = math.inf if args.repeats else size.max_case_s  # asked-for repeats are honoured
            if case.op in MODEL_OPS:
                budget *= 4  # one figure, the one a user reads first: worth more of the run's minutes
            backend = args.backend if case.op in MODEL_OPS else kernel_backend
            rows.extend(run_case(case, device, dtype, backend, size.warmup, n, copy_gbps, budget,
                                 size.min_repeat_s))
            progress.done()
    finally:
        progress.close()

    means = geomeans(rows)
    table = format_table(rows, means, copy_gbps)
    print(table)
    for r in rows:
        if r["status"] == "skipped" and r["op"] == "mobilenet_v1":
            print(f"mobilenet_v1 skipped: {r['reason']}")

    os.makedirs(args.out, exist_ok=True)
    result = {
        "schema": 1,
        "environment": env,
        "args": {"ops": list(args.ops), "sizes": args.sizes, "device": args.device, "dtype": args.dtype,
                 "backend": args.backend, "kernel_backend": kernel_backend, "repeats": repeats, "model_repeats": model_repeats,
                 "warmup": size.warmup},
        "copy_gbps": copy_gbps,
        "peak_memory_note": None if device.type == "cuda" else
        "n/a on the CPU: torch keeps no CPU allocator statistics and tracemalloc does not see its allocations",
        "rows": rows,
        "ratios": [{"group": group_key(r), "shape": r["shape"], "count": r["count"], "ratio": r["ratio"]}
                   for r in rows if r["status"] == "ok"],
        "geomeans": means,
        "wall_s": time.perf_counter() - wall0,
    }
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    written = [json_path]
    if not args.no_plot:
        png = os.path.join(args.out, "ratios.png")
        title = f"pyvl bench, {env['device_name']}, {env['dtype']}, {env['date']}"
        if plot(rows, means, png, title):
            written.append(png)
    print(f"wrote {', '.join(written)} ({result['wall_s']:.0f} s)")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

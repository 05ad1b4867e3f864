"""Times pyvl's C++ window attention against the attention core of torchvision's Swin blocks, on the CPU.

    .venv/bin/python benchmarks/window_attention_cpu.py [--repeats 7] [--dtype float32] [--clock process]

The peer is pyvl.reference.window_attention: torchvision's algorithm step by step (pad, roll, partition, q k^T,
bias gather, shift mask, softmax, @ v, reverse, roll back), in eager PyTorch; the qkv and output projections
are not timed (they are the same linears on either side). q, k, v are views of one qkv projection output, as in
the models. Ratios are peer time / pyvl time (> 1: pyvl is faster).

--clock process times the process's CPU time instead of the wall clock: on a machine shared with other jobs it
is the steadier figure (with OMP_NUM_THREADS=1 it is the single-core time; with more threads it sums them).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyvl

# (name, B, spatial sizes, heads, window, shift); d = 32 everywhere (Swin-T / Video Swin-T).
CASES = [
    ("Swin-T stage 1", 2, (56, 56), 3, (7, 7), (3, 3)),
    ("Swin-T stage 2", 2, (28, 28), 6, (7, 7), (3, 3)),
    ("Swin-T stage 3", 2, (14, 14), 12, (7, 7), (3, 3)),
    ("Swin-T stage 4", 2, (7, 7), 24, (7, 7), (3, 3)),
    ("Video Swin-T stage 1", 1, (8, 56, 56), 3, (8, 7, 7), (4, 3, 3)),
]


def inputs(B, sizes, heads, window, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, *sizes, 3, heads, 32, generator=g).to(dtype).requires_grad_(requires_grad)
    rows = 1
    for w in window:
        rows *= 2 * w - 1
    table = (torch.randn(rows, heads, generator=g) * 0.02).to(dtype).requires_grad_(requires_grad)
    return qkv, table


def time_interleaved(fns, clock, warmup, repeats):
    """Median seconds per call of each function; they take turns within every repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, fn in fns.items():
            t0 = clock()
            fn()
            times[n].append(clock() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
    p.add_argument("--clock", default="wall", choices=["wall", "process"])
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    chosen = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.clock} clock; "
          f"median of {args.repeats}")
    print(f"{'case':24} {'fwd ms pyvl':>11} {'torch':>8} {'ratio':>6}   {'fwd+bwd ms pyvl':>15} {'torch':>8} "
          f"{'ratio':>6}")
    for name, B, sizes, heads, window, shift in chosen:
        row = []
        for backward in (False, True):
            qkv, table = inputs(B, sizes, heads, window, dtype, backward)
            grad = torch.randn(B, *sizes, heads, 32).to(dtype)

            def run(backend):
                q, k, v = qkv.unbind(-3)
                out = pyvl.ops.window_attention(q, k, v, window, shift, rel_bias_table=table, backend=backend)
                if backward:
                    out.backward(grad)
                    qkv.grad = table.grad = None

            fns = {"pyvl": lambda: run("cpu"), "torch": lambda: run("reference")}
            with torch.set_grad_enabled(backward):
                med = {n: t * 1e3 for n, t in time_interleaved(fns, clock, 2, args.repeats).items()}
            row += [med["pyvl"], med["torch"], med["torch"] / med["pyvl"]]
        print(f"{name:24} {row[0]:11.2f} {row[1]:8.2f} {row[2]:5.2f}x   {row[3]:15.2f} {row[4]:8.2f} {row[5]:5.2f}x")


if __name__ == "__main__":
    main()

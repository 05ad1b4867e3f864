"""Compile every Triton kernel in pyvl.kernels ahead of time for sm_80 / sm_90, without a GPU.

    python -m pyvl.kernels.aot --arch 80 90

Each kernels/<family>.py lists its kernels in AOT_SPECS: dicts with
    kernel     the @triton.jit function
    dtypes     element types for its pointer arguments (Triton names: "fp32", "fp16", "bf16", ...)
    constexprs values for its tl.constexpr parameters (the largest tiles its launcher picks, so the table shows
               the worst case for registers and shared memory)
    num_warps  as the launcher passes it (default 4)
    pointers   optional {arg name: Triton type} for pointers whose type does not follow `dtypes` (and for scalars
               that are not i32, e.g. "fp32")
    label      optional row name in the table (default: the kernel's name), for several specs of one kernel
    op         optional public op the kernel serves, for `pyvl info --compile` (default: dsconv2d for a kernel
               named *dsconv*, else the family's name)
Arguments named *_ptr are pointers of the spec's dtype, tl.constexpr parameters take `constexprs`, every other
argument is an i32 scalar. A new family only adds its module name to FAMILIES.

Prints shared memory (from Triton's metadata) and registers / spills (from ptxas -v) per kernel, dtype and arch;
exits 1 on any compile error or shared memory above the arch's per-block limit.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

FAMILIES = ("depthwise_conv2d", "sequential_attention", "window_attention")
FAMILIES += ("contrastive",)

# Largest dynamic shared memory one block may use (opt-in), in bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _signature(spec, dtype):
    fn = spec["kernel"]
    constexprs = spec.get("constexprs", {})
    pointers = spec.get("pointers", {})
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        else:
            sig[name] = "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: AOT spec gives no value for constexpr(s) {missing}")
    return sig


def _ptxas() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return path
    except Exception:  # older Triton without knobs, or a knob that fails to resolve
        pass
    try:
        import triton.backends.nvidia as nv

        path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    for path in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if path and os.path.exists(path):
            return path
    return None


def _ptxas_usage(ptxas, ptx: str):
    """(registers, spill bytes stored + loaded) from ptxas -v on `ptx`, for the PTX's own .target."""
    target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={target}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()}")
    log = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None,
            (int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0))


def _compile_one(job):
    """One (family, spec index, dtype, arch): its table row and whether it failed. Runs in a worker process."""
    import triton
    from triton.backends.compiler import GPUTarget

    family, index, dtype, arch = job
    spec = importlib.import_module(f"pyvl.kernels.{family}").AOT_SPECS[index]
    fn = spec["kernel"]
    label = f"{spec.get('label', fn.__name__):<32} {dtype:<5} sm_{arch:<3}"
    t0 = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn, _signature(spec, dtype), spec.get("constexprs", {}))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.get("num_warps", 4)})
        shared = compiled.metadata.shared
        ptxas = _ptxas()
        regs, spill = _ptxas_usage(ptxas, compiled.asm["ptx"]) if ptxas else ("?", "?")
    except Exception as exc:  # report every failing kernel, not only the first
        return f"{label} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", True
    limit = SHARED_LIMIT.get(arch)
    over = limit is not None and shared > limit
    row = f"{label} {shared:>8} {regs:>5} {spill:>8} {time.perf_counter() - t0:>5.1f}"
    return row + (f"  OVER the {limit} B shared-memory limit" if over else ""), over


def _work(archs, families):
    """Every (family, spec index, dtype, arch) to compile."""
    work = []
    for family in families:
        specs = importlib.import_module(f"pyvl.kernels.{family}").AOT_SPECS
        work += [(family, i, dtype, arch) for i, spec in enumerate(specs) for dtype in spec["dtypes"] for arch in archs]
    return work


def _compile_many(work, jobs=None):
    """(job, table row, failed) for each job, in order; compiles are single-threaded and independent, so they run
    in one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        for job, (row, failed) in zip(work, pool.map(_compile_one, work)):
            yield job, row, failed


def compile_all(archs, families=FAMILIES, jobs=None, out=sys.stdout) -> int:
    """Compiles every spec for every arch (in parallel processes), prints the table; returns the failures."""
    print(f"{'kernel':<32} {'dtype':<5} {'arch':<6} {'smem B':>8} {'regs':>5} {'spill B':>8} {'s':>5}", file=out)
    failures = 0
    for _, row, failed in _compile_many(_work(archs, families), jobs):
        failures += failed
        print(row, file=out, flush=True)
    if _ptxas() is None:
        print("no ptxas found: registers and spills not measured", file=out)
    return failures


def status_by_op(archs=(80, 90), families=FAMILIES) -> dict:
    """{op: {kernel: compiled for every arch and dtype without error or overflow}}, for `pyvl info --compile`.

    A kernel belongs to the fused op dsconv2d when its name says so, else to its family's op."""
    status: dict = {}
    for (family, index, _, _), _, failed in _compile_many(_work(archs, families)):
        spec = importlib.import_module(f"pyvl.kernels.{family}").AOT_SPECS[index]
        name = spec["kernel"].__name__
        op = spec.get("op") or ("dsconv2d" if "dsconv" in name else family)
        kernels = status.setdefault(op, {})
        kernels[name] = kernels.get(name, True) and not failed
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: one per core)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    failures = compile_all(args.arch, args.family, args.jobs)
    print(f"{failures} failure(s), {time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

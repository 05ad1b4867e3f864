"""The `pyvl` command: `pyvl bench` (the benchmark suite) and `pyvl info` (versions, backends, verification)."""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys

def _version_of(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run([exe] + cmd[1:], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e})"
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip() if cmd[0] == "nvcc" and lines else (lines[0].strip() if lines else "?")


def _aot_status(op: str, aot: dict | None) -> str:
    if aot is None:
        return "compiled for sm_80/sm_90: not checked here (pyvl info --compile)"
    kernels = aot.get(op)
    if not kernels:
        return "no Triton kernels found for this op"
    failed = [k for k, ok in kernels.items() if not ok]
    return "compiles for sm_80 and sm_90" if not failed else f"FAILS to compile: {', '.join(failed)}"


def info(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyvl info", description=__doc__)
    parser.add_argument("--compile", action="store_true",
                        help="also compile every Triton kernel for sm_80 and sm_90 (no GPU needed; ~1 min)")
    args = parser.parse_args(argv)

    import os

    import torch

    import pyvl
    from pyvl import _backend, _ext, _verified

    print(f"pyvl      {pyvl.__version__}  ({os.path.dirname(pyvl.__file__)})")
    print(f"python    {platform.python_version()}  {platform.machine()}")
    print(f"torch     {torch.__version__}  (CUDA build: {torch.version.cuda or 'no'}; "
          f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'})")
    try:
        import triton

        print(f"triton    {triton.__version__}  (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    except ImportError:
        print("triton    not installed")
    print(f"c++       {_version_of(['c++', '--version'])}")
    print(f"nvcc      {_version_of(['nvcc', '--version'])}")
    print(f"threads   {torch.get_num_threads()} (torch), {os.cpu_count()} CPUs")
    default = os.environ.get(_backend.ENV_VAR)
    print(f"default   {'PYVL_BACKEND=' + default if default else 'fastest available (PYVL_BACKEND unset)'}")

    aot = None
    if args.compile:
        from pyvl.kernels import aot as aot_mod

        aot = aot_mod.status_by_op()

    print("\nbackends")
    for backend in _backend.BACKENDS:
        why = _backend.availability(backend)
        print(f"  {backend:<10} {'available' if why is None else 'unavailable: ' + why}")

    print("\nops                    backend    status")
    for op in _backend.OPS:
        for backend in _backend.BACKENDS:
            if backend == "reference":
                status = "PyTorch eager; the ground truth"
            elif backend == "cpu" and _ext.KERNEL_OF.get(op, op) not in _ext.COMPILED_OPS \
                    or backend == "cuda" and _ext.KERNEL_OF.get(op, op) not in _ext.CUDA_OPS:
                print(f"  {op:<20} {backend:<10} no {'C++' if backend == 'cpu' else 'CUDA'} kernel")
                continue
            elif backend == "cpu":
                status = "built" if _ext.has_kernel(op, "CPU") else "not built"
            elif backend == "cuda":
                status = "built" if _ext.has_kernel(op, "CUDA") else "not built"
            elif op not in _backend.TRITON_OPS:
                print(f"  {op:<20} {backend:<10} no Triton kernel")
                continue
            else:
                status = _aot_status(op, aot)
            if backend in ("cuda", "triton"):
                record = _verified.status(backend, op)
                if record is None:
                    status += "; NOT verified on a GPU"
                else:
                    verdict = "verified" if record["passed"] else "FAILED"
                    status += f"; {verdict} on {record['device']} ({record['date']}, {str(record['commit'])[:10]})"
            print(f"  {op:<20} {backend:<10} {status}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pyvl {bench,info} [options]\n\n"
              "  bench   run the benchmark suite (pyvl against PyTorch and peers; table, JSON, PNG)\n"
              "  info    versions, backends, and what is built / compiled / verified on a GPU")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info(rest)
    if command == "bench":
        from pyvl import bench

        return bench.main(rest) or 0
    print(f"pyvl: unknown command {command!r} (expected bench or info)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

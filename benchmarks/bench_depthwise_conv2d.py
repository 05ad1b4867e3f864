"""pytest-benchmark entry for the depthwise-separable family: `pytest benchmarks/ --benchmark-only`.

The problems are pyvl.bench's (the MobileNetV1 depthwise layers; `cases()` builds the same tensors and callables
`pyvl bench` times), so the two runners never drift apart. pyvl.bench holds them because `pyvl bench` must run
from an installed wheel, which ships no benchmarks/ folder. Each shape is one pytest-benchmark group, pyvl and
torch side by side in it; `pyvl bench` adds the ratios, GB/s, the model and the plot.

PYVL_BENCH_DEVICE=cuda, PYVL_BENCH_DTYPE=bfloat16 and PYVL_BACKEND pick the device, dtype and pyvl backend.
"""
import os

import pytest
import torch

from pyvl import bench

DEVICE = torch.device(os.environ.get("PYVL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = bench.DTYPES[os.environ.get("PYVL_BENCH_DTYPE", "float32")]
SIZES = os.environ.get("PYVL_BENCH_SIZES", "quick")


def _params(op):
    """(case, implementation) pairs: pyvl and each peer `pyvl bench` compares it with, by the peer's name."""
    out = []
    for case in bench.cases(SIZES, DEVICE, (op,)):
        peers = ("torch channels_last", "torch nchw") if op == "dsconv2d_fwd" else (f"torch {case.layout}",)
        for impl in ("pyvl",) + peers:
            name = impl.replace("torch ", "torch-")
            out.append(pytest.param(case, impl, id=f"{case.layout}-{case.shape.replace(' ', '-')}-{name}"))
    return out


def _run(benchmark, case, impl):
    try:
        built = case.build(DEVICE, DTYPE, None)
    except bench.Skip as e:
        pytest.skip(str(e))
    fn = built.pyvl if impl == "pyvl" else built.peers[impl]
    if DEVICE.type == "cuda":
        # pytest-benchmark times with a host clock: wait for the kernel, or only the launch is measured.
        def timed():
            fn()
            torch.cuda.synchronize(DEVICE)
    else:
        timed = fn
    benchmark.group = f"{case.op} {case.layout} {case.shape}"
    benchmark.extra_info.update(case.params, backend=built.backend, bytes=built.nbytes)
    benchmark(timed)


@pytest.mark.parametrize("case, impl", _params("depthwise_fwd"))
def bench_depthwise_fwd(benchmark, case, impl):
    _run(benchmark, case, impl)


@pytest.mark.parametrize("case, impl", _params("depthwise_fwd_bwd"))
def bench_depthwise_fwd_bwd(benchmark, case, impl):
    _run(benchmark, case, impl)


@pytest.mark.parametrize("case, impl", _params("dsconv2d_fwd"))
def bench_dsconv2d_fwd(benchmark, case, impl):
    _run(benchmark, case, impl)

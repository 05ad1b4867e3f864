"""Which GPU kernels have passed on a GPU, read from the committed results in benchmarks/results/.

`scripts/gpu-check` writes one JSON file per run with, for each "<backend>/<op>", whether its CUDA tests
passed ("tests") and its measured speed-up over PyTorch ("speedups"). A kernel counts as verified on a GPU
only when the newest result that mentions it says its tests passed.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@functools.lru_cache(maxsize=None)
def load_results(results_dir: str | None = None) -> tuple[dict, ...]:
    """Every gpu-check result, oldest first (by their `date`); empty outside a source checkout."""
    directory = Path(results_dir) if results_dir else RESULTS_DIR
    results = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "tests" in data:
            data["_file"] = path.name
            results.append(data)
    return tuple(sorted(results, key=lambda r: str(r.get("date", ""))))


def status(backend: str, op: str) -> dict | None:
    """The newest record of `backend/op` on a GPU: {"passed", "device", "date", "commit", "speedup"}, or None."""
    key = f"{backend}/{op}"
    for result in reversed(load_results()):
        if key in result.get("tests", {}):
            return {
                "passed": result["tests"][key] == "passed",
                "device": result.get("device"),
                "date": result.get("date"),
                "commit": result.get("commit"),
                "speedup": result.get("speedups", {}).get(key),
            }
    return None


def fastest_verified(op: str, backends) -> list[str]:
    """The backends among `backends` verified on a GPU for `op`, fastest first by their recorded speed-up."""
    verified = [(b, status(b, op)) for b in backends]
    verified = [(b, s) for b, s in verified if s is not None and s["passed"]]
    return [b for b, s in sorted(verified, key=lambda bs: -(bs[1]["speedup"] or 0.0))]

"""Fold a GPU run's JUnit XML and bench JSON into one results file for benchmarks/results/ (see pyvl/_verified.py).

A test counts for "<backend>/<op>" when its file names the backend (tests/test_*_cuda.py -> cuda, tests/triton/ ->
triton) and its name or file names the op (dsconv -> dsconv2d, else the family's depthwise_conv2d). An op's
verdict is "passed" only if it ran at least one test and none failed or errored.
"""
import argparse
import datetime
import json
import pathlib
import subprocess
import xml.etree.ElementTree as ET

import torch

OPS = ("dsconv2d", "depthwise_conv2d")


def classify(classname: str, name: str):
    path = classname.replace(".", "/")
    backend = "triton" if "triton" in path else "cuda" if path.endswith("_cuda") or "cuda" in name else None
    if backend is None:
        return None
    op = "dsconv2d" if "dsconv" in name.lower() or "dsconv" in path else "depthwise_conv2d"
    return f"{backend}/{op}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--junit", required=True)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    tests, counts = {}, {}
    junit = pathlib.Path(args.junit)
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            key = classify(case.get("classname", ""), case.get("name", ""))
            if key is None or case.find("skipped") is not None:
                continue
            bad = case.find("failure") is not None or case.find("error") is not None
            counts[key] = counts.get(key, 0) + 1
            if bad or tests.get(key) == "failed":
                tests[key] = "failed"
            else:
                tests[key] = "passed"
    bench = {}
    for path in sorted(pathlib.Path(args.bench).glob("*.json")):
        bench = json.loads(path.read_text())
    speedups = {}
    for group, ratio in (bench.get("geomean", {}) or {}).items():
        for op in OPS:
            if op.split("_")[0] in group:
                speedups.setdefault(f"cuda/{op}", ratio)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "date": now.isoformat(timespec="seconds"),
        "commit": commit,
        "torch": torch.__version__,
        "tests": tests,
        "test_counts": counts,
        "speedups": speedups,
        "bench": bench,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-{now.strftime('%Y%m%d-%H%M%S')}-{commit[:8]}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("device", "date", "commit", "tests", "speedups")}, indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()

"""Fold a GPU run's JUnit XML and bench JSON into one results file for benchmarks/results/ (see pyvl/_verified.py).

A test counts for "<backend>/<op>" only when it ran on CUDA tensors (tests/test_*_cuda.py; the Triton interpreter
tier does not count); see classify(). An op's verdict is "passed" only if it ran at least one test and none failed or errored.
"""
import argparse
import datetime
import json
import pathlib
import subprocess
import xml.etree.ElementTree as ET

import torch



def classify(classname: str, name: str):
    """ "<backend>/<op>" a test verifies, or None. Only tests/test_<family>_cuda.py count (tests on CUDA tensors;
    the Triton interpreter tier does not); the backend is the "triton" or "cuda" in the test's name (a test naming
    neither verifies no kernel); the op is the family, except dsconv tests of the depthwise family and the
    contrastive family's two ops (similarity_logits for tests naming "similarity", else contrastive_loss)."""
    stem = classname.replace(".", "/").split("/")[-1]
    if not (stem.startswith("test_") and stem.endswith("_cuda")):
        return None
    backend = "triton" if "triton" in name else "cuda" if "cuda" in name else None
    if backend is None:
        return None
    op = stem[len("test_"):-len("_cuda")]
    if op == "depthwise_conv2d" and "dsconv" in name.lower():
        op = "dsconv2d"
    if op == "contrastive":  # one family, two ops
        op = "similarity_logits" if "similarity" in name.lower() else "contrastive_loss"
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
    # Every bench run (bench-<name>/results.json under --bench) is kept whole, every geometric mean is listed under
    # "geomeans" as "<name>: <group>", and the speed-up of each backend/op (the group that stands for it) under
    # "speedups", which pyvl._verified reads.
    bench, geomeans, speedups = {}, {}, {}
    groups = {"depthwise_conv2d": "depthwise_fwd | pyvl channels_last vs torch channels_last",
              "dsconv2d": "dsconv2d_fwd | pyvl channels_last vs torch channels_last",
              "window_attention": "window_attn_fwd_bwd | pyvl 3d vs torchvision eager",
              "contrastive_loss": "contrastive_loss | pyvl rows vs open_clip ClipLoss",
              "similarity_logits": "similarity_logits | pyvl rows vs torch eager"}
    for path in sorted(pathlib.Path(args.bench).glob("bench-*/results.json")):
        run = path.parent.name[len("bench-"):]
        bench[run] = json.loads(path.read_text())
        backend = bench[run].get("args", {}).get("backend") or run
        for group, mean in bench[run].get("geomeans", {}).items():
            geomeans[f"{run}: {group}"] = mean.get("geomean")
        for op, group in groups.items():
            mean = bench[run].get("geomeans", {}).get(group)
            if mean:
                speedups[f"{backend}/{op}"] = mean["geomean"]
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
        "geomeans": geomeans,
        "bench": bench,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-{now.strftime('%Y%m%d-%H%M%S')}-{commit[:8]}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("device", "date", "commit", "tests", "speedups", "geomeans")}, indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()

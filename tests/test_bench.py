"""pyvl bench end to end on the hidden `tiny` size set: the files and their structure, never the timings
(a shared CI machine makes any timed assertion flaky)."""
import json
import math

import pytest

from pyvl import bench


def _finite_positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    rc = bench.main(["--sizes", "tiny", "--device", "cpu", "--out", str(out), "--no-progress"])
    with open(out / "results.json") as f:
        return rc, out, json.load(f)


def test_runs_and_writes_files(result):
    rc, out, data = result
    assert rc == 0, [r for r in data["rows"] if r["status"] == "error"]
    assert (out / "ratios.png").stat().st_size > 0
    assert set(data) >= {"environment", "args", "copy_gbps", "rows", "ratios", "geomeans", "wall_s"}
    env = data["environment"]
    for key in ("device_name", "date", "git_commit", "torch", "triton", "dtype", "cpu_threads"):
        assert key in env
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    assert _finite_positive(data["copy_gbps"])


def test_rows_cover_every_case(result):
    _, _, data = result
    rows = data["rows"]
    shapes = [s.label(n) for n in bench.SIZES["tiny"].batches["cpu"] for s in bench.SIZES["tiny"].shapes]
    got = {(r["op"], r["layout"], r["peer"], r["shape"]) for r in rows if r["status"] == "ok"}
    for shape in shapes:
        for op in ("depthwise_fwd", "depthwise_fwd_bwd"):
            for layout in ("nchw", "channels_last"):
                assert (op, layout, f"torch {layout}", shape) in got
        for peer in ("torch channels_last", "torch nchw"):
            assert ("dsconv2d_fwd", "channels_last", peer, shape) in got
    for op in ("sequential_attention_fwd", "sequential_attention_fwd_bwd"):
        for N in bench.SIZES["tiny"].attention_n["cpu"]:
            assert (op, "bhnd", "torch sdpa", f"B1 H4 N{N} d32 bias[N,N]") in got
    # Window attention: every op and tiny shape has a row, timed where a pyvl kernel runs on the CPU, else skipped
    # with the reason.
    for op in bench.WINDOW_OPS:
        for s in bench.window_cases("tiny", "cpu", (op,)):
            found = [r for r in rows if r["op"] == op and r["shape"] == s.shape]
            assert found and all(r["status"] == "ok" or (r["status"] == "skipped" and r["reason"]) for r in found)
    model = [r for r in rows if r["op"] == "mobilenet_v1"]
    # One row per peer: timm in NCHW and in channels_last, against the same pyvl run; or one skipped row, with the
    # reason, where pyvl.interop.from_timm or timm is missing.
    if any(r["status"] == "skipped" for r in model):
        assert len(model) == 1 and model[0]["reason"]
    else:
        assert sorted(r["peer"] for r in model) == ["timm channels_last", "timm nchw"]
        assert all(r["status"] == "ok" for r in model)


def test_ratios_positive_finite(result):
    _, _, data = result
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert len(data["ratios"]) == len(ok) > 0
    for r in ok:
        assert _finite_positive(r["ratio"])
        assert math.isclose(r["ratio"], r["peer_stats"]["ms"] / r["pyvl"]["ms"])
        assert len(r["pyvl"]["times_ms"]) == data["args"]["repeats"] or r["op"] in bench.MODEL_OPS
        if r["bytes"] is not None:
            assert _finite_positive(r["pyvl"]["gbps"])
        if r["op"].startswith(("depthwise", "dsconv2d")):
            # memory-bound: a same-size copy is timed beside them; dsconv2d also its pointwise matmul, two ways, of
            # which the faster is the floor
            floors = {"copy", "pointwise"} if r["op"] == "dsconv2d_fwd" else {"copy"}
            assert set(r["floors_ms"]) == floors and all(_finite_positive(t) for t in r["floors_ms"].values())
            if r["op"] == "dsconv2d_fwd":
                alts = r["floor_alternatives_ms"]["pointwise"]
                assert set(alts) == {"torch.mm", "conv 1x1"} and all(_finite_positive(t) for t in alts.values())
                assert r["floors_ms"]["pointwise"] == min(alts.values())
            else:
                assert r["floor_alternatives_ms"] == {}
            assert _finite_positive(r["pyvl"]["frac_copy"])
            assert math.isclose(r["ceiling"], r["peer_stats"]["ms"] / max(r["floors_ms"].values()))
        else:
            assert r["ceiling"] is None and r["pyvl"]["frac_copy"] is None
        if r["op"].startswith("sequential_attention"):
            # CPU peak memory from the peak resident set of a fresh process (subprocess_peak_memory)
            assert r["pyvl"]["peak_mib"] is not None and r["pyvl"]["peak_mib"] >= 0
            assert r["peer_stats"]["peak_mib"] is not None and r["peer_stats"]["peak_mib"] >= 0
        else:
            assert r["pyvl"]["peak_mib"] is None  # no CPU allocator statistics, reported as n/a
    for key, m in data["geomeans"].items():
        assert _finite_positive(m["geomean"]) and _finite_positive(m["geomean_network_weighted"]), key
        assert ("ceiling_geomean" in m) == key.startswith(("depthwise", "dsconv2d")), key


def test_rejects_unknown_op():
    with pytest.raises(SystemExit):
        bench.main(["--ops", "depthwise_fwd,nope", "--no-progress"])


def test_cases_shared_with_benchmarks():
    # benchmarks/bench_depthwise_conv2d.py builds its problems from cases(); every MobileNetV1 shape is there.
    quick = bench.cases("quick", "cpu", ("depthwise_fwd",))
    assert len(quick) == 2 * len(bench.MOBILENET_V1_DW) == 18
    assert sum(s.count for s in bench.MOBILENET_V1_DW) == 13  # MobileNetV1's 13 depthwise layers


def test_peak_rss_growth_sees_an_allocation():
    # 64 MiB touched inside the call, in a fresh process (in this one, memory freed by earlier tests may be reused
    # without growing the resident set): the peak resident set grows by at least most of it.
    import subprocess
    import sys

    code = "import torch; from pyvl import bench; print(bench.peak_rss_growth(lambda: torch.ones(16 * 2**20).sum()))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    growth = res.stdout.strip().splitlines()[-1]
    if growth == "None":
        pytest.skip("no /proc/self/clear_refs on this platform")
    assert int(growth) > 48 * 2**20


@pytest.mark.parametrize("sizes,window,shift", [((9, 10), (4, 4), (2, 2)), ((3, 6, 5), (2, 3, 3), (1, 1, 1))])
def test_flex_score_mod_matches_reference(sizes, window, shift):
    # The flex peer's windows and score_mod, run by eager (uncompiled) flex_attention: no Inductor compile in CI.
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from pyvl._bench_window import _flex_score_mod, _windows
    from pyvl.reference import window_attention as ref

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, *sizes, 2, 8, generator=g) for _ in range(3))
    table = torch.randn(math.prod(2 * w - 1 for w in window), 2, generator=g)
    (qw, kw, vw), padded, nW, back = _windows(q, k, v, window, shift)
    got = back(flex.flex_attention(qw, kw, vw, score_mod=_flex_score_mod(table, window, shift, padded, nW)))
    expected = ref.window_attention(q, k, v, window, shift, rel_bias_table=table, scale=8 ** -0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

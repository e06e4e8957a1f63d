"""The GPU benchmark harness (bench/bench_gpu.py) runs end to end on CPU with tiny shapes.

This machine and CI have no GPU: the CUDA timing (events, pinned memory, the Triton path) is
not exercised here, but every section's bookkeeping, the fused-vs-reference check it performs
before timing, and its reports are.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from layerpar_fast import _ext

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import bench_gpu  # noqa: E402
import bench_ops  # noqa: E402


@pytest.mark.skipif(not _ext.available(), reason="C++ extension not built")
def test_tiny_cpu_run_writes_every_section(tmp_path):
    out, md = tmp_path / "g.json", tmp_path / "g.md"
    assert bench_gpu.main(["--device", "cpu", "--tiny", "--out", str(out), "--md", str(md)]) == 0
    res = json.loads(out.read_text())
    assert res["tiny"] is True and res["device"]["device"] == "cpu"
    assert res["copy"]["device_copy_gbs"] > 0
    # every fused op x 2 cuts x 3 factors x 2 dtypes, the coarse gradient fp32 only
    assert len(res["ops"]) == 3 * 2 * 3 * 2 + 2 * 3
    assert {r["case"].split("-")[0] for r in res["ops"]} == set(bench_gpu.FUSED_OPS)
    for r in res["ops"]:
        assert r["fused_ms"] > 0 and r["ref_ms"] > 0
        assert r["speedup"] == pytest.approx(r["ref_ms"] / r["fused_ms"])
        assert r["of_peak"] == pytest.approx(r["fused_gbs"] / res["copy"]["device_copy_gbs"])
    ring = res["ring"]
    assert ring["plain_ms_per_step"] > 0 and ring["ring_ms_per_step"] > 0 and not ring["native_ring"]
    stages = res["stages"]
    assert [r["K"] for r in stages] == [2, 4]
    for r in stages:
        assert len(r["stage_ms"]) == r["K"] == len(r["cuts"]) + 1
        assert r["max_stage_ms"] == max(r["stage_ms"])
    text = md.read_text()
    for title in ("Copy bandwidth", "Fused ops against the reference", "Staging ring", "Stage step times"):
        assert title in text
    assert "local_loss-5x8x8-s4-bf16" in text


def test_wrong_results_are_refused(monkeypatch):
    """A fast path that computes something else must stop the benchmark, not be timed."""
    real = bench_ops.make_case

    def broken(op, *a, **k):
        case = real(op, *a, **k)
        fused = case.fused
        case.fused = lambda: fused() * 1.01
        return case

    monkeypatch.setattr(bench_ops, "make_case", broken)
    timer = bench_gpu.Timer(torch.device("cpu"), rounds=1, min_s=0.0)
    with pytest.raises(AssertionError, match="differs from the reference"):
        bench_gpu.bench_ops_section(timer, "ref", None, 2, ((3, 4, 4),), 8)


def test_bad_arguments_fail_before_work(capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cpu", "--only", "copy,warp"])
    assert "unknown sections ['warp']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench_gpu.main(["--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err

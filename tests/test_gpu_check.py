"""The GPU check (bench/gpu_check.py, issue 11) runs end to end on CPU in its tiny mode.

CI has no GPU: the CUDA-only parts (sync debug mode, the GPU-against-CPU match, Triton) are not
exercised here; every section's bookkeeping, the child-process isolation, the reports, and the
recording of a failing section without stopping the others are.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402


def test_tiny_cpu_run_records_every_section(tmp_path):
    out, md = tmp_path / "x.json", tmp_path / "x.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out), "--md", str(md)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["tiny"] is True and doc["device"]["device"] == "cpu" and doc["versions"]["torch"]
    secs = doc["sections"]
    assert set(secs) == set(gpu_check.SECTIONS)
    for name, s in secs.items():
        assert s["status"] in ("ok", "pass") or s["status"].startswith("skipped"), (name, s)
        assert s["seconds"] >= 0
    assert secs["syncdebug"]["status"] == "skipped: no CUDA"
    assert secs["info"]["results"]["backends"]
    assert secs["ops"]["results"]["cases"] and secs["ops"]["results"]["copy"]["device_copy_gbs"] > 0
    m = secs["match"]["results"]
    assert isinstance(m["max_rel_loss_checked"], float) and m["max_rel_loss_checked"] <= m["tolerance"]
    assert isinstance(m["max_rel_param"], float)
    assert {r["series"] for r in m["series"]} >= {"e1 serial", "e2 parallel stage0", "e2 parallel stage1"}
    assert [r["K"] for r in secs["stages"]["results"]["rows"]] == [2, 4]
    text = md.read_text()
    for name in gpu_check.SECTIONS:
        assert f"## {name}" in text
    assert "skipped: no CUDA" in text and "Tolerance" in text


def test_a_raising_section_is_recorded_and_the_rest_runs():
    def boom(res):
        res["partial"] = 1
        raise ValueError("deliberate")
    s = gpu_check.run_section("boom", boom)
    assert s["status"] == "failed" and "ValueError: deliberate" in s["error"]
    assert s["results"] == {"partial": 1} and "traceback" in s["traceback"].lower()


def test_failing_section_does_not_stop_the_others(tmp_path):
    out, md = tmp_path / "f.json", tmp_path / "f.md"
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--in-process", "--only", "info,syncdebug",
                         "--inject-failure", "info", "--out", str(out), "--md", str(md)])
    assert rc == 1
    secs = json.loads(out.read_text())["sections"]
    assert secs["info"]["status"] == "failed" and "injected failure" in secs["info"]["error"]
    assert secs["syncdebug"]["status"] == "skipped: no CUDA"
    assert "injected failure" in md.read_text()


def test_compare_runs_judges_only_the_checked_steps():
    def run(vals):
        return {"series": {"e1 serial": vals, "e2 parallel stage0": [0.0, 1e-16]},
                "start": {"e1 serial": 0, "e2 parallel stage0": 2}, "params": {}, "stages": 2}
    r = gpu_check.compare_runs(run([2.0, 2.0, 2.0]), run([2.0, 2.001, 3.0]), checked_steps=2, tol=1e-3)
    assert r["max_rel_loss_checked"] == pytest.approx(0.001 / 2.001)
    assert r["max_rel_loss_all"] == pytest.approx(1 / 3)
    assert [s["judged"] for s in r["series"]] == [True, False]


@pytest.mark.parametrize("name,slug", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA GeForce RTX 4090", "rtx4090"), (None, "cpu")])
def test_card_slug(name, slug):
    assert gpu_check.card_slug(name) == slug

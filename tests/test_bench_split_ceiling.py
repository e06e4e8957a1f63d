"""bench/split_ceiling.py: the tiny command writes every round and consistent medians; bad input is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "split_ceiling.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_tiny_round(tmp_path) -> None:
    out = tmp_path / "c.json"
    r = _run("--model", "resnet20", "--cut", "5", "--steps", "1", "--batch", "4", "--rounds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    (row,) = d["rounds"]
    assert set(row) == {"full", "a", "b", "a_conc", "b_conc", "rho_alone", "rho_conc"}
    assert all(row[k] > 0 for k in ("full", "a", "b", "a_conc", "b_conc"))
    assert row["rho_alone"] == row["full"] / max(row["a"], row["b"])
    assert row["rho_conc"] == row["full"] / max(row["a_conc"], row["b_conc"])
    assert d["median"] == row and "rho_conc" in r.stdout


def test_bad_input_one_line() -> None:
    for args, needle in ((["--model", "resnet20", "--cut", "11"], "--cut must be in 1..10"),
                         (["--model", "nope"], "nope"), (["--rounds", "0"], ">= 1")):
        r = _run(*args)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("split_ceiling: error")]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr

"""bench/rho_model.py: the speed-up model from measured block times (tiny batch, quick)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import rho_model  # noqa: E402


def test_rho_model_rows_are_consistent(tmp_path):
    out = tmp_path / "r.json"
    assert rho_model.main(["--models", "resnet20", "--ks", "1,2,4", "--batch", "4", "--repeats", "1",
                           "--out", str(out), "--md", str(tmp_path / "r.md")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["K"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert len(r["stage_s"]) == r["K"] and len(r["cuts"]) == r["K"] - 1
        assert sum(r["stage_s"]) == pytest.approx(r["serial_step_s"])
        assert 1.0 - 1e-9 <= r["rho_balance"] <= r["K"] + 1e-9      # balance can only lose
        assert r["rho"] == pytest.approx(r["rho_balance"] / 1.065)
    assert rows[0]["rho_balance"] == pytest.approx(1.0)
    assert "| resnet20 | 4 |" in (tmp_path / "r.md").read_text()


def test_rho_model_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        rho_model.main(["--ks", "two"])
    assert e.value.code == 2 and "--ks" in capsys.readouterr().err

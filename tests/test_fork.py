"""--stop-after and --fork: a run stopped after its serial warm start and branched into runs with
other parallel-phase options gives, bit for bit, the runs trained from scratch with those options;
what a fork may not change is refused with one line and leaves nothing behind."""
from __future__ import annotations

import json

import pytest
import torch

from layerpar_fast.cli import main

QUICK = ["--subset", "256", "--test-subset", "128", "--batch-size", "64", "--no-progress", "--threads", "1"]
SPH = [*QUICK, "--method", "al", "--stages", "2", "--transport", "local", "--kappa-iters", "2",
       "--bn-recalib-batches", "1", "--schedule", "serial:1,parallel:1,serial:1", "--sharpness-gate", "0",
       "--pace-rows", "0"]


def _model(run):
    return torch.load(run / "final_model.pt", weights_only=True)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    run = tmp_path_factory.mktemp("fork") / "prefix"
    assert main(["train", *SPH, "--stop-after", "1", "--out", str(run)]) == 0
    return run


def test_stop_after_writes_a_checkpoint_and_no_final_model(stopped, capsys):
    assert (stopped / "checkpoint.pt").is_file()
    assert not (stopped / "final_model.pt").exists() and not (stopped / "summary.json").exists()
    recs = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["serial"]


@pytest.mark.parametrize("extra", [[], ["--mult-init", "grad"], ["--beta-c", "1.2"],
                                   ["--schedule", "serial:1,serial:2"]])
def test_a_fork_equals_the_run_trained_from_scratch(stopped, tmp_path, capsys, extra):
    fork, direct = tmp_path / "fork", tmp_path / "direct"
    assert main(["train", "--fork", str(stopped), "--out", str(fork), *extra]) == 0
    assert "forked from" in capsys.readouterr().out
    base = [a for a in SPH]
    if "--schedule" in extra:
        base[base.index("--schedule") + 1] = extra[extra.index("--schedule") + 1]
        extra = []
    assert main(["train", *base, *extra, "--out", str(direct)]) == 0
    assert _same(_model(fork), _model(direct))
    rf = [json.loads(x) for x in (fork / "metrics.jsonl").read_text().splitlines()]
    rd = [json.loads(x) for x in (direct / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rf] == [r["phase"] for r in rd]
    assert [r["test_acc"] for r in rf] == [r["test_acc"] for r in rd]
    cfg = json.loads((fork / "config.json").read_text())
    if "--mult-init" in extra:
        assert cfg["mult_init"] == "grad"
    assert cfg["stop_after"] is None           # the source's --stop-after does not carry over


def test_stop_then_resume_equals_the_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *SPH, "--stop-after", "2", "--out", str(a)]) == 0     # inside the parallel phase's end
    assert not (a / "final_model.pt").exists()
    assert main(["train", "--resume", str(a)]) == 0
    assert main(["train", *SPH, "--out", str(b)]) == 0
    assert _same(_model(a), _model(b))


@pytest.mark.parametrize("args, msg", [
    (["--lr", "0.5"], "--lr cannot change (the run used"),
    (["--stages", "3"], "--stages cannot change"),
    (["--epochs", "5"], "--epochs 5 differs from the run's 3"),
    (["--schedule", "serial:1,parallel:3"], "has 4 epochs, the run's serial:1,parallel:1,serial:1 3"),
    (["--schedule", "parallel:1,serial:2"], "must start with the 1 epoch(s) the run has trained (serial:1)"),
])
def test_what_a_fork_may_not_change_is_refused(stopped, tmp_path, capsys, args, msg):
    out = tmp_path / "f"
    assert main(["train", "--fork", str(stopped), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not out.exists()


def test_fork_needs_out_and_another_directory(stopped, tmp_path, capsys):
    assert main(["train", "--fork", str(stopped)]) == 2
    assert "give the new run's directory with --out" in capsys.readouterr().err
    assert main(["train", "--fork", str(stopped), "--out", str(stopped)]) == 2
    assert "--out must be another directory" in capsys.readouterr().err
    assert main(["train", "--fork", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_parallel_options_stay_fixed_once_a_parallel_epoch_ran(tmp_path, capsys):
    run = tmp_path / "p"
    assert main(["train", *SPH, "--stop-after", "2", "--out", str(run)]) == 0
    assert main(["train", "--fork", str(run), "--out", str(tmp_path / "f"), "--mult-init", "grad"]) == 2
    assert "can change only while the run has trained serial epochs only (it ran serial:1,parallel:1)" \
        in capsys.readouterr().err
    # the same options: a plain copy that continues like the source
    assert main(["train", "--fork", str(run), "--out", str(tmp_path / "g")]) == 0
    assert main(["train", "--resume", str(run)]) == 0
    assert _same(_model(tmp_path / "g"), _model(run))


def test_a_plain_fork_of_a_run_whose_schedule_changed_while_it_ran(tmp_path):
    """The source's plan edits travel with its checkpoint: a run whose phase entry the sharpness gate
    ran serial (its epochs so far: serial:2, its schedule serial:1,parallel:2,...) forks to a copy
    that continues like the source's own --resume."""
    args = [*QUICK, "--method", "al", "--stages", "2", "--transport", "local", "--kappa-iters", "2",
            "--bn-recalib-batches", "1", "--schedule", "serial:1,parallel:2,serial:1", "--sharpness-gate", "1e-9"]
    run = tmp_path / "p"
    assert main(["train", *args, "--stop-after", "2", "--out", str(run)]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert [g["epoch"] for g in state["gated"]] == [2] and [r["phase"] for r in state["records"]] == ["serial"] * 2
    assert main(["train", "--fork", str(run), "--out", str(tmp_path / "g")]) == 0
    assert main(["train", "--resume", str(run)]) == 0
    assert _same(_model(tmp_path / "g"), _model(run))


def test_a_fork_that_fails_in_the_trainer_leaves_nothing(stopped, tmp_path, capsys):
    out = tmp_path / "f"
    assert main(["train", "--fork", str(stopped), "--out", str(out), "--ds", "8"]) == 2
    err = capsys.readouterr().err
    assert "layerpar: error:" in err and "Traceback" not in err
    assert not out.exists()

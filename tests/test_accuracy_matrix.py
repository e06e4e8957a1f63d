"""bench/accuracy_matrix.py: cells, the matrix rows from per-run results, the report files."""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))

import accuracy_matrix as am  # noqa: E402


def _run(acc, wall=10.0, share=0.5):
    return {"test_acc": acc, "wall_s": wall, "parallel_share": share, "schedule": "serial:1,parallel:2,serial:1",
            "num_test": 100, "per_epoch": []}


def test_cells_cover_the_issue_matrix():
    for ds, sizes, budgets in (("mnist", ("10k", "full"), (4, 12)), ("cifar10", ("10k", "full"), (10, 18))):
        for size in sizes:
            for aug in ("aug", "noaug"):
                for e in budgets:
                    assert f"{ds}-{size}-{aug}-e{e}" in am.CELLS
    assert am.CELLS["mnist-10k-noaug-e4"]["subset"] == 10000 and am.CELLS["cifar10-full-aug-e18"]["subset"] is None
    assert am._cells("quick")[0] == "mnist-10k-noaug-e4"
    # ResNet-56 cells: their own group, not in "cifar10"; the command trains resnet56
    assert am._cells("resnet56") == ["cifar10-10k-noaug-e18-resnet56", "cifar10-10k-aug-e18-resnet56"]
    assert not set(am._cells("resnet56")) & set(am._cells("cifar10"))
    a = argparse.Namespace(data_dir="d", test_subset=2000, threads=1)
    cmd = am.train_command("cifar10-10k-aug-e18-resnet56", "default", 4, 0, a, "o")
    assert cmd[cmd.index("--model") + 1] == "resnet56" and cmd[cmd.index("--subset") + 1] == "10000"
    assert am.resolved_schedule(cmd) == "serial:12,parallel:3,serial:3"


def test_matrix_rows_average_seeds_and_compute_the_gap(tmp_path):
    res = {"mnist-10k-noaug-e4/serial-seed0": _run(97.0), "mnist-10k-noaug-e4/serial-seed1": _run(97.4),
           "mnist-10k-noaug-e4/default-K4-seed0": _run(96.0, wall=20.0),
           "mnist-10k-noaug-e4/default-K4-seed1": _run(97.0, wall=30.0),
           "mnist-10k-noaug-e4/tail50-K4-seed0": _run(96.9),
           "cifar10-10k-noaug-e10/default-K2-seed0": _run(60.0)}            # no serial run: no row
    rows = am.matrix(res, "default")
    assert len(rows) == 1
    r = rows[0]
    assert (r["dataset"], r["train_size"], r["augment"], r["epochs"], r["K"]) == ("mnist", "10k", False, 4, 4)
    assert r["seeds"] == [0, 1] and r["serial_acc"] == 97.2 and r["sph_acc"] == 96.5
    assert r["gap"] == -0.7 and r["gap_per_seed"] == [-1.0, -0.4] and r["wall_s"] == 25.0
    args = type("A", (), dict(variants="default,tail50", json=str(tmp_path / "m.json"), md=str(tmp_path / "m.md"),
                              png=str(tmp_path / "m.png")))()
    am.report(res, args)
    rows = json.load(open(tmp_path / "m.json"))
    assert rows[0]["gap"] == -0.7 and {"dataset", "train_size", "augment", "epochs", "K", "seeds", "serial_acc",
                                        "sph_acc", "gap", "parallel_share", "wall_s"} <= set(rows[0])
    md = open(tmp_path / "m.md").read()
    assert "Variant `tail50`" in md and "missed" in md and os.path.getsize(tmp_path / "m.png") > 0


def test_epochs_undone_by_the_drift_guard_are_reported(tmp_path):
    res = {"mnist-10k-noaug-e4/serial-seed0": _run(97.0), "mnist-10k-noaug-e4/serial-seed1": _run(97.4),
           "mnist-10k-noaug-e4/guard30-K2-seed0": dict(_run(96.9), undone_epochs=1),
           "mnist-10k-noaug-e4/guard30-K2-seed1": dict(_run(97.3), gated_epochs=2)}
    rows = am.matrix(res, "guard30")
    assert rows[0]["undone_epochs"] == 0.5 and rows[0]["gated_epochs"] == 1
    args = type("A", (), dict(variants="guard30", json=str(tmp_path / "m.json"), md=str(tmp_path / "m.md"),
                              png=str(tmp_path / "m.png")))()
    am.report(res, args)
    md = open(tmp_path / "m.md").read()
    assert "(+0.5 parallel epochs undone by the drift or pace guard) (1 phase entry run serial by the sharpness gate)" in md
    assert am.VARIANTS["guard30"] == ["--drift-guard", "0.3"] and am.VARIANTS["nogate"] == ["--sharpness-gate", "0"]


def test_report_carries_rows_of_cells_it_did_not_run(tmp_path):
    res = {"mnist-10k-noaug-e4/serial-seed0": _run(97.0), "mnist-10k-noaug-e4/default-K4-seed0": _run(96.8)}
    old = [{"cell": "mnist-10k-noaug-e4", "K": 4, "variant": "default", "gap": -2.0},   # re-run: replaced
           {"cell": "cifar10-10k-noaug-e10", "K": 2, "variant": "default", "dataset": "cifar10", "seeds": [0],
            "serial_acc": 65.0, "sph_acc": 66.0, "gap": 1.0, "gap_per_seed": [1.0], "parallel_share": 0.2,
            "schedule": "serial:1,parallel:2,serial:7", "wall_s": 1.0, "serial_wall_s": 2.0},
           {"cell": "cifar10-10k-noaug-e10", "K": 4, "variant": "tail50", "gap": -2.7},       # another variant: not
           {"cell": "mnist-10k-noaug-e8", "K": 2, "variant": "default", "dataset": "mnist", "seeds": [0],
            "serial_acc": 98.0, "sph_acc": 97.9, "gap": -0.1, "gap_per_seed": [-0.1], "parallel_share": 0.25,
            "schedule": "serial:2,parallel:2,serial:4", "wall_s": 1.0, "serial_wall_s": 2.0,
            "carried_from": "older.json"}]                                                 # carried twice: its origin
    (tmp_path / "old.json").write_text(json.dumps(old))
    args = type("A", (), dict(variants="default", json=str(tmp_path / "m.json"), md=str(tmp_path / "m.md"),
                              png=str(tmp_path / "m.png"), carry=str(tmp_path / "old.json")))()
    am.report(res, args)
    rows = json.load(open(tmp_path / "m.json"))
    assert [(r["cell"], r["K"]) for r in rows] == [("mnist-10k-noaug-e4", 4), ("mnist-10k-noaug-e8", 2),
                                                   ("cifar10-10k-noaug-e10", 2)]
    assert rows[0]["gap"] == -0.2 and "carried_from" not in rows[0] and rows[2]["carried_from"] == "old.json"
    assert rows[1]["carried_from"] == "older.json"
    md = open(tmp_path / "m.md").read()
    assert "cifar10-10k-noaug-e10 † | 2 |" in md and "carried over from old.json" in md


def test_an_all_serial_schedule_reuses_the_serial_baseline():
    """K = 4 at 8 epochs resolves to serial:8 (no parallel phase): the harness sees it from the
    command line alone and reuses the baseline; K = 2 keeps its parallel phase."""
    args = type("A", (), dict(data_dir="unused", test_subset=100, threads=1))()
    k4 = am.train_command("mnist-10k-noaug-e8", "default", 4, 0, args, "/tmp/x")
    k2 = am.train_command("mnist-10k-noaug-e8", "default", 2, 0, args, "/tmp/y")
    assert am.resolved_schedule(k4) == "serial:8" and am.serial_equivalent(k4)
    assert "parallel" in am.resolved_schedule(k2) and not am.serial_equivalent(k2)
    # a variant's own options count: a 12-epoch budget has a parallel phase at K = 4
    k4e12 = am.train_command("mnist-10k-noaug-e12", "default", 4, 0, args, "/tmp/z")
    assert not am.serial_equivalent(k4e12)


def test_fork_branches_every_arm_from_one_warm_start_with_the_same_results(tmp_path, monkeypatch):
    """--fork trains the serial warm start of (cell, K, seed) once and branches the arms from it:
    each arm's model equals the one its command trains from scratch, bit for bit."""
    import torch
    monkeypatch.setitem(am.CELLS, "tiny", {"dataset": "embedded", "train_size": "128", "epochs": 5,
                                           "augment": "none", "model": "mnist_resnet", "lr": 0.05, "subset": 128})
    monkeypatch.setitem(am.VARIANTS, "tinygrad", ["--mult-init", "grad", "--kappa-iters", "2", "--sharpness-gate", "0",
                                                  "--pace-rows", "0"])
    monkeypatch.setitem(am.VARIANTS, "tinydef", ["--kappa-iters", "2", "--sharpness-gate", "0", "--pace-rows", "0"])
    monkeypatch.setattr(am, "report", lambda results, args: None)

    def run(out, fork):
        args = argparse.Namespace(cells="tiny", ks="2", seeds="0", variant="tinygrad,tinydef", data_dir="unused",
                                  test_subset=64, threads=1, out=str(out), fork=fork)
        assert am.cmd_run(args) == 0
        with open(out / "results.json") as f:
            return json.load(f)["runs"]

    forked, direct = run(tmp_path / "f", True), run(tmp_path / "d", False)
    warm = am.warm_epochs(am.train_command("tiny", "tinydef", 2, 0, argparse.Namespace(
        data_dir="unused", test_subset=64, threads=1), "/tmp/x"))
    assert warm >= 1
    prefix = tmp_path / "f" / "tiny" / f"prefix-w{warm}-K2-seed0"
    assert torch.load(prefix / "checkpoint.pt", weights_only=False)["epoch"] == warm
    assert not (prefix / "final_model.pt").exists()
    for arm in ("tinydef-K2-seed0", "tinygrad-K2-seed0"):
        key = f"tiny/{arm}"
        assert forked[key]["forked_from"] == f"tiny/prefix-w{warm}-K2-seed0" and "forked_from" not in direct[key]
        assert forked[key]["test_acc"] == direct[key]["test_acc"]
        a = torch.load(tmp_path / "f" / "tiny" / arm / "final_model.pt", weights_only=True)
        b = torch.load(tmp_path / "d" / "tiny" / arm / "final_model.pt", weights_only=True)
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert forked["tiny/tinydef-K2-seed0"]["test_acc"] != forked["tiny/tinygrad-K2-seed0"]["test_acc"] or \
        not all(torch.equal(x, y) for x, y in zip(
            torch.load(tmp_path / "f" / "tiny" / "tinydef-K2-seed0" / "final_model.pt", weights_only=True).values(),
            torch.load(tmp_path / "f" / "tiny" / "tinygrad-K2-seed0" / "final_model.pt", weights_only=True).values()))


def test_the_schedule_of_an_interrupted_run_resolves(tmp_path):
    """An interrupted SPH run's directory holds a checkpoint: resolving its command's schedule must
    not trip over the `--out already holds a run` check (the harness then resumes it)."""
    args = type("A", (), dict(data_dir="unused", test_subset=100, threads=1))()
    d = tmp_path / "run"
    d.mkdir()
    (d / "checkpoint.pt").write_bytes(b"x")
    cmd = am.train_command("cifar10-10k-aug-e18", "default", 4, 0, args, str(d))
    assert am.resolved_schedule(cmd) == "serial:12,parallel:3,serial:3"
    assert am.warm_epochs(cmd) == 12 and not am.serial_equivalent(cmd)


def test_a_fork_that_would_keep_another_arms_option_is_refused(tmp_path):
    """A fork keeps the source's value of every option its command does not name: the harness
    compares the fork's configuration with the arm's own before it forks."""
    args = type("A", (), dict(data_dir="unused", test_subset=100, threads=1))()
    prefix = tmp_path / "p"
    prefix.mkdir()
    cmd = am.train_command("cifar10-10k-aug-e18", "grad-mult", 4, 0, args, str(prefix))
    cfg = json.loads(json.dumps(dict(am._build_config(cmd), stop_after=12)))
    (prefix / "config.json").write_text(json.dumps(cfg))
    import torch
    torch.save({"epoch": 12, "records": [{"phase": "serial"}] * 12, "config": cfg}, prefix / "checkpoint.pt")
    arm = am.train_command("cifar10-10k-aug-e18", "default", 4, 0, args, str(tmp_path / "d"))
    fcmd = [sys.executable, "-m", "layerpar_fast", "train", "--fork", str(prefix), "--out", str(tmp_path / "d"),
            "--schedule", am.resolved_schedule(arm)]
    assert am._fork_differs(fcmd, arm) == "--mult-init 'grad' against 'zero'"
    assert am._fork_differs(fcmd + ["--mult-init", "zero"], arm) == ""


def test_drift_rows_train_each_arm_to_its_last_parallel_epoch_and_read_its_drift(tmp_path, monkeypatch):
    """`accuracy_matrix.py drift`: every arm with a parallel phase trains up to the end of its last one
    (--stop-after), a done arm is not run again, and the table lists each parallel epoch's drift."""
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        d = cmd[cmd.index("--out") + 1]
        os.makedirs(d, exist_ok=True)
        stop = int(cmd[cmd.index("--stop-after") + 1])
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            for e in range(1, stop + 1):
                par = e > 2
                f.write(json.dumps({"epoch": e, "phase": "parallel" if par else "serial",
                                    "violation": [0.01 * e] if par else None}) + "\n")
        return type("R", (), {"returncode": 0})()

    args = type("A", (), dict(out=str(tmp_path), cells="mnist-10k-noaug-e8", ks="2,4", seeds="0", variant="default",
                              data_dir=str(tmp_path), test_subset=100, threads=1, json=str(tmp_path / "d.json"),
                              md=str(tmp_path / "d.md")))()
    rows = am.drift_rows(args, run=fake_run)
    # K = 2: serial:2,parallel:2,serial:4 -> stop after epoch 4; K = 4 at 8 epochs has no parallel phase
    assert len(calls) == 1 and calls[0][calls[0].index("--stop-after") + 1] == "4"
    assert [(r["K"], r["epochs"], r["drift"], r["max_drift"]) for r in rows] == [(2, [3, 4], [[0.03], [0.04]], 0.04)]
    assert am.drift_rows(args, run=fake_run) == rows and len(calls) == 1      # done: read, not run again
    args.no_train, args.seeds = True, "0,1"          # seed 1 not trained: left out, nothing run
    assert am.drift_rows(args, run=fake_run) == rows and len(calls) == 1
    args.no_train, args.seeds = False, "0"
    monkeypatch.setattr(am, "drift_rows", lambda a: rows)     # the command's table from the same rows
    assert am.cmd_drift(args) == 0
    md = open(tmp_path / "d.md").read()
    assert "| mnist-10k-noaug-e8 | 2 | 0 | default | `serial:2,parallel:2,serial:4` | 0.030, 0.040 | 0.040 | - | - |" in md
    assert json.load(open(tmp_path / "d.json"))[0]["max_drift"] == 0.04


def test_drift_rows_carry_the_pace_guard_s_held_in_losses_and_undone_epochs(tmp_path):
    """The drift table of a --pace-rows arm lists the held-in loss at the entry and after each kept
    parallel epoch, and the epoch the guard undid (read from the run's checkpoint)."""
    import torch

    def fake_run(cmd):
        d = cmd[cmd.index("--out") + 1]
        os.makedirs(d, exist_ok=True)
        assert cmd[cmd.index("--pace-rows") + 1] == "2048"
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:     # phase 3-4, epoch 4 undone: serial
            for e, phase in enumerate(["serial", "serial", "parallel", "serial"], 1):
                rec = {"epoch": e, "phase": phase, "violation": [0.02] if phase == "parallel" else None}
                if phase == "parallel":
                    rec.update(heldin_ref=0.5, heldin_loss=0.45)
                f.write(json.dumps(rec) + "\n")
        torch.save({"rollbacks": [{"epoch": 4, "rolled_back_why": "held-in loss", "heldin_ref": 0.45,
                                   "heldin_loss": 0.47, "violation": [0.03]}]}, os.path.join(d, "checkpoint.pt"))
        return type("R", (), {"returncode": 0})()

    args = type("A", (), dict(out=str(tmp_path), cells="mnist-10k-noaug-e8", ks="2", seeds="0", variant="pace2k",
                              data_dir=str(tmp_path), test_subset=100, threads=1, json=str(tmp_path / "d.json"),
                              md=str(tmp_path / "d.md")))()
    rows = am.drift_rows(args, run=fake_run)
    assert rows[0]["heldin"] == [[0.5, 0.45]] and rows[0]["schedule_run"] == "serial:2,parallel:1,serial:1"
    assert rows[0]["undone"] == [{"epoch": 4, "rolled_back_why": "held-in loss", "heldin_ref": 0.45,
                                  "heldin_loss": 0.47}]
    import unittest.mock
    with unittest.mock.patch.object(am, "drift_rows", lambda a: rows):
        assert am.cmd_drift(args) == 0
    md = open(tmp_path / "d.md").read()
    assert "| 0.020 | 0.020 | 0.5000, 0.4500 | epoch 4: 0.4700 vs 0.4500 |" in md

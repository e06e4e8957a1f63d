"""bench/cifar_sph.py: the commands and run names of its runs (no training here)."""
from __future__ import annotations

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import cifar_sph  # noqa: E402


def args(**kw):
    base = dict(dataset="cifar10", data_dir="d", model="resnet20", batch_size=128, lr=0.1, seed=0,
                test_subset=2000, subset=None, epochs=18, tail=None, cuts="4", set=[])
    return argparse.Namespace(**{**base, **kw})


def schedule_of(cmd):
    return cmd[cmd.index("--schedule") + 1] if "--schedule" in cmd else None


def test_default_schedules_and_names():
    a = args()
    assert cifar_sph.run_key("al-s2-shift", a) == "al-s2-shift"
    cmd = cifar_sph.run_command("al-s2-shift", a, "o")
    assert cmd[cmd.index("--epochs") + 1] == "18" and schedule_of(cmd) is None
    assert cmd[cmd.index("--parallel-augment") + 1] == "shift" and cmd[cmd.index("--cuts") + 1] == "4"
    # the default schedule of the al-s2 run (augmented serial epochs, un-augmented parallel ones:
    # --aug-parallel-share keeps 3 of 5 parallel epochs) with its parallel epochs skipped
    assert schedule_of(cifar_sph.run_command("tail-only", a, "o")) == "serial:5,idle:3,serial:10"
    assert schedule_of(cifar_sph.run_command("tail-only", args(dataset="mnist"), "o")) == "serial:5,idle:5,serial:8"
    assert schedule_of(cifar_sph.run_command("al-s2-cycles", a, "o")) == "serial:1,(parallel:3,serial:1)x3,serial:5"
    assert "--cuts" not in cifar_sph.run_command("ddp", a, "o")


def test_tail_changes_sph_and_tail_only_runs_and_their_names():
    a = args(tail=6)
    assert schedule_of(cifar_sph.run_command("al-s2-shift", a, "o")) == "serial:1,parallel:11,serial:6"
    assert schedule_of(cifar_sph.run_command("tail-only", a, "o")) == "serial:1,idle:11,serial:6"
    assert cifar_sph.run_key("al-s2-shift", a) == "al-s2-shift-tail6"
    assert cifar_sph.run_key("tail-only", a) == "tail-only-tail6"
    flip = cifar_sph.run_command("al-s2-shiftflip", a, "o")
    assert flip[flip.index("--parallel-augment") + 1] == "shift_flip" and schedule_of(flip) == "serial:1,parallel:11,serial:6"
    assert cifar_sph.run_key("al-s2-shiftflip", a) == "al-s2-shiftflip-tail6"
    # serial runs and the cycles have no tail to change: same command, same name
    for name in ("serial", "ddp", "al-s2-cycles-shift"):
        assert cifar_sph.run_key(name, a) == name
        assert cifar_sph.run_command(name, a, "o") == cifar_sph.run_command(name, args(), "o")


def test_seed_names_and_vs_serial_of_the_same_seed(tmp_path):
    a = args(seed=1, tail=6)
    assert cifar_sph.run_key("serial", a) == "serial-seed1"
    assert cifar_sph.run_key("al-s2-shift", a) == "al-s2-shift-tail6-seed1"
    row = {"schedule": "s", "stages": 2, "ds": 2, "wall_time_s": 60.0}
    results = {"serial": {**row, "stages": 1, "full_test_acc": 0.80},
               "serial-seed1": {**row, "stages": 1, "full_test_acc": 0.90},
               "al-s2-shift-tail6-seed1": {**row, "full_test_acc": 0.895}}
    meta = {"model": "resnet20", "epochs": 18, "subset": None, "test_subset": 2000, "num_test": 10000,
            "machine": "m", "command": "c"}
    cifar_sph.write_table(results, meta, str(tmp_path / "t.md"))
    line = next(x for x in (tmp_path / "t.md").read_text().splitlines() if x.startswith("| al-s2-shift-tail6-seed1"))
    assert "| -0.50 |" in line          # against serial-seed1, not against serial (seed 0)


@pytest.mark.parametrize("tail", [0, 17])
def test_a_tail_that_leaves_no_parallel_epoch_is_refused(tail, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cifar_sph.py", "--epochs", "18", "--tail", str(tail), "--only", "serial"])
    with pytest.raises(SystemExit):
        cifar_sph.main()
    assert "--tail" in capsys.readouterr().err


def test_set_options_reach_the_command_and_the_name():
    a = args(set=["beta_c=1.0"], seed=2)
    assert cifar_sph.run_key("al-s2-shift", a) == "al-s2-shift-beta_c1.0-seed2"
    cmd = cifar_sph.run_command("al-s2-shift", a, "o")
    assert cmd[cmd.index("--beta-c") + 1] == "1.0"
    assert cifar_sph.run_key("al-s2", args(set=["aux_dtype=bf16", "window=4"])) == "al-s2-aux_dtypebf16-window4"


def test_k3_and_k4_runs_are_local_time_balanced_and_use_the_library_default_tail():
    a = args(tail=8)
    for k in (3, 4):
        cmd = cifar_sph.run_command(f"al-s2-shift-k{k}", a, "o")
        assert cmd[cmd.index("--stages") + 1] == str(k) and cmd[cmd.index("--transport") + 1] == "local"
        assert cmd[cmd.index("--balance") + 1] == "time" and "--cuts" not in cmd
        assert schedule_of(cmd) == "serial:1,parallel:9,serial:8"
        assert cifar_sph.run_key(f"al-s2-shift-k{k}", a) == f"al-s2-shift-k{k}-tail8"
    # without --tail the tail-only control is the library's default schedule with its parallel epochs skipped
    assert schedule_of(cifar_sph.run_command("tail-only", args(), "o")) == "serial:5,idle:3,serial:10"


def test_sph_k3_and_k4_runs_are_the_library_defaults_in_one_process():
    from layerpar_fast.cli import _build_parser, _train_config
    for k in (3, 4):
        cmd = cifar_sph.run_command(f"sph-k{k}", args(), "o")
        assert cmd[cmd.index("--stages") + 1] == str(k) and cmd[cmd.index("--transport") + 1] == "local"
        assert not {"--schedule", "--cuts", "--balance", "--parallel-augment", "--ds"} & set(cmd)
        cfg = _train_config(_build_parser().parse_args(cmd[cmd.index("train"):]))[0]
        assert cfg.resolved_schedule() == "serial:12,parallel:3,serial:3"     # --aug-warm-share at K >= 3
        assert cifar_sph.run_key(f"sph-k{k}", args(seed=1)) == f"sph-k{k}-seed1"


def test_local_k4_rows_say_serial_time_and_list_per_stage_monitors(tmp_path):
    par = {"phase": "parallel", "test_acc": 0.5, "probe_cosine": [-0.1, 0.2, 0.5], "violation": [0.01, 0.02, 0.3]}
    results = {"serial": {"schedule": "s", "stages": 1, "ds": 1, "wall_time_s": 60.0, "full_test_acc": 0.80},
               "al-s2-shift-k4-tail8": {"schedule": "s", "stages": 4, "ds": 2, "wall_time_s": 90.0,
                                        "full_test_acc": 0.79, "transport": "local",
                                        "per_epoch": [{"epoch": 1, "phase": "serial", "test_acc": 0.4},
                                                      {"epoch": 2, **par}]}}
    meta = {"model": "resnet20", "epochs": 18, "subset": None, "test_subset": 2000, "num_test": 10000,
            "machine": "m", "command": "c"}
    cifar_sph.write_table(results, meta, str(tmp_path / "t.md"))
    text = (tmp_path / "t.md").read_text()
    row = next(x for x in text.splitlines() if x.startswith("| al-s2-shift-k4-tail8"))
    assert "4 stages in 1 process x 1 thread (serial time)" in row and "| -1.00 |" in row
    assert "1.5 min | - |" in row                      # no speed ratio for a one-process simulation
    assert "Per-stage monitors of `al-s2-shift-k4-tail8`" in text
    assert "| 2 | -0.10 | +0.20 | +0.50 | 0.010 | 0.020 | 0.300 | 50.00% |" in text


def test_rows_name_the_threads_the_recorded_command_ran_with(tmp_path):
    """--set threads=2 appends a second --threads: the row says what the run used."""
    row = {"schedule": "s", "stages": 4, "ds": 1, "wall_time_s": 60.0, "full_test_acc": 0.85, "transport": "local"}
    results = {"serial": {"schedule": "s", "stages": 1, "ds": 1, "wall_time_s": 60.0, "full_test_acc": 0.85},
               "sph-k4": dict(row, command="layerpar train --stages 4 --threads 1 --transport local --threads 2"),
               "sph-k3": dict(row, stages=3, command="layerpar train --stages 3 --threads 1")}
    meta = {"model": "resnet20", "epochs": 18, "subset": None, "test_subset": 2000, "num_test": 10000,
            "machine": "m", "command": "c"}
    cifar_sph.write_table(results, meta, str(tmp_path / "t.md"))
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert "4 stages in 1 process x 2 threads (serial time)" in next(x for x in lines if x.startswith("| sph-k4 "))
    assert "3 stages in 1 process x 1 thread (serial time)" in next(x for x in lines if x.startswith("| sph-k3 "))
    assert "| 1 x 2 threads |" in next(x for x in lines if x.startswith("| serial "))
    assert cifar_sph._threads("x --threads", 1) == 1 and cifar_sph._threads("", 2) == 2

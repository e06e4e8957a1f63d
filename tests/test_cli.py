"""Command line: a real run, its files, plotting, resume after SIGKILL, clean errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from layerpar_fast.cli import main

QUICK = ["--subset", "256", "--test-subset", "128", "--batch-size", "64", "--no-progress", "--threads", "1"]


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_train_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--method", "serial", "--epochs", "2", "--out", str(out)]) == 0
    for name in ("metrics.jsonl", "summary.json", "final_model.pt", "checkpoint.pt", "config.json"):
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2]
    for key in ("epoch", "phase", "lr", "train_loss", "test_loss", "test_acc", "epoch_time_s"):
        assert key in recs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] == recs[-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in recs)
    assert summary["config"]["epochs"] == 2 and "torch" in summary["versions"]
    assert "final test accuracy" in capsys.readouterr().out
    # the same run directory again is refused (it would overwrite a run)
    assert main(["train", *QUICK, "--method", "serial", "--epochs", "1", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # plotting it
    png = tmp_path / "plot.png"
    assert main(["plot", str(out), str(out), "--labels", "a,b", "-o", str(png)]) == 0
    assert png.stat().st_size > 10_000
    # evaluating its final model: on the run's own test subset it reproduces the last epoch's accuracy
    assert main(["eval", str(out), "--test-subset", "128"]) == 0
    line = capsys.readouterr().out
    assert f"test accuracy {100 * recs[-1]['test_acc']:.2f}%" in line and "on 128 test images" in line
    assert main(["eval", str(out)]) == 0           # the whole (embedded: 2000) test set
    assert "on 2000 test images" in capsys.readouterr().out
    assert main(["eval", str(tmp_path)]) == 2      # not a run directory
    assert "no final_model.pt there" in capsys.readouterr().err


def test_config_file_and_layer_parallel_run(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "al"\nstages = 2\nds = 2\nschedule = "serial:1,parallel:1"\n'
                   'kappa-iters = 2\nbn-recalib-batches = 2\ntransport = "local"\nsharpness-gate = 0\npace-rows = 0\n')
    out = tmp_path / "lp"
    assert main(["train", "--config", str(cfg), *QUICK, "--out", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["serial", "parallel"]
    assert "ds_test_acc" in recs[1] and len(recs[1]["violation"]) == 1


@pytest.mark.parametrize("args, msg", [
    (["--model", "vgg16"], "unknown model"),
    (["--model", "resnet7"], "6n+2"),
    (["--dataset", "svhn"], "svhn"),
    (["--epochs", "-3"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--method", "admm"], "--method"),
    (["--beta", "-1", "--method", "al", "--stages", "2", "--epochs", "4"], "--beta"),
    (["--method", "al", "--stages", "40", "--epochs", "4", "--transport", "local"], "40"),
    (["--method", "al", "--stages", "2", "--ds", "8", "--cuts", "5", "--epochs", "8", "--transport", "local"],
     "does not divide"),
])
def test_bad_options_exit_2_with_one_message(tmp_path, capsys, args, msg):
    assert main(["train", *QUICK, "--method", "serial", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layerpar: error:") and msg in err
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", *QUICK, "--out", str(blocker / "run")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_bad_options_in_a_subprocess_have_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "layerpar_fast", "train", "--method", "serial", "--model", "nope", "--out",
                        str(tmp_path / "x")], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "unknown model 'nope'" in r.stderr


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    args = [sys.executable, "-m", "layerpar_fast", "train", *QUICK, "--method", "serial", "--epochs", "3"]
    ref = tmp_path / "ref"
    subprocess.run([*args, "--out", str(ref)], check=True, capture_output=True, env=_env(), timeout=300)

    run = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())
    deadline = time.time() + 240
    ck = run / "checkpoint.pt"
    while time.time() < deadline and proc.poll() is None:
        if ck.exists() and (run / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if (run / "summary.json").exists():
        pytest.skip("the run finished before it could be killed")
    r = subprocess.run([*args[:4], "--resume", str(run), "--no-progress"], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    a = torch.load(ref / "final_model.pt")
    b = torch.load(run / "final_model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = [json.loads(x)["test_acc"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x)["test_acc"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert ra == rb


def test_resume_errors(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "no checkpoint.pt there" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "gloo:" in out and "ops:" in out


def test_train_help_shows_each_default_once_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default:" not in text and "default: None" not in text
    assert "--method {serial,penalty,al}" in text and "--ds {auto,1,2,4,8}" in text
    assert "--delay-rank" not in text and "--delay-s" not in text          # test hooks stay hidden
    for group in ("data:", "model:", "method:", "schedule and optimisation:", "distributed and devices:", "output:"):
        assert group in text


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("layerpar_fast ")


def test_plot_errors_are_one_line_with_status_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    cases = [([str(tmp_path / "missing")], "no such run directory"),
             ([str(tmp_path)], "no metrics.jsonl"),
             ([str(empty)], "no epochs recorded"),
             ([str(empty), "-o", str(tmp_path / "x.bmp")], "unknown image format"),
             ([str(empty), str(empty), "--labels", "a"], "--labels gives 1 names for 2 runs")]
    for args, msg in cases:
        assert main(["plot", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("layerpar: error:") and msg in err[0], err


def test_a_run_that_fails_early_leaves_no_run_directory(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *QUICK, "--dataset", str(tmp_path / "nope.npz"), "--out", str(run)]) == 2
    assert "layerpar: error:" in capsys.readouterr().err
    assert not run.exists()


def _start(args, run):
    return subprocess.Popen([sys.executable, "-m", "layerpar_fast", "train", *args, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def test_sigterm_stops_with_143_and_says_how_to_resume(tmp_path):
    import signal as sg
    run = tmp_path / "r"
    p = _start(["--method", "serial", "--subset", "3000", "--test-subset", "200", "--epochs", "6", "--no-progress",
                "--threads", "1"], run)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
        time.sleep(0.2)
    p.send_signal(sg.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err and f"--resume {run}" in err


def test_ctrl_c_before_the_first_epoch_says_there_is_nothing_to_resume(tmp_path):
    import signal as sg
    run = tmp_path / "r"
    p = _start(["--method", "serial", "--subset", "3000", "--test-subset", "200", "--epochs", "6", "--no-progress",
                "--threads", "1"], run)
    deadline = time.monotonic() + 60
    while not run.exists():                      # the run has started, its first epoch is not done
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
        time.sleep(0.05)
    p.send_signal(sg.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "nothing to resume" in err and "--resume" not in err
    assert not run.exists()


def test_resume_may_extend_the_schedule_and_refuses_other_changes(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *QUICK, "--method", "serial", "--epochs", "2", "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--lr", "0.5"]) == 2
    assert "--lr cannot change on --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--schedule", "serial:1"]) == 2
    assert "can only be extended" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "3", "--threads", "1"]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["schedule"] == "serial:3"
    lp = tmp_path / "p"
    assert main(["train", *QUICK, "--method", "al", "--stages", "2", "--transport", "local", "--schedule",
                 "serial:1,parallel:1", "--kappa-iters", "2", "--bn-recalib-batches", "1", "--out", str(lp)]) == 0
    assert main(["train", "--resume", str(lp), "--epochs", "4"]) == 2
    assert "give --schedule that starts with" in capsys.readouterr().err
    assert main(["train", "--resume", str(lp), "--schedule", "serial:1,parallel:1,serial:1"]) == 0


def test_resume_accepts_augment_auto_for_what_auto_resolved_to():
    """The trainer saves what --augment auto meant for the run's images; a --resume command line that
    repeats auto keeps the saved value, another concrete value is refused."""
    from layerpar_fast.cli import _resume_changes
    from layerpar_fast.config import ConfigError
    saved = {"augment": "crop_flip", "lr": 0.1}
    assert _resume_changes(saved, {"augment": "auto"}) == {}
    with pytest.raises(ConfigError, match="--augment cannot change on --resume"):
        _resume_changes(saved, {"augment": "none"})

"""--resume: a distributed run's mid-phase checkpoint continued in one process, and the options a
resumed run must keep (method, al_order, ds, the beta rule, stages)."""
from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
import torch

import test_dist as T
from layerpar_fast import cli
from layerpar_fast.config import ConfigError
from layerpar_fast.trainer import HybridTrainer

STOP_AFTER_EPOCH_1 = textwrap.dedent("""
    import sys
    import test_dist as T
    import torch.distributed as dist
    from layerpar_fast.dist import DistTrainer, init_process_group

    init_process_group(60.0)
    k = dist.get_world_size()
    tr = DistTrainer(T.tiny_config(k), sys.argv[1], data=T.tiny_data(), model=T.tiny_model(), cuts=T.CUTS[k],
                     log=lambda m: None)
    tr.plan = tr.plan[:1]                # stop after epoch 1, inside the parallel phase (checkpointed)
    tr.run()
    tr.close()
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def dist_stopped(tmp_path_factory):
    """A K = 2 distributed run (parallel:2,serial:1) stopped after its first parallel epoch."""
    base = tmp_path_factory.mktemp("dist")
    run = base / "run"
    script = base / "stop.py"
    script.write_text(STOP_AFTER_EPOCH_1)
    for code, text in T.spawn_ranks(2, [sys.executable, str(script), str(run)]):
        assert code == 0, text[-3000:]
    return run


def test_distributed_mid_phase_checkpoint_resumes_in_one_process(dist_stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dist_stopped, run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and state["phase_state"] is not None
    assert state["aux"]["files"] == ["aux-rank0-epoch1.pt", "aux-rank1-epoch1.pt"]
    assert "stores" not in state["aux"]

    tr = HybridTrainer(T.tiny_config(2, transport="local"), str(run), data=T.tiny_data(), model=T.tiny_model(),
                       cuts=T.CUTS[2], log=lambda m: None, resume=True)
    aux = tr._resumed_aux
    assert aux is not None and aux["phase"] == 0
    assert [s is not None for s in aux["stores"]["input"]] == [False, True]
    assert [s is not None for s in aux["stores"]["target"]] == [True, False]
    assert [s is not None for s in aux["stores"]["mult"]] == [True, False]
    tr.run()
    assert [r["epoch"] for r in tr.records] == [1, 2, 3]
    resumed = {n: t.detach().clone() for n, t in tr.model.state_dict().items()}
    uninterrupted, _ = T.local_run(2)
    assert T.max_diff(resumed, uninterrupted) <= 1e-6
    assert not list(run.glob("aux-rank*"))          # stale per-rank files are gone
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 3


def test_missing_rank_file_is_one_clear_error(dist_stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dist_stopped, run)
    (run / "aux-rank1-epoch1.pt").unlink()
    with pytest.raises(ConfigError, match=r"aux-rank1-epoch1\.pt \(rank 1's auxiliary stores\) is missing$"):
        HybridTrainer(T.tiny_config(2, transport="local"), str(run), data=T.tiny_data(), model=T.tiny_model(),
                      cuts=T.CUTS[2], log=lambda m: None, resume=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run (method al, gs, ds 2, 2 stages) with its checkpoint."""
    run = tmp_path_factory.mktemp("resume") / "run"
    HybridTrainer(T.tiny_config(2, transport="local", schedule="serial:1"), str(run), data=T.tiny_data(),
                  model=T.tiny_model(), cuts=T.CUTS[2], log=lambda m: None).run()
    return run


def _resume(run, k=2, **kw):
    return HybridTrainer(T.tiny_config(k, transport="local", schedule="serial:1", **kw), str(run),
                         data=T.tiny_data(), model=T.tiny_model(), cuts=T.CUTS[k], log=lambda m: None, resume=True)


@pytest.mark.parametrize("kw, k, msg", [
    ({"method": "penalty"}, 2, r"--method penalty differs from the checkpoint's --method al; resume with --method al"),
    ({"ds": 1}, 2, r"--ds 1 differs from the checkpoint's --ds 2; resume with --ds 2"),
    ({"al_order": "jacobi"}, 2, r"--al-order jacobi differs from the checkpoint's --al-order gs"),
    ({"beta": 5.0}, 2, r"beta rule --beta 5.0 differs from the checkpoint's --beta-c 0.6 .*; resume with --beta-c 0.6"),
    ({"beta_c": 0.3}, 2, r"beta rule --beta-c 0.3 .* differs from the checkpoint's --beta-c 0.6"),
    ({}, 3, r"--stages 3 differs from the checkpoint's --stages 2; resume with --stages 2"),
])
def test_resume_refuses_a_changed_training_configuration(finished_run, kw, k, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        _resume(finished_run, k, **kw)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--resume {finished_run}: ")


def test_resume_accepts_run_time_changes(finished_run):
    tr = _resume(finished_run, threads=2, timeout_s=10.0, device="cpu")
    assert tr.epoch == 1


def test_cli_resume_may_change_transport_and_device_only(tmp_path):
    run = tmp_path / "cli"
    run.mkdir()
    saved = T.tiny_config(2, transport="dist", out=str(run)).to_dict()
    (run / "config.json").write_text(json.dumps(saved))
    (run / "checkpoint.pt").write_bytes(b"")
    args = cli._build_parser().parse_args(["train", "--resume", str(run), "--transport", "local",
                                           "--device", "cpu"])
    cfg, run_dir, resume = cli._train_config(args)
    assert resume and run_dir == str(run)
    assert cfg.transport == "local" and cfg.device == "cpu"
    assert cfg.method == "al" and cfg.ds == 2            # the training itself is the saved one
    for changed in (["--method", "penalty"], ["--ds", "1"]):  # never ignored silently: refused
        args = cli._build_parser().parse_args(["train", "--resume", str(run), *changed])
        with pytest.raises(ConfigError, match="cannot change on --resume"):
            cli._train_config(args)


def test_time_balanced_cuts_are_written_down_and_resumed(tmp_path, monkeypatch):
    """--balance time measures the cuts, and measurements vary: the chosen cuts go into
    config.json, so --resume rebuilds the same stages instead of measuring again."""
    from layerpar_fast import trainer as trmod
    from layerpar_fast.config import make_config, read_run_config
    from layerpar_fast.trainer import HybridTrainer
    run = tmp_path / "run"
    cfg = T.tiny_config(3, transport="local", schedule="serial:1,parallel:1", balance="time", checkpoint_every=1)
    first = HybridTrainer(cfg, str(run), data=T.tiny_data(), model=T.tiny_model(), log=lambda m: None)
    first.run()
    saved = read_run_config(str(run), "checkpoint.pt", "--resume")
    assert saved["cuts"] == ",".join(str(c) for c in first.cuts)
    real = trmod.parse_cuts
    other = [c for c in ([1, 3], [1, 2], [2, 3]) if c != first.cuts][0]
    monkeypatch.setattr(trmod, "parse_cuts", lambda spec, *a, **kw: other if spec is None else real(spec, *a, **kw))
    again = HybridTrainer(make_config(saved), str(run), data=T.tiny_data(), model=T.tiny_model(),
                          log=lambda m: None, resume=True)
    assert again.cuts == first.cuts

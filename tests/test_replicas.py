"""Stage replicas (layer-parallel x data-parallel, layerpar_fast/replicas.py): the batches and
stores of a K x R layout, the one-process simulation of it (the oracle), K·R processes against
that oracle, checkpoints across layouts, and the errors a wrong layout gets before any work.

The distributed tests start K·R real processes (gloo on 127.0.0.1, one thread each) under a hard
timeout, as tests/test_dist.py does.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from layerpar_fast.auxstore import TensorAuxStore
from layerpar_fast.config import ConfigError
from layerpar_fast.filters import FilterPair
from layerpar_fast.replicas import (OffsetAuxStore, ReplicaBN, join_replica_states, replica_batches, shares,
                                    split_replica_state)
from layerpar_fast.trainer import HybridTrainer

import test_dist as T

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------ batches, stores
def test_replica_batches_cover_each_block_once_in_equal_shares():
    n, r, b = 103, 4, 16            # blocks of 25 rows; rows 100-102 train only in serial epochs
    for epoch in range(3):
        batches = replica_batches(n, r, b, seed=5, epoch=epoch)
        assert all(len(x) % r == 0 for x in batches)
        seen = torch.cat(batches)
        assert sorted(seen.tolist()) == list(range(100))
        for t, x in enumerate(batches):
            for i, part in enumerate(shares(x, r)):        # share i comes from block i
                assert int(part.min()) >= 25 * i and int(part.max()) < 25 * (i + 1), (epoch, t, i)
    a, b2 = replica_batches(n, r, b, seed=5, epoch=1), replica_batches(n, r, b, seed=5, epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b2))                     # replayable
    c = replica_batches(n, r, b, seed=5, epoch=2)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))                  # a new order per epoch
    with pytest.raises(ValueError, match="multiple"):
        replica_batches(n, 3, 16, seed=0, epoch=0)


def test_offset_store_is_the_block_of_a_full_store():
    torch.manual_seed(0)
    n, per, shape = 12, 6, (2, 3, 3)
    full = TensorAuxStore(n, shape)
    full.scatter_(torch.arange(n), torch.randn(n, *shape))
    part = OffsetAuxStore(TensorAuxStore(per, shape), start=per)
    part.load_state_dict(split_replica_state(full.state_dict(), 1, per))
    idx = torch.tensor([11, 6, 8])
    assert torch.equal(part.gather(idx), full.gather(idx))
    filt = FilterPair(1, "avg_nearest")
    assert torch.equal(part.stage_input(idx, filt), full.stage_input(idx, filt))
    rows = torch.randn(3, *shape)
    part.scatter_(idx, rows)
    full.scatter_(idx, rows)
    # the Jacobi update with a multiplier store: the same rows come out and are stored
    u_full, u_part = TensorAuxStore(n, shape), OffsetAuxStore(TensorAuxStore(per, shape), start=per)
    a, g = torch.randn(3, *shape), torch.randn(3, *shape)
    assert torch.equal(part.jacobi_update_(u_part, idx, a, g, 0.7, 0.5), full.jacobi_update_(u_full, idx, a, g, 0.7, 0.5))
    assert torch.equal(u_part.gather(idx), u_full.gather(idx))
    zero = OffsetAuxStore(TensorAuxStore(per, shape), start=0)
    zero.load_state_dict(split_replica_state(full.state_dict(), 0, per))
    joined = join_replica_states([zero.state_dict(), part.state_dict()], n)
    assert torch.equal(joined["table"], full.table)
    with pytest.raises(ValueError, match="rows from 0"):
        part.load_state_dict(zero.state_dict())


def test_replica_bn_averages_what_each_share_saw():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    xs = [torch.randn(8, 3) + i for i in range(2)]
    sim = ReplicaBN(bn, 2)
    for _ in range(2):
        for r, x in enumerate(xs):
            sim.use(r)
            bn(x)
    sim.average()
    ref = []
    for x in xs:                     # each replica alone, from the same start
        b = nn.BatchNorm1d(3)
        b(x)
        b(x)
        ref.append(b)
    mean = (ref[0].running_mean.double() + ref[1].running_mean.double()) / 2
    assert torch.equal(bn.running_mean, mean.float())
    assert int(bn.num_batches_tracked) == 2


# ------------------------------------------------------------------------------------ the oracle
def _no_bn(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            _no_bn(child)
    return model


def test_simulated_replicas_without_batchnorm_equal_one_replica_on_the_same_batches(monkeypatch):
    """Without BatchNorm a share's statistics do not matter: R = 2 simulated replicas (each share's
    loss / R, gradients summed) train like one replica on the same global batches (float order)."""
    def run(replicas: int) -> dict[str, torch.Tensor]:
        cfg = T.tiny_config(2, transport="local", replicas=replicas, schedule="parallel:2")
        tr = HybridTrainer(cfg, None, data=T.tiny_data(), model=_no_bn(T.tiny_model()), cuts=[2], log=lambda m: None)
        if replicas == 1:             # the batches of the two-replica layout
            tr._parallel_batches = lambda e: replica_batches(tr.data.num_train, 2, cfg.batch_size, cfg.seed, e)
        tr.run()
        return {k: v.clone() for k, v in tr.model.state_dict().items()}

    one, two = run(1), run(2)
    diff = T.max_diff(one, two)
    assert 0 < diff <= 1e-5, diff      # the same up to float order (and not trivially the same code)


def test_simulated_replicas_differ_from_one_replica_with_batchnorm():
    """With BatchNorm each share normalises over its own rows: a different computation."""
    a, _ = T.local_run(2, replicas=2)
    b, _ = T.local_run(2)
    assert T.max_diff(a, b) > 1e-4


def test_a_replicated_run_directory_evaluates(tmp_path, monkeypatch):
    """evaluate_run (`layerpar eval`, the accuracy matrix) reads a --replicas run's configuration
    into a one-stage model (it once kept replicas = 2 with stages = 1 and was refused)."""
    import layerpar_fast.trainer as trainer_mod
    cfg = T.tiny_config(2, transport="local", replicas=2, schedule="parallel:1")
    HybridTrainer(cfg, str(tmp_path / "run"), data=T.tiny_data(), model=T.tiny_model(), cuts=[2],
                  log=lambda m: None).run()
    monkeypatch.setattr(trainer_mod, "load_dataset", lambda *a, **k: T.tiny_data())
    monkeypatch.setattr(trainer_mod, "build_model", lambda *a, **k: T.tiny_model())
    out = trainer_mod.evaluate_run(str(tmp_path / "run"))
    assert 0.0 <= out["test_acc"] <= 1.0 and out["num_test"] == 16


def test_layout_errors_come_before_any_work():
    with pytest.raises(ConfigError, match="not a multiple of --replicas 3"):
        T.tiny_config(2, replicas=3)                  # batch 8
    with pytest.raises(ConfigError, match="--stages K >= 2"):
        T.tiny_config(1, replicas=2)
    with pytest.raises(ConfigError, match="shift_flip"):
        T.tiny_config(2, replicas=2, parallel_augment="shift_flip")
    from layerpar_fast.topology import LocalTopology
    with pytest.raises(ConfigError, match="2 replica"):
        HybridTrainer(T.tiny_config(2, replicas=1), None, data=T.tiny_data(), model=T.tiny_model(), cuts=[2],
                      log=lambda m: None, topology=LocalTopology(2))


def test_world_size_that_does_not_fit_the_layout_is_refused(monkeypatch):
    from layerpar_fast.launch import launch_mode
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=6 but --stages 2 x --replicas 2 needs 4 processes"):
        launch_mode(T.tiny_config(2, replicas=2))
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_mode(T.tiny_config(2, replicas=2)) == "member"
    with pytest.raises(ConfigError, match="or --stages 2 --replicas 2"):
        launch_mode(T.tiny_config(2))


# ------------------------------------------------------------------------------------ K x R processes
WORKER = textwrap.dedent("""
    import json, sys, torch
    import test_dist as T
    from layerpar_fast.dist import DistTrainer, init_process_group
    import torch.distributed as dist

    spec = json.loads(sys.argv[1])
    out = sys.argv[2]
    init_process_group(60.0)
    k, reps = spec["K"], spec["R"]
    assert dist.get_world_size() == k * reps
    for i, kw in enumerate(spec["cases"]):
        kw = dict(kw)
        stop, run_dir, resume = kw.pop("stop_after", None), kw.pop("run_dir", None), kw.pop("resume", False)
        tr = DistTrainer(T.tiny_config(k, replicas=reps, **kw), run_dir, data=T.tiny_data(), model=T.tiny_model(),
                         cuts=T.CUTS[k], log=lambda m: None, resume=resume)
        if stop:                       # an interrupted run: its checkpoint after epoch `stop`
            tr.plan = tr.plan[:stop]
        tr.run()
        tr.close()
        state = {n: t.detach().clone() for n, t in tr.model.state_dict().items()}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, state)           # every rank must hold the same network
        if dist.get_rank() == 0:
            torch.save({"state": state, "ranks_agree": max(T.max_diff(state, s) for s in every),
                        "records": tr.records}, f"{out}/case{i}.pt")
    dist.destroy_process_group()
""")


def run_layout(tmp_path, k: int, reps: int, cases: list[dict], env: dict[str, str] | None = None) -> list[dict]:
    script = tmp_path / "worker_replicas.py"
    script.write_text(WORKER)
    results = T.spawn_ranks(k * reps, [sys.executable, str(script), json.dumps({"K": k, "R": reps, "cases": cases}),
                                       str(tmp_path)], env=env)
    for code, text in results:
        assert code == 0, text[-3000:]
    return [torch.load(tmp_path / f"case{i}.pt", weights_only=False) for i in range(len(cases))]


CASES_2X2 = [
    dict(method="al", al_order="gs", ds=2),
    dict(method="al", al_order="jacobi", ds=2, window=1, delay_rank=3, delay_s=0.02),
    dict(method="penalty", ds=1, delay_rank=0, delay_s=0.02),
    dict(method="al", al_order="gs", ds=2, parallel_augment="shift", delay_rank=1, delay_s=0.02),
    dict(method="al", al_order="gs", ds=2, mult_init="grad", delay_rank=2, delay_s=0.02),
    dict(method="al", ds=2, schedule="serial:1,parallel:1,serial:1", serial_on="one"),
    dict(method="al", ds=2, schedule="parallel:1,serial:1", serial_on="all"),                 # DP over 4 ranks
    dict(method="al", ds=2, schedule="parallel:1,serial:1", serial_on="all", serial_bn="rank"),
]


def test_two_stages_two_replicas_equal_the_one_process_simulation(tmp_path):
    """K = 2, R = 2 (4 processes, delays on single ranks): the parameters of the one-process
    simulation of the same layout, bit for bit in parallel phases (a sum of two terms does not
    depend on the reduction order); a data-parallel serial epoch over the 4 ranks within 1e-5
    (float order of its all-reduces). Not tested here: a data-parallel serial epoch *followed by*
    a parallel epoch; this tiny net (BatchNorm over 4-row shares) amplifies the serial epoch's
    1e-7 float-order differences to 1e-3 over the next parallel epoch, while the one-process
    simulation resumed from the 4 processes' checkpoint gives their parameters exactly."""
    results = run_layout(tmp_path, 2, 2, CASES_2X2)
    for kw, res in zip(CASES_2X2, results):
        assert res["ranks_agree"] == 0.0, kw
        ref, ref_records = T.local_run(2, replicas=2, **kw)
        diff = T.max_diff(res["state"], ref)
        assert diff <= (1e-5 if kw.get("serial_on") == "all" else 0.0), (kw, diff)
        par = [r for r in res["records"] if r["phase"] == "parallel"]
        assert par and all(r["ranks"] == 4 for r in par)
        per_rank = par[-1]["aux_memory_bytes_per_rank"]
        ref_par = [r for r in ref_records if r["phase"] == "parallel"]
        # each replica holds half of its stage's rows: the four ranks together hold what one process holds
        assert len(per_rank) == 4 and sum(per_rank) == ref_par[-1]["aux_memory_bytes"]
        assert per_rank[0] == per_rank[2] and per_rank[1] == per_rank[3]
        assert [s["stage"] for s in par[-1]["stages"]] == [0, 1]
        assert par[-1]["stages"][0]["local_loss"] == pytest.approx(ref_par[-1]["stages"][0]["local_loss"], rel=1e-6)


def test_three_stages_one_replica_is_the_plain_distributed_run(tmp_path):
    """--replicas 1 is the layout of issue 9's engine: K = 3 processes equal one process."""
    cases = [dict(method="al", al_order="gs", ds=2, delay_rank=1, delay_s=0.02)]
    (res,) = run_layout(tmp_path, 3, 1, cases)
    ref, _ = T.local_run(3, **cases[0])
    assert T.max_diff(res["state"], ref) == 0.0


def test_replicas_under_emulated_device_synchronisation(tmp_path):
    """LAYERPAR_DEBUG_SYNC=1 with K = 2, R = 2: no deadlock, the simulation's parameters."""
    cases = [dict(method="al", al_order="jacobi", ds=2, parallel_augment="shift", delay_rank=2, delay_s=0.01)]
    (res,) = run_layout(tmp_path, 2, 2, cases, env={"LAYERPAR_DEBUG_SYNC": "1"})
    ref, _ = T.local_run(2, replicas=2, **cases[0])
    assert T.max_diff(res["state"], ref) == 0.0
    par = [r for r in res["records"] if r["phase"] == "parallel"]
    assert par[0]["debug_sync_points"] > 0 and par[1]["debug_sync_points"] == 0


def test_a_replicated_checkpoint_resumes_in_four_processes_and_in_one(tmp_path):
    """A K = 2, R = 2 run stopped inside its parallel phase (per-rank store files, each replica its
    block) resumes to the uninterrupted result, in 4 processes and in one process simulating them."""
    run = tmp_path / "run"
    common = dict(method="al", ds=2, schedule="parallel:3,serial:1", serial_on="all")
    run_layout(tmp_path, 2, 2, [dict(common, run_dir=str(run), stop_after=1)])
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and state["aux"]["world"] == 4
    assert state["aux"]["files"] == [f"aux-rank{r}-epoch1.pt" for r in range(4)]
    part = torch.load(run / "aux-rank3-epoch1.pt", weights_only=False)
    assert part["stage"] == 1 and part["replica"] == 1 and part["stores"]["input"]["row_start"] == 32
    ref, _ = T.local_run(2, replicas=2, **common)
    # one process simulating the replicas continues from the 4 per-rank files
    import shutil
    one = tmp_path / "one"
    shutil.copytree(run, one)
    tr = HybridTrainer(T.tiny_config(2, transport="local", replicas=2, **common), str(one), data=T.tiny_data(),
                       model=T.tiny_model(), cuts=[2], log=lambda m: None, resume=True)
    tr.run()
    assert T.max_diff({k: v for k, v in tr.model.state_dict().items()}, ref) <= 1e-5
    # four processes continue from their own files
    (res,) = run_layout(tmp_path, 2, 2, [dict(common, run_dir=str(run), resume=True)])
    assert T.max_diff(res["state"], ref) <= 1e-5
    assert [r["epoch"] for r in res["records"]] == [1, 2, 3, 4]


def test_cli_two_stages_two_replicas(tmp_path):
    """`layerpar train --stages 2 --replicas 2` starts 4 processes and equals --transport local
    (the serial epoch on rank 0: on this data one data-parallel epoch's float order alone moves
    weights by 1e-3, as does changing the thread count of a one-process run)."""
    common = ["--dataset", "embedded", "--method", "al", "--stages", "2", "--replicas", "2", "--serial-on", "one",
              "--schedule", "parallel:1,serial:1", "--subset", "512", "--batch-size", "64", "--test-subset", "200",
              "--kappa-iters", "2", "--bn-recalib-batches", "2", "--no-progress", "--threads", "1", "--timeout-s", "60"]
    d = T._train([*common, "--out", str(tmp_path / "dist")], {})
    assert d.returncode == 0, d.stdout + d.stderr
    assert "x 2 replicas" in d.stdout and "on 4 ranks" in d.stdout
    loc = T._train([*common, "--transport", "local", "--out", str(tmp_path / "local")], {})
    assert loc.returncode == 0, loc.stdout + loc.stderr
    a, b = torch.load(tmp_path / "dist" / "final_model.pt"), torch.load(tmp_path / "local" / "final_model.pt")
    assert T.max_diff(a, b) == 0.0
    bad = T._train([*common[:-2], "--batch-size", "63", "--out", str(tmp_path / "bad")], {})
    assert bad.returncode == 2 and "not a multiple of --replicas 2" in bad.stderr

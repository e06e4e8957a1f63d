"""The in-process layer-parallel engine: K=1 reduction, message semantics, stores, resume."""
import random

import pytest
import torch
import torch.nn as nn

from layerpar_fast.config import make_config
from layerpar_fast.data import Dataset
from layerpar_fast.filters import FilterError
from layerpar_fast.models import BasicBlock, ClassifierHead
from layerpar_fast.stages import StagingError
from layerpar_fast.trainer import HybridTrainer
from layerpar_fast.transport import TransportError


def tiny_data(n=48, m=16, classes=4, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n + m, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n + m,), generator=g)
    xf = x.float() / 255
    return Dataset(name="tiny", x_train=x[:n].contiguous(), y_train=y[:n], x_test=x[n:].contiguous(),
                   y_test=y[n:], num_classes=classes,
                   mean=tuple(xf[:n].mean((0, 2, 3)).tolist()), std=tuple(xf[:n].std((0, 2, 3)).tolist()))


def tiny_model(seed=0, width=4, classes=4):
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    return nn.Sequential(stem, BasicBlock(width, width), BasicBlock(width, width), BasicBlock(width, width),
                         ClassifierHead(width, classes))


def trainer(tmp_path=None, cuts=(2, 3), size=8, **kw):
    base = dict(method="al", stages=len(cuts) + 1, ds=2, batch_size=16, eval_batch_size=16, lr=0.05,
                schedule="parallel:2", progress=False, kappa_iters=3, bn_recalib_batches=2, augment="none",
                threads=1, drift_guard=0, sharpness_gate=0,   # the mechanics under test; guards and gate have tests of their own
                pace_rows=0)
    log = kw.pop("log", lambda m: None)
    base.update(kw)
    cfg = make_config(**base)
    return HybridTrainer(cfg, None if tmp_path is None else str(tmp_path), data=tiny_data(size=size),
                         model=tiny_model(), cuts=list(cuts), log=log)


def params(model):
    return [p.detach().clone() for p in model.state_dict().values()]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_one_stage_engine_is_back_propagation():
    par = trainer(cuts=(), schedule="parallel:2", method="al")
    par.run()
    ser = trainer(cuts=(), schedule="serial:2", method="serial")
    ser.run()
    assert_same(params(par.model), params(ser.model))


def _run_epoch(tr, epoch, order):
    """Run one parallel epoch with stage steps executed in an order chosen by ``order``."""
    batches = tr._parallel_batches(epoch)
    workers = tr._workers(tr._settings())
    for w in workers:
        w.begin_epoch(epoch, batches, tr.lr_at)
    nxt = [0] * len(workers)
    while any(n < len(batches) for n in nxt):
        live = [k for k, n in enumerate(nxt) if n < len(batches)]
        for k in order(live):
            try:
                workers[k].step(nxt[k])
            except TransportError:
                continue
            nxt[k] += 1
            break
        else:
            raise AssertionError("no stage could make progress")
    pending = list(range(len(workers)))
    while pending:
        for k in order(pending):
            try:
                workers[k].end_epoch()
            except TransportError:
                continue
            pending.remove(k)
            break
        else:
            raise AssertionError("no stage could drain")


def interleaving_results(make, seed=1, check=None):
    """Two parallel epochs of ``make()`` with the stages stepped in lockstep, in a random and in
    the reverse interleaving; (parameters, stores) per interleaving, ``check(trainer)`` after each."""
    results = []
    for sched in ("lockstep", "random", "reverse"):
        tr = make()
        tr._enter_parallel(0, 0)
        rng = random.Random(seed)
        pick = {"lockstep": lambda live: sorted(live),
                "random": lambda live: rng.sample(live, len(live)),
                "reverse": lambda live: sorted(live, reverse=True)}[sched]
        for e in range(2):
            _run_epoch(tr, e, pick)
        if check is not None:
            check(tr)
        stores = [s.table.clone() for lst in tr.stores.values() for s in lst if s is not None]
        results.append((params(tr.model), stores))
    return results


def assert_all_same(results):
    for other in results[1:]:
        assert_same(results[0][0], other[0])
        assert_same(results[0][1], other[1])


@pytest.mark.parametrize("method, order", [("al", "gs"), ("al", "jacobi"), ("penalty", "jacobi")])
@pytest.mark.parametrize("window", [1, 3])
def test_message_timing_does_not_change_the_result(method, order, window):
    """Stages stepped in lockstep and in random interleavings (any order the window allows)
    end with identical parameters and stores (docs/method.md §5 determinism)."""
    assert_all_same(interleaving_results(lambda: trainer(method=method, al_order=order, window=window)))


@pytest.mark.parametrize("method, order", [("al", "gs"), ("al", "jacobi"), ("penalty", "jacobi")])
def test_input_store_mirrors_target_store(method, order):
    """After each epoch, stage k+1's input store holds exactly stage k's λ̃_k."""
    tr = trainer(method=method, al_order=order)
    tr._enter_parallel(0, 0)
    for k in range(len(tr.stages) - 1):
        assert torch.equal(tr.stores["target"][k].table, tr.stores["input"][k + 1].table)
    tr._parallel_epoch(0)
    for k in range(len(tr.stages) - 1):
        assert torch.equal(tr.stores["target"][k].table, tr.stores["input"][k + 1].table)
    if method == "al" and order == "gs":
        assert all(float(tr.stores["mult"][k].table.abs().sum()) > 0 for k in range(len(tr.stages) - 1))


def test_initial_fill_is_the_ds_forward_and_keeps_bn_stats():
    tr = trainer(method="al", ds=2)
    bn_before = {k: v.clone() for k, v in tr.model.state_dict().items() if "running" in k}
    tr._enter_parallel(0, 0)
    for k, v in tr.model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, bn_before[k]), k
    # λ̃_0 of the first batch = D(stage0(x)) in train mode on that same batch
    idx = tr.plain_loader.batches(0)[0]
    x = tr._input_fn()(idx)
    from layerpar_fast.monitors import frozen_bn_stats
    with torch.no_grad(), frozen_bn_stats(tr.model):
        tr.model.train()
        a0 = tr.filt.down(tr.stages[0](x))
    torch.testing.assert_close(tr.stores["target"][0].gather(idx), a0)
    assert float(tr.stores["mult"][0].table.abs().sum()) == 0.0


def test_parallel_record_has_the_monitors():
    tr = trainer(method="al", schedule="serial:1,parallel:1", ds=2)
    tr.run()
    rec = tr.records[-1]
    assert rec["phase"] == "parallel"
    for key in ("local_losses", "violation", "bytes_per_cut", "stage_compute_s", "speedup_model",
                "probe_cosine", "ds_test_acc", "aux_memory_bytes"):
        assert key in rec, key
    assert len(rec["violation"]) == 2 and len(rec["bytes_per_cut"]) == 2
    st = rec["stages"][0]
    assert st["kappa"] > 0 and st["beta"] > 0 and st["theta_norm"] > 0
    # lr·β·κ = c at the phase's first step, then falls with the lr; the stage lr cap keeps it <= 1
    assert abs(st["lr_beta_kappa"] - min(1.0, tr.cfg.beta_c * rec["lr"] / tr.lr_at(tr.steps_per_epoch))) < 1e-6
    # coarse bytes: s=2 on a 4x8x8 cut -> 4*4*4 numbers per sample, fp32 "in" + fp32 "g"
    assert rec["bytes_per_cut"][0] == 48 * 64 * 8
    assert rec["bytes_per_cut_full_resolution"][0] == 4 * rec["bytes_per_cut"][0]
    assert rec["speedup_model"]["rho_pred"] > 1.0


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_stores_run(dtype):
    tr = trainer(method="al", aux_dtype=dtype)
    tr.run()
    assert tr.stores is None  # dropped after the phase
    assert all(torch.isfinite(p).all() for p in params(tr.model))


@pytest.mark.parametrize("extra", [{}, dict(augment="crop_flip", parallel_augment="shift_flip"), dict(amp="bf16")],
                         ids=["plain", "shift_flip", "bf16"])
def test_resume_inside_a_parallel_phase(tmp_path, extra):
    full = trainer(tmp_path / "full", schedule="serial:1,parallel:3,serial:1", **extra)
    full.run()

    class Kill(Exception):
        pass

    def killer(msg):
        if msg.startswith("epoch   3/"):
            raise Kill

    cut = trainer(tmp_path / "cut", schedule="serial:1,parallel:3,serial:1", **extra)
    cut.log = killer
    with pytest.raises(Kill):
        cut.run()
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["aux"] is not None        # stopped inside the parallel phase
    cfg = cut.cfg
    resumed = HybridTrainer(cfg, str(tmp_path / "cut"), data=tiny_data(), model=tiny_model(),
                            cuts=[2, 3], log=lambda m: None, resume=True)
    assert resumed.epoch == 2
    resumed.run()
    assert_same(params(full.model), params(resumed.model))
    assert [r["test_acc"] for r in full.records] == [r["test_acc"] for r in resumed.records]


def test_bad_configurations_fail_before_training():
    with pytest.raises(FilterError, match="does not divide"):
        trainer(ds=8, size=12)
    with pytest.raises(StagingError):
        trainer(cuts=(1, 2, 3, 4, 5, 6), method="al")


def test_backend_api_accepts_a_list_of_stage_modules():
    """Another trainer hands us its own stages: the cuts are their boundaries."""
    import layerpar_fast as lp
    m = tiny_model()
    stages = [nn.Sequential(m[0], m[1]), nn.Sequential(m[2], m[3]), m[4]]
    cfg = lp.make_config(method="penalty", stages=3, ds=2, batch_size=16, schedule="parallel:1",
                         progress=False, kappa_iters=2, bn_recalib_batches=1, augment="none", threads=1)
    tr = lp.HybridTrainer(cfg, data=tiny_data(), model=stages, log=lambda m: None)
    assert tr.cuts == [1, 2]                      # each given stage is one block
    assert tr.stages[1][0] is stages[1]
    before = m[2].conv1.weight.detach().clone()
    tr.run()
    assert not torch.equal(before, m[2].conv1.weight)


def test_tail_only_control_skips_epochs_but_keeps_the_schedule():
    """idle:N spends N epochs of the lr schedule without touching the network."""
    idle = trainer(method="serial", cuts=(), schedule="idle:2")
    before = params(idle.model)
    idle.run()
    assert_same(before, params(idle.model))
    tr = trainer(method="serial", cuts=(), schedule="idle:2,serial:1")
    tr.run()
    assert [r["phase"] for r in tr.records] == ["idle", "idle", "serial"]
    assert tr.records[0]["test_acc"] == tr.records[1]["test_acc"]
    assert tr.records[2]["lr"] < tr.records[0]["lr"]


# ------------------------------------------------------------------------------ warm multipliers
def test_warm_multipliers_are_the_back_propagated_signal():
    """--mult-init grad: after the fill, μ_k = |B|·∂CE/∂λ̃_k through the network with U∘D at every
    cut, in train mode on each batch (the signal the first parallel epoch would otherwise lack),
    λ̃ unchanged, no parameter or BatchNorm statistic touched."""
    tr = trainer(method="al", al_order="gs", ds=2, mult_init="grad")
    before = params(tr.model)
    tr._enter_parallel(0, 0)
    assert_same(before, params(tr.model))
    from layerpar_fast.monitors import frozen_bn_stats
    import torch.nn.functional as F
    for idx in tr.plain_loader.batches(0)[:2]:
        z = tr._input_fn()(idx)
        lams = []
        with frozen_bn_stats(tr.model):
            tr.model.train()
            for k, stage in enumerate(tr.stages):
                o = stage(z)
                if k == len(tr.stages) - 1:
                    loss = F.cross_entropy(o, tr.data.y_train[idx])
                    break
                lam = tr.filt.down(o)
                lams.append(lam)
                z = tr.filt.up(lam)
            grads = torch.autograd.grad(loss, lams)
        for k, g in enumerate(grads):
            torch.testing.assert_close(tr.stores["target"][k].gather(idx), lams[k].detach())
            torch.testing.assert_close(tr.stores["mult"][k].gather(idx), len(idx) * g, rtol=1e-4, atol=1e-7)
            assert float(g.abs().sum()) > 0


def test_warm_multipliers_jacobi_form_takes_one_lambda_step():
    """Jacobi/penalty: the warm start is the λ-step (and multiplier step) of the first visit at
    λ̃ = a: λ̃ ← a − γ·(d/β)·g, u ← u + (a − λ̃); the next stage's input store follows."""
    cold = trainer(method="al", al_order="jacobi", ds=2, mult_init="zero")
    cold._enter_parallel(0, 0)
    warm = trainer(method="al", al_order="jacobi", ds=2, mult_init="grad")
    warm._enter_parallel(0, 0)
    for k in range(len(warm.stages) - 1):
        a = cold.stores["target"][k].table
        lam, u = warm.stores["target"][k].table, warm.stores["mult"][k].table
        assert not torch.equal(lam, a)
        torch.testing.assert_close(u, a - lam)                      # u = 0 + (a − λ̃⁺)
        torch.testing.assert_close(warm.stores["input"][k + 1].table, lam)


@pytest.mark.parametrize("method, order", [("al", "gs"), ("al", "jacobi"), ("penalty", "jacobi")])
def test_message_timing_does_not_change_the_result_with_warm_multipliers(method, order):
    assert_all_same(interleaving_results(lambda: trainer(method=method, al_order=order, mult_init="grad")))


def test_warm_multipliers_change_the_first_parallel_epoch_of_every_stage():
    """With μ = 0 and λ̃ = a, stages k < K have no loss gradient in the first parallel epoch
    (they move by weight decay only); with the warm start every stage trains from the start."""
    moved = {}
    for init in ("zero", "grad"):
        tr = trainer(method="al", al_order="gs", ds=2, mult_init=init, weight_decay=0.0, momentum=0.0)
        start = [[p.detach().clone() for p in s.parameters()] for s in tr.stages]
        tr._enter_parallel(0, 0)
        tr._parallel_epoch(0)
        moved[init] = [max(float((a - b.detach()).abs().max()) for a, b in zip(start[k], s.parameters()))
                       for k, s in enumerate(tr.stages)]
    assert moved["zero"][0] < 1e-6 and moved["zero"][-1] > 1e-4
    assert all(m > 1e-4 for m in moved["grad"])


def test_staleness_stage_lr_divides_stage_k_by_k_minus_k():
    tr = trainer(method="al", stage_lr="staleness")          # K = 3
    assert [tr._stage_lr_scale(k) for k in range(3)] == [1 / 3, 1 / 2, 1.0]
    tr._enter_parallel(0, 0)
    assert [s.lr_scale for s in tr._settings()] == [1 / 3, 1 / 2, 1.0]
    seen = []
    tr.optimizers[0].step = lambda *a, _o=tr.optimizers[0], _s=tr.optimizers[0].step: (
        seen.append(_o.param_groups[0]["lr"]), _s())[1]
    tr._parallel_epoch(0)
    step0 = tr.lr_at(0)
    assert seen and abs(seen[0] - step0 / 3) < 1e-12


# ------------------------------------------------------------------------------ mixed precision
def test_bf16_autocast_runs_the_stages_in_bf16_and_the_method_in_fp32():
    """--amp bf16: stage forwards run in bf16 (the module output is bf16), the local losses, stores
    and messages stay fp32 (the store dtype), and the run differs from fp32 but stays close."""
    seen = []
    tr = trainer(method="al", amp="bf16", schedule="serial:1,parallel:1")
    hook = tr.stages[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tr.run()
    hook.remove()
    assert torch.bfloat16 in seen
    assert all(s.table.dtype == torch.float32 for lst in (tr.stores or {}).values() for s in lst if s is not None)
    ref = trainer(method="al", schedule="serial:1,parallel:1")
    ref.run()
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(params(tr.model), params(ref.model))
             if a.is_floating_point()]
    assert 0 < max(diffs) < 0.5


def test_fp16_on_cpu_is_refused_before_work():
    from layerpar_fast.config import ConfigError
    with pytest.raises(ConfigError, match="--amp fp16 needs a GPU"):
        trainer(method="al", amp="fp16")


# ------------------------------------------------------------------------------ --switch-drift
def test_switch_rule_on_synthetic_drifts():
    from layerpar_fast.trainer import should_switch
    assert not should_switch([0.05, 0.1], None)            # off
    assert not should_switch([], 0.2)
    assert not should_switch([0.05, 0.2], 0.2)            # at the bound: keep going
    assert should_switch([0.05, 0.21], 0.2)
    assert should_switch([float("nan"), 0.0], 0.2)        # a diverged stage ends the phase


def test_switch_drift_ends_the_parallel_phase_and_resumes_exactly(tmp_path):
    """A tiny bound ends the parallel phase after its first epoch; the remaining epochs of the phase
    run serial; a run killed after the switch resumes to the same parameters and phases."""
    kw = dict(schedule="serial:1,parallel:3,serial:1", switch_drift=1e-9)
    full = trainer(tmp_path / "full", **kw)
    full.run()
    assert [r["phase"] for r in full.records] == ["serial", "parallel", "serial", "serial", "serial"]
    assert full.records[1].get("switched_to_serial") is True

    class Kill(Exception):
        pass

    def killer(msg):
        if msg.startswith("epoch   4/"):
            raise Kill

    cut = trainer(tmp_path / "cut", **kw)
    cut.log = killer
    with pytest.raises(Kill):
        cut.run()
    resumed = HybridTrainer(cut.cfg, str(tmp_path / "cut"), data=tiny_data(), model=tiny_model(), cuts=[2, 3],
                            log=lambda m: None, resume=True)
    assert resumed.epoch == 3 and [p[1] for p in resumed.plan] == ["serial", "parallel", "serial", "serial", "serial"]
    resumed.run()
    assert_same(params(full.model), params(resumed.model))
    assert [r["phase"] for r in resumed.records] == [r["phase"] for r in full.records]


def killed_and_resumed(d, when, **kw):
    """A run of ``trainer(d, **kw)`` killed at the first log line starting with ``when``, then
    resumed from its checkpoint and run to the end (the resumed trainer)."""
    class Kill(Exception):
        pass

    def killer(msg):
        if msg.startswith(when):
            raise Kill
    cut = trainer(d, **kw)
    cut.log = killer
    with pytest.raises(Kill):
        cut.run()
    resumed = HybridTrainer(cut.cfg, str(d), data=tiny_data(), model=tiny_model(), cuts=[2, 3],
                            log=lambda m: None, resume=True)
    resumed.run()
    return resumed


# ------------------------------------------------------------------------------ --drift-guard
# drifts of this setup (serial:1,parallel:3,serial:1): epoch 2 [0.024, 0.014], epoch 3 [0.055, 0.056]
GUARDED = dict(schedule="serial:1,parallel:3,serial:1", drift_guard=0.04)


def test_drift_guard_undoes_the_epoch_bit_for_bit_the_shorter_phase(tmp_path):
    """A parallel epoch whose drift exceeds --drift-guard is undone: the run equals, bit for bit, the
    run whose schedule ended the phase one epoch earlier; the undone epoch's record is kept apart."""
    logs = []
    g = trainer(tmp_path / "g", log=logs.append, **GUARDED)
    summary = g.run()
    oracle = trainer(schedule="serial:1,parallel:1,serial:3")
    oracle.run()
    assert_same(params(g.model), params(oracle.model))
    assert [r["phase"] for r in g.records] == ["serial", "parallel", "serial", "serial", "serial"]
    assert [r["test_acc"] for r in g.records] == [r["test_acc"] for r in oracle.records]
    assert [r["epoch"] for r in g.rollbacks] == [3] and max(g.rollbacks[0]["violation"]) > 0.04
    assert [r["epoch"] for r in summary["rolled_back"]] == [3]
    assert any("--drift-guard 0.04 in parallel epoch 3: the epoch is undone" in m for m in logs)
    import json
    lines = [json.loads(x) for x in open(tmp_path / "g" / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5] and not any(r.get("rolled_back") for r in lines)


def test_drift_guard_on_the_phase_s_first_epoch_gives_the_serial_run():
    """Undoing the phase's first epoch undoes its initial fill too: the run is the serial one."""
    g = trainer(schedule="serial:1,parallel:2,serial:1", drift_guard=1e-9)
    g.run()
    oracle = trainer(schedule="serial:4")
    oracle.run()
    assert_same(params(g.model), params(oracle.model))
    assert [r["epoch"] for r in g.rollbacks] == [2] and all(r["phase"] == "serial" for r in g.records)


def test_drift_guard_off_and_below_its_bound_changes_nothing():
    ref = trainer(schedule="serial:1,parallel:3,serial:1")
    ref.run()
    high = trainer(schedule="serial:1,parallel:3,serial:1", drift_guard=0.5)
    high.run()
    assert_same(params(ref.model), params(high.model)) and not high.rollbacks


def test_drift_guard_resumes_exactly(tmp_path):
    """Killed in the serial epoch after an undone epoch, or in the undone epoch itself: the resumed
    run ends with the parameters, phases and rollback records of the uninterrupted one."""
    full = trainer(tmp_path / "full", **GUARDED)
    full.run()
    for stage, when in (("after", "epoch   4/"), ("inside", "drift ")):
        resumed = killed_and_resumed(tmp_path / stage, when, **GUARDED)
        assert_same(params(full.model), params(resumed.model))
        assert [r["phase"] for r in resumed.records] == [r["phase"] for r in full.records]
        assert [r["epoch"] for r in resumed.rollbacks] == [3], stage


def test_drift_guard_is_on_by_default():
    from layerpar_fast.config import Config
    assert Config().drift_guard == 0.3 and make_config(method="al", stages=2, drift_guard=0).drift_guard == 0


def test_drift_guard_bad_values_are_refused():
    from layerpar_fast.config import ConfigError
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--drift-guard must be a number >= 0"):
            make_config(method="al", stages=2, drift_guard=bad)


# ------------------------------------------------------------------------------ --pace-rows
# held-in losses of this setup (serial:1,parallel:3,serial:1, 64 rows): entry 1.4236, after the phase's
# first epoch 1.3986 (a drop of 1.8%)
PACED = dict(schedule="serial:1,parallel:3,serial:1", pace_rows=64)


def test_pace_guard_undoes_a_first_epoch_that_does_not_lower_the_heldin_loss_enough(tmp_path):
    """--pace-drop 0.02 asks the phase's first epoch for a 2% drop; 1.8% is not enough: the epoch
    is undone and the run equals, bit for bit, the serial run; the undone record is kept apart."""
    logs = []
    g = trainer(tmp_path / "g", log=logs.append, pace_drop=0.02, **PACED)
    summary = g.run()
    oracle = trainer(schedule="serial:5")
    oracle.run()
    assert_same(params(g.model), params(oracle.model))
    assert all(r["phase"] == "serial" for r in g.records)
    undone = g.rollbacks[0]
    assert undone["epoch"] == 2 and 0.98 * undone["heldin_ref"] < undone["heldin_loss"] < undone["heldin_ref"]
    assert "x (1 - 0.02) (--pace-rows 64)" in undone["rolled_back_why"]
    assert summary["rolled_back"][0]["rolled_back_why"] == undone["rolled_back_why"]
    assert any("(--pace-rows 64) in parallel epoch 2: the epoch is undone" in m for m in logs)


def test_pace_guard_checks_the_phase_s_first_epoch_only_and_otherwise_changes_nothing():
    """A first epoch that lowers the held-in loss keeps the phase; later epochs are not measured
    (their transient is the drift guard's business). Measuring draws on no training randomness and
    restores BatchNorm statistics: the run equals the run without the guard, bit for bit."""
    ref = trainer(schedule=PACED["schedule"])
    ref.run()
    g = trainer(**PACED)
    g.run()
    assert_same(params(ref.model), params(g.model)) and not g.rollbacks
    assert [r["test_acc"] for r in g.records] == [r["test_acc"] for r in ref.records]
    assert [r["phase"] for r in g.records] == ["serial", "parallel", "parallel", "parallel", "serial"]
    assert g.records[1]["heldin_loss"] < g.records[1]["heldin_ref"]
    assert [("heldin_loss" in r) for r in g.records] == [False, True, False, False, False]


def test_pace_guard_with_any_drop_undoes_a_first_epoch_that_raises_the_loss():
    g = trainer(schedule="serial:1,parallel:2,serial:1", pace_rows=48, lr=0.3)     # held-in loss 1.3894 -> 1.4226
    g.run()
    if not g.rollbacks or g.rollbacks[0]["epoch"] != 2:
        pytest.fail(f"setup no longer undoes the phase's first epoch: {g.rollbacks}")
    oracle = trainer(schedule="serial:4", lr=0.3)
    oracle.run()
    assert_same(params(g.model), params(oracle.model))
    assert all(r["phase"] == "serial" for r in g.records)


def test_pace_guard_resumes_exactly(tmp_path):
    """Killed inside the undone first epoch, after the serial epoch that replaced it, or after a
    kept first epoch: the resumed run ends as the uninterrupted one."""
    for stage, drop, when in (("inside", 0.02, "held-in loss"), ("after", 0.02, "epoch   2/"),
                              ("kept", 0.0, "epoch   2/")):
        kw = dict(PACED, pace_drop=drop)
        full = trainer(tmp_path / f"full-{stage}", **kw)
        full.run()
        resumed = killed_and_resumed(tmp_path / stage, when, **kw)
        assert_same(params(full.model), params(resumed.model))
        assert [r["phase"] for r in resumed.records] == [r["phase"] for r in full.records], stage
        assert [r["epoch"] for r in resumed.rollbacks] == [r["epoch"] for r in full.rollbacks], stage


def test_heldin_rows_use_the_serial_epochs_views():
    """Augmented runs measure on augmented views (fixed per row), plain runs on plain rows; the rows
    are the same either way, and the measure repeats exactly."""
    plain = trainer(schedule="serial:1,parallel:1", pace_rows=20)
    aug = trainer(schedule="serial:1,parallel:1", pace_rows=20, augment="crop_flip")
    lp, la = plain._heldin_loader(), aug._heldin_loader()
    assert lp.num_samples == la.num_samples == 20 and torch.equal(lp.order(0), la.order(0))
    bp, ba = lp.load(lp.batches(0)[0], 0, 0), la.load(la.batches(0)[0], 0, 0)
    assert torch.equal(bp[2], ba[2]) and not torch.equal(bp[1], ba[1])
    assert aug.heldin_loss() == aug.heldin_loss()
    big = trainer(schedule="serial:1,parallel:1", pace_rows=10_000)      # more rows than the data: all of them
    assert big._heldin_loader().num_samples == 48


def test_pace_rule_on_synthetic_records():
    """The verdict from a first epoch's record: kept only when the held-in loss fell strictly below
    entry x (1 - drop); NaN is undone; an epoch without a reference (not a phase's first) is kept;
    the drift guard speaks first."""
    g = trainer(pace_rows=64, pace_drop=0.01, drift_guard=0.3)
    rec = lambda loss, ref=1.0, drift=0.1: {"heldin_ref": ref, "heldin_loss": loss, "violation": [drift]}  # noqa: E731
    assert g._guard_verdict(rec(0.98)) == ""                       # 2% down: kept
    assert "held-in loss 0.9950, not below 1.0000 x (1 - 0.01)" in g._guard_verdict(rec(0.995))
    assert g._guard_verdict(rec(0.99)) != ""                       # exactly at the bound: undone
    assert g._guard_verdict(rec(float("nan"))) != ""
    assert g._guard_verdict({"violation": [0.1]}) == ""            # later epochs carry no reference
    assert g._guard_verdict(rec(0.5, drift=0.4)).startswith("drift 0.400 > --drift-guard 0.3")
    off = trainer(pace_rows=0)
    assert off._guard_verdict({"violation": [0.1]}) == ""


def test_pace_guard_is_on_by_default():
    from layerpar_fast.config import Config
    assert (Config().pace_rows, Config().pace_drop) == (2048, 0.005)
    assert make_config(method="al", stages=2, pace_rows=0).pace_rows == 0


def test_pace_rows_bad_values_are_refused():
    from layerpar_fast.config import ConfigError
    with pytest.raises(ConfigError, match="--pace-rows must be an integer >= 0"):
        make_config(method="al", stages=2, pace_rows=-1)
    with pytest.raises(ConfigError, match="pace_rows: expected an integer"):
        make_config(method="al", stages=2, pace_rows=2.5)
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"--pace-drop must be in \[0, 1\)"):
            make_config(method="al", stages=2, pace_rows=64, pace_drop=bad)


# --------------------------------------------------------------------------- --sharpness-gate
def test_sharp_stages_rule():
    from layerpar_fast.phase_parallel import sharp_stages
    nan = float("nan")
    assert sharp_stages([1.0, 6.0, nan], 0.05, 0.25) == [1]            # 0.05, 0.3 > 0.25; NaN passes
    assert sharp_stages([1.0, 5.0], 0.05, 0.25) == []                  # 0.25 is not above the gate
    assert sharp_stages([1e9, 1e9], 0.05, 0) == []                     # 0: off
    assert sharp_stages([2.0, 20.0], 0.1, 0.25) == [1]


def test_postpone_moves_the_phase_entry_and_keeps_the_k_minus_1_rule():
    from layerpar_fast.trainer import _postpone
    plan = [(0, "serial", 0, 2), (0, "serial", 1, 2), (1, "parallel", 0, 3), (1, "parallel", 1, 3),
            (1, "parallel", 2, 3), (2, "serial", 0, 1)]
    p2 = list(plan)
    assert _postpone(p2, 2, stages=2) == 1
    assert p2[2:5] == [(1, "serial", 0, 1), (1, "parallel", 0, 2), (1, "parallel", 1, 2)] and p2[5] == plan[5]
    assert _postpone(p2, 3, stages=2) == 1                             # again: one parallel epoch left (K - 1 = 1)
    assert p2[3:5] == [(1, "serial", 0, 1), (1, "parallel", 0, 1)]
    assert _postpone(p2, 4, stages=2) == 1 and [x[1] for x in p2] == ["serial"] * 6   # none left: serial
    p3 = list(plan)
    assert _postpone(p3, 2, stages=4) == 3 and [x[1] for x in p3] == ["serial"] * 6   # 2 < K - 1 = 3: serial


def _fake_kappas(monkeypatch, sharp_calls):
    """estimate_kappa as measured, except calls number ``sharp_calls`` (0-based), which return 1e9."""
    import layerpar_fast.phase_parallel as pp
    real, calls = pp.estimate_kappa, []

    def fake(*a, **kw):
        calls.append(None)
        return 1e9 if len(calls) - 1 in sharp_calls else real(*a, **kw)
    monkeypatch.setattr(pp, "estimate_kappa", fake)
    return calls


def test_sharpness_gate_postpones_the_phase_bit_for_bit_the_later_phase(tmp_path, monkeypatch):
    """A phase entry where a stage's lr·κ exceeds --sharpness-gate runs serially and the phase opens
    one epoch later: bit for bit the run whose schedule had one more serial epoch before it."""
    _fake_kappas(monkeypatch, {0})            # stage 0 at the first entry; stage 1 measured
    logs = []
    g = trainer(tmp_path / "g", log=logs.append, schedule="serial:1,parallel:3,serial:1", sharpness_gate=1e6)
    summary = g.run()
    monkeypatch.undo()
    oracle = trainer(schedule="serial:2,parallel:2,serial:1")
    oracle.run()
    assert_same(params(g.model), params(oracle.model))
    assert [r["phase"] for r in g.records] == ["serial", "serial", "parallel", "parallel", "serial"]
    assert [r["test_acc"] for r in g.records] == [r["test_acc"] for r in oracle.records]
    assert [x["epoch"] for x in summary["sharpness_gated"]] == [2]
    assert summary["sharpness_gated"][0]["lr_kappa"][0] > 1e6
    assert any("--sharpness-gate 1e+06: lr x kappa = " in m and "(stage 0) at the entry of parallel epoch 2" in m
               for m in logs)


def test_sharpness_gate_at_every_entry_gives_the_serial_run(monkeypatch):
    """Gated at every entry, the phase shrinks from the front until it would be shorter than K − 1
    epochs (K = 3: two), and then runs serial: the serial run."""
    _fake_kappas(monkeypatch, set(range(100)))
    g = trainer(schedule="serial:1,parallel:3,serial:1", sharpness_gate=0.25)
    g.run()
    monkeypatch.undo()
    oracle = trainer(schedule="serial:5")
    oracle.run()
    assert_same(params(g.model), params(oracle.model))
    assert [x["epoch"] for x in g.gated] == [2, 3] and all(r["phase"] == "serial" for r in g.records)


def test_sharpness_gate_resumes_exactly(tmp_path, monkeypatch):
    """Stopped after the postponed epoch: the resumed run replays the postponement from the
    checkpoint and ends with the uninterrupted run's parameters and phases."""
    _fake_kappas(monkeypatch, {0})
    full = trainer(tmp_path / "full", schedule="serial:1,parallel:3,serial:1", sharpness_gate=1e6)
    full.run()
    _fake_kappas(monkeypatch, {0})
    cut = trainer(tmp_path / "cut", schedule="serial:1,parallel:3,serial:1", sharpness_gate=1e6, stop_after=2)
    assert cut.run()["stopped_after"] == 2
    monkeypatch.undo()                        # the resumed run measures every κ
    resumed = HybridTrainer(cut.cfg, str(tmp_path / "cut"), data=tiny_data(), model=tiny_model(), cuts=[2, 3],
                            log=lambda m: None, resume=True)
    resumed.run()
    assert_same(params(full.model), params(resumed.model))
    assert [r["phase"] for r in resumed.records] == [r["phase"] for r in full.records]
    assert [x["epoch"] for x in resumed.gated] == [2]


def test_sharpness_gate_default_and_bad_values():
    from layerpar_fast.config import Config, ConfigError
    assert Config().sharpness_gate == 0.25
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--sharpness-gate must be a number >= 0"):
            make_config(method="al", stages=2, sharpness_gate=bad)


def test_too_short_a_budget_warns_that_the_default_schedule_is_serial():
    logs = []
    cfg = make_config(method="al", stages=3, ds=2, batch_size=16, epochs=4, progress=False, augment="none", threads=1)
    tr = HybridTrainer(cfg, None, data=tiny_data(), model=tiny_model(), cuts=[2, 3], log=logs.append)
    assert [p for p, _ in cfg.phases()] == ["serial"]
    assert any("leave no parallel phase" in m and "--schedule" in m and "Give at least 8 epochs" in m
               and "data-parallel over the 3 workers" in m for m in logs)
    assert tr.plan and all(p[1] == "serial" for p in tr.plan)


def test_library_surface_lists_its_names_and_names_a_user_model():
    import layerpar_fast as lp
    for name in ("HybridTrainer", "DistTrainer", "LocalTopology", "load_dataset", "make_config"):
        assert name in dir(lp) and getattr(lp, name) is not None
    logs = []
    cfg = make_config(method="al", stages=2, ds=2, batch_size=16, schedule="parallel:1", progress=False,
                      augment="none", threads=1, kappa_iters=2, bn_recalib_batches=1)
    tr = HybridTrainer(cfg, None, data=tiny_data(), model=tiny_model(), cuts=[2], log=logs.append)
    tr.run()
    assert any("your Sequential model" in m for m in logs) and not any("mnist_resnet" in m for m in logs)


def test_subset_options_apply_to_a_users_own_data_set():
    """Library mode: cfg.subset / test_subset take the first images of the Dataset passed in (they
    used to be ignored silently); a subset larger than the data is one clear error."""
    from layerpar_fast.data import DataError
    tr = trainer(subset=32, test_subset=8)
    assert len(tr.data.y_train) == 32 and len(tr.data.y_test) == 8
    assert torch.equal(tr.data.x_train, tiny_data().x_train[:32])
    with pytest.raises(DataError, match="subset=100 must be an integer in"):
        trainer(subset=100)


def test_augment_auto_is_resolved_from_the_images_before_the_schedule(tmp_path):
    """--augment auto on a user's RGB images means crop_flip: the trainer says so in config.json,
    and the default schedule is the augmented one (--aug-parallel-share applies; --aug-warm-share
    not at K = 2); on grey images auto means none and the schedule keeps its parallel epochs."""
    import json
    t = trainer(tmp_path, cuts=(2,), schedule=None, epochs=10, augment="auto", aug_parallel_share=0.5,
                warm_share=0.3, size=8)
    assert t.cfg.augment == "crop_flip"
    assert t.cfg.resolved_schedule() == "serial:3,parallel:1,serial:6"     # K = 2: no later warm start
    t2 = trainer(None, cuts=(2,), schedule=None, epochs=10, augment="none", aug_parallel_share=0.5, warm_share=0.3)
    assert t2.cfg.resolved_schedule() == "serial:3,parallel:2,serial:5"
    grey = tiny_data()
    grey = Dataset(name="grey", x_train=grey.x_train[:, :1].contiguous(), y_train=grey.y_train,
                   x_test=grey.x_test[:, :1].contiguous(), y_test=grey.y_test, num_classes=4,
                   mean=grey.mean[:1], std=grey.std[:1])
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(stem, BasicBlock(4, 4), BasicBlock(4, 4), ClassifierHead(4, 4))
    cfg = make_config(method="al", stages=2, ds=2, batch_size=16, eval_batch_size=16, epochs=10, progress=False,
                      augment="auto", aug_parallel_share=0.5, warm_share=0.3, threads=1)
    t3 = HybridTrainer(cfg, None, data=grey, model=model, cuts=[2], log=lambda m: None)
    assert t3.cfg.augment == "none" and t3.cfg.resolved_schedule() == "serial:3,parallel:2,serial:5"
    t.run()
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["augment"] == "crop_flip" and saved["aug_parallel_share"] == 0.5 and saved["aug_warm_share"] == 0.65

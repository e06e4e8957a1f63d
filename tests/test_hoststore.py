"""Host auxiliary stores (--aux-device, layerpar_fast/hoststore.py) and the staging ring's rule."""
import random

import pytest
import torch

from layerpar_fast import _ext, ops
from layerpar_fast.auxstore import TensorAuxStore
from layerpar_fast.cli import _build_parser
from layerpar_fast.config import ConfigError, make_config
from layerpar_fast.filters import FilterPair
from layerpar_fast.hoststore import HostAuxStore, batches_disjoint
from layerpar_fast.trainer import HybridTrainer

from test_engine import assert_same, interleaving_results, params, tiny_data, tiny_model, trainer


# ----------------------------------------------------------------------------- bitwise identity
def _two_epochs(**kw):
    tr = trainer(cuts=(2,), schedule="parallel:2", **kw)
    tr._enter_parallel(0, 0)
    recs = [tr._parallel_epoch(0), tr._parallel_epoch(1)]
    stores = [s.table.clone() for lst in tr.stores.values() for s in lst if s is not None]
    return tr, params(tr.model), stores, recs


@pytest.mark.parametrize("kw", [
    dict(method="penalty"),
    dict(method="al", al_order="gs"),
    dict(method="al", al_order="jacobi"),
    dict(method="al", al_order="gs", augment="crop_flip", parallel_augment="shift"),
    dict(method="al", al_order="jacobi", augment="crop_flip", parallel_augment="shift", mult_init="grad"),
    dict(method="penalty", augment="crop_flip", parallel_augment="shift"),
    dict(method="al", al_order="gs", aux_dtype="bf16", mult_init="grad"),
], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_host_and_device_stores_give_bitwise_identical_runs(kw):
    dev_tr, dev_p, dev_s, dev_r = _two_epochs(aux_device="device", **kw)
    host_tr, host_p, host_s, host_r = _two_epochs(aux_device="host", **kw)
    assert isinstance(host_tr.stores["target"][0], HostAuxStore)
    assert type(dev_tr.stores["target"][0]) is TensorAuxStore
    assert_same(dev_p, host_p)
    assert_same(dev_s, host_s)
    for a, b in zip(dev_r, host_r):
        assert a["train_loss"] == b["train_loss"] and a["violation"] == b["violation"]
        assert a["aux_memory_bytes"] == b["aux_memory_bytes"]
        assert (a["aux_device"], b["aux_device"]) == ("device", "host")
    # in a training epoch every read of the epoch's batches was staged ahead, none had to wait
    for lst in host_tr.stores.values():
        for s in lst:
            if s is not None:
                assert s.stats["dropped"] == 0 and s.stats["waited_writes"] == 0 and s.stats["hits"] > 0


def test_host_stores_under_any_interleaving_match_the_device_run():
    dev = interleaving_results(lambda: trainer(method="al", al_order="jacobi", window=1, aux_device="device"))
    host = interleaving_results(lambda: trainer(method="al", al_order="jacobi", window=1, aux_device="host"))
    for d, h in zip(dev, host):
        assert_same(d[0], h[0])
        assert_same(d[1], h[1])


def test_cpu_host_stores_give_one_notice_and_are_recorded(tmp_path):
    lines = []
    cfg = make_config(method="al", stages=2, ds=2, batch_size=16, eval_batch_size=16, schedule="serial:1,parallel:1,serial:1",
                      progress=False, kappa_iters=3, bn_recalib_batches=2, augment="none", threads=1,
                      aux_device="host")
    tr = HybridTrainer(cfg, str(tmp_path), data=tiny_data(), model=tiny_model(), cuts=[2], log=lines.append)
    tr.run()
    notices = [m for m in lines if "--aux-device host" in m and "notice" in m]
    assert len(notices) == 1 and "ordinary memory" in notices[0]
    assert any(m.startswith("auxiliary stores of all") and "in host memory" in m for m in lines)
    par = [r for r in tr.records if r["phase"] == "parallel"]
    assert par and all(r["aux_device"] == "host" and r["aux_memory_bytes"] > 0 for r in par)


def test_auto_is_device_on_a_cpu_and_the_option_is_validated():
    tr = trainer(cuts=(2,), aux_device="auto")
    tr._enter_parallel(0, 0)
    assert type(tr.stores["target"][0]) is TensorAuxStore and tr.aux_where == "device"
    assert make_config(aux_device="host").aux_device == "host"
    with pytest.raises(ConfigError, match="--aux-device 'gpu'"):
        make_config(aux_device="gpu")
    assert _build_parser().parse_args(["train", "--aux-device", "host"]).aux_device == "host"


# ------------------------------------------------------------------------- the prefetch invariant
def _pair(n=20, shape=(2, 3, 3), dtype="fp32"):
    dev = TensorAuxStore(n, shape, dtype)
    host = HostAuxStore(n, shape, dtype)
    init = torch.randn(n, *shape)
    dev.scatter_(torch.arange(n), init)
    host.scatter_(torch.arange(n), init)
    return dev, host


def test_batches_disjoint():
    assert batches_disjoint(list(torch.randperm(10).split(3)))
    assert not batches_disjoint([torch.tensor([1, 2]), torch.tensor([2, 3])])
    assert batches_disjoint([])


def test_training_pattern_is_all_prefetch_hits():
    """Read batch t, write batch t's rows (and deferred rows of earlier batches): the prefetch of
    t+1 is never patched, dropped or held up by a write-back (batches of an epoch are disjoint)."""
    dev, host = _pair()
    batches = list(torch.randperm(20).split(6))
    host.plan(batches)
    assert host.disjoint
    for t, b in enumerate(batches):
        assert torch.equal(host.gather(b), dev.gather(b))
        rows = torch.randn(len(b), 2, 3, 3)
        host.scatter_(b, rows)
        dev.scatter_(b, rows)
        if t > 0:   # a late message for the previous batch
            prev = batches[t - 1]
            r2 = torch.randn(len(prev), 2, 3, 3)
            host.scatter_(prev, r2)
            dev.scatter_(prev, r2)
    assert host.stats == {"hits": len(batches), "misses": 0, "patched": 0, "dropped": 0, "waited_writes": 0}
    assert torch.equal(host.table, dev.table)


def test_a_write_to_prefetched_rows_is_seen_by_the_read():
    dev, host = _pair()
    batches = [torch.tensor([3, 1, 4]), torch.tensor([5, 9, 2]), torch.tensor([6, 0])]
    host.plan(batches)                       # batch 0 is staged now
    new = torch.randn(3, 2, 3, 3)
    host.scatter_(batches[0], new)           # the initial fill: write batch t, then read it
    dev.scatter_(batches[0], new)
    assert torch.equal(host.gather(batches[0]), dev.gather(batches[0]))
    assert host.stats["patched"] == 1
    part = torch.tensor([9, 7])              # overlaps the staged batch 1 partially
    r = torch.randn(2, 2, 3, 3)
    host.scatter_(part, r)
    dev.scatter_(part, r)
    assert host.stats["dropped"] == 1
    filt = FilterPair(1)
    assert torch.equal(host.stage_input(batches[1], filt), dev.stage_input(batches[1], filt))
    assert torch.equal(host.gather(batches[2]), dev.gather(batches[2]))   # staged again after the drop
    assert host.stats["hits"] == 2 and host.stats["misses"] == 1
    assert torch.equal(host.table, dev.table)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_random_op_sequences_match_the_device_store(dtype):
    """Overlapping plans, reads, writes and Jacobi updates in random order: the same values."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    n, shape = 16, (2, 2, 2)
    dev, host = _pair(n, shape, dtype)
    dev_u, host_u = _pair(n, shape, dtype)
    filt = FilterPair(2)
    for _ in range(200):
        op = rng.choice(["plan", "gather", "scatter", "jacobi", "stage"])
        idx = torch.tensor(rng.sample(range(n), rng.randint(1, 6)))
        if op == "plan":
            bs = [torch.tensor(rng.sample(range(n), rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
            host.plan(bs)
            host_u.plan(bs)
        elif op == "gather":
            assert torch.equal(host.gather(idx), dev.gather(idx))
        elif op == "stage":
            assert torch.equal(host.stage_input(idx, filt), dev.stage_input(idx, filt))
        elif op == "scatter":
            rows = torch.randn(len(idx), *shape, generator=g)
            host.scatter_(idx, rows)
            dev.scatter_(idx, rows)
        else:
            a = torch.randn(len(idx), *shape, generator=g)
            gg = torch.randn(len(idx), *shape, generator=g)
            r1 = host.jacobi_update_(host_u, idx, a, gg, 2.0, 0.5)
            r2 = dev.jacobi_update_(dev_u, idx, a, gg, 2.0, 0.5)
            assert torch.equal(r1, r2)
        if host._ready is not None and host._plan:        # the next planned batch, if any, is staged
            assert host._ready.pos == host._pos
    assert torch.equal(host.table, dev.table) and torch.equal(host_u.table, dev_u.table)
    host.zero_()
    assert float(host.table.abs().sum()) == 0.0


def test_state_dict_round_trip_sees_queued_writes():
    dev, host = _pair()
    host.plan([torch.tensor([1, 2])])
    host.scatter_(torch.tensor([1, 2]), torch.ones(2, 2, 3, 3))
    state = host.state_dict()
    assert torch.equal(state["table"][1], torch.ones(2, 3, 3))
    other = HostAuxStore(20, (2, 3, 3))
    other.load_state_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()})
    assert torch.equal(other.table, host.table)
    assert host.memory_bytes() == 20 * 18 * 4


# --------------------------------------------------------------------------------- staging ring
def _rule(slots, seq):
    """What a ring accepts (ops.StagingRing docstring): ticket n needs ticket n - slots taken."""
    pending, nxt, out = set(), 0, []
    for op, arg in seq:
        if op == "prefetch":
            if nxt - slots in pending:
                out.append("RuntimeError")
            else:
                pending.add(nxt)
                out.append(nxt)
                nxt += 1
        else:
            if arg in pending:
                pending.remove(arg)
                out.append("ok")
            else:
                out.append("KeyError")
    return out


def _play(ring, store, seq, *, native=False):
    out = []
    for op, arg in seq:
        try:
            if op == "prefetch":
                out.append(int(ring.prefetch(store, torch.tensor([arg % store.shape[0]]))))
            else:
                rows = ring.take(arg)
                out.append("ok" if rows.shape[0] == 1 else "bad")
        except KeyError:
            out.append("KeyError")
        except RuntimeError:
            # the raw C++ ring raises RuntimeError for an unknown ticket too; the wrapper, KeyError
            out.append("KeyError" if native and op == "take" else "RuntimeError")
    return out


def _sequences():
    rng = random.Random(5)
    seqs = [
        [("prefetch", 0), ("prefetch", 1), ("take", 1), ("prefetch", 2)],        # refused: 0 holds slot 0
        [("prefetch", 0), ("prefetch", 1), ("take", 0), ("prefetch", 2), ("take", 2), ("take", 1)],
        [("take", 0), ("prefetch", 0), ("take", 0), ("take", 0)],
    ]
    for _ in range(20):
        seqs.append([(rng.choice(["prefetch", "take"]), rng.randint(0, 6)) for _ in range(12)])
    return seqs


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_python_ring_follows_the_rule(slots):
    store = torch.randn(8, 2, 2)
    for seq in _sequences():
        assert _play(ops.StagingRing(slots, "cpu"), store, seq) == _rule(slots, seq), seq
    assert _rule(2, _sequences()[0])[-1] == "RuntimeError"


@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.available() and _ext.with_cuda()),
                    reason="the C++ StagingRing exists only in CUDA builds of the extension")
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_native_and_python_rings_accept_the_same_sequences(slots):  # pragma: no cover - GPU only
    store = torch.randn(8, 2, 2)
    for seq in _sequences():
        want = _rule(slots, seq)
        assert _play(ops.StagingRing(slots, "cuda"), store, seq) == want, seq
        raw = _ext.load().StagingRing(slots, torch.cuda.current_device())
        assert _play(raw, store, seq, native=True) == want, seq


def test_mid_phase_resume_with_host_stores_equals_device_stores(tmp_path):
    """A checkpoint inside a parallel phase, resumed: host and device stores (and a device
    checkpoint resumed with host stores) end with the same parameters."""
    def cfg(where):
        return make_config(method="al", stages=2, ds=2, batch_size=16, eval_batch_size=16, schedule="parallel:3",
                           progress=False, kappa_iters=3, bn_recalib_batches=2, augment="none", threads=1,
                           aux_device=where)
    out = {}
    for first, second in [("device", "device"), ("host", "host"), ("device", "host")]:
        run = str(tmp_path / f"{first}-{second}")
        a = HybridTrainer(cfg(first), run, data=tiny_data(), model=tiny_model(), cuts=[2], log=lambda m: None)
        a.plan = a.plan[:2]              # stop after parallel epoch 2 (checkpointed with its stores)
        a.run()
        b = HybridTrainer(cfg(second), run, data=tiny_data(), model=tiny_model(), cuts=[2], log=lambda m: None,
                          resume=True)
        b.run()
        out[(first, second)] = params(b.model)
    assert_same(out[("device", "device")], out[("host", "host")])
    assert_same(out[("device", "device")], out[("device", "host")])

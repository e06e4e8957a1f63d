"""One process per stage (layerpar_fast.dist / launch): the distributed engine computes exactly what
the single-process engine computes; failures, timeouts and Ctrl-C end every rank; torchrun-style
environments are used as given; a resumed distributed run ends where an uninterrupted one ends.

Every test starts real processes (gloo on 127.0.0.1, one thread each) under a hard timeout.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch
import torch.nn as nn

import layerpar_fast
from layerpar_fast.config import make_config
from layerpar_fast.data import Dataset
from layerpar_fast.models import BasicBlock, ClassifierHead
from layerpar_fast.trainer import HybridTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(layerpar_fast.__file__)))
HARD_TIMEOUT = 150


# ------------------------------------------------------------------------------------ tiny problem
def tiny_data(n: int = 64, m: int = 16, classes: int = 4, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n + m, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n + m,), generator=g)
    xf = x.float() / 255
    return Dataset(name="tiny", x_train=x[:n].contiguous(), y_train=y[:n], x_test=x[n:].contiguous(),
                   y_test=y[n:], num_classes=classes,
                   mean=tuple(xf[:n].mean((0, 2, 3)).tolist()), std=tuple(xf[:n].std((0, 2, 3)).tolist()))


def tiny_model(seed: int = 0, width: int = 4, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    return nn.Sequential(stem, BasicBlock(width, width), BasicBlock(width, width), BasicBlock(width, width),
                         ClassifierHead(width, classes))


CUTS = {2: [2], 3: [2, 3]}


def tiny_config(k: int, **kw):
    base = dict(method="al", stages=k, ds=2, batch_size=8, eval_batch_size=8, lr=0.05,
                schedule="parallel:2,serial:1", serial_on="one", progress=False, kappa_iters=3,
                bn_recalib_batches=2, augment="crop_flip", threads=1, timeout_s=30.0, seed=0,
                drift_guard=0, sharpness_gate=0, pace_rows=0)      # the cases that test guards and gate set them
    base.update(kw)
    return make_config(**base)


def local_run(k: int, **kw) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The single-process engine's final parameters and per-epoch records."""
    tr = HybridTrainer(tiny_config(k, transport="local", **kw), None, data=tiny_data(), model=tiny_model(),
                       cuts=CUTS[k], log=lambda m: None)
    tr.run()
    return {n: t.detach().clone() for n, t in tr.model.state_dict().items()}, tr.records


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n].double() - b[n].double()).abs().max()) if a[n].numel() else 0.0 for n in a)


# ------------------------------------------------------------------------------------ processes
def free_port() -> int:
    """A free port below the kernel's ephemeral range, so that no outgoing connection of another
    process takes it between this check and the rank-0 store binding it."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_ERROR_FILE", "LAYERPAR_LAUNCHED")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def spawn_ranks(k: int, argv: list[str], timeout: float = HARD_TIMEOUT,
                env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """Start ``k`` processes with torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR, ...);
    return (exit status, output) per rank; kill them all when the hard timeout passes."""
    port = str(free_port())
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(k)]
    procs = [subprocess.Popen(argv, stdout=logs[r], stderr=subprocess.STDOUT, text=True,
                              env=child_env(RANK=str(r), WORLD_SIZE=str(k), LOCAL_RANK=str(r),
                                            LOCAL_WORLD_SIZE=str(k), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                            **(env or {})))
             for r in range(k)]
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    hung = [r for r, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            p.kill()
    out = []
    for p, log in zip(procs, logs):
        p.wait()
        log.seek(0)
        out.append((p.returncode, log.read()))
        log.close()
    assert not hung, f"ranks {hung} still running after {timeout}s:\n" + "\n".join(
        f"--- rank {r} (exit {c}):\n{t[-2000:]}" for r, (c, t) in enumerate(out))
    return out


WORKER = textwrap.dedent("""
    import json, sys, torch
    import test_dist as T
    from layerpar_fast.dist import DistTrainer, init_process_group
    import torch.distributed as dist

    cases = json.loads(sys.argv[1])
    out = sys.argv[2]
    init_process_group(60.0)
    k = dist.get_world_size()
    for i, kw in enumerate(cases):
        tr = DistTrainer(T.tiny_config(k, **kw), None, data=T.tiny_data(), model=T.tiny_model(),
                         cuts=T.CUTS[k], log=lambda m: None)
        tr.run()
        tr.close()
        state = {n: t.detach().clone() for n, t in tr.model.state_dict().items()}
        every = [None] * k
        dist.all_gather_object(every, state)           # every rank must hold the same network
        if dist.get_rank() == 0:
            torch.save({"state": state, "ranks_agree": max(T.max_diff(state, s) for s in every),
                        "records": tr.records}, f"{out}/case{i}.pt")
    dist.destroy_process_group()
""")


def run_cases(tmp_path, k: int, cases: list[dict], env: dict[str, str] | None = None) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    results = spawn_ranks(k, [sys.executable, str(script), json.dumps(cases), str(tmp_path)], env=env)
    for code, text in results:
        assert code == 0, text[-3000:]
    return [torch.load(tmp_path / f"case{i}.pt", weights_only=False) for i in range(len(cases))]


# ------------------------------------------------------------------------------------ determinism
CASES_2 = [
    dict(method="penalty", ds=1),
    dict(method="penalty", ds=2),
    dict(method="al", al_order="gs", ds=1),
    dict(method="al", al_order="gs", ds=2),
    dict(method="al", al_order="jacobi", ds=2, window=1),
    dict(method="al", al_order="gs", ds=2, delay_rank=1, delay_s=0.02),
    dict(method="al", al_order="jacobi", ds=1, delay_rank=0, delay_s=0.02),
    dict(method="al", ds=2, schedule="serial:1,parallel:1,serial:1", serial_on="all"),   # global-batch BN
    dict(method="al", ds=2, schedule="serial:1,parallel:1,serial:1", serial_on="all", serial_bn="rank"),
    dict(method="al", ds=2, schedule="parallel:2", bn_recalib_batches=3),   # ends on the sharded recalibration
    dict(method="al", al_order="gs", ds=2, parallel_augment="shift", delay_rank=0, delay_s=0.02),
    dict(method="al", al_order="jacobi", ds=2, parallel_augment="shift", delay_rank=1, delay_s=0.02),
    dict(method="al", al_order="gs", ds=2, parallel_augment="shift_flip", delay_rank=0, delay_s=0.02),
    dict(method="al", al_order="gs", ds=2, mult_init="grad", delay_rank=1, delay_s=0.02),
    dict(method="al", ds=2, schedule="serial:1,parallel:3,serial:1", drift_guard=0.06, delay_rank=0, delay_s=0.01),
    # lr·κ of stage 0 here: 0.065 at the entry of epoch 2, 0.028 at epoch 3: the gate postpones the phase once
    dict(method="al", ds=2, schedule="serial:1,parallel:2,serial:1", sharpness_gate=0.045, delay_rank=1, delay_s=0.01),
    dict(method="al", al_order="jacobi", ds=2, mult_init="grad", parallel_augment="shift", delay_rank=0, delay_s=0.02),
    dict(method="al", al_order="gs", ds=2, amp="bf16", delay_rank=1, delay_s=0.02),
    # --pace-rows: the phase's first epoch lowers the held-in loss 1.382 -> 1.359: the phase runs on
    dict(method="al", ds=2, schedule="serial:1,parallel:3,serial:1", pace_rows=40, delay_rank=1, delay_s=0.01),
]
CASES_3 = [
    dict(method="al", al_order="gs", ds=2),
    dict(method="al", ds=2, schedule="serial:1,parallel:1,serial:1", serial_on="all"),   # shares 5/5/6, global BN
    dict(method="penalty", ds=1, delay_rank=1, delay_s=0.02),
    dict(method="al", al_order="jacobi", ds=2, delay_rank=2, delay_s=0.02),
    dict(method="penalty", ds=2, schedule="parallel:1", bn_recalib_batches=4),  # recalibration shares 2/1/1
    dict(method="al", al_order="gs", ds=2, parallel_augment="shift", delay_rank=1, delay_s=0.02),
    dict(method="penalty", ds=2, parallel_augment="shift_flip", delay_rank=2, delay_s=0.02),
    dict(method="al", al_order="gs", ds=2, mult_init="grad", delay_rank=2, delay_s=0.02),
    dict(method="penalty", ds=2, mult_init="grad", delay_rank=0, delay_s=0.02),
    dict(method="al", ds=2, schedule="parallel:3", switch_drift=1e-9, delay_rank=1, delay_s=0.01),  # same switch
    # --drift-guard undoes parallel epoch 3 (drifts 0.03 / 0.08-0.09 in epochs 2 / 3) on every rank alike
    dict(method="al", ds=2, schedule="serial:1,parallel:3,serial:1", drift_guard=0.06, delay_rank=2, delay_s=0.01),
    # --pace-rows 16: the phase's first epoch does not lower the held-in loss: undone, the run is serial
    dict(method="al", ds=2, schedule="serial:1,parallel:3,serial:1", pace_rows=16, delay_rank=0, delay_s=0.01),
]


@pytest.mark.parametrize("k, cases", [(2, CASES_2), (3, CASES_3)], ids=["2ranks", "3ranks"])
def test_distributed_run_equals_single_process_run(tmp_path, k, cases):
    """2 parallel epochs + 1 serial epoch on one worker (penalty, AL gs/jacobi, s = 1, 2, with an
    artificial delay on one rank): the same parameters as the single-process engine (≤ 1e-6).
    The data-parallel serial phase equals the single-process simulation of its ranks (≤ 1e-5)."""
    results = run_cases(tmp_path, k, cases)
    for kw, res in zip(cases, results):
        assert res["ranks_agree"] == 0.0, kw
        ref, ref_records = local_run(k, **kw)
        diff = max_diff(res["state"], ref)
        if kw.get("serial_on") == "all":
            # the single-process run computes what the K data-parallel ranks compute (global-batch
            # BatchNorm: the whole batch; serial_bn="rank": the same shares, per-rank BatchNorm
            # batches and running statistics): equal up to the all-reduces' float order
            assert diff <= 1e-5, (kw, diff)
        else:
            assert diff <= 1e-6, (kw, diff)
        assert [r["phase"] for r in res["records"]] == [r["phase"] for r in ref_records], kw
        for r, q in zip(res["records"], ref_records):     # the pace guard measured what one process measures
            assert (r.get("heldin_loss") is None) == (q.get("heldin_loss") is None), kw
            assert r.get("heldin_loss") is None or abs(r["heldin_loss"] - q["heldin_loss"]) <= 1e-6, kw
        if kw.get("pace_rows") == 16:
            assert all(r["phase"] == "serial" for r in res["records"]), kw
            continue
        par = [r for r in res["records"] if r["phase"] == "parallel"]
        assert par and all(r["ranks"] == k for r in par)
        counters = par[-1]["transport"]
        assert len(counters) == k
        assert counters[0]["bytes_sent"]["in"] > 0 and counters[-1]["bytes_sent"]["g"] > 0
        assert par[-1]["speedup_model"]["rho_pred"] > 0
        # the ranks' stores together are the single-process engine's stores
        per_rank = par[-1]["aux_memory_bytes_per_rank"]
        assert len(per_rank) == k and all(b > 0 for b in per_rank)
        ref_par = [r for r in ref_records if r["phase"] == "parallel"]
        assert par[-1]["aux_memory_bytes"] == sum(per_rank) == ref_par[-1]["aux_memory_bytes"]


# ------------------------------------------------------------------------------------ failures
QUICK = ["--subset", "256", "--test-subset", "128", "--batch-size", "64", "--no-progress", "--threads", "1",
         "--method", "al", "--ds", "2", "--kappa-iters", "2", "--bn-recalib-batches", "2", "--sharpness-gate", "0",
         "--pace-rows", "0"]

FAILING_WORKER = textwrap.dedent("""
    import os, sys
    from layerpar_fast import launch, worker
    step = worker.StageWorker.step

    def failing_step(self, t):
        if self.rank == 1 and t == 2:
            raise ValueError("injected failure on rank 1 at step 2")
        return step(self, t)

    worker.StageWorker.step = failing_step
    sys.exit(launch._worker_main())
""")


def test_a_rank_that_raises_stops_the_whole_run(tmp_path):
    """Launched by layerpar itself (elastic agent): rank 1 raises mid-epoch; every rank stops
    within seconds, the run exits non-zero and shows the original error once."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_WORKER)
    code = textwrap.dedent(f"""
        import sys
        from layerpar_fast.config import make_config
        from layerpar_fast.launch import launch_local
        cfg = make_config(subset=256, test_subset=128, batch_size=64, progress=False, threads=1, method="al",
                          stages=2, ds=2, kappa_iters=2, bn_recalib_batches=2, schedule="parallel:2",
                          sharpness_gate=0, pace_rows=0, timeout_s=60.0, out={str(tmp_path / 'run')!r})
        sys.exit(launch_local(cfg, {str(tmp_path / 'run')!r}, False,
                              entry=[sys.executable, "-u", {str(script)!r}]))
    """)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(),
                       timeout=HARD_TIMEOUT)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, p.stderr[-3000:]
    assert p.stderr.count("layerpar: error:") == 1, p.stderr[-3000:]
    assert "layerpar: error: rank 1 failed: ValueError: injected failure on rank 1 at step 2" in p.stderr
    assert "lost rank" not in p.stderr          # rank 0's consequential error is not repeated
    assert elapsed < 55, elapsed       # far below the 60 s timeout: nobody waited for it


def test_the_reported_failure_is_the_cause_not_the_peer_that_noticed():
    """torchelastic time stamps have one-second resolution: with rank 1 the cause and rank 0
    failing in the same second because it lost rank 1, the launcher must name rank 1."""
    from types import SimpleNamespace as NS

    from layerpar_fast.launch import _root_failure

    def failure(text, ts, exitcode=1):
        return NS(message={"message": text, "extraInfo": {}} if text else "", timestamp=ts, exitcode=exitcode)
    lost = failure("TransportError: rank 0: lost rank 1 while receiving 'g' messages", 100)
    cause = failure("ValueError: injected failure on rank 1 at step 2", 100)
    assert _root_failure({0: lost, 1: cause}) == (1, cause)
    assert _root_failure({1: cause, 0: lost}) == (1, cause)
    # only consequences recorded: the earliest, then the lowest rank
    lost2 = failure("TransportError: rank 2: lost rank 1 while receiving 'y' messages", 99)
    assert _root_failure({0: lost, 2: lost2}) == (2, lost2)
    # two real failures: the earlier one
    other = failure("RuntimeError: out of memory", 98)
    assert _root_failure({0: lost, 1: cause, 2: other}) == (2, other)
    # the launcher SIGTERMs the survivors after the first failure: they are listed too, never the cause
    term = failure("", 100, exitcode=-15)
    assert _root_failure({0: term, 1: cause}) == (1, cause)
    assert _root_failure({0: term, 1: lost}) == (1, lost)
    send = failure("TransportError: rank 0: cannot send 'in' step 2 to rank 1 (that rank stopped?)", 99)
    assert _root_failure({0: send, 1: cause}) == (1, cause)
    killed = failure("", 101, exitcode=-9)          # a rank killed from outside (OOM killer, kill -9)
    assert _root_failure({0: term, 1: killed, 2: lost}) == (1, killed)


def test_a_silent_rank_times_out(tmp_path):
    """`layerpar train --stages 2`: rank 1 is slower than --timeout-s allows; rank 0 gives up
    with a clear error and the whole run exits non-zero (no hang). The timeout is 5 s, not less:
    on a loaded 2-core machine the ranks' start-up alone can drift apart by more than a second,
    and a collective before the delayed steps would then time out first."""
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "layerpar_fast", "train", *QUICK, "--stages", "2",
                        "--schedule", "parallel:1", "--delay-rank", "1", "--delay-s", "15", "--timeout-s", "5",
                        "--out", str(run)], capture_output=True, text=True, env=child_env(), timeout=HARD_TIMEOUT)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "layerpar: error: rank 0 failed: TransportError" in p.stderr, p.stderr[-3000:]
    assert "within 5s" in p.stderr
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------ torchrun env
def test_torchrun_environment_is_used(tmp_path):
    """`layerpar train` started as 2 processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set
    (what torchrun does) joins that group instead of launching its own; rank 0 alone prints and
    writes the run files; the result equals the single-process engine's."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "layerpar_fast", "train", *QUICK, "--stages", "2", "--cuts", "3",
            "--schedule", "parallel:1,serial:1", "--serial-on", "one", "--out", str(run)]
    results = spawn_ranks(2, argv)
    for code, text in results:
        assert code == 0, text[-3000:]
    assert "final test accuracy" in results[0][1] and "on 2 ranks" in results[0][1]
    assert results[1][1].strip() == "", results[1][1][-2000:]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["parallel", "serial"] and recs[0]["ranks"] == 2
    dist_final = torch.load(run / "final_model.pt")
    local = tmp_path / "local"
    p = subprocess.run([sys.executable, "-m", "layerpar_fast", "train", *QUICK, "--stages", "2", "--cuts", "3",
                        "--schedule", "parallel:1,serial:1", "--serial-on", "one", "--transport", "local",
                        "--out", str(local)], capture_output=True, text=True, env=child_env(), timeout=HARD_TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert max_diff(dist_final, torch.load(local / "final_model.pt")) <= 1e-6


# ------------------------------------------------------------------------------------ Ctrl-C + resume
def test_interrupted_distributed_run_resumes_to_the_same_result(tmp_path):
    """Ctrl-C (SIGINT to the process group) inside the parallel phase stops every worker and
    leaves a resumable checkpoint with per-rank auxiliary files; --resume ends with exactly the
    parameters of an uninterrupted single-process run."""
    run = tmp_path / "run"
    common = [*QUICK, "--stages", "2", "--cuts", "3", "--schedule", "parallel:3,serial:1", "--serial-on", "one"]
    p = subprocess.Popen([sys.executable, "-m", "layerpar_fast", "train", *common, "--delay-rank", "0",
                          "--delay-s", "0.4", "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + HARD_TIMEOUT
        ckpt = run / "checkpoint.pt"
        while not ckpt.exists():
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        time.sleep(0.5)                                   # inside epoch 2 (4 steps of >= 0.4 s each)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err[-3000:]
    assert "--resume" in err
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and state["aux"]["files"] == ["aux-rank0-epoch1.pt", "aux-rank1-epoch1.pt"]
    assert all((run / f).exists() for f in state["aux"]["files"])
    r = subprocess.run([sys.executable, "-m", "layerpar_fast", "train", "--resume", str(run), "--no-progress"],
                       capture_output=True, text=True, env=child_env(), timeout=HARD_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout
    local = tmp_path / "local"
    q = subprocess.run([sys.executable, "-m", "layerpar_fast", "train", *common, "--transport", "local",
                        "--out", str(local)], capture_output=True, text=True, env=child_env(), timeout=HARD_TIMEOUT)
    assert q.returncode == 0, q.stderr[-3000:]
    assert max_diff(torch.load(run / "final_model.pt"), torch.load(local / "final_model.pt")) <= 1e-6
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]


def test_workers_die_with_a_killed_launcher(tmp_path):
    """SIGKILL of the `layerpar train` process itself (no chance to clean up): its worker
    processes end too instead of running on as orphans."""
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "layerpar_fast", "train", *QUICK, "--stages", "2",
                          "--schedule", "parallel:2", "--delay-rank", "0", "--delay-s", "0.5", "--out", str(run)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + HARD_TIMEOUT
        children: list[int] = []
        while len(children) < 2:
            assert p.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
            out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout
            children = [int(x) for x in out.split()]
        p.kill()
        p.wait()
        end = time.monotonic() + 20
        alive = children
        while alive and time.monotonic() < end:
            time.sleep(0.2)
            alive = [c for c in alive if os.path.exists(f"/proc/{c}") and
                     open(f"/proc/{c}/stat").read().split()[2] != "Z"]
        assert not alive, f"orphaned workers {alive}"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------ device synchronisation
# LAYERPAR_DEBUG_SYNC=1 (layerpar_fast/devsync.py): every point where a CUDA run could synchronise the
# device first waits until every receive the rank has posted has completed, as a device-wide
# synchronisation does while NCCL receive kernels spin. batch 12 over 64 samples: an uneven last batch.
SYNC_CASES = {
    2: [dict(method="al", al_order="gs", ds=2, batch_size=12),
        dict(method="al", al_order="jacobi", ds=2, batch_size=12, parallel_augment="shift", delay_rank=1, delay_s=0.01),
        dict(method="penalty", ds=2, batch_size=12, mult_init="grad")],
    3: [dict(method="al", al_order="gs", ds=2, batch_size=12, parallel_augment="shift", mult_init="grad"),
        dict(method="al", al_order="jacobi", ds=2, batch_size=12, delay_rank=0, delay_s=0.01),
        dict(method="penalty", ds=1, batch_size=12)],
}


@pytest.mark.parametrize("k", [2, 3], ids=["2ranks", "3ranks"])
def test_no_deadlock_under_emulated_device_synchronisation(tmp_path, k):
    """The warm-up runs every first call before a phase posts receives: under the emulation every
    case completes, equal to the single-process run, and only the phase's first epoch (its
    warm-up) meets synchronisation points."""
    cases = SYNC_CASES[k]
    results = run_cases(tmp_path, k, cases, env={"LAYERPAR_DEBUG_SYNC": "1"})
    for kw, res in zip(cases, results):
        assert res["ranks_agree"] == 0.0, kw
        ref, _ = local_run(k, **kw)
        assert max_diff(res["state"], ref) <= 1e-6, kw
        par = [r for r in res["records"] if r["phase"] == "parallel"]
        assert par[0]["debug_sync_points"] > 0 and par[1]["debug_sync_points"] == 0, kw


def _train(args: list[str], env: dict[str, str], timeout: float = HARD_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerpar_fast", "train", *args], capture_output=True, text=True,
                          env=child_env(**env), timeout=timeout)


def test_the_order_before_the_warm_up_deadlocks_under_the_emulation(tmp_path):
    """LAYERPAR_WARMUP=0 (the order before issue 11: receives posted, then first calls) must hang
    under the emulation and end with the transport's timeout error within seconds."""
    args = [*QUICK, "--stages", "2", "--schedule", "parallel:2", "--timeout-s", "8"]
    t0 = time.monotonic()
    p = _train([*args, "--out", str(tmp_path / "r")], {"LAYERPAR_DEBUG_SYNC": "1", "LAYERPAR_WARMUP": "0"})
    assert p.returncode != 0, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert "TransportError" in err[-1] and "within 8s (--timeout-s)" in err[-1], err[-1]
    assert time.monotonic() - t0 < 100
    # the control: the same order without the emulated synchronisations runs (CPU, gloo)
    q = _train([*args, "--out", str(tmp_path / "q")], {"LAYERPAR_WARMUP": "0"})
    assert q.returncode == 0, q.stdout + q.stderr


def test_debug_sync_cli_run_equals_the_local_transport(tmp_path):
    """`LAYERPAR_DEBUG_SYNC=1 layerpar train --dataset embedded --method al --stages 2 --schedule
    parallel:2` completes and equals --transport local (here on 600 images, last batch uneven)."""
    common = ["--dataset", "embedded", "--method", "al", "--stages", "2", "--schedule", "parallel:2",
              "--subset", "600", "--batch-size", "128", "--test-subset", "200", "--kappa-iters", "3",
              "--bn-recalib-batches", "2", "--no-progress", "--threads", "1", "--timeout-s", "60", "--sharpness-gate", "0",
              "--pace-rows", "0"]
    d = _train([*common, "--out", str(tmp_path / "dist")], {"LAYERPAR_DEBUG_SYNC": "1"})
    assert d.returncode == 0, d.stdout + d.stderr
    loc = _train([*common, "--transport", "local", "--out", str(tmp_path / "local")], {})
    assert loc.returncode == 0, loc.stdout + loc.stderr
    a = torch.load(tmp_path / "dist" / "final_model.pt")
    b = torch.load(tmp_path / "local" / "final_model.pt")
    assert max_diff(a, b) <= 1e-6
    recs = [json.loads(x) for x in open(tmp_path / "dist" / "metrics.jsonl")]
    assert [r["debug_sync_points"] > 0 for r in recs] == [True, False]


def test_a_collective_timeout_becomes_a_transport_error():
    """A backend timeout inside one of DistTopology's collectives (a rank slower than --timeout-s
    before the messages start) is reported as a TransportError naming --timeout-s; any other
    RuntimeError passes through unchanged."""
    from types import SimpleNamespace as NS

    from layerpar_fast.topology import DistTopology
    from layerpar_fast.transport import TransportError

    me = NS(rank=1, timeout_s=1.5)

    def gloo_timeout():
        raise RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 1500ms for send operation to complete")

    with pytest.raises(TransportError, match=r"rank 1: no answer from the other ranks within 1.5s \(--timeout-s\) while gathering"):
        DistTopology._collective(me, "gathering a value from every rank", gloo_timeout)

    def other():
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        DistTopology._collective(me, "gathering", other)
    assert DistTopology._collective(me, "adding", lambda a, b: a + b, 2, 3) == 5

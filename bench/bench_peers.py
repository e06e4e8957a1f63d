"""Against the peers (issue 12): SPH's parallel epoch against serial back-propagation, DDP and
pipelining (torch.distributed.pipelining GPipe / 1F1B) on the same model, cut, batch and data,
K = 2 ranks x 1 thread (gloo), on loopback and on rate-limited links.

    python bench/bench_peers.py epoch --models resnet20 --subset 5000 \
        --methods serial1,serial2,ddp,gpipe,1f1b,sph,sph-run --links unlimited,200mbit,50mbit --repeats 3 \
        --out bench/results/peers_cpu.json --md bench/results/peers_cpu.md --png bench/results/peers_cpu.png
    python bench/bench_peers.py bytes                 # bytes per step from shapes: wrn28_10, resnet110, ...
    python bench/bench_peers.py tta --epochs 18 ...   # test accuracy against wall-clock time (one plot)

``epoch``: for every model and link one launch of 2 ranks (torch's elastic launcher, as
bench_parallel_epoch.py) runs every variant once per round, the order rotated every round:
serial1 / serial2 (rank 0 alone, 1 / 2 threads), ddp (DistributedDataParallel, 2 x 1 thread),
gpipe:mM and 1f1b:mM for every micro-batch count M (``PipelineStage`` per rank, the same cut),
sph:sS (one SPH-AL parallel epoch through layerpar_fast at every s). A rate-limited link runs the
launch inside a private network namespace (``unshare -n``, or ``unshare -rn`` when not root) whose
loopback gets MTU 1500 and a tbf qdisc (``RATE``) or netem rate + delay (``RATE@DELAY``); the
namespace dies with its process. Bytes are counted (DDP comm hook, the pipelining schedules'
isends, SPH's transport counters) and checked against the shapes (peers_lib.formula_bytes).
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers_lib as P  # noqa: E402
from peers_lib import UsageError  # noqa: E402
from bench_parallel_epoch import _load  # noqa: E402  (the machine load beside each timing)
from layerpar_fast.data import default_data_dir  # noqa: E402
from layerpar_fast.config import PARALLEL_AUGMENTS  # noqa: E402

PROG = "bench_peers"
_CHILDREN: list[subprocess.Popen] = []


# ------------------------------------------------------------------------------------ processes
def _kill_children() -> None:
    """Kill every child's process group (the link's launcher and its ranks)."""
    for p in list(_CHILDREN):
        if p.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    p.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if p in _CHILDREN:
            _CHILDREN.remove(p)


def _on_signal(signum: int, frame: Any) -> None:
    _kill_children()
    raise SystemExit(128 + signum)


def _install_cleanup() -> None:
    atexit.register(_kill_children)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def _run_child(cmd: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``cmd`` in a process group of its own, killed on timeout, exit or signal; (rc, stderr)."""
    p = subprocess.Popen(cmd, stdout=None, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _CHILDREN.append(p)
    try:
        _, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_children()
        return 124, f"timed out after {timeout_s:g}s (--timeout-s); every process of the link was killed"
    except KeyboardInterrupt:
        _kill_children()
        raise
    finally:
        if p in _CHILDREN and p.poll() is not None:
            _CHILDREN.remove(p)
    try:
        os.killpg(p.pid, signal.SIGKILL)     # stragglers of a finished link, if any
    except (ProcessLookupError, PermissionError):
        pass
    return p.returncode, err or ""


# ------------------------------------------------------------------------------------ worker side
def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _set_s(tr: Any, s: int) -> None:
    """Make the trainer's next parallel phase use coarsening s."""
    from layerpar_fast.filters import FilterPair
    tr.cfg = dataclasses.replace(tr.cfg, ds=s)
    tr.filt = FilterPair(s, tr.cfg.filter)
    for c, shp in zip(tr.cuts, tr.cut_shapes):
        tr.filt.check_shape(shp, where=f"cut {c}")
    if tr.cfg.parallel_augment != "none":
        tr.shift_aug = tr._shift_augment()


def _ddp_batches(tr: Any, epoch: int) -> Any:
    loader = tr.train_loader
    for t, idx in enumerate(loader.batches(epoch)):
        _, x, y = loader.load(idx, epoch, t)     # the whole global batch, augmented as in one process
        yield x, y


def _stage_input_shape(tr: Any, rank: int, m: int) -> tuple[int, ...]:
    """The shape of one of the m micro-batches entering stage ``rank``: images on the first,
    the activation at the cut before it on the others."""
    per_sample = tr.input_shape if rank == 0 else tr.cut_shapes[rank - 1]
    return (tr.cfg.batch_size // m, *per_sample)


def _pipe_batches(tr: Any, epoch: int, rank: int) -> Any:
    """Full batches only (the micro-batch shapes are fixed); rank 0 loads x, the others only y."""
    loader = tr.train_loader
    for t, idx in enumerate(loader.batches(epoch)):
        if len(idx) != tr.cfg.batch_size:
            continue
        if rank == 0:
            _, x, y = loader.load(idx, epoch, t)
            yield x, y
        else:
            yield None, loader.y.index_select(0, idx)


def _run_variant(tr: Any, v: str, epoch: int, schedules: dict[str, Any], lr_fn: Any) -> dict[str, Any]:
    """One epoch of variant ``v`` on this rank; the same dict on every rank (gathered)."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    n_train = tr.data.num_train
    steps_all = tr.steps_per_epoch
    if v in ("serial1", "serial2"):
        dist.barrier()
        mine = None
        if rank == 0:
            torch.set_num_threads(1 if v == "serial1" else 2)
            t0 = time.perf_counter()
            tr._serial_epoch_local(epoch)
            mine = time.perf_counter() - t0
            torch.set_num_threads(1)
        wall = _all_gather(mine)[0]
        return {"epoch_s": wall, "steps": steps_all, "images": n_train, "bytes": 0.0}
    if v in ("ddp", "ddp-gbn"):     # ddp-gbn: the serial epochs of an SPH run (--serial-bn global)
        c = P.DDPByteCounter()
        r = P.ddp_epoch(tr.model, tr.optimizers, _ddp_batches(tr, epoch), rank=rank, world=world, counter=c,
                        lr_fn=lr_fn, global_bn=v == "ddp-gbn")
        bn_wire = 2 * (world - 1) / world * r["bn_payload"]      # ring all-reduce, per rank
        every = _all_gather((r["wall_s"], r["bytes_sent"] + bn_wire, r["payload"]))
        tr._average_bn_stats()
        return {"epoch_s": max(e[0] for e in every), "steps": r["steps"], "images": n_train,
                "bytes": sum(e[1] for e in every), "payload_per_rank": every[0][2], "loss_last": r["losses"][-1]}
    if v.startswith(("gpipe:", "1f1b:")):
        kind, m = v.split(":m")
        if v not in schedules:
            schedules[v] = P.make_schedule(tr.stages[rank], rank, world, kind, int(m), tr.device,
                                           input_shape=_stage_input_shape(tr, rank, int(m)))
        c = P.PipeByteCounter()
        r = P.pipeline_epoch(schedules[v], tr.optimizers[rank], _pipe_batches(tr, epoch, rank), rank=rank,
                             world=world, counter=c, lr_fn=lr_fn)
        every = _all_gather((r["wall_s"], r["bytes_sent"], r["messages"], r["images"]))
        wall = max(e[0] for e in every)
        images = every[0][3]
        tr.topology.sync_stages(tr.stages, tr.optimizers)    # every rank gets both stages back
        return {"epoch_s": wall * n_train / max(1, images), "measured_s": wall, "steps": r["steps"],
                "images": images, "bytes": sum(e[1] for e in every), "messages": sum(e[2] for e in every),
                "loss_last": r["losses"][-1] if r["losses"] else None}
    if v.startswith("sph:s"):
        _set_s(tr, int(v[5:]))
        t0 = time.perf_counter()
        if not tr._enter_parallel(0, epoch):
            raise RuntimeError("the parallel phase did not open (sharpness gate); run with sharpness_gate 0")
        t1 = time.perf_counter()
        rec = tr._parallel_epoch(epoch)
        t2 = time.perf_counter()
        tr.stores = None
        tr.phase_state = None
        busy = [s["compute_s"] + s["data_s"] + s["update_s"] for s in rec["stages"]]
        crit = busy.index(max(busy))
        sent = sum(sum(c["bytes_sent"].values()) for c in rec["transport"])
        return {"epoch_s": rec["parallel_wall_s"], "enter_s": t1 - t0, "after_s": t2 - t1 - rec["parallel_wall_s"],
                "steps": steps_all, "images": n_train, "bytes": float(sent),
                "exposed_s": rec["stages"][crit]["wait_s"], "waits_s": [s["wait_s"] for s in rec["stages"]],
                "busy_s": busy, "wall_per_rank_s": rec["parallel_wall_per_rank_s"],
                "loss_last": rec["train_loss"]}
    raise UsageError(f"unknown variant {v!r}")


def worker(argv: list[str]) -> int:
    """One rank of a link's measurement (started by the elastic launcher; see ``measure``)."""
    import torch
    import torch.distributed as dist
    from layerpar_fast.config import make_config
    from layerpar_fast.dist import DistTrainer, init_process_group
    from layerpar_fast.launch import _die_with_launcher
    from layerpar_fast.metrics import atomic_write_json, environment

    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="epoch")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variants", default="")
    p.add_argument("--result", required=True)
    p.add_argument("--tta-json", default="{}")
    p.add_argument("--config-json", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    _die_with_launcher()
    os.environ["OMP_NUM_THREADS"] = "1"
    cfg = make_config(json.loads(args.config_json))
    init_process_group(cfg.timeout_s)
    rank = dist.get_rank()
    torch.set_num_threads(1)
    if args.mode == "tta":
        out = _tta_worker(cfg, json.loads(args.tta_json))
    else:
        tr = DistTrainer(cfg, None, log=lambda m: None)
        torch.set_num_threads(1)
        variants = args.variants.split(",")
        schedules: dict[str, Any] = {}
        rounds = []
        for rep in range(args.repeats):
            r0 = rep % len(variants)
            res: dict[str, Any] = {"order": variants[r0:] + variants[:r0], "load": _load()}
            for v in res["order"]:
                lr = tr.lr_at(rep * tr.steps_per_epoch)
                res[v] = _run_variant(tr, v, rep, schedules, lambda t, lr=lr: lr)
            rounds.append(res)
            if rank == 0:
                print(f"round {rep + 1}/{args.repeats}: " + ", ".join(f"{v} {res[v]['epoch_s']:.2f}s"
                                                                      for v in variants), flush=True)
        out = {"rounds": rounds, "cuts": tr.cuts, "cut_shapes": [list(s) for s in tr.cut_shapes],
               "param_bytes": P.param_bytes(tr.model), "num_train": tr.data.num_train,
               "steps_per_epoch": tr.steps_per_epoch}
        tr.close()
    if rank == 0:
        out["environment"] = environment()
        atomic_write_json(args.result, out)
    dist.barrier()
    dist.destroy_process_group()
    return 0




# ------------------------------------------------------------------------------------ a link's launch
def _config(job: dict[str, Any]) -> Any:
    from layerpar_fast.config import make_config
    # the parallel epoch is timed however sharp the fresh network is: without this the phase's
    # sharpness gate (docs/method.md §6) keeps it serial on a deep untrained network (ResNet-56)
    extra = {"sharpness_gate": 0.0, "pace_rows": 0, **job.get("config", {})}
    return make_config(dataset=job["dataset"], data_dir=job["data_dir"], subset=job["subset"],
                       test_subset=job.get("test_subset", 1000), model=job["model"], method="al", stages=2,
                       ds=job.get("ds", 1), batch_size=job["batch_size"],
                       schedule=job.get("schedule", f"parallel:{max(1, job.get('repeats', 1))}"),
                       serial_on="all", threads=1, progress=False, timeout_s=job["timeout_s"],
                       kappa_iters=job.get("kappa_iters", 20), bn_recalib_batches=job.get("bn_recalib_batches", 0),
                       balance=job["balance"], cuts=job.get("cuts"), seed=job.get("seed", 0), **extra)


def measure(job: dict[str, Any], result: str) -> int:
    """Launch the 2 ranks of ``job`` in this process's network namespace; the launcher's status."""
    from layerpar_fast.launch import launch_local
    cfg = _config(job)
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        entry = [sys.executable, "-u", os.path.abspath(__file__), "_worker", "--mode", job.get("mode", "epoch"),
                 "--repeats", str(job.get("repeats", 1)), "--variants", ",".join(job.get("variants", [])),
                 "--result", result, "--tta-json", json.dumps(job.get("tta", {}))]
        return launch_local(cfg, tmp, False, entry=entry)


def link_child(argv: list[str]) -> int:
    """``_link``: (inside the namespace, for a rate-limited link) shape the loopback, then measure."""
    p = argparse.ArgumentParser()
    p.add_argument("--link", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    link = P.parse_link(a.link)
    try:
        if not link.unlimited:
            P.setup_namespace_link(link)
    except P.LinkSkip as e:
        print(f"{PROG}: skip: {e}", file=sys.stderr)
        return 3
    with open(a.job) as f:
        job = json.load(f)
    return measure(job, a.result)


def run_link(job: dict[str, Any], link: P.Link, timeout_s: float) -> tuple[int, dict[str, Any] | None, str]:
    with tempfile.TemporaryDirectory() as tmp:
        jpath, rpath = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(jpath, "w") as f:
            json.dump(job, f)
        cmd = [sys.executable, "-u", os.path.abspath(__file__), "_link", "--link", link.spec, "--job", jpath,
               "--result", rpath]
        if not link.unlimited:
            cmd = P.unshare_prefix() + cmd
        rc, err = _run_child(cmd, timeout_s)
        if rc == 0 and os.path.exists(rpath):
            with open(rpath) as f:
                return 0, json.load(f), err
        return rc or 1, None, err


# ------------------------------------------------------------------------------------ analysis
def variants_for(methods: list[str], ms: list[int], ss: list[int], run_s: int) -> list[str]:
    v: list[str] = ["serial1"]                      # every ratio is against serial1 of the same launch
    for meth in methods:
        if meth in ("serial1", "serial2", "ddp"):
            v.append(meth)
        elif meth in P.PIPELINES:
            v += [f"{meth}:m{m}" for m in ms]
        elif meth == "sph":
            v += [f"sph:s{s}" for s in ss]
        elif meth == "sph-run":
            v += ["ddp-gbn", f"sph:s{run_s}"]
    return list(dict.fromkeys(v))


def _phase_counts(schedule: str) -> tuple[int, int]:
    ser = par = 0
    for part in schedule.split(","):
        name, _, n = part.partition(":")
        if name.strip() == "serial":
            ser += int(n)
        elif name.strip() == "parallel":
            par += int(n)
        else:
            raise UsageError(f"--sph-run-schedule: only serial:N and parallel:N phases, got {part!r}")
    if par == 0:
        raise UsageError("--sph-run-schedule needs a parallel phase")
    return ser, par


def rows_from_rounds(raw: dict[str, Any], *, model: str, link: str, methods: list[str], ms: list[int],
                     ss: list[int], batch: int, run_schedule: str, run_s: int) -> list[dict[str, Any]]:
    rounds = raw["rounds"]
    n_train, steps_epoch = raw["num_train"], raw["steps_per_epoch"]
    cut_shape = tuple(raw["cut_shapes"][0])
    n_ser, n_par = _phase_counts(run_schedule)
    peer_keys = [v for v in rounds[0]["order"] if v.split(":")[0] in P.PEERS]

    def per_round(r: dict[str, Any], key: str) -> tuple[float, float, float | None]:
        """(epoch_s, bytes per step, exposed) of a variant, sph-run composed."""
        if key == "sph-run":
            d, s = r["ddp-gbn" if "ddp-gbn" in r else "ddp"], r[f"sph:s{run_s}"]
            t = (n_ser * d["epoch_s"] + s["enter_s"] + n_par * (s["epoch_s"] + s["after_s"])) / (n_ser + n_par)
            b = (n_ser * d["bytes"] / d["steps"] + n_par * s["bytes"] / s["steps"]) / (n_ser + n_par)
            return t, b, s["exposed_s"] * n_par / (n_ser + n_par)
        x = r[key]
        return x["epoch_s"], x["bytes"] / max(1, x["steps"]), x.get("exposed_s")

    wanted: list[tuple[str, str, int | None, int | None]] = []
    for meth in methods:
        if meth in P.PIPELINES:
            wanted += [(meth, f"{meth}:m{m}", m, None) for m in ms]
        elif meth == "sph":
            wanted += [(meth, f"sph:s{s}", None, s) for s in ss]
        elif meth == "sph-run":
            wanted.append((meth, "sph-run", None, run_s))
        else:
            wanted.append((meth, meth, None, None))
    rows = []
    for meth, key, m, s in wanted:
        vals = [per_round(r, key) for r in rounds]
        t = [v[0] for v in vals]
        f = P.formula_bytes(meth, params=raw["param_bytes"], cut_shape=cut_shape, batch=batch, m=m, s=s)
        if meth == "sph-run":
            fd = P.formula_bytes("ddp", params=raw["param_bytes"], cut_shape=cut_shape, batch=batch)
            f = {"total": (n_ser * fd["total"] + n_par * f["total"]) / (n_ser + n_par)}
        bps = P.median([v[1] for v in vals])
        exposed = [v[2] for v in vals if v[2] is not None]
        rows.append({
            "model": model, "method": meth, "link": link, "m": m, "s": s, "variant": key,
            "cut": raw["cuts"], "cut_shape": list(cut_shape),
            "epoch_s": P.median(t), "epoch_s_min": min(t), "epoch_s_max": max(t),
            "images_per_s": n_train / P.median(t),
            "vs_serial1": P.median([r["serial1"]["epoch_s"] / ti for r, ti in zip(rounds, t)]),
            "vs_best_peer": P.median([min(r[k]["epoch_s"] for k in peer_keys) / ti for r, ti in zip(rounds, t)]),
            "bytes_per_step": bps, "bytes_per_step_formula": f["total"],
            "bytes_check": (bps / f["total"]) if f["total"] else (1.0 if bps == 0 else float("inf")),
            "bytes_per_epoch": bps * steps_epoch,
            "exposed_comm_s": P.median(exposed) if exposed else None,
            "rounds": len(rounds), "batch_size": batch, "num_train": n_train,
        })
    for meth in ("gpipe", "1f1b", "sph"):   # best m / s of each (link, method)
        group = [r for r in rows if r["method"] == meth]
        if group:
            best = min(group, key=lambda r: r["epoch_s"])
            for r in group:
                r["best"] = r is best
    return rows


# ------------------------------------------------------------------------------------ commands
def _common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--dataset", default="cifar10")
    q.add_argument("--data-dir", default=str(default_data_dir()),
                   help="folder with the data files [default: $LAYERPAR_DATA_DIR, else ~/.cache/layerpar_fast]")
    q.add_argument("--subset", type=int, default=5000)
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--balance", default="flops", choices=("flops", "time"), help="how the cut is chosen")
    q.add_argument("--cuts", help="the cut block index (the same for every method; overrides --balance)")
    q.add_argument("--timeout-s", type=float, default=4 * 3600.0, help="hard limit per launch")
    q.add_argument("--out", help="JSON")
    q.add_argument("--md", help="markdown")
    q.add_argument("--png", help="plot")


def _check_data(args: argparse.Namespace) -> None:
    from layerpar_fast.data import load_dataset
    load_dataset(args.dataset, args.data_dir, subset=args.subset)   # decode/cache once, before the ranks start


def _tables(args: argparse.Namespace, rows: list[dict[str, Any]], raws: list[dict[str, Any]], env: dict[str, Any],
            load_before: Any, skipped: list[str], partial: bool) -> tuple[Any, str]:
    meta = {"env": env, "load_before": load_before, "load_after": _load(), "dataset": args.dataset,
            "subset": args.subset, "batch_size": args.batch_size, "repeats": args.repeats,
            "sph_run_schedule": args.sph_run_schedule, "sph_run_s": args.sph_run_s, "skipped": skipped,
            "command": "python " + " ".join(sys.argv)}
    text = P.markdown_table(rows, meta)
    if partial:
        text = "**Partial: the benchmark is still running or was stopped; the rows below are complete.**\n\n" + text
    return (rows if not args.raw else {"rows": rows, "meta": meta, "raw": raws}), text


def _write(args: argparse.Namespace, obj: Any, text: str) -> None:
    from layerpar_fast.metrics import atomic_write_json
    if args.out:
        atomic_write_json(args.out, obj)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


def cmd_epoch(args: argparse.Namespace) -> int:
    models = P.parse_list(args.models or args.model, P.EPOCH_MODELS if not args.any_model else
                          _available_models(), "model")
    methods = P.parse_list(args.methods, P.METHODS, "method")
    links = P.parse_links(args.links)
    ms = P.parse_ints(args.ms, "--ms")
    ss = P.parse_ints(args.ss, "--ss")
    if args.repeats < 1:
        raise UsageError("--repeats must be >= 1")
    for m in ms:
        if args.batch_size % m:
            raise UsageError(f"--ms: batch {args.batch_size} does not split into {m} equal micro-batches")
    _phase_counts(args.sph_run_schedule)
    runnable, skipped = [], []
    for link in links:
        if link.unlimited:
            runnable.append(link)
            continue
        try:
            P.probe_link(link)
            runnable.append(link)
        except P.LinkSkip as e:
            print(f"{PROG}: skip: {e}", file=sys.stderr, flush=True)
            skipped.append(str(e))
    _check_data(args)
    load_before = _load()
    rows: list[dict[str, Any]] = []
    raws: list[dict[str, Any]] = []
    env: dict[str, Any] = {}
    variants = variants_for(methods, ms, ss, args.sph_run_s)
    for model in models:
        for link in runnable:
            job = {"dataset": args.dataset, "data_dir": args.data_dir, "subset": args.subset, "model": model,
                   "batch_size": args.batch_size, "balance": args.balance, "cuts": args.cuts,
                   "repeats": args.repeats, "variants": variants, "timeout_s": args.timeout_s,
                   "kappa_iters": args.kappa_iters, "ds": min(ss)}
            print(f"{PROG}: {model}, link {link.spec}: {', '.join(variants)} x {args.repeats} rounds", flush=True)
            rc, raw, err = run_link(job, link, args.timeout_s)
            if rc == 3 and "skip:" in err:
                line = err.strip().splitlines()[-1]
                print(line, file=sys.stderr)
                skipped.append(line.split("skip: ", 1)[-1])
                continue
            if rc != 0 or raw is None:
                sys.stderr.write(err)
                print(f"{PROG}: error: {model} on link {link.spec} failed (status {rc})", file=sys.stderr)
                return 2 if rc == 2 else 1
            env = raw.get("environment", env)
            raws.append({"model": model, "link": link.spec, **raw})
            rows += rows_from_rounds(raw, model=model, link=link.spec, methods=methods, ms=ms, ss=ss,
                                     batch=args.batch_size, run_schedule=args.sph_run_schedule, run_s=args.sph_run_s)
            # written after every launch, so a stopped benchmark keeps what it measured
            _write(args, *_tables(args, rows, raws, env, load_before, skipped, partial=True))
    obj, text = _tables(args, rows, raws, env, load_before, skipped, partial=False)
    print(text)
    _write(args, obj, text)
    if args.png and rows:
        P.write_png(rows, args.png)
    return 0


def _available_models() -> list[str]:
    from layerpar_fast.models import available_models
    return list(available_models())


def cmd_bytes(args: argparse.Namespace) -> int:
    models = P.parse_list(args.models, _available_models(), "model")
    cuts = [int(c) for c in args.cuts.split(",")] if args.cuts else None
    rows = P.bytes_table(models, args.batch_size, P.parse_ints(args.ms, "--ms"), P.parse_ints(args.ss, "--ss"),
                         cuts=cuts)
    text = P.bytes_markdown(rows, args.batch_size)
    print(text)
    _write(args, rows, text)
    return 0


# ------------------------------------------------------------------------------------ time to accuracy
def _tta_worker(cfg: Any, opts: dict[str, Any]) -> dict[str, Any]:
    """Every method from the same initial weights for ``cfg.total_epochs()`` epochs; after each
    epoch the test accuracy and the cumulative training wall-clock time (evaluation excluded)."""
    import torch
    import torch.distributed as dist
    from layerpar_fast.dist import DistTrainer

    rank, world = dist.get_rank(), dist.get_world_size()
    curves: dict[str, list[dict[str, float]]] = {}
    for meth in opts["methods"]:
        torch.manual_seed(cfg.seed)
        if meth == "sph":
            tr = DistTrainer(dataclasses.replace(cfg, ds=opts["s"]), None, log=lambda m: None)
            torch.set_num_threads(1)
            tr.run()
            ev = 0.0
            pts = []
            for r in tr.records:
                ev += r.get("eval_time_s", 0.0)
                pts.append({"epoch": r["epoch"], "wall_s": r["wall_time_s"] - ev, "test_acc": r["test_acc"],
                            "phase": r.get("phase", "serial")})
            curves["sph"] = pts
            tr.close()
            continue
        tr = DistTrainer(dataclasses.replace(cfg, schedule=f"serial:{cfg.total_epochs()}"), None,
                         log=lambda m: None)
        torch.set_num_threads(1)
        sched = None
        if meth.startswith(("gpipe", "1f1b")):
            kind, m = meth.split(":m")
            sched = P.make_schedule(tr.stages[rank], rank, world, kind, int(m), tr.device,
                                    input_shape=_stage_input_shape(tr, rank, int(m)))
        wall, pts = 0.0, []
        for e in range(tr.total_epochs):
            lr_fn = (lambda t, e=e: tr.lr_at(e * tr.steps_per_epoch + t))
            dist.barrier()
            t0 = time.perf_counter()
            if meth == "serial1":
                if rank == 0:
                    tr._serial_epoch_local(e)
                tr.topology.sync_all_from(0, tr.stages, tr.optimizers)
            elif meth == "ddp":
                P.ddp_epoch(tr.model, tr.optimizers, _ddp_batches(tr, e), rank=rank, world=world, lr_fn=lr_fn)
                tr._average_bn_stats()
            else:
                P.pipeline_epoch(sched, tr.optimizers[rank], _pipe_batches(tr, e, rank), rank=rank, world=world,
                                 lr_fn=lr_fn)
                tr.topology.sync_stages(tr.stages, tr.optimizers)
            dist.barrier()
            wall += time.perf_counter() - t0
            loss, acc = tr.evaluate()
            pts.append({"epoch": e + 1, "wall_s": wall, "test_acc": acc, "test_loss": loss})
        curves[meth] = pts
        tr.close()
    return {"curves": curves}


def _epoch_s(rows: list[dict[str, Any]], model: str, variant: str, link: str, hint_link: str) -> float:
    """The epoch time of ``model`` / ``variant`` on ``link`` in an `epoch` table; a UsageError that
    says how to measure it when the table lacks the row (``hint_link``: the slow link composed)."""
    for r in rows:
        if r["model"] == model and r["link"] == link and r["variant"] == variant:
            return float(r["epoch_s"])
    raise UsageError(f"--epoch-json has no {model} / {variant} row on link {link!r}: measure it with "
                     f"`bench_peers.py epoch --models {model} --links unlimited,{hint_link}`")


def compose_curves(curves: dict[str, list[dict[str, Any]]], rows: list[dict[str, Any]], link: str, *,
                   model: str, pipeline: str, s: int) -> dict[str, list[dict[str, Any]]]:
    """Time-to-accuracy curves on ``link`` composed from curves measured on the unlimited link.

    The accuracy after each epoch does not depend on the link (the same arithmetic on every link);
    only the time does. Each epoch's measured duration is multiplied by the ratio of that method's
    epoch time on ``link`` to its epoch time on the unlimited link, both from the same `epoch`
    table (``rows``): serial1 by serial1's, ddp by ddp's, the pipelining schedule by the same
    schedule and micro-batch count, SPH's parallel epochs by ``sph`` at the same s and its serial
    epochs (data-parallel) by ddp's."""
    def factor(variant: str) -> float:
        return _epoch_s(rows, model, variant, link, link) / _epoch_s(rows, model, variant, "unlimited", link)

    kind, _, m = pipeline.partition(":")
    out: dict[str, list[dict[str, Any]]] = {}
    for meth, pts in curves.items():
        wall, prev, new_pts = 0.0, 0.0, []
        for p in pts:
            if meth == "sph":
                f = factor(f"sph:s{s}") if p.get("phase") == "parallel" else factor("ddp")
            elif meth.startswith(("gpipe", "1f1b")):
                f = factor(f"{kind}:m{m}")
            else:
                f = factor(meth)
            wall += (p["wall_s"] - prev) * f
            prev = p["wall_s"]
            new_pts.append({**p, "wall_s": wall})
        out[meth] = new_pts
    return out


def _tta_lines(title: str, curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    best = max(max(p["test_acc"] for p in pts) for pts in curves.values())
    lines = [title, "", "| method | final test acc | best test acc | wall-clock (s) | time to 95% of the best "
             "method's best accuracy (s) |", "|---|---|---|---|---|"]
    for meth, pts in curves.items():
        reach = next((p["wall_s"] for p in pts if p["test_acc"] >= 0.95 * best), None)
        lines.append(f"| {meth} | {100 * pts[-1]['test_acc']:.2f}% | {100 * max(p['test_acc'] for p in pts):.2f}% | "
                     f"{pts[-1]['wall_s']:.1f} | {'-' if reach is None else f'{reach:.1f}'} |")
    return lines


def cmd_tta(args: argparse.Namespace) -> int:
    ser, par = _phase_counts(args.sph_schedule)
    if ser + par != args.epochs:
        raise UsageError(f"--sph-schedule {args.sph_schedule} has {ser + par} epochs, --epochs is {args.epochs}")
    kind, _, m = args.pipeline.partition(":")
    if kind not in P.PIPELINES or not m.isdigit() or args.batch_size % int(m):
        raise UsageError(f"--pipeline must be gpipe:M or 1f1b:M with M dividing the batch, got {args.pipeline!r}")
    if args.parallel_augment not in PARALLEL_AUGMENTS:
        raise UsageError(f"--parallel-augment must be one of {', '.join(PARALLEL_AUGMENTS)}")
    link = P.parse_links(args.link)
    if len(link) != 1:
        raise UsageError(f"--link takes one link, got {args.link!r}")
    link = link[0]
    compose = None
    if args.compose_link:
        if not args.epoch_json:
            raise UsageError("--compose-link needs --epoch-json (the `epoch` table with that link and unlimited)")
        if not link.unlimited:
            raise UsageError("--compose-link composes from curves measured on the unlimited link (--link unlimited)")
        compose = P.parse_links(args.compose_link)
        if len(compose) != 1 or compose[0].unlimited:
            raise UsageError(f"--compose-link takes one rate-limited link, got {args.compose_link!r}")
        try:
            with open(args.epoch_json) as f:
                epoch_rows = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"--epoch-json {args.epoch_json}: {e}") from None
        epoch_rows = epoch_rows["rows"] if isinstance(epoch_rows, dict) else epoch_rows
        for v in ("serial1", "ddp", f"{kind}:m{m}", f"sph:s{args.s}"):    # every row, before the training
            for lk in ("unlimited", compose[0].spec):
                _epoch_s(epoch_rows, args.model, v, lk, compose[0].spec)
    if not link.unlimited:
        try:
            P.probe_link(link)
        except P.LinkSkip as e:
            print(f"{PROG}: skip: {e}", file=sys.stderr)
            return 3
    methods = ["serial1", "ddp", f"{kind}:m{m}", "sph"]
    if args.model not in _available_models():
        raise UsageError(f"unknown model {args.model!r}")
    _check_data(args)
    job = {"dataset": args.dataset, "data_dir": args.data_dir, "subset": args.subset, "model": args.model,
           "batch_size": args.batch_size, "balance": args.balance, "cuts": args.cuts, "timeout_s": args.timeout_s,
           "mode": "tta", "schedule": args.sph_schedule, "test_subset": args.test_subset,
           "kappa_iters": args.kappa_iters, "bn_recalib_batches": args.bn_recalib_batches, "ds": args.s,
           "config": {"parallel_augment": args.parallel_augment}, "tta": {"methods": methods, "s": args.s}}
    print(f"{PROG}: time to accuracy, {args.model}, link {link.spec}: {', '.join(methods)}, {args.epochs} epochs each",
          flush=True)
    rc, raw, err = run_link(job, link, args.timeout_s)
    if rc == 3 and "skip:" in err:
        print(err.strip().splitlines()[-1], file=sys.stderr)
        return 3
    if rc != 0 or raw is None:
        sys.stderr.write(err)
        print(f"{PROG}: error: the time-to-accuracy launch failed (status {rc})", file=sys.stderr)
        return 2 if rc == 2 else 1
    curves = {link.spec: raw["curves"]}
    if compose:
        curves[compose[0].spec] = compose_curves(raw["curves"], epoch_rows, compose[0].spec, model=args.model,
                                                 pipeline=args.pipeline, s=args.s)
    head = [f"# Time to accuracy: {args.model}, {args.dataset} ({args.subset or 'all'} images), {args.epochs} epochs, "
            "K = 2 x 1 thread", "",
            f"SPH schedule {args.sph_schedule} at s = {args.s}, parallel-phase views: {args.parallel_augment}; "
            f"pipelining {args.pipeline} (BatchNorm on micro-batches); every method from the same initial weights; "
            "wall-clock = training only (evaluation excluded).", "",
            f"Command: `python {' '.join(sys.argv)}`"]
    if compose:
        head += ["", f"The {compose[0].spec} curves are composed, not measured: each epoch's measured time on the "
                 f"unlimited link times the ratio of that method's epoch time on {compose[0].spec} to unlimited in "
                 f"{args.epoch_json} (SPH: parallel epochs by sph s = {args.s}, serial epochs by ddp); the accuracy "
                 "after each epoch does not depend on the link."]
    lines = list(head)
    for lk, cv in curves.items():
        lines += [""] + _tta_lines(f"## link {lk}" + (" (composed)" if compose and lk == compose[0].spec else ""), cv)
    text = "\n".join(lines) + "\n"
    print(text)
    _write(args, {"curves": curves, "environment": raw.get("environment"), "command": "python " + " ".join(sys.argv),
                  "composed": [compose[0].spec] if compose else []}, text)
    if args.png:
        write_tta_png(curves, args.png, title=f"{args.model}, {args.dataset} ({args.subset or 'all'} images), "
                      f"{args.epochs} epochs, K = 2 x 1 thread", composed=[c.spec for c in compose or []])
    return 0


def write_tta_png(curves: dict[str, dict[str, list[dict[str, Any]]]], path: str, *, title: str,
                  composed: list[str]) -> None:
    """Test accuracy against training wall-clock, one panel per link."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False, sharey=True)
    for ax, (lk, cv) in zip(axes[0], curves.items()):
        for meth, pts in cv.items():
            ax.plot([p["wall_s"] for p in pts], [100 * p["test_acc"] for p in pts], marker="o", ms=3, label=meth)
        ax.set_xlabel("training wall-clock (s)")
        ax.set_title(f"link {lk}" + (" (composed from the epoch table)" if lk in composed else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:   # one line, exit 2
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    e = sub.add_parser("epoch", help="seconds per epoch of every method on every link")
    _common(e)
    e.add_argument("--model", default="resnet20")
    e.add_argument("--models", help="comma-separated (overrides --model)")
    e.add_argument("--any-model", action="store_true", help=argparse.SUPPRESS)   # tests: tiny models
    e.add_argument("--methods", default="serial1,serial2,ddp,gpipe,1f1b,sph,sph-run")
    e.add_argument("--links", default="unlimited")
    e.add_argument("--ms", default="2,4,8", help="micro-batch counts of gpipe / 1f1b")
    e.add_argument("--ss", default="1,2,4", help="SPH coarsening factors")
    e.add_argument("--sph-run-schedule", default="serial:1,parallel:9,serial:8")
    e.add_argument("--sph-run-s", type=int, default=2)
    e.add_argument("--kappa-iters", type=int, default=20)
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--raw", action="store_true", help="JSON: {rows, meta, raw rounds} instead of the row list")
    b = sub.add_parser("bytes", help="bytes on the wire per step from shapes (no training)")
    b.add_argument("--models", default="wrn28_10,resnet110,resnet20,resnet56,wrn16_4")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--ms", default="2,4,8")
    b.add_argument("--ss", default="1,2,4")
    b.add_argument("--cuts", help="the cut (default: FLOPs-balanced per model)")
    b.add_argument("--out")
    b.add_argument("--md")
    t = sub.add_parser("tta", help="test accuracy against wall-clock time (serial1, ddp, pipelining, SPH)")
    _common(t)
    t.set_defaults(subset=None)
    t.add_argument("--model", default="resnet20")
    t.add_argument("--epochs", type=int, default=18)
    t.add_argument("--sph-schedule", default="serial:1,parallel:9,serial:8")
    t.add_argument("--s", type=int, default=2)
    t.add_argument("--pipeline", default="1f1b:4", help="the best schedule of the epoch table, e.g. gpipe:4")
    t.add_argument("--test-subset", type=int, default=None)
    t.add_argument("--bn-recalib-batches", type=int, default=20)
    t.add_argument("--kappa-iters", type=int, default=20)
    t.add_argument("--parallel-augment", default="auto", help="SPH's parallel-phase views (auto: shift views where the serial epochs augment, as on CIFAR-10)")
    t.add_argument("--link", default="unlimited", help="the link the four runs are measured on")
    t.add_argument("--compose-link", help="also the curves on this rate-limited link, composed from the "
                   "measured ones and --epoch-json's epoch times on that link and unlimited")
    t.add_argument("--epoch-json", help="an `epoch` table (json) with the --compose-link and unlimited rows")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        return worker(argv[1:])
    try:
        if argv and argv[0] == "_link":
            return link_child(argv[1:])
        _install_cleanup()
        args = build_parser().parse_args(argv)
        return {"epoch": cmd_epoch, "bytes": cmd_bytes, "tta": cmd_tta}[args.cmd](args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _kill_children()
        print(f"{PROG}: interrupted; every process stopped", file=sys.stderr)
        return 130
    except Exception as e:   # ConfigError / ModelError / StagingError / DataError: user input
        if type(e).__name__ in ("ConfigError", "ModelError", "StagingError", "DataError", "FileNotFoundError"):
            print(f"{PROG}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

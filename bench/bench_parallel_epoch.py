"""Per-epoch time of the layer-parallel phase against serial back-propagation and DDP (docs/method.md §7).

``epoch`` (what bench/results/parallel_epoch_cpu.md reports): one launch of K = 2 local ranks
(gloo, 1 thread each) that measures, in the same processes and interleaved over ``--repeats``
rounds (the order rotates every round so that drifting machine load hits every variant alike):

* serial back-propagation epoch with augmentation on rank 0 with 1 thread (rank 1 idle);
* the same with 2 threads (rank 1 idle);
* one parallel epoch of K = 2 ranks x 1 thread (the step loop and the end-of-epoch drain,
  slowest rank; the phase entry (κ estimate + initial fill) and the post-epoch parameter
  broadcast and probe are reported separately);
* one DDP epoch of 2 ranks x 1 thread (DistTrainer's data-parallel serial epoch);
* the same messages as one parallel epoch sent back and forth with nothing to overlap them
  (blocking send/recv): the communication a non-overlapped run would expose.

It prints and writes medians of the ratios, the §7 speedup model's prediction beside each (the
model's parallel time T_d + max_k t_k + t_λ + t_comm,exposed from the measured terms), and the
fraction of communication hidden behind computation.

``ops`` (bench/results/e2e_ops_cpu.md): the same launch, a parallel epoch with the fused ops
(``LAYERPAR_OPS=auto``: the C++ extension on CPU) against one with every op through the reference
torch code (``LAYERPAR_OPS=ref``), interleaved over ``--repeats`` rounds.

The end-to-end time-to-accuracy comparison (serial vs DDP vs SPH, whole runs) is bench/cifar_sph.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from layerpar_fast.data import default_data_dir
from layerpar_fast.config import make_config
from layerpar_fast.metrics import atomic_write_json, environment


# ------------------------------------------------------------------------------------ worker side
def _blocking_transfer(tr: Any, epoch: int) -> float:
    """Seconds to move one parallel epoch's "in" and "g" messages with blocking send/recv."""
    batches = tr.plain_loader.batches(epoch)
    shape = tr.filt.coarse_shape(tr.cut_shapes[0])
    dist.barrier()
    t0 = time.perf_counter()
    for b in batches:
        buf = torch.zeros((len(b), *shape))
        if dist.get_rank() == 0:
            dist.send(buf, 1, tag=11)
            dist.recv(buf, 1, tag=12)
        else:
            dist.recv(buf, 0, tag=11)
            dist.send(buf, 0, tag=12)
    return time.perf_counter() - t0


DEFAULT_VARIANTS = ("serial_1t", "serial_2t", "parallel", "ddp")


def _all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def worker(argv: list[str]) -> int:
    """One rank of the measurement (started by the elastic launcher; see ``epoch``)."""
    from layerpar_fast.dist import DistTrainer, init_process_group

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--config-json", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    args = p.parse_args(argv)
    cfg = make_config(json.loads(args.config_json))
    init_process_group(cfg.timeout_s)
    rank = dist.get_rank()
    tr = DistTrainer(cfg, None, log=lambda m: None)
    torch.set_num_threads(1)
    rounds = []
    variants = args.variants.split(",")
    for rep in range(args.repeats):
        r0 = rep % len(variants)
        res: dict[str, Any] = {"order": variants[r0:] + variants[:r0]}
        cpu: dict[str, float] = {}
        res["load"] = _load()
        for v in res["order"]:
            dist.barrier()
            c0 = time.process_time()
            if v.startswith("serial"):
                if rank == 0:
                    torch.set_num_threads(1 if v == "serial_1t" else 2)
                    t0 = time.perf_counter()
                    rec = tr._serial_epoch_local(rep)
                    res[v] = {"epoch_s": time.perf_counter() - t0, "data_s": rec["data_s"],
                              "compute_s": rec["compute_s"]}
                    torch.set_num_threads(1)
            elif v in ("parallel", "parallel_ref"):
                saved_ops = os.environ.get("LAYERPAR_OPS")
                if v == "parallel_ref":   # every fused op through the reference torch code
                    os.environ["LAYERPAR_OPS"] = "ref"
                t0 = time.perf_counter()
                if not tr._enter_parallel(0, rep):
                    raise RuntimeError("the parallel phase did not open (sharpness gate)")
                t1 = time.perf_counter()
                rec = tr._parallel_epoch(rep)
                t2 = time.perf_counter()
                if saved_ops is None:
                    os.environ.pop("LAYERPAR_OPS", None)
                else:
                    os.environ["LAYERPAR_OPS"] = saved_ops
                res[v] = {"epoch_s": rec["parallel_wall_s"], "per_rank_s": rec["parallel_wall_per_rank_s"],
                          "enter_phase_s": t1 - t0, "after_epoch_s": t2 - t1 - rec["parallel_wall_s"],
                          "stages": rec["stages"], "speedup_model": rec["speedup_model"],
                          "transport": rec["transport"], "cuts": tr.cuts}
                tr.stores = None
            else:
                t0 = time.perf_counter()
                rec = tr._serial_epoch_ddp(rep)
                res[v] = {"epoch_s": time.perf_counter() - t0, "data_s": rec["data_s"],
                          "compute_s": rec["compute_s"]}
            cpu[v] = time.process_time() - c0
        res["blocking_comm_s"] = _blocking_transfer(tr, rep) if "parallel" in variants else None
        res["cpu_s_per_rank"] = _all_gather(cpu)  # rank 1's CPU time during rank 0's serial epochs: idle?
        rounds.append(res)
        if rank == 0:
            print(f"round {rep + 1}/{args.repeats}: " + ", ".join(f"{v} {res[v]['epoch_s']:.2f}s" for v in variants),
                  flush=True)
    tr.close()
    if rank == 0:
        atomic_write_json(args.result, {"rounds": rounds, "environment": environment()})
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------ analysis
def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median ratios over rounds, the §7 model's predictions and the hidden communication."""
    per: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        per.setdefault(key, []).append(value)

    for r in rounds:
        par = r["parallel"]
        sm = par["speedup_model"]
        stage_t = [s["compute_s"] for s in par["stages"]]
        t_par = par["epoch_s"]
        # exposed communication: what the critical stage (the one with the most work) spent blocked;
        # a faster stage's waiting is stage imbalance, already counted in max_k t_k
        busy = [s["compute_s"] + s["data_s"] + s["update_s"] for s in par["stages"]]
        crit = busy.index(max(busy))
        exposed = par["stages"][crit]["wait_s"]
        # the model's parallel epoch: T_d + max_k(t_f^k + t_b^k) + t_λ + t_comm,exposed
        t_model = sm["T_d"] + max(stage_t) + sm["t_lambda"] + exposed
        add("parallel_s", t_par)
        add("parallel_model_s", t_model)
        add("enter_phase_s", par["enter_phase_s"])
        add("after_epoch_s", par["after_epoch_s"])
        add("rho_model_own_terms", sm["rho_pred"])
        for i, t in enumerate(stage_t):
            add(f"stage{i}_compute_s", t)
        for i, s in enumerate(par["stages"]):
            add(f"stage{i}_wait_s", s["wait_s"])
            add(f"stage{i}_update_s", s["update_s"])
            add(f"stage{i}_data_s", s["data_s"])
        for base in ("serial_1t", "serial_2t", "ddp"):
            add(f"{base}_s", r[base]["epoch_s"])
            add(f"rho_{base}", r[base]["epoch_s"] / t_par)
            add(f"rho_pred_{base}", r[base]["epoch_s"] / t_model)
        add("blocking_comm_s", r["blocking_comm_s"])
        add("wait_max_s", sm["t_comm_exposed"])
        add("idle_rank_cpu_during_serial_s", sum(r["cpu_s_per_rank"][1][v] for v in ("serial_1t", "serial_2t")))
        add("comm_exposed_s", exposed)
        add("comm_hidden_fraction", max(0.0, 1.0 - exposed / r["blocking_comm_s"]) if r["blocking_comm_s"] > 0 else float("nan"))
        sent = sum(sum(c["bytes_sent"].values()) for c in par["transport"])
        add("bytes_per_epoch", float(sent))
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v} for k, v in per.items()}


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def markdown(s: dict[str, Any], meta: dict[str, Any]) -> str:
    m = lambda k: s[k]["median"]  # noqa: E731
    rng = lambda k: f"{s[k]['min']:.2f}-{s[k]['max']:.2f}"  # noqa: E731
    lines = [
        "# Parallel-phase epoch time on CPU (K = 2 ranks x 1 thread)",
        "",
        f"Machine: {meta['env']['processor']}, {meta['env']['cpu_count']} cores; torch {meta['env']['torch']}, "
        f"python {meta['env']['python']}. Load average before / after: {meta['load_before']} / {meta['load_after']} "
        "(ratios measured in one run, interleaved, with the order rotated every round, so that drifting load "
        "hits every variant alike).",
        "",
        f"Workload: {meta['model']} on {meta['dataset']} ({meta['subset']} training images, batch {meta['batch_size']}, "
        f"{meta['steps']} steps/epoch), method {meta['method']}, s = {meta['ds']}, cut {meta['cuts']}; "
        f"{meta['repeats']} rounds, medians (min-max). Load average at the start of each round: "
        f"{', '.join(meta['round_loads'])}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| comparison | baseline epoch (s) | parallel epoch (s) | measured ρ | predicted ρ (§7) |",
        "|---|---|---|---|---|",
    ]
    names = {"serial_1t": "serial back-propagation, 1 thread (ideal 2.0)",
             "serial_2t": "serial back-propagation, 2 threads",
             "ddp": "DDP, 2 ranks x 1 thread"}
    for b, name in names.items():
        lines.append(f"| {name} | {m(b + '_s'):.2f} ({rng(b + '_s')}) | {m('parallel_s'):.2f} ({rng('parallel_s')}) | "
                     f"**{m('rho_' + b):.2f}** ({rng('rho_' + b)}) | {m('rho_pred_' + b):.2f} |")
    lines += [
        "",
        f"Predicted ρ = baseline / (T_d + max_k t_k + t_λ + t_comm,exposed) with the terms measured in the "
        f"parallel epoch (the baseline epochs include crop+flip augmentation, as SPH serial epochs do; the "
        f"parallel epoch has none, docs/method.md §6) (model parallel epoch {m('parallel_model_s'):.2f} s against {m('parallel_s'):.2f} s "
        f"measured). The model on the parallel run's own terms (Σ_k t_k as the serial time, metrics.speedup_model): "
        f"ρ = {m('rho_model_own_terms'):.2f}.",
        "",
        "| stage | compute t_k (s) | data (s) | λ/u updates + message handling (s) | blocked on messages (s) |",
        "|---|---|---|---|---|",
    ]
    k = 0
    while f"stage{k}_compute_s" in s:
        lines.append(f"| {k} | {m(f'stage{k}_compute_s'):.2f} | {m(f'stage{k}_data_s'):.2f} | "
                     f"{m(f'stage{k}_update_s'):.2f} | {m(f'stage{k}_wait_s'):.2f} |")
        k += 1
    lines += [
        "",
        f"Communication: {m('bytes_per_epoch') / 2**20:.1f} MiB per epoch in both directions; moving them with "
        f"blocking send/recv and no computation takes {1000 * m('blocking_comm_s'):.1f} ms. In the parallel epoch "
        f"the critical stage (the one with the most work) was blocked on messages for "
        f"{1000 * m('comm_exposed_s'):.1f} ms (t_comm,exposed): **{100 * m('comm_hidden_fraction'):.0f}%** of the "
        f"communication is hidden behind computation. (The faster stage's waiting, up to "
        f"{1000 * m('wait_max_s'):.0f} ms, is stage imbalance; metrics.jsonl's t_comm_exposed, the largest wait of "
        f"any stage, counts it too and so understates ρ.) Rank 1's CPU time while rank 0 ran the two serial "
        f"baselines: {m('idle_rank_cpu_during_serial_s'):.2f} s (it really was idle).",
        "",
        f"Not in the epoch times above: entering a parallel phase (κ estimate + initial λ fill) "
        f"{m('enter_phase_s'):.2f} s once per phase; after each parallel epoch the owners' parameter broadcast, "
        f"record gathering and gradient probe {m('after_epoch_s'):.2f} s.",
        "",
    ]
    return "\n".join(lines)


def _measure(args: argparse.Namespace, variants: tuple[str, ...]) -> dict[str, Any] | int:
    """Launch the K = 2 ranks, run ``variants`` for ``args.repeats`` rounds; the raw result or
    the launcher's non-zero exit status."""
    from layerpar_fast.data import load_dataset
    from layerpar_fast.launch import launch_local

    load_dataset(args.dataset, args.data_dir, subset=args.subset)  # decode/cache once, before the ranks start
    cfg = make_config(dataset=args.dataset, data_dir=args.data_dir, subset=args.subset, test_subset=1000,
                      model=args.model, method=args.method, stages=2, ds=args.ds, batch_size=args.batch_size,
                      schedule=f"parallel:{args.repeats}", serial_on="all", threads=1, progress=False,
                      timeout_s=3600.0, kappa_iters=args.kappa_iters, bn_recalib_batches=0,
                      balance=args.balance, cuts=args.cuts,
                      sharpness_gate=0, pace_rows=0)   # time the epoch however sharp the fresh network (method.md §6)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        code = launch_local(cfg, tmp, False, entry=[sys.executable, "-u", os.path.abspath(__file__), "worker",
                                                    "--repeats", str(args.repeats), "--result", result,
                                                    "--variants", ",".join(variants)])
        if code != 0:
            return code
        with open(result) as f:
            return json.load(f)


def cmd_ops(args: argparse.Namespace) -> int:
    """A parallel epoch with the fused ops (LAYERPAR_OPS=auto) against the same epoch with every
    op through the reference torch code (LAYERPAR_OPS=ref), interleaved in one launch."""
    raw = _measure(args, ("parallel", "parallel_ref"))
    if isinstance(raw, int):
        return raw
    from layerpar_fast import ops
    rounds = raw["rounds"]

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in rounds)
    fast = lambda r: r["parallel"]["epoch_s"]          # noqa: E731
    ref = lambda r: r["parallel_ref"]["epoch_s"]       # noqa: E731
    ratio = med(lambda r: ref(r) / fast(r))
    env = raw["environment"]
    lines = [
        "# End-to-end: parallel epoch with fused ops vs reference ops (CPU)",
        "",
        f"Machine: {env['processor']}, {env['cpu_count']} cores; torch {env['torch']}, python {env['python']}. "
        f"Fast paths: {ops.describe().splitlines()[-1]}",
        "",
        f"Workload: {args.model} on {args.dataset} ({args.subset} training images, batch {args.batch_size}), "
        f"K = 2 ranks x 1 thread, method {args.method}, s = {args.ds}, cut {rounds[0]['parallel']['cuts']}; "
        f"{args.repeats} rounds interleaved (order rotated), medians.",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| ops | parallel epoch (s) | per stage: compute t_k (s) | per stage: λ/u updates + message handling (s) |",
        "|---|---|---|---|",
    ]
    for name, key in (("fused (LAYERPAR_OPS=auto)", "parallel"), ("reference (LAYERPAR_OPS=ref)", "parallel_ref")):
        tk = [med(lambda r, k=k: r[key]["stages"][k]["compute_s"]) for k in range(2)]
        up = [med(lambda r, k=k: r[key]["stages"][k]["update_s"]) for k in range(2)]
        lines.append(f"| {name} | {med(lambda r: r[key]['epoch_s']):.2f} | "
                     f"{' / '.join(f'{t:.2f}' for t in tk)} | {' / '.join(f'{u:.3f}' for u in up)} |")
    lines += ["", f"Reference / fused epoch time: **{ratio:.3f}x** (median of per-round ratios: "
              f"{', '.join(f'{ref(r) / fast(r):.3f}' for r in rounds)}).", ""]
    text = "\n".join(lines)
    if args.out:
        atomic_write_json(args.out, {"ratio_ref_over_fused": ratio, "rounds": rounds, "environment": env})
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print(text)
    return 0


def cmd_epoch(args: argparse.Namespace) -> int:
    load_before = _load()
    raw = _measure(args, DEFAULT_VARIANTS)
    if isinstance(raw, int):
        return raw
    summary = summarise(raw["rounds"])
    meta = {"env": raw["environment"], "load_before": load_before, "load_after": _load(), "model": args.model,
            "dataset": args.dataset, "subset": args.subset, "batch_size": args.batch_size, "method": args.method,
            "ds": args.ds, "repeats": args.repeats, "cuts": raw["rounds"][0]["parallel"]["cuts"],
            "steps": -(-args.subset // args.batch_size), "round_loads": [r["load"] for r in raw["rounds"]], "command": "python " + " ".join(sys.argv)}
    if args.out:
        atomic_write_json(args.out, {"summary": summary, "meta": meta, "rounds": raw["rounds"]})
    text = markdown(summary, meta)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        return worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("epoch", help="per-epoch ratios of the parallel phase (K = 2 x 1 thread)")
    o = sub.add_parser("ops", help="a parallel epoch with fused ops against reference ops (end to end)")
    for q in (e, o):
        q.add_argument("--dataset", default="cifar10")
        q.add_argument("--data-dir", default=str(default_data_dir()),
                       help="folder with the data files [default: $LAYERPAR_DATA_DIR, else ~/.cache/layerpar_fast]")
        q.add_argument("--subset", type=int, default=5000)
        q.add_argument("--model", default="resnet20")
        q.add_argument("--method", default="al")
        q.add_argument("--ds", type=int, default=2)
        q.add_argument("--batch-size", type=int, default=128)
        q.add_argument("--kappa-iters", type=int, default=20 if q is e else 2,
                       help="power iterations when entering each measured phase (not timed)")
        q.add_argument("--balance", default="flops", help="how to choose the cut: flops or time (measured)")
        q.add_argument("--cuts", help="the cut block index (overrides --balance)")
        q.add_argument("--repeats", type=int, default=3)
        q.add_argument("--out", help="JSON with every round")
        q.add_argument("--md", help="markdown summary")
    args = p.parse_args(argv)
    return {"epoch": cmd_epoch, "ops": cmd_ops}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""CIFAR-10, ResNet-20: serial back-propagation vs DDP vs SPH-penalty vs SPH-AL (issues 3 and 4).

Every run shares the model, data order, batch size (128), peak learning rate, cosine schedule and
epoch budget; only the method, the downsampling factor s and the number of workers differ. Each
run goes through the real command line (`layerpar train`), so the layer-parallel runs are K
worker processes (gloo, 1 thread each) and their wall time is real parallel time:

    serial        1 process, 2 threads              serial:E        back-propagation baseline
    ddp           2 ranks x 1 thread                serial:E        data-parallel back-propagation
    al-s{1,2,4}   K = 2 ranks x 1 thread, AL (Gauss-Seidel order, automatic beta), s = 1, 2, 4
    penalty-s{1,2,4}  the same with the penalty method (beta = 10, gamma = 0.5)
    al-s2-k3      K = 3 ranks (3 processes on 2 cores: its wall time is oversubscribed)
    al-s2-shift-k{3,4}  K = 3 / 4 stages with shift views and cuts balanced by measured time, all
                  stages in one process (--transport local, 1 thread: the same parameters as K
                  processes; its wall time is serial time, not parallel time)
    sph-k{3,4}    K = 3 / 4 stages with every SPH option at the library's default (its schedule,
                  no shift views, FLOPs-balanced cuts), in one process like al-s2-shift-k{3,4}
    tail-only     al-s2's default schedule with its parallel epochs idle (serial:5,idle:3,serial:10
                  at 18 epochs on CIFAR): what the serial epochs of SPH buy alone
    al-s2-cycles  al-s2 with augmented serial epochs between parallel ones:
                  serial:1,(parallel:a,serial:1)x3,serial:R
    al-s{2,4}-shift, al-s2-cycles-shift   the same with --parallel-augment shift: the parallel
                  phase trains on shifted views, the auxiliary variables shifted with them
    al-s2-shiftflip  --parallel-augment shift_flip: shifted views and mirror images, each
                  mirror image with auxiliary variables of its own (twice the store memory)

SPH runs use the library's default schedule for E epochs: serial:W,parallel:P,serial:E-W-P with
W = round(0.3E), P = E-1-round(2E/3), and for the runs without shift views (augmented serial
epochs, un-augmented parallel ones) P = ceil(P/2), the tail taking the rest (--aug-parallel-share;
at K >= 3 also W = round(0.65E), at most E-2P, --aug-warm-share); --tail S sets serial:1,parallel:E-1-S,serial:S
for them and for tail-only (such runs are named NAME-tailS).
--seed N (N != 0) names the runs NAME-seedN; "vs serial" compares them with serial-seedN.
--set KEY=VALUE passes an option to every selected run and names them NAME-KEYVALUE.
Every epoch is evaluated on the first --test-subset test images (the curves and wall time);
afterwards the final model is evaluated on the whole test set (`layerpar eval`), outside the
wall time.

    python bench/cifar_sph.py --data-dir $DATA --subset 10000 --epochs 16 --out runs/cifar_sph
    python bench/cifar_sph.py ... --only serial,al-s2          # some runs; finished runs are kept

It writes one run directory per run under OUT, OUT/results.json, OUT/results.md (the table) and
OUT/tta.png (test accuracy against epoch and wall time, `layerpar plot`). A run interrupted
part-way is continued with --resume on the next invocation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from layerpar_fast.data import default_data_dir
from layerpar_fast.metrics import atomic_write_json, environment

RUNS: dict[str, list[str]] = {
    "serial": ["--method", "serial", "--stages", "1", "--threads", "2"],
    "ddp": ["--method", "serial", "--stages", "2", "--threads", "1"],
    "al-s1": ["--method", "al", "--stages", "2", "--ds", "1", "--threads", "1"],
    "al-s2": ["--method", "al", "--stages", "2", "--ds", "2", "--threads", "1"],
    "al-s4": ["--method", "al", "--stages", "2", "--ds", "4", "--threads", "1"],
    "penalty-s1": ["--method", "penalty", "--stages", "2", "--ds", "1", "--threads", "1"],
    "penalty-s2": ["--method", "penalty", "--stages", "2", "--ds", "2", "--threads", "1"],
    "penalty-s4": ["--method", "penalty", "--stages", "2", "--ds", "4", "--threads", "1"],
    "al-s2-k3": ["--method", "al", "--stages", "3", "--ds", "2", "--threads", "1"],
    "tail-only": ["--method", "serial", "--stages", "1", "--threads", "2"],   # schedule set below
    "al-s2-cycles": ["--method", "al", "--stages", "2", "--ds", "2", "--threads", "1"],  # schedule below
    "al-s2-shift": ["--method", "al", "--stages", "2", "--ds", "2", "--threads", "1",
                    "--parallel-augment", "shift"],
    "al-s4-shift": ["--method", "al", "--stages", "2", "--ds", "4", "--threads", "1",
                    "--parallel-augment", "shift"],
    "al-s2-cycles-shift": ["--method", "al", "--stages", "2", "--ds", "2", "--threads", "1",
                           "--parallel-augment", "shift"],  # schedule below
    "al-s2-shiftflip": ["--method", "al", "--stages", "2", "--ds", "2", "--threads", "1",
                        "--parallel-augment", "shift_flip"],
    # K > 2 on this 2-core machine: the K stages in one process (issue 13; same parameters as K ranks)
    "al-s2-shift-k3": ["--method", "al", "--stages", "3", "--ds", "2", "--threads", "1",
                       "--parallel-augment", "shift", "--balance", "time", "--transport", "local"],
    "al-s2-shift-k4": ["--method", "al", "--stages", "4", "--ds", "2", "--threads", "1",
                       "--parallel-augment", "shift", "--balance", "time", "--transport", "local"],
    # the library's defaults at K = 3 / 4 (its schedule, no shift views, FLOPs-balanced cuts), one process
    "sph-k3": ["--method", "al", "--stages", "3", "--threads", "1", "--transport", "local"],
    "sph-k4": ["--method", "al", "--stages", "4", "--threads", "1", "--transport", "local"],
}


def cycles_schedule(epochs: int) -> str:
    """serial:1, three cycles (parallel:a, serial:1), then the rest serial: augmented epochs
    between the parallel ones (the parallel phase trains without augmentation, docs/method.md §6)."""
    a = max(1, (epochs - 7) // 3)
    rest = epochs - 1 - 3 * (a + 1)
    if rest < 1:
        raise SystemExit(f"--epochs {epochs} is too few for al-s2-cycles (needs at least 8)")
    return f"serial:1,(parallel:{a},serial:1)x3,serial:{rest}"


def _default_schedule(epochs: int, dataset: str = "cifar10") -> str:
    """The library's default SPH schedule for ``epochs`` on ``dataset`` (K = 2, ``--augment auto``:
    crop_flip for CIFAR, so the un-augmented parallel phase is shortened, --aug-parallel-share)."""
    from layerpar_fast.config import make_config
    return make_config(method="al", stages=2, epochs=epochs, dataset=dataset).resolved_schedule()


def _default_tail(epochs: int, dataset: str = "cifar10") -> int:
    """The serial tail of the library's default schedule for ``epochs`` (at least 1)."""
    from layerpar_fast.config import parse_schedule
    phases = parse_schedule(_default_schedule(epochs, dataset))
    return phases[-1][1] if len(phases) > 1 else max(1, round(epochs / 4))


def run_command(name: str, args: argparse.Namespace, out: str) -> list[str]:
    extra = list(RUNS[name])
    common = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--model", args.model,
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
              "--test-subset", str(args.test_subset), "--no-progress"]
    if args.subset:
        common += ["--subset", str(args.subset)]
    tail = args.tail if args.tail is not None else _default_tail(args.epochs, args.dataset)
    if name == "tail-only":         # the SPH schedule with its parallel epochs skipped
        if args.tail is None:
            sched = _default_schedule(args.epochs, args.dataset).replace("parallel:", "idle:")
        else:
            sched = f"serial:1,idle:{args.epochs - 1 - tail},serial:{tail}"
        extra += ["--schedule", sched]
    elif name.startswith("al-s2-cycles"):
        extra += ["--schedule", cycles_schedule(args.epochs)]
    elif args.tail is not None and extra[extra.index("--method") + 1] != "serial":
        extra += ["--schedule", f"serial:1,parallel:{args.epochs - 1 - tail},serial:{tail}"]
    else:
        extra += ["--epochs", str(args.epochs)]
    if args.cuts and "--stages" in extra and extra[extra.index("--stages") + 1] == "2" and name != "ddp":
        extra += ["--cuts", args.cuts]
    for kv in args.set:
        key, _, val = kv.partition("=")
        extra += ["--" + key.replace("_", "-"), val]
    return [sys.executable, "-m", "layerpar_fast", "train", *common, *extra, "--out", out]


def run_key(name: str, args: argparse.Namespace) -> str:
    """The run's name in OUT: the run name, plus -tail{S} when --tail changed its schedule,
    -KEYVALUE for each --set KEY=VALUE and -seed{N} for seeds other than 0, so variants sit beside
    the defaults in one table."""
    key = name
    if args.tail is not None and (name == "tail-only" or (RUNS[name][RUNS[name].index("--method") + 1] != "serial"
                                                          and not name.startswith("al-s2-cycles"))):
        key += f"-tail{args.tail}"
    for kv in args.set:
        k, _, v = kv.partition("=")
        key += "-" + "".join(c if c.isalnum() or c in "._" else "_" for c in k + v)
    if args.seed != 0:
        key += f"-seed{args.seed}"
    return key


def collect(run_dir: str, cmd: list[str], full: dict[str, Any]) -> dict[str, Any]:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    recs = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    par = [r for r in recs if r["phase"] == "parallel"]
    last = par[-1] if par else {}
    cfg = summary["config"]
    return {
        "command": " ".join(cmd[2:]).replace("layerpar_fast train", "layerpar train"),
        "schedule": _schedule(cfg),
        "method": cfg["method"], "stages": cfg["stages"], "ds": cfg["ds"],
        "cuts": summary.get("cuts"),
        "subset_test_acc": summary["final_test_acc"], "full_test_acc": full["test_acc"],
        "num_test": full["num_test"],
        "wall_time_s": summary["wall_time_s"], "time_per_epoch_s": summary["time_per_epoch_s"],
        "ds_test_acc_last_parallel": last.get("ds_test_acc"),
        # rank 0's stores (older runs recorded only those); newer runs also list every rank's
        "aux_memory_bytes": (last.get("aux_memory_bytes_per_rank") or [last.get("aux_memory_bytes")])[0],
        "aux_memory_bytes_all_ranks": sum(last["aux_memory_bytes_per_rank"])
        if last.get("aux_memory_bytes_per_rank") else None,
        "bytes_per_epoch": sum(last.get("bytes_per_cut") or []) or None,
        "bytes_per_epoch_full_resolution": sum(last.get("bytes_per_cut_full_resolution") or []) or None,
        "violation_last_parallel": last.get("violation"),
        "transport": cfg.get("transport"),
        "per_epoch": [{"epoch": r["epoch"], "phase": r["phase"], "test_acc": r.get("test_acc"),
                       "wall_time_s": r.get("wall_time_s"), "probe_cosine": r.get("probe_cosine"),
                       "violation": r.get("violation"), "train_acc": r.get("train_acc")} for r in recs],
    }


def _schedule(cfg: dict[str, Any]) -> str:
    from layerpar_fast.config import make_config
    return make_config(cfg).resolved_schedule()


def fmt_bytes(n: float | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _threads(command: str, default: int) -> int:
    """The torch threads a recorded command ran with (its last --threads; --set threads=N appends one)."""
    words = command.split()
    found = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--threads"]
    return int(found[-1]) if found and found[-1].isdigit() else default


def write_table(results: dict[str, Any], meta: dict[str, Any], path: str) -> None:
    base = results.get("serial", {}).get("full_test_acc")
    base_t = results.get("serial", {}).get("wall_time_s")
    seeds = {k.rpartition("-seed")[2]: v for k, v in results.items() if k.startswith("serial-seed")}
    lines = [
        f"# CIFAR-10 {meta['model']}: serial vs DDP vs SPH ({meta['epochs']} epochs, "
        f"{meta['subset'] or 'all'} training images)",
        "",
        f"Machine: {meta['machine']}. Commands: " + "; ".join(f"`{c}`" for c in meta.get("commands")
                                                           or [meta["command"]]) + ".",
        "",
        f"Test accuracy of the final model on the whole test set ({meta['num_test']} images); the DS forward "
        f"(U∘D inserted at every cut: the network the parallel phase trained) after the last parallel epoch on "
        f"the first {meta['test_subset']} test images. Bytes: what crosses the cuts per parallel epoch (both "
        f"directions), and at full resolution (s = 1) for comparison. Wall time includes the per-epoch "
        f"evaluation on {meta['test_subset']} images. Aux memory: rank 0's stores (λ̃ and, for AL, u of the first "
        f"cut; the next rank holds a λ̃ copy as its input).",
        "",
        "| run | workers | schedule | test acc | vs serial | DS fwd acc | wall time | vs serial | aux memory (rank 0) | "
        "bytes / parallel epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ref = seeds.get(name.rpartition("-seed")[2]) if "-seed" in name else None
        b = ref["full_test_acc"] if ref else base   # the serial run of the same seed
        gap = f"{100 * (r['full_test_acc'] - b):+.2f}" if b is not None else "-"
        local = r.get("transport") == "local" and r["stages"] > 1
        speed = f"{base_t / r['wall_time_s']:.2f}x" if base_t and not local else "-"
        ds = f"{100 * r['ds_test_acc_last_parallel']:.2f}%" if r.get("ds_test_acc_last_parallel") is not None else "-"
        threads = _threads(r.get("command", ""), 2 if r["stages"] == 1 else 1)
        per = f"{threads} thread{'s' if threads > 1 else ''}"
        workers = f"1 x {per}" if r["stages"] == 1 else f"{r['stages']} x {per}"
        if name == "tail-only":
            workers = f"1 x {per} (idle epochs cost 0 s)"
        if local:
            workers = f"{r['stages']} stages in 1 process x {per} (serial time)"
        byt = fmt_bytes(r.get("bytes_per_epoch"))
        if r.get("bytes_per_epoch") and r.get("ds", 1) > 1:
            byt += f" ({fmt_bytes(r.get('bytes_per_epoch_full_resolution'))} at s = 1)"
        lines.append(f"| {name} | {workers} | `{r['schedule']}` | {100 * r['full_test_acc']:.2f}% | {gap} | {ds} | "
                     f"{r['wall_time_s'] / 60:.1f} min | {speed} | {fmt_bytes(r.get('aux_memory_bytes'))} | {byt} |")
    lines += monitor_lines(results)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def monitor_lines(results: dict[str, Any]) -> list[str]:
    """Per-stage monitors of the parallel epochs of every run with K > 2 stages: the probe-batch
    cosine of each stage's local gradient with the true gradient and each cut's drift
    ‖a − λ̃‖/‖λ̃‖ (docs/method.md), the training accuracy and the test accuracy of each epoch."""
    out: list[str] = []
    for name, r in results.items():
        eps = [e for e in r.get("per_epoch", []) if e.get("phase") == "parallel" and e.get("probe_cosine")]
        if r.get("stages", 1) <= 2 or not eps:
            continue
        k = r["stages"]
        out += ["", f"Per-stage monitors of `{name}` (parallel epochs; stage 1 = the first):", "",
                "| epoch | " + " | ".join(f"cos stage {i + 1}" for i in range(k - 1)) + " | "
                + " | ".join(f"drift cut {i + 1}" for i in range(k - 1)) + " | test acc |",
                "|---" * (2 * (k - 1) + 2) + "|"]
        for e in eps:
            cos = [f"{c:+.2f}" for c in e["probe_cosine"]][:k - 1]
            drift = [f"{v:.3f}" for v in (e.get("violation") or [])][:k - 1]
            cos += ["-"] * (k - 1 - len(cos))
            drift += ["-"] * (k - 1 - len(drift))
            acc = f"{100 * e['test_acc']:.2f}%" if e.get("test_acc") is not None else "-"
            out.append(f"| {e['epoch']} | " + " | ".join(cos) + " | " + " | ".join(drift) + f" | {acc} |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(default_data_dir()),
                   help="folder with the data files [default: $LAYERPAR_DATA_DIR, else ~/.cache/layerpar_fast]")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--subset", type=int, help="training images (default: all 50000)")
    p.add_argument("--test-subset", type=int, default=2000, help="test images evaluated every epoch")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tail", type=int, help="serial epochs after the parallel phase of the SPH and tail-only "
                   "runs (default: epochs / 4)")
    p.add_argument("--cuts", help="the cut of the K = 2 runs (default: balanced by FLOPs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra `layerpar train` option for every selected run (e.g. --set beta_c=1.2)")
    p.add_argument("--only", help="comma-separated run names (default: all)")
    p.add_argument("--force", action="store_true", help="run again even when OUT holds a result")
    p.add_argument("--out", default="runs/cifar_sph")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown runs {unknown}; valid: {', '.join(RUNS)}")
    if args.tail is not None and not 1 <= args.tail <= args.epochs - 2:
        p.error(f"--tail {args.tail} must be between 1 and epochs - 2 = {args.epochs - 2}")
    from layerpar_fast.data import load_dataset
    from layerpar_fast.trainer import evaluate_run
    load_dataset(args.dataset, args.data_dir)  # decode/cache once, before any run starts
    os.makedirs(args.out, exist_ok=True)
    res_path = os.path.join(args.out, "results.json")
    saved = json.load(open(res_path)) if os.path.exists(res_path) else {}
    results: dict[str, Any] = saved.get("runs", {})
    env = environment()
    meta = {"model": args.model, "epochs": args.epochs, "subset": args.subset, "test_subset": args.test_subset,
            "num_test": None, "command": "python " + " ".join(sys.argv),
            "machine": f"{env.get('processor') or 'CPU'}, {os.cpu_count()} cores, torch {env.get('torch')}"}
    commands = [c for c in saved.get("meta", {}).get("commands", []) if c != meta["command"]]
    meta["commands"] = [*commands, meta["command"]]
    for run in names:
        name = run_key(run, args)
        run_dir = os.path.join(args.out, name)
        if name in results and not args.force:
            print(f"== {name}: done ({100 * results[name]['full_test_acc']:.2f}%), skipped", flush=True)
            continue
        cmd = run_command(run, args, run_dir)
        finished = all(os.path.isfile(os.path.join(run_dir, f)) for f in ("summary.json", "final_model.pt"))
        if os.path.isdir(run_dir) and args.force:
            import shutil
            shutil.rmtree(run_dir)
            finished = False
        elif os.path.isfile(os.path.join(run_dir, "checkpoint.pt")) and not finished:
            cmd = [sys.executable, "-m", "layerpar_fast", "train", "--no-progress", "--resume", run_dir]
        t0 = time.time()
        if finished:      # trained by an earlier invocation that stopped before collecting it
            print(f"== {name}: finished earlier, collecting", flush=True)
        else:
            print("== " + name + ": $ " + " ".join(cmd), flush=True)
            code = subprocess.run(cmd).returncode
            if code != 0:
                print(f"== {name}: failed with exit status {code}; continuing with the next run", flush=True)
                continue
        full = evaluate_run(run_dir, test_subset=None)
        results[name] = collect(run_dir, run_command(run, args, run_dir), full)
        results[name]["process_time_s"] = time.time() - t0
        print(f"== {name}: {100 * full['test_acc']:.2f}% on {full['num_test']} test images, "
              f"{results[name]['wall_time_s'] / 60:.1f} min", flush=True)
        meta["num_test"] = full["num_test"]
        atomic_write_json(res_path, {"runs": results, "meta": meta, "environment": env})
        write_table(results, meta, os.path.join(args.out, "results.md"))
    if results:
        meta["num_test"] = next(iter(results.values()))["num_test"]
        write_table(results, meta, os.path.join(args.out, "results.md"))
        from layerpar_fast.plot import plot_runs
        done = [n for n in results if os.path.isfile(os.path.join(args.out, n, "metrics.jsonl"))]
        if done:
            plot_runs([os.path.join(args.out, n) for n in done], os.path.join(args.out, "tta.png"), done)
        print(open(os.path.join(args.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())

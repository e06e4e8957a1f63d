"""The accuracy matrix (issue 16): SPH-AL against serial back-propagation at the same budget,
over data sets, training-set sizes, augmentation, epoch budgets and K.

Every cell is one (dataset, training-set size, augmentation, epochs) setting. For each cell and
seed it trains the serial baseline once (``layerpar train --method serial --epochs E``) and SPH
with the **defaults of ``layerpar train``** at K = 2 and K = 4 (``--method al --stages K
--epochs E``; whatever the defaults are when the matrix runs, plus the options of a
``--variant``), all through the real command line, one process each (``--transport local``:
the K stages stepped one after another; accuracy does not depend on the transport).
The final model of every run is evaluated on the whole test set.

    python bench/accuracy_matrix.py run --cells quick --ks 2,4 --seeds 0           # the cheap cells
    python bench/accuracy_matrix.py run --cells all --ks 2,4 --seeds 0,1
    python bench/accuracy_matrix.py run --cells mnist-10k-e4 --variant zero-mult   # a named variant
    python bench/accuracy_matrix.py report --variants default,zero-mult            # table + plot only
    python bench/accuracy_matrix.py run --fork --cells cifar10-10k-aug-e18 --ks 4 --variant default,grad-mult
        # the serial warm start shared by the arms of one (cell, K, seed) trained once, every arm forked from it
    python bench/accuracy_matrix.py drift --cells all --ks 2,4 --seeds 0
        # each arm up to the end of its last parallel phase: the drift of every parallel epoch
        # (what --drift-guard acts on), bench/results/drift_matrix.{json,md}

Runs are resumable: a finished run is collected and skipped, an interrupted one continues from
its checkpoint (``layerpar train --resume``). Results accumulate in OUT/results.json (one entry
per run); ``report`` (also run after every finished run) writes the matrix of the chosen
variants: bench/results/accuracy_matrix.{json,md,png} by default.

Wall times come from this 2-core machine and include the per-epoch evaluation on --test-subset
images; they are disturbed when other work shares the cores (said so in the report).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from layerpar_fast.config import schedule_text  # noqa: E402
from layerpar_fast.data import default_data_dir  # noqa: E402
from layerpar_fast.metrics import atomic_write_json, environment  # noqa: E402

# name -> the cell's data, model and budget (the options both arms share)
CELLS: dict[str, dict[str, Any]] = {}


def _cell(name: str, dataset: str, size: str, augment: str, epochs: int, model: str | None = None) -> None:
    mnist = dataset == "mnist"
    CELLS[name] = {
        "dataset": dataset, "train_size": size, "epochs": epochs,
        "augment": augment,            # as --augment: none, or the data set's own (shift / crop_flip)
        "model": model or ("mnist_resnet" if mnist else "resnet20"),
        "lr": 0.05 if mnist else 0.1,
        "subset": 10000 if size == "10k" else None,
    }


for _size in ("10k", "full"):
    for _aug in ("none", "shift"):
        for _e in (4, 8, 12):
            _cell(f"mnist-{_size}-{'aug' if _aug != 'none' else 'noaug'}-e{_e}", "mnist", _size, _aug, _e)
    for _aug in ("none", "crop_flip"):
        for _e in (10, 18):
            _cell(f"cifar10-{_size}-{'aug' if _aug != 'none' else 'noaug'}-e{_e}", "cifar10", _size, _aug, _e)

# a deeper network (27 blocks: K = 4 cuts nearly evenly), on the subset only (issue 13)
for _aug in ("none", "crop_flip"):
    _cell(f"cifar10-10k-{'aug' if _aug != 'none' else 'noaug'}-e18-resnet56", "cifar10", "10k", _aug, 18, "resnet56")

# groups of cells, cheapest first: "quick" exposes the gaps (short budgets, no augmentation,
# small training sets) in minutes per run
GROUPS = {
    "quick": ["mnist-10k-noaug-e4", "mnist-10k-noaug-e8", "cifar10-10k-noaug-e10", "mnist-10k-noaug-e12",
              "cifar10-10k-aug-e10"],
    "mnist": [c for c in CELLS if c.startswith("mnist")],
    "cifar10": [c for c in CELLS if c.startswith("cifar10") and CELLS[c]["model"] == "resnet20"],
    "resnet56": [c for c in CELLS if CELLS[c]["model"] == "resnet56"],
    "all": list(CELLS),
}

# SPH variants: extra `layerpar train` options on top of the defaults (the arm "default" adds none)
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "before": [],      # the defaults before issue 16, run from a checkout of commit 19e88e7
    "tail25": ["--tail-share", "0.25"],       # the default schedule before issue 16 (serial tail E/4)
    "zero-mult": ["--mult-init", "zero"],       # the multipliers start at 0 (the behaviour before issue 16)
    "grad-mult": ["--mult-init", "grad"],
    "grad-c2": ["--mult-init", "grad", "--beta-c", "2"],
    "tail50": ["--tail-share", "0.5"],
    "tail67": ["--tail-share", "0.67"],
    "serial-one": ["--serial-on", "one"],      # serial epochs on whole batches (one rank)
    "drift15": ["--switch-drift", "0.15"],
    "drift25": ["--switch-drift", "0.25"],
    "tail50-drift15": ["--tail-share", "0.5", "--switch-drift", "0.15"],
    "stale": ["--stage-lr", "staleness"],
    "grad-stale": ["--mult-init", "grad", "--stage-lr", "staleness"],
    "grad-stale-tail50": ["--mult-init", "grad", "--stage-lr", "staleness", "--tail-share", "0.5"],
    # controls and placements for the 10-epoch CIFAR-10 cell (explicit schedules, E = 10)
    "allserial10": ["--schedule", "serial:10"],            # K simulated data-parallel shares, no parallel phase
    "late10": ["--schedule", "serial:3,parallel:2,serial:5"],   # the parallel phase at a lower learning rate
    "late8": ["--schedule", "serial:2,parallel:2,serial:4"],    # the same placement in an 8-epoch budget
    # the 8-epoch cells at K = 4: a parallel phase that reaches every stage (K - 1 = 3 epochs), or none
    "allserial8": ["--schedule", "serial:8"],             # K simulated data-parallel shares, no parallel phase
    "par3-e8": ["--schedule", "serial:1,parallel:3,serial:4"],
    # a stronger proximal weight against the drift of a stage's first epoch with a signal (lr·β·κ = c)
    "betac12": ["--beta-c", "1.2"],
    "betac18": ["--beta-c", "1.8"],
    "late10-betac12": ["--schedule", "serial:3,parallel:2,serial:5", "--beta-c", "1.2"],
    "warm30": ["--warm-share", "0.3"],      # the later phase as a rule: late8 / late10 at E = 8 / 10
    "warm40": ["--warm-share", "0.4"],      # an even later phase: serial:4,parallel:2,serial:4 at E = 10
    "pshift": ["--parallel-augment", "shift"],     # the parallel phase on shifted views (augmented cells)
    "pshiftflip": ["--parallel-augment", "shift_flip"],   # shifted and mirrored views in the parallel phase
    # half the un-augmented parallel epochs handed to the serial tail (augmented cells, E = 10)
    "par1-e10": ["--schedule", "serial:3,parallel:1,serial:6"],
    "augshare1": ["--aug-parallel-share", "1"],      # the default schedule before round 7 (all P parallel epochs)
    # remedies for K = 4 on the augmented 18-epoch cell (round 7): a later phase, a stronger proximal weight
    "warm45": ["--warm-share", "0.45"],                   # serial:8,parallel:3,serial:7 at E = 18 (augmented)
    "warm45-betac12": ["--warm-share", "0.45", "--beta-c", "1.2"],
    "augwarm0": ["--aug-warm-share", "0"],                # round 7's first step at K >= 3 (warm start round(0.3 E))
    "augwarm55": ["--aug-warm-share", "0.55"],            # a still later phase: serial:10,parallel:3,serial:5 at E = 18
    "augwarm45": ["--aug-warm-share", "0.45"],            # round 7's default (serial:8,parallel:3,serial:7 at E = 18)
    "augwarm65": ["--aug-warm-share", "0.65"],            # later again: serial:12,parallel:3,serial:3 at E = 18
    # the later warm start at K = 2 (measured in round 7 before --aug-warm-share was limited to K >= 3)
    "late4p1-e10": ["--schedule", "serial:4,parallel:1,serial:5"],
    "late8p3-e18": ["--schedule", "serial:8,parallel:3,serial:7"],
    "guard30": ["--drift-guard", "0.3"],
    "nogate": ["--sharpness-gate", "0"],
    "gate25": ["--sharpness-gate", "0.25"],
    "noguard": ["--drift-guard", "0"],
    "late4p1-e8": ["--schedule", "serial:4,parallel:1,serial:3"],
    # round 8, K = 4 on augmented CIFAR-10: shift views in the parallel phase, with cuts whose coarse grids move
    # in 4-px steps (the FLOPs-balanced 3,5,8 puts the last cut on the 8x8 map, whose 4x4 grid moves in 8-px steps)
    "pshift-c357": ["--parallel-augment", "shift", "--cuts", "3,5,7"],
    # round 12, ResNet-56 at K = 4: the default late phase (18 epochs, augmented) on shifted views (s = 1: the
    # FLOPs-balanced cuts, one on the 8x8 map, move in whole cells with 4-px shifts)
    "pshift-late": ["--parallel-augment", "shift", "--ds", "1", "--schedule", "serial:12,parallel:3,serial:3"],
    # round 9, K = 4 on augmented CIFAR-10: the multiplier warm start again, now that the phase runs late (lr 0.025)
    "grad-c12": ["--mult-init", "grad", "--beta-c", "1.2"],
    # the stages after a cut train on U(D(a)): at K = 4 three blurred inputs, one on the 8x8 map (DS-forward 39-54%)
    "ds1": ["--ds", "1"],
    "grad-ds1": ["--mult-init", "grad", "--ds", "1"],
    "bilinear": ["--filter", "avg_bilinear"],
    "ds2": ["--ds", "2"],            # the default before round 9 at every K
    "bf16": ["--amp", "bf16"],                                   # mixed precision (issue 15's accuracy check)
    "replicas2": ["--replicas", "2"],                            # K stages x 2 replicas, same global batch (issue 13)
    # round 13: the pace guard, a parallel epoch kept only when it lowers the held-in training loss
    "pace2k": ["--pace-rows", "2048"],
    "nopace": ["--pace-rows", "0"],           # the defaults before round 13
}


def run_dir(out: str, cell: str, arm: str, k: int | None, seed: int) -> str:
    name = arm if k is None else f"{arm}-K{k}"
    return os.path.join(out, cell, f"{name}-seed{seed}")


def train_command(cell: str, arm: str, k: int | None, seed: int, args: argparse.Namespace, out: str) -> list[str]:
    c = CELLS[cell]
    cmd = [sys.executable, "-m", "layerpar_fast", "train", "--dataset", c["dataset"], "--data-dir", args.data_dir,
           "--model", c["model"], "--lr", str(c["lr"]), "--batch-size", "128", "--epochs", str(c["epochs"]),
           "--augment", c["augment"], "--seed", str(seed), "--test-subset", str(args.test_subset),
           "--transport", "local", "--no-progress", "--out", out]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if c["subset"]:
        cmd += ["--subset", str(c["subset"])]
    if k is None:
        cmd += ["--method", "serial"]
    else:
        cmd += ["--method", "al", "--stages", str(k), *VARIANTS[arm]]
    return cmd


def _config(cmd: list[str]):
    """The Config a ``layerpar train`` command line (not --resume/--fork) resolves to (no training)."""
    from layerpar_fast.cli import _build_parser, _train_config
    args = _build_parser().parse_args(cmd[3:])
    args.out = None          # the command's own --out may hold the run already (an interrupted run)
    return _train_config(args)[0]


def _build_config(cmd: list[str]) -> dict[str, Any]:
    return _config(cmd).to_dict()


def resolved_schedule(cmd: list[str]) -> str:
    """The schedule a ``layerpar train`` command line resolves to (no training)."""
    return _config(cmd).resolved_schedule()


def serial_equivalent(cmd: list[str]) -> bool:
    """Whether an SPH command's schedule has no parallel phase. Such a run is layer-serial
    back-propagation with the serial baseline's data order and initialisation, and its model equals
    the baseline's bit for bit (round 4 of the matrix: 0.00 on every seed), so the harness reuses
    the baseline instead of training it again."""
    return "parallel" not in resolved_schedule(cmd)


def resume_command(d: str) -> list[str]:
    """The command that continues the run in ``d`` from its checkpoint."""
    return [sys.executable, "-m", "layerpar_fast", "train", "--no-progress", "--resume", d]


def finished(d: str) -> bool:
    return all(os.path.isfile(os.path.join(d, f)) for f in ("summary.json", "final_model.pt"))


def collect(d: str, cmd: list[str]) -> dict[str, Any]:
    from layerpar_fast.trainer import evaluate_run
    full = evaluate_run(d, test_subset=None)
    with open(os.path.join(d, "summary.json")) as f:
        summary = json.load(f)
    recs = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    par = [r for r in recs if r["phase"] == "parallel"]
    phases = [r["phase"] for r in recs]
    return {
        "command": "layerpar train " + " ".join(cmd[4:]),
        "schedule": schedule_text(phases),       # as run (--switch-drift may end a parallel phase early)
        "schedule_configured": summary["config"].get("schedule") or _schedule(summary["config"]),
        "test_acc": 100 * full["test_acc"], "num_test": full["num_test"],
        "wall_s": summary["wall_time_s"],
        "parallel_share": phases.count("parallel") / max(1, len(phases)),
        "undone_epochs": len(summary.get("rolled_back") or []),   # undone by --drift-guard / --pace-rows
        "gated_epochs": len(summary.get("sharpness_gated") or []),  # phase entries --sharpness-gate ran serial
        "per_epoch": [{"epoch": r["epoch"], "phase": r["phase"], "test_acc": r.get("test_acc"),
                       "train_acc": r.get("train_acc"), "ds_test_acc": r.get("ds_test_acc"),
                       "probe_cosine": r.get("probe_cosine"), "violation": r.get("violation")} for r in recs],
        "ds_test_acc_last_parallel": par[-1].get("ds_test_acc") if par else None,
    }


def _schedule(cfg: dict[str, Any]) -> str:
    from layerpar_fast.config import make_config
    return make_config(cfg).resolved_schedule()


def cmd_run(args: argparse.Namespace) -> int:
    cells = _cells(args.cells)
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.variant.split(",")
    for a in arms:
        if a not in VARIANTS:
            raise SystemExit(f"accuracy_matrix: error: unknown variant {a!r}; valid: {', '.join(VARIANTS)}")
    from layerpar_fast.data import load_dataset
    for ds in sorted({CELLS[c]["dataset"] for c in cells}):
        load_dataset(ds, args.data_dir)      # decode/cache once before any run starts
    res_path = os.path.join(args.out, "results.json")
    results = _load(res_path)
    todo = []
    for cell in cells:
        for seed in seeds:
            todo.append((cell, "serial", None, seed))
            todo += [(cell, a, k, seed) for k in ks for a in arms]
    for i, (cell, arm, k, seed) in enumerate(todo):
        d = run_dir(args.out, cell, arm, k, seed)
        key = os.path.relpath(d, args.out)
        if key in results and (finished(d) or results[key].get("reused_from")):
            continue
        cmd = train_command(cell, arm, k, seed, args, d)
        base = f"{cell}/serial-seed{seed}"
        if k is not None and not finished(d) and serial_equivalent(cmd):
            results = _load(res_path)
            if base not in results:
                print(f"[{i + 1}/{len(todo)}] {key}: all-serial schedule, but its baseline {base} is missing; next run",
                      flush=True)
                continue
            entry = dict(results[base], reused_from=base, command="layerpar train " + " ".join(cmd[4:]),
                         schedule_configured=resolved_schedule(cmd))
            print(f"[{i + 1}/{len(todo)}] {key}: schedule {entry['schedule_configured']} has no parallel phase: "
                  f"the serial baseline's model, reused ({entry['test_acc']:.2f}%)", flush=True)
            results = {**results, key: entry}
            atomic_write_json(res_path, {"runs": results, "environment": environment()})
            continue
        forked = None
        if not finished(d) and k is not None and getattr(args, "fork", False) \
                and not os.path.isfile(os.path.join(d, "checkpoint.pt")):
            forked = _fork_from_prefix(args, cell, arm, k, seed, d, cmd, f"[{i + 1}/{len(todo)}] {key}")
        if not finished(d):
            if os.path.isfile(os.path.join(d, "checkpoint.pt")):
                cmd_now = resume_command(d)
            else:
                if os.path.isdir(d):          # a run that failed before its first checkpoint
                    import shutil
                    shutil.rmtree(d)
                cmd_now = cmd
            print(f"[{i + 1}/{len(todo)}] {key}: $ {' '.join(cmd_now[1:])}", flush=True)
            t0 = time.time()
            code = subprocess.run(cmd_now).returncode
            if code != 0:
                print(f"[{i + 1}/{len(todo)}] {key}: failed with exit status {code}; next run", flush=True)
                continue
            print(f"[{i + 1}/{len(todo)}] {key}: {time.time() - t0:.0f} s", flush=True)
        entry = collect(d, cmd)
        if forked or os.path.isfile(os.path.join(d, "forked_from")):
            with open(os.path.join(d, "forked_from")) as f:
                entry["forked_from"] = f.read().strip()
        print(f"[{i + 1}/{len(todo)}] {key}: {entry['test_acc']:.2f}% on {entry['num_test']}", flush=True)
        results = {**_load(res_path), key: entry}    # merged: another invocation may share OUT
        atomic_write_json(res_path, {"runs": results, "environment": environment()})
        report(results, args)
    report(results, args)
    return 0


def last_parallel_epoch(cmd: list[str]) -> int:
    """The (1-based) last epoch of the last parallel phase of an SPH command's schedule (0: none)."""
    from layerpar_fast.config import parse_schedule
    end = last = 0
    for phase, n in parse_schedule(resolved_schedule(cmd)):
        end += n
        if phase == "parallel":
            last = end
    return last


def drift_rows(args: argparse.Namespace, run: Any = subprocess.run) -> list[dict[str, Any]]:
    """The drift ‖a − λ̃‖/‖λ̃‖ of every cut in every parallel epoch of each (cell, K, seed) arm: the arm
    trains up to the end of its last parallel phase (``--stop-after``; resumed if interrupted, reused
    if done) in OUT/CELL/drift-VARIANT-KK-seedS. What a ``--drift-guard`` bound would act on."""
    rows = []
    for cell in _cells(args.cells):
        for k in [int(x) for x in args.ks.split(",")]:
            for seed in [int(x) for x in args.seeds.split(",")]:
                for arm in args.variant.split(","):
                    d = os.path.join(args.out, cell, f"drift-{arm}-K{k}-seed{seed}")
                    cmd = train_command(cell, arm, k, seed, args, d)
                    last = last_parallel_epoch(cmd)
                    if not last:
                        continue                     # no parallel phase: nothing to guard
                    metrics = os.path.join(d, "metrics.jsonl")
                    done = os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= last
                    if not done and getattr(args, "no_train", False):
                        continue                     # --no-train: only arms already trained
                    if not done:
                        now = (resume_command(d) if os.path.isfile(os.path.join(d, "checkpoint.pt"))
                               else cmd + ["--stop-after", str(last)])
                        print(f"{cell} K={k} seed {seed} {arm}: $ {' '.join(now[1:])}", flush=True)
                        if run(now).returncode != 0:
                            print(f"{cell} K={k} seed {seed} {arm}: failed; next", flush=True)
                            continue
                    recs = [json.loads(x) for x in open(metrics)]
                    par = [r for r in recs if r.get("phase") == "parallel"]
                    undone = _rollbacks(d)
                    rows.append({"cell": cell, "K": k, "seed": seed, "variant": arm,
                                 "schedule": resolved_schedule(cmd),
                                 "schedule_run": schedule_text([r["phase"] for r in recs]),
                                 "drift": [[round(v, 4) for v in r.get("violation") or []] for r in par],
                                 "epochs": [r["epoch"] for r in par],
                                 "max_drift": round(max((max(r.get("violation") or [0.0]) for r in par), default=0.0), 4),
                                 # --pace-rows: the held-in loss before and after each kept parallel epoch
                                 "heldin": [[round(r["heldin_ref"], 4), round(r["heldin_loss"], 4)] for r in par
                                            if r.get("heldin_loss") is not None],
                                 "undone": undone})
    return rows


def _rollbacks(d: str) -> list[dict[str, Any]]:
    """The parallel epochs a run's guards undid (from its checkpoint): epoch, why, and the held-in
    losses or drifts behind the verdict."""
    ckpt = os.path.join(d, "checkpoint.pt")
    if not os.path.isfile(ckpt):
        return []
    import torch
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    keep = ("epoch", "rolled_back_why", "heldin_ref", "heldin_loss")
    return [{k: r[k] for k in keep if k in r} for r in state.get("rollbacks") or []]


def cmd_drift(args: argparse.Namespace) -> int:
    rows = drift_rows(args)
    if not rows:
        print("accuracy_matrix drift: no arm with a parallel phase among these cells", file=sys.stderr)
        return 1
    atomic_write_json(args.json, rows)
    lines = ["# Drift of the parallel epochs (what `--drift-guard` acts on)", "",
             "‖a − λ̃‖/‖λ̃‖ per parallel epoch, the largest over the cuts (the json keeps every cut). Each arm "
             "trained to the end of its last parallel phase (`--stop-after`).", "",
             f"    python bench/accuracy_matrix.py drift --out {args.out} --cells {args.cells} --ks {args.ks} "
             f"--seeds {args.seeds} --variant {args.variant} --threads {args.threads}"
             + (" --no-train" if getattr(args, "no_train", False) else ""), "",
             "| cell | K | seed | variant | schedule | drift per parallel epoch | largest | held-in loss (entry, after "
             "each kept epoch) | undone |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{max(v):.3f}" for v in r["drift"] if v)
        held = r.get("heldin") or []
        seq = ", ".join([f"{held[0][0]:.4f}"] + [f"{h[1]:.4f}" for h in held]) if held else "-"
        und = "; ".join(f"epoch {u['epoch']}: " + (f"{u['heldin_loss']:.4f} vs {u['heldin_ref']:.4f}"
                                                    if "heldin_loss" in u else u.get("rolled_back_why", ""))
                        for u in r.get("undone") or []) or "-"
        lines.append(f"| {r['cell']} | {r['K']} | {r['seed']} | {r['variant']} | `{r['schedule']}` | {per or '-'} | "
                     f"{r['max_drift']:.3f} | {seq} | {und} |")
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def warm_epochs(cmd: list[str]) -> int:
    """The serial epochs an SPH command's schedule starts with (its warm start)."""
    from layerpar_fast.config import parse_schedule
    first, n = parse_schedule(resolved_schedule(cmd))[0]
    return n if first == "serial" else 0


def _fork_from_prefix(args: argparse.Namespace, cell: str, arm: str, k: int, seed: int, d: str,
                      cmd: list[str], tag: str) -> str | None:
    """Branch the arm's run ``d`` from the shared warm start of (cell, K, seed): train that prefix
    first if needed (this arm's own command with --stop-after W), then ``layerpar train --fork``
    with the arm's options and resolved schedule. Returns the prefix's directory, or None when the
    arm has no serial warm start or its options cannot be forked (it then runs from scratch)."""
    w = warm_epochs(cmd)
    if w < 1:
        return None
    prefix = run_dir(args.out, cell, f"prefix-w{w}", k, seed)
    ckpt = os.path.join(prefix, "checkpoint.pt")
    if _checkpoint_epoch(ckpt) < w:
        if os.path.isfile(ckpt):
            pcmd = [*resume_command(prefix),
                    "--stop-after", str(w)]
        else:
            if os.path.isdir(prefix):
                import shutil
                shutil.rmtree(prefix)
            # the library's defaults (every arm forks from them with its own options), the arm's schedule
            pcmd = train_command(cell, "default", k, seed, args, prefix) + [
                "--schedule", resolved_schedule(cmd), "--stop-after", str(w)]
        print(f"{tag}: the shared warm start: $ {' '.join(pcmd[1:])}", flush=True)
        if subprocess.run(pcmd).returncode != 0 or _checkpoint_epoch(ckpt) != w:
            print(f"{tag}: the warm start failed; the arm runs from scratch", flush=True)
            return None
    opts = cmd[cmd.index("--stages") + 2:]            # the arm's own options (VARIANTS[arm])
    fcmd = [sys.executable, "-m", "layerpar_fast", "train", "--no-progress", "--fork", prefix, "--out", d,
            "--schedule", resolved_schedule(cmd), *opts]
    why = _fork_differs(fcmd, cmd)
    if why:
        print(f"{tag}: a fork from {prefix} would not be this arm's run ({why}); the arm runs from scratch",
              flush=True)
        return None
    print(f"{tag}: $ {' '.join(fcmd[1:])}", flush=True)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "forked_from"), "w") as f:    # also read when an interrupted fork resumes
        f.write(os.path.relpath(prefix, args.out))
    t0 = time.time()
    if subprocess.run(fcmd).returncode != 0 or not finished(d):
        print(f"{tag}: the fork failed; the arm runs from scratch", flush=True)
        if os.path.isdir(d) and not finished(d):
            import shutil
            shutil.rmtree(d)
        return None
    print(f"{tag}: {time.time() - t0:.0f} s after the shared warm start", flush=True)
    return prefix


def _fork_differs(fcmd: list[str], cmd: list[str]) -> str:
    """'' when the configuration ``layerpar train --fork`` would give (``fcmd``) is the one the
    arm's own command (``cmd``) trains from scratch, else the first option that differs (a fork
    keeps the source's value of any option its command line does not name)."""
    from layerpar_fast.cli import _build_parser, _train_config
    from layerpar_fast.config import ConfigError
    fa = _build_parser().parse_args(fcmd[3:])
    try:
        forked = _train_config(fa)[0]
    except ConfigError as e:
        return str(e)
    direct = _config(cmd)
    if forked.resolved_schedule() != direct.resolved_schedule():
        return f"schedule {forked.resolved_schedule()} against {direct.resolved_schedule()}"
    a, b = forked.to_dict(), direct.to_dict()
    for key in sorted(set(a) | set(b)):
        if key in ("out", "stop_after", "epochs", "schedule", "progress", "data_dir"):
            continue
        if key == "ds" and b.get(key) == 0:
            continue        # --ds auto: the prefix (trained with the defaults, same cuts) holds what auto chose
        if a.get(key) != b.get(key):
            return f"--{key.replace('_', '-')} {a.get(key)!r} against {b.get(key)!r}"
    return ""


def _checkpoint_epoch(path: str) -> int:
    if not os.path.isfile(path):
        return 0
    import torch
    return int(torch.load(path, map_location="cpu", weights_only=False).get("epoch", 0))


def cmd_collect(args: argparse.Namespace) -> int:
    """Collect every finished run under OUT that results.json lacks (no training)."""
    res_path = os.path.join(args.out, "results.json")
    results = _load(res_path)
    for cell in sorted(os.listdir(args.out)) if os.path.isdir(args.out) else []:
        if cell not in CELLS:
            continue
        for name in sorted(os.listdir(os.path.join(args.out, cell))):
            key, d = f"{cell}/{name}", os.path.join(args.out, cell, name)
            if key in results or not finished(d):
                continue
            arm, _, rest = name.rpartition("-seed")
            if not rest.isdigit():
                continue
            variant, _, k = arm.rpartition("-K")
            k_val = int(k) if k.isdigit() else None
            if k_val is None:
                variant = arm
            if variant not in VARIANTS and variant != "serial":
                continue
            cmd = train_command(cell, variant, k_val, int(rest), args, d)
            results[key] = collect(d, cmd)
            print(f"collected {key}: {results[key]['test_acc']:.2f}%", flush=True)
            atomic_write_json(res_path, {"runs": {**_load(res_path), key: results[key]}, "environment": environment()})
    report(_load(res_path), args)
    return 0


def _cells(spec: str) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        names = GROUPS.get(part, [part])
        for n in names:
            if n not in CELLS:
                raise SystemExit(f"accuracy_matrix: error: unknown cell {n!r}; cells: {', '.join(CELLS)}; "
                                 f"groups: {', '.join(GROUPS)}")
            if n not in out:
                out.append(n)
    return out


def _load(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f).get("runs", {})


def matrix(results: dict[str, Any], variant: str) -> list[dict[str, Any]]:
    """One row per (cell, K) with both arms finished for at least one common seed."""
    rows = []
    for cell, c in CELLS.items():
        for k in (2, 3, 4, 8):
            seeds = []
            for key in results:
                parts = key.split("/")
                if parts[0] != cell or not parts[1].startswith(f"{variant}-K{k}-seed"):
                    continue
                s = int(parts[1].rpartition("seed")[2])
                if f"{cell}/serial-seed{s}" in results:
                    seeds.append(s)
            if not seeds:
                continue
            seeds.sort()
            ser = [results[f"{cell}/serial-seed{s}"] for s in seeds]
            sph = [results[f"{cell}/{variant}-K{k}-seed{s}"] for s in seeds]
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            gaps = [b["test_acc"] - a["test_acc"] for a, b in zip(ser, sph)]
            rows.append({
                "dataset": c["dataset"], "cell": cell, "model": c["model"], "train_size": c["train_size"],
                "augment": c["augment"] != "none", "epochs": c["epochs"], "K": k, "variant": variant,
                "seeds": seeds, "serial_acc": round(mean([r["test_acc"] for r in ser]), 3),
                "sph_acc": round(mean([r["test_acc"] for r in sph]), 3), "gap": round(mean(gaps), 3),
                "gap_per_seed": [round(g, 3) for g in gaps],
                "parallel_share": round(mean([r["parallel_share"] for r in sph]), 3),
                "schedule": sph[0]["schedule"],
                "undone_epochs": round(mean([r.get("undone_epochs", 0) for r in sph]), 3),
                "gated_epochs": round(mean([r.get("gated_epochs", 0) for r in sph]), 3),
                "wall_s": round(mean([r["wall_s"] for r in sph]), 1),
                "serial_wall_s": round(mean([r["wall_s"] for r in ser]), 1),
                "serial_reused": all(r.get("reused_from") for r in sph),   # no parallel phase: the baseline
            })
    return rows


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    variants = args.variants.split(",") if getattr(args, "variants", None) else ["default"]
    tables = {v: matrix(results, v) for v in variants}
    main = tables[variants[0]]
    carry = getattr(args, "carry", None)
    if carry:         # rows of an earlier report for the cells this one has not run (marked)
        with open(carry) as f:
            old = json.load(f)
        have = {(r["cell"], r["K"]) for r in main}
        main += [dict(r, carried_from=r.get("carried_from") or os.path.basename(carry)) for r in old
                 if r.get("variant", "default") == variants[0] and (r["cell"], r["K"]) not in have]
        main.sort(key=lambda r: (list(CELLS).index(r["cell"]), r["K"]))
    if not any(tables.values()):
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    atomic_write_json(args.json, main)
    goal = lambda r: 0.3 if r["dataset"] == "mnist" else 0.5  # noqa: E731
    lines = ["# Accuracy matrix: SPH-AL (the defaults of `layerpar train`) against serial back-propagation", "",
             f"Machine: {environment().get('processor') or 'CPU'}, {os.cpu_count()} cores; one process per run "
             "(`--transport local`). Test accuracy of the final model on the whole test set; gap = SPH − serial "
             "(points, mean over seeds); goal: |gap| within 0.5 (MNIST 0.3). Wall times include per-epoch evaluation "
             "and are disturbed where other work shared the cores.", "",
             "    python bench/accuracy_matrix.py run --cells CELLS --ks 2,4 --seeds 0[,1] [--variant NAME]", ""]
    for v in variants:
        rows = tables[v]
        if not rows:
            continue
        opts = " ".join(VARIANTS[v]) or "(none: the defaults)"
        lines += [f"## Variant `{v}`: extra options {opts}", "",
                  "| cell | K | seeds | serial | SPH | gap | per seed | goal | parallel share | schedule | SPH wall | serial wall |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ok = "met" if r["gap"] >= -goal(r) else "missed"
            mark = " †" if r.get("carried_from") else ""
            lines.append(f"| {r['cell']}{mark} | {r['K']} | {','.join(map(str, r['seeds']))} | {r['serial_acc']:.2f}% | "
                         f"{r['sph_acc']:.2f}% | {r['gap']:+.2f} | {' '.join(f'{g:+.2f}' for g in r['gap_per_seed'])} | "
                         f"{ok} | {r['parallel_share']:.2f} | `{r['schedule']}`{_undone(r)} | {r['wall_s']:.0f} s | "
                         f"{r['serial_wall_s']:.0f} s |")
        if any(r.get("serial_reused") for r in rows):
            lines.append("")
            lines.append("Rows whose schedule has no parallel phase are the serial baseline's own run, reused (the "
                         "same model bit for bit: layer-serial training with the same seed and data order).")
        if any(r.get("carried_from") for r in rows):
            src = sorted({r["carried_from"] for r in rows if r.get("carried_from")})
            lines.append(f"† carried over from {', '.join(src)} (an earlier round of the same defaults, not re-run here)")
        lines.append("")
    lines[6:6] = compact(tables, variants) + [""]
    with open(args.md, "w") as f:
        f.write("\n".join(lines))
    plot(tables, args.png)


def _undone(r: dict[str, Any]) -> str:
    """' (+N parallel epochs undone)' where --drift-guard / --pace-rows undid epochs, ' (N phase entries gated)'
    where --sharpness-gate ran them serial (means over seeds), else ''."""
    n = r.get("undone_epochs") or 0
    g = r.get("gated_epochs") or 0
    return ((f" (+{n:g} parallel epoch{'s' if n != 1 else ''} undone by the drift or pace guard)" if n else "")
            + (f" ({g:g} phase entr{'ies' if g != 1 else 'y'} run serial by the sharpness gate)" if g else ""))


def compact(tables: dict[str, list[dict[str, Any]]], variants: list[str]) -> list[str]:
    """One row per (cell, K), one column per variant: gap (parallel share)."""
    keys = sorted({(r["cell"], r["K"]) for rows in tables.values() for r in rows},
                  key=lambda x: (list(CELLS).index(x[0]), x[1]))
    if not keys:
        return []
    shown = [v for v in variants if tables.get(v)]
    out = ["Gap against serial in points (share of the epochs run in parallel); one seed unless said:", "",
           "| cell | K | " + " | ".join(f"`{v}`" for v in shown) + " |", "|---|---|" + "---|" * len(shown)]
    for cell, k in keys:
        row = []
        for v in shown:
            r = next((r for r in tables[v] if r["cell"] == cell and r["K"] == k), None)
            row.append("-" if r is None else f"{r['gap']:+.2f} ({r['parallel_share']:.2f})"
                       + (" †" if r.get("carried_from") else ""))
        out.append(f"| {cell} | {k} | " + " | ".join(row) + " |")
    return out


def plot(tables: dict[str, list[dict[str, Any]]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = sorted({(r["cell"], r["K"]) for rows in tables.values() for r in rows},
                    key=lambda x: (list(CELLS).index(x[0]), x[1]))
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.5))
    width = 0.8 / max(1, len(tables))
    for j, (v, rows) in enumerate(tables.items()):
        by = {(r["cell"], r["K"]): r["gap"] for r in rows}
        xs = [i + (j - (len(tables) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [by.get(lab, 0.0) for lab in labels], width, label=v)
    ax.axhline(-0.5, color="k", ls="--", lw=0.8, label="−0.5 (−0.3 for MNIST)")
    ax.axhline(-0.3, color="k", ls=":", lw=0.8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{c}\nK={k}" for c, k in labels], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SPH − serial test accuracy (points)")
    ax.set_title("Accuracy matrix: gap of SPH-AL against serial back-propagation at the same budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "collect", "drift"):
        q = sub.add_parser(name)
        q.add_argument("--out", default="runs/accuracy_matrix", help="run directories and results.json")
        q.add_argument("--json", default=os.path.join(HERE, "results", "accuracy_matrix.json"))
        q.add_argument("--md", default=os.path.join(HERE, "results", "accuracy_matrix.md"))
        q.add_argument("--png", default=os.path.join(HERE, "results", "accuracy_matrix.png"))
        q.add_argument("--carry", help="an earlier report's json: its rows for cells not run here are kept (marked)")
        q.add_argument("--variants", default="default",
                       help="variants in the report (the first one is the json's matrix)")
        if name == "drift":
            q.set_defaults(json=os.path.join(HERE, "results", "drift_matrix.json"),
                           md=os.path.join(HERE, "results", "drift_matrix.md"))
            q.add_argument("--no-train", action="store_true",
                           help="tabulate the arms already trained (OUT/CELL/drift-...), train none")
        if name in ("run", "collect", "drift"):
            q.add_argument("--cells", default="quick", help=f"cells or groups ({', '.join(GROUPS)})")
            q.add_argument("--ks", default="2,4")
            q.add_argument("--seeds", default="0")
            q.add_argument("--variant", default="default", help=f"SPH variants, comma separated: {', '.join(VARIANTS)}")
            q.add_argument("--data-dir", default=str(default_data_dir()),
                           help="folder with the data files [default: $LAYERPAR_DATA_DIR, else ~/.cache/layerpar_fast]")
            q.add_argument("--test-subset", type=int, default=2000, help="test images evaluated every epoch")
            q.add_argument("--threads", type=int, help="torch threads per run (default: all cores)")
            q.add_argument("--fork", action="store_true",
                           help="train the serial warm start shared by SPH arms of one (cell, K, seed) once "
                                "(OUT/CELL/prefix-wW-KK-seedS, --stop-after W) and branch every arm from it "
                                "(layerpar train --fork: bit for bit the run from scratch; arms whose options "
                                "a fork may not change run from scratch)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "collect":
        return cmd_collect(args)
    if args.cmd == "drift":
        return cmd_drift(args)
    report(_load(os.path.join(args.out, "results.json")), args)
    print(open(args.md).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MNIST, small ResNet, K = 2, s = 2, one 8-epoch budget: serial vs SPH variants (issue 3).

Every run shares the model, data order, batch size, learning rate and cosine schedule over
8 epochs; only the phases and the local-loss method differ:

    serial            serial:8                                  back-propagation baseline
    sph-al-gs         serial:1,parallel:5,serial:2  AL, Gauss-Seidel order, beta_k = c/(lr kappa_k)
    sph-al-jacobi     serial:1,parallel:5,serial:2  AL, Jacobi order, beta = 10, gamma = 0.5
    sph-penalty       serial:1,parallel:5,serial:2  penalty, beta = 10, gamma = 0.5
    parallel-only     serial:1,parallel:7           AL-GS without the serial tail
    tail-only         serial:1,idle:5,serial:2      no parallel training: what the tail alone buys

Run (about 10 minutes per run on 2 cores; results are appended as they finish):

    python bench/mnist_sph.py --data-dir $DATA --out runs/mnist_sph
    python bench/mnist_sph.py --only serial,sph-al-gs        # a subset of the runs

It writes RUN_DIR per run, ``OUT/results.json`` and a Markdown table ``OUT/results.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from layerpar_fast.data import default_data_dir
from layerpar_fast.config import make_config
from layerpar_fast.metrics import environment
from layerpar_fast.trainer import HybridTrainer

COMMON = dict(dataset="mnist", model="mnist_resnet", batch_size=128, lr=0.05, lr_schedule="cosine",
              stages=2, ds=2, seed=0, checkpoint_every=100, progress=False, transport="local")

RUNS = {
    "serial": dict(method="serial", schedule="serial:8", stages=1),
    "sph-al-gs": dict(method="al", al_order="gs", schedule="serial:1,parallel:5,serial:2"),
    "sph-al-jacobi": dict(method="al", al_order="jacobi", beta=10.0, gamma=0.5,
                          schedule="serial:1,parallel:5,serial:2"),
    "sph-penalty": dict(method="penalty", beta=10.0, gamma=0.5, schedule="serial:1,parallel:5,serial:2"),
    "parallel-only": dict(method="al", al_order="gs", schedule="serial:1,parallel:7"),
    "tail-only": dict(method="serial", schedule="serial:1,idle:5,serial:2", stages=1),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(default_data_dir()),
                   help="folder with the data files [default: $LAYERPAR_DATA_DIR, else ~/.cache/layerpar_fast]")
    p.add_argument("--out", default="runs/mnist_sph")
    p.add_argument("--only", help="comma-separated run names")
    p.add_argument("--subset", type=int, help="training images (default: all 60000)")
    p.add_argument("--threads", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every selected run (e.g. --set beta_c=1.2)")
    p.add_argument("--tag", default="", help="suffix for the result names (sweeps)")
    args = p.parse_args()
    overrides = {}
    for kv in args.set:
        key, _, val = kv.partition("=")
        overrides[key] = yaml_value(val)
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown runs {unknown}; valid: {', '.join(RUNS)}")
    os.makedirs(args.out, exist_ok=True)
    res_path = os.path.join(args.out, "results.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else {}
    for name in names:
        label = name + args.tag
        opts = {**COMMON, **RUNS[name], **overrides, "data_dir": args.data_dir, "subset": args.subset,
                "threads": args.threads, "out": os.path.join(args.out, label)}
        cfg = make_config(**opts)
        print(f"== {name}: {cfg.resolved_schedule()}", flush=True)
        t0 = time.time()
        summary = HybridTrainer(cfg, cfg.out).run()
        recs = [json.loads(x) for x in open(os.path.join(cfg.out, "metrics.jsonl"))]
        par = [r for r in recs if r["phase"] == "parallel"]
        results[label] = {
            "schedule": cfg.resolved_schedule(), "method": cfg.method,
            "al_order": cfg.al_order if cfg.method == "al" else None,
            "beta": cfg.beta, "gamma": cfg.gamma, "beta_c": cfg.beta_c, "overrides": overrides,
            "final_test_acc": summary["final_test_acc"], "best_test_acc": summary["best_test_acc"],
            "wall_time_s": time.time() - t0,
            "test_acc_per_epoch": [r["test_acc"] for r in recs],
            "ds_test_acc_last_parallel": par[-1].get("ds_test_acc") if par else None,
            "violation_per_parallel_epoch": [r["violation"] for r in par],
            "kappa_beta": [(s.get("kappa"), s.get("beta")) for s in par[0]["stages"][:-1]] if par else None,
            "probe_cosine": [r["probe_cosine"] for r in par],
            "rho_pred": [r["speedup_model"]["rho_pred"] for r in par],
        }
        with open(res_path, "w") as f:
            json.dump({**results, "_environment": environment()}, f, indent=2)
        write_table(results, os.path.join(args.out, "results.md"))
    print(open(os.path.join(args.out, "results.md")).read())
    return 0


def yaml_value(text: str):
    """'1.2' -> 1.2, 'true' -> True, 'gs' -> 'gs' (YAML scalars)."""
    import yaml
    return yaml.safe_load(text)


def write_table(results: dict, path: str) -> None:
    base = results.get("serial", {}).get("final_test_acc")
    lines = ["| run | schedule | final test acc | vs serial | DS fwd acc (last parallel epoch) | "
             "violation (last parallel epoch) | wall time |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        gap = f"{100 * (r['final_test_acc'] - base):+.2f}" if base is not None else "-"
        ds = f"{100 * r['ds_test_acc_last_parallel']:.2f}%" if r.get("ds_test_acc_last_parallel") else "-"
        viol = r["violation_per_parallel_epoch"][-1][0] if r["violation_per_parallel_epoch"] else None
        lines.append(f"| {name} | `{r['schedule']}` | {100 * r['final_test_acc']:.2f}% | {gap} | {ds} | "
                     f"{'-' if viol is None else f'{viol:.3f}'} | {r['wall_time_s']:.0f} s |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

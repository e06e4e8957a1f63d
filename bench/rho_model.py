"""The speed-up model ρ(K) from measured block times (docs/method.md §7), for K beyond what this
machine can run at once.

Measures the forward+backward time of every block of each model at batch B on one thread
(``layerpar_fast.stages.profile_times``), cuts the blocks into K stages by the optimal contiguous
partition of the measured times (what ``--balance time`` does), and reports per K:

* the stage times and ρ_balance(K) = Σ_b t_b / max_k T_k, the bound set by stage balance alone;
* ρ(K) = Σ_b t_b / (max_k T_k · (1 + ε)), with ε the stages' measured extra work per step (local
  loss, filters, messages: 4-9% for ResNet-20 on this machine; ``--overhead``, default 0.065);
* S(K), the speed-up of a whole default-schedule run (``serial:1,parallel:P,serial:S`` of E
  epochs) whose serial epochs run data-parallel on the same K workers at efficiency ``--dp-eff``:
  S = E / (P/ρ + (E − P)/(K·η)).

Communication is assumed hidden (it is on loopback, docs/results.md); on slow links it is not.

    python bench/rho_model.py --models resnet20,resnet56,resnet110 --ks 2,4,8 \\
        --out bench/results/rho_model.json --md bench/results/rho_model.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def model_rows(name: str, ks: list[int], batch: int, repeats: int, overhead: float, epochs: int,
               tail_share: float, dp_eff: float) -> list[dict]:
    from layerpar_fast.models import build_model
    from layerpar_fast.stages import partition, profile_times, stage_costs
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=32)
    model.train()
    x = torch.randn(batch, 3, 32, 32)
    times = profile_times(model, x, repeats=repeats)
    total = sum(times)
    s_tail = round(tail_share * epochs)
    p = epochs - 1 - s_tail
    rows = []
    for k in ks:
        if k > len(times):
            continue
        cuts = partition(times, k)
        st = stage_costs(times, cuts)
        rho_bal = total / max(st)
        rho = rho_bal / (1 + overhead)
        s_run = epochs / (p / rho + (epochs - p) / (k * dp_eff))
        rows.append({"model": name, "K": k, "blocks": len(times), "serial_step_s": total, "cuts": cuts,
                     "stage_s": st, "rho_balance": rho_bal, "rho": rho, "run_speedup": s_run,
                     "schedule": f"serial:1,parallel:{p},serial:{s_tail}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet56,resnet110")
    p.add_argument("--ks", default="2,4,8")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--overhead", type=float, default=0.065, help="stages' extra work per step (ε)")
    p.add_argument("--epochs", type=int, default=18, help="budget of the whole-run speed-up")
    p.add_argument("--tail-share", type=float, default=2 / 3)
    p.add_argument("--dp-eff", type=float, default=0.95, help="data-parallel efficiency of serial epochs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON")
    p.add_argument("--md", help="markdown")
    args = p.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        p.error(f"--ks must be integers, got {args.ks!r}")
    if any(k < 1 for k in ks) or args.batch < 1 or args.repeats < 1 or not 0 <= args.overhead < 1:
        p.error("--ks, --batch, --repeats must be positive and --overhead in [0, 1)")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        try:
            rows += model_rows(name, ks, args.batch, args.repeats, args.overhead, args.epochs, args.tail_share,
                               args.dp_eff)
        except ValueError as e:
            p.error(str(e))
        print(f"{name}: done", flush=True)
    command = "python bench/rho_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Speed-up model ρ(K) from measured block times", "",
             f"Block forward+backward times at batch {args.batch}, {args.threads} thread(s), median of "
             f"{args.repeats}; cuts = optimal contiguous partition of the measured times; ρ = ρ_balance / "
             f"(1 + ε), ε = {args.overhead}; S = whole-run speed-up of the default {args.epochs}-epoch schedule "
             f"with data-parallel serial epochs at efficiency {args.dp_eff}. Communication assumed hidden.", "",
             f"    {command}", "",
             "| model | K | blocks | cuts | slowest / fastest stage (s) | ρ_balance | ρ | S (whole run) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['K']} | {r['blocks']} | {r['cuts']} | {max(r['stage_s']):.3f} / "
                     f"{min(r['stage_s']):.3f} | {r['rho_balance']:.2f} | {r['rho']:.2f} | {r['run_speedup']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""--compile against eager: epoch times of the serial and the parallel phase, and the compile cost.

Runs the same short `layerpar train` twice per round (eager, then --compile, the order alternating
every round), schedule ``serial:2,parallel:2``: the second epoch of each phase is the steady state,
the first one's excess over it is what compilation (and, for a parallel phase, the initial fill
and the warm-up) costs. Reports medians over rounds and the ratio eager / compiled (> 1: compiled
is faster), measured in the same run.

    python bench/bench_compile.py --model resnet20 --subset 2560 --rounds 3 \\
        --out bench/results/compile_cpu.json --md bench/results/compile_cpu.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_once(args: argparse.Namespace, compiled: bool, out: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "layerpar_fast", "train", "--dataset", args.dataset, "--data-dir", args.data_dir,
           "--model", args.model, "--subset", str(args.subset), "--test-subset", str(args.test_subset),
           "--method", "al", "--stages", str(args.stages), "--ds", "2", "--schedule", "serial:2,parallel:2",
           "--epochs", "4", "--transport", args.transport, "--no-progress", "--seed", "0", "--out", out]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if compiled:
        cmd.append("--compile")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    e = [r["epoch_time_s"] for r in recs]
    return {"serial_first_s": e[0], "serial_s": e[1], "parallel_first_s": e[2], "parallel_s": e[3],
            "test_acc": recs[-1]["test_acc"], "process_wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    from layerpar_fast.data import default_data_dir
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=str(default_data_dir()),
                   help="folder with the data files [default: $LAYERPAR_DATA_DIR, else ~/.cache/layerpar_fast]")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--subset", type=int, default=2560)
    p.add_argument("--test-subset", type=int, default=500)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--transport", default="local", choices=("local", "dist"))
    p.add_argument("--threads", type=int)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="JSON")
    p.add_argument("--md", help="markdown")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.subset < 1:
        p.error("--rounds and --subset must be positive")
    rows: dict[str, list[dict[str, float]]] = {"eager": [], "compile": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["eager", "compile"] if r % 2 == 0 else ["compile", "eager"]
            for name in order:
                res = run_once(args, name == "compile", os.path.join(tmp, f"{name}{r}"))
                rows[name].append(res)
                print(f"round {r + 1}/{args.rounds} {name}: serial {res['serial_s']:.2f} s, parallel "
                      f"{res['parallel_s']:.2f} s (first epochs {res['serial_first_s']:.1f} / "
                      f"{res['parallel_first_s']:.1f} s)", flush=True)
    med = {n: {k: statistics.median(x[k] for x in v) for k in v[0]} for n, v in rows.items()}
    ratio = {k: med["eager"][k] / med["compile"][k] for k in ("serial_s", "parallel_s")}
    cost = {k: med["compile"][f"{k}_first_s"] - med["compile"][f"{k}_s"]
            - (med["eager"][f"{k}_first_s"] - med["eager"][f"{k}_s"]) for k in ("serial", "parallel")}
    command = "python bench/bench_compile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "model": args.model, "subset": args.subset, "stages": args.stages, "transport": args.transport,
              "rounds": rows, "median": med, "eager_over_compiled": ratio, "compile_cost_s": cost}
    lines = ["# `--compile` against eager (CPU)", "",
             f"Machine: {result['machine']}; torch {_torch_version()}. {args.model}, CIFAR-10 subset of "
             f"{args.subset} images, batch 128, K = {args.stages} stages, transport {args.transport}; "
             f"{args.rounds} interleaved rounds, medians. Steady-state epochs (the second of each phase); "
             "compile cost = the first epoch's excess over the steady state, compiled minus eager.", "",
             f"    {command}", "",
             "| phase | eager epoch (s) | compiled epoch (s) | eager / compiled | compile cost (s) |",
             "|---|---|---|---|---|"]
    for k in ("serial", "parallel"):
        lines.append(f"| {k} | {med['eager'][k + '_s']:.2f} | {med['compile'][k + '_s']:.2f} | "
                     f"{ratio[k + '_s']:.3f} | {cost[k]:.1f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    return 0


def _torch_version() -> str:
    import torch
    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())

"""The machine's ceiling for a 2-way model split: ρ with no communication and no local losses.

Each round times, in fresh processes with 1 thread each and ``--steps`` training steps
(forward, backward, SGD) on a batch of ``--batch`` random images:

* ``full``: the whole model alone (serial back-propagation on one core: bench_peers' ``serial1``);
* ``a`` / ``b``: blocks ``[0, cut)`` / ``[cut, end)`` alone (``b`` also computes its input
  gradient, as a stage k > 1 does);
* ``a_conc`` / ``b_conc``: both halves at the same time, in two processes that start together.

``rho_alone = full / max(a, b)`` is what a perfect 2-way split of the work would give if the two
cores did not slow each other; ``rho_conc = full / max(a_conc, b_conc)`` is the ceiling of any
K = 2 layer-parallel epoch on this machine at this cut (SPH's parallel epoch adds its messages and
local losses to it). Medians over the rounds are printed and written with ``--out``::

    python bench/split_ceiling.py --model resnet56 --cut 10 --steps 10 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _role(part: str, model: str, cut: int, steps: int, batch: int, go: str) -> None:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from layerpar_fast.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    blocks = list(build_model(model, num_classes=10, in_channels=3))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if part == "full":
        net = nn.Sequential(*blocks)
    elif part == "a":
        net = nn.Sequential(*blocks[:cut])
    else:
        with torch.no_grad():
            x = nn.Sequential(*blocks[:cut])(x)
        net = nn.Sequential(*blocks[cut:])
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = net(x.clone().requires_grad_(part == "b"))
        loss = (out * out).mean() if part == "a" else F.cross_entropy(out, y)
        loss.backward()
        opt.step()

    step()
    step()
    open(go + "." + part, "w").close()            # ready
    while not os.path.exists(go):                 # start together
        time.sleep(0.0005)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"part": part, "s": time.perf_counter() - t0}), flush=True)


def _launch(parts: list[str], args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        go = os.path.join(tmp, "go")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "_role", p, args.model, str(args.cut),
                                   str(args.steps), str(args.batch), go], stdout=subprocess.PIPE, text=True, env=env)
                 for p in parts]
        deadline = time.time() + args.timeout_s
        while not all(os.path.exists(go + "." + p) for p in parts):
            if time.time() > deadline or any(pr.poll() not in (None, 0) for pr in procs):
                for pr in procs:
                    pr.kill()
                raise SystemExit(f"split_ceiling: error: {'+'.join(parts)} did not start within {args.timeout_s:g}s")
            time.sleep(0.01)
        open(go, "w").close()
        out = {}
        for pr in procs:
            text, _ = pr.communicate(timeout=args.timeout_s)
            if pr.returncode != 0:
                raise SystemExit(f"split_ceiling: error: a timing process exited with status {pr.returncode}")
            r = json.loads(text.strip().splitlines()[-1])
            out[r["part"] + ("_conc" if len(parts) > 1 else "")] = r["s"]
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_role":
        _role(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]), argv[6])
        return 0
    p = argparse.ArgumentParser(prog="split_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--cut", type=int, default=10, help="first block of the second half")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--out", help="JSON: every round and the medians")
    args = p.parse_args(argv)
    from layerpar_fast.models import build_model
    try:
        n = len(build_model(args.model, num_classes=10, in_channels=3))
    except (ValueError, KeyError) as e:
        p.error(str(e).strip("'\""))
    if not 1 <= args.cut < n:
        p.error(f"--cut must be in 1..{n - 1} for {args.model} ({n} blocks), got {args.cut}")
    if min(args.steps, args.batch, args.rounds) < 1:
        p.error("--steps, --batch and --rounds must be >= 1")
    rounds = []
    for r in range(args.rounds):
        row: dict[str, float] = {}
        for parts in (["full"], ["a"], ["b"], ["a", "b"]):
            row.update(_launch(parts, args))
        row["rho_alone"] = row["full"] / max(row["a"], row["b"])
        row["rho_conc"] = row["full"] / max(row["a_conc"], row["b_conc"])
        rounds.append(row)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"{args.model} cut {args.cut}, {args.steps} steps of {args.batch}, 1 thread per process, medians of "
          f"{args.rounds} rounds: full {med['full']:.2f} s; halves alone {med['a']:.2f} / {med['b']:.2f} s "
          f"(rho_alone {med['rho_alone']:.2f}); together {med['a_conc']:.2f} / {med['b_conc']:.2f} s "
          f"(rho_conc {med['rho_conc']:.2f})")
    if args.out:
        from layerpar_fast.metrics import atomic_write_json, environment
        atomic_write_json(args.out, {"model": args.model, "cut": args.cut, "steps": args.steps, "batch": args.batch,
                                     "rounds": rounds, "median": med, "environment": environment(),
                                     "command": "python bench/split_ceiling.py " + " ".join(argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

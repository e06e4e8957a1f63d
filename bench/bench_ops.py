"""Micro-benchmarks of the fused ops (layerpar_fast.ops) against the reference torch composition.

Two ways to run it (CPU; CIFAR-size shapes: batch 128, cuts 16x32x32 and 32x16x16, s = 1, 2, 4):

    python -m pytest bench/bench_ops.py --benchmark-only          # pytest-benchmark table
    python bench/bench_ops.py [--write bench/results/ops_cpu.md]  # ratio table (+ markdown)

Per case: the fused op (``LAYERPAR_OPS=cpp``) against the reference (``LAYERPAR_OPS=ref``, i.e.
objectives.py: the composition of torch ops the engine would run otherwise), and the achieved
bytes/s of the fused op against a plain memcpy (``dst.copy_(src)``) of the same number of bytes.
gather/scatter are compared with ``torch.index_select(out=)`` / ``index_copy_`` (+ the cast) into
pinned memory when CUDA is available, else ordinary memory (CPU-only torch cannot pin).
Timing: warm-up excluded, fused/reference/memcpy interleaved round by round, median of rounds.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from layerpar_fast import _ext, ops
from layerpar_fast.filters import FilterPair

BATCH = 128
CUTS = ((16, 32, 32), (32, 16, 16))
FACTORS = (1, 2, 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("local_loss", "coarse_input_grad", "jacobi_update_", "stage_input", "gather_rows", "scatter_rows_")
STORE_ROWS = 1024  # rows in the benchmark stores (the batch reads 128 of them, shuffled)
BETA, GAMMA = 4.0, 0.5


@dataclass
class Case:
    """One benchmark case: the two implementations, the baseline memcpy and the bytes moved."""

    fused: Callable[[], Any]
    ref: Callable[[], Any]
    memcpy: Callable[[], Any]
    nbytes: int
    baseline: str


def _env(backend: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            old = os.environ.get("LAYERPAR_OPS")
            os.environ["LAYERPAR_OPS"] = backend
            try:
                return fn()
            finally:
                if old is None:
                    del os.environ["LAYERPAR_OPS"]
                else:
                    os.environ["LAYERPAR_OPS"] = old
        return run
    return wrap


def _memcpy(nbytes: int, device: str = "cpu") -> Callable[[], Any]:
    """A copy that reads nbytes/2 and writes nbytes/2 (nbytes of traffic)."""
    half = max(1, nbytes // 2)
    src = torch.ones(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def make_case(op: str, cut: tuple[int, int, int], s: int, dt: str, device: str = "cpu", fast: str = "cpp",
              batch: int = BATCH, store_rows: int = STORE_ROWS) -> Case:
    """Inputs and callables for one (op, cut, s, store dtype): ``fast`` is the LAYERPAR_OPS backend
    timed against ``ref`` (cpp on CPU tensors, triton on CUDA tensors), on ``device``."""
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[dt]
    esz = torch.empty((), dtype=dtype).element_size()
    c, hh, ww = cut
    h, w = hh // s, ww // s
    filt = FilterPair(s)
    n_fine, n_coarse = batch * c * hh * ww, batch * c * h * w
    idx = torch.randperm(store_rows, generator=gen)[:batch].to(device)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def store() -> torch.Tensor:
        return rand(store_rows, c, h, w, dtype=dtype)

    if op == "local_loss":
        o = rand(batch, c, hh, ww).requires_grad_()
        tgt = rand(batch, c, h, w, dtype=dtype)
        mult = rand(batch, c, h, w, dtype=dtype)

        def step() -> torch.Tensor:
            loss, _ = ops.local_loss(o, tgt, mult, BETA, "jacobi", filt)
            loss.backward()
            grad = o.grad
            o.grad = None
            return grad

        # minimal traffic: read o, target, mult; write a (s > 1; at s = 1 a is o) and grad_o
        nbytes = 4 * n_fine + 2 * esz * n_coarse + (4 * n_coarse if s > 1 else 0) + 4 * n_fine
        return Case(_env(fast)(step), _env("ref")(step), _memcpy(nbytes, device), nbytes, "memcpy")
    if op == "coarse_input_grad":
        gz = rand(batch, c, hh, ww)
        fn = lambda: ops.coarse_input_grad(gz, filt)  # noqa: E731
        nbytes = 4 * n_fine + 4 * n_coarse
        return Case(_env(fast)(fn), _env("ref")(fn), _memcpy(nbytes, device), nbytes, "memcpy")
    if op == "jacobi_update_":
        lam, u = store(), store()
        a = rand(batch, c, h, w)
        g = rand(batch, c, h, w)
        fn = lambda: ops.jacobi_update_(lam, u, idx, a, g, BETA, GAMMA)  # noqa: E731
        nbytes = 2 * esz * n_coarse + 2 * 4 * n_coarse + 3 * esz * n_coarse
        return Case(_env(fast)(fn), _env("ref")(fn), _memcpy(nbytes, device), nbytes, "memcpy")
    if op == "stage_input":
        st = store()
        fn = lambda: ops.stage_input(st, idx, filt)  # noqa: E731
        nbytes = esz * n_coarse + 4 * n_fine
        return Case(_env(fast)(fn), _env("ref")(fn), _memcpy(nbytes, device), nbytes, "memcpy")
    if device != "cpu":
        raise ValueError(f"{op} is benchmarked on CPU stores only (device {device!r})")
    pin = torch.cuda.is_available()
    st = store()
    if op == "gather_rows":
        out = torch.empty((batch, c, h, w), dtype=dtype, pin_memory=pin)  # the staging buffer
        base = lambda: torch.index_select(st, 0, idx, out=out)  # noqa: E731
        fn = lambda: ops.gather_rows(st, idx, out=out)  # noqa: E731
        nbytes = 2 * esz * n_coarse
        return Case(_env(fast)(fn), base, _memcpy(nbytes), nbytes, "index_select")
    if op == "scatter_rows_":
        rows = rand(batch, c, h, w)  # fp32 rows cast into the store
        if pin:
            rows = rows.pin_memory()
        base = lambda: st.index_copy_(0, idx, rows.to(dtype))  # noqa: E731
        fn = lambda: ops.scatter_rows_(st, idx, rows)  # noqa: E731
        nbytes = 4 * n_coarse + esz * n_coarse
        return Case(_env(fast)(fn), base, _memcpy(nbytes), nbytes, "index_copy_")
    raise ValueError(f"unknown op {op!r}; valid: {OPS}")


def _cases() -> list[tuple[str, tuple[int, int, int], int, str]]:
    return [(op, cut, s, dt) for op in OPS for cut in CUTS for s in FACTORS for dt in DTYPES
            if not (op == "coarse_input_grad" and dt != "fp32")]  # no store involved


def _id(case: tuple[str, tuple[int, int, int], int, str]) -> str:
    op, cut, s, dt = case
    return f"{op}-{'x'.join(map(str, cut))}-s{s}-{dt}"


# --------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.skipif(not _ext.available(), reason="C++ extension layerpar_fast._C not built")
@pytest.mark.parametrize("impl", ["fused", "ref", "memcpy"])
@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_bench_ops(benchmark: Any, case: tuple[str, tuple[int, int, int], int, str], impl: str) -> None:
    c = make_case(*case)
    benchmark.group = _id(case)
    benchmark.extra_info["bytes"] = c.nbytes
    benchmark(getattr(c, impl))


# ------------------------------------------------------------------------------- script mode
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def _time(fns: list[Callable[[], Any]], rounds: int, clock: str, min_s: float = 0.02) -> list[float]:
    """Median seconds per call of each fn; fns interleaved round by round, warm-up excluded.

    ``clock``: ``wall`` (perf_counter) or ``cpu`` (CPU time of the calling thread: with one
    thread it excludes time the process waits for a core on a loaded machine).
    """
    now = CLOCKS[clock]
    reps = []
    for fn in fns:
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-6)
        reps.append(max(1, int(min_s / one)))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t0 = now()
            for _ in range(reps[k]):
                fn()
            samples[k].append((now() - t0) / reps[k])
    return [statistics.median(v) for v in samples]


def machine() -> str:
    """CPU model name (lscpu), core count, torch version."""
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return (f"{model} (lscpu model name), {os.cpu_count()} cores, torch {torch.__version__}, pinned memory: "
            f"{'yes' if torch.cuda.is_available() else 'no (CPU-only torch; ordinary memory)'}")


def run(rounds: int, clock: str, threads: int, only: str | None = None) -> list[dict[str, Any]]:
    """Measure every case with ``threads`` intra-op threads; prints one line per case."""
    torch.set_num_threads(threads)
    rows = []
    print(f"-- {threads} thread(s), {clock} clock, median of {rounds} rounds")
    print(f"{'case':<36} {'baseline':>12} {'base ms':>9} {'fused ms':>9} {'ratio':>8} {'GB/s':>7} "
          f"{'memcpy':>7} {'of':>5}")
    for case in _cases():
        if only and only not in _id(case):
            continue
        c = make_case(*case)
        t_fused, t_ref, t_copy = _time([c.fused, c.ref, c.memcpy], rounds, clock)
        rows.append({"case": _id(case), "baseline": c.baseline, "ref_ms": t_ref * 1e3,
                     "fused_ms": t_fused * 1e3, "ratio": t_ref / t_fused,
                     "fused_gbs": c.nbytes / t_fused / 1e9, "memcpy_gbs": c.nbytes / t_copy / 1e9})
        r = rows[-1]
        print(f"{r['case']:<36} {r['baseline']:>12} {r['ref_ms']:9.3f} {r['fused_ms']:9.3f} {r['ratio']:7.2f}x "
              f"{r['fused_gbs']:7.1f} {r['memcpy_gbs']:7.1f} {100 * r['fused_gbs'] / r['memcpy_gbs']:5.0f}%",
              flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines for one measurement pass."""
    lines = ["| case | baseline | baseline ms | fused ms | speed-up | fused GB/s | memcpy GB/s | of memcpy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['baseline']} | {r['ref_ms']:.3f} | {r['fused_ms']:.3f} | "
                     f"{r['ratio']:.2f}x | {r['fused_gbs']:.1f} | {r['memcpy_gbs']:.1f} | "
                     f"{100 * r['fused_gbs'] / r['memcpy_gbs']:.0f}% |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per implementation (median)")
    p.add_argument("--passes", default="2:wall,1:cpu",
                   help="comma-separated THREADS:CLOCK passes (clock: wall or cpu); default %(default)s")
    p.add_argument("--only", help="run only cases whose id contains this string")
    p.add_argument("--write", metavar="MD", help="also write the tables as markdown to this file")
    args = p.parse_args(argv)
    if not _ext.available():
        print(f"C++ extension not available ({_ext.reason()}); nothing to compare", file=sys.stderr)
        return 1
    print(machine())
    sections = []
    for spec in args.passes.split(","):
        threads, clock = spec.split(":")
        load0 = os.getloadavg()[0]
        rows = run(args.rounds, clock, int(threads), args.only)
        load = f"{load0:.1f} -> {os.getloadavg()[0]:.1f}"
        sections.append((int(threads), clock, load, rows))
    if args.write:
        cmd = "python bench/bench_ops.py " + " ".join(argv if argv is not None else sys.argv[1:])
        lines = ["# Fused ops on CPU: measured", "",
                 f"- Machine: {machine()}",
                 f"- Command: `{cmd.strip()}`",
                 "- `ref` = the reference torch composition (objectives.py) for the fused ops; "
                 "`torch.index_select(out=)` / `index_copy_` (+ the cast) for gather/scatter. Medians of "
                 "interleaved rounds, warm-up excluded. GB/s = minimal bytes the op must move / time; "
                 "memcpy = `dst.copy_(src)` of the same bytes in the same run.", ""]
        for threads, clock, load, rows in sections:
            what = "wall clock" if clock == "wall" else "CPU time of the calling thread"
            lines += [f"## {threads} thread(s), {what}", "", f"1-minute load average during the pass: {load}", ""]
            lines += table(rows) + [""]
        with open(args.write, "w") as f:
            f.write("\n".join(lines))
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

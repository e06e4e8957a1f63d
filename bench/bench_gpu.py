"""GPU benchmarks of issue 5: Triton kernels against the card's copy bandwidth and the torch
reference, the pinned staging ring against plain non_blocking copies, and stage step times of
ResNet-56/110 and WRN-28-10.

    python bench/bench_gpu.py --out bench/results/gpu_<card>.json --md bench/results/gpu_<card>.md
    python bench/bench_gpu.py --only copy,ops            # some sections
    python bench/bench_gpu.py --device cpu --tiny         # the same harness on CPU, tiny shapes (CI)

Sections (each timed with CUDA events on a GPU, perf_counter on CPU; warm-up excluded,
implementations interleaved round by round, medians of --rounds rounds):

  copy    the device's copy bandwidth: ``dst.copy_(src)`` of --copy-mib MiB (read + write bytes
          counted), and host->device from pinned memory. The ``of peak`` column of every other
          section divides by the device copy bandwidth measured here.
  ops     each fused op (LAYERPAR_OPS=triton on CUDA, cpp on CPU) against the reference torch
          composition (LAYERPAR_OPS=ref) at CIFAR-size shapes (batch 128; cuts 16x32x32 and
          32x16x16; s = 1, 2, 4; fp32 and bf16 stores): ms, speed-up, achieved GB/s (the minimal
          bytes the op must move) and its fraction of the copy bandwidth (issue 5 aims at >= 70%).
          Every case first checks that the fused result equals the reference.
  ring    reading the next batch's auxiliary rows from a host store while the current batch
          computes: ``ops.StagingRing`` (prefetch t+1, take t) against a plain gather into pinned
          memory + ``.to(device, non_blocking=True)`` on the compute stream, and against the
          compute alone; overlap = (plain - ring) / (plain - compute).
  stages  per-stage forward+backward time of ResNet-56, ResNet-110 and WRN-28-10 (batch 128,
          CIFAR shapes) cut into K = 2 and 4 stages by measured block time; the slowest stage
          bounds a parallel step, so sum/max is the step speed-up the stages allow (§7).

The results name the device, torch, triton and CUDA versions. On CPU the ring degenerates to
a gather and the numbers only show that the harness runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ops  # noqa: E402  (the op cases are shared with the CPU micro-benchmark)

from layerpar_fast import ops  # noqa: E402
from layerpar_fast.models import build_model, cut_points  # noqa: E402
from layerpar_fast.stages import balance_by_time, split_model  # noqa: E402

SECTIONS = ("copy", "ops", "ring", "stages")
FUSED_OPS = ("local_loss", "coarse_input_grad", "jacobi_update_", "stage_input")


class Timer:
    """Median seconds per call of callables, interleaved round by round."""

    def __init__(self, device: torch.device, rounds: int, min_s: float) -> None:
        self.device, self.rounds, self.min_s = device, rounds, min_s
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _elapsed(self, fn: Callable[[], Any], reps: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return time.perf_counter() - t0

    def __call__(self, fns: list[Callable[[], Any]]) -> list[float]:
        reps = []
        for fn in fns:
            for _ in range(3):
                fn()
            self.sync()
            one = max(self._elapsed(fn, 1), 1e-7)
            reps.append(max(1, int(self.min_s / one)))
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(self.rounds):
            for k, fn in enumerate(fns):
                self.sync()
                samples[k].append(self._elapsed(fn, reps[k]) / reps[k])
        return [statistics.median(v) for v in samples]


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                            "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    else:
        info["name"] = bench_ops.machine()
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["backends"] = ops.backend_report(device)
    return info


# ------------------------------------------------------------------------------------- sections
def bench_copy(timer: Timer, mib: int) -> dict[str, float]:
    n = mib * 2**20
    src = torch.ones(n, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    (t_dev,) = timer([lambda: dst.copy_(src)])
    out = {"bytes": 2 * n, "device_copy_gbs": 2 * n / t_dev / 1e9}
    if timer.cuda:
        host = torch.ones(n, dtype=torch.uint8, pin_memory=True)
        (t_h2d,) = timer([lambda: dst.copy_(host, non_blocking=True)])
        out["h2d_pinned_gbs"] = n / t_h2d / 1e9
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        a, b = a[0], b[0]
    if a is None or b is None:
        return a is None and b is None
    tol = 1e-4 if a.dtype == torch.float32 else 2e-2
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def bench_ops_section(timer: Timer, fast: str, peak_gbs: float | None, batch: int, cuts: tuple,
                      store_rows: int) -> list[dict[str, Any]]:
    rows = []
    dev = str(timer.device)
    for op in FUSED_OPS:
        for cut in cuts:
            for s in bench_ops.FACTORS:
                for dt in bench_ops.DTYPES:
                    if op == "coarse_input_grad" and dt != "fp32":
                        continue
                    case_id = bench_ops._id((op, cut, s, dt))
                    # the check runs on fresh inputs: the λ-step changes its store in place
                    c1 = bench_ops.make_case(op, cut, s, dt, dev, fast, batch, store_rows)
                    c2 = bench_ops.make_case(op, cut, s, dt, dev, fast, batch, store_rows)
                    if not _same(c1.fused(), c2.ref()):
                        raise AssertionError(f"{case_id}: the {fast} result differs from the reference")
                    c = bench_ops.make_case(op, cut, s, dt, dev, fast, batch, store_rows)
                    t_fast, t_ref, t_copy = timer([c.fused, c.ref, c.memcpy])
                    gbs = c.nbytes / t_fast / 1e9
                    rows.append({"case": case_id, "fused_ms": 1e3 * t_fast, "ref_ms": 1e3 * t_ref,
                                 "speedup": t_ref / t_fast, "fused_gbs": gbs,
                                 "memcpy_same_bytes_gbs": c.nbytes / t_copy / 1e9,
                                 "of_peak": gbs / peak_gbs if peak_gbs else None})
                    r = rows[-1]
                    print(f"  {case_id:<34} {r['ref_ms']:8.3f} ms ref {r['fused_ms']:8.3f} ms {fast}  "
                          f"{r['speedup']:6.2f}x  {gbs:7.1f} GB/s"
                          + (f"  {100 * r['of_peak']:4.0f}% of copy" if peak_gbs else ""), flush=True)
    return rows


def bench_ring(timer: Timer, batch: int, row: tuple[int, int, int], n_rows: int, steps: int,
               compute_dim: int) -> dict[str, Any]:
    dev = timer.device
    gen = torch.Generator().manual_seed(0)
    store = torch.randn(n_rows, *row, generator=gen).to(torch.bfloat16)
    order = [torch.randperm(n_rows, generator=gen)[:batch] for _ in range(steps)]
    w = torch.randn(compute_dim, compute_dim, device=dev)
    pin = timer.cuda
    staging = torch.empty((batch, *row), dtype=store.dtype, pin_memory=pin)

    def compute(rows: torch.Tensor | None) -> torch.Tensor:
        y = w
        for _ in range(4):
            y = torch.tanh(y @ w)
        return y if rows is None else y[:1, :1] + rows.float().mean()

    def plain() -> None:
        for t in range(steps):
            ops.gather_rows(store, order[t], out=staging)
            rows = staging.to(dev, non_blocking=True)
            compute(rows)

    ring = ops.StagingRing(slots=2, device=dev)

    def ringed() -> None:
        ticket = ring.prefetch(store, order[0])
        for t in range(steps):
            nxt = ring.prefetch(store, order[t + 1]) if t + 1 < steps else None
            compute(ring.take(ticket))
            ticket = nxt

    def compute_only() -> None:
        for _ in range(steps):
            compute(None)

    # the ring must deliver the same rows as the plain path
    ticket = ring.prefetch(store, order[0])
    if not torch.equal(ring.take(ticket).cpu(), store[order[0]]):
        raise AssertionError("StagingRing delivered other rows than store[idx]")
    t_plain, t_ring, t_comp = timer([plain, ringed, compute_only])
    hidden = (t_plain - t_ring) / (t_plain - t_comp) if t_plain > t_comp else None
    nbytes = batch * store[0].numel() * store.element_size()
    out = {"batch": batch, "row": list(row), "dtype": "bf16", "steps": steps, "bytes_per_step": nbytes,
           "plain_ms_per_step": 1e3 * t_plain / steps, "ring_ms_per_step": 1e3 * t_ring / steps,
           "compute_ms_per_step": 1e3 * t_comp / steps, "ring_speedup": t_plain / t_ring, "overlap": hidden,
           "native_ring": ring._native is not None}
    print(f"  ring: plain {out['plain_ms_per_step']:.3f} ms/step, ring {out['ring_ms_per_step']:.3f}, "
          f"compute alone {out['compute_ms_per_step']:.3f} ({out['ring_speedup']:.2f}x; overlap "
          f"{'-' if hidden is None else f'{100 * hidden:.0f}%'})", flush=True)
    return out


def bench_stages(timer: Timer, models: list[str], ks: list[int], batch: int, image: int,
                 channels_last: bool) -> list[dict[str, Any]]:
    rows = []
    dev = timer.device
    for name in models:
        model = build_model(name, image_size=image).to(dev)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        x = torch.randn(batch, 3, image, image, device=dev).to(memory_format=fmt)

        def step(mod: torch.nn.Module, inp: torch.Tensor) -> Callable[[], Any]:
            inp = inp.detach().requires_grad_(inp is not x)

            def run() -> None:
                out = mod(inp)
                out.backward(torch.ones_like(out))
            return run

        (t_full,) = timer([step(model, x)])
        for k in ks:
            cuts = balance_by_time(model, k, x)
            stages = split_model(model, cuts)
            inputs, h = [], x
            with torch.no_grad():
                for st in stages:
                    inputs.append(h)
                    h = st(h)
            times = timer([step(st, inp) for st, inp in zip(stages, inputs)])
            shapes = {c.index: list(c.shape) for c in cut_points(model, (3, image, image))}
            rows.append({"model": name, "K": k, "cuts": cuts, "cut_shapes": [shapes.get(c) for c in cuts],
                         "serial_step_ms": 1e3 * t_full, "stage_ms": [1e3 * t for t in times],
                         "stage_sum_ms": 1e3 * sum(times), "max_stage_ms": 1e3 * max(times),
                         "step_speedup_bound": t_full / max(times)})
            r = rows[-1]
            print(f"  {name} K={k} cuts {cuts}: serial {r['serial_step_ms']:.2f} ms, stages "
                  f"{' / '.join(f'{t:.2f}' for t in r['stage_ms'])} ms -> bound {r['step_speedup_bound']:.2f}x",
                  flush=True)
        del model
    return rows


# --------------------------------------------------------------------------------------- report
def ops_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of the ops section (also used by gpu_check.py)."""
    out = ["| case | reference ms | fused ms | speed-up | fused GB/s | of copy bandwidth |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "-" if r["of_peak"] is None else f"{100 * r['of_peak']:.0f}%"
        out.append(f"| {r['case']} | {r['ref_ms']:.3f} | {r['fused_ms']:.3f} | {r['speedup']:.2f}x | "
                   f"{r['fused_gbs']:.1f} | {peak} |")
    return out


def markdown(res: dict[str, Any], command: str) -> str:
    info = res["device"]
    lines = [f"# GPU benchmarks (issue 5): {info.get('name')}", "",
             f"- Device: {info.get('name')} ({info['device']}), torch {info['torch']}, triton {info['triton']}, "
             f"CUDA {info['cuda']}, Python {info['python']}",
             f"- Command: `{command}`", f"- Backends: {info['backends']}", ""]
    if "copy" in res:
        c = res["copy"]
        lines += ["## Copy bandwidth", "", f"device copy (`dst.copy_(src)`, read + write): "
                  f"**{c['device_copy_gbs']:.1f} GB/s**"
                  + (f"; host->device from pinned memory: {c['h2d_pinned_gbs']:.1f} GB/s" if "h2d_pinned_gbs" in c
                     else ""), ""]
    if "ops" in res:
        lines += ["## Fused ops against the reference", "", *ops_table(res["ops"]), ""]
    if "ring" in res:
        r = res["ring"]
        ov = "-" if r["overlap"] is None else f"{100 * r['overlap']:.0f}%"
        lines += ["## Staging ring against plain non_blocking copies", "",
                  f"{r['steps']} steps, batch {r['batch']}, rows {r['row']} {r['dtype']} "
                  f"({r['bytes_per_step'] / 2**20:.2f} MiB per step); native C++ ring: {r['native_ring']}", "",
                  "| plain ms/step | ring ms/step | compute alone ms/step | ring speed-up | transfer hidden |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {r['plain_ms_per_step']:.3f} | {r['ring_ms_per_step']:.3f} | {r['compute_ms_per_step']:.3f} | "
                  f"{r['ring_speedup']:.2f}x | {ov} |", ""]
    if "stages" in res:
        lines += ["## Stage step times (forward + backward)", "",
                  "| model | K | cuts | serial step ms | stage ms | max stage ms | step speed-up bound |",
                  "|---|---:|---|---:|---|---:|---:|"]
        for r in res["stages"]:
            lines.append(f"| {r['model']} | {r['K']} | {r['cuts']} | {r['serial_step_ms']:.2f} | "
                         f"{' / '.join(f'{t:.2f}' for t in r['stage_ms'])} | {r['max_stage_ms']:.2f} | "
                         f"{r['step_speedup_bound']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--min-ms", type=float, default=20.0, help="time per timed sample (calls repeated)")
    p.add_argument("--copy-mib", type=int, default=256)
    p.add_argument("--models", default="resnet56,resnet110,wrn28_10")
    p.add_argument("--stages", default="2,4", help="K values of the stages section")
    p.add_argument("--channels-last", action="store_true", help="stages section in channels_last")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a harness check, not a measurement)")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--md", help="write the results as markdown")
    args = p.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; valid: {', '.join(SECTIONS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device here (use --device cpu --tiny for a harness check)")
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device {args.device!r}: cuda or cpu")
    fast = "triton" if device.type == "cuda" else "cpp"
    avail = ops.available_backends()
    if not avail.get(fast):
        p.error(f"the {fast} path is not available here ({ops.describe()})")
    tiny = args.tiny
    timer = Timer(device, 2 if tiny else args.rounds, 0.0 if tiny else args.min_ms / 1e3)
    res: dict[str, Any] = {"device": device_info(device), "tiny": tiny}
    print(f"{res['device'].get('name')}: torch {torch.__version__}, triton {res['device']['triton']}", flush=True)
    if "copy" in sections:
        res["copy"] = bench_copy(timer, 1 if tiny else args.copy_mib)
        print(f"  copy: device {res['copy']['device_copy_gbs']:.1f} GB/s"
              + (f", h2d pinned {res['copy']['h2d_pinned_gbs']:.1f} GB/s" if "h2d_pinned_gbs" in res["copy"] else ""),
              flush=True)
    if "ops" in sections:
        peak = res.get("copy", {}).get("device_copy_gbs")
        cuts = ((3, 4, 4), (5, 8, 8)) if tiny else bench_ops.CUTS
        res["ops"] = bench_ops_section(timer, fast, peak, 2 if tiny else bench_ops.BATCH, cuts,
                                       8 if tiny else bench_ops.STORE_ROWS)
    if "ring" in sections:
        res["ring"] = (bench_ring(timer, 4, (3, 4, 4), 32, 3, 16) if tiny else
                       bench_ring(timer, bench_ops.BATCH, (16, 16, 16), 50000, 50, 2048))
    if "stages" in sections:
        ks = [int(k) for k in args.stages.split(",")]
        models = ["resnet20"] if tiny else args.models.split(",")
        res["stages"] = bench_stages(timer, models, ks, 2 if tiny else 128, 32, args.channels_last)
    command = "python bench/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**res, "command": command.strip()}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(res, command.strip()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

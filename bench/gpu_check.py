"""The GPU check of issue 11: everything a lent GPU should tell us, in one bounded run.

    bash bench/gpu_check.sh                                   # on the GPU machine (<= 8 minutes)
    python bench/gpu_check.py --out bench/results/gpu_h200.json --md bench/results/gpu_h200.md
    python bench/gpu_check.py --only syncdebug,match         # some sections
    python bench/gpu_check.py --device cpu --tiny --out x.json --md x.md   # harness check (CI)

Sections (``--only`` picks; each runs in a child process of its own with a wall-clock limit, so
a section that raises, hangs, or breaks the CUDA context is recorded with its error and the
others still run; ``--in-process`` runs them in this process, without the limits):

  info       device, torch/triton/CUDA/cuDNN versions, the backend each fused op resolves to.
  ops        bench_gpu's copy and ops sections: each fused op (Triton on CUDA) is checked against
             the reference, then timed; achieved GB/s as a share of the measured copy bandwidth.
  syncdebug  one K = 2 parallel phase entered as the trainer does (``_enter_parallel``: warm-up,
             λ fill, β), then a few parallel steps of every stage under
             ``torch.cuda.set_sync_debug_mode("error")``: a host synchronisation inside a step
             raises. On failure a second run in "warn" mode lists every synchronising line.
             CPU: skipped (no CUDA).
  match      a K = 2 SPH run (local transport, fp32, TF32 off, cuDNN deterministic) on the GPU and
             the same run on the CPU; per-step losses of every serial step and of every stage's
             parallel steps, compared over the first --match-steps steps against a per-step
             relative tolerance (floating-point non-associativity makes the runs drift apart
             slowly, so later steps and the final parameters are reported, not judged).
             CPU: the same run with 1 and with 2 threads (exercises the harness).
  stages     bench_gpu's stage step times (ResNet-56, WRN-28-10 at K = 2 and 4).

Sections run in the order info, syncdebug, match, ops, stages (the correctness checks before the
long benchmarks, in case the time budget runs out); the JSON and markdown are rewritten after
every section, so an outer timeout still leaves the finished sections on disk.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):           # the repository's package, and bench_gpu / bench_ops
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

SECTIONS = ("info", "ops", "syncdebug", "match", "stages", "memprec")
RUN_ORDER = ("info", "syncdebug", "match", "ops", "stages", "memprec")
LIMITS_S = {"info": 60, "syncdebug": 120, "match": 200, "ops": 180, "stages": 150, "memprec": 150}
OK_STATUSES = ("ok", "pass")
MATCH_TOL = 1e-3        # GPU against CPU, per step, over the first serial and the first parallel epoch
MATCH_TOL_TINY = 1e-2   # --tiny on CPU: 1 against 2 threads at batch 64, a harness check


# ---------------------------------------------------------------------------------- utilities
def card_slug(name: str | None) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA GeForce RTX 4090' ->
    'rtx4090'; None (no GPU) -> 'cpu'."""
    if not name:
        return "cpu"
    words = [w for w in re.split(r"[\s_]+", name.lower()) if w and w not in ("nvidia", "geforce", "tesla")]
    if not words:
        return "gpu"
    slug = words[0] + (words[1] if words[0] in ("rtx", "gtx", "quadro") and len(words) > 1 else "")
    return re.sub(r"[^a-z0-9-]+", "", slug) or "gpu"


def _finite(x: Any) -> Any:
    """JSON without NaN/Infinity: non-finite floats become strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class CudaClock:
    """Seconds of device work between start() and stop(): CUDA events on a GPU, perf_counter
    (after the work) on the CPU. Reading needs the stop event: call seconds() outside any
    sync-debug region."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._b = torch.cuda.Event(enable_timing=True)
            self._b.record()
        else:
            self._s = time.perf_counter() - self._t

    def seconds(self) -> float:
        if self.cuda:
            self._b.synchronize()
            return self._a.elapsed_time(self._b) / 1e3
        return self._s


def run_section(name: str, fn: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
    """Run one section: ``fn(results)`` fills ``results`` as it goes (kept when it raises) and
    returns its status (None: "ok"). An exception is recorded as status "failed" with its text
    and traceback; it never propagates."""
    out: dict[str, Any] = {"status": "running", "results": {}}
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        status = fn(out["results"])
        out["status"] = status or "ok"
    except BaseException as e:   # noqa: BLE001  (KeyboardInterrupt/SystemExit of a section too)
        if isinstance(e, KeyboardInterrupt):   # Ctrl-C, or SIGTERM in the parent (_Terminated)
            raise
        out["status"] = "failed"
        out["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
        out["traceback"] = traceback.format_exc()[-4000:]
        print(f"   {name} FAILED: {out['error']}", flush=True)
    out["seconds"] = time.perf_counter() - t0
    print(f"== {name}: {out['status']} ({out['seconds']:.1f} s)", flush=True)
    return out


class _Terminated(KeyboardInterrupt):
    """SIGTERM (the outer `timeout` of gpu_check.sh) in the parent process."""


# ------------------------------------------------------------------------------------ sections
def _versions() -> dict[str, Any]:
    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda}
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        v["triton"] = f"unavailable ({type(e).__name__})"
    try:
        v["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001
        v["cudnn"] = None
    try:
        import layerpar_fast
        v["layerpar_fast"] = layerpar_fast.__version__
    except Exception as e:  # noqa: BLE001
        v["layerpar_fast"] = f"import failed ({e})"
    return v


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sec_info(res: dict[str, Any], args: argparse.Namespace, device: torch.device) -> str:
    from layerpar_fast import _ext, ops
    from layerpar_fast.info import info_dict
    res["versions"] = _versions()
    res["device"] = str(device)
    res["name"] = _device_name(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        res.update(memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}")
    res["env"] = {k: os.environ.get(k) for k in ("CUDA_MODULE_LOADING", "LAYERPAR_DEBUG_SYNC", "LAYERPAR_OPS",
                                                 "CUDA_VISIBLE_DEVICES")}
    res["available_backends"] = ops.available_backends()
    res["backends"] = ops.backend_report(device)
    res["backends_cpu"] = ops.backend_report("cpu")
    res["extension"] = {"loaded": _ext.available(), "cuda_staging": bool(_ext.with_cuda()) if _ext.available() else False}
    res["fast_paths"] = ops.describe()
    info = info_dict()
    res["layerpar_info"] = {k: v for k, v in info.items() if k not in ("ops", "fast_paths")}
    for op, b in res["backends"].items():
        print(f"   {op:<20} -> {b}", flush=True)
    if device.type == "cuda" and res["backends"].get("local_loss") != "triton":
        res["note"] = "the fused ops do not resolve to Triton on this CUDA device (see fast_paths)"
        return "fail"
    return "ok"


def sec_ops(res: dict[str, Any], args: argparse.Namespace, device: torch.device) -> str:
    import bench_gpu
    import bench_ops
    from layerpar_fast import ops
    fast = "triton" if device.type == "cuda" else "cpp"
    if not ops.available_backends().get(fast):
        if device.type == "cuda":
            raise RuntimeError(f"the triton path is not available here ({ops.describe()})")
        fast = "ref"   # CPU without the extension: the harness still runs
    res["fast"] = fast
    tiny = args.tiny
    timer = bench_gpu.Timer(device, 2 if tiny else args.rounds, 0.0 if tiny else args.min_ms / 1e3)
    res["copy"] = bench_gpu.bench_copy(timer, 1 if tiny else args.copy_mib)
    peak = res["copy"]["device_copy_gbs"]
    print(f"   copy: device {peak:.1f} GB/s" + (f", h2d pinned {res['copy']['h2d_pinned_gbs']:.1f} GB/s"
                                               if "h2d_pinned_gbs" in res["copy"] else ""), flush=True)
    cuts = ((3, 4, 4), (5, 8, 8)) if tiny else bench_ops.CUTS
    res["cases"] = bench_gpu.bench_ops_section(timer, fast, peak, 2 if tiny else bench_ops.BATCH, cuts,
                                               8 if tiny else bench_ops.STORE_ROWS)
    rows = res["cases"]
    res["summary"] = {"cases": len(rows), "all_match_reference": True,
                      "min_speedup": min(r["speedup"] for r in rows),
                      "min_of_peak": min(r["of_peak"] for r in rows),
                      "cases_at_70pct_of_copy": sum(r["of_peak"] >= 0.7 for r in rows)}
    return "ok"


def _embedded(subset: int, test_subset: int):
    from layerpar_fast.data import load_dataset
    return load_dataset("embedded", None, subset=subset, test_subset=test_subset)


def _k2_config(device: torch.device, batch: int, schedule: str, threads: int | None, tiny: bool, **kw: Any):
    from layerpar_fast.config import make_config
    base = dict(method="al", stages=2, ds=2, batch_size=batch, eval_batch_size=500, lr=0.05, schedule=schedule,
                progress=False, kappa_iters=5 if tiny else 20, bn_recalib_batches=8 if tiny else 50,
                augment="none", transport="local", device=device.type, threads=threads, seed=0,
                model="mnist_resnet", serial_on="one",   # serial epochs on whole batches (the loss taps see them)
                sharpness_gate=0, pace_rows=0)   # the phase runs whatever the tiny runs' curvature: the engine is under test
    base.update(kw)
    return make_config(**base)


def sec_syncdebug(res: dict[str, Any], args: argparse.Namespace, device: torch.device) -> str:
    if device.type != "cuda":
        res["reason"] = "torch.cuda.set_sync_debug_mode needs a CUDA device"
        return "skipped: no CUDA"
    from layerpar_fast.trainer import HybridTrainer
    subset, batch = (256, 32) if args.tiny else (1024, 128)
    data = _embedded(subset, 200)
    steps = args.syncdebug_steps
    res.update(model="mnist_resnet", K=2, method="al (gs)", ds=2, batch=batch, subset=subset)

    def parallel_phase():
        cfg = _k2_config(device, batch, "parallel:1", None, args.tiny)
        tr = HybridTrainer(cfg, None, data=data, log=lambda m: None)
        tr._enter_parallel(0, 0)                  # warm-up, λ fill, β: as the trainer does
        batches = tr._parallel_batches(0)
        workers = tr._workers(tr._settings())     # as _parallel_epoch does
        for w in workers:
            w.begin_epoch(0, batches, lambda t: tr.lr_at(t))
        torch.cuda.synchronize()
        return tr, workers, min(steps, len(batches))

    tr, workers, n = parallel_phase()
    res["cuts"] = tr.cuts
    res["steps"] = n
    clocks = [CudaClock(device) for _ in range(n)]
    prev = torch.cuda.get_sync_debug_mode()
    done, err = 0, None
    try:
        torch.cuda.set_sync_debug_mode("error")
        for t in range(n):
            clocks[t].start()
            for w in workers:
                w.step(t)
            clocks[t].stop()
            done += 1
    except RuntimeError as e:
        err = e
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        res["where"] = [f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} in {f.name}: {f.line}"
                        for f in traceback.extract_tb(e.__traceback__)
                        if "layerpar_fast" in f.filename or "bench" in f.filename][-8:]
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    res["steps_passed"] = done
    res["step_ms"] = [1e3 * clocks[t].seconds() for t in range(done)]
    print(f"   {done}/{n} parallel steps without a host synchronisation"
          + (f"; first one: {res['error']}" if err else ""), flush=True)
    if err is None:
        return "pass"
    # where are they all? the same phase again in "warn" mode, every synchronising line recorded
    del tr, workers
    tr, workers, n = parallel_phase()
    sites: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.cuda.set_sync_debug_mode("warn")
            for t in range(n):
                for w in workers:
                    w.step(t)
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    for wm in caught:
        if "synchroniz" in str(wm.message):
            sites[f"{os.path.relpath(wm.filename, ROOT)}:{wm.lineno}"] += 1
    res["sync_sites"] = [{"where": k, "count": v} for k, v in sites.most_common()]
    for s in res["sync_sites"]:
        print(f"   sync at {s['where']} x{s['count']}", flush=True)
    return "fail"


def _match_run(device: torch.device, threads: int | None, args: argparse.Namespace, data) -> dict[str, Any]:
    """One K = 2 SPH run; per-step losses of serial steps and of every stage's parallel steps."""
    from layerpar_fast.trainer import HybridTrainer
    import torch.nn.functional as F
    cfg = _k2_config(device, args.match_batch, args.match_schedule, threads, args.tiny)
    log: list[str] = []
    tr = HybridTrainer(cfg, None, data=data, log=log.append)
    series: dict[str, list[float]] = {}
    start: dict[str, int] = {}
    spe = tr.steps_per_epoch

    # serial steps: the loss of the trainer's own forward output (a forward hook) and labels
    class Tap:
        def __init__(self, inner):
            self.inner, self.y, self.epoch = inner, None, None

        def __getattr__(self, k):
            return getattr(self.inner, k)

        def __len__(self):
            return len(self.inner)

        def set_epoch(self, e):
            self.epoch = e
            self.inner.set_epoch(e)

        def __iter__(self):
            key = f"e{self.epoch + 1} serial"
            series[key], start[key] = [], self.epoch * spe
            try:
                for idx, x, y in self.inner:
                    self.y, self.key = y, key
                    yield idx, x, y
            finally:
                self.y = None

    tap = Tap(tr.train_loader)
    tr.train_loader = tap

    def hook(mod, inp, out):
        if tap.y is not None and mod.training and torch.is_grad_enabled():
            series[tap.key].append(float(F.cross_entropy(out.detach(), tap.y,
                                                         label_smoothing=cfg.label_smoothing)))
    handle = tr.model.register_forward_hook(hook)

    # parallel steps: each stage's loss_sum accumulator before and after every step
    orig_workers = tr._workers

    def workers(settings):
        ws = orig_workers(settings)
        for w in ws:
            def step(t, w=w, inner=w.step):
                s0, n0 = w.stats.peek("loss_sum"), w.stats.samples
                inner(t)
                key = f"e{w.epoch + 1} parallel stage{w.rank}"
                if t == 0:
                    series[key], start[key] = [], w.epoch * spe
                series[key].append((w.stats.peek("loss_sum") - s0) / max(1, w.stats.samples - n0))
            w.step = step
        return ws
    tr._workers = workers
    t0 = time.perf_counter()
    try:
        tr.run()
    finally:
        handle.remove()
    wall = time.perf_counter() - t0
    params = {k: v.detach().float().cpu() for k, v in tr.model.state_dict().items() if v.is_floating_point()}
    epochs = [{k: r.get(k) for k in ("epoch", "phase", "train_loss", "train_acc", "test_loss", "test_acc")}
              for r in tr.records]
    return {"series": series, "start": start, "params": params, "epochs": epochs, "wall_s": wall,
            "threads": tr.threads, "device": str(tr.device), "cuts": tr.cuts, "steps_per_epoch": spe,
            "stages": len(tr.stages)}


def _rel(a: float, b: float, floor: float) -> float:
    """|a - b| relative to the larger magnitude, or to ``floor`` (the series' scale) when both are
    smaller: the AL local losses start near 0 (λ = a after the fill) and change sign."""
    return abs(a - b) / max(abs(a), abs(b), floor, 1e-12)


def compare_runs(a: dict[str, Any], b: dict[str, Any], checked_steps: int, tol: float) -> dict[str, Any]:
    """Per-series per-step relative differences; the check covers global steps < checked_steps."""
    rows, worst_checked = [], 0.0
    for key in a["series"]:
        sa, sb = a["series"][key], b["series"].get(key)
        if sb is None or len(sa) != len(sb):
            raise AssertionError(f"series {key!r}: {len(sa)} steps in run A, "
                                 f"{'none' if sb is None else len(sb)} in run B")
        s0 = a["start"][key]
        floor = 0.05 * math.sqrt(sum(x * x for x in sa) / max(1, len(sa)))   # 5% of the series' RMS
        diffs = [_rel(x, y, floor) for x, y in zip(sa, sb)]
        checked = [d for t, d in enumerate(diffs) if s0 + t < checked_steps]
        over = next((s0 + t for t, d in enumerate(diffs) if s0 + t < checked_steps and d > tol), None)
        judged = "serial" in key or key.endswith(f"stage{a['stages'] - 1}")
        if not judged:
            checked = []
            over = None
        rows.append({"series": key, "judged": judged, "first_step": s0, "steps": len(diffs), "checked_steps": len(checked),
                     "max_rel_checked": max(checked) if checked else None, "max_rel_all": max(diffs) if diffs else None,
                     "first_step_over_tol": over, "first_rel": diffs[0] if diffs else None, "first_loss_a": sa[0] if sa else None,
                     "first_loss_b": sb[0] if sb else None})
        if checked:
            worst_checked = max(worst_checked, max(checked))
    pa, pb = a["params"], b["params"]
    prel = {k: float((pa[k] - pb[k]).norm() / max(float(pb[k].norm()), 1e-12)) for k in pa}
    worst_p = max(prel, key=prel.get) if prel else None
    return {"series": rows, "max_rel_loss_checked": worst_checked,
            "max_rel_loss_all": max((r["max_rel_all"] for r in rows if r["judged"] and r["max_rel_all"] is not None),
                                    default=None),
            "max_rel_param": prel[worst_p] if worst_p else None, "max_rel_param_tensor": worst_p,
            "checked_series": sum(r["checked_steps"] > 0 for r in rows)}


def sec_match(res: dict[str, Any], args: argparse.Namespace, device: torch.device) -> str:
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    threads_before = torch.get_num_threads()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        subset = 256 if args.tiny else args.match_subset
        data = _embedded(subset, 200 if args.tiny else 1000)
        if args.tiny:
            args.match_batch = 64
            if args.match_tol == MATCH_TOL:
                args.match_tol = MATCH_TOL_TINY
        res.update(model="mnist_resnet", K=2, method="al (gs)", ds=2, dtype="fp32, TF32 off, cuDNN deterministic",
                   subset=subset, batch=args.match_batch, schedule=args.match_schedule, tolerance=args.match_tol)
        if device.type == "cuda":
            runs = [("A", device, None), ("B", torch.device("cpu"), None)]
            res["compared"] = "GPU (A) against CPU (B)"
        else:
            ta, tb = (int(x) for x in args.match_threads.split(","))
            runs = [("A", device, ta), ("B", device, tb)]
            res["compared"] = f"CPU {ta} thread(s) (A) against CPU {tb} thread(s) (B): a harness check"
        out = {}
        for tag, dev, threads in runs:
            print(f"   run {tag}: {dev}{'' if threads is None else f', {threads} thread(s)'} ...", flush=True)
            out[tag] = _match_run(dev, threads, args, data)
            res[f"run_{tag}"] = {k: out[tag][k] for k in ("device", "threads", "wall_s", "cuts", "steps_per_epoch",
                                                          "epochs")}
            print(f"   run {tag}: {out[tag]['wall_s']:.1f} s, final test acc "
                  f"{out[tag]['epochs'][-1]['test_acc']:.4f}", flush=True)
        spe = out["A"]["steps_per_epoch"]
        checked = args.match_steps if args.match_steps else 2 * spe
        res["checked_steps"] = checked
        cmp_ = compare_runs(out["A"], out["B"], checked, args.match_tol)
        res.update(cmp_)
        print(f"   max per-step loss rel. diff over the first {checked} steps: {cmp_['max_rel_loss_checked']:.3g} "
              f"(tol {args.match_tol:g}); over all steps {cmp_['max_rel_loss_all']:.3g}; final params "
              f"{cmp_['max_rel_param']:.3g} ({cmp_['max_rel_param_tensor']})", flush=True)
        return "pass" if cmp_["checked_series"] > 0 and cmp_["max_rel_loss_checked"] <= args.match_tol else "fail"
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = flags
        torch.set_num_threads(threads_before)


def sec_stages(res: dict[str, Any], args: argparse.Namespace, device: torch.device) -> str:
    import bench_gpu
    tiny = args.tiny
    timer = bench_gpu.Timer(device, 2 if tiny else args.rounds, 0.0 if tiny else args.min_ms / 1e3)
    ks = [int(k) for k in args.stages.split(",")]
    models = ["resnet20"] if tiny else args.models.split(",")
    res.update(models=models, K=ks, batch=2 if tiny else 128)
    res["rows"] = []
    for m in models:   # one model at a time: a failure keeps the rows measured before it
        res["rows"] += bench_gpu.bench_stages(timer, [m], ks, res["batch"], 32, False)
    return "ok"


def sec_memprec(res: dict[str, Any], args: argparse.Namespace, device: torch.device) -> str:
    """Issue 15 on a GPU: one parallel epoch of ResNet-56 (K = 2, --transport local) with the
    auxiliary stores on the device and in pinned host memory (prefetch + asynchronous write-back),
    fp32 and bf16 autocast; rounds interleaved, medians. The share of store traffic hidden =
    1 - (host epoch - device epoch) / (the epoch's store rows copied host->device synchronously)."""
    import statistics
    from layerpar_fast.data import Dataset
    from layerpar_fast.trainer import HybridTrainer
    tiny = args.tiny
    n, model = (128, "resnet20") if tiny else (5120, "resnet56")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n + 64, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n + 64,), generator=g)
    data = Dataset(name="random-cifar", x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:], num_classes=10,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    combos = [("device", "off"), ("host", "off"), ("device", "bf16"), ("host", "bf16")]
    res.update(model=model, images=n, K=2, batch=64 if tiny else 128)
    trainers = {}
    for aux, amp in combos:
        cfg = _k2_config(device, res["batch"], "parallel:1", None, tiny, model=model, aux_device=aux, amp=amp,
                         bn_recalib_batches=1, kappa_iters=2, augment="none")
        tr = HybridTrainer(cfg, None, data=data, log=lambda m: None)
        tr._enter_parallel(0, 0)
        trainers[(aux, amp)] = tr
    times: dict[tuple[str, str], list[float]] = {c: [] for c in combos}
    for _ in range(1 if tiny else 3):
        for c in combos:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            trainers[c]._parallel_epoch(0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[c].append(time.perf_counter() - t0)
    tr = trainers[("host", "off")]
    stores = [st for lst in tr.stores.values() for st in lst if st is not None]
    t0 = time.perf_counter()
    for b in tr._parallel_batches(0):
        for st in stores:
            rows = st.table[b]
            rows.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    copy_s = time.perf_counter() - t0
    med = {f"{a}/{p}": statistics.median(v) for (a, p), v in times.items()}
    res["epoch_s"] = med
    res["store_copy_s"] = copy_s
    for p in ("off", "bf16"):
        extra = med[f"host/{p}"] - med[f"device/{p}"]
        res[f"hidden_share_{p}"] = None if copy_s <= 0 else max(0.0, min(1.0, 1 - extra / copy_s))
    res["bf16_speedup"] = med["device/off"] / med["device/bf16"]
    return "ok"


SECTION_FNS: dict[str, Callable[..., str]] = {"info": sec_info, "ops": sec_ops, "syncdebug": sec_syncdebug,
                                              "match": sec_match, "stages": sec_stages, "memprec": sec_memprec}


# --------------------------------------------------------------------------------------- report
def _f(x: Any, fmt: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, fmt)
    return str(x)


def markdown(doc: dict[str, Any]) -> str:
    v = doc["versions"]
    lines = [f"# GPU check (issue 11): {doc['device'].get('name')}", "",
             f"- Device: {doc['device'].get('name')} (`{doc['device'].get('device')}`)"
             + (f", {doc['device']['memory_gib']} GiB, capability {doc['device']['capability']}"
                if "memory_gib" in doc["device"] else ""),
             f"- Versions: torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}, "
             f"cuDNN {v.get('cudnn')}, Python {v.get('python')}, layerpar_fast {v.get('layerpar_fast')}",
             f"- Command: `{doc['command']}`" + (" (tiny: a harness check, not a measurement)" if doc["tiny"] else ""),
             f"- Started {doc['started']}; {doc.get('seconds', 0):.0f} s in all", "",
             "| section | status | seconds |", "|---|---|---:|"]
    for name in SECTIONS:
        s = doc["sections"].get(name)
        if s is not None:
            lines.append(f"| {name} | {s['status']} | {_f(s.get('seconds'), '.1f')} |")
    lines.append("")
    for name in SECTIONS:
        s = doc["sections"].get(name)
        if s is None:
            continue
        lines += [f"## {name}", "", f"Status: **{s['status']}** ({_f(s.get('seconds'), '.1f')} s)", ""]
        r = s.get("results") or {}
        try:
            lines += _MD[name](r)
        except Exception as e:  # noqa: BLE001  (a partial result must not break the report)
            lines += [f"(partial results; table not drawn: {type(e).__name__}: {e})", ""]
        if s.get("error"):
            lines += ["Error:", "", "```", s["error"], "```", ""]
            if s.get("traceback"):
                lines += ["<details><summary>traceback</summary>", "", "```", s["traceback"].rstrip(), "```",
                          "", "</details>", ""]
        if s.get("output_tail"):
            lines += ["<details><summary>last output</summary>", "", "```", s["output_tail"].rstrip(), "```",
                      "", "</details>", ""]
    return "\n".join(lines) + "\n"


def _md_info(r: dict[str, Any]) -> list[str]:
    if not r:
        return []
    out = ["| op | backend on this device | backend on CPU |", "|---|---|---|"]
    for op, b in (r.get("backends") or {}).items():
        out.append(f"| {op} | {b} | {(r.get('backends_cpu') or {}).get(op, '-')} |")
    out += ["", f"- Fast paths: {r.get('fast_paths')}", f"- Extension: {r.get('extension')}",
            f"- Environment: {r.get('env')}"]
    if r.get("note"):
        out.append(f"- **{r['note']}**")
    return out + [""]


def _md_ops(r: dict[str, Any]) -> list[str]:
    import bench_gpu
    out = []
    c = r.get("copy")
    if c:
        out += [f"Copy bandwidth (`dst.copy_(src)`, read + write): **{c['device_copy_gbs']:.1f} GB/s**"
                + (f"; host->device from pinned memory: {c['h2d_pinned_gbs']:.1f} GB/s" if "h2d_pinned_gbs" in c
                   else ""), ""]
    if r.get("cases"):
        out += [f"Every case was checked against the reference (`LAYERPAR_OPS=ref`) before timing; fused = "
                f"`{r.get('fast')}`. Issue 5 aims at >= 70% of the copy bandwidth.", "",
                *bench_gpu.ops_table(r["cases"]), ""]
    sm = r.get("summary")
    if sm:
        out += [f"{sm['cases']} cases; lowest speed-up {sm['min_speedup']:.2f}x; lowest share of the copy "
                f"bandwidth {100 * sm['min_of_peak']:.0f}%; {sm['cases_at_70pct_of_copy']} cases at >= 70%.", ""]
    return out


def _md_syncdebug(r: dict[str, Any]) -> list[str]:
    if "reason" in r:
        return [r["reason"], ""]
    if "steps" not in r:
        return []
    out = [f"K = {r.get('K')} {r.get('model')} (cuts {r.get('cuts')}, {r.get('method')}, ds {r.get('ds')}, batch "
           f"{r.get('batch')}): after `_enter_parallel` (warm-up, λ fill, β), {r.get('steps_passed')} of "
           f"{r['steps']} parallel steps of every stage ran under `torch.cuda.set_sync_debug_mode(\"error\")`.", ""]
    if r.get("step_ms"):
        out += ["Step times (all stages, CUDA events): " + ", ".join(f"{t:.2f}" for t in r["step_ms"]) + " ms", ""]
    if r.get("error"):
        out += ["First synchronisation:", "", "```", r["error"], *r.get("where", []), "```", ""]
    if r.get("sync_sites"):
        out += ["Every synchronising line of the same steps (\"warn\" mode):", "", "| where | count |", "|---|---:|"]
        out += [f"| {s['where']} | {s['count']} |" for s in r["sync_sites"]] + [""]
    return out


def _md_match(r: dict[str, Any]) -> list[str]:
    if "compared" not in r:
        return []
    out = [f"{r['compared']}: K = {r['K']} {r['model']}, {r['method']}, ds {r['ds']}, {r['dtype']}; embedded "
           f"MNIST subset {r['subset']}, batch {r['batch']}, schedule `{r['schedule']}`.", "",
           f"Tolerance: the per-step loss (serial steps; each stage's local loss in parallel steps) may differ by "
           f"at most **{r['tolerance']:g} relative** (to the larger of the two, or to 5% of the series' RMS when "
           f"both are smaller: the AL local losses start near 0) over the first {r.get('checked_steps')} steps "
           "(the first serial and the first parallel epoch by default). Floating-point "
           "addition is not associative, so the two runs round differently from the first step on and drift "
           "apart slowly (SGD amplifies the differences); the check is per step over the first steps, and later "
           "steps and the final parameters are reported for information, not judged.", ""]
    if "max_rel_loss_checked" in r:
        out += [f"- Max per-step loss rel. difference, checked steps: **{_f(r['max_rel_loss_checked'])}**; "
                f"all steps: {_f(r['max_rel_loss_all'])}",
                f"- Max final-parameter rel. difference (‖a-b‖/‖b‖ per tensor): {_f(r['max_rel_param'])} "
                f"({r['max_rel_param_tensor']})", "",
                "| series | first step | steps | judged steps | max rel. diff (checked) | max rel. diff (all) | "
                "first step over tol | rel. diff at first step | first loss A | first loss B |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in r["series"]:
            out.append(f"| {s['series']} | {s['first_step']} | {s['steps']} | {s['checked_steps']} | "
                       f"{_f(s['max_rel_checked'])} | {_f(s['max_rel_all'])} | {_f(s['first_step_over_tol'])} | "
                       f"{_f(s.get('first_rel'))} | "
                       f"{_f(s['first_loss_a'], '.6g')} | {_f(s['first_loss_b'], '.6g')} |")
        out.append("")
    a, b = r.get("run_A"), r.get("run_B")
    if a and b:
        out += [f"Run A: {a['device']}, {a['threads']} threads, {a['wall_s']:.1f} s; run B: {b['device']}, "
                f"{b['threads']} threads, {b['wall_s']:.1f} s.", "",
                "| epoch | phase | train loss A | train loss B | test acc A | test acc B |",
                "|---:|---|---:|---:|---:|---:|"]
        for ea, eb in zip(a["epochs"], b["epochs"]):
            out.append(f"| {ea['epoch']} | {ea['phase']} | {_f(ea['train_loss'], '.6g')} | "
                       f"{_f(eb['train_loss'], '.6g')} | {_f(ea['test_acc'], '.4f')} | {_f(eb['test_acc'], '.4f')} |")
        out.append("")
    return out


def _md_stages(r: dict[str, Any]) -> list[str]:
    if not r.get("rows"):
        return []
    out = ["| model | K | cuts | serial step ms | stage ms | max stage ms | step speed-up bound |",
           "|---|---:|---|---:|---|---:|---:|"]
    for x in r["rows"]:
        out.append(f"| {x['model']} | {x['K']} | {x['cuts']} | {x['serial_step_ms']:.2f} | "
                   f"{' / '.join(f'{t:.2f}' for t in x['stage_ms'])} | {x['max_stage_ms']:.2f} | "
                   f"{x['step_speedup_bound']:.2f}x |")
    return out + [""]


def _md_memprec(r: dict[str, Any]) -> list[str]:
    if not r.get("epoch_s"):
        return []
    out = [f"One parallel epoch, {r['model']}, K = 2, {r['images']} images, batch {r['batch']} (medians):", "",
           "| stores / autocast | epoch s |", "|---|---:|"]
    out += [f"| {k} | {v:.3f} |" for k, v in r["epoch_s"].items()]
    out += ["", f"Store rows copied host->device synchronously: {r['store_copy_s']:.3f} s per epoch; share of "
            f"that traffic hidden by the prefetch: fp32 {_f(r.get('hidden_share_off'), '.2f')}, bf16 "
            f"{_f(r.get('hidden_share_bf16'), '.2f')}; bf16 autocast speed-up {r['bf16_speedup']:.2f}x.", ""]
    return out


_MD = {"info": _md_info, "ops": _md_ops, "syncdebug": _md_syncdebug, "match": _md_match, "stages": _md_stages,
       "memprec": _md_memprec}


# ----------------------------------------------------------------------------------- execution
def _child_argv(args: argparse.Namespace, name: str, out: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--rounds", str(args.rounds),
            "--min-ms", str(args.min_ms), "--copy-mib", str(args.copy_mib), "--models", args.models,
            "--stages", args.stages, "--syncdebug-steps", str(args.syncdebug_steps),
            "--match-subset", str(args.match_subset), "--match-batch", str(args.match_batch),
            "--match-schedule", args.match_schedule, "--match-steps", str(args.match_steps),
            "--match-tol", str(args.match_tol), "--match-threads", args.match_threads, "--child", name, "--child-out", out]
    if args.tiny:
        argv.append("--tiny")
    if args.inject_failure:
        argv += ["--inject-failure", args.inject_failure]
    return argv


_current: dict[str, Any] = {}


def run_isolated(args: argparse.Namespace, name: str, limit_s: float) -> dict[str, Any]:
    """The section in a child process, killed after ``limit_s``; its output is echoed as it comes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "section.json")
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.tiny and args.device == "cpu":
            # a shared CI machine: spinning OpenMP threads wait for preempted ones (10x slower)
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        proc = subprocess.Popen(_child_argv(args, name, path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, cwd=ROOT, env=env)
        _current["proc"] = proc
        tail: collections.deque[str] = collections.deque(maxlen=40)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line)
                sys.stdout.write(line)
                sys.stdout.flush()
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, limit_s))
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            timed_out = True
        finally:
            _current.pop("proc", None)
        reader.join(timeout=5)
        seconds = time.perf_counter() - t0
        res = None
        if os.path.exists(path):
            try:
                with open(path) as f:
                    res = json.load(f)
            except ValueError:
                res = None
    if timed_out:
        res = res or {"results": {}}
        res.update(status="timeout", error=f"killed after its limit of {limit_s:.0f} s", seconds=seconds)
    elif res is None:
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        res = {"status": "failed", "results": {}, "seconds": seconds,
               "error": f"the section's process died ({how}) before writing its result"}
    if res["status"] not in OK_STATUSES and not res["status"].startswith("skipped"):
        res["output_tail"] = "".join(tail)[-4000:]
    return res


def run_child(args: argparse.Namespace, device: torch.device) -> int:
    name = args.child
    fn = SECTION_FNS[name]

    if args.tiny and device.type == "cpu" and name in ("ops", "stages"):
        torch.set_num_threads(1)   # a harness check on a shared CI machine: no oversubscription
    def body(res: dict[str, Any]) -> str:
        if args.inject_failure == name:
            raise RuntimeError(f"injected failure of section {name} (--inject-failure)")
        return fn(res, args, device)
    out = run_section(name, body)
    if args.child_out:
        with open(args.child_out, "w") as f:
            json.dump(_finite(out), f)
    return 0


def write_outputs(doc: dict[str, Any], args: argparse.Namespace) -> None:
    doc = _finite(doc)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, args.out)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        tmp = args.md + ".tmp"
        with open(tmp, "w") as f:
            f.write(markdown(doc))
        os.replace(tmp, args.md)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and runs (a harness check, CI)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--out", help="write the results as JSON (rewritten after every section)")
    p.add_argument("--md", help="write the results as markdown (rewritten after every section)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of all sections")
    p.add_argument("--in-process", action="store_true", help="run the sections in this process (no limits)")
    p.add_argument("--rounds", type=int, default=10, help="timing rounds of the ops and stages sections")
    p.add_argument("--min-ms", type=float, default=10.0, help="time per timed sample (calls repeated)")
    p.add_argument("--copy-mib", type=int, default=256)
    p.add_argument("--models", default="resnet56,wrn28_10", help="models of the stages section")
    p.add_argument("--stages", default="2,4", help="K values of the stages section")
    p.add_argument("--syncdebug-steps", type=int, default=4)
    p.add_argument("--match-subset", type=int, default=6400)
    p.add_argument("--match-batch", type=int, default=128)
    p.add_argument("--match-schedule", default="serial:1,parallel:2,serial:1")
    p.add_argument("--match-steps", type=int, default=0,
                   help="steps judged against the tolerance (0: the first two epochs, i.e. the first serial "
                        "epoch and the first parallel epoch)")
    p.add_argument("--match-tol", type=float, default=MATCH_TOL,
                   help=f"per-step relative loss tolerance (--tiny: {MATCH_TOL_TINY:g})")
    p.add_argument("--match-threads", default="1,2", help="--device cpu: the thread counts of the two runs")
    p.add_argument("--print-slug", action="store_true", help="print the card's slug (h200) and exit")
    p.add_argument("--inject-failure", default=None, help=argparse.SUPPRESS)   # tests: make a section raise
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return p, p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    if args.print_slug:
        ok = args.device != "cpu" and torch.cuda.is_available()
        print(card_slug(torch.cuda.get_device_name(0) if ok else None))
        return 0
    device = torch.device(args.device)
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device {args.device!r}: cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device (use --device cpu --tiny for a harness check)")
    if args.child:
        if args.child not in SECTION_FNS:
            p.error(f"unknown section {args.child!r}")
        return run_child(args, device)
    sections = [s for s in args.only.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; valid: {', '.join(SECTIONS)}")
    command = "python bench/gpu_check.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    doc: dict[str, Any] = {"device": {"device": str(device), "name": _device_name(device)}, "versions": _versions(),
                           "command": command.strip(), "tiny": args.tiny,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
    print(f"GPU check: {doc['device']['name']}; torch {doc['versions']['torch']}, triton {doc['versions']['triton']}, "
          f"CUDA {doc['versions']['cuda']}; sections {', '.join(s for s in RUN_ORDER if s in sections)}", flush=True)
    t_start = time.perf_counter()

    def on_term(signum, frame):   # the outer timeout: keep what is done
        proc = _current.get("proc")
        if proc is not None:
            proc.kill()
        raise _Terminated()
    old = signal.signal(signal.SIGTERM, on_term)
    rc = 0
    try:
        for name in [s for s in RUN_ORDER if s in sections]:
            left = args.budget_s - (time.perf_counter() - t_start)
            # the tiny CPU mode checks the harness, not speed: a slow or shared CPU gets twice the limits
            limit = min(LIMITS_S[name] * (2 if args.tiny else 1), left)
            if left < 5:
                doc["sections"][name] = {"status": "skipped: time budget", "results": {}, "seconds": 0.0}
                continue
            doc["sections"][name] = {"status": "running", "results": {}}
            try:
                if args.in_process:
                    def body(res, name=name):
                        if args.inject_failure == name:
                            raise RuntimeError(f"injected failure of section {name} (--inject-failure)")
                        return SECTION_FNS[name](res, args, device)
                    doc["sections"][name] = run_section(name, body)
                else:
                    doc["sections"][name] = run_isolated(args, name, limit)
            except _Terminated:
                doc["sections"][name] = {"status": "killed", "results": {},
                                         "error": "SIGTERM (the outer timeout) while this section ran"}
                rc = 124
                break
            sec = doc["sections"][name]
            if name == "info" and sec.get("results", {}).get("name"):   # the child saw the device
                r = sec["results"]
                doc["device"].update({k: r[k] for k in ("name", "memory_gib", "sm_count", "capability") if k in r})
                doc["versions"].update(r.get("versions") or {})
            doc["seconds"] = time.perf_counter() - t_start
            write_outputs(doc, args)
    finally:
        signal.signal(signal.SIGTERM, old)
        doc["seconds"] = time.perf_counter() - t_start
        for name in sections:
            doc["sections"].setdefault(name, {"status": "not run", "results": {}})
        write_outputs(doc, args)
    print("summary: " + ", ".join(f"{n} {doc['sections'][n]['status']}" for n in SECTIONS if n in doc["sections"])
          + f" ({doc['seconds']:.0f} s)", flush=True)
    for path in (args.out, args.md):
        if path:
            print(f"wrote {path}", flush=True)
    if rc:
        return rc
    statuses = [s["status"] for s in doc["sections"].values()]
    return 0 if all(s in OK_STATUSES or s.startswith("skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())

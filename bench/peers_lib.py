"""Helpers of bench/bench_peers.py: the peers' runners (DDP, torch.distributed.pipelining), byte
counters and the byte formulas from shapes, link specs and the network-namespace link emulation,
and the table/plot writers. Nothing here starts processes on import.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

#: every method, in table order
METHODS = ("serial1", "serial2", "ddp", "gpipe", "1f1b", "sph", "sph-run")
PEERS = ("serial1", "serial2", "ddp", "gpipe", "1f1b")     # the "best peer" is the fastest of these
PIPELINES = ("gpipe", "1f1b")
EPOCH_MODELS = ("resnet20", "resnet56", "wrn16_4")
BYTES_MODELS = ("wrn28_10", "resnet110")
ELEM = 4   # fp32 bytes per element on the wire


class UsageError(Exception):
    """Bad input: reported as one line ``bench_peers: error: ...``, exit status 2."""


class LinkSkip(Exception):
    """This link cannot be emulated here (no namespaces, no tc, no qdisc): skip it with the reason."""


# ------------------------------------------------------------------------------------ parsing
def parse_list(text: str, allowed: Iterable[str], what: str) -> list[str]:
    allowed = list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"no {what} given")
    for t in items:
        if t not in allowed:
            raise UsageError(f"unknown {what} {t!r}; known: {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_ints(text: str, what: str, lo: int = 1) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not out or any(v < lo for v in out):
        raise UsageError(f"{what} must be integers >= {lo}, got {text!r}")
    return list(dict.fromkeys(out))


_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)$", re.I)
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$", re.I)
_RATE_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}   # tc(8): SI, bps = bytes/s


@dataclass(frozen=True)
class Link:
    """``unlimited`` (plain loopback), ``RATE`` (tbf on the namespace's loopback) or
    ``RATE@DELAY`` (netem rate + one-way delay)."""

    spec: str
    rate: str | None = None          # as tc reads it, e.g. "200mbit"
    bits_per_s: float | None = None
    delay: str | None = None         # e.g. "1ms"

    @property
    def unlimited(self) -> bool:
        return self.rate is None


def parse_link(spec: str) -> Link:
    s = spec.strip()
    if s.lower() in ("unlimited", "lo", "none"):
        return Link("unlimited")
    rate, _, delay = s.partition("@")
    m = _RATE.match(rate)
    if not m:
        raise UsageError(f"unknown link {spec!r}: expected 'unlimited', a rate like 200mbit / 50mbit / 10mbps "
                         "(tc units), or RATE@DELAY like 50mbit@1ms")
    if delay and not _TIME.match(delay):
        raise UsageError(f"unknown link {spec!r}: the delay after '@' must look like 1ms, 500us or 0.1s")
    bits = float(m.group(1)) * _RATE_BITS[m.group(2).lower()]
    return Link(s, rate=rate.lower(), bits_per_s=bits, delay=delay.lower() or None)


def parse_links(text: str) -> list[Link]:
    links = [parse_link(t) for t in text.split(",") if t.strip()]
    if not links:
        raise UsageError("no link given")
    return list(dict.fromkeys(links))


# ------------------------------------------------------------------------------------ link emulation
def qdisc_command(link: Link) -> list[str]:
    """The tc command that shapes the namespace's loopback for ``link``."""
    assert link.rate is not None
    if link.delay:
        return ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "rate", link.rate, "delay", link.delay,
                "limit", "100000"]
    burst = max(3000, int(link.bits_per_s / 8 / 100))        # 10 ms at the rate, >= 2 MTU-size packets
    return ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", link.rate, "burst", str(burst),
            "latency", "400ms"]


def unshare_prefix() -> list[str]:
    """``unshare -n`` as root, ``unshare -rn`` (a user namespace mapping us to root) otherwise."""
    return ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]


def namespace_tools() -> str | None:
    """None when unshare, ip and tc exist; otherwise why a rate-limited link cannot run."""
    missing = [t for t in ("unshare", "ip", "tc") if shutil.which(t) is None]
    if missing:
        hint = " (apt-get install iproute2)" if ("tc" in missing or "ip" in missing) else " (util-linux)"
        return f"{', '.join(missing)} not found{hint}"
    return None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[0] if lines else "(no message)"


def setup_namespace_link(link: Link) -> None:
    """Inside a fresh network namespace: loopback up, MTU 1500, the qdisc of ``link``.
    LinkSkip when the namespace does not allow it, UsageError when the kernel refuses the rate."""
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "lo", "mtu", "1500"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise LinkSkip(f"`{' '.join(cmd)}` failed in the private namespace: {_first_line(r.stderr)}")
    cmd = qdisc_command(link)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        err = " ".join(r.stderr.split())
        kind = cmd[6]
        if "not permitted" in err.lower() or "unknown" in err.lower() and "qdisc" in err.lower():
            raise LinkSkip(f"link {link.spec}: `{' '.join(cmd)}` failed: {_first_line(r.stderr)}"
                           + (f" (the kernel has no sch_{kind} module)" if "unknown" in err.lower() else ""))
        raise UsageError(f"link {link.spec}: the kernel refuses `{' '.join(cmd)}`: {_first_line(r.stderr)}")


def probe_link(link: Link, timeout_s: float = 30.0) -> None:
    """Check, in a throw-away namespace, that ``link`` can be emulated: LinkSkip / UsageError."""
    why = namespace_tools()
    if why:
        raise LinkSkip(f"link {link.spec}: {why}")
    code = ("import sys; sys.path.insert(0, %r); import peers_lib as P\n"
            "try:\n P.setup_namespace_link(P.parse_link(%r))\n"
            "except P.LinkSkip as e:\n print('SKIP', e); sys.exit(3)\n"
            "except P.UsageError as e:\n print('ERROR', e); sys.exit(2)\n") % (os.path.dirname(os.path.abspath(__file__)),
                                                                                 link.spec)
    try:
        r = subprocess.run(unshare_prefix() + [sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise LinkSkip(f"link {link.spec}: setting up the namespace took more than {timeout_s:g}s") from None
    out = r.stdout.strip()
    if r.returncode == 0:
        return
    if r.returncode == 2 and out.startswith("ERROR"):
        raise UsageError(out[6:])
    if r.returncode == 3 and out.startswith("SKIP"):
        raise LinkSkip(out[5:])
    raise LinkSkip(f"link {link.spec}: cannot create a private network namespace "
                   f"(`{' '.join(unshare_prefix())}`): {_first_line(r.stderr or out)}")


# ------------------------------------------------------------------------------------ byte formulas
def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def formula_bytes(method: str, *, params: int, cut_shape: tuple[int, int, int], batch: int, k: int = 2,
                  m: int | None = None, s: int | None = None) -> dict[str, float]:
    """Bytes on the wire per optimisation step from shapes only (one cut, K = k ranks), summed over
    the ranks (``total``), the most any one rank sends (``per_rank``), and the size of one message.

    * DDP: a ring all-reduce of every gradient; each rank sends 2(K-1)/K x param bytes.
    * gpipe / 1f1b: the activation at the cut forward and its gradient backward, per micro-batch
      of batch/m images: 2 x batch x C x H x W x 4 per step (m messages each way).
    * sph: the coarse a_k and g_k messages: 2 x batch x C x H/s x W/s x 4 per step per cut.
    """
    c, h, w = cut_shape
    if method in ("serial1", "serial2"):
        return {"total": 0.0, "per_rank": 0.0, "message": 0.0}
    if method == "ddp":
        per_rank = 2 * (k - 1) / k * params
        return {"total": k * per_rank, "per_rank": per_rank, "message": float(params)}
    if method in PIPELINES:
        m = m or 1
        one = batch / m * c * h * w * ELEM
        return {"total": 2 * m * one * (k - 1), "per_rank": m * one, "message": one}
    if method in ("sph", "sph-run"):
        s = s or 1
        one = batch * c * (h // s) * (w // s) * ELEM
        return {"total": 2 * one * (k - 1), "per_rank": one, "message": one}
    raise UsageError(f"unknown method {method!r}")


def model_shapes(name: str, cuts: list[int] | None = None, input_shape: tuple[int, int, int] = (3, 32, 32),
                 num_classes: int = 10) -> dict[str, Any]:
    """Parameter bytes, the K = 2 cut (FLOPs-balanced unless given) and its activation shape."""
    from layerpar_fast.models import available_models, build_model, cut_points
    from layerpar_fast.stages import balance_by_flops

    if name not in available_models():
        raise UsageError(f"unknown model {name!r}; known: {', '.join(available_models())}")
    model = build_model(name, num_classes=num_classes, in_channels=input_shape[0], image_size=input_shape[-1])
    cut = list(cuts) if cuts else balance_by_flops(model, 2, input_shape)
    shapes = {p.index: p.shape for p in cut_points(model, input_shape)}
    if cut[0] not in shapes:
        raise UsageError(f"cut {cut[0]} is out of range for {name} ({len(model)} blocks)")
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "param_bytes": param_bytes(model),
            "cut": cut, "cut_shape": tuple(shapes[cut[0]])}


def bytes_table(models: list[str], batch: int, ms: list[int], ss: list[int], k: int = 2,
                cuts: list[int] | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        info = model_shapes(name, cuts)
        for method in ("ddp", "gpipe", "1f1b", "sph"):
            for m in (ms if method in PIPELINES else [None]):
                for s in (ss if method == "sph" else [None]):
                    f = formula_bytes(method, params=info["param_bytes"], cut_shape=info["cut_shape"], batch=batch,
                                      k=k, m=m, s=s)
                    rows.append({"model": name, "method": method, "m": m, "s": s, "cut": info["cut"],
                                 "cut_shape": list(info["cut_shape"]), "param_bytes": info["param_bytes"],
                                 "bytes_per_step": f["total"], "bytes_per_step_per_rank": f["per_rank"],
                                 "message_bytes": f["message"]})
    return rows


def bytes_markdown(rows: list[dict[str, Any]], batch: int, k: int = 2) -> str:
    lines = [f"# Bytes on the wire per step from shapes (K = {k}, batch {batch}, fp32, one cut)", "",
             "DDP: ring all-reduce of every gradient, 2(K-1)/K x param bytes sent per rank; gpipe/1f1b: the "
             "cut's activation forward + its gradient backward, batch/m images per message; SPH: coarse a_k and "
             "g_k, 2 x batch x C x H/s x W/s x 4 per step per cut. 'total' = summed over the ranks.", "",
             "| model | params (MiB) | cut (C,H,W) | method | m | s | message (KiB) | per rank (MiB/step) | "
             "total (MiB/step) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['param_bytes'] / 2**20:.2f} | {r['cut']} {tuple(r['cut_shape'])} | "
                     f"{r['method']} | {r['m'] or ''} | {r['s'] or ''} | {r['message_bytes'] / 1024:.1f} | "
                     f"{r['bytes_per_step_per_rank'] / 2**20:.3f} | {r['bytes_per_step'] / 2**20:.3f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ byte counters
class DDPByteCounter:
    """A DDP communication hook that counts the bytes handed to each all-reduce, then runs the
    default all-reduce (``ddp.register_comm_hook(counter, DDPByteCounter.hook)``)."""

    def __init__(self) -> None:
        self.payload = 0       # bytes all-reduced by this rank
        self.calls = 0

    @staticmethod
    def hook(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        buf = bucket.buffer()
        state.payload += buf.numel() * buf.element_size()
        state.calls += 1
        return default_hooks.allreduce_hook(None, bucket)

    def wire_bytes(self, world: int) -> float:
        """What a ring all-reduce of the counted payload sends from this rank."""
        return 2 * (world - 1) / world * self.payload


class PipeByteCounter:
    """Counts the bytes of every isend the pipelining schedules post (they all go through
    ``torch.distributed.pipelining.schedules._batch_p2p``), while active."""

    def __init__(self) -> None:
        self.sent = 0
        self.messages = 0

    @contextlib.contextmanager
    def active(self) -> Iterator["PipeByteCounter"]:
        import torch.distributed as dist
        import torch.distributed.pipelining.schedules as sch
        orig = sch._batch_p2p

        def counting(p2p_ops: list[Any], *a: Any, **kw: Any) -> Any:
            for op in p2p_ops:
                if op.op is dist.isend or getattr(op.op, "__name__", "") == "isend":
                    self.sent += op.tensor.numel() * op.tensor.element_size()
                    self.messages += 1
            return orig(p2p_ops, *a, **kw)

        sch._batch_p2p = counting
        try:
            yield self
        finally:
            sch._batch_p2p = orig


# ------------------------------------------------------------------------------------ runners
Batch = tuple[Any, torch.Tensor]     # (x or None on ranks that need no input, y)


def ddp_epoch(model: nn.Module, optimizers: list[torch.optim.Optimizer], batches: Iterable[Batch], *,
              rank: int, world: int, counter: DDPByteCounter | None = None,
              lr_fn: Callable[[int], float] | None = None, global_bn: bool = False) -> dict[str, Any]:
    """One data-parallel epoch: every rank gets the whole global batch and takes its contiguous
    share (as layerpar_fast's DDP serial epoch does); gradients are those of the global mean loss.
    ``global_bn``: BatchNorm over the global batch (layerpar_fast's serial epochs by default,
    ``--serial-bn global``); its all-reduced payload is returned as ``bn_payload``."""
    import contextlib
    import torch.distributed as dist
    from layerpar_fast.globalbn import global_batch_norm_on

    bn_payload = [0]

    def reduce(t: torch.Tensor) -> torch.Tensor:
        bn_payload[0] += t.numel() * t.element_size()
        dist.all_reduce(t)
        return t

    with global_batch_norm_on(model, reduce) if global_bn else contextlib.nullcontext():
        r = _ddp_steps(model, optimizers, batches, rank=rank, world=world, counter=counter, lr_fn=lr_fn)
    r["bn_payload"] = bn_payload[0]
    return r


def _ddp_steps(model: nn.Module, optimizers: list[torch.optim.Optimizer], batches: Iterable[Batch], *,
               rank: int, world: int, counter: DDPByteCounter | None,
               lr_fn: Callable[[int], float] | None) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from layerpar_fast.topology import _no_buffer_sync

    model.train()
    ddp = DDP(model, **_no_buffer_sync(DDP))
    if counter is not None:
        ddp.register_comm_hook(counter, DDPByteCounter.hook)
    losses, images, steps = [], 0, 0
    dist.barrier()
    t0 = time.perf_counter()
    for t, (x, y) in enumerate(batches):
        n = len(y)
        if n >= 2 * world:
            lo, hi = n * rank // world, n * (rank + 1) // world
            x, y = x[lo:hi], y[lo:hi]
            scale = world / n
        else:
            scale = 1.0 / n
        if lr_fn is not None:
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = lr_fn(t)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        out = ddp(x)
        loss_sum = F.cross_entropy(out.float(), y, reduction="sum")
        (loss_sum * scale).backward()
        for opt in optimizers:
            opt.step()
        losses.append(float(loss_sum.detach()) / len(y))
        images += n
        steps += 1
    wall = time.perf_counter() - t0
    del ddp
    return {"wall_s": wall, "steps": steps, "images": images, "losses": losses,
            "bytes_sent": counter.wire_bytes(world) if counter is not None else None,
            "payload": counter.payload if counter is not None else None}


def make_schedule(stage_module: nn.Module, rank: int, world: int, kind: str, m: int,
                  device: torch.device | str = "cpu", *, input_shape: tuple[int, ...]) -> Any:
    """A ``ScheduleGPipe`` / ``Schedule1F1B`` of this rank's stage, cross-entropy on the last.

    ``input_shape`` is the shape of one micro-batch entering this stage (the micro-batch
    dimension first). The stage is built in static mode, with example input and output tensors:
    left to infer the shapes itself, torch.distributed.pipelining runs the stage's forward in
    training mode on an uninitialised ``torch.empty`` input on every stage but the first, and
    the BatchNorm running statistics it updates there can turn into NaN (evaluation then predicts
    one class while training looks healthy). The example output comes from an evaluation-mode
    forward on zeros, which changes no buffer; inputs after the first stage and every output are
    marked as needing a gradient, as the inferred metadata would be."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    dev = torch.device(device)
    # the metadata carries requires_grad: a later stage's input needs a gradient (it is sent back)
    example = torch.zeros(input_shape, device=dev).requires_grad_(rank > 0)
    was_training = stage_module.training
    stage_module.eval()
    with torch.enable_grad():
        out = stage_module(example).detach().requires_grad_(True)
    stage_module.train(was_training)
    stage = PipelineStage(stage_module, rank, world, dev, input_args=example, output_args=out)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[kind]
    return cls(stage, m, loss_fn=lambda out, y: F.cross_entropy(out.float(), y))


def pipeline_epoch(schedule: Any, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], *, rank: int,
                   world: int, counter: PipeByteCounter | None = None,
                   lr_fn: Callable[[int], float] | None = None) -> dict[str, Any]:
    """One epoch of pipelined back-propagation: rank 0 feeds x, the last rank the targets; every
    rank steps its stage's optimizer after each batch (micro-batch gradients averaged)."""
    import torch.distributed as dist

    schedule._stage.submod.train()
    losses, images, steps = [], 0, 0
    ctx = counter.active() if counter is not None else contextlib.nullcontext()
    with ctx:
        dist.barrier()
        t0 = time.perf_counter()
        for t, (x, y) in enumerate(batches):
            if lr_fn is not None:
                for g in optimizer.param_groups:
                    g["lr"] = lr_fn(t)
            optimizer.zero_grad(set_to_none=True)
            if rank == 0:
                schedule.step(x)
            elif rank == world - 1:
                mb: list[torch.Tensor] = []
                schedule.step(target=y, losses=mb)
                losses.append(float(torch.stack([v.detach() for v in mb]).mean()))
            else:
                schedule.step()
            optimizer.step()
            images += len(y)
            steps += 1
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "steps": steps, "images": images, "losses": losses,
            "bytes_sent": counter.sent if counter is not None else None,
            "messages": counter.messages if counter is not None else None}


# ------------------------------------------------------------------------------------ self-test ranks
def _tiny_rank(rank: int, world: int, port: int, kind: str, steps: int, out: Any) -> None:
    """One rank of the tiny training check (tests): a small conv net, fixed data, ``steps`` steps."""
    import datetime

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (32,), generator=g)
        x += F.one_hot(y, 4).float().repeat_interleave(2, 1)[:, :3, None, None] * 1.5   # learnable
        data = [(x, y)] * steps
        if kind in ("ddp", "ddp-gbn"):
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            c = DDPByteCounter()
            r = ddp_epoch(net, [opt], data, rank=rank, world=world, counter=c, global_bn=kind == "ddp-gbn")
            r["expected_payload"] = param_bytes(net) * steps
            # 2 BatchNorm layers of 8 channels: forward (2C + 1) + backward 2C float32 numbers per step
            r["expected_bn_payload"] = (steps * 2 * (4 * 8 + 1) * 4) if kind == "ddp-gbn" else 0
        else:
            kind_, m = kind.split(":")
            stage = net[:3] if rank == 0 else net[3:]
            opt = torch.optim.SGD(stage.parameters(), lr=0.1, momentum=0.9)
            sched = make_schedule(stage, rank, world, kind_, int(m), input_shape=(32 // int(m), 3 if rank == 0 else 8, 8, 8))
            c = PipeByteCounter()
            r = pipeline_epoch(sched, opt, data, rank=rank, world=world, counter=c)
            # one BatchNorm update per real micro-batch, none from building the schedule
            r["bn_batches"] = [int(b) for n, b in stage.named_buffers() if n.endswith("num_batches_tracked")]
            r["buffers_finite"] = all(bool(torch.isfinite(b).all()) for b in stage.buffers() if b.is_floating_point())
            r["expected_sent"] = steps * 32 * 8 * 8 * 8 * ELEM     # activation or its gradient at the cut
        out.put((rank, r))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def tiny_train(kind: str, steps: int = 6, timeout_s: float = 90.0) -> dict[int, dict[str, Any]]:
    """Run the tiny check with 2 gloo ranks on 127.0.0.1 (spawned processes, killed on timeout)."""
    import torch.multiprocessing as mp
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_tiny_rank, args=(r, 2, port, kind, steps, q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    res: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(res) < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"tiny {kind} training did not finish within {timeout_s:g}s")
            try:
                rank, r = q.get(timeout=min(left, 1.0))
                res[rank] = r
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a rank of the tiny {kind} run failed: "
                                       f"{[p.exitcode for p in procs]}") from None
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return res


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ tables
def median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def _fmt_bytes(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    return f"{b / 2**20:.2f}"


def markdown_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One table per model: the best m / s of each method on its own row with the others beside."""
    lines = [f"# Against the peers: K = 2 ranks x 1 thread (gloo), batch {meta.get('batch_size', '?')}", ""]
    env = meta.get("env") or {}
    if env:
        lines += [f"Machine: {env.get('processor', '?')}, {env.get('cpu_count', '?')} cores; torch "
                  f"{env.get('torch', '?')}. Load average before / after: {meta.get('load_before', '?')} / "
                  f"{meta.get('load_after', '?')}.", ""]
    lines += [
        f"Workload: {meta.get('dataset', '?')}, {meta.get('subset', '?')} training images, "
        f"{meta.get('repeats', '?')} rounds interleaved (order rotated every round), medians; one launch per "
        "link (a rate-limited link runs in a private network namespace with tbf/netem on its loopback, MTU 1500). "
        "Ratios: per-round serial1 / method and best peer / method (> 1: faster). The best peer is the fastest "
        "of serial1, serial2, ddp and the best gpipe / 1f1b of that link.", "",
        "Notes: gpipe / 1f1b train with BatchNorm statistics of each micro-batch (batch/m images), not of the "
        "batch; they run full batches only (a short last batch is left out and the epoch time scaled to the "
        "whole epoch). sph = the SPH-AL parallel epoch (step loop + drain, slowest rank; no augmentation, "
        "phase entry and the after-epoch broadcast not included); sph-run = the mean epoch of a whole "
        f"{meta.get('sph_run_schedule', 'serial:1,parallel:9,serial:8')} run at s = {meta.get('sph_run_s', '?')}, "
        "composed per round from the measured ddp-gbn epoch (the serial epochs of a 2-rank run: DDP with BatchNorm "
        "over the global batch, --serial-bn global; its statistics' all-reduces are counted in its bytes), the phase "
        "entry and the parallel epochs with their after-epoch broadcast (evaluation not included). Bytes: counted "
        "(DDP: the all-reduce payload from a comm hook x 2(K-1)/K per rank; pipelining: every isend; SPH: the "
        "transport counters), summed over ranks, per step; 'formula' from the shapes alone. Exposed communication: "
        "the time the critical SPH stage was blocked on messages (not measurable for the others: '-').", ""]
    if meta.get("skipped"):
        lines += ["Skipped links: " + "; ".join(meta["skipped"]), ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        cut = next((r.get("cut") for r in rs if r.get("cut") is not None), None)
        lines += [f"## {model} (cut {cut})", "",
                  "| link | method | m / s | epoch (s) | images/s | vs serial1 | vs best peer | MiB/step "
                  "(counted) | MiB/step (formula) | MiB/epoch | exposed comm (s) | other m / s: epoch (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            if not r.get("best", True):
                continue
            others = [o for o in rs if o["link"] == r["link"] and o["method"] == r["method"] and o is not r]
            other_txt = ", ".join(f"{'m' if o['m'] else 's'}={o['m'] or o['s']}: {o['epoch_s']:.2f}" for o in others)
            ms = f"m={r['m']}" if r.get("m") else (f"s={r['s']}" if r.get("s") else "")
            exp = r.get("exposed_comm_s")
            lines.append(
                f"| {r['link']} | {r['method']} | {ms} | {r['epoch_s']:.2f} | {r['images_per_s']:.0f} | "
                f"{r['vs_serial1']:.2f} | {r['vs_best_peer']:.2f} | {_fmt_bytes(r['bytes_per_step'])} | "
                f"{_fmt_bytes(r.get('bytes_per_step_formula'))} | {_fmt_bytes(r.get('bytes_per_epoch'))} | "
                f"{'-' if exp is None else f'{exp:.2f}'} | {other_txt} |")
        lines.append("")
    return "\n".join(lines)


def write_png(rows: list[dict[str, Any]], path: str) -> None:
    """Images/s per method (best m / s), one panel per model, one bar group per link."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = [r for r in rows if r.get("best", True)]
    models = list(dict.fromkeys(r["model"] for r in best))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rs = [r for r in best if r["model"] == model]
        links = list(dict.fromkeys(r["link"] for r in rs))
        methods = list(dict.fromkeys(r["method"] for r in rs))
        width = 0.8 / max(1, len(methods))
        for j, meth in enumerate(methods):
            vals = [next((r["images_per_s"] for r in rs if r["link"] == lk and r["method"] == meth), 0.0)
                    for lk in links]
            ax.bar([i + j * width for i in range(len(links))], vals, width, label=meth)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(links))])
        ax.set_xticklabels(links)
        ax.set_ylabel("images/s")
        ax.set_title(f"{model}, K = 2 x 1 thread")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

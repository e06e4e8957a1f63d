"""One process per stage over torch.distributed (ALGORITHM.md §5-§6).

* :class:`DistTransport`: the :class:`~layerpar_fast.transport.Transport` of one stage worker
  over ``isend``/``irecv`` (gloo for CPU tensors, NCCL for CUDA tensors). Received messages are
  pre-posted ``depth`` steps ahead from the ``expect()`` announcements and completed by one
  background thread per incoming channel, so transfers overlap the worker's computation.
* :class:`DistTrainer`: :class:`~layerpar_fast.trainer.HybridTrainer` in which rank k trains
  stage k during parallel phases and all ranks share the serial phases (data-parallel, or on
  rank 0 with ``serial_on = "one"``). Parameters, buffers and optimizer state are broadcast from
  each stage's owner after every parallel epoch, so every rank holds the whole network for
  evaluation, checkpoints and the serial phase.
* Process-group helpers: :func:`dist_env`, :func:`init_process_group`.

Every wait is bounded by ``cfg.timeout_s`` (the process group's timeout too); a lost peer or a
timeout raises :class:`~layerpar_fast.transport.TransportError`.
"""
from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import devsync
from .config import Config, ConfigError
from .data import Dataset, load_dataset
from .models import build_model
from .staging import as_block_sequence, parse_cuts
from .trainer import HybridTrainer, _bar, _bar_close, _bar_update
from .transport import TAGS, Transport, TransportError
from .worker import StageWorker, WorkerSettings

#: wire tag of each message kind (distinct per channel kind; FIFO per (src, dst, tag))
TAG_IDS = {"in": 1, "g": 2}
_KEY_PREFIX = "layerpar/"


# ------------------------------------------------------------------------------------ environment
@dataclass(frozen=True)
class DistEnv:
    """The torchrun-style variables of this process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def dist_env() -> DistEnv | None:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE from the environment, or None when unset."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers, got "
                          f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
                          f"{os.environ.get('LOCAL_RANK')!r}, {os.environ.get('LOCAL_WORLD_SIZE')!r}") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return DistEnv(rank, world, local, local_world)


def backend_for_this_machine() -> str:
    """NCCL when CUDA is usable, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_process_group(timeout_s: float, backend: str | None = None) -> None:
    """Join the process group described by the environment (``env://``), with ``timeout_s`` as
    the timeout of every collective; a no-op when already initialised."""
    if dist.is_initialized():
        return
    env = dist_env()
    if env is None:
        raise ConfigError("a distributed run needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT "
                          "(set by torchrun or by `layerpar train --stages K`)")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"{var} is not set; run under torchrun or set it with RANK and WORLD_SIZE")
    backend = backend or backend_for_this_machine()
    kw: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        kw["device_id"] = torch.device("cuda", env.local_rank)   # eager communicator creation
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)


# ------------------------------------------------------------------------------------ transport
def _on_stream(stream: Any) -> Any:
    """``torch.cuda.stream(stream)``, or nothing for CPU transports."""
    import contextlib
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class _Inbox:
    """The receiving end of channel ``(src, tag)``: a thread posts irecvs for the announced steps,
    at most ``depth`` ahead of the oldest uncompleted one, and completes them in step order."""

    def __init__(self, tp: "DistTransport", src: int, tag: str) -> None:
        self.tp, self.src, self.tag = tp, src, tag
        self.cv = threading.Condition()
        self.todo: deque[tuple[int, tuple[int, ...], torch.dtype]] = deque()
        self.ready: deque[tuple[int, torch.Tensor]] = deque()
        self.inflight = 0
        self.announced = -1          # last step announced this epoch
        self.delivered = -1          # last step handed to the worker
        self.posted_upto = -1        # last step whose irecv was posted (this epoch)
        self.completed_upto = -1     # last step whose irecv completed (this epoch)
        self.error: BaseException | None = None
        self.closing = False
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"layerpar-recv-{tag}-from-{src}")
        self.thread.start()

    def announce(self, steps: list[tuple[int, tuple[int, ...], torch.dtype]]) -> None:
        with self.cv:
            if self.todo or self.ready or self.inflight:
                raise TransportError(
                    f"rank {self.tp.rank}: {len(self.todo) + len(self.ready) + self.inflight} {self.tag!r} "
                    f"messages from rank {self.src} of the previous epoch were never consumed")
            self.todo.extend(steps)
            self.inflight = len(steps)
            self.announced = steps[-1][0] if steps else -1
            self.delivered = self.posted_upto = self.completed_upto = -1
            self.cv.notify_all()

    def _run(self) -> None:
        tp = self.tp
        posted: deque[tuple[int, torch.Tensor, Any]] = deque()
        timeout = datetime.timedelta(seconds=tp.timeout_s)
        stream = None
        try:
            if tp.device.type == "cuda":
                torch.cuda.set_device(tp.device)
                stream = torch.cuda.Stream(tp.device)   # this channel's receives, off the compute stream
            while True:
                with self.cv:
                    while not self.closing and not self.todo and not posted:
                        self.cv.wait()
                    if self.closing and not posted:
                        return
                    take = []
                    while self.todo and len(posted) + len(take) < tp.depth:
                        take.append(self.todo.popleft())
                for step, shape, dtype in take:
                    with _on_stream(stream):
                        buf = torch.empty(shape, dtype=dtype, device=tp.device)
                        work = dist.irecv(buf, self.src, group=tp.group_for(self.tag), tag=TAG_IDS[self.tag])
                    posted.append((step, buf, work))
                    with self.cv:
                        self.posted_upto = step
                step, buf, work = posted.popleft()
                ev = None
                with _on_stream(stream):
                    work.wait(timeout)   # gloo: the data is here; NCCL: the receive stream waits for it
                    if stream is not None:  # no host wait: the consumer's stream waits on this event
                        ev = torch.cuda.Event()
                        ev.record(stream)
                with self.cv:
                    self.ready.append((step, buf, ev))
                    self.completed_upto = step
                    self.inflight -= 1
                    self.cv.notify_all()
        except BaseException as e:  # delivered to the worker's thread by take()
            with self.cv:
                self.error = e
                self.cv.notify_all()

    def take(self, upto: int | None) -> list[tuple[int, torch.Tensor]]:
        """Messages arrived so far; with ``upto``, first block until step ``upto`` has arrived."""
        tp = self.tp
        with self.cv:
            if upto is not None and upto > self.delivered:
                if upto > self.announced:
                    raise TransportError(f"rank {tp.rank} waits for {self.tag!r} step {upto} from rank "
                                         f"{self.src}, but only steps up to {self.announced} were announced")
                deadline = time.monotonic() + tp.timeout_s
                while not (self.ready and self.ready[-1][0] >= upto):
                    if self.error is not None:
                        raise self._failure(upto)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TransportError(
                            f"rank {tp.rank}: no {self.tag!r} message for step {upto} from rank {self.src} "
                            f"within {tp.timeout_s:g}s (--timeout-s); that rank is stuck or failed")
                    self.cv.wait(min(left, 1.0))
            elif self.error is not None and not self.ready:
                raise self._failure(self.delivered + 1)
            got = list(self.ready)
            self.ready.clear()
        out = []
        for step, buf, ev in got:
            if ev is not None:   # CUDA: order the consumer's stream after the receive, no host wait
                cur = torch.cuda.current_stream(buf.device)
                cur.wait_event(ev)
                buf.record_stream(cur)
            out.append((step, buf))
        with self.cv:
            if out:
                self.delivered = out[-1][0]
        return out

    def _failure(self, step: int) -> TransportError:
        e, tp = self.error, self.tp
        text = _first_line(e)
        if "imed out" in text or "timeout" in text.lower():
            return TransportError(f"rank {tp.rank}: no {self.tag!r} message for step {step} from rank "
                                  f"{self.src} within {tp.timeout_s:g}s (--timeout-s); that rank is stuck or failed")
        return TransportError(f"rank {tp.rank}: lost rank {self.src} while receiving {self.tag!r} messages "
                              f"(that rank stopped; its own error is reported separately): {text}")

    def wait_posted(self, what: str) -> None:
        """Block until every irecv posted so far has completed: what a device-wide synchronisation
        does while NCCL receive kernels spin (the LAYERPAR_DEBUG_SYNC emulation, devsync.py)."""
        tp = self.tp
        with self.cv:
            target = self.posted_upto
            deadline = time.monotonic() + tp.timeout_s
            while self.completed_upto < target:
                if self.error is not None:
                    raise self._failure(self.completed_upto + 1)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(
                        f"rank {tp.rank}: no {self.tag!r} message for step {self.completed_upto + 1} from rank "
                        f"{self.src} within {tp.timeout_s:g}s (--timeout-s) while a device synchronisation "
                        f"({what}) waited for the posted receives: on a GPU this order deadlocks")
                self.cv.wait(min(left, 1.0))

    def close(self) -> None:
        with self.cv:
            self.closing = True
            self.cv.notify_all()
        self.thread.join(timeout=1.0)


class DistTransport(Transport):
    """Stage-to-stage messages over torch.distributed point-to-point operations.

    Channels ``(src, dst, tag)`` carry one message kind each ("in" on wire tag 1, "g" on wire tag
    2; with NCCL each kind also gets its own process group, so the two directions never queue
    behind each other); on every channel messages travel in step order. ``depth`` irecvs per
    incoming channel are kept posted ahead (default ``2·W + 2``, enough for any run-ahead the
    window W allows), sends are asynchronous and at most ``max_outstanding`` stay unconfirmed.
    """

    def __init__(self, *, timeout_s: float = 300.0, window: int = 2, depth: int | None = None,
                 device: torch.device | str = "cpu", max_outstanding: int | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistTransport needs an initialised torch.distributed process group")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout_s = float(timeout_s)
        self.depth = depth if depth is not None else 2 * window + 2
        self.max_outstanding = max_outstanding if max_outstanding is not None else 4 * self.depth
        self.device = torch.device(device)
        self._groups: dict[str, Any] = {tag: None for tag in TAGS}
        self._nccl = dist.get_backend() == "nccl"
        if self._nccl:
            for tag in TAGS:  # same creation order on every rank
                self._groups[tag] = dist.new_group(backend="nccl")
            self._warm_up_channels()
        self._inboxes: dict[tuple[int, str], _Inbox] = {}
        self._outbox: deque[tuple[Any, torch.Tensor, str, int]] = deque()
        self._last_sent: dict[tuple[int, str], int] = {}
        self._count_init()
        if devsync.enabled():
            devsync.register(self._wait_posted)

    def _wait_posted(self, what: str) -> None:
        for box in list(self._inboxes.values()):
            box.wait_posted(what)

    def _warm_up_channels(self) -> None:
        """NCCL creates a communicator per group and rank pair lazily, at the first transfer. Do
        that here, eagerly, with one tiny exchange between neighbours on every channel group,
        every rank at once, so that no communicator is ever created on a receive thread while
        another channel's receives spin (a device synchronisation; see devsync.py)."""
        dev = self.device
        for tag in TAGS:
            ops = []
            bufs = []
            for peer in (self.rank - 1, self.rank + 1):
                if 0 <= peer < self.world:
                    out = torch.zeros(1, device=dev)
                    inc = torch.empty(1, device=dev)
                    bufs += [out, inc]
                    ops += [dist.P2POp(dist.isend, out, peer, group=self._groups[tag]),
                            dist.P2POp(dist.irecv, inc, peer, group=self._groups[tag])]
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)   # start-up: nothing is posted yet

    def group_for(self, tag: str) -> Any:
        return self._groups[tag]

    def _check(self, peer: int, tag: str) -> None:
        if tag not in TAG_IDS:
            raise TransportError(f"rank {self.rank}: unknown message tag {tag!r}; valid: {', '.join(TAGS)}")
        if not 0 <= peer < self.world or peer == self.rank:
            raise TransportError(f"rank {self.rank}: bad peer rank {peer} (world {self.world})")

    def expect(self, src: int, tag: str, steps: list[tuple[int, tuple[int, ...], torch.dtype]]) -> None:
        self._check(src, tag)
        box = self._inboxes.get((src, tag))
        if box is None:
            box = self._inboxes[(src, tag)] = _Inbox(self, src, tag)
        box.announce(list(steps))

    def send(self, dst: int, tag: str, step: int, tensor: torch.Tensor) -> None:
        self._check(dst, tag)
        last = self._last_sent.get((dst, tag), -1)
        if step <= last and step != 0:  # step 0 starts a new epoch
            raise TransportError(f"rank {self.rank}: {tag!r} messages to {dst} out of step order "
                                 f"({step} after {last})")
        self._last_sent[(dst, tag)] = step
        t = tensor.detach().contiguous()
        try:
            work = dist.isend(t, dst, group=self._groups[tag], tag=TAG_IDS[tag])
        except RuntimeError as e:
            raise TransportError(f"rank {self.rank}: cannot send {tag!r} step {step} to rank {dst} "
                                 f"(that rank stopped?): {_first_line(e)}") from None
        self._outbox.append((work, t, tag, dst))
        self.bytes_sent[tag] += t.numel() * t.element_size()
        while len(self._outbox) > self.max_outstanding:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        work, _, tag, dst = self._outbox.popleft()
        t0 = time.perf_counter()
        try:
            if self._nccl:   # wait on the host for completion; work.wait() would make the compute stream wait
                deadline = time.monotonic() + self.timeout_s
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"not completed after {self.timeout_s:g}s")
                    time.sleep(1e-4)
            else:
                work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise TransportError(f"rank {self.rank}: a {tag!r} message to rank {dst} did not leave within "
                                 f"{self.timeout_s:g}s or the link broke: {_first_line(e)}") from None
        finally:
            self.wait_s["send"] += time.perf_counter() - t0

    def _box(self, src: int, tag: str) -> _Inbox:
        self._check(src, tag)
        box = self._inboxes.get((src, tag))
        if box is None:
            raise TransportError(f"rank {self.rank}: no {tag!r} messages from rank {src} were announced (expect())")
        return box

    def _count_recv(self, tag: str, msgs: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
        for _, t in msgs:
            self.bytes_recv[tag] += t.numel() * t.element_size()
        return msgs

    def poll(self, src: int, tag: str) -> list[tuple[int, torch.Tensor]]:
        box = self._inboxes.get((src, tag))
        return [] if box is None else self._count_recv(tag, box.take(None))

    def wait(self, src: int, tag: str, step: int) -> list[tuple[int, torch.Tensor]]:
        t0 = time.perf_counter()
        try:
            return self._count_recv(tag, self._box(src, tag).take(step))
        finally:
            self.wait_s[tag] += time.perf_counter() - t0

    def flush(self) -> None:
        while self._outbox:
            self._complete_oldest()

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        devsync.unregister(self._wait_posted)
        for box in self._inboxes.values():
            box.close()
        self._inboxes.clear()


# ------------------------------------------------------------------------------------ collectives
def _broadcast_tensors(tensors: list[torch.Tensor], src: int) -> None:
    """Broadcast ``tensors`` (identical shapes/dtypes on every rank) from ``src``, one flat buffer
    per dtype, and copy the result into them in place."""
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src)
        if dist.get_rank() != src:
            off = 0
            for t in group:
                n = t.numel()
                t.detach().copy_(flat[off:off + n].view_as(t))
                off += n


def _broadcast_object(obj: Any, src: int) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def _all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _all_reduce_cpu(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small CPU tensor over the ranks (through ``device``: NCCL only reduces CUDA tensors)."""
    if dist.get_backend() == "nccl":
        d = t.to(device)
        dist.all_reduce(d)
        return d.cpu()
    dist.all_reduce(t)
    return t


def _all_ranks_mean_(tensors: list[torch.Tensor], weight: float, total: float) -> None:
    """In place: each tensor becomes (Σ over ranks of weight·tensor) / total, summed in float64
    (weight = 1, total = world: the plain mean; weight = this rank's count: a weighted mean)."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    if weight != 1:
        flat *= weight
    dist.all_reduce(flat)
    flat /= total
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


def _optimizer_tensors(opt: torch.optim.Optimizer, params: list[torch.Tensor], src: int) -> list[torch.Tensor]:
    """The state tensors of ``params`` in ``opt`` after making their layout match rank ``src``'s
    (missing entries created, non-tensor entries such as ``step`` counts copied)."""
    layout = None
    if dist.get_rank() == src:
        layout = [{k: (("t", tuple(v.shape), v.dtype) if torch.is_tensor(v) else ("v", v))
                   for k, v in sorted(opt.state.get(p, {}).items())} for p in params]
    layout = _broadcast_object(layout, src)
    out = []
    for p, entries in zip(params, layout):
        st = opt.state[p]
        for k in list(st):
            if k not in entries:
                del st[k]
        for k, spec in entries.items():
            if spec[0] == "v":
                st[k] = spec[1]
                continue
            _, shape, dtype = spec
            cur = st.get(k)
            if not torch.is_tensor(cur) or tuple(cur.shape) != shape or cur.dtype != dtype:
                st[k] = cur = torch.zeros(shape, dtype=dtype, device=p.device)
            out.append(cur)
    return out


def broadcast_module_state(module: nn.Module, opt: torch.optim.Optimizer | None, src: int) -> None:
    """Make ``module``'s parameters and buffers and ``opt``'s state for them equal to rank ``src``'s."""
    tensors = [t for t in module.state_dict(keep_vars=True).values()]
    if opt is not None:
        own = {id(p) for p in module.parameters()}
        params = [p for g in opt.param_groups for p in g["params"] if id(p) in own]
        tensors += _optimizer_tensors(opt, params, src)
    with torch.no_grad():
        _broadcast_tensors(tensors, src)


def _no_buffer_sync(ddp_class: type) -> dict[str, bool]:
    """DDP keyword that keeps BatchNorm buffers rank-local during forward (the name changed in torch 2.13)."""
    params = inspect.signature(ddp_class.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


# ------------------------------------------------------------------------------------ waiting on rank 0
class _Heartbeat:
    """While rank 0 works alone, a thread bumps a counter in the process group's store every
    second; the other ranks wait for a done flag and give up when the counter stops moving."""

    def __init__(self, key: str, period: float = 1.0) -> None:
        self.store = dist.distributed_c10d._get_default_store()
        self.key, self.period = key, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="layerpar-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.store.add(self.key + "/hb", 1)
            except Exception:  # the store is gone: the waiting ranks notice and stop
                return

    def __enter__(self) -> "_Heartbeat":
        self.store.add(self.key + "/hb", 1)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.period)
        if exc_type is None:
            self.store.set(self.key + "/done", "1")


def _wait_for_rank0(key: str, timeout_s: float, what: str) -> None:
    """Block until rank 0 has finished ``what`` (see :class:`_Heartbeat`); raise TransportError
    when rank 0 shows no sign of life for ``timeout_s`` seconds."""
    store = dist.distributed_c10d._get_default_store()
    last, since = None, time.monotonic()
    while True:
        try:
            if store.check([key + "/done"]):
                return
            beat = store.add(key + "/hb", 0)
        except Exception as e:
            raise TransportError(f"rank {dist.get_rank()}: lost rank 0 while it was {what}: {_first_line(e)}") from None
        if beat != last:
            last, since = beat, time.monotonic()
        elif time.monotonic() - since > timeout_s:
            raise TransportError(f"rank {dist.get_rank()}: rank 0 showed no sign of life for {timeout_s:g}s "
                                 f"(--timeout-s) while {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ trainer
def _quiet(msg: str) -> None:
    return None


class _Counters:
    """Counters gathered from another rank, shaped like a transport's for the epoch record."""

    def __init__(self, c: dict[str, dict[str, float]]) -> None:
        self._c = c

    def counters(self) -> dict[str, dict[str, float]]:
        return self._c


class DistTrainer(HybridTrainer):
    """:class:`HybridTrainer` with one process per stage; this process is rank k = stage k.

    Needs an initialised process group with exactly ``cfg.stages`` ranks (:func:`init_process_group`).
    Every rank builds the whole network from the same seed. Parallel phase: rank k trains
    stage k through a :class:`DistTransport`; after each parallel epoch every stage's
    parameters, buffers and optimizer state are broadcast from its owner. Serial phase
    (``cfg.serial_on``): "all" = data-parallel over the K ranks (DistributedDataParallel, each
    rank takes a contiguous share of every global batch, augmented exactly as in one process,
    BatchNorm running statistics averaged at the end of the epoch); "one" = rank 0 trains (with
    the idle ranks' cores too unless ``cfg.threads`` is set) while the others wait, then
    broadcasts everything. BatchNorm recalibration and evaluation are sharded over the ranks.
    Only rank 0 logs, shows progress and writes run files; each rank writes its own auxiliary
    stores into the checkpoint (``aux-rank{k}-epoch{E}.pt``, atomically, referenced by ``checkpoint.pt``).
    """

    def __init__(self, cfg: Config, out_dir: str | None = None, *, data: Dataset | None = None,
                 model: nn.Sequential | list[nn.Module] | None = None, cuts: list[int] | None = None,
                 log: Callable[[str], None] | None = None, resume: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistTrainer needs an initialised process group (layerpar_fast.dist.init_process_group)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != cfg.stages:
            raise ConfigError(f"{self.world} processes for --stages {cfg.stages}: a distributed run needs "
                              "exactly one process per stage")
        if self.world < 2:
            raise ConfigError("a distributed run needs at least 2 processes; use --transport local for one")
        if self.rank != 0:
            log = _quiet
            cfg = dataclasses.replace(cfg, progress=False)
        elif log is None:
            log = lambda msg: print(msg, flush=True)  # noqa: E731
        if data is None:
            data = load_dataset(cfg.dataset, cfg.data_dir, subset=cfg.subset, test_subset=cfg.test_subset,
                                cifar100_labels=cfg.cifar100_labels)
        if cuts is None and cfg.cuts is None and cfg.balance == "time":
            cuts = self._agree_on_cuts(cfg, data, model)
        self._ddp: nn.Module | None = None
        super().__init__(cfg, out_dir, data=data, model=model, cuts=cuts, log=log, resume=resume)
        dev = self.device
        if dev.type == "cuda" and dev.index is None:  # receive threads need the explicit device
            dev = torch.device("cuda", torch.cuda.current_device())
        self.transport = DistTransport(timeout_s=cfg.timeout_s, window=cfg.window, device=dev)

    # ---------------------------------------------------------------------------- hooks of the base
    def _local_workers(self) -> int:
        env = dist_env()
        return env.local_world_size if env is not None else self.world

    def _is_main(self) -> bool:
        return self.rank == 0

    def _owns_stage(self, k: int) -> bool:
        return k == self.rank

    def _agree_on_cuts(self, cfg: Config, data: Dataset, model: Any) -> list[int]:
        """Time-balanced cuts measured on rank 0 (timings differ between processes)."""
        result: Any = None
        if self.rank == 0:
            try:
                if model is None:
                    torch.manual_seed(cfg.seed)
                    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                                        image_size=data.x_train.shape[-1])
                result = parse_cuts(None, as_block_sequence(model), cfg.stages, tuple(data.x_train.shape[1:]),
                                    balance="time")
            except Exception as e:  # every rank raises the same error
                result = e
        result = _broadcast_object(result, 0)
        if isinstance(result, Exception):
            raise result
        return list(result)

    def _share_phase_constants(self, kappas: list[float], betas: list[float], caps: list[float],
                               lr_now: float) -> tuple[list[float], list[float], list[float]]:
        mine = (kappas[self.rank], betas[self.rank], caps[self.rank])
        for k, (kap, beta, cap) in enumerate(_all_gather_object(mine)):
            kappas[k], betas[k], caps[k] = kap, beta, cap
            if k != self.rank and k < self.world - 1 and cap < lr_now:
                self.log(f"warning: stage {k}: lr {lr_now:.4g} x beta {beta:.4g} x kappa {kap:.4g} = "
                         f"{lr_now * beta * kap:.3g} > 1; capping this stage's lr at {cap:.4g} (ALGORITHM.md §3)")
        return kappas, betas, caps

    # ---------------------------------------------------------------------------- parallel phase
    def _workers(self, settings: list[WorkerSettings]) -> list[StageWorker]:
        k, st = self.rank, self.stores
        return [StageWorker(k, self.world, self.stages[k], self.optimizers[k], self.transport, settings[k],
                            self.filt, self.data.x_train, self._parallel_labels(),
                            self._input_fn() if k == 0 else None, st["input"][k], st["target"][k],
                            st["mult"][k], self.device)]

    def _parallel_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        batches = self._parallel_batches(epoch)
        worker = self._workers(self._settings())[0]
        step0 = epoch * self.steps_per_epoch
        self.transport.reset_counters()
        delay = cfg.delay_s if cfg.delay_rank == self.rank else 0.0
        worker.begin_epoch(epoch, batches, lambda t: self.lr_at(step0 + t))
        bar = _bar(len(batches), f"epoch {epoch + 1}/{self.total_epochs} parallel (stage {self.rank})", cfg.progress)
        t0 = time.perf_counter()
        seen, shown = 0, 0.0
        for t in range(len(batches)):
            if delay > 0:
                time.sleep(delay)
            worker.step(t)
            seen += len(batches[t])
            if bar is not None:
                bar.update(1)
                if time.perf_counter() - shown > 1.0:   # monitors read at most once a second
                    s, shown = worker.stats, time.perf_counter()
                    bar.set_postfix(local_loss=f"{s.peek('loss_sum') / s.samples:.4f}",
                                    img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
        stats = worker.end_epoch()
        stats.sync_points = self._take_sync_points()
        wall = time.perf_counter() - t0
        _bar_close(bar)
        gathered = _all_gather_object((stats, self.transport.counters(), wall, getattr(self, "aux_bytes", 0)))
        self.sync_stages()
        rec = self._parallel_record(epoch, [g[0] for g in gathered], [_Counters(g[1]) for g in gathered])
        rec["aux_memory_bytes"] = sum(g[3] for g in gathered)      # every rank's stores
        rec["aux_memory_bytes_per_rank"] = [g[3] for g in gathered]
        walls = [g[2] for g in gathered]
        rec["parallel_wall_s"] = max(walls)
        rec["parallel_wall_per_rank_s"] = walls
        rec["ranks"] = self.world
        return rec

    def sync_stages(self) -> None:
        """Broadcast each stage's parameters, buffers and optimizer state from its owner."""
        for k, stage in enumerate(self.stages):
            broadcast_module_state(stage, self.optimizers[k], src=k)

    def sync_all_from(self, src: int) -> None:
        """Make the whole network and every optimizer equal to rank ``src``'s."""
        for stage, opt in zip(self.stages, self.optimizers):
            broadcast_module_state(stage, opt, src=src)

    def _probe_cosines(self) -> list[float]:
        """The base computes the cosine of the stages this rank owns; gather the others'."""
        mine = super()._probe_cosines()
        if not mine:
            return mine
        every = _all_gather_object(mine[self.rank] if self.rank < len(mine) else None)
        return every[:len(mine)]

    # ---------------------------------------------------------------------------- serial phase
    def _serial_epoch(self, epoch: int) -> dict[str, Any]:
        if self.cfg.serial_on == "one":
            return self._serial_epoch_on_one(epoch)
        return self._serial_epoch_ddp(epoch)

    def _serial_epoch_on_one(self, epoch: int) -> dict[str, Any]:
        key = f"{_KEY_PREFIX}serial/{epoch}"
        rec = None
        if self.rank == 0:
            threads = torch.get_num_threads()
            if self.cfg.threads is None:  # the other ranks of this machine idle: use their cores too
                torch.set_num_threads(max(1, min(os.cpu_count() or 1, threads * self._local_workers())))
            try:
                with _Heartbeat(key):
                    rec = super()._serial_epoch(epoch)
            finally:
                torch.set_num_threads(threads)
        else:
            _wait_for_rank0(key, self.cfg.timeout_s, f"training serial epoch {epoch + 1} alone")
        self.sync_all_from(0)
        return _broadcast_object(rec, 0)

    def _serial_epoch_ddp(self, epoch: int) -> dict[str, Any]:
        from torch.nn.parallel import DistributedDataParallel as DDP
        cfg, k, r = self.cfg, self.world, self.rank
        self.model.train()
        ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                  **_no_buffer_sync(DDP))
        loader = self.train_loader
        batches = loader.batches(epoch)
        bar = _bar(len(batches), f"epoch {epoch + 1}/{self.total_epochs} serial ({k} ranks)", cfg.progress)
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples (this rank's share)
        t_data = t_comp = 0.0
        step0 = epoch * self.steps_per_epoch
        lr = self.lr_at(step0)
        t_prev = time.perf_counter()
        for t, idx in enumerate(batches):
            _, x, y = loader.load(idx, epoch, t)  # the whole global batch, augmented as in one process
            n = len(idx)
            if n >= 2 * k:                      # this rank's contiguous share
                lo, hi = n * r // k, n * (r + 1) // k
                x, y = x[lo:hi], y[lo:hi]
                scale = k / n                    # DDP averages over k ranks: Σ_r scale·Σ_i CE = mean over n
            else:                                # too few samples to share: every rank takes all
                scale = 1.0 / n
            t1 = time.perf_counter()
            t_data += t1 - t_prev
            lr = self.lr_at(step0 + t)
            self._set_lr(lr)
            out = ddp(x)
            loss_sum = F.cross_entropy(out, y, reduction="sum", label_smoothing=cfg.label_smoothing)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            (loss_sum * scale).backward()
            for opt in self.optimizers:
                opt.step()
            if n >= 2 * k or r == 0:
                sums += torch.tensor([float(loss_sum.detach()), float((out.detach().argmax(1) == y).sum()), len(y)],
                                     dtype=torch.float64)
            t_prev = time.perf_counter()
            t_comp += t_prev - t1
            _bar_update(bar, float(sums[0] / max(sums[2], 1)), float(sums[1] / max(sums[2], 1)),
                        int(sums[2]) * k, t_data + t_comp)
        _bar_close(bar)
        del ddp
        sums = _all_reduce_cpu(sums, self.device)
        self._average_bn_stats()
        return {"epoch": epoch + 1, "phase": "serial", "lr": lr, "train_loss": float(sums[0] / sums[2]),
                "train_acc": float(sums[1] / sums[2]), "data_s": t_data, "compute_s": t_comp, "ranks": k}

    def _average_bn_stats(self) -> None:
        """Average BatchNorm running statistics over the ranks (each saw its share of the data)."""
        bufs = [b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for name, b in m.named_buffers(recurse=False) if name in ("running_mean", "running_var")
                and b is not None]
        if not bufs:
            return
        _all_ranks_mean_(bufs, 1.0, self.world)

    # ---------------------------------------------------------------------------- evaluation
    def recalibrate_bn(self, epoch: int) -> None:
        """Sharded over the ranks: rank r averages the statistics of batches r, r+K, ... of the
        recalibration set; the cumulative averages are then combined, weighted by batch counts
        (the same average as one process computes, up to float rounding), K times faster."""
        mods = self._recal_modules()
        if not mods:
            return
        batches = self.plain_loader.batches(epoch)[: self.cfg.bn_recalib_batches]
        mine = batches[self.rank::self.world]
        self._recal_on(mods, mine)
        with torch.no_grad():
            _all_ranks_mean_([t for m in mods for t in (m.running_mean, m.running_var)], len(mine),
                             max(1, len(batches)))
            for m in mods:
                m.num_batches_tracked.fill_(len(batches))

    @torch.no_grad()
    def evaluate(self, ds_forward: bool = False) -> tuple[float, float]:
        """Like :meth:`HybridTrainer.evaluate`, each rank evaluating every K-th test batch."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for i, idx in enumerate(self.test_loader.batches(0)):
            if i % self.world != self.rank:
                continue
            _, x, y = self.test_loader.load(idx)
            out = self.eval_forward(x, ds_forward)
            sums += torch.tensor([float(F.cross_entropy(out, y, reduction="sum")),
                                  float((out.argmax(1) == y).sum()), len(y)], dtype=torch.float64)
        self.model.train()
        sums = _all_reduce_cpu(sums, self.device)
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])

    # ---------------------------------------------------------------------------- checkpoints
    def _aux_path(self, epoch: int, rank: int | None = None) -> str:
        return os.path.join(self.out_dir, f"aux-rank{self.rank if rank is None else rank}-epoch{epoch}.pt")

    def _aux_checkpoint(self) -> dict[str, Any] | None:
        if self.stores is None or self.phase_state is None:
            return None
        return {"phase": self.phase_state.index, "epoch": self.epoch, "world": self.world,
                "files": [os.path.basename(self._aux_path(self.epoch, k)) for k in range(self.world)]}

    def save_checkpoint(self) -> None:
        """Each rank writes its auxiliary stores (atomically, tagged with the epoch); then rank 0
        writes ``checkpoint.pt``, which names them; then stale per-rank files are removed."""
        if self.stores is not None and self.phase_state is not None:
            state = {"epoch": self.epoch, "phase": self.phase_state.index, "rank": self.rank, "world": self.world,
                     "stores": {name: None if lst[self.rank] is None else lst[self.rank].state_dict()
                                for name, lst in self.stores.items()}}
            path = self._aux_path(self.epoch)
            tmp = f"{path}.tmp{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, path)
        dist.barrier()
        if self.rank == 0:
            super().save_checkpoint()
        dist.barrier()
        keep = os.path.basename(self._aux_path(self.epoch)) if self.stores is not None else None
        prefix = f"aux-rank{self.rank}-epoch"
        for name in os.listdir(self.out_dir):
            if name.startswith(prefix) and name != keep and name.endswith(".pt"):
                try:
                    os.remove(os.path.join(self.out_dir, name))
                except OSError:
                    pass

    def _load_checkpoint(self) -> None:
        super()._load_checkpoint()
        aux = self._resumed_aux
        if aux is None:
            return
        k = self.rank
        if "stores" in aux:  # written by a single-process run: every stage's stores in one file
            self._resumed_aux = {"phase": aux["phase"],
                                 "stores": {name: [lst[i] if i == k else None for i in range(len(lst))]
                                            for name, lst in aux["stores"].items()}}
            return
        if aux.get("world") != self.world:
            raise ConfigError(f"--resume {self.out_dir}: the checkpoint was written by {aux.get('world')} ranks, "
                              f"this run has {self.world}")
        path = self._aux_path(aux["epoch"])
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except FileNotFoundError:
            raise ConfigError(f"--resume {self.out_dir}: {os.path.basename(path)} (rank {k}'s auxiliary "
                              "stores) is missing") from None
        if state.get("epoch") != aux["epoch"] or state.get("rank") != k:
            raise ConfigError(f"--resume {self.out_dir}: {os.path.basename(path)} belongs to epoch "
                              f"{state.get('epoch')} rank {state.get('rank')}, expected {aux['epoch']} rank {k}")
        self._resumed_aux = {"phase": aux["phase"],
                             "stores": {name: [st if i == k else None for i in range(self.world)]
                                        for name, st in state["stores"].items()}}

    def close(self) -> None:
        """Stop the transport's receiving threads."""
        self.transport.close()

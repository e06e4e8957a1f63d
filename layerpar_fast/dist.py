"""torch.distributed for the engine: the process-group environment and the stage-to-stage
transport of one process per stage (docs/method.md §5).

* :func:`dist_env`, :func:`init_process_group`, :func:`backend_for_this_machine`.
* :class:`DistTransport`: the :class:`~layerpar_fast.transport.Transport` of one stage worker
  over ``isend``/``irecv`` (gloo for CPU tensors, NCCL for CUDA tensors). Received messages are
  pre-posted ``depth`` steps ahead from the ``expect()`` announcements and completed by one
  background thread per incoming channel, so transfers overlap the worker's computation; on CUDA
  the receives run on a stream of their own and the consumer's stream waits on an event (no host
  synchronisation per message).

The collectives and the one-process-per-stage topology are in :mod:`layerpar_fast.topology`; the
trainer (``DistTrainer`` = :class:`~layerpar_fast.trainer.HybridTrainer` with a
:class:`~layerpar_fast.topology.DistTopology`) in :mod:`layerpar_fast.trainer`.

Every wait is bounded by ``cfg.timeout_s`` (the process group's timeout too); a lost peer or a
timeout raises :class:`~layerpar_fast.transport.TransportError`.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import devsync
from .config import ConfigError
from .transport import TAGS, Transport, TransportError

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


def backend_for_this_machine(device: str = "auto") -> str:
    """NCCL when the run trains on CUDA (``device`` auto with a GPU, or cuda), gloo otherwise
    (``--device cpu`` on a GPU machine keeps every tensor, and so every message, on the CPU)."""
    if device == "cpu":
        return "gloo"
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
                    f"messages from rank {self.tp.base + self.src} of the previous epoch were never consumed")
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
                        work = dist.irecv(buf, tp.base + self.src, group=tp.group_for(self.tag),
                                          tag=TAG_IDS[self.tag])
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
                            f"rank {tp.rank}: no {self.tag!r} message for step {upto} from rank {self.tp.base + self.src} "
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
                                  f"{tp.base + self.src} within {tp.timeout_s:g}s (--timeout-s); that rank is stuck or failed")
        return TransportError(f"rank {tp.rank}: lost rank {self.tp.base + self.src} while receiving {self.tag!r} messages "
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
                        f"{tp.base + self.src} within {tp.timeout_s:g}s (--timeout-s) while a device synchronisation "
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
                 device: torch.device | str = "cpu", max_outstanding: int | None = None,
                 base: int = 0, span: int | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistTransport needs an initialised torch.distributed process group")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # peers are named 0..span-1 (stage indices); peer p is process rank base + p (stage
        # replicas: replica r's stages are ranks r·K .. r·K + K - 1)
        self.base = int(base)
        self.span = self.world - self.base if span is None else int(span)
        self.stage = self.rank - self.base
        if not (0 <= self.stage < self.span and self.base + self.span <= self.world):
            raise ValueError(f"DistTransport: rank {self.rank} is not in ranks [{self.base}, {self.base + self.span})")
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
            for peer in (self.stage - 1, self.stage + 1):
                if 0 <= peer < self.span:
                    out = torch.zeros(1, device=dev)
                    inc = torch.empty(1, device=dev)
                    bufs += [out, inc]
                    ops += [dist.P2POp(dist.isend, out, self.base + peer, group=self._groups[tag]),
                            dist.P2POp(dist.irecv, inc, self.base + peer, group=self._groups[tag])]
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
        if not 0 <= peer < self.span or peer == self.stage:
            raise TransportError(f"rank {self.rank}: bad peer rank {peer} (world {self.span})")

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
            work = dist.isend(t, self.base + dst, group=self._groups[tag], tag=TAG_IDS[tag])
        except RuntimeError as e:
            raise TransportError(f"rank {self.rank}: cannot send {tag!r} step {step} to rank {self.base + dst} "
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
            raise TransportError(f"rank {self.rank}: a {tag!r} message to rank {self.base + dst} did not leave within "
                                 f"{self.timeout_s:g}s or the link broke: {_first_line(e)}") from None
        finally:
            self.wait_s["send"] += time.perf_counter() - t0

    def _box(self, src: int, tag: str) -> _Inbox:
        self._check(src, tag)
        box = self._inboxes.get((src, tag))
        if box is None:
            raise TransportError(f"rank {self.rank}: no {tag!r} messages from rank {self.base + src} were announced (expect())")
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


def __getattr__(name: str) -> Any:
    """``DistTrainer`` lives in trainer.py (one trainer for one process and many); kept importable
    from here for existing callers."""
    if name == "DistTrainer":
        from .trainer import DistTrainer
        return DistTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Who owns what, and the collectives: the one object that makes :class:`HybridTrainer` run in
one process or in many.

A :class:`Topology` answers "which stages does this process train in parallel phases?" and
provides every collective the phases need (gather an object, broadcast, all-ranks mean, send each
stage's state from its owner, wait for rank 0, ...). The trainer is written once against it:

* :class:`LocalTopology`: one process runs every stage (stepped one after another over an
  in-process :class:`~layerpar_fast.transport.LocalHub`); every collective is the identity.
* :class:`DistTopology`: one process per stage over torch.distributed (gloo on CPUs, NCCL on
  GPUs); rank k owns stage k and talks to its neighbours through a
  :class:`~layerpar_fast.dist.DistTransport`.

Both compute the same numbers: the sharded forms (BatchNorm recalibration, evaluation) reduce to
the plain ones for a world of one, bit for bit.
"""
from __future__ import annotations

import inspect
import threading
from abc import ABC, abstractmethod
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .transport import LocalHub, Transport, TransportError

_KEY_PREFIX = "layerpar/"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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


def _weighted_mean_(tensors: list[torch.Tensor], weight: float, total: float, reduce: Any) -> None:
    """In place: each tensor becomes (Σ over ranks of weight·tensor) / total, summed in float64
    (weight = 1, total = world: the plain mean; weight = this rank's count: a weighted mean);
    ``reduce`` sums a tensor over the ranks in place (None: one rank)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    if weight != 1:
        flat *= weight
    if reduce is not None:
        reduce(flat)
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


# ------------------------------------------------------------------------------------ topologies
class Topology(ABC):
    """Which stages this process owns, and the collectives over all processes of the run."""

    rank: int = 0
    world: int = 1
    replicas: int = 1       # R: replicas of every stage (replicas.py)
    replica: int = 0        # which replica this process runs (distributed)
    stage: int = 0          # the stage this process trains in parallel phases (distributed)

    @property
    def simulates_replicas(self) -> bool:
        """Whether this one process computes what R > 1 replicas of every stage compute."""
        return self.replicas > 1 and self.world == 1

    def grad_reduce(self, k: int) -> Any:
        """An in-place sum over the replicas of stage ``k`` (None: nothing to reduce here)."""
        return None

    @property
    def is_main(self) -> bool:
        """Whether this process logs, shows progress and writes the run files."""
        return self.rank == 0

    @abstractmethod
    def owns(self, k: int) -> bool:
        """Whether this process trains stage ``k`` in parallel phases (and holds its stores)."""

    def owned(self, num_stages: int) -> list[int]:
        return [k for k in range(num_stages) if self.owns(k)]

    def local_workers(self) -> int:
        """Processes of this run on this machine (they share its cores)."""
        return 1

    @abstractmethod
    def transports(self, stages: list[int], num_stages: int) -> list[Transport]:
        """A transport per owned stage for one parallel epoch."""

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order."""
        return [obj]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def sum_(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Sum a small CPU tensor over the ranks."""
        return t

    def mean_(self, tensors: list[torch.Tensor], weight: float, total: float) -> None:
        """In place: each tensor becomes (Σ over ranks of weight·tensor) / total, in float64."""
        _weighted_mean_(tensors, weight, total, reduce=None)

    def sync_stages(self, stages: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        """After a parallel epoch: every rank gets each stage's state from its owner."""

    def sync_all_from(self, src: int, stages: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        """Make every stage and optimizer equal to rank ``src``'s."""

    def on_main(self, fn: Any, key: str, timeout_s: float, what: str) -> Any:
        """Run ``fn()`` on rank 0 while the others wait (bounded by rank 0's heartbeat)."""
        return fn()

    def barrier(self) -> None:
        """Synchronise all ranks."""

    def close(self) -> None:
        """Release resources (receive threads)."""


class LocalTopology(Topology):
    """One process holds and trains every stage (and, with ``replicas`` R > 1, computes what R
    replicas of every stage compute: the oracle of a K x R run)."""

    def __init__(self, replicas: int = 1) -> None:
        self.replicas = int(replicas)

    def owns(self, k: int) -> bool:
        return True

    def transports(self, stages: list[int], num_stages: int) -> list[Transport]:
        hub = LocalHub(num_stages)
        return [hub.endpoint(k) for k in stages]


class DistTopology(Topology):
    """One process per stage and replica in an initialised torch.distributed process group:
    rank r·K + k runs replica r of stage k (R = 1: rank k owns stage k); messages travel through
    one :class:`~layerpar_fast.dist.DistTransport` between the replica's own stages, and the R
    replicas of a stage all-reduce over a process group of their own."""

    def __init__(self, num_stages: int, *, timeout_s: float, window: int, device: torch.device,
                 replicas: int = 1) -> None:
        from .config import ConfigError
        from .dist import DistTransport, dist_env
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistTopology needs an initialised process group (layerpar_fast.dist.init_process_group)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.replicas, self.num_stages = int(replicas), num_stages
        if self.world != num_stages * self.replicas:
            raise ConfigError(f"{self.world} processes for --stages {num_stages} x --replicas {self.replicas}: a "
                              f"distributed run needs exactly one process per stage and replica ({num_stages * self.replicas})")
        if self.world < 2:
            raise ConfigError("a distributed run needs at least 2 processes; use --transport local for one")
        self.stage, self.replica = self.rank % num_stages, self.rank // num_stages
        self._stage_groups: list[Any] = []
        if self.replicas > 1:       # every rank creates every group, in the same order
            for k in range(num_stages):
                self._stage_groups.append(dist.new_group([r * num_stages + k for r in range(self.replicas)]))
        env = dist_env()
        self._local = env.local_world_size if env is not None else self.world
        self.timeout_s = timeout_s
        if device.type == "cuda" and device.index is None:  # receive threads need the explicit device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.transport = DistTransport(timeout_s=timeout_s, window=window, device=device,
                                       base=self.replica * num_stages, span=num_stages)

    def owns(self, k: int) -> bool:
        return k == self.stage

    def grad_reduce(self, k: int) -> Any:
        if self.replicas == 1:
            return None
        group = self._stage_groups[k]
        dev = self.device

        def reduce(t: torch.Tensor) -> torch.Tensor:
            if dist.get_backend() == "nccl" and t.device.type != "cuda":
                d = t.to(dev)
                dist.all_reduce(d, group=group)
                t.copy_(d)
            else:
                dist.all_reduce(t, group=group)
            return t

        return reduce

    def local_workers(self) -> int:
        return self._local

    def transports(self, stages: list[int], num_stages: int) -> list[Transport]:
        self.transport.reset_counters()
        return [self.transport for _ in stages]

    def _collective(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run one collective; a backend timeout (a rank slower than --timeout-s, or stopped)
        becomes a TransportError that says so, instead of the backend's own message."""
        try:
            return fn(*args, **kw)
        except RuntimeError as e:
            text = str(e)
            if "timed out" not in text.lower() and "timeout" not in text.lower():
                raise
            raise TransportError(f"rank {self.rank}: no answer from the other ranks within {self.timeout_s:g}s "
                                 f"(--timeout-s) while {what}: {_first_line(e)}") from None

    def gather(self, obj: Any) -> list[Any]:
        return self._collective("gathering a value from every rank", _all_gather_object, obj)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self._collective(f"receiving a value from rank {src}", _broadcast_object, obj, src)

    def sum_(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self._collective("summing a value over the ranks", _all_reduce_cpu, t, device)

    def mean_(self, tensors: list[torch.Tensor], weight: float, total: float) -> None:
        self._collective("averaging state over the ranks", _weighted_mean_, tensors, weight, total,
                         reduce=dist.all_reduce)

    def sync_stages(self, stages: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        for k, stage in enumerate(stages):
            broadcast_module_state(stage, optimizers[k], src=k)

    def sync_all_from(self, src: int, stages: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        for stage, opt in zip(stages, optimizers):
            broadcast_module_state(stage, opt, src=src)

    def on_main(self, fn: Any, key: str, timeout_s: float, what: str) -> Any:
        if self.rank == 0:
            with _Heartbeat(_KEY_PREFIX + key):
                return fn()
        _wait_for_rank0(_KEY_PREFIX + key, timeout_s, what)
        return None

    def barrier(self) -> None:
        self._collective("waiting at a barrier", dist.barrier)

    def close(self) -> None:
        self.transport.close()

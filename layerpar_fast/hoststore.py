"""Auxiliary stores kept in host memory, with prefetch and asynchronous write-back (--aux-device host).

A :class:`HostAuxStore` is a :class:`~layerpar_fast.auxstore.TensorAuxStore` whose (N, C, h, w)
table lives in host memory (pinned when the compute device is a GPU and pinning works) and that
hands the worker rows on the compute device. It computes exactly what a store on the compute
device computes: every op runs the same fused kernel (``ops``) on the gathered rows as a small
table indexed 0..B-1, so host and device stores give bitwise-identical runs.

**Prefetch.** A worker reads rows in the order of its epoch's batches (``StageWorker.batches``),
and tells its stores that order at ``begin_epoch`` (:meth:`AuxStore.plan`). When the rows of
batch t are read, the store starts staging batch t+1 (host gather into a pinned slot of a
:class:`~layerpar_fast.ops.StagingRing` and its host->device copy on the ring's side stream),
so the copy overlaps batch t's computation. A read of rows that are not the expected next batch
(the deferred message updates of earlier batches, the warm-up, probes) is a synchronous read
through a second ring.

**Write-back.** ``scatter_`` casts the rows to the storage dtype on the compute device and
starts their device->host copy into a pinned buffer on a side stream (after the current stream's
work); the host table is updated (``ops.scatter_rows_``) when the copy has finished: at the next
store call that finds it done, before any host read of an overlapping row, when more than
``max_pending_writes`` are queued, and whenever the whole table is looked at (``table``,
``state_dict``). On a CPU compute device the same code runs with ordinary memory and no streams
(the copies are plain copies, every write is "finished").

**Consistency (the invariant).** A read sees every write issued before it, in program order:
(1) before rows are gathered on the host (prefetch or synchronous read), every queued write up
to the last one touching any of those rows is applied to the table; (2) a write issued while a
prefetch is in flight and touching its rows patches it: the same index tensor (the initial fill
writes batch t's input rows right before reading them) replaces the prefetched rows with the
written ones, a partial overlap drops the prefetch (the read becomes synchronous). Within a
training epoch the batches are disjoint (one permutation split into batches; :meth:`plan`
checks it and records ``disjoint``) and a worker writes rows of batch s only after it has read
batch s, so neither (1) nor (2) ever has to wait or drop: the prefetch of batch t+1 cannot race
with the write-back of batch t's rows. ``stats`` counts hits, misses, patched and dropped
prefetches and writes that had to be waited for (tests/test_hoststore.py).

**What a GPU benchmark must decide** (bench/gpu_check.py may add it; CPU runs cannot tell):
(a) whether the ring (C++ multi-threaded gather into a reused pinned slot + side-stream copy)
beats plain torch (``table[idx]`` into a fresh pinned tensor from torch's caching host allocator
+ ``.to(non_blocking=True)`` on a side stream): keep the ring, which is the simplest correct
choice here, unless torch's path is as fast; (b) whether the prefetch hides the host->device
copy: epoch time of ``--aux-device host`` vs ``device`` for ResNet-110, K = 4, s = 1, bf16
and fp32, and the time in ``data_s``; (c) whether the write-back's host-side scatter (run on
the calling thread when a copy has finished) costs more than it hides, and the best
``max_pending_writes``; (d) that no waited event adds a device-wide synchronisation point
(LAYERPAR_DEBUG_SYNC=1 counts, devsync.py): the events waited for are those of the side
streams only.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch

from . import ops
from .auxstore import DTYPES, AuxStore, TensorAuxStore
from .filters import FilterPair


@lru_cache(maxsize=1)
def pinning_available() -> tuple[bool, str]:
    """(whether pinned host memory can be allocated, why not)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is available to this torch build"
    try:
        torch.empty(1, pin_memory=True)
    except RuntimeError as e:   # pragma: no cover - depends on the driver
        return False, f"pinning failed ({e})"
    return True, ""


def batches_disjoint(batches: Sequence[torch.Tensor]) -> bool:
    """Whether no row appears twice in ``batches`` (the prefetch invariant within an epoch)."""
    if not batches:
        return True
    allrows = torch.cat([torch.as_tensor(b).reshape(-1).cpu() for b in batches])
    return int(torch.unique(allrows).numel()) == int(allrows.numel())


def _cpu(idx: torch.Tensor) -> torch.Tensor:
    idx = torch.as_tensor(idx)
    return idx if idx.device.type == "cpu" else idx.cpu()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or bool(torch.isin(a, b).any())


@dataclass
class _Ready:
    """The prefetch in flight: batch ``pos`` of the plan, rows ``idx``; a ring ticket, or rows."""

    pos: int
    idx: torch.Tensor
    ticket: int | None
    rows: torch.Tensor | None = None


class HostAuxStore(TensorAuxStore):
    """A dense table in (pinned) host memory serving rows on ``compute_device``; see the module doc."""

    def __init__(self, num_samples: int, row_shape: tuple[int, ...], dtype: str = "fp32",
                 compute_device: torch.device | str = "cpu", max_pending_writes: int = 4,
                 slots: int = 2) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"aux dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if max_pending_writes < 1:
            raise ValueError(f"max_pending_writes must be >= 1, got {max_pending_writes}")
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype_name = dtype
        self.device = torch.device("cpu")
        self.compute_device = torch.device(compute_device)
        cuda = self.compute_device.type == "cuda"
        self.pinned = cuda and pinning_available()[0]
        self._table = torch.zeros((num_samples, *self.row_shape), dtype=DTYPES[dtype], pin_memory=self.pinned)
        # rings: pinned slots + side-stream copies on a GPU, plain gathers on a CPU device; a GPU
        # without pinned memory stages synchronously (None)
        ring = not cuda or self.pinned
        self._ahead = ops.StagingRing(slots, self.compute_device) if ring else None   # the prefetch
        self._now = ops.StagingRing(slots, self.compute_device) if ring else None     # other reads
        self._side = torch.cuda.Stream(device=self.compute_device) if self.pinned else None
        self.max_pending_writes = int(max_pending_writes)
        self._writes: deque[tuple[torch.Tensor, torch.Tensor, Any]] = deque()
        self._plan: list[torch.Tensor] = []
        self._pos = 0
        self._ready: _Ready | None = None
        self.disjoint = True
        self.stats = {"hits": 0, "misses": 0, "patched": 0, "dropped": 0, "waited_writes": 0}

    # -- the table: every queued write applied ------------------------------------------------
    @property
    def table(self) -> torch.Tensor:  # type: ignore[override]
        self._flush()
        return self._table

    @table.setter
    def table(self, value: torch.Tensor) -> None:
        self._table = value

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self._table.dtype

    @property
    def num_samples(self) -> int:
        return self._table.shape[0]

    # -- prefetch plan ---------------------------------------------------------------------------
    def plan(self, batches: Sequence[torch.Tensor]) -> None:
        """The rows the worker will read next, batch by batch (an epoch's batches); starts
        staging the first one."""
        self._drop()
        self._plan = [_cpu(b) for b in batches]
        self._pos = 0
        self.disjoint = batches_disjoint(self._plan)
        self._prefetch_next()

    def _prefetch_next(self) -> None:
        if self._ready is not None or self._pos >= len(self._plan):
            return
        idx = self._plan[self._pos]
        self._flush(idx)                     # rule (1): the gather sees every earlier write
        if self._ahead is None:              # a GPU without pinned memory: stage synchronously
            rows = ops.gather_rows(self._table, idx).to(self.compute_device)
            self._ready = _Ready(self._pos, idx, None, rows)
        else:
            self._ready = _Ready(self._pos, idx, self._ahead.prefetch(self._table, idx))

    def _drop(self) -> None:
        r, self._ready = self._ready, None
        if r is not None and r.ticket is not None:
            self._ahead.take(r.ticket)

    # -- reads and writes ------------------------------------------------------------------------
    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` on the compute device, in the storage dtype (a tensor the caller owns)."""
        idx = _cpu(idx)
        self._retire()
        r = self._ready
        if r is not None and _same(idx, r.idx):
            self._ready = None
            rows = r.rows if r.ticket is None else self._ahead.take(r.ticket)
            self.stats["hits"] += 1
            self._pos = r.pos + 1
            self._prefetch_next()
            return rows
        self.stats["misses"] += 1
        if r is None and self._pos < len(self._plan) and _same(idx, self._plan[self._pos]):
            self._pos += 1                  # the expected batch, whose prefetch was dropped
        self._flush(idx)
        if self._now is None:
            rows = ops.gather_rows(self._table, idx).to(self.compute_device)
        else:
            rows = self._now.take(self._now.prefetch(self._table, idx))
        self._prefetch_next()
        return rows

    def _write(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        idx = _cpu(idx)
        if rows.shape[0] != idx.numel():
            raise ValueError(f"scatter_: {rows.shape[0]} rows for {idx.numel()} indices")
        new = rows.detach().to(self.compute_device).to(self.dtype, copy=True)
        r = self._ready
        if r is not None and _overlap(idx, r.idx):          # rule (2)
            if _same(idx, r.idx):
                if r.ticket is not None:
                    self._ahead.take(r.ticket)
                self._ready = _Ready(r.pos, r.idx, None, new.clone())
                self.stats["patched"] += 1
            else:
                self._drop()
                self.stats["dropped"] += 1
        if self._side is None:               # CPU (or no pinning): the copy is done at once
            host = new if new.device.type == "cpu" else new.cpu()
            self._writes.append((idx, host, None))
        else:
            cur = torch.cuda.current_stream(self.compute_device)
            self._side.wait_stream(cur)      # the rows are computed before they are copied
            host = torch.empty(new.shape, dtype=new.dtype, pin_memory=True)
            with torch.cuda.stream(self._side):
                host.copy_(new, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._side)
            new.record_stream(self._side)
            self._writes.append((idx, host, event))
        self._retire()

    def _apply_oldest(self, wait: bool) -> None:
        idx, host, event = self._writes.popleft()
        if event is not None and wait and not event.query():
            self.stats["waited_writes"] += 1
        if event is not None:
            event.synchronize()
        ops.scatter_rows_(self._table, idx, host)

    def _retire(self) -> None:
        """Apply the queued writes whose copies have finished (in order), and the oldest ones
        beyond ``max_pending_writes``."""
        while self._writes and (self._writes[0][2] is None or self._writes[0][2].query()):
            self._apply_oldest(False)
        while len(self._writes) > self.max_pending_writes:
            self._apply_oldest(True)

    def _flush(self, idx: torch.Tensor | None = None) -> None:
        """Apply every queued write up to the last one touching ``idx`` (all when None)."""
        if not self._writes:
            return
        if idx is None:
            n = len(self._writes)
        else:
            n = 0
            for i, (w_idx, _, _) in enumerate(self._writes):
                if _overlap(w_idx, idx):
                    n = i + 1
        for _ in range(n):
            self._apply_oldest(True)

    # -- the AuxStore interface ----------------------------------------------------------------------
    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        return self._read(idx)

    def scatter_(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        self._write(idx, rows)

    def stage_input(self, idx: torch.Tensor, filt: FilterPair, channels_last: bool = False) -> torch.Tensor:
        rows = self._read(idx)
        return ops.stage_input(rows, torch.arange(rows.shape[0]), filt, channels_last)

    def jacobi_update_(self, mult: "AuxStore | None", idx: torch.Tensor, a: torch.Tensor,
                       g: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
        if mult is not None and not isinstance(mult, HostAuxStore):
            raise TypeError("HostAuxStore.jacobi_update_ needs a HostAuxStore multiplier store")
        lam = self._read(idx)
        u = None if mult is None else mult._read(idx)
        dev = lam.device
        rows = ops.jacobi_update_(lam, u, torch.arange(lam.shape[0]), a.to(dev), g.to(dev), beta, gamma)
        self._write(idx, lam)
        if mult is not None:
            mult._write(idx, u)
        return rows

    def zero_(self) -> None:
        self._drop()
        self._flush()
        self._table.zero_()

    def memory_bytes(self) -> int:
        return self._table.numel() * self._table.element_size()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drop()
        self._flush()
        super().load_state_dict(state)

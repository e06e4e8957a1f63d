"""Stage replicas: K stages x R replicas on K·R workers (layer-parallel x data-parallel;
docs/method.md §8).

Layout: process rank ``r·K + k`` runs replica r of stage k. In parallel phases the training rows
are partitioned once into R contiguous blocks of ``N // R`` rows (the last ``N mod R`` rows, fewer
than R, train only in serial epochs); replica r owns the auxiliary rows of block r, so its stores
are R times smaller than a one-replica run's. Every epoch each replica permutes its own block
(a generator seeded by (seed, epoch, replica)), and global batch t is the concatenation of the
replicas' t-th chunks of ``B / R`` rows: R equal contiguous shares, share r from block r. Replica
r of stage k exchanges messages only with replica r of stages k ± 1 (its rows are theirs too), and
the R replicas of a stage sum their gradients every step (the loss of each share is scaled by
1/R, so the sum is the gradient of the mean over the global batch) and average their BatchNorm
running statistics at the end of the epoch. Serial epochs run data-parallel over all K·R ranks.

One process can compute exactly what K·R processes compute (``--transport local --replicas R``):
every stage takes the R shares of a batch one after another, each with BatchNorm batch statistics
and running statistics of its own, sums the shares' gradients in replica order and averages the
running statistics at the end of the epoch, in float64, as the all-reduce does. That simulation
is the oracle the distributed run is tested against (bitwise with R = 2, where a sum of two
terms does not depend on the reduction order).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .auxstore import AuxStore
from .data.loader import _derive_seed
from .filters import FilterPair
from .topology import _weighted_mean_


def block_rows(num_train: int, replicas: int) -> int:
    """Rows of each replica's block: ``num_train // replicas``."""
    return num_train // replicas


def replica_batches(num_train: int, replicas: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The global batches of a parallel epoch with ``replicas`` > 1 (sample indices, CPU int64):
    batch t is [chunk t of block 0 | chunk t of block 1 | ...], chunks of ``batch_size // replicas``
    rows of each block's own permutation; every batch splits into ``replicas`` equal shares."""
    if replicas < 2:
        raise ValueError("replica_batches is for replicas >= 2")
    if batch_size % replicas:
        raise ValueError(f"batch size {batch_size} is not a multiple of {replicas} replicas")
    per, share = block_rows(num_train, replicas), batch_size // replicas
    if per < 1:
        raise ValueError(f"{num_train} training rows cannot be split over {replicas} replicas")
    chunks = []
    for r in range(replicas):
        g = torch.Generator().manual_seed(_derive_seed(seed, epoch, 0x5EED0000 + r))
        chunks.append(list((torch.randperm(per, generator=g) + r * per).split(share)))
    return [torch.cat([c[t] for c in chunks]) for t in range(len(chunks[0]))]


def shares(idx: torch.Tensor, replicas: int) -> list[torch.Tensor]:
    """The ``replicas`` equal contiguous shares of a global batch."""
    n = len(idx) // replicas
    return [idx[r * n:(r + 1) * n] for r in range(replicas)]


def share_of(idx: torch.Tensor, replica: int, replicas: int) -> torch.Tensor:
    n = len(idx) // replicas
    return idx[replica * n:(replica + 1) * n]


# ------------------------------------------------------------------------------------ stores
class OffsetAuxStore(AuxStore):
    """Replica r's store: the rows of its block [start, start + rows) of a store indexed by sample
    index, held as a table of ``rows`` rows (``inner``)."""

    def __init__(self, inner: AuxStore, start: int) -> None:
        self.inner, self.start = inner, int(start)
        self.row_shape = inner.row_shape

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.inner.dtype

    def _local(self, idx: torch.Tensor) -> torch.Tensor:
        return idx - self.start if self.start else idx

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        return self.inner.gather(self._local(idx))

    def scatter_(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        self.inner.scatter_(self._local(idx), rows)

    def stage_input(self, idx: torch.Tensor, filt: FilterPair, channels_last: bool = False) -> torch.Tensor:
        return self.inner.stage_input(self._local(idx), filt, channels_last)

    def jacobi_update_(self, mult: "AuxStore | None", idx: torch.Tensor, a: torch.Tensor,
                       g: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
        inner_mult = mult.inner if isinstance(mult, OffsetAuxStore) else mult
        return self.inner.jacobi_update_(inner_mult, self._local(idx), a, g, beta, gamma)

    def plan(self, batches: list[torch.Tensor]) -> None:
        self.inner.plan([self._local(b) for b in batches])

    def zero_(self) -> None:
        self.inner.zero_()

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "row_start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("row_start", self.start) != self.start:
            raise ValueError(f"auxiliary store in checkpoint holds rows from {state['row_start']}, "
                             f"this replica's from {self.start}")
        self.inner.load_state_dict({k: v for k, v in state.items() if k != "row_start"})


def join_replica_states(states: list[dict[str, Any]], num_train: int) -> dict[str, Any]:
    """The state of a one-process store of ``num_train`` rows from the R replicas' states of one
    store (blocks in replica order; the rows past R blocks never train in parallel: zeros)."""
    tables = [s["table"] for s in states]
    rest = num_train - sum(t.shape[0] for t in tables)
    if rest:
        tables.append(torch.zeros((rest, *tables[0].shape[1:]), dtype=tables[0].dtype, device=tables[0].device))
    out = {k: v for k, v in states[0].items() if k not in ("table", "row_start")}
    out["table"] = torch.cat(tables)
    return out


def split_replica_state(state: dict[str, Any], replica: int, rows: int) -> dict[str, Any]:
    """Replica ``replica``'s block of a one-process store's state."""
    out = {k: v for k, v in state.items() if k not in ("table", "row_start")}
    out["table"] = state["table"][replica * rows:(replica + 1) * rows].clone()
    out["row_start"] = replica * rows
    return out


# ------------------------------------------------------------------------------------ BatchNorm
def bn_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_running(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics (mean, var) of every BatchNorm layer of ``module``, in order."""
    return [b for m in bn_modules(module) for name, b in m.named_buffers(recurse=False)
            if name in ("running_mean", "running_var") and b is not None]


class ReplicaBN:
    """The R replicas' BatchNorm buffers of one stage, simulated in one process: ``use(r)``
    swaps replica r's buffers into the module (after saving the previous replica's), ``average()``
    sets the module's running statistics to the float64 mean over the replicas (what the
    replicas' end-of-epoch all-reduce gives)."""

    def __init__(self, module: nn.Module, replicas: int) -> None:
        self.mods = bn_modules(module)
        self.replicas = replicas
        self.sets = [[{k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None}
                      for m in self.mods] for _ in range(replicas)]
        self.current: int | None = None

    def use(self, r: int) -> None:
        with torch.no_grad():
            if self.current is not None:
                for m, bufs in zip(self.mods, self.sets[self.current]):
                    for k, v in bufs.items():
                        v.copy_(getattr(m, k))
            for m, bufs in zip(self.mods, self.sets[r]):
                for k, v in bufs.items():
                    getattr(m, k).copy_(v)
        self.current = r

    def save_to_all(self) -> None:
        """Every replica's buffers become the module's (all of them saw the same batch)."""
        with torch.no_grad():
            for bufs_r in self.sets:
                for m, bufs in zip(self.mods, bufs_r):
                    for k, v in bufs.items():
                        v.copy_(getattr(m, k))

    def average(self) -> None:
        self.use(self.current if self.current is not None else 0)   # save the last replica's
        with torch.no_grad():
            for i, m in enumerate(self.mods):
                for name in ("running_mean", "running_var"):
                    b = getattr(m, name, None)
                    if b is not None:
                        total = self.sets[0][i][name].double()
                        for r in range(1, self.replicas):
                            total = total + self.sets[r][i][name].double()
                        b.copy_(total / self.replicas)
        self.current = None


def sum_grads_(params: list[torch.Tensor], reduce: Callable[[torch.Tensor], Any]) -> None:
    """Sum the gradients of ``params`` over the replicas of a stage in place (one flat buffer per
    dtype; ``reduce`` all-reduces a tensor in place). A parameter without a gradient has none on
    every replica (they run the same graph) and is left alone."""
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        reduce(flat)
        off = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n


def mean_running_(module: nn.Module, reduce: Callable[[torch.Tensor], Any], replicas: int) -> None:
    """Average the BatchNorm running statistics of ``module`` over the replicas of its stage:
    float64, summed by ``reduce`` (an in-place all-reduce), divided by R."""
    _weighted_mean_(bn_running(module), 1.0, replicas, reduce)

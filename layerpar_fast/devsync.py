"""Device-wide synchronisation points, and their CPU emulation (``LAYERPAR_DEBUG_SYNC=1``).

On a GPU, a device-wide synchronisation (``torch.cuda.synchronize()``, Triton autotuning or a
kernel's first compilation and module load, cuDNN algorithm search, the caching allocator
returning memory) waits for every stream of the device, including the NCCL kernels of receives
that this rank has posted and that spin until the peer sends. If the peer is itself waiting for
something this rank would send after the synchronisation, both ranks hang until the watchdog
fires: the deadlock of the first parallel epoch before issue 11.

**The invariant** the engine keeps (enforced in :meth:`StageWorker.warm_up` and by the trainer,
which warms every stage up before a phase posts any receive): every point that may synchronise
the device happens while this rank has no receive outstanding. Concretely, the first call of each
fused op and of each stage's forward/backward/optimizer step for every batch shape of a phase
(the last partial batch included) runs in the warm-up, before the phase's first messages are
announced; inside a step there is no explicit synchronisation. Launched workers also get
``CUDA_MODULE_LOADING=EAGER`` (lazy loading makes a kernel's first launch a load point).

The emulation makes this testable on a CPU: with ``LAYERPAR_DEBUG_SYNC=1`` every such point
(:func:`first_call`, :func:`sync_point`) first waits until every receive the rank has posted has
completed, as a device-wide synchronisation would (the distributed transport registers the
waiter; it raises the transport's timeout error when the receives never complete). The number
of points met is recorded per parallel epoch (``debug_sync_points``). ``LAYERPAR_WARMUP=0``
turns the warm-up off: the order before issue 11, which the emulation shows to deadlock.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Iterable

import torch

_lock = threading.Lock()
_seen: set[tuple] = set()
_waiters: list[Callable[[str], None]] = []
_points = 0
_enabled: bool | None = None


def enabled() -> bool:
    """Whether the emulation is on (``LAYERPAR_DEBUG_SYNC`` set and not 0); read once."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get("LAYERPAR_DEBUG_SYNC", "") not in ("", "0")
    return _enabled


def warmup_enabled() -> bool:
    """``LAYERPAR_WARMUP=0`` disables the warm-up (a deliberately unsafe order, for tests)."""
    return os.environ.get("LAYERPAR_WARMUP", "1") != "0"


def reset() -> None:
    """Forget the environment reading, the shapes seen and the count (tests)."""
    global _enabled, _points
    with _lock:
        _enabled = None
        _seen.clear()
        _points = 0


def _key(op: str, tensors: Iterable[torch.Tensor | None]) -> tuple:
    return (op, tuple(None if t is None else (tuple(t.shape), t.dtype, t.device.type) for t in tensors))


def first_call(op: str, *tensors: torch.Tensor | None) -> None:
    """Mark a call that compiles, autotunes or loads a kernel the first time it meets these
    shapes/dtypes: a synchronisation point on its first call only."""
    if not enabled():
        return
    key = _key(op, tensors)
    with _lock:
        if key in _seen:
            return
        _seen.add(key)
    sync_point(f"first call of {op} for shapes {[k[0] if k else None for k in key[1]]}")


def sync_point(what: str) -> None:
    """A point that synchronises the device; under the emulation, wait for posted receives."""
    global _points
    if not enabled():
        return
    with _lock:
        _points += 1
        waiters = list(_waiters)
    for wait in waiters:
        wait(what)


def register(waiter: Callable[[str], None]) -> None:
    """``waiter(what)`` blocks until every receive posted so far has completed (or raises)."""
    with _lock:
        _waiters.append(waiter)


def unregister(waiter: Callable[[str], None]) -> None:
    with _lock:
        if waiter in _waiters:
            _waiters.remove(waiter)


def points() -> int:
    """Synchronisation points met so far in this process."""
    return _points

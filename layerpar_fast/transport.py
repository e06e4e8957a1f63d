"""Stage-to-stage messages of the parallel phase (docs/method.md §5).

Messages travel on channels ``(src, dst, tag)``; on every channel they are sent in increasing
step order, so a receiver always knows which step the next message belongs to. Tags:

* ``"in"``: from stage k to k+1, a row block for the receiver's input store (Gauss-Seidel: the
  coarse output a_k; Jacobi/penalty: the updated λ̃_k; the initial fill: a_k);
* ``"g"``:  from stage k+1 to k, the coarse back-propagated signal g_k.

Ranks are 0-based stage indices here (stage k of the docs is rank k-1).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict, deque

import torch

TAGS = ("in", "g")


class TransportError(RuntimeError):
    """A message that never came (timeout), a dead peer, or a protocol violation."""


class Transport(ABC):
    """What a stage worker needs from the wire."""

    rank: int
    world: int

    @abstractmethod
    def expect(self, src: int, tag: str, steps: list[tuple[int, tuple[int, ...], torch.dtype]]) -> None:
        """Announce the messages ``(step, shape, dtype)`` that will come on ``(src, tag)`` this epoch."""

    @abstractmethod
    def send(self, dst: int, tag: str, step: int, tensor: torch.Tensor) -> None:
        """Send asynchronously; the caller must not modify ``tensor`` afterwards."""

    @abstractmethod
    def poll(self, src: int, tag: str) -> list[tuple[int, torch.Tensor]]:
        """Messages already arrived on ``(src, tag)``, in step order (non-blocking)."""

    @abstractmethod
    def wait(self, src: int, tag: str, step: int) -> list[tuple[int, torch.Tensor]]:
        """Block until the message of ``step`` has arrived; return every message not yet returned
        (at least up to ``step``), in step order. Raises TransportError on timeout."""

    @abstractmethod
    def flush(self) -> None:
        """Block until every message sent so far has left (end-of-epoch drain)."""

    def barrier(self) -> None:
        """Synchronise all ranks (no-op in one process)."""

    def close(self) -> None:
        """Release resources."""

    # counters shared by implementations
    def _count_init(self) -> None:
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.bytes_recv: dict[str, int] = defaultdict(int)
        self.wait_s: dict[str, float] = defaultdict(float)

    def counters(self) -> dict[str, dict[str, float]]:
        return {"bytes_sent": dict(self.bytes_sent), "bytes_recv": dict(self.bytes_recv),
                "wait_s": dict(self.wait_s)}

    def reset_counters(self) -> None:
        self._count_init()


class LocalHub:
    """Mailboxes for K stages living in one process; ``endpoint(rank)`` is each stage's transport."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.boxes: dict[tuple[int, int, str], deque[tuple[int, torch.Tensor]]] = defaultdict(deque)

    def endpoint(self, rank: int) -> "LocalTransport":
        return LocalTransport(self, rank)


class LocalTransport(Transport):
    """In-process delivery: a send lands in the receiver's mailbox at once.

    Stages are executed one after another per step by the caller, so a wait for a message that
    has not been sent is a schedule bug and raises instead of blocking.
    """

    def __init__(self, hub: LocalHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.world = hub.world
        self._count_init()

    def expect(self, src: int, tag: str, steps: list[tuple[int, tuple[int, ...], torch.dtype]]) -> None:
        return None

    def send(self, dst: int, tag: str, step: int, tensor: torch.Tensor) -> None:
        if not 0 <= dst < self.world or dst == self.rank:
            raise TransportError(f"rank {self.rank}: bad destination {dst}")
        box = self.hub.boxes[(self.rank, dst, tag)]
        if box and box[-1][0] >= step:
            raise TransportError(f"rank {self.rank}: {tag!r} messages to {dst} out of step order")
        box.append((step, tensor))
        self.bytes_sent[tag] += tensor.numel() * tensor.element_size()

    def poll(self, src: int, tag: str) -> list[tuple[int, torch.Tensor]]:
        box = self.hub.boxes[(src, self.rank, tag)]
        out = list(box)
        box.clear()
        for _, t in out:
            self.bytes_recv[tag] += t.numel() * t.element_size()
        return out

    def wait(self, src: int, tag: str, step: int) -> list[tuple[int, torch.Tensor]]:
        box = self.hub.boxes[(src, self.rank, tag)]
        if not box or box[-1][0] < step:
            raise TransportError(
                f"rank {self.rank} waits for {tag!r} step {step} from rank {src}, which has not been "
                "sent: in one process the stages must be stepped in an order that produces it first")
        return self.poll(src, tag)

    def flush(self) -> None:
        return None

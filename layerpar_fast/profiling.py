"""NVTX ranges (Nsight Systems) and torch.profiler traces; both cost nothing when unused."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch


@contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range when CUDA is available (visible in Nsight Systems), else a no-op."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def maybe_profiler(trace_path: str | None):
    """A torch.profiler context writing a Chrome trace to ``trace_path`` (None: no profiling)."""
    if not trace_path:
        return nullcontext()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)

    def _handler(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(trace_path)

    return torch.profiler.profile(activities=acts, on_trace_ready=_handler, record_shapes=False)


class Clock:
    """Marks for timing spans of a stage step: ``perf_counter`` on the CPU; on a GPU, CUDA events
    recorded on the current stream (the host does not wait: the spans measure device time and
    are read once, when :meth:`total` is called at the end of an epoch)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._spans: dict[str, list[tuple[object, object]]] = {}
        self._totals: dict[str, float] = {}

    def now(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        import time
        return time.perf_counter()

    def add(self, name: str, start: object, end: object) -> None:
        """Count the span ``start``..``end`` (two :meth:`now` marks) under ``name``."""
        if self.cuda:
            self._spans.setdefault(name, []).append((start, end))
        else:
            self._totals[name] = self._totals.get(name, 0.0) + (end - start)  # type: ignore[operator]

    def total(self, name: str) -> float:
        """Seconds counted under ``name`` (on a GPU: one synchronisation on the last event)."""
        spans = self._spans.pop(name, [])
        if spans:
            spans[-1][1].synchronize()  # type: ignore[attr-defined]
            self._totals[name] = self._totals.get(name, 0.0) + sum(
                a.elapsed_time(b) for a, b in spans) / 1000.0  # type: ignore[attr-defined]
        return self._totals.get(name, 0.0)

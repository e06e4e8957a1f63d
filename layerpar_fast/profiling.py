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

"""Timers, JSONL records, environment description and the speedup model (docs/method.md §7)."""
from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch


class Timer:
    """Accumulating wall-clock timer keyed by name (synchronises CUDA before reading)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        _sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def get(self, name: str) -> float:
        return self.totals.get(name, 0.0)

    def reset(self) -> None:
        self.totals.clear()


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class JsonlWriter:
    """Append-only JSON-lines file, flushed after every record."""

    def __init__(self, path: str, records: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        # (re)write the records we already have: a resumed run restarts from its checkpoint's
        # list, dropping any line written after that checkpoint.
        with open(path, "w") as f:
            for r in records or []:
                f.write(json.dumps(r) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a JSONL file (a clear error names a malformed line)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return out


def atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded in every summary and benchmark result."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def speedup_model(t_data: float, t_serial: float, stage_times: list[float], t_lambda: float,
                  t_comm_exposed: float) -> float:
    """ρ(K) = (T_d + T_f + T_b) / (T_d + max_k(t_f^k + t_b^k) + t_λ + t_comm,exposed)  (§7)."""
    denom = t_data + (max(stage_times) if stage_times else 0.0) + t_lambda + t_comm_exposed
    return (t_data + t_serial) / denom if denom > 0 else float("nan")


def sph_speedup(parallel_epochs: int, serial_epochs: int, rho: float, rho_serial: float) -> float:
    """S = (E_p + E_s) / (E_p/ρ + E_s/ρ_s)  (§7)."""
    return (parallel_epochs + serial_epochs) / (parallel_epochs / rho + serial_epochs / rho_serial)

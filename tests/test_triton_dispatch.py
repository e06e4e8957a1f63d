"""Triton on CUDA tensors only after a one-time test launch succeeded (ops._triton_launch_error).

No GPU is needed: the Triton state and the test launch are simulated with monkeypatch, and the
real test launch runs on CPU tensors in Triton's interpreter (in a subprocess, because
TRITON_INTERPRET must be set before the kernels are imported).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from layerpar_fast import ops
from layerpar_fast import objectives as ref
from layerpar_fast.filters import FilterPair

CUDA0 = torch.device("cuda", 0)


pytestmark = pytest.mark.usefixtures("clean_backend")   # conftest.py


def _triton_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend Triton and the kernels import (the state the old import-only check trusted)."""
    fake = types.SimpleNamespace(INTERPRET=False)
    monkeypatch.setattr(ops, "_triton_state", functools.lru_cache(maxsize=1)(lambda: (fake, "")))


def _probe(monkeypatch: pytest.MonkeyPatch, error: Exception | None) -> list[torch.device]:
    calls: list[torch.device] = []

    def probe(device: torch.device) -> None:
        calls.append(device)
        if error is not None:
            raise error

    monkeypatch.setattr(ops, "_triton_probe", probe)
    return calls


def _runtime_warnings(rec: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]


def test_failing_test_launch_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    _triton_imports(monkeypatch)
    calls = _probe(monkeypatch, RuntimeError("simulated: ptxas fatal: Value 'sm_100' is not defined\nmore"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert ops._backend_for(CUDA0) == "ref"
        ops._resolved.clear()                    # a new resolution reuses the cached launch result
        assert ops._backend_for(CUDA0) == "ref"
        report = ops.backend_report(CUDA0)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        avail = ops.available_backends()
    assert calls == [CUDA0]                      # one test launch
    msgs = _runtime_warnings(rec)
    assert len(msgs) == 1, msgs                  # one warning
    assert "test launch on cuda:0 failed: RuntimeError: simulated: ptxas" in msgs[0]
    assert "more" not in msgs[0] and "reference" in msgs[0]
    assert set(report.values()) == {"ref"}
    assert avail["triton"] is False


def test_successful_test_launch_selects_triton_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    _triton_imports(monkeypatch)
    calls = _probe(monkeypatch, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops._backend_for(CUDA0) == "triton"
        ops._resolved.clear()
        assert ops._backend_for(CUDA0) == "triton"
    assert calls == [CUDA0]


def test_forced_triton_with_a_failing_launch_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    _triton_imports(monkeypatch)
    _probe(monkeypatch, RuntimeError("simulated launch failure"))
    monkeypatch.setenv("LAYERPAR_OPS", "triton")
    with pytest.warns(RuntimeWarning, match="simulated launch failure"):
        with pytest.raises(ops.BackendUnavailable, match="LAYERPAR_OPS=triton.*simulated launch failure"):
            ops._backend_for(CUDA0)


def test_cpu_tensors_never_launch_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    _triton_imports(monkeypatch)
    calls = _probe(monkeypatch, RuntimeError("must not run"))
    filt = FilterPair(2)
    o = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = ops.local_loss(o, t, None, 1.0, "jacobi", filt)
        ops.stage_input(t.contiguous(), torch.tensor([1, 0]), filt)
    assert calls == []
    torch.testing.assert_close(loss.detach(), ref.local_loss(o, t, None, 1.0, "jacobi", filt)[0].detach())


def test_probe_checks_the_kernel_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test launch compares with the reference: a kernel that runs but computes garbage fails."""
    good = types.SimpleNamespace(lambda_step_=lambda lam, u, idx, a, g, beta, gamma, last=None:
                                 ref.jacobi_update_(lam, u, idx, a, g, beta, gamma))
    bad = types.SimpleNamespace(lambda_step_=lambda lam, u, idx, a, g, beta, gamma, last=None:
                                torch.zeros((len(idx), *lam.shape[1:])))
    monkeypatch.setattr(ops, "_kernel", lambda name: good)
    ops._triton_probe(torch.device("cpu"))
    monkeypatch.setattr(ops, "_kernel", lambda name: bad)
    with pytest.raises(RuntimeError, match="wrong results"):
        ops._triton_probe(torch.device("cpu"))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_real_test_launch_in_the_interpreter() -> None:
    """The test launch with the real λ-step kernel (Triton's CPU interpreter) passes."""
    code = ("import torch\nfrom layerpar_fast import ops\n"
            "print('ERR=' + repr(ops._triton_launch_error(torch.device('cpu'))))\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERR=''" in r.stdout, r.stdout + r.stderr[-2000:]

"""Triton kernels (kernels/k_*.py) against the reference, in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before the kernels are first imported, so the cases run in
one subprocess (this file executed as a script, with ``LAYERPAR_OPS=triton``) and each pytest
case asserts on that run's verdict. Shapes are tiny: the interpreter costs ~1 ms per program.

Tolerances: loss, a, grad_o, g: rtol 1e-5, atol 1e-6 (float32 arithmetic on both sides); z:
exact; λ̃/u rows in the store dtype: rtol 1e-5 (fp32), 1e-2 (bf16: the interpreter truncates
fp32->bf16 where GPUs round to nearest even, up to one bf16 ulp), 2e-3 (fp16).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

MARK = "LAYERPAR_TRITON_RESULTS "
DTS = ("fp32", "bf16", "fp16")
FORMS = {"penalty": ("jacobi", False), "al": ("jacobi", True), "gs": ("gs", True)}
LAYOUTS = ("nchw", "nhwc")


def case_specs() -> list[tuple[str, str, tuple[Any, ...]]]:
    """(name, family, parameters) of every case; torch-free so the parent can parametrize."""
    specs: list[tuple[str, str, tuple[Any, ...]]] = []
    for s in (1, 2, 4):
        for dt in DTS:
            for form in FORMS:
                for lay in LAYOUTS:
                    specs.append((f"local_loss-s{s}-{dt}-{form}-{lay}", "local_loss", (s, dt, form, lay)))
    for s in (1, 2, 4):
        for lay in LAYOUTS:
            specs.append((f"coarse_grad-s{s}-{lay}", "coarse_grad", (s, lay)))
            for dt in DTS:
                specs.append((f"stage_input-s{s}-{dt}-{lay}", "stage_input", (s, dt, lay)))
    for dt in DTS:
        for al in (False, True):
            for dup in (False, True):
                name = f"lambda_step-{dt}-{'al' if al else 'penalty'}-{'repeated' if dup else 'unique'}"
                specs.append((name, "lambda_step", (dt, al, dup)))
    specs.append(("gather_scatter-last_wins", "gather_scatter", ()))
    specs.append(("out_of_range-raises", "out_of_range", ()))
    specs.append(("report-triton", "report", ()))
    return specs


# ------------------------------------------------------------------------- child process side
def _run_cases() -> dict[str, str]:
    import torch

    from layerpar_fast import ops
    from layerpar_fast import objectives as ref
    from layerpar_fast.filters import FilterPair

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    row_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    shapes = [(1, 3, 2), (3, 5, 4)]  # (B, C, H/s)

    def close(x: Any, y: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol)

    def fine(b: int, c: int, h: int, s: int, lay: str) -> Any:
        x = torch.randn(b, c, h * s, h * s)
        return x.contiguous(memory_format=torch.channels_last) if lay == "nhwc" else x

    def local_loss(s: int, dt: str, form_key: str, lay: str) -> None:
        form, has_mult = FORMS[form_key]
        filt = FilterPair(s)
        for b, c, h in shapes:
            o = fine(b, c, h, s, lay)
            t = torch.randn(b, c, h, h).to(dtypes[dt])
            m = torch.randn(b, c, h, h).to(dtypes[dt]) if has_mult else None
            o1, o2 = o.clone().requires_grad_(True), o.clone().requires_grad_(True)
            l1, a1 = ops.local_loss(o1, t, m, 2.5, form, filt)
            l2, a2 = ref.local_loss(o2, t, m, 2.5, form, filt)
            (2.0 * l1).backward()
            (2.0 * l2).backward()
            close(l1.detach(), l2.detach())
            close(a1, a2)
            close(o1.grad, o2.grad)
            if lay == "nhwc":
                assert o1.grad.is_contiguous(memory_format=torch.channels_last)

    def coarse_grad(s: int, lay: str) -> None:
        filt = FilterPair(s)
        for b, c, h in shapes:
            gz = fine(b, c, h, s, lay)
            close(ops.coarse_input_grad(gz, filt), ref.coarse_input_grad(gz, filt))

    def stage_input(s: int, dt: str, lay: str) -> None:
        filt = FilterPair(s)
        for _, c, h in shapes:
            store = torch.randn(7, c, h, h).to(dtypes[dt])
            idx = torch.tensor([6, 0, 3, 3])
            z = ops.stage_input(store, idx, filt, lay == "nhwc")
            assert torch.equal(z, ref.stage_input(store, idx, filt, lay == "nhwc"))

    def lambda_step(dt: str, al: bool, dup: bool) -> None:
        dtype = dtypes[dt]
        for _, c, h in shapes:
            lam = torch.randn(9, c, h, h).to(dtype)
            u = torch.randn(9, c, h, h).to(dtype) if al else None
            idx = torch.tensor([5, 2, 5, 8] if dup else [5, 2, 8])
            a, g = torch.randn(len(idx), c, h, h), torch.randn(len(idx), c, h, h)
            lam2, u2 = lam.clone(), None if u is None else u.clone()
            want, want_u = ref.lambda_step(lam2[idx], None if u2 is None else u2[idx], a, g, 3.0, 0.5)
            for p, i in enumerate(idx.tolist()):  # old rows in, last occurrence stored
                lam2[i] = want[p].to(dtype)
                if u2 is not None and want_u is not None:
                    u2[i] = want_u[p].to(dtype)
            rows = ops.jacobi_update_(lam, u, idx, a, g, 3.0, 0.5)
            close(rows, want, rtol=row_tol[dtype])
            close(lam, lam2, rtol=row_tol[dtype])
            if al:
                close(u, u2, rtol=row_tol[dtype])

    def gather_scatter() -> None:
        store = torch.randn(8, 3, 2, 2)
        idx = torch.tensor([7, 1, 1, 4])
        assert torch.equal(ops.gather_rows(store, idx), store[idx])
        new = torch.randn(4, 3, 2, 2)
        want = store.clone()
        for p, i in enumerate(idx.tolist()):
            want[i] = new[p]
        ops.scatter_rows_(store, idx, new)
        assert torch.equal(store, want)

    def out_of_range() -> None:
        store = torch.zeros(4, 3, 2, 2)
        for fn in (lambda i: ops.gather_rows(store, i), lambda i: ops.stage_input(store, i, FilterPair(2)),
                   lambda i: ops.scatter_rows_(store, i, torch.ones(2, 3, 2, 2)),
                   lambda i: ops.jacobi_update_(store, None, i, torch.ones(2, 3, 2, 2),
                                                torch.ones(2, 3, 2, 2), 1.0, 1.0)):
            for bad in ([0, 4], [-1, 1]):
                try:
                    fn(torch.tensor(bad))
                except IndexError:
                    continue
                raise AssertionError(f"index {bad} did not raise IndexError")
        assert torch.equal(store, torch.zeros_like(store))

    def report() -> None:
        rep = ops.backend_report()
        assert rep["local_loss"] == "triton" and rep["jacobi_update_"] == "triton", rep
        assert "interpreter" in ops.describe()

    families: dict[str, Callable[..., None]] = {
        "local_loss": local_loss, "coarse_grad": coarse_grad, "stage_input": stage_input,
        "lambda_step": lambda_step, "gather_scatter": gather_scatter, "out_of_range": out_of_range,
        "report": report}
    results: dict[str, str] = {}
    for name, family, params in case_specs():
        torch.manual_seed(0)
        try:
            families[family](*params)
        except Exception as e:  # reported per case to the parent
            results[name] = f"{type(e).__name__}: {e}"
        else:
            results[name] = "ok"
    return results


# ----------------------------------------------------------------------------- pytest side
@pytest.fixture(scope="module")
def triton_results() -> dict[str, str]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", LAYERPAR_OPS="triton", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise AssertionError(f"the Triton interpreter run failed (rc={proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("name", [spec[0] for spec in case_specs()])
def test_triton_kernel_case(triton_results: dict[str, str], name: str) -> None:
    assert triton_results.get(name) == "ok", triton_results.get(name, "case did not run")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 LAYERPAR_OPS=triton (pytest does this for you)")
    print(MARK + json.dumps(_run_cases()))

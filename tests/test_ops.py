"""layerpar_fast.ops: every fused op against the reference (objectives.py) on odd shapes.

The fused CPU path is the C++ extension (tests skip when it is not built; CI builds it). The
Triton kernels are checked in test_kernels_triton.py (interpreter, in a subprocess).

Tolerances. Loss, a, grad_o, g and z are computed in float32 from the same stored values by
both paths, so they agree to float32 rounding whatever the store dtype: rtol 1e-5, atol 1e-6
(z is a copy: exact). Rows written back in the store dtype may differ by one rounding step of
that dtype where the float32 results differ in the last bit: rtol 1e-5 (fp32), 1e-2 (bf16),
2e-3 (fp16), atol 1e-6.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from layerpar_fast import _ext, ops
from layerpar_fast import objectives as ref
from layerpar_fast.filters import FilterPair

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROW_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
FORMS = [("jacobi", False), ("jacobi", True), ("gs", True)]  # penalty, AL (Jacobi), Gauss-Seidel
SHAPES = [(b, c, k) for b in (1, 3) for c in (3, 5) for k in (2, 4)]  # (B, C, H/s = W/s)

needs_ext = pytest.mark.skipif(not _ext.available(), reason="C++ extension layerpar_fast._C not built")


pytestmark = pytest.mark.usefixtures("clean_backend")   # conftest.py


@pytest.fixture
def cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _ext.available():
        pytest.skip("C++ extension layerpar_fast._C not built")
    monkeypatch.setenv("LAYERPAR_OPS", "cpp")


def _close(x: torch.Tensor, y: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol)


def _fine(b: int, c: int, h: int, s: int, channels_last: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(b, c, h * s, h * s, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------------------------- local loss
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("form,has_mult", FORMS, ids=["penalty", "al", "gs"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("s", [1, 2, 4])
def test_local_loss_matches_reference(cpp: None, s: int, dt: str, form: str, has_mult: bool,
                                      channels_last: bool) -> None:
    filt = FilterPair(s)
    for b, c, h in SHAPES:
        o = _fine(b, c, h, s, channels_last)
        target = torch.randn(b, c, h, h).to(DTYPES[dt])
        mult = torch.randn(b, c, h, h).to(DTYPES[dt]) if has_mult else None
        o1, o2 = o.clone().requires_grad_(True), o.clone().requires_grad_(True)
        loss1, a1 = ops.local_loss(o1, target, mult, 2.5, form, filt)
        loss2, a2 = ref.local_loss(o2, target, mult, 2.5, form, filt)
        (3.0 * loss1).backward()
        (3.0 * loss2).backward()
        _close(loss1.detach(), loss2.detach())
        _close(a1, a2)
        _close(o1.grad, o2.grad)
        assert a1.dtype == torch.float32 and not a1.requires_grad
        assert loss1.dtype == torch.float32 and loss1.dim() == 0
        if channels_last:
            assert o1.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["avg_nearest", "avg_bilinear"])
def test_local_loss_bilinear_kind_is_fused_too(cpp: None, kind: str) -> None:
    """The loss only involves D, so both filter kinds take the fused path and agree."""
    filt = FilterPair(2, kind)
    o = torch.randn(3, 5, 8, 8, requires_grad=True)
    t, u = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    loss1, _ = ops.local_loss(o, t, u, 1.0, "jacobi", filt)
    (g1,) = torch.autograd.grad(loss1, o)
    loss2, _ = ref.local_loss(o, t, u, 1.0, "jacobi", filt)
    (g2,) = torch.autograd.grad(loss2, o)
    _close(loss1.detach(), loss2.detach())
    _close(g1, g2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("form,has_mult", FORMS, ids=["penalty", "al", "gs"])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_local_loss_gradcheck_float64(cpp: None, s: int, form: str, has_mult: bool, channels_last: bool) -> None:
    filt = FilterPair(s)
    o = _fine(2, 3, 2, s, channels_last, torch.float64).requires_grad_(True)
    target = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    mult = torch.randn(2, 3, 2, 2, dtype=torch.float64) if has_mult else None
    assert torch.autograd.gradcheck(lambda x: ops.local_loss(x, target, mult, 1.7, form, filt)[0], (o,))


def test_local_loss_half_output_and_no_grad(cpp: None) -> None:
    filt = FilterPair(2)
    o = torch.randn(3, 5, 8, 8).to(torch.bfloat16).requires_grad_(True)
    t = torch.randn(3, 5, 4, 4)
    loss, a = ops.local_loss(o, t, None, 1.0, "jacobi", filt)
    loss.backward()
    loss_r, a_r = ref.local_loss(o.detach().float(), t, None, 1.0, "jacobi", filt)
    assert o.grad is not None and o.grad.dtype == torch.bfloat16
    _close(loss.detach(), loss_r)
    with torch.no_grad():
        loss2, a2 = ops.local_loss(o, t, None, 1.0, "jacobi", filt)
    assert not loss2.requires_grad
    _close(a2, a_r)


def test_local_loss_bad_input(cpp: None) -> None:
    filt = FilterPair(2)
    o = torch.randn(3, 5, 8, 8)
    with pytest.raises(ValueError, match="target shape"):
        ops.local_loss(o, torch.randn(3, 5, 8, 8), None, 1.0, "jacobi", filt)
    with pytest.raises(ValueError, match="needs the multiplier"):
        ops.local_loss(o, torch.randn(3, 5, 4, 4), None, 1.0, "gs", filt)
    with pytest.raises(ValueError, match="unknown loss form"):
        ops.local_loss(o, torch.randn(3, 5, 4, 4), None, 1.0, "bogus", filt)


def test_local_loss_deterministic_across_thread_counts(cpp: None) -> None:
    filt = FilterPair(2)
    o = torch.randn(8, 16, 32, 32, requires_grad=True)
    t, u = torch.randn(8, 16, 16, 16), torch.randn(8, 16, 16, 16)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss, a = ops.local_loss(o, t, u, 3.0, "jacobi", filt)
            (g,) = torch.autograd.grad(loss, o)
            results.append((loss.detach(), a, g))
    finally:
        torch.set_num_threads(before)
    for x, y in zip(results[0], results[1]):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- coarse input grad
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_coarse_input_grad_matches_reference(cpp: None, s: int, channels_last: bool) -> None:
    filt = FilterPair(s)
    for b, c, h in SHAPES:
        gz = _fine(b, c, h, s, channels_last)
        g = ops.coarse_input_grad(gz, filt)
        _close(g, ref.coarse_input_grad(gz, filt))
        assert g.dtype == torch.float32
        assert g.is_contiguous() or s == 1  # s = 1 runs the reference scaling, which keeps the layout


def test_coarse_input_grad_bilinear_uses_reference(cpp: None) -> None:
    filt = FilterPair(2, "avg_bilinear")
    gz = torch.randn(3, 5, 8, 8)
    assert torch.equal(ops.coarse_input_grad(gz, filt), ref.coarse_input_grad(gz, filt))
    assert ops.backend_report(kind="avg_bilinear")["coarse_input_grad"].startswith("ref")


# -------------------------------------------------------------------------------------- λ-step
def _oracle_jacobi(lam: torch.Tensor, u: torch.Tensor | None, idx: torch.Tensor, a: torch.Tensor,
                   g: torch.Tensor, beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every occurrence reads the old rows; the last occurrence is stored."""
    lam, u = lam.clone(), None if u is None else u.clone()
    lam_new, u_new = ref.lambda_step(lam[idx], None if u is None else u[idx], a, g, beta, gamma)
    rows = lam_new.to(lam.dtype)
    for p, i in enumerate(idx.tolist()):
        lam[i] = rows[p]
        if u is not None and u_new is not None:
            u[i] = u_new[p].to(u.dtype)
    return rows, lam, u


@pytest.mark.parametrize("al", [False, True], ids=["penalty", "al"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_jacobi_update_matches_reference(cpp: None, dt: str, al: bool) -> None:
    dtype = DTYPES[dt]
    tol = ROW_TOL[dtype]
    for _, c, h in SHAPES:
        for gamma in (1.0, 0.5):
            lam = torch.randn(11, c, h, h).to(dtype)
            u = torch.randn(11, c, h, h).to(dtype) if al else None
            idx = torch.tensor([7, 2, 9])
            a, g = torch.randn(3, c, h, h), torch.randn(3, c, h, h)
            lam2, u2 = lam.clone(), None if u is None else u.clone()
            rows = ops.jacobi_update_(lam, u, idx, a, g, 4.0, gamma)
            rows2 = ref.jacobi_update_(lam2, u2, idx, a, g, 4.0, gamma)
            assert rows.dtype == dtype and rows.shape == (3, c, h, h)
            _close(rows, rows2, rtol=tol)
            _close(lam, lam2, rtol=tol)
            if al:
                _close(u, u2, rtol=tol)


@pytest.mark.parametrize("backend", ["ref", "cpp"])
def test_jacobi_update_repeated_indices_last_wins(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    if backend == "cpp" and not _ext.available():
        pytest.skip("C++ extension layerpar_fast._C not built")
    monkeypatch.setenv("LAYERPAR_OPS", backend)
    lam, u = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    idx = torch.tensor([4, 1, 4, 0, 1])
    a, g = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    want_rows, want_lam, want_u = _oracle_jacobi(lam, u, idx, a, g, 2.0, 0.5)
    rows = ops.jacobi_update_(lam, u, idx, a, g, 2.0, 0.5)
    _close(rows, want_rows)
    _close(lam, want_lam)
    assert want_u is not None
    _close(u, want_u)


def test_jacobi_update_bad_input(cpp: None) -> None:
    lam = torch.zeros(4, 3, 2, 2)
    a = torch.zeros(2, 3, 2, 2)
    with pytest.raises(IndexError, match="out of range"):
        ops.jacobi_update_(lam, None, torch.tensor([0, 4]), a, a, 1.0, 1.0)
    with pytest.raises(ValueError, match="beta"):
        ops.jacobi_update_(lam, None, torch.tensor([0, 1]), a, a, 0.0, 1.0)
    assert torch.equal(lam, torch.zeros_like(lam))


# ------------------------------------------------------------------------------- stage input
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_stage_input_matches_reference(cpp: None, s: int, dt: str, channels_last: bool) -> None:
    filt = FilterPair(s)
    for _, c, h in SHAPES:
        store = torch.randn(9, c, h, h).to(DTYPES[dt])
        idx = torch.tensor([8, 0, 3, 3])
        z = ops.stage_input(store, idx, filt, channels_last)
        want = ref.stage_input(store, idx, filt, channels_last)
        assert torch.equal(z, want) and z.dtype == torch.float32
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert z.is_contiguous(memory_format=fmt)


def test_stage_input_bilinear_uses_reference(cpp: None) -> None:
    filt = FilterPair(2, "avg_bilinear")
    store = torch.randn(5, 3, 4, 4)
    idx = torch.tensor([1, 4])
    assert torch.equal(ops.stage_input(store, idx, filt), ref.stage_input(store, idx, filt))


# ----------------------------------------------------------------------------- gather/scatter
@pytest.mark.parametrize("backend", ["ref", "cpp"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_gather_scatter_repeated_and_out_of_order(monkeypatch: pytest.MonkeyPatch, backend: str, dt: str) -> None:
    if backend == "cpp" and not _ext.available():
        pytest.skip("C++ extension layerpar_fast._C not built")
    monkeypatch.setenv("LAYERPAR_OPS", backend)
    dtype = DTYPES[dt]
    store = torch.randn(10, 5, 2, 2).to(dtype)
    idx = torch.tensor([9, 2, 2, 0, 7, 2], dtype=torch.int32)
    rows = ops.gather_rows(store, idx)
    assert rows.dtype == dtype and torch.equal(rows, store[idx.long()])
    new = torch.randn(6, 5, 2, 2)  # float32 rows, cast into the store dtype
    want = store.clone()
    for p, i in enumerate(idx.tolist()):
        want[i] = new[p].to(dtype)  # sequential order: the last write wins
    ops.scatter_rows_(store, idx, new)
    assert torch.equal(store, want)


@pytest.mark.parametrize("backend", ["ref", "cpp"])
def test_out_of_range_raises_before_any_write(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    if backend == "cpp" and not _ext.available():
        pytest.skip("C++ extension layerpar_fast._C not built")
    monkeypatch.setenv("LAYERPAR_OPS", backend)
    store = torch.zeros(4, 3, 2, 2)
    filt = FilterPair(2)
    for bad in ([0, 4], [-1, 0]):
        idx = torch.tensor(bad)
        with pytest.raises(IndexError, match="out of range"):
            ops.gather_rows(store, idx)
        with pytest.raises(IndexError, match="out of range"):
            ops.scatter_rows_(store, idx, torch.ones(2, 3, 2, 2))
        with pytest.raises(IndexError, match="out of range"):
            ops.stage_input(store, idx, filt)
    assert torch.equal(store, torch.zeros_like(store))


def test_gather_large_rows_parallel(cpp: None) -> None:
    store = torch.randn(300, 16, 16, 16).to(torch.bfloat16)
    idx = torch.randperm(300)[:128]
    assert torch.equal(ops.gather_rows(store, idx), store.index_select(0, idx))
    rows = torch.randn(128, 16, 16, 16)
    want = store.clone()
    want.index_copy_(0, idx, rows.to(torch.bfloat16))
    ops.scatter_rows_(store, idx, rows)
    assert torch.equal(store, want)


# ----------------------------------------------------------------------------------- dispatch
def test_requested_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ops.requested_backend() == "auto"
    monkeypatch.setenv("LAYERPAR_OPS", " Ref ")
    assert ops.requested_backend() == "ref"
    assert set(ops.backend_report().values()) == {"ref"}
    monkeypatch.setenv("LAYERPAR_OPS", "cuda")
    with pytest.raises(ValueError, match="LAYERPAR_OPS"):
        ops.requested_backend()
    with pytest.raises(ValueError, match="LAYERPAR_OPS"):
        ops.local_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), None, 1.0, "jacobi", FilterPair(1))


def test_forcing_changes_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ref, "gather_rows", lambda store, idx: calls.append("ref") or store.index_select(0, idx))
    store, idx = torch.randn(5, 3), torch.tensor([1, 2])
    monkeypatch.setenv("LAYERPAR_OPS", "ref")
    ops.gather_rows(store, idx)
    assert calls == ["ref"]
    if _ext.available():
        monkeypatch.setenv("LAYERPAR_OPS", "cpp")
        ops.gather_rows(store, idx)
        assert calls == ["ref"]
        monkeypatch.setenv("LAYERPAR_OPS", "auto")
        assert ops.backend_report()["gather_rows"] == "cpp"


def _simulate_missing_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "layerpar_fast._C", None)  # makes the import fail
    ops.reset_backend_cache()


def test_missing_extension_auto_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_missing_extension(monkeypatch)
    filt = FilterPair(2)
    o = torch.randn(3, 5, 4, 4, requires_grad=True)
    t = torch.randn(3, 5, 2, 2)
    with pytest.warns(RuntimeWarning, match=r"C\+\+ extension not available"):
        loss, a = ops.local_loss(o, t, None, 1.0, "jacobi", filt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.local_loss(o, t, None, 1.0, "jacobi", filt)  # no second warning
    assert set(ops.backend_report().values()) == {"ref"}
    assert ops.available_backends()["cpp"] is False
    assert "C++ extension: not available" in ops.describe()
    want, _ = ref.local_loss(o, t, None, 1.0, "jacobi", filt)
    _close(loss.detach(), want.detach())


def test_missing_extension_forced_cpp_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_missing_extension(monkeypatch)
    monkeypatch.setenv("LAYERPAR_OPS", "cpp")
    with pytest.warns(RuntimeWarning):
        with pytest.raises(ops.BackendUnavailable, match="LAYERPAR_OPS=cpp"):
            ops.gather_rows(torch.randn(4, 2), torch.tensor([0]))
    assert ops.backend_report()["gather_rows"].startswith("unavailable")


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERPAR_OPS", "triton")
    kernels = ops._triton_state()[0]
    if kernels is not None and kernels.INTERPRET:
        pytest.skip("this process runs Triton in interpreter mode")
    with pytest.warns(RuntimeWarning):
        with pytest.raises(ops.BackendUnavailable, match="LAYERPAR_OPS=triton"):
            ops.coarse_input_grad(torch.randn(1, 3, 4, 4), FilterPair(2))


def test_describe_and_nvtx_and_available() -> None:
    text = ops.describe()
    assert "LAYERPAR_OPS=auto" in text and "C++ extension" in text
    avail = ops.available_backends()
    assert avail["ref"] is True and avail["cpp"] == _ext.available()
    with ops.nvtx_range("test/range"):
        pass


def test_staging_ring_cpu_semantics() -> None:
    ring = ops.StagingRing(slots=2, device="cpu")
    store = torch.randn(10, 3, 2, 2).to(torch.float16)
    t0 = ring.prefetch(store, torch.tensor([3, 1]))
    t1 = ring.prefetch(store, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="pending"):
        ring.prefetch(store, torch.tensor([2]))
    assert torch.equal(ring.take(t1), store[[0]])
    assert torch.equal(ring.take(t0), store[[3, 1]])
    with pytest.raises(KeyError):
        ring.take(t0)
    with pytest.raises(ValueError):
        ops.StagingRing(slots=0, device="cpu")


# --------------------------------------------------------------------------------- convergence
class _Stage1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class _Stage2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(z)).mean((2, 3)))


def _train_two_stages(form: str, dtype: torch.dtype, steps: int = 24) -> tuple[list[torch.Tensor], float]:
    """A tiny two-stage layer-parallel run (K=2, s=2): local loss + λ/u updates through ops."""
    gen = torch.Generator().manual_seed(1)
    n, bsz, beta, gamma = 24, 8, 2.0, 0.5
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    torch.manual_seed(2)
    s1, s2 = _Stage1(), _Stage2()
    opt1 = torch.optim.SGD(s1.parameters(), lr=0.05, momentum=0.9)
    opt2 = torch.optim.SGD(s2.parameters(), lr=0.05, momentum=0.9)
    filt = FilterPair(2)
    with torch.no_grad():
        lam = filt.down(s1(x)).to(dtype)
    mult = torch.zeros_like(lam)
    ce = 0.0
    for t in range(steps):
        idx = torch.arange(n)[(t * bsz) % n:(t * bsz) % n + bsz]
        o = s1(x[idx])
        loss1, a = ops.local_loss(o, ops.gather_rows(lam, idx), ops.gather_rows(mult, idx), beta, form, filt)
        opt1.zero_grad()
        loss1.backward()
        opt1.step()
        z = ops.stage_input(lam, idx, filt).requires_grad_(True)
        loss2 = F.cross_entropy(s2(z), y[idx])
        opt2.zero_grad()
        loss2.backward()
        opt2.step()
        ce = float(loss2.detach())
        assert z.grad is not None
        g = ops.coarse_input_grad(z.grad, filt)
        if form == "gs":
            ops.scatter_rows_(mult, idx, g)
            ops.scatter_rows_(lam, idx, a)
        else:
            ops.jacobi_update_(lam, mult, idx, a, g, beta, gamma)
    return [p.detach().clone() for p in [*s1.parameters(), *s2.parameters()]], ce


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("form", ["jacobi", "gs"])
def test_convergence_fast_vs_reference(monkeypatch: pytest.MonkeyPatch, cpp: None, form: str, dt: str) -> None:
    fast, ce_fast = _train_two_stages(form, DTYPES[dt])
    monkeypatch.setenv("LAYERPAR_OPS", "ref")
    slow, ce_slow = _train_two_stages(form, DTYPES[dt])
    tol = 1e-4 if dt == "fp32" else 2e-2
    for p, q in zip(fast, slow):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    assert abs(ce_fast - ce_slow) < tol * 10

"""layerpar_fast._ext (the extension loader) and layerpar_fast._C called directly."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from layerpar_fast import _ext, ops
from layerpar_fast import objectives as ref
from layerpar_fast.filters import FilterPair


@pytest.fixture(autouse=True)
def _fresh_loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("LAYERPAR_OPS", raising=False)
    ops.reset_backend_cache()
    yield
    ops.reset_backend_cache()


@pytest.fixture
def C() -> ModuleType:
    mod = _ext.load()
    if mod is None:
        pytest.skip(f"C++ extension layerpar_fast._C not built ({_ext.reason()})")
    return mod


# ------------------------------------------------------------------------------------- loader
def test_loaded_extension_matches_torch(C: ModuleType) -> None:
    assert C.built_with_torch() == torch.__version__.split("+")[0]
    assert _ext.available() and _ext.reason() == ""
    assert C.with_cuda == _ext.with_cuda()
    if torch.version.cuda is None:
        assert C.with_cuda is False  # a CPU-only build never contains the CUDA parts


def test_missing_module_is_a_warning_not_an_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "layerpar_fast._C", None)
    ops.reset_backend_cache()  # also resets the loader
    with pytest.warns(RuntimeWarning, match=r"C\+\+ extension not available.*pip install"):
        assert _ext.load() is None
    assert _ext.load() is None  # cached: no second warning
    assert "not available" in _ext.reason()
    assert not _ext.available() and not _ext.with_cuda()


def test_broken_shared_object_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, *args: object) -> ModuleType:
        if name == "layerpar_fast._C":
            raise OSError("undefined symbol: _ZN3c104cuda")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    ops.reset_backend_cache()  # also resets the loader
    with pytest.warns(RuntimeWarning, match="undefined symbol"):
        assert _ext.load() is None


def test_extension_built_for_another_torch_is_refused(monkeypatch: pytest.MonkeyPatch, C: ModuleType) -> None:
    monkeypatch.setattr(C, "built_with_torch", lambda: "1.0.0")
    ops.reset_backend_cache()  # also resets the loader
    with pytest.warns(RuntimeWarning, match="built for torch 1.0.0"):
        assert _ext.load() is None
    store = torch.randn(5, 3, 2, 2)
    idx = torch.tensor([4, 0])
    assert ops.backend_report()["stage_input"] == "ref"
    assert torch.equal(ops.stage_input(store, idx, FilterPair(2)), ref.stage_input(store, idx, FilterPair(2)))


# ------------------------------------------------------------------------------ direct calls
def test_index_errors_translate_to_index_error(C: ModuleType) -> None:
    store = torch.zeros(5, 3)
    with pytest.raises(IndexError, match=r"index 5 at position 1 is out of range .* \(valid: 0..4\)"):
        C.gather_rows_out(store, torch.tensor([0, 5]), torch.empty(2, 3))
    with pytest.raises(IndexError):
        C.scatter_rows_(store, torch.tensor([-1]), torch.ones(1, 3))
    with pytest.raises(IndexError):
        C.upsample_rows(torch.zeros(5, 1, 2, 2), torch.tensor([9]), 2, 1.0, torch.float32, False)
    assert torch.equal(store, torch.zeros(5, 3))


def test_bad_arguments_raise_clear_errors(C: ModuleType) -> None:
    o = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="does not match fine shape"):
        C.local_loss_fwd(o, torch.randn(2, 3, 4, 4), None, 1.0, False, 2, True)
    with pytest.raises(RuntimeError, match="dtype pair"):
        C.local_loss_fwd(o.double(), torch.randn(2, 3, 2, 2), None, 1.0, False, 2, True)
    with pytest.raises(RuntimeError, match="needs the multiplier"):
        C.local_loss_fwd(o, torch.randn(2, 3, 2, 2), None, 1.0, True, 2, True)
    with pytest.raises(RuntimeError, match="float32"):
        C.jacobi_update_(torch.zeros(4, 3), None, torch.tensor([0]), torch.zeros(1, 3, dtype=torch.float64),
                         torch.zeros(1, 3), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="index tensor must be int64 or int32"):
        C.gather_rows_out(torch.zeros(4, 3), torch.tensor([0.0]), torch.empty(1, 3))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("s", [3, 5])
def test_generic_factor_paths(C: ModuleType, s: int, channels_last: bool) -> None:
    """Factors other than 1, 2, 4 take the runtime-s kernels."""
    filt = FilterPair(s)
    o = torch.randn(2, 3, 2 * s, 2 * s)
    if channels_last:
        o = o.contiguous(memory_format=torch.channels_last)
    t = torch.randn(2, 3, 2, 2)
    loss, a, gc = C.local_loss_fwd(o, t, t, 1.5, False, s, True)
    loss_r, grad_r, a_r = ref.local_loss_grad(o, t, t, 1.5, "jacobi", filt)
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(a, a_r)
    grad = C.upsample_rows(gc, None, s, 1.0 / (s * s), torch.float32, channels_last)
    torch.testing.assert_close(grad, grad_r)
    torch.testing.assert_close(C.sum_pool(o, s, 2.0), ref.coarse_input_grad(o, filt))


def test_large_inputs_split_across_threads(C: ModuleType) -> None:
    """Big enough for several parallel chunks; results equal the reference."""
    filt = FilterPair(2)
    o = torch.randn(64, 16, 32, 32)
    t, u = torch.randn(64, 16, 16, 16), torch.randn(64, 16, 16, 16)
    loss, a, gc = C.local_loss_fwd(o, t, u, 4.0, False, 2, True)
    loss_r, grad_r, a_r = ref.local_loss_grad(o, t, u, 4.0, "jacobi", filt)
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(a, a_r)
    torch.testing.assert_close(C.upsample_rows(gc, None, 2, 0.25, torch.float32, False), grad_r)
    gz = torch.randn(64, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(C.sum_pool(gz, 2, 64.0), ref.coarse_input_grad(gz, filt))

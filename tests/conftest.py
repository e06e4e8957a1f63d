import os

import pytest
import torch

# CI has 2 cores; tests that spawn processes set their own thread counts.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def clean_backend(monkeypatch):
    """No LAYERPAR_OPS override and fresh backend caches around a test (ops dispatch tests)."""
    from layerpar_fast import ops
    monkeypatch.delenv("LAYERPAR_OPS", raising=False)
    ops.reset_backend_cache()
    yield
    ops.reset_backend_cache()

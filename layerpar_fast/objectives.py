"""Reference torch code for the local losses and the auxiliary-variable updates (docs/method.md §3-§4).

This module is the oracle: every fused path (C++ extension, Triton) is tested against it.
Notation (one mini-batch of B samples at a cut with coarse per-sample size ``d``):

* ``o``: stage output (B, C, H, W); ``a = D(o)`` its coarse version (B, C, H/s, W/s).
* ``lam``: λ̃ rows of the target store; ``u``: scaled multipliers (Jacobi/penalty form);
  ``mu``: unscaled multipliers μ = (β/d)·u (Gauss-Seidel form).
* ``g = B·Uᵀ(∂ℓ_{k+1}/∂z_k)``: the coarse back-propagated signal computed by the next stage.

Loss forms (``form``):

* ``"jacobi"`` (penalty when ``mult is None``): ℓ = mean_i (β/(2d))‖a_i − λ̃_i + u_i‖²,
  ∂ℓ/∂o = (β/d)·Dᵀ(a − λ̃ + u)/B.
* ``"gs"``: ℓ = mean_i [⟨a_i, μ_i⟩ + (β/(2d))‖a_i − λ̃_i‖²],  ∂ℓ/∂o = Dᵀ(μ + (β/d)(a − λ̃))/B.

All arithmetic is fp32 whatever the storage dtype of λ̃/u/μ (float64 inputs stay float64).
"""
from __future__ import annotations

import torch

from .filters import FilterPair

LOSS_FORMS = ("jacobi", "gs")


def _up(t: torch.Tensor) -> torch.Tensor:
    """fp32 arithmetic for fp32/bf16/fp16 inputs; float64 stays float64 (tests, gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def coarse_dim(t: torch.Tensor) -> int:
    """d: the number of coarse elements per sample of a (B, C, h, w) tensor."""
    return int(t[0].numel())


def _residual(a: torch.Tensor, lam: torch.Tensor, mult: torch.Tensor | None) -> torch.Tensor:
    r = a - _up(lam)
    return r if mult is None else r + _up(mult)


def local_loss(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, beta: float,
               form: str, filt: FilterPair) -> tuple[torch.Tensor, torch.Tensor]:
    """Local loss of a stage k < K and its coarse output.

    Returns ``(loss, a)``: ``loss`` is a scalar differentiable w.r.t. ``o``; ``a = D(o)`` is
    detached fp32 (kept for the λ-step / sent to the next stage).
    """
    a = filt.down(_up(o))
    d = coarse_dim(a)
    if form == "jacobi":
        r = _residual(a, target, mult)
        loss = (beta / (2.0 * d)) * r.pow(2).flatten(1).sum(1).mean()
    elif form == "gs":
        if mult is None:
            raise ValueError("the Gauss-Seidel loss form needs the multiplier rows mu")
        lin = (a * _up(mult)).flatten(1).sum(1)
        prox = (a - _up(target)).pow(2).flatten(1).sum(1)
        loss = (lin + (beta / (2.0 * d)) * prox).mean()
    else:
        raise ValueError(f"unknown loss form {form!r}; valid: {LOSS_FORMS}")
    return loss, a.detach()


def local_loss_grad(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, beta: float,
                    form: str, filt: FilterPair) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed form of :func:`local_loss` and its gradient: ``(loss, grad_o, a)`` (all fp32)."""
    a = filt.down(_up(o.detach()))
    b = a.shape[0]
    d = coarse_dim(a)
    if form == "jacobi":
        r = _residual(a, target, mult)
        loss = (beta / (2.0 * d)) * r.pow(2).sum() / b
        coarse = (beta / d) * r
    elif form == "gs":
        if mult is None:
            raise ValueError("the Gauss-Seidel loss form needs the multiplier rows mu")
        diff = a - _up(target)
        loss = ((a * _up(mult)).sum() + (beta / (2.0 * d)) * diff.pow(2).sum()) / b
        coarse = _up(mult) + (beta / d) * diff
    else:
        raise ValueError(f"unknown loss form {form!r}; valid: {LOSS_FORMS}")
    return loss, filt.down_adjoint(coarse) / b, a


def coarse_input_grad(grad_z: torch.Tensor, filt: FilterPair) -> torch.Tensor:
    """g = B·Uᵀ(grad_z): the per-sample coarse signal sent from stage k+1 to stage k (fp32)."""
    return filt.up_adjoint(_up(grad_z)) * float(grad_z.shape[0])


def lambda_step(lam: torch.Tensor, u: torch.Tensor | None, a: torch.Tensor, g: torch.Tensor,
                beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Jacobi λ-step and (AL, ``u`` given) multiplier step on gathered rows; fp32 results.

    λ̃⁺ = γ(a + u) + (1 − γ)λ̃ − γ(d/β)g ;  u⁺ = u + (a − λ̃⁺)   (penalty: u ≡ 0, no u⁺).
    """
    d = coarse_dim(a)
    lam32 = _up(lam)
    au = a if u is None else a + _up(u)
    lam_new = gamma * au + (1.0 - gamma) * lam32 - (gamma * d / beta) * g
    u_new = None if u is None else _up(u) + (a - lam_new)
    return lam_new, u_new


def jacobi_update_(lam_store: torch.Tensor, u_store: torch.Tensor | None, idx: torch.Tensor,
                   a: torch.Tensor, g: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Apply :func:`lambda_step` in place on rows ``idx`` of the stores; returns the new λ̃ rows
    in the store dtype (what is sent to the next stage)."""
    lam = lam_store.index_select(0, idx)
    u = None if u_store is None else u_store.index_select(0, idx)
    lam_new, u_new = lambda_step(lam, u, a, g, beta, gamma)
    lam_rows = lam_new.to(lam_store.dtype)
    lam_store.index_copy_(0, idx, lam_rows)
    if u_store is not None:
        u_store.index_copy_(0, idx, u_new.to(u_store.dtype))
    return lam_rows


def gather_rows(store: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of a store, in the store's dtype."""
    return store.index_select(0, idx)


def scatter_rows_(store: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """store[idx] = rows (cast to the store dtype). Used for λ̃ ← a, μ ← g and λ̃ messages."""
    store.index_copy_(0, idx, rows.to(device=store.device, dtype=store.dtype))


def stage_input(store: torch.Tensor, idx: torch.Tensor, filt: FilterPair,
                channels_last: bool = False) -> torch.Tensor:
    """z = U(λ̃[idx]) in fp32: the input of stage k+1 built from its input store."""
    z = filt.up(_up(store.index_select(0, idx)))
    return z.contiguous(memory_format=torch.channels_last) if channels_last else z.contiguous()

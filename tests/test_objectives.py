"""The reference formulas of docs/method.md §3-§4 checked against independent autograd solves."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from layerpar_fast import objectives as ob
from layerpar_fast.filters import FilterPair

DT = torch.float64


def _two_stage(seed=0):
    torch.manual_seed(seed)
    s1 = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh()).to(DT)
    s2 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).to(DT)
    return s1, s2


def _per_sample_loss_grad(s2, filt, lam, y):
    """g_i = ∂h_i/∂λ̃_i by autograd on each sample separately (no batch coupling)."""
    rows = []
    for i in range(lam.shape[0]):
        li = lam[i:i + 1].clone().requires_grad_(True)
        h = F.cross_entropy(s2(filt.up(li)), y[i:i + 1])
        (gi,) = torch.autograd.grad(h, li)
        rows.append(gi)
    return torch.cat(rows)


@pytest.mark.parametrize("kind", ["avg_nearest", "avg_bilinear"])
def test_coarse_input_grad_is_per_sample_gradient(kind):
    filt = FilterPair(2, kind)
    _, s2 = _two_stage()
    lam = torch.randn(4, 3, 4, 4, dtype=DT)
    y = torch.tensor([0, 1, 2, 3])
    z = filt.up(lam).requires_grad_(True)
    loss = F.cross_entropy(s2(z), y)          # ℓ_{k+1}: batch mean
    (gz,) = torch.autograd.grad(loss, z)
    g = ob.coarse_input_grad(gz, filt).to(DT)
    torch.testing.assert_close(g, _per_sample_loss_grad(s2, filt, lam, y), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("al", [False, True])
def test_lambda_step_is_linearised_proximal_minimiser(gamma, al):
    """λ̃⁺ = argmin_λ Σ_i (β/2d)‖a−λ+u‖² + ⟨g, λ⟩ + (β/2d)((1−γ)/γ)‖λ−λ̃‖², with g from autograd
    of the stage-2 loss linearised at λ̃; minimised here by L-BFGS on the objective itself."""
    filt = FilterPair(2)
    s1, s2 = _two_stage()
    x = torch.randn(4, 2, 8, 8, dtype=DT)
    y = torch.tensor([0, 3, 1, 4])
    beta = 3.0
    a = filt.down(s1(x)).detach()
    d = a[0].numel()
    lam0 = a + 0.3 * torch.randn_like(a)
    u = 0.2 * torch.randn_like(a) if al else torch.zeros_like(a)

    # linearise L's data term at λ̃ with autograd (full objective L of §4, mean over samples)
    lam_var = lam0.clone().requires_grad_(True)
    ce = F.cross_entropy(s2(filt.up(lam_var)), y, reduction="sum")   # Σ_i h_i
    (g_auto,) = torch.autograd.grad(ce, lam_var)

    lam = lam0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([lam], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = ((beta / (2 * d)) * (a - lam + u).pow(2).sum() + (g_auto * lam).sum()
               + (beta / (2 * d)) * ((1 - gamma) / gamma) * (lam - lam0).pow(2).sum())
        obj.backward()
        return obj

    opt.step(closure)
    lam_new, u_new = ob.lambda_step(lam0, u if al else None, a, g_auto, beta, gamma)
    torch.testing.assert_close(lam_new.to(DT), lam.detach(), rtol=1e-6, atol=1e-8)
    if al:
        # multiplier step = dual ascent on μ = (β/d)u with step β/d: μ⁺ = μ + (β/d)·∂L/∂μ
        mu = ((beta / d) * u).clone().requires_grad_(True)
        lag = (mu * (a - lam_new.to(DT))).sum()
        (dmu,) = torch.autograd.grad(lag, mu)
        mu_new = mu.detach() + (beta / d) * dmu
        torch.testing.assert_close(u_new.to(DT), (d / beta) * mu_new)
    else:
        assert u_new is None


def test_al_fixed_point_with_frozen_theta():
    """θ frozen: repeated λ/u steps drive ‖a − λ̃‖ → 0 and u → (d/β)·g."""
    filt = FilterPair(2)
    s1, s2 = _two_stage(1)
    x = torch.randn(4, 2, 8, 8, dtype=DT)
    y = torch.tensor([1, 0, 4, 2])
    beta, gamma = 5.0, 0.5
    a = filt.down(s1(x)).detach()
    d = a[0].numel()
    lam = a + 0.5 * torch.randn_like(a)
    u = torch.zeros_like(a)
    first = (a - lam).norm() / lam.norm()
    for _ in range(300):
        g = _per_sample_loss_grad(s2, filt, lam, y)
        lam, u = ob.lambda_step(lam, u, a, g, beta, gamma)
    g = _per_sample_loss_grad(s2, filt, lam, y)
    viol = (a - lam).norm() / lam.norm()
    assert viol < 1e-6 * first + 1e-9
    torch.testing.assert_close(u, (d / beta) * g, rtol=1e-5, atol=1e-9)


def test_penalty_fixed_point_keeps_violation():
    """Penalty (u ≡ 0): the fixed point is λ̃ = a − (d/β)g, a violation of size (d/β)‖g‖."""
    filt = FilterPair(2)
    s1, s2 = _two_stage(2)
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    y = torch.tensor([1, 0, 4])
    beta = 5.0
    a = filt.down(s1(x)).detach()
    d = a[0].numel()
    lam = a.clone()
    for _ in range(200):
        g = _per_sample_loss_grad(s2, filt, lam, y)
        lam, _ = ob.lambda_step(lam, None, a, g, beta, 0.5)
    g = _per_sample_loss_grad(s2, filt, lam, y)
    torch.testing.assert_close(lam, a - (d / beta) * g, rtol=1e-6, atol=1e-9)
    assert (a - lam).norm() > 1e-4


@pytest.mark.parametrize("s", [1, 2, 4])
def test_gauss_seidel_form_equals_jacobi_form_gradient(s):
    """mean[⟨a,μ⟩ + (β/2d)‖a−λ̃‖²] and (β/2d)·mean‖a−λ̃+u‖² with μ = (β/d)u give the same θ-gradient."""
    filt = FilterPair(s)
    torch.manual_seed(3)
    stage = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()).to(DT)
    x = torch.randn(5, 2, 8, 8, dtype=DT)
    a0 = filt.down(stage(x)).detach()
    d = a0[0].numel()
    beta = 2.5
    lam = a0 + 0.1 * torch.randn_like(a0)
    u = 0.3 * torch.randn_like(a0)
    grads = []
    for form, mult in (("jacobi", u), ("gs", (beta / d) * u)):
        stage.zero_grad()
        loss, _ = ob.local_loss(stage(x), lam, mult, beta, form, filt)
        loss.backward()
        grads.append([p.grad.clone() for p in stage.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2.to(g1.dtype), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("form, penalty", [("jacobi", False), ("jacobi", True), ("gs", False)])
def test_closed_form_gradient_matches_autograd(form, penalty):
    filt = FilterPair(2)
    o = torch.randn(3, 4, 8, 8, requires_grad=True)
    lam = torch.randn(3, 4, 4, 4).to(torch.bfloat16)
    mult = None if penalty else torch.randn(3, 4, 4, 4)
    loss, a = ob.local_loss(o, lam, mult, 1.7, form, filt)
    (g,) = torch.autograd.grad(loss, o)
    loss2, g2, a2 = ob.local_loss_grad(o, lam, mult, 1.7, form, filt)
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(a, a2)


def test_jacobi_update_in_place_on_rows():
    store = torch.randn(10, 2, 2, 2)
    ustore = torch.randn(10, 2, 2, 2)
    idx = torch.tensor([7, 2, 5])
    a, g = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    lam_ref, u_ref = ob.lambda_step(store[idx], ustore[idx], a, g, 2.0, 0.5)
    before = store.clone()
    rows = ob.jacobi_update_(store, ustore, idx, a, g, 2.0, 0.5)
    torch.testing.assert_close(rows, lam_ref)
    torch.testing.assert_close(store[idx], lam_ref)
    torch.testing.assert_close(ustore[idx], u_ref)
    untouched = torch.tensor([i for i in range(10) if i not in (7, 2, 5)])
    assert torch.equal(store[untouched], before[untouched])

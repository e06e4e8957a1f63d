"""Stability monitors of the parallel phase (docs/method.md §3-§4).

* :func:`estimate_kappa`: κ_k, the top eigenvalue of (1/d_k)·E[JᵀJ] (J = ∂a_k/∂θ_k), by power
  iteration with Gauss-Newton-vector products. The local-loss curvature in θ_k is β·κ_k.
* :func:`param_norm`: ‖θ_k‖.
* :func:`cosine`: cosine similarity of two gradient lists.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .filters import FilterPair


def _bn_buffers(module: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out.append((m, {k: v.clone() for k, v in m.named_buffers(recurse=False)}))
    return out


class frozen_bn_stats:
    """Context manager: run modules in train mode but restore BatchNorm running statistics."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> "frozen_bn_stats":
        self.saved = _bn_buffers(self.module)
        return self

    def __exit__(self, *exc: object) -> None:
        for m, bufs in self.saved:
            for k, v in bufs.items():
                getattr(m, k).copy_(v)


def estimate_kappa(stage: nn.Module, z: torch.Tensor, filt: FilterPair, iters: int = 20,
                   seed: int = 0) -> float:
    """λ_max of the Gauss-Newton matrix (1/d)·mean_i J_iᵀJ_i of a = D(stage(z)) w.r.t. the
    stage parameters, by ``iters`` power iterations (train mode, BN statistics restored)."""
    params = [p for p in stage.parameters() if p.requires_grad]
    if iters <= 0 or not params:
        return float("nan")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    norm = math.sqrt(sum(float((x * x).sum()) for x in v))
    v = [x / norm for x in v]
    kappa = float("nan")
    was_training = stage.training
    stage.train()
    with frozen_bn_stats(stage):
        for _ in range(iters):
            with torch.enable_grad():
                a = filt.down(stage(z.detach()).float())
                d = a[0].numel()
                a0 = a.detach()
                f = 0.5 / d * (a - a0).pow(2).flatten(1).sum(1).mean()
                grads = torch.autograd.grad(f, params, create_graph=True)
                dot = sum((g * x).sum() for g, x in zip(grads, v))
                hv = torch.autograd.grad(dot, params, allow_unused=True)
            hv = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]
            kappa = sum(float((h * x).sum()) for h, x in zip(hv, v))
            norm = math.sqrt(sum(float((h * h).sum()) for h in hv))
            if norm == 0.0:
                kappa = 0.0
                break
            v = [h / norm for h in hv]
    stage.train(was_training)
    return kappa


def param_norm(module: nn.Module) -> float:
    return math.sqrt(sum(float(p.detach().pow(2).sum()) for p in module.parameters()))


def cosine(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    """Cosine between two gradient lists (None entries count as zeros)."""
    dot = na = nb = 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            na += 0.0 if x is None else float(x.pow(2).sum())
            nb += 0.0 if y is None else float(y.pow(2).sum())
            continue
        dot += float((x * y).sum())
        na += float(x.pow(2).sum())
        nb += float(y.pow(2).sum())
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")

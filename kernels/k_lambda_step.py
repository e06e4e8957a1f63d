"""Jacobi λ-step and AL multiplier step on store rows, in place, in one pass (docs/method.md §4).

    λ̃⁺ = γ(a + u) + (1 − γ)λ̃ − γ(d/β)g ;   u⁺ = u + (a − λ̃⁺)   (float32 arithmetic)

Reads λ̃/u rows (store dtype) through the sample index, writes them back cast to the store
dtype and also writes the new λ̃ rows contiguously (the message for the next stage). With
repeated indices the caller runs it out of place and scatters the last occurrences.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import LAMBDA_BLOCK


@triton.jit
def _lambda_step_kernel(lam_ptr, u_ptr, idx_ptr, a_ptr, g_ptr, out_ptr, uout_ptr, d, cg, c1g, cgd,
                        HAS_U: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    row = tl.load(idx_ptr + b).to(tl.int64)
    src = row * d + offs
    dst = b * d + offs
    lam = tl.load(lam_ptr + src, mask=mask, other=0.0).to(tl.float32)
    av = tl.load(a_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    gv = tl.load(g_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    au = av
    if HAS_U:
        uk = tl.load(u_ptr + src, mask=mask, other=0.0).to(tl.float32)
        au = av + uk
    ln = cg * au + c1g * lam - cgd * gv
    tl.store(out_ptr + dst, ln, mask=mask)
    if IN_PLACE:
        tl.store(lam_ptr + src, ln, mask=mask)
    if HAS_U:
        un = uk + (av - ln)
        if IN_PLACE:
            tl.store(u_ptr + src, un, mask=mask)
        else:
            tl.store(uout_ptr + dst, un, mask=mask)


def lambda_step_(lam_store: torch.Tensor, u_store: torch.Tensor | None, idx: torch.Tensor,
                 a: torch.Tensor, g: torch.Tensor, beta: float, gamma: float,
                 last: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the step to rows ``idx`` of the contiguous stores; returns the new λ̃ rows.

    ``last``: positions of the last occurrence of each row when ``idx`` has repeats (None: no
    repeats); every occurrence then reads the old row and the last one is stored.
    """
    bsz = idx.numel()
    d = lam_store[0].numel() if lam_store.shape[0] else 0
    out = torch.empty((bsz, *lam_store.shape[1:]), dtype=lam_store.dtype, device=lam_store.device)
    if bsz == 0 or d == 0:
        return out
    a32 = a.to(torch.float32).contiguous()
    g32 = g.to(torch.float32).contiguous()
    in_place = last is None
    u_arg = u_store if u_store is not None else lam_store
    u_out = torch.empty_like(out) if (u_store is not None and not in_place) else out
    grid = (bsz, triton.cdiv(d, LAMBDA_BLOCK))
    _lambda_step_kernel[grid](lam_store, u_arg, idx, a32, g32, out, u_out, d, float(gamma),
                              float(1.0 - gamma), float(gamma * d / beta), HAS_U=u_store is not None,
                              IN_PLACE=in_place, BLOCK=LAMBDA_BLOCK, num_warps=4)
    if not in_place:
        rows = idx[last]
        lam_store.index_copy_(0, rows, out[last])
        if u_store is not None:
            u_store.index_copy_(0, rows, u_out[last])
    return out

"""Fused local loss (docs/method.md §3): a = D(o), the loss and ∂loss/∂a in one pass over o.

The forward kernel reads each fine element of ``o`` once (any strides: NCHW or channels_last),
writes the coarse ``a`` and the coarse gradient ``gc``, and one partial loss per program; the
backward is :func:`layerpar_fast.kernels.k_upsample.upsample` of ``gc`` scaled by grad_loss/s².
Arithmetic is float32 whatever the dtypes of o and of the stored rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import block_configs, min_block
from ._pool import window_sum

MODE_PENALTY, MODE_AL, MODE_GS = 0, 1, 2


@triton.autotune(configs=block_configs(), key=["n", "S", "MODE"], reset_to_zero=["part_ptr"])
@triton.jit
def _local_loss_fwd_kernel(o_ptr, t_ptr, m_ptr, a_ptr, gc_ptr, part_ptr, n, C, h, w,
                           so_b, so_c, so_h, so_w, coef, inv_b,
                           S: tl.constexpr, MODE: tl.constexpr, NEED_GRAD: tl.constexpr,
                           WRITE_A: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = window_sum(o_ptr, offs, mask, C, h, w, so_b, so_c, so_h, so_w, S, BLOCK)
    a = acc * (1.0 / (S * S))
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 2:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        diff = a - t
        part = a * m + 0.5 * coef * diff * diff
        g = (m + coef * diff) * inv_b
    else:
        r = a - t
        if MODE == 1:
            r += tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        part = 0.5 * coef * r * r
        g = coef * r * inv_b
    if WRITE_A:
        tl.store(a_ptr + offs, a, mask=mask)
    if NEED_GRAD:
        tl.store(gc_ptr + offs, g, mask=mask)
    tl.store(part_ptr + pid, tl.sum(tl.where(mask, part, 0.0), axis=0))


def local_loss_fwd(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, beta: float,
                   gs: bool, s: int, need_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(loss, a, gc)`` for stage output ``o`` (B, C, H, W) and coarse rows target/mult.

    ``loss`` is a 0-dim float32 tensor on o's device (no host synchronisation), ``a`` and ``gc``
    are contiguous float32 (B, C, H/s, W/s); ``gc`` is None unless ``need_grad``; ``a`` is None
    when s = 1 and o is contiguous float32 (then a is o itself and is not written).
    """
    bsz, ch, hh, ww = o.shape
    h, w = hh // s, ww // s
    n = bsz * ch * h * w
    d = ch * h * w
    t = target.contiguous()
    m = mult.contiguous() if mult is not None else t
    write_a = not (s == 1 and o.dtype == torch.float32 and o.is_contiguous())
    coarse = (bsz, ch, h, w)
    a = torch.empty(coarse, dtype=torch.float32, device=o.device) if write_a else o  # o: unused pointer
    gc = torch.empty(coarse, dtype=torch.float32, device=o.device) if need_grad else a
    part = torch.zeros(triton.cdiv(n, min_block()), dtype=torch.float32, device=o.device)
    mode = MODE_GS if gs else (MODE_AL if mult is not None else MODE_PENALTY)
    so = o.stride()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK"]),)

    _local_loss_fwd_kernel[grid](o, t, m, a, gc, part, n, ch, h, w, so[0], so[1], so[2], so[3],
                                 float(beta) / d, 1.0 / bsz, S=s, MODE=mode, NEED_GRAD=need_grad,
                                 WRITE_A=write_a)
    loss = part.sum() * (1.0 / bsz)
    return loss, (a if write_a else None), (gc if need_grad else None)

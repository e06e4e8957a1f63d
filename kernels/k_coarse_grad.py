"""Coarse input gradient g = B·Uᵀ(grad_z) for the avg/nearest pair: B × s×s sum pooling (§4).

Reads grad_z once with arbitrary strides (NCHW or channels_last) and writes float32 NCHW.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import block_configs
from ._pool import window_sum


@triton.autotune(configs=block_configs(), key=["n", "S"])
@triton.jit
def _sum_pool_kernel(x_ptr, out_ptr, n, C, h, w, sx_b, sx_c, sx_h, sx_w, scale,
                     S: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = window_sum(x_ptr, offs, mask, C, h, w, sx_b, sx_c, sx_h, sx_w, S, BLOCK)
    tl.store(out_ptr + offs, acc * scale, mask=mask)


def coarse_input_grad(grad_z: torch.Tensor, s: int) -> torch.Tensor:
    """B·(s×s sum pooling of grad_z) as contiguous float32 (B, C, H/s, W/s)."""
    bsz, ch, hh, ww = grad_z.shape
    h, w = hh // s, ww // s
    out = torch.empty((bsz, ch, h, w), dtype=torch.float32, device=grad_z.device)
    n = out.numel()
    if n == 0:
        return out
    sx = grad_z.stride()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK"]),)

    _sum_pool_kernel[grid](grad_z, out, n, ch, h, w, sx[0], sx[1], sx[2], sx[3], float(bsz), S=s)
    return out

"""Nearest-neighbour upsampling U with a fused row gather, scale and cast (docs/method.md §2).

Used for the stage input z = U(store[idx]) (fp32, NCHW or channels_last) and for the backward
of the fused local loss, grad_o = Dᵀ(gc)·grad_loss = U(gc)·grad_loss/s² (grad_loss read from
device memory, so the backward never synchronises with the host). One program covers BLOCK
fine elements in the output's memory order, so stores are coalesced in either layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import block_configs
from ._pool import nchw_index


@triton.autotune(configs=block_configs(), key=["n", "S", "CHANNELS_LAST", "HAS_IDX"])
@triton.jit
def _upsample_kernel(src_ptr, idx_ptr, out_ptr, scale_ptr, scale, n, C, H, W, h, w, row_stride,
                     S: tl.constexpr, HAS_IDX: tl.constexpr, HAS_SCALE_PTR: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if CHANNELS_LAST:
        c = offs % C
        q = offs // C
        x = q % W
        q = q // W
        y = q % H
        b = q // H
    else:
        b, c, y, x = nchw_index(offs, C, H, W)
    if HAS_IDX:
        row = tl.load(idx_ptr + b, mask=mask, other=0).to(tl.int64)
    else:
        row = b
    v = tl.load(src_ptr + row * row_stride + (c * h + y // S) * w + x // S, mask=mask, other=0.0)
    sc = scale
    if HAS_SCALE_PTR:
        sc = sc * tl.load(scale_ptr).to(tl.float32)
    tl.store(out_ptr + offs, v.to(tl.float32) * sc, mask=mask)


def upsample(src: torch.Tensor, idx: torch.Tensor | None, s: int, out_dtype: torch.dtype,
             channels_last: bool, scale: float = 1.0, scale_tensor: torch.Tensor | None = None
             ) -> torch.Tensor:
    """``scale·scale_tensor·U(src[idx])`` (idx None: all rows) as a new (B, C, h·s, w·s) tensor.

    ``src`` is a contiguous (N, C, h, w) store or coarse tensor of any float dtype; ``idx`` a
    1-D int64/int32 tensor on src's device, already range-checked by the caller.
    """
    srcc = src.contiguous()
    _, ch, h, w = srcc.shape
    bsz = idx.numel() if idx is not None else srcc.shape[0]
    hh, ww = h * s, w * s
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((bsz, ch, hh, ww), dtype=out_dtype, device=srcc.device, memory_format=fmt)
    n = out.numel()
    if n == 0:
        return out
    idx_arg = idx if idx is not None else srcc
    sc_arg = scale_tensor if scale_tensor is not None else srcc

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK"]),)

    _upsample_kernel[grid](srcc, idx_arg, out, sc_arg, float(scale), n, ch, hh, ww, h, w, ch * h * w,
                           S=s, HAS_IDX=idx is not None, HAS_SCALE_PTR=scale_tensor is not None,
                           CHANNELS_LAST=channels_last)
    return out

"""Index arithmetic and the read shared by the kernels: NCHW coordinates of flat indices, and
the s×s window of every coarse element of a tile."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nchw_index(offs, C, H, W):
    """(b, c, y, x) of the flat NCHW indices ``offs`` of a (·, C, H, W) tensor."""
    x = offs % W
    q = offs // W
    y = q % H
    q = q // H
    return q // C, q % C, y, x


@triton.jit
def window_sum(x_ptr, offs, mask, C, h, w, sx_b, sx_c, sx_h, sx_w,
               S: tl.constexpr, BLOCK: tl.constexpr):
    """Float32 sums of the S×S fine windows under the coarse NCHW flat indices ``offs`` (coarse
    grid C×h×w) of a fine tensor with strides (sx_b, sx_c, sx_h, sx_w): NCHW or channels_last."""
    b, c, i, j = nchw_index(offs, C, h, w)
    base = b * sx_b + c * sx_c + (i * S) * sx_h + (j * S) * sx_w
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for dy in tl.static_range(S):
        for dx in tl.static_range(S):
            acc += tl.load(x_ptr + base + dy * sx_h + dx * sx_w, mask=mask, other=0.0).to(tl.float32)
    return acc

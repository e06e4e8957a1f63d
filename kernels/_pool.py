"""The read shared by the pooling kernels: the s×s window of every coarse element of a tile."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def window_sum(x_ptr, offs, mask, C, h, w, sx_b, sx_c, sx_h, sx_w,
               S: tl.constexpr, BLOCK: tl.constexpr):
    """Float32 sums of the S×S fine windows under the coarse NCHW flat indices ``offs`` (coarse
    grid C×h×w) of a fine tensor with strides (sx_b, sx_c, sx_h, sx_w): NCHW or channels_last."""
    j = offs % w
    q = offs // w
    i = q % h
    q = q // h
    c = q % C
    b = q // C
    base = b * sx_b + c * sx_c + (i * S) * sx_h + (j * S) * sx_w
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for dy in tl.static_range(S):
        for dx in tl.static_range(S):
            acc += tl.load(x_ptr + base + dy * sx_h + dx * sx_w, mask=mask, other=0.0).to(tl.float32)
    return acc

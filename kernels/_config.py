"""Autotuning configurations shared by the elementwise/pooling kernels."""
from __future__ import annotations

import triton

from . import INTERPRET

#: Elements per program of the in-place λ-step kernel (never autotuned: benchmarking an in-place
#: kernel would apply the step several times).
LAMBDA_BLOCK: int = 1024 if INTERPRET else 2048


def block_configs() -> list[triton.Config]:
    """BLOCK/num_warps candidates for memory-bound kernels on Hopper (one config when interpreted)."""
    if INTERPRET:
        return [triton.Config({"BLOCK": 1024}, num_warps=1)]
    return [triton.Config({"BLOCK": b}, num_warps=w)
            for b in (512, 1024, 2048, 4096) for w in (4, 8) if not (b == 512 and w == 8)]


def min_block() -> int:
    """The smallest BLOCK among :func:`block_configs` (sizes per-program partial buffers)."""
    return min(c.kwargs["BLOCK"] for c in block_configs())

"""``python -m layerpar_fast.info`` / ``layerpar info``: versions, threads and fast paths."""
from __future__ import annotations

import os

import torch

from . import __version__
from .metrics import environment


def info_dict() -> dict:
    env = environment()
    out = {"layerpar_fast": __version__, **env,
           "interop_threads": torch.get_num_interop_threads(),
           "cuda_available": torch.cuda.is_available(),
           "distributed": torch.distributed.is_available(),
           "gloo": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
           "nccl": torch.distributed.is_available() and torch.distributed.is_nccl_available(),
           "LAYERPAR_OPS": os.environ.get("LAYERPAR_OPS", "auto")}
    from . import ops
    try:
        out["ops"] = ops.backend_report()
    except Exception as e:  # a bad LAYERPAR_OPS value is reported, not raised
        out["ops"] = f"error: {e}"
    describe = getattr(ops, "describe", None)
    if describe is not None:
        out["fast_paths"] = describe()
    return out


def info_text() -> str:
    lines = []
    for k, v in info_dict().items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            lines.extend(f"  {kk}: {vv}" for kk, vv in v.items())
        else:
            lines.append(f"{k}: {v}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(info_text())

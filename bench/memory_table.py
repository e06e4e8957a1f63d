"""Memory table: auxiliary-store bytes per rank of layer-parallel SPH, beside DDP's and GPipe's
per-device activation memory, for CIFAR-10 ResNets and WideResNets.

    python bench/memory_table.py            # writes bench/results/memory_table.md and .json
    python bench/memory_table.py --quick    # ResNet-20 only (a smoke test)

**Auxiliary stores** (computed from the cut shapes, no training): the trainer's cuts (balanced
by forward FLOPs, ``stages.parse_cuts(None, ..., balance="flops")``, the default) give the
activation shape (C, H, W) at each cut k = 0..K-2 (``models.cut_points``); the stored rows are
the coarse (C, H/s, W/s) (``FilterPair.coarse_shape``), one per training sample (N = 50,000).
Exactly what ``_make_stores`` (phase_parallel.py) allocates: the owner of stage k holds its
target store λ̃_k and, for AL, its multiplier store (u_k or μ_k); the owner of stage k+1 holds a
copy of λ̃_k as its input store. So rank r holds

    N * bytes(dtype) * ( [r > 0] * E_{r-1} + [r < K-1] * E_r * (2 for AL, 1 for penalty) ),

E_k = C_k H_k W_k / s². With --parallel-augment shift_flip every store has 2N rows (twice this).
The trainer records the sum over ranks as ``aux_memory_bytes`` (tests/test_memory_table.py
checks the formula against a real run).

**Activations** (estimation rule): the bytes of the tensors that autograd saves for the
backward pass during one training-mode forward (``torch.autograd.graph.saved_tensors_hooks``,
each storage counted once, parameters excluded), measured per block once on a batch of
``--probe-batch`` images in fp32 and scaled linearly to the batch (the per-channel BatchNorm
statistics that do not scale are negligible). Model states, gradients, optimizer states and
workspace are not counted: the columns compare what each scheme keeps per sample.

* DDP on K devices, global batch 128: every device holds the whole network's activations for
  its 128/K samples.
* GPipe on K devices, mini-batch 128 in M micro-batches, no re-materialisation: stage k keeps
  the activations of all micro-batches in flight until their backward passes, i.e. its layers'
  activations for all 128 samples; the table gives the largest stage. (With
  re-materialisation it would keep only its input boundary for 128 samples plus one
  micro-batch's activations.)
* SPH itself (for reference): a stage's activations for its batch of 128, the same as GPipe's
  per stage, plus the auxiliary stores above, which scale with the data set rather than the batch
  and can live in host memory (--aux-device host).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from layerpar_fast.filters import FilterPair  # noqa: E402
from layerpar_fast.models import build_model, cut_points  # noqa: E402
from layerpar_fast.stages import as_block_sequence, parse_cuts  # noqa: E402

MODELS = {"resnet20": "ResNet-20", "resnet56": "ResNet-56", "resnet110": "ResNet-110",
          "wrn16_4": "WRN-16-4", "wrn28_10": "WRN-28-10"}
KS = (2, 4)
DS = (1, 2, 4)
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
CIFAR_N = 50_000
INPUT = (3, 32, 32)
BATCH = 128


def cuts_and_shapes(model_name: str, k: int, input_shape: tuple[int, int, int] = INPUT,
                    num_classes: int = 10) -> tuple[list[int], list[tuple[int, int, int]], torch.nn.Sequential]:
    """The trainer's default cuts (balanced by FLOPs) and the activation shape at each cut."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=num_classes, in_channels=input_shape[0], image_size=input_shape[-1])
    staged = as_block_sequence(model)
    cuts = parse_cuts(None, staged, k, input_shape, balance="flops") if k > 1 else []
    shapes = {c.index: c.shape for c in cut_points(staged.blocks, input_shape)}
    return list(cuts), [shapes[c] for c in cuts], staged.blocks


def store_bytes_per_rank(cut_shapes: list[tuple[int, int, int]], ds: int, dtype: str, num_samples: int,
                         method: str = "al", filt: str = "avg_nearest") -> list[int]:
    """Bytes of the auxiliary stores each rank holds (see the module docstring)."""
    f = FilterPair(ds, filt)
    elems = [math.prod(f.coarse_shape(tuple(s))) for s in cut_shapes]
    k = len(cut_shapes) + 1
    per_own = 2 if method == "al" else 1
    b = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    return [num_samples * b * ((elems[r - 1] if r > 0 else 0) + (elems[r] * per_own if r < k - 1 else 0))
            for r in range(k)]


def activation_bytes_per_block(blocks: torch.nn.Sequential, batch: int,
                               input_shape: tuple[int, int, int] = INPUT) -> list[int]:
    """Bytes autograd saves for backward in each block during one training-mode fp32 forward of
    ``batch`` images (each storage once, parameters excluded)."""
    params = {p.data_ptr() for p in blocks.parameters()}
    seen: set[int] = set()
    per_block = [0] * len(blocks)
    current = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        if ptr not in params and ptr not in seen and t.device.type != "meta":
            seen.add(ptr)
            per_block[current[0]] += nbytes
        return t

    blocks.train()
    x = torch.randn(batch, *input_shape)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for i, blk in enumerate(blocks):
            current[0] = i
            x = blk(x)
    del x
    return per_block


def activation_estimates(blocks: torch.nn.Sequential, cuts: list[int], k: int, probe_batch: int,
                         per_block: list[int] | None = None) -> dict[str, Any]:
    """DDP and GPipe per-device activation bytes at global batch BATCH (see the module docstring)."""
    if per_block is None:
        per_block = activation_bytes_per_block(blocks, probe_batch)
    per_sample = [b / probe_batch for b in per_block]
    bounds = [0, *cuts, len(blocks)]
    stage = [sum(per_sample[a:b]) for a, b in zip(bounds, bounds[1:])]
    return {"ddp_per_device": int(round(sum(per_sample) * BATCH / k)),
            "gpipe_per_stage": [int(round(s * BATCH)) for s in stage],
            "gpipe_max": int(round(max(stage) * BATCH)),
            "whole_model_batch": int(round(sum(per_sample) * BATCH))}


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def build(models: list[str], probe_batch: int) -> dict[str, Any]:
    rows, acts = [], []
    for name in models:
        blocks_cache: list[int] | None = None
        for k in KS:
            cuts, shapes, blocks = cuts_and_shapes(name, k)
            if blocks_cache is None:
                t0 = time.perf_counter()
                blocks_cache = activation_bytes_per_block(blocks, probe_batch)
                print(f"{name}: activations measured in {time.perf_counter() - t0:.1f}s", flush=True)
            est = activation_estimates(blocks, cuts, k, probe_batch, blocks_cache)
            acts.append({"model": name, "K": k, "cuts": cuts, **est})
            for ds in DS:
                for dtype in DTYPE_BYTES:
                    try:
                        al = store_bytes_per_rank(shapes, ds, dtype, CIFAR_N, "al")
                        pen = store_bytes_per_rank(shapes, ds, dtype, CIFAR_N, "penalty")
                    except ValueError as e:     # s does not divide a cut's grid
                        rows.append({"model": name, "K": k, "s": ds, "dtype": dtype, "error": str(e)})
                        continue
                    rows.append({"model": name, "K": k, "cuts": cuts, "cut_shapes": [list(s) for s in shapes],
                                 "s": ds, "dtype": dtype, "al_per_rank": al, "al_max": max(al), "al_total": sum(al),
                                 "penalty_per_rank": pen, "penalty_max": max(pen)})
    return {"num_samples": CIFAR_N, "input": list(INPUT), "batch": BATCH, "probe_batch": probe_batch,
            "stores": rows, "activations": acts}


def markdown(res: dict[str, Any]) -> str:
    out = ["# Memory: auxiliary stores of SPH vs. activations of DDP and GPipe", "",
           f"CIFAR-10 ({res['num_samples']:,} training images, 32x32); cuts balanced by forward FLOPs (the "
           "trainer's default). Generated by `python bench/memory_table.py`; the rules are in its docstring.", "",
           "## Auxiliary stores per rank (MiB)", "",
           "AL: rank k holds λ̃_k and μ_k (u_k) of its cut and a copy of λ̃_{k-1} as its input store; penalty has no "
           "multiplier store. `max` is the largest rank; `per rank` lists ranks 0..K-1. These can live on the "
           "device or, with `--aux-device host`, in pinned host memory.", "",
           "| model | K | cut shapes (C,H,W) | s | dtype | AL per rank | AL max | AL total | penalty max |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["stores"]:
        if "error" in r:
            out.append(f"| {MODELS[r['model']]} | {r['K']} | - | {r['s']} | {r['dtype']} | n/a ({r['error']}) | | | |")
            continue
        shapes = " ".join(f"{c}x{h}x{w}" for c, h, w in r["cut_shapes"])
        out.append(f"| {MODELS[r['model']]} | {r['K']} | {shapes} | {r['s']} | {r['dtype']} | "
                   f"{' / '.join(mib(b) for b in r['al_per_rank'])} | {mib(r['al_max'])} | {mib(r['al_total'])} | "
                   f"{mib(r['penalty_max'])} |")
    out += ["", f"## Activation memory per device at batch {res['batch']} (MiB, fp32)", "",
            "Saved-for-backward tensors of a training-mode forward, measured with saved-tensor hooks on a batch of "
            f"{res['probe_batch']} and scaled to the batch. DDP: the whole network for 128/K samples per device. "
            "GPipe (no re-materialisation): the largest stage's activations for all 128 samples (every micro-batch "
            "in flight). SPH's own per-stage activations equal GPipe's column; its stores come on top (table above).",
            "", "| model | K | cuts | DDP per device | GPipe max stage | GPipe per stage | whole model, batch 128 |",
            "|---|---|---|---|---|---|---|"]
    for a in res["activations"]:
        out.append(f"| {MODELS[a['model']]} | {a['K']} | {','.join(map(str, a['cuts']))} | {mib(a['ddp_per_device'])} | "
                   f"{mib(a['gpipe_max'])} | {' / '.join(mib(b) for b in a['gpipe_per_stage'])} | "
                   f"{mib(a['whole_model_batch'])} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="ResNet-20 only")
    p.add_argument("--probe-batch", type=int, default=4, help="batch of the activation measurement")
    p.add_argument("--out", default=os.path.join(HERE, "results", "memory_table"),
                   help="output path without extension (.md and .json are written)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    res = build(["resnet20"] if args.quick else list(MODELS), args.probe_batch)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(res))
    print(f"wrote {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

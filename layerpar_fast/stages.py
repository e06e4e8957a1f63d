"""Cut a flat ``nn.Sequential`` into K contiguous stages, choose balanced cuts, and reassemble.

A *cut* ``c`` sits between ``model[c-1]`` and ``model[c]``; cuts ``[c_1, ..., c_{K-1}]`` give
stages ``model[0:c_1], model[c_1:c_2], ..., model[c_{K-1}:]``. Stages share the model's block
objects, so training a stage trains the model, and ``assemble`` gives back the serial twin.

>>> from layerpar_fast.models import build_model
>>> model = build_model("resnet20")
>>> cuts = balance_by_flops(model, 2, (3, 32, 32))
>>> stages = split_model(model, cuts)
>>> assemble(stages)[0] is model[0]
True
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .models import model_flops

__all__ = ["StagingError", "StagedModel", "split_model", "assemble", "as_block_sequence",
           "partition", "stage_costs", "balance_by_flops", "balance_by_time", "profile_times",
           "parse_cuts", "stage_of_blocks"]


class StagingError(ValueError):
    """Invalid cuts, stage count or staged-model input."""


@dataclass
class StagedModel:
    """A flat block sequence and the cut indices at its natural stage boundaries.

    ``cuts`` is empty when the blocks came as one ``nn.Sequential`` (no boundaries imposed).

    >>> stages = [nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2)]
    >>> staged = as_block_sequence(stages)
    >>> staged.cuts, len(staged.blocks), staged.num_stages
    ([1], 2, 2)
    >>> staged.stages()[1][0] is stages[1]
    True
    """

    blocks: nn.Sequential
    cuts: list[int]

    @property
    def num_stages(self) -> int:
        return len(self.cuts) + 1

    def stages(self) -> list[nn.Sequential]:
        """The stages at the natural cuts (sharing the block objects)."""
        return split_model(self.blocks, self.cuts)


def _check_sequential(model: object) -> nn.Sequential:
    if not isinstance(model, nn.Sequential):
        raise StagingError(f"expected a flat nn.Sequential of blocks, got {type(model).__name__}")
    if len(model) == 0:
        raise StagingError("the model has no blocks (empty nn.Sequential)")
    return model


def _check_cuts(cuts: Sequence[int], n_blocks: int) -> list[int]:
    """Cuts as ints, strictly increasing in [1, n_blocks - 1]; StagingError otherwise."""
    try:
        out = [int(c) for c in cuts]
    except (TypeError, ValueError) as e:
        raise StagingError(f"cuts must be integers, got {cuts!r}") from e
    if any(int(c) != c for c in cuts):
        raise StagingError(f"cuts must be integers, got {list(cuts)}")
    for c in out:
        if not 1 <= c <= n_blocks - 1:
            raise StagingError(f"cut {c} is out of range: cuts must lie in [1, {n_blocks - 1}] "
                               f"for a model of {n_blocks} blocks")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise StagingError(f"cuts must be strictly increasing, got {out}")
    return out


def split_model(model: nn.Sequential, cuts: Sequence[int]) -> list[nn.Sequential]:
    """Stages ``model[c_{k-1}:c_k]`` for cuts strictly increasing in [1, len(model)-1].

    The stages hold the model's own block objects (no copies) under their original names, so a
    stage's ``state_dict`` keys are the model's keys for those blocks.
    """
    model = _check_sequential(model)
    bounds = [0, *_check_cuts(cuts, len(model)), len(model)]
    return [model[a:b] for a, b in zip(bounds, bounds[1:])]


def stage_of_blocks(cuts: Sequence[int], n_blocks: int) -> list[int]:
    """The stage index of every block: ``stage_of_blocks([2], 4) == [0, 0, 1, 1]``."""
    cuts = _check_cuts(cuts, n_blocks)
    return [sum(1 for c in cuts if c <= i) for i in range(n_blocks)]


def assemble(stages: Sequence[nn.Module]) -> nn.Sequential:
    """The serial twin: one flat ``nn.Sequential`` of the stages' blocks (the same objects).

    An ``nn.Sequential`` stage contributes its children; any other stage module is one block.
    ``assemble(split_model(m, cuts))`` computes exactly ``m`` (and has ``m``'s state_dict keys).
    """
    if isinstance(stages, nn.Module) or len(stages) == 0:
        raise StagingError("assemble expects a non-empty list of stage modules")
    blocks: list[nn.Module] = []
    for k, stage in enumerate(stages):
        if not isinstance(stage, nn.Module):
            raise StagingError(f"stage {k} is a {type(stage).__name__}, not an nn.Module")
        blocks.extend(stage.children() if isinstance(stage, nn.Sequential) else [stage])
    return nn.Sequential(*blocks)


def as_block_sequence(obj: nn.Sequential | Sequence[nn.Module] | StagedModel) -> StagedModel:
    """Normalise what a caller hands us into a ``StagedModel``.

    - an ``nn.Sequential``: used as is (its elements are the blocks), no natural cuts;
    - a list/tuple of stage modules: each stage becomes one block, cuts at the stage boundaries
      (``[1, ..., K-1]``), so ``split_model`` on the result gives back those stages;
    - a ``StagedModel``: returned unchanged.
    """
    if isinstance(obj, StagedModel):
        return obj
    if isinstance(obj, nn.Sequential):
        return StagedModel(_check_sequential(obj), [])
    if isinstance(obj, (list, tuple)):
        if len(obj) == 0:
            raise StagingError("the list of stage modules is empty")
        for k, stage in enumerate(obj):
            if not isinstance(stage, nn.Module):
                raise StagingError(f"stage {k} is a {type(stage).__name__}, not an nn.Module")
        if len({id(s) for s in obj}) != len(obj):
            raise StagingError("the same module object appears as more than one stage")
        return StagedModel(nn.Sequential(*obj), list(range(1, len(obj))))
    raise StagingError(f"expected an nn.Sequential or a list of stage modules, "
                       f"got {type(obj).__name__}")


def _check_costs(costs: Sequence[float], k: int) -> list[float]:
    vals = [float(c) for c in costs]
    if any(not math.isfinite(c) or c < 0 for c in vals):
        raise StagingError(f"block costs must be finite and >= 0, got {vals}")
    _check_k(k, len(vals))
    return vals


def partition(costs: Sequence[float], k: int, allowed: Collection[int] | None = None) -> list[int]:
    """Cuts of the optimal contiguous partition of ``costs`` into ``k`` non-empty stages.

    Minimises the largest stage sum exactly (dynamic programme, O(k n^2)); among the optimal
    partitions it returns one with the smallest sum of squared stage costs (the most even one).
    ``allowed``: the block indices a cut may sit at (None: any of 1..n-1); StagingError when no
    partition into ``k`` stages uses only those.
    """
    vals = _check_costs(costs, k)
    n = len(vals)
    allowed_set = set(range(1, n)) if allowed is None else set(allowed) & set(range(1, n))
    if len(allowed_set) < k - 1:       # with k - 1 of them any choice is a partition: none is infeasible below
        raise StagingError(f"K={k} stages need {k - 1} cut(s), but only {sorted(allowed_set)} "
                           f"of the {n} blocks' boundaries are allowed")
    ok = [i == 0 or i in allowed_set for i in range(n + 1)]      # the start of the first stage is not a cut
    prefix = [0.0]
    for c in vals:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> float:  # blocks i..j-1
        return prefix[j] - prefix[i]

    inf = math.inf
    # best[s][j]: minimal bottleneck for the first j blocks in s stages.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            best[s][j] = min((max(best[s - 1][i], cost(i, j)) for i in range(s - 1, j) if ok[i]), default=inf)
    bound = best[k][n]
    # Among partitions with every stage <= bound, minimise the sum of squares.
    sq = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[-1] * (n + 1) for _ in range(k + 1)]
    sq[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            for i in range(s - 1, j):
                c = cost(i, j)
                if ok[i] and c <= bound and sq[s - 1][i] + c * c < sq[s][j]:
                    sq[s][j], arg[s][j] = sq[s - 1][i] + c * c, i
    cuts: list[int] = []
    j = n
    for s in range(k, 1, -1):
        j = arg[s][j]
        cuts.append(j)
    return cuts[::-1]


def stage_costs(costs: Sequence[float], cuts: Sequence[int]) -> list[float]:
    """The summed cost of every stage for the given cuts."""
    bounds = [0, *_check_cuts(cuts, len(costs)), len(costs)]
    return [float(sum(costs[a:b])) for a, b in zip(bounds, bounds[1:])]


def _check_k(k: int, n_blocks: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise StagingError(f"the number of stages K must be an integer >= 1, got {k!r}")
    if k > n_blocks:
        raise StagingError(f"K={k} exceeds the number of blocks ({n_blocks}): every stage needs "
                           f"at least one block; use K <= {n_blocks}")


def balance_by_flops(model: nn.Sequential, k: int, input_shape: tuple[int, int, int],
                     allowed: Collection[int] | None = None) -> list[int]:
    """Cuts minimising the largest stage's forward FLOPs (``models.model_flops`` per block), at the
    ``allowed`` block indices only when given."""
    model = _check_sequential(model)
    _check_k(k, len(model))
    return partition(model_flops(model, input_shape), k, allowed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_times(model: nn.Sequential, sample_input: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median forward+backward seconds of every block on ``sample_input``.

    One untimed round over all blocks first (allocator, caches, kernel selection), then
    ``repeats`` rounds, each timing every block once in order, so that a drift of the machine's
    speed during the measurement hits every block alike instead of the blocks measured last
    (timing each block ``repeats`` times in a row made ResNet-56's 2-way cut jump between
    blocks 10 and 12 from one call to the next on a 2-core CPU). Blocks run in the model's current
    train/eval mode. Gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is touched);
    buffers (BatchNorm running statistics) and the RNG state are restored afterwards, so the
    model state is left as it was.
    """
    model = _check_sequential(model)
    if repeats < 1:
        raise StagingError(f"repeats must be >= 1, got {repeats}")
    if not isinstance(sample_input, torch.Tensor):
        raise StagingError(f"sample_input must be a tensor, got {type(sample_input).__name__}")
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    device = sample_input.device
    devices = [device.index or 0] if device.type == "cuda" else []
    samples: list[list[float]] = [[] for _ in model]
    params = [[p for p in block.parameters() if p.requires_grad] for block in model]
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            inputs: list[torch.Tensor] = []
            x = sample_input.detach()
            for r in range(repeats + 1):          # round 0: warm-up, not timed
                for i, block in enumerate(model):
                    if r == 0:
                        inputs.append(x)
                    base = inputs[i]
                    inp = base.clone().requires_grad_(i > 0 and base.is_floating_point())
                    wrt = ([inp] if inp.requires_grad else []) + params[i]
                    _sync(device)
                    t0 = time.perf_counter()
                    out = block(inp)   # (on a clone: a block may modify its input in place)
                    if not isinstance(out, torch.Tensor):
                        raise StagingError(f"block {i} returned a {type(out).__name__}, "
                                           f"not a tensor")
                    if out.requires_grad and wrt:
                        torch.autograd.grad(out, wrt, grad_outputs=torch.ones_like(out),
                                            allow_unused=True)
                    _sync(device)
                    if r > 0:
                        samples[i].append(time.perf_counter() - t0)
                    else:
                        x = out.detach()
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return [statistics.median(s) for s in samples]


def balance_by_time(model: nn.Sequential, k: int, sample_input: torch.Tensor,
                    repeats: int = 3, allowed: Collection[int] | None = None) -> list[int]:
    """Cuts minimising the largest stage's measured forward+backward time (see ``profile_times``),
    at the ``allowed`` block indices only when given."""
    model = _check_sequential(model)
    _check_k(k, len(model))
    return partition(profile_times(model, sample_input, repeats), k, allowed)


def _parse_spec(spec: str | Sequence[int]) -> list[int]:
    if isinstance(spec, str):
        parts = [p for p in spec.replace(" ", ",").split(",") if p]
        try:
            return [int(p) for p in parts]
        except ValueError as e:
            raise StagingError(f"cuts {spec!r} must be comma-separated block indices, "
                               f"e.g. '4,8'") from e
    return list(spec)


def parse_cuts(spec: str | Sequence[int] | None, model: nn.Sequential | Sequence[nn.Module],
               k: int, input_shape: tuple[int, int, int], *, balance: str = "time",
               sample_input: torch.Tensor | None = None, batch_size: int = 32,
               allowed: Collection[int] | None = None) -> list[int]:
    """Validated cuts for ``k`` stages: the user's ``spec`` ('4,8' or a list) or balanced ones.

    With ``spec`` None: the model's natural cuts when it is a list of ``k`` stages, otherwise
    ``balance_by_time`` (on ``sample_input``, or a random batch of ``batch_size`` of
    ``input_shape`` on the model's device: the trainer passes the batch one stage trains on,
    since the blocks' relative costs change with it) or ``balance_by_flops``, among the ``allowed`` block
    indices when given (StagingError when they leave no partition).
    """
    staged = as_block_sequence(model)
    n = len(staged.blocks)
    _check_k(k, n)
    if balance not in ("time", "flops"):
        raise StagingError(f"balance must be 'time' or 'flops', got {balance!r}")
    if spec is not None:
        cuts = _parse_spec(spec)
        if len(cuts) != k - 1:
            raise StagingError(f"K={k} stages need {k - 1} cut(s), got {len(cuts)}: {cuts}")
        return _check_cuts(cuts, n)
    if k == 1:
        return []
    if staged.cuts and staged.num_stages == k:
        return list(staged.cuts)
    if balance == "flops":
        return balance_by_flops(staged.blocks, k, input_shape, allowed)
    if sample_input is None:
        ref = next(iter(staged.blocks.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        sample_input = torch.randn(batch_size, *input_shape, device=device, dtype=dtype)
    return balance_by_time(staged.blocks, k, sample_input, allowed=allowed)

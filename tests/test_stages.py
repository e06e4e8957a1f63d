"""Staging: split/assemble identity, parameter sharing, optimal partition, balancing, validation."""
from __future__ import annotations

import itertools
import random
import time

import pytest
import torch
from torch import nn

from layerpar_fast.models import build_model
from layerpar_fast.stages import (StagedModel, StagingError, as_block_sequence, assemble,
                                   balance_by_flops, balance_by_time, parse_cuts, partition,
                                   profile_times, split_model, stage_costs, stage_of_blocks)


def _run_stages(stages: list[nn.Sequential], x: torch.Tensor) -> torch.Tensor:
    for s in stages:
        x = s(x)
    return x


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("cuts", [[5], [1, 4, 7, 10], list(range(1, 11))])
def test_split_and_assemble_reproduce_model(train: bool, cuts: list[int]) -> None:
    model = build_model("resnet20").train(train)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    ref = model(x)
    stages = split_model(model, cuts)
    assert len(stages) == len(cuts) + 1
    torch.manual_seed(1)
    assert torch.equal(_run_stages(stages, x), ref)
    twin = assemble(stages)
    torch.manual_seed(1)
    assert torch.equal(twin(x), ref)
    assert list(twin.state_dict()) == list(model.state_dict())


def test_stages_share_parameters_with_model() -> None:
    model = build_model("mnist_resnet", in_channels=1, image_size=28)
    stages = split_model(model, [2, 4])
    assert [len(s) for s in stages] == [2, 2, 3]
    assert stages[1][0] is model[2]
    ids = {id(p) for s in stages for p in s.parameters()}
    assert ids == {id(p) for p in model.parameters()}
    with torch.no_grad():
        stages[2][-1][-1].weight.add_(1.0)
    assert torch.equal(model[-1][-1].weight, stages[2][-1][-1].weight)
    assert set(stages[1].state_dict()) <= set(model.state_dict())
    assert all(a is b for a, b in zip(assemble(stages), model))


@pytest.mark.parametrize("cuts,match", [([0], "out of range"), ([11], "out of range"),
                                        ([5, 5], "strictly increasing"), ([6, 3], "strictly increasing"),
                                        ([2.5], "integers")])
def test_bad_cuts(cuts: list[int], match: str) -> None:
    with pytest.raises(StagingError, match=match):
        split_model(build_model("resnet20"), cuts)


def test_split_requires_sequential() -> None:
    with pytest.raises(StagingError, match="nn.Sequential"):
        split_model(nn.Linear(2, 2), [1])  # type: ignore[arg-type]


def test_stage_of_blocks_and_costs() -> None:
    assert stage_of_blocks([2, 3], 5) == [0, 0, 1, 2, 2]
    assert stage_costs([1, 2, 3, 4], [1, 3]) == [1.0, 5.0, 4.0]


def _brute_force(costs: list[float], k: int, allowed=None) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n) if allowed is None else sorted(allowed), k - 1):
        bounds = [0, *cuts, n]
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_partition_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [rng.choice([0.0, rng.random(), float(rng.randint(1, 5))]) for _ in range(n)]
        cuts = partition(costs, k)
        assert len(cuts) == k - 1 and all(1 <= c < n for c in cuts)
        assert cuts == sorted(set(cuts))
        assert max(stage_costs(costs, cuts)) == pytest.approx(_brute_force(costs, k))


def test_partition_with_allowed_cuts_is_optimal_among_them() -> None:
    """``allowed`` restricts where cuts may sit; the result is the best partition that uses only
    those (brute force), and allowing every boundary is the unrestricted partition."""
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(2, 9)
        k = rng.randint(1, n)
        allowed = sorted(rng.sample(range(1, n), rng.randint(k - 1, n - 1)))
        costs = [rng.choice([0.0, rng.random(), float(rng.randint(1, 5))]) for _ in range(n)]
        cuts = partition(costs, k, allowed)
        assert len(cuts) == k - 1 and set(cuts) <= set(allowed) and cuts == sorted(set(cuts))
        assert max(stage_costs(costs, cuts)) == pytest.approx(_brute_force(costs, k, allowed))
        assert partition(costs, k, range(1, n)) == partition(costs, k)
    # ResNet-20-like: nine equal blocks between a light stem and head; the boundary after block 7 is the last allowed
    costs = [0.2] + [1.0] * 9 + [0.1]
    assert partition(costs, 4) == [3, 5, 8]
    assert partition(costs, 4, range(1, 8)) == [3, 5, 7]
    with pytest.raises(StagingError, match="need 3 cut"):
        partition(costs, 4, [1, 2])


def test_partition_prefers_even_split_among_optima() -> None:
    assert partition([1, 1, 1, 1, 8], 3) == [2, 4]
    assert partition([1.0] * 8, 4) == [2, 4, 6]
    assert partition([3, 1], 1) == []


@pytest.mark.parametrize("costs,k,match", [([1, 2], 3, "K=3 exceeds the number of blocks"),
                                           ([1, 2], 0, ">= 1"), ([1, -1], 1, ">= 0"),
                                           ([1, float("nan")], 1, "finite")])
def test_partition_errors(costs: list[float], k: int, match: str) -> None:
    with pytest.raises(StagingError, match=match):
        partition(costs, k)


def test_balance_by_flops_resnet20() -> None:
    model = build_model("resnet20")
    assert balance_by_flops(model, 1, (3, 32, 32)) == []
    (cut,) = balance_by_flops(model, 2, (3, 32, 32))
    assert 4 <= cut <= 6
    cuts = balance_by_flops(model, 3, (3, 32, 32))
    assert len(cuts) == 2 and 3 <= cuts[0] < cuts[1] <= 8


def test_balance_by_time_mnist_resnet_leaves_state_untouched() -> None:
    model = build_model("mnist_resnet", in_channels=1, image_size=28).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 28, 28)
    cuts = balance_by_time(model, 3, x, repeats=1)
    assert len(cuts) == 2 and 1 <= cuts[0] < cuts[1] <= len(model) - 1
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    times = profile_times(model, x, repeats=1)
    assert len(times) == len(model) and all(t > 0 for t in times)


class _Sleepy(nn.Module):
    """A block that takes ``ms`` per call, and ``first_ms`` on its first call (lazy set-up)."""

    def __init__(self, ms: float, first_ms: float | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.ms, self.first_ms, self.calls = ms, first_ms, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        ms = self.first_ms if self.calls == 1 and self.first_ms is not None else self.ms
        time.sleep(ms / 1000.0)
        return x * self.w


def test_profile_times_warm_up_round_is_not_timed_and_cuts_follow_measured_time() -> None:
    # block 0 is slow only on its first call: the untimed warm-up round takes that, so the
    # balanced cut follows the steady-state costs (30 ms, then 3 x 10 ms)
    model = nn.Sequential(_Sleepy(30.0, first_ms=400.0), _Sleepy(10.0), _Sleepy(10.0), _Sleepy(10.0))
    times = profile_times(model, torch.randn(2, 3), repeats=3)
    assert [m.calls for m in model] == [4, 4, 4, 4]       # 1 warm-up + 3 timed rounds
    assert 0.025 < times[0] < 0.2, times
    assert all(0.008 < t < 0.1 for t in times[1:]), times
    assert balance_by_time(model, 2, torch.randn(2, 3), repeats=3) == [1]


def test_parse_cuts_user_spec_and_balanced() -> None:
    model = build_model("resnet20")
    shape = (3, 32, 32)
    assert parse_cuts("3,7", model, 3, shape) == [3, 7]
    assert parse_cuts([3, 7], model, 3, shape) == [3, 7]
    assert parse_cuts(None, model, 1, shape) == []
    assert parse_cuts(None, model, 2, shape, balance="flops") == balance_by_flops(model, 2, shape)
    mnist = build_model("mnist_resnet", in_channels=1, image_size=28)
    cuts = parse_cuts(None, mnist, 2, (1, 28, 28), balance="time", batch_size=4)
    assert len(cuts) == 1 and 1 <= cuts[0] <= len(mnist) - 1


@pytest.mark.parametrize("spec,k,match", [
    ("3", 3, "need 2 cut"), ("7,3", 3, "strictly increasing"), ("3,x", 3, "comma-separated"),
    ("3,11", 3, "out of range"), (None, 12, "K=12 exceeds the number of blocks \\(11\\)"),
    (None, 0, ">= 1")])
def test_parse_cuts_errors(spec: str | None, k: int, match: str) -> None:
    with pytest.raises(StagingError, match=match):
        parse_cuts(spec, build_model("resnet20"), k, (3, 32, 32), balance="flops")


def test_parse_cuts_bad_balance() -> None:
    with pytest.raises(StagingError, match="balance"):
        parse_cuts(None, build_model("resnet20"), 2, (3, 32, 32), balance="random")


def _user_sequential() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_user_sequential_accepted() -> None:
    model = _user_sequential()
    staged = as_block_sequence(model)
    assert staged.blocks is model and staged.cuts == [] and staged.num_stages == 1
    cuts = parse_cuts(None, model, 3, (3, 16, 16), balance="flops")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_run_stages(split_model(model, cuts), x), model(x))


def test_list_of_stage_modules_accepted() -> None:
    user = _user_sequential()
    stages = [user[:2], user[2:5], nn.Sequential(user[5], user[6])]
    staged = as_block_sequence(stages)
    assert isinstance(staged, StagedModel)
    assert staged.cuts == [1, 2] and len(staged.blocks) == 3
    assert all(a is b for a, b in zip(staged.blocks, stages))
    assert all(a[0] is b for a, b in zip(staged.stages(), stages))
    assert as_block_sequence(staged) is staged
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(staged.blocks(x), user(x))
    assert torch.equal(assemble(stages)(x), user(x))
    assert len(assemble(stages)) == len(user)
    # the natural cuts are used when K matches; other K re-balance over the stage blocks
    assert parse_cuts(None, stages, 3, (3, 16, 16)) == [1, 2]
    assert len(parse_cuts(None, stages, 2, (3, 16, 16), balance="flops")) == 1
    with pytest.raises(StagingError, match="K=4 exceeds"):
        parse_cuts(None, stages, 4, (3, 16, 16))


@pytest.mark.parametrize("bad,match", [([], "empty"), ([nn.ReLU(), "x"], "not an nn.Module"),
                                       (nn.Linear(2, 2), "list of stage modules")])
def test_as_block_sequence_errors(bad: object, match: str) -> None:
    with pytest.raises(StagingError, match=match):
        as_block_sequence(bad)  # type: ignore[arg-type]


def test_as_block_sequence_rejects_repeated_stage() -> None:
    s = nn.Linear(2, 2)
    with pytest.raises(StagingError, match="more than one stage"):
        as_block_sequence([s, s])

"""Model zoo: parameter counts, output shapes, cut points, FLOPs, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layerpar_fast.models import (BasicBlock, CutPoint, ModelError, WideBasicBlock, available_models,
                                  build_model, count_parameters, cut_points, model_flops)

PUBLISHED = {"resnet20": 0.27e6, "resnet56": 0.85e6, "resnet110": 1.7e6, "wrn16_4": 2.75e6}


@pytest.mark.parametrize("name,expected", sorted(PUBLISHED.items()))
def test_parameter_counts_match_published(name: str, expected: float) -> None:
    assert count_parameters(build_model(name)) == pytest.approx(expected, rel=0.02)


def test_wrn28_10_parameter_count_on_meta_device() -> None:
    with torch.device("meta"):
        model = build_model("wrn28_10")
    assert count_parameters(model) == pytest.approx(36.5e6, rel=0.02)
    assert len(model) == 1 + 12 + 1


@pytest.mark.parametrize("name", [n for n in available_models() if n != "mnist_resnet"])
def test_cifar_output_shape(name: str) -> None:
    model = build_model(name)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mnist_resnet_shape_and_cost() -> None:
    model = build_model("mnist_resnet", in_channels=1, image_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert sum(model_flops(model, (1, 28, 28))) <= 25e6
    shapes = [c.shape for c in cut_points(model, (1, 28, 28))]
    assert all(h % 2 == 0 and w % 2 == 0 for _, h, w in shapes)
    assert shapes[0][1:] == (28, 28) and shapes[-1][1:] == (14, 14)


def test_resnet_on_mnist_size_and_other_class_count() -> None:
    model = build_model("resnet20", num_classes=7, in_channels=1, image_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert cut_points(model, (1, 28, 28))[-1].shape == (64, 7, 7)


def test_models_are_flat_sequentials_of_blocks() -> None:
    resnet = build_model("resnet20")
    assert isinstance(resnet, nn.Sequential) and len(resnet) == 11
    assert all(isinstance(b, BasicBlock) for b in resnet[1:-1])
    wrn = build_model("wrn16_4")
    assert len(wrn) == 8 and isinstance(wrn[0], nn.Conv2d)
    assert all(isinstance(b, WideBasicBlock) for b in wrn[1:-1])
    # option B projection only at the two downsampling blocks
    assert sum(not isinstance(b.shortcut, nn.Identity) for b in resnet[1:-1]) == 2


def test_standard_init() -> None:
    model = build_model("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = model[1].conv1.weight
    assert w.std().item() == pytest.approx((2.0 / (16 * 9)) ** 0.5, rel=0.2)


def test_cut_points_resnet20() -> None:
    model = build_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    cps = cut_points(model, (3, 32, 32))
    assert [c.index for c in cps] == list(range(1, 11))
    assert cps[0] == CutPoint(1, (16, 32, 32))
    assert [c.shape for c in cps[:4]] == [(16, 32, 32)] * 4
    assert [c.shape for c in cps[4:7]] == [(32, 16, 16)] * 3
    assert [c.shape for c in cps[7:]] == [(64, 8, 8)] * 3
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cut_points_mnist_resnet() -> None:
    model = build_model("mnist_resnet", in_channels=1, image_size=28)
    shapes = [c.shape for c in cut_points(model, (1, 28, 28))]
    assert shapes == [(8, 28, 28)] * 3 + [(32, 14, 14)] * 3


def test_model_flops_per_block() -> None:
    model = build_model("resnet20")
    flops = model_flops(model, (3, 32, 32))
    assert len(flops) == len(model)
    assert flops[0] == 2 * 3 * 9 * 16 * 32 * 32
    assert flops[1] == 2 * 2 * 16 * 9 * 16 * 32 * 32
    assert flops[4] == 2 * (16 * 9 * 32 + 32 * 9 * 32 + 16 * 32) * 16 * 16
    assert flops[-1] == 2 * 64 * 10
    assert 75e6 < sum(flops) < 90e6  # ResNet-20: about 41M multiply-adds


@pytest.mark.parametrize("name", ["resnet21", "vgg16", "wrn27_10", "wrn28_0", ""])
def test_unknown_or_invalid_model(name: str) -> None:
    with pytest.raises(ModelError) as e:
        build_model(name)
    msg = str(e.value)
    if name.startswith("wrn"):
        assert "6n+4" in msg or "widening" in msg
    elif name == "resnet21":
        assert "6n+2" in msg
    else:
        assert "resnet20" in msg and "wrn28_10" in msg and "mnist_resnet" in msg


def test_generic_depths_accepted() -> None:
    assert len(build_model("resnet8")) == 5
    assert len(build_model("WRN-10-2")) == 5
    assert "wrn28_10" in available_models() and "resnet110" in available_models()


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": 0}, {"image_size": 2}])
def test_bad_arguments(kwargs: dict[str, int]) -> None:
    with pytest.raises(ModelError):
        build_model("resnet20", **kwargs)


def test_cut_points_bad_input_shape() -> None:
    model = build_model("resnet20")
    with pytest.raises(ModelError, match="input shape"):
        cut_points(model, (1, 32, 32))
    with pytest.raises(ModelError, match="C, H, W"):
        cut_points(model, (32, 32))

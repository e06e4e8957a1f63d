"""Model zoo: flat ``nn.Sequential`` ResNets that can be cut at any block boundary.

>>> model = build_model("resnet20")                  # [stem, 9 blocks, head]: 11 modules
>>> [c.shape for c in cut_points(model, (3, 32, 32))][-1]
(64, 8, 8)
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .resnet import BasicBlock, ClassifierHead, ModelError, cifar_resnet, mnist_resnet
from .wideresnet import WideBasicBlock, wide_resnet

__all__ = ["ModelError", "CutPoint", "build_model", "available_models", "cut_points",
           "count_parameters", "model_flops", "BasicBlock", "WideBasicBlock", "ClassifierHead",
           "cifar_resnet", "wide_resnet", "mnist_resnet"]

_RESNET_DEPTHS = (20, 32, 44, 56, 110)
_WRN_EXAMPLES = ("wrn16_4", "wrn16_8", "wrn22_8", "wrn28_10", "wrn40_4")
_RESNET_RE = re.compile(r"resnet(\d+)")
_WRN_RE = re.compile(r"wrn[-_]?(\d+)[-_](\d+)")


def available_models() -> list[str]:
    """The named models; ``resnet{6n+2}`` and ``wrn{d}_{k}`` ((d-4) % 6 == 0, k >= 1) are accepted too."""
    return ["mnist_resnet", *(f"resnet{d}" for d in _RESNET_DEPTHS), *_WRN_EXAMPLES]


def build_model(name: str, num_classes: int = 10, in_channels: int = 3,
                image_size: int = 32) -> nn.Sequential:
    """Build ``name`` as a flat ``nn.Sequential`` ``[stem, block_1, ..., block_n, head]``.

    Raises ModelError for an unknown name (listing the valid ones) or invalid arguments.
    """
    key = name.strip().lower()
    if key == "mnist_resnet":
        return mnist_resnet(num_classes, in_channels, image_size)
    if m := _RESNET_RE.fullmatch(key):
        return cifar_resnet(int(m.group(1)), num_classes, in_channels, image_size)
    if m := _WRN_RE.fullmatch(key):
        return wide_resnet(int(m.group(1)), int(m.group(2)), num_classes, in_channels, image_size)
    raise ModelError(f"unknown model {name!r}; valid: {', '.join(available_models())} "
                     f"(also resnet{{6n+2}} and wrn{{d}}_{{k}} with (d-4) % 6 == 0, k >= 1)")


@dataclass(frozen=True)
class CutPoint:
    """A cut between ``model[index-1]`` and ``model[index]``; ``shape`` = (C, H, W) of that activation."""

    index: int
    shape: tuple[int, int, int]


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters())


def _check_input_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ModelError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration; every submodule's training flag is restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


def _probe(model: nn.Sequential, input_shape: tuple[int, ...],
           on_block: Callable[[int, torch.Tensor], None]) -> None:
    """Forward a batch of 2 through ``model`` (eval, no_grad); call ``on_block(i, output_i)``."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        raise ModelError(f"expected a non-empty nn.Sequential, got {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.zeros(2, *shape, device=device, dtype=dtype)
    if device.type != "meta":
        x.normal_()
    with _eval_mode(model):
        for i, block in enumerate(model):
            try:
                x = block(x)
            except RuntimeError as e:
                raise ModelError(f"input shape {shape} does not fit the model: block {i} "
                                 f"({type(block).__name__}) failed: {e}") from e
            on_block(i, x)


def cut_points(model: nn.Sequential, input_shape: tuple[int, int, int]) -> list[CutPoint]:
    """Every interior block boundary 1..len(model)-1 with its activation's (C, H, W).

    Found by one forward of a batch of 2 in eval mode under no_grad; the model state is untouched.
    Activations that are not 4-D (C, H, W) tensors are reported with the trailing dimensions
    padded by 1 (e.g. a flat feature vector of size F as (F, 1, 1)).
    """
    shapes: list[tuple[int, int, int]] = []

    def record(i: int, out: torch.Tensor) -> None:
        dims = tuple(out.shape[1:]) + (1, 1, 1)
        shapes.append((int(dims[0]), int(dims[1]), int(dims[2])))

    _probe(model, input_shape, record)
    return [CutPoint(i, shapes[i - 1]) for i in range(1, len(model))]


def model_flops(model: nn.Sequential, input_shape: tuple[int, int, int]) -> list[int]:
    """Forward FLOPs per image of each block: conv and linear multiply-adds counted twice."""
    flops = [0] * len(model)
    current = [0]

    def conv_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(m, nn.Conv2d)
        per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        flops[current[0]] += 2 * per_out * out[0].numel()

    def linear_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(m, nn.Linear)
        flops[current[0]] += 2 * m.in_features * out[0].numel()

    handles = []
    for i, block in enumerate(model):
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))

    def next_block(i: int, out: torch.Tensor) -> None:
        current[0] = i + 1

    try:
        _probe(model, input_shape, next_block)
    finally:
        for h in handles:
            h.remove()
    return flops

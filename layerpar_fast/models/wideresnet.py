"""WideResNet-d-k (Zagoruyko & Komodakis 2016) as a flat ``nn.Sequential``.

``[conv3x3 stem, block_1, ..., block_n, head]``: pre-activation blocks, widths 16, 16k, 32k, 64k,
(d-4)/6 blocks per group, a 1x1 conv shortcut wherever the shape changes, and a BN-ReLU-pool-linear
head. WRN-28-10 has 36.5M parameters, WRN-16-4 2.75M.
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet import ClassifierHead, ModelError, check_common_args, conv3x3, init_weights

__all__ = ["WideBasicBlock", "wide_resnet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``shortcut(x) + conv2(dropout(relu(bn2(conv1(relu(bn1(x)))))))``.

    When the shape changes, the 1x1 strided shortcut conv reads the pre-activated input
    ``relu(bn1(x))``, as in the authors' code; otherwise the shortcut is the identity.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(c_out, c_out)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return skip + out


def wide_resnet(depth: int, widen: int, num_classes: int = 10, in_channels: int = 3,
                image_size: int = 32, dropout: float = 0.0) -> nn.Sequential:
    """WRN-``depth``-``widen``; depth must satisfy (depth - 4) % 6 == 0, widen >= 1."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ModelError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), "
                         f"got {depth}")
    if widen < 1:
        raise ModelError(f"WideResNet widening factor must be >= 1, got {widen}")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout}")
    check_common_args(num_classes, in_channels, image_size, min_size=4)
    n = (depth - 4) // 6
    blocks: list[nn.Module] = [conv3x3(in_channels, 16)]
    c_in = 16
    for g, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
        for b in range(n):
            stride = 2 if (g > 0 and b == 0) else 1
            blocks.append(WideBasicBlock(c_in, width, stride, dropout))
            c_in = width
    blocks.append(ClassifierHead(c_in, num_classes, pre_activation=True))
    model = nn.Sequential(*blocks)
    init_weights(model)
    return model

"""Downsampling/upsampling filter pairs (docs/method.md §2).

A pair ``(D, U)`` with factor ``s`` maps a fine activation (B, C, H, W) to the coarse grid
(B, C, H/s, W/s) and back. Everything per sample is stored and sent on the coarse grid.

* ``avg_nearest`` (default): ``D`` = s×s average pooling, ``U`` = nearest-neighbour upsampling.
  ``D∘U = I`` exactly, ``Uᵀ = s²·D`` (sum pooling) and ``Dᵀ = U / s²``.
* ``avg_bilinear``: ``D`` as above, ``U(v) = B(v) + N(v − D(B(v)))`` with ``B`` bilinear
  (align_corners=False) and ``N`` nearest upsampling. The correction term makes ``D∘U = I`` hold
  exactly while keeping a smooth upsampling; ``Uᵀ g = Bᵀ(g − N D g) + s²·D g``.

``s = 1`` is the identity pair for both kinds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FILTER_KINDS = ("avg_nearest", "avg_bilinear")


class FilterError(ValueError):
    """A filter configuration or shape that cannot work (raised before training starts)."""


@dataclass(frozen=True)
class FilterPair:
    """A downsampling/upsampling pair with factor ``s``; see the module docstring."""

    s: int = 1
    kind: str = "avg_nearest"

    def __post_init__(self) -> None:
        if not isinstance(self.s, int) or self.s < 1:
            raise FilterError(f"downsampling factor s must be a positive integer, got {self.s!r}")
        if self.kind not in FILTER_KINDS:
            raise FilterError(f"unknown filter kind {self.kind!r}; valid: {', '.join(FILTER_KINDS)}")

    # -- shapes -----------------------------------------------------------------------------
    def check_shape(self, shape: tuple[int, int, int], where: str = "cut") -> None:
        """Raise FilterError unless ``s`` divides H and W of the (C, H, W) ``shape``."""
        _, h, w = shape
        if h % self.s or w % self.s:
            raise FilterError(
                f"downsampling factor s={self.s} does not divide the {where} activation "
                f"(C,H,W)={tuple(shape)}; choose s dividing {h} and {w}, or other cuts")

    def coarse_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H/s, W/s) for a fine (C, H, W) shape."""
        self.check_shape(shape)
        c, h, w = shape
        return (c, h // self.s, w // self.s)

    # -- the linear maps ----------------------------------------------------------------------
    def down(self, x: torch.Tensor) -> torch.Tensor:
        """D: s×s average pooling (B, C, H, W) -> (B, C, H/s, W/s)."""
        if self.s == 1:
            return x
        return F.avg_pool2d(x, self.s)

    def down_adjoint(self, r: torch.Tensor) -> torch.Tensor:
        """Dᵀ: (B, C, h, w) -> (B, C, h·s, w·s); every fine pixel gets r / s²."""
        if self.s == 1:
            return r
        return _nearest(r, self.s) / float(self.s * self.s)

    def up(self, v: torch.Tensor) -> torch.Tensor:
        """U: coarse (B, C, h, w) -> fine (B, C, h·s, w·s); D(U(v)) == v."""
        if self.s == 1:
            return v
        if self.kind == "avg_nearest":
            return _nearest(v, self.s)
        b = _bilinear(v, self.s)
        return b + _nearest(v - self.down(b), self.s)

    def up_adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """Uᵀ: fine (B, C, H, W) -> coarse (B, C, H/s, W/s), the true adjoint of ``up``."""
        if self.s == 1:
            return g
        summed = F.avg_pool2d(g, self.s) * float(self.s * self.s)
        if self.kind == "avg_nearest":
            return summed
        h = g - _nearest(self.down(g), self.s)
        return _bilinear_adjoint(h, self.s) + summed


def _nearest(v: torch.Tensor, s: int) -> torch.Tensor:
    return F.interpolate(v, scale_factor=s, mode="nearest")


def _bilinear(v: torch.Tensor, s: int) -> torch.Tensor:
    return F.interpolate(v, scale_factor=s, mode="bilinear", align_corners=False)


def _bilinear_adjoint(g: torch.Tensor, s: int) -> torch.Tensor:
    """Bᵀ g through autograd: bilinear upsampling is linear, so its VJP is its adjoint."""
    b, c, hh, ww = g.shape
    with torch.enable_grad():
        v = torch.zeros(b, c, hh // s, ww // s, dtype=g.dtype, device=g.device, requires_grad=True)
        (out,) = torch.autograd.grad(_bilinear(v, s), v, grad_outputs=g)
    return out

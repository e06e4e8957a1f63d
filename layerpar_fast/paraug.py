"""Shift augmentation for the parallel phase, consistent with the auxiliary variables.

The method (docs/method.md §5-§6) trains the parallel phase without augmentation because λ̃ is tied to one view of
each sample. Translations are the exception: a convolutional stage is equivariant to a shift of
its input by a multiple of its stride (away from the border), so the view "image shifted by d
pixels" has, at cut k, the activations of the canonical view shifted by d / r_k pixels, where r_k
is the cut's stride. With shifts that are multiples of every cut's coarse stride r_k·s, each
batch can be trained on a randomly shifted view while the stores keep the canonical one:

* stage 1 reads the image translated by d (zero fill, in pixel space, like a pad-and-crop);
* stage k > 1 reads U(λ̃_{k-1}) translated by d / r_{k-1} (zero fill);
* stage k < K compares its output, translated back by -d / r_k, with the canonical λ̃_k and u_k;
  store positions that left the view keep their values (their loss terms are masked out, their
  updates are not applied);
* the input gradient is taken with respect to the canonical input, so g is canonical too.

Shifts are drawn per sample from a generator seeded by (seed, epoch, step): every stage of a run,
in one process or many, sees the same shifts, and the run stays deterministic.

Mirror images are not a symmetry of a convolutional stage (its filters are not mirror-symmetric),
so ``--parallel-augment shift_flip`` gives each sample's mirror image auxiliary variables of its
own (``FlipViews``): the stores hold 2N rows, row ``i`` the canonical view of sample ``i`` and row
``N + i`` its mirror image, and each epoch visits one of the two per sample, alternating, so each
row is visited every other epoch.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import _CIFAR_PAD, _MNIST_SHIFT, _derive_seed
from .filters import FilterPair

_SEED_TAG = 7  # keeps these draws unrelated to the loader's (seed, epoch, 1, step) generator
_FLIP_TAG = 8


def largest_shift(augment: str | None) -> int:
    """The largest pixel shift of a serial augmentation, which bounds the parallel phase's shift
    views: 4 for crop_flip (its padding), 2 for MNIST's shift, 0 for none."""
    return {"crop_flip": _CIFAR_PAD, "shift": _MNIST_SHIFT}.get(augment or "", 0)


def shift_view_cuts(cut_shapes: Sequence[tuple[int, tuple[int, int, int]]], image_hw: tuple[int, int],
                    filt: FilterPair, max_shift: int) -> list[int]:
    """The block boundaries where a cut keeps shift views possible: those whose coarse grid (the
    (C, H, W) activation there, downsampled by ``filt``) divides the image and moves in whole cells
    with shifts of ``max_shift`` pixels, i.e. whose unit (``ShiftAugment.unit_for``) divides
    ``max_shift``. Any set of such cuts then has a common unit of at most ``max_shift``.
    ``cut_shapes``: (block index, (C, H, W)) pairs, e.g. ``models.cut_points``."""
    ok = []
    for index, shape in cut_shapes:
        try:
            unit = ShiftAugment.unit_for(image_hw, [filt.coarse_shape(shape)[-2:]])
        except ValueError:             # s does not divide the map (FilterError), or the grid the image (unit_for)
            continue
        if max_shift % unit == 0:
            ok.append(int(index))
    return ok


def translate(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``out[b, :, y, x] = x[b, :, y - d[b, 0], x - d[b, 1]]``, zero where that is outside.

    ``x`` is (B, C, H, W), ``d`` an integer (B, 2) tensor of row and column shifts. The adjoint
    of translating by ``d`` is translating by ``-d``; autograd uses it.
    """
    if x.dim() != 4 or d.shape != (x.shape[0], 2):
        raise ValueError(f"translate needs x (B, C, H, W) and d (B, 2), got {tuple(x.shape)} and {tuple(d.shape)}")
    return _Translate.apply(x, d)


def _translate(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    d = d.to(torch.long).cpu()
    m = int(d.abs().max()) if d.numel() else 0
    if m == 0:
        return x.clone()
    b, c, h, w = x.shape
    if m >= h or m >= w:
        raise ValueError(f"shift {m} does not fit a {h}x{w} map")
    xp = F.pad(x, (m, m, m, m))
    s = xp.stride()
    windows = xp.as_strided((b, c, 2 * m + 1, 2 * m + 1, h, w), (s[0], s[1], s[2], s[3], s[2], s[3]))
    oy = (m - d[:, 0]).to(x.device)
    ox = (m - d[:, 1]).to(x.device)
    out = windows[torch.arange(b, device=x.device), :, oy, ox]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


class _Translate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(d)
        return _translate(x, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (d,) = ctx.saved_tensors
        return _translate(grad, -d), None


def visible(d: torch.Tensor, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Canonical positions still inside the view translated by ``d``: a (B, 1, h, w) bool mask."""
    d = d.to(torch.long).to(device)
    ys = torch.arange(h, device=device)[None, :] + d[:, :1]
    xs = torch.arange(w, device=device)[None, :] + d[:, 1:]
    vy = (ys >= 0) & (ys < h)
    vx = (xs >= 0) & (xs < w)
    return (vy[:, None, :, None] & vx[:, None, None, :])


class ShiftAugment:
    """Per-sample shifts of the input image, by multiples of ``unit`` pixels up to ``max_shift``.

    ``image_hw`` is the input size; a map of size (h, w) is shifted by ``d * h / H``, which must be
    a whole number (``unit`` is chosen so that it is at every cut, coarse grids included).
    ``fill`` is the value of an empty pixel of the normalised image (per channel, shape (C, 1, 1)).
    """

    def __init__(self, max_shift: int, unit: int, image_hw: tuple[int, int], seed: int,
                 fill: torch.Tensor | None = None) -> None:
        if unit < 1 or max_shift < unit:
            raise ValueError(f"shift augmentation needs 1 <= unit <= max_shift, got unit {unit}, max {max_shift}")
        self.max_shift, self.unit, self.image_hw, self.seed = int(max_shift), int(unit), image_hw, int(seed)
        self.fill = fill

    @staticmethod
    def unit_for(image_hw: tuple[int, int], coarse_hw: Sequence[tuple[int, int]]) -> int:
        """The smallest pixel shift that moves every coarse cut grid by whole cells."""
        unit = 1
        for h, w in coarse_hw:
            if image_hw[0] % h or image_hw[1] % w:
                raise ValueError(f"a {h}x{w} cut grid does not divide the {image_hw[0]}x{image_hw[1]} input")
            for r in (image_hw[0] // h, image_hw[1] // w):
                unit = unit * r // math.gcd(unit, r)
        return unit

    def shifts(self, epoch: int, step: int, n: int) -> torch.Tensor:
        """The (n, 2) pixel shifts of batch ``step`` of ``epoch`` (the same on every stage)."""
        g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, _SEED_TAG, step))
        k = self.max_shift // self.unit
        return torch.randint(-k, k + 1, (n, 2), generator=g) * self.unit

    def scaled(self, d: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """``d`` in cells of a (h, w) map."""
        ry, rx = self.image_hw[0] // hw[0], self.image_hw[1] // hw[1]
        if ry * hw[0] != self.image_hw[0] or rx * hw[1] != self.image_hw[1] or \
                bool((d[:, 0] % ry).any()) or bool((d[:, 1] % rx).any()):
            raise ValueError(f"shifts {self.unit} px do not move a {hw[0]}x{hw[1]} map by whole cells")
        return torch.stack([d[:, 0] // ry, d[:, 1] // rx], 1)

    def view(self, x: torch.Tensor, d: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (canonical, any resolution) as seen in the view shifted by ``d`` pixels."""
        hw = tuple(x.shape[-2:])
        dc = self.scaled(d, hw)
        out = translate(x, dc)
        if fill is None:
            return out
        return torch.where(visible(-dc, hw[0], hw[1], x.device), out, fill.to(x.device, x.dtype))

    def canonical(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """A view-coordinate map ``x`` moved back to canonical coordinates (zero where unseen)."""
        return translate(x, -self.scaled(d, tuple(x.shape[-2:])))

    def visible(self, d: torch.Tensor, hw: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, 1, h, w) mask of the canonical positions of a (h, w) map that the view shows."""
        return visible(self.scaled(d, hw), hw[0], hw[1], device)


class FlipViews:
    """Mirror views of the parallel phase with auxiliary rows of their own.

    A *view index* ``v`` in [0, 2N) names sample ``v mod N``, mirrored (left-right) when ``v >= N``.
    In epoch ``e`` sample ``i`` is seen as its mirror image when ``e + r_i`` is odd, ``r_i`` a bit
    drawn once from ``seed``: both views of every sample are trained on equally often, each row of
    the stores is read and written every other epoch, and every stage of a run (one process or
    many) derives the same views from (seed, epoch) alone.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"FlipViews needs at least one sample, got {n}")
        self.n = int(n)
        g = torch.Generator().manual_seed(_derive_seed(int(seed), 0, _FLIP_TAG, 0))
        self.parity = torch.randint(0, 2, (self.n,), generator=g)

    @property
    def rows(self) -> int:
        """Rows of every auxiliary store: one per sample and view."""
        return 2 * self.n

    def views(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """The view indices that sample indices ``idx`` are trained on in ``epoch``."""
        idx = idx.to(torch.long)
        return idx + self.n * ((self.parity[idx.cpu()].to(idx.device) + int(epoch)) % 2)

    def other(self, v: torch.Tensor) -> torch.Tensor:
        """The other view of the same samples."""
        return (v + self.n) % (2 * self.n)

    def samples(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices, mirrored mask) of view indices ``v``."""
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2 * self.n):
            raise IndexError(f"view index out of range [0, {2 * self.n})")
        return v % self.n, v >= self.n

    @staticmethod
    def mirror(x: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) with the rows where ``mirrored`` is true flipped left-right (a copy)."""
        out = x.clone()
        m = mirrored.to(x.device)
        if bool(m.any()):
            out[m] = x[m].flip(-1)
        return out

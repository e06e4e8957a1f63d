"""The deterministic batch loader: per-epoch permutations, batches, augmentation and normalisation on draw."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from .augment import AUGMENT_KINDS, _affine, _apply_affine, augment_batch

_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------- the loader
class BatchLoader:
    """Deterministic mini-batches of ``(idx, x, y)`` from uint8 images held in memory.

    The order of epoch ``e`` is a permutation drawn from a generator seeded by ``(seed, e)``
    (the identity when ``shuffle`` is false), so any epoch can be replayed without the earlier
    ones. Batch ``t`` of epoch ``e`` is augmented with a generator seeded by ``(seed, e, t)``.
    ``idx`` are always row indices into ``x_uint8`` (CPU int64), also when ``indices`` restricts
    the loader to a subset of rows. ``x`` is float32 normalised, on ``device``; ``y`` int64.
    """

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], *, shuffle: bool,
                 augment: str | None = None, seed: int = 0, drop_last: bool = False,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 indices: torch.Tensor | None = None) -> None:
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
            raise ValueError(f"BatchLoader needs uint8 (N, C, H, W) images, got {x_uint8.dtype} "
                             f"{tuple(x_uint8.shape)}")
        if y.dim() != 1 or y.shape[0] != x_uint8.shape[0]:
            raise ValueError(f"BatchLoader: {tuple(y.shape)} labels for {x_uint8.shape[0]} images")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if augment is not None and augment not in AUGMENT_KINDS:
            raise ValueError(f"unknown augmentation {augment!r}; valid: None, {', '.join(AUGMENT_KINDS)}")
        n = x_uint8.shape[0]
        if indices is not None:
            indices = torch.as_tensor(indices).to("cpu", torch.int64).reshape(-1)
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
                raise ValueError(f"BatchLoader: indices must lie in [0, {n})")
        self.x = x_uint8.contiguous()
        self.y = y.long()
        self._x_np = self.x.numpy() if self.x.device.type == "cpu" else None
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.indices = indices
        self.epoch = 0
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._scale, self._shift = _affine(self.mean, self.std, x_uint8.shape[1], self.device)

    @property
    def num_samples(self) -> int:
        """Number of rows the loader draws from per epoch."""
        return self.x.shape[0] if self.indices is None else self.indices.numel()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that ``__iter__`` yields."""
        self.epoch = int(epoch)

    def order(self, epoch: int) -> torch.Tensor:
        """Row indices (int64) in the order they are visited in ``epoch``."""
        base = self.indices
        if not self.shuffle:
            return torch.arange(self.x.shape[0]) if base is None else base.clone()
        g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, 0))
        perm = torch.randperm(self.num_samples, generator=g)
        return perm if base is None else base[perm]

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """The index sets of the batches of ``epoch``; the last one is partial unless ``drop_last``."""
        parts = list(self.order(epoch).split(self.batch_size))
        if self.drop_last and parts and parts[-1].numel() < self.batch_size:
            parts.pop()
        return parts

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(idx, x, y)`` for every batch of ``epoch``."""
        for t, idx in enumerate(self.batches(epoch)):
            yield self.load(idx, epoch, t)

    def load(self, idx: torch.Tensor, epoch: int = 0, step: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gather rows ``idx``, augment them as batch ``step`` of ``epoch``, normalise and move."""
        if self._x_np is not None:  # numpy's take is much faster than torch indexing for uint8
            xb = torch.from_numpy(np.take(self._x_np, idx.cpu().numpy(), axis=0))
        else:
            xb = self.x.index_select(0, idx.to(self.x.device))
        if self.augment is not None:
            g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, 1, step))
            xb = augment_batch(xb, self.augment, g)
        yb = self.y.index_select(0, idx.to(self.y.device))
        if xb.device != self.device:
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
        return idx, _apply_affine(xb, self._scale, self._shift, self.channels_last), yb


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` with splitmix64 (distinct tuples give unrelated seeds)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        z = (h ^ (int(p) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


"""Vectorised batch transforms in raw pixel space: augmentation (crop/flip, shift) and normalisation.

Batches stay uint8 ``(B, C, H, W)`` while they are augmented; :func:`normalize` (and the loader,
through :func:`_affine` / :func:`_apply_affine`) turns them into float32 ``(x / 255 - mean) / std``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

AUGMENT_KINDS = ("crop_flip", "shift")
_CIFAR_PAD, _MNIST_SHIFT = 4, 2


# ------------------------------------------------------------------------ normalise / augment
def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel (channel dim -3), as float32 on ``x``'s device."""
    scale, shift = _affine(mean, std, _channels(x_uint8), x_uint8.device)
    return _apply_affine(x_uint8, scale, shift)


def augment_batch(x_uint8: torch.Tensor, kind: str | None, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a uint8 batch (B, C, H, W); returns a new uint8 tensor of the same shape.

    ``"crop_flip"``: an H x W crop of the image zero-padded by 4 pixels, then a horizontal flip
    with probability 1/2 (torchvision's RandomCrop(padding=4) + RandomHorizontalFlip).
    ``"shift"``: a translation by up to 2 pixels in each direction with zero fill, no flip.
    ``None`` returns ``x_uint8`` itself. Offsets (then flips) are drawn from ``generator``.
    """
    if kind is None:
        return x_uint8
    if kind not in AUGMENT_KINDS:
        raise ValueError(f"unknown augmentation {kind!r}; valid: None, {', '.join(AUGMENT_KINDS)}")
    if x_uint8.dim() != 4 or x_uint8.dtype != torch.uint8:
        raise ValueError(f"augment_batch needs a uint8 (B, C, H, W) batch, got {x_uint8.dtype} "
                         f"{tuple(x_uint8.shape)}")
    pad = _CIFAR_PAD if kind == "crop_flip" else _MNIST_SHIFT
    return _pad_crop(x_uint8, pad, kind == "crop_flip", generator)


def _pad_crop(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Crop each image of ``x`` zero-padded by ``pad`` at a random offset (and maybe mirror it).

    Drawn from ``generator`` in this order: ``randint(0, 2 pad + 1, (2, B))`` (row offsets, then
    column offsets), then, if ``flip``, ``randint(0, 2, (B,))`` (1 = mirror).
    """
    b = x.shape[0]
    dev = generator.device
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=dev).cpu()
    mirror = torch.randint(0, 2, (b,), generator=generator, device=dev).cpu().bool() if flip else None
    if x.device.type == "cpu":  # numpy's fancy indexing is several times faster for uint8 on CPU
        return _crop_numpy(x, pad, off, mirror)
    return _crop_torch(x, pad, off, mirror)


def _crop_numpy(x: torch.Tensor, pad: int, off: torch.Tensor, mirror: torch.Tensor | None) -> torch.Tensor:
    """Pick each image's window from one strided view of all (2 pad + 1)^2 windows of the padded batch."""
    b, c, h, w = x.shape
    padded = np.zeros((b, c, h + 2 * pad, w + 2 * pad), np.uint8)
    padded[:, :, pad:pad + h, pad:pad + w] = x.numpy()
    s = padded.strides
    windows = np.lib.stride_tricks.as_strided(
        padded, (b, c, 2 * pad + 1, 2 * pad + 1, h, w), (s[0], s[1], s[2], s[3], s[2], s[3]),
        writeable=False)
    o = off.numpy()
    out = windows[np.arange(b), :, o[0], o[1]]
    if mirror is not None:
        m = mirror.numpy()
        out[m] = out[m][..., ::-1]
    return torch.from_numpy(out)


def _crop_torch(x: torch.Tensor, pad: int, off: torch.Tensor, mirror: torch.Tensor | None) -> torch.Tensor:
    """The same as :func:`_crop_numpy` with torch ops, for images on an accelerator."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    s = padded.stride()
    windows = padded.as_strided((b, c, 2 * pad + 1, 2 * pad + 1, h, w), (s[0], s[1], s[2], s[3], s[2], s[3]))
    off = off.to(x.device)
    out = windows[torch.arange(b, device=x.device), :, off[0], off[1]]
    if mirror is not None:
        out = torch.where(mirror.to(x.device)[:, None, None, None], out.flip(3), out)
    return out.contiguous()



def _channels(x: torch.Tensor) -> int:
    if x.dim() < 3:
        raise ValueError(f"expected images with a channel dimension at -3, got shape {tuple(x.shape)}")
    return int(x.shape[-3])


def _affine(mean: Sequence[float], std: Sequence[float], c: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale = 1 / (255 std)`` and ``shift = -mean / std`` as (C, 1, 1) float32 tensors."""
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise ValueError(f"mean/std of length {m.numel()}/{s.numel()} for {c} channels")
    if bool((s <= 0).any()):
        raise ValueError(f"std must be positive, got {tuple(s.tolist())}")
    scale = (1.0 / (255.0 * s)).expand(c).reshape(c, 1, 1)
    shift = (-m / s).expand(c).reshape(c, 1, 1)
    return scale.to(device, torch.float32), shift.to(device, torch.float32)


def _apply_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                  channels_last: bool = False) -> torch.Tensor:
    """``x * scale + shift`` in float32; channels_last output if asked, else ``x``'s memory format.

    On CPU this runs in single-threaded numpy, which is as fast as torch for a batch and immune
    to OpenMP slow-downs when the cores are busy.
    """
    if x.dtype != torch.uint8 or x.dim() < 3:
        raise ValueError(f"expected uint8 images (..., C, H, W), got {x.dtype} {tuple(x.shape)}")
    if x.device.type != "cpu":
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.addcmul(shift.to(x.device), x.to(torch.float32), scale.to(x.device))
    xn, sc, sh = x.numpy(), scale.cpu().numpy(), shift.cpu().numpy()
    if not channels_last or x.dim() != 4:
        out = np.multiply(xn, sc, dtype=np.float32)
        np.add(out, sh, out=out)
        return torch.from_numpy(out)
    b, c, h, w = xn.shape
    nhwc = np.empty((b, h, w, c), np.uint8)
    for i in range(c):
        nhwc[..., i] = xn[:, i]
    # per-pixel tiled constants keep numpy's inner loop long (a length-C inner loop is slow)
    out = np.multiply(nhwc.reshape(b, -1), np.tile(sc.reshape(c), h * w), dtype=np.float32)
    np.add(out, np.tile(sh.reshape(c), h * w), out=out)
    return torch.from_numpy(out.reshape(b, h, w, c)).permute(0, 3, 1, 2)

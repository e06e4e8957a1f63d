"""Mixed precision (``--amp {off,bf16,fp16}``): autocast for the stages' forward passes in both
phases, everything the method itself computes in fp32 (local losses, κ estimates, λ/u updates,
monitors), and for fp16 a gradient scaler per stage (parallel phase) and one for the serial
phase. Messages and stores keep the store dtype (``--aux-dtype``)."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The run's autocast setting on ``device``."""

    def __init__(self, amp: str, device: torch.device) -> None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        self.amp = amp
        self.dtype = AMP_DTYPES[amp]
        self.device_type = torch.device(device).type

    def autocast(self) -> Any:
        """Autocast for a forward pass (a no-op with ``--amp off``)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def scaling(self) -> bool:
        """fp16 needs loss scaling; bf16 has fp32's exponent range and does not."""
        return self.dtype == torch.float16

    def scaler(self) -> "torch.amp.GradScaler":
        """A gradient scaler (disabled, a pass-through, unless fp16)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scaling)


def inverse_scale(scaler: "torch.amp.GradScaler", device: torch.device) -> torch.Tensor | None:
    """1/scale as a device tensor (no host synchronisation), or None when the scaler is off."""
    if not scaler.is_enabled():
        return None
    return scaler._get_scale_async().double().reciprocal().float().to(device)  # noqa: SLF001

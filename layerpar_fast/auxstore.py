"""Per-sample auxiliary-variable storage (docs/method.md §1-§2, §4).

An :class:`AuxStore` holds one coarse row per training sample (λ̃_k, u_k or μ_k at one cut),
indexed by the sample's dataset index. The engine only uses the interface below, so a learned
predictor (the auxiliary-variable network of §9) can implement it instead of a table.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from . import ops
from .filters import FilterPair

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AuxStore(ABC):
    """Per-sample rows of shape ``row_shape`` (the coarse (C, h, w) of one cut)."""

    row_shape: tuple[int, ...]
    dtype: torch.dtype

    @abstractmethod
    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (B, *row_shape), in the storage dtype, on the compute device."""

    @abstractmethod
    def scatter_(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrite rows ``idx`` with ``rows`` (cast to the storage dtype)."""

    @abstractmethod
    def stage_input(self, idx: torch.Tensor, filt: FilterPair, channels_last: bool = False) -> torch.Tensor:
        """U(rows ``idx``) in fp32 on the compute device: the input of the next stage."""

    @abstractmethod
    def jacobi_update_(self, mult: "AuxStore | None", idx: torch.Tensor, a: torch.Tensor,
                       g: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
        """The Jacobi λ-step (+ multiplier step on ``mult``) on rows ``idx``; returns new rows."""

    def plan(self, batches: "list[torch.Tensor]") -> None:
        """The index tensors the worker will read next, in order (an epoch's batches, told at
        ``StageWorker.begin_epoch``): a store may stage them ahead (hoststore.HostAuxStore).
        The default ignores it."""

    @abstractmethod
    def zero_(self) -> None:
        """Set every row to 0."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes held by the store."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


class TensorAuxStore(AuxStore):
    """A dense (N, C, h, w) table in fp32/bf16/fp16, on the compute device or in host memory.

    With a CUDA compute device and ``device="cpu"`` the table lives in pinned host memory and
    rows are staged to the GPU per batch.
    """

    def __init__(self, num_samples: int, row_shape: tuple[int, ...], dtype: str = "fp32",
                 device: torch.device | str = "cpu", compute_device: torch.device | str | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"aux dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype_name = dtype
        self.device = torch.device(device)
        self.compute_device = torch.device(compute_device) if compute_device is not None else self.device
        pin = self.device.type == "cpu" and self.compute_device.type == "cuda"
        self.table = torch.zeros((num_samples, *self.row_shape), dtype=DTYPES[dtype], device=self.device,
                                 pin_memory=pin)

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.table.dtype

    @property
    def num_samples(self) -> int:
        return self.table.shape[0]

    def _idx(self, idx: torch.Tensor) -> torch.Tensor:
        return idx.to(self.device, non_blocking=True)

    def _to_compute(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.compute_device else t.to(self.compute_device, non_blocking=True)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        return self._to_compute(ops.gather_rows(self.table, self._idx(idx)))

    def scatter_(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        ops.scatter_rows_(self.table, self._idx(idx), rows)

    def stage_input(self, idx: torch.Tensor, filt: FilterPair, channels_last: bool = False) -> torch.Tensor:
        if self.device == self.compute_device:
            return ops.stage_input(self.table, self._idx(idx), filt, channels_last)
        rows = self.gather(idx)
        z = filt.up(rows.float())
        return z.contiguous(memory_format=torch.channels_last) if channels_last else z.contiguous()

    def jacobi_update_(self, mult: "AuxStore | None", idx: torch.Tensor, a: torch.Tensor,
                       g: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
        if mult is not None and not isinstance(mult, TensorAuxStore):
            raise TypeError("TensorAuxStore.jacobi_update_ needs a TensorAuxStore multiplier store")
        u_table = None if mult is None else mult.table
        dev = self.device
        rows = ops.jacobi_update_(self.table, u_table, self._idx(idx), a.to(dev), g.to(dev), beta, gamma)
        return self._to_compute(rows)

    def zero_(self) -> None:
        self.table.zero_()

    def memory_bytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table, "dtype": self.dtype_name, "row_shape": self.row_shape}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = state["table"]
        if tuple(t.shape) != tuple(self.table.shape) or state.get("dtype") != self.dtype_name:
            raise ValueError(f"auxiliary store in checkpoint has shape {tuple(t.shape)} / {state.get('dtype')}, "
                             f"expected {tuple(self.table.shape)} / {self.dtype_name}")
        self.table.copy_(t)

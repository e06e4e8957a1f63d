"""The serial phase (docs/method.md §6): back-propagation of the assembled network with data
augmentation. In one process: plain back-propagation. With one process per stage
(``cfg.serial_on``): "all" = data-parallel over the ranks (DistributedDataParallel, each rank a
contiguous share of every global batch, augmented exactly as in one process, BatchNorm running
statistics averaged at the end of the epoch); "one" = rank 0 trains (with the idle ranks' cores
too unless ``cfg.threads`` is set) while the others wait, then everything is broadcast.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import torch.distributed as dist

from .globalbn import global_batch_norm_on
from .progress import _bar, _bar_close, _bar_update
from .replicas import ReplicaBN, bn_running
from .topology import _no_buffer_sync


class SerialPhase:
    """Mixin of :class:`~layerpar_fast.trainer.HybridTrainer`: one serial epoch."""

    def _serial_epoch(self, epoch: int) -> dict[str, Any]:
        if self.topology.world == 1:
            return self._serial_epoch_local(epoch)
        if self.cfg.serial_on == "one":
            return self._serial_epoch_on_one(epoch)
        return self._serial_epoch_ddp(epoch)

    def _serial_shards(self) -> int:
        """How many data-parallel ranks one process simulates in a serial epoch: K·R with
        ``--serial-on all`` and K > 1 stages (R stage replicas) (what K processes do, so ``--transport local``
        gives the results of a distributed run), else 1."""
        cfg = self.cfg
        if cfg.serial_bn == "global":   # every simulated rank normalises over the whole batch: one pass
            return 1
        return cfg.world_size() if (cfg.serial_on == "all" and cfg.stages > 1 and self.topology.world == 1) else 1

    @property
    def _serial_model(self) -> nn.Module:
        """The assembled network, compiled once with ``--compile`` (sharing its parameters)."""
        if not self.cfg.compile:
            return self.model
        if getattr(self, "_compiled_model", None) is None:
            from .worker import compile_fn
            self._compiled_model = compile_fn(self.model)
        return self._compiled_model

    def _serial_epoch_local(self, epoch: int, shards: int | None = None) -> dict[str, Any]:
        """One epoch of back-propagation of the assembled network in this process. With
        ``shards`` = R > 1 it computes what R data-parallel ranks compute: every global batch is
        split into R contiguous shares (all ranks take the whole batch when it has fewer than 2R
        samples), each share runs forward with BatchNorm statistics of its own and running
        statistics of its own, the gradients are those of the mean loss over the global batch,
        and the running statistics are averaged at the end of the epoch (up to the order of float
        additions in the all-reduce)."""
        cfg = self.cfg
        r_count = self._serial_shards() if shards is None else shards
        self.model.train()
        shard_bn = ReplicaBN(self.model, r_count) if r_count > 1 else None   # each simulated rank's buffers
        loader = self.train_loader
        loader.set_epoch(epoch)
        bar = _bar(len(loader), f"epoch {epoch + 1}/{self.total_epochs} serial", cfg.progress)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)   # loss sum, correct, samples
        t_data = t_comp = 0.0
        step0 = epoch * self.steps_per_epoch
        t_prev = shown = time.perf_counter()
        for t, (idx, x, y) in enumerate(loader):
            t1 = time.perf_counter()
            t_data += t1 - t_prev
            lr = self.lr_at(step0 + t)
            self._set_lr(lr)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            n = len(y)
            if shard_bn is None or n < 2 * r_count:
                parts = [(x, y, None)]
            else:
                parts = [(x[n * r // r_count:n * (r + 1) // r_count], y[n * r // r_count:n * (r + 1) // r_count], r)
                         for r in range(r_count)]
            scaler = self.serial_scaler
            for xs, ys, r in parts:
                if r is not None:
                    shard_bn.use(r)
                with self.precision.autocast():
                    out = self._serial_model(xs)
                loss_sum = F.cross_entropy(out.float(), ys, reduction="sum", label_smoothing=cfg.label_smoothing)
                scaler.scale(loss_sum / n).backward()
                sums += torch.stack([loss_sum.detach().double(), (out.detach().argmax(1) == ys).sum().double(),
                                     torch.tensor(float(len(ys)), dtype=torch.float64, device=sums.device)])
            if shard_bn is not None and len(parts) == 1:   # every simulated rank saw the whole batch
                shard_bn.save_to_all()
            for opt in self.optimizers:
                scaler.step(opt)
            scaler.update()
            t_prev = time.perf_counter()
            t_comp += t_prev - t1
            if bar is not None and (t_prev - shown > 1.0 or t == len(loader) - 1):
                shown = t_prev
                c = sums.tolist()
                _bar_update(bar, c[0] / c[2], c[1] / c[2], int(c[2]), t_data + t_comp)
            elif bar is not None:
                bar.update(1)
        _bar_close(bar)
        if shard_bn is not None:     # the ranks' running statistics, averaged (float64)
            shard_bn.average()
        c = sums.tolist()
        rec = {"epoch": epoch + 1, "phase": "serial", "lr": lr, "train_loss": c[0] / c[2],
               "train_acc": c[1] / c[2], "data_s": t_data, "compute_s": t_comp}
        if r_count > 1:
            rec["simulated_ranks"] = r_count
        return rec

    def _serial_epoch_on_one(self, epoch: int) -> dict[str, Any]:
        topo = self.topology

        def train() -> dict[str, Any]:
            threads = torch.get_num_threads()
            if self.cfg.threads is None:  # the other ranks of this machine idle: use their cores too
                torch.set_num_threads(max(1, min(os.cpu_count() or 1, threads * topo.local_workers())))
            try:
                return self._serial_epoch_local(epoch)
            finally:
                torch.set_num_threads(threads)

        rec = topo.on_main(train, f"serial/{epoch}", self.cfg.timeout_s, f"training serial epoch {epoch + 1} alone")
        topo.sync_all_from(0, self.stages, self.optimizers)
        return topo.broadcast(rec, 0)


    def _serial_epoch_ddp(self, epoch: int) -> dict[str, Any]:
        from torch.nn.parallel import DistributedDataParallel as DDP
        cfg, k = self.cfg, self.topology.world
        self.model.train()
        ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                  **_no_buffer_sync(DDP))
        if cfg.compile:
            ddp = torch.compile(ddp)
        loader = self.train_loader
        batches = loader.batches(epoch)
        bar = _bar(len(batches), f"epoch {epoch + 1}/{self.total_epochs} serial ({k} ranks)", cfg.progress)
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples (this rank's share)
        step0 = epoch * self.steps_per_epoch
        bn_scope = (global_batch_norm_on(self.model, _all_reduce_sum) if cfg.serial_bn == "global"
                    else contextlib.nullcontext())
        with bn_scope:
            lr, sums, t_data, t_comp = self._ddp_steps(ddp, batches, epoch, step0, bar, sums)
        _bar_close(bar)
        del ddp
        sums = self.topology.sum_(sums, self.device)
        self._average_bn_stats()
        return {"epoch": epoch + 1, "phase": "serial", "lr": lr, "train_loss": float(sums[0] / sums[2]),
                "train_acc": float(sums[1] / sums[2]), "data_s": t_data, "compute_s": t_comp, "ranks": k,
                "serial_bn": cfg.serial_bn}

    def _ddp_steps(self, ddp: nn.Module, batches: list[torch.Tensor], epoch: int, step0: int, bar: Any,
                   sums: torch.Tensor) -> tuple[float, torch.Tensor, float, float]:
        cfg, loader = self.cfg, self.train_loader
        k, r = self.topology.world, self.topology.rank
        t_data = t_comp = 0.0
        lr = self.lr_at(step0)
        t_prev = time.perf_counter()
        for t, idx in enumerate(batches):
            _, x, y = loader.load(idx, epoch, t)  # the whole global batch, augmented as in one process
            n = len(idx)
            if n >= 2 * k:                      # this rank's contiguous share
                lo, hi = n * r // k, n * (r + 1) // k
                x, y = x[lo:hi], y[lo:hi]
                scale = k / n                    # DDP averages over k ranks: Σ_r scale·Σ_i CE = mean over n
            else:                                # too few samples to share: every rank takes all
                scale = 1.0 / n
            t1 = time.perf_counter()
            t_data += t1 - t_prev
            lr = self.lr_at(step0 + t)
            self._set_lr(lr)
            with self.precision.autocast():
                out = ddp(x)
            loss_sum = F.cross_entropy(out.float(), y, reduction="sum", label_smoothing=cfg.label_smoothing)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.serial_scaler.scale(loss_sum * scale).backward()
            for opt in self.optimizers:
                self.serial_scaler.step(opt)
            self.serial_scaler.update()
            if n >= 2 * k or r == 0:
                sums += torch.tensor([float(loss_sum.detach()), float((out.detach().argmax(1) == y).sum()), len(y)],
                                     dtype=torch.float64)
            t_prev = time.perf_counter()
            t_comp += t_prev - t1
            _bar_update(bar, float(sums[0] / max(sums[2], 1)), float(sums[1] / max(sums[2], 1)),
                        int(sums[2]) * k, t_data + t_comp)
        return lr, sums, t_data, t_comp

    def _average_bn_stats(self) -> None:
        """Average BatchNorm running statistics over the ranks (each saw its share of the data)."""
        self.topology.mean_(bn_running(self.model), 1.0, self.topology.world)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks (the global-batch BatchNorm's statistics; t is on the compute device)."""
    dist.all_reduce(t)
    return t

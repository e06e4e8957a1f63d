"""Evaluation of the assembled network (docs/method.md §6): BatchNorm recalibration after a
parallel epoch, the serial forward pass in eval mode (and the DS forward with U∘D at every cut),
each sharded over the ranks of the run's topology (one rank: the plain computation, bit for bit).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.loader import BatchLoader, _derive_seed
from .monitors import frozen_bn_stats


class Evaluation:
    """Mixin of :class:`~layerpar_fast.trainer.HybridTrainer`: evaluation and recalibration."""

    def recalibrate_bn(self, epoch: int) -> None:
        """Re-estimate BatchNorm running statistics of stages 1..K-1 (0-based) on true activations:
        serial forward passes in train mode without gradients; stage 0's statistics are kept.
        Sharded over the ranks: rank r averages the statistics of batches r, r+R, ... of the
        recalibration set; the cumulative averages are then combined, weighted by batch counts
        (the average one process computes, up to float rounding; exactly it for one rank)."""
        mods = self._recal_modules()
        if not mods:
            return
        topo = self.topology
        batches = self.plain_loader.batches(epoch)[: self.cfg.bn_recalib_batches]
        mine = batches[topo.rank::topo.world]
        self._recal_on(mods, mine)
        with torch.no_grad():
            topo.mean_([t for m in mods for t in (m.running_mean, m.running_var)], len(mine), max(1, len(batches)))
            for m in mods:
                m.num_batches_tracked.fill_(len(batches))

    def _recal_modules(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """The BatchNorm layers that recalibration re-estimates (none when it is turned off)."""
        if self.cfg.bn_recalib_batches == 0:
            return []
        return [m for s in self.stages[1:] for m in s.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def _recal_on(self, mods: list[nn.modules.batchnorm._BatchNorm], batches: list[Any]) -> None:
        """Reset ``mods``' running statistics to the cumulative average over ``batches``."""
        saved_m = [m.momentum for m in mods]
        for m in mods:
            m.reset_running_stats()
            m.momentum = None
        fn = self._input_fn()
        self.model.train()
        with torch.no_grad(), frozen_bn_stats(self.stages[0]), self.precision.autocast():
            for idx in batches:
                self.model(fn(idx))
        for m, mom in zip(mods, saved_m):
            m.momentum = mom

    def eval_forward(self, x: torch.Tensor, ds_forward: bool = False) -> torch.Tensor:
        """The assembled network's forward; ``ds_forward`` inserts U∘D at every cut."""
        if not ds_forward:
            return self.model(x)
        h = x
        for k, stage in enumerate(self.stages):
            h = stage(h)
            if k < len(self.stages) - 1:
                h = self.filt.up(self.filt.down(h))
        return h

    @torch.no_grad()
    @torch.no_grad()
    def evaluate(self, ds_forward: bool = False) -> tuple[float, float]:
        """(test loss, test accuracy) of the assembled network in eval mode; ``ds_forward``
        inserts U∘D at every cut (the network the parallel phase actually trained). Each rank
        evaluates every R-th test batch; the sums are float64."""
        topo = self.topology
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for i, idx in enumerate(self.test_loader.batches(0)):
            if i % topo.world != topo.rank:
                continue
            _, x, y = self.test_loader.load(idx)
            with self.precision.autocast():
                out = self.eval_forward(x, ds_forward).float()
            sums += torch.tensor([float(F.cross_entropy(out, y, reduction="sum")),
                                  float((out.argmax(1) == y).sum()), len(y)], dtype=torch.float64)
        self.model.train()
        sums = topo.sum_(sums, self.device)
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])

    @torch.no_grad()
    def heldin_loss(self) -> float:
        """The pace guard's measure (--pace-rows, docs/method.md §6): mean cross-entropy of the
        assembled network in eval mode on ``cfg.pace_rows`` held-in training rows, in the serial
        epochs' views (augmented as they are, one fixed view per row, drawn from the loader's own
        generators: no training randomness is used). Sharded over the ranks like :meth:`evaluate`;
        each batch's sum fills its own slot before the slots are summed across ranks and then in
        batch order, so one process and K processes get the same number, bit for bit."""
        loader = self._heldin_loader()
        topo = self.topology
        batches = loader.batches(0)
        slots = torch.zeros(len(batches), dtype=torch.float64)
        self.model.eval()
        for i, idx in enumerate(batches):
            if i % topo.world != topo.rank:
                continue
            _, x, y = loader.load(idx, 0, i)
            with self.precision.autocast():
                out = self.model(x).float()
            slots[i] = float(F.cross_entropy(out, y, reduction="sum"))
        self.model.train()
        slots = topo.sum_(slots, self.device)
        total = 0.0
        for v in slots.tolist():
            total += v
        return total / loader.num_samples

    def entry_heldin_loss(self) -> float:
        """The pace guard's reference at a phase's entry: :meth:`heldin_loss` with BatchNorm
        statistics recalibrated as they are after every parallel epoch (§6), so that the
        comparison is like for like; the serial epochs' running statistics are restored after,
        bit for bit, and the run continues as without the measurement."""
        bufs = [t for m in self._recal_modules() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
        saved = [t.clone() for t in bufs]
        self.recalibrate_bn(self.epoch)
        loss = self.heldin_loss()
        with torch.no_grad():
            for t, v in zip(bufs, saved):
                t.copy_(v)
        return loss

    def _heldin_loader(self) -> Any:
        """The pace guard's rows: the first ``pace_rows`` of a permutation of the training set
        drawn from its own seed (all rows when there are fewer), in fixed batches and views."""
        if getattr(self, "_heldin", None) is None:
            ds, cfg = self.data, self.cfg
            n = ds.x_train.shape[0]
            g = torch.Generator().manual_seed(_derive_seed(cfg.seed, 0x9ACE))
            rows = torch.randperm(n, generator=g)[: min(cfg.pace_rows, n)]
            self._heldin = BatchLoader(ds.x_train, ds.y_train, cfg.eval_batch_size, ds.mean, ds.std,
                                       shuffle=False, augment=self.aug, seed=_derive_seed(cfg.seed, 0x9ACE, 1),
                                       device=self.device, channels_last=cfg.channels_last, indices=rows)
        return self._heldin

    def _evaluate_epoch(self, phase: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        if phase == "parallel":
            self.recalibrate_bn(self.epoch)
        loss, acc = self.evaluate()
        rec = {"test_loss": loss, "test_acc": acc}
        if phase == "parallel" and self.cfg.ds > 1:
            rec["ds_test_loss"], rec["ds_test_acc"] = self.evaluate(ds_forward=True)
        rec["eval_time_s"] = time.perf_counter() - t0
        return rec

"""The parallel phase (docs/method.md §3-§5): auxiliary stores, κ/β, the warm-up that keeps
device synchronisations away from posted receives (devsync.py), the initial fill, the
multiplier warm start, the parallel epochs of the stages this process owns, and their record.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import devsync, ops
from .auxstore import TensorAuxStore
from .hoststore import HostAuxStore, pinning_available
from .config import ConfigError
from .data import _affine
from .metrics import speedup_model
from .monitors import cosine, estimate_kappa, frozen_bn_stats, param_norm
from .paraug import FlipViews, ShiftAugment, largest_shift
from .progress import _bar, _bar_close, _bar_step, _bar_update
from .replicas import OffsetAuxStore, block_rows, replica_batches, share_of
from .worker import StageWorker, WorkerSettings


@dataclass
class PhaseState:
    """What a parallel phase fixed when it started (kept in checkpoints to resume mid-phase)."""

    index: int
    kappas: list[float]
    betas: list[float]
    lr_caps: list[float]
    pace_ref: float | None = None   # --pace-rows: held-in loss the phase's first epoch must go below


def sharp_stages(kappas: list[float], lr: float, gate: float) -> list[int]:
    """The --sharpness-gate rule: the stages k whose lr·κ_k at a phase's entry exceeds ``gate``
    (κ_k, the top eigenvalue of the Gauss-Newton matrix of the stage's outputs, is what the
    proximal weight β_k = c/(lr·κ_k) is scaled by; a large lr·κ_k means a small β_k, and the
    stage's outputs then move far from what its neighbour trained on within one epoch).
    A κ that was not measured (NaN: --kappa-iters 0) passes. Off when ``gate`` is 0."""
    if gate <= 0:
        return []
    return [k for k, kap in enumerate(kappas) if math.isfinite(kap) and lr * kap > gate]


class _Counters:
    """A transport's counters (possibly gathered from another rank), shaped for the record."""

    def __init__(self, c: dict[str, dict[str, float]]) -> None:
        self._c = c

    def counters(self) -> dict[str, dict[str, float]]:
        return self._c


class ParallelPhase:
    """Mixin of :class:`~layerpar_fast.trainer.HybridTrainer`: the parallel phase."""

    def _share_phase_constants(self, kappas: list[float], betas: list[float], caps: list[float],
                               lr_now: float) -> tuple[list[float], list[float], list[float]]:
        """κ_k, β_k and lr caps are measured by each stage's owner; every rank gets all of them."""
        if self.topology.world == 1:
            return kappas, betas, caps
        every = self.topology.gather([(k, kappas[k], betas[k], caps[k]) for k in range(len(kappas))
                                      if self.topology.owns(k)])
        for part in every:
            for k, kap, beta, cap in part:
                kappas[k], betas[k], caps[k] = kap, beta, cap
        return kappas, betas, caps

    def _store_dtype_bytes(self) -> int:
        return {"fp32": 4, "bf16": 2, "fp16": 2}[self.cfg.aux_dtype]

    #: --aux-device auto keeps the stores in host memory when they would take more than this
    #: share of the free device memory
    AUX_AUTO_SHARE = 0.25

    def _aux_placement(self, need: int) -> tuple[str, str]:
        """("device" | "host", why) for stores of ``need`` bytes on this rank (--aux-device)."""
        choice, dev = self.cfg.aux_device, self.device
        if choice != "auto":
            return choice, f"--aux-device {choice}"
        if dev.type != "cuda":
            return "device", "--aux-device auto, compute device is the CPU"
        free, _total = torch.cuda.mem_get_info(dev)
        share = need / max(free, 1)
        where = "host" if share > self.AUX_AUTO_SHARE else "device"
        return where, (f"--aux-device auto: {share:.0%} of the {free / 2**20:.0f} MiB free on {dev}, "
                       f"{'more' if where == 'host' else 'not more'} than {self.AUX_AUTO_SHARE:.0%}")

    def _make_stores(self) -> dict[str, list[Any]]:
        cfg, n = self.cfg, self.data.num_train
        if self.flip_views is not None:      # a row per sample and view (paraug.FlipViews)
            n = self.flip_views.rows
        k = len(self.stages)
        coarse = [self.filt.coarse_shape(s) for s in self.cut_shapes]
        dev = self.device
        own = self.topology.owns
        mine = {"input": [i for i in range(k - 1) if own(i + 1)], "target": [i for i in range(k - 1) if own(i)],
                "mult": [i for i in range(k - 1) if cfg.method == "al" and own(i)]}
        replica = self._replica_rows()      # a distributed stage replica holds its block's rows only
        if replica is not None:
            n = replica[1]
        need = sum(n * math.prod(coarse[i]) * self._store_dtype_bytes() for cuts in mine.values() for i in cuts)
        where, why = self._aux_placement(need)
        if where == "host":
            pinned, no_pin = pinning_available()
            if dev.type != "cuda" or not pinned:
                if not getattr(self, "_aux_host_notice", False):   # one notice per run
                    reason = "the compute device is the CPU" if dev.type != "cuda" else no_pin
                    self.log(f"notice: --aux-device host: pinned memory unavailable ({reason}); the host "
                             "stores use ordinary memory" + (" and no side streams" if dev.type != "cuda" else ""))
                    self._aux_host_notice = True

        def store(shape: tuple[int, ...]) -> Any:
            if where == "host":
                s = HostAuxStore(n, shape, cfg.aux_dtype, compute_device=dev)
            else:
                s = TensorAuxStore(n, shape, cfg.aux_dtype, device=dev, compute_device=dev)
            return s if replica is None else OffsetAuxStore(s, replica[0])

        stores: dict[str, list[Any]] = {
            "input": [None] + [store(coarse[i]) if i in mine["input"] else None for i in range(k - 1)],
            "target": [store(coarse[i]) if i in mine["target"] else None for i in range(k - 1)] + [None],
            "mult": [store(coarse[i]) if i in mine["mult"] else None for i in range(k - 1)] + [None],
        }
        total = sum(s.memory_bytes() for lst in stores.values() for s in lst if s is not None)
        views = " (both mirror views)" if self.flip_views is not None else ""
        if where == "host":
            place = "pinned host memory" if dev.type == "cuda" and pinning_available()[0] else "host memory"
            place += f", rows prefetched to {dev}" if dev.type == "cuda" else ""
        else:
            place = str(dev)
        rank = (f" of rank {self.topology.rank} (per rank; the epoch records total every rank's)"
                if self.topology.world > 1 else f" of all {k} stages (total, one process)")
        if self.topology.replicas > 1:
            r = self.topology.replicas
            views += (f", replica {self.topology.replica} of {r}: rows {replica[0]}..{replica[0] + n - 1}"
                      if replica is not None else f", {r} replicas simulated")
        self.log(f"auxiliary stores{rank}: {total / 2**20:.1f} MiB in {cfg.aux_dtype} in {place} ({why}; "
                 f"cuts {[tuple(c) for c in coarse]} coarse, s={cfg.ds}, {n} rows{views})")
        self.aux_bytes = total
        self.aux_where = where
        return stores

    def _parallel_views(self) -> ShiftAugment | None:
        """The parallel phase's shift views: always for shift / shift_flip (or a ConfigError); for
        ``auto`` whenever the serial epochs augment and the cuts allow it, else none (said)."""
        if self.cfg.parallel_augment != "auto":
            return self._shift_augment()
        if self.aug is None:
            return None           # no augmentation: the parallel phase trains on the images as they are
        try:
            views = self._shift_augment()
        except ConfigError as e:
            why = str(e).split(": ", 1)[1] if str(e).startswith("--parallel-augment") else str(e)
            self.log(f"parallel phase without shift views (--parallel-augment auto): {why}")
            return None
        self.log(f"parallel phase on shifted views (--parallel-augment auto, as the serial epochs use "
                 f"{self.aug}; --parallel-augment none turns them off)")
        return views

    def _shift_augment(self) -> ShiftAugment | None:
        """The parallel phase's shift views (paraug.py), or a ConfigError when they cannot work."""
        ds, cfg = self.data, self.cfg
        max_shift = largest_shift(self.aug)
        if max_shift == 0:
            raise ConfigError(f"--parallel-augment {cfg.parallel_augment} takes its largest shift from the serial "
                              "augmentation (4 px for crop_flip, 2 px for shift), but --augment is none")
        hw = tuple(ds.x_train.shape[-2:])
        coarse = [tuple(self.filt.coarse_shape(s)[-2:]) for s in self.cut_shapes]
        try:
            unit = ShiftAugment.unit_for(hw, coarse)
        except ValueError as e:
            raise ConfigError(f"--parallel-augment {cfg.parallel_augment}: {e}") from None
        if unit > max_shift:
            raise ConfigError(
                f"--parallel-augment {cfg.parallel_augment}: the cuts' coarse grids ({coarse} for a {hw[0]}x{hw[1]} input, "
                f"--ds {cfg.ds}) move only in steps of {unit} px, more than the {max_shift} px the "
                "augmentation allows; cut earlier or use a smaller --ds")
        _, fill = _affine(ds.mean, ds.std, ds.in_channels, self.device)
        return ShiftAugment(max_shift, unit, hw, cfg.seed, fill=fill)

    def _flip_views(self) -> FlipViews:
        """Mirror views with auxiliary rows of their own (paraug.py), or a ConfigError."""
        if self.aug != "crop_flip":
            raise ConfigError("--parallel-augment shift_flip mirrors images like the serial crop_flip "
                              f"augmentation, but --augment is {self.aug or 'none'} for {self.data.name} "
                              "(mirrored digits are other digits); use --parallel-augment shift")
        return FlipViews(self.data.num_train, self.cfg.seed)

    def _replica_rows(self) -> tuple[int, int] | None:
        """(first row, rows) of this process's block of the training rows when it runs one replica
        of a stage in a distributed K x R run (replicas.py), else None."""
        topo = self.topology
        if topo.replicas == 1 or topo.world == 1:
            return None
        per = block_rows(self.data.num_train, topo.replicas)
        return topo.replica * per, per

    def _mine(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """This process's rows of the global batches: its replica's share (distributed K x R run)
        or all of them."""
        topo = self.topology
        if topo.replicas == 1 or topo.world == 1:
            return batches
        return [share_of(b, topo.replica, topo.replicas) for b in batches]

    def _parallel_batches(self, epoch: int) -> list[torch.Tensor]:
        """The parallel epoch's global batches as store rows: sample indices, or view indices
        (shift_flip); with stage replicas, R equal shares, share r from replica r's block."""
        if self.topology.replicas > 1:
            return replica_batches(self.data.num_train, self.topology.replicas, self.cfg.batch_size,
                                   self.cfg.seed, epoch)
        batches = self.plain_loader.batches(epoch)
        if self.flip_views is None:
            return batches
        return [self.flip_views.views(b, epoch) for b in batches]

    def _parallel_labels(self) -> torch.Tensor:
        """Labels indexed by store row."""
        y = self.data.y_train
        return y if self.flip_views is None else torch.cat([y, y])

    def _input_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """rows -> normalised, un-augmented training images on the device (stage 0's input);
        with mirror views (shift_flip) rows N..2N-1 are the mirror images."""
        loader, fv = self.plain_loader, self.flip_views

        def fn(idx: torch.Tensor) -> torch.Tensor:
            if fv is None:
                return loader.load(idx)[1]
            samples, mirrored = fv.samples(idx)
            return fv.mirror(loader.load(samples)[1], mirrored)

        return fn

    def _workers(self, settings: list[WorkerSettings]) -> list[StageWorker]:
        """A worker for every stage this process owns (all of them in one process)."""
        n, st = len(self.stages), self.stores
        owned = self.topology.owned(n)
        tps = self.topology.transports(owned, n)
        return [StageWorker(k, n, self.stages[k], self.optimizers[k], tp, settings[k], self.filt,
                            self.data.x_train, self._parallel_labels(), self._input_fn() if k == 0 else None,
                            st["input"][k], st["target"][k], st["mult"][k], self.device, scaler=self.scalers[k])
                for k, tp in zip(owned, tps)]

    def _stage_lr_scale(self, k: int) -> float:
        """--stage-lr staleness: stage k's signal is K-1-k visits old (each hop adds one), so its
        learning rate is the scheduled one divided by K-k (the last stage: 1); uniform: 1."""
        return 1.0 / (len(self.stages) - k) if self.cfg.stage_lr == "staleness" else 1.0

    def _settings(self) -> list[WorkerSettings]:
        cfg, ps = self.cfg, self.phase_state
        rows = self._replica_rows()
        return [WorkerSettings(method=cfg.method, order=cfg.al_order if cfg.method == "al" else "jacobi",
                               beta=ps.betas[k], gamma=cfg.gamma, window=cfg.window, lr_cap=ps.lr_caps[k],
                               lr_scale=self._stage_lr_scale(k), precision=self.precision,
                               channels_last=cfg.channels_last, label_smoothing=cfg.label_smoothing,
                               augment=self.shift_aug, compile=cfg.compile,
                               replicas=self.topology.replicas, simulate=self.topology.simulates_replicas,
                               replica=self.topology.replica, grad_reduce=self.topology.grad_reduce(k),
                               row_start=rows[0] if rows is not None else 0)
                for k in range(len(self.stages))]

    def _enter_parallel(self, pidx: int, epoch: int) -> bool:
        """(Re-)initialise λ̃ by a forward pass and u/μ = 0; measure κ_k; fix β_k and lr caps.
        Returns False, having changed nothing, when --sharpness-gate keeps the phase closed."""
        cfg = self.cfg
        self._warmed = False
        if self._resumed_aux is not None and self._resumed_aux["phase"] == pidx:
            self.stores = self._make_stores()
            for name, lst in self.stores.items():
                for k, s in enumerate(lst):
                    if s is not None:
                        s.load_state_dict(self._resumed_aux["stores"][name][k])
            self._resumed_aux = None
            return True
        batches = self._parallel_batches(epoch)
        lr_now = self.lr_at(epoch * self.steps_per_epoch)
        # κ_k on the first batch, on true activations of the current network
        kappas, betas, caps = [], [], []
        x = self._input_fn()(batches[0])
        z = x
        for k, stage in enumerate(self.stages):
            if k == len(self.stages) - 1:
                kappas.append(float("nan"))
                betas.append(float("nan"))
                caps.append(math.inf)
                break
            if not self.topology.owns(k):  # measured by its owner (distributed run)
                kappas.append(float("nan"))
                betas.append(float("nan"))
                caps.append(math.inf)
                with torch.no_grad(), frozen_bn_stats(stage):
                    z = self.filt.up(self.filt.down(stage(z)))
                continue
            kap = estimate_kappa(stage, z, self.filt, iters=cfg.kappa_iters, seed=cfg.seed)
            if cfg.beta is not None:
                beta = cfg.beta
            elif cfg.method == "al" and cfg.al_order == "gs":
                beta = cfg.beta_c / (lr_now * kap) if kap > 0 and math.isfinite(kap) else 1.0
            else:
                beta = 10.0
            cap = 1.0 / (beta * kap) if kap > 0 and math.isfinite(kap) else math.inf
            kappas.append(kap)
            betas.append(beta)
            caps.append(cap)
            with torch.no_grad(), frozen_bn_stats(stage):
                z = self.filt.up(self.filt.down(stage(z)))
        kappas, betas, caps = self._share_phase_constants(kappas, betas, caps, lr_now)
        sharp = sharp_stages(kappas[:-1], lr_now, cfg.sharpness_gate)
        if sharp:       # the same decision on every rank: all of them hold every κ_k now
            self.gated.append({"epoch": epoch + 1, "lr": lr_now, "lr_kappa": [lr_now * k for k in kappas[:-1]]})
            self.log(f"--sharpness-gate {cfg.sharpness_gate:g}: lr x kappa = "
                     + ", ".join(f"{lr_now * kappas[k]:.3g} (stage {k})" for k in sharp)
                     + f" at the entry of parallel epoch {epoch + 1}: the network is still too sharp for "
                       "stale signals; the epoch runs serial and the check repeats at the next one")
            return False
        self.stores = self._make_stores()
        automatic = cfg.beta is None and cfg.method == "al" and cfg.al_order == "gs"
        for k, (kap, beta, cap) in enumerate(zip(kappas, betas, caps)):
            if cap < lr_now:     # expected with the automatic beta when --beta-c > 1: said, not warned
                self.log(("" if automatic else "warning: ")
                         + f"stage {k}: lr {lr_now:.4g} x beta {beta:.4g} x kappa {kap:.4g} = "
                         f"{lr_now * beta * kap:.3g} > 1; capping this stage's lr at {cap:.4g} (docs/method.md §3)")
        self.phase_state = PhaseState(pidx, kappas, betas, caps)
        self.log("parallel phase: " + ", ".join(
            f"stage {k}: kappa={kap:.4g} beta={b:.4g} lr*beta*kappa={lr_now * b * kap:.3g}"
            for k, (kap, b) in enumerate(zip(kappas[:-1], betas[:-1]))))
        # initial fill, pipelined stage by stage in the first parallel epoch's batch order
        # (with mirror views, then the same batches' other views)
        batches = self._mine(batches)
        if self.flip_views is not None:
            batches = batches + [self.flip_views.other(b) for b in batches]
        workers = self._workers(self._settings())
        self._warm_up(workers, batches)
        bar = _bar(len(batches), f"epoch {epoch + 1}/{self.total_epochs} init λ", cfg.progress)
        with frozen_bn_stats(self.model):
            for w in workers:
                w.begin_epoch(epoch, batches, self.lr_at, init=True)
            for t in range(len(batches)):
                for w in workers:
                    w.init_step(t)
                _bar_step(bar)
            for w in workers:
                w.end_init()
        _bar_close(bar)
        if cfg.mult_init == "grad":
            self._warm_multipliers(workers, epoch, batches)
        return True

    def _warm_up(self, workers: list[StageWorker], batches: list[torch.Tensor]) -> None:
        """Every stage runs each kernel once per batch shape of the phase before any of the phase's
        receives is posted (StageWorker.warm_up; the invariant of devsync.py)."""
        sizes = sorted({len(b) for b in batches})
        with frozen_bn_stats(self.model):
            for w in workers:
                w.warm_up(sizes)
        self._warmed = True

    def _warm_multipliers(self, workers: list[StageWorker], epoch: int, batches: list[torch.Tensor]) -> None:
        """One λ/u visit with the true back-propagated signal before the first parallel epoch
        (StageWorker.grad_init_step); the stages run top-down per batch."""
        bar = _bar(len(batches), f"epoch {epoch + 1}/{self.total_epochs} init μ", self.cfg.progress)
        with frozen_bn_stats(self.model):
            for w in workers:
                w.begin_epoch(epoch, batches, self.lr_at, init="grad")
            for t in range(len(batches)):
                for w in reversed(workers):
                    w.grad_init_step(t)
                _bar_step(bar)
            for w in workers:
                w.end_grad_init()
        _bar_close(bar)

    def _parallel_epoch(self, epoch: int) -> dict[str, Any]:
        """One parallel epoch of the stages this process owns (docs/method.md §5); then every rank
        gets every stage's state from its owner and the epoch's record from every rank."""
        cfg, topo = self.cfg, self.topology
        batches = self._mine(self._parallel_batches(epoch))
        workers = self._workers(self._settings())
        if not getattr(self, "_warmed", False):   # a phase resumed from a checkpoint
            self._warm_up(workers, batches)
        step0 = epoch * self.steps_per_epoch
        delay = cfg.delay_s if topo.world > 1 and topo.rank == cfg.delay_rank else 0.0
        if topo.world > 1:
            # start together (before any receive is posted): work that differs between the ranks
            # before an epoch (a phase's entry, its warm-up) is not charged to the epoch's wall time
            # and to the rank that waits out the other's lag (0.6-1 s of a ResNet-56 epoch on CPU)
            topo.barrier()
        for w in workers:
            w.begin_epoch(epoch, batches, lambda t: self.lr_at(step0 + t))
        where = f" (stage {workers[0].rank})" if topo.world > 1 else ""
        bar = _bar(len(batches), f"epoch {epoch + 1}/{self.total_epochs} parallel{where}", cfg.progress)
        t0 = time.perf_counter()
        seen, shown = 0, 0.0
        for t in range(len(batches)):
            if delay > 0:          # test hook: a slow rank (--delay-rank, --delay-s)
                time.sleep(delay)
            for w in workers:
                w.step(t)
            seen += len(batches[t])
            if bar is not None and (time.perf_counter() - shown > 1.0 or t == len(batches) - 1):
                last, shown = workers[-1].stats, time.perf_counter()   # monitors read at most once a second
                _bar_update(bar, last.peek("loss_sum") / last.samples, last.peek("correct") / last.samples, seen,
                            time.perf_counter() - t0)
            else:
                _bar_step(bar)
        stats = [w.end_epoch() for w in workers]
        stats[0].sync_points = self._take_sync_points()
        wall = time.perf_counter() - t0
        _bar_close(bar)
        mine = ([(w.rank, s, w.tp.counters()) for w, s in zip(workers, stats)], wall, getattr(self, "aux_bytes", 0),
                getattr(self, "aux_where", "device"))
        every = topo.gather(mine)
        per_stage = _merge_replicas(sorted((x for part in every for x in part[0]), key=lambda x: x[0]))
        topo.sync_stages(self.stages, self.optimizers)
        rec = self._parallel_record(epoch, [x[1] for x in per_stage], [_Counters(x[2]) for x in per_stage])
        rec["aux_memory_bytes"] = sum(part[2] for part in every)      # every rank's stores
        if topo.world > 1:
            rec["aux_memory_bytes_per_rank"] = [part[2] for part in every]
            rec["aux_device_per_rank"] = [part[3] for part in every]
            walls = [part[1] for part in every]
            rec["parallel_wall_s"] = max(walls)
            rec["parallel_wall_per_rank_s"] = walls
            rec["ranks"] = topo.world
        return rec

    def _take_sync_points(self) -> int:
        """Device synchronisation points met by this process since the last call."""
        now = devsync.points()
        delta, self._sync_mark = now - getattr(self, "_sync_mark", 0), now
        return delta

    def _parallel_record(self, epoch: int, stats: list[Any], transports: list[Any]) -> dict[str, Any]:
        ps = self.phase_state
        k = len(self.stages)
        lr = self.lr_at((epoch + 1) * self.steps_per_epoch - 1)
        per_stage = [s.as_dict(i, i == k - 1) for i, s in enumerate(stats)]
        for i, d in enumerate(per_stage):
            d["theta_norm"] = param_norm(self.stages[i])
            if i < k - 1:
                d["kappa"] = ps.kappas[i]
                d["beta"] = ps.betas[i]
                d["lr_beta_kappa"] = min(lr * self._stage_lr_scale(i), ps.lr_caps[i]) * ps.betas[i] * ps.kappas[i]
        n = self.data.num_train
        in_bytes = self._store_dtype_bytes()
        coarse = [self.filt.coarse_shape(s) for s in self.cut_shapes]
        cut_bytes = [n * math.prod(c) * (in_bytes + 4) for c in coarse]
        full_bytes = [n * math.prod(s) * (in_bytes + 4) for s in self.cut_shapes]
        compute = [s.compute_s for s in stats]
        t_data = stats[0].data_s
        t_lambda = max(s.update_s for s in stats)
        t_comm = max(s.wait_s for s in stats)
        rho = speedup_model(t_data, sum(compute), compute, t_lambda, t_comm)
        last = stats[-1]
        rec = {
            "epoch": epoch + 1, "phase": "parallel", "lr": lr,
            "train_loss": last.loss_sum / max(last.samples, 1),
            "train_acc": last.correct / max(last.samples, 1),
            "stages": per_stage,
            "local_losses": [d["local_loss"] for d in per_stage],
            "violation": [d["violation"] for d in per_stage[:-1]],
            "stage_compute_s": compute,
            "bytes_per_cut": cut_bytes,
            "bytes_per_cut_full_resolution": full_bytes,
            "aux_memory_bytes": getattr(self, "aux_bytes", 0),
            "aux_device": getattr(self, "aux_where", "device"),    # where this rank's stores live
            "speedup_model": {"T_d": t_data, "T_fb_serial_est": sum(compute), "max_stage": max(compute),
                              "t_lambda": t_lambda, "t_comm_exposed": t_comm, "rho_pred": rho},
            "transport": [tp.counters() for tp in transports],
        }
        if devsync.enabled():   # emulated device synchronisations (LAYERPAR_DEBUG_SYNC=1), all ranks
            rec["debug_sync_points"] = sum(s.sync_points for s in stats)
        rec["probe_cosine"] = self._probe_cosines()
        return rec

    def _probe_cosines(self) -> list[float]:
        """Cosine between each stage's local gradient and the true back-propagated gradient on a
        fixed probe batch (train mode, BN statistics restored, parameters untouched)."""
        if self.stores is None or len(self.stages) < 2:
            return []
        n = min(self.cfg.batch_size, self.data.num_train)
        if self.topology.replicas > 1:      # one share of replica 0's block (its owners hold those rows;
            r = self.topology.replicas      # a share's shapes were warmed up)
            n = min(self.cfg.batch_size // r, block_rows(self.data.num_train, r))
        idx = torch.arange(n)
        x = self._input_fn()(idx)
        y = self.data.y_train[idx].to(self.device)
        params = [list(s.parameters()) for s in self.stages]
        out = []
        with frozen_bn_stats(self.model):
            self.model.train()
            loss = F.cross_entropy(self.model(x), y)
            true = torch.autograd.grad(loss, [p for ps in params for p in ps], allow_unused=True)
            offs = 0
            true_per = []
            for ps in params:
                true_per.append(list(true[offs:offs + len(ps)]))
                offs += len(ps)
            form = "gs" if (self.cfg.method == "al" and self.cfg.al_order == "gs") else "jacobi"
            for k, stage in enumerate(self.stages[:-1]):
                if not self.topology.owns(k) or self.topology.replica:  # computed by its owner (replica 0)
                    out.append(float("nan"))
                    continue
                z = x if k == 0 else self.stores["input"][k].stage_input(idx, self.filt, self.cfg.channels_last)
                mult = self.stores["mult"][k].gather(idx) if self.stores["mult"][k] is not None else None
                loss_k, _ = ops.local_loss(stage(z), self.stores["target"][k].gather(idx), mult,
                                           self.phase_state.betas[k], form, self.filt)
                local = torch.autograd.grad(loss_k, params[k], allow_unused=True)
                out.append(cosine(list(local), true_per[k]))
        if self.topology.world == 1:
            return out
        every = self.topology.gather(out)             # each value from the stage's owner
        return [every[k][k] if k < len(every) else float("nan") for k in range(len(out))]


_TIMES = ("compute_s", "data_s", "update_s", "wait_s")


def _merge_replicas(per_stage: list[tuple[int, Any, Any]]) -> list[tuple[int, Any, Any]]:
    """One entry per stage from the entries of its replicas (stage replicas: sums of the samples,
    losses, correct counts and drift sums; the slowest replica's times; the bytes of all)."""
    out: list[tuple[int, Any, Any]] = []
    for k, st, counters in per_stage:
        if not out or out[-1][0] != k:
            out.append((k, st, counters))
            continue
        _, acc, c_acc = out[-1]
        for name in ("loss_sum", "samples", "correct", "drift_num", "drift_den", "step_num", "sync_points"):
            setattr(acc, name, getattr(acc, name) + getattr(st, name))
        for name in _TIMES:
            setattr(acc, name, max(getattr(acc, name), getattr(st, name)))
        merged = {}
        for key in set(c_acc) | set(counters):
            a, b = c_acc.get(key, {}), counters.get(key, {})
            merged[key] = {f: a.get(f, 0) + b.get(f, 0) for f in set(a) | set(b)}
        out[-1] = (k, acc, merged)
    return out

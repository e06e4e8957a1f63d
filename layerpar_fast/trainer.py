"""HybridTrainer: the serial-parallel hybrid schedule (ALGORITHM.md §6) in one process.

Phases run in order (``serial:1,parallel:5,serial:2``): serial epochs train the assembled network
with back-propagation and augmentation; parallel epochs train the K stages on their local losses
through :class:`~layerpar_fast.worker.StageWorker` objects over an in-process transport. One
learning-rate schedule spans all epochs. Every epoch ends with an evaluation by the true serial
forward pass (after BatchNorm recalibration when the epoch was parallel), a JSONL record and an
atomic checkpoint, so a run can be resumed at any epoch boundary, mid-schedule included.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__, devsync, ops
from .auxstore import TensorAuxStore
from .config import Config, ConfigError, make_config, read_run_config
from .data import _CIFAR_PAD, _MNIST_SHIFT, BatchLoader, Dataset, _affine, load_dataset
from .filters import FilterPair
from .metrics import JsonlWriter, atomic_write_json, environment, speedup_model
from .models import build_model, cut_points
from .paraug import FlipViews, ShiftAugment
from .monitors import cosine, estimate_kappa, frozen_bn_stats, param_norm
from .staging import StagedModel, as_block_sequence, parse_cuts, split_model
from .transport import LocalHub
from .worker import StageWorker, WorkerSettings

CHECKPOINT = "checkpoint.pt"


def _log_default(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class PhaseState:
    """What a parallel phase fixed when it started (kept in checkpoints to resume mid-phase)."""

    index: int
    kappas: list[float]
    betas: list[float]
    lr_caps: list[float]


class HybridTrainer:
    """Train a staged ResNet with the SPH schedule of ``cfg`` (see Config for every option).

    ``model``: None (build ``cfg.model``), an ``nn.Sequential`` of blocks (cut at ``cfg.cuts``
    or balanced), or a list of K stage modules (cut at their boundaries). ``data``: a
    :class:`~layerpar_fast.data.Dataset` (default: ``load_dataset(cfg.dataset, ...)``).
    ``out_dir``: run directory for metrics, checkpoints and the final model (None: keep nothing).
    """

    def __init__(self, cfg: Config, out_dir: str | None = None, *, data: Dataset | None = None,
                 model: nn.Sequential | list[nn.Module] | StagedModel | None = None,
                 cuts: list[int] | None = None,
                 log: Callable[[str], None] = _log_default, resume: bool = False) -> None:
        self.cfg = cfg
        self.log = log
        self.device = _pick_device(cfg)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, self._local_workers()))
        torch.set_num_threads(threads)
        self.threads = threads
        self.out_dir = out_dir
        self.data = data if data is not None else load_dataset(
            cfg.dataset, cfg.data_dir, subset=cfg.subset, test_subset=cfg.test_subset,
            cifar100_labels=cfg.cifar100_labels)
        ds = self.data
        torch.manual_seed(cfg.seed)
        if model is None:
            model = build_model(cfg.model, num_classes=ds.num_classes, in_channels=ds.in_channels,
                                image_size=ds.x_train.shape[-1])
        staged = as_block_sequence(model)
        self.model = staged.blocks.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_shape = tuple(ds.x_train.shape[1:])
        self.filt = FilterPair(cfg.ds, cfg.filter)
        k = cfg.stages
        if cuts is None:
            cuts = parse_cuts(cfg.cuts, staged, k, self.input_shape, balance=cfg.balance) if k > 1 else []
        self.cuts = list(cuts)
        self.stages = split_model(self.model, self.cuts) if self.cuts else [self.model]
        shapes = {c.index: c.shape for c in cut_points(self.model, self.input_shape)}
        self.cut_shapes = [shapes[c] for c in self.cuts]
        if any(p == "parallel" for p, _ in cfg.phases()):
            for c, shp in zip(self.cuts, self.cut_shapes):
                self.filt.check_shape(shp, where=f"cut {c}")
        if len(self.stages) == 1 and any(p == "parallel" for p, _ in cfg.phases()):
            self.log("warning: a parallel phase with one stage is plain back-propagation without "
                     "augmentation; use --stages K (K >= 2) for layer-parallel training")
        self.optimizers = [self._make_optimizer(s) for s in self.stages]
        self.steps_per_epoch = math.ceil(ds.num_train / cfg.batch_size)
        self.total_epochs = cfg.total_epochs()
        self.total_steps = self.total_epochs * self.steps_per_epoch
        self.aug = _augment_kind(cfg.augment, ds)
        has_par = any(p == "parallel" for p, _ in cfg.phases())
        self.shift_aug = self._shift_augment() if cfg.parallel_augment != "none" and has_par else None
        self.flip_views = self._flip_views() if cfg.parallel_augment == "shift_flip" and has_par else None
        self.train_loader = BatchLoader(ds.x_train, ds.y_train, cfg.batch_size, ds.mean, ds.std,
                                        shuffle=True, augment=self.aug, seed=cfg.seed, device=self.device,
                                        channels_last=cfg.channels_last)
        self.plain_loader = BatchLoader(ds.x_train, ds.y_train, cfg.batch_size, ds.mean, ds.std,
                                        shuffle=True, augment=None, seed=cfg.seed, device=self.device,
                                        channels_last=cfg.channels_last)
        self.test_loader = BatchLoader(ds.x_test, ds.y_test, cfg.eval_batch_size, ds.mean, ds.std,
                                       shuffle=False, augment=None, seed=cfg.seed, device=self.device,
                                       channels_last=cfg.channels_last)
        self.epoch = 0
        self.records: list[dict[str, Any]] = []
        self.phase_state: PhaseState | None = None
        self.stores: dict[str, list[Any]] | None = None
        self.wall_offset = 0.0
        self._resumed_aux: dict[str, Any] | None = None
        if resume:
            self._load_checkpoint()

    # ------------------------------------------------------------------------------------ setup
    def _local_workers(self) -> int:
        return 1

    # hooks for a distributed subclass (layerpar_fast.dist.DistTrainer): one process per stage
    def _is_main(self) -> bool:
        """Whether this process logs and writes the run files (metrics, config, final model)."""
        return True

    def _owns_stage(self, k: int) -> bool:
        """Whether this process trains stage ``k`` in parallel phases (holds its stores)."""
        return True

    def _share_phase_constants(self, kappas: list[float], betas: list[float], caps: list[float],
                               lr_now: float) -> tuple[list[float], list[float], list[float]]:
        """Complete κ_k, β_k and lr caps measured only for the owned stages."""
        return kappas, betas, caps

    def _aux_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint's ``aux`` entry: the stores when stopping inside a parallel phase."""
        if self.stores is None or self.phase_state is None:
            return None
        return {"phase": self.phase_state.index,
                "stores": {name: [None if s is None else s.state_dict() for s in lst]
                           for name, lst in self.stores.items()}}

    def _make_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        cfg = self.cfg
        decay, no_decay = [], []
        for p in module.parameters():
            (no_decay if (p.ndim <= 1 and not cfg.wd_bn) else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)

    def lr_at(self, step: int) -> float:
        """Learning rate at global step ``step`` (warm-up, then cosine/multistep/constant)."""
        cfg = self.cfg
        warm = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        if step < warm:
            return cfg.lr * (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return cfg.lr
        if cfg.lr_schedule in ("cosine", "linear"):
            span = max(1, self.total_steps - warm)
            frac = min(step - warm, span) / span
            if cfg.lr_schedule == "linear":
                return cfg.lr * (1.0 - frac)
            return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * frac))
        epoch = step / self.steps_per_epoch
        marks = [m * self.total_epochs if m < 1 else m for m in cfg.milestones]
        return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in marks)

    def _set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr

    def epoch_plan(self) -> list[tuple[int, str, int, int]]:
        """[(phase_index, phase, epoch_in_phase, phase_length)] for every epoch of the schedule."""
        plan = []
        for i, (name, n) in enumerate(self.cfg.phases()):
            plan.extend((i, name, j, n) for j in range(n))
        return plan

    # ------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Train through the whole schedule (from the resumed epoch) and return the summary."""
        cfg = self.cfg
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
        main = self._is_main()
        writer = JsonlWriter(os.path.join(self.out_dir, "metrics.jsonl"), self.records) if self.out_dir and main else None
        if self.out_dir and main and self.epoch == 0:
            atomic_write_json(os.path.join(self.out_dir, "config.json"), cfg.to_dict())
        t_start = time.perf_counter() - self.wall_offset
        plan = self.epoch_plan()
        self.log(f"layerpar_fast {__version__}: {cfg.model} on {self.data.name} "
                 f"({self.data.num_train} train / {self.data.num_test} test), method {cfg.method}, "
                 f"schedule {cfg.resolved_schedule()}, {self.total_epochs} epochs, "
                 f"{len(self.stages)} stage(s) cuts {self.cuts}, device {self.device}, {self.threads} thread(s)")
        while self.epoch < len(plan):
            pidx, phase, j, n = plan[self.epoch]
            t0 = time.perf_counter()
            if phase == "serial":
                self.stores = None
                rec = self._serial_epoch(self.epoch)
            elif phase == "idle":
                rec = {"epoch": self.epoch + 1, "phase": "idle", "train_loss": float("nan"),
                       "train_acc": float("nan"), "lr": self.lr_at((self.epoch + 1) * self.steps_per_epoch - 1)}
            else:
                if j == 0 or self.stores is None:
                    self._enter_parallel(pidx, self.epoch)
                rec = self._parallel_epoch(self.epoch)
            rec.update(self._evaluate_epoch(phase))
            rec["epoch_time_s"] = time.perf_counter() - t0
            rec["wall_time_s"] = time.perf_counter() - t_start
            self.records.append(rec)
            if writer:
                writer.write(rec)
            self.log(_summary_line(rec, self.total_epochs))
            self.epoch += 1
            if phase == "parallel" and j == n - 1:
                self.stores = None
                self.phase_state = None
            if self.out_dir and (self.epoch % cfg.checkpoint_every == 0 or self.epoch == len(plan)):
                self.wall_offset = time.perf_counter() - t_start
                self.save_checkpoint()
        summary = self._summary(time.perf_counter() - t_start)
        if self.out_dir and main:
            torch.save(self.model.state_dict(), os.path.join(self.out_dir, "final_model.pt"))
            atomic_write_json(os.path.join(self.out_dir, "summary.json"), summary)
        return summary

    # ------------------------------------------------------------------------------------ serial
    def _serial_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        loader = self.train_loader
        loader.set_epoch(epoch)
        bar = _bar(len(loader), f"epoch {epoch + 1}/{self.total_epochs} serial", cfg.progress)
        loss_sum, correct, seen = 0.0, 0, 0
        t_data = t_comp = 0.0
        step0 = epoch * self.steps_per_epoch
        t_prev = time.perf_counter()
        for t, (idx, x, y) in enumerate(loader):
            t1 = time.perf_counter()
            t_data += t1 - t_prev
            lr = self.lr_at(step0 + t)
            self._set_lr(lr)
            out = self.model(x)
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in self.optimizers:
                opt.step()
            b = len(y)
            loss_sum += float(loss.detach()) * b
            correct += int((out.detach().argmax(1) == y).sum())
            seen += b
            t_prev = time.perf_counter()
            t_comp += t_prev - t1
            _bar_update(bar, loss_sum / seen, correct / seen, seen, t_data + t_comp)
        _bar_close(bar)
        return {"epoch": epoch + 1, "phase": "serial", "lr": lr, "train_loss": loss_sum / seen,
                "train_acc": correct / seen, "data_s": t_data, "compute_s": t_comp}

    # ------------------------------------------------------------------------------------ parallel
    def _store_dtype_bytes(self) -> int:
        return {"fp32": 4, "bf16": 2, "fp16": 2}[self.cfg.aux_dtype]

    def _make_stores(self) -> dict[str, list[Any]]:
        cfg, n = self.cfg, self.data.num_train
        if self.flip_views is not None:      # a row per sample and view (paraug.FlipViews)
            n = self.flip_views.rows
        k = len(self.stages)
        coarse = [self.filt.coarse_shape(s) for s in self.cut_shapes]
        dev = self.device

        def store(shape: tuple[int, ...]) -> TensorAuxStore:
            return TensorAuxStore(n, shape, cfg.aux_dtype, device=dev, compute_device=dev)

        own = self._owns_stage
        stores: dict[str, list[Any]] = {
            "input": [None] + [store(coarse[i]) if own(i + 1) else None for i in range(k - 1)],
            "target": [store(coarse[i]) if own(i) else None for i in range(k - 1)] + [None],
            "mult": [store(coarse[i]) if cfg.method == "al" and own(i) else None for i in range(k - 1)] + [None],
        }
        total = sum(s.memory_bytes() for lst in stores.values() for s in lst if s is not None)
        views = " (both mirror views)" if self.flip_views is not None else ""
        self.log(f"auxiliary stores: {total / 2**20:.1f} MiB in {cfg.aux_dtype} "
                 f"(cuts {[tuple(c) for c in coarse]} coarse, s={cfg.ds}, {n} rows{views})")
        self.aux_bytes = total
        return stores

    def _shift_augment(self) -> ShiftAugment | None:
        """The parallel phase's shift views (paraug.py), or a ConfigError when they cannot work."""
        ds, cfg = self.data, self.cfg
        max_shift = {"crop_flip": _CIFAR_PAD, "shift": _MNIST_SHIFT}.get(self.aug or "", 0)
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

    def _parallel_batches(self, epoch: int) -> list[torch.Tensor]:
        """The parallel epoch's batches as store rows: sample indices, or view indices (shift_flip)."""
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
        hub = LocalHub(len(self.stages))
        st = self.stores
        return [StageWorker(k, len(self.stages), self.stages[k], self.optimizers[k], hub.endpoint(k),
                            settings[k], self.filt, self.data.x_train, self._parallel_labels(),
                            self._input_fn() if k == 0 else None, st["input"][k], st["target"][k],
                            st["mult"][k], self.device)
                for k in range(len(self.stages))]

    def _settings(self) -> list[WorkerSettings]:
        cfg, ps = self.cfg, self.phase_state
        return [WorkerSettings(method=cfg.method, order=cfg.al_order if cfg.method == "al" else "jacobi",
                               beta=ps.betas[k], gamma=cfg.gamma, window=cfg.window, lr_cap=ps.lr_caps[k],
                               channels_last=cfg.channels_last, label_smoothing=cfg.label_smoothing,
                               augment=self.shift_aug)
                for k in range(len(self.stages))]

    def _enter_parallel(self, pidx: int, epoch: int) -> None:
        """(Re-)initialise λ̃ by a forward pass and u/μ = 0; measure κ_k; fix β_k and lr caps."""
        cfg = self.cfg
        self._warmed = False
        if self._resumed_aux is not None and self._resumed_aux["phase"] == pidx:
            self.stores = self._make_stores()
            for name, lst in self.stores.items():
                for k, s in enumerate(lst):
                    if s is not None:
                        s.load_state_dict(self._resumed_aux["stores"][name][k])
            self._resumed_aux = None
            return
        self.stores = self._make_stores()
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
            if not self._owns_stage(k):  # measured by its owner (distributed run)
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
            if cap < lr_now:
                self.log(f"warning: stage {k}: lr {lr_now:.4g} x beta {beta:.4g} x kappa {kap:.4g} = "
                         f"{lr_now * beta * kap:.3g} > 1; capping this stage's lr at {cap:.4g} (ALGORITHM.md §3)")
            kappas.append(kap)
            betas.append(beta)
            caps.append(cap)
            with torch.no_grad(), frozen_bn_stats(stage):
                z = self.filt.up(self.filt.down(stage(z)))
        kappas, betas, caps = self._share_phase_constants(kappas, betas, caps, lr_now)
        self.phase_state = PhaseState(pidx, kappas, betas, caps)
        self.log("parallel phase: " + ", ".join(
            f"stage {k}: kappa={kap:.4g} beta={b:.4g} lr*beta*kappa={lr_now * b * kap:.3g}"
            for k, (kap, b) in enumerate(zip(kappas[:-1], betas[:-1]))))
        # initial fill, pipelined stage by stage in the first parallel epoch's batch order
        # (with mirror views, then the same batches' other views)
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
        cfg = self.cfg
        batches = self._parallel_batches(epoch)
        workers = self._workers(self._settings())
        if not getattr(self, "_warmed", False):   # a phase resumed from a checkpoint
            self._warm_up(workers, batches)
        step0 = epoch * self.steps_per_epoch
        for w in workers:
            w.begin_epoch(epoch, batches, lambda t: self.lr_at(step0 + t))
        bar = _bar(len(batches), f"epoch {epoch + 1}/{self.total_epochs} parallel", cfg.progress)
        seen, shown = 0, 0.0
        for t in range(len(batches)):
            for w in workers:
                w.step(t)
            seen += len(batches[t])
            if bar is not None and (time.perf_counter() - shown > 1.0 or t == len(batches) - 1):
                last, shown = workers[-1].stats, time.perf_counter()   # monitors read at most once a second
                _bar_update(bar, last.peek("loss_sum") / last.samples, last.peek("correct") / last.samples, seen,
                            sum(w.stats.compute_s + w.stats.data_s for w in workers))
            else:
                _bar_step(bar)
        _bar_close(bar)
        stats = [w.end_epoch() for w in workers]
        stats[0].sync_points = self._take_sync_points()
        return self._parallel_record(epoch, stats, [w.tp for w in workers])

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
                d["lr_beta_kappa"] = min(lr, ps.lr_caps[i]) * ps.betas[i] * ps.kappas[i]
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
                if not self._owns_stage(k):  # computed by its owner (distributed run)
                    out.append(float("nan"))
                    continue
                z = x if k == 0 else self.stores["input"][k].stage_input(idx, self.filt, self.cfg.channels_last)
                mult = self.stores["mult"][k].gather(idx) if self.stores["mult"][k] is not None else None
                loss_k, _ = ops.local_loss(stage(z), self.stores["target"][k].gather(idx), mult,
                                           self.phase_state.betas[k], form, self.filt)
                local = torch.autograd.grad(loss_k, params[k], allow_unused=True)
                out.append(cosine(list(local), true_per[k]))
        return out

    # ------------------------------------------------------------------------------------ evaluation
    def recalibrate_bn(self, epoch: int) -> None:
        """Re-estimate BatchNorm running statistics of stages 1..K-1 (0-based) on true activations:
        serial forward passes in train mode without gradients; stage 0's statistics are kept."""
        mods = self._recal_modules()
        if mods:
            self._recal_on(mods, self.plain_loader.batches(epoch)[: self.cfg.bn_recalib_batches])

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
        with torch.no_grad(), frozen_bn_stats(self.stages[0]):
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
    def evaluate(self, ds_forward: bool = False) -> tuple[float, float]:
        """(test loss, test accuracy) of the assembled network in eval mode; ``ds_forward``
        inserts U∘D at every cut (the network the parallel phase actually trained)."""
        self.model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        for _, x, y in self.test_loader:
            out = self.eval_forward(x, ds_forward)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
        self.model.train()
        return loss_sum / n, correct / n

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

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Atomically write RUN_DIR/checkpoint.pt (model, optimizers, records, phase state, and the
        auxiliary stores when stopping inside a parallel phase)."""
        state: dict[str, Any] = {
            "version": __version__,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "cuts": self.cuts,
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "records": self.records,
            "wall_offset": self.wall_offset,
            "phase_state": None if self.phase_state is None else vars(self.phase_state),
            "aux": self._aux_checkpoint(),
        }
        path = os.path.join(self.out_dir, CHECKPOINT)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
        if self._holds_every_stage():
            # a distributed checkpoint resumed in one process: its per-rank files are stale now
            for name in os.listdir(self.out_dir):
                if name.startswith("aux-rank") and name.endswith(".pt"):
                    try:
                        os.remove(os.path.join(self.out_dir, name))
                    except OSError:
                        pass

    def _holds_every_stage(self) -> bool:
        """Whether this process holds every stage's auxiliary stores (a single-process run)."""
        return all(self._owns_stage(k) for k in range(len(self.stages)))

    def _load_checkpoint(self) -> None:
        path = os.path.join(self.out_dir, CHECKPOINT)
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except FileNotFoundError:
            raise ConfigError(f"--resume {self.out_dir}: no {CHECKPOINT} there") from None
        except Exception as e:
            raise ConfigError(f"--resume {self.out_dir}: cannot read {CHECKPOINT}: {e}") from None
        why = _resume_mismatch(state.get("config"), self.cfg)
        if why:
            raise ConfigError(f"--resume {self.out_dir}: {why}")
        if state.get("cuts") != self.cuts:
            raise ConfigError(f"--resume: checkpoint cuts {state.get('cuts')} differ from {self.cuts}")
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        self.epoch = state["epoch"]
        self.records = state["records"]
        self.wall_offset = state["wall_offset"]
        ps = state.get("phase_state")
        self.phase_state = PhaseState(**ps) if ps else None
        self._resumed_aux = state.get("aux")
        if self._resumed_aux is not None and "stores" not in self._resumed_aux and self._holds_every_stage():
            self._resumed_aux = self._read_rank_aux(self._resumed_aux)
        self.log(f"resumed {self.out_dir} after epoch {self.epoch}/{self.total_epochs}")

    def _read_rank_aux(self, aux: dict[str, Any]) -> dict[str, Any]:
        """The auxiliary stores of a distributed checkpoint (rank k wrote stage k's stores to
        ``aux-rank{k}-epoch{E}.pt``, named in ``aux["files"]``), assembled per stage for this
        process, which runs every stage."""
        k = len(self.stages)
        files = list(aux.get("files") or [])
        if aux.get("world") != k or len(files) != k:
            raise ConfigError(f"--resume {self.out_dir}: the checkpoint's auxiliary stores come from "
                              f"{aux.get('world')} ranks, this run has {k} stages")
        stores: dict[str, list[Any]] = {}
        for rank, name in enumerate(files):
            try:
                part = torch.load(os.path.join(self.out_dir, name), map_location=self.device, weights_only=False)
            except FileNotFoundError:
                raise ConfigError(f"--resume {self.out_dir}: {name} (rank {rank}'s auxiliary stores) "
                                  "is missing") from None
            except Exception as e:
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"--resume {self.out_dir}: cannot read {name}: {first}") from None
            if part.get("epoch") != aux.get("epoch") or part.get("rank") != rank:
                raise ConfigError(f"--resume {self.out_dir}: {name} belongs to epoch {part.get('epoch')} rank "
                                  f"{part.get('rank')}, expected epoch {aux.get('epoch')} rank {rank}")
            for store, st in part["stores"].items():
                stores.setdefault(store, [None] * k)[rank] = st
        return {"phase": aux["phase"], "stores": stores}

    def _summary(self, wall: float) -> dict[str, Any]:
        accs = [r["test_acc"] for r in self.records]
        final = self.records[-1] if self.records else {}
        return {
            "final_test_acc": final.get("test_acc"),
            "best_test_acc": max(accs) if accs else None,
            "final_test_loss": final.get("test_loss"),
            "epochs": len(self.records),
            "wall_time_s": wall,
            "time_per_epoch_s": {p: _mean([r["epoch_time_s"] for r in self.records if r["phase"] == p])
                                 for p in ("serial", "parallel", "idle")},
            "config": self.cfg.to_dict(),
            "cuts": self.cuts,
            "cut_shapes": self.cut_shapes,
            "dataset": {"name": self.data.name, "train": self.data.num_train, "test": self.data.num_test},
            "versions": {"layerpar_fast": __version__, **environment()},
        }


# ---------------------------------------------------------------------------------------- helpers
def evaluate_run(run_dir: str, *, test_subset: int | None = None, data_dir: str | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """Test loss and accuracy of a finished run's ``final_model.pt`` with the serial forward pass,
    on the whole test set by default (runs often evaluate a subset every epoch to save time).

    ``data_dir`` replaces the run's data folder (the run moved to another machine)."""
    values = read_run_config(run_dir, "final_model.pt", "eval")
    model_path = os.path.join(run_dir, "final_model.pt")
    values.update(stages=1, cuts=None, method="serial", schedule="serial:1", epochs=None, progress=False,
                  test_subset=test_subset, out=None, threads=threads or values.get("threads"),
                  transport="local", delay_rank=None, delay_s=0.0, device="auto")
    if data_dir is not None:
        values["data_dir"] = data_dir
    cfg = make_config(values)
    trainer = HybridTrainer(cfg, None, log=lambda _: None)
    try:
        state = torch.load(model_path, map_location=trainer.device, weights_only=True)
        trainer.model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"{model_path}: cannot load it into {cfg.model}: {str(e).splitlines()[0]}") from None
    t0 = time.perf_counter()
    loss, acc = trainer.evaluate()
    return {"test_loss": loss, "test_acc": acc, "num_test": trainer.data.num_test,
            "eval_time_s": time.perf_counter() - t0}


def _beta_rule(c: dict[str, Any]) -> str:
    """How a configuration fixes β_k (the rule a resumed parallel phase must keep)."""
    if c.get("beta") is not None:
        return f"--beta {c['beta']}"
    if c.get("method") == "al" and c.get("al_order", "gs") == "gs":
        return f"--beta-c {c.get('beta_c', 0.6)} (beta_k = c/(lr*kappa_k))"
    return "the default beta 10"


def _resume_mismatch(saved: dict[str, Any] | None, cfg: Config) -> str:
    """'' when ``cfg`` may continue a checkpoint written with the configuration ``saved``, else
    one line naming the first option that changed and the checkpoint's value."""
    if not isinstance(saved, dict):
        return ""                                   # a checkpoint without its configuration
    now = cfg.to_dict()
    for key in ("method", "stages", "ds", "al_order"):
        if key == "al_order" and "al" not in (saved.get("method"), now["method"]):
            continue                                # the order only matters for --method al
        if key in saved and saved[key] != now[key]:
            opt = "--" + key.replace("_", "-")
            return (f"{opt} {now[key]} differs from the checkpoint's {opt} {saved[key]}; "
                    f"resume with {opt} {saved[key]} (or start a new run)")
    old, new = _beta_rule(saved), _beta_rule(now)
    if old != new:
        return f"beta rule {new} differs from the checkpoint's {old}; resume with {old} (or start a new run)"
    return ""


def _pick_device(cfg: Config) -> torch.device:
    """``cfg.device``: cpu; cuda (a ConfigError when torch sees no GPU); auto = cuda when torch
    sees a GPU, else cpu."""
    choice = getattr(cfg, "device", "auto")
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        build = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" if torch.version.cuda
                 else f"torch {torch.__version__} is a CPU-only build")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        raise ConfigError(f"--device cuda, but torch sees no CUDA device ({build}{seen}); "
                          "use --device cpu or auto")
    return torch.device("cpu")


def _augment_kind(augment: str, ds: Dataset) -> str | None:
    if augment == "none":
        return None
    if augment != "auto":
        return augment
    return "crop_flip" if ds.in_channels == 3 else None


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _summary_line(rec: dict[str, Any], total: int) -> str:
    s = (f"epoch {rec['epoch']:>3}/{total} {rec['phase']:<8} lr {rec['lr']:.4f}  "
         f"train loss {rec['train_loss']:.4f} acc {100 * rec['train_acc']:.2f}%  "
         f"test loss {rec['test_loss']:.4f} acc {100 * rec['test_acc']:.2f}%")
    if "ds_test_acc" in rec:
        s += f" (DS fwd {100 * rec['ds_test_acc']:.2f}%)"
    if "violation" in rec:
        s += "  viol " + ",".join(f"{v:.3f}" for v in rec["violation"])
    return s + f"  [{rec['epoch_time_s']:.1f}s]"


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)


def _bar_update(bar, loss: float, acc: float, seen: int, seconds: float) -> None:
    if bar is None:
        return
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * acc:.2f}%",
                    img_s=f"{seen / seconds:.0f}" if seconds > 0 else "-", refresh=False)


def _bar_step(bar) -> None:
    if bar is not None:
        bar.update(1)


def _bar_close(bar) -> None:
    if bar is not None:
        bar.close()

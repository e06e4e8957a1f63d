"""HybridTrainer: the serial-parallel hybrid schedule (docs/method.md §6), in one process or in
one process per stage.

Phases run in order (``serial:1,parallel:5,serial:2``): serial epochs train the assembled network
with back-propagation and augmentation (phase_serial.py); parallel epochs train the K stages on
their local losses through :class:`~layerpar_fast.worker.StageWorker` objects
(phase_parallel.py). One learning-rate schedule spans all epochs. Every epoch ends with an
evaluation by the true serial forward pass (after BatchNorm recalibration when the epoch was
parallel; evaluation.py), a JSONL record and an atomic checkpoint (checkpoint.py), so a run can be
resumed at any epoch boundary, mid-schedule included.

The trainer is written once; a :class:`~layerpar_fast.topology.Topology` says which stages this
process owns and provides the collectives: :class:`~layerpar_fast.topology.LocalTopology` (the
default: every stage in this process) or :class:`~layerpar_fast.topology.DistTopology` (one
process per stage; :class:`DistTrainer` is the trainer with it).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from . import __version__
from .checkpoint import Checkpoints
from .config import Config, ConfigError, ignored_options, make_config, read_run_config
from .data import BatchLoader, Dataset, load_dataset
from .evaluation import Evaluation
from .filters import FilterPair
from .metrics import JsonlWriter, atomic_write_json, environment
from .models import build_model, cut_points
from .paraug import largest_shift, shift_view_cuts
from .phase_parallel import ParallelPhase, PhaseState
from .phase_serial import SerialPhase
from .precision import Precision
from .progress import _summary_line
from .stages import StagedModel, as_block_sequence, parse_cuts, split_model
from .topology import DistTopology, LocalTopology, Topology


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def _quiet(msg: str) -> None:
    return None


#: --ds auto: this factor, unless a cut's feature map is AUTO_DS_MIN_SIDE pixels on a side or smaller
AUTO_DS = 2
AUTO_DS_MIN_SIDE = 8


def auto_ds(cut_shapes: list[tuple[int, ...]], augmented_serial: bool = True) -> int:
    """The downsampling factor ``--ds auto`` picks (auto_ds_choice without the reason)."""
    return auto_ds_choice(cut_shapes, augmented_serial)[0]


def auto_ds_choice(cut_shapes: list[tuple[int, ...]], augmented_serial: bool = True) -> tuple[int, str]:
    """(s, why) for ``--ds auto``: the downsampling factor it picks for cuts of these (C, H, W) shapes: 2, or 1 when
    a cut's map is 8x8 or smaller and ``augmented_serial`` (the serial epochs augment, the parallel
    phase sees the images as they are: Config.augmented_serial_only).

    The stage after a cut trains on U(D(a)); on an 8x8 map s = 2 leaves a 4x4 grid. In the short,
    late K >= 3 phase of an augmented run (ResNet-20/56 and WRN at K >= 4 on 32x32 images) the phase
    then stalls where s = 1 keeps learning: −0.46 against −0.67 points over four paired seeds. Without
    augmentation the same grid helps instead (+2.47 against +0.26 over two seeds: the coarse inputs
    regularise a run that overfits), so there auto keeps s = 2 (accuracy matrix round 9,
    docs/results.md). Grids of 7x7 and more (MNIST, CIFAR at K = 2 and 3) hold their accuracy at
    s = 2. A map that s = 2 does not divide (odd sides) gets s = 1 whatever the augmentation: auto
    never picks a factor that is refused. ``why`` says what made the choice, for the log ('' when
    s = 2 and no map is small)."""
    maps = [tuple(s[-2:]) for s in cut_shapes]
    small = any(min(m) <= AUTO_DS_MIN_SIDE for m in maps)
    if not cut_shapes:
        return 1, "no cut"
    if small and augmented_serial:
        return 1, (f"a cut's map is {AUTO_DS_MIN_SIDE}x{AUTO_DS_MIN_SIDE} or smaller and the parallel phase sees "
                   f"un-augmented images between augmented serial epochs: {maps}")
    if any(side % AUTO_DS for m in maps for side in m):
        return 1, f"s = {AUTO_DS} does not divide every cut's map: {maps}"
    if small:
        return AUTO_DS, (f"a cut's map is {maps}; s = 1 is picked for maps of 8x8 or smaller only when the serial "
                         "epochs augment and the parallel phase does not")
    return AUTO_DS, ""


class HybridTrainer(ParallelPhase, SerialPhase, Evaluation, Checkpoints):
    """Train a staged ResNet with the SPH schedule of ``cfg`` (see Config for every option).

    ``model``: None (build ``cfg.model``), an ``nn.Sequential`` of blocks (cut at ``cfg.cuts``
    or balanced), or a list of K stage modules (cut at their boundaries). ``data``: a
    :class:`~layerpar_fast.data.Dataset` (default: ``load_dataset(cfg.dataset, ...)``).
    ``out_dir``: run directory for metrics, checkpoints and the final model (None: keep nothing).
    ``topology``: which stages this process owns and the collectives (default: all of them, in
    this process). Only the main process (rank 0) logs, shows progress and writes run files.
    """

    def __init__(self, cfg: Config, out_dir: str | None = None, *, data: Dataset | None = None,
                 model: nn.Sequential | list[nn.Module] | StagedModel | None = None,
                 cuts: list[int] | None = None,
                 log: Callable[[str], None] | None = None, resume: bool = False,
                 topology: Topology | None = None) -> None:
        self.topology = topo = topology if topology is not None else LocalTopology(cfg.replicas)
        if topo.replicas != cfg.replicas:
            raise ConfigError(f"the topology runs {topo.replicas} replica(s) of every stage, the configuration "
                              f"says --replicas {cfg.replicas}")
        if not topo.is_main:          # only rank 0 logs and shows progress
            log = _quiet
            cfg = dataclasses.replace(cfg, progress=False)
        self.cfg = cfg
        self.log = log if log is not None else _log_default
        self.device = _pick_device(cfg)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("--amp fp16 needs a GPU (CPU autocast supports bf16); use --amp bf16 or off")
        self.precision = Precision(cfg.amp, self.device)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, topo.local_workers()))
        torch.set_num_threads(threads)
        self.threads = threads
        self.out_dir = out_dir
        if data is not None:      # the user's own data set: cfg.subset / test_subset apply to it too
            self.data = data.first(cfg.subset, cfg.test_subset) if (cfg.subset or cfg.test_subset) else data
        else:
            self.data = load_dataset(cfg.dataset, cfg.data_dir, subset=cfg.subset, test_subset=cfg.test_subset,
                                     cifar100_labels=cfg.cifar100_labels)
        ds = self.data
        if cfg.augment == "auto":
            # what auto means for these images (the default schedule depends on it): config.json
            # names it, as it names measured cuts
            cfg.augment = _augment_kind("auto", ds) or "none"
        if cuts is None and cfg.cuts is None and cfg.balance == "time" and cfg.stages > 1 and topo.world > 1:
            cuts = self._agree_on_cuts(model)
        torch.manual_seed(cfg.seed)
        self.model_name = cfg.model if model is None else f"your {type(model).__name__} model"
        if model is None:
            model = build_model(cfg.model, num_classes=ds.num_classes, in_channels=ds.in_channels,
                                image_size=ds.x_train.shape[-1])
        staged = as_block_sequence(model)
        self.model = staged.blocks.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_shape = tuple(ds.x_train.shape[1:])
        k = cfg.stages
        if cuts is None:
            cuts = parse_cuts(cfg.cuts, staged, k, self.input_shape, balance=cfg.balance,
                              batch_size=cfg.batch_size // cfg.replicas,
                              allowed=self._shift_view_cuts(staged)) if k > 1 else []
        self.cuts = list(cuts)
        if cfg.cuts is None and k > 1 and cfg.balance == "time":
            # measured cuts vary from one measurement to the next: keep the ones chosen, so that
            # config.json (and so --resume) names them instead of measuring again
            cfg.cuts = ",".join(str(c) for c in self.cuts)
        self.stages = split_model(self.model, self.cuts) if self.cuts else [self.model]
        shapes = {c.index: c.shape for c in cut_points(self.model, self.input_shape)}
        self.cut_shapes = [shapes[c] for c in self.cuts]
        if cfg.ds == 0:         # --ds auto: config.json (and so --resume, --fork) names what it chose
            cfg.ds, why = auto_ds_choice(self.cut_shapes, cfg.augmented_serial_only())
            if any(p == "parallel" for p, _ in cfg.phases()) and self.cuts:
                self.log(f"--ds auto: s = {cfg.ds}" + (f" ({why})" if why else ""))
        self.filt = FilterPair(cfg.ds, cfg.filter)
        if any(p == "parallel" for p, _ in cfg.phases()):
            for c, shp in zip(self.cuts, self.cut_shapes):
                self.filt.check_shape(shp, where=f"cut {c}")
        unused = ignored_options(cfg)
        if unused:
            self.log(f"warning: {', '.join(unused)} act only in a parallel phase, and schedule "
                     f"{cfg.resolved_schedule()} has none: they have no effect")
        if cfg.default_schedule_is_serial() and len(self.stages) > 1:
            k = len(self.stages)
            self.log(f"warning: {cfg.total_epochs()} epoch(s) leave no parallel phase in the default schedule: "
                     f"its serial tail takes {cfg.tail_share:.2g} of the epochs (--tail-share) and with K = {k} "
                     f"stages a parallel phase needs at least {cfg.min_parallel_epochs()} epoch(s) to reach the "
                     f"first cut; the run is serial back-propagation"
                     + (f", data-parallel over the {k} workers" if cfg.serial_on == "all" else "")
                     + f". Give at least {cfg.min_epochs_for_parallel()} epochs, or an explicit --schedule, "
                     "for layer-parallel training")
        if len(self.stages) == 1 and any(p == "parallel" for p, _ in cfg.phases()):
            self.log("warning: a parallel phase with one stage is plain back-propagation without "
                     "augmentation; use --stages K (K >= 2) for layer-parallel training")
        self.optimizers = [self._make_optimizer(s) for s in self.stages]
        self.scalers = [self.precision.scaler() for _ in self.stages]   # fp16: one per stage (parallel phase)
        self.serial_scaler = self.precision.scaler()
        self.steps_per_epoch = math.ceil(ds.num_train / cfg.batch_size)
        self.total_epochs = cfg.total_epochs()
        self.total_steps = self.total_epochs * self.steps_per_epoch
        self.aug = _augment_kind(cfg.augment, ds)
        has_par = any(p == "parallel" for p, _ in cfg.phases())
        self.shift_aug = self._parallel_views() if cfg.parallel_augment != "none" and has_par else None
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
        self.plan = self.epoch_plan()      # may change: --switch-drift ends a parallel phase early
        self.switches: list[int] = []      # epochs after which a parallel phase was ended early
        self.rollbacks: list[dict[str, Any]] = []   # records of parallel epochs undone by --drift-guard / --pace-rows
        self.gated: list[dict[str, Any]] = []       # phase entries that --sharpness-gate turned serial
        self.records: list[dict[str, Any]] = []
        self.phase_state: PhaseState | None = None
        self.stores: dict[str, list[Any]] | None = None
        self.wall_offset = 0.0
        self._resumed_aux: dict[str, Any] | None = None
        if resume:
            self._load_checkpoint()


    def _agree_on_cuts(self, model: Any) -> list[int]:
        """Time-balanced cuts measured on rank 0, on this run's device (timings differ between
        processes), and broadcast."""
        cfg, data = self.cfg, self.data
        result: Any = None
        if self.topology.rank == 0:
            try:
                if model is None:
                    torch.manual_seed(cfg.seed)
                    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                                        image_size=data.x_train.shape[-1])
                staged = as_block_sequence(model)
                staged.blocks.to(self.device)
                result = parse_cuts(None, staged, cfg.stages, tuple(data.x_train.shape[1:]), balance="time",
                                    batch_size=cfg.batch_size // cfg.replicas,
                                    allowed=self._shift_view_cuts(staged))
            except Exception as e:  # every rank raises the same error
                result = e
        result = self.topology.broadcast(result, 0)
        if isinstance(result, Exception):
            raise result
        return list(result)

    def _shift_view_cuts(self, staged: StagedModel) -> list[int] | None:
        """Where balanced cuts may go so that the parallel phase's shift views fit (None: anywhere).

        Shift views move every cut's coarse grid by whole cells, so each cut's image stride per
        coarse cell must divide the augmentation's largest shift (4 px for crop_flip): ResNet-20 at
        K = 4 balances to cuts 3,5,8, the last on the 8x8 map whose 4x4 grid moves in 8-px steps;
        among the allowed boundaries it gets 3,5,7 (stages within 3% of the same bottleneck).
        Applies when the cuts are balanced (no --cuts, no stage list), a parallel phase is
        scheduled and --parallel-augment asks for shift views (shift, shift_flip, or auto with
        augmented serial epochs); when fewer than K − 1 boundaries qualify, the cuts stay
        unrestricted and the parallel phase says why the views cannot work."""
        cfg, ds = self.cfg, self.data
        if cfg.stages < 2 or cfg.cuts is not None or staged.cuts or cfg.parallel_augment == "none" \
                or not any(p == "parallel" for p, _ in cfg.phases()):
            return None
        max_shift = largest_shift(_augment_kind(cfg.augment, ds))
        if max_shift == 0:
            return None
        shapes = [(c.index, c.shape) for c in cut_points(staged.blocks, tuple(ds.x_train.shape[1:]))]
        allowed = shift_view_cuts(shapes, tuple(ds.x_train.shape[-2:]), FilterPair(cfg.ds or AUTO_DS, cfg.filter),
                                  max_shift)
        if len(allowed) < cfg.stages - 1:
            return None
        if len(allowed) < len(shapes):
            self.log(f"cuts balanced among block boundaries {_ranges(allowed)}: there the coarse grids move in "
                     f"whole cells with the {max_shift}-px shift views of --parallel-augment {cfg.parallel_augment}")
        return allowed

    def close(self) -> None:
        """Release the topology's resources (receive threads of a distributed run)."""
        self.topology.close()

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
        return epoch_plan(self.cfg)


    # ------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Train through the whole schedule (from the resumed epoch) and return the summary."""
        cfg = self.cfg
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
        main = self.topology.is_main
        writer = JsonlWriter(os.path.join(self.out_dir, "metrics.jsonl"), self.records) if self.out_dir and main else None
        if self.out_dir and main:   # also on resume: an extended schedule must survive the next resume
            atomic_write_json(os.path.join(self.out_dir, "config.json"), cfg.to_dict())
        t_start = time.perf_counter() - self.wall_offset
        plan = self.plan
        self.log(f"layerpar_fast {__version__}: {self.model_name} on {self.data.name} "
                 f"({self.data.num_train} train / {self.data.num_test} test), method {cfg.method}, "
                 f"schedule {cfg.resolved_schedule()}, {self.total_epochs} epochs, "
                 f"{len(self.stages)} stage(s) cuts {self.cuts}"
                 + (f" x {cfg.replicas} replicas" if cfg.replicas > 1 else "")
                 + f", device {self.device}, {self.threads} thread(s)")
        if cfg.replicas > 1 and any(p == "parallel" for p, _ in cfg.phases()):
            rest = self.data.num_train % cfg.replicas
            if rest:
                self.log(f"notice: --replicas {cfg.replicas}: parallel epochs train {self.data.num_train - rest} of "
                         f"{self.data.num_train} rows (blocks of {self.data.num_train // cfg.replicas} per replica); "
                         f"the last {rest} train in serial epochs only")
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
                # what a guard may restore: the drift guard checks every parallel epoch, the pace guard a phase's first
                snap = self._snapshot() if cfg.drift_guard > 0 or (cfg.pace_rows > 0 and j == 0) else None
                entry = j == 0 or self.stores is None
                # the pace guard's reference, for the phase's first epoch: the network as the phase
                # finds it (measured before the entry's own forward passes)
                ref = self.entry_heldin_loss() if cfg.pace_rows > 0 and j == 0 else None
                if entry and not self._enter_parallel(pidx, self.epoch):
                    _postpone(plan, self.epoch, len(self.stages))   # this epoch reruns as a serial one
                    continue
                if ref is not None:
                    self.phase_state.pace_ref = ref
                rec = self._parallel_epoch(self.epoch)
            rec.update(self._evaluate_epoch(phase))
            if phase == "parallel" and self.phase_state.pace_ref is not None:
                rec["heldin_ref"] = self.phase_state.pace_ref
                rec["heldin_loss"] = self.heldin_loss()
            rec["epoch_time_s"] = time.perf_counter() - t0
            rec["wall_time_s"] = time.perf_counter() - t_start
            if phase == "parallel":
                why = self._guard_verdict(rec)
                if why:
                    self._roll_back(snap, rec, why)    # the epoch reruns as a serial epoch (the same index)
                    continue
                self.phase_state.pace_ref = None     # the phase passed its first epoch
            self.records.append(rec)
            if writer:
                writer.write(rec)
            self.log(_summary_line(rec, self.total_epochs))
            if phase == "parallel" and j < n - 1 and should_switch(rec.get("violation") or [], cfg.switch_drift):
                rec["switched_to_serial"] = True
                self.switches.append(self.epoch)
                _end_phase_after(plan, self.epoch)
                j = n - 1               # the phase ends with this epoch
                self.log(f"drift {max(rec['violation']):.3f} > --switch-drift {cfg.switch_drift:g}: the parallel "
                         f"phase ends after epoch {self.epoch + 1}; its remaining {n - 1 - plan[self.epoch][2]} "
                         "epoch(s) run serial")
            self.epoch += 1
            if phase == "parallel" and j == n - 1:
                self.stores = None
                self.phase_state = None
            stop = cfg.stop_after is not None and self.epoch == cfg.stop_after and self.epoch < len(plan)
            if self.out_dir and (stop or self.epoch % cfg.checkpoint_every == 0 or self.epoch == len(plan)):
                self.wall_offset = time.perf_counter() - t_start
                self.save_checkpoint()
            if stop:
                self.log(f"stopped after epoch {self.epoch}/{len(plan)} (--stop-after {cfg.stop_after}): continue "
                         f"with --resume {self.out_dir}, or branch with --fork {self.out_dir}")
                return {"stopped_after": self.epoch, "wall_time_s": time.perf_counter() - t_start}
        summary = self._summary(time.perf_counter() - t_start)
        if self.out_dir and main:
            torch.save(self.model.state_dict(), os.path.join(self.out_dir, "final_model.pt"))
            atomic_write_json(os.path.join(self.out_dir, "summary.json"), summary)
        return summary


    def _snapshot(self) -> dict[str, Any]:
        """What a parallel epoch changes and --drift-guard restores (the checkpoint's training
        state), copied before the epoch (and before the phase's initial fill when the epoch opens
        the phase). Every rank holds every stage's state in sync at an epoch's start, so every rank
        restores the same state."""
        return copy.deepcopy(self._train_state())

    def _guard_verdict(self, rec: dict[str, Any]) -> str:
        """Why the parallel epoch of record ``rec`` is to be undone ('' when it stays): the drift
        guard (a stage's drift above --drift-guard), then, on a phase's first epoch, the pace guard
        (the held-in loss not lowered by --pace-drop, --pace-rows). Decided from the record, the
        same on every rank."""
        cfg = self.cfg
        if cfg.drift_guard > 0 and should_switch(rec.get("violation") or [], cfg.drift_guard):
            return f"drift {max(rec['violation']):.3f} > --drift-guard {cfg.drift_guard:g}"
        ref = rec.get("heldin_ref")      # set on a phase's first epoch only
        if ref is not None and not rec["heldin_loss"] < ref * (1.0 - cfg.pace_drop):
            return (f"held-in loss {rec['heldin_loss']:.4f}, not below {rec['heldin_ref']:.4f}"
                    + (f" x (1 - {cfg.pace_drop:g})" if cfg.pace_drop else "") + f" (--pace-rows {cfg.pace_rows})")
        return ""

    def _roll_back(self, snap: dict[str, Any], rec: dict[str, Any], why: str) -> None:
        """--drift-guard / --pace-rows: undo the parallel epoch just run (its record goes to
        ``self.rollbacks``, not to the metrics) and turn it and the rest of its phase into serial
        epochs. The result is the run whose schedule ended that phase one epoch earlier, bit for
        bit (tested); the decision is made from the epoch's record, the same on every rank."""
        e = self.epoch
        self._load_train_state(snap)
        self.stores = None
        self.phase_state = None
        rest = _serial_from(self.plan, e)
        rec = dict(rec, rolled_back=True, rolled_back_why=why)
        self.rollbacks.append(rec)
        self.log(f"{why} in parallel epoch {e + 1}: the epoch is undone and reruns serially, with the "
                 f"{rest - 1} remaining epoch(s) of its phase (the {rec['epoch_time_s']:.1f} s it took are lost)")

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
            "rolled_back": [{k: r[k] for k in ("epoch", "rolled_back_why", "violation", "heldin_ref", "heldin_loss",
                                               "test_acc", "epoch_time_s") if k in r}
                            for r in self.rollbacks],
            "sharpness_gated": self.gated,
            "cuts": self.cuts,
            "cut_shapes": self.cut_shapes,
            "dataset": {"name": self.data.name, "train": self.data.num_train, "test": self.data.num_test},
            "versions": {"layerpar_fast": __version__, **environment()},
        }


# ---------------------------------------------------------------------------------------- helpers

class DistTrainer(HybridTrainer):
    """:class:`HybridTrainer` with one process per stage (a
    :class:`~layerpar_fast.topology.DistTopology`); this process is rank k = stage k.

    Needs an initialised process group with exactly ``cfg.stages`` ranks, or ``cfg.stages ·
    cfg.replicas`` with stage replicas (rank r·K + k runs replica r of stage k; replicas.py)
    (:func:`layerpar_fast.dist.init_process_group`). Every rank builds the whole network from the
    same seed; rank k trains stage k in parallel phases, and after each parallel epoch every
    stage's parameters, buffers and optimizer state are broadcast from its owner. Serial phases
    run data-parallel or on rank 0 (``cfg.serial_on``); BatchNorm recalibration and evaluation are
    sharded over the ranks; each rank writes its own auxiliary stores into the checkpoint.
    """

    def __init__(self, cfg: Config, out_dir: str | None = None, **kw: Any) -> None:
        topo = DistTopology(cfg.stages, timeout_s=cfg.timeout_s, window=cfg.window, device=_pick_device(cfg),
                            replicas=cfg.replicas)
        try:
            super().__init__(cfg, out_dir, topology=topo, **kw)
        except BaseException:
            topo.close()
            raise


# ---------------------------------------------------------------------------------------- helpers
def evaluate_run(run_dir: str, *, test_subset: int | None = None, data_dir: str | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """Test loss and accuracy of a finished run's ``final_model.pt`` with the serial forward pass,
    on the whole test set by default (runs often evaluate a subset every epoch to save time).

    ``data_dir`` replaces the run's data folder (the run moved to another machine)."""
    values = read_run_config(run_dir, "final_model.pt", "eval")
    model_path = os.path.join(run_dir, "final_model.pt")
    values.update(stages=1, replicas=1, cuts=None, method="serial", schedule="serial:1", epochs=None, progress=False,
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


def _ranges(xs: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> '1-3, 5, 7-8'."""
    out: list[str] = []
    for x in sorted(xs):
        if out and x == int(out[-1].rpartition("-")[2]) + 1:
            out[-1] = f"{out[-1].partition('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ", ".join(out)


def _augment_kind(augment: str, ds: Dataset) -> str | None:
    if augment == "none":
        return None
    if augment != "auto":
        return augment
    return "crop_flip" if ds.in_channels == 3 else None


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _end_phase_after(plan: list[tuple[int, str, int, int]], epoch: int) -> None:
    """In place: the parallel phase running at ``epoch`` (0-based) ends there; its remaining
    epochs become serial epochs."""
    _, _, j, n = plan[epoch]
    if j < n - 1:
        _serial_from(plan, epoch + 1)


def _serial_from(plan: list[tuple[int, str, int, int]], epoch: int) -> int:
    """In place: the parallel phase running at ``epoch`` (0-based) runs serial from that epoch on
    (--drift-guard). Returns how many epochs became serial."""
    pidx, _, j, n = plan[epoch]
    rest = n - j
    for i in range(rest):
        plan[epoch + i] = (pidx, "serial", i, rest)
    return rest


def epoch_plan(cfg: Config) -> list[tuple[int, str, int, int]]:
    """[(phase_index, phase, epoch_in_phase, phase_length)] for every epoch of ``cfg``'s schedule."""
    return [(i, name, j, n) for i, (name, n) in enumerate(cfg.phases()) for j in range(n)]


def _postpone(plan: list[tuple[int, str, int, int]], epoch: int, stages: int) -> int:
    """In place: the parallel phase that would open at ``epoch`` (0-based) opens one epoch later
    (--sharpness-gate); ``epoch`` becomes a serial epoch. When the phase would then be shorter
    than K − 1 epochs (the schedule's rule, docs/method.md §6) all of it runs serial. Returns
    how many epochs became serial."""
    pidx, _, j, n = plan[epoch]
    rest = n - j
    if rest - 1 < max(1, stages - 1):
        return _serial_from(plan, epoch)
    plan[epoch] = (pidx, "serial", 0, 1)
    for i in range(1, rest):
        plan[epoch + i] = (pidx, "parallel", i - 1, rest - 1)
    return 1


def should_switch(violations: list[float], threshold: float | None) -> bool:
    """The --switch-drift rule: end the parallel phase when any stage's drift ‖a − λ̃‖/‖λ̃‖ of the
    epoch just finished exceeds ``threshold`` (its outputs have moved away from what the next
    stage trained on; NaN counts as exceeding). Off when ``threshold`` is None."""
    if threshold is None or not violations:
        return False
    return any(not (v <= threshold) for v in violations)

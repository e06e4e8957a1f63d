"""One stage's share of a parallel epoch (docs/method.md §3-§5).

A :class:`StageWorker` owns stage k (0-based ``rank`` here), its optimizer and its auxiliary
stores, and talks to its neighbours only through a :class:`~layerpar_fast.transport.Transport`.
The same code runs in one process (all workers stepped in lockstep over a local transport) and
with one process per stage (a torch.distributed transport); both give identical parameters,
because every store update produced in epoch e for batch B_t is applied only after the receiver
has read B_t in epoch e (rows of different batches are disjoint within an epoch).

Stores of worker k:
* ``input_store`` (k > 0): λ̃_{k-1}, the coarse input rows (filled by "in" messages);
* ``target_store`` (k < K-1): λ̃_k, the targets of the local loss;
* ``mult_store`` (k < K-1, AL): u_k (Jacobi order, scaled) or μ_k (Gauss-Seidel order, unscaled).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import devsync, ops
from .profiling import Clock, nvtx_range
from .auxstore import AuxStore
from .filters import FilterPair
from .paraug import ShiftAugment
from .precision import Precision, inverse_scale
from .replicas import ReplicaBN, mean_running_, shares, share_of, sum_grads_
from .transport import Transport, TransportError


@dataclass
class WorkerSettings:
    """The numerical knobs of one stage's parallel phase."""

    method: str              # "penalty" | "al"
    order: str               # "gs" | "jacobi" (penalty always uses jacobi)
    beta: float              # β_k (unused by the last stage)
    gamma: float             # λ-step weight (Jacobi)
    window: int              # W: max steps ahead of awaited neighbour messages
    lr_cap: float = math.inf # stage learning-rate cap (docs/method.md §3)
    lr_scale: float = 1.0    # this stage's share of the scheduled lr (--stage-lr)
    precision: Precision | None = None   # --amp (autocast of the stage's forward; fp16: loss scaling)
    channels_last: bool = False
    label_smoothing: float = 0.0
    augment: ShiftAugment | None = None  # shift views of the parallel phase (paraug.py)
    compile: bool = False                # torch.compile the stage's forward + loss (--compile)
    # stage replicas (replicas.py): R replicas of this stage in all
    replicas: int = 1
    simulate: bool = False               # this worker computes all R shares of every batch (one process)
    replica: int = 0                     # else: which share of the global batches this worker's are
    grad_reduce: Callable[[torch.Tensor], Any] | None = None   # sums a tensor over the stage's replicas
    row_start: int = 0                   # first store row of this worker (a replica's block)


@dataclass
class EpochStats:
    """What one worker measured during one parallel epoch."""

    loss_sum: float = 0.0
    samples: int = 0
    correct: int = 0                  # last stage only (training accuracy on auxiliary inputs)
    drift_num: float = 0.0            # Σ‖a − λ̃‖²  (k < K-1)
    drift_den: float = 0.0            # Σ‖λ̃‖²
    step_num: float = 0.0             # Σ‖λ̃⁺ − λ̃‖² (Jacobi λ-step size)
    compute_s: float = 0.0            # forward + loss + backward + optimizer step
    data_s: float = 0.0               # reading inputs/targets
    update_s: float = 0.0             # applying messages to stores (λ/u updates)
    wait_s: float = 0.0               # blocked on neighbour messages
    sync_points: int = 0              # emulated device synchronisations (devsync.py), set by the trainer
    extra: dict = field(default_factory=dict)
    _acc: dict = field(default_factory=dict, repr=False)   # name -> float64 device tensor

    def add(self, name: str, value: torch.Tensor) -> None:
        """Accumulate a monitor on the device (no host synchronisation); :meth:`finalize` reads
        every accumulator once at the end of the epoch."""
        v = value.detach().double()
        acc = self._acc.get(name)
        self._acc[name] = v if acc is None else acc + v

    def peek(self, name: str) -> float:
        """The current value of a monitor (a host read of its accumulator: for progress bars,
        at most about once a second)."""
        acc = self._acc.get(name)
        return getattr(self, name) + (0.0 if acc is None else float(acc))

    def finalize(self) -> "EpochStats":
        """Move the device accumulators into the float fields (one read per epoch)."""
        for name, v in self._acc.items():
            setattr(self, name, getattr(self, name) + (int(v) if name == "correct" else float(v)))
        self._acc = {}
        return self

    def as_dict(self, rank: int, last: bool) -> dict:
        d = {
            "stage": rank,
            "local_loss": self.loss_sum / max(self.samples, 1),
            "compute_s": self.compute_s,
            "data_s": self.data_s,
            "update_s": self.update_s,
            "wait_s": self.wait_s,
        }
        if last:
            d["train_acc_aux"] = self.correct / max(self.samples, 1)
        else:
            d["violation"] = math.sqrt(self.drift_num / self.drift_den) if self.drift_den > 0 else float("nan")
            if self.step_num > 0:
                d["rel_lambda_step"] = math.sqrt(self.step_num / self.drift_den) if self.drift_den > 0 else float("nan")
        return d


def compile_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile for the engine: one code object serves every stage of a process (and every
    phase), each with its own guards, so the recompile limit is raised to hold them all."""
    import torch._dynamo.config as dcfg
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name) and getattr(dcfg, name) < 64:
            setattr(dcfg, name, 64)
    return torch.compile(fn)


class StageWorker:
    """Stage ``rank`` of ``world`` in the parallel phase."""

    def __init__(self, rank: int, world: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                 transport: Transport, settings: WorkerSettings, filt: FilterPair,
                 x_train: torch.Tensor | None, y_train: torch.Tensor | None,
                 input_fn: Callable[[torch.Tensor], torch.Tensor] | None,
                 input_store: AuxStore | None, target_store: AuxStore | None,
                 mult_store: AuxStore | None, device: torch.device,
                 scaler: "torch.amp.GradScaler | None" = None) -> None:
        self.rank, self.world = rank, world
        self.first, self.last = rank == 0, rank == world - 1
        self.module, self.opt, self.tp = module, optimizer, transport
        self.cfg, self.filt, self.device = settings, filt, device
        self.y_train = y_train
        self.input_fn = input_fn          # first stage: idx -> normalised images on device
        self.input_store, self.target_store, self.mult_store = input_store, target_store, mult_store
        self.prec = settings.precision or Precision("off", device)
        self.scaler = scaler if scaler is not None else self.prec.scaler()
        self.form = "gs" if (settings.method == "al" and settings.order == "gs") else "jacobi"
        self._loss_fn = compile_fn(self._forward_loss) if settings.compile else self._forward_loss
        if not self.first and input_store is None:
            raise ValueError(f"stage {rank} needs an input store")
        if not self.last and target_store is None:
            raise ValueError(f"stage {rank} needs a target store")
        if not self.last and settings.method == "al" and mult_store is None:
            raise ValueError(f"stage {rank} (AL) needs a multiplier store")
        self.batches: list[torch.Tensor] = []
        self.epoch = -1
        self.done = -1                         # last step whose batch has been read
        self._deferred: list[tuple[str, int, torch.Tensor]] = []
        self._pending_a: dict[int, torch.Tensor] = {}
        self._recv_upto = {"in": -1, "g": -1}  # highest step received per incoming tag
        self._shifts: dict[int, torch.Tensor] = {}  # step -> (B, 2) pixel shifts of its view
        self.stats = EpochStats()
        self.clock = Clock(device)
        self.mode = "train"
        r = settings.replicas
        if r < 1 or (settings.simulate and settings.grad_reduce is not None):
            raise ValueError(f"stage {rank}: bad replica settings (replicas={r}, simulate={settings.simulate})")
        if r > 1 and not settings.simulate and settings.grad_reduce is None:
            raise ValueError(f"stage {rank}: a replica of {r} needs grad_reduce (the stage group's all-reduce)")
        self.parts = r if settings.simulate else 1   # shares of every batch computed here
        self._bn: ReplicaBN | None = None           # the simulated replicas' BatchNorm buffers

    # ---------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, batches: list[torch.Tensor], lr: Callable[[int], float],
                    init: bool | str = False) -> None:
        """Start epoch ``epoch`` over ``batches`` (index tensors); ``lr(step)`` is the scheduled lr.
        ``init=True`` (or ``"fill"``) starts the initial fill pass instead (only "in" messages
        flow); ``init="grad"`` the multiplier warm start (:meth:`grad_init_step`: "g" messages,
        and for the Jacobi form the updated λ̃ as "in" messages)."""
        mode = "fill" if init is True else (init or "train")
        if mode not in ("train", "fill", "grad"):
            raise ValueError(f"begin_epoch: unknown pass {init!r}")
        self.epoch, self.batches, self.lr = epoch, batches, lr
        self.mode = mode
        for store in (self.input_store, self.target_store, self.mult_store):
            if store is not None:           # rows are read in batch order: a store may stage them ahead
                store.plan(batches)
        self.done = -1
        self._deferred.clear()
        self._pending_a.clear()
        self._shifts.clear()
        self._recv_upto = {"in": -1, "g": -1}
        self.stats = EpochStats()
        self.clock = Clock(self.device)
        self.module.train()
        self._bn = ReplicaBN(self.module, self.parts) if (self.parts > 1 and mode == "train") else None
        self._announce(mode)

    def _announce(self, mode: str) -> None:
        if not self.first and (mode != "grad" or self.form == "jacobi"):
            shp, dt = self.input_store.row_shape, self.input_store.dtype
            self.tp.expect(self.rank - 1, "in", [(t, (len(b), *shp), dt) for t, b in enumerate(self.batches)])
        if not self.last and mode != "fill":
            g_dtype = torch.float32
            shp = self.target_store.row_shape
            self.tp.expect(self.rank + 1, "g", [(t, (len(b), *shp), g_dtype) for t, b in enumerate(self.batches)])

    # ---------------------------------------------------------------------------------------
    def step(self, t: int) -> None:
        """Train on batch t: read, forward, local loss, backward, optimizer step, send messages."""
        if t != self.done + 1:
            raise RuntimeError(f"stage {self.rank}: step {t} out of order (last was {self.done})")
        w = self.cfg.window
        if t - w >= 0:                       # bounded run-ahead (window W)
            if not self.last:
                self._wait("g", self.rank + 1, t - w)
            if not self.first:
                self._wait("in", self.rank - 1, t - w)
        self._drain_ready()
        idx = self.batches[t]
        aug = self.cfg.augment
        sh = None
        if aug is not None:
            r = self.cfg.replicas
            if r > 1 and not self.cfg.simulate:   # this replica's rows of the global batch's views
                sh = share_of(aug.shifts(self.epoch, t, len(idx) * r), self.cfg.replica, r)
            else:
                sh = aug.shifts(self.epoch, t, len(idx))
            self._shifts[t] = sh
        send_a = None
        if not self.last and self.form == "gs":   # Gauss-Seidel: send a_k right after the forward
            send_a = lambda a: self.tp.send(self.rank + 1, "in", t, a.to(self.target_store.dtype))  # noqa: E731
        a, g = self._train_on(idx, sh, min(self.lr(t) * self.cfg.lr_scale, self.cfg.lr_cap), send_a)
        t2 = self.clock.now()
        if g is not None:
            self.tp.send(self.rank - 1, "g", t, g)
        self.done = t
        if not self.last:
            if self.form == "gs":           # own target λ̃_k ← a_k (after this step's read)
                self.target_store.scatter_(idx, a)
            else:
                self._pending_a[t] = a
        self._drain_ready()
        self.clock.add("update_s", t2, self.clock.now())

    def _forward_loss(self, z: torch.Tensor, target: torch.Tensor | None, mult: torch.Tensor | None,
                      y: torch.Tensor | None, sh: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Stage forward and its loss: ``(loss, correct)`` for the last stage, ``(loss, a,
        drift_num, drift_den)`` for the others. Compiled as one graph with ``--compile`` (the
        fused local loss is a custom op there); the caller does everything with side effects."""
        with nvtx_range(f"stage{self.rank}/forward"), self.prec.autocast():
            o = self.module(z)
        if self.last:
            loss = F.cross_entropy(o.float(), y, label_smoothing=self.cfg.label_smoothing)
            return loss, (o.detach().argmax(1) == y).sum()
        aug = self.cfg.augment
        with nvtx_range(f"stage{self.rank}/local_loss"):
            if sh is None:
                loss, a = ops.local_loss(o, target, mult, self.cfg.beta, self.form, self.filt)
            else:   # compare in canonical coordinates; positions outside the view keep λ̃, u
                vis = aug.visible(sh, tuple(target.shape[-2:]), target.device)
                zero = torch.zeros((), dtype=target.dtype, device=target.device)
                loss, a = ops.local_loss(aug.canonical(o, sh), torch.where(vis, target, zero),
                                         None if mult is None else torch.where(vis, mult, zero),
                                         self.cfg.beta, self.form, self.filt)
                a = torch.where(vis, a.detach(), target.to(a.dtype))
        tgt = target.float()
        return loss, a, (a - tgt).pow(2).sum(), tgt.pow(2).sum()

    def _parts(self, idx: torch.Tensor, *more: torch.Tensor | None) -> list[tuple[Any, ...]]:
        """``[(idx, *more)]``, or with simulated replicas the R shares of each (replicas.py)."""
        if self.parts == 1:
            return [(idx, *more)]
        cols = [shares(idx, self.parts)] + [shares(m, self.parts) if m is not None else [None] * self.parts
                                             for m in more]
        return list(zip(*cols))

    def _train_on(self, idx: torch.Tensor, sh: torch.Tensor | None, lr: float,
                  send_a: Callable[[torch.Tensor], None] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Read, forward, local loss, backward, optimizer step on rows ``idx`` (view shifts ``sh``);
        returns (a_k or None, g_{k-1} or None). No host synchronisation: the monitors accumulate
        on the device (EpochStats) and are read once per epoch. With stage replicas the loss of
        each share is scaled by 1/R and the gradients are summed over the replicas before the
        step (in this process over the simulated shares, in replica order; else an all-reduce)."""
        aug = self.cfg.augment
        clock = self.clock
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        scaler = self.scaler
        st = self.stats
        r_all = self.cfg.replicas
        a_parts, g_parts = [], []
        for r, (pidx, psh) in enumerate(self._parts(idx, sh)):
            if self._bn is not None:
                self._bn.use(r)
            t0 = clock.now()
            if self.first:
                z_in = z = self.input_fn(pidx)
                if psh is not None:
                    z = aug.view(z, psh, fill=aug.fill)
            else:
                z_in = self.input_store.stage_input(pidx, self.filt, self.cfg.channels_last).requires_grad_(True)
                z = aug.view(z_in, psh) if psh is not None else z_in
            if not self.last:
                target = self.target_store.gather(pidx)
                mult = self.mult_store.gather(pidx) if self.mult_store is not None else None
            t1 = clock.now()
            clock.add("data_s", t0, t1)
            devsync.first_call(f"stage{self.rank}/forward+backward", z)   # kernel loads, cuDNN search
            b = len(pidx)
            if self.last:
                y = self.y_train[pidx].to(self.device, non_blocking=True)
                loss, correct = self._loss_fn(z, None, None, y, None)
                st.add("correct", correct)
            else:
                loss, a, drift_num, drift_den = self._loss_fn(z, target, mult, None, psh)
                st.add("drift_num", drift_num)
                st.add("drift_den", drift_den)
                if send_a is not None and self.parts == 1:
                    send_a(a)
                a_parts.append(a)
            with nvtx_range(f"stage{self.rank}/backward"):
                scaler.scale(loss * (1.0 / r_all) if r_all > 1 else loss).backward()
            if not self.first:
                g = ops.coarse_input_grad(z_in.grad, self.filt)
                if r_all > 1:       # g is per sample (|share| x the gradient of a loss scaled by 1/R)
                    g = g * float(r_all)
                inv = inverse_scale(scaler, g.device)
                if inv is not None:     # fp16: unscale; an overflowed step sends zeros, not inf
                    g = torch.nan_to_num(g * inv, nan=0.0, posinf=0.0, neginf=0.0)
                g_parts.append(g)
            st.add("loss_sum", loss.detach().double() * b)
            st.samples += b
            clock.add("compute_s", t1, clock.now())
        t1 = clock.now()
        a = None if self.last else (a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts))
        if send_a is not None and self.parts > 1:
            send_a(a)
        g = None if self.first else (g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts))
        if self.cfg.grad_reduce is not None:
            with nvtx_range(f"stage{self.rank}/replica_all_reduce"):
                sum_grads_([p for grp in self.opt.param_groups for p in grp["params"]], self.cfg.grad_reduce)
        devsync.first_call(f"stage{self.rank}/optimizer_step")
        scaler.step(self.opt)
        scaler.update()
        clock.add("compute_s", t1, clock.now())
        return a, g

    def warm_up(self, sizes: list[int]) -> None:
        """Run every kernel of a step once for each batch size in ``sizes`` (the phase's full and
        last partial batch), before any receive of the phase is posted, and leave no trace:
        parameters, buffers, optimizer state, gradients and store rows are restored. This is
        where first-call compilation, autotuning and module loading synchronise the device, while
        no NCCL receive can be outstanding (the invariant of devsync.py)."""
        if not devsync.warmup_enabled():
            return
        saved_module = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        saved_opt = copy.deepcopy(self.opt.state_dict())
        saved_scaler = copy.deepcopy(self.scaler.state_dict())
        saved_stats, self.stats = self.stats, EpochStats()
        saved_clock, self.clock = self.clock, Clock(self.device)
        stores = [s for s in (self.input_store, self.target_store, self.mult_store) if s is not None]
        for b in sorted(set(sizes)):
            idx = torch.arange(b) + self.cfg.row_start
            rows = [s.gather(idx).clone() for s in stores]
            sh = None
            if self.cfg.augment is not None:
                sh = torch.zeros(b, 2, dtype=torch.long)
            a, g = self._train_on(idx, sh, 0.0, None)
            if not self.last:
                if self.form == "gs":
                    self.target_store.scatter_(idx, a)
                else:
                    gg = torch.zeros(a.shape, dtype=torch.float32, device=a.device)   # a "g" message
                    self.target_store.jacobi_update_(self.mult_store, idx, a, gg, self.cfg.beta, self.cfg.gamma)
            if not self.first:
                self.input_store.scatter_(idx, self.input_store.gather(idx))
            for s, r in zip(stores, rows):
                s.scatter_(idx, r)
        self.module.load_state_dict(saved_module)
        self.opt.load_state_dict(saved_opt)
        if saved_scaler:
            self.scaler.load_state_dict(saved_scaler)
        self.opt.zero_grad(set_to_none=True)
        self.stats, self.clock = saved_stats, saved_clock

    def end_epoch(self) -> EpochStats:
        """Drain: receive and apply every outstanding message of this epoch, then flush sends."""
        self._drain_all(wait_in=True, what="epoch")
        self.average_replica_bn()
        for name in ("data_s", "compute_s", "update_s"):   # device time on a GPU (one read per epoch)
            setattr(self.stats, name, self.clock.total(name))
        return self.stats.finalize()

    def average_replica_bn(self) -> None:
        """With stage replicas: the BatchNorm running statistics become their mean over the
        replicas (simulated ones here, else an all-reduce over the stage's group)."""
        if self._bn is not None:
            self._bn.average()
            self._bn = None
        elif self.cfg.grad_reduce is not None and self.mode == "train":
            mean_running_(self.module, self.cfg.grad_reduce, self.cfg.replicas)

    # ---------------------------------------------------------------------------------------
    def init_step(self, t: int) -> None:
        """Initial fill (§5): forward batch t in train mode (batch statistics) without gradients,
        store λ̃_k = D(F_k(z)) and send it to the next stage. BatchNorm running statistics are
        restored by the caller."""
        if not self.first:
            self._wait("in", self.rank - 1, t)
            self._drain_ready(upto=t)        # the input rows of batch t must be there now
        idx = self.batches[t]
        with torch.no_grad():
            outs = []
            for (pidx,) in self._parts(idx):   # simulated replicas: batch statistics per share
                z = (self.input_fn(pidx) if self.first
                     else self.input_store.stage_input(pidx, self.filt, self.cfg.channels_last))
                with self.prec.autocast():
                    o = self.module(z)
                if not self.last:
                    outs.append(self.filt.down(o.float()))
            if not self.last:
                a = outs[0] if len(outs) == 1 else torch.cat(outs)
                self.target_store.scatter_(idx, a)
                self.tp.send(self.rank + 1, "in", t, a.to(self.target_store.dtype))
        self.done = t

    def end_init(self) -> None:
        if not self.first:
            self._wait("in", self.rank - 1, len(self.batches) - 1)
            self._drain_ready()
        self.tp.flush()

    # ---------------------------------------------------------------------------------------
    def grad_init_step(self, t: int) -> None:
        """Multiplier warm start (after the fill, before the first parallel epoch): the λ/u visit
        that the first parallel epoch would make, done at once with the true back-propagated
        signal of the current network. Stage K computes the gradient of its cross-entropy with
        respect to its input; every stage k < K waits for g_k of batch t from stage k+1, back-
        propagates it through itself (the gradient of ⟨a_k, g_k⟩/|B|, i.e. the chain rule through
        the network with U∘D at every cut) and sends g_{k-1} on; then it applies g_k to its own
        stores exactly as a parallel epoch does (Gauss-Seidel: μ_k ← g_k; Jacobi/penalty: the
        λ-step and multiplier step at λ̃ = a, the new λ̃ sent to stage k+1). No parameter
        changes. Without it, μ = 0 at the first visit, so stage k < K gets no signal until the
        one above has trained for an epoch: stage 1 starts learning only in parallel epoch K.
        Train-mode BatchNorm (batch statistics, running statistics restored by the caller), the
        canonical views, the same batches as the fill: deterministic whatever the timing."""
        if t != self.done + 1:
            raise RuntimeError(f"stage {self.rank}: warm-start step {t} out of order (last was {self.done})")
        idx = self.batches[t]
        g_t = None
        if not self.last:
            self._wait("g", self.rank + 1, t)
            g_t = next(m for tag, step, m in self._deferred if tag == "g" and step == t)
        if not self.first:
            r_all = self.cfg.replicas
            gs = []
            for pidx, pg in self._parts(idx, g_t):   # simulated replicas: one share at a time
                z = self.input_store.stage_input(pidx, self.filt, self.cfg.channels_last).requires_grad_(True)
                with self.prec.autocast():
                    o = self.module(z)
                if self.last:
                    y = self.y_train[pidx].to(self.device, non_blocking=True)
                    loss = F.cross_entropy(o.float(), y, label_smoothing=self.cfg.label_smoothing)
                else:
                    target = self.target_store.gather(pidx)
                    loss, _ = ops.local_loss(o, target, pg.to(target.dtype), self.cfg.beta, "gs", self.filt)
                if r_all > 1:
                    loss = loss * (1.0 / r_all)
                (grad_z,) = torch.autograd.grad(self.scaler.scale(loss), z)
                g = ops.coarse_input_grad(grad_z, self.filt)
                if r_all > 1:
                    g = g * float(r_all)
                inv = inverse_scale(self.scaler, g.device)
                if inv is not None:
                    g = torch.nan_to_num(g * inv, nan=0.0, posinf=0.0, neginf=0.0)
                gs.append(g)
            self.tp.send(self.rank - 1, "g", t, gs[0] if len(gs) == 1 else torch.cat(gs))
        if not self.last and self.form == "jacobi":
            self._pending_a[t] = self.target_store.gather(idx).float()   # a = λ̃ right after the fill
        self.done = t
        self._drain_ready()

    def end_grad_init(self) -> None:
        """Drain the warm start's messages (like :meth:`end_epoch`)."""
        self._drain_all(wait_in=self.form == "jacobi", what="warm-start")

    def _drain_all(self, wait_in: bool, what: str) -> None:
        """Receive and apply every message of this pass ("g" always, "in" when ``wait_in``), check
        that nothing is left over, and flush the sends."""
        last = len(self.batches) - 1
        if not self.last:
            self._wait("g", self.rank + 1, last)
        if not self.first and wait_in:
            self._wait("in", self.rank - 1, last)
        self._drain_ready()
        if self._deferred or self._pending_a:
            raise TransportError(f"stage {self.rank}: {len(self._deferred)} messages and "
                                 f"{len(self._pending_a)} pending a_k left after the {what} drain")
        self.tp.flush()

    # ---------------------------------------------------------------------------------------
    def _wait(self, tag: str, src: int, step: int) -> None:
        if self._recv_upto[tag] >= step:
            return
        t0 = time.perf_counter()
        msgs = self.tp.wait(src, tag, step)
        self.stats.wait_s += time.perf_counter() - t0
        self._accept(tag, msgs)

    def _accept(self, tag: str, msgs: list[tuple[int, torch.Tensor]]) -> None:
        for step, tensor in msgs:
            self._deferred.append((tag, step, tensor))
            self._recv_upto[tag] = max(self._recv_upto[tag], step)

    def _drain_ready(self, upto: int | None = None) -> None:
        """Poll the transport and apply every message whose batch this worker has already read."""
        if not self.first:
            self._accept("in", self.tp.poll(self.rank - 1, "in"))
        if not self.last:
            self._accept("g", self.tp.poll(self.rank + 1, "g"))
        limit = self.done if upto is None else upto
        keep = []
        for tag, step, tensor in self._deferred:
            if step <= limit:
                self._apply(tag, step, tensor)
            else:
                keep.append((tag, step, tensor))
        self._deferred = keep

    def _apply(self, tag: str, step: int, tensor: torch.Tensor) -> None:
        idx = self.batches[step]
        if tag == "in":
            self.input_store.scatter_(idx, tensor)
            return
        # tag == "g": the back-propagated signal for this worker's cut
        vis = None
        if self.cfg.augment is not None and self.mode == "train":   # rows outside that step's view keep their values
            vis = self.cfg.augment.visible(self._shifts[step], self.target_store.row_shape[-2:], tensor.device)
        if self.form == "gs":
            if vis is not None:
                tensor = torch.where(vis, tensor, self.mult_store.gather(idx).to(tensor.dtype))
            self.mult_store.scatter_(idx, tensor)          # μ_k ← g_k
            return
        a = self._pending_a.pop(step)
        before_raw = self.target_store.gather(idx)
        before = before_raw.float()
        u_before = self.mult_store.gather(idx) if (vis is not None and self.mult_store is not None) else None
        new = self.target_store.jacobi_update_(self.mult_store, idx, a, tensor, self.cfg.beta, self.cfg.gamma)
        if vis is not None:
            new = torch.where(vis, new, before_raw.to(new.dtype))
            self.target_store.scatter_(idx, new)
            if u_before is not None:
                u_new = self.mult_store.gather(idx)
                self.mult_store.scatter_(idx, torch.where(vis, u_new, u_before.to(u_new.dtype)))
        self.stats.add("step_num", (new.float() - before).pow(2).sum())
        self.tp.send(self.rank + 1, "in", step, new)

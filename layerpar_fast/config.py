"""Run configuration: one dataclass, validated before any work starts.

The same keys are accepted on the command line (``--batch-size``) and in a YAML or TOML file
given with ``--config`` (``batch_size: 128`` or ``batch-size = 128``); the command line wins.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid option; the message names the option, the bad value and what is valid."""


METHODS = ("serial", "penalty", "al")
LR_SCHEDULES = ("cosine", "linear", "multistep", "constant")
AUGMENTS = ("auto", "none", "crop_flip", "shift")
AUX_DTYPES = ("fp32", "bf16", "fp16")
AUX_DEVICES = ("auto", "device", "host")
AL_ORDERS = ("gs", "jacobi")
TRANSPORTS = ("auto", "local", "dist")
SERIAL_ON = ("all", "one")
SERIAL_BNS = ("global", "rank")
BALANCE = ("time", "flops")
PHASES = ("serial", "parallel", "idle")
PARALLEL_AUGMENTS = ("auto", "none", "shift", "shift_flip")
MULT_INITS = ("zero", "grad")
STAGE_LRS = ("uniform", "staleness")
AMPS = ("off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Config:
    # data
    dataset: str = "embedded"
    data_dir: str | None = None
    subset: int | None = None
    test_subset: int | None = None
    augment: str = "auto"
    cifar100_labels: str = "fine"
    # model
    model: str = "mnist_resnet"
    channels_last: bool = False
    amp: str = "off"
    compile: bool = False
    # method and schedule
    method: str = "serial"
    epochs: int | None = None
    schedule: str | None = None
    tail_share: float = 2 / 3
    warm_share: float = 0.3
    aug_parallel_share: float = 0.5
    aug_warm_share: float = 0.65
    switch_drift: float | None = None
    drift_guard: float = 0.3    # a parallel epoch whose drift exceeds it is undone and rerun serially (0: off)
    sharpness_gate: float = 0.25  # a parallel epoch opens a phase only when lr·κ_k <= it for every stage (0: off)
    pace_rows: int = 2048         # held-in training rows of the pace guard (0: off)
    pace_drop: float = 0.005      # the relative drop of the held-in loss a phase's first epoch must reach
    # optimisation
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 0.05
    lr_schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    wd_bn: bool = True
    label_smoothing: float = 0.0
    # layer-parallel engine (docs/method.md)
    stages: int = 1
    replicas: int = 1
    cuts: str | None = None
    balance: str = "flops"
    ds: int = 0                 # 0 = auto: 2, or 1 with a cut on an 8x8 (or smaller) map in an augmented run (trainer.auto_ds)
    filter: str = "avg_nearest"
    beta: float | None = None
    beta_c: float = 0.6
    gamma: float = 0.5
    al_order: str = "gs"
    mult_init: str = "zero"
    stage_lr: str = "uniform"
    window: int = 2
    parallel_augment: str = "none"
    aux_dtype: str = "fp32"
    aux_device: str = "auto"
    kappa_iters: int = 20
    bn_recalib_batches: int = 200
    transport: str = "auto"
    serial_on: str = "all"
    serial_bn: str = "global"
    timeout_s: float = 300.0
    # run
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    out: str | None = None
    progress: bool = True
    checkpoint_every: int = 1
    stop_after: int | None = None
    delay_rank: int | None = None
    delay_s: float = 0.0

    # ------------------------------------------------------------------------------------------
    def phases(self) -> list[tuple[str, int]]:
        """The schedule as a list of (phase, epochs), phase in {"serial", "parallel", "idle"}."""
        return parse_schedule(self.resolved_schedule())

    def resolved_schedule(self) -> str:
        if self.schedule:
            return self.schedule
        epochs = 3 if self.epochs is None else self.epochs
        if self.method == "serial":
            return f"serial:{epochs}"
        warm, par, tail = self._default_split(epochs)
        if par < self.min_parallel_epochs():
            # too short a budget for a parallel phase that reaches every cut (the trainer warns)
            return f"serial:{epochs}"
        return f"serial:{warm},parallel:{par},serial:{tail}"

    def _default_split(self, epochs: int) -> tuple[int, int, int]:
        """(serial warm start W, parallel epochs P, serial tail T) of the default schedule
        serial:W,parallel:P,serial:T.

        P = E − 1 − round(E · tail_share) whatever the warm start; W = round(E · warm_share), at
        least 1 and at most round(E · tail_share), so that the tail keeps at least one epoch; the
        tail gets the rest, T = E − W − P. The default 0.3 gives serial:2,parallel:2,serial:4 at E = 8
        and serial:5,parallel:5,serial:8 at E = 18; with warm_share 0 this is serial:1,parallel:P,serial:S.

        When the serial epochs augment and the parallel phase does not (``--parallel-augment none``),
        P becomes max(K − 1, ⌈P · aug_parallel_share⌉) and the tail takes the epochs given up: the
        parallel epochs see the images as they are, and the serial tail must make up the augmented
        epochs they replace; and with K >= 3 stages the warm start takes max(warm_share,
        aug_warm_share) of the epochs, as long as the tail keeps at least P epochs: a later phase, at a
        lower learning rate, drifts less at K = 4, while at K = 2 the tail needs the epochs (the
        accuracy matrix, rounds 7 and 8, docs/results.md)."""
        serial = max(1, round(epochs * self.tail_share))
        par = epochs - 1 - serial
        aug_only = self.augmented_serial_only()
        # K >= 3: the first stages get their signal late in the phase; later = lower lr = less drift
        share = max(self.warm_share, self.aug_warm_share) if aug_only and self.stages >= 3 else self.warm_share
        warm = min(max(1, round(epochs * share)), serial)
        if self.aug_parallel_share < 1 and aug_only and par >= self.min_parallel_epochs():
            # the serial epochs augment and the parallel phase does not: its epochs are worth less
            par = max(self.min_parallel_epochs(), math.ceil(par * self.aug_parallel_share - 1e-9))
        if aug_only and self.stages >= 3 and par > 0:
            warm = max(1, min(warm, epochs - 2 * par))      # a tail at least as long as the phase
        return warm, par, epochs - warm - par

    def augmented_serial_only(self) -> bool:
        """The serial epochs augment and the parallel phase sees the images as they are
        (``--parallel-augment none``): the case of the shorter, later K >= 3 phase and of s = 1 at
        a cut on an 8x8 map under ``--ds auto``."""
        return self.parallel_augment == "none" and self.augments()

    def augments(self) -> bool:
        """Whether the serial epochs train on augmented images. ``--augment auto`` means crop_flip for
        RGB images and none for grey ones: known here for the named data sets (MNIST and the embedded
        set are grey, CIFAR RGB); for an .npz file or a user's own data the trainer replaces ``auto``
        by what the images call for before it reads the schedule (until then: False)."""
        if self.augment != "auto":
            return self.augment != "none"
        return self.dataset.strip().lower() in ("cifar10", "cifar100")

    def min_parallel_epochs(self) -> int:
        """The shortest parallel phase the default schedule gives: K − 1 epochs (at least 1).

        A parallel phase starts with zero multipliers, so the back-propagated signal moves one cut
        per parallel epoch: the last cut's multiplier is set in the phase's first epoch, the first
        cut's in its (K − 1)-th. In a shorter phase the first stages train on nothing but their
        proximal term and the phase costs accuracy that data-parallel serial epochs on the same
        K workers do not (the accuracy matrix, docs/results.md, round 4)."""
        return max(1, self.stages - 1)

    def min_epochs_for_parallel(self) -> int:
        """The smallest epoch budget whose default schedule has a parallel phase (at this K and
        --tail-share)."""
        e = 3
        while self._default_split(e)[1] < self.min_parallel_epochs():
            e += 1
        return e

    def default_schedule_is_serial(self) -> bool:
        """Whether a layer-parallel method's default schedule has no parallel phase (too few epochs)."""
        return self.method != "serial" and not self.schedule and all(p != "parallel" for p, _ in self.phases())

    def world_size(self) -> int:
        """Processes of a distributed run: one per stage and replica (K·R)."""
        return self.stages * self.replicas

    def total_epochs(self) -> int:
        return sum(n for _, n in self.phases())

    def validate(self) -> "Config":
        """Check every option; raise ConfigError with a precise message. Returns self."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.method in METHODS, f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        need(self.lr_schedule in LR_SCHEDULES,
             f"--lr-schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        need(self.augment in AUGMENTS, f"--augment {self.augment!r} is not one of {', '.join(AUGMENTS)}")
        need(self.aux_dtype in AUX_DTYPES, f"--aux-dtype {self.aux_dtype!r} is not one of {', '.join(AUX_DTYPES)}")
        need(self.aux_device in AUX_DEVICES,
             f"--aux-device {self.aux_device!r} is not one of {', '.join(AUX_DEVICES)}")
        need(self.al_order in AL_ORDERS, f"--al-order {self.al_order!r} is not one of {', '.join(AL_ORDERS)}")
        need(self.transport in TRANSPORTS, f"--transport {self.transport!r} is not one of {', '.join(TRANSPORTS)}")
        need(self.serial_on in SERIAL_ON, f"--serial-on {self.serial_on!r} is not one of {', '.join(SERIAL_ON)}")
        need(self.serial_bn in SERIAL_BNS, f"--serial-bn {self.serial_bn!r} is not one of {', '.join(SERIAL_BNS)}")
        need(self.parallel_augment in PARALLEL_AUGMENTS,
             f"--parallel-augment {self.parallel_augment!r} is not one of {', '.join(PARALLEL_AUGMENTS)}")
        need(self.amp in AMPS, f"--amp {self.amp!r} is not one of {', '.join(AMPS)}")
        need(self.stage_lr in STAGE_LRS, f"--stage-lr {self.stage_lr!r} is not one of {', '.join(STAGE_LRS)}")
        need(self.mult_init in MULT_INITS, f"--mult-init {self.mult_init!r} is not one of {', '.join(MULT_INITS)}")
        need(self.balance in BALANCE, f"--balance {self.balance!r} is not one of {', '.join(BALANCE)}")
        need(self.device in DEVICES, f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        need(self.cifar100_labels in ("fine", "coarse"),
             f"--cifar100-labels {self.cifar100_labels!r} is not one of fine, coarse")
        need(self.switch_drift is None or self.switch_drift > 0,
             f"--switch-drift must be > 0, got {self.switch_drift}")
        need(self.drift_guard >= 0 and math.isfinite(self.drift_guard),
             f"--drift-guard must be a number >= 0 (0: off), got {self.drift_guard}")
        need(0 <= self.pace_drop < 1, f"--pace-drop must be in [0, 1), got {self.pace_drop}")
        need(self.pace_rows >= 0,
             f"--pace-rows must be an integer >= 0 (0: off), got {self.pace_rows!r}")
        need(self.sharpness_gate >= 0 and math.isfinite(self.sharpness_gate),
             f"--sharpness-gate must be a number >= 0 (0: off), got {self.sharpness_gate}")
        need(0 < self.tail_share < 1, f"--tail-share must be in (0, 1), got {self.tail_share}")
        need(0 <= self.warm_share < 1, f"--warm-share must be in [0, 1), got {self.warm_share}")
        need(0 <= self.aug_warm_share < 1, f"--aug-warm-share must be in [0, 1), got {self.aug_warm_share}")
        need(0 < self.aug_parallel_share <= 1,
             f"--aug-parallel-share must be in (0, 1], got {self.aug_parallel_share}")
        need(self.epochs is None or self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        need(0 < self.lr_decay <= 1, f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.subset is None or self.subset >= 1, f"--subset must be >= 1, got {self.subset}")
        need(self.test_subset is None or self.test_subset >= 1,
             f"--test-subset must be >= 1, got {self.test_subset}")
        need(self.stages >= 1, f"--stages must be >= 1, got {self.stages}")
        need(self.replicas >= 1, f"--replicas must be >= 1, got {self.replicas}")
        if self.replicas > 1:
            need(self.stages >= 2, f"--replicas {self.replicas} replicates the stages of a layer-parallel run; "
                                   "give --stages K >= 2")
            need(self.batch_size % self.replicas == 0,
                 f"--batch-size {self.batch_size} is not a multiple of --replicas {self.replicas}: every "
                 "global batch is split into equal shares, one per replica")
            need(self.parallel_augment != "shift_flip",
                 "--parallel-augment shift_flip is not supported with --replicas > 1 (use shift)")
        need(self.ds in (0, 1, 2, 4, 8), f"--ds must be one of auto, 1, 2, 4, 8, got {self.ds}")
        need(self.beta is None or self.beta > 0, f"--beta must be > 0, got {self.beta}")
        need(self.beta_c > 0, f"--beta-c must be > 0, got {self.beta_c}")
        need(0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}")
        need(self.window >= 1, f"--window must be >= 1, got {self.window}")
        need(self.kappa_iters >= 0, f"--kappa-iters must be >= 0, got {self.kappa_iters}")
        need(self.bn_recalib_batches >= 0, f"--bn-recalib-batches must be >= 0, got {self.bn_recalib_batches}")
        need(self.timeout_s > 0, f"--timeout-s must be > 0, got {self.timeout_s}")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        need(self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        need(self.stop_after is None or self.stop_after >= 1, f"--stop-after must be >= 1, got {self.stop_after}")
        need(self.delay_s >= 0, f"--delay-s must be >= 0, got {self.delay_s}")
        need(self.delay_rank is None or 0 <= self.delay_rank < self.world_size(),
             f"--delay-rank must be a rank in [0, {self.world_size()}), got {self.delay_rank}")
        phases = self.phases()
        if self.schedule and self.epochs is not None and self.epochs != sum(n for _, n in phases):
            raise ConfigError(f"--epochs {self.epochs} disagrees with --schedule {self.schedule!r} "
                              f"({sum(n for _, n in phases)} epochs); give one of them")
        has_par = any(p == "parallel" for p, _ in phases)
        if self.method == "serial" and has_par:
            raise ConfigError("--method serial cannot run a parallel phase; use --method penalty or al")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_schedule(spec: str) -> list[tuple[str, int]]:
    """``"serial:1,parallel:5,serial:2"`` -> [("serial", 1), ("parallel", 5), ("serial", 2)].

    A group may be repeated: ``"(parallel:2,serial:1)x3"``. ``idle:N`` spends N epochs of the
    learning-rate schedule without training (the tail-only control of docs/method.md §6).
    """
    spec = spec.replace(" ", "")
    if not spec:
        raise ConfigError("--schedule is empty; example: serial:1,parallel:5,serial:2")
    out: list[tuple[str, int]] = []
    for part in _split_top(spec):
        if part.startswith("("):
            close = part.rfind(")")
            rep = part[close + 1:]
            if close < 0 or not rep.startswith("x") or not rep[1:].isdigit() or int(rep[1:]) < 1:
                raise ConfigError(f"bad schedule group {part!r}; write (parallel:2,serial:1)x3")
            out.extend(parse_schedule(part[1:close]) * int(rep[1:]))
            continue
        name, _, num = part.partition(":")
        if name not in PHASES or not num.isdigit() or int(num) < 1:
            raise ConfigError(f"bad schedule entry {part!r} in {spec!r}; entries are serial:N, "
                              "parallel:N or idle:N with N >= 1, e.g. serial:1,parallel:5,serial:2")
        out.append((name, int(num)))
    return out


def schedule_text(phases: list[str]) -> str:
    """The schedule spec of the epochs' phases as run: ['serial', 'parallel', 'parallel', 'serial'] ->
    'serial:1,parallel:2,serial:1' ('' for no epoch)."""
    out: list[list[Any]] = []
    for p in phases:
        if out and out[-1][0] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return ",".join(f"{p}:{n}" for p, n in out)


def _split_top(spec: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += (ch == "(") - (ch == ")")
        cur += ch
    parts.append(cur)
    if any(not p for p in parts):
        raise ConfigError(f"bad schedule {spec!r}: empty entry")
    return parts


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of option keys (dashes or underscores)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        if path.endswith(".toml"):
            import tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif path.endswith((".yaml", ".yml")):
            import yaml
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        else:
            raise ConfigError(f"--config {path}: unknown extension; use .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as e:  # parse errors of either format
        raise ConfigError(f"--config {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of options, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(Config)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        out[name] = value
    return out


def read_run_config(run_dir: str, needs: str, what: str) -> dict[str, Any]:
    """The configuration values saved in RUN_DIR/config.json; ``needs`` another file of the run
    that must exist (checkpoint.pt to resume, final_model.pt to evaluate); ``what`` names the
    command in the error (``--resume``, ``eval``)."""
    import json
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{what} {run_dir}: no such directory")
    if not os.path.isfile(os.path.join(run_dir, needs)):
        raise ConfigError(f"{what} {run_dir}: no {needs} there")
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {run_dir}: cannot read config.json: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {run_dir}: config.json does not hold a configuration")
    return values


def make_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> Config:
    """Build a validated Config from file values overridden by explicit keyword values."""
    values = dict(file_values or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("ds"), str) and values["ds"].strip().lower() == "auto":
        values["ds"] = 0                    # --ds auto: the trainer picks 2 or 1 from the cuts
    known = {f.name: f for f in dataclasses.fields(Config)}
    for k in values:
        if k not in known:
            raise ConfigError(f"unknown option {k!r}")
    try:
        cfg = Config(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    _coerce_types(cfg)
    return cfg.validate()


def _coerce_types(cfg: Config) -> None:
    """Config files may give numbers as strings or ints as floats; normalise the obvious cases."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        t = str(f.type)
        try:
            if t.startswith("int"):
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                setattr(cfg, f.name, int(v))
            elif t.startswith("float"):
                setattr(cfg, f.name, float(v))
            elif t == "bool" and not isinstance(v, bool):
                raise ValueError
            elif t.startswith("list[float]"):
                if isinstance(v, str):
                    v = [x for x in v.split(",") if x]
                setattr(cfg, f.name, [float(x) for x in v])
        except (TypeError, ValueError):
            raise ConfigError(f"option {f.name}: expected {_type_words(t)}, got {v!r}") from None


def _type_words(t: str) -> str:
    """'int | None' -> 'an integer' (what a user reads, not Python's type syntax)."""
    base = t.split("|")[0].strip()
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "list[float]": "a comma-separated list of numbers"}.get(base, base)


#: options that only act in a layer-parallel run (a parallel phase), with their default
PARALLEL_ONLY = ("parallel_augment", "mult_init", "stage_lr", "switch_drift", "drift_guard", "sharpness_gate", "pace_rows", "pace_drop", "beta", "al_order", "window",
                 "aux_dtype", "kappa_iters")


def ignored_options(cfg: Config) -> list[str]:
    """Options set away from their default that have no effect in this run (no parallel phase)."""
    if any(p == "parallel" for p, _ in cfg.phases()):
        return []
    base = Config()
    return ["--" + k.replace("_", "-") for k in PARALLEL_ONLY if getattr(cfg, k) != getattr(base, k)]

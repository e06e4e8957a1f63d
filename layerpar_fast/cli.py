"""Command line: ``layerpar train | plot | info``.

Every bad option, data file or configuration ends in one ``layerpar: error: ...`` line and exit
status 2 before any training starts; no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from typing import Any, Sequence

from .config import (schedule_text, AL_ORDERS, AUGMENTS, AUX_DTYPES, BALANCE, DEVICES, LR_SCHEDULES, METHODS, SERIAL_ON,
                     TRANSPORTS, Config, ConfigError, load_config_file, make_config, read_run_config)

# option name -> (type, help); the defaults come from Config
_TRAIN_OPTIONS: dict[str, tuple[Any, str]] = {
    "dataset": (str, "embedded (packaged MNIST subset, default), mnist, cifar10, cifar100, or PATH.npz"),
    "data_dir": (str, "folder with the data set's standard files"),
    "subset": (int, "use only the first N training images (quick runs)"),
    "test_subset": (int, "use only the first N test images"),
    "augment": (str, f"training augmentation of serial epochs: {', '.join(AUGMENTS)} (auto: crop_flip for RGB, none for MNIST)"),
    "cifar100_labels": (str, "fine (100 classes) or coarse (20 classes)"),
    "model": (str, "mnist_resnet, resnet20/32/44/56/110, wrn{depth}_{k} (e.g. wrn16_4, wrn28_10)"),
    "method": (str, f"{', '.join(METHODS)}: serial back-propagation, or SPH with penalty / augmented-Lagrangian local losses"),
    "epochs": (int, "total epochs (serial: serial:N; penalty/al default schedule serial:1,parallel:N-1-S,serial:S "
                    "with S = N x --tail-share, 2/3; a parallel phase shorter than K-1 epochs, or than 1, is "
                    "left out: the run is serial; K = 2: N >= 5, K = 4: N >= 11)"),
    "switch_drift": (float, "end a parallel phase early when a stage's drift ||a - lambda||/||lambda|| exceeds this "
                            "(the rest of the phase runs serial; default: off)"),
    "drift_guard": (float, "undo a parallel epoch in which a stage's drift ||a - lambda||/||lambda|| exceeds this "
                           "(parameters and optimizer state back to the epoch's start); the epoch and the rest of "
                           "its phase then run serial (default 0.3: above every phase of the accuracy matrix's ResNet-20 and "
                           "MNIST cells, below ResNet-56's; 0: off)"),
    "sharpness_gate": (float, "open a parallel phase only when lr x kappa_k, the learning rate times the top curvature "
                              "of stage k's outputs measured at the phase's entry, is at most this for every stage; "
                              "otherwise the epoch runs serial and the check repeats at the next one (default 0.25: "
                              "above every phase entry of the accuracy matrix's ResNet-20 and MNIST cells, 0.15 or "
                              "less, below the early ResNet-56 phases, 0.45 or more; 0: off)"),
    "pace_rows": (int, "the pace guard: the assembled network's loss on this many held-in training rows (the serial "
                       "epochs' views: augmented as they are, one fixed view per row) is measured at a parallel "
                       "phase's entry and after its first epoch; when that epoch does not lower it by --pace-drop "
                       "it is undone and the phase runs serial, as with --drift-guard (default 2048; 0: off)"),
    "pace_drop": (float, "with --pace-rows: the relative drop of the held-in loss a phase's first epoch must reach "
                         "(default 0.005: below the smallest drop of a phase the accuracy matrix keeps, 1.8%, above "
                         "ResNet-56's at K = 4, 0.1%; 0: any drop)"),
    "tail_share": (float, "share S/E of the epochs in the default schedule's serial tail (serial:1,parallel:E-1-S,serial:S)"),
    "warm_share": (float, "share of the epochs in the default schedule's serial warm start: W = round(E x share), "
                          "at least 1 (0: one epoch); the parallel phase keeps its E-1-S epochs and the tail gives "
                          "up W-1 (serial:W,parallel:E-1-S,serial:S+1-W); default 0.3: serial:2,parallel:2,serial:4 at 8 epochs"),
    "aug_parallel_share": (float, "when the serial epochs augment and the parallel phase does not (--parallel-augment none), "
                                  "the default schedule keeps this share of its parallel epochs, ceil(P x share), at "
                                  "least K-1, and gives the rest to the serial tail (1: no change)"),
    "aug_warm_share": (float, "with K >= 3 stages, when the serial epochs augment and the parallel phase does not, the "
                              "default schedule's warm start takes max(--warm-share, this) of the epochs, leaving a "
                              "tail at least as long as the phase: the phase runs later (default 0.65: "
                              "serial:12,parallel:3,serial:3 at 18 epochs, K = 4, on CIFAR; 0: no change)"),
    "schedule": (str, "phases, e.g. serial:1,parallel:5,serial:2 or (parallel:2,serial:1)x3"),
    "batch_size": (int, "mini-batch size (the global batch size of every phase)"),
    "eval_batch_size": (int, "evaluation batch size"),
    "lr": (float, "peak learning rate"),
    "lr_schedule": (str, f"{', '.join(LR_SCHEDULES)} over all epochs of all phases"),
    "milestones": (str, "multistep milestones: fractions of the total (<1) or epoch numbers, comma separated"),
    "lr_decay": (float, "multistep decay factor"),
    "warmup_epochs": (float, "linear warm-up length in epochs"),
    "momentum": (float, "SGD momentum"),
    "weight_decay": (float, "weight decay"),
    "label_smoothing": (float, "cross-entropy label smoothing"),
    "stages": (int, "K, the number of stages (workers)"),
    "replicas": (int, "R, replicas of every stage (layer-parallel x data-parallel: K*R processes, rank r*K+k runs "
                      "replica r of stage k; with --transport local one process computes what they compute)"),
    "cuts": (str, "block indices where the network is cut, comma separated"),
    "balance": (str, f"how to choose cuts when --cuts is not given: {', '.join(BALANCE)}"),
    "ds": ("ds", "downsampling factor s of what is stored and sent: auto, 1, 2, 4 or 8 (auto: 2, or 1 when a "
                 "cut's feature map is 8x8 or smaller and the serial epochs augment while the parallel phase does "
                 "not, where a 4x4 grid costs accuracy; 1 also when s = 2 does not divide a cut's map)"),
    "filter": (str, "filter pair"),
    "beta": (float, "penalty weight beta (automatic: c/(lr*kappa_k) for Gauss-Seidel AL, otherwise 10)"),
    "beta_c": (float, "c in the automatic beta_k = c/(lr*kappa_k)"),
    "gamma": (float, "lambda-step weight gamma in (0, 1] (Jacobi order and penalty)"),
    "al_order": (str, f"augmented-Lagrangian update order: {', '.join(AL_ORDERS)}"),
    "amp": (str, "mixed precision of the stages' forward passes: off, bf16 (CPU and GPU), fp16 (GPU, with loss scaling)"),
    "stage_lr": (str, "learning rate of the stages in parallel phases: uniform, or staleness (stage k's lr divided "
                      "by K-k: its signal is K-1-k epochs old)"),
    "mult_init": (str, "multipliers at the start of a parallel phase: grad (one back-propagation pass over the "
                       "data sets them to the true signal) or zero"),
    "window": (int, "W: how many steps a stage may run ahead of its neighbours' messages"),
    "parallel_augment": (str, "auto | none | shift | shift_flip: train the parallel phase on randomly shifted views, the "
                              "auxiliary variables shifted with them (multiples of the cuts' coarse stride); "
                              "shift_flip adds mirror images with auxiliary variables of their own (2x memory); "
                              "auto: shift when the serial epochs augment and the cuts allow it, else none"),
    "aux_dtype": (str, f"storage dtype of the auxiliary variables: {', '.join(AUX_DTYPES)}"),
    "aux_device": (str, "where the auxiliary stores live: device (the compute device), host (pinned host memory, "
                        "rows prefetched to the device batch by batch), auto (host when the stores would take "
                        "more than 25% of the free GPU memory; on a CPU: device)"),
    "kappa_iters": (int, "power iterations for the local-loss curvature kappa_k"),
    "bn_recalib_batches": (int, "batches of BatchNorm recalibration after parallel epochs"),
    "transport": (str, f"{', '.join(TRANSPORTS)}: local = all stages in this process"),
    "serial_on": (str, f"serial phase on {', '.join(SERIAL_ON)} worker(s)"),
    "serial_bn": (str, "BatchNorm statistics of data-parallel serial epochs: global (over the whole batch, "
                       "as serial back-propagation; all-reduced per layer) or rank (each rank's share, as plain DDP)"),
    "timeout_s": (float, "seconds any wait for another worker may last before the run is aborted"),
    "device": (str, f"{', '.join(DEVICES)}: where to train (auto: cuda when torch sees a GPU, else cpu; "
                    "distributed runs need one GPU per local rank)"),
    "seed": (int, "random seed (initialisation, data order, augmentation)"),
    "threads": (int, "torch threads"),
    "checkpoint_every": (int, "write a checkpoint every N epochs"),
    "stop_after": (int, "stop after epoch N with a checkpoint (continue later with --resume, or branch with --fork)"),
    "delay_rank": (int, "testing: the rank whose parallel-phase steps each start --delay-s seconds late"),
    "delay_s": (float, "testing: the delay of --delay-rank's steps, in seconds"),
}
#: `layerpar train` without options runs layer-parallel SPH with K = 2 processes (the demo);
#: with --method serial the Config defaults (one stage, 3 epochs) apply
DEMO_DEFAULTS: dict[str, Any] = {"method": "al", "stages": 2, "ds": 0, "schedule": "serial:1,parallel:2,serial:1"}
_DEFAULT_HELP = {"stop_after": "never", "data_dir": "$LAYERPAR_DATA_DIR or ~/.cache/layerpar_fast", "filter": "avg_nearest", "subset": "all", "test_subset": "all",
                 "cuts": "balanced (--balance)", "beta": "automatic", "schedule": "derived from --epochs",
                 "threads": "cores // local workers", "switch_drift": "off",
                 "method": "al", "stages": "2 (1 with --method serial)", "ds": "auto (1 with --method serial)",
                 "epochs": "the demo's 4: serial:1,parallel:2,serial:1 (3 with --method serial)"}

_GROUP_ORDER = ("data", "model", "method", "schedule and optimisation", "distributed and devices", "output")
_GROUPS = {
    "data": ("dataset", "data_dir", "subset", "test_subset", "augment", "cifar100_labels"),
    "model": ("model", "channels_last", "amp", "compile"),
    "method": ("method", "stages", "replicas", "cuts", "balance", "ds", "filter", "beta", "beta_c", "gamma", "al_order",
               "mult_init", "stage_lr", "window", "parallel_augment", "aux_dtype", "aux_device", "kappa_iters",
               "bn_recalib_batches"),
    "schedule and optimisation": ("epochs", "schedule", "tail_share", "warm_share", "aug_parallel_share", "aug_warm_share",
                                  "switch_drift", "drift_guard", "sharpness_gate", "pace_rows", "pace_drop",
                                  "batch_size",
                                  "eval_batch_size",
                                  "lr", "lr_schedule", "milestones", "lr_decay", "warmup_epochs", "momentum",
                                  "nesterov", "weight_decay", "wd_bn", "label_smoothing", "seed"),
    "distributed and devices": ("transport", "serial_on", "serial_bn", "timeout_s", "threads", "device"),
}
_HIDDEN = ("delay_rank", "delay_s")


def _group_of(name: str) -> str:
    for g, names in _GROUPS.items():
        if name in names:
            return g
    return "output"


def _choices() -> dict[str, tuple]:
    from . import config as c
    return {"augment": c.AUGMENTS, "method": c.METHODS, "balance": c.BALANCE,
            "filter": ("avg_nearest", "avg_bilinear"), "al_order": c.AL_ORDERS, "mult_init": c.MULT_INITS,
            "stage_lr": c.STAGE_LRS, "parallel_augment": c.PARALLEL_AUGMENTS, "aux_dtype": c.AUX_DTYPES,
            "lr_schedule": c.LR_SCHEDULES, "transport": c.TRANSPORTS, "serial_on": c.SERIAL_ON, "serial_bn": c.SERIAL_BNS,
            "device": c.DEVICES, "amp": c.AMPS, "cifar100_labels": ("fine", "coarse"),
            **({"aux_device": c.AUX_DEVICES} if hasattr(c, "AUX_DEVICES") else {})}


_CHOICES = _choices()

_BOOL_OPTIONS = {
    "channels_last": "use channels_last memory format",
    "compile": "torch.compile each stage's forward + local loss (parallel phases) and the assembled "
               "network (serial phases); the fused ops are custom ops, so a stage is one graph",
    "nesterov": "Nesterov momentum",
    "wd_bn": "apply weight decay to BatchNorm weights and biases",
    "progress": "show progress bars",
}


def _ds_value(text: str) -> int:
    """--ds: auto (0 in the configuration, resolved by the trainer from the cuts) or a factor."""
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from auto, 1, 2, 4, 8)") from None
    if value not in (1, 2, 4, 8):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from auto, 1, 2, 4, 8)")
    return value


class _UsageError(Exception):
    """A command-line error, reported as one ``layerpar: error: ...`` line with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="layerpar", description="Layer-parallel training of deep ResNets.")
    p.add_argument("--version", action="version", version=f"layerpar_fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (serial or layer-parallel SPH)")
    t.add_argument("--config", help="YAML or TOML file with the same keys (the command line wins)")
    t.add_argument("--out", help="run directory [default: runs/MODEL-DATASET-METHOD-TIME]")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    t.add_argument("--fork", metavar="RUN_DIR",
                   help="start a new run (--out) from RUN_DIR's checkpoint: the same run so far, and, while it has "
                        "run serial epochs only, other parallel-phase options (--mult-init, --beta-c, --schedule "
                        "with the same epochs, ...) from there on")
    defaults = Config()
    groups = {g: t.add_argument_group(g) for g in _GROUP_ORDER}
    for name, (typ, help_) in _TRAIN_OPTIONS.items():
        typ = _ds_value if typ == "ds" else typ
        if name in _HIDDEN:       # test hooks: accepted, not shown
            t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=argparse.SUPPRESS)
            continue
        kw: dict[str, Any] = {}
        if name in _CHOICES:
            kw["choices"] = _CHOICES[name]
        if name == "ds":
            kw["metavar"] = "{auto,1,2,4,8}"
        default = _DEFAULT_HELP.get(name, getattr(defaults, name))
        if isinstance(default, float) and 0 < default < 1 and abs(default - 2 / 3) < 1e-12:
            default = "2/3"
        groups[_group_of(name)].add_argument(
            "--" + name.replace("_", "-"), dest=name, type=typ, default=None,
            help=f"{help_} [default: {default}]".replace("%", "%%"), **kw)
    for name, help_ in _BOOL_OPTIONS.items():
        groups[_group_of(name)].add_argument(
            "--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction, default=None,
            help=f"{help_} [default: {getattr(defaults, name)}]")

    pl = sub.add_parser("plot", help="plot test accuracy and loss of runs against epoch and wall time")
    pl.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    pl.add_argument("-o", "--output", default="runs.png", help="output image (PNG, PDF or SVG) [default: runs.png]")
    pl.add_argument("--labels", help="comma-separated legend labels [default: the directory names]")

    ev = sub.add_parser("eval", help="test accuracy of finished runs' final models (whole test set by default)")
    ev.add_argument("runs", nargs="+", help="run directories (each with config.json and final_model.pt)")
    ev.add_argument("--test-subset", type=int, help="only the first N test images")
    ev.add_argument("--data-dir", help="the data folder, when it moved since training")
    ev.add_argument("--threads", type=int, help="torch threads")

    sub.add_parser("info", help="versions, threads and available fast paths")
    return p


def _train_config(args: argparse.Namespace) -> tuple[Config, str, bool]:
    if getattr(args, "fork", None):
        return _fork_config(args)
    if args.resume:
        run_dir = args.resume
        saved = read_run_config(run_dir, "checkpoint.pt", "--resume")
        if args.config:
            raise ConfigError("--resume takes the run's own configuration; --config cannot be combined with it")
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name, None) is not None and f.name != "out"}
        if isinstance(given.get("milestones"), str):
            given["milestones"] = [float(x) for x in given["milestones"].split(",") if x]
        saved.update(_resume_changes(saved, given))
        saved["out"] = run_dir
        return make_config(saved), run_dir, True
    file_values = load_config_file(args.config) if args.config else {}
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)}
    if isinstance(values.get("milestones"), str):
        values["milestones"] = [float(x) for x in values["milestones"].split(",") if x]
    values["out"] = args.out
    _apply_demo_defaults(values, file_values)
    cfg = make_config(file_values, **values)
    run_dir = cfg.out or os.path.join(
        "runs", f"{cfg.model}-{os.path.basename(str(cfg.dataset)).replace('.npz', '')}-{cfg.method}-"
                f"{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.out = run_dir
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        raise ConfigError(f"--out {run_dir} already holds a run; continue it with --resume {run_dir} "
                          "or choose another --out")
    return cfg, run_dir, False


#: options a fork may change while its source has run serial epochs only: they act in parallel phases
#: (or shape the schedule's later phases, checked against the epochs already run)
FORKABLE = ("parallel_augment", "mult_init", "stage_lr", "switch_drift", "drift_guard", "sharpness_gate", "pace_rows", "pace_drop", "beta", "beta_c", "gamma", "al_order",
            "window", "aux_dtype", "kappa_iters", "ds", "filter", "schedule", "warm_share", "aug_warm_share",
            "tail_share", "aug_parallel_share", "bn_recalib_batches")


def _fork_config(args: argparse.Namespace) -> tuple[Config, str, bool]:
    """The configuration of ``--fork SRC --out NEW``: SRC's own, with run-time options, and while
    every epoch SRC ran was serial, the FORKABLE options, changed. Refused with one line: a
    combination with --resume/--config, a missing --out or one that holds a run, torchrun, an
    option outside those, a schedule with another length or other phases for the epochs run."""
    src = args.fork
    if args.resume or args.config:
        raise ConfigError("--fork starts a new run from RUN_DIR's checkpoint; it cannot be combined with "
                          + ("--resume" if args.resume else "--config"))
    if not args.out:
        raise ConfigError(f"--fork {src}: give the new run's directory with --out")
    if os.path.abspath(args.out) == os.path.abspath(src):
        raise ConfigError(f"--fork {src}: --out must be another directory (to continue the run itself: --resume)")
    if os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
        raise ConfigError(f"--out {args.out} already holds a run; continue it with --resume {args.out} "
                          "or choose another --out")
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("--fork under torchrun: fork in one local command (e.g. with --stop-after), "
                          "then --resume the new run under torchrun")
    saved = read_run_config(src, "checkpoint.pt", "--fork")
    from .checkpoint import checkpoint_phases, checkpoint_state, run_plan
    state = checkpoint_state(src)
    done = checkpoint_phases(src, state)   # the phase of every epoch the source has run
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
             if getattr(args, f.name, None) is not None and f.name != "out"}
    if isinstance(given.get("milestones"), str):
        given["milestones"] = [float(x) for x in given["milestones"].split(",") if x]
    new = dict(saved, stop_after=given.get("stop_after"))
    for key, value in given.items():
        if key in RESUME_RUNTIME or key == "stop_after":
            new[key] = value
        elif key == "epochs" or (key == "augment" and value == "auto"):
            continue                        # --epochs: checked below (it must keep the run's total)
        elif key in FORKABLE:
            if saved.get(key) != value and any(p != "serial" for p in done):
                raise ConfigError(f"--fork {src}: --{key.replace('_', '-')} can change only while the run has "
                                  f"trained serial epochs only (it ran {_realized_text(done)})")
            new[key] = value
        elif key in saved and saved[key] != value:
            opt = "--" + key.replace("_", "-")
            raise ConfigError(f"--fork {src}: {opt} cannot change (the run used {saved[key]!r}): it acts on the "
                              f"epochs already run; options that may: {', '.join('--' + k.replace('_', '-') for k in FORKABLE)}")
    if "epochs" in given and given["epochs"] != make_config(saved).total_epochs():
        raise ConfigError(f"--fork {src}: --epochs {given['epochs']} differs from the run's "
                          f"{make_config(saved).total_epochs()} (the learning-rate schedule spans them)")
    old_cfg, new_cfg = make_config(saved), make_config(new)
    old_plan = [p for p, n in old_cfg.phases() for _ in range(n)]
    new_plan = run_plan(new_cfg, state)     # with the source's own plan edits (gate, switch, guard)
    if len(new_plan) != len(old_plan):
        raise ConfigError(f"--fork {src}: the new schedule {new_cfg.resolved_schedule()} has {len(new_plan)} epochs, "
                          f"the run's {old_cfg.resolved_schedule()} {len(old_plan)} (the learning-rate schedule spans them)")
    if new_plan[:len(done)] != done:
        raise ConfigError(f"--fork {src}: the new schedule {new_cfg.resolved_schedule()} must start with the "
                          f"{len(done)} epoch(s) the run has trained ({_realized_text(done)})")
    if new_cfg.schedule is None or new_cfg.resolved_schedule() != old_cfg.resolved_schedule():
        new_cfg.schedule = new_cfg.resolved_schedule()      # fixed now: later resumes keep it
        new_cfg.epochs = None
        new_cfg = make_config(new_cfg.to_dict())
    new_cfg.out = args.out
    return new_cfg, args.out, True


def _realized_text(phases: list[str]) -> str:
    return schedule_text(phases) or "no epoch"


#: options a resumed run may change: how it runs, not what it computes
RESUME_RUNTIME = ("threads", "progress", "timeout_s", "transport", "device", "aux_device", "compile", "data_dir",
                  "checkpoint_every", "eval_batch_size", "stop_after")


def _resume_changes(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The options of a ``--resume`` command line that may change the saved run: run-time options,
    and a longer schedule (``--epochs`` / ``--schedule``) whose first epochs are the run's whole
    schedule (the learning-rate schedule is then recomputed over the new total from the next
    epoch on). Any other option that differs from the run's is refused with one line."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key in RESUME_RUNTIME:
            out[key] = value
        elif key in ("epochs", "schedule"):
            continue
        elif key == "augment" and value == "auto":
            continue          # the trainer saved what auto meant for the run's images
        elif key in saved and saved[key] != value:
            opt = "--" + key.replace("_", "-")
            raise ConfigError(f"{opt} cannot change on --resume (the run used {saved[key]!r}); options that may: "
                              f"--epochs/--schedule (to extend the schedule), "
                              + ", ".join("--" + k.replace("_", "-") for k in RESUME_RUNTIME))
    if "epochs" in given or "schedule" in given:
        old = make_config(saved)
        trial = dict(saved, schedule=given.get("schedule"), epochs=given.get("epochs"))
        if trial["schedule"] is None and old.method != "serial":
            raise ConfigError("--resume with --epochs: a layer-parallel run's default schedule depends on its length; "
                              f"give --schedule that starts with the run's {old.resolved_schedule()} instead")
        if trial["schedule"] is None:
            trial["schedule"] = f"serial:{given['epochs']}"
            trial["epochs"] = None
        new = make_config(trial)
        old_epochs = [p for p, n in old.phases() for _ in range(n)]
        new_epochs = [p for p, n in new.phases() for _ in range(n)]
        if len(new_epochs) < len(old_epochs) or new_epochs[:len(old_epochs)] != old_epochs:
            raise ConfigError(f"--resume: the new schedule {new.resolved_schedule()} must start with the run's "
                              f"{old.resolved_schedule()} (a resumed run can only be extended)")
        out["schedule"], out["epochs"] = new.resolved_schedule(), None
    return out


def _apply_demo_defaults(values: dict[str, Any], file_values: dict[str, Any]) -> None:
    """Fill DEMO_DEFAULTS into ``values`` where neither the command line nor the file gave a value."""
    def given(key: str) -> bool:
        return values.get(key) is not None or file_values.get(key) is not None

    if not given("method"):
        values["method"] = DEMO_DEFAULTS["method"]
    if (values.get("method") or file_values.get("method")) == "serial":
        return
    for key in ("stages", "ds"):
        if not given(key):
            values[key] = DEMO_DEFAULTS[key]
    if not given("epochs") and not given("schedule"):   # the demo's 4 epochs, with a parallel phase to show
        values["schedule"] = DEMO_DEFAULTS["schedule"]


def _prepare_run_dir(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import HybridTrainer
    from .launch import (check_local_gpus, launch_local, launch_mode, local_ranks, prefer_eager_module_loading,
                         run_member)
    cfg, run_dir, resume = _train_config(args)
    mode = launch_mode(cfg)
    if mode == "member":
        prefer_eager_module_loading()   # before the GPU check below first initialises CUDA
    check_local_gpus(cfg, local_ranks(cfg, mode), mode)   # refuse before any work
    created = not os.path.exists(run_dir)
    _prepare_run_dir(run_dir)
    fork_copy = None        # the forked checkpoint as copied: a run that fails before writing its own leaves nothing
    if getattr(args, "fork", None):
        from .checkpoint import fork_run
        fork_copy = fork_run(args.fork, run_dir, cfg)
        print(f"layerpar: {run_dir} forked from {args.fork} after epoch {fork_copy[1]}", flush=True)
    try:
        if mode == "spawn":     # K local processes, one per stage
            code = launch_local(cfg, run_dir, resume)
            if code != 0:
                _forget_failed_run(run_dir, created, fork_copy)
            return code
        if mode == "member":    # one rank of a process group started by torchrun
            return run_member(cfg, run_dir, resume)
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            trainer = HybridTrainer(cfg, run_dir, resume=resume)
            summary = trainer.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    except BaseException as e:
        _forget_failed_run(run_dir, created, fork_copy)
        if isinstance(e, KeyboardInterrupt):
            raise _Stopped(run_dir, 143 if isinstance(e, _Terminated) else 130) from None
        raise
    if "stopped_after" in summary:
        print(f"stopped after epoch {summary['stopped_after']} (--stop-after); run directory {run_dir}")
        return 0
    print(f"final test accuracy {100 * summary['final_test_acc']:.2f}% "
          f"(best {100 * summary['best_test_acc']:.2f}%) in {summary['wall_time_s']:.1f}s; "
          f"run directory {run_dir}")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run stops like on Ctrl-C (exit status 143)."""


class _Stopped(Exception):
    def __init__(self, run_dir: str, code: int) -> None:
        super().__init__(run_dir)
        self.run_dir, self.code = run_dir, code


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _forget_failed_run(run_dir: str, created: bool, fork_copy: tuple[float, int] | None = None) -> None:
    """Remove a run directory this invocation created when the run failed or stopped before its
    first checkpoint (nothing in it can be resumed); a fork counts as such while its checkpoint is
    still the copy (``fork_copy``: its modification time and epoch)."""
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    untouched = fork_copy is not None and os.path.isfile(ckpt) and os.path.getmtime(ckpt) == fork_copy[0]
    if created and os.path.isdir(run_dir) and (untouched or not os.path.isfile(ckpt)):
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)


def interrupted_text(run_dir: str) -> str:
    """What is true after a stop: a checkpoint to resume from, or nothing yet."""
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        return f"the last completed epoch is in the checkpoint: continue with --resume {run_dir}"
    return "no epoch had completed, so there is nothing to resume: start the run again"


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_runs
    labels = args.labels.split(",") if args.labels else None
    plot_runs(args.runs, args.output, labels)
    print(f"wrote {os.path.abspath(args.output)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .trainer import evaluate_run
    for run in args.runs:
        r = evaluate_run(run, test_subset=args.test_subset, data_dir=args.data_dir, threads=args.threads)
        print(f"{run}: test accuracy {100 * r['test_acc']:.2f}% (loss {r['test_loss']:.4f}) "
              f"on {r['num_test']} test images")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import info_text
    print(info_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .data import DataError
    from .filters import FilterError
    from .models import ModelError
    from .stages import StagingError
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"layerpar: error: {e} (see layerpar --help)", file=sys.stderr)
        return 2
    handlers = {"train": cmd_train, "plot": cmd_plot, "eval": cmd_eval, "info": cmd_info}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, ModelError, StagingError, FilterError) as e:
        print(f"layerpar: error: {e}", file=sys.stderr)
        return 2
    except _Stopped as e:
        what = "terminated (SIGTERM)" if e.code == 143 else "interrupted"
        print(f"layerpar: {what}; {interrupted_text(e.run_dir)}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("layerpar: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

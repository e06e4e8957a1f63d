"""Starting a distributed run: K local processes through torch.distributed's elastic launcher,
or joining the process group torchrun describes.

``layerpar train --stages K`` (K > 1, ``--transport auto|dist``) calls :func:`launch_local`:
torch's :func:`~torch.distributed.launcher.api.elastic_launch` starts K worker processes
(``python -m layerpar_fast.launch``) on this machine, rendezvous over the c10d store on
127.0.0.1 at a free port, gloo (CPU) or NCCL (one GPU per rank). When one worker fails the agent
stops the others and this process prints the first failure once. Ctrl-C stops every worker; the
checkpoint of the last finished epoch stays resumable.

Under torchrun (RANK/WORLD_SIZE/... set, WORLD_SIZE > 1) :func:`run_member` joins the given
process group instead, so multi-node runs use torchrun's own rendezvous.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import traceback
import uuid
import warnings
from typing import Any, Sequence

from .config import Config, ConfigError, make_config

#: exception types whose message is the whole story (printed as one line, exit status 2)
USER_ERRORS = ("ConfigError", "DataError", "ModelError", "StagingError", "FilterError")
_LAUNCHED = "LAYERPAR_LAUNCHED"   # set for the workers started by launch_local


def launch_mode(cfg: Config) -> str:
    """``"local"`` (one process), ``"spawn"`` (start K local processes) or ``"member"`` (this
    process is one rank of a process group set up by torchrun or by hand)."""
    world = os.environ.get("WORLD_SIZE")
    if world is not None and "RANK" in os.environ:
        try:
            n = int(world)
        except ValueError:
            raise ConfigError(f"WORLD_SIZE={world!r} is not an integer") from None
        if n > 1:
            if cfg.transport == "local":
                raise ConfigError(f"--transport local inside a process group of {n} ranks (WORLD_SIZE={n}) "
                                  "would train {n} copies; use --transport auto or dist under torchrun")
            want = cfg.world_size()
            if n != want and cfg.replicas > 1:
                raise ConfigError(f"WORLD_SIZE={n} but --stages {cfg.stages} x --replicas {cfg.replicas} needs "
                                  f"{want} processes (one per stage and replica); start {want} or change "
                                  "--stages/--replicas")
            if n != want:
                hint = (f" or --stages {cfg.stages} --replicas {n // cfg.stages}"
                        if n % cfg.stages == 0 and n > cfg.stages else "")
                raise ConfigError(f"WORLD_SIZE={n} but --stages {cfg.stages}: start one process per stage "
                                  f"(torchrun --nproc-per-node {cfg.stages} ...) or set --stages {n}{hint}")
            return "member"
    if cfg.transport == "local" or cfg.stages == 1:
        if cfg.transport == "dist" and cfg.stages == 1:
            raise ConfigError("--transport dist needs --stages K with K >= 2 (one process per stage)")
        return "local"
    return "spawn"


def local_ranks(cfg: Config, mode: str) -> int:
    """How many processes of the run share this machine's GPUs: K started here (``spawn``),
    torchrun's LOCAL_WORLD_SIZE (``member``; WORLD_SIZE when unset), or 1 (``local``)."""
    if mode == "spawn":
        return cfg.world_size()
    if mode == "member":
        value = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or "1"
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"LOCAL_WORLD_SIZE={value!r} is not an integer") from None
    return 1


def check_local_gpus(cfg: Config, ranks: int, mode: str = "spawn") -> str:
    """Resolve ``cfg.device`` (``"cpu"`` or ``"cuda"``) and refuse, before any work, a CUDA run
    whose ``ranks`` local processes (one GPU each) outnumber the visible GPUs, or ``--device
    cuda`` where torch sees no GPU: one ConfigError line."""
    import torch

    from .trainer import _pick_device
    device = _pick_device(cfg).type          # ConfigError for --device cuda without a GPU
    if device != "cuda" or ranks <= 1:
        return device
    count = torch.cuda.device_count()
    if ranks > count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
        fix = (f"start at most {count} ranks per machine (torchrun --nproc-per-node {count})" if mode == "member"
               else f"use --stages {count} or more machines" if count >= 2
               else "use --transport local (all stages in one process on one GPU) or more machines")
        raise ConfigError(f"{ranks} local ranks need {ranks} GPUs, but {count} {'is' if count == 1 else 'are'} "
                          f"visible ({seen}); {fix}")
    return device


def prefer_eager_module_loading() -> None:
    """CUDA_MODULE_LOADING=EAGER unless the user chose: with lazy loading a kernel's first
    launch loads its module, which may synchronise the device while NCCL receives are posted
    (layerpar_fast.devsync). Takes effect only before CUDA is first initialised in a process."""
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")


# ------------------------------------------------------------------------------------ parent side
def _quiet_elastic_logs() -> None:
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch_local(cfg: Config, run_dir: str, resume: bool, *, entry: Sequence[str] | None = None) -> int:
    """Run ``cfg`` with ``cfg.stages`` local worker processes; return the exit status.

    ``entry``: the worker program's command line before its ``--config-json/--run-dir/--resume``
    arguments (default ``python -u -m layerpar_fast.launch``)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    k = cfg.world_size()
    check_local_gpus(cfg, k, "spawn")
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=k, run_id=f"layerpar-{uuid.uuid4().hex[:12]}",
                      rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1",
                      rdzv_configs={"timeout": max(60, int(cfg.timeout_s))}, max_restarts=0,
                      monitor_interval=0.1, start_method="spawn", shutdown_timeout=5)
    saved = {v: os.environ.get(v) for v in (_LAUNCHED, "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS",
                                            "CUDA_MODULE_LOADING")}
    os.environ[_LAUNCHED] = "1"
    prefer_eager_module_loading()               # inherited by the workers
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"   # every rank is on this machine
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads or max(1, (os.cpu_count() or 1) // k)))
    _quiet_elastic_logs()
    try:
        program, *prefix = list(entry) if entry else [sys.executable, "-u", "-m", "layerpar_fast.launch"]
        elastic_launch(lc, program)(*prefix, "--config-json", json.dumps(cfg.to_dict()), "--run-dir", run_dir,
                                    *(["--resume"] if resume else []))
        return 0
    except ChildFailedError as e:
        rank, failure = _root_failure(e.failures)
        if failure.exitcode in (130, -2):
            return _interrupted(run_dir)
        msg = failure.message
        text = _failure_text(failure)
        if not _self_recorded(text):
            code = failure.exitcode
            text = (f"killed by signal {_signal_name(-code)}" if code is not None and code < 0
                    else f"exited with status {code}")
        kind = text.split(":", 1)[0]
        if kind in USER_ERRORS:
            print(f"layerpar: error: {text.split(': ', 1)[-1]}", file=sys.stderr)
            return 2
        print(f"layerpar: error: rank {rank} failed: {text}", file=sys.stderr)
        stack = msg.get("extraInfo", {}).get("py_callstack") if isinstance(msg, dict) else None
        if stack and kind not in ("TransportError",):
            print(stack.rstrip(), file=sys.stderr)
        return 1
    except SignalException as e:
        return _interrupted(run_dir, 128 + int(getattr(e, "sigval", signal.SIGINT)))
    except KeyboardInterrupt:
        return _interrupted(run_dir)
    finally:
        for var, val in saved.items():
            if val is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = val


def _failure_text(failure: Any) -> str:
    msg = failure.message
    return msg.get("message", "") if isinstance(msg, dict) else str(msg or "")


def _self_recorded(text: str) -> bool:
    """Whether a failure's text is the error the rank recorded, not torchelastic's stand-in."""
    return bool(text) and not text.startswith("Signal") and not text.startswith("To enable traceback")


def _root_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failure to report: the cause, not its consequences. Preference: an error a rank
    recorded itself; then a rank that died otherwise (exit status, a signal other than SIGTERM);
    then a rank whose messages failed (``TransportError``: a lost peer, a send to a stopped rank,
    a timeout); last, a rank the launcher itself stopped with SIGTERM after the first failure.
    Ties: earliest time stamp (torchelastic's, one-second resolution), then lowest rank."""
    def kind(f: Any) -> int:
        text = _failure_text(f)
        if text.startswith("TransportError"):   # lost peer, send to a stopped rank, timeout
            return 2
        if f.exitcode is not None and f.exitcode == -signal.SIGTERM:
            return 3
        if _self_recorded(text):
            return 0
        return 1
    rank = min(failures, key=lambda r: (kind(failures[r]), failures[r].timestamp, r))
    return rank, failures[rank]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def _interrupted(run_dir: str, code: int = 130) -> int:
    from .cli import interrupted_text
    what = "terminated (SIGTERM)" if code == 128 + signal.SIGTERM else "interrupted"
    print(f"layerpar: {what}; every worker stopped; {interrupted_text(run_dir)}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------ worker side
def _record_failure(e: BaseException) -> None:
    """Write the torchelastic error file (the launcher shows the first failure from it)."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
    try:
        ErrorHandler().record_exception(e)
    except Exception:
        pass


def _die_with_launcher() -> None:
    """Under a launcher, end this worker when the launcher dies, even by SIGKILL (Linux: the
    kernel's parent-death signal), so that no orphaned rank keeps writing into the run directory."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() == 1:  # the launcher died before the request took effect
        os._exit(1)


def run_member(cfg: Config, run_dir: str | None, resume: bool) -> int:
    """Train as one rank of the process group described by the environment; return the exit
    status (0, 1 failure, 2 bad configuration or data, 130 interrupted).

    Only rank 0 prints. On failure the error goes to the torchelastic error file when a launcher
    supervises this process (it prints the first failure), otherwise to stderr, and the process
    exits at once so that its peers, blocked on it, fail within seconds instead of timing out.
    """
    import torch.distributed as dist

    from .dist import DistTrainer, backend_for_this_machine, dist_env, init_process_group
    from .transport import TransportError

    env = dist_env()
    rank = env.rank if env is not None else 0
    code = 0
    try:
        _die_with_launcher()
        prefer_eager_module_loading()          # torchrun members: before CUDA is first used
        init_process_group(cfg.timeout_s, backend_for_this_machine(cfg.device))
        if rank != 0:                      # one display: rank 0 prints, the others stay quiet
            warnings.simplefilter("ignore")
        box = [run_dir]                    # rank 0's choice (default names carry a time stamp)
        dist.broadcast_object_list(box, 0)
        run_dir = box[0]
        if run_dir is None:
            raise ConfigError("a distributed run needs a run directory (--out)")
        trainer = DistTrainer(cfg, run_dir, resume=resume)
        summary = trainer.run()
        trainer.close()
        if rank == 0 and "stopped_after" in summary:
            print(f"stopped after epoch {summary['stopped_after']} (--stop-after) on {cfg.world_size()} ranks; "
                  f"run directory {run_dir}", flush=True)
        elif rank == 0:
            print(f"final test accuracy {100 * summary['final_test_acc']:.2f}% "
                  f"(best {100 * summary['best_test_acc']:.2f}%) in {summary['wall_time_s']:.1f}s "
                  f"on {cfg.world_size()} ranks; run directory {run_dir}", flush=True)
        dist.destroy_process_group()
    except KeyboardInterrupt:
        code = 130
        if rank == 0 and not os.environ.get(_LAUNCHED):
            print(f"layerpar: interrupted; continue with --resume {run_dir}", file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - every failure must end this rank now
        _record_failure(e)
        user = type(e).__name__ in USER_ERRORS
        code = 2 if user else 1
        supervised = "TORCHELASTIC_ERROR_FILE" in os.environ
        if not supervised:
            if user or isinstance(e, TransportError):
                print(f"layerpar: error: rank {rank}: {e}", file=sys.stderr)
            else:
                print(f"layerpar: error: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        os._exit(code)  # do not wait for peers or background threads: they may be blocked on us
    return code


def _worker_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerpar_fast.launch",
                                description="one rank of a distributed layerpar run (started by layerpar train)")
    p.add_argument("--config-json", required=True, help="the run's configuration as JSON")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    values: dict[str, Any] = json.loads(args.config_json)
    return run_member(make_config(values), args.run_dir, args.resume)


if __name__ == "__main__":
    sys.exit(_worker_main())

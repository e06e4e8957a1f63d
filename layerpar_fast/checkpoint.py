"""Checkpoints: one atomic ``checkpoint.pt`` per epoch (model, optimizers, records, phase state),
and inside a parallel phase the auxiliary stores: in the same file when one process holds every
stage, else one file per rank (``aux-rank{k}-epoch{E}.pt``, written atomically before rank 0
writes ``checkpoint.pt``, which names them). Either layout resumes in one process or in many.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from . import __version__
from .config import Config, ConfigError
from .phase_parallel import PhaseState
from .replicas import block_rows, join_replica_states, split_replica_state

CHECKPOINT = "checkpoint.pt"


class Checkpoints:
    """Mixin of :class:`~layerpar_fast.trainer.HybridTrainer`: saving and resuming."""

    def _holds_every_stage(self) -> bool:
        """Whether this process holds every stage's auxiliary stores (a single-process run)."""
        return self.topology.world == 1

    def _aux_path(self, epoch: int, rank: int | None = None) -> str:
        return os.path.join(self.out_dir, f"aux-rank{self.topology.rank if rank is None else rank}-epoch{epoch}.pt")

    def _aux_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint's ``aux`` entry when stopping inside a parallel phase: the stores
        themselves (one process), or the names of the per-rank files."""
        if self.stores is None or self.phase_state is None:
            return None
        if self._holds_every_stage():
            return {"phase": self.phase_state.index,
                    "stores": {name: [None if s is None else s.state_dict() for s in lst]
                               for name, lst in self.stores.items()}}
        world = self.topology.world
        return {"phase": self.phase_state.index, "epoch": self.epoch, "world": world,
                "files": [os.path.basename(self._aux_path(self.epoch, k)) for k in range(world)]}

    def _train_state(self) -> dict[str, Any]:
        """What training changes besides the records: the parameters and buffers of every stage,
        the optimizers (momentum) and the loss scalers (checkpoints; --drift-guard's snapshot)."""
        return {"model": self.model.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "scalers": [sc.state_dict() for sc in [*self.scalers, self.serial_scaler]]}

    def _load_train_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for sc, s in zip([*self.scalers, self.serial_scaler], state.get("scalers") or []):
            if s:       # fp16 loss scales (empty for a disabled scaler)
                sc.load_state_dict(s)

    def save_checkpoint(self) -> None:
        """Atomically write RUN_DIR/checkpoint.pt; with several ranks, each rank first writes its
        auxiliary stores, rank 0 then writes ``checkpoint.pt``, then stale per-rank files go."""
        topo = self.topology
        if topo.world > 1:
            if self.stores is not None and self.phase_state is not None:
                state = {"epoch": self.epoch, "phase": self.phase_state.index, "rank": topo.rank,
                         "world": topo.world,
                         "stage": topo.stage, "replica": topo.replica,
                         "stores": {name: None if lst[topo.stage] is None else lst[topo.stage].state_dict()
                                    for name, lst in self.stores.items()}}
                path = self._aux_path(self.epoch)
                tmp = f"{path}.tmp{os.getpid()}"
                torch.save(state, tmp)
                os.replace(tmp, path)
            topo.barrier()
        if topo.is_main:
            self._write_checkpoint()
        if topo.world > 1:
            topo.barrier()
        keep = os.path.basename(self._aux_path(self.epoch)) if (self.stores is not None and topo.world > 1) else None
        prefix = f"aux-rank{topo.rank}-epoch" if topo.world > 1 else "aux-rank"
        for name in os.listdir(self.out_dir):
            # a distributed checkpoint resumed in one process: its per-rank files are stale now
            if name.startswith(prefix) and name != keep and name.endswith(".pt"):
                try:
                    os.remove(os.path.join(self.out_dir, name))
                except OSError:
                    pass

    def _write_checkpoint(self) -> None:
        state: dict[str, Any] = {
            "version": __version__,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "cuts": self.cuts,
            **self._train_state(),
            "records": self.records,
            "switches": self.switches,
            "rollbacks": self.rollbacks,
            "gated": self.gated,
            "wall_offset": self.wall_offset,
            "phase_state": None if self.phase_state is None else vars(self.phase_state),
            "aux": self._aux_checkpoint(),
        }
        path = os.path.join(self.out_dir, CHECKPOINT)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)

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
        self._load_train_state(state)
        self.epoch = state["epoch"]
        self.records = state["records"]
        self.gated = list(state.get("gated") or [])
        self.switches = list(state.get("switches") or [])
        self.rollbacks = list(state.get("rollbacks") or [])
        replay_plan_edits(self.plan, state, len(self.stages))
        self.wall_offset = state["wall_offset"]
        ps = state.get("phase_state")
        self.phase_state = PhaseState(**ps) if ps else None
        aux = state.get("aux")
        if aux is not None:
            if self._holds_every_stage():
                aux = aux if "stores" in aux else self._read_rank_aux(aux)
            else:
                aux = self._own_aux(aux)
        self._resumed_aux = aux
        self.log(f"resumed {self.out_dir} after epoch {self.epoch}/{self.total_epochs}")


    def _read_rank_aux(self, aux: dict[str, Any]) -> dict[str, Any]:
        """The auxiliary stores of a distributed checkpoint (rank k wrote stage k's stores to
        ``aux-rank{k}-epoch{E}.pt``, named in ``aux["files"]``; with R stage replicas rank r·K + k
        wrote replica r's block of stage k's rows), assembled per stage for this process, which
        runs every stage (and simulates the replicas)."""
        k = len(self.stages)
        reps = self.cfg.replicas
        files = list(aux.get("files") or [])
        if aux.get("world") != k * reps or len(files) != k * reps:
            raise ConfigError(f"--resume {self.out_dir}: the checkpoint's auxiliary stores come from "
                              f"{aux.get('world')} ranks, this run has {k} stages x {reps} replica(s)")
        blocks: dict[str, list[list[Any]]] = {}
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
                blocks.setdefault(store, [[None] * reps for _ in range(k)])[rank % k][rank // k] = st
        stores: dict[str, list[Any]] = {}
        for store, per_stage in blocks.items():
            stores[store] = [None if parts[0] is None else
                             parts[0] if reps == 1 else join_replica_states(parts, self.data.num_train)
                             for parts in per_stage]
        return {"phase": aux["phase"], "stores": stores}


    def _own_aux(self, aux: dict[str, Any]) -> dict[str, Any]:
        """This rank's stores from either layout (several ranks)."""
        topo = self.topology
        k, world, stage = topo.rank, topo.world, topo.stage
        if "stores" in aux:  # written by a single-process run: every stage's stores in one file
            def mine(st: Any) -> Any:
                if st is None or topo.replicas == 1:
                    return st
                return split_replica_state(st, topo.replica, block_rows(self.data.num_train, topo.replicas))
            return {"phase": aux["phase"],
                    "stores": {name: [mine(lst[i]) if i == stage else None for i in range(len(lst))]
                               for name, lst in aux["stores"].items()}}
        if aux.get("world") != world:
            raise ConfigError(f"--resume {self.out_dir}: the checkpoint was written by {aux.get('world')} ranks, "
                              f"this run has {world}")
        path = self._aux_path(aux["epoch"])
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except FileNotFoundError:
            raise ConfigError(f"--resume {self.out_dir}: {os.path.basename(path)} (rank {k}'s auxiliary "
                              "stores) is missing") from None
        if state.get("epoch") != aux["epoch"] or state.get("rank") != k:
            raise ConfigError(f"--resume {self.out_dir}: {os.path.basename(path)} belongs to epoch "
                              f"{state.get('epoch')} rank {state.get('rank')}, expected {aux['epoch']} rank {k}")
        return {"phase": aux["phase"],
                "stores": {name: [st if i == stage else None for i in range(len(self.stages))]
                           for name, st in state["stores"].items()}}


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
    for key in ("method", "stages", "replicas", "ds", "al_order"):
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


def replay_plan_edits(plan: list[tuple[int, str, int, int]], state: dict[str, Any], stages: int) -> None:
    """In place: the changes a run made to its schedule's plan while it ran, from its checkpoint
    ``state``: phase entries postponed (--sharpness-gate) first, since they come before anything
    that ends their phase, then phases ended early (--switch-drift), then epochs undone
    (--drift-guard), in the order they happened."""
    from .trainer import _end_phase_after, _postpone, _serial_from
    for g in state.get("gated") or []:
        _postpone(plan, int(g["epoch"]) - 1, stages)
    for e in state.get("switches") or []:
        _end_phase_after(plan, e)
    for r in state.get("rollbacks") or []:
        _serial_from(plan, int(r["epoch"]) - 1)


def run_plan(cfg: Config, state: dict[str, Any] | None = None) -> list[str]:
    """The phase of every epoch of ``cfg``'s schedule, with the plan edits of checkpoint ``state``."""
    from .trainer import epoch_plan
    plan = epoch_plan(cfg)
    if state:
        replay_plan_edits(plan, state, cfg.stages)
    return [p[1] for p in plan]


def checkpoint_state(run_dir: str) -> dict[str, Any]:
    """The checkpoint of the run in ``run_dir`` (on the CPU), or one clear error."""
    path = os.path.join(run_dir, CHECKPOINT)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"{run_dir}: cannot read {CHECKPOINT}: {e}") from None


def checkpoint_phases(run_dir: str, state: dict[str, Any] | None = None) -> list[str]:
    """The phase of every epoch the run in ``run_dir`` has completed, from its checkpoint."""
    state = checkpoint_state(run_dir) if state is None else state
    return [str(r.get("phase")) for r in state.get("records") or []][: int(state.get("epoch", 0))]


def fork_run(src: str, dst: str, cfg: Config) -> tuple[float, int]:
    """Copy the checkpoint of the run in ``src`` (and its per-rank auxiliary files) into ``dst`` as
    the checkpoint of a run configured by ``cfg`` (``--fork``: the CLI has checked that the change
    leaves the epochs already run as they were). Returns the copy's modification time and epoch."""
    import shutil
    state = torch.load(os.path.join(src, CHECKPOINT), map_location="cpu", weights_only=False)
    aux = state.get("aux")
    for name in (aux or {}).get("files") or []:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    state["config"] = cfg.to_dict()
    path = os.path.join(dst, CHECKPOINT)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return os.path.getmtime(path), int(state.get("epoch", 0))

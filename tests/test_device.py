"""--device {auto,cpu,cuda}: validation, resolution, the one-GPU-per-local-rank check and the
environment of launched workers. GPUs are simulated by monkeypatching torch.cuda."""
from __future__ import annotations

import os

import pytest
import torch

from layerpar_fast import launch
from layerpar_fast.cli import main
from layerpar_fast.config import ConfigError, make_config
from layerpar_fast.trainer import _pick_device


def _gpus(monkeypatch: pytest.MonkeyPatch, n: int, visible: str | None = None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_device_option_is_validated():
    assert make_config().device == "auto"
    for ok in ("auto", "cpu", "cuda"):
        assert make_config(device=ok).device == ok
    with pytest.raises(ConfigError, match=r"^--device 'gpu' is not one of auto, cpu, cuda$"):
        make_config(device="gpu")


def test_pick_device(monkeypatch):
    _gpus(monkeypatch, 0)
    assert _pick_device(make_config()) == torch.device("cpu")
    assert _pick_device(make_config(device="cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^--device cuda, but torch sees no CUDA device .*use --device cpu or auto$"):
        _pick_device(make_config(device="cuda"))
    _gpus(monkeypatch, 2)
    assert _pick_device(make_config()) == torch.device("cuda")
    assert _pick_device(make_config(device="cuda")) == torch.device("cuda")
    assert _pick_device(make_config(device="cpu")) == torch.device("cpu")


def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    cfg = make_config(method="al", stages=4, ds=2, epochs=4)
    _gpus(monkeypatch, 2, visible="0,1")
    with pytest.raises(ConfigError) as e:
        launch.check_local_gpus(cfg, 4, "spawn")
    msg = str(e.value)
    assert msg == ("4 local ranks need 4 GPUs, but 2 are visible (CUDA_VISIBLE_DEVICES=0,1); "
                   "use --stages 2 or more machines")
    with pytest.raises(ConfigError, match=r"^3 local ranks need 3 GPUs, but 2 are visible .*--nproc-per-node 2\)$"):
        launch.check_local_gpus(cfg, 3, "member")
    _gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"but 1 is visible \(CUDA_VISIBLE_DEVICES unset\); use --transport local"):
        launch.check_local_gpus(cfg, 2, "spawn")


def test_enough_gpus_or_cpu_passes(monkeypatch):
    cfg = make_config(method="al", stages=4, ds=2, epochs=4)
    _gpus(monkeypatch, 4)
    assert launch.check_local_gpus(cfg, 4) == "cuda"
    _gpus(monkeypatch, 2)
    assert launch.check_local_gpus(make_config(method="al", stages=4, ds=2, epochs=4, device="cpu"), 4) == "cpu"
    assert launch.check_local_gpus(cfg, 1, "local") == "cuda"       # all stages in one process
    _gpus(monkeypatch, 0)
    assert launch.check_local_gpus(cfg, 4) == "cpu"                  # auto without GPUs: CPU ranks


def test_local_ranks(monkeypatch):
    cfg = make_config(method="al", stages=3, ds=2, epochs=4)
    assert launch.local_ranks(cfg, "spawn") == 3
    assert launch.local_ranks(cfg, "local") == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launch.local_ranks(cfg, "member") == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert launch.local_ranks(cfg, "member") == 8


def test_cli_refuses_before_any_work(monkeypatch, tmp_path, capsys):
    _gpus(monkeypatch, 2, visible="0,1")
    out = tmp_path / "run"
    assert main(["train", "--stages", "4", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["layerpar: error: 4 local ranks need 4 GPUs, but 2 are visible (CUDA_VISIBLE_DEVICES=0,1); "
                   "use --stages 2 or more machines"]
    assert not out.exists()
    _gpus(monkeypatch, 0)
    assert main(["train", "--device", "cuda", "--method", "serial", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layerpar: error: --device cuda, but torch sees no CUDA device")
    assert not out.exists()
    assert main(["train", "--device", "tpu", "--out", str(out)]) == 2
    assert "argument --device: invalid choice: 'tpu'" in capsys.readouterr().err


def _fake_launcher(monkeypatch):
    import torch.distributed.launcher.api as api
    seen: dict = {}

    def elastic_launch(lc, program):
        def run(*args):
            seen["env"] = dict(os.environ)
            seen["nproc"] = lc.nproc_per_node
        return run

    monkeypatch.setattr(api, "elastic_launch", elastic_launch)
    return seen


@pytest.mark.parametrize("user", [None, "LAZY"])
def test_launched_workers_load_cuda_modules_eagerly(monkeypatch, tmp_path, user):
    seen = _fake_launcher(monkeypatch)
    if user is None:
        monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    else:
        monkeypatch.setenv("CUDA_MODULE_LOADING", user)
    cfg = make_config(method="al", stages=2, ds=2, epochs=4, device="cpu")
    assert launch.launch_local(cfg, str(tmp_path), False) == 0
    assert seen["nproc"] == 2
    assert seen["env"]["CUDA_MODULE_LOADING"] == (user or "EAGER")   # the user's choice wins
    assert os.environ.get("CUDA_MODULE_LOADING") == user               # this process is left as it was


def test_launch_local_refuses_before_starting_workers(monkeypatch, tmp_path):
    seen = _fake_launcher(monkeypatch)
    _gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match="2 local ranks need 2 GPUs, but 1 is visible"):
        launch.launch_local(make_config(method="al", stages=2, ds=2, epochs=4), str(tmp_path), False)
    assert seen == {}


def test_device_cpu_keeps_gloo_on_a_gpu_machine(monkeypatch):
    from layerpar_fast import dist as D
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(D.dist, "is_nccl_available", lambda: True)
    assert D.backend_for_this_machine("cpu") == "gloo"
    assert D.backend_for_this_machine("auto") == "nccl" and D.backend_for_this_machine("cuda") == "nccl"

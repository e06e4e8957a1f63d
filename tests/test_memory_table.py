"""bench/memory_table.py: the store formula against what a real run records (aux_memory_bytes)."""
import json
import os
import sys

import numpy as np
import pytest

from layerpar_fast.cli import main as layerpar_main

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import memory_table  # noqa: E402


def _fake_cifar(root, n):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "cifar10.npz", x_train=x, y_train=np.arange(n) % 10, x_test=x[:16], y_test=np.arange(16) % 10)


@pytest.mark.parametrize("k, ds, dtype, method, aux_device", [(2, 2, "fp32", "al", "host"),
                                                              (3, 4, "bf16", "penalty", "device")])
def test_formula_matches_a_real_run(tmp_path, capsys, k, ds, dtype, method, aux_device):
    n = 32
    _fake_cifar(tmp_path, 40)
    out = tmp_path / "run"
    rc = layerpar_main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--model", "resnet20",
                        "--subset", str(n), "--test-subset", "16", "--stages", str(k), "--ds", str(ds),
                        "--aux-dtype", dtype, "--method", method, "--transport", "local", "--schedule", "parallel:1",
                        "--batch-size", "16", "--eval-batch-size", "16", "--kappa-iters", "1",
                        "--bn-recalib-batches", "1", "--aux-device", aux_device, "--threads", "1",
                        "--no-progress", "--out", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    par = [r for r in recs if r.get("phase") == "parallel"]
    assert par and par[0]["aux_device"] == aux_device
    _, shapes, _ = memory_table.cuts_and_shapes("resnet20", k)
    full = memory_table.store_bytes_per_rank(shapes, ds, dtype, memory_table.CIFAR_N, method)
    assert par[0]["aux_memory_bytes"] * memory_table.CIFAR_N == sum(full) * n          # exactly N/50,000 of it
    assert par[0]["aux_memory_bytes"] == sum(memory_table.store_bytes_per_rank(shapes, ds, dtype, n, method))
    logged = capsys.readouterr()
    assert "auxiliary stores of all" in logged.out + logged.err


def test_table_rows_and_markdown(tmp_path):
    res = memory_table.build(["resnet20"], probe_batch=2)
    assert {(r["K"], r["s"], r["dtype"]) for r in res["stores"]} == {(k, s, d) for k in (2, 4) for s in (1, 2, 4)
                                                                    for d in ("fp32", "bf16")}
    r = next(r for r in res["stores"] if (r["K"], r["s"], r["dtype"]) == (2, 1, "fp32"))
    c, h, w = r["cut_shapes"][0]
    assert r["al_per_rank"] == [50_000 * 4 * c * h * w * 2, 50_000 * 4 * c * h * w]
    a = res["activations"][0]
    assert a["ddp_per_device"] > 0 and a["gpipe_max"] == max(a["gpipe_per_stage"])
    text = memory_table.markdown(res)
    assert "| ResNet-20 | 4 |" in text and "DDP per device" in text

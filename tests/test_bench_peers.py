"""bench/bench_peers.py: the peers' runners train, the byte counters match the shapes, the table
writer, bad input, and the link emulation (tiny, or skipped with the reason)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import peers_lib as P  # noqa: E402

SCRIPT = os.path.join(BENCH, "bench_peers.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


@pytest.mark.parametrize("kind", ["ddp", "ddp-gbn", "gpipe:2", "1f1b:4"])
def test_runner_trains_and_counts_bytes(kind: str) -> None:
    """2 gloo ranks on 127.0.0.1, a tiny conv net, 6 steps: the loss falls and the counted bytes
    are what the shapes say."""
    os.environ["OMP_NUM_THREADS"] = "1"
    res = P.tiny_train(kind, steps=6, timeout_s=120)
    assert set(res) == {0, 1}
    last = res[1]["losses"]
    assert len(last) == 6 and last[-1] < last[0], last
    for r in res.values():
        if kind.startswith("ddp"):
            assert r["bn_payload"] == r["expected_bn_payload"]    # ddp-gbn: the BatchNorm statistics
            assert r["payload"] == r["expected_payload"]          # every gradient, once per step
            assert r["bytes_sent"] == pytest.approx(r["payload"])  # ring, K = 2: 2(K-1)/K = 1
        else:
            assert r["bytes_sent"] == r["expected_sent"]          # activations (rank 0) / gradients (rank 1)
            assert r["messages"] == 6 * int(kind.split(":")[1])   # one per micro-batch
            # BatchNorm saw the 6 x m real micro-batches and nothing else: torch's own shape
            # inference (a training-mode forward on torch.empty) once made its statistics NaN
            assert r["bn_batches"] == [6 * int(kind.split(":")[1])] and r["buffers_finite"], r["bn_batches"]


def test_formula_bytes() -> None:
    f = P.formula_bytes("ddp", params=1000, cut_shape=(16, 32, 32), batch=128, k=2)
    assert f["per_rank"] == 1000 and f["total"] == 2000
    f4 = P.formula_bytes("ddp", params=1000, cut_shape=(16, 32, 32), batch=128, k=4)
    assert f4["per_rank"] == 1500
    g = P.formula_bytes("gpipe", params=0, cut_shape=(16, 32, 32), batch=128, m=4)
    assert g["total"] == 2 * 128 * 16 * 32 * 32 * 4 and g["message"] == 32 * 16 * 32 * 32 * 4
    s = P.formula_bytes("sph", params=0, cut_shape=(16, 32, 32), batch=128, s=2)
    assert s["total"] == 2 * 128 * 16 * 16 * 16 * 4
    assert P.formula_bytes("serial2", params=5, cut_shape=(1, 1, 1), batch=1)["total"] == 0


def test_bytes_command_from_shapes() -> None:
    r = _cli("bytes", "--models", "resnet20", "--ms", "2", "--ss", "2")
    assert r.returncode == 0, r.stderr
    assert "| resnet20 |" in r.stdout and "sph" in r.stdout and "ddp" in r.stdout


def test_rows_and_table_writer(tmp_path) -> None:
    import bench_peers as B
    rnd = {"order": ["serial1", "ddp", "gpipe:m2", "gpipe:m4", "sph:s2"],
           "serial1": {"epoch_s": 4.0, "steps": 2, "images": 256, "bytes": 0.0},
           "ddp": {"epoch_s": 3.0, "steps": 2, "images": 256, "bytes": 2 * 2 * 1000.0},
           "gpipe:m2": {"epoch_s": 2.5, "steps": 2, "images": 256, "bytes": 2 * 2 * 128 * 8 * 4 * 4 * 4.0},
           "gpipe:m4": {"epoch_s": 2.0, "steps": 2, "images": 256, "bytes": 2 * 2 * 128 * 8 * 4 * 4 * 4.0},
           "sph:s2": {"epoch_s": 1.0, "steps": 2, "images": 256, "bytes": 2 * 2 * 128 * 8 * 2 * 2 * 4.0,
                      "enter_s": 0.5, "after_s": 0.1, "exposed_s": 0.05}}
    raw = {"rounds": [rnd], "num_train": 256, "steps_per_epoch": 2, "cut_shapes": [[8, 4, 4]], "cuts": [3],
           "param_bytes": 1000}
    rows = B.rows_from_rounds(raw, model="tiny", link="unlimited", methods=["serial1", "ddp", "gpipe", "sph", "sph-run"],
                              ms=[2, 4], ss=[2], batch=128, run_schedule="serial:1,parallel:1", run_s=2)
    by = {r["variant"]: r for r in rows}
    assert by["sph:s2"]["vs_serial1"] == pytest.approx(4.0) and by["sph:s2"]["vs_best_peer"] == pytest.approx(2.0)
    assert by["gpipe:m4"]["best"] and not by["gpipe:m2"]["best"]
    for r in rows:
        if r["method"] != "serial1":
            assert r["bytes_check"] == pytest.approx(1.0), r
    assert by["sph-run"]["epoch_s"] == pytest.approx((3.0 + 0.5 + 1.0 + 0.1) / 2)
    for key in ("model", "method", "link", "m", "s", "epoch_s", "images_per_s", "bytes_per_step"):
        assert all(key in r for r in rows)
    md = P.markdown_table(rows, {"batch_size": 128, "subset": 256, "repeats": 1, "dataset": "cifar10"})
    assert "micro-batch" in md and "| unlimited | gpipe | m=4 |" in md and "m=2: 2.50" in md
    png = tmp_path / "p.png"
    P.write_png(rows, str(png))
    assert png.stat().st_size > 0


@pytest.mark.parametrize("args, needle", [
    (["epoch", "--methods", "serial1,bogus"], "unknown method 'bogus'"),
    (["epoch", "--models", "resnet999"], "unknown model 'resnet999'"),
    (["epoch", "--links", "unlimited,fast"], "unknown link 'fast'"),
    (["epoch", "--ms", "3"], "micro-batches"),
    (["bytes", "--models", "nope"], "unknown model 'nope'"),
])
def test_bad_input_one_line_exit_2(args: list[str], needle: str) -> None:
    r = _cli(*args, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench_peers: error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_link_spec_parsing() -> None:
    assert P.parse_link("unlimited").unlimited
    lk = P.parse_link("200mbit")
    assert lk.bits_per_s == 200e6 and "tbf" in P.qdisc_command(lk)
    assert "netem" in P.qdisc_command(P.parse_link("50mbit@1ms"))
    assert P.parse_link("10mbps").bits_per_s == 80e6
    with pytest.raises(P.UsageError):
        P.parse_link("50mbit@soon")


def _link_or_skip(spec: str) -> P.Link:
    link = P.parse_link(spec)
    try:
        P.probe_link(link, timeout_s=30)
    except P.LinkSkip as e:
        pytest.skip(f"link emulation not available here: {e}")
    return link


def test_link_emulation_shapes_loopback() -> None:
    """In a private namespace with tbf at 8 mbit, 1 MB over 127.0.0.1 takes about a second."""
    link = _link_or_skip("8mbit")
    code = (
        "import sys, time, socket, threading; sys.path.insert(0, %r); import peers_lib as P\n"
        "P.setup_namespace_link(P.parse_link('8mbit'))\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)\n"
        "def sink():\n c, _ = srv.accept()\n n = 0\n while True:\n  b = c.recv(65536)\n  if not b: break\n  n += len(b)\n"
        "th = threading.Thread(target=sink); th.start()\n"
        "s = socket.create_connection(srv.getsockname()); t = time.time(); s.sendall(b'x' * 1000000); s.close()\n"
        "th.join(); print(time.time() - t)\n") % BENCH
    r = subprocess.run(P.unshare_prefix() + [sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 0.6 < float(r.stdout.strip()) < 5.0, (link, r.stdout)


def test_refused_rate_is_error_exit_2() -> None:
    _link_or_skip("8mbit")
    r = _cli("epoch", "--links", "unlimited,0bit", timeout=60)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench_peers: error: link 0bit"), r.stderr


def test_epoch_harness_tiny(tmp_path) -> None:
    """The whole `epoch` command on a tiny model and data (one round, every kind of method)."""
    data = os.environ.get("LAYERPAR_DATA_DIR", os.path.join(ROOT, "..", "shared", "data"))
    if not os.path.exists(os.path.join(data, "mnist.npz")):
        pytest.skip(f"no MNIST at {data}")
    out = tmp_path / "r.json"
    r = _cli("epoch", "--dataset", "mnist", "--data-dir", data, "--subset", "64", "--batch-size", "32",
             "--any-model", "--models", "mnist_resnet", "--methods", "serial1,ddp,gpipe,sph", "--ms", "2",
             "--ss", "1", "--repeats", "1", "--kappa-iters", "1", "--timeout-s", "150", "--out", str(out),
             timeout=200)
    if r.returncode != 0:
        pytest.fail(r.stderr[-3000:])
    rows = json.loads(out.read_text())
    assert {x["method"] for x in rows} == {"serial1", "ddp", "gpipe", "sph"}
    for x in rows:
        assert x["epoch_s"] > 0 and x["images_per_s"] > 0
        if x["method"] != "serial1":
            assert x["bytes_check"] == pytest.approx(1.0, rel=1e-6), x


def _row(variant: str, link: str, epoch_s: float) -> dict:
    return {"model": "resnet20", "variant": variant, "link": link, "epoch_s": epoch_s}


def test_compose_curves_scales_each_epoch_by_its_method() -> None:
    """A composed slow-link curve keeps every accuracy and multiplies each epoch's duration by the
    epoch table's slow/unlimited ratio of the method that ran it (SPH: by phase)."""
    from bench_peers import compose_curves
    rows = [_row("serial1", "unlimited", 10), _row("serial1", "50mbit", 10),
            _row("ddp", "unlimited", 5), _row("ddp", "50mbit", 10),
            _row("1f1b:m4", "unlimited", 6), _row("1f1b:m4", "50mbit", 18),
            _row("sph:s2", "unlimited", 5), _row("sph:s2", "50mbit", 6)]
    curves = {"serial1": [{"epoch": 1, "wall_s": 10.0, "test_acc": 0.3}, {"epoch": 2, "wall_s": 20.0, "test_acc": 0.4}],
              "ddp": [{"epoch": 1, "wall_s": 5.0, "test_acc": 0.3}, {"epoch": 2, "wall_s": 11.0, "test_acc": 0.41}],
              "1f1b:m4": [{"epoch": 1, "wall_s": 6.0, "test_acc": 0.2}],
              "sph": [{"epoch": 1, "wall_s": 5.0, "test_acc": 0.3, "phase": "serial"},
                      {"epoch": 2, "wall_s": 10.0, "test_acc": 0.35, "phase": "parallel"},
                      {"epoch": 3, "wall_s": 16.0, "test_acc": 0.5, "phase": "serial"}]}
    out = compose_curves(curves, rows, "50mbit", model="resnet20", pipeline="1f1b:4", s=2)
    assert [p["wall_s"] for p in out["serial1"]] == [10.0, 20.0]
    assert [p["wall_s"] for p in out["ddp"]] == [10.0, 22.0]
    assert [p["wall_s"] for p in out["1f1b:m4"]] == [18.0]
    assert out["sph"][0]["wall_s"] == pytest.approx(10.0)           # serial epoch x ddp's 2.0
    assert out["sph"][1]["wall_s"] == pytest.approx(10.0 + 5 * 1.2)  # parallel epoch x sph's 1.2
    assert out["sph"][2]["wall_s"] == pytest.approx(16.0 + 6 * 2.0)
    assert [p["test_acc"] for p in out["sph"]] == [0.3, 0.35, 0.5]
    with pytest.raises(P.UsageError, match="no resnet20 / sph:s4 row"):
        compose_curves(curves, rows, "50mbit", model="resnet20", pipeline="1f1b:4", s=4)


def test_tta_compose_needs_the_rows_before_training(tmp_path) -> None:
    """--compose-link without --epoch-json, or with a table that lacks a needed row: one line, exit 2,
    before any training starts."""
    r = _cli("tta", "--compose-link", "50mbit", timeout=60)
    assert r.returncode == 2 and "needs --epoch-json" in r.stderr, r.stderr
    table = tmp_path / "t.json"
    table.write_text(json.dumps([_row("serial1", "unlimited", 10)]))
    r = _cli("tta", "--compose-link", "50mbit", "--epoch-json", str(table), timeout=60)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no resnet20 / serial1 row on link '50mbit'" in lines[0], r.stderr


def test_tta_tiny(tmp_path) -> None:
    """The whole `tta` command on a tiny model: four curves from the same start, one point per
    epoch, SPH's points carry their phase, and the table and plot are written."""
    data = os.environ.get("LAYERPAR_DATA_DIR", os.path.join(ROOT, "..", "shared", "data"))
    if not os.path.exists(os.path.join(data, "mnist.npz")):
        pytest.skip(f"no MNIST at {data}")
    out, md, png = tmp_path / "t.json", tmp_path / "t.md", tmp_path / "t.png"
    r = _cli("tta", "--dataset", "mnist", "--data-dir", data, "--subset", "64", "--batch-size", "32",
             "--model", "mnist_resnet", "--epochs", "2", "--sph-schedule", "serial:1,parallel:1",
             "--pipeline", "gpipe:2", "--kappa-iters", "1", "--test-subset", "100", "--bn-recalib-batches", "1",
             "--timeout-s", "150", "--out", str(out), "--md", str(md), "--png", str(png), timeout=200)
    if r.returncode != 0:
        pytest.fail(r.stderr[-3000:])
    obj = json.loads(out.read_text())
    curves = obj["curves"]["unlimited"]
    assert set(curves) == {"serial1", "ddp", "gpipe:m2", "sph"}
    for pts in curves.values():
        assert [p["epoch"] for p in pts] == [1, 2]
        assert 0 < pts[0]["wall_s"] < pts[1]["wall_s"] and all(0 <= p["test_acc"] <= 1 for p in pts)
    assert [p["phase"] for p in curves["sph"]] == ["serial", "parallel"]
    assert "## link unlimited" in md.read_text() and png.stat().st_size > 0


def test_sph_timing_config_keeps_the_phase_open() -> None:
    """The timed parallel epoch must open whatever the fresh network's sharpness: with the
    library's default gate a ResNet-56 launch stayed serial and the harness crashed."""
    import importlib
    bp = importlib.import_module("bench_peers")
    job = {"dataset": "embedded", "data_dir": None, "subset": 64, "model": "mnist_resnet", "batch_size": 32,
           "timeout_s": 60.0, "balance": "flops"}
    assert bp._config(job).sharpness_gate == 0.0
    assert bp._config({**job, "config": {"sharpness_gate": 0.5}}).sharpness_gate == 0.5

"""Tests of layerpar_fast.data: every on-disk layout, validation errors, loader and augmentation."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from layerpar_fast import data as D
from layerpar_fast.data import BatchLoader, DataError, augment_batch, load_dataset, normalize

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
EMBEDDED = Path(D.__file__).resolve().parent / "_data" / "mnist_small.npz"


# ------------------------------------------------------------------------------- file writers
def write_idx(path: Path, arr: np.ndarray, magic: int | None = None, cut: int = 0) -> None:
    """An idx unsigned-byte file (optionally .gz, a wrong magic, or ``cut`` bytes missing)."""
    magic = 0x0800 + arr.ndim if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    raw = raw[:len(raw) - cut]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def mnist_arrays(rng: np.random.Generator, n_train: int = 7, n_test: int = 4):
    x_tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    return x_tr, rng.integers(0, 10, n_train), x_te, rng.integers(0, 10, n_test)


def write_mnist_idx(folder: Path, arrays, gz: bool = False) -> None:
    sfx = ".gz" if gz else ""
    x_tr, y_tr, x_te, y_te = arrays
    write_idx(folder / f"train-images-idx3-ubyte{sfx}", x_tr)
    write_idx(folder / f"train-labels-idx1-ubyte{sfx}", y_tr)
    write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", x_te)
    write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", y_te)


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(folder: Path, rng: np.random.Generator, per_batch: int = 3, n_test: int = 4):
    rows, labels = [], []
    for i in range(1, 6):
        r = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, per_batch).tolist()
        dump(folder / f"data_batch_{i}", {b"batch_label": b"x", b"labels": lab, b"data": r,
                                          b"filenames": [b"f.png"] * per_batch})
        rows.append(r)
        labels += lab
    r_te = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    l_te = rng.integers(0, 10, n_test).tolist()
    dump(folder / "test_batch", {b"labels": l_te, b"data": r_te})
    names = [f"class{i}".encode() for i in range(10)]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    return np.concatenate(rows), np.array(labels), r_te, np.array(l_te)


def write_cifar100(folder: Path, rng: np.random.Generator, n_train: int = 6, n_test: int = 3):
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        r = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        coarse = rng.integers(0, 20, n).tolist()
        dump(folder / split, {b"filenames": [b"a.png"] * n, b"batch_label": b"b", b"fine_labels": fine,
                              b"coarse_labels": coarse, b"data": r})
        out[split] = (r, np.array(fine), np.array(coarse))
    dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                           b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return out


def jpeg_bytes(img: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pil_decode(b: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def write_jpeg_npz(path: Path, rng: np.random.Generator, n_train: int = 5, n_test: int = 3):
    arrays, expect = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        files = [jpeg_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        arrays[f"x_{split}_jpeg"] = np.frombuffer(b"".join(files), np.uint8)
        arrays[f"x_{split}_offsets"] = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
        arrays[f"y_{split}"] = rng.integers(0, 10, n).astype(np.uint8)
        expect[split] = np.stack([pil_decode(f) for f in files])
    arrays["classes"] = np.array([f"k{i}" for i in range(10)])
    np.savez_compressed(path, **arrays)
    return arrays, expect


# ------------------------------------------------------------------------------------- MNIST
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sub", ["", "MNIST/raw"])
def test_mnist_idx_layouts(tmp_path, gz, sub):
    arrays = mnist_arrays(np.random.default_rng(1))
    write_mnist_idx(tmp_path / sub, arrays, gz=gz)
    ds = load_dataset("mnist", str(tmp_path))
    x_tr, y_tr, x_te, y_te = arrays
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (7, 1, 28, 28)
    assert ds.x_train.is_contiguous() and ds.y_train.dtype == torch.int64
    assert np.array_equal(ds.x_train[:, 0].numpy(), x_tr) and np.array_equal(ds.x_test[:, 0].numpy(), x_te)
    assert ds.y_train.tolist() == y_tr.tolist() and ds.y_test.tolist() == y_te.tolist()
    assert (ds.in_channels, ds.image_size, ds.image_hw, ds.num_train, ds.num_test) == (1, 28, (28, 28), 7, 4)


def test_mnist_npz_in_data_dir_and_env(tmp_path, monkeypatch):
    x_tr, y_tr, x_te, y_te = mnist_arrays(np.random.default_rng(2))
    np.savez(tmp_path / "mnist.npz", x_train=x_tr[..., None], y_train=y_tr.astype(np.uint8),
             x_test=x_te[..., None], y_test=y_te.astype(np.uint8))
    monkeypatch.setenv("LAYERPAR_DATA_DIR", str(tmp_path))
    ds = load_dataset("mnist")
    assert np.array_equal(ds.x_train[:, 0].numpy(), x_tr) and ds.y_test.tolist() == y_te.tolist()
    assert ds.source == str(tmp_path / "mnist.npz")


def test_real_mnist():
    if not SHARED_MNIST.is_file():
        pytest.skip(f"{SHARED_MNIST} not present")
    ds = load_dataset("mnist", str(SHARED_MNIST.parent))
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert ds.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert ds.mean[0] == pytest.approx(0.1307, abs=1e-4) and ds.std[0] == pytest.approx(0.3081, abs=1e-4)


def test_embedded():
    assert EMBEDDED.stat().st_size < 5_000_000
    ds = load_dataset("embedded")
    assert ds.name == "embedded-mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (10000, 1, 28, 28) and ds.x_test.shape == (2000, 1, 28, 28)
    assert ds.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert set(ds.y_train.tolist()) == set(range(10))
    if SHARED_MNIST.is_file():
        with np.load(SHARED_MNIST) as d:
            assert np.array_equal(ds.x_test[:, 0].numpy(), d["x_test"][:2000, ..., 0])
            assert np.array_equal(ds.y_train.numpy(), d["y_train"][:10000])


# ------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("sub", ["cifar-10-batches-py", ""])
def test_cifar10_pickles(tmp_path, sub):
    rows, labels, r_te, l_te = write_cifar10(tmp_path / sub, np.random.default_rng(3))
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    # channel-major rows: the first 1024 bytes are the red plane, row by row
    assert np.array_equal(ds.x_train[4, 0].numpy(), rows[4, :1024].reshape(32, 32))
    assert np.array_equal(ds.x_train[4, 2, 3, 5].item(), rows[4, 2048 + 3 * 32 + 5])
    assert np.array_equal(ds.x_train.numpy().reshape(15, -1), rows)
    assert np.array_equal(ds.x_test.numpy().reshape(4, -1), r_te)
    assert ds.y_train.tolist() == labels.tolist() and ds.y_test.tolist() == l_te.tolist()
    assert ds.classes == [f"class{i}" for i in range(10)] and ds.num_classes == 10
    assert ds.coarse_y_train is None


@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_pickles(tmp_path, labels):
    exp = write_cifar100(tmp_path / "cifar-100-python", np.random.default_rng(4))
    ds = load_dataset("cifar100", str(tmp_path), cifar100_labels=labels)
    r, fine, coarse = exp["train"]
    assert np.array_equal(ds.x_train.numpy().reshape(6, -1), r)
    assert ds.x_train[1, 1, 0, 0].item() == r[1, 1024]
    assert ds.coarse_y_train.tolist() == coarse.tolist()
    assert ds.coarse_y_test.tolist() == exp["test"][2].tolist()
    if labels == "fine":
        assert ds.num_classes == 100 and ds.name == "cifar100"
        assert ds.y_train.tolist() == fine.tolist() and ds.classes[:2] == ["f0", "f1"]
    else:
        assert ds.num_classes == 20 and ds.name == "cifar100-coarse"
        assert ds.y_train.tolist() == coarse.tolist() and ds.classes[:2] == ["c0", "c1"]


def test_cifar10_npz(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=np.arange(6), x_test=x[:2], y_test=np.arange(2))
    ds = load_dataset("cifar10", str(tmp_path))
    assert np.array_equal(ds.x_train.permute(0, 2, 3, 1).numpy(), x)  # HWC -> CHW
    assert ds.num_classes == 10 and ds.classes is None


def test_cifar10_jpeg_decode_and_cache(tmp_path, capsys):
    arrays, expect = write_jpeg_npz(tmp_path / "cifar10_jpeg.npz", np.random.default_rng(6))
    ds = load_dataset("cifar10", str(tmp_path))
    assert "decoding" in capsys.readouterr().out
    assert np.array_equal(ds.x_train.permute(0, 2, 3, 1).numpy(), expect["train"])
    assert np.array_equal(ds.x_test.permute(0, 2, 3, 1).numpy(), expect["test"])
    assert ds.y_train.tolist() == arrays["y_train"].tolist() and ds.classes == [f"k{i}" for i in range(10)]
    assert (tmp_path / "cifar10.npz").is_file() and (tmp_path / "cifar10.npz.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    again = load_dataset("cifar10", str(tmp_path))
    assert "decoding" not in capsys.readouterr().out
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_cifar10_jpeg_cache_falls_back_to_home(tmp_path, monkeypatch, capsys):
    src, home = tmp_path / "ro", tmp_path / "home"
    src.mkdir()
    home.mkdir()
    write_jpeg_npz(src / "cifar10_jpeg.npz", np.random.default_rng(7))
    monkeypatch.setenv("HOME", str(home))
    os.chmod(src, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        ds = load_dataset("cifar10", str(src))
        assert "decoding" in capsys.readouterr().out
        cache = home / ".cache" / "layerpar_fast" / "cifar10.npz"
        assert cache.is_file() and not (src / "cifar10.npz").exists()
        again = load_dataset("cifar10", str(src))
        assert "decoding" not in capsys.readouterr().out
        assert torch.equal(again.x_train, ds.x_train)
    finally:
        os.chmod(src, 0o755)


# --------------------------------------------------------------------------------------- npz
def test_npz_path_variants(tmp_path):
    rng = np.random.default_rng(8)
    x3 = rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x_train=x3, y_train=np.array([0, 1, 2, 3, 3]), x_test=x3[:2],
             y_test=np.array([1, 0]))
    ds = load_dataset(str(tmp_path / "rgb.npz"))
    assert ds.name == "rgb" and ds.num_classes == 4 and ds.image_hw == (8, 6)
    assert np.array_equal(ds.x_train[2, 1].numpy(), x3[2, :, :, 1])
    gray = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", x_train=gray, y_train=np.zeros(4, np.int32), x_test=gray[:1],
             y_test=np.zeros(1, np.int32), classes=np.array(["a", "b", "c"]))
    ds = load_dataset(str(tmp_path / "gray.npz"))
    assert ds.x_train.shape == (4, 1, 5, 5) and np.array_equal(ds.x_train[:, 0].numpy(), gray)
    assert ds.num_classes == 3 and ds.classes == ["a", "b", "c"]  # from classes; max label + 1 >= 2 otherwise


def test_subset_and_stats(tmp_path):
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    x[:, :, :, 2] = 7  # a constant channel
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(10) % 3, x_test=x, y_test=np.arange(10) % 3)
    ds = load_dataset(str(tmp_path / "d.npz"), subset=6, test_subset=2)
    assert ds.num_train == 6 and ds.num_test == 2 and ds.x_train.is_contiguous()
    assert np.array_equal(ds.x_train.permute(0, 2, 3, 1).numpy(), x[:6])
    ref = x[:6].astype(np.float64) / 255
    assert np.allclose(ds.mean, ref.mean(axis=(0, 1, 2)), atol=1e-12)
    assert np.allclose(ds.std[:2], ref.std(axis=(0, 1, 2))[:2], atol=1e-12) and ds.std[2] == 1.0
    for bad in (0, 11):
        with pytest.raises(DataError, match="subset"):
            load_dataset(str(tmp_path / "d.npz"), subset=bad)


# ------------------------------------------------------------------------------------ errors
def _idx_dir(tmp_path: Path) -> Path:
    write_mnist_idx(tmp_path, mnist_arrays(np.random.default_rng(10)))
    return tmp_path


def test_error_missing_dir(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_dataset("mnist", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="cifar-10-batches-py"):  # lists what was looked for
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet", str(tmp_path))
    with pytest.raises(DataError, match="missing.npz"):
        load_dataset(str(tmp_path / "missing.npz"))


def test_error_wrong_magic(tmp_path):
    d = _idx_dir(tmp_path)
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(7, np.uint8), magic=2051)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*magic"):
        load_dataset("mnist", str(d))


def test_error_truncated_idx(tmp_path):
    d = _idx_dir(tmp_path)
    write_idx(d / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), cut=10)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", str(d))


def test_error_count_mismatch_and_partial_set(tmp_path):
    d = _idx_dir(tmp_path)
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(6, np.uint8))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*7 images.*6 labels"):
        load_dataset("mnist", str(d))
    os.remove(d / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", str(d))


def test_error_corrupt_gz(tmp_path):
    write_mnist_idx(tmp_path, mnist_arrays(np.random.default_rng(11)), gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", str(tmp_path))


def test_error_labels_out_of_range(tmp_path):
    x_tr, y_tr, x_te, y_te = mnist_arrays(np.random.default_rng(12))
    y_tr[3] = 10
    write_mnist_idx(tmp_path, (x_tr, y_tr, x_te, y_te))
    with pytest.raises(DataError, match=r"out of range.*\[0, 10\)"):
        load_dataset("mnist", str(tmp_path))
    np.savez(tmp_path / "neg.npz", x_train=x_tr, y_train=-np.ones(7, np.int64), x_test=x_te, y_test=y_te)
    with pytest.raises(DataError, match="neg.npz.*out of range"):
        load_dataset(str(tmp_path / "neg.npz"))
    exp = write_cifar100(tmp_path / "c100" / "cifar-100-python", np.random.default_rng(13))
    train = tmp_path / "c100" / "cifar-100-python" / "train"
    dump(train, {b"data": exp["train"][0], b"fine_labels": [100] * 6, b"coarse_labels": [0] * 6})
    with pytest.raises(DataError, match="out of range"):
        load_dataset("cifar100", str(tmp_path / "c100"))


def test_error_bad_arrays(tmp_path):
    x = np.zeros((3, 4, 4, 1), np.float32)
    np.savez(tmp_path / "float.npz", x_train=x, y_train=np.zeros(3, int), x_test=x, y_test=np.zeros(3, int))
    with pytest.raises(DataError, match="float.npz.*uint8"):
        load_dataset(str(tmp_path / "float.npz"))
    xu = np.zeros((3, 4, 4, 2), np.uint8)
    np.savez(tmp_path / "c2.npz", x_train=xu, y_train=np.zeros(3, int), x_test=xu, y_test=np.zeros(3, int))
    with pytest.raises(DataError, match="c2.npz.*shape"):
        load_dataset(str(tmp_path / "c2.npz"))
    xu = np.zeros((3, 4, 4), np.uint8)
    np.savez(tmp_path / "fl.npz", x_train=xu, y_train=np.zeros(3), x_test=xu, y_test=np.zeros(3, int))
    with pytest.raises(DataError, match="fl.npz.*integers"):
        load_dataset(str(tmp_path / "fl.npz"))
    np.savez(tmp_path / "len.npz", x_train=xu, y_train=np.zeros(2, int), x_test=xu, y_test=np.zeros(3, int))
    with pytest.raises(DataError, match="len.npz.*3 train images but 2"):
        load_dataset(str(tmp_path / "len.npz"))
    np.savez(tmp_path / "keys.npz", x_train=xu, y_train=np.zeros(3, int))
    with pytest.raises(DataError, match="keys.npz.*x_test"):
        load_dataset(str(tmp_path / "keys.npz"))
    np.save(tmp_path / "arr.npy", xu)
    os.replace(tmp_path / "arr.npy", tmp_path / "arr.npz")
    with pytest.raises(DataError, match="arr.npz.*single"):
        load_dataset(str(tmp_path / "arr.npz"))


def test_error_corrupt_zip_and_pickle(tmp_path):
    xu = np.zeros((3, 4, 4), np.uint8)
    np.savez_compressed(tmp_path / "z.npz", x_train=xu, y_train=np.zeros(3, int), x_test=xu,
                        y_test=np.zeros(3, int))
    raw = (tmp_path / "z.npz").read_bytes()
    (tmp_path / "z.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="z.npz"):
        load_dataset(str(tmp_path / "z.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="junk.npz"):
        load_dataset(str(tmp_path / "junk.npz"))
    folder = tmp_path / "c10" / "cifar-10-batches-py"
    write_cifar10(folder, np.random.default_rng(14))
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_3.*pickle"):
        load_dataset("cifar10", str(tmp_path / "c10"))


def test_error_corrupt_jpeg(tmp_path):
    arrays, _ = write_jpeg_npz(tmp_path / "cifar10_jpeg.npz", np.random.default_rng(15))
    arrays["x_test_jpeg"] = arrays["x_test_jpeg"].copy()
    arrays["x_test_jpeg"][:20] = 0  # destroys image 0's JPEG header
    np.savez_compressed(tmp_path / "cifar10_jpeg.npz", **arrays)
    with pytest.raises(DataError, match="cifar10_jpeg.npz.*test image 0"):
        load_dataset("cifar10", str(tmp_path))


def test_error_cifar100_options(tmp_path):
    with pytest.raises(DataError, match="cifar100_labels"):
        load_dataset("cifar100", str(tmp_path), cifar100_labels="medium")
    x = np.zeros((2, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "cifar100.npz", x_train=x, y_train=np.arange(2), x_test=x, y_test=np.arange(2))
    assert load_dataset("cifar100", str(tmp_path)).num_classes == 100
    with pytest.raises(DataError, match="cifar100.npz.*coarse"):
        load_dataset("cifar100", str(tmp_path), cifar100_labels="coarse")


# ------------------------------------------------------------------------------------ loader
def _toy(n: int = 23, c: int = 3, h: int = 6, w: int = 5):
    g = torch.Generator().manual_seed(123)
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)
    return x, torch.arange(n) % 4


def test_loader_epoch_covers_every_index_once():
    x, y = _toy()
    loader = BatchLoader(x, y, 5, (0.5,) * 3, (0.25,) * 3, shuffle=True, seed=3)
    assert len(loader) == 5
    sizes, seen = [], []
    for idx, xb, yb in loader:
        sizes.append(len(idx))
        seen += idx.tolist()
        assert xb.dtype == torch.float32 and xb.shape == (len(idx), 3, 6, 5)
        assert torch.equal(yb, y[idx])
    assert sizes == [5, 5, 5, 5, 3] and sorted(seen) == list(range(23))
    assert [b.tolist() for b in loader.batches(0)] == [loader.order(0)[i:i + 5].tolist() for i in range(0, 23, 5)]


def test_loader_determinism_and_epochs():
    x, y = _toy()
    a = BatchLoader(x, y, 4, (0.5,) * 3, (0.25,) * 3, shuffle=True, seed=7)
    b = BatchLoader(x, y, 4, (0.5,) * 3, (0.25,) * 3, shuffle=True, seed=7)
    assert torch.equal(a.order(3), b.order(3))
    _ = a.order(0), a.order(1)  # earlier epochs do not influence later ones
    assert torch.equal(a.order(5), b.order(5))
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), BatchLoader(x, y, 4, (0.5,) * 3, (0.25,) * 3, shuffle=True,
                                                   seed=8).order(0))
    plain = BatchLoader(x, y, 4, (0.5,) * 3, (0.25,) * 3, shuffle=False)
    assert plain.order(2).tolist() == list(range(23))


def test_loader_drop_last_and_indices():
    x, y = _toy()
    loader = BatchLoader(x, y, 5, (0.5,) * 3, (0.25,) * 3, shuffle=True, drop_last=True)
    assert len(loader) == 4 and [len(b) for b in loader.batches(0)] == [5] * 4
    assert len(list(loader)) == 4
    rows = torch.tensor([20, 3, 7, 11, 15, 2, 9])
    sub = BatchLoader(x, y, 3, (0.5,) * 3, (0.25,) * 3, shuffle=True, indices=rows, seed=1)
    assert len(sub) == 3
    got = torch.cat([idx for idx, _, _ in sub])
    assert sorted(got.tolist()) == sorted(rows.tolist())
    for idx, xb, yb in sub:
        assert torch.equal(yb, y[idx]) and torch.allclose(xb, normalize(x[idx], (0.5,) * 3, (0.25,) * 3))
    ordered = BatchLoader(x, y, 3, (0.5,) * 3, (0.25,) * 3, shuffle=False, indices=rows)
    assert ordered.order(0).tolist() == rows.tolist()


def test_normalize_matches_direct_computation():
    x, _ = _toy()
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = normalize(x, mean, std)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-5)
    loader = BatchLoader(x, torch.zeros(23, dtype=torch.long), 8, mean, std, shuffle=False, channels_last=True)
    idx, xb, _ = next(iter(loader))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(xb.double(), ref[idx], atol=1e-5)
    with pytest.raises(ValueError):
        normalize(x, (0.1, 0.2), (1.0, 1.0))


# ------------------------------------------------------------------------------ augmentation
def _distinct_batch(b: int = 16, c: int = 2, h: int = 6, w: int = 7) -> torch.Tensor:
    """Every pixel value within an image is distinct and non-zero (so zero padding is visible)."""
    base = torch.arange(1, c * h * w + 1, dtype=torch.uint8).view(c, h, w)
    return torch.stack([base.roll(i, dims=2) for i in range(b)]).contiguous()


def _manual(img: np.ndarray, pad: int, dy: int, dx: int, flip: bool) -> np.ndarray:
    h, w = img.shape[1:]
    out = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("kind,pad,flip", [("crop_flip", 4, True), ("shift", 2, False)])
def test_augment_is_a_zero_padded_translation(kind, pad, flip):
    x = _distinct_batch()
    out = augment_batch(x, kind, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # the documented draw order: offsets (2, B), then flips (B,)
    g = torch.Generator().manual_seed(5)
    off = torch.randint(0, 2 * pad + 1, (2, len(x)), generator=g)
    mirror = torch.randint(0, 2, (len(x),), generator=g).bool() if flip else torch.zeros(len(x), dtype=torch.bool)
    for i in range(len(x)):
        exp = _manual(x[i].numpy(), pad, int(off[0, i]), int(off[1, i]), bool(mirror[i]))
        assert np.array_equal(out[i].numpy(), exp)
        # and no other translation/flip explains the output
        matches = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)
                   if np.array_equal(out[i].numpy(), _manual(x[i].numpy(), pad, dy, dx, f))]
        assert matches == [(int(off[0, i]), int(off[1, i]), bool(mirror[i]))]
    assert len({(int(a), int(b)) for a, b in off.T}) > 3
    if flip:
        assert 0 < int(mirror.sum()) < len(x)


def test_augment_flip_and_torch_path_agree():
    x = _distinct_batch(b=6)
    off = torch.full((2, 6), 4)  # centred crop: the identity window
    mirror = torch.tensor([True, False, True, False, False, True])
    out_np = D._crop_numpy(x, 4, off, mirror)
    assert torch.equal(out_np[mirror], x[mirror].flip(3)) and torch.equal(out_np[~mirror], x[~mirror])
    off = torch.randint(0, 9, (2, 6))
    assert torch.equal(D._crop_numpy(x, 4, off, mirror), D._crop_torch(x, 4, off, mirror))
    assert torch.equal(D._crop_numpy(x, 2, off % 5, None), D._crop_torch(x, 2, off % 5, None))


def test_augment_reproducible_and_none():
    x = _distinct_batch()
    a = augment_batch(x, "crop_flip", torch.Generator().manual_seed(9))
    b = augment_batch(x, "crop_flip", torch.Generator().manual_seed(9))
    c = augment_batch(x, "crop_flip", torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment_batch(x, None, torch.Generator()) is x
    with pytest.raises(ValueError):
        augment_batch(x, "rotate", torch.Generator())


def test_loader_augmentation_reproducible_per_epoch():
    x, y = _toy(n=20, h=8, w=8)
    kw = dict(shuffle=True, augment="crop_flip", seed=4)
    a = BatchLoader(x, y, 6, (0.5,) * 3, (0.25,) * 3, **kw)
    b = BatchLoader(x, y, 6, (0.5,) * 3, (0.25,) * 3, **kw)
    b.set_epoch(1)
    _ = list(b)  # another epoch first
    b.set_epoch(0)
    for (ia, xa, _), (ib, xb, _) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    a.set_epoch(1)
    e1 = torch.cat([xb for _, xb, _ in a])
    e0 = torch.cat([xb for _, xb, _ in b])
    assert not torch.equal(e0, e1)
    plain = BatchLoader(x, y, 6, (0.5,) * 3, (0.25,) * 3, shuffle=True, seed=4)
    assert not torch.equal(torch.cat([xb for _, xb, _ in plain]), e0)

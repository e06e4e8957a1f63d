"""Image data sets on disk and in memory: the readers and the :class:`Dataset` container.

Sources understood by :func:`load_dataset`:

* ``"embedded"``: the packaged MNIST subset ``_data/mnist_small.npz`` (10,000 train / 2,000 test).
* ``"mnist"``: ``mnist.npz`` or the four idx files (optionally ``.gz``, also under ``MNIST/raw/``).
* ``"cifar10"``: ``cifar-10-batches-py/`` pickles (or those files directly in the folder),
  ``cifar10.npz`` (pixels) or ``cifar10_jpeg.npz`` (JPEG bytes, decoded once and cached).
* ``"cifar100"``: ``cifar-100-python/`` pickles (fine or coarse labels) or ``cifar100.npz``
  (also ``cifar100_jpeg.npz``).
* a path to an ``.npz`` file with uint8 ``x_train (N,H,W[,C])``, ``y_train``, ``x_test``, ``y_test``.

Images are kept as contiguous uint8 ``(N, C, H, W)`` tensors; batches are gathered, augmented in
raw pixel space and normalised to float32 only when they are drawn. Every problem with the input
files raises :class:`DataError` naming the file and what is wrong with it.
"""
from __future__ import annotations

import dataclasses

import gzip
import hashlib
import importlib.resources
import io
import json
import math
import os
import pickle
import stat
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

DATASET_NAMES = ("embedded", "mnist", "cifar10", "cifar100")

_EMBEDDED_FILE = "mnist_small.npz"
_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class DataError(ValueError):
    """A data set that cannot be loaded; the message names the file (or folder) and the problem."""


@dataclass
class Dataset:
    """A train/test image classification data set held as uint8 ``(N, C, H, W)`` tensors."""

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None = field(default=None, repr=False)
    coarse_y_train: torch.Tensor | None = field(default=None, repr=False)
    coarse_y_test: torch.Tensor | None = field(default=None, repr=False)
    source: str = ""

    def first(self, train: int | None = None, test: int | None = None) -> "Dataset":
        """The first ``train`` training and ``test`` test images (None: all), as ``--subset`` /
        ``--test-subset`` take them; the normalisation statistics are kept as they are."""
        src = self.source or self.name
        n_tr = _subset_size(train, len(self.y_train), "subset", src)
        n_te = _subset_size(test, len(self.y_test), "test_subset", src)
        cut = lambda t, n: None if t is None else t[:n].contiguous()  # noqa: E731
        return dataclasses.replace(self, x_train=cut(self.x_train, n_tr), y_train=cut(self.y_train, n_tr),
                                   x_test=cut(self.x_test, n_te), y_test=cut(self.y_test, n_te),
                                   coarse_y_train=cut(self.coarse_y_train, n_tr),
                                   coarse_y_test=cut(self.coarse_y_test, n_te))

    @property
    def in_channels(self) -> int:
        """Number of image channels C."""
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        """Image height H (equal to the width for all named data sets)."""
        return int(self.x_train.shape[2])

    @property
    def image_hw(self) -> tuple[int, int]:
        """Image height and width ``(H, W)``."""
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    @property
    def num_train(self) -> int:
        """Number of training images."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test images."""
        return int(self.x_test.shape[0])


@dataclass
class _Raw:
    """Validated arrays of one source before subsetting: images uint8 (N, C, H, W), labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    classes: list[str] | None = None
    coarse_train: np.ndarray | None = None
    coarse_test: np.ndarray | None = None
    coarse_classes: list[str] | None = None


# ------------------------------------------------------------------------------- public loading
def default_data_dir() -> Path:
    """``$LAYERPAR_DATA_DIR`` if set, else ``~/.cache/layerpar_fast``."""
    env = os.environ.get("LAYERPAR_DATA_DIR")
    return Path(env).expanduser() if env else _cache_dir()


def load_dataset(name: str, data_dir: str | None = None, subset: int | None = None,
                 test_subset: int | None = None, cifar100_labels: str = "fine") -> Dataset:
    """Load a data set by name (see :data:`DATASET_NAMES`) or from an ``.npz`` path.

    ``subset`` / ``test_subset`` keep the first N train / test images. ``cifar100_labels`` picks
    the 100 ``"fine"`` or the 20 ``"coarse"`` CIFAR-100 classes. ``mean``/``std`` are computed on
    the (subset) training images.
    """
    if cifar100_labels not in ("fine", "coarse"):
        raise DataError(f"cifar100_labels must be 'fine' or 'coarse', got {cifar100_labels!r}")
    key = name.strip().lower() if isinstance(name, str) else name
    if key in ("embedded", "embedded-mnist"):
        raw, ds_name, num_classes = _load_embedded(), "embedded-mnist", 10
    elif key in DATASET_NAMES:
        root = Path(data_dir).expanduser() if data_dir else default_data_dir()
        if key == "mnist":
            raw, ds_name, num_classes = _load_mnist(root), "mnist", 10
        elif key == "cifar10":
            raw, ds_name, num_classes = _load_cifar10(root), "cifar10", 10
        else:
            raw = _load_cifar100(root)
            if cifar100_labels == "coarse":
                if raw.coarse_train is None or raw.coarse_test is None:
                    raise DataError(f"{raw.source}: no coarse CIFAR-100 labels in this source "
                                    "(need the cifar-100-python pickles or y_train_coarse/y_test_coarse)")
                raw.y_train, raw.y_test = raw.coarse_train, raw.coarse_test
                raw.classes = raw.coarse_classes
                _check_labels(raw.y_train, 20, raw.source, "coarse train labels")
                _check_labels(raw.y_test, 20, raw.source, "coarse test labels")
                ds_name, num_classes = "cifar100-coarse", 20
            else:
                ds_name, num_classes = "cifar100", 100
    elif isinstance(name, (str, os.PathLike)) and (str(name).endswith(".npz") or os.path.exists(name)):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: no such .npz file")
        raw = _read_pixel_npz(path)
        num_classes = _infer_num_classes(raw)
        ds_name = path.stem
    else:
        raise DataError(f"unknown data set {name!r}: expected one of {', '.join(DATASET_NAMES)} "
                        "or a path to an .npz file")

    _check_labels(raw.y_train, num_classes, raw.source, "train labels")
    _check_labels(raw.y_test, num_classes, raw.source, "test labels")
    if raw.classes is not None and len(raw.classes) != num_classes:
        raise DataError(f"{raw.source}: {len(raw.classes)} class names for {num_classes} classes")

    n_tr = _subset_size(subset, len(raw.y_train), "subset", raw.source)
    n_te = _subset_size(test_subset, len(raw.y_test), "test_subset", raw.source)
    x_train = _to_tensor(raw.x_train, n_tr)
    x_test = _to_tensor(raw.x_test, n_te)
    mean, std = _channel_stats(x_train)
    coarse_tr = _to_tensor(raw.coarse_train, n_tr).long() if raw.coarse_train is not None else None
    coarse_te = _to_tensor(raw.coarse_test, n_te).long() if raw.coarse_test is not None else None
    return Dataset(name=ds_name, x_train=x_train, y_train=_to_tensor(raw.y_train, n_tr).long(),
                   x_test=x_test, y_test=_to_tensor(raw.y_test, n_te).long(), num_classes=num_classes,
                   mean=mean, std=std, classes=raw.classes, coarse_y_train=coarse_tr,
                   coarse_y_test=coarse_te, source=raw.source)



# ------------------------------------------------------------------------ source: embedded/npz
def _load_embedded() -> _Raw:
    res = importlib.resources.files(__package__ or "layerpar_fast.data").joinpath("_data", _EMBEDDED_FILE)
    with importlib.resources.as_file(res) as path:
        if not Path(path).is_file():
            raise DataError(f"{path}: the embedded data set is missing from the installation")
        return _read_pixel_npz(Path(path))


def _read_pixel_npz(path: Path, coarse: bool = False) -> _Raw:
    """Read ``x_train``/``y_train``/``x_test``/``y_test`` (+ ``classes``) from a pixel ``.npz``."""
    keys = ["x_train", "y_train", "x_test", "y_test"]
    optional = ["classes"] + (["y_train_coarse", "y_test_coarse", "coarse_classes"] if coarse else [])
    arrays = _npz_arrays(path, keys, optional)
    raw = _Raw(x_train=_nhwc_to_nchw(arrays["x_train"], path, "x_train"),
               y_train=_labels(arrays["y_train"], path, "y_train"),
               x_test=_nhwc_to_nchw(arrays["x_test"], path, "x_test"),
               y_test=_labels(arrays["y_test"], path, "y_test"),
               source=str(path), classes=_names(arrays.get("classes"), path, "classes"))
    if "y_train_coarse" in arrays and "y_test_coarse" in arrays:
        raw.coarse_train = _labels(arrays["y_train_coarse"], path, "y_train_coarse")
        raw.coarse_test = _labels(arrays["y_test_coarse"], path, "y_test_coarse")
        raw.coarse_classes = _names(arrays.get("coarse_classes"), path, "coarse_classes")
    _check_pairs(raw, path)
    return raw


def _npz_arrays(path: Path, keys: list[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read the named members of an ``.npz`` (no pickles), turning every failure into DataError."""
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    with f:
        head = f.read(6)
        if head == b"\x93NUMPY":
            raise DataError(f"{path}: expected an .npz archive, found a single .npy array")
        if not head.startswith(b"PK"):
            raise DataError(f"{path}: not an .npz (zip) archive")
        f.seek(0)
        try:
            npz = np.load(f, allow_pickle=False)
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)} "
                                f"(found: {', '.join(npz.files) or 'none'})")
            return {k: npz[k] for k in list(keys) + [k for k in optional if k in npz.files]}
        except DataError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, KeyError) as e:
            raise DataError(f"{path}: corrupt or unreadable .npz archive ({type(e).__name__}: {e})") from e


def _nhwc_to_nchw(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Validate uint8 ``(N,H,W,C)`` (C = 1 or 3) or ``(N,H,W)`` images; return ``(N,C,H,W)``."""
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
        raise DataError(f"{path}: {key} has dtype {getattr(a, 'dtype', type(a))}, images must be uint8")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise DataError(f"{path}: {key} has shape {a.shape}, expected (N,H,W,C) with C=1 or 3, or (N,H,W)")
    if min(a.shape[:3]) < 1:
        raise DataError(f"{path}: {key} has shape {a.shape}: no images")
    return a.transpose(0, 3, 1, 2)


def _labels(a: Any, path: Path | str, key: str) -> np.ndarray:
    """Validate a 1-D integer label array (list or ndarray) and return it as int64."""
    arr = np.asarray(a)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        raise DataError(f"{path}: {key} has dtype {arr.dtype}, labels must be integers")
    if arr.ndim != 1:
        raise DataError(f"{path}: {key} has shape {arr.shape}, labels must be 1-D")
    return arr.astype(np.int64, copy=False)


def _names(a: Any, path: Path | str, key: str) -> list[str] | None:
    if a is None:
        return None
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise DataError(f"{path}: {key} has shape {arr.shape}, expected a 1-D list of names")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.tolist()]


def _check_pairs(raw: _Raw, path: Path | str) -> None:
    """Images and labels agree in count; train and test images agree in (C, H, W)."""
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: {x.shape[0]} {split} images but {y.shape[0]} {split} labels")
    for split, x, y in (("train", raw.x_train, raw.coarse_train), ("test", raw.x_test, raw.coarse_test)):
        if y is not None and x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: {x.shape[0]} {split} images but {y.shape[0]} coarse {split} labels")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise DataError(f"{path}: train images are (C,H,W)={raw.x_train.shape[1:]} but test images "
                        f"are {raw.x_test.shape[1:]}")


def _check_labels(y: np.ndarray, num_classes: int, source: str, what: str) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"{source}: {what} out of range: found values in [{int(y.min())}, "
                        f"{int(y.max())}], expected [0, {num_classes})")


def _infer_num_classes(raw: _Raw) -> int:
    """``len(classes)`` when the file names its classes, else max label + 1 (at least 2)."""
    if raw.classes is not None:
        return len(raw.classes)
    top = max(int(raw.y_train.max()), int(raw.y_test.max()) if raw.y_test.size else 0)
    return max(2, top + 1)


# ------------------------------------------------------------------------------- source: MNIST
def _load_mnist(root: Path) -> _Raw:
    _require_dir(root, "mnist", "mnist.npz or the idx files " + ", ".join(_MNIST_FILES.values()))
    if (root / "mnist.npz").is_file():
        return _read_pixel_npz(root / "mnist.npz")
    looked: list[str] = [str(root / "mnist.npz")]
    for folder in (root, root / "MNIST" / "raw"):
        found = {k: _first_file(folder, [f, f + ".gz"]) for k, f in _MNIST_FILES.items()}
        present = {k: p for k, p in found.items() if p is not None}
        if len(present) == len(found):
            return _read_idx_set(found)  # type: ignore[arg-type]
        if present:
            miss = [f"{_MNIST_FILES[k]}[.gz]" for k in found if found[k] is None]
            raise DataError(f"mnist: {folder} holds only part of the idx files; missing {', '.join(miss)}")
        looked.append(f"{folder}/{{{','.join(_MNIST_FILES.values())}}}[.gz]")
    raise DataError("mnist: no MNIST files found; looked for " + "; ".join(looked))


def _read_idx_set(files: dict[str, Path]) -> _Raw:
    x_tr, y_tr = _read_idx(files["x_train"], 3), _read_idx(files["y_train"], 1)
    x_te, y_te = _read_idx(files["x_test"], 3), _read_idx(files["y_test"], 1)
    for xf, yf, x, y in ((files["x_train"], files["y_train"], x_tr, y_tr),
                         (files["x_test"], files["y_test"], x_te, y_te)):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{xf}: {x.shape[0]} images but {yf} holds {y.shape[0]} labels")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{files['x_test']}: images are {x_te.shape[1:]} but training images are "
                        f"{x_tr.shape[1:]}")
    return _Raw(x_train=x_tr[:, None], y_train=y_tr.astype(np.int64), x_test=x_te[:, None],
                y_test=y_te.astype(np.int64), source=str(files["x_train"].parent))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte idx file (magic 0x0800 + ndim, big-endian uint32 dimensions)."""
    data = _read_bytes(path)
    magic = 0x0800 + ndim
    if len(data) < 4:
        raise DataError(f"{path}: truncated idx file ({len(data)} bytes, no header)")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise DataError(f"{path}: wrong magic number {got}, expected {magic} "
                        f"(idx{ndim}-ubyte {'images' if ndim == 3 else 'labels'})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx file ({len(data)} bytes, header needs {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    need = math.prod(dims)
    have = len(data) - header
    if have < need:
        raise DataError(f"{path}: truncated idx file: dimensions {dims} need {need} bytes of data, "
                        f"found {have}")
    if have > need:
        raise DataError(f"{path}: idx file has {have - need} unexpected bytes after the data {dims}")
    if ndim == 3 and min(dims) < 1:
        raise DataError(f"{path}: idx file holds no images (dimensions {dims})")
    return np.frombuffer(data, np.uint8, count=need, offset=header).reshape(dims).copy()


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------ source: CIFAR
def _load_cifar10(root: Path) -> _Raw:
    _require_dir(root, "cifar10", "cifar-10-batches-py/, cifar10.npz or cifar10_jpeg.npz")
    for folder in (root / "cifar-10-batches-py", root):
        if all((folder / f).is_file() for f in _CIFAR10_TRAIN + ("test_batch",)):
            return _read_cifar10_pickles(folder)
    partial = [f for f in _CIFAR10_TRAIN + ("test_batch",) if (root / "cifar-10-batches-py" / f).is_file()]
    if partial:
        miss = [f for f in _CIFAR10_TRAIN + ("test_batch",) if f not in partial]
        raise DataError(f"cifar10: {root / 'cifar-10-batches-py'} is incomplete; missing {', '.join(miss)}")
    raw = _load_npz_or_jpeg(root, "cifar10", coarse=False)
    if raw is None:
        raise DataError(f"cifar10: no CIFAR-10 files in {root}; looked for "
                        f"{root / 'cifar-10-batches-py'}/{{data_batch_1..5,test_batch}}, "
                        f"{root}/{{data_batch_1..5,test_batch}}, {root / 'cifar10.npz'}, "
                        f"{root / 'cifar10_jpeg.npz'}")
    _check_image_shape(raw, (3, 32, 32), "cifar10")
    return raw


def _load_cifar100(root: Path) -> _Raw:
    _require_dir(root, "cifar100", "cifar-100-python/ or cifar100.npz")
    for folder in (root / "cifar-100-python", root):
        if (folder / "train").is_file() and (folder / "test").is_file():
            return _read_cifar100_pickles(folder)
    raw = _load_npz_or_jpeg(root, "cifar100", coarse=True)
    if raw is None:
        raise DataError(f"cifar100: no CIFAR-100 files in {root}; looked for "
                        f"{root / 'cifar-100-python'}/{{train,test,meta}}, {root}/{{train,test,meta}}, "
                        f"{root / 'cifar100.npz'}, {root / 'cifar100_jpeg.npz'}")
    _check_image_shape(raw, (3, 32, 32), "cifar100")
    return raw


def _read_cifar10_pickles(folder: Path) -> _Raw:
    xs, ys = [], []
    for f in _CIFAR10_TRAIN:
        x, labels = _cifar_batch(folder / f, "labels")
        xs.append(x)
        ys.append(labels["labels"])
    x_te, lt = _cifar_batch(folder / "test_batch", "labels")
    classes = None
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        classes = _names(_pickle_key(_load_pickle(meta_path), "label_names", meta_path), meta_path,
                         "label_names")
    return _Raw(x_train=np.concatenate(xs), y_train=np.concatenate(ys), x_test=x_te,
                y_test=lt["labels"], source=str(folder), classes=classes)


def _read_cifar100_pickles(folder: Path) -> _Raw:
    x_tr, ltr = _cifar_batch(folder / "train", "fine_labels", "coarse_labels")
    x_te, lte = _cifar_batch(folder / "test", "fine_labels", "coarse_labels")
    fine = coarse = None
    meta_path = folder / "meta"
    if meta_path.is_file():
        meta = _load_pickle(meta_path)
        fine = _names(_pickle_key(meta, "fine_label_names", meta_path), meta_path, "fine_label_names")
        coarse = _names(_pickle_key(meta, "coarse_label_names", meta_path), meta_path,
                        "coarse_label_names")
    return _Raw(x_train=x_tr, y_train=ltr["fine_labels"], x_test=x_te, y_test=lte["fine_labels"],
                source=str(folder), classes=fine, coarse_train=ltr["coarse_labels"],
                coarse_test=lte["coarse_labels"], coarse_classes=coarse)


def _cifar_batch(path: Path, *label_keys: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One CIFAR pickle: ``data`` uint8 (N, 3072) channel-major rows -> (N, 3, 32, 32), labels."""
    d = _load_pickle(path)
    data = _pickle_key(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' has dtype {getattr(data, 'dtype', type(data).__name__)}, "
                        "images must be uint8")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
    labels = {}
    for k in label_keys:
        labels[k] = _labels(_pickle_key(d, k, path), path, k)
        if labels[k].shape[0] != data.shape[0]:
            raise DataError(f"{path}: {data.shape[0]} images but {labels[k].shape[0]} '{k}'")
    return data.reshape(-1, 3, 32, 32), labels


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    except Exception as e:  # a corrupt pickle can fail in many ways
        raise DataError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _pickle_key(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: missing key {key!r} (found: {', '.join(map(repr, d)) or 'none'})")


def _check_image_shape(raw: _Raw, chw: tuple[int, int, int], name: str) -> None:
    if tuple(raw.x_train.shape[1:]) != chw:
        raise DataError(f"{raw.source}: {name} images must be (C,H,W)={chw}, found "
                        f"{tuple(raw.x_train.shape[1:])}")


# ------------------------------------------------------------------ source: compact JPEG archive
def _load_npz_or_jpeg(root: Path, name: str, coarse: bool) -> _Raw | None:
    """``NAME.npz`` in ``root``, else ``NAME_jpeg.npz`` decoded once (cached as ``NAME.npz``)."""
    pixels, jpeg = root / f"{name}.npz", root / f"{name}_jpeg.npz"
    if not jpeg.is_file():
        return _read_pixel_npz(pixels, coarse) if pixels.is_file() else None
    src_sha = _sha256(jpeg)
    for cache in (pixels, _cache_dir() / f"{name}.npz"):
        if cache.is_file() and _cache_matches(cache, jpeg, src_sha):
            return _read_pixel_npz(cache, coarse)
    arrays = _decode_jpeg_npz(jpeg, name)
    _write_cache(arrays, jpeg, src_sha, name)
    raw = _Raw(x_train=arrays["x_train"].transpose(0, 3, 1, 2), y_train=arrays["y_train"].astype(np.int64),
               x_test=arrays["x_test"].transpose(0, 3, 1, 2), y_test=arrays["y_test"].astype(np.int64),
               source=str(jpeg), classes=_names(arrays.get("classes"), jpeg, "classes"))
    _check_pairs(raw, jpeg)
    return raw


def _cache_matches(cache: Path, src: Path, src_sha: str) -> bool:
    """A cache next to the source without sidecar is user data and trusted; otherwise check sha."""
    side = cache.with_name(cache.name + ".json")
    if not side.is_file():
        return cache.parent == src.parent
    try:
        meta = json.loads(side.read_text())
        return meta.get("source_sha256") == src_sha and meta.get("bytes") == cache.stat().st_size
    except (OSError, ValueError, AttributeError):
        return False


def _decode_jpeg_npz(path: Path, name: str) -> dict[str, np.ndarray]:
    """Decode every image of a compact JPEG archive with Pillow into uint8 (N, H, W, 3)."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is installed wherever CIFAR is used
        raise DataError(f"{path}: decoding JPEG archives needs Pillow (pip install pillow)") from e
    keys = ["x_train_jpeg", "x_train_offsets", "y_train", "x_test_jpeg", "x_test_offsets", "y_test"]
    arr = _npz_arrays(path, keys, ["classes"])
    print(f"layerpar_fast: decoding {path} (one-time, cached as {name}.npz)", flush=True)
    out: dict[str, np.ndarray] = {}
    if "classes" in arr:
        out["classes"] = arr["classes"]
    for split in ("train", "test"):
        blob, off = arr[f"x_{split}_jpeg"], arr[f"x_{split}_offsets"]
        y = _labels(arr[f"y_{split}"], path, f"y_{split}")
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise DataError(f"{path}: x_{split}_jpeg must be 1-D uint8 bytes, got {blob.dtype} {blob.shape}")
        if off.ndim != 1 or off.dtype.kind not in "iu" or len(off) != len(y) + 1 or len(y) == 0:
            raise DataError(f"{path}: x_{split}_offsets {off.dtype} {off.shape} does not match "
                            f"{len(y)} labels (need N+1 integer offsets)")
        off = off.astype(np.int64)
        if off[0] != 0 or off[-1] > blob.size or bool((np.diff(off) <= 0).any()):
            raise DataError(f"{path}: x_{split}_offsets are not increasing offsets into "
                            f"{blob.size} bytes")
        out[f"x_{split}"] = _decode_images(blob, off, path, split, Image)
        out[f"y_{split}"] = y
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise DataError(f"{path}: train images are {out['x_train'].shape[1:]}, test images "
                        f"{out['x_test'].shape[1:]}")
    return out


def _decode_images(blob: np.ndarray, off: np.ndarray, path: Path, split: str, image_mod: Any) -> np.ndarray:
    def one(i: int) -> np.ndarray:
        try:
            img = image_mod.open(io.BytesIO(blob[off[i]:off[i + 1]].tobytes())).convert("RGB")
            return np.asarray(img)
        except Exception as e:  # Pillow raises several types on corrupt data
            raise DataError(f"{path}: {split} image {i} does not decode ({type(e).__name__}: {e})") from e

    first = one(0)
    n = len(off) - 1
    out = np.empty((n,) + first.shape, np.uint8)
    out[0] = first
    for i in range(1, n):
        img = one(i)
        if img.shape != first.shape:
            raise DataError(f"{path}: {split} image {i} is {img.shape}, image 0 is {first.shape}")
        out[i] = img
    return out


def _write_cache(arrays: dict[str, np.ndarray], src: Path, src_sha: str, name: str) -> None:
    """Write ``NAME.npz`` (+ sidecar) next to ``src`` if that folder is writable, else in the cache."""
    for folder in (src.parent, _cache_dir()):
        if not _writable_dir(folder):
            continue
        target = folder / f"{name}.npz"
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npz.tmp", dir=folder)
            os.chmod(tmp, 0o644)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, target)
            tmp = None
            side = {"source": src.name, "source_sha256": src_sha, "bytes": target.stat().st_size}
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".json.tmp", dir=folder)
            os.chmod(tmp, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(side, f, indent=1)
            os.replace(tmp, folder / f"{name}.npz.json")
            return
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    warnings.warn(f"could not cache the decoded {name} images next to {src} or in {_cache_dir()}; "
                  "they will be decoded again next time", RuntimeWarning, stacklevel=3)


def _writable_dir(folder: Path) -> bool:
    """True if ``folder`` exists or can be created, is writable and has a write bit set in its mode."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP
                                                                              | stat.S_IWOTH))
    except OSError:
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ helpers
def _cache_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "layerpar_fast"


def _require_dir(root: Path, name: str, expected: str) -> None:
    if not root.is_dir():
        raise DataError(f"{name}: data directory {root} does not exist; expected {expected} there "
                        "(set data_dir or LAYERPAR_DATA_DIR)")


def _first_file(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def _subset_size(n: int | None, available: int, what: str, source: str) -> int:
    if n is None:
        return available
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= available:
        raise DataError(f"{source}: {what}={n!r} must be an integer in [1, {available}]")
    return int(n)


def _to_tensor(a: np.ndarray, n: int) -> torch.Tensor:
    """The first ``n`` rows as a contiguous tensor (a copy when ``n`` is a strict subset)."""
    a = a[:n].copy() if n < a.shape[0] else a
    return torch.from_numpy(np.ascontiguousarray(a))


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std (population, float64) of uint8 images in [0, 1] units.

    Computed from 256-bin histograms; a constant channel gets std 1.0 so normalisation stays finite.
    """
    levels = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = float((counts * levels).sum() / total)
        var = float((counts * (levels - mean) ** 2).sum() / total)
        means.append(mean / 255.0)
        stds.append(math.sqrt(var) / 255.0 if var > 0 else 1.0)
    return tuple(means), tuple(stds)

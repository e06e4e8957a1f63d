#!/usr/bin/env python3
"""Regenerate layerpar_fast/data/_data/mnist_small.npz from the shared MNIST archive.

Usage: python bench/make_embedded_mnist.py [--src $DATA/mnist.npz] [--out PATH]

Keeps the first 10,000 training and the first 2,000 test images (uint8 (N,28,28,1)) and their
labels, written like np.savez_compressed but with fixed zip timestamps, so that reruns produce the
same bytes. Fails if the result is 5 MB or larger.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, MAX_BYTES = 10_000, 2_000, 5_000_000


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed's format (deflated .npy members) with a fixed timestamp, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "mnist.npz")
    ap.add_argument("--out", type=Path, default=REPO / "layerpar_fast" / "data" / "_data" / "mnist_small.npz")
    args = ap.parse_args()
    with np.load(args.src, allow_pickle=False) as d:
        arrays = {"x_train": d["x_train"][:N_TRAIN], "y_train": d["y_train"][:N_TRAIN],
                  "x_test": d["x_test"][:N_TEST], "y_test": d["y_test"][:N_TEST]}
    for k in ("x_train", "x_test"):
        assert arrays[k].dtype == np.uint8 and arrays[k].shape[1:] == (28, 28, 1), (k, arrays[k].shape)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(args.out, arrays)
    size = args.out.stat().st_size
    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out}: x_train {arrays['x_train'].shape}, x_test {arrays['x_test'].shape}, "
          f"{size:,} bytes, sha256 {sha}")
    if size >= MAX_BYTES:
        print(f"error: {size:,} bytes is over the {MAX_BYTES:,} byte limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Image data sets as uint8 tensors, a deterministic batch loader and vectorised augmentation.

* :mod:`~layerpar_fast.data.readers`: the on-disk formats (MNIST idx/npz, CIFAR-10/100 pickles,
  compact JPEG archives, the embedded MNIST subset ``_data/mnist_small.npz``, any pixel ``.npz``),
  :class:`Dataset`, :func:`load_dataset` and :class:`DataError`.
* :mod:`~layerpar_fast.data.augment`: uint8 batch augmentation (crop/flip, shift) and normalisation.
* :mod:`~layerpar_fast.data.loader`: :class:`BatchLoader` (per-epoch permutations, batches, replay).

The public names (and the private helpers other modules import) are re-exported here, so
``from layerpar_fast.data import X`` works for every name in ``__all__``.
"""
from .augment import (AUGMENT_KINDS, _CIFAR_PAD, _MNIST_SHIFT, _affine, _crop_numpy, _crop_torch,
                      augment_batch, normalize)
from .loader import BatchLoader, _derive_seed
from .readers import DATASET_NAMES, DataError, Dataset, default_data_dir, load_dataset

__all__ = ["AUGMENT_KINDS", "DATASET_NAMES", "BatchLoader", "DataError", "Dataset", "augment_batch",
           "default_data_dir", "load_dataset", "normalize",
           # private helpers that other modules of the package (and the tests) import from here
           "_CIFAR_PAD", "_MNIST_SHIFT", "_affine", "_crop_numpy", "_crop_torch", "_derive_seed"]

"""layerpar_fast: layer-parallel training of deep residual networks.

The serial-parallel hybrid (SPH) method: K stages trained in parallel on penalty or
augmented-Lagrangian local losses with per-sample auxiliary variables at the cuts, downsampling
filters on what is stored and sent, then a serial back-propagation phase with augmentation.

>>> from layerpar_fast import HybridTrainer, make_config
>>> cfg = make_config(method="al", stages=2, ds=2, schedule="serial:1,parallel:5,serial:2")
>>> summary = HybridTrainer(cfg, "runs/demo").run()          # doctest: +SKIP
"""
__version__ = "0.1.0"

from .config import Config, ConfigError, make_config  # noqa: E402
from .filters import FilterPair  # noqa: E402


def __getattr__(name: str):
    # heavier modules load on first use, so `import layerpar_fast` stays cheap
    if name in ("HybridTrainer", "DistTrainer", "evaluate_run"):
        from . import trainer
        return getattr(trainer, name)
    if name in ("LocalTopology", "DistTopology", "Topology"):
        from . import topology
        return getattr(topology, name)
    if name in ("load_dataset", "Dataset", "BatchLoader"):
        from . import data
        return getattr(data, name)
    if name in ("build_model", "cut_points"):
        from . import models
        return getattr(models, name)
    if name in ("split_model", "assemble", "as_block_sequence"):
        from . import stages
        return getattr(stages, name)
    raise AttributeError(f"module 'layerpar_fast' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "make_config", "FilterPair", "HybridTrainer", "DistTrainer", "evaluate_run",
           "Topology", "LocalTopology", "DistTopology", "load_dataset", "Dataset", "BatchLoader", "build_model",
           "cut_points", "split_model", "assemble", "as_block_sequence", "__version__"]


def __dir__() -> list[str]:
    """The lazy exports too (``dir(layerpar_fast)``, tab completion)."""
    return sorted(set(globals()) | set(__all__))

"""The one module that loads the compiled extension ``layerpar_fast._C``.

:func:`load` returns the extension module, or ``None`` (with one warning per process) when it is
missing, fails to load, or was compiled against another torch than the one imported. Callers
then fall back to the reference torch code; nothing here raises ImportError.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

_UNSET = object()
_module: object = _UNSET
_reason: str = ""

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` after installing torch"


def _torch_release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0'."""
    return version.split("+", 1)[0]


def load() -> ModuleType | None:
    """The extension module, or None (one RuntimeWarning per process says why)."""
    global _module, _reason
    if _module is not _UNSET:
        return _module  # type: ignore[return-value]
    try:
        mod = importlib.import_module("layerpar_fast._C")
    except (ImportError, OSError) as e:
        mod, _reason = None, f"not available ({type(e).__name__}: {e})"
    else:
        built = mod.built_with_torch()
        if built != _torch_release(torch.__version__):
            mod, _reason = None, f"built for torch {built}, but torch {torch.__version__} is imported"
    if mod is None:
        warnings.warn(f"layerpar_fast: C++ extension {_reason}; CPU ops use the reference torch code "
                      f"({BUILD_HINT})", RuntimeWarning, stacklevel=2)
    else:
        _reason = ""
    _module = mod
    return mod


def available() -> bool:
    """True when the extension loaded and matches the imported torch."""
    return load() is not None


def reason() -> str:
    """Why the extension is unavailable ('' when it is loaded)."""
    load()
    return _reason


def with_cuda() -> bool:
    """True when the loaded extension was compiled with its CUDA parts (the staging ring)."""
    mod = load()
    return bool(mod is not None and getattr(mod, "with_cuda", False))


def reset() -> None:
    """Forget the cached load result (tests simulate a missing or mismatched extension)."""
    global _module, _reason
    _module, _reason = _UNSET, ""

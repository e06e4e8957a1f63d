"""Build-time decision: compile the CUDA part of the extension (csrc/*.cu) or the CPU part only.

Standard library only, no package imports: ``setup.py`` loads this file by path before
``layerpar_fast`` (or its dependencies) can be imported. The decision itself is the pure
function :func:`cuda_build_decision`; :func:`find_nvcc` and :func:`nvcc_version_text` gather
its inputs on the build machine.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

_RELEASE = re.compile(r"release\s+(\d+)\.(\d+)")   # "Cuda compilation tools, release 12.4, V12.4.131"
_VERSION = re.compile(r"\bV(\d+)\.(\d+)")
_TORCH_CUDA = re.compile(r"^\s*(\d+)(?:\.(\d+))?")


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` output, or None when it names no version."""
    m = _RELEASE.search(text or "") or _VERSION.search(text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_build_decision(torch_cuda_version: str | None, nvcc_path: str | None,
                        nvcc_version_text: str | None) -> tuple[bool, str]:
    """(build the CUDA part?, why). CUDA is built only when torch has CUDA
    (``torch.version.cuda`` not None), an nvcc exists and nvcc's CUDA major version equals
    torch's; the reason is one line fit to print after "building the CPU extension only: "."""
    if torch_cuda_version is None:
        return False, "torch is a CPU-only build (torch.version.cuda is None)"
    tm = _TORCH_CUDA.match(str(torch_cuda_version))
    if tm is None:
        return False, f"cannot read torch's CUDA version {torch_cuda_version!r}"
    torch_major = int(tm.group(1))
    built_for = f"torch built for CUDA {torch_cuda_version}"
    if not nvcc_path:
        return False, f"nvcc not found ({built_for})"
    nv = parse_nvcc_version(nvcc_version_text or "")
    if nv is None:
        lines = (nvcc_version_text or "").strip().splitlines()
        shown = f" (it printed {lines[-1][:80]!r})" if lines else " (no output)"
        return False, f"cannot read the CUDA version from '{nvcc_path} --version'{shown}; {built_for}"
    if nv[0] != torch_major:
        return False, (f"{nvcc_path} is CUDA {nv[0]}.{nv[1]}, but {built_for}: the major versions must "
                       "match (set CUDA_HOME to a matching toolkit)")
    return True, f"{nvcc_path} is CUDA {nv[0]}.{nv[1]}, {built_for}"


def find_nvcc(cuda_home: str | None) -> str | None:
    """CUDA_HOME/bin/nvcc when CUDA_HOME is known (torch compiles with that one), else nvcc on PATH."""
    if cuda_home:
        path = os.path.join(cuda_home, "bin", "nvcc")
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    return shutil.which("nvcc")


def nvcc_version_text(nvcc_path: str) -> str:
    """The output of ``nvcc --version`` (empty when it cannot run)."""
    try:
        r = subprocess.run([nvcc_path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (r.stdout or "") + (r.stderr or "")

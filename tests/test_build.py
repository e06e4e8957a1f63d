"""layerpar_fast._build: when setup.py compiles the CUDA part of the extension."""
from __future__ import annotations

import os
import stat

import pytest

from layerpar_fast._build import cuda_build_decision, find_nvcc, nvcc_version_text, parse_nvcc_version

NVCC_12_4 = ("nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2024 NVIDIA Corporation\n"
             "Built on Thu_Mar_28_02:18:24_PDT_2024\nCuda compilation tools, release 12.4, V12.4.131\n"
             "Build cuda_12.4.r12.4/compiler.34097967_0\n")
NVCC_11_8 = "Cuda compilation tools, release 11.8, V11.8.89\nBuild cuda_11.8.r11.8/compiler.31833905_0\n"


def test_parse_nvcc_version():
    assert parse_nvcc_version(NVCC_12_4) == (12, 4)
    assert parse_nvcc_version(NVCC_11_8) == (11, 8)
    assert parse_nvcc_version("Cuda compilation tools, V13.0.48") == (13, 0)
    assert parse_nvcc_version("") is None
    assert parse_nvcc_version("nvcc: command failed") is None


def test_cpu_torch_builds_cpu_only_even_with_nvcc():
    ok, why = cuda_build_decision(None, "/usr/local/cuda/bin/nvcc", NVCC_12_4)
    assert ok is False and "CPU-only" in why


def test_no_nvcc_builds_cpu_only():
    ok, why = cuda_build_decision("12.6", None, None)
    assert ok is False
    assert why == "nvcc not found (torch built for CUDA 12.6)"


def test_major_mismatch_builds_cpu_only():
    ok, why = cuda_build_decision("12.6", "/opt/cuda-11.8/bin/nvcc", NVCC_11_8)
    assert ok is False
    assert "CUDA 11.8" in why and "CUDA 12.6" in why and "major" in why and "\n" not in why


def test_same_major_builds_cuda():
    assert cuda_build_decision("12.6", "/usr/local/cuda/bin/nvcc", NVCC_12_4)[0] is True
    assert cuda_build_decision("12.4", "/usr/local/cuda/bin/nvcc", NVCC_12_4)[0] is True
    assert cuda_build_decision("12", "/usr/local/cuda/bin/nvcc", NVCC_12_4)[0] is True


@pytest.mark.parametrize("text", ["", "Segmentation fault\n", "nvcc version ???"])
def test_unparsable_nvcc_version_builds_cpu_only(text):
    ok, why = cuda_build_decision("12.6", "/usr/local/cuda/bin/nvcc", text)
    assert ok is False
    assert "cannot read the CUDA version" in why and "12.6" in why and "\n" not in why


def test_unparsable_torch_version_builds_cpu_only():
    ok, why = cuda_build_decision("unknown", "/usr/local/cuda/bin/nvcc", NVCC_12_4)
    assert ok is False and "'unknown'" in why


def test_find_nvcc(tmp_path, monkeypatch):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    assert find_nvcc(str(home)) is None                      # CUDA_HOME without nvcc
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    assert find_nvcc(str(home)) == str(nvcc)
    assert cuda_build_decision("12.6", str(nvcc), nvcc_version_text(str(nvcc)))[0] is True
    monkeypatch.setenv("PATH", str(home / "bin") + os.pathsep + os.environ.get("PATH", ""))
    assert find_nvcc(None) == str(nvcc)                      # no CUDA_HOME: nvcc on PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_nvcc(None) is None

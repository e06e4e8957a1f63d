"""Build script: the optional C++ (and, where torch has CUDA and an nvcc of the same CUDA major
version exists, CUDA) extension ``layerpar_fast._C``; the rule is layerpar_fast/_build.py.

Install torch first, then ``pip install --no-build-isolation -e .`` so the extension is compiled
against the torch you already have (an isolated build would download another torch).
Set ``LAYERPAR_NO_EXT=1`` to skip the extension; the package then runs on its reference ops.
"""
import glob
import importlib.util
import os

from setuptools import setup


def _build_rules():
    """layerpar_fast/_build.py loaded by path (the package itself needs torch etc. to import)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layerpar_fast", "_build.py")
    spec = importlib.util.spec_from_file_location("_layerpar_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    if os.environ.get("LAYERPAR_NO_EXT", "0") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install
        print("layerpar_fast: torch not importable at build time; skipping the C++ extension")
        return [], {}
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    use_cuda = False
    if cu:
        # CUDA only with torch CUDA + an nvcc whose major version is torch's; else the CPU part
        rules = _build_rules()
        nvcc = rules.find_nvcc(cpp_extension.CUDA_HOME) if torch.version.cuda is not None else None
        text = rules.nvcc_version_text(nvcc) if nvcc else None
        use_cuda, why = rules.cuda_build_decision(torch.version.cuda, nvcc, text)
        if not use_cuda:
            where = (f"; looked for bin/nvcc in CUDA_HOME={cpp_extension.CUDA_HOME}"
                     if torch.version.cuda is not None and cpp_extension.CUDA_HOME and not nvcc else "")
            print(f"layerpar_fast: building the CPU extension only: {why}{where}")
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.13).
    cxx = ["-O3", "-fopenmp"]
    define = [("LAYERPAR_WITH_CUDA", "1")] if use_cuda else []
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "layerpar_fast._C", cpp + cu, define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "layerpar_fast._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

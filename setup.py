"""Build script: the optional C++ (and, where torch has CUDA, CUDA) extension ``layerpar_fast._C``.

Install torch first, then ``pip install --no-build-isolation -e .`` so the extension is compiled
against the torch you already have (an isolated build would download another torch).
Set ``LAYERPAR_NO_EXT=1`` to skip the extension; the package then runs on its reference ops.
"""
import glob
import os

from setuptools import setup


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
    use_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
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

"""Triton kernels of layerpar_fast (installed as ``layerpar_fast.kernels``).

One file per kernel family, each with its launch helpers; ``layerpar_fast.ops`` imports them
lazily and only for CUDA tensors, or for CPU tensors when ``TRITON_INTERPRET=1`` was set before
the first import (Triton's interpreter; how CI tests the kernels without a GPU).
"""
import os

#: True when the kernels were decorated in Triton's interpreter mode (CPU tensors allowed).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

"""One dispatch point for the per-element operations of the parallel phase.

Public API (stable; the engine calls only these):

* ``local_loss(o, target, mult, beta, form, filt) -> (loss, a)``
* ``coarse_input_grad(grad_z, filt) -> g``
* ``jacobi_update_(lam_store, u_store, idx, a, g, beta, gamma) -> new λ̃ rows``
* ``gather_rows(store, idx, out=None)``, ``scatter_rows_(store, idx, rows)``
* ``stage_input(store, idx, filt, channels_last=False) -> z``
* ``backend_report() -> {op: backend}``, ``requested_backend()``, ``available_backends()``,
  ``describe()``, ``nvtx_range(name)``, :class:`StagingRing`, ``reset_backend_cache()``

Backends: ``ref`` (objectives.py, always available), ``cpp`` (the C++ extension, CPU tensors),
``triton`` (CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1`` was set before the kernels
were first imported). ``LAYERPAR_OPS={auto,ref,cpp,triton}`` (read at every call) forces a path:
a forced path that cannot run raises :class:`BackendUnavailable` after a one-time warning.
``auto`` takes triton for CUDA tensors and cpp for CPU tensors when available, else ref;
Triton counts as available on a CUDA device once a one-time test launch of one of its kernels
there succeeded (else one warning, and the reference runs).

Fused coverage: the local loss is fused for both filter kinds (it only involves D); the stage
input is fused for ``avg_nearest`` (and any kind at s = 1), the coarse input gradient for
``avg_nearest`` at s > 1 (at s = 1 it is one scaling op: the reference runs); ``avg_bilinear``
uses the reference code for both. Gather/scatter/λ-step do not depend on the filter. Inputs
the kernels do not take (non-contiguous stores, stores of other dtypes) also go to the
reference. Layouts: a channels_last ``o`` is read as is and its gradient is channels_last.

Rules shared by every backend: indices are 1-D int64/int32; an index outside [0, N) raises
IndexError before any row changes; with repeated indices every occurrence reads the row as it
was before the call and the store keeps the LAST occurrence's value (last write wins).
Arithmetic is float32 whatever the storage dtype (float64 inputs of the C++ local loss are kept
float64, for gradcheck).
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from . import _ext, devsync
from . import objectives as ref
from .filters import FilterPair
from .profiling import nvtx_range  # re-exported: one NVTX helper for the package

__all__ = ["BACKENDS", "OPS", "BackendUnavailable", "StagingRing", "available_backends", "backend_report",
           "coarse_input_grad", "describe", "gather_rows", "jacobi_update_", "local_loss", "nvtx_range",
           "requested_backend", "reset_backend_cache", "scatter_rows_", "stage_input"]

BACKENDS = ("auto", "ref", "cpp", "triton")
OPS = ("local_loss", "coarse_input_grad", "jacobi_update_", "gather_rows", "scatter_rows_", "stage_input")
_STORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_MODULES = ("k_local_loss", "k_upsample", "k_coarse_grad", "k_lambda_step")  # kernels/


class BackendUnavailable(RuntimeError):
    """``LAYERPAR_OPS`` forces a backend that cannot run these tensors here."""


# ----------------------------------------------------------------------------------- dispatch
def requested_backend() -> str:
    """The backend asked for through ``LAYERPAR_OPS`` (default ``auto``)."""
    want = os.environ.get("LAYERPAR_OPS", "auto").strip().lower() or "auto"
    if want not in BACKENDS:
        raise ValueError(f"LAYERPAR_OPS={want!r} is not one of {', '.join(BACKENDS)}")
    return want


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@lru_cache(maxsize=1)
def _triton_state() -> tuple[ModuleType | None, str]:
    """(the kernels package, '') when Triton and the kernels import, else (None, reason)."""
    try:
        importlib.import_module("triton")
        kernels = importlib.import_module("layerpar_fast.kernels")
        for name in KERNEL_MODULES:
            importlib.import_module(f"layerpar_fast.kernels.{name}")
    except Exception as e:  # ImportError, or a Triton that fails while decorating the kernels
        return None, f"{type(e).__name__}: {e}"
    return kernels, ""


def _triton_probe(device: torch.device) -> None:
    """Launch one of the kernels (the λ-step, not autotuned: one compilation) on a few tiny rows
    on ``device``, wait for it, and compare with the reference; raise when anything fails."""
    lam = torch.linspace(-1.0, 1.0, 16, dtype=torch.float32, device=device).reshape(2, 2, 2, 2)
    a = torch.linspace(0.5, -0.5, 16, dtype=torch.float32, device=device).reshape(2, 2, 2, 2)
    g = torch.full_like(a, 0.25)
    idx = torch.tensor([1, 0], dtype=torch.int64, device=device)
    want, _ = ref.lambda_step(lam.index_select(0, idx), None, a, g, 2.0, 0.5)
    got = _kernel("k_lambda_step").lambda_step_(lam.clone(), None, idx, a, g, 2.0, 0.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not torch.allclose(got.float().cpu(), want.float().cpu(), rtol=1e-5, atol=1e-6):
        raise RuntimeError("the test launch of the λ-step kernel gave wrong results")


@lru_cache(maxsize=None)
def _triton_launch_error(device: torch.device) -> str:
    """'' when Triton kernels run on this CUDA device (a one-time test launch, cached per
    device), else the reason. Triton importing is not enough: a GPU newer than the Triton/ptxas
    build, or a broken driver, fails only when a kernel is compiled or launched."""
    kernels, why = _triton_state()
    if kernels is None:
        return why
    try:
        _triton_probe(device)
    except Exception as e:  # compilation (ptxas, unsupported arch), launch, or wrong results
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"a test launch on {device} failed: {type(e).__name__}: {first}"
    return ""


def _triton_cuda_error(device: torch.device) -> str:
    """:func:`_triton_launch_error` for the CUDA device that runs ``device``'s tensors."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _triton_launch_error(torch.device("cuda", index))


_resolved: dict[tuple[str, str], str] = {}


def reset_backend_cache() -> None:
    """Forget cached availability checks, resolved backends and one-time warnings (for tests)."""
    _resolved.clear()
    _triton_state.cache_clear()
    _triton_launch_error.cache_clear()
    _pinned_available.cache_clear()
    _warned.clear()
    _ext.reset()


def _cpp() -> Any:
    mod = _ext.load()
    assert mod is not None
    return mod


def _backend_for(device: torch.device) -> str:
    """The backend that runs tensors on ``device`` under the current ``LAYERPAR_OPS`` (the
    variable is read at every call; the resolution is cached per value and device type)."""
    key = (os.environ.get("LAYERPAR_OPS", "auto"), device.type)
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolve(device)
        _resolved[key] = hit
    return hit


def _resolve(device: torch.device) -> str:
    want = requested_backend()
    if want == "ref":
        return "ref"
    if want == "cpp":
        if not _ext.available():
            msg = f"LAYERPAR_OPS=cpp, but the C++ extension is {_ext.reason()}; {_ext.BUILD_HINT}"
            _warn_once("forced-cpp", msg)
            raise BackendUnavailable(msg)
        if device.type != "cpu":
            raise BackendUnavailable(f"LAYERPAR_OPS=cpp runs CPU tensors only, got a {device} tensor; "
                                     "use auto or triton for GPU tensors")
        return "cpp"
    if want == "triton":
        kernels, why = _triton_state()
        if kernels is None:
            msg = f"LAYERPAR_OPS=triton, but the Triton kernels do not import ({why})"
            _warn_once("forced-triton", msg)
            raise BackendUnavailable(msg)
        if device.type == "cpu" and not kernels.INTERPRET:
            msg = ("LAYERPAR_OPS=triton with CPU tensors needs TRITON_INTERPRET=1 set before "
                   "layerpar_fast.kernels is first imported")
            _warn_once("forced-triton-cpu", msg)
            raise BackendUnavailable(msg)
        if device.type not in ("cpu", "cuda"):
            raise BackendUnavailable(f"LAYERPAR_OPS=triton cannot run {device} tensors")
        if device.type == "cuda":
            why = _triton_cuda_error(device)
            if why:
                msg = f"LAYERPAR_OPS=triton, but the Triton kernels do not run here ({why})"
                _warn_once("forced-triton-cuda", msg)
                raise BackendUnavailable(msg)
        return "triton"
    if device.type == "cuda":
        why = _triton_cuda_error(device)
        if not why:
            return "triton"
        _warn_once("auto-triton", f"layerpar_fast: Triton kernels unavailable ({why}); "
                   "CUDA ops use the reference torch code")
        return "ref"
    if device.type == "cpu" and _ext.available():
        return "cpp"
    return "ref"


def available_backends() -> dict[str, bool]:
    """Which backends can run here: ref always; cpp with the extension; triton with CUDA (or
    with CPU tensors in the interpreter)."""
    kernels = _triton_state()[0]
    cuda_ok = kernels is not None and torch.cuda.is_available() and not _triton_cuda_error(torch.device("cuda"))
    triton_ok = kernels is not None and (cuda_ok or bool(kernels.INTERPRET))
    return {"ref": True, "cpp": _ext.available(), "triton": triton_ok}


def _kernel(name: str) -> Any:
    """A Triton kernel module (already imported by the availability check)."""
    return importlib.import_module(f"layerpar_fast.kernels.{name}")


# ----------------------------------------------------------------------------- index helpers
def _check_index(idx: torch.Tensor, n: int, what: str, device: torch.device | None = None) -> torch.Tensor:
    """Validate a row index (1-D integer, every entry in [0, n)) and return it as int64 on
    ``device`` (default: where it is); one host synchronisation for GPU indices."""
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(idx)
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what}: the row index must be int64 or int32, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{what}: the row index must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(idx)).tolist())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{what}: index {bad} is out of range for a store of {n} rows "
                             f"(valid: 0..{n - 1})")
    return idx.to(device=device if device is not None else idx.device, dtype=torch.int64)


def _last_positions(idx: torch.Tensor) -> torch.Tensor | None:
    """Positions holding the last occurrence of each row, or None when no row repeats."""
    if idx.numel() < 2:
        return None
    srt, perm = torch.sort(idx, stable=True)
    keep = torch.ones_like(srt, dtype=torch.bool)
    keep[:-1] = srt[1:] != srt[:-1]
    if bool(keep.all()):
        return None
    return perm[keep]


def _device_index(idx: torch.Tensor, n: int, what: str,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A row index validated on the host and moved to ``device``, with the positions of each
    row's last occurrence (None when no row repeats), also computed on the host: no device
    synchronisation for the CPU indices the engine uses (a GPU index is copied to the host
    first, which does synchronise: pass CPU indices)."""
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(idx)
    if idx.device.type != "cpu":
        devsync.sync_point(f"{what}: a {idx.device.type} row index read on the host")
        idx = idx.cpu()
    idx = _check_index(idx, n, what)
    last = _last_positions(idx)
    dev = torch.device(device)
    if dev.type == "cpu":
        return idx, last
    return idx.to(dev, non_blocking=True), None if last is None else last.to(dev, non_blocking=True)


def _cpu_index(idx: torch.Tensor) -> torch.Tensor:
    return idx if idx.device.type == "cpu" else idx.cpu()


@lru_cache(maxsize=1)
def _pinned_available() -> bool:
    return torch.cuda.is_available()


def _contig_store(store: torch.Tensor) -> bool:
    return store.is_contiguous() and store.dim() >= 1 and store.dtype in (*_STORE_DTYPES, torch.float64)


# ---------------------------------------------------------------------------------- local loss
def _is_cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _cpp_fwd(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, beta: float, gs: bool,
             s: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    loss, a, gc = _cpp().local_loss_fwd(o, target, mult, beta, gs, s, need_grad)
    return loss, a, (gc if need_grad else None)


def _cpp_bwd(gc: torch.Tensor, grad_loss: torch.Tensor, s: int, dtype: torch.dtype,
             channels_last: bool) -> torch.Tensor:
    scale = float(grad_loss)
    if s == 1 and not channels_last and scale == 1.0 and gc.dtype == dtype:
        return gc  # grad_o = gc: no pass at all (autograd copies before accumulating into a leaf)
    return _cpp().upsample_rows(gc, None, s, scale / float(s * s), dtype, channels_last)


def _triton_fwd(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, beta: float, gs: bool,
                s: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    return _kernel("k_local_loss").local_loss_fwd(o, target, mult, beta, gs, s, need_grad)


def _triton_bwd(gc: torch.Tensor, grad_loss: torch.Tensor, s: int, dtype: torch.dtype,
                channels_last: bool) -> torch.Tensor:
    return _kernel("k_upsample").upsample(gc, None, s, dtype, channels_last, scale=1.0 / (s * s),
                                          scale_tensor=grad_loss.reshape(1).to(torch.float32))


_IMPLS = {"cpp": (_cpp_fwd, _cpp_bwd), "triton": (_triton_fwd, _triton_bwd)}


# ------------------------------------------------------------------ torch.compile custom ops
# Under torch.compile the fused local loss is the custom op ``layerpar::local_loss_fwd`` (its
# backward ``layerpar::local_loss_bwd``): opaque to Dynamo, so a compiled stage (forward + local
# loss) is one graph with no break at the fused op; the fake implementations give Inductor the
# output shapes, dtypes and layouts without running a kernel. Eager calls keep the
# autograd.Function below (no dispatcher overhead, and at s = 1 the gradient is passed through
# without a copy: a custom op may not return an alias of its input).
def _coarse(o: torch.Tensor, s: int) -> tuple[int, int, int, int]:
    b, c, h, w = o.shape
    return (b, c, h // s, w // s)


def _writes_a(o: torch.Tensor, s: int) -> bool:
    """False where the kernels skip writing a = D(o) because it is o itself (s = 1, contiguous fp32)."""
    return not (s == 1 and o.dtype == torch.float32 and o.is_contiguous())


@torch.library.custom_op("layerpar::local_loss_fwd", mutates_args=())
def _lib_local_loss_fwd(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, beta: float,
                        gs: bool, s: int, need_grad: bool, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, a, gc = _IMPLS[backend][0](o, target, mult, beta, gs, s, need_grad)
    # outputs of a custom op never alias each other or an input: "absent" is an empty tensor
    return loss, (o.new_empty(0, dtype=loss.dtype) if a is None else a), \
        (o.new_empty(0, dtype=loss.dtype) if gc is None else gc)


@_lib_local_loss_fwd.register_fake
def _(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, beta: float, gs: bool, s: int,
      need_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = torch.float64 if o.dtype == torch.float64 else torch.float32
    coarse = _coarse(o, s)
    a = o.new_empty(coarse if _writes_a(o, s) else (0,), dtype=dt)
    gc = o.new_empty(coarse if need_grad else (0,), dtype=dt)
    return o.new_empty((), dtype=dt), a, gc


@torch.library.custom_op("layerpar::local_loss_bwd", mutates_args=())
def _lib_local_loss_bwd(gc: torch.Tensor, grad_loss: torch.Tensor, s: int, dtype: torch.dtype,
                        channels_last: bool, backend: str) -> torch.Tensor:
    grad_o = _IMPLS[backend][1](gc, grad_loss, s, dtype, channels_last)
    return grad_o.clone() if grad_o is gc else grad_o


@_lib_local_loss_bwd.register_fake
def _(gc: torch.Tensor, grad_loss: torch.Tensor, s: int, dtype: torch.dtype, channels_last: bool,
      backend: str) -> torch.Tensor:
    b, c, h, w = gc.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return gc.new_empty((b, c, h * s, w * s), dtype=dtype).contiguous(memory_format=fmt)


def _lib_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    o, _t, _m, _beta, _gs, s, _ng, backend = inputs
    ctx.save_for_backward(output[2])
    ctx.meta = (s, o.dtype, _is_cl(o), backend)


def _lib_backward(ctx: Any, grad_loss: torch.Tensor, _ga: Any, _gg: Any) -> tuple[Any, ...]:
    (gc,) = ctx.saved_tensors
    s, dtype, channels_last, backend = ctx.meta
    grad_o = torch.ops.layerpar.local_loss_bwd(gc, grad_loss, s, dtype, channels_last, backend)
    return grad_o, None, None, None, None, None, None, None


_lib_local_loss_fwd.register_autograd(_lib_backward, setup_context=_lib_setup)


class _FusedLocalLoss(torch.autograd.Function):
    """loss(o) with a = D(o) and ∂loss/∂a computed in the forward pass over o; the backward
    expands the coarse gradient: grad_o = Dᵀ(∂loss/∂a)·grad_loss (target/mult are constants)."""

    @staticmethod
    def forward(ctx: Any, o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None,  # type: ignore[override]
                beta: float, gs: bool, s: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        need_grad = bool(ctx.needs_input_grad[0])
        loss, a, gc = _IMPLS[backend][0](o, target, mult, beta, gs, s, need_grad)
        if a is None:  # s = 1, float32 NCHW: a aliases o; local_loss() fills it in
            a = o.new_empty(0)
        ctx.mark_non_differentiable(a)
        ctx.gc = gc
        ctx.meta = (s, o.dtype, _is_cl(o), backend)
        return loss, a

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, grad_a: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        s, dtype, channels_last, backend = ctx.meta
        grad_o = _IMPLS[backend][1](ctx.gc, grad_loss, s, dtype, channels_last)
        return grad_o, None, None, None, None, None, None


def _check_loss_args(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, form: str,
                     filt: FilterPair) -> None:
    if form not in ref.LOSS_FORMS:
        raise ValueError(f"unknown loss form {form!r}; valid: {ref.LOSS_FORMS}")
    if form == "gs" and mult is None:
        raise ValueError("the Gauss-Seidel loss form needs the multiplier rows mu")
    if o.dim() != 4:
        raise ValueError(f"local_loss: o must be (B, C, H, W), got shape {tuple(o.shape)}")
    s = filt.s
    b, c, hh, ww = o.shape
    want = (b, c, hh // s, ww // s)
    if hh % s or ww % s or tuple(target.shape) != want:
        raise ValueError(f"local_loss: target shape {tuple(target.shape)} does not match o {tuple(o.shape)} "
                         f"with s={s} (expected {want})")
    if mult is not None and tuple(mult.shape) != want:
        raise ValueError(f"local_loss: mult shape {tuple(mult.shape)} differs from the expected {want}")


def local_loss(o: torch.Tensor, target: torch.Tensor, mult: torch.Tensor | None, beta: float,
               form: str, filt: FilterPair) -> tuple[torch.Tensor, torch.Tensor]:
    """Local loss of a stage k < K (differentiable w.r.t. ``o``) and ``a = D(o)`` (detached fp32).

    Fused (cpp/triton): one pass over ``o`` (NCHW or channels_last, kept as is) computes a, the
    loss and the coarse gradient; ``loss.backward()`` then writes grad_o in o's layout.
    """
    _check_loss_args(o, target, mult, form, filt)
    compiling = torch.compiler.is_compiling()
    if not compiling:    # (under torch.compile the compiled stage's first call is the sync point)
        devsync.first_call("local_loss", o, target, mult)
    backend = _backend_for(o.device)
    if backend == "ref":
        return ref.local_loss(o, target, mult, beta, form, filt)
    x = o if o.dtype in (torch.float32, torch.float64) else o.float()
    t, m = target, mult
    if backend == "cpp":
        want = torch.float64 if x.dtype == torch.float64 else None
        if want is None and (t.dtype not in _STORE_DTYPES or (m is not None and m.dtype != t.dtype)):
            want = torch.float32
        if want is not None:
            t = t.to(want)
            m = None if m is None else m.to(want)
    if compiling:
        loss, a, _ = torch.ops.layerpar.local_loss_fwd(x, t, m, float(beta), form == "gs", filt.s,
                                                       bool(x.requires_grad), backend)
    else:
        loss, a = _FusedLocalLoss.apply(x, t, m, float(beta), form == "gs", filt.s, backend)
    if a.numel() == 0:
        a = x.detach()  # s = 1: a = D(o) = o, shared like the reference's o.float().detach()
    return loss, a.float()


# --------------------------------------------------------------------------- coarse input grad
def coarse_input_grad(grad_z: torch.Tensor, filt: FilterPair) -> torch.Tensor:
    """g = B·Uᵀ(grad_z), float32 (B, C, H/s, W/s). At s = 1 this is one scaling op and every
    backend runs the reference (there is nothing to fuse)."""
    devsync.first_call("coarse_input_grad", grad_z)
    backend = _backend_for(grad_z.device)
    if backend == "ref" or filt.s == 1 or filt.kind != "avg_nearest" or grad_z.dim() != 4:
        return ref.coarse_input_grad(grad_z, filt)
    filt.check_shape(tuple(grad_z.shape[1:]), "input-gradient")
    if backend == "cpp":
        x = grad_z if grad_z.dtype in (torch.float32, torch.float64) else grad_z.float()
        return _cpp().sum_pool(x, filt.s, float(grad_z.shape[0]))
    return _kernel("k_coarse_grad").coarse_input_grad(grad_z, filt.s)


# ------------------------------------------------------------------------------------- λ-step
def jacobi_update_(lam_store: torch.Tensor, u_store: torch.Tensor | None, idx: torch.Tensor,
                   a: torch.Tensor, g: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Jacobi λ-step (+ AL multiplier step) in place on rows ``idx``; returns the new λ̃ rows
    (store dtype), computed in float32 from the rows as they were before the call."""
    if not beta > 0:
        raise ValueError(f"jacobi_update_: beta must be > 0, got {beta}")
    if u_store is not None and (u_store.shape != lam_store.shape or u_store.device != lam_store.device):
        raise ValueError(f"jacobi_update_: u store {tuple(u_store.shape)} on {u_store.device} does not match "
                         f"the λ̃ store {tuple(lam_store.shape)} on {lam_store.device}")
    devsync.first_call("jacobi_update_", lam_store, u_store, idx, a, g)
    backend = _backend_for(lam_store.device)
    same_dtype = u_store is None or u_store.dtype == lam_store.dtype
    fast = (_contig_store(lam_store) and same_dtype
            and (u_store is None or u_store.is_contiguous()))
    if backend == "cpp" and fast:
        return _cpp().jacobi_update_(lam_store, u_store, _cpu_index(idx), a.to("cpu", torch.float32),
                                     g.to("cpu", torch.float32), float(beta), float(gamma))
    idx, last = _device_index(idx, lam_store.shape[0], "jacobi_update_", lam_store.device)
    if backend == "triton" and fast:
        dev = lam_store.device
        return _kernel("k_lambda_step").lambda_step_(lam_store, u_store, idx, a.to(dev), g.to(dev), float(beta),
                                                     float(gamma), last)
    if last is None:
        return ref.jacobi_update_(lam_store, u_store, idx, a, g, beta, gamma)
    lam = lam_store.index_select(0, idx)
    u = None if u_store is None else u_store.index_select(0, idx)
    lam_new, u_new = ref.lambda_step(lam, u, a, g, beta, gamma)
    rows = lam_new.to(lam_store.dtype)
    lam_store.index_copy_(0, idx[last], rows[last])
    if u_store is not None and u_new is not None:
        u_store.index_copy_(0, idx[last], u_new[last].to(u_store.dtype))
    return rows


# ------------------------------------------------------------------------------ gather/scatter
def gather_rows(store: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """store[idx] in the store dtype, written into ``out`` (a staging buffer of shape
    (len(idx), *row) and the store dtype) when given. cpp: a multi-threaded row copy into
    pinned memory when CUDA is available, so a following ``.to('cuda', non_blocking=True)`` is
    asynchronous."""
    devsync.first_call("gather_rows", store, idx)
    backend = _backend_for(store.device)
    shape = (len(idx), *store.shape[1:])
    if out is not None and (tuple(out.shape) != shape or out.dtype != store.dtype or out.device != store.device):
        raise ValueError(f"gather_rows: out is {tuple(out.shape)}/{out.dtype}/{out.device}, expected "
                         f"{shape}/{store.dtype}/{store.device}")
    if backend == "cpp" and _contig_store(store) and (out is None or out.is_contiguous()):
        if out is None:
            out = torch.empty(shape, dtype=store.dtype, pin_memory=_pinned_available())
        return _cpp().gather_rows_out(store, _cpu_index(idx), out)
    idx, _ = _device_index(idx, store.shape[0], "gather_rows", store.device)
    if out is None:
        return ref.gather_rows(store, idx)
    return torch.index_select(store, 0, idx, out=out)


def scatter_rows_(store: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """store[idx] = rows (cast to the store dtype); with repeated indices the last one wins."""
    devsync.first_call("scatter_rows_", store, idx, rows)
    backend = _backend_for(store.device)
    if backend == "cpp" and _contig_store(store):
        _cpp().scatter_rows_(store, _cpu_index(idx), rows.to("cpu"))
        return
    idx, last = _device_index(idx, store.shape[0], "scatter_rows_", store.device)
    if rows.shape[0] != idx.numel():
        raise ValueError(f"scatter_rows_: {rows.shape[0]} rows for {idx.numel()} indices")
    if last is not None:
        idx, rows = idx[last], rows[last.to(rows.device)]
    ref.scatter_rows_(store, idx, rows)


# --------------------------------------------------------------------------------- stage input
def stage_input(store: torch.Tensor, idx: torch.Tensor, filt: FilterPair,
                channels_last: bool = False) -> torch.Tensor:
    """z = U(store[idx]) in fp32 (gather + upsample + cast fused), NCHW or channels_last."""
    devsync.first_call("stage_input", store, idx)
    backend = _backend_for(store.device)
    fused = (filt.kind == "avg_nearest" or filt.s == 1) and store.dim() == 4 and _contig_store(store)
    if backend == "cpp" and fused:
        if store.dtype == torch.float64:
            z = _cpp().upsample_rows(store, _cpu_index(idx), filt.s, 1.0, torch.float64, channels_last)
            return z.float()
        return _cpp().upsample_rows(store, _cpu_index(idx), filt.s, 1.0, torch.float32, channels_last)
    idx, _ = _device_index(idx, store.shape[0], "stage_input", store.device)
    if backend == "triton" and fused:
        return _kernel("k_upsample").upsample(store, idx, filt.s, torch.float32, channels_last)
    return ref.stage_input(store, idx, filt, channels_last)


# ------------------------------------------------------------------------------------- report
def backend_report(device: str | torch.device = "cpu", kind: str = "avg_nearest") -> dict[str, str]:
    """Which backend each op takes for tensors on ``device`` (default CPU) under the current
    settings; a forced backend that cannot run is reported as ``unavailable (...)``."""
    requested_backend()
    try:
        backend = _backend_for(torch.device(device))
    except BackendUnavailable as e:
        return {op: f"unavailable ({e})" for op in OPS}
    report = {op: backend for op in OPS}
    if backend != "ref" and kind != "avg_nearest":
        for op in ("coarse_input_grad", "stage_input"):
            report[op] = f"ref ({kind}, s>1)"
    if backend == "triton":
        for op in ("gather_rows", "scatter_rows_"):
            report[op] = "torch index ops"
    return report


def describe() -> str:
    """One line for ``layerpar info``: requested backend, what runs CPU/CUDA tensors, why."""
    parts = [f"LAYERPAR_OPS={os.environ.get('LAYERPAR_OPS', 'auto')}"]
    try:
        requested_backend()
        parts.append(f"cpu -> {backend_report('cpu')['local_loss']}")
        if torch.cuda.is_available():
            parts.append(f"cuda -> {backend_report('cuda')['local_loss']}")
    except ValueError as e:
        parts.append(f"error: {e}")
    mod = _ext.load()
    if mod is not None:
        parts.append(f"C++ extension: loaded (torch {mod.built_with_torch()}, CUDA staging: "
                     f"{'yes' if _ext.with_cuda() else 'no'}, {torch.get_num_threads()} threads)")
    else:
        parts.append(f"C++ extension: {_ext.reason()}")
    kernels, why = _triton_state()
    if kernels is None:
        parts.append(f"triton: unavailable ({why})")
    else:
        import triton

        mode = "interpreter" if kernels.INTERPRET else ("CUDA" if torch.cuda.is_available() else "no CUDA device")
        if mode == "CUDA" and _triton_cuda_error(torch.device("cuda")):
            mode = f"CUDA, not used ({_triton_cuda_error(torch.device('cuda'))})"
        parts.append(f"triton {triton.__version__}: {mode}")
    parts.append("avg_bilinear stage_input/coarse_input_grad: ref")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------- staging ring
class StagingRing:
    """Stage rows of a CPU store to a device ahead of use, through a ring of pinned buffers.

    ``t = ring.prefetch(store, idx)`` gathers ``store[idx]`` into the next pinned slot and starts
    its host->device copy on a side stream; ``ring.take(t)`` returns the device rows, ordered
    after the copy on the current stream. Call ``prefetch`` for batch t+1 before computing batch
    t and the copy overlaps the computation. CUDA devices use the C++ ring when the extension
    was built with CUDA, else the same algorithm with torch streams/events; a CPU device
    degenerates to a plain gather.

    **What a ring accepts** (the same for every backend; the C++ ring, csrc/staging.*, checks
    the same rule): tickets are numbered 0, 1, 2, ... in prefetch order and ticket n uses slot
    ``n % slots``. A ``prefetch`` is refused (RuntimeError, "... pending ...") while the ticket
    that last used its slot, n - slots, has not been taken: a slot is reused only after its rows
    were handed over. (So at most ``slots`` tickets are in flight, and fewer when tickets are
    taken out of order: with 2 slots, prefetch 0, prefetch 1, take 1, prefetch 2 is refused
    because ticket 0 still holds slot 0.) ``take`` accepts any pending ticket, in any order; a
    ticket that is not pending (never issued, or already taken) raises KeyError. This class
    checks the rule itself before calling the native ring, so both give the same exception
    type and message for the same sequence (tests/test_hoststore.py).
    """

    def __init__(self, slots: int = 2, device: str | torch.device = "cuda") -> None:
        if slots < 1:
            raise ValueError(f"StagingRing: slots must be >= 1, got {slots}")
        self.device = torch.device(device)
        self.slots = int(slots)
        self._next = 0
        self._pending: dict[int, tuple[torch.Tensor, Any]] = {}
        self._host: list[torch.Tensor | None] = [None] * self.slots
        self._events: list[Any] = [None] * self.slots
        self._native: Any = None
        self._side: Any = None
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            if _ext.with_cuda():
                self._native = _cpp().StagingRing(self.slots, index)
            else:
                self._side = torch.cuda.Stream(device=self.device)

    def prefetch(self, store: torch.Tensor, idx: torch.Tensor) -> int:
        """Gather ``store[idx]`` and start moving it to the device; returns a ticket."""
        if store.device.type != "cpu":
            raise ValueError(f"StagingRing.prefetch: the store must be a CPU tensor, got {store.device}")
        ticket, slot = self._next, self._next % self.slots
        if ticket - self.slots in self._pending:
            raise RuntimeError(f"StagingRing.prefetch: ticket {ticket - self.slots} is still pending in slot {slot} "
                               f"({len(self._pending)} of {self.slots} tickets pending); take() it first")
        if self._native is not None:
            native = int(self._native.prefetch(store, _cpu_index(idx)))
            if native != ticket:
                raise RuntimeError(f"StagingRing: the native ring issued ticket {native}, expected {ticket}")
            self._pending[ticket] = (None, None)
            self._next += 1
            return ticket
        if self.device.type != "cuda":
            self._pending[ticket] = (gather_rows(store, idx), None)
            self._next += 1
            return ticket
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the previous copy out of this pinned slot finished
        shape = (len(idx), *store.shape[1:])
        need = int(torch.Size(shape).numel())
        host = self._host[slot]
        if host is None or host.numel() < need or host.dtype != store.dtype:
            host = torch.empty(max(need, 1), dtype=store.dtype, pin_memory=True)
            self._host[slot] = host
        view = host[:need].view(shape)
        gather_rows(store, idx, out=view)
        with torch.cuda.stream(self._side):
            dev = view.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._side)
        self._events[slot] = event
        self._pending[ticket] = (dev, event)
        self._next += 1
        return ticket

    def take(self, ticket: int) -> torch.Tensor:
        """The rows of ``ticket`` on the device, safe to use on the current stream."""
        if ticket not in self._pending:
            raise KeyError(f"StagingRing.take: no pending ticket {ticket}")
        if self._native is not None:
            self._pending.pop(ticket)
            return self._native.take(int(ticket))
        rows, event = self._pending.pop(ticket)
        if event is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(event)
            rows.record_stream(cur)
        return rows

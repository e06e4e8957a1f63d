// CPU kernels of layerpar_fast's fused ops (docs/method.md §2-§4); Python API in layerpar_fast/ops.py.
//
// Layout conventions: stores and coarse tensors (target, mult, a, g, λ̃/u rows) are contiguous
// NCHW (B, C, h, w); fine tensors (o, grad_o, z, grad_z) are contiguous NCHW or channels_last.
// Index tensors are 1-D int64/int32 on the CPU; an out-of-range entry raises IndexError before
// any row is touched. Repeated indices: every occurrence reads the row's value from before the
// call and the store keeps the LAST occurrence's result (last write wins), in every op.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace layerpar {

// Fused local loss forward, one pass over o: a = D(o) (s×s average), the loss and the coarse
// gradient gc = ∂loss/∂a (what the backward expands: grad_o = Dᵀ(gc)·grad_loss).
//   gs = false: loss = (β/(2d)) Σ‖a − t (+ m)‖² / B,   gc = (β/d)(a − t (+ m)) / B
//   gs = true:  loss = (Σ⟨a, m⟩ + (β/(2d)) Σ‖a − t‖²) / B,   gc = (m + (β/d)(a − t)) / B
// o: float32/float64; target/mult: float32/float64/bfloat16/float16 (same dtype).
// Returns (loss 0-dim, a, gc) in o's dtype; gc is empty when need_grad is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> local_loss_fwd(
    const at::Tensor& o, const at::Tensor& target, const std::optional<at::Tensor>& mult,
    double beta, bool gs, int64_t s, bool need_grad);

// Nearest-neighbour upsampling by s of src rows (all rows, or rows idx), times scale, cast to
// out_dtype (float32/float64), written NCHW or channels_last. Used for stage_input (scale 1)
// and for the local-loss backward (src = gc, scale = grad_loss / s²).
at::Tensor upsample_rows(const at::Tensor& src, const std::optional<at::Tensor>& idx, int64_t s,
                         double scale, at::ScalarType out_dtype, bool channels_last);

// scale · (s×s sum pooling of x), float32 NCHW: coarse_input_grad with scale = B.
at::Tensor sum_pool(const at::Tensor& x, int64_t s, double scale);

// Jacobi λ-step (+ multiplier step when u_store is given) in place on rows idx; returns the
// new λ̃ rows in the store dtype. a, g: float32 (B, row...).
at::Tensor jacobi_update_(at::Tensor& lam_store, const std::optional<at::Tensor>& u_store,
                          const at::Tensor& idx, const at::Tensor& a, const at::Tensor& g,
                          double beta, double gamma);

// out[p] = store[idx[p]] (same dtype, out contiguous (B, row...)); returns out.
at::Tensor gather_rows_out(const at::Tensor& store, const at::Tensor& idx, at::Tensor& out);

// store[idx[p]] = rows[p] cast to the store dtype; last occurrence wins.
void scatter_rows_(at::Tensor& store, const at::Tensor& idx, const at::Tensor& rows);

// "MAJOR.MINOR.PATCH" of the torch headers this extension was compiled against.
std::string built_with_torch();

}  // namespace layerpar

// CPU implementations of the fused ops declared in layerpar_ops.h.
//
// Parallelism: at::parallel_for over independent tasks (planes, coarse rows or sample rows);
// reductions keep one partial per task and sum them serially in task order, so results are
// bitwise independent of the thread count. Arithmetic is float32 (float64 for float64 inputs)
// whatever the storage dtype.
#include "layerpar_ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/headeronly/version.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

namespace layerpar {
namespace {

constexpr int64_t kGrainElems = 16384;  // elements per parallel chunk, at least

int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_task));
}

// Compute type of a storage type: float for everything but double.
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename F>
void dispatch_store(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); return;
    case at::kDouble: f(double{}); return;
    case at::kBFloat16: f(at::BFloat16{}); return;
    case at::kHalf: f(at::Half{}); return;
    default:
      TORCH_CHECK(false, what, ": dtype ", st,
                  " is not supported (valid: float32, float64, bfloat16, float16)");
  }
}

// (compute, storage) dtype pairs with a kernel: (float32, float32|bfloat16|float16) and
// (float64, float64). ops.py casts other combinations to one of these first.
template <typename F>
void dispatch_pair(at::ScalarType compute, at::ScalarType store, const char* what, F&& f) {
  if (compute == at::kFloat) {
    switch (store) {
      case at::kFloat: f(float{}, float{}); return;
      case at::kBFloat16: f(float{}, at::BFloat16{}); return;
      case at::kHalf: f(float{}, at::Half{}); return;
      default: break;
    }
  } else if (compute == at::kDouble && store == at::kDouble) {
    f(double{}, double{});
    return;
  }
  TORCH_CHECK(false, what, ": dtype pair (", compute, ", ", store, ") is not supported (valid: (float32, ",
              "float32|bfloat16|float16), (float64, float64))");
}

// s as a compile-time constant for the common factors (1, 2, 4) when `fast`; 0 means "runtime s"
// (used for float64 and channels_last too, to bound the number of instantiations).
template <typename F>
void dispatch_s(int64_t s, bool fast, F&& f) {
  if (fast) {
    switch (s) {
      case 1: f(std::integral_constant<int, 1>{}); return;
      case 2: f(std::integral_constant<int, 2>{}); return;
      case 4: f(std::integral_constant<int, 4>{}); return;
      default: break;
    }
  }
  f(std::integral_constant<int, 0>{});
}

// ---------------------------------------------------------------------------------------------
// Index checking: range, and which positions hold the last occurrence of their row.
struct RowIndex {
  std::vector<int64_t> rows;
  std::vector<uint8_t> last;  // last[p] = 1 iff no q > p has rows[q] == rows[p]
  bool has_dup = false;
};

RowIndex check_index(const at::Tensor& idx, int64_t n, const char* what) {
  TORCH_CHECK(idx.device().is_cpu(), what, ": the index tensor must be on the CPU, got ", idx.device());
  TORCH_CHECK(idx.dim() == 1, what, ": the index tensor must be 1-D, got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, what,
              ": the index tensor must be int64 or int32, got ", idx.scalar_type());
  const at::Tensor i64 = idx.to(at::kLong).contiguous();
  const int64_t b = i64.numel();
  const int64_t* p = i64.data_ptr<int64_t>();
  RowIndex out;
  out.rows.assign(p, p + b);
  for (int64_t q = 0; q < b; ++q) {
    TORCH_CHECK_INDEX(out.rows[q] >= 0 && out.rows[q] < n, what, ": index ", out.rows[q],
                      " at position ", q, " is out of range for a store of ", n,
                      " rows (valid: 0..", n - 1, ")");
  }
  std::vector<std::pair<int64_t, int64_t>> order(b);
  for (int64_t q = 0; q < b; ++q) order[q] = {out.rows[q], q};
  std::sort(order.begin(), order.end());
  out.last.assign(b, 0);
  for (int64_t q = 0; q < b; ++q) {
    if (q + 1 < b && order[q + 1].first == order[q].first) {
      out.has_dup = true;
    } else {
      out.last[order[q].second] = 1;
    }
  }
  return out;
}

int64_t row_numel(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.numel() / std::max<int64_t>(1, t.size(0)); }

bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_fine_coarse(const at::Tensor& fine, const at::Tensor& coarse, int64_t s, const char* what) {
  TORCH_CHECK(fine.dim() == 4, what, ": expected a 4-D (B, C, H, W) tensor, got shape ", fine.sizes());
  TORCH_CHECK(coarse.dim() == 4 && coarse.size(0) == fine.size(0) && coarse.size(1) == fine.size(1) &&
                  coarse.size(2) * s == fine.size(2) && coarse.size(3) * s == fine.size(3),
              what, ": coarse shape ", coarse.sizes(), " does not match fine shape ", fine.sizes(),
              " with s=", s);
}

// ---------------------------------------------------------------------------------------------
// Local loss. MODE 0: penalty (a − t), 1: AL Jacobi (a − t + m), 2: Gauss-Seidel.
template <int MODE, typename T, typename S>
inline void loss_point(T av, const S* tgt, const S* mult, int64_t q, T coef, T inv_b, T& sq, T& lin,
                       T& g) {
  const T t = static_cast<T>(tgt[q]);
  if constexpr (MODE == 2) {
    const T m = static_cast<T>(mult[q]);
    const T diff = av - t;
    lin += av * m;
    sq += diff * diff;
    g = (m + coef * diff) * inv_b;
  } else {
    T r = av - t;
    if constexpr (MODE == 1) r += static_cast<T>(mult[q]);
    sq += r * r;
    g = coef * r * inv_b;
  }
}

template <int MODE, int SS, typename T, typename S>
void local_loss_nchw(const T* o, const S* tgt, const S* mult, T* a, T* gc, double* psq, double* plin,
                     int64_t B, int64_t C, int64_t h, int64_t w, int64_t s_rt, T coef, T inv_b) {
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s;
  const T inv_s2 = T(1) / static_cast<T>(s * s);
  at::parallel_for(0, B * C, grain_for(h * W * s), [&](int64_t p0, int64_t p1) {
    std::vector<T> acc(w);
    for (int64_t p = p0; p < p1; ++p) {
      const T* op = o + p * h * s * W;
      double sq = 0, lin = 0;
      for (int64_t i = 0; i < h; ++i) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t dy = 0; dy < s; ++dy) {
          const T* row = op + (i * s + dy) * W;
          if constexpr (SS == 1) {
            for (int64_t j = 0; j < w; ++j) acc[j] += row[j];
          } else {
            for (int64_t j = 0; j < w; ++j) {
              T v = 0;
              for (int64_t dx = 0; dx < s; ++dx) v += row[j * s + dx];
              acc[j] += v;
            }
          }
        }
        const int64_t q0 = (p * h + i) * w;
        T rsq = 0, rlin = 0;
        for (int64_t j = 0; j < w; ++j) {
          const T av = acc[j] * inv_s2;
          T g;
          loss_point<MODE>(av, tgt, mult, q0 + j, coef, inv_b, rsq, rlin, g);
          a[q0 + j] = av;
          if (gc) gc[q0 + j] = g;
        }
        sq += rsq;
        lin += rlin;
      }
      psq[p] = sq;
      plin[p] = lin;
    }
  });
}

// o channels_last: one task per (b, coarse row i); the channel loop is innermost (contiguous).
template <int MODE, int SS, typename T, typename S>
void local_loss_nhwc(const T* o, const S* tgt, const S* mult, T* a, T* gc, double* psq, double* plin,
                     int64_t B, int64_t C, int64_t h, int64_t w, int64_t s_rt, T coef, T inv_b) {
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s, H = h * s;
  const T inv_s2 = T(1) / static_cast<T>(s * s);
  at::parallel_for(0, B * h, grain_for(s * W * C), [&](int64_t t0, int64_t t1) {
    std::vector<T> acc(w * C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / h, i = t % h;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t dy = 0; dy < s; ++dy) {
        const T* row = o + ((b * H) + i * s + dy) * W * C;
        for (int64_t j = 0; j < w; ++j) {
          T* ac = acc.data() + j * C;
          for (int64_t dx = 0; dx < s; ++dx) {
            const T* px = row + (j * s + dx) * C;
            for (int64_t c = 0; c < C; ++c) ac[c] += px[c];
          }
        }
      }
      T sq = 0, lin = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t q0 = ((b * C + c) * h + i) * w;
        for (int64_t j = 0; j < w; ++j) {
          const T av = acc[j * C + c] * inv_s2;
          T g;
          loss_point<MODE>(av, tgt, mult, q0 + j, coef, inv_b, sq, lin, g);
          a[q0 + j] = av;
          if (gc) gc[q0 + j] = g;
        }
      }
      psq[t] = sq;
      plin[t] = lin;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Upsampling (nearest) with optional row gather and scale.
template <int SS, typename S, typename O>
void upsample_nchw(const S* src, const int64_t* rows, O* out, int64_t B, int64_t C, int64_t h, int64_t w,
                   int64_t s_rt, acc_t<O> scale) {
  using A = acc_t<O>;
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s;
  const int64_t d = C * h * w;
  at::parallel_for(0, B * C * h, grain_for(s * W), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (C * h), ci = t % (C * h);  // ci = c * h + i
      const S* sp = src + (rows ? rows[b] : b) * d + ci * w;
      O* op = out + (b * C * h + ci) * s * W;  // fine row (c, i*s) of sample b
      if constexpr (SS == 1) {
        for (int64_t j = 0; j < w; ++j) op[j] = static_cast<O>(static_cast<A>(sp[j]) * scale);
      } else {
        for (int64_t j = 0; j < w; ++j) {
          const O v = static_cast<O>(static_cast<A>(sp[j]) * scale);
          for (int64_t dx = 0; dx < s; ++dx) op[j * s + dx] = v;
        }
        for (int64_t dy = 1; dy < s; ++dy) std::memcpy(op + dy * W, op, sizeof(O) * W);
      }
    }
  });
}

template <int SS, typename S, typename O>
void upsample_nhwc(const S* src, const int64_t* rows, O* out, int64_t B, int64_t C, int64_t h, int64_t w,
                   int64_t s_rt, acc_t<O> scale) {
  using A = acc_t<O>;
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s, H = h * s;
  const int64_t hw = h * w, d = C * hw;
  at::parallel_for(0, B * h, grain_for(s * W * C), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / h, i = t % h;
      const S* sp = src + (rows ? rows[b] : b) * d + i * w;
      O* op = out + (b * H + i * s) * W * C;
      for (int64_t j = 0; j < w; ++j) {
        O* px = op + j * s * C;
        for (int64_t c = 0; c < C; ++c) px[c] = static_cast<O>(static_cast<A>(sp[c * hw + j]) * scale);
        for (int64_t dx = 1; dx < s; ++dx) std::memcpy(px + dx * C, px, sizeof(O) * C);
      }
      for (int64_t dy = 1; dy < s; ++dy) std::memcpy(op + dy * W * C, op, sizeof(O) * W * C);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// scale · sum pooling, float32 output.
template <int SS, typename T>
void sum_pool_nchw(const T* x, float* out, int64_t B, int64_t C, int64_t h, int64_t w, int64_t s_rt,
                   float scale) {
  using A = acc_t<T>;
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s;
  at::parallel_for(0, B * C * h, grain_for(s * W), [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(w);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), A(0));
      const T* xp = x + t * s * W;  // t = (b*C + c)*h + i; fine rows i*s .. i*s+s-1
      for (int64_t dy = 0; dy < s; ++dy) {
        const T* row = xp + dy * W;
        for (int64_t j = 0; j < w; ++j) {
          A v = 0;
          for (int64_t dx = 0; dx < s; ++dx) v += static_cast<A>(row[j * s + dx]);
          acc[j] += v;
        }
      }
      float* op = out + t * w;
      for (int64_t j = 0; j < w; ++j) op[j] = static_cast<float>(acc[j] * static_cast<A>(scale));
    }
  });
}

template <int SS, typename T>
void sum_pool_nhwc(const T* x, float* out, int64_t B, int64_t C, int64_t h, int64_t w, int64_t s_rt,
                   float scale) {
  using A = acc_t<T>;
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s, H = h * s;
  at::parallel_for(0, B * h, grain_for(s * W * C), [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(w * C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / h, i = t % h;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t dy = 0; dy < s; ++dy) {
        const T* row = x + (b * H + i * s + dy) * W * C;
        for (int64_t j = 0; j < w; ++j) {
          A* ac = acc.data() + j * C;
          for (int64_t dx = 0; dx < s; ++dx) {
            const T* px = row + (j * s + dx) * C;
            for (int64_t c = 0; c < C; ++c) ac[c] += static_cast<A>(px[c]);
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        float* op = out + ((b * C + c) * h + i) * w;
        for (int64_t j = 0; j < w; ++j) op[j] = static_cast<float>(acc[j * C + c] * static_cast<A>(scale));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Jacobi λ-step. in_place: write the store rows directly (no repeated indices); otherwise write
// the new rows to out / u_out only (the caller scatters the last occurrences).
template <bool HAS_U, typename S>
void jacobi_rows(S* lam, S* u, const int64_t* rows, const float* a, const float* g, S* out, S* u_out,
                 int64_t B, int64_t d, float cg, float c1g, float cgd, bool in_place) {
  at::parallel_for(0, B, grain_for(d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      S* lr = lam + rows[b] * d;
      S* ur = HAS_U ? u + rows[b] * d : nullptr;
      const float* ar = a + b * d;
      const float* gr = g + b * d;
      S* orow = out + b * d;
      S* uo = HAS_U ? (in_place ? ur : u_out + b * d) : nullptr;
      for (int64_t k = 0; k < d; ++k) {
        const float l = static_cast<float>(lr[k]);
        float au = ar[k];
        float uk = 0;
        if constexpr (HAS_U) {
          uk = static_cast<float>(ur[k]);
          au += uk;
        }
        const float ln = cg * au + c1g * l - cgd * gr[k];
        const S lns = static_cast<S>(ln);
        orow[k] = lns;
        if (in_place) lr[k] = lns;
        if constexpr (HAS_U) uo[k] = static_cast<S>(uk + (ar[k] - ln));
      }
    }
  });
}

// store rows[p] = src[p] for the positions p flagged in `last` (distinct destinations).
template <typename D, typename S>
void scatter_last(D* store, const int64_t* rows, const uint8_t* last, const S* src, int64_t B, int64_t d) {
  at::parallel_for(0, B, grain_for(d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!last[b]) continue;
      D* dst = store + rows[b] * d;
      const S* sp = src + b * d;
      if constexpr (std::is_same_v<D, S>) {
        std::memcpy(dst, sp, sizeof(D) * d);
      } else {
        for (int64_t k = 0; k < d; ++k) dst[k] = static_cast<D>(static_cast<acc_t<S>>(sp[k]));
      }
    }
  });
}

}  // namespace

// =============================================================================================
std::tuple<at::Tensor, at::Tensor, at::Tensor> local_loss_fwd(
    const at::Tensor& o_in, const at::Tensor& target, const std::optional<at::Tensor>& mult,
    double beta, bool gs, int64_t s, bool need_grad) {
  const char* what = "local_loss";
  TORCH_CHECK(s >= 1, what, ": s must be >= 1, got ", s);
  TORCH_CHECK(o_in.device().is_cpu() && target.device().is_cpu(), what, ": CPU tensors expected");
  check_fine_coarse(o_in, target, s, what);
  TORCH_CHECK(!gs || mult.has_value(), what, ": the Gauss-Seidel form needs the multiplier rows mu");
  const bool nhwc = is_channels_last(o_in);
  const at::Tensor o = nhwc ? o_in : o_in.contiguous();
  const at::Tensor t = target.contiguous();
  at::Tensor m;
  if (mult.has_value()) {
    TORCH_CHECK(mult->sizes() == target.sizes(), what, ": mult shape ", mult->sizes(),
                " differs from target shape ", target.sizes());
    TORCH_CHECK(mult->scalar_type() == target.scalar_type(), what, ": mult dtype ", mult->scalar_type(),
                " differs from target dtype ", target.scalar_type());
    TORCH_CHECK(mult->device().is_cpu(), what, ": CPU tensors expected");
    m = mult->contiguous();
  }
  const int64_t B = o.size(0), C = o.size(1), h = t.size(2), w = t.size(3);
  const int64_t d = C * h * w;
  TORCH_CHECK(B > 0 && d > 0, what, ": empty input of shape ", o.sizes());
  at::Tensor a = at::empty(t.sizes(), o.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor gc = need_grad ? at::empty_like(a) : at::Tensor();
  const int64_t ntask = nhwc ? B * h : B * C;
  std::vector<double> psq(ntask, 0.0), plin(ntask, 0.0);
  const int mode = gs ? 2 : (m.defined() ? 1 : 0);
  dispatch_pair(o.scalar_type(), t.scalar_type(), what, [&](auto otag, auto stag) {
    using T = decltype(otag);
    using S = decltype(stag);
    const T coef = static_cast<T>(beta / static_cast<double>(d));
    const T inv_b = T(1) / static_cast<T>(B);
    const S* mp = m.defined() ? m.data_ptr<S>() : nullptr;
    T* gp = need_grad ? gc.data_ptr<T>() : nullptr;
    auto run = [&](auto mode_c) {
      constexpr int MODE = decltype(mode_c)::value;
      if (nhwc) {
        local_loss_nhwc<MODE, 0, T, S>(o.data_ptr<T>(), t.data_ptr<S>(), mp, a.data_ptr<T>(), gp, psq.data(),
                                       plin.data(), B, C, h, w, s, coef, inv_b);
        return;
      }
      dispatch_s(s, std::is_same_v<T, float>, [&](auto sc) {
        constexpr int SS = decltype(sc)::value;
        local_loss_nchw<MODE, SS, T, S>(o.data_ptr<T>(), t.data_ptr<S>(), mp, a.data_ptr<T>(), gp, psq.data(),
                                        plin.data(), B, C, h, w, s, coef, inv_b);
      });
    };
    if (mode == 0) run(std::integral_constant<int, 0>{});
    else if (mode == 1) run(std::integral_constant<int, 1>{});
    else run(std::integral_constant<int, 2>{});
  });
  double sq = 0, lin = 0;
  for (int64_t k = 0; k < ntask; ++k) {
    sq += psq[k];
    lin += plin[k];
  }
  const double loss = (lin + 0.5 * (beta / static_cast<double>(d)) * sq) / static_cast<double>(B);
  return {at::scalar_tensor(loss, o.options()), a, gc};
}

at::Tensor upsample_rows(const at::Tensor& src_in, const std::optional<at::Tensor>& idx, int64_t s,
                         double scale, at::ScalarType out_dtype, bool channels_last) {
  const char* what = "upsample_rows";
  TORCH_CHECK(s >= 1, what, ": s must be >= 1, got ", s);
  TORCH_CHECK(src_in.device().is_cpu(), what, ": CPU tensors expected");
  TORCH_CHECK(src_in.dim() == 4, what, ": expected (N, C, h, w) rows, got shape ", src_in.sizes());
  const at::Tensor src = src_in.contiguous();
  RowIndex ri;
  int64_t B = src.size(0);
  if (idx.has_value()) {
    ri = check_index(*idx, src.size(0), what);
    B = static_cast<int64_t>(ri.rows.size());
  }
  const int64_t C = src.size(1), h = src.size(2), w = src.size(3);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({B, C, h * s, w * s}, src.options().dtype(out_dtype).memory_format(fmt));
  if (out.numel() == 0) return out;
  const int64_t* rows = idx.has_value() ? ri.rows.data() : nullptr;
  const bool nhwc = channels_last && is_channels_last(out);
  dispatch_pair(out_dtype, src.scalar_type(), what, [&](auto otag, auto stag) {
    using O = decltype(otag);
    using S = decltype(stag);
    const auto sca = static_cast<acc_t<O>>(scale);
    if (nhwc) {
      upsample_nhwc<0, S, O>(src.data_ptr<S>(), rows, out.data_ptr<O>(), B, C, h, w, s, sca);
      return;
    }
    dispatch_s(s, std::is_same_v<O, float>, [&](auto sc) {
      constexpr int SS = decltype(sc)::value;
      upsample_nchw<SS, S, O>(src.data_ptr<S>(), rows, out.data_ptr<O>(), B, C, h, w, s, sca);
    });
  });
  return out;
}

at::Tensor sum_pool(const at::Tensor& x_in, int64_t s, double scale) {
  const char* what = "coarse_input_grad";
  TORCH_CHECK(s >= 1, what, ": s must be >= 1, got ", s);
  TORCH_CHECK(x_in.device().is_cpu(), what, ": CPU tensors expected");
  TORCH_CHECK(x_in.dim() == 4, what, ": expected a 4-D (B, C, H, W) tensor, got shape ", x_in.sizes());
  TORCH_CHECK(x_in.size(2) % s == 0 && x_in.size(3) % s == 0, what, ": s=", s,
              " does not divide the spatial shape ", x_in.sizes());
  const bool nhwc = is_channels_last(x_in);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), h = x.size(2) / s, w = x.size(3) / s;
  at::Tensor out = at::empty({B, C, h, w}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, what, ": dtype ",
              x.scalar_type(), " is not supported (valid: float32, float64)");
  const float sc32 = static_cast<float>(scale);
  if (x.scalar_type() == at::kDouble) {
    if (nhwc) sum_pool_nhwc<0, double>(x.data_ptr<double>(), out.data_ptr<float>(), B, C, h, w, s, sc32);
    else sum_pool_nchw<0, double>(x.data_ptr<double>(), out.data_ptr<float>(), B, C, h, w, s, sc32);
  } else if (nhwc) {
    sum_pool_nhwc<0, float>(x.data_ptr<float>(), out.data_ptr<float>(), B, C, h, w, s, sc32);
  } else {
    dispatch_s(s, true, [&](auto sc) {
      constexpr int SS = decltype(sc)::value;
      sum_pool_nchw<SS, float>(x.data_ptr<float>(), out.data_ptr<float>(), B, C, h, w, s, sc32);
    });
  }
  return out;
}

at::Tensor jacobi_update_(at::Tensor& lam_store, const std::optional<at::Tensor>& u_store,
                          const at::Tensor& idx, const at::Tensor& a_in, const at::Tensor& g_in,
                          double beta, double gamma) {
  const char* what = "jacobi_update_";
  TORCH_CHECK(beta > 0, what, ": beta must be > 0, got ", beta);
  TORCH_CHECK(lam_store.device().is_cpu() && lam_store.is_contiguous() && lam_store.dim() >= 1, what,
              ": the λ̃ store must be a contiguous CPU tensor");
  const bool has_u = u_store.has_value();
  if (has_u) {
    TORCH_CHECK(u_store->device().is_cpu() && u_store->is_contiguous(), what,
                ": the u store must be a contiguous CPU tensor");
    TORCH_CHECK(u_store->sizes() == lam_store.sizes() && u_store->scalar_type() == lam_store.scalar_type(),
                what, ": u store ", u_store->sizes(), "/", u_store->scalar_type(), " differs from λ̃ store ",
                lam_store.sizes(), "/", lam_store.scalar_type());
  }
  const RowIndex ri = check_index(idx, lam_store.size(0), what);
  const int64_t B = static_cast<int64_t>(ri.rows.size());
  const int64_t d = row_numel(lam_store);
  TORCH_CHECK(a_in.numel() == B * d && g_in.numel() == B * d, what, ": a ", a_in.sizes(), " and g ",
              g_in.sizes(), " must hold ", B, " rows of ", d, " elements");
  TORCH_CHECK(a_in.scalar_type() == at::kFloat && g_in.scalar_type() == at::kFloat, what,
              ": a and g must be float32");
  const at::Tensor a = a_in.contiguous(), g = g_in.contiguous();
  std::vector<int64_t> shape(lam_store.sizes().begin(), lam_store.sizes().end());
  shape[0] = B;
  at::Tensor out = at::empty(shape, lam_store.options());
  if (B == 0 || d == 0) return out;
  const float cg = static_cast<float>(gamma);
  const float c1g = static_cast<float>(1.0 - gamma);
  const float cgd = static_cast<float>(gamma * static_cast<double>(d) / beta);
  dispatch_store(lam_store.scalar_type(), what, [&](auto tag) {
    using S = decltype(tag);
    S* lp = lam_store.data_ptr<S>();
    S* up = has_u ? u_store->data_ptr<S>() : nullptr;
    at::Tensor u_tmp = (has_u && ri.has_dup) ? at::empty(shape, lam_store.options()) : at::Tensor();
    S* utp = u_tmp.defined() ? u_tmp.data_ptr<S>() : nullptr;
    const bool in_place = !ri.has_dup;
    if (has_u) {
      jacobi_rows<true, S>(lp, up, ri.rows.data(), a.data_ptr<float>(), g.data_ptr<float>(), out.data_ptr<S>(),
                           utp, B, d, cg, c1g, cgd, in_place);
    } else {
      jacobi_rows<false, S>(lp, up, ri.rows.data(), a.data_ptr<float>(), g.data_ptr<float>(),
                            out.data_ptr<S>(), utp, B, d, cg, c1g, cgd, in_place);
    }
    if (!in_place) {
      scatter_last<S, S>(lp, ri.rows.data(), ri.last.data(), out.data_ptr<S>(), B, d);
      if (has_u) scatter_last<S, S>(up, ri.rows.data(), ri.last.data(), utp, B, d);
    }
  });
  return out;
}

at::Tensor gather_rows_out(const at::Tensor& store, const at::Tensor& idx, at::Tensor& out) {
  const char* what = "gather_rows";
  TORCH_CHECK(store.device().is_cpu() && store.is_contiguous() && store.dim() >= 1, what,
              ": the store must be a contiguous CPU tensor");
  const RowIndex ri = check_index(idx, store.size(0), what);
  const int64_t B = static_cast<int64_t>(ri.rows.size());
  const int64_t d = row_numel(store);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.numel() == B * d &&
                  out.scalar_type() == store.scalar_type(),
              what, ": out must be a contiguous CPU ", store.scalar_type(), " tensor of ", B * d, " elements");
  if (B == 0 || d == 0) return out;
  const int64_t row_bytes = d * static_cast<int64_t>(store.element_size());
  const char* sp = static_cast<const char*>(store.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t* rows = ri.rows.data();
  at::parallel_for(0, B, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, row_bytes)),
                   [&](int64_t b0, int64_t b1) {
                     for (int64_t b = b0; b < b1; ++b) std::memcpy(op + b * row_bytes, sp + rows[b] * row_bytes, row_bytes);
                   });
  return out;
}

void scatter_rows_(at::Tensor& store, const at::Tensor& idx, const at::Tensor& rows_in) {
  const char* what = "scatter_rows_";
  TORCH_CHECK(store.device().is_cpu() && store.is_contiguous() && store.dim() >= 1, what,
              ": the store must be a contiguous CPU tensor");
  TORCH_CHECK(rows_in.device().is_cpu(), what, ": rows must be a CPU tensor");
  const RowIndex ri = check_index(idx, store.size(0), what);
  const int64_t B = static_cast<int64_t>(ri.rows.size());
  const int64_t d = row_numel(store);
  TORCH_CHECK(rows_in.numel() == B * d, what, ": rows ", rows_in.sizes(), " must hold ", B, " rows of ", d,
              " elements");
  if (B == 0 || d == 0) return;
  const at::Tensor rows = rows_in.contiguous();
  dispatch_store(store.scalar_type(), what, [&](auto dtag) {
    using D = decltype(dtag);
    dispatch_store(rows.scalar_type(), what, [&](auto stag) {
      using S = decltype(stag);
      scatter_last<D, S>(store.data_ptr<D>(), ri.rows.data(), ri.last.data(), rows.data_ptr<S>(), B, d);
    });
  });
}

std::string built_with_torch() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace layerpar

// CPU implementations of the fused ops declared in layerpar_ops.h.
//
// Parallelism: at::parallel_for over independent tasks (planes, coarse rows or sample rows);
// reductions keep one partial per task and sum them serially in task order, so results are
// bitwise independent of the thread count. Arithmetic is float32 (float64 for float64 inputs)
// whatever the storage dtype.
//
// Vectorisation: inner loops work on raw element types (float, double, uint16_t for bf16/fp16)
// with branch-free conversions (round to nearest even, as torch's casts) and `omp simd`, so the
// compiler vectorises them at the baseline ISA; no -march flag is needed. float16 goes through
// blocks converted with F16C instructions when the CPU has them (checked at run time).
#include "layerpar_ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/headeronly/version.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LAYERPAR_X86 1
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace layerpar {
namespace {

constexpr int64_t kGrainElems = 16384;  // elements per parallel chunk, at least

int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_task));
}

// ---------------------------------------------------------------------------------------------
// Storage types: raw element type, compute type, branch-free conversions.
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename S>
struct Store;

template <>
struct Store<float> {
  using raw = float;
  using acc = float;
  static float ld(float v) { return v; }
  static float st(float v) { return v; }
};

template <>
struct Store<double> {
  using raw = double;
  using acc = double;
  static double ld(double v) { return v; }
  static double st(double v) { return v; }
};

template <>
struct Store<at::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static float ld(uint16_t v) { return u2f(static_cast<uint32_t>(v) << 16); }
  static uint16_t st(float f) {  // round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16)
    const uint32_t u = f2u(f);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
  }
};

template <>
struct Store<at::Half> {  // IEEE half <-> float as c10::Half's portable path (FP16 library)
  using raw = uint16_t;
  using acc = float;
  static float ld(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized));
    return u2f(result);
  }
  static uint16_t st(float f) {
    const float abs_f = u2f(f2u(f) & 0x7FFFFFFFu);
    float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f2u(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f2u(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

template <typename S>
using raw_t = typename Store<S>::raw;
template <typename S>
using acc_t = typename Store<S>::acc;

// Convert a compute value v to storage type D.
template <typename D, typename V>
inline raw_t<D> to_store(V v) {
  return Store<D>::st(static_cast<acc_t<D>>(v));
}

// float16 <-> float32 arrays: F16C (+AVX) when the CPU has it, else the portable conversion.
#ifdef LAYERPAR_X86
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  }
  for (; k < n; ++k) dst[k] = Store<at::Half>::ld(src[k]);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), h);
  }
  for (; k < n; ++k) dst[k] = Store<at::Half>::st(src[k]);
}

// bfloat16: the portable conversions, compiled for AVX2 (the baseline ISA lacks the packs).
__attribute__((target("avx2"))) void bf16_to_float_avx2(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = Store<at::BFloat16>::ld(src[k]);
}

__attribute__((target("avx2"))) void float_to_bf16_avx2(const float* src, uint16_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = Store<at::BFloat16>::st(src[k]);
}

const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
const bool kHasAVX2 = __builtin_cpu_supports("avx2");
#else
const bool kHasF16C = false;
const bool kHasAVX2 = false;
#endif

void half_to_float(const uint16_t* src, float* dst, int64_t n) {
#ifdef LAYERPAR_X86
  if (kHasF16C) return half_to_float_f16c(src, dst, n);
#endif
  for (int64_t k = 0; k < n; ++k) dst[k] = Store<at::Half>::ld(src[k]);
}

void float_to_half(const float* src, uint16_t* dst, int64_t n) {
#ifdef LAYERPAR_X86
  if (kHasF16C) return float_to_half_f16c(src, dst, n);
#endif
  for (int64_t k = 0; k < n; ++k) dst[k] = Store<at::Half>::st(src[k]);
}

void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
#ifdef LAYERPAR_X86
  if (kHasAVX2) return bf16_to_float_avx2(src, dst, n);
#endif
  for (int64_t k = 0; k < n; ++k) dst[k] = Store<at::BFloat16>::ld(src[k]);
}

void float_to_bf16(const float* src, uint16_t* dst, int64_t n) {
#ifdef LAYERPAR_X86
  if (kHasAVX2) return float_to_bf16_avx2(src, dst, n);
#endif
  for (int64_t k = 0; k < n; ++k) dst[k] = Store<at::BFloat16>::st(src[k]);
}

constexpr int64_t kBlock = 256;  // elements per conversion block (stack buffers)

// 16-bit storage types go through float32 blocks converted by the functions above.
template <typename S>
constexpr bool kIs16 = std::is_same_v<S, at::Half> || std::is_same_v<S, at::BFloat16>;
// Loads alone: bfloat16 -> float32 is a shift that vectorises inline; float16 needs blocks.
template <typename S>
constexpr bool kIsHalf = std::is_same_v<S, at::Half>;

template <typename S>
void to_f32(const uint16_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<S, at::Half>) half_to_float(src, dst, n);
  else bf16_to_float(src, dst, n);
}

template <typename S>
void from_f32(const float* src, uint16_t* dst, int64_t n) {
  if constexpr (std::is_same_v<S, at::Half>) float_to_half(src, dst, n);
  else float_to_bf16(src, dst, n);
}

// dst[k] = src[k] converted from storage type S to storage type D (any pair, float16 via F16C).
template <typename D, typename S>
void convert_row(const raw_t<S>* src, raw_t<D>* dst, int64_t n) {
  if constexpr (std::is_same_v<D, S>) {
    std::memcpy(dst, src, sizeof(raw_t<D>) * n);
  } else if constexpr (kIs16<D> && std::is_same_v<S, float>) {
    from_f32<D>(src, dst, n);
  } else if constexpr (kIs16<S> && std::is_same_v<D, float>) {
    to_f32<S>(src, dst, n);
  } else if constexpr (kIs16<D> || kIs16<S>) {
    float tmp[kBlock];
    for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
      const int64_t m = std::min(kBlock, n - k0);
      convert_row<float, S>(src + k0, tmp, m);
      convert_row<D, float>(tmp, dst + k0, m);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dst[k] = to_store<D>(Store<S>::ld(src[k]));
  }
}

template <typename S>
const raw_t<S>* cptr(const at::Tensor& t) {
  return reinterpret_cast<const raw_t<S>*>(t.const_data_ptr());
}
template <typename S>
raw_t<S>* mptr(const at::Tensor& t) {
  return reinterpret_cast<raw_t<S>*>(t.mutable_data_ptr());
}

// ---------------------------------------------------------------------------------------------
// Dispatch helpers.
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

// Range-checked copy of the index; `last`/`has_dup` only when `writes` (gathers do not need them).
RowIndex check_index(const at::Tensor& idx, int64_t n, const char* what, bool writes = true) {
  TORCH_CHECK(idx.device().is_cpu(), what, ": the index tensor must be on the CPU, got ", idx.device());
  TORCH_CHECK(idx.dim() == 1, what, ": the index tensor must be 1-D, got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, what,
              ": the index tensor must be int64 or int32, got ", idx.scalar_type());
  const int64_t b = idx.numel();
  const int64_t stride = idx.stride(0);
  RowIndex out;
  out.rows.resize(b);
  if (idx.scalar_type() == at::kLong) {
    const int64_t* p = idx.const_data_ptr<int64_t>();
    for (int64_t q = 0; q < b; ++q) out.rows[q] = p[q * stride];
  } else {
    const int32_t* p = idx.const_data_ptr<int32_t>();
    for (int64_t q = 0; q < b; ++q) out.rows[q] = p[q * stride];
  }
  for (int64_t q = 0; q < b; ++q) {
    TORCH_CHECK_INDEX(out.rows[q] >= 0 && out.rows[q] < n, what, ": index ", out.rows[q],
                      " at position ", q, " is out of range for a store of ", n,
                      " rows (valid: 0..", n - 1, ")");
  }
  if (!writes) return out;
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
// One coarse row segment: av[j] (already averaged) against target/mult; writes a (if a != null)
// and gc; returns the row's Σ r² (sq) and Σ a·m (lin).
template <int MODE, typename T, typename S>
inline void loss_segment(const T* __restrict__ av, const raw_t<S>* __restrict__ tgt,
                         const raw_t<S>* __restrict__ mult, T* __restrict__ a, T* __restrict__ gc, int64_t n,
                         T coef, T inv_b, T& sq_out, T& lin_out) {
  T sq = 0, lin = 0;
#pragma omp simd reduction(+ : sq, lin)
  for (int64_t j = 0; j < n; ++j) {
    const T v = av[j];
    const T t = static_cast<T>(Store<S>::ld(tgt[j]));
    T g;
    if constexpr (MODE == 2) {
      const T m = static_cast<T>(Store<S>::ld(mult[j]));
      const T diff = v - t;
      lin += v * m;
      sq += diff * diff;
      g = (m + coef * diff) * inv_b;
    } else {
      T r = v - t;
      if constexpr (MODE == 1) r += static_cast<T>(Store<S>::ld(mult[j]));
      sq += r * r;
      g = coef * r * inv_b;
    }
    if (a) a[j] = v;
    gc[j] = g;
  }
  sq_out = sq;
  lin_out = lin;
}

// loss_segment for any storage type: float16 rows are converted to float32 blocks first.
template <int MODE, typename T, typename S>
inline void loss_row(const T* av, const raw_t<S>* tgt, const raw_t<S>* mult, T* a, T* gc, int64_t n, T coef,
                     T inv_b, T& sq_out, T& lin_out) {
  if constexpr (kIsHalf<S>) {
    float tb[kBlock], mb[kBlock];
    T sq = 0, lin = 0;
    for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
      const int64_t m = std::min(kBlock, n - k0);
      to_f32<S>(tgt + k0, tb, m);
      if (mult) to_f32<S>(mult + k0, mb, m);
      T bsq, blin;
      loss_segment<MODE, T, float>(av + k0, tb, mult ? mb : nullptr, a ? a + k0 : nullptr, gc + k0, m, coef,
                                   inv_b, bsq, blin);
      sq += bsq;
      lin += blin;
    }
    sq_out = sq;
    lin_out = lin;
  } else {
    loss_segment<MODE, T, S>(av, tgt, mult, a, gc, n, coef, inv_b, sq_out, lin_out);
  }
}

// scale x (s x s sums) of s fine rows (row0, stride W) into w coarse values. s = 2: the four
// neighbours directly (even/odd shuffles vectorise well); otherwise the s rows are summed
// vertically first (contiguous, vectorised), then s neighbours horizontally.
template <int SS, typename T, typename O>
inline void pool_row(const T* __restrict__ row0, T* __restrict__ vs, O* __restrict__ out, int64_t w, int64_t s_rt,
                     T scale) {
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s;
  if constexpr (SS == 2) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const T v = (row0[2 * j] + row0[2 * j + 1]) + (row0[W + 2 * j] + row0[W + 2 * j + 1]);
      out[j] = static_cast<O>(v * scale);
    }
    return;
  }
#pragma omp simd
  for (int64_t x = 0; x < W; ++x) vs[x] = row0[x];
  for (int64_t dy = 1; dy < s; ++dy) {
    const T* __restrict__ r = row0 + dy * W;
#pragma omp simd
    for (int64_t x = 0; x < W; ++x) vs[x] += r[x];
  }
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    T v = 0;
    for (int64_t dx = 0; dx < s; ++dx) v += vs[j * s + dx];
    out[j] = static_cast<O>(v * scale);
  }
}

// o NCHW contiguous: one task per (b, c) plane. With s == 1 the plane is one segment and a
// aliases o (not written).
template <int MODE, int SS, typename T, typename S>
void local_loss_nchw(const T* o, const raw_t<S>* tgt, const raw_t<S>* mult, T* a, T* gc, double* psq,
                     double* plin, int64_t B, int64_t C, int64_t h, int64_t w, int64_t s_rt, T coef, T inv_b) {
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s;
  const int64_t hw = h * w;
  const T inv_s2 = T(1) / static_cast<T>(s * s);
  at::parallel_for(0, B * C, grain_for(h * W * s), [&](int64_t p0, int64_t p1) {
    std::vector<T> vs(W), acc(w);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t q0 = p * hw;
      T rsq, rlin;
      if constexpr (SS == 1) {
        loss_row<MODE, T, S>(o + q0, tgt + q0, mult ? mult + q0 : nullptr, nullptr, gc + q0, hw, coef, inv_b, rsq,
                             rlin);
        psq[p] = rsq;
        plin[p] = rlin;
        continue;
      }
      const T* op = o + p * h * s * W;
      double sq = 0, lin = 0;
      for (int64_t i = 0; i < h; ++i) {
        const int64_t qi = q0 + i * w;
        pool_row<SS, T, T>(op + i * s * W, vs.data(), acc.data(), w, s, inv_s2);
        loss_row<MODE, T, S>(acc.data(), tgt + qi, mult ? mult + qi : nullptr, a + qi, gc + qi, w, coef, inv_b,
                             rsq, rlin);
        sq += rsq;
        lin += rlin;
      }
      psq[p] = sq;
      plin[p] = lin;
    }
  });
}

// o channels_last: one task per (b, coarse row i); the channel loop is innermost (contiguous).
template <int MODE, typename T, typename S>
void local_loss_nhwc(const T* o, const raw_t<S>* tgt, const raw_t<S>* mult, T* a, T* gc, double* psq,
                     double* plin, int64_t B, int64_t C, int64_t h, int64_t w, int64_t s, T coef, T inv_b) {
  const int64_t W = w * s, H = h * s;
  const T inv_s2 = T(1) / static_cast<T>(s * s);
  at::parallel_for(0, B * h, grain_for(s * W * C), [&](int64_t t0, int64_t t1) {
    std::vector<T> acc(w * C), col(w);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / h, i = t % h;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t dy = 0; dy < s; ++dy) {
        const T* row = o + ((b * H) + i * s + dy) * W * C;
        for (int64_t j = 0; j < w; ++j) {
          T* ac = acc.data() + j * C;
          for (int64_t dx = 0; dx < s; ++dx) {
            const T* px = row + (j * s + dx) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) ac[c] += px[c];
          }
        }
      }
      double sq = 0, lin = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t q0 = ((b * C + c) * h + i) * w;
        for (int64_t j = 0; j < w; ++j) col[j] = acc[j * C + c] * inv_s2;
        T rsq, rlin;
        loss_row<MODE, T, S>(col.data(), tgt + q0, mult ? mult + q0 : nullptr, a + q0, gc + q0, w, coef, inv_b,
                             rsq, rlin);
        sq += rsq;
        lin += rlin;
      }
      psq[t] = sq;
      plin[t] = lin;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Upsampling (nearest) with optional row gather and scale.
template <int SS, typename S, typename O>
void upsample_nchw(const raw_t<S>* src, const int64_t* rows, O* out, int64_t B, int64_t C, int64_t h, int64_t w,
                   int64_t s_rt, O scale) {
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s;
  const int64_t d = C * h * w;
  at::parallel_for(0, B * C * h, grain_for(s * W), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (C * h), ci = t % (C * h);  // ci = c * h + i
      const raw_t<S>* __restrict__ sp = src + (rows ? rows[b] : b) * d + ci * w;
      O* __restrict__ op = out + (b * C * h + ci) * s * W;  // fine row (c, i*s) of sample b
      if constexpr (kIsHalf<S>) {
        for (int64_t j0 = 0; j0 < w; j0 += kBlock) {
          float vb[kBlock];
          const int64_t m = std::min(kBlock, w - j0);
          to_f32<S>(sp + j0, vb, m);
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) {
            const O v = static_cast<O>(vb[j]) * scale;
            for (int64_t dx = 0; dx < s; ++dx) op[(j0 + j) * s + dx] = v;
          }
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          const O v = static_cast<O>(Store<S>::ld(sp[j])) * scale;
          for (int64_t dx = 0; dx < s; ++dx) op[j * s + dx] = v;
        }
      }
      for (int64_t dy = 1; dy < s; ++dy) std::memcpy(op + dy * W, op, sizeof(O) * W);
    }
  });
}

// s == 1, NCHW: whole sample rows, converted (and scaled unless scale == 1).
template <typename S, typename O>
void rows_scaled(const raw_t<S>* src, const int64_t* rows, O* out, int64_t B, int64_t d, O scale) {
  at::parallel_for(0, B, grain_for(d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      O* __restrict__ op = out + b * d;
      const raw_t<S>* __restrict__ sp = src + (rows ? rows[b] : b) * d;
      if (scale == O(1)) {
        convert_row<O, S>(sp, op, d);
      } else if constexpr (std::is_same_v<O, S>) {
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) op[k] = sp[k] * scale;
      } else {
        convert_row<O, S>(sp, op, d);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) op[k] *= scale;
      }
    }
  });
}

template <typename S, typename O>
void upsample_nhwc(const raw_t<S>* src, const int64_t* rows, O* out, int64_t B, int64_t C, int64_t h, int64_t w,
                   int64_t s, O scale) {
  const int64_t W = w * s, H = h * s;
  const int64_t hw = h * w, d = C * hw;
  at::parallel_for(0, B * h, grain_for(s * W * C), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / h, i = t % h;
      const raw_t<S>* __restrict__ sp = src + (rows ? rows[b] : b) * d + i * w;
      O* __restrict__ op = out + (b * H + i * s) * W * C;
      for (int64_t j = 0; j < w; ++j) {
        O* px = op + j * s * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) px[c] = static_cast<O>(Store<S>::ld(sp[c * hw + j])) * scale;
        for (int64_t dx = 1; dx < s; ++dx) std::memcpy(px + dx * C, px, sizeof(O) * C);
      }
      for (int64_t dy = 1; dy < s; ++dy) std::memcpy(op + dy * W * C, op, sizeof(O) * W * C);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// scale · sum pooling, float32 output.
template <int SS, typename T>
void sum_pool_nchw(const T* x, float* out, int64_t B, int64_t C, int64_t h, int64_t w, int64_t s_rt, T scale) {
  const int64_t s = SS ? SS : s_rt;
  const int64_t W = w * s;
  at::parallel_for(0, B * C * h, grain_for(s * W), [&](int64_t t0, int64_t t1) {
    std::vector<T> vs(W);
    for (int64_t t = t0; t < t1; ++t) {  // t = (b*C + c)*h + i; fine rows i*s .. i*s+s-1
      pool_row<SS, T, float>(x + t * s * W, vs.data(), out + t * w, w, s, scale);
    }
  });
}

template <typename T>
void sum_pool_nhwc(const T* x, float* out, int64_t B, int64_t C, int64_t h, int64_t w, int64_t s, T scale) {
  const int64_t W = w * s, H = h * s;
  at::parallel_for(0, B * h, grain_for(s * W * C), [&](int64_t t0, int64_t t1) {
    std::vector<T> acc(w * C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / h, i = t % h;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t dy = 0; dy < s; ++dy) {
        const T* row = x + (b * H + i * s + dy) * W * C;
        for (int64_t j = 0; j < w; ++j) {
          T* __restrict__ ac = acc.data() + j * C;
          for (int64_t dx = 0; dx < s; ++dx) {
            const T* __restrict__ px = row + (j * s + dx) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) ac[c] += px[c];
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        float* op = out + ((b * C + c) * h + i) * w;
        for (int64_t j = 0; j < w; ++j) op[j] = static_cast<float>(acc[j * C + c] * scale);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Jacobi λ-step on one row. IN_PLACE: write the store rows (lr, ur) and the message row; else
// write the message row and the new u row to uo only (the caller scatters last occurrences).
template <bool HAS_U, bool IN_PLACE, typename S>
inline void jacobi_row(raw_t<S>* __restrict__ lr, raw_t<S>* __restrict__ ur, const float* __restrict__ ar,
                       const float* __restrict__ gr, raw_t<S>* __restrict__ orow, raw_t<S>* __restrict__ uo,
                       int64_t d, float cg, float c1g, float cgd) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    const float l = static_cast<float>(Store<S>::ld(lr[k]));
    const float av = ar[k];
    float uk = 0.0f;
    if constexpr (HAS_U) uk = static_cast<float>(Store<S>::ld(ur[k]));
    const float ln = cg * (av + uk) + c1g * l - cgd * gr[k];
    const raw_t<S> lns = to_store<S>(ln);
    orow[k] = lns;
    if constexpr (IN_PLACE) lr[k] = lns;
    if constexpr (HAS_U) {
      const raw_t<S> un = to_store<S>(uk + (av - ln));
      if constexpr (IN_PLACE) {
        ur[k] = un;
      } else {
        uo[k] = un;
      }
    }
  }
}

// 16-bit rows: blocks converted to float32, the same arithmetic, converted back.
template <bool HAS_U, bool IN_PLACE, typename S>
void jacobi_row16(uint16_t* lr, uint16_t* ur, const float* ar, const float* gr, uint16_t* orow, uint16_t* uo,
                     int64_t d, float cg, float c1g, float cgd) {
  float lb[kBlock], ub[kBlock], ln[kBlock], un[kBlock];
  for (int64_t k0 = 0; k0 < d; k0 += kBlock) {
    const int64_t m = std::min(kBlock, d - k0);
    to_f32<S>(lr + k0, lb, m);
    if constexpr (HAS_U) to_f32<S>(ur + k0, ub, m);
    const float* __restrict__ ak = ar + k0;
    const float* __restrict__ gk = gr + k0;
#pragma omp simd
    for (int64_t k = 0; k < m; ++k) {
      const float uk = HAS_U ? ub[k] : 0.0f;
      ln[k] = cg * (ak[k] + uk) + c1g * lb[k] - cgd * gk[k];
      if constexpr (HAS_U) un[k] = uk + (ak[k] - ln[k]);
    }
    from_f32<S>(ln, orow + k0, m);
    if constexpr (IN_PLACE) std::memcpy(lr + k0, orow + k0, sizeof(uint16_t) * m);
    if constexpr (HAS_U) from_f32<S>(un, (IN_PLACE ? ur : uo) + k0, m);
  }
}

template <bool HAS_U, bool IN_PLACE, typename S>
void jacobi_rows(raw_t<S>* lam, raw_t<S>* u, const int64_t* rows, const float* a, const float* g, raw_t<S>* out,
                 raw_t<S>* u_out, int64_t B, int64_t d, float cg, float c1g, float cgd) {
  at::parallel_for(0, B, grain_for(d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if constexpr (kIs16<S>) {
        jacobi_row16<HAS_U, IN_PLACE, S>(lam + rows[b] * d, HAS_U ? u + rows[b] * d : nullptr, a + b * d, g + b * d,
                                         out + b * d, (HAS_U && !IN_PLACE) ? u_out + b * d : nullptr, d, cg, c1g,
                                         cgd);
        continue;
      }
      jacobi_row<HAS_U, IN_PLACE, S>(lam + rows[b] * d, HAS_U ? u + rows[b] * d : nullptr, a + b * d, g + b * d,
                                     out + b * d, (HAS_U && !IN_PLACE) ? u_out + b * d : nullptr, d, cg, c1g, cgd);
    }
  });
}

// store rows[p] = src[p] (cast) for the positions p flagged in `last` (distinct destinations).
template <typename D, typename S>
void scatter_last(raw_t<D>* store, const int64_t* rows, const uint8_t* last, const raw_t<S>* src, int64_t B,
                  int64_t d) {
  at::parallel_for(0, B, grain_for(d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!last[b]) continue;
      convert_row<D, S>(src + b * d, store + rows[b] * d, d);
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
  // s == 1 with float32 NCHW o: a equals o, the caller aliases it (returned undefined here).
  const bool alias_a = s == 1 && !nhwc && o.scalar_type() == at::kFloat;
  const auto coarse_opts = o.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor a = alias_a ? at::Tensor() : at::empty(t.sizes(), coarse_opts);
  at::Tensor gc = at::empty(t.sizes(), coarse_opts);  // written even without need_grad (then dropped)
  const int64_t ntask = nhwc ? B * h : B * C;
  std::vector<double> psq(ntask, 0.0), plin(ntask, 0.0);
  const int mode = gs ? 2 : (m.defined() ? 1 : 0);
  dispatch_pair(o.scalar_type(), t.scalar_type(), what, [&](auto otag, auto stag) {
    using T = decltype(otag);
    using S = decltype(stag);
    const T coef = static_cast<T>(beta / static_cast<double>(d));
    const T inv_b = T(1) / static_cast<T>(B);
    const raw_t<S>* mp = m.defined() ? cptr<S>(m) : nullptr;
    T* ap = a.defined() ? a.mutable_data_ptr<T>() : nullptr;
    T* gp = gc.mutable_data_ptr<T>();
    const T* op = o.const_data_ptr<T>();
    auto run = [&](auto mode_c) {
      constexpr int MODE = decltype(mode_c)::value;
      if (nhwc) {
        local_loss_nhwc<MODE, T, S>(op, cptr<S>(t), mp, ap, gp, psq.data(), plin.data(), B, C, h, w, s, coef,
                                    inv_b);
        return;
      }
      dispatch_s(s, std::is_same_v<T, float>, [&](auto sc) {
        constexpr int SS = decltype(sc)::value;
        local_loss_nchw<MODE, SS, T, S>(op, cptr<S>(t), mp, ap, gp, psq.data(), plin.data(), B, C, h, w, s, coef,
                                        inv_b);
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
  return {at::scalar_tensor(loss, o.options()), a, need_grad ? gc : at::Tensor()};
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
    ri = check_index(*idx, src.size(0), what, /*writes=*/false);
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
    const O sca = static_cast<O>(scale);
    O* op = out.mutable_data_ptr<O>();
    if (nhwc) {
      upsample_nhwc<S, O>(cptr<S>(src), rows, op, B, C, h, w, s, sca);
      return;
    }
    if (s == 1) {
      rows_scaled<S, O>(cptr<S>(src), rows, op, B, C * h * w, sca);
      return;
    }
    dispatch_s(s, std::is_same_v<O, float>, [&](auto sc) {
      constexpr int SS = decltype(sc)::value;
      upsample_nchw<SS, S, O>(cptr<S>(src), rows, op, B, C, h, w, s, sca);
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
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, what, ": dtype ",
              x_in.scalar_type(), " is not supported (valid: float32, float64)");
  const bool nhwc = is_channels_last(x_in);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), h = x.size(2) / s, w = x.size(3) / s;
  at::Tensor out = at::empty({B, C, h, w}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  float* op = out.mutable_data_ptr<float>();
  if (x.scalar_type() == at::kDouble) {
    const double* xp = x.const_data_ptr<double>();
    if (nhwc) sum_pool_nhwc<double>(xp, op, B, C, h, w, s, scale);
    else sum_pool_nchw<0, double>(xp, op, B, C, h, w, s, scale);
  } else if (nhwc) {
    sum_pool_nhwc<float>(x.const_data_ptr<float>(), op, B, C, h, w, s, static_cast<float>(scale));
  } else {
    dispatch_s(s, true, [&](auto sc) {
      constexpr int SS = decltype(sc)::value;
      sum_pool_nchw<SS, float>(x.const_data_ptr<float>(), op, B, C, h, w, s, static_cast<float>(scale));
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
  const float* ap = a.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  dispatch_store(lam_store.scalar_type(), what, [&](auto tag) {
    using S = decltype(tag);
    raw_t<S>* lp = mptr<S>(lam_store);
    raw_t<S>* up = has_u ? mptr<S>(*u_store) : nullptr;
    raw_t<S>* outp = mptr<S>(out);
    if (!ri.has_dup) {
      if (has_u) jacobi_rows<true, true, S>(lp, up, ri.rows.data(), ap, gp, outp, nullptr, B, d, cg, c1g, cgd);
      else jacobi_rows<false, true, S>(lp, nullptr, ri.rows.data(), ap, gp, outp, nullptr, B, d, cg, c1g, cgd);
      return;
    }
    // Repeated rows: compute every occurrence from the old rows, then store the last ones.
    at::Tensor u_tmp = has_u ? at::empty(shape, lam_store.options()) : at::Tensor();
    raw_t<S>* utp = has_u ? mptr<S>(u_tmp) : nullptr;
    if (has_u) jacobi_rows<true, false, S>(lp, up, ri.rows.data(), ap, gp, outp, utp, B, d, cg, c1g, cgd);
    else jacobi_rows<false, false, S>(lp, nullptr, ri.rows.data(), ap, gp, outp, nullptr, B, d, cg, c1g, cgd);
    scatter_last<S, S>(lp, ri.rows.data(), ri.last.data(), outp, B, d);
    if (has_u) scatter_last<S, S>(up, ri.rows.data(), ri.last.data(), utp, B, d);
  });
  return out;
}

at::Tensor gather_rows_out(const at::Tensor& store, const at::Tensor& idx, at::Tensor& out) {
  const char* what = "gather_rows";
  TORCH_CHECK(store.device().is_cpu() && store.is_contiguous() && store.dim() >= 1, what,
              ": the store must be a contiguous CPU tensor");
  const RowIndex ri = check_index(idx, store.size(0), what, /*writes=*/false);
  const int64_t B = static_cast<int64_t>(ri.rows.size());
  const int64_t d = row_numel(store);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.numel() == B * d &&
                  out.scalar_type() == store.scalar_type(),
              what, ": out must be a contiguous CPU ", store.scalar_type(), " tensor of ", B * d, " elements");
  if (B == 0 || d == 0) return out;
  const int64_t row_bytes = d * static_cast<int64_t>(store.element_size());
  const char* sp = static_cast<const char*>(store.const_data_ptr());
  char* op = static_cast<char*>(out.mutable_data_ptr());
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
      scatter_last<D, S>(mptr<D>(store), ri.rows.data(), ri.last.data(), cptr<S>(rows), B, d);
    });
  });
}

std::string built_with_torch() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace layerpar

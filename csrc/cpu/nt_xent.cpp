// CPU kernels of the fused contrastive log-sum-exp (NT-Xent / InfoNCE).
//
// The (M, Kc) similarity matrix is never built: rows are split into blocks of
// kRowBlock that run in parallel (at::parallel_for), and each block walks the
// columns in tiles of kColBlock.  A tile's logits come from one BLAS product
// (at::mm_out into a per-thread buffer that stays in L2), its exponentials from
// ATen's vectorised exp, and the per-row merge from csrc/common/nt_xent.h.
// The backward recomputes the tiles instead of storing them, so the extra
// memory is O(threads * kRowBlock * kColBlock) on top of the outputs.
//
// The symmetric case (nt_xent_lse_sym and its backward: q = c = z, row i
// leaves out column i; SimCLR's NT-Xent, sup_con) uses the symmetry x_ij = x_ji
// instead: z's rows are cut into B equal blocks and each tile (I, J), I <= J,
// of the logits is computed once (one GEMM) for both block I and block J.
//   forward   one exponential per element of the upper triangle: with a
//             shift s shared by the tile, the row sums of exp(x - s) update
//             rows I's online (max, sum) and the column sums rows J's.  s is
//             the bound inv_temp |z|_max,I |z|_max,J (no max pass) when the
//             logits' possible spread is within max_shared_spread; else a max
//             pass gives the tile max, and tiles whose rows' or columns'
//             maxima still spread wider take a shift per row and per column
//             (two exponentials; also every non-finite case).
//   backward  W_IJ = A_IJ + (A_JI)^T, A_ij = g_i exp(x_ij - lse_i), with one
//             exponential (sym_weight_shared) when the lse of rows I and J
//             lie within max_shared_spread of each other, else two; then
//             grad_I += W z_J and grad_J += W^T z_I.
// The tiles are ordered in rounds of a round-robin tournament: round 0 holds
// the diagonal tiles, every later round pairs each block with one other block
// at most.  A thread runs a tile once the earlier tiles of its two blocks are
// done (taking the first such tile in that order), writing the rows' state and
// gradients in place -- no atomic adds, no per-thread partials, and every
// row's accumulation order is fixed by the plan alone: the results do not
// depend on the number of threads or on the timing.  The
// element loops (csrc/cpu/nt_xent_tiles.inc) are built for the baseline ISA,
// AVX2 and AVX-512 and chosen at run time (SSLOPS_CPU_ISA=base|avx2|avx512
// caps the choice, for tests); GEMMs go to the BLAS that torch links (MKL's
// sgemm_/dgemm_) when it exports them, else to at::addmm_out.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "common/nt_xent.h"
#include "cpu/blas.h"
#include "cpu/sym_plan.h"
#include "cpu/isa.h"
#include "common/output.h"

namespace sslops {

// The element loops of one symmetric tile (nt_xent_tiles.inc), one table per ISA.
template <typename T>
struct SymTileOps {
  void (*fwd_shared)(const T* x, int64_t ld, int64_t rn, int64_t cn, T it, bool diag, T s, T* rowsum, T* colsum);
  void (*maxima)(const T* x, int64_t ld, int64_t rn, int64_t cn, bool diag, T* rowmax, T* colmax);
  void (*fwd_split)(const T* x, int64_t ld, int64_t rn, int64_t cn, T it, bool diag, const T* rsh, const T* csh,
                    T* rowsum, T* colsum);
  void (*bwd_shared)(T* x, int64_t ld, int64_t rn, int64_t cn, T it, bool diag, T s, const T* a, const T* b);
  void (*bwd_split)(T* x, int64_t ld, int64_t rn, int64_t cn, T it, bool diag, const T* lse_r, const T* g_r,
                    const T* lse_c, const T* g_c);
  const char* isa;
};

// ---------------------------------------------------------------- baseline ISA: one lane
namespace ntx_base {
template <typename T_>
struct V1 {
  using T = T_;
  using R = T_;
  static constexpr int64_t W = 1;
  static R set1(T v) { return v; }
  static R load(const T* p) { return *p; }
  static void store(T* p, R v) { *p = v; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R mul(R a, R b) { return a * b; }
  static R fmadd(R a, R b, R c) { return a * b + c; }
  static R max(R a, R b) { return nt_xent::max_nan(a, b); }
  static T hsum(R v) { return v; }
  static T hmax(R v) { return v; }
  static R exp(R x) { return nt_xent::exp_(x); }
};
#include "cpu/nt_xent_tiles.inc"
void tables(SymTileOps<float>* f, SymTileOps<double>* d) {
  *f = Tiles<V1<float>>::table("base");
  *d = Tiles<V1<double>>::table("base");
}
}  // namespace ntx_base

#if defined(__x86_64__) && defined(__GNUC__)
// exp(x) = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts,
// Cody-Waite), e^r by its Taylor series on |r| <= ln2 / 2: degree 7 in float
// (truncation < 0.1 ulp), 13 in double.

// ---------------------------------------------------------------- AVX2 + FMA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// No contraction of a * b + c into an FMA where the code does not ask for one:
// the logits x * inv_temp must round as in the scalar code and in the other
// pass (forward vs backward), or a nearly one-hot softmax at large logits gets
// weights off by exp(rounding of x).
#pragma GCC optimize("fp-contract=off")
namespace ntx_avx2 {
struct VF {
  using T = float;
  using R = __m256;
  static constexpr int64_t W = 8;
  static R set1(T v) { return _mm256_set1_ps(v); }
  static R load(const T* p) { return _mm256_loadu_ps(p); }
  static void store(T* p, R v) { _mm256_storeu_ps(p, v); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static T hsum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static T hmax(R v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static R exp(R x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);  // 2^n below stays a normal number (a NaN x passes)
    const R n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    R p = _mm256_set1_ps(1.0f / 5040);
    for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};
struct VD {
  using T = double;
  using R = __m256d;
  static constexpr int64_t W = 4;
  static R set1(T v) { return _mm256_set1_pd(v); }
  static R load(const T* p) { return _mm256_loadu_pd(p); }
  static void store(T* p, R v) { _mm256_storeu_pd(p, v); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R sub(R a, R b) { return _mm256_sub_pd(a, b); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R max(R a, R b) { return _mm256_max_pd(a, b); }
  static T hsum(R v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static T hmax(R v) {
    __m128d s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static R exp(R x) {
    x = _mm256_min_pd(_mm256_set1_pd(709.0), x);
    const R n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93145751953125e-1), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.42860682030941723212e-6), r);
    R p = _mm256_set1_pd(1.0 / 6227020800.0);  // 1/13!
    for (double c : {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                     1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0})
      p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c));
    // 2^n from the bits of n + 1023 + 1.5 * 2^52 (n + 1023 in [13, 2046] here).
    const __m256i e = _mm256_slli_epi64(
        _mm256_castpd_si256(_mm256_add_pd(n, _mm256_set1_pd(1023.0 + 6755399441055744.0))), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
  }
};
#include "cpu/nt_xent_tiles.inc"
void tables(SymTileOps<float>* f, SymTileOps<double>* d) {
  *f = Tiles<VF>::table("avx2");
  *d = Tiles<VD>::table("avx2");
}
}  // namespace ntx_avx2
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512
#pragma GCC push_options
#pragma GCC diagnostic push
// GCC 12 warns that the intrinsics' own _mm512_undefined_* placeholders "may be
// used uninitialized" wherever they are inlined (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512dq,avx2,fma")
// No contraction of a * b + c into an FMA where the code does not ask for one:
// the logits x * inv_temp must round as in the scalar code and in the other
// pass (forward vs backward), or a nearly one-hot softmax at large logits gets
// weights off by exp(rounding of x).
#pragma GCC optimize("fp-contract=off")
namespace ntx_avx512 {
struct VF {
  using T = float;
  using R = __m512;
  static constexpr int64_t W = 16;
  static R set1(T v) { return _mm512_set1_ps(v); }
  static R load(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, R v) { _mm512_storeu_ps(p, v); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static T hsum(R v) {
    __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return ntx_avx2::VF::hsum(s);
  }
  static T hmax(R v) {
    __m256 s = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return ntx_avx2::VF::hmax(s);
  }
  static R exp(R x) {
    const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    R p = _mm512_set1_ps(1.0f / 5040);
    for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
  }
};
struct VD {
  using T = double;
  using R = __m512d;
  static constexpr int64_t W = 8;
  static R set1(T v) { return _mm512_set1_pd(v); }
  static R load(const T* p) { return _mm512_loadu_pd(p); }
  static void store(T* p, R v) { _mm512_storeu_pd(p, v); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R max(R a, R b) { return _mm512_max_pd(a, b); }
  static T hsum(R v) {
    return ntx_avx2::VD::hsum(_mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1)));
  }
  static T hmax(R v) {
    return ntx_avx2::VD::hmax(_mm256_max_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1)));
  }
  static R exp(R x) {
    const R n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93145751953125e-1), x);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.42860682030941723212e-6), r);
    R p = _mm512_set1_pd(1.0 / 6227020800.0);
    for (double c : {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                     1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0})
      p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c));
    return _mm512_scalef_pd(p, n);
  }
};
#include "cpu/nt_xent_tiles.inc"
void tables(SymTileOps<float>* f, SymTileOps<double>* d) {
  *f = Tiles<VF>::table("avx512");
  *d = Tiles<VD>::table("avx512");
}
}  // namespace ntx_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace {

using nt_xent::lse_finalize;
using nt_xent::lse_merge;
using nt_xent::neg_inf;

constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 512;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_cpu(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.device().is_cpu(), op, ": expected CPU tensors, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": the CPU kernel takes float32 or float64, got ", q.scalar_type(),
              " (sslops.nt_xent upcasts half types before calling it)");
}

// A (rows x cols) view with row stride kColBlock into a per-thread tile buffer.
inline at::Tensor tile_view(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.as_strided({rows, cols}, {kColBlock, 1});
}

// s (rows x cols, row stride ld) = inv_temp * a @ b^T, via BLAS.
inline void logits_tile(at::Tensor& s, const at::Tensor& a, const at::Tensor& b, double inv_temp) {
  at::mm_out(s, a, b.t());
  s.mul_(inv_temp);
}

// Per-row lse, with infinities turned into +inf so that exp(x - lse) is 0 for a
// row without candidates instead of NaN.
template <typename scalar_t>
std::vector<scalar_t> safe_lse(const scalar_t* lse, int64_t m) {
  std::vector<scalar_t> out(lse, lse + m);
  for (auto& v : out)
    if (v == neg_inf<scalar_t>()) v = std::numeric_limits<scalar_t>::infinity();
  return out;
}

// row[j] <- max(row[j] - shift, min_exp_arg) for `rows` rows of a tile.
template <typename scalar_t>
inline void shift_rows(scalar_t* row, int64_t rows, int64_t cn, scalar_t shift) {
  const scalar_t lo = nt_xent::min_exp_arg<scalar_t>();
  for (int64_t i = 0; i < rows; ++i, row += kColBlock) {
#pragma omp simd
    for (int64_t j = 0; j < cn; ++j) row[j] = std::max(row[j] - shift, lo);
  }
}

template <typename scalar_t>
void lse_rows(const at::Tensor& q, const at::Tensor& c, const int64_t* excl, double inv_temp, scalar_t* out) {
  const int64_t M = q.size(0), K = c.size(0);
  at::parallel_for(0, ceil_div(M, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
    auto buf = at::empty({kRowBlock * kColBlock}, q.options());
    std::vector<scalar_t> m(kRowBlock), l(kRowBlock), tile_m(kRowBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, rn = std::min(kRowBlock, M - r0);
      const auto qb = q.narrow(0, r0, rn);
      std::fill(m.begin(), m.end(), neg_inf<scalar_t>());
      std::fill(l.begin(), l.end(), scalar_t(0));
      for (int64_t c0 = 0; c0 < K; c0 += kColBlock) {
        const int64_t cn = std::min(kColBlock, K - c0);
        auto s = tile_view(buf, rn, cn);
        logits_tile(s, qb, c.narrow(0, c0, cn), inv_temp);
        scalar_t* sp = s.data_ptr<scalar_t>();
        // Row maxima of the tile (excluded logit at -inf), then shift the rows.
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          const int64_t e = excl ? excl[r0 + i] - c0 : -1;
          if (e >= 0 && e < cn) row[e] = neg_inf<scalar_t>();
          scalar_t mx = neg_inf<scalar_t>();
#pragma omp simd reduction(max : mx)
          for (int64_t j = 0; j < cn; ++j) mx = std::max(mx, row[j]);
          tile_m[i] = mx;
          shift_rows(row, 1, cn, mx == neg_inf<scalar_t>() ? scalar_t(0) : mx);
        }
        s.exp_();  // ATen's vectorised exp over the whole tile
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          const int64_t e = excl ? excl[r0 + i] - c0 : -1;
          if (e >= 0 && e < cn) row[e] = 0;
          scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < cn; ++j) sum += row[j];
          lse_merge(m[i], l[i], tile_m[i], sum);
        }
      }
      for (int64_t i = 0; i < rn; ++i) out[r0 + i] = lse_finalize(m[i], l[i]);
    }
  });
}

at::Tensor nt_xent_lse_cpu(const at::Tensor& q_in, const at::Tensor& c_in, const c10::optional<at::Tensor>& exclude_in,
                           double inv_temp) {
  const char* op = "sslops::nt_xent_lse";
  check_lse_inputs(q_in, c_in, exclude_in, inv_temp, op);
  check_cpu(q_in, op);
  const auto q = q_in.detach().contiguous();
  const auto c = c_in.detach().contiguous();
  const at::Tensor exclude = exclude_in.has_value() ? exclude_in->contiguous() : at::Tensor();
  auto lse = new_output({q.size(0)}, q.options());
  if (q.size(0) == 0) return lse;
  const int64_t* excl = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nt_xent_lse_cpu",
                             [&] { lse_rows<scalar_t>(q, c, excl, inv_temp, lse.data_ptr<scalar_t>()); });
  return lse;
}

// In place on a tile of logits x (rows x cols, row stride kColBlock):
// x <- g_row * exp(x - lse_row), the softmax weights of the rows scaled by
// their upstream gradient.  The caller zeroes excluded logits afterwards.
template <typename scalar_t>
void row_weights(scalar_t* sp, int64_t rn, int64_t cn, const scalar_t* lse_safe, const scalar_t* g, at::Tensor& s) {
  for (int64_t i = 0; i < rn; ++i) {
    scalar_t* row = sp + i * kColBlock;
    shift_rows(row, 1, cn, lse_safe[i]);
  }
  s.exp_();
  for (int64_t i = 0; i < rn; ++i) {
    scalar_t* row = sp + i * kColBlock;
    const scalar_t gi = g[i];
#pragma omp simd
    for (int64_t j = 0; j < cn; ++j) row[j] *= gi;
  }
}

// Same with the roles transposed: x[j][i] <- g_i * exp(x[j][i] - lse_i), the
// lse and g indexed by column.
template <typename scalar_t>
void col_weights(scalar_t* sp, int64_t rn, int64_t cn, const scalar_t* lse_safe, const scalar_t* g, at::Tensor& s) {
  for (int64_t i = 0; i < rn; ++i) {
    scalar_t* row = sp + i * kColBlock;
    const scalar_t lo = nt_xent::min_exp_arg<scalar_t>();
#pragma omp simd
    for (int64_t j = 0; j < cn; ++j) row[j] = std::max(row[j] - lse_safe[j], lo);
  }
  s.exp_();
  for (int64_t i = 0; i < rn; ++i) {
    scalar_t* row = sp + i * kColBlock;
#pragma omp simd
    for (int64_t j = 0; j < cn; ++j) row[j] *= g[j];
  }
}

void check_backward(const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& q, const char* op) {
  check_row_vector(grad_lse, "grad_lse", q.size(0), q, op);
  check_row_vector(lse, "lse", q.size(0), q, op);
}

// grad_q = inv_temp * A @ c with row blocks in parallel, then grad_c =
// inv_temp * A^T @ q with column blocks in parallel (tiles of A^T): every
// output row is owned by one task, so no atomics and a fixed summation order.
template <typename scalar_t>
void lse_backward(const at::Tensor& q, const at::Tensor& c, const int64_t* excl, const scalar_t* lse_s,
                  const scalar_t* gp, double inv_temp, at::Tensor& grad_q, at::Tensor& grad_c) {
  const int64_t M = q.size(0), K = c.size(0);
  at::parallel_for(0, ceil_div(M, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
    auto buf = at::empty({kRowBlock * kColBlock}, q.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, rn = std::min(kRowBlock, M - r0);
      const auto qb = q.narrow(0, r0, rn);
      auto gq = grad_q.narrow(0, r0, rn);
      gq.zero_();
      for (int64_t c0 = 0; c0 < K; c0 += kColBlock) {
        const int64_t cn = std::min(kColBlock, K - c0);
        auto s = tile_view(buf, rn, cn);
        const auto cb = c.narrow(0, c0, cn);
        logits_tile(s, qb, cb, inv_temp);
        scalar_t* sp = s.data_ptr<scalar_t>();
        row_weights(sp, rn, cn, lse_s + r0, gp + r0, s);
        if (excl)
          for (int64_t i = 0; i < rn; ++i) {
            const int64_t e = excl[r0 + i] - c0;
            if (e >= 0 && e < cn) sp[i * kColBlock + e] = 0;
          }
        gq.addmm_(s, cb);
      }
      gq.mul_(inv_temp);
    }
  });
  at::parallel_for(0, ceil_div(K, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
    auto buf = at::empty({kRowBlock * kColBlock}, q.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t k0 = blk * kRowBlock, kn = std::min(kRowBlock, K - k0);
      const auto cb = c.narrow(0, k0, kn);
      auto gc = grad_c.narrow(0, k0, kn);
      gc.zero_();
      for (int64_t r0 = 0; r0 < M; r0 += kColBlock) {
        const int64_t rn = std::min(kColBlock, M - r0);
        auto s = tile_view(buf, kn, rn);  // s[j][i] = x_{r0+i, k0+j}
        const auto qb = q.narrow(0, r0, rn);
        logits_tile(s, cb, qb, inv_temp);
        scalar_t* sp = s.data_ptr<scalar_t>();
        col_weights(sp, kn, rn, lse_s + r0, gp + r0, s);
        if (excl)
          for (int64_t i = 0; i < rn; ++i) {
            const int64_t e = excl[r0 + i] - k0;
            if (e >= 0 && e < kn) sp[e * kColBlock + i] = 0;
          }
        gc.addmm_(s, qb);
      }
      gc.mul_(inv_temp);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> nt_xent_lse_backward_cpu(const at::Tensor& grad_in, const at::Tensor& q_in,
                                                            const at::Tensor& c_in,
                                                            const c10::optional<at::Tensor>& exclude_in,
                                                            const at::Tensor& lse_in, double inv_temp) {
  const char* op = "sslops::nt_xent_lse_backward";
  check_lse_inputs(q_in, c_in, exclude_in, inv_temp, op);
  check_cpu(q_in, op);
  check_backward(grad_in, lse_in, q_in, op);
  const auto q = q_in.detach().contiguous();
  const auto c = c_in.detach().contiguous();
  const at::Tensor exclude = exclude_in.has_value() ? exclude_in->contiguous() : at::Tensor();
  const auto g = grad_in.to(q.scalar_type()).contiguous();
  const auto lse = lse_in.to(q.scalar_type()).contiguous();
  auto grad_q = new_output_like(q);
  auto grad_c = new_output_like(c);
  const int64_t* excl = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nt_xent_lse_backward_cpu", [&] {
    const auto lse_s = safe_lse(lse.data_ptr<scalar_t>(), q.size(0));
    lse_backward<scalar_t>(q, c, excl, lse_s.data(), g.data_ptr<scalar_t>(), inv_temp, grad_q, grad_c);
  });
  return {grad_q, grad_c};
}

// ---------------------------------------------------------------- symmetric case

template <typename T>
const SymTileOps<T>& sym_tile_ops() {
  struct Tables {
    SymTileOps<float> f[3];
    SymTileOps<double> d[3];
    Tables() {
      ntx_base::tables(&f[0], &d[0]);
      f[1] = f[2] = f[0];
      d[1] = d[2] = d[0];
#if defined(__x86_64__) && defined(__GNUC__)
      ntx_avx2::tables(&f[1], &d[1]);
      ntx_avx512::tables(&f[2], &d[2]);
#endif
    }
  };
  static const Tables tables;
  const int level = cpu_isa::level();  // SSLOPS_CPU_ISA caps it
  if constexpr (std::is_same_v<T, float>) {
    return tables.f[level];
  } else {
    return tables.d[level];
  }
}

using cpu_blas::gemm;

using cpu_sym::SymPlan;

// A diagonal tile's lower triangle <- its upper triangle.  The BLAS need not
// round <z_i, z_j> and <z_j, z_i> alike; with this every logit has one value,
// so the lse that the forward gives row j and the weight that the backward
// computes for x_ij from it see the same bits (off the diagonal each pair
// (i, j) is in one tile only).  Otherwise a softmax that is nearly one-hot at
// large logits would be off by exp(rounding of x) in the backward.
template <typename T>
void symmetrize(T* x, int64_t ld, int64_t n) {
  constexpr int64_t kB = 32;  // in blocks, for the transposed reads
  for (int64_t i0 = 0; i0 < n; i0 += kB)
    for (int64_t j0 = 0; j0 <= i0; j0 += kB)
      for (int64_t i = i0; i < std::min(n, i0 + kB); ++i)
        for (int64_t j = j0; j < std::min(i, j0 + kB); ++j) x[i * ld + j] = x[j * ld + i];
}

// Per-thread scratch: a logits tile (bs x ld) and four vectors of bs.
template <typename T>
struct SymScratch {
  int64_t tile, vec;
  std::vector<T> buf;
  SymScratch(const SymPlan& plan) : tile(plan.bs * plan.ld), vec(plan.ld) {
    buf.resize(static_cast<size_t>(std::max(1, at::get_num_threads())) * (tile + 4 * vec));
  }
  T* tile_of(int thread) { return buf.data() + thread * (tile + 4 * vec); }
  T* vec_of(int thread, int k) { return tile_of(thread) + tile + k * vec; }
};

template <typename T>
void lse_sym(const T* z, int64_t M, int64_t D, double inv_temp, T* out) {
  const auto& ops = sym_tile_ops<T>();
  const SymPlan plan(M, 16);
  SymScratch<T> scratch(plan);
  // Largest row norm per block: |x_ij| <= inv_temp |z_i| |z_j| bounds a tile's logits.
  std::vector<double> norm_max(plan.B, 0.0);
  for (int64_t blk = 0; blk < plan.B; ++blk) {
    double mx = 0;
    for (int64_t i = plan.row0(blk); i < plan.row0(blk) + plan.rows(blk); ++i) {
      double ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += double(z[i * D + d]) * double(z[i * D + d]);
      mx = std::isnan(ss) ? ss : std::max(mx, std::sqrt(ss));  // NaN stays (not finite: no bound)
      if (std::isnan(mx)) break;
    }
    norm_max[blk] = mx;
  }
  std::vector<T> m(M, nt_xent::neg_inf<T>()), l(M, T(0));
  const T spread = nt_xent::max_shared_spread<T>();
  const T it = T(inv_temp);
  plan.run([&](int64_t I, int64_t J, int th) {
    const bool diag = I == J;
    const int64_t r0 = plan.row0(I), rn = plan.rows(I), c0 = plan.row0(J), cn = plan.rows(J);
    T* x = scratch.tile_of(th);
    T *rs = scratch.vec_of(th, 0), *cs = scratch.vec_of(th, 1), *rmx = scratch.vec_of(th, 2),
      *cmx = scratch.vec_of(th, 3);
    gemm<T>(false, true, rn, cn, D, T(1), z + r0 * D, D, z + c0 * D, D, T(0), x, plan.ld);  // dot products
    if (diag) symmetrize(x, plan.ld, rn);
    const double bound = inv_temp * norm_max[I] * norm_max[J];
    bool shared = std::isfinite(bound) && 2 * bound <= double(spread);
    T s = T(bound);
    if (!shared) {  // a max pass: the tile max as the shift, if the rows' and columns' maxima allow it
      ops.maxima(x, plan.ld, rn, cn, diag, rmx, diag ? nullptr : cmx);
      for (int64_t i = 0; i < rn; ++i) rmx[i] *= it;
      for (int64_t j = 0; !diag && j < cn; ++j) cmx[j] *= it;
      T lo = rmx[0], hi = rmx[0];
      bool finite = true;
      for (int64_t i = 0; i < rn; ++i) {
        finite = finite && std::isfinite(rmx[i]);
        lo = std::min(lo, rmx[i]), hi = std::max(hi, rmx[i]);
      }
      for (int64_t j = 0; !diag && j < cn; ++j) {
        finite = finite && std::isfinite(cmx[j]);
        lo = std::min(lo, cmx[j]);
      }
      shared = finite && hi - lo <= spread;
      s = hi;
    }
    if (shared) {
      ops.fwd_shared(x, plan.ld, rn, cn, it, diag, s, rs, diag ? nullptr : cs);
      for (int64_t i = 0; i < rn; ++i) nt_xent::lse_merge(m[r0 + i], l[r0 + i], s, rs[i]);
      for (int64_t j = 0; !diag && j < cn; ++j) nt_xent::lse_merge(m[c0 + j], l[c0 + j], s, cs[j]);
      return;
    }
    // Shifts per row and per column, the tile maxima (0 for a row with no logit).
    T *rsh = rs, *csh = cs;  // reuse: the sums go to rmx/cmx's slots after the shifts are taken
    for (int64_t i = 0; i < rn; ++i) rsh[i] = rmx[i] == nt_xent::neg_inf<T>() ? T(0) : rmx[i];
    for (int64_t j = 0; !diag && j < cn; ++j) csh[j] = cmx[j] == nt_xent::neg_inf<T>() ? T(0) : cmx[j];
    std::vector<T> sums(rn + cn);
    ops.fwd_split(x, plan.ld, rn, cn, it, diag, rsh, csh, sums.data(), diag ? nullptr : sums.data() + rn);
    for (int64_t i = 0; i < rn; ++i) nt_xent::lse_merge(m[r0 + i], l[r0 + i], rmx[i], sums[i]);
    for (int64_t j = 0; !diag && j < cn; ++j) nt_xent::lse_merge(m[c0 + j], l[c0 + j], cmx[j], sums[rn + j]);
  });
  for (int64_t i = 0; i < M; ++i) out[i] = nt_xent::lse_finalize(m[i], l[i]);
}

at::Tensor nt_xent_lse_sym_cpu(const at::Tensor& z_in, double inv_temp) {
  const char* op = "sslops::nt_xent_lse_sym";
  check_lse_inputs(z_in, z_in, c10::nullopt, inv_temp, op);
  check_cpu(z_in, op);
  const auto z = z_in.detach().contiguous();
  auto lse = new_output({z.size(0)}, z.options());
  if (z.size(0) == 0) return lse;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "nt_xent_lse_sym_cpu", [&] {
    lse_sym<scalar_t>(z.data_ptr<scalar_t>(), z.size(0), z.size(1), inv_temp, lse.data_ptr<scalar_t>());
  });
  return lse;
}

// grad_z = inv_temp * (A + A^T) @ z, tile (I, J) giving W_IJ = (A + A^T)_IJ
// for grad_I += W z_J and grad_J += W^T z_I.  The diagonal round initialises
// every row of grad_z (beta = 0).
template <typename T>
void lse_backward_sym(const T* z, int64_t M, int64_t D, const T* lse_s, const T* g, double inv_temp, T* grad) {
  const auto& ops = sym_tile_ops<T>();
  const SymPlan plan(M, 16);
  SymScratch<T> scratch(plan);
  // Per block: the range of its rows' (safe) lse, and whether all are finite.
  std::vector<T> lse_lo(plan.B), lse_hi(plan.B);
  std::vector<char> lse_finite(plan.B);
  for (int64_t blk = 0; blk < plan.B; ++blk) {
    const T* v = lse_s + plan.row0(blk);
    T lo = v[0], hi = v[0];
    bool fin = true;
    for (int64_t i = 0; i < plan.rows(blk); ++i) {
      fin = fin && std::isfinite(v[i]) && std::isfinite(g[plan.row0(blk) + i]);
      lo = std::min(lo, v[i]), hi = std::max(hi, v[i]);
    }
    lse_lo[blk] = lo, lse_hi[blk] = hi, lse_finite[blk] = fin;
  }
  const T spread = nt_xent::max_shared_spread<T>();
  const T it = T(inv_temp);
  // g * inv_temp: the weights carry the gradient's 1/T, so the GEMMs run with alpha = 1.
  std::vector<T> g_s(g, g + M);
  for (auto& v : g_s) v *= it;
  plan.run([&](int64_t I, int64_t J, int th) {
    const bool diag = I == J;
    const int64_t r0 = plan.row0(I), rn = plan.rows(I), c0 = plan.row0(J), cn = plan.rows(J);
    T* x = scratch.tile_of(th);
    T *a = scratch.vec_of(th, 0), *b = scratch.vec_of(th, 1);
    gemm<T>(false, true, rn, cn, D, T(1), z + r0 * D, D, z + c0 * D, D, T(0), x, plan.ld);
    if (diag) symmetrize(x, plan.ld, rn);
    const T lo = std::min(lse_lo[I], lse_lo[J]), hi = std::max(lse_hi[I], lse_hi[J]);
    if (lse_finite[I] && lse_finite[J] && hi - lo <= spread) {
      for (int64_t i = 0; i < rn; ++i) a[i] = nt_xent::shared_factor(g_s[r0 + i], lse_s[r0 + i], lo);
      for (int64_t j = 0; !diag && j < cn; ++j) b[j] = nt_xent::shared_factor(g_s[c0 + j], lse_s[c0 + j], lo);
      ops.bwd_shared(x, plan.ld, rn, cn, it, diag, lo, a, diag ? a : b);
    } else {
      ops.bwd_split(x, plan.ld, rn, cn, it, diag, lse_s + r0, g_s.data() + r0, lse_s + c0, g_s.data() + c0);
    }
    gemm<T>(false, false, rn, D, cn, T(1), x, plan.ld, z + c0 * D, D, diag ? T(0) : T(1), grad + r0 * D, D);
    if (!diag) gemm<T>(true, false, cn, D, rn, T(1), x, plan.ld, z + r0 * D, D, T(1), grad + c0 * D, D);
  });
}

at::Tensor nt_xent_lse_backward_sym_cpu(const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& lse_in,
                                        double inv_temp) {
  const char* op = "sslops::nt_xent_lse_backward_sym";
  check_lse_inputs(z_in, z_in, c10::nullopt, inv_temp, op);
  check_cpu(z_in, op);
  check_backward(grad_in, lse_in, z_in, op);
  const auto z = z_in.detach().contiguous();
  const auto g = grad_in.to(z.scalar_type()).contiguous();
  const auto lse = lse_in.to(z.scalar_type()).contiguous();
  auto grad_z = new_output_like(z);
  if (z.size(0) == 0) return grad_z;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "nt_xent_lse_backward_sym_cpu", [&] {
    const auto lse_s = safe_lse(lse.data_ptr<scalar_t>(), z.size(0));
    lse_backward_sym<scalar_t>(z.data_ptr<scalar_t>(), z.size(0), z.size(1), lse_s.data(), g.data_ptr<scalar_t>(),
                               inv_temp, grad_z.data_ptr<scalar_t>());
  });
  return grad_z;
}

}  // namespace

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("nt_xent_lse", &nt_xent_lse_cpu);
  m.impl("nt_xent_lse_backward", &nt_xent_lse_backward_cpu);
  m.impl("nt_xent_lse_backward_sym", &nt_xent_lse_backward_sym_cpu);
  m.impl("nt_xent_lse_sym", &nt_xent_lse_sym_cpu);
}

}  // namespace sslops

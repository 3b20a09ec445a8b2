// CPU kernels of the fused supervised / multi-view contrastive statistics
// (sslops.sup_con; the contract is in csrc/sslops.cpp, the math in
// csrc/common/sup_con.h).
//
// The (N, N) logits are never built.  As in nt_xent.cpp's symmetric kernels,
// the logits x_ij = x_ji and the positive mask (labels_i == labels_j) are
// symmetric: z's rows are cut into blocks and each tile (I, J), I <= J, is
// computed once (one BLAS product, at::mm_out into a per-thread buffer that
// stays in L2) for the row statistics of block I (its row sums) and those of
// block J (its column sums); a diagonal tile uses its strict upper triangle
// only.  The tiles run in parallel on nt_xent's schedule (csrc/cpu/sym_plan.h:
// each block's tiles one at a time, in a fixed order), writing the rows' state
// in place: no atomics, and every row's summation order is fixed by N alone.
//   forward   one exponential per logit (ATen's vectorised exp over the tile)
//             with one shift for the tile, shared by the candidates and the
//             positives: the bound inv_temp |z|_max,I |z|_max,J when the
//             logits' possible spread is within max_shared_spread (no max
//             pass), else the tile's largest logit when every row's and
//             column's maxima lie within that spread of it and their positives'
//             within pos_shift_limit; else (rare: huge logits, non-finite
//             values) shifts per row and per column, scalar.
//   backward  one exponential per logit, exp(x - s) with s the rows' smallest
//             lse (see stats_backward), then grad_I += U z_J, grad_J += U^T z_I
//             for the tile's part U of W + W^T.
// Extra memory: O(threads * kSymTile^2) on top of the outputs.
//
// The per-row loops over a tile (the label compares, maxima, sums and the
// gradient weights: csrc/cpu/sup_con_rows.inc) are built for the baseline ISA,
// AVX2/FMA and AVX-512 (GCC on x86-64), the widest the CPU has picked at run
// time (csrc/cpu/isa.h).  In the baseline and AVX2 builds GCC may leave the
// label-masked loops scalar (their selects want AVX-512's mask registers), so
// those builds are correct but slower.  Labels are compared as int32 ids (int64
// labels are renumbered when they do not fit).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/output.h"
#include "common/sup_con.h"
#include "cpu/isa.h"
#include "cpu/sym_plan.h"

// No contraction of a * b + c into an FMA: the logits x * inv_temp must round
// alike in every loop and in the forward and the backward, or a nearly one-hot
// softmax at large logits gets weights off by exp(rounding of x).
#pragma GCC optimize("fp-contract=off")

namespace sslops {
namespace {

using nt_xent::neg_inf;

constexpr int64_t kVecs = 12;    // per-thread vectors of a block's length next to the tile (TileStats)


// z (N, D) float32/float64 on the CPU, labels (N,) int64 there, inv_temp > 0.
void check_inputs(const at::Tensor& z, const at::Tensor& labels, double inv_temp, const char* op) {
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D (N, D), got shape ", z.sizes());
  TORCH_CHECK(z.device().is_cpu(), op, ": expected CPU tensors, got z on ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op,
              ": the CPU kernel takes float32 or float64 z, got ", z.scalar_type(),
              " (sslops.sup_con upcasts half types before calling it)");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), op, ": labels must have shape (N,) = (", z.size(0),
              ",), got ", labels.sizes());
  check_same_device(z, "z", labels, "labels", op);
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0, op, ": inv_temp must be finite and > 0, got ", inv_temp);
}

void check_stats(const at::Tensor& t, const char* name, const at::Tensor& z, const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == 4 && t.size(1) == z.size(0), op, ": ", name, " must have shape (4, N) = (4, ",
              z.size(0), "), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating, got ", t.scalar_type());
  check_same_device(z, "z", t, name, op);
}

// ---- row loops (csrc/cpu/sup_con_rows.inc), built for the baseline ISA, AVX2 and AVX-512

namespace base {
#include "cpu/sup_con_rows.inc"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SSLOPS_SUP_CON_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/sup_con_rows.inc"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
namespace avx512 {
#include "cpu/sup_con_rows.inc"
}  // namespace avx512
#pragma GCC pop_options
#else
#define SSLOPS_SUP_CON_X86 0
#endif

template <typename T>
struct RowLoops {
  decltype(&base::max_row<T>) max_row;
  decltype(&base::scan_row<T>) scan_row;
  decltype(&base::sum_row<T>) sum_row;
  decltype(&base::shift_row<T>) shift_row;
  decltype(&base::weight_row<T>) weight_row;
};
#define SSLOPS_SUP_CON_LOOPS(NS, T) \
  RowLoops<T> { &NS::max_row<T>, &NS::scan_row<T>, &NS::sum_row<T>, &NS::shift_row<T>, &NS::weight_row<T> }

// The widest build the CPU runs; SSLOPS_CPU_ISA=base|avx2 caps it (read per
// call, so tests can run every path).
template <typename T>
RowLoops<T> row_loops() {
#if SSLOPS_SUP_CON_X86
  const int level = cpu_isa::level();
  if (level == 2) return SSLOPS_SUP_CON_LOOPS(avx512, T);
  if (level == 1) return SSLOPS_SUP_CON_LOOPS(avx2, T);
#endif
  return SSLOPS_SUP_CON_LOOPS(base, T);
}
#undef SSLOPS_SUP_CON_LOOPS

// labels (N,) int64 as int32 ids, equal iff the labels are: a cast when they fit, else renumbered.
at::Tensor label_ids(const at::Tensor& labels) {
  if (labels.numel() == 0) return labels.to(at::kInt);
  const auto mm = at::aminmax(labels);
  if (std::get<0>(mm).item<int64_t>() >= std::numeric_limits<int32_t>::min() &&
      std::get<1>(mm).item<int64_t>() <= std::numeric_limits<int32_t>::max())
    return labels.to(at::kInt).contiguous();
  return std::get<1>(at::_unique(labels, /*sorted=*/false, /*return_inverse=*/true)).to(at::kInt).contiguous();
}

// z's N rows in blocks and the tiles (I, J), I <= J, of the symmetric logits:
// the schedule of nt_xent's symmetric kernels (cpu_sym::SymPlan), whose
// runner gives each block's tiles one at a time in a fixed order, so every
// row's accumulation order is fixed by N alone (never by the thread count).
struct SymRounds {
  cpu_sym::SymPlan plan;
  int64_t N, bs, nb, ld;

  explicit SymRounds(int64_t n) : plan(n, 16), N(n), bs(plan.bs), nb(plan.B), ld(plan.ld) {}
  int64_t row0(int64_t b) const { return plan.row0(b); }
  int64_t rows(int64_t b) const { return plan.rows(b); }

  // One tile: blocks I <= J, rows [r0, r0 + rn) and columns [c0, c0 + cn), x
  // (rn x cn, row stride ld) a thread's buffer holding <z_i, z_j>.
  struct Tile {
    int64_t I, J, r0, rn, c0, cn;
    bool diag;
    at::Tensor x;
  };

  // fn(tile, scratch) on every tile with x filled (one BLAS product) and
  // scratch the thread's kVecs * ld elements next to it.
  template <typename T, typename F>
  void run(const at::Tensor& z, const F& fn) const {
    const int64_t per = bs * ld + kVecs * ld;
    auto buf = at::empty({std::max(1, at::get_num_threads()) * per}, z.options());
    plan.run([&](int64_t I, int64_t J, int thread) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
      const int64_t off = thread * per;
      Tile tile{I, J, row0(I), rows(I), row0(J), rows(J), I == J,
                buf.as_strided({rows(I), rows(J)}, {ld, 1}, buf.storage_offset() + off)};
      at::mm_out(tile.x, z.narrow(0, tile.r0, tile.rn), z.narrow(0, tile.c0, tile.cn).t());
      fn(tile, buf.data_ptr<T>() + off + bs * ld);
    });
  }
};

// The largest row norm of each block (double; NaN if a row's is):
// |x_ij| <= inv_temp |z|_max,I |z|_max,J bounds a tile's logits.
template <typename T>
std::vector<double> block_norms(const T* z, int64_t D, const SymRounds& plan) {
  std::vector<double> out(plan.nb, 0.0);
  for (int64_t b = 0; b < plan.nb; ++b)
    for (int64_t i = plan.row0(b); i < plan.row0(b) + plan.rows(b); ++i) {
      double ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += double(z[i * D + d]) * double(z[i * D + d]);
      out[b] = std::isnan(ss) || std::isnan(out[b]) ? std::nan("") : std::max(out[b], std::sqrt(ss));
    }
  return out;
}

// A tile's statistics, rows then columns, before the merge into the rows'
// state.  On a diagonal tile the two halves belong to the same rows (the
// upper triangle's logits, once as row i's, once as column j's).
template <typename T>
struct TileStats {
  T *mx, *mp, *ps, *ct, *l, *lp;  // each 2 * ld: the rows at 0, the columns at ld
  TileStats(T* scratch, int64_t ld)
      : mx(scratch), mp(mx + 2 * ld), ps(mp + 2 * ld), ct(ps + 2 * ld), l(ct + 2 * ld), lp(l + 2 * ld) {}
};

// A tile with no shift to share (its logits' possible spread too wide, non-finite values, positives far
// below the tile's maximum): shifts per row and per column for the candidates and for the positives, four
// scalar exponentials per logit.  Rare.  t holds the maxima (max_row) on entry; on return the shifts (mx,
// mp) with the sums (l, lp, ps, ct), row and column halves as in TileStats.
template <typename T>
void tile_split(const T* x, int64_t ld, int64_t rn, int64_t cn, bool diag, const int32_t* lab_r, const int32_t* lab_c,
                T it, TileStats<T>& t) {
  // The shifts: each row's and each column's maxima (the row's own on a diagonal tile).
  std::vector<T> sh(4 * ld);
  T *rs = sh.data(), *cs = rs + ld, *rps = cs + ld, *cps = rps + ld;
  for (int64_t i = 0; i < rn; ++i) rs[i] = std::max(t.mx[i], diag ? t.mx[ld + i] : neg_inf<T>());
  for (int64_t i = 0; i < rn; ++i) rps[i] = std::max(t.mp[i], diag ? t.mp[ld + i] : neg_inf<T>());
  for (int64_t j = 0; j < cn; ++j) cs[j] = diag ? rs[j] : t.mx[ld + j], cps[j] = diag ? rps[j] : t.mp[ld + j];
  for (auto& v : sh) v = v == neg_inf<T>() ? T(0) : v;
  for (int64_t k = 0; k < 2 * ld; ++k) t.mx[k] = t.mp[k] = t.l[k] = t.lp[k] = t.ps[k] = t.ct[k] = T(0);
  for (int64_t i = 0; i < rn; ++i)
    for (int64_t j = diag ? i + 1 : 0; j < cn; ++j) {
      const T v = x[i * ld + j] * it;
      t.l[i] += nt_xent::shifted_exp(v, rs[i]);
      t.l[ld + j] += nt_xent::shifted_exp(v, cs[j]);
      if (lab_c[j] != lab_r[i]) continue;
      t.lp[i] += nt_xent::shifted_exp(v, rps[i]);
      t.lp[ld + j] += nt_xent::shifted_exp(v, cps[j]);
      t.ps[i] += v, t.ps[ld + j] += v;
      t.ct[i] += 1, t.ct[ld + j] += 1;
    }
  for (int64_t i = 0; i < rn; ++i) t.mx[i] = rs[i], t.mp[i] = rps[i];
  for (int64_t j = 0; j < cn; ++j) t.mx[ld + j] = cs[j], t.mp[ld + j] = cps[j];
}

template <typename T>
void stats_sym(const at::Tensor& z, const int32_t* lab, double inv_temp, T* out) {
  const int64_t N = z.size(0), D = z.size(1);
  const auto L = row_loops<T>();
  const SymRounds plan(N);
  const auto norm = block_norms(z.data_ptr<T>(), D, plan);
  const T it = T(inv_temp), lo = nt_xent::min_exp_arg<T>(), ninf = neg_inf<T>();
  const T spread = nt_xent::max_shared_spread<T>(), limit = sup_con::pos_shift_limit<T>();
  std::vector<sup_con::RowStats<T>> st(N, sup_con::stats_init<T>());
  const int64_t ld = plan.ld;
  plan.run<T>(z, [&](const SymRounds::Tile& tile, T* scratch) {
    const auto& [I, J, r0, rn, c0, cn, diag, xt] = tile;
    T* x = xt.data_ptr<T>();
    const int32_t *lab_r = lab + r0, *lab_c = lab + c0;
    TileStats<T> t(scratch, ld);
    // The shift: the bound on the tile's logits when their possible spread allows it (no max pass), else
    // the tile's largest logit if every row's and column's maxima (and positives' maxima, pos_shift_limit)
    // lie close enough below it, else none (tile_split).
    const double bound = inv_temp * norm[I] * norm[J];
    bool shared = std::isfinite(bound) && 2 * bound <= double(spread);
    T shift = T(bound);
    if (!shared) {
      std::fill(t.mx, t.mx + 2 * ld, ninf);
      std::fill(t.mp, t.mp + 2 * ld, ninf);
      for (int64_t i = 0; i < rn; ++i) {
        T r[2];
        L.max_row(x + i * ld, diag ? i + 1 : 0, cn, lab_c, lab_r[i], it, r, t.mx + ld, t.mp + ld);
        t.mx[i] = r[0], t.mp[i] = r[1];
      }
      T hi = ninf, low = -ninf, plow = -ninf;
      bool finite = true;
      for (int64_t k = 0; k < 2 * ld; ++k) {
        if ((k < ld ? k >= rn : k - ld >= cn) || t.mx[k] == ninf) continue;  // padding, or no logit
        finite = finite && std::isfinite(t.mx[k]) && (t.mp[k] == ninf || std::isfinite(t.mp[k]));
        hi = std::max(hi, t.mx[k]), low = std::min(low, t.mx[k]);
        if (t.mp[k] != ninf) plow = std::min(plow, t.mp[k]);
      }
      // (On a diagonal tile a row's maximum is the larger of its two halves'; testing the halves is stricter.)
      shared = finite && hi - low <= spread && (plow == -ninf || hi - plow <= limit);
      shift = hi == ninf ? T(0) : hi;
      if (!shared) {
        tile_split(x, ld, rn, cn, diag, lab_r, lab_c, it, t);
        for (int64_t i = 0; i < rn; ++i)
          sup_con::stats_merge(st[r0 + i], t.mx[i], t.l[i], t.mp[i], t.lp[i], t.ps[i], t.ct[i]);
        for (int64_t j = 0; j < cn; ++j)
          sup_con::stats_merge(st[c0 + j], t.mx[ld + j], t.l[ld + j], t.mp[ld + j], t.lp[ld + j], t.ps[ld + j],
                               t.ct[ld + j]);
        return;
      }
    }
    std::fill(t.ps + ld, t.ps + 2 * ld, T(0));
    std::fill(t.ct + ld, t.ct + 2 * ld, T(0));
    std::fill(t.l + ld, t.l + 2 * ld, T(0));
    std::fill(t.lp + ld, t.lp + 2 * ld, T(0));
    for (int64_t i = 0; i < rn; ++i) {
      T r[2];
      L.scan_row(x + i * ld, diag ? i + 1 : 0, cn, lab_c, lab_r[i], it, shift, lo, r, t.ps + ld, t.ct + ld);
      t.ps[i] = r[0], t.ct[i] = r[1];
    }
    xt.exp_();  // ATen's vectorised exp over the tile (a diagonal tile's unused lower triangle too)
    for (int64_t i = 0; i < rn; ++i) {
      T r[2];
      L.sum_row(x + i * ld, diag ? i + 1 : 0, cn, lab_c, lab_r[i], r, t.l + ld, t.lp + ld);
      t.l[i] = r[0], t.lp[i] = r[1];
    }
    for (int64_t i = 0; i < rn; ++i)
      sup_con::stats_merge(st[r0 + i], shift, t.l[i], shift, t.lp[i], t.ps[i], t.ct[i]);
    for (int64_t j = 0; j < cn; ++j)
      sup_con::stats_merge(st[c0 + j], shift, t.l[ld + j], shift, t.lp[ld + j], t.ps[ld + j], t.ct[ld + j]);
  });
  for (int64_t i = 0; i < N; ++i) sup_con::stats_finalize(st[i], out + i, N);
}

at::Tensor sup_con_stats_cpu(const at::Tensor& z_in, const at::Tensor& labels_in, double inv_temp) {
  const char* op = "sslops::sup_con_stats";
  check_inputs(z_in, labels_in, inv_temp, op);
  const auto z = z_in.detach().contiguous();
  auto stats = new_output({4, z.size(0)}, z.options());
  if (z.size(0) == 0) return stats;
  const auto ids = label_ids(labels_in);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sup_con_stats_cpu", [&] {
    stats_sym<scalar_t>(z, ids.data_ptr<int32_t>(), inv_temp, stats.data_ptr<scalar_t>());
  });
  return stats;
}

// Per-row inputs of the backward, in the kernel's dtype.
template <typename scalar_t>
struct RowGrads {
  std::vector<scalar_t> ga, gs, f, gp, lse, lpos;  // f: sup_con::positive_factor
  std::vector<char> direct;
  RowGrads(const scalar_t* g, const scalar_t* stats, int64_t n)
      : ga(g, g + n), gs(g + 2 * n, g + 3 * n), f(n), gp(g + n, g + 2 * n), lse(n), lpos(n), direct(n) {
    for (int64_t i = 0; i < n; ++i) {
      bool d = false;
      f[i] = sup_con::positive_factor(gp[i], stats[i], stats[n + i], d);
      direct[i] = d;
      lse[i] = sup_con::safe_lse(stats[i]);
      lpos[i] = sup_con::safe_lse(stats[n + i]);
    }
  }
  bool any_direct(int64_t i0, int64_t n) const {
    return std::any_of(direct.begin() + i0, direct.begin() + i0 + n, [](char d) { return d != 0; });
  }
};

// grad_z = inv_temp * (W + W^T) @ z.  Tile (I, J) of the symmetric plan gives
// the upper part U of W + W^T there (the strict upper triangle on a diagonal
// tile, 0 below), and grad_I += inv_temp U z_J, grad_J += inv_temp U^T z_I.
// One exponential per logit, exp(x - s) with s the smallest lse of the rows of
// I and J, when their lse lie within max_shared_spread of each other and no
// row's positives take their own exp (positive_factor's `direct`):
//     W_ij + W_ji = exp(x - s) (a_i + a_j + [pos] (b_i + b_j)) + [pos] (gs_i + gs_j),
//     a_i = ga_i exp(s - lse_i),  b_i = f_i exp(s - lse_i) = gp_i exp(s - lpos_i);
// else (rare) the two exponentials of sup_con::grad_weight, by row and by column.
template <typename T>
void stats_backward(const at::Tensor& z, const int32_t* lab, const RowGrads<T>& rg, double inv_temp,
                    at::Tensor& grad_z) {
  const int64_t N = z.size(0);
  const auto L = row_loops<T>();
  const SymRounds plan(N);
  const T it = T(inv_temp), lo = nt_xent::min_exp_arg<T>(), spread = nt_xent::max_shared_spread<T>();
  // Per block: the range of its rows' lse, and whether they all allow the shared exponential.
  std::vector<T> lse_lo(plan.nb), lse_hi(plan.nb);
  std::vector<char> plain(plan.nb);
  for (int64_t b = 0; b < plan.nb; ++b) {
    const int64_t r0 = plan.row0(b);
    lse_lo[b] = *std::min_element(rg.lse.begin() + r0, rg.lse.begin() + r0 + plan.rows(b));
    lse_hi[b] = *std::max_element(rg.lse.begin() + r0, rg.lse.begin() + r0 + plan.rows(b));
    bool ok = !rg.any_direct(r0, plan.rows(b));
    for (int64_t i = r0; ok && i < r0 + plan.rows(b); ++i)
      ok = std::isfinite(rg.lse[i]) && std::isfinite(rg.ga[i]) && std::isfinite(rg.f[i]) && std::isfinite(rg.gs[i]);
    plain[b] = ok;
  }
  grad_z.zero_();
  const int64_t ld = plan.ld;
  plan.run<T>(z, [&](const SymRounds::Tile& tile, T* scratch) {
    const auto& [I, J, r0, rn, c0, cn, diag, xt] = tile;
    T* x = xt.data_ptr<T>();
    const int32_t *lab_r = lab + r0, *lab_c = lab + c0;
    const T s = std::min(lse_lo[I], lse_lo[J]);
    if (plain[I] && plain[J] && std::max(lse_hi[I], lse_hi[J]) - s <= spread) {
      T *a = scratch, *b = a + ld, *ac = b + ld, *bc = ac + ld;
      for (int64_t i = 0; i < rn; ++i)
        a[i] = nt_xent::shared_factor(rg.ga[r0 + i], rg.lse[r0 + i], s),
        b[i] = nt_xent::shared_factor(rg.f[r0 + i], rg.lse[r0 + i], s);
      for (int64_t j = 0; j < cn; ++j)
        ac[j] = nt_xent::shared_factor(rg.ga[c0 + j], rg.lse[c0 + j], s),
        bc[j] = nt_xent::shared_factor(rg.f[c0 + j], rg.lse[c0 + j], s);
      for (int64_t i = 0; i < rn; ++i) L.shift_row(x + i * ld, cn, it, s, lo);
      xt.exp_();
      for (int64_t i = 0; i < rn; ++i)
        L.weight_row(x + i * ld, diag ? i + 1 : 0, cn, lab_c, lab_r[i], ac, bc, rg.gs.data() + c0, a[i], b[i],
                     rg.gs[r0 + i]);
    } else {
      for (int64_t i = 0; i < rn; ++i) {
        const int64_t r = r0 + i;
        T* row = x + i * ld;
        for (int64_t j = 0; j < cn; ++j) {
          const int64_t c = c0 + j;
          if (diag && j <= i) {
            row[j] = T(0);
            continue;
          }
          const T v = row[j] * it;
          const bool pos = lab_c[j] == lab_r[i];
          T w = sup_con::grad_weight(nt_xent::shifted_exp(v, rg.lse[r]), nt_xent::shifted_exp(v, rg.lse[c]), pos,
                                     rg.ga[r], rg.ga[c], rg.f[r], rg.f[c], rg.gs[r], rg.gs[c]);
          if (pos && rg.direct[r]) w += sup_con::positive_direct(v, rg.lpos[r], rg.gp[r]);
          if (pos && rg.direct[c]) w += sup_con::positive_direct(v, rg.lpos[c], rg.gp[c]);
          row[j] = w;
        }
      }
    }
    auto gI = grad_z.narrow(0, r0, rn), gJ = grad_z.narrow(0, c0, cn);
    gI.addmm_(xt, z.narrow(0, c0, cn));
    gJ.addmm_(xt.t(), z.narrow(0, r0, rn));
  });
  grad_z.mul_(inv_temp);
}

at::Tensor sup_con_stats_backward_cpu(const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& labels_in,
                                      const at::Tensor& stats_in, double inv_temp) {
  const char* op = "sslops::sup_con_stats_backward";
  check_inputs(z_in, labels_in, inv_temp, op);
  check_stats(grad_in, "grad_stats", z_in, op);
  check_stats(stats_in, "stats", z_in, op);
  const auto z = z_in.detach().contiguous();
  const auto g = grad_in.to(z.scalar_type()).contiguous();
  const auto stats = stats_in.to(z.scalar_type()).contiguous();
  auto grad_z = new_output_like(z);
  if (z.size(0) == 0 || z.size(1) == 0) return grad_z.zero_();
  const auto ids = label_ids(labels_in);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sup_con_stats_backward_cpu", [&] {
    const RowGrads<scalar_t> rg(g.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(), z.size(0));
    stats_backward<scalar_t>(z, ids.data_ptr<int32_t>(), rg, inv_temp, grad_z);
  });
  return grad_z;
}

}  // namespace

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("sup_con_stats", &sup_con_stats_cpu);
  m.impl("sup_con_stats_backward", &sup_con_stats_backward_cpu);
}

}  // namespace sslops

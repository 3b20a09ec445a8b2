// CPU kernels of the fused supervised / multi-view contrastive statistics
// (sslops.sup_con; the contract is in csrc/sslops.cpp, the math in
// csrc/common/sup_con.h).
//
// The (N, N) logits are never built.  As in csrc/cpu/nt_xent.cpp, rows are
// split into blocks of kRowBlock that run in parallel (at::parallel_for), each
// block walks the columns in tiles of kColBlock, a tile's logits come from one
// BLAS product (at::mm_out into a per-thread buffer that stays in L2) and its
// exponentials from ATen's vectorised exp.  The forward takes one exp per
// logit: the positives' log-sum-exp reuses the candidates' exponentials
// (sup_con::shares_shift); the backward takes two (by row and by column) and
// one BLAS product W_IJ @ z_J per tile.  Extra memory: O(threads * kRowBlock *
// kColBlock) on top of the outputs; every output row is owned by one task, so
// no atomics and a fixed summation order.
//
// The per-row loops over a tile (the label compares, maxima, sums and the
// gradient weights: csrc/cpu/sup_con_rows.inc) are built for the baseline ISA,
// AVX2/FMA and AVX-512 (GCC on x86-64), the widest the CPU has picked at run
// time.  GCC 12 vectorises every loop in the AVX-512 build; in the baseline and
// AVX2 builds it leaves the two label-masked ones (scan_row, weight_row)
// scalar (their selects need AVX-512's mask registers), so those builds are
// correct but slower.  Labels are compared as int32 ids (int64 labels are
// renumbered when they do not fit).
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

namespace sslops {
namespace {

using nt_xent::neg_inf;

constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 512;


inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// A (rows x cols) view with row stride kColBlock into a per-thread tile buffer.
inline at::Tensor tile_view(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.as_strided({rows, cols}, {kColBlock, 1});
}

// s = inv_temp * a @ b^T, via BLAS.
inline void logits_tile(at::Tensor& s, const at::Tensor& a, const at::Tensor& b, double inv_temp) {
  at::mm_out(s, a, b.t());
  s.mul_(inv_temp);
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
  decltype(&base::scan_row<T>) scan_row;
  decltype(&base::shift_row<T>) shift_row;
  decltype(&base::sum_row<T>) sum_row;
  decltype(&base::shift_row_pair<T>) shift_row_pair;
  decltype(&base::weight_row<T>) weight_row;
};
#define SSLOPS_SUP_CON_LOOPS(NS, T) \
  RowLoops<T> { &NS::scan_row<T>, &NS::shift_row<T>, &NS::sum_row<T>, &NS::shift_row_pair<T>, &NS::weight_row<T> }

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

template <typename scalar_t>
void stats_rows(const at::Tensor& z, const int32_t* lab, double inv_temp, scalar_t* out) {
  const int64_t N = z.size(0);
  const auto L = row_loops<scalar_t>();
  const scalar_t lo = nt_xent::min_exp_arg<scalar_t>();
  at::parallel_for(0, ceil_div(N, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
    auto buf = at::empty({kRowBlock * kColBlock}, z.options());
    std::vector<sup_con::RowStats<scalar_t>> st(kRowBlock);
    std::vector<scalar_t> tile_m(kRowBlock), tile_mp(kRowBlock), tile_lp(kRowBlock);
    std::vector<char> shared(kRowBlock);
    std::vector<int32_t> lab_t(kColBlock);  // the tile's labels, the row's own column relabelled
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, rn = std::min(kRowBlock, N - r0);
      const auto zb = z.narrow(0, r0, rn);
      std::fill(st.begin(), st.end(), sup_con::stats_init<scalar_t>());
      for (int64_t c0 = 0; c0 < N; c0 += kColBlock) {
        const int64_t cn = std::min(kColBlock, N - c0);
        std::copy(lab + c0, lab + c0 + cn, lab_t.begin());
        int32_t* lt = lab_t.data();
        auto s = tile_view(buf, rn, cn);
        logits_tile(s, zb, z.narrow(0, c0, cn), inv_temp);
        scalar_t* sp = s.data_ptr<scalar_t>();
        // Per row: the maxima, sum and count of the tile (diagonal at -inf,
        // never a positive), then shift the row by its candidates' maximum.
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          const int64_t e = r0 + i - c0;
          const int32_t li = lab[r0 + i];
          const bool diag = e >= 0 && e < cn;
          if (diag) row[e] = neg_inf<scalar_t>(), lt[e] = ~li;
          scalar_t r[4];  // mx, mp, psum, cnt
          L.scan_row(row, lt, li, cn, r);
          const scalar_t mx = r[0], mp = r[1];
          st[i].psum += r[2];
          st[i].cnt += r[3];
          tile_m[i] = mx;
          shared[i] = sup_con::shares_shift(mx, mp);
          if (!shared[i]) {  // positives far below the row's maximum: their own exp, shift mp (rare)
            scalar_t lp = 0;
            for (int64_t j = 0; j < cn; ++j)
              if (lt[j] == li) lp += nt_xent::exp_(std::max(row[j] - mp, lo));
            tile_mp[i] = mp;
            tile_lp[i] = lp;
          }
          if (diag) lt[e] = li;
          L.shift_row(row, cn, mx == neg_inf<scalar_t>() ? scalar_t(0) : mx, lo);
        }
        s.exp_();  // ATen's vectorised exp over the whole tile
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          const int64_t e = r0 + i - c0;
          const int32_t li = lab[r0 + i];
          const bool diag = e >= 0 && e < cn;
          if (diag) row[e] = 0, lt[e] = ~li;
          scalar_t r[2];  // sum of exp over the candidates, over the positives
          L.sum_row(row, lt, li, cn, r);
          if (diag) lt[e] = li;
          if (shared[i]) {
            tile_mp[i] = tile_m[i];
            tile_lp[i] = r[1];
          }
          sup_con::stats_merge(st[i], tile_m[i], r[0], tile_mp[i], tile_lp[i], scalar_t(0), scalar_t(0));
        }
      }
      for (int64_t i = 0; i < rn; ++i) sup_con::stats_finalize(st[i], out + r0 + i, N);
    }
  });
}

at::Tensor sup_con_stats_cpu(const at::Tensor& z_in, const at::Tensor& labels_in, double inv_temp) {
  const char* op = "sslops::sup_con_stats";
  check_inputs(z_in, labels_in, inv_temp, op);
  const auto z = z_in.detach().contiguous();
  auto stats = new_output({4, z.size(0)}, z.options());
  if (z.size(0) == 0) return stats;
  const auto ids = label_ids(labels_in);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sup_con_stats_cpu", [&] {
    stats_rows<scalar_t>(z, ids.data_ptr<int32_t>(), inv_temp, stats.data_ptr<scalar_t>());
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

// grad_z = inv_temp * (W + W^T) @ z.  The tile x_IJ of a row block I gives both
// W_IJ (row statistics of I) and (W^T)_IJ (column statistics of J): one pass
// over row blocks.
template <typename scalar_t>
void stats_backward(const at::Tensor& z, const int32_t* lab, const RowGrads<scalar_t>& rg, double inv_temp,
                    at::Tensor& grad_z) {
  const int64_t N = z.size(0);
  const scalar_t lo = nt_xent::min_exp_arg<scalar_t>();
  const auto L = row_loops<scalar_t>();
  at::parallel_for(0, ceil_div(N, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
    constexpr int64_t kTile = kRowBlock * kColBlock;
    auto buf = at::empty({3 * kTile}, z.options());
    auto buf2 = buf.narrow(0, kTile, kTile), buf3 = buf.narrow(0, 2 * kTile, kTile);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, rn = std::min(kRowBlock, N - r0);
      const auto zb = z.narrow(0, r0, rn);
      auto gz = grad_z.narrow(0, r0, rn);
      gz.zero_();
      for (int64_t c0 = 0; c0 < N; c0 += kColBlock) {
        const int64_t cn = std::min(kColBlock, N - c0);
        auto s = tile_view(buf, rn, cn);   // x, then exp(x - lse_i), then W_IJ + (W^T)_IJ
        auto t = tile_view(buf2, rn, cn);  // exp(x - lse_j)
        const auto zc = z.narrow(0, c0, cn);
        logits_tile(s, zb, zc, inv_temp);
        scalar_t* sp = s.data_ptr<scalar_t>();
        scalar_t* tp = t.data_ptr<scalar_t>();
        const int32_t* lab_c = lab + c0;
        // Rows or columns whose positives take their own exp (rare): their
        // positive weights, from x before it is overwritten.
        const bool direct = rg.any_direct(r0, rn) || rg.any_direct(c0, cn);
        scalar_t* up = direct ? tile_view(buf3, rn, cn).data_ptr<scalar_t>() : nullptr;
        if (direct)
          for (int64_t i = 0; i < rn; ++i) {
            const scalar_t* row = sp + i * kColBlock;
            scalar_t* urow = up + i * kColBlock;
            const int64_t r = r0 + i, e = r - c0;
            const int32_t li = lab[r];
            for (int64_t j = 0; j < cn; ++j) {
              scalar_t u = 0;
              if (lab_c[j] == li && j != e) {
                if (rg.direct[r]) u += sup_con::positive_direct(row[j], rg.lpos[r], rg.gp[r]);
                if (rg.direct[c0 + j]) u += sup_con::positive_direct(row[j], rg.lpos[c0 + j], rg.gp[c0 + j]);
              }
              urow[j] = u;
            }
          }
        const scalar_t* lse_c = rg.lse.data() + c0;
        for (int64_t i = 0; i < rn; ++i)
          L.shift_row_pair(sp + i * kColBlock, tp + i * kColBlock, lse_c, rg.lse[r0 + i], cn, lo);
        s.exp_();
        t.exp_();
        const scalar_t* ga_c = rg.ga.data() + c0;
        const scalar_t* f_c = rg.f.data() + c0;
        const scalar_t* gs_c = rg.gs.data() + c0;
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          const scalar_t* trow = tp + i * kColBlock;
          const int64_t r = r0 + i, e = r - c0;
          L.weight_row(row, trow, lab_c, lab[r], ga_c, f_c, gs_c, rg.ga[r], rg.f[r], rg.gs[r], cn);
          if (direct) {
            const scalar_t* urow = up + i * kColBlock;
#pragma omp simd
            for (int64_t j = 0; j < cn; ++j) row[j] += urow[j];
          }
          if (e >= 0 && e < cn) row[e] = 0;  // each row leaves out itself
        }
        gz.addmm_(s, zc);
      }
      gz.mul_(inv_temp);
    }
  });
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

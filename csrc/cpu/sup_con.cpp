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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/output.h"
#include "common/sup_con.h"

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

template <typename scalar_t>
void stats_rows(const at::Tensor& z, const int64_t* lab, double inv_temp, scalar_t* out) {
  const int64_t N = z.size(0);
  const scalar_t lo = nt_xent::min_exp_arg<scalar_t>();
  at::parallel_for(0, ceil_div(N, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
    auto buf = at::empty({kRowBlock * kColBlock}, z.options());
    std::vector<sup_con::RowStats<scalar_t>> st(kRowBlock);
    std::vector<scalar_t> tile_m(kRowBlock), tile_mp(kRowBlock), tile_lp(kRowBlock);
    std::vector<char> shared(kRowBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, rn = std::min(kRowBlock, N - r0);
      const auto zb = z.narrow(0, r0, rn);
      std::fill(st.begin(), st.end(), sup_con::stats_init<scalar_t>());
      for (int64_t c0 = 0; c0 < N; c0 += kColBlock) {
        const int64_t cn = std::min(kColBlock, N - c0);
        const int64_t* lab_c = lab + c0;
        auto s = tile_view(buf, rn, cn);
        logits_tile(s, zb, z.narrow(0, c0, cn), inv_temp);
        scalar_t* sp = s.data_ptr<scalar_t>();
        // Per row: the maxima, sum and count of the tile (diagonal at -inf,
        // never a positive), then shift the row by its candidates' maximum.
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          const int64_t e = r0 + i - c0, li = lab[r0 + i];
          if (e >= 0 && e < cn) row[e] = neg_inf<scalar_t>();
          scalar_t mx = neg_inf<scalar_t>(), mp = neg_inf<scalar_t>(), ps = 0, ct = 0;
#pragma omp simd reduction(max : mx, mp) reduction(+ : ps, ct)
          for (int64_t j = 0; j < cn; ++j) {
            const scalar_t x = row[j];
            const bool p = lab_c[j] == li && j != e;
            mx = std::max(mx, x);
            mp = std::max(mp, p ? x : neg_inf<scalar_t>());
            ps += p ? x : scalar_t(0);
            ct += p ? scalar_t(1) : scalar_t(0);
          }
          st[i].psum += ps;
          st[i].cnt += ct;
          tile_m[i] = mx;
          shared[i] = sup_con::shares_shift(mx, mp);
          if (!shared[i]) {  // positives far below the row's maximum: their own exp, shift mp (rare)
            scalar_t lp = 0;
            for (int64_t j = 0; j < cn; ++j)
              if (lab_c[j] == li && j != e) lp += nt_xent::exp_(std::max(row[j] - mp, lo));
            tile_mp[i] = mp;
            tile_lp[i] = lp;
          }
          const scalar_t shift = mx == neg_inf<scalar_t>() ? scalar_t(0) : mx;
#pragma omp simd
          for (int64_t j = 0; j < cn; ++j) row[j] = std::max(row[j] - shift, lo);
        }
        s.exp_();  // ATen's vectorised exp over the whole tile
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          const int64_t e = r0 + i - c0, li = lab[r0 + i];
          if (e >= 0 && e < cn) row[e] = 0;
          scalar_t sum = 0, psum_exp = 0;
#pragma omp simd reduction(+ : sum, psum_exp)
          for (int64_t j = 0; j < cn; ++j) {
            sum += row[j];
            psum_exp += (lab_c[j] == li && j != e) ? row[j] : scalar_t(0);
          }
          if (shared[i]) {
            tile_mp[i] = tile_m[i];
            tile_lp[i] = psum_exp;
          }
          sup_con::stats_merge(st[i], tile_m[i], sum, tile_mp[i], tile_lp[i], scalar_t(0), scalar_t(0));
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
  const auto labels = labels_in.contiguous();
  auto stats = new_output({4, z.size(0)}, z.options());
  if (z.size(0) == 0) return stats;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sup_con_stats_cpu", [&] {
    stats_rows<scalar_t>(z, labels.data_ptr<int64_t>(), inv_temp, stats.data_ptr<scalar_t>());
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
void stats_backward(const at::Tensor& z, const int64_t* lab, const RowGrads<scalar_t>& rg, double inv_temp,
                    at::Tensor& grad_z) {
  const int64_t N = z.size(0);
  const scalar_t lo = nt_xent::min_exp_arg<scalar_t>();
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
        const int64_t* lab_c = lab + c0;
        // Rows or columns whose positives take their own exp (rare): their
        // positive weights, from x before it is overwritten.
        const bool direct = rg.any_direct(r0, rn) || rg.any_direct(c0, cn);
        scalar_t* up = direct ? tile_view(buf3, rn, cn).data_ptr<scalar_t>() : nullptr;
        if (direct)
          for (int64_t i = 0; i < rn; ++i) {
            const scalar_t* row = sp + i * kColBlock;
            scalar_t* urow = up + i * kColBlock;
            const int64_t r = r0 + i, e = r - c0, li = lab[r];
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
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          scalar_t* trow = tp + i * kColBlock;
          const scalar_t lse_r = rg.lse[r0 + i];
#pragma omp simd
          for (int64_t j = 0; j < cn; ++j) {
            const scalar_t x = row[j];
            trow[j] = std::max(x - lse_c[j], lo);
            row[j] = std::max(x - lse_r, lo);
          }
        }
        s.exp_();
        t.exp_();
        const scalar_t* ga_c = rg.ga.data() + c0;
        const scalar_t* f_c = rg.f.data() + c0;
        const scalar_t* gs_c = rg.gs.data() + c0;
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          const scalar_t* trow = tp + i * kColBlock;
          const int64_t r = r0 + i, e = r - c0, li = lab[r];
          const scalar_t ga_r = rg.ga[r], f_r = rg.f[r], gs_r = rg.gs[r];
#pragma omp simd
          for (int64_t j = 0; j < cn; ++j)
            row[j] = sup_con::grad_weight(row[j], trow[j], lab_c[j] == li, ga_r, ga_c[j], f_r, f_c[j], gs_r, gs_c[j]);
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
  const auto labels = labels_in.contiguous();
  const auto g = grad_in.to(z.scalar_type()).contiguous();
  const auto stats = stats_in.to(z.scalar_type()).contiguous();
  auto grad_z = new_output_like(z);
  if (z.size(0) == 0 || z.size(1) == 0) return grad_z.zero_();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sup_con_stats_backward_cpu", [&] {
    const RowGrads<scalar_t> rg(g.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(), z.size(0));
    stats_backward<scalar_t>(z, labels.data_ptr<int64_t>(), rg, inv_temp, grad_z);
  });
  return grad_z;
}

}  // namespace

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("sup_con_stats", &sup_con_stats_cpu);
  m.impl("sup_con_stats_backward", &sup_con_stats_backward_cpu);
}

}  // namespace sslops

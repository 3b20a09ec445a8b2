// CPU kernels of the fused contrastive log-sum-exp (NT-Xent / InfoNCE).
//
// The (M, Kc) similarity matrix is never built: rows are split into blocks of
// kRowBlock that run in parallel (at::parallel_for), and each block walks the
// columns in tiles of kColBlock.  A tile's logits come from one BLAS product
// (at::mm_out into a per-thread buffer that stays in L2), its exponentials from
// ATen's vectorised exp, and the per-row merge from csrc/common/nt_xent.h.
// The backward recomputes the tiles instead of storing them, so the extra
// memory is O(threads * kRowBlock * kColBlock) on top of the outputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/nt_xent.h"
#include "common/output.h"

namespace sslops {
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

// grad_z = inv_temp * (A + A^T) @ z.  S is symmetric, so the tile S_IJ of a
// row block I gives both A_IJ (weights by row) and (A^T)_IJ (weights by
// column); one pass over row blocks, no atomics.
template <typename scalar_t>
void lse_backward_sym(const at::Tensor& z, const scalar_t* lse_s, const scalar_t* gp, double inv_temp,
                      at::Tensor& grad_z) {
  const int64_t M = z.size(0);
  at::parallel_for(0, ceil_div(M, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
    auto buf = at::empty({2 * kRowBlock * kColBlock}, z.options());
    auto buf2 = buf.narrow(0, kRowBlock * kColBlock, kRowBlock * kColBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, rn = std::min(kRowBlock, M - r0);
      const auto zb = z.narrow(0, r0, rn);
      auto gz = grad_z.narrow(0, r0, rn);
      gz.zero_();
      for (int64_t c0 = 0; c0 < M; c0 += kColBlock) {
        const int64_t cn = std::min(kColBlock, M - c0);
        auto s = tile_view(buf, rn, cn);   // becomes A_IJ
        auto t = tile_view(buf2, rn, cn);  // becomes (A^T)_IJ
        const auto zc = z.narrow(0, c0, cn);
        logits_tile(s, zb, zc, inv_temp);
        scalar_t* sp = s.data_ptr<scalar_t>();
        scalar_t* tp = t.data_ptr<scalar_t>();
        const scalar_t lo = nt_xent::min_exp_arg<scalar_t>();
        const scalar_t* lse_c = lse_s + c0;
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          scalar_t* trow = tp + i * kColBlock;
          const scalar_t lse_r = lse_s[r0 + i];
#pragma omp simd
          for (int64_t j = 0; j < cn; ++j) {
            const scalar_t x = row[j];
            trow[j] = std::max(x - lse_c[j], lo);
            row[j] = std::max(x - lse_r, lo);
          }
        }
        s.exp_();
        t.exp_();
        const scalar_t* g_c = gp + c0;
        for (int64_t i = 0; i < rn; ++i) {
          scalar_t* row = sp + i * kColBlock;
          const scalar_t* trow = tp + i * kColBlock;
          const scalar_t g_r = gp[r0 + i];
#pragma omp simd
          for (int64_t j = 0; j < cn; ++j) row[j] = g_r * row[j] + g_c[j] * trow[j];
          const int64_t e = r0 + i - c0;  // each row leaves out itself
          if (e >= 0 && e < cn) row[e] = 0;
        }
        gz.addmm_(s, zc);
      }
      gz.mul_(inv_temp);
    }
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
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "nt_xent_lse_backward_sym_cpu", [&] {
    const auto lse_s = safe_lse(lse.data_ptr<scalar_t>(), z.size(0));
    lse_backward_sym<scalar_t>(z, lse_s.data(), g.data_ptr<scalar_t>(), inv_temp, grad_z);
  });
  return grad_z;
}

}  // namespace

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("nt_xent_lse", &nt_xent_lse_cpu);
  m.impl("nt_xent_lse_backward", &nt_xent_lse_backward_cpu);
  m.impl("nt_xent_lse_backward_sym", &nt_xent_lse_backward_sym_cpu);
}

}  // namespace sslops

// CPU kernels of the masked-token ops (MAE / data2vec 2.0 / I-JEPA).
//
// Memory-bound copies: every output row is produced by one task of
// at::parallel_for over (B, rows), either as a memcpy of a source row or as a
// single fused pass `x + pos_embed` (vectorised by the compiler), so each byte
// is read once and written once.  Index tensors are range-checked up front (a
// bad index raises, never reads out of bounds).  The backward kernels are
// parallel over the batch: each sample owns its output rows, so no atomics and
// a fixed summation order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/masking.h"
#include "common/output.h"

namespace sslops {
namespace {

using masking::add_round;
using masking::batch_stride;
using masking::dense_rows;
using masking::gather_source_row;
using masking::index_ok;
using masking::kMaskTokenRow;
using masking::restore_source_row;

// Rows of D elements per parallel task, at least one.
inline int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

void check_cpu(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors, got ", name, " on ", x.device());
}

// A strided (B, n) index tensor read as int64.
template <typename index_t>
struct Index2D {
  const index_t* p;
  int64_t sb, sk;
  int64_t operator()(int64_t b, int64_t k) const { return static_cast<int64_t>(p[b * sb + k * sk]); }
};

template <typename index_t>
Index2D<index_t> index2d(const at::Tensor& ids) {
  return {ids.data_ptr<index_t>(), ids.stride(0), ids.stride(1)};
}

// Every index in [0, n), else a clear error naming the argument and the entry.
template <typename index_t>
void check_range(const Index2D<index_t>& ids, int64_t B, int64_t K, int64_t n, const char* name, const char* op) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t v = ids(b, k);
      TORCH_CHECK(index_ok(v, n), op, ": ", name, "[", b, ", ", k, "] = ", v, " is out of range [0, ", n, ")");
    }
}

template <typename scalar_t>
inline void copy_row(scalar_t* dst, const scalar_t* src, int64_t D) {
  std::memcpy(dst, src, D * sizeof(scalar_t));
}

template <typename scalar_t>
inline void add_rows(scalar_t* dst, const scalar_t* a, const scalar_t* b, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = add_round(a[d], b[d]);
}

// dst += src, accumulated in opmath and rounded once per add (like scatter_add).
template <typename scalar_t>
inline void accumulate_row(scalar_t* dst, const scalar_t* src, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = add_round(dst[d], src[d]);
}

// ---------------------------------------------------------------------------
// gather_tokens
// ---------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
void gather_kernel(const at::Tensor& x, const Index2D<index_t>& ids, const at::Tensor& pos, int64_t P,
                   at::Tensor& out) {
  const int64_t B = out.size(0), R = out.size(1), D = out.size(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t xsb = x.stride(0), xsl = x.stride(1);
  const scalar_t* pp = pos.defined() ? pos.data_ptr<scalar_t>() : nullptr;
  const int64_t psb = pos.defined() ? batch_stride(pos) : 0, psl = pos.defined() ? pos.stride(1) : 0;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * R, row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / R, r = row % R;
      const int64_t src = gather_source_row(r, P, r < P ? 0 : ids(b, r - P));
      scalar_t* dst = op + row * D;
      const scalar_t* xr = xp + b * xsb + src * xsl;
      if (pp == nullptr) {
        copy_row(dst, xr, D);
      } else {
        add_rows(dst, xr, pp + b * psb + src * psl, D);
      }
    }
  });
}

at::Tensor gather_tokens_cpu(const at::Tensor& x_in, const at::Tensor& ids, const c10::optional<at::Tensor>& pos_in,
                             int64_t num_prefix) {
  const char* op = "sslops::gather_tokens";
  masking::check_gather(x_in, ids, pos_in, num_prefix, op);
  check_cpu(x_in, "x", op);
  const auto x = dense_rows(x_in);
  const at::Tensor pos = pos_in.has_value() ? dense_rows(*pos_in) : at::Tensor();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = ids.size(1);
  auto out = new_output({B, num_prefix + K, D}, x.options());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "gather_tokens_cpu_ids", [&] {
    const auto idx = index2d<index_t>(ids);
    check_range(idx, B, K, L - num_prefix, "ids_keep", op);
    if (out.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens_cpu", [&] {
      gather_kernel<scalar_t, index_t>(x, idx, pos, num_prefix, out);
    });
  });
  return out;
}

// grad_x[b] = prefix rows of grad, then each patch row of grad added into row
// P + ids[b, k]; rows that no index names are zero.  The first visit of a row
// copies instead of adding, so every byte of grad_x is written once (twice
// only where ids repeat).
template <typename scalar_t, typename index_t>
void scatter_kernel(const at::Tensor& grad, const Index2D<index_t>& ids, int64_t P, at::Tensor& grad_x) {
  const int64_t B = grad_x.size(0), L = grad_x.size(1), D = grad_x.size(2), K = grad.size(1) - P;
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const int64_t gsb = grad.stride(0), gsl = grad.stride(1);
  scalar_t* xp = grad_x.data_ptr<scalar_t>();
  const int64_t N = L - P;
  at::parallel_for(0, B, std::max<int64_t>(1, row_grain(D) / std::max<int64_t>(L, 1)), [&](int64_t b0, int64_t b1) {
    std::vector<char> seen(N);
    for (int64_t b = b0; b < b1; ++b) {
      scalar_t* xb = xp + b * L * D;
      const scalar_t* gb = gp + b * gsb;
      for (int64_t r = 0; r < P; ++r) copy_row(xb + r * D, gb + r * gsl, D);
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = ids(b, k);
        scalar_t* dst = xb + (P + n) * D;
        const scalar_t* src = gb + (P + k) * gsl;
        if (seen[n]) {
          accumulate_row(dst, src, D);
        } else {
          copy_row(dst, src, D);
          seen[n] = 1;
        }
      }
      for (int64_t n = 0; n < N; ++n)
        if (!seen[n]) std::fill(xb + (P + n) * D, xb + (P + n + 1) * D, scalar_t(0));
    }
  });
}

at::Tensor gather_tokens_backward_cpu(const at::Tensor& grad_in, const at::Tensor& ids, int64_t seq_len,
                                      int64_t num_prefix) {
  const char* op = "sslops::gather_tokens_backward";
  masking::check_gather_backward(grad_in, ids, seq_len, num_prefix, op);
  check_cpu(grad_in, "grad", op);
  const auto grad = dense_rows(grad_in);
  const int64_t B = grad.size(0), D = grad.size(2), K = ids.size(1);
  auto grad_x = new_output({B, seq_len, D}, grad.options());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "gather_tokens_backward_cpu_ids", [&] {
    const auto idx = index2d<index_t>(ids);
    check_range(idx, B, K, seq_len - num_prefix, "ids_keep", op);
    if (grad_x.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_tokens_backward_cpu", [&] {
      scatter_kernel<scalar_t, index_t>(grad, idx, num_prefix, grad_x);
    });
  });
  return grad_x;
}

// ---------------------------------------------------------------------------
// restore_tokens
// ---------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
void restore_kernel(const at::Tensor& xv, const Index2D<index_t>& ids, const at::Tensor& mask_token, int64_t P,
                    at::Tensor& out) {
  const int64_t B = out.size(0), R = out.size(1), D = out.size(2), K = xv.size(1) - P;
  const scalar_t* xp = xv.data_ptr<scalar_t>();
  const int64_t xsb = xv.stride(0), xsl = xv.stride(1);
  const scalar_t* mp = mask_token.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * R, row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / R, r = row % R;
      const int64_t src = restore_source_row(r, P, r < P ? 0 : ids(b, r - P), K);
      copy_row(op + row * D, src == kMaskTokenRow ? mp : xp + b * xsb + src * xsl, D);
    }
  });
}

at::Tensor restore_tokens_cpu(const at::Tensor& xv_in, const at::Tensor& ids, const at::Tensor& mask_token_in,
                              int64_t num_prefix) {
  const char* op = "sslops::restore_tokens";
  masking::check_restore(xv_in, ids, mask_token_in, num_prefix, op);
  check_cpu(xv_in, "x_visible", op);
  const auto xv = dense_rows(xv_in);
  const auto mask_token = mask_token_in.contiguous();
  const int64_t B = xv.size(0), D = xv.size(2), N = ids.size(1);
  auto out = new_output({B, num_prefix + N, D}, xv.options());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "restore_tokens_cpu_ids", [&] {
    const auto idx = index2d<index_t>(ids);
    check_range(idx, B, N, N, "ids_restore", op);
    if (out.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xv.scalar_type(), "restore_tokens_cpu", [&] {
      restore_kernel<scalar_t, index_t>(xv, idx, mask_token, num_prefix, out);
    });
  });
  return out;
}

// grad_xv[b, P + k] = sum of grad[b, P + n] over n with ids[b, n] == k (a
// copy for a permutation); the rows with ids >= K go to a per-sample partial
// sum of the mask token's gradient (opmath), summed over b in order at the end.
template <typename scalar_t, typename index_t>
void restore_backward_kernel(const at::Tensor& grad, const Index2D<index_t>& ids, int64_t K, int64_t P,
                             at::Tensor& grad_xv, at::Tensor& grad_mt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad.size(0), N = grad.size(1) - P, D = grad.size(2);
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const int64_t gsb = grad.stride(0), gsl = grad.stride(1);
  scalar_t* xp = grad_xv.data_ptr<scalar_t>();
  const int64_t R = P + K;
  std::vector<acc_t> partial(B * D, acc_t(0));
  at::parallel_for(0, B, std::max<int64_t>(1, row_grain(D) / std::max<int64_t>(N + P, 1)), [&](int64_t b0, int64_t b1) {
    std::vector<char> seen(K);
    for (int64_t b = b0; b < b1; ++b) {
      scalar_t* xb = xp + b * R * D;
      const scalar_t* gb = gp + b * gsb;
      acc_t* part = partial.data() + b * D;
      for (int64_t r = 0; r < P; ++r) copy_row(xb + r * D, gb + r * gsl, D);
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t j = ids(b, n);
        const scalar_t* src = gb + (P + n) * gsl;
        if (j >= K) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) part[d] += static_cast<acc_t>(src[d]);
        } else if (seen[j]) {
          accumulate_row(xb + (P + j) * D, src, D);
        } else {
          copy_row(xb + (P + j) * D, src, D);
          seen[j] = 1;
        }
      }
      for (int64_t k = 0; k < K; ++k)
        if (!seen[k]) std::fill(xb + (P + k) * D, xb + (P + k + 1) * D, scalar_t(0));
    }
  });
  scalar_t* mp = grad_mt.data_ptr<scalar_t>();
  std::vector<acc_t> total(D, acc_t(0));
  for (int64_t b = 0; b < B; ++b) {
    const acc_t* part = partial.data() + b * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) total[d] += part[d];
  }
  for (int64_t d = 0; d < D; ++d) mp[d] = static_cast<scalar_t>(total[d]);
}

std::tuple<at::Tensor, at::Tensor> restore_tokens_backward_cpu(const at::Tensor& grad_in, const at::Tensor& ids,
                                                               int64_t num_visible, int64_t num_prefix) {
  const char* op = "sslops::restore_tokens_backward";
  masking::check_restore_backward(grad_in, ids, num_visible, num_prefix, op);
  check_cpu(grad_in, "grad", op);
  const auto grad = dense_rows(grad_in);
  const int64_t B = grad.size(0), D = grad.size(2), N = ids.size(1);
  auto grad_xv = new_output({B, num_prefix + num_visible, D}, grad.options());
  auto grad_mt = new_output({D}, grad.options());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "restore_tokens_backward_cpu_ids", [&] {
    const auto idx = index2d<index_t>(ids);
    check_range(idx, B, N, N, "ids_restore", op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "restore_tokens_backward_cpu", [&] {
      restore_backward_kernel<scalar_t, index_t>(grad, idx, num_visible, num_prefix, grad_xv, grad_mt);
    });
  });
  return {grad_xv, grad_mt};
}

}  // namespace

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("gather_tokens_backward", &gather_tokens_backward_cpu);
  m.impl("restore_tokens", &restore_tokens_cpu);
  m.impl("restore_tokens_backward", &restore_tokens_backward_cpu);
}

}  // namespace sslops

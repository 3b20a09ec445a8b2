// Host side of sslops::attention_fwd / attention_bwd shared by the CPU and
// CUDA entry points: argument checks and output allocation.  Allocating here
// keeps the layout contract (documented at the schemas in csrc/sslops.cpp and
// mirrored by the fake kernels in sslops/attention.py) in one place, so every
// device returns the same shapes AND strides.
//
//   dense  (no cu_seqlens): q (B, H, Lq, D), k, v (B, H, Lk, D), any strides.
//          out (B, H, Lq, D) = a contiguous (B, Lq, H, D) buffer transposed:
//          out.transpose(1, 2).reshape(B, Lq, H * D) is a view.
//          lse (B, H, Lq) contiguous.  dq, dk, dv: contiguous where q, k, v are,
//          else like out (contiguous (B, L, H, D) transposed).
//   varlen (cu_seqlens_q and cu_seqlens_k): q (Tq, H, D), k, v (Tk, H, D),
//          cu_seqlens int32 (N + 1,), FlashAttention's convention.
//          out (Tq, H, D) contiguous; lse (H, Tq) contiguous; dq, dk, dv contiguous.
//   lse dtype: float32, float64 for float64 inputs.
//
// Errors are ValueError (shapes, ranges) or TypeError (dtypes) in Python, and
// name the argument.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "common/output.h"

namespace sslops {
namespace attention {

struct Dims {
  bool varlen;
  int64_t batch;  // B, or N sequences (varlen)
  int64_t heads;  // H
  int64_t lq;     // Lq (dense) or Tq (varlen)
  int64_t lk;     // Lk (dense) or Tk (varlen)
  int64_t head_dim;
};

inline at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k,
                         int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, const char* op) {
  TORCH_CHECK_VALUE(cu_q.has_value() == cu_k.has_value(), op,
                    ": cu_seqlens_q and cu_seqlens_k must be both given (varlen) or both None (dense)");
  const bool varlen = cu_q.has_value();
  const int64_t nd = varlen ? 3 : 4;
  const char* shape = varlen ? "(T, H, D)" : "(B, H, L, D)";
  TORCH_CHECK_VALUE(q.dim() == nd, op, ": q must be ", nd, "-D ", shape, ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == nd, op, ": k must be ", nd, "-D ", shape, ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == nd, op, ": v must be ", nd, "-D ", shape, ", got shape ", v.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), op, ": q must be a floating tensor, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op,
                    ": q, k and v must be on the same device, got ", q.device(), ", ", k.device(), " and ",
                    v.device());
  const int64_t D = q.size(nd - 1);
  TORCH_CHECK_VALUE(k.size(nd - 1) == D && v.size(nd - 1) == D, op,
                    ": q, k and v must have the same head dim D, got ", D, ", ", k.size(nd - 1), " and ",
                    v.size(nd - 1));
  const int64_t H = q.size(1);  // (B, H, L, D) and (T, H, D) alike
  TORCH_CHECK_VALUE(k.size(1) == H && v.size(1) == H, op, ": q, k and v must have the same number of heads H, got ",
                    H, ", ", k.size(1), " and ", v.size(1));
  TORCH_CHECK_VALUE(D >= 1 && H >= 1, op, ": the head dim D and the number of heads H must be >= 1, got D = ", D,
                    ", H = ", H);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const int64_t lk_dim = varlen ? 0 : 2;
  TORCH_CHECK_VALUE(k.size(lk_dim) == v.size(lk_dim), op, ": k and v must have the same number of keys, got ",
                    k.size(lk_dim), " and ", v.size(lk_dim));
  Dims d{varlen, 0, H, 0, 0, D};
  if (!varlen) {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), op,
                      ": q, k and v must have the same batch size B, got ", q.size(0), ", ", k.size(0), " and ",
                      v.size(0));
    d.batch = q.size(0);
    d.lq = q.size(2);
    d.lk = k.size(2);
    return d;
  }
  const at::Tensor& cq = *cu_q;
  const at::Tensor& ck = *cu_k;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cq, "cu_seqlens_q"},
                                std::pair<const at::Tensor&, const char*>{ck, "cu_seqlens_k"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) >= 2, op, ": ", name, " must be 1-D with N + 1 >= 2 entries, got shape ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                      t.device());
  }
  TORCH_CHECK_VALUE(cq.size(0) == ck.size(0), op,
                    ": cu_seqlens_q and cu_seqlens_k must have the same length N + 1, got ", cq.size(0), " and ",
                    ck.size(0));
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ",
                    max_seqlen_q, " and ", max_seqlen_k);
  d.batch = cq.size(0) - 1;
  d.lq = q.size(0);
  d.lk = k.size(0);
  return d;
}

// Values of cu_seqlens (host memory, int32, N + 1 entries): starts at 0, never
// decreases, ends at the number of tokens, no sequence longer than max_seqlen.
inline void check_cu_seqlens_values(const int32_t* cu, int64_t n1, int64_t total, int64_t max_seqlen,
                                    const char* name, const char* tokens, const char* op) {
  TORCH_CHECK_VALUE(cu[0] == 0, op, ": ", name, "[0] must be 0, got ", cu[0]);
  for (int64_t b = 0; b + 1 < n1; ++b) {
    TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], op, ": ", name, " must be non-decreasing, but ", name, "[", b + 1,
                      "] = ", cu[b + 1], " < ", name, "[", b, "] = ", cu[b]);
    TORCH_CHECK_VALUE(cu[b + 1] - cu[b] <= max_seqlen, op, ": sequence ", b, " has ", cu[b + 1] - cu[b],
                      " tokens, more than max_seqlen ", max_seqlen, " (from ", name, ")");
  }
  TORCH_CHECK_VALUE(cu[n1 - 1] == total, op, ": ", name, "[-1] must equal the number of tokens of ", tokens, " (",
                    total, "), got ", cu[n1 - 1]);
}

// out and lse of the forward (see the layout contract above).
inline std::tuple<at::Tensor, at::Tensor> new_forward_outputs(const at::Tensor& q, const Dims& d) {
  const auto lse_opts = q.options().dtype(lse_dtype(q.scalar_type()));
  if (d.varlen) {
    return {new_output({d.lq, d.heads, d.head_dim}, q.options()), new_output({d.heads, d.lq}, lse_opts)};
  }
  auto out = new_output({d.batch, d.lq, d.heads, d.head_dim}, q.options()).transpose(1, 2);
  return {out, new_output({d.batch, d.heads, d.lq}, lse_opts)};
}

// A gradient buffer for input x: contiguous when x is (so a leaf's
// AccumulateGrad keeps it without a layout copy); otherwise dense (B, H, L, D)
// as a contiguous (B, L, H, D) transposed (what slices of a packed qkv want:
// their unbind backward stacks them), varlen contiguous (T, H, D).
inline at::Tensor new_grad(const at::Tensor& x, const Dims& d) {
  if (d.varlen || x.is_contiguous()) return new_output(x.sizes(), x.options());
  return new_output({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options()).transpose(1, 2);
}

// Backward extras: grad_out like out, out, lse with the forward's shapes.
inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                                  const at::Tensor& lse, const Dims& d, const char* op) {
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), op, ": grad_out must have q's shape ", q.sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), op, ": out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                   ": grad_out and out must have q's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(), " and ",
                   out.scalar_type());
  const auto want = d.varlen ? std::vector<int64_t>{d.heads, d.lq} : std::vector<int64_t>{d.batch, d.heads, d.lq};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(want), op, ": lse must have shape ", at::IntArrayRef(want),
                    ", got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype(q.scalar_type()), op, ": lse must be ",
                   lse_dtype(q.scalar_type()), ", got ", lse.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(), op,
                    ": grad_out, out and lse must be on q's device ", q.device());
}

}  // namespace attention
}  // namespace sslops

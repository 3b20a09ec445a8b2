// Per-row logic of the masked-token ops, shared by the CPU and CUDA kernels.
//
// Layout (every op): a token sequence of length L = P + N per sample, where the
// first P rows are prefix tokens (cls / registers) that are never masked and
// the other N rows are patch tokens.  Index tensors address patch tokens only
// (values in [0, N)), as in MAE and timm's patch dropout.
//
//   gather_tokens:  out (B, P + K, D).  Row r < P is x[b, r] (+ pos[b, r]);
//                   row P + k is x[b, P + ids_keep[b, k]] (+ pos at that row).
//   restore_tokens: out (B, P + N, D).  Row r < P is x_visible[b, r];
//                   row P + n is x_visible[b, P + j] for j = ids_restore[b, n]
//                   when j < K, else the mask token (MAE's cat + gather).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace sslops {
namespace masking {

// Whether a patch index is in [0, n).
template <typename index_t>
SSLOPS_HD bool index_ok(index_t i, int64_t n) {
  return static_cast<int64_t>(i) >= 0 && static_cast<int64_t>(i) < n;
}

// The sequence row that output row r of gather_tokens reads, given the patch
// index it was assigned (ignored for prefix rows).
SSLOPS_HD int64_t gather_source_row(int64_t r, int64_t num_prefix, int64_t patch_index) {
  return r < num_prefix ? r : num_prefix + patch_index;
}

// What output row r of restore_tokens reads: a row of x_visible (>= 0), or
// kMaskTokenRow for the mask token.  j is ids_restore[b, r - P] (ignored for
// prefix rows), num_visible is K.
constexpr int64_t kMaskTokenRow = -1;
SSLOPS_HD int64_t restore_source_row(int64_t r, int64_t num_prefix, int64_t j, int64_t num_visible) {
  if (r < num_prefix) return r;
  return j < num_visible ? num_prefix + j : kMaskTokenRow;
}

// a + b rounded once to scalar_t: float/double add directly; c10::Half and
// c10::BFloat16 compute in float and round the sum, exactly like torch's add,
// so the fused pos-embed add is bit-identical to `x + pos_embed`.
template <typename scalar_t>
SSLOPS_HD scalar_t add_round(scalar_t a, scalar_t b) {
  return static_cast<scalar_t>(a + b);
}

}  // namespace masking
}  // namespace sslops

// ---------------------------------------------------------------------------
// Host-side argument checks of the CPU and CUDA entry points (every message
// names the argument).
// ---------------------------------------------------------------------------
#include <ATen/ATen.h>

#include "common/checks.h"

namespace sslops {
namespace masking {

inline void check_index_tensor(const at::Tensor& ids, const char* name, int64_t batch, const at::Tensor& x,
                               const char* op) {
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == batch, op, ": ", name, " must have shape (B, *) with B = ", batch,
              ", got ", ids.sizes());
  check_same_device(x, "x", ids, name, op);
}

inline void check_tokens(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be 3-D (B, L, D), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating, got ", x.scalar_type());
}

inline void check_prefix(int64_t num_prefix, int64_t rows, const char* name, const char* op) {
  TORCH_CHECK(num_prefix >= 0 && num_prefix <= rows, op, ": num_prefix_tokens must be in [0, ", rows, "] (",
              name, " has ", rows, " rows), got ", num_prefix);
}

inline void check_gather(const at::Tensor& x, const at::Tensor& ids, const c10::optional<at::Tensor>& pos,
                         int64_t num_prefix, const char* op) {
  check_tokens(x, "x", op);
  check_prefix(num_prefix, x.size(1), "x", op);
  check_index_tensor(ids, "ids_keep", x.size(0), x, op);
  if (pos.has_value()) {
    const auto& p = *pos;
    TORCH_CHECK(p.dim() == 3 && (p.size(0) == 1 || p.size(0) == x.size(0)) && p.size(1) == x.size(1) &&
                    p.size(2) == x.size(2),
                op, ": pos_embed must have shape (1 or B, L, D) = (1 or ", x.size(0), ", ", x.size(1), ", ",
                x.size(2), "), got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == x.scalar_type(), op, ": pos_embed must have x's dtype ", x.scalar_type(),
                ", got ", p.scalar_type());
    check_same_device(x, "x", p, "pos_embed", op);
  }
}

inline void check_gather_backward(const at::Tensor& grad, const at::Tensor& ids, int64_t seq_len,
                                  int64_t num_prefix, const char* op) {
  check_tokens(grad, "grad", op);
  check_index_tensor(ids, "ids_keep", grad.size(0), grad, op);
  TORCH_CHECK(num_prefix >= 0 && grad.size(1) == num_prefix + ids.size(1), op,
              ": grad must have P + K = ", num_prefix + ids.size(1), " rows, got shape ", grad.sizes());
  TORCH_CHECK(seq_len >= num_prefix, op, ": seq_len must be >= num_prefix_tokens = ", num_prefix, ", got ",
              seq_len);
}

inline void check_restore(const at::Tensor& xv, const at::Tensor& ids, const at::Tensor& mask_token,
                          int64_t num_prefix, const char* op) {
  check_tokens(xv, "x_visible", op);
  check_prefix(num_prefix, xv.size(1), "x_visible", op);
  check_index_tensor(ids, "ids_restore", xv.size(0), xv, op);
  const int64_t K = xv.size(1) - num_prefix;
  TORCH_CHECK(K <= ids.size(1), op, ": x_visible has K = ", K, " visible tokens but ids_restore only N = ",
              ids.size(1), " positions (need K <= N)");
  TORCH_CHECK(mask_token.dim() == 1 && mask_token.size(0) == xv.size(2), op, ": mask_token must have shape (D,) = (",
              xv.size(2), ",), got ", mask_token.sizes());
  TORCH_CHECK(mask_token.scalar_type() == xv.scalar_type(), op, ": mask_token must have x_visible's dtype ",
              xv.scalar_type(), ", got ", mask_token.scalar_type());
  check_same_device(xv, "x_visible", mask_token, "mask_token", op);
}

inline void check_restore_backward(const at::Tensor& grad, const at::Tensor& ids, int64_t num_visible,
                                   int64_t num_prefix, const char* op) {
  check_tokens(grad, "grad", op);
  check_index_tensor(ids, "ids_restore", grad.size(0), grad, op);
  TORCH_CHECK(num_prefix >= 0 && grad.size(1) == num_prefix + ids.size(1), op,
              ": grad must have P + N = ", num_prefix + ids.size(1), " rows, got shape ", grad.sizes());
  TORCH_CHECK(num_visible >= 0 && num_visible <= ids.size(1), op, ": num_visible must be in [0, ", ids.size(1),
              "], got ", num_visible);
}

// A tensor whose last dimension is dense (stride 1), so rows can be copied
// as spans; other strides are kept (no copy for slices / expanded batch).
inline at::Tensor dense_rows(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Stride of dim 0 in elements, 0 for a broadcast batch of 1.
inline int64_t batch_stride(const at::Tensor& t) { return t.size(0) == 1 ? 0 : t.stride(0); }

}  // namespace masking
}  // namespace sslops

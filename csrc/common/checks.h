// Host-side argument checks shared by the CPU and CUDA entry points.  Every
// message names the offending argument, so a bad call raises a clear
// RuntimeError instead of crashing or reading out of bounds.
#pragma once

#include <ATen/ATen.h>

namespace sslops {

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " is on ", a.device(), " but ", b_name, " is on ",
              b.device());
}

// q (M, D), c (Kc, D), exclude (M,) int64 or absent, inv_temp > 0.
inline void check_lse_inputs(const at::Tensor& q, const at::Tensor& c, const c10::optional<at::Tensor>& exclude,
                             double inv_temp, const char* op) {
  TORCH_CHECK(q.dim() == 2, op, ": q must be 2-D (M, D), got shape ", q.sizes());
  TORCH_CHECK(c.dim() == 2, op, ": c must be 2-D (Kc, D), got shape ", c.sizes());
  TORCH_CHECK(q.size(1) == c.size(1), op, ": q and c must have the same width D, got ", q.size(1), " and ",
              c.size(1));
  TORCH_CHECK(q.scalar_type() == c.scalar_type(), op, ": q and c must have the same dtype, got ", q.scalar_type(),
              " and ", c.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be a floating tensor, got ", q.scalar_type());
  check_same_device(q, "q", c, "c", op);
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0, op, ": inv_temp must be finite and > 0, got ", inv_temp);
  if (exclude.has_value()) {
    const auto& e = *exclude;
    TORCH_CHECK(e.scalar_type() == at::kLong, op, ": exclude must be int64, got ", e.scalar_type());
    TORCH_CHECK(e.dim() == 1 && e.size(0) == q.size(0), op, ": exclude must have shape (M,) = (", q.size(0),
                ",), got ", e.sizes());
    check_same_device(q, "q", e, "exclude", op);
  }
}

inline void check_row_vector(const at::Tensor& t, const char* name, int64_t m, const at::Tensor& q, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == m, op, ": ", name, " must have shape (", m, ",), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating, got ", t.scalar_type());
  check_same_device(q, "q", t, name, op);
}

}  // namespace sslops

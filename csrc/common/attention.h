// Per-element math of exact (flash-style) attention, shared by the CPU kernel
// (csrc/cpu/attention.cpp) and the CUDA kernel (csrc/cuda/attention.cu).
//
// Notation, per (batch b, head h) pair and one sequence of Lq queries, Lk keys:
//     s_ij = scale * <q_i, k_j>                    (scores, accumulated in fp32/fp64)
//     p_ij = exp(s_ij - lse_i),  lse_i = log sum_{j visible to i} exp(s_ij)
//     o_i  = sum_j p_ij v_j                        (saved: o and lse only)
// Backward, with dO the upstream gradient:
//     delta_i = <dO_i, o_i>                        (the pre-pass)
//     dp_ij   = <dO_i, v_j>
//     ds_ij   = p_ij * (dp_ij - delta_i)
//     dq_i = scale * sum_j ds_ij k_j,  dk_j = scale * sum_i ds_ij q_i,  dv_j = sum_i p_ij dO_i
//
// Causal convention: SDPA's (torch.nn.functional.scaled_dot_product_attention,
// is_causal=True), i.e. the mask is aligned to the TOP-LEFT corner: query row i
// (0-based within its sequence) sees keys j <= i, whatever Lq and Lk are.  For
// Lq == Lk this is the usual causal mask; for Lq != Lk it differs from
// FlashAttention >= 2.1, which aligns to the bottom-right corner (j <= i + Lk - Lq).
// With this convention a query row sees no key only when Lk == 0 (possible for
// one sequence of a varlen pack): its output row is 0 and its lse is -inf.
//
// Forward, one query row, keys visited in tiles (online softmax):
//     state (m, l) = (-inf, 0)
//     per tile: m' = max(m, max_j s_j);  alpha = rescale(m, m');  p_j = exp(s_j - safe_shift(m'))
//               l = alpha * l + sum_j p_j;  acc = alpha * acc + sum_j p_j v_j;  m = m'
//     end:      o = acc * out_scale(l);  lse = lse_finalize(m, l)
// Backward, with the saved lse:  p_ij = exp(s_ij - bwd_shift(lse_i)) for visible (i, j), else 0;
//     ds_ij = dscore(p_ij, dp_ij, delta_i),  delta_i accumulated with delta_step.
//
// Layout contract of the ops that use this math (sslops::attention_fwd/bwd;
// schemas in csrc/sslops.cpp, allocation in csrc/common/attention_host.h):
//   dense  q (B, H, Lq, D), k/v (B, H, Lk, D), any strides.  out (B, H, Lq, D)
//          is a contiguous (B, Lq, H, D) buffer transposed; lse (B, H, Lq)
//          contiguous; dq/dk/dv contiguous where q/k/v are, else like out.
//   varlen q (Tq, H, D), k/v (Tk, H, D), cu_seqlens int32 (N + 1,)
//          (FlashAttention's); out, dq/dk/dv contiguous; lse (H, Tq) contiguous.
//   lse float32 (float64 for float64 inputs), natural log; out in q's dtype.
//
// Every function is __host__ __device__ on nvcc (SSLOPS_HD) and plain inline
// C++ elsewhere.  T is float or double (the CPU kernel's vector loops apply the
// same formulas lane-wise through at::vec; see csrc/cpu/attention_rows.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace sslops {
namespace attention {

template <typename T>
SSLOPS_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
SSLOPS_HD T pos_inf() {
  return std::numeric_limits<T>::infinity();
}

SSLOPS_HD float exp_(float x) { return ::expf(x); }
SSLOPS_HD double exp_(double x) { return ::exp(x); }
SSLOPS_HD float log_(float x) { return ::logf(x); }
SSLOPS_HD double log_(double x) { return ::log(x); }

// ---------------------------------------------------------------- masking
// Number of keys query row i sees (keys 0 .. kv_end - 1), top-left causal.
SSLOPS_HD int64_t kv_end(int64_t i, int64_t Lk, bool causal) {
  return causal ? (i + 1 < Lk ? i + 1 : Lk) : Lk;
}

// Whether query row i sees key j (0 <= i < Lq, 0 <= j < Lk): the tail mask
// (j < Lk) and the causal mask in one predicate.
SSLOPS_HD bool visible(int64_t i, int64_t j, int64_t Lk, bool causal) { return j < kv_end(i, Lk, causal); }

// First query row that sees key j (all rows >= it do, within Lq).
SSLOPS_HD int64_t q_begin(int64_t j, bool causal) { return causal ? j : 0; }

// Number of keys visible to row i among the tile of keys [j0, j0 + n): the
// row's valid prefix of that tile (the tile is never visible past it).
SSLOPS_HD int64_t tile_valid(int64_t i, int64_t j0, int64_t n, int64_t Lk, bool causal) {
  const int64_t e = kv_end(i, Lk, causal) - j0;
  return e < 0 ? 0 : (e < n ? e : n);
}

// Whether a tile of query rows [i0, i0 + m) and keys [j0, j0 + n) has any
// visible pair (tiles without one are skipped, never computed).
SSLOPS_HD bool tile_live(int64_t i0, int64_t m, int64_t j0, int64_t n, int64_t Lk, bool causal) {
  if (m <= 0 || n <= 0 || j0 >= Lk) return false;
  return !causal || j0 <= i0 + m - 1;
}

// ---------------------------------------------------------------- online softmax (forward)
// Factor that rescales the running sum and accumulator when the running max
// goes from m_old to m_new (>= m_old).  The empty state (m_old = -inf) has
// l = 0 and acc = 0, so any finite factor works: 0 avoids exp(-inf + inf).
template <typename T>
SSLOPS_HD T rescale(T m_old, T m_new) {
  return m_old == neg_inf<T>() ? T(0) : exp_(m_old - m_new);
}

// Shift of a row's exponentials, p = exp(s - safe_shift(m)): the running max,
// or 0 for a row still at -inf (its scores are all -inf: every p is
// exp(-inf) = 0, never NaN).
template <typename T>
SSLOPS_HD T safe_shift(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

// One tile of a row, in order:
//     m_new = online_max(m, tile_max);   alpha = rescale(m, m_new);
//     p_j = exp(s_j - safe_shift(m_new)) (0 for masked j);
//     online_merge(m, l, m_new, sum_j p_j, alpha);
//     acc = alpha * acc + sum_j p_j v_j.
template <typename T>
SSLOPS_HD T online_max(T m, T tile_max) {
  return tile_max > m ? tile_max : m;
}

// (m, l) <- the state after the tile (see online_max).
template <typename T>
SSLOPS_HD void online_merge(T& m, T& l, T m_new, T tile_sum, T alpha) {
  l = l * alpha + tile_sum;
  m = m_new;
}

// 1 / l, the factor of the accumulator that gives o; 0 for a row with no key
// (l == 0).  A NaN l (a NaN score, or exp(inf - inf) from a +inf one) stays
// NaN, as the reference softmax's row does.
template <typename T>
SSLOPS_HD T out_scale(T l) {
  return l == T(0) ? T(0) : T(1) / l;
}

// lse = m + log(l); -inf for a row with no key.  A NaN l gives a NaN lse (never
// the -inf of an empty row), so the backward's p for that row is NaN
// everywhere, as the reference's gradient is.
template <typename T>
SSLOPS_HD T lse_finalize(T m, T l) {
  return l == T(0) ? neg_inf<T>() : m + log_(l);
}

// ---------------------------------------------------------------- backward
// Shift for p = exp(s - shift) from the saved lse: a row with no key
// (lse = -inf) gets +inf, so all its p are exp(-inf) = 0, never NaN.
template <typename T>
SSLOPS_HD T bwd_shift(T lse) {
  return lse == neg_inf<T>() ? pos_inf<T>() : lse;
}

// delta_i accumulation: delta += dO_id * o_id over d (fp32/fp64 accumulator).
template <typename T>
SSLOPS_HD T delta_step(T acc, T dout, T out) {
  return acc + dout * out;
}

// Gradient of the score s_ij (before the scale): p * (dp - delta).  Masked
// (p = 0) entries give 0.  Generic over T so that vector types use it too.
template <typename T>
SSLOPS_HD T dscore(T p, T dp, T delta) {
  return p * (dp - delta);
}

}  // namespace attention
}  // namespace sslops

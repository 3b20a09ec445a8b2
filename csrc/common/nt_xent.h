// Per-row math of the fused contrastive log-sum-exp, shared by the CPU and
// CUDA kernels.  A row i of the similarity matrix has logits
//     x_ij = inv_temp * <q_i, c_j>,   j != exclude_i,
// and the forward keeps an online (max, sum) pair per row so that no row is
// ever materialised in full:  lse_i = m_i + log(l_i),  l_i = sum_j exp(x_ij - m_i).
// The backward weight of logit (i, j) is  g_i * exp(x_ij - lse_i).
#pragma once

#include <cmath>
#include <limits>

#include "common/macros.h"

namespace sslops {
namespace nt_xent {

template <typename T>
SSLOPS_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

SSLOPS_HD float exp_(float x) { return ::expf(x); }
SSLOPS_HD double exp_(double x) { return ::exp(x); }
SSLOPS_HD float log_(float x) { return ::logf(x); }
SSLOPS_HD double log_(double x) { return ::log(x); }

// Exponent arguments are clamped from below before exp: exp(-80) ~ 2e-35 (and
// exp(-700) in double) is far below rounding next to the row's largest term,
// and it keeps vectorised exp off its slow path for -inf and denormal results.
// Logits that must count as exactly 0 (excluded columns) are zeroed after exp.
template <typename T>
SSLOPS_HD T min_exp_arg();
template <>
SSLOPS_HD float min_exp_arg<float>() { return -80.0f; }
template <>
SSLOPS_HD double min_exp_arg<double>() { return -700.0; }

// Merge the summary (tile_m, tile_l) of some logits of a row, with
// tile_l = sum exp(x - tile_m), into the running state (m, l) of that row.
template <typename T>
SSLOPS_HD void lse_merge(T& m, T& l, T tile_m, T tile_l) {
  if (tile_l == T(0)) return;  // nothing (or only excluded logits) in the tile
  if (tile_m > m) {
    l = l * exp_(m - tile_m) + tile_l;  // exp(-inf) == 0 covers the empty state
    m = tile_m;
  } else {
    l += tile_l * exp_(tile_m - m);
  }
}

// log-sum-exp of a row from its running state, with the reference's special
// values: -inf for a row with no logit; +inf when a logit is +inf (exp(inf - inf)
// made l NaN); NaN when a logit is NaN (l is NaN), never a "perfect" -inf.
template <typename T>
SSLOPS_HD T lse_finalize(T m, T l) {
  if (m == -neg_inf<T>()) return m;
  if (l > T(0)) return m + log_(l);
  return l == T(0) ? neg_inf<T>() : l;
}

// Gradient weight of logit x of a row with log-sum-exp lse and upstream grad g.
template <typename T>
SSLOPS_HD T softmax_weight(T x, T lse, T g) {
  return g * exp_(x - lse);
}

}  // namespace nt_xent
}  // namespace sslops

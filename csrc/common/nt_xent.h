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

// ---- symmetric case (q = c = z, row i leaves out column i) ----
// The logits are symmetric, x_ij = x_ji, so one tile (I, J) of them serves
// the rows of block I (its row sums) and the rows of block J (its column
// sums), and in the backward both W_IJ and W_JI = W_IJ^T.

// a if a > b, else b: the max of x86's maxps, which passes a NaN in b through
// (clamping NaN arguments to min_exp_arg would hide them).
template <typename T>
SSLOPS_HD T max_nan(T a, T b) {
  return a > b ? a : b;
}

// exp(x - shift) with the argument clamped from below (min_exp_arg).
template <typename T>
SSLOPS_HD T shifted_exp(T x, T shift) {
  return exp_(max_nan(min_exp_arg<T>(), x - shift));
}

// Largest spread of exponent arguments that one shared shift may cover:
// with every argument in [shift - spread, shift], exp(x - shift) >= e^-60
// (e^-600 in double) stays a normal number with full relative precision, so
// a tile's row sums and column sums can share one exponential per element.
// Tiles with a wider spread fall back to a shift per row and per column.
template <typename T>
SSLOPS_HD T max_shared_spread();
template <>
SSLOPS_HD float max_shared_spread<float>() { return 60.0f; }
template <>
SSLOPS_HD double max_shared_spread<double>() { return 600.0; }

// Symmetric backward weight of logit x_ij (= x_ji), diagonal excluded:
//     W_ij = g_i exp(x_ij - lse_i) + g_j exp(x_ij - lse_j),
// the (i, j) entry of A + A^T with A_ij = g_i softmax_i(j).  Two exponentials.
template <typename T>
SSLOPS_HD T sym_weight(T x, T lse_i, T g_i, T lse_j, T g_j) {
  return g_i * shifted_exp(x, lse_i) + g_j * shifted_exp(x, lse_j);
}

// The same with one exponential, for a tile whose rows' and columns' lse lie
// within max_shared_spread of a shared shift s <= every one of them:
//     W_ij = exp(x_ij - s) * (a_i + a_j),   a_i = shared_factor(g_i, lse_i, s),
// where x_ij - s <= lse_i - s <= spread (x_ij <= lse_i) cannot overflow and
// a_i = g_i exp(s - lse_i) <= g_i.
template <typename T>
SSLOPS_HD T shared_factor(T g, T lse, T s) {
  return g * exp_(s - lse);
}
template <typename T>
SSLOPS_HD T sym_weight_shared(T x, T s, T a_i, T a_j) {
  return shifted_exp(x, s) * (a_i + a_j);
}

}  // namespace nt_xent
}  // namespace sslops

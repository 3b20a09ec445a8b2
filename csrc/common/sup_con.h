// Per-row math of the fused supervised / multi-view contrastive statistics
// (sslops::sup_con_stats), shared by the CPU kernel and any device kernel.
// Row i of the logits x_ij = inv_temp * <z_i, z_j> has the candidates j != i
// and the positives P(i) = {j != i : labels_j == labels_i}; per row
//     lse_i  = log sum_{j != i} exp(x_ij),   lpos_i = log sum_{p in P(i)} exp(x_ip),
//     psum_i = sum_{p in P(i)} x_ip,         cnt_i  = |P(i)|.
// The forward walks the columns in tiles and merges each tile's summary into
// a per-row state: two online (max, sum) log-sum-exp pairs (nt_xent.h's
// lse_merge / lse_finalize) plus a plain sum and count.  The backward weight of
// logit (i, j) for upstream grads (ga, gp, gs) of (lse, lpos, psum) is
//     W_ij = ga_i exp(x_ij - lse_i) + [j in P(i)] (gp_i exp(x_ij - lpos_i) + gs_i),
// and grad_z = inv_temp * (W + W^T) z (x and the positive mask are symmetric).
#pragma once

#include "common/macros.h"
#include "common/nt_xent.h"

namespace sslops {
namespace sup_con {

using nt_xent::neg_inf;

// How far below a tile's largest candidate logit m the tile's largest positive
// logit mp may lie for the positives' sum to reuse the candidates'
// exponentials exp(max(x - m, min_exp_arg)) (one exp per logit, not two).  A
// positive clamped at min_exp_arg then errs by at most
// exp(min_exp_arg + limit) relative to the positives' largest term: e^-40
// (fp32), e^-100 (fp64), far below rounding.  Beyond it the positives take
// their own exp with shift mp.  The backward uses the same bound for
// exp(x - lpos_i) = exp(x - lse_i) * exp(lse_i - lpos_i).
template <typename T>
SSLOPS_HD T pos_shift_limit();
template <>
SSLOPS_HD float pos_shift_limit<float>() { return 40.0f; }
template <>
SSLOPS_HD double pos_shift_limit<double>() { return 600.0; }

// Whether a tile's positives (largest logit tile_mp, -inf for none) can share
// the candidates' shift tile_m (see pos_shift_limit).  True without positives.
template <typename T>
SSLOPS_HD bool shares_shift(T tile_m, T tile_mp) {
  return tile_mp == neg_inf<T>() || tile_m - tile_mp <= pos_shift_limit<T>();
}

// Running statistics of one row.
template <typename T>
struct RowStats {
  T m, l;    // every candidate: lse = m + log(l)
  T mp, lp;  // the positives:   lpos = mp + log(lp)
  T psum, cnt;
};

template <typename T>
SSLOPS_HD RowStats<T> stats_init() {
  return RowStats<T>{neg_inf<T>(), T(0), neg_inf<T>(), T(0), T(0), T(0)};
}

// Merge one tile's summary into the row: (tile_m, tile_l) with tile_l = sum of
// exp(x - tile_m) over the tile's candidates, (tile_mp, tile_lp) the same over
// its positives (tile_mp may be tile_m, see shares_shift), and the sum and
// count of its positive logits.
template <typename T>
SSLOPS_HD void stats_merge(RowStats<T>& s, T tile_m, T tile_l, T tile_mp, T tile_lp, T tile_psum, T tile_cnt) {
  nt_xent::lse_merge(s.m, s.l, tile_m, tile_l);
  nt_xent::lse_merge(s.mp, s.lp, tile_mp, tile_lp);
  s.psum += tile_psum;
  s.cnt += tile_cnt;
}

// The row's (lse, lpos, psum, cnt) to out[0], out[stride], out[2 stride],
// out[3 stride]; -inf lse / lpos for a row without candidates / positives,
// nt_xent's special values otherwise.
template <typename T, typename Index>
SSLOPS_HD void stats_finalize(const RowStats<T>& s, T* out, Index stride) {
  out[0] = nt_xent::lse_finalize(s.m, s.l);
  out[stride] = nt_xent::lse_finalize(s.mp, s.lp);
  out[2 * stride] = s.psum;
  out[3 * stride] = s.cnt;
}

// lse / lpos for the backward: -inf (no candidate / no positive) becomes +inf
// so that exp(x - value) is 0, never NaN.
template <typename T>
SSLOPS_HD T safe_lse(T v) {
  return v == neg_inf<T>() ? -neg_inf<T>() : v;
}

// The factor f_i of a row's positive weights, gp_i exp(x - lpos_i) =
// f_i exp(x - lse_i) with f_i = gp_i exp(lse_i - lpos_i), so the positives
// reuse the candidates' exponentials.  0 for a row without positives or
// without upstream grad.  `direct` is set when lpos_i lies more than
// pos_shift_limit below lse_i (or is not finite): f_i is then 0 and the caller
// takes gp_i exp(x - lpos_i) itself (positive_direct).
template <typename T>
SSLOPS_HD T positive_factor(T gp, T lse, T lpos, bool& direct) {
  direct = false;
  if (gp == T(0) || lpos == neg_inf<T>()) return T(0);
  const T gap = lse - lpos;
  if (!(gap <= pos_shift_limit<T>())) {  // NaN too
    direct = true;
    return T(0);
  }
  return gp * nt_xent::exp_(gap);
}

// gp exp(x - lpos) for a positive logit x of a `direct` row (x <= lpos).
template <typename T>
SSLOPS_HD T positive_direct(T x, T lpos, T gp) {
  const T arg = x - lpos;
  return gp * nt_xent::exp_(arg > nt_xent::min_exp_arg<T>() ? arg : nt_xent::min_exp_arg<T>());
}

// W_ij + W_ji from a = exp(x_ij - lse_i), at = exp(x_ij - lse_j), whether j is a
// positive of i (then i is one of j), and the rows' upstream grads: ga (lse),
// f (positive_factor) and gs (psum).  The diagonal is the caller's to zero.
template <typename T>
SSLOPS_HD T grad_weight(T a, T at, bool pos, T ga_i, T ga_j, T f_i, T f_j, T gs_i, T gs_j) {
  const T positive = f_i * a + f_j * at + gs_i + gs_j;
  return ga_i * a + ga_j * at + (pos ? positive : T(0));
}

}  // namespace sup_con
}  // namespace sslops

// CPU kernels of exact (flash-style) attention: sslops::attention_fwd and
// sslops::attention_bwd (schemas and layout contract: csrc/sslops.cpp,
// csrc/common/attention_host.h; math: csrc/common/attention.h).
//
// Work is cut into tasks and the tasks are pulled by the threads of one
// at::parallel_for from a shared counter (dynamic scheduling: causal masks and
// varlen packs make tasks uneven), heaviest first.  Every output element is
// written by exactly one task in a fixed order, so results do not depend on
// the scheduling: the backward is deterministic without atomics.
//
// Forward task = (sequence, head, block of query rows).  Short sequences (the
// ViT case, L <= 512) are one block of keys: the scores of a query block
// against every key come from one GEMM into a per-thread buffer that stays in
// L2, their exponentials from at::vec's exp (attention_rows.inc), and
// o = P V from a second GEMM written straight into the output rows.  Longer
// sequences walk key tiles with the online softmax.  Only o and lse are saved.
//
// Backward task = (sequence, head, range of key tiles) -- the whole key range
// unless there are fewer (sequence, head) pairs than threads.  Per key tile and
// query block it recomputes p from the saved lse and runs the five products
//     S = scale Q K^T, dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
//     dQ += scale dS K, dK += scale dS^T Q,
// accumulating dK, dV (owned by the task) and dQ (owned too when the task has
// the whole key range; otherwise a per-task partial that a second pass sums
// in a fixed order).  delta = rowsum(dO * O) is the task's own pre-pass.
//
// GEMMs go to the BLAS that torch links (MKL's sgemm_/dgemm_) when it exports
// them, else to at::addmm_out (SSLOPS_CPU_BLAS=aten forces the latter).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/attention.h"
#include "cpu/blas.h"
#include "cpu/isa.h"
#include "common/attention_host.h"
#include "common/output.h"
#include "cpu/attention_rows.h"

namespace sslops {
namespace {

namespace am = ::sslops::attention;
using attention_cpu::RowOps;
using cpu_blas::gemm;

// Tile sizes.  A forward task holds a (kQBlock x kKvTile) score tile; the
// backward, two of (kQBlockBwd x kKvTileBwd).  With D = 64 fp32 both stay
// inside a 1 MB L2 together with their Q/K/V/dO rows.  Rows and keys are cut
// into equal blocks (even_block), so ViT lengths are one key tile and one or
// two query blocks.  At those lengths the time goes to the BLAS (~60 % in
// MKL's sgemm kernel, ~10 % in its packing): query blocks of 64 to 256 rows
// measured within 5 % of each other (Zen 4, one thread, B = 16, H = 12, D = 64,
// L = 197 and 257); 192 in the backward keeps L = 257 at two blocks.
constexpr int64_t kQBlock = 128;
constexpr int64_t kKvTile = 512;
constexpr int64_t kQBlockBwd = 192;
constexpr int64_t kKvTileBwd = 384;  // L <= 384 (ViT-L/14 at 336: 577 is two) in one tile

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per block when n rows are cut into ceil(n / cap) blocks of equal size
// (197 -> 2 x 99 rather than 128 + 69).
inline int64_t even_block(int64_t n, int64_t cap) {
  if (n <= 0) return 1;
  return ceil_div(n, ceil_div(n, cap));
}

// ---------------------------------------------------------------- ISA choice

template <typename T>
const RowOps<T>& row_ops() {
  struct Tables {
    RowOps<float> f[3];
    RowOps<double> d[3];
    Tables() {
      attention_cpu::row_ops_default(&f[0], &d[0]);
      attention_cpu::row_ops_avx2(&f[1], &d[1]);
      attention_cpu::row_ops_avx512(&f[2], &d[2]);
    }
  };
  static const Tables tables;
  const int level = cpu_isa::level();  // SSLOPS_CPU_ISA caps it
  if constexpr (std::is_same_v<T, float>) {
    return tables.f[level];
  } else {
    return tables.d[level];
  }
}

// ---------------------------------------------------------------- problem layout
// Pointers of one (sequence, head) pair: a row-major (L, D) matrix per tensor
// with unit stride along D.
template <typename T>
struct Mat {
  T* p;
  int64_t rs;  // row stride
};

// Where sequence s = b * H + h lives in a dense (B, H, L, D) or varlen
// (T, H, D) tensor.
struct Layout {
  bool varlen;
  int64_t H;
  const int32_t* cu;  // varlen: N + 1 offsets
  int64_t L;          // dense: rows per sequence
  int64_t b_stride, h_stride, row_stride;

  Layout(const at::Tensor& t, const int32_t* cu_) : varlen(cu_ != nullptr), cu(cu_) {
    H = t.size(1);
    const int64_t D = t.size(-1);
    if (varlen) {
      L = 0;
      b_stride = 0;
      h_stride = t.stride(1);
      row_stride = t.size(0) == 1 ? std::max<int64_t>(D, 1) : t.stride(0);
    } else {
      L = t.size(2);
      b_stride = t.stride(0);
      h_stride = t.stride(1);
      row_stride = t.size(2) == 1 ? std::max<int64_t>(D, 1) : t.stride(2);
    }
  }
  int64_t begin(int64_t b) const { return varlen ? cu[b] : 0; }
  int64_t length(int64_t b) const { return varlen ? cu[b + 1] - cu[b] : L; }
  int64_t offset(int64_t s) const {
    const int64_t b = s / H, h = s % H;
    return varlen ? cu[b] * row_stride + h * h_stride : b * b_stride + h * h_stride;
  }
  template <typename T>
  Mat<T> mat(T* base, int64_t s) const {
    return {base + offset(s), row_stride};
  }
};

// lse of sequence s: dense (B, H, Lq) or varlen (H, Tq), rows consecutive.
template <typename T>
T* lse_rows(T* lse, const Layout& lq, int64_t total_q, int64_t s) {
  const int64_t b = s / lq.H, h = s % lq.H;
  return lq.varlen ? lse + h * total_q + lq.cu[b] : lse + s * lq.L;
}

// A copy with unit stride along D and rows that do not overlap, when the
// tensor lacks them (the kernels read any other strides in place).
at::Tensor rows_readable(const at::Tensor& t, bool varlen) {
  const int64_t row_dim = varlen ? 0 : 2;
  const int64_t D = t.size(-1);
  const bool unit_d = t.stride(-1) == 1 || D == 1;
  const bool rows_ok = t.size(row_dim) <= 1 || t.stride(row_dim) >= D;
  const bool heads_ok = t.size(1) <= 1 || t.stride(1) != 0 || D == 0;
  return unit_d && rows_ok && heads_ok ? t : t.contiguous();
}

// Dynamic scheduling: nthreads workers pull task indices from a counter.
template <typename Worker>
void run_tasks(int64_t ntasks, const Worker& make_worker) {
  if (ntasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
    auto work = make_worker();
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) work(t);
  });
}

struct Task {
  int64_t s;       // sequence * H + head
  int64_t lo, hi;  // forward: query rows; backward: keys
  int64_t chunk;   // backward: index of the key range within its sequence
  double cost;
};

void heaviest_first(std::vector<Task>& tasks) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
}

// ---------------------------------------------------------------- forward
template <typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* cu_q, const int32_t* cu_k,
             const am::Dims& dims, double scale_d, bool causal, at::Tensor& out, at::Tensor& lse) {
  const Layout lq(q, cu_q), lk(k, cu_k), lv(v, cu_k), lo(out, cu_q);
  const int64_t H = dims.heads, D = dims.head_dim;
  const T scale = static_cast<T>(scale_d);
  T* const qp = q.data_ptr<T>();
  T* const kp = k.data_ptr<T>();
  T* const vp = v.data_ptr<T>();
  T* const op = out.data_ptr<T>();
  T* const lp = lse.data_ptr<T>();

  std::vector<Task> tasks;
  for (int64_t b = 0; b < dims.batch; ++b) {
    const int64_t Lq = lq.length(b), Lk = lk.length(b);
    const int64_t qb = even_block(Lq, kQBlock);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r0 = 0; r0 < Lq; r0 += qb) {
        const int64_t rn = std::min(qb, Lq - r0);
        const int64_t keys = causal ? std::min(Lk, r0 + rn) : Lk;
        tasks.push_back({b * H + h, r0, r0 + rn, 0, double(rn) * double(keys + 8)});
      }
  }
  if (causal || lq.varlen) heaviest_first(tasks);

  const RowOps<T>& ops = row_ops<T>();
  run_tasks(static_cast<int64_t>(tasks.size()), [&] {
    // per-thread workspace
    return [&, ws = std::vector<T>(kQBlock * kKvTile + 4 * kQBlock),
            valid = std::vector<int64_t>(kQBlock)](int64_t t) mutable {
      const Task& task = tasks[t];
      const int64_t s = task.s, b = s / H;
      const int64_t Lk = lk.length(b);
      const int64_t r0 = task.lo, rn = task.hi - task.lo;
      T* S = ws.data();
      T* m = S + kQBlock * kKvTile;
      T* l = m + kQBlock;
      T* alpha = l + kQBlock;
      T* f = alpha + kQBlock;
      int64_t* val = valid.data();
      const Mat<T> Q = lq.mat(qp, s), K = lk.mat(kp, s), V = lv.mat(vp, s), O = lo.mat(op, s);
      const T* Qi = Q.p + r0 * Q.rs;
      T* Oi = O.p + r0 * O.rs;
      T* lse_i = lse_rows(lp, lq, dims.lq, s) + r0;
      std::fill(m, m + rn, am::neg_inf<T>());
      std::fill(l, l + rn, T(0));
      const int64_t kv_stop = causal ? std::min(Lk, r0 + rn) : Lk;
      const int64_t kvt = even_block(Lk, kKvTile);  // 600 keys -> 2 x 300, not 512 + 88
      bool first = true;
      for (int64_t c0 = 0; c0 < kv_stop; c0 += kvt) {
        const int64_t cn = std::min(kvt, kv_stop - c0);
        const int64_t ld = cn;  // dense tile: better cache use than a fixed stride
        gemm(false, true, rn, cn, D, scale, Qi, Q.rs, K.p + c0 * K.rs, K.rs, T(0), S, ld);
        for (int64_t i = 0; i < rn; ++i) val[i] = am::tile_valid(r0 + i, c0, cn, Lk, causal);
        ops.softmax_tile(S, ld, rn, cn, val, m, l, alpha);
        if (!first) ops.scale_rows(Oi, O.rs, rn, D, alpha);
        gemm(false, false, rn, D, cn, T(1), S, ld, V.p + c0 * V.rs, V.rs, first ? T(0) : T(1), Oi, O.rs);
        first = false;
      }
      if (first) {  // no key at all (Lk == 0): o = 0, lse = -inf
        for (int64_t i = 0; i < rn; ++i) std::fill(Oi + i * O.rs, Oi + i * O.rs + D, T(0));
      }
      for (int64_t i = 0; i < rn; ++i) {
        f[i] = am::out_scale(l[i]);
        lse_i[i] = am::lse_finalize(m[i], l[i]);
      }
      if (!first) ops.scale_rows(Oi, O.rs, rn, D, f);
    };
  });
}

// ---------------------------------------------------------------- backward
template <typename T>
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const int32_t* cu_q, const int32_t* cu_k,
              const am::Dims& dims, double scale_d, bool causal, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const Layout lq(q, cu_q), lk(k, cu_k), lv(v, cu_k), lo(out, cu_q), ldo(dout, cu_q);
  const Layout ldq(dq, cu_q), ldk(dk, cu_k), ldv(dv, cu_k);
  const int64_t H = dims.heads, D = dims.head_dim;
  const T scale = static_cast<T>(scale_d);
  T* const qp = q.data_ptr<T>();
  T* const kp = k.data_ptr<T>();
  T* const vp = v.data_ptr<T>();
  T* const op = out.data_ptr<T>();
  T* const dop = dout.data_ptr<T>();
  T* const lp = lse.data_ptr<T>();
  T* const dqp = dq.data_ptr<T>();
  T* const dkp = dk.data_ptr<T>();
  T* const dvp = dv.data_ptr<T>();

  // Key ranges per (sequence, head): the whole range unless the pairs are too
  // few to keep every thread busy; then dQ goes to per-range partials.
  const int64_t n_pairs = dims.batch * H;
  const int64_t threads = at::get_num_threads();
  std::vector<Task> tasks;
  std::vector<int64_t> n_chunks(dims.batch, 1);
  std::vector<int64_t> partial_base(dims.batch + 1, 0);  // offsets (in rows of D) into the dQ partials
  int64_t max_lq = 0;
  for (int64_t b = 0; b < dims.batch; ++b) {
    const int64_t Lq = lq.length(b), Lk = lk.length(b);
    max_lq = std::max(max_lq, Lq);
    const int64_t kvt = even_block(Lk, kKvTileBwd);  // key tile (the task recomputes it)
    const int64_t tiles = std::max<int64_t>(1, ceil_div(Lk, kvt));
    int64_t chunks = 1;
    if (n_pairs < 2 * threads && Lq > 0) chunks = std::min(tiles, ceil_div(2 * threads, n_pairs));
    const int64_t tiles_per = ceil_div(tiles, chunks);
    chunks = ceil_div(tiles, tiles_per);
    n_chunks[b] = chunks;
    partial_base[b + 1] = partial_base[b] + (chunks > 1 ? chunks * H * Lq : 0);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t k0 = c * tiles_per * kvt, k1 = std::min(Lk, (c + 1) * tiles_per * kvt);
        // visible (query, key) pairs of the range
        double pairs = 0;
        for (int64_t j0 = k0; j0 < k1; j0 += kvt)
          pairs += double(std::min(kvt, k1 - j0)) * double(causal ? std::max<int64_t>(0, Lq - j0) : Lq);
        tasks.push_back({b * H + h, k0, std::max(k0, k1), c, pairs + double(Lq + 8)});
      }
  }
  heaviest_first(tasks);
  std::vector<T> partial(static_cast<size_t>(partial_base[dims.batch] * D));

  const RowOps<T>& ops = row_ops<T>();
  run_tasks(static_cast<int64_t>(tasks.size()), [&] {
    return [&, ws = std::vector<T>(2 * kQBlockBwd * kKvTileBwd + max_lq + 8),
            valid = std::vector<int64_t>(kQBlockBwd),
            dq_done = std::vector<char>(max_lq + 1)](int64_t t) mutable {
      const Task& task = tasks[t];
      const int64_t s = task.s, b = s / H, h = s % H;
      const int64_t Lq = lq.length(b), Lk = lk.length(b);
      const int64_t k0 = task.lo, k1 = task.hi;
      T* S = ws.data();                          // P
      T* dP = S + kQBlockBwd * kKvTileBwd;       // dP, then dS
      T* delta = dP + kQBlockBwd * kKvTileBwd;   // (Lq,)
      int64_t* val = valid.data();
      const Mat<T> Q = lq.mat(qp, s), K = lk.mat(kp, s), V = lv.mat(vp, s), O = lo.mat(op, s), dO = ldo.mat(dop, s);
      const Mat<T> dK = ldk.mat(dkp, s), dV = ldv.mat(dvp, s);
      Mat<T> dQ = ldq.mat(dqp, s);
      if (n_chunks[b] > 1) dQ = {partial.data() + (partial_base[b] + (h * n_chunks[b] + task.chunk) * Lq) * D, D};
      const T* lse_s = lse_rows(lp, lq, dims.lq, s);

      auto zero_rows = [D](const Mat<T>& m, int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) std::fill(m.p + i * m.rs, m.p + i * m.rs + D, T(0));
      };
      const int64_t qb = even_block(Lq, kQBlockBwd);
      const int64_t n_qblocks = Lq > 0 ? ceil_div(Lq, qb) : 0;
      // Outputs are written by their first GEMM (beta = 0) and accumulated
      // after (beta = 1): no zero-fill pass, except for rows no visible pair
      // reaches (zeroed at the end).  dq_done: per query block; kv_done: the
      // prefix of the current key tile written so far.
      std::fill(dq_done.begin(), dq_done.begin() + n_qblocks, char(0));
      const int64_t q_first = (am::q_begin(k0, causal) / qb) * qb;
      if (k1 > k0 && q_first < Lq)
        ops.row_dots(dO.p + q_first * dO.rs, dO.rs, O.p + q_first * O.rs, O.rs, Lq - q_first, D, delta + q_first);

      const int64_t kvt = even_block(Lk, kKvTileBwd);  // as in the task list
      for (int64_t c0 = k0; c0 < k1; c0 += kvt) {
        const int64_t cn_tile = std::min(kvt, k1 - c0);
        const T* Kt = K.p + c0 * K.rs;
        const T* Vt = V.p + c0 * V.rs;
        const Mat<T> dKt{dK.p + c0 * dK.rs, dK.rs}, dVt{dV.p + c0 * dV.rs, dV.rs};
        int64_t kv_done = 0;
        for (int64_t r0 = (am::q_begin(c0, causal) / qb) * qb; r0 < Lq; r0 += qb) {
          const int64_t rn = std::min(qb, Lq - r0);
          if (!am::tile_live(r0, rn, c0, cn_tile, Lk, causal)) continue;
          // keys of the tile that some row of the block sees
          const int64_t cn = std::min(cn_tile, am::kv_end(r0 + rn - 1, Lk, causal) - c0);
          const int64_t ld = cn;
          const T* Qi = Q.p + r0 * Q.rs;
          const T* dOi = dO.p + r0 * dO.rs;
          T* dQi = dQ.p + r0 * dQ.rs;
          // beta for dK/dV: 0 on a fresh tile; a causal tile grows its written
          // prefix block by block (zero the new keys, then accumulate)
          T kv_beta = T(1);
          if (kv_done == 0) {
            kv_beta = T(0);
          } else if (cn > kv_done) {
            zero_rows(dKt, kv_done, cn);
            zero_rows(dVt, kv_done, cn);
          }
          kv_done = std::max(kv_done, cn);
          char& q_written = dq_done[r0 / qb];
          const T q_beta = q_written ? T(1) : T(0);
          q_written = 1;
          gemm(false, true, rn, cn, D, scale, Qi, Q.rs, Kt, K.rs, T(0), S, ld);          // S = scale Q K^T
          for (int64_t i = 0; i < rn; ++i) val[i] = am::tile_valid(r0 + i, c0, cn, Lk, causal);
          ops.prob_tile(S, ld, rn, cn, val, lse_s + r0);                                 // P
          gemm(true, false, cn, D, rn, T(1), S, ld, dOi, dO.rs, kv_beta, dVt.p, dV.rs);  // dV += P^T dO
          gemm(false, true, rn, cn, D, T(1), dOi, dO.rs, Vt, V.rs, T(0), dP, ld);        // dP = dO V^T
          ops.dscore_tile(dP, ld, S, ld, rn, cn, delta + r0);                            // dS
          gemm(false, false, rn, D, cn, scale, dP, ld, Kt, K.rs, q_beta, dQi, dQ.rs);    // dQ += scale dS K
          gemm(true, false, cn, D, rn, scale, dP, ld, Qi, Q.rs, kv_beta, dKt.p, dK.rs);  // dK += scale dS^T Q
        }
        zero_rows(dKt, kv_done, cn_tile);  // keys no query sees
        zero_rows(dVt, kv_done, cn_tile);
      }
      for (int64_t blk = 0; blk < n_qblocks; ++blk)  // queries that see no key of the range
        if (!dq_done[blk]) zero_rows(dQ, blk * qb, std::min(Lq, (blk + 1) * qb));
    };
  });

  // Sum the dQ partials of split sequences, in chunk order (deterministic).
  std::vector<Task> reduce;
  for (int64_t b = 0; b < dims.batch; ++b)
    if (n_chunks[b] > 1)
      for (int64_t h = 0; h < H; ++h) reduce.push_back({b * H + h, 0, lq.length(b), 0, 0});
  run_tasks(static_cast<int64_t>(reduce.size()), [&] {
    return [&](int64_t t) {
      const int64_t s = reduce[t].s, b = s / H, h = s % H, Lq = reduce[t].hi, nc = n_chunks[b];
      const Mat<T> dQ = ldq.mat(dqp, s);
      const T* base = partial.data() + (partial_base[b] + h * nc * Lq) * D;
      for (int64_t i = 0; i < Lq; ++i) {
        T* row = dQ.p + i * dQ.rs;
        std::copy(base + i * D, base + (i + 1) * D, row);
        for (int64_t c = 1; c < nc; ++c) {
          const T* src = base + (c * Lq + i) * D;
          for (int64_t d = 0; d < D; ++d) row[d] += src[d];
        }
      }
    };
  });
}

// ---------------------------------------------------------------- entry points
void check_cpu(const at::Tensor& q, const char* op) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), op, ": expected CPU tensors, got ", q.device());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
                   ": the CPU kernel takes float32 or float64, got ", q.scalar_type(),
                   " (sslops.attention upcasts half types before calling it)");
}

// cu_seqlens as host int32 arrays, their values checked.
std::vector<int32_t> host_offsets(const at::Tensor& cu, int64_t total, int64_t max_seqlen, const char* name,
                                  const char* tokens, const char* op) {
  const auto c = cu.contiguous();
  std::vector<int32_t> out(c.data_ptr<int32_t>(), c.data_ptr<int32_t>() + c.numel());
  am::check_cu_seqlens_values(out.data(), c.numel(), total, max_seqlen, name, tokens, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const c10::optional<at::Tensor>& cu_q,
                                                     const c10::optional<at::Tensor>& cu_k, int64_t max_seqlen_q,
                                                     int64_t max_seqlen_k, double scale, bool causal) {
  const char* op = "sslops::attention_fwd";
  const auto dims = am::check_inputs(q_in, k_in, v_in, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, op);
  check_cpu(q_in, op);
  std::vector<int32_t> oq, ok;
  if (dims.varlen) {
    oq = host_offsets(*cu_q, dims.lq, max_seqlen_q, "cu_seqlens_q", "q", op);
    ok = host_offsets(*cu_k, dims.lk, max_seqlen_k, "cu_seqlens_k", "k", op);
  }
  const auto q = rows_readable(q_in.detach(), dims.varlen);
  const auto k = rows_readable(k_in.detach(), dims.varlen);
  const auto v = rows_readable(v_in.detach(), dims.varlen);
  auto [out, lse] = am::new_forward_outputs(q, dims);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd_cpu", [&] {
    forward<scalar_t>(q, k, v, dims.varlen ? oq.data() : nullptr, dims.varlen ? ok.data() : nullptr, dims, scale,
                      causal, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& cu_q,
    const c10::optional<at::Tensor>& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal) {
  const char* op = "sslops::attention_bwd";
  const auto dims = am::check_inputs(q_in, k_in, v_in, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, op);
  check_cpu(q_in, op);
  am::check_backward_inputs(dout_in, q_in, out_in, lse_in, dims, op);
  std::vector<int32_t> oq, ok;
  if (dims.varlen) {
    oq = host_offsets(*cu_q, dims.lq, max_seqlen_q, "cu_seqlens_q", "q", op);
    ok = host_offsets(*cu_k, dims.lk, max_seqlen_k, "cu_seqlens_k", "k", op);
  }
  const auto q = rows_readable(q_in.detach(), dims.varlen);
  const auto k = rows_readable(k_in.detach(), dims.varlen);
  const auto v = rows_readable(v_in.detach(), dims.varlen);
  const auto out = rows_readable(out_in.detach(), dims.varlen);
  const auto dout = rows_readable(dout_in.detach(), dims.varlen);
  const auto lse = lse_in.detach().contiguous();
  auto dq = am::new_grad(q_in, dims);  // layouts follow the caller's tensors (as the fake kernel does)
  auto dk = am::new_grad(k_in, dims);
  auto dv = am::new_grad(v_in, dims);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd_cpu", [&] {
    backward<scalar_t>(dout, q, k, v, out, lse, dims.varlen ? oq.data() : nullptr, dims.varlen ? ok.data() : nullptr,
                       dims, scale, causal, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

// Which row-loop build (DEFAULT, AVX2, AVX512) a call would use now; the op
// sslops::_attention_cpu_isa (csrc/sslops.cpp) lets tests see every ISA path run.
std::string attention_cpu_isa() { return row_ops<float>().isa; }

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace sslops

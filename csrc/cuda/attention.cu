// CUDA kernels of exact attention (sslops::attention_fwd / attention_bwd;
// schemas and layout contract in csrc/sslops.cpp, per-element math in
// csrc/common/attention.h, argument checks and output allocation in
// csrc/common/attention_host.h).  fp16 and bf16 on tensor cores
// (mma.sync.m16n8k16, fp32 accumulation, sm_80+); float32 on a GPU runs on the
// Triton backend (sslops/attention.py routes it).
//
// ---------------------------------------------------------------------------
// Work split: one block = 4 warps owns kOwn = 64 rows of one (sequence, head)
// ---------------------------------------------------------------------------
//   forward   (grid: ceil(Lq / 64) x H x B)  owns 64 query rows; streams the
//             keys/values in tiles of kStream = 32:
//                 S = scale * Q K^T (16 x 32 per warp), online softmax
//                 (m, l per row), O = alpha * O + P V.
//   backward  delta pre-pass: delta_i = <dO_i, O_i>            (one thread per row)
//             dq   (grid: ceil(Lq / 64) x H x B)  owns 64 query rows, streams keys:
//                 P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K
//             dkdv (grid: ceil(Lk / 64) x H x B)  owns 64 key rows, streams queries:
//                 P^T, dP^T = V dO^T, dS^T,  dV += P^T dO,  dK += dS^T Q
//   Every output element is written by exactly one thread, sums run in a fixed
//   order: deterministic, no atomics.
//
// Warp w owns rows 16w .. 16w + 15 of the block's 64: one m16 row tile of
// every MMA.  Lane l is (g, t) = (l / 4, l % 4) in the PTX ISA's fragment
// layouts of mma.m16n8k16 (row-major A 16x16, column-major B 16x8, C 16x8):
//   A: a[0] = (row g, cols 2t, 2t+1)    a[1] = (row g+8, cols 2t, 2t+1)
//      a[2] = (row g, cols 2t+8, 2t+9)  a[3] = (row g+8, cols 2t+8, 2t+9)
//   B: b[0] = (k 2t, 2t+1; n g)         b[1] = (k 2t+8, 2t+9; n g)
//   C: c[0], c[1] = (row g, cols 2t, 2t+1)   c[2], c[3] = (row g+8, cols 2t, 2t+1)
// (lower 16 bits = the lower index).  A score tile's C fragments of two
// adjacent n8 tiles are exactly the A fragment of the next product (P V,
// dS K, ...), so probabilities never leave registers.
//
// Shared memory (dynamic, rows of kD + 8 elements = 16-byte aligned rows):
//   forward  Qs[64] | Ks[32] Vs[32] x 2 buffers
//   backward own[64] x 2 (Q, dO or K, V) | streamed[32] x 2 x 2 buffers | shift, delta [32] x 2 (fp32)
// kD = 128: 52224 B forward, 70144 B backward (opt-in above 48 KB).
// Owned rows are staged once and moved into register fragments (ldmatrix).
// Streamed tiles are double-buffered: cp.async (16-byte pieces, zero-filled
// past the end) fetches tile it + 1 while tile it is computed; one barrier
// per tile, after this thread's wait for tile it, both publishes tile it and
// ends every warp's reads of tile it - 1, whose buffer the prefetch reuses.  Rows past the sequence end are zero
// filled; masked scores are -inf before the exponent (never arithmetic on a
// masked value), rows past the end are never stored.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/attention.h"
#include "common/attention_host.h"
#include "cuda/ptx.cuh"

namespace sslops {
namespace {

namespace am = ::sslops::attention;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kOwn = 16 * kWarps;  // owned rows per block (16 per warp)
constexpr int kStream = 32;        // streamed rows per step: 4 n8 score tiles = 2 k16 steps of P
constexpr int kNT = kStream / 8;   // n8 score tiles per step

// ---------------------------------------------------------------------------
// Element types and fragments
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct Elem;
template <>
struct Elem<at::Half> {
  using T = __half;  // same bits as at::Half
};
template <>
struct Elem<at::BFloat16> {
  using T = __nv_bfloat16;  // same bits as at::BFloat16
};

__device__ __forceinline__ uint32_t bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two values rounded to T in one 32-bit register (lo in the lower half).
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  return bits(from_float<T>(lo)) | (bits(from_float<T>(hi)) << 16);
}

// d += A B  (m16n8k16, fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const float c[4] = {d[0], d[1], d[2], d[3]};
  if constexpr (std::is_same<T, __half>::value) {
    ptx::mma_m16n8k16_f16(d, a, b, c);
  } else {
    ptx::mma_m16n8k16_bf16(d, a, b, c);
  }
}

template <int kD>
struct Geo {
  static_assert(kD % 16 == 0 && kD >= 16, "head dims are multiples of the k16 MMA step");
  static constexpr int LD = kD + 8;       // shared row stride in elements (16-byte rows, staggered banks)
  static constexpr int kSteps = kD / 16;  // k16 steps over the head dim
  static constexpr int kDT = kD / 8;      // n8 tiles over the head dim
  static constexpr int kRowBytes = LD * 2;
  // owned rows, then two buffers of the two streamed tiles (double-buffered)
  static constexpr int kFwdSmem = (kOwn + 4 * kStream) * kRowBytes;
  static constexpr int kBwdSmem = (2 * kOwn + 4 * kStream) * kRowBytes + 4 * kStream * 4;
};

// Fragments from shared tiles with ldmatrix (lane l names row l % 8 of 8x8
// matrix l / 8; rows are 16-byte aligned: LD * 2 and the column offsets are
// multiples of 16 bytes).
// A fragment of the 16 x 16 block at (r0, c0) of a row-major shared tile:
// matrices (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8) = a[0..3].
template <int LD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int r0, int c0, int lane) {
  const int m = lane / 8, r = lane % 8;
  ptx::ldmatrix_x4(a[0], a[1], a[2], a[3], tile + (r0 + r + 8 * (m & 1)) * LD + c0 + 8 * (m >> 1));
}

// B fragment with B[k][n] = tile[n0 + n][k0 + k]  (B = X^T for X row-major: K in Q K^T):
// matrices (rows n0.., cols k0..) and (rows n0.., cols k0 + 8..).
template <int LD, typename T>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[2], const T* tile, int n0, int k0, int lane) {
  const int m = (lane / 8) & 1, r = lane % 8;
  ptx::ldmatrix_x2(b[0], b[1], tile + (n0 + r) * LD + k0 + 8 * m);
}

// B fragment with B[k][n] = tile[k0 + k][n0 + n]  (B = X row-major: V in P V):
// the transposes of matrices (rows k0.., cols n0..) and (rows k0 + 8.., cols n0..).
template <int LD, typename T>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[2], const T* tile, int k0, int n0, int lane) {
  const int m = (lane / 8) & 1, r = lane % 8;
  ptx::ldmatrix_x2_trans(b[0], b[1], tile + (k0 + r + 8 * m) * LD + n0);
}

// A fragment of k16 step kk of a 16 x 32 tile held as C fragments c[kNT][4].
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[kNT][4], int kk) {
  a[0] = pack<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// c = A B^T for the warp's 16 rows (A: register fragments over the head dim)
// against the 32 rows of a streamed tile (B^T = tile rows): a 16 x 32 score
// tile as kNT C fragments.
template <typename T, int kD>
__device__ __forceinline__ void tile_scores(float (&c)[kNT][4], const uint32_t (&a)[kD / 16][4], const T* tile,
                                            int lane) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t bf[2];
      load_b_rows<Geo<kD>::LD>(bf, tile, 8 * nt, 16 * kk, lane);
      mma<T>(c[nt], a[kk], bf);
    }
  }
}

// acc += P X for a 16 x 32 tile P held as C fragments (rounded to T) and the
// 32 x kD streamed rows X (P V, dS K, P^T dO, dS^T Q).
template <typename T, int kD>
__device__ __forceinline__ void tile_accumulate(float (&acc)[kD / 8][4], const float (&p)[kNT][4], const T* tile,
                                                int lane) {
#pragma unroll
  for (int kk = 0; kk < kStream / 16; ++kk) {
    uint32_t pa[4];
    c_to_a<T>(pa, p, kk);
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      uint32_t bf[2];
      load_b_cols<Geo<kD>::LD>(bf, tile, 16 * kk, 8 * dt, lane);
      mma<T>(acc[dt], pa, bf);
    }
  }
}

// ---------------------------------------------------------------------------
// Operands, sequences
// ---------------------------------------------------------------------------
// A (B, H, L, D) or (T, H, D) tensor: element strides of batch (dense only),
// head and row; D is contiguous.
template <typename P>
struct Mat {
  P* p;
  int64_t sb, sh, sr;
};

struct Seqs {
  const int32_t* cu_q;  // varlen: (N + 1,) offsets; dense: nullptr
  const int32_t* cu_k;
  int64_t lq, lk;  // dense: Lq, Lk; varlen: total tokens Tq, Tk
  int heads;
};

struct Span {
  int64_t q0, k0;  // first token (varlen) of the sequence, 0 for dense
  int64_t lq, lk;  // its numbers of queries and keys
  int64_t stat;    // index of its query 0 in lse / delta (head h)
};

__device__ __forceinline__ Span span_of(const Seqs& s, int b, int h) {
  if (s.cu_q == nullptr) return {0, 0, s.lq, s.lk, (int64_t(b) * s.heads + h) * s.lq};
  const int64_t q0 = s.cu_q[b], k0 = s.cu_k[b];
  return {q0, k0, s.cu_q[b + 1] - q0, s.cu_k[b + 1] - k0, int64_t(h) * s.lq + q0};
}

// Row 0 of sequence b, head h of m (row0: the sequence's first token, varlen).
template <typename P>
__device__ __forceinline__ P* rows_of(const Mat<P>& m, int b, int h, int64_t row0, bool varlen) {
  return m.p + (varlen ? row0 * m.sr : int64_t(b) * m.sb) + int64_t(h) * m.sh;
}

// dst rows [0, n) <- src rows [row0, row0 + n) (row stride sr); rows >= valid
// are zero.  vec: src and its strides are 16-byte aligned (8 elements), so
// rows are copied in 16-byte pieces with cp.async (asynchronous: the data is
// there after cp_async_wait_all and, for other threads, the barrier after it);
// otherwise element by element with plain loads and stores.
template <int kD, typename T>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t sr, int64_t row0, int64_t valid, int n,
                                          bool vec) {
  constexpr int LD = Geo<kD>::LD;
  if (vec) {
    constexpr int kPieces = kD / 8;
    for (int idx = threadIdx.x; idx < n * kPieces; idx += kThreads) {
      const int r = idx / kPieces, c = (idx % kPieces) * 8;
      const bool in = row0 + r < valid;  // outside: 0 bytes read, 16 zero-filled
      ptx::cp_async_cg16_zfill(dst + r * LD + c, in ? src + (row0 + r) * sr + c : src, in ? 16 : 0);
    }
  } else {
    const T zero = from_float<T>(0.f);
    for (int idx = threadIdx.x; idx < n * kD; idx += kThreads) {
      const int r = idx / kD, c = idx % kD;
      dst[r * LD + c] = row0 + r < valid ? src[(row0 + r) * sr + c] : zero;
    }
  }
}

// Rows r0 + g and r0 + g + 8 of a warp's 16 x kD accumulator, times f, stored
// to dst rows (row stride sr) that are < valid.
template <int kD, typename T>
__device__ __forceinline__ void store_rows(T* dst, int64_t sr, int64_t r0, int64_t valid, const float (&acc)[kD / 8][4],
                                           float f0, float f1, int g, int t) {
  for (int half = 0; half < 2; ++half) {
    const int64_t r = r0 + g + 8 * half;
    if (r >= valid) continue;
    const float f = half ? f1 : f0;
    T* row = dst + r * sr;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(row + dt * 8 + 2 * t) = pack<T>(acc[dt][2 * half] * f, acc[dt][2 * half + 1] * f);
    }
  }
}

// The max / sum over the 4 lanes (t = 0..3) that share a fragment row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <typename T>
struct FwdArgs {
  Mat<const T> q, k, v;
  Mat<T> out;
  float* lse;
  Seqs seq;
  float scale;
  bool causal, vec;
};

template <typename T>
struct BwdArgs {
  Mat<const T> q, k, v, out, dout;
  Mat<T> dq, dk, dv;
  const float* lse;
  float* delta;
  Seqs seq;
  float scale;
  bool causal, vec;
};

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const FwdArgs<T> a) {
  using G = Geo<kD>;
  constexpr int LD = G::LD;
  SSLOPS_DYNAMIC_SHARED(char, smem, 16);
  T* Qs = reinterpret_cast<T*>(smem);
  // buffer (i & 1) of the streamed K and V tiles (pointer arithmetic, not an indexed local array)
  auto Kb = [=](int64_t i) { return Qs + (kOwn + (i & 1) * kStream) * LD; };
  auto Vb = [=](int64_t i) { return Qs + (kOwn + (2 + (i & 1)) * kStream) * LD; };
  const int b = blockIdx.z, h = blockIdx.y;
  const bool varlen = a.seq.cu_q != nullptr;
  const Span sp = span_of(a.seq, b, h);
  const int64_t i0 = int64_t(blockIdx.x) * kOwn;
  if (i0 >= sp.lq) return;  // the whole block: this sequence is shorter
  const T* q = rows_of(a.q, b, h, sp.q0, varlen);
  const T* k = rows_of(a.k, b, h, sp.k0, varlen);
  const T* v = rows_of(a.v, b, h, sp.k0, varlen);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t w0 = i0 + 16 * warp;  // this warp's first query row
  const int64_t wrows = sp.lq - w0 < 16 ? sp.lq - w0 : 16;

  load_rows<kD>(Qs, q, a.q.sr, i0, sp.lq, kOwn, a.vec);
  ptx::cp_async_commit();
  ptx::cp_async_wait_all();
  __syncthreads();
  uint32_t qa[G::kSteps][4];
#pragma unroll
  for (int kk = 0; kk < G::kSteps; ++kk) load_a<LD>(qa[kk], Qs, 16 * warp, 16 * kk, lane);

  float m[2] = {am::neg_inf<float>(), am::neg_inf<float>()}, l[2] = {0.f, 0.f};
  float acc[G::kDT][4];
#pragma unroll
  for (int dt = 0; dt < G::kDT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;

  const int64_t last = (i0 + kOwn < sp.lq ? i0 + kOwn : sp.lq) - 1;
  const int64_t n_keys = am::kv_end(last, sp.lk, a.causal);  // keys any row of the block sees
  const int64_t n_tiles = (n_keys + kStream - 1) / kStream;
  if (n_tiles > 0) {
    load_rows<kD>(Kb(0), k, a.k.sr, 0, sp.lk, kStream, a.vec);
    load_rows<kD>(Vb(0), v, a.v.sr, 0, sp.lk, kStream, a.vec);
    ptx::cp_async_commit();
  }
  for (int64_t it = 0; it < n_tiles; ++it) {
    const int64_t j0 = it * kStream;
    const T* Ks = Kb(it & 1);
    const T* Vs = Vb(it & 1);
    ptx::cp_async_wait_all();
    __syncthreads();  // tile it has landed; everybody is done with tile it - 1 (the other buffer)
    if (it + 1 < n_tiles) {  // prefetch tile it + 1 while this one is computed
      load_rows<kD>(Kb((it + 1) & 1), k, a.k.sr, j0 + kStream, sp.lk, kStream, a.vec);
      load_rows<kD>(Vb((it + 1) & 1), v, a.v.sr, j0 + kStream, sp.lk, kStream, a.vec);
      ptx::cp_async_commit();
    }
    if (!am::tile_live(w0, wrows, j0, kStream, sp.lk, a.causal)) continue;  // warp-uniform

    float s[kNT][4];
    tile_scores<T, kD>(s, qa, Ks, lane);
    float tmax[2] = {am::neg_inf<float>(), am::neg_inf<float>()};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = w0 + g + 8 * (e >> 1), j = j0 + 8 * nt + 2 * t + (e & 1);
        s[nt][e] = am::visible(i, j, sp.lk, a.causal) ? s[nt][e] * a.scale : am::neg_inf<float>();
        tmax[e >> 1] = am::online_max(tmax[e >> 1], s[nt][e]);
      }
    }
    float alpha[2], shift[2], tsum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = am::online_max(m[r], quad_max(tmax[r]));
      alpha[r] = am::rescale(m[r], m_new);
      shift[r] = am::safe_shift(m_new);
      tmax[r] = m_new;
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = am::exp_(s[nt][e] - shift[e >> 1]);  // masked: exp(-inf) = 0
        tsum[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) am::online_merge(m[r], l[r], tmax[r], tsum[r], alpha[r]);  // l: this lane's part
#pragma unroll
    for (int dt = 0; dt < G::kDT; ++dt) {
      acc[dt][0] *= alpha[0], acc[dt][1] *= alpha[0];
      acc[dt][2] *= alpha[1], acc[dt][3] *= alpha[1];
    }
    tile_accumulate<T, kD>(acc, s, Vs, lane);
  }
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    inv[r] = am::out_scale(l[r]);
  }
  store_rows<kD>(rows_of(a.out, b, h, sp.q0, varlen), a.out.sr, w0, sp.lq, acc, inv[0], inv[1], g, t);
  if (t == 0) {
    for (int r = 0; r < 2; ++r) {
      const int64_t i = w0 + g + 8 * r;
      if (i < sp.lq) a.lse[sp.stat + i] = am::lse_finalize(m[r], l[r]);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
// delta = rowsum(dO * O), fp32, in lse's layout: flat row n of lse is
// (b, h, i) = (n / Lq / H, n / Lq % H, n % Lq) dense, (h, token) = (n / Tq, n % Tq) varlen.
template <typename T>
__global__ void attention_delta_kernel(const BwdArgs<T> a, int64_t n_rows, int d) {
  const bool varlen = a.seq.cu_q != nullptr;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < n_rows; n += int64_t(gridDim.x) * blockDim.x) {
    int64_t bb = 0, h, i;
    if (varlen) {
      h = n / a.seq.lq, i = n % a.seq.lq;
    } else {
      const int64_t bh = n / a.seq.lq;
      bb = bh / a.seq.heads, h = bh % a.seq.heads, i = n % a.seq.lq;
    }
    const T* o = a.out.p + bb * a.out.sb + h * a.out.sh + i * a.out.sr;
    const T* g = a.dout.p + bb * a.dout.sb + h * a.dout.sh + i * a.dout.sr;
    float acc = 0.f;
    for (int c = 0; c < d; ++c) acc = am::delta_step(acc, to_float(g[c]), to_float(o[c]));
    a.delta[n] = acc;
  }
}

// dQ: a block owns 64 query rows and streams the keys.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const BwdArgs<T> a) {
  using G = Geo<kD>;
  constexpr int LD = G::LD;
  SSLOPS_DYNAMIC_SHARED(char, smem, 16);
  T* Qs = reinterpret_cast<T*>(smem);
  T* dOs = Qs + kOwn * LD;
  auto Kb = [=](int64_t i) { return dOs + (kOwn + (i & 1) * kStream) * LD; };
  auto Vb = [=](int64_t i) { return dOs + (kOwn + (2 + (i & 1)) * kStream) * LD; };
  const int b = blockIdx.z, h = blockIdx.y;
  const bool varlen = a.seq.cu_q != nullptr;
  const Span sp = span_of(a.seq, b, h);
  const int64_t i0 = int64_t(blockIdx.x) * kOwn;
  if (i0 >= sp.lq) return;
  const T* k = rows_of(a.k, b, h, sp.k0, varlen);
  const T* v = rows_of(a.v, b, h, sp.k0, varlen);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t w0 = i0 + 16 * warp;
  const int64_t wrows = sp.lq - w0 < 16 ? sp.lq - w0 : 16;

  load_rows<kD>(Qs, rows_of(a.q, b, h, sp.q0, varlen), a.q.sr, i0, sp.lq, kOwn, a.vec);
  load_rows<kD>(dOs, rows_of(a.dout, b, h, sp.q0, varlen), a.dout.sr, i0, sp.lq, kOwn, a.vec);
  float shift[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = w0 + g + 8 * r;
    shift[r] = i < sp.lq ? am::bwd_shift(a.lse[sp.stat + i]) : am::pos_inf<float>();
    delta[r] = i < sp.lq ? a.delta[sp.stat + i] : 0.f;
  }
  ptx::cp_async_commit();
  ptx::cp_async_wait_all();
  __syncthreads();
  uint32_t qa[G::kSteps][4], da[G::kSteps][4];
#pragma unroll
  for (int kk = 0; kk < G::kSteps; ++kk) {
    load_a<LD>(qa[kk], Qs, 16 * warp, 16 * kk, lane);
    load_a<LD>(da[kk], dOs, 16 * warp, 16 * kk, lane);
  }
  float dq[G::kDT][4];
#pragma unroll
  for (int dt = 0; dt < G::kDT; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  const int64_t last = (i0 + kOwn < sp.lq ? i0 + kOwn : sp.lq) - 1;
  const int64_t n_keys = am::kv_end(last, sp.lk, a.causal);
  const int64_t n_tiles = (n_keys + kStream - 1) / kStream;
  if (n_tiles > 0) {
    load_rows<kD>(Kb(0), k, a.k.sr, 0, sp.lk, kStream, a.vec);
    load_rows<kD>(Vb(0), v, a.v.sr, 0, sp.lk, kStream, a.vec);
    ptx::cp_async_commit();
  }
  for (int64_t it = 0; it < n_tiles; ++it) {
    const int64_t j0 = it * kStream;
    const T* Ks = Kb(it & 1);
    const T* Vs = Vb(it & 1);
    ptx::cp_async_wait_all();
    __syncthreads();  // tile it has landed; everybody is done with tile it - 1 (the other buffer)
    if (it + 1 < n_tiles) {
      load_rows<kD>(Kb((it + 1) & 1), k, a.k.sr, j0 + kStream, sp.lk, kStream, a.vec);
      load_rows<kD>(Vb((it + 1) & 1), v, a.v.sr, j0 + kStream, sp.lk, kStream, a.vec);
      ptx::cp_async_commit();
    }
    if (!am::tile_live(w0, wrows, j0, kStream, sp.lk, a.causal)) continue;

    float s[kNT][4], dp[kNT][4];
    tile_scores<T, kD>(s, qa, Ks, lane);   // S = Q K^T
    tile_scores<T, kD>(dp, da, Vs, lane);  // dP = dO V^T
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = w0 + g + 8 * (e >> 1), j = j0 + 8 * nt + 2 * t + (e & 1);
        const float p = am::visible(i, j, sp.lk, a.causal) ? am::exp_(s[nt][e] * a.scale - shift[e >> 1]) : 0.f;
        s[nt][e] = am::dscore(p, dp[nt][e], delta[e >> 1]);  // s now holds dS
      }
    }
    tile_accumulate<T, kD>(dq, s, Ks, lane);  // dQ += dS K
  }
  store_rows<kD>(rows_of(a.dq, b, h, sp.q0, varlen), a.dq.sr, w0, sp.lq, dq, a.scale, a.scale, g, t);
}

// dK, dV: a block owns 64 key rows and streams the queries.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const BwdArgs<T> a) {
  using G = Geo<kD>;
  constexpr int LD = G::LD;
  SSLOPS_DYNAMIC_SHARED(char, smem, 16);
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + kOwn * LD;
  auto Qb = [=](int64_t i) { return Vs + (kOwn + (i & 1) * kStream) * LD; };
  auto dOb = [=](int64_t i) { return Vs + (kOwn + (2 + (i & 1)) * kStream) * LD; };
  float* const stats = reinterpret_cast<float*>(Vs + (kOwn + 4 * kStream) * LD);  // [buffer][shift, delta][kStream]
  const int b = blockIdx.z, h = blockIdx.y;
  const bool varlen = a.seq.cu_q != nullptr;
  const Span sp = span_of(a.seq, b, h);
  const int64_t j0 = int64_t(blockIdx.x) * kOwn;
  if (j0 >= sp.lk) return;
  const T* q = rows_of(a.q, b, h, sp.q0, varlen);
  const T* dout = rows_of(a.dout, b, h, sp.q0, varlen);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t w0 = j0 + 16 * warp;  // this warp's first key
  const int64_t wkeys = sp.lk - w0 < 16 ? sp.lk - w0 : 16;

  load_rows<kD>(Ks, rows_of(a.k, b, h, sp.k0, varlen), a.k.sr, j0, sp.lk, kOwn, a.vec);
  load_rows<kD>(Vs, rows_of(a.v, b, h, sp.k0, varlen), a.v.sr, j0, sp.lk, kOwn, a.vec);
  ptx::cp_async_commit();
  ptx::cp_async_wait_all();
  __syncthreads();
  uint32_t ka[G::kSteps][4], va[G::kSteps][4];
#pragma unroll
  for (int kk = 0; kk < G::kSteps; ++kk) {
    load_a<LD>(ka[kk], Ks, 16 * warp, 16 * kk, lane);
    load_a<LD>(va[kk], Vs, 16 * warp, 16 * kk, lane);
  }
  float dk[G::kDT][4], dv[G::kDT][4];
#pragma unroll
  for (int dt = 0; dt < G::kDT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  }
  // Queries that see key j0 or later: all (top-left causal: i >= j0).
  const int64_t first = am::q_begin(j0, a.causal) / kStream * kStream;
  // Stage query tile i0 (rows, and their shift and delta) into buffer buf.
  auto stage = [&](int64_t i0, int buf) {
    load_rows<kD>(Qb(buf), q, a.q.sr, i0, sp.lq, kStream, a.vec);
    load_rows<kD>(dOb(buf), dout, a.dout.sr, i0, sp.lq, kStream, a.vec);
    ptx::cp_async_commit();
    float* st = stats + 2 * kStream * buf;
    for (int r = threadIdx.x; r < kStream; r += kThreads) {
      const int64_t i = i0 + r;
      st[r] = i < sp.lq ? am::bwd_shift(a.lse[sp.stat + i]) : am::pos_inf<float>();
      st[kStream + r] = i < sp.lq ? a.delta[sp.stat + i] : 0.f;
    }
  };
  if (first < sp.lq) stage(first, 0);
  for (int64_t i0 = first, it = 0; i0 < sp.lq; i0 += kStream, ++it) {
    const T* Qs = Qb(it & 1);
    const T* dOs = dOb(it & 1);
    const float* shift_s = stats + 2 * kStream * (it & 1);
    const float* delta_s = shift_s + kStream;
    ptx::cp_async_wait_all();
    __syncthreads();  // tile it has landed; everybody is done with tile it - 1 (the other buffer)
    if (i0 + kStream < sp.lq) stage(i0 + kStream, (it + 1) & 1);
    const int64_t qrows = sp.lq - i0 < kStream ? sp.lq - i0 : kStream;
    if (!am::tile_live(i0, qrows, w0, wkeys, sp.lk, a.causal)) continue;

    // Transposed tiles: row = key (this warp's 16), column = query (32).
    float s[kNT][4], dp[kNT][4];
    tile_scores<T, kD>(s, ka, Qs, lane);    // S^T = K Q^T
    tile_scores<T, kD>(dp, va, dOs, lane);  // dP^T = V dO^T
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * nt + 2 * t + (e & 1);
        const int64_t j = w0 + g + 8 * (e >> 1), i = i0 + col;
        const float p = am::visible(i, j, sp.lk, a.causal) ? am::exp_(s[nt][e] * a.scale - shift_s[col]) : 0.f;
        s[nt][e] = p;                                          // P^T
        dp[nt][e] = am::dscore(p, dp[nt][e], delta_s[col]);    // dS^T
      }
    }
    tile_accumulate<T, kD>(dv, s, dOs, lane);  // dV += P^T dO
    tile_accumulate<T, kD>(dk, dp, Qs, lane);  // dK += dS^T Q
  }
  store_rows<kD>(rows_of(a.dk, b, h, sp.k0, varlen), a.dk.sr, w0, sp.lk, dk, a.scale, a.scale, g, t);
  store_rows<kD>(rows_of(a.dv, b, h, sp.k0, varlen), a.dv.sr, w0, sp.lk, dv, 1.f, 1.f, g, t);
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
constexpr int kHeadDims[] = {16, 32, 64, 80, 96, 128};

void check_device(const at::Tensor& q, const char* op) {
  TORCH_CHECK_VALUE(on_cuda_device(q), op, ": expected CUDA tensors, got ", q.device());
}

// After check_device and the device guard.
void check_cuda(const at::Tensor& q, const am::Dims& d, const char* op) {
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16, op,
                   ": the CUDA kernel takes float16 or bfloat16, got ", dt,
                   " (sslops.attention runs float32 on a GPU on the triton backend)");
  bool ok = false;
  for (int hd : kHeadDims) ok = ok || d.head_dim == hd;
  TORCH_CHECK_VALUE(ok, op, ": the CUDA kernel supports head dims 16, 32, 64, 80, 96, 128; got D = ", d.head_dim);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK_VALUE(prop->major >= 8, op, ": the CUDA kernel needs tensor cores of sm_80 or newer, got sm_",
                    prop->major, prop->minor);
  TORCH_CHECK_VALUE(d.heads <= 65535 && d.batch <= 65535, op,
                    ": at most 65535 heads and 65535 sequences per call, got H = ", d.heads, ", B = ", d.batch);
}

// t with a contiguous head dim (a copy only when t lacks one).
at::Tensor unit_d(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous(); }

template <typename P>
Mat<P> mat_of(const at::Tensor& t, bool varlen) {
  P* p = static_cast<P*>(t.data_ptr());
  if (varlen) return {p, 0, t.stride(1), t.stride(0)};
  return {p, t.stride(0), t.stride(1), t.stride(2)};
}

// Whether rows of t can be read in 16-byte pieces (pointer and strides 8-element aligned).
bool vec_ok(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  }
  return true;
}

// cu_seqlens checked on the host (one small copy; a GPU sync), and the device pointer.
const int32_t* offsets(const at::Tensor& cu, int64_t total, int64_t max_seqlen, const char* name, const char* tokens,
                       const char* op, at::Tensor& keep) {
  keep = cu.contiguous();
  const at::Tensor host = keep.to(at::kCPU);
  am::check_cu_seqlens_values(host.data_ptr<int32_t>(), host.numel(), total, max_seqlen, name, tokens, op);
  return keep.data_ptr<int32_t>();
}

Seqs seqs_of(const am::Dims& d, const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k,
             int64_t max_q, int64_t max_k, const char* op, at::Tensor& keep_q, at::Tensor& keep_k) {
  Seqs s{nullptr, nullptr, d.lq, d.lk, static_cast<int>(d.heads)};
  if (d.varlen) {
    s.cu_q = offsets(*cu_q, d.lq, max_q, "cu_seqlens_q", "q", op, keep_q);
    s.cu_k = offsets(*cu_k, d.lk, max_k, "cu_seqlens_k", "k", op, keep_k);
  }
  return s;
}

template <typename K>
void set_smem(K* kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

unsigned blocks_for(int64_t rows) { return static_cast<unsigned>((rows + kOwn - 1) / kOwn); }

template <typename T, int kD>
void launch_fwd(const FwdArgs<T>& a, const am::Dims& d, int64_t max_q) {
  const int64_t rows = d.varlen ? max_q : d.lq;
  if (rows == 0 || d.batch == 0) return;
  const dim3 grid(blocks_for(rows), static_cast<unsigned>(d.heads), static_cast<unsigned>(d.batch));
  set_smem(attention_fwd_kernel<T, kD>, Geo<kD>::kFwdSmem);
  SSLOPS_LAUNCH((attention_fwd_kernel<T, kD>), grid, kThreads, Geo<kD>::kFwdSmem, at::cuda::getCurrentCUDAStream(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kD>
void launch_bwd(const BwdArgs<T>& a, const am::Dims& d, int64_t max_q, int64_t max_k) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_rows = d.varlen ? d.heads * d.lq : d.batch * d.heads * d.lq;
  if (n_rows > 0) {
    const int64_t want = (n_rows + 255) / 256;
    const unsigned blocks = static_cast<unsigned>(want < 65535 ? want : 65535);
    SSLOPS_LAUNCH(attention_delta_kernel<T>, blocks, 256, 0, stream, a, n_rows, static_cast<int>(d.head_dim));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t rows_q = d.varlen ? max_q : d.lq, rows_k = d.varlen ? max_k : d.lk;
  if (rows_q > 0 && d.batch > 0) {
    set_smem(attention_bwd_dq_kernel<T, kD>, Geo<kD>::kBwdSmem);
    const dim3 grid(blocks_for(rows_q), static_cast<unsigned>(d.heads), static_cast<unsigned>(d.batch));
    SSLOPS_LAUNCH((attention_bwd_dq_kernel<T, kD>), grid, kThreads, Geo<kD>::kBwdSmem, stream, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (rows_k > 0 && d.batch > 0) {
    set_smem(attention_bwd_dkdv_kernel<T, kD>, Geo<kD>::kBwdSmem);
    const dim3 grid(blocks_for(rows_k), static_cast<unsigned>(d.heads), static_cast<unsigned>(d.batch));
    SSLOPS_LAUNCH((attention_bwd_dkdv_kernel<T, kD>), grid, kThreads, Geo<kD>::kBwdSmem, stream, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Calls f.template operator()<kD>() for the runtime head dim (checked before).
template <typename F>
void with_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: TORCH_CHECK(false, "sslops::attention (CUDA): unsupported head dim ", d);
  }
}

template <typename scalar_t>
void run_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             const Seqs& seq, const am::Dims& dims, int64_t max_q, double scale, bool causal) {
  using T = typename Elem<scalar_t>::T;
  const bool vl = dims.varlen;
  FwdArgs<T> a{mat_of<const T>(q, vl), mat_of<const T>(k, vl), mat_of<const T>(v, vl), mat_of<T>(out, vl),
               lse.data_ptr<float>(),  seq, static_cast<float>(scale), causal, vec_ok(q) && vec_ok(k) && vec_ok(v)};
  with_head_dim(dims.head_dim, [&](auto hd) { launch_fwd<T, decltype(hd)::value>(a, dims, max_q); });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, const c10::optional<at::Tensor>& cu_q,
                                                      const c10::optional<at::Tensor>& cu_k, int64_t max_seqlen_q,
                                                      int64_t max_seqlen_k, double scale, bool causal) {
  const char* op = "sslops::attention_fwd";
  const auto dims = am::check_inputs(q_in, k_in, v_in, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, op);
  check_device(q_in, op);
  c10::cuda::CUDAGuard guard(q_in.device());
  check_cuda(q_in, dims, op);
  at::Tensor keep_q, keep_k;
  const Seqs seq = seqs_of(dims, cu_q, cu_k, max_seqlen_q, max_seqlen_k, op, keep_q, keep_k);
  const auto q = unit_d(q_in.detach()), k = unit_d(k_in.detach()), v = unit_d(v_in.detach());
  auto [out, lse] = am::new_forward_outputs(q, dims);
  if (q.scalar_type() == at::kHalf) {
    run_fwd<at::Half>(q, k, v, out, lse, seq, dims, max_seqlen_q, scale, causal);
  } else {
    run_fwd<at::BFloat16>(q, k, v, out, lse, seq, dims, max_seqlen_q, scale, causal);
  }
  return {out, lse};
}

template <typename scalar_t>
void run_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& out, const at::Tensor& lse, at::Tensor& delta, const Seqs& seq, const am::Dims& dims,
             int64_t max_q, int64_t max_k, double scale, bool causal, at::Tensor& dq, at::Tensor& dk,
             at::Tensor& dv) {
  using T = typename Elem<scalar_t>::T;
  const bool vl = dims.varlen;
  BwdArgs<T> a{mat_of<const T>(q, vl),   mat_of<const T>(k, vl),  mat_of<const T>(v, vl),
               mat_of<const T>(out, vl), mat_of<const T>(dout, vl), mat_of<T>(dq, vl),
               mat_of<T>(dk, vl),        mat_of<T>(dv, vl),       lse.data_ptr<float>(),
               delta.data_ptr<float>(),  seq,                     static_cast<float>(scale),
               causal,                   vec_ok(q) && vec_ok(k) && vec_ok(v) && vec_ok(dout)};
  with_head_dim(dims.head_dim, [&](auto hd) { launch_bwd<T, decltype(hd)::value>(a, dims, max_q, max_k); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& cu_q,
    const c10::optional<at::Tensor>& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal) {
  const char* op = "sslops::attention_bwd";
  const auto dims = am::check_inputs(q_in, k_in, v_in, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, op);
  am::check_backward_inputs(dout_in, q_in, out_in, lse_in, dims, op);
  check_device(q_in, op);
  c10::cuda::CUDAGuard guard(q_in.device());
  check_cuda(q_in, dims, op);
  at::Tensor keep_q, keep_k;
  const Seqs seq = seqs_of(dims, cu_q, cu_k, max_seqlen_q, max_seqlen_k, op, keep_q, keep_k);
  const auto q = unit_d(q_in.detach()), k = unit_d(k_in.detach()), v = unit_d(v_in.detach());
  const auto out = unit_d(out_in.detach()), dout = unit_d(dout_in.detach());
  const auto lse = lse_in.detach().contiguous();
  auto dq = am::new_grad(q_in, dims);  // layouts follow the caller's tensors (as the fake kernel does)
  auto dk = am::new_grad(k_in, dims);
  auto dv = am::new_grad(v_in, dims);
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  if (q.scalar_type() == at::kHalf) {
    run_bwd<at::Half>(dout, q, k, v, out, lse, delta, seq, dims, max_seqlen_q, max_seqlen_k, scale, causal, dq, dk, dv);
  } else {
    run_bwd<at::BFloat16>(dout, q, k, v, out, lse, delta, seq, dims, max_seqlen_q, max_seqlen_k, scale, causal, dq, dk,
                          dv);
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace sslops

SSLOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("attention_fwd", &sslops::attention_fwd_cuda);
  m.impl("attention_bwd", &sslops::attention_bwd_cuda);
}

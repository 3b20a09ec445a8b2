// CUDA kernels of the fused contrastive log-sum-exp (sslops::nt_xent_lse and
// its backward ops; schemas in csrc/sslops.cpp, per-row math in
// csrc/common/nt_xent.h).
//
// ---------------------------------------------------------------------------
// What is computed
// ---------------------------------------------------------------------------
//   x_ij   = inv_temp * <q_i, c_j>                  (fp32 accumulation; fp64 for fp64)
//   lse_i  = log sum_{j != exclude_i} exp(x_ij)     (-inf for a row with no column)
//   A_ij   = g_i * exp(x_ij - lse_i)   (0 at the excluded column), g = grad_lse
//   (an exclude value outside [0, Kc), e.g. -1, excludes nothing)
//   grad_q = inv_temp * A c,  grad_c = inv_temp * A^T q
//   sym (q = c = z, exclude_i = i):  grad_z = inv_temp * (A + A^T) z
// The (M, Kc) matrix is never materialised: every kernel walks it in tiles.
//
// ---------------------------------------------------------------------------
// One tile engine for every pass
// ---------------------------------------------------------------------------
// Every pass is phrased with an "owner" matrix X (Nx, D) and a "streamed"
// matrix Y (Ny, D).  A block owns kBM = 64 rows of X (blockIdx.x) and walks a
// contiguous range of kBN = 64-row tiles of Y (blockIdx.z = split of that
// range).  For each tile it forms the logit tile
//     T[a][b] = inv_temp * <X_a, Y_b>      (64 x 64, fp32 in shared memory)
// by looping over D in chunks of KC columns (KC = 256 bytes of D: 128 for
// fp16/bf16, 64 for fp32, 32 for fp64), then:
//   forward (X = q, Y = c):  online log-sum-exp of each row of T
//       (lse_merge), leaving a partial (max, sum) per row and split;
//   backward, mode kRows (X = q, Y = c):  W[a][b] = A_ab,
//   backward, mode kCols (X = c, Y = q):  W[a][b] = A_ba   (= (A^T)_ab),
//   backward, mode kSym  (X = Y = z):     W[a][b] = A_ab + A_ba,
//       where A_ba = g_b exp(T[a][b] - lse_b) because <z_a, z_b> = <z_b, z_a>;
//   and accumulates  Out[a][:] += sum_b W[a][b] * Y_b[d0 : d0 + KC]
//   in registers for one KC-wide slice of D (blockIdx.y = slice; each slice
//   recomputes T, so large D costs ceil(D / KC) logit passes).
// So grad_q = inv_temp * Out(kRows), grad_c = inv_temp * Out(kCols) and
// grad_z = inv_temp * Out(kSym).
//
// No atomics, deterministic:  a block writes only its own 64 rows x KC slice
// of a per-split fp32 (fp64 for fp64) workspace ws[split][row][d] (or its own
// rows' partial (max, sum) in the forward); no two blocks write the same element.  A second
// small kernel reduces the splits of each element in a fixed order (split 0,
// 1, ...) and casts to the output dtype.  Within a block every sum runs in a
// fixed order as well, so results are bitwise reproducible on a given GPU.
// (The number of splits depends on the SM count: 2 * SMs * occupancy /
// (row blocks x slices) splits, at most one per tile, fill the GPU for small
// batches; see choose_splits.)
//
// ---------------------------------------------------------------------------
// Tiling and shared memory (128 threads = 4 warps per block)
// ---------------------------------------------------------------------------
//   Xs      64 x (KC + pad)  owner chunk   (resident for the whole kernel when D <= KC)
//   Ys[2]   64 x (KC + pad)  streamed chunk, double-buffered: the next step's
//                            tile is fetched (cp.async, sm_80+) while this step computes
//   Ss      64 x 68 fp32     logit tile T; in the backward the weight tile W
//                            (input dtype, row stride 136) overwrites it in place
//   vectors 64 x {lse, g, exclude} of the streamed rows (backward kCols / kSym)
// Epilogue mapping (both paths): thread t handles row a = t % 64 of T and its
// columns [32 * (t / 64), + 32): it holds those 32 logits in registers, keeps
// a running (max, sum) for them (forward; the two halves of a row are merged
// at the end) or writes the matching 32 weights of W (backward).
// Rows are padded by 16 bytes (272-byte stride) so that WMMA fragment loads and
// the 16-byte accesses of the SIMT path avoid bank conflicts.  Total 70400 B
// (fp16/bf16/fp32: 3 blocks per H100 SM), 87296 B (fp64).
//
// Math paths:
//   fp16/bf16: tensor cores through WMMA 16x16x16 (fp32 accumulators).
//     logits: warp w owns T rows 32*(w/2).., cols 32*(w%2).. (2x2 fragments);
//     backward: warp w owns Out rows 32*(w/2).., cols 64*(w%2).. (2x4 fragments).
//     W is cast to the input dtype for the second product; to keep fp16 W
//     away from underflow it is scaled:  W' = (g / max|g|) * 2^14 * p, with p
//     the softmax weight in [0, 1] (|W'| <= 2^15 < fp16 max), and the result
//     is multiplied back by max|g| * 2^-14 in fp32.
//   fp32/fp64: exact FMA on CUDA cores (no TF32), each thread an 8x4 register
//     tile of T (rows ty + 8i, cols tx + 16j) and an 8 x (16 / sizeof(T)) tile of Out.
//
// Per step (one (tile, D-chunk) pair) the barriers are:
//   (A) after this step's Xs/Ys chunk has landed; then the next Ys chunk is
//       prefetched into the other buffer (its last readers finished before (A));
//   (B) after the logit tile is stored to Ss (once per tile, after its last chunk);
//   (C)/(D) backward only: all threads have read their T values before W
//       overwrites Ss (C), and W is complete before the Out product reads it (D);
//   (E) multi-chunk D only: everybody is done with Xs before it is reloaded.
//
// Ragged edges: rows past Nx/Ny and columns past D are zero-filled in shared
// memory (shared memory past a chunk's width rounded up to the MMA step is
// never read), out-of-range / excluded logits are masked explicitly (never by
// arithmetic on -inf), rows whose lse is -inf get weight 0 (no exp(+inf)),
// and an all-masked tile contributes nothing (no exp(-inf - -inf)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/nt_xent.h"
#include "common/output.h"
#include "cuda/ptx.cuh"

// WMMA bf16 fragments and cp.async exist from sm_80 on.  (The host pass sees
// every device code path; device passes for older GPUs compile a trap instead.)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SSLOPS_SM80 1
#else
#define SSLOPS_SM80 0
#endif

namespace sslops {
namespace {

namespace nx = ::sslops::nt_xent;
namespace wmma = ::nvcuda::wmma;

constexpr int kThreads = 128;   // 4 warps per block
constexpr int kBM = 64;         // owner rows per block
constexpr int kBN = 64;         // streamed rows per tile (= logit-tile columns)
constexpr float kWScale = 16384.f;  // 2^14: scale of the fp16/bf16 weight tile

enum Mode : int { kRows = 0, kCols = 1, kSym = 2 };

// ---------------------------------------------------------------------------
// Types and shared-memory geometry
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct TypeInfo;
template <>
struct TypeInfo<float> {
  using T = float;  // element type in global/shared memory and in the MMA
  using acc_t = float;
  static constexpr bool kTensorCore = false;
};
template <>
struct TypeInfo<double> {
  using T = double;
  using acc_t = double;
  static constexpr bool kTensorCore = false;
};
template <>
struct TypeInfo<at::Half> {
  using T = __half;  // same bits as at::Half
  using acc_t = float;
  static constexpr bool kTensorCore = true;
};
template <>
struct TypeInfo<at::BFloat16> {
  using T = __nv_bfloat16;  // same bits as at::BFloat16
  using acc_t = float;
  static constexpr bool kTensorCore = true;
};

template <typename scalar_t>
struct Geo {
  using Info = TypeInfo<scalar_t>;
  using T = typename Info::T;
  using acc_t = typename Info::acc_t;
  static constexpr bool kTC = Info::kTensorCore;
  static constexpr int kVec = 16 / int(sizeof(T));       // elements per 16-byte copy
  static constexpr int KC = 256 / int(sizeof(T));        // D-chunk width (= output slice width)
  static constexpr int LD = KC + kVec;                   // X/Y tile row stride (272 bytes)
  static constexpr int kStep = kTC ? 16 : kVec;          // k granularity of the logit product
  static constexpr int S_LD = kBN + 16 / int(sizeof(acc_t));  // logit tile row stride (272/528 bytes)
  static constexpr int W_LD = S_LD * int(sizeof(acc_t)) / int(sizeof(T));  // W (type T) aliases Ss rows
  static constexpr int kTileBytes = kBM * LD * int(sizeof(T));
  static constexpr int kSBytes = kBM * S_LD * int(sizeof(acc_t));
  static constexpr int kOffX = 0;
  static constexpr int kOffY = kTileBytes;               // two buffers
  static constexpr int kOffS = 3 * kTileBytes;
  static constexpr int kOffVec = kOffS + kSBytes;        // lse[64], g[64] (acc_t), exclude[64] (int)
  static constexpr int kSmemBytes = kOffVec + kBN * (2 * int(sizeof(acc_t)) + 4);
  static constexpr int STG_LD = KC + 4;                  // fp32 staging of Out (tensor-core path)

  static_assert(kBM == kBN, "square tiles assumed by the epilogue thread mapping");
  static_assert(LD * int(sizeof(T)) % 16 == 0 && S_LD * int(sizeof(acc_t)) % 16 == 0, "16B rows");
  static_assert(!kTC || (LD % 8 == 0 && W_LD % 8 == 0 && S_LD % 4 == 0), "WMMA ldm rules");
  static_assert(kTileBytes % 128 == 0 && kSBytes % 128 == 0, "region alignment");
  static_assert(!kTC || kBM * STG_LD * 4 <= kOffS, "Out staging must fit in the X/Y buffers");
  static_assert(KC % kStep == 0 && kBN % kStep == 0, "chunking");
};

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

template <typename T>
__device__ __forceinline__ T zero_elem();
template <>
__device__ __forceinline__ float zero_elem<float>() { return 0.f; }
template <>
__device__ __forceinline__ double zero_elem<double>() { return 0.0; }
template <>
__device__ __forceinline__ __half zero_elem<__half>() { return __ushort_as_half(static_cast<unsigned short>(0)); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_elem<__nv_bfloat16>() {
  return __ushort_as_bfloat16(static_cast<unsigned short>(0));
}

// 16 bytes of T (4 floats / 2 doubles / 8 halves), for vector shared-memory accesses.
template <typename T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

// ---------------------------------------------------------------------------
// Asynchronous copies (sm_80+; plain loads otherwise)
// ---------------------------------------------------------------------------
__device__ __forceinline__ void copy16_async(void* smem_dst, const void* gmem_src) {
  ptx::cp_async_cg16(smem_dst, gmem_src);
}

// Waits for every cp.async this thread issued (a __syncthreads must follow
// before other threads read the data).
__device__ __forceinline__ void copy_async_wait_all() { ptx::cp_async_wait_all(); }

// Stage rows [row0, row0 + 64) x columns [k0, k0 + kc_pad) of the row-major
// (n_rows, D) matrix src into dst (row stride Geo::LD).  Elements outside
// [0, n_rows) x [0, D) are written as 0; columns >= kc_pad are not touched
// (nobody reads them).  vec: D * sizeof(T) and src are 16-byte aligned, so a
// 16-byte piece (k0 and kc_pad are multiples of kVec) is either entirely
// inside D or entirely outside.
template <typename scalar_t>
__device__ __forceinline__ void load_tile(typename Geo<scalar_t>::T* dst, const typename Geo<scalar_t>::T* src,
                                          int64_t n_rows, int64_t row0, int D, int k0, int kc_pad, bool vec) {
  using G = Geo<scalar_t>;
  using T = typename G::T;
  if (vec) {
    constexpr int kPieces = G::KC / G::kVec;  // 16-byte pieces per tile row
    for (int e = threadIdx.x; e < kBM * kPieces; e += kThreads) {
      const int r = e / kPieces;
      const int col = (e % kPieces) * G::kVec;
      if (col >= kc_pad) continue;
      T* d = dst + r * G::LD + col;
      const int64_t gr = row0 + r;
      if (gr < n_rows && k0 + col < D) {
        copy16_async(d, src + gr * D + (k0 + col));
      } else {
        *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  } else {
    for (int e = threadIdx.x; e < kBM * G::KC; e += kThreads) {
      const int r = e / G::KC;
      const int col = e % G::KC;
      if (col >= kc_pad) continue;
      const int64_t gr = row0 + r;
      dst[r * G::LD + col] = (gr < n_rows && k0 + col < D) ? src[gr * D + (k0 + col)] : zero_elem<T>();
    }
  }
}

// ---------------------------------------------------------------------------
// Tensor-core math (fp16 / bf16): WMMA 16x16x16, fp32 accumulators
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct TensorCoreMath {
  using G = Geo<scalar_t>;
  using T = typename G::T;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragBcol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragBrow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  struct SAcc {  // this warp's 32 x 32 part of the logit tile
    FragC f[2][2];
  };
  struct OAcc {  // this warp's 32 x 64 part of the Out slice (64 x 128)
    FragC f[2][4];
  };

  static __device__ __forceinline__ int warp_m() { return (threadIdx.x >> 5) >> 1; }
  static __device__ __forceinline__ int warp_n() { return (threadIdx.x >> 5) & 1; }

  static __device__ __forceinline__ void zero(SAcc& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc.f[i][j], 0.f);
  }
  static __device__ __forceinline__ void zero(OAcc& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc.f[i][j], 0.f);
  }

  // acc[a][b] += sum_{k < kc_pad} xs[a][k] * ys[b][k]  (ys read as a col-major K x N matrix).
  // kUnroll: 2 in the forward; 1 in the backward, whose Out accumulators take 64 registers.
  template <int kUnroll>
  static __device__ __forceinline__ void logits_chunk(SAcc& acc, const T* xs, const T* ys, int kc_pad) {
    const T* xw = xs + (32 * warp_m()) * G::LD;
    const T* yw = ys + (32 * warp_n()) * G::LD;
#pragma unroll kUnroll
    for (int k = 0; k < kc_pad; k += 16) {
      FragA a[2];
      FragBcol b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], xw + (16 * i) * G::LD + k, G::LD);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], yw + (16 * j) * G::LD + k, G::LD);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc.f[i][j], a[i], b[j], acc.f[i][j]);
    }
  }

  // ss[a][b] = inv_temp * acc[a][b]  (fp32, row stride S_LD).
  static __device__ __forceinline__ void store_logits(SAcc& acc, float* ss, float inv_temp) {
    float* sw = ss + (32 * warp_m()) * G::S_LD + 32 * warp_n();
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int t = 0; t < acc.f[i][j].num_elements; ++t) acc.f[i][j].x[t] *= inv_temp;
        wmma::store_matrix_sync(sw + (16 * i) * G::S_LD + 16 * j, acc.f[i][j], G::S_LD, wmma::mem_row_major);
      }
  }

  // acc[a][d] += sum_{b < 64} w[a][b] * ys[b][d]  for d < kc_pad (ys read row-major K x N).
  // Column fragments at or past kc_pad hold unstaged memory: skipped (their
  // accumulators stay 0 and are never written out, being >= D).
  static __device__ __forceinline__ void out_chunk(OAcc& acc, const T* w, const T* ys, int kc_pad) {
    const T* ww = w + (32 * warp_m()) * G::W_LD;
    const int n_base = 64 * warp_n();
#pragma unroll 1
    for (int k = 0; k < kBN; k += 16) {
      FragA a[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], ww + (16 * i) * G::W_LD + k, G::W_LD);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n0 = n_base + 16 * j;
        if (n0 < kc_pad) {
          FragBrow b;
          wmma::load_matrix_sync(b, ys + k * G::LD + n0, G::LD);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc.f[i][j], a[i], b, acc.f[i][j]);
        }
      }
    }
  }

  // ws[row0 + a][d0 + d] = acc[a][d] for in-range elements (ws: (n_rows, D) fp32),
  // through an fp32 staging tile (the accumulator layout is opaque).
  static __device__ __forceinline__ void write_out(OAcc& acc, unsigned char* smem, float* ws, int64_t n_rows,
                                                   int64_t row0, int D, int d0) {
    float* stg = reinterpret_cast<float*>(smem);  // aliases Xs/Ys: everybody must be done with them
    __syncthreads();
    float* sw = stg + (32 * warp_m()) * G::STG_LD + 64 * warp_n();
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wmma::store_matrix_sync(sw + (16 * i) * G::STG_LD + 16 * j, acc.f[i][j], G::STG_LD, wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < kBM * G::KC; e += kThreads) {
      const int r = e / G::KC;
      const int col = e % G::KC;
      const int64_t gr = row0 + r;
      if (gr < n_rows && d0 + col < D) ws[gr * D + (d0 + col)] = stg[r * G::STG_LD + col];
    }
  }
};

// ---------------------------------------------------------------------------
// CUDA-core math (fp32 / fp64): exact FMA, register tiles
// ---------------------------------------------------------------------------
// Thread (tx = tid % 16, ty = tid / 16): logit rows ty + 8i (i < 8), columns
// tx + 16j (j < 4); Out rows ty + 8i, columns tx * V + e (e < V, V = 16 / sizeof(T)).
template <typename scalar_t>
struct SimtMath {
  using G = Geo<scalar_t>;
  using T = typename G::T;  // == acc_t
  using V16 = Vec16<T>;
  static constexpr int V = G::kVec;

  struct SAcc {
    T v[8][4];
  };
  struct OAcc {
    T v[8][V];
  };

  static __device__ __forceinline__ int tx() { return threadIdx.x & 15; }
  static __device__ __forceinline__ int ty() { return threadIdx.x >> 4; }

  static __device__ __forceinline__ void zero(SAcc& acc) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc.v[i][j] = T(0);
  }
  static __device__ __forceinline__ void zero(OAcc& acc) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < V; ++e) acc.v[i][e] = T(0);
  }

  template <int kUnroll>
  static __device__ __forceinline__ void logits_chunk(SAcc& acc, const T* xs, const T* ys, int kc_pad) {
    const int r0 = ty(), c0 = tx();
#pragma unroll kUnroll
    for (int k = 0; k < kc_pad; k += V) {
      V16 xa[8], yb[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) xa[i] = *reinterpret_cast<const V16*>(xs + (r0 + 8 * i) * G::LD + k);
#pragma unroll
      for (int j = 0; j < 4; ++j) yb[j] = *reinterpret_cast<const V16*>(ys + (c0 + 16 * j) * G::LD + k);
#pragma unroll
      for (int u = 0; u < V; ++u)
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc.v[i][j] = fma(xa[i].v[u], yb[j].v[u], acc.v[i][j]);
    }
  }

  static __device__ __forceinline__ void store_logits(SAcc& acc, T* ss, T inv_temp) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) ss[(ty() + 8 * i) * G::S_LD + tx() + 16 * j] = acc.v[i][j] * inv_temp;
  }

  // acc[a][d] += sum_b w[a][b] * ys[b][d]; this thread's columns are all >= kc_pad or all < it.
  static __device__ __forceinline__ void out_chunk(OAcc& acc, const T* w, const T* ys, int kc_pad) {
    const int r0 = ty(), c0 = tx() * V;
    if (c0 >= kc_pad) return;  // unstaged columns (>= D): nothing to accumulate
#pragma unroll 2
    for (int b = 0; b < kBN; b += V) {
      V16 wv[8], yv[V];
#pragma unroll
      for (int i = 0; i < 8; ++i) wv[i] = *reinterpret_cast<const V16*>(w + (r0 + 8 * i) * G::W_LD + b);
#pragma unroll
      for (int u = 0; u < V; ++u) yv[u] = *reinterpret_cast<const V16*>(ys + (b + u) * G::LD + c0);
#pragma unroll
      for (int u = 0; u < V; ++u)
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int e = 0; e < V; ++e) acc.v[i][e] = fma(wv[i].v[u], yv[u].v[e], acc.v[i][e]);
    }
  }

  static __device__ __forceinline__ void write_out(OAcc& acc, unsigned char*, T* ws, int64_t n_rows, int64_t row0,
                                                   int D, int d0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t gr = row0 + ty() + 8 * i;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int gc = d0 + tx() * V + e;
        if (gr < n_rows && gc < D) ws[gr * D + gc] = acc.v[i][e];
      }
    }
  }
};

// ---------------------------------------------------------------------------
// Epilogue helpers (shared by both math paths)
// ---------------------------------------------------------------------------
// Read 32 consecutive acc_t from shared memory (16-byte aligned).
template <typename acc_t>
__device__ __forceinline__ void read32(const acc_t* p, acc_t (&v)[32]) {
  using V16 = Vec16<acc_t>;
  constexpr int n = 16 / sizeof(acc_t);
#pragma unroll
  for (int q = 0; q < 32 / n; ++q) {
    const V16 t = reinterpret_cast<const V16*>(p)[q];
#pragma unroll
    for (int u = 0; u < n; ++u) v[q * n + u] = t.v[u];
  }
}

__device__ __forceinline__ unsigned pack2(__half, float lo, float hi) {
  return static_cast<unsigned>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<unsigned>(__half_as_ushort(__float2half_rn(hi))) << 16);
}
__device__ __forceinline__ unsigned pack2(__nv_bfloat16, float lo, float hi) {
  return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// Store 8 weights (converted to T) at p (16-byte aligned).
template <typename T, typename acc_t>
__device__ __forceinline__ void store8(T* p, const acc_t (&w)[8]) {
  if constexpr (std::is_same<T, acc_t>::value) {
    using V16 = Vec16<T>;
    constexpr int n = 16 / sizeof(T);
#pragma unroll
    for (int q = 0; q < 8 / n; ++q) {
      V16 t;
#pragma unroll
      for (int u = 0; u < n; ++u) t.v[u] = w[q * n + u];
      reinterpret_cast<V16*>(p)[q] = t;
    }
  } else {
    const T tag = zero_elem<T>();
    *reinterpret_cast<uint4*>(p) = make_uint4(pack2(tag, w[0], w[1]), pack2(tag, w[2], w[3]),
                                              pack2(tag, w[4], w[5]), pack2(tag, w[6], w[7]));
  }
}

// g * exp(x - lse), and 0 for a row whose lse is -inf (it has no logit at all;
// this avoids exp(+inf) * 0).
template <typename acc_t>
__device__ __forceinline__ acc_t weight_term(acc_t x, acc_t lse, acc_t g) {
  return lse == nx::neg_inf<acc_t>() ? acc_t(0) : nx::softmax_weight(x, lse, g);
}

// Scaling of g in the backward: kernels use gn = g * gn_mul / gn_div, the
// reduction multiplies by out_mul.  For fp16/bf16 (gmax != nullptr, pointing
// at max|g|): gn = (g / gmax) * 2^14, out_mul = inv_temp * gmax / 2^14.
template <typename acc_t>
struct GradScale {
  acc_t div, mul, out;
  __device__ __forceinline__ GradScale(const float* gmax, acc_t inv_temp) : div(1), mul(1), out(inv_temp) {
    if (gmax != nullptr) {
      const float gm = *gmax;
      if (gm > 0.f && gm <= FLT_MAX) {  // not 0, inf or NaN (those keep scale 1 and propagate)
        div = gm;
        mul = kWScale;
        out = inv_temp * (gm / kWScale);
      }
    }
  }
};

// ---------------------------------------------------------------------------
// The tile kernel
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct TileArgs {
  using T = typename Geo<scalar_t>::T;
  using acc_t = typename Geo<scalar_t>::acc_t;
  const T* x;              // owner (nx, d)
  const T* y;              // streamed (ny, d)
  int64_t nx, ny;
  int d;
  acc_t inv_temp;
  int n_chunks;            // ceil(d / KC), at least 1
  int n_tiles;             // ceil(ny / 64)
  int tiles_per_split;
  bool vec;                // 16-byte copies allowed
  bool diag;               // x == y and row r excludes streamed row r (backward kSym)
  const int64_t* exclude;  // (M,): per owner row (fwd, kRows) or per streamed row (kCols); may be null
  // forward: partial (max, sum) per split and owner row, [split][nx]
  acc_t* ws_m;
  acc_t* ws_l;
  // backward
  int mode;
  const acc_t* lse;        // (M,)
  const acc_t* grad;       // (M,)
  const float* gmax;       // max|grad| (fp16/bf16) or null
  acc_t* ws_out;           // [split][nx][d]
};

template <typename scalar_t, bool kBackward, typename Math>
__device__ __forceinline__ void tile_kernel_body(const TileArgs<scalar_t>& p) {
  using G = Geo<scalar_t>;
  using T = typename G::T;
  using acc_t = typename G::acc_t;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  SSLOPS_DYNAMIC_SHARED(unsigned char, smem, 128);
  T* const xs = reinterpret_cast<T*>(smem + G::kOffX);
  acc_t* const ss = reinterpret_cast<acc_t*>(smem + G::kOffS);
  T* const wt = reinterpret_cast<T*>(smem + G::kOffS);  // W aliases the logit tile
  acc_t* const v_lse = reinterpret_cast<acc_t*>(smem + G::kOffVec);
  acc_t* const v_g = v_lse + kBN;
  int* const v_excl = reinterpret_cast<int*>(v_g + kBN);  // kCols: exclude[i] - row0 if in [0, 64), else -1
  auto ybuf = [&](int s) { return reinterpret_cast<T*>(smem + G::kOffY + (s & 1) * G::kTileBytes); };

  const int tid = threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int slice = blockIdx.y;  // backward: which KC-wide slice of D this block outputs
  const int split = blockIdx.z;
  const int tile_begin = split * p.tiles_per_split;
  const int tile_end = min(p.n_tiles, tile_begin + p.tiles_per_split);
  const int n_my_tiles = max(tile_end - tile_begin, 0);
  // Chunk order inside a tile: the backward ends on its output slice, so that
  // the streamed chunk staged for the last logit step is the one Out needs.
  const int first_chunk = kBackward ? (slice + 1) % p.n_chunks : 0;
  auto chunk_at = [&](int ci) { return (first_chunk + ci) % p.n_chunks; };  // ci-th chunk of a tile
  auto kc_pad_of = [&](int chunk) {
    const int valid = max(min(G::KC, p.d - chunk * G::KC), 0);
    return round_up(valid, G::kStep);  // <= KC; columns in [valid, kc_pad) are zero-filled
  };

  // Epilogue role: thread owns tile row ea, columns [32 * eh, 32 * eh + 32).
  const int ea = tid % kBM;
  const int eh = tid / kBM;
  const int64_t own = row0 + ea;  // global owner row
  const bool own_ok = own < p.nx;

  // Per-owner-row data.
  int64_t own_excl = -1;  // streamed row excluded from this owner row
  acc_t own_lse = 0, own_g = 0;
  const GradScale<acc_t> gs(kBackward ? p.gmax : nullptr, p.inv_temp);
  if (own_ok) {
    if (p.diag) own_excl = own;
    else if (p.exclude != nullptr && (!kBackward || p.mode == kRows)) own_excl = p.exclude[own];
    if (kBackward && p.mode != kCols) {
      own_lse = p.lse[own];
      own_g = p.grad[own] / gs.div * gs.mul;
    }
  }
  acc_t run_m = kNegInf, run_l = 0;  // forward: online state of (row ea, half eh)

  typename Math::OAcc oacc;
  if constexpr (kBackward) Math::zero(oacc);

  // Prologue: the owner chunk (resident when D fits in one chunk) and the first streamed chunk.
  if (n_my_tiles > 0) {
    if (p.n_chunks == 1) load_tile<scalar_t>(xs, p.x, p.nx, row0, p.d, 0, kc_pad_of(0), p.vec);
    const int c0 = chunk_at(0);
    load_tile<scalar_t>(ybuf(0), p.y, p.ny, int64_t(tile_begin) * kBN, p.d, c0 * G::KC, kc_pad_of(c0), p.vec);
  }

  for (int t = 0; t < n_my_tiles; ++t) {
    const int64_t col0 = int64_t(tile_begin + t) * kBN;  // first streamed row of this tile
    const int s_last = t * p.n_chunks + p.n_chunks - 1;   // step of the tile's last chunk

    // ---- logit tile: loop over the D chunks (one "step" each) ----
    typename Math::SAcc sacc;
    Math::zero(sacc);
    for (int ci = 0; ci < p.n_chunks; ++ci) {
      const int s = t * p.n_chunks + ci;
      const int chunk = chunk_at(ci);
      const int kc_pad = kc_pad_of(chunk);

      if (p.n_chunks > 1) load_tile<scalar_t>(xs, p.x, p.nx, row0, p.d, chunk * G::KC, kc_pad, p.vec);
      copy_async_wait_all();
      __syncthreads();  // (A) Xs and Ys[s & 1] are complete; all of step s - 1 is finished

      // Prefetch step s + 1 (next chunk of this tile, or first chunk of the next tile)
      // into the other buffer; its last readers (step s - 1) are past (A).
      const bool next_in_tile = ci + 1 < p.n_chunks;
      if (next_in_tile || t + 1 < n_my_tiles) {
        const int cn = chunk_at(next_in_tile ? ci + 1 : 0);
        const int64_t rn = next_in_tile ? col0 : col0 + kBN;
        load_tile<scalar_t>(ybuf(s + 1), p.y, p.ny, rn, p.d, cn * G::KC, kc_pad_of(cn), p.vec);
      }
      if constexpr (kBackward) {
        if (ci == p.n_chunks - 1 && p.mode != kRows && tid < kBN) {
          // Per-streamed-row data of this tile, read after (B).  Its previous
          // readers (the epilogue of tile t - 1) are past (A).
          const int64_t i = col0 + tid;
          acc_t l = 0, g = 0;
          int ex = -1;  // tile row (owner row - row0) that streamed row i excludes, if any
          if (i < p.ny) {
            l = p.lse[i];
            g = p.grad[i] / gs.div * gs.mul;
            if (p.mode == kCols && p.exclude != nullptr) {
              const int64_t rel = p.exclude[i] - row0;
              ex = (rel >= 0 && rel < kBM) ? static_cast<int>(rel) : -1;
            }
          }
          v_lse[tid] = l;
          v_g[tid] = g;
          v_excl[tid] = ex;
        }
      }

      Math::template logits_chunk<kBackward ? 1 : 2>(sacc, xs, ybuf(s), kc_pad);
      if (p.n_chunks > 1) __syncthreads();  // (E) Xs is reloaded at the top of the next step
    }

    // ---- epilogue of the tile ----
    Math::store_logits(sacc, ss, p.inv_temp);
    __syncthreads();  // (B) logit tile complete

    acc_t v[32];
    read32<acc_t>(ss + ea * G::S_LD + 32 * eh, v);
    const int n_valid = static_cast<int>(std::min<int64_t>(kBN, p.ny - col0));  // >= 1
    const int64_t excl_rel = own_excl - col0;
    const int excl_loc = (excl_rel >= 0 && excl_rel < kBN) ? static_cast<int>(excl_rel) : -1;

    if constexpr (!kBackward) {
      // Online log-sum-exp of this thread's 32 logits of row ea.
      acc_t tm = kNegInf;
#pragma unroll
      for (int e = 0; e < 32; ++e) {
        const int cc = 32 * eh + e;
        if (cc >= n_valid || cc == excl_loc) v[e] = kNegInf;  // masked (exp -> 0 below)
        tm = v[e] > tm ? v[e] : tm;
      }
      if (tm != kNegInf) {  // at least one live logit, so tm is finite: exp(v - tm) is safe
        acc_t tl = 0;
#pragma unroll
        for (int e = 0; e < 32; ++e) tl += nx::exp_(v[e] - tm);
        nx::lse_merge(run_m, run_l, tm, tl);
      }
      // The next write of Ss (next tile's store_logits) follows that tile's (A).
    } else {
      __syncthreads();  // (C) every thread holds its logits: W may overwrite Ss
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        acc_t w[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int cc = 32 * eh + 8 * q + u;  // streamed row col0 + cc
          const acc_t x = v[8 * q + u];
          acc_t wv = 0;
          if (own_ok && cc < n_valid) {
            if (p.mode == kRows) {
              if (cc != excl_loc) wv = weight_term(x, own_lse, own_g);
            } else if (p.mode == kCols) {
              if (v_excl[cc] != ea) wv = weight_term(x, v_lse[cc], v_g[cc]);
            } else {  // kSym: A_ab + A_ba, diagonal excluded
              if (cc != excl_loc) wv = weight_term(x, own_lse, own_g) + weight_term(x, v_lse[cc], v_g[cc]);
            }
          }
          w[u] = wv;
        }
        store8<T, acc_t>(wt + ea * G::W_LD + 32 * eh + 8 * q, w);
      }
      __syncthreads();  // (D) W complete
      // Ys[s_last & 1] holds chunk == slice (the tile's last chunk); it is
      // overwritten only by the prefetch of step s_last + 2, after the next (A).
      Math::out_chunk(oacc, wt, ybuf(s_last), kc_pad_of(slice));
    }
  }

  if constexpr (!kBackward) {
    // Merge the two column halves of each row, write the split's partial state.
    __syncthreads();
    if (eh == 1) {
      v_lse[ea] = run_m;
      v_g[ea] = run_l;
    }
    __syncthreads();
    if (eh == 0 && own_ok) {
      nx::lse_merge(run_m, run_l, v_lse[ea], v_g[ea]);
      p.ws_m[int64_t(split) * p.nx + own] = run_m;
      p.ws_l[int64_t(split) * p.nx + own] = run_l;
    }
  } else {
    Math::write_out(oacc, smem, p.ws_out + int64_t(split) * p.nx * p.d, p.nx, row0, p.d, slice * G::KC);
  }
}

// 3 blocks of 128 threads per SM (<= 168 registers) match the 70400 B of shared
// memory per block on H100; fp64 (87296 B, rarely used) is left unconstrained.
template <typename scalar_t, bool kBackward>
__global__ void __launch_bounds__(kThreads, sizeof(typename Geo<scalar_t>::acc_t) == 8 ? 1 : 3)
    nt_xent_tile_kernel(const TileArgs<scalar_t> p) {
  if constexpr (Geo<scalar_t>::kTC) {
#if SSLOPS_SM80
    tile_kernel_body<scalar_t, kBackward, TensorCoreMath<scalar_t>>(p);
#else
    __trap();  // fp16/bf16 need sm_80+ (checked on the host)
#endif
  } else {
    tile_kernel_body<scalar_t, kBackward, SimtMath<scalar_t>>(p);
  }
}

// lse[r] = lse_finalize(merge over splits, in order, of (ws_m, ws_l)[split][r]).
template <typename acc_t>
__global__ void lse_reduce_kernel(const acc_t* ws_m, const acc_t* ws_l, int n_split, int64_t n, acc_t* lse) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < n; r += int64_t(gridDim.x) * blockDim.x) {
    acc_t m = nx::neg_inf<acc_t>(), l = 0;
    for (int s = 0; s < n_split; ++s) nx::lse_merge(m, l, ws_m[s * n + r], ws_l[s * n + r]);
    lse[r] = nx::lse_finalize(m, l);
  }
}

// out[k] = out_mul * sum over splits, in order, of ws[split][k], cast to scalar_t.
template <typename scalar_t, typename acc_t>
__global__ void grad_reduce_kernel(const acc_t* ws, int n_split, int64_t n, const float* gmax, acc_t inv_temp,
                                   scalar_t* out) {
  const GradScale<acc_t> gs(gmax, inv_temp);
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    acc_t sum = 0;
    for (int s = 0; s < n_split; ++s) sum += ws[s * n + k];
    out[k] = static_cast<scalar_t>(sum * gs.out);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
// Argument checks: the device-independent ones are shared with the CPU kernels
// (common/checks.h); these are the CUDA kernels' own.
void check_cuda_input(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(on_cuda_device(t), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.size(0) < (int64_t(1) << 31) - kBN && t.size(1) < (int64_t(1) << 30), op, ": ", name,
              " is too large for the CUDA kernels: shape ", t.sizes());
  if (dt == at::kHalf || dt == at::kBFloat16) {
    const auto* prop = at::cuda::getDeviceProperties(t.device().index());
    TORCH_CHECK(prop->major >= 8, op, ": ", name, " is ", dt, ", whose CUDA kernels need compute capability >= 8.0; ",
                t.device(), " has ", prop->major, ".", prop->minor);
  }
}

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Resident blocks per SM of the tile kernel on the current device, after
// opting in to its shared memory there.  Both are per-device facts, so they
// are queried once per device (and again only if the device's properties
// change, which only the emulator's device switch does) instead of on every
// call; the cache is shared by all threads under a mutex.
template <typename scalar_t, bool kBackward>
int tile_blocks_per_sm(const cudaDeviceProp& prop) {
  struct Entry {
    int sms = -1;
    size_t smem_per_sm = 0;
    int per_sm = 0;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;  // by device index
  const int device = static_cast<int>(c10::cuda::current_device());
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() <= static_cast<size_t>(device)) cache.resize(device + 1);
  Entry& e = cache[device];
  if (e.sms != prop.multiProcessorCount || e.smem_per_sm != prop.sharedMemPerMultiprocessor) {
    auto kernel = nt_xent_tile_kernel<scalar_t, kBackward>;
    const int smem = Geo<scalar_t>::kSmemBytes;
    int per_sm = 0;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    e = Entry{prop.multiProcessorCount, prop.sharedMemPerMultiprocessor, std::max(per_sm, 1)};
  }
  return e.per_sm;
}

// Splits of the streamed range (of n_tiles tiles) for a grid of base = owner
// blocks x slices blocks: enough for about two waves of resident blocks
// (target = 2 x SMs x blocks per SM), at most one tile per split.  (No fixed
// cap: the forward of 256 queries x 65536 negatives on an H100, 3 blocks per
// SM, takes 171 splits of 6 tiles, 684 blocks, where a cap of 16 left 64.)
// The workspace stays bounded: splits x rows x KC ~ target x 64 x KC elements.
int choose_splits(int64_t base, int n_tiles, int sms, int per_sm, int* tiles_per_split) {
  const int64_t target = 2 * int64_t(sms) * std::max(per_sm, 1);
  int n_split = static_cast<int>(std::min<int64_t>((target + base - 1) / base, std::min(n_tiles, 65535)));
  n_split = std::max(n_split, 1);
  *tiles_per_split = (n_tiles + n_split - 1) / n_split;
  return (n_tiles + *tiles_per_split - 1) / *tiles_per_split;  // no empty split
}

// Fills the shape fields of args and picks the split of the streamed range.
// Returns the grid (owner blocks, slices, splits).
template <typename scalar_t, bool kBackward>
dim3 plan(TileArgs<scalar_t>& a, const at::Tensor& x, const at::Tensor& y, double inv_temp) {
  using G = Geo<scalar_t>;
  using T = typename G::T;
  a.x = reinterpret_cast<const T*>(x.data_ptr<scalar_t>());
  a.y = reinterpret_cast<const T*>(y.data_ptr<scalar_t>());
  a.nx = x.size(0);
  a.ny = y.size(0);
  a.d = static_cast<int>(x.size(1));
  a.inv_temp = static_cast<typename G::acc_t>(inv_temp);
  a.n_chunks = std::max<int>(1, (a.d + G::KC - 1) / G::KC);
  a.n_tiles = static_cast<int>((a.ny + kBN - 1) / kBN);
  a.vec = (int64_t(a.d) * int64_t(sizeof(T))) % 16 == 0 && aligned16(a.x) && aligned16(a.y);
  a.diag = false;
  a.exclude = nullptr;
  a.ws_m = a.ws_l = nullptr;
  a.mode = kRows;
  a.lse = a.grad = nullptr;
  a.gmax = nullptr;
  a.ws_out = nullptr;

  const int64_t blocks = (a.nx + kBM - 1) / kBM;
  const int slices = kBackward ? a.n_chunks : 1;
  TORCH_CHECK(slices <= 65535, "sslops::nt_xent (CUDA): D = ", a.d, " is too large");
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  const int per_sm = tile_blocks_per_sm<scalar_t, kBackward>(prop);
  const int n_split = choose_splits(blocks * slices, a.n_tiles, prop.multiProcessorCount, per_sm, &a.tiles_per_split);
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(slices), static_cast<unsigned>(n_split));
}

int reduce_blocks(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, int64_t(sms) * 8)));
}

// lse (M,) of rows of x against rows of y (exclude: per row of x, or undefined).
template <typename scalar_t>
void run_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& exclude, double inv_temp,
                 at::Tensor& lse) {
  using acc_t = typename Geo<scalar_t>::acc_t;
  TileArgs<scalar_t> a;
  const dim3 grid = plan<scalar_t, false>(a, x, y, inv_temp);
  a.exclude = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;
  at::Tensor ws = at::empty({2, int64_t(grid.z), a.nx}, x.options().dtype(lse.scalar_type()));
  a.ws_m = ws[0].data_ptr<acc_t>();
  a.ws_l = ws[1].data_ptr<acc_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  SSLOPS_LAUNCH((nt_xent_tile_kernel<scalar_t, false>), grid, kThreads, Geo<scalar_t>::kSmemBytes, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  SSLOPS_LAUNCH(lse_reduce_kernel<acc_t>, reduce_blocks(a.nx), 256, 0, stream, a.ws_m, a.ws_l,
                static_cast<int>(grid.z), a.nx, lse.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One backward pass: returns inv_temp * Out (x.size(0), D) in x's dtype.
template <typename scalar_t>
at::Tensor run_backward(const at::Tensor& x, const at::Tensor& y, int mode, const at::Tensor& exclude,
                        const at::Tensor& lse, const at::Tensor& grad, const at::Tensor& gmax, double inv_temp) {
  using acc_t = typename Geo<scalar_t>::acc_t;
  TileArgs<scalar_t> a;
  const dim3 grid = plan<scalar_t, true>(a, x, y, inv_temp);
  a.mode = mode;
  a.diag = (mode == kSym);
  a.exclude = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;
  a.lse = lse.data_ptr<acc_t>();
  a.grad = grad.data_ptr<acc_t>();
  a.gmax = gmax.defined() ? gmax.data_ptr<float>() : nullptr;
  at::Tensor ws = at::empty({int64_t(grid.z), a.nx, int64_t(a.d)}, x.options().dtype(lse.scalar_type()));
  a.ws_out = ws.data_ptr<acc_t>();
  at::Tensor out = new_output_like(x);  // every element is written by grad_reduce_kernel
  auto stream = at::cuda::getCurrentCUDAStream();
  SSLOPS_LAUNCH((nt_xent_tile_kernel<scalar_t, true>), grid, kThreads, Geo<scalar_t>::kSmemBytes, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n = a.nx * int64_t(a.d);
  SSLOPS_LAUNCH((grad_reduce_kernel<scalar_t, acc_t>), reduce_blocks(n), 256, 0, stream, a.ws_out,
                static_cast<int>(grid.z), n, a.gmax, a.inv_temp, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// max|grad| as a 0-dim float32 device tensor (fp16/bf16 only; see GradScale).
at::Tensor grad_abs_max(const at::Tensor& grad, at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return at::Tensor();
  return grad.abs().amax().to(at::kFloat).contiguous();
}

// ---- ops -------------------------------------------------------------------
at::Tensor nt_xent_lse_cuda(const at::Tensor& q_in, const at::Tensor& c_in, const c10::optional<at::Tensor>& exclude_in,
                            double inv_temp) {
  const char* op = "sslops::nt_xent_lse";
  check_lse_inputs(q_in, c_in, exclude_in, inv_temp, op);
  check_cuda_input(q_in, "q", op);
  check_cuda_input(c_in, "c", op);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor c = c_in.contiguous();
  const at::Tensor exclude = exclude_in.has_value() ? exclude_in->contiguous() : at::Tensor();
  at::Tensor lse = new_output({q.size(0)}, q.options().dtype(acc_dtype(q)));
  if (q.size(0) == 0) return lse;
  if (c.size(0) == 0) return lse.fill_(-std::numeric_limits<double>::infinity());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sslops::nt_xent_lse_cuda", [&] {
    run_forward<scalar_t>(q, c, exclude, inv_temp, lse);
  });
  return lse;
}

std::tuple<at::Tensor, at::Tensor> nt_xent_lse_backward_cuda(const at::Tensor& grad_lse_in, const at::Tensor& q_in,
                                                              const at::Tensor& c_in,
                                                              const c10::optional<at::Tensor>& exclude_in,
                                                              const at::Tensor& lse_in, double inv_temp) {
  const char* op = "sslops::nt_xent_lse_backward";
  check_lse_inputs(q_in, c_in, exclude_in, inv_temp, op);
  check_cuda_input(q_in, "q", op);
  check_cuda_input(c_in, "c", op);
  check_row_vector(grad_lse_in, "grad_lse", q_in.size(0), q_in, op);
  check_row_vector(lse_in, "lse", q_in.size(0), q_in, op);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor c = c_in.contiguous();
  const at::Tensor exclude = exclude_in.has_value() ? exclude_in->contiguous() : at::Tensor();
  if (q.size(0) == 0 || c.size(0) == 0 || q.size(1) == 0) return {at::zeros_like(q), at::zeros_like(c)};
  const at::Tensor grad = grad_lse_in.to(acc_dtype(q)).contiguous();
  const at::Tensor lse = lse_in.to(acc_dtype(q)).contiguous();
  at::Tensor grad_q, grad_c;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sslops::nt_xent_lse_backward_cuda", [&] {
    const at::Tensor gmax = grad_abs_max(grad, q.scalar_type());
    grad_q = run_backward<scalar_t>(q, c, kRows, exclude, lse, grad, gmax, inv_temp);
    grad_c = run_backward<scalar_t>(c, q, kCols, exclude, lse, grad, gmax, inv_temp);
  });
  return {grad_q, grad_c};
}

at::Tensor nt_xent_lse_backward_sym_cuda(const at::Tensor& grad_lse_in, const at::Tensor& z_in,
                                         const at::Tensor& lse_in, double inv_temp) {
  const char* op = "sslops::nt_xent_lse_backward_sym";
  check_lse_inputs(z_in, z_in, c10::nullopt, inv_temp, op);
  check_cuda_input(z_in, "z", op);
  check_row_vector(grad_lse_in, "grad_lse", z_in.size(0), z_in, op);
  check_row_vector(lse_in, "lse", z_in.size(0), z_in, op);
  c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous();
  if (z.size(0) == 0 || z.size(1) == 0) return at::zeros_like(z);
  const at::Tensor grad = grad_lse_in.to(acc_dtype(z)).contiguous();
  const at::Tensor lse = lse_in.to(acc_dtype(z)).contiguous();
  at::Tensor grad_z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "sslops::nt_xent_lse_backward_sym_cuda",
                                  [&] {
                                    const at::Tensor gmax = grad_abs_max(grad, z.scalar_type());
                                    grad_z = run_backward<scalar_t>(z, z, kSym, at::Tensor(), lse, grad, gmax, inv_temp);
                                  });
  return grad_z;
}

}  // namespace
}  // namespace sslops

SSLOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("nt_xent_lse", &sslops::nt_xent_lse_cuda);
  m.impl("nt_xent_lse_backward", &sslops::nt_xent_lse_backward_cuda);
  m.impl("nt_xent_lse_backward_sym", &sslops::nt_xent_lse_backward_sym_cuda);
}

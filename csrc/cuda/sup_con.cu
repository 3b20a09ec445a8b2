// CUDA kernels of the fused supervised / multi-view contrastive statistics
// (sslops::sup_con_stats and its backward; schemas in csrc/sslops.cpp, per-row
// math in csrc/common/sup_con.h, shared with csrc/cpu/sup_con.cpp).
//
//   x_ij = inv_temp * <z_i, z_j>,  candidates j != i,  positives P(i) = {j != i : labels_j == labels_i}
//   forward:  per row (lse_i, lpos_i, psum_i, cnt_i), (4, N) fp32 (fp64 for fp64 z)
//   backward: grad_z = inv_temp * (W + W^T) z,  W as in common/sup_con.h
// The (N, N) matrix is never materialised: a block owns kBM = 64 rows and walks
// the columns in 64-row tiles, recomputing each logit tile from z.
//
// SIMT, every floating dtype (fp16/bf16 loaded and converted to fp32 in shared
// memory; fp32 exact FMA, no TF32; fp64 in fp64).  256 threads = 16 x 16;
// thread (ty, tx) owns rows ty + 16 a and columns tx + 16 b (a, b < 4) of a
// 64 x 64 logit tile, accumulated over D in chunks of kKC = 16 through
// shared memory (As, Bs: [k][row], acc_t).
//   forward:  each thread keeps sup_con::RowStats for its 4 rows over its
//             columns; the 16 threads of a row (16 consecutive lanes) merge
//             them with xor shuffles in a fixed order at the end.
//   backward: blockIdx.y is a 64-wide slice of D; per tile the weights W + W^T
//             go to Ws (shared), then Out[64 x 64] += Ws @ z_J[:, slice] (Zs).
//             Per-row factors (lse, positive factor, ...) come from a small
//             pre-pass (row_grads_kernel) using sup_con.h.
// Deterministic (no atomics: every output element has one owner thread and a
// fixed summation order).  Rows past N and columns past D are zero-filled;
// the diagonal and columns past N are masked explicitly.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "common/output.h"
#include "common/sup_con.h"
#include "cuda/ptx.cuh"

namespace sslops {
namespace {

namespace sc = ::sslops::sup_con;
namespace nx = ::sslops::nt_xent;

constexpr int kTX = 16;             // threads per row of the thread grid
constexpr int kThreads = kTX * kTX;  // 256
constexpr int kBM = 64;             // owned rows per block
constexpr int kBN = 64;             // columns per tile
constexpr int kKC = 16;             // D chunk of the logit product
constexpr int kSlice = 64;          // D slice of the backward output per block
constexpr int kR = kBM / kTX;       // 4 rows per thread
constexpr int kC = kBN / kTX;       // 4 columns per thread
constexpr int kRowArgs = 7;         // per-row backward factors (row_grads_kernel)

template <typename scalar_t>
struct Acc {
  using T = float;
};
template <>
struct Acc<double> {
  using T = double;
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load_elem(const scalar_t* p) {
  return static_cast<acc_t>(*p);
}

// dst[k][r] <- z[row0 + r][k0 + k] (0 outside N x D), for kKC x 64 elements.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void load_chunk(acc_t* dst, const scalar_t* z, int64_t n, int64_t d, int64_t row0,
                                           int64_t k0) {
  for (int idx = threadIdx.x; idx < kKC * kBM; idx += kThreads) {
    const int r = idx / kKC, k = idx % kKC;  // consecutive threads read consecutive k of a row
    const int64_t row = row0 + r, col = k0 + k;
    dst[k * kBM + r] = row < n && col < d ? load_elem<acc_t>(z + row * d + col) : acc_t(0);
  }
}

// The 4 x 4 logits of this thread for owned rows [r0, r0 + 64) against
// columns [c0, c0 + 64), before the inv_temp factor.  Leaves As/Bs in use: the
// caller's next write to them must follow a barrier.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void logit_tile(acc_t (&acc)[kR][kC], acc_t* As, acc_t* Bs, const scalar_t* z, int64_t n,
                                           int64_t d, int64_t r0, int64_t c0) {
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
#pragma unroll
  for (int a = 0; a < kR; ++a)
#pragma unroll
    for (int b = 0; b < kC; ++b) acc[a][b] = acc_t(0);
  for (int64_t k0 = 0; k0 < d; k0 += kKC) {
    __syncthreads();  // everybody is done with the previous chunk
    load_chunk(As, z, n, d, r0, k0);
    load_chunk(Bs, z, n, d, c0, k0);
    __syncthreads();  // the chunk is complete
#pragma unroll
    for (int k = 0; k < kKC; ++k) {
      acc_t x[kR], y[kC];
#pragma unroll
      for (int a = 0; a < kR; ++a) x[a] = As[k * kBM + ty + kTX * a];
#pragma unroll
      for (int b = 0; b < kC; ++b) y[b] = Bs[k * kBN + tx + kTX * b];
#pragma unroll
      for (int a = 0; a < kR; ++a)
#pragma unroll
        for (int b = 0; b < kC; ++b) acc[a][b] += x[a] * y[b];
    }
  }
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sup_con_stats_kernel(const scalar_t* z, const int64_t* labels, int64_t n,
                                                                 int64_t d, typename Acc<scalar_t>::T inv_temp,
                                                                 typename Acc<scalar_t>::T* out) {
  using acc_t = typename Acc<scalar_t>::T;
  SSLOPS_SHARED(acc_t, As, [kKC * kBM]);
  SSLOPS_SHARED(acc_t, Bs, [kKC * kBN]);
  SSLOPS_SHARED(int64_t, col_lab, [kBN]);
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t r0 = int64_t(blockIdx.x) * kBM;
  int64_t row[kR], lab[kR];
  sc::RowStats<acc_t> st[kR];
#pragma unroll
  for (int a = 0; a < kR; ++a) {
    row[a] = r0 + ty + kTX * a;
    lab[a] = row[a] < n ? labels[row[a]] : 0;
    st[a] = sc::stats_init<acc_t>();
  }
  const acc_t ninf = nx::neg_inf<acc_t>();
  for (int64_t c0 = 0; c0 < n; c0 += kBN) {
    acc_t acc[kR][kC];
    logit_tile(acc, As, Bs, z, n, d, r0, c0);
    __syncthreads();  // the previous tile's readers of col_lab are done (logit_tile has no barrier when D = 0)
    for (int j = threadIdx.x; j < kBN; j += kThreads) col_lab[j] = c0 + j < n ? labels[c0 + j] : 0;
    __syncthreads();  // col_lab complete
#pragma unroll
    for (int a = 0; a < kR; ++a) {
      acc_t x[kC];
      bool cand[kC], pos[kC];
      acc_t tm = ninf, tmp = ninf;
#pragma unroll
      for (int b = 0; b < kC; ++b) {
        const int64_t col = c0 + tx + kTX * b;
        x[b] = acc[a][b] * inv_temp;
        cand[b] = col < n && col != row[a];
        pos[b] = cand[b] && col_lab[tx + kTX * b] == lab[a];
        if (cand[b] && x[b] > tm) tm = x[b];
        if (pos[b] && x[b] > tmp) tmp = x[b];
      }
      acc_t tl = 0, tlp = 0, ps = 0, pc = 0;
#pragma unroll
      for (int b = 0; b < kC; ++b) {
        if (cand[b]) tl += nx::exp_(x[b] - tm);
        if (pos[b]) {
          tlp += nx::exp_(x[b] - tmp);
          ps += x[b];
          pc += acc_t(1);
        }
      }
      sc::stats_merge(st[a], tm, tl, tmp, tlp, ps, pc);
    }
  }
  // The 16 threads of a row are 16 consecutive lanes: merge their states.
#pragma unroll
  for (int a = 0; a < kR; ++a) {
#pragma unroll
    for (int m = 1; m < kTX; m <<= 1) {
      const acc_t om = shfl_xor(st[a].m, m), ol = shfl_xor(st[a].l, m);
      const acc_t omp = shfl_xor(st[a].mp, m), olp = shfl_xor(st[a].lp, m);
      const acc_t ops = shfl_xor(st[a].psum, m), oc = shfl_xor(st[a].cnt, m);
      sc::stats_merge(st[a], om, ol, omp, olp, ops, oc);
    }
    if (tx == 0 && row[a] < n) sc::stats_finalize(st[a], out + row[a], n);
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
// Per-row factors, (kRowArgs, N): ga, lse (safe), f (positive factor), direct
// (0/1), gp, lpos, gs.
template <typename acc_t>
__global__ void row_grads_kernel(const acc_t* grad, const acc_t* stats, int64_t n, acc_t* rows) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t ga = grad[i], gp = grad[n + i], gs = grad[2 * n + i];
    const acc_t lse = stats[i], lpos = stats[n + i];
    bool direct = false;
    const acc_t f = sc::positive_factor(gp, lse, lpos, direct);
    rows[i] = ga;
    rows[n + i] = sc::safe_lse(lse);
    rows[2 * n + i] = f;
    rows[3 * n + i] = direct ? acc_t(1) : acc_t(0);
    rows[4 * n + i] = gp;
    rows[5 * n + i] = lpos;
    rows[6 * n + i] = gs;
  }
}

// exp(max(x - s, min_exp_arg)): s = +inf (a row without candidates) gives ~0, never NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t exp_shifted(acc_t x, acc_t s) {
  const acc_t arg = x - s, lo = nx::min_exp_arg<acc_t>();
  return nx::exp_(arg > lo ? arg : lo);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sup_con_backward_kernel(const scalar_t* z, const int64_t* labels,
                                                                    int64_t n, int64_t d,
                                                                    typename Acc<scalar_t>::T inv_temp,
                                                                    const typename Acc<scalar_t>::T* rows,
                                                                    scalar_t* grad_z) {
  using acc_t = typename Acc<scalar_t>::T;
  SSLOPS_DYNAMIC_SHARED(char, smem, 16);
  acc_t* As = reinterpret_cast<acc_t*>(smem);
  acc_t* Bs = As + kKC * kBM;
  acc_t* Ws = Bs + kKC * kBN;             // [64][65]: W + W^T of the tile
  acc_t* Zs = Ws + kBM * (kBN + 1);       // [64][64]: z_J[:, slice]
  acc_t* col = Zs + kBN * kSlice;         // [kRowArgs][64]: the columns' factors
  int64_t* col_lab = reinterpret_cast<int64_t*>(col + kRowArgs * kBN);
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t r0 = int64_t(blockIdx.x) * kBM, s0 = int64_t(blockIdx.y) * kSlice;
  int64_t row[kR], lab[kR];
  acc_t ra[kRowArgs][kR];
#pragma unroll
  for (int a = 0; a < kR; ++a) {
    row[a] = r0 + ty + kTX * a;
    const bool in = row[a] < n;
    lab[a] = in ? labels[row[a]] : 0;
#pragma unroll
    for (int q = 0; q < kRowArgs; ++q) ra[q][a] = in ? rows[q * n + row[a]] : acc_t(0);
  }
  acc_t out[kR][kC];
#pragma unroll
  for (int a = 0; a < kR; ++a)
#pragma unroll
    for (int b = 0; b < kC; ++b) out[a][b] = acc_t(0);

  for (int64_t c0 = 0; c0 < n; c0 += kBN) {
    acc_t acc[kR][kC];
    logit_tile(acc, As, Bs, z, n, d, r0, c0);
    // The columns' labels and factors, and z_J[:, slice] (their last readers passed the barrier that ends
    // the previous tile).
    for (int j = threadIdx.x; j < kBN; j += kThreads) {
      const bool in = c0 + j < n;
      col_lab[j] = in ? labels[c0 + j] : 0;
#pragma unroll
      for (int q = 0; q < kRowArgs; ++q) col[q * kBN + j] = in ? rows[q * n + c0 + j] : acc_t(0);
    }
    for (int idx = threadIdx.x; idx < kBN * kSlice; idx += kThreads) {
      const int j = idx / kSlice, c = idx % kSlice;
      const int64_t zr = c0 + j, zc = s0 + c;
      Zs[j * kSlice + c] = zr < n && zc < d ? load_elem<acc_t>(z + zr * d + zc) : acc_t(0);
    }
    __syncthreads();  // column factors complete
#pragma unroll
    for (int a = 0; a < kR; ++a) {
#pragma unroll
      for (int b = 0; b < kC; ++b) {
        const int jj = tx + kTX * b;
        const int64_t cidx = c0 + jj;
        acc_t w = 0;
        if (cidx < n && cidx != row[a] && row[a] < n) {
          const acc_t x = acc[a][b] * inv_temp;
          const acc_t e_i = exp_shifted(x, ra[1][a]);           // exp(x - lse_i)
          const acc_t e_j = exp_shifted(x, col[1 * kBN + jj]);   // exp(x - lse_j)
          w = ra[0][a] * e_i + col[0 * kBN + jj] * e_j;          // ga terms
          if (col_lab[jj] == lab[a]) {                           // j in P(i), i in P(j)
            const acc_t p_i = ra[3][a] != 0 ? sc::positive_direct(x, ra[5][a], ra[4][a]) : ra[2][a] * e_i;
            const acc_t p_j = col[3 * kBN + jj] != 0 ? sc::positive_direct(x, col[5 * kBN + jj], col[4 * kBN + jj])
                                                     : col[2 * kBN + jj] * e_j;
            w += p_i + p_j + ra[6][a] + col[6 * kBN + jj];
          }
        }
        Ws[(ty + kTX * a) * (kBN + 1) + jj] = w;
      }
    }
    __syncthreads();  // Ws complete
#pragma unroll 4
    for (int j = 0; j < kBN; ++j) {
      acc_t wv[kR], zv[kC];
#pragma unroll
      for (int a = 0; a < kR; ++a) wv[a] = Ws[(ty + kTX * a) * (kBN + 1) + j];
#pragma unroll
      for (int b = 0; b < kC; ++b) zv[b] = Zs[j * kSlice + tx + kTX * b];
#pragma unroll
      for (int a = 0; a < kR; ++a)
#pragma unroll
        for (int b = 0; b < kC; ++b) out[a][b] += wv[a] * zv[b];
    }
    __syncthreads();  // everybody is done with Ws, Zs and the column factors
  }
#pragma unroll
  for (int a = 0; a < kR; ++a) {
    if (row[a] >= n) continue;
#pragma unroll
    for (int b = 0; b < kC; ++b) {
      const int64_t c = s0 + tx + kTX * b;
      if (c < d) grad_z[row[a] * d + c] = static_cast<scalar_t>(out[a][b] * inv_temp);
    }
  }
}

template <typename acc_t>
constexpr int backward_smem() {
  return (kKC * kBM + kKC * kBN + kBM * (kBN + 1) + kBN * kSlice + kRowArgs * kBN) * int(sizeof(acc_t)) +
         kBN * int(sizeof(int64_t));
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
void check_inputs(const at::Tensor& z, const at::Tensor& labels, double inv_temp, const char* op) {
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D (N, D), got shape ", z.sizes());
  TORCH_CHECK(on_cuda_device(z), op, ": expected CUDA tensors, got z on ", z.device());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), op, ": z must be floating, got ", z.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), op, ": labels must have shape (N,) = (", z.size(0),
              ",), got ", labels.sizes());
  check_same_device(z, "z", labels, "labels", op);
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0, op, ": inv_temp must be finite and > 0, got ", inv_temp);
  TORCH_CHECK(z.size(0) < (int64_t(1) << 40), op, ": z has too many rows for the CUDA kernel: ", z.size(0));
}

void check_stats(const at::Tensor& t, const char* name, const at::Tensor& z, const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == 4 && t.size(1) == z.size(0), op, ": ", name, " must have shape (4, N) = (4, ",
              z.size(0), "), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating, got ", t.scalar_type());
  check_same_device(z, "z", t, name, op);
}

at::ScalarType acc_type(const at::Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

unsigned row_blocks(int64_t n) { return static_cast<unsigned>((n + kBM - 1) / kBM); }

at::Tensor sup_con_stats_cuda(const at::Tensor& z_in, const at::Tensor& labels_in, double inv_temp) {
  const char* op = "sslops::sup_con_stats";
  check_inputs(z_in, labels_in, inv_temp, op);
  c10::cuda::CUDAGuard guard(z_in.device());
  const auto z = z_in.detach().contiguous();
  const auto labels = labels_in.contiguous();
  const int64_t n = z.size(0), d = z.size(1);
  auto stats = new_output({4, n}, z.options().dtype(acc_type(z)));
  if (n == 0) return stats;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "sup_con_stats_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::T;
    SSLOPS_LAUNCH(sup_con_stats_kernel<scalar_t>, row_blocks(n), kThreads, 0, stream, z.data_ptr<scalar_t>(),
                  labels.data_ptr<int64_t>(), n, d, static_cast<acc_t>(inv_temp), stats.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return stats;
}

at::Tensor sup_con_stats_backward_cuda(const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& labels_in,
                                       const at::Tensor& stats_in, double inv_temp) {
  const char* op = "sslops::sup_con_stats_backward";
  check_inputs(z_in, labels_in, inv_temp, op);
  check_stats(grad_in, "grad_stats", z_in, op);
  check_stats(stats_in, "stats", z_in, op);
  c10::cuda::CUDAGuard guard(z_in.device());
  const auto z = z_in.detach().contiguous();
  const auto labels = labels_in.contiguous();
  const int64_t n = z.size(0), d = z.size(1);
  auto grad_z = new_output_like(z);
  if (n == 0 || d == 0) return grad_z;
  const auto acc = z.options().dtype(acc_type(z));
  const auto grad = grad_in.detach().to(acc).contiguous();
  const auto stats = stats_in.detach().to(acc).contiguous();
  auto rows = at::empty({kRowArgs, n}, acc);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "sup_con_stats_backward_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::T;
    const int64_t want = (n + 255) / 256;
    SSLOPS_LAUNCH(row_grads_kernel<acc_t>, static_cast<unsigned>(want < 4096 ? want : 4096), 256, 0, stream,
                  grad.data_ptr<acc_t>(), stats.data_ptr<acc_t>(), n, rows.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int smem = backward_smem<acc_t>();
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(sup_con_backward_kernel<scalar_t>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    }
    const int64_t slices = (d + kSlice - 1) / kSlice;
    TORCH_CHECK(slices <= 65535, op, ": D = ", d, " is too large for the CUDA kernel");
    const dim3 grid(row_blocks(n), static_cast<unsigned>(slices));
    SSLOPS_LAUNCH(sup_con_backward_kernel<scalar_t>, grid, kThreads, smem, stream, z.data_ptr<scalar_t>(),
                  labels.data_ptr<int64_t>(), n, d, static_cast<acc_t>(inv_temp), rows.data_ptr<acc_t>(),
                  grad_z.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_z;
}

}  // namespace
}  // namespace sslops

SSLOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("sup_con_stats", &sslops::sup_con_stats_cuda);
  m.impl("sup_con_stats_backward", &sslops::sup_con_stats_backward_cuda);
}

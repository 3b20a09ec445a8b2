// CUDA kernels of the masked-token ops (MAE / data2vec 2.0 / I-JEPA).
//
// Thin orchestration: each op is one kernel launch over output rows (a block
// of blockDim.y rows x blockDim.x lanes, grid-stride over rows), every lane
// moving 16 bytes at a time (float4-sized packs) when D, the row strides and
// the base pointers allow it, else one element.  Each input byte is read once
// and each output byte written once.  Per-row logic: csrc/common/masking.h.
//
// Index range on the GPU (no host-side check: it would synchronise): a bad
// index in gather_tokens / restore_tokens fires a device-side assert
// (CUDA_KERNEL_ASSERT, on in release builds, like torch.gather) and is never
// dereferenced: the row it names is filled with NaN instead of being read.
// The backward kernels compare indices against row numbers, so a bad index
// simply matches nothing; they never index memory with it.
//
// Backward: grad rows are gathered by a scan of the sample's index row (each
// output row sums its matches in a fixed order, in opmath), so there are no
// atomics and the result is deterministic, repeated indices included.  The
// mask token's gradient is made of partial sums over chunks of kChunk patch
// rows of a sample (extra rows of the same launch, so no thread walks a whole
// sample serially), reduced over (batch, chunk) by at::sum (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "common/masking.h"
#include "common/output.h"
#include "cuda/ptx.cuh"

namespace sslops {
namespace {

using masking::add_round;
using masking::batch_stride;
using masking::dense_rows;
using masking::index_ok;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16;  // patch rows per mask-token partial sum

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, VEC>& v) {
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = v;
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void fill_nan(scalar_t* row, int64_t D) {
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) row[d] = std::numeric_limits<scalar_t>::quiet_NaN();
}

// Launch shape: blockDim.x lanes over the D / VEC packs of a row, blockDim.y rows.
struct Shape {
  dim3 grid, block;
};

inline Shape row_shape(int64_t rows, int64_t packs) {
  int tx = static_cast<int>(std::min<int64_t>(((std::max<int64_t>(packs, 1) + 31) / 32) * 32, kThreads));
  int ty = std::max(1, kThreads / tx);
  int64_t blocks = std::min<int64_t>((rows + ty - 1) / ty, int64_t(1) << 30);
  return {dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1))), dim3(tx, ty)};
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Whether every row of every tensor can be moved in VEC-element packs.
template <typename scalar_t>
bool can_vectorize(int64_t D, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (VEC <= 1 || D % VEC != 0) return false;
  for (auto p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  for (auto s : strides)
    if (s % VEC != 0) return false;
  return true;
}

// ---------------------------------------------------------------------------
// gather_tokens
// ---------------------------------------------------------------------------
template <typename scalar_t, typename index_t, int VEC, bool HAS_POS>
__global__ void gather_kernel(const scalar_t* __restrict__ x, int64_t xsb, int64_t xsl,
                              const index_t* __restrict__ ids, int64_t isb, int64_t isk,
                              const scalar_t* __restrict__ pos, int64_t psb, int64_t psl,
                              scalar_t* __restrict__ out, int64_t rows, int64_t R, int64_t P, int64_t N,
                              int64_t D) {
  const int64_t packs = D / VEC;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t b = row / R, r = row % R;
    scalar_t* o = out + row * D;
    int64_t n = 0;
    if (r >= P) {
      n = static_cast<int64_t>(ids[b * isb + (r - P) * isk]);
      CUDA_KERNEL_ASSERT(index_ok(n, N) && "sslops::gather_tokens: ids_keep out of range");
      if (!index_ok(n, N)) {
        fill_nan<VEC>(o, D);
        continue;
      }
    }
    const int64_t src = masking::gather_source_row(r, P, n);
    const scalar_t* xr = x + b * xsb + src * xsl;
    const scalar_t* pr = HAS_POS ? pos + b * psb + src * psl : nullptr;
    for (int64_t v = threadIdx.x; v < packs; v += blockDim.x) {
      auto a = load_pack<VEC>(xr + v * VEC);
      if (HAS_POS) {
        const auto p = load_pack<VEC>(pr + v * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) a.v[i] = add_round(a.v[i], p.v[i]);
      }
      store_pack<VEC>(o + v * VEC, a);
    }
  }
}

template <typename scalar_t, typename index_t, int VEC>
void launch_gather(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& pos, int64_t P, at::Tensor& out) {
  const int64_t B = out.size(0), R = out.size(1), D = out.size(2), rows = B * R;
  const auto shape = row_shape(rows, D / VEC);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t N = x.size(1) - P;
  if (pos.defined()) {
    SSLOPS_LAUNCH((gather_kernel<scalar_t, index_t, VEC, true>), shape.grid, shape.block, 0, stream,
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), ids.data_ptr<index_t>(), ids.stride(0), ids.stride(1),
        pos.data_ptr<scalar_t>(), batch_stride(pos), pos.stride(1), out.data_ptr<scalar_t>(), rows, R, P, N, D);
  } else {
    SSLOPS_LAUNCH((gather_kernel<scalar_t, index_t, VEC, false>), shape.grid, shape.block, 0, stream,
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), ids.data_ptr<index_t>(), ids.stride(0), ids.stride(1),
        nullptr, 0, 0, out.data_ptr<scalar_t>(), rows, R, P, N, D);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void gather_dispatch(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& pos, int64_t P, at::Tensor& out) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const bool vec = can_vectorize<scalar_t>(
      x.size(2), {x.data_ptr(), pos.defined() ? pos.data_ptr() : nullptr, out.data_ptr()},
      {x.stride(0), x.stride(1), pos.defined() ? batch_stride(pos) : 0, pos.defined() ? pos.stride(1) : 0});
  if (vec) {
    launch_gather<scalar_t, index_t, VEC>(x, ids, pos, P, out);
  } else {
    launch_gather<scalar_t, index_t, 1>(x, ids, pos, P, out);
  }
}

at::Tensor gather_tokens_cuda(const at::Tensor& x_in, const at::Tensor& ids, const c10::optional<at::Tensor>& pos_in,
                              int64_t num_prefix) {
  const char* op = "sslops::gather_tokens";
  masking::check_gather(x_in, ids, pos_in, num_prefix, op);
  TORCH_CHECK(on_cuda_device(x_in), op, ": expected CUDA tensors, got x on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = dense_rows(x_in);
  const at::Tensor pos = pos_in.has_value() ? dense_rows(*pos_in) : at::Tensor();
  auto out = new_output({x.size(0), num_prefix + ids.size(1), x.size(2)}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "gather_tokens_cuda_ids", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens_cuda", [&] {
      gather_dispatch<scalar_t, index_t>(x, ids, pos, num_prefix, out);
    });
  });
  return out;
}

// grad_x[b, l] (rows = B * L): prefix rows copy grad[b, l]; patch row l sums
// grad[b, P + k] over the k with ids[b, k] == l - P, in order of k.
template <typename scalar_t, typename index_t, int VEC>
__global__ void scatter_kernel(const scalar_t* __restrict__ g, int64_t gsb, int64_t gsl,
                               const index_t* __restrict__ ids, int64_t isb, int64_t isk,
                               scalar_t* __restrict__ out, int64_t rows, int64_t L, int64_t P, int64_t K, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t packs = D / VEC;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t b = row / L, l = row % L;
    const scalar_t* gb = g + b * gsb;
    const index_t* ib = ids + b * isb;
    for (int64_t v = threadIdx.x; v < packs; v += blockDim.x) {
      acc_t acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
      if (l < P) {
        const auto a = load_pack<VEC>(gb + l * gsl + v * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = static_cast<acc_t>(a.v[i]);
      } else {
        const int64_t n = l - P;
        for (int64_t k = 0; k < K; ++k) {
          if (static_cast<int64_t>(ib[k * isk]) != n) continue;
          const auto a = load_pack<VEC>(gb + (P + k) * gsl + v * VEC);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += static_cast<acc_t>(a.v[i]);
        }
      }
      Pack<scalar_t, VEC> o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
      store_pack<VEC>(out + row * D + v * VEC, o);
    }
  }
}

template <typename scalar_t, typename index_t, int VEC>
void launch_scatter(const at::Tensor& grad, const at::Tensor& ids, int64_t P, at::Tensor& grad_x) {
  const int64_t B = grad_x.size(0), L = grad_x.size(1), D = grad_x.size(2), rows = B * L;
  const auto shape = row_shape(rows, D / VEC);
  SSLOPS_LAUNCH((scatter_kernel<scalar_t, index_t, VEC>), shape.grid, shape.block, 0,
                at::cuda::getCurrentCUDAStream(), grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), ids.data_ptr<index_t>(), ids.stride(0),
      ids.stride(1), grad_x.data_ptr<scalar_t>(), rows, L, P, ids.size(1), D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_tokens_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids, int64_t seq_len,
                                       int64_t num_prefix) {
  const char* op = "sslops::gather_tokens_backward";
  masking::check_gather_backward(grad_in, ids, seq_len, num_prefix, op);
  TORCH_CHECK(on_cuda_device(grad_in), op, ": expected CUDA tensors, got grad on ", grad_in.device());
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = dense_rows(grad_in);
  auto grad_x = new_output({grad.size(0), seq_len, grad.size(2)}, grad.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "gather_tokens_backward_cuda_ids", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_tokens_backward_cuda", [&] {
      constexpr int VEC = 16 / sizeof(scalar_t);
      if (can_vectorize<scalar_t>(grad.size(2), {grad.data_ptr(), grad_x.data_ptr()}, {grad.stride(0), grad.stride(1)}))
        launch_scatter<scalar_t, index_t, VEC>(grad, ids, num_prefix, grad_x);
      else
        launch_scatter<scalar_t, index_t, 1>(grad, ids, num_prefix, grad_x);
    });
  });
  return grad_x;
}

// ---------------------------------------------------------------------------
// restore_tokens
// ---------------------------------------------------------------------------
template <typename scalar_t, typename index_t, int VEC>
__global__ void restore_kernel(const scalar_t* __restrict__ xv, int64_t xsb, int64_t xsl,
                               const index_t* __restrict__ ids, int64_t isb, int64_t isn,
                               const scalar_t* __restrict__ mask_token, scalar_t* __restrict__ out, int64_t rows,
                               int64_t R, int64_t P, int64_t K, int64_t N, int64_t D) {
  const int64_t packs = D / VEC;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t b = row / R, r = row % R;
    scalar_t* o = out + row * D;
    int64_t j = 0;
    if (r >= P) {
      j = static_cast<int64_t>(ids[b * isb + (r - P) * isn]);
      CUDA_KERNEL_ASSERT(index_ok(j, N) && "sslops::restore_tokens: ids_restore out of range");
      if (!index_ok(j, N)) {
        fill_nan<VEC>(o, D);
        continue;
      }
    }
    const int64_t src = masking::restore_source_row(r, P, j, K);
    const scalar_t* s = src == masking::kMaskTokenRow ? mask_token : xv + b * xsb + src * xsl;
    for (int64_t v = threadIdx.x; v < packs; v += blockDim.x) store_pack<VEC>(o + v * VEC, load_pack<VEC>(s + v * VEC));
  }
}

template <typename scalar_t, typename index_t, int VEC>
void launch_restore(const at::Tensor& xv, const at::Tensor& ids, const at::Tensor& mt, int64_t P, at::Tensor& out) {
  const int64_t B = out.size(0), R = out.size(1), D = out.size(2), rows = B * R;
  const auto shape = row_shape(rows, D / VEC);
  SSLOPS_LAUNCH((restore_kernel<scalar_t, index_t, VEC>), shape.grid, shape.block, 0,
                at::cuda::getCurrentCUDAStream(), xv.data_ptr<scalar_t>(), xv.stride(0), xv.stride(1), ids.data_ptr<index_t>(), ids.stride(0), ids.stride(1),
      mt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, R, P, xv.size(1) - P, ids.size(1), D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor restore_tokens_cuda(const at::Tensor& xv_in, const at::Tensor& ids, const at::Tensor& mt_in,
                               int64_t num_prefix) {
  const char* op = "sslops::restore_tokens";
  masking::check_restore(xv_in, ids, mt_in, num_prefix, op);
  TORCH_CHECK(on_cuda_device(xv_in), op, ": expected CUDA tensors, got x_visible on ", xv_in.device());
  const c10::cuda::CUDAGuard guard(xv_in.device());
  const auto xv = dense_rows(xv_in);
  const auto mt = mt_in.contiguous();
  auto out = new_output({xv.size(0), num_prefix + ids.size(1), xv.size(2)}, xv.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "restore_tokens_cuda_ids", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xv.scalar_type(), "restore_tokens_cuda", [&] {
      constexpr int VEC = 16 / sizeof(scalar_t);
      if (can_vectorize<scalar_t>(xv.size(2), {xv.data_ptr(), mt.data_ptr(), out.data_ptr()},
                                  {xv.stride(0), xv.stride(1)}))
        launch_restore<scalar_t, index_t, VEC>(xv, ids, mt, num_prefix, out);
      else
        launch_restore<scalar_t, index_t, 1>(xv, ids, mt, num_prefix, out);
    });
  });
  return out;
}

// Rows r in [0, P + K + C) of each sample, C = ceil(N / kChunk): r < P + K is
// grad_x_visible[b, r] (prefix copy, or the sum of grad[b, P + n] over
// ids[b, n] == r - P); r = P + K + c writes partial[b, c] = the sum of
// grad[b, P + n] over n in chunk c with ids[b, n] in [K, N).
template <typename scalar_t, typename index_t, int VEC>
__global__ void restore_backward_kernel(const scalar_t* __restrict__ g, int64_t gsb, int64_t gsl,
                                        const index_t* __restrict__ ids, int64_t isb, int64_t isn,
                                        scalar_t* __restrict__ gxv, at::opmath_type<scalar_t>* __restrict__ partial,
                                        int64_t rows, int64_t P, int64_t K, int64_t N, int64_t C, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t packs = D / VEC, R1 = P + K + C;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t b = row / R1, r = row % R1;
    const bool mask_row = r >= P + K;
    const int64_t c = r - P - K;
    const int64_t n0 = mask_row ? c * kChunk : 0, n1 = mask_row ? std::min(N, n0 + kChunk) : N;
    const scalar_t* gb = g + b * gsb;
    const index_t* ib = ids + b * isb;
    for (int64_t v = threadIdx.x; v < packs; v += blockDim.x) {
      acc_t acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
      if (r < P) {
        const auto a = load_pack<VEC>(gb + r * gsl + v * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = static_cast<acc_t>(a.v[i]);
      } else {
        const int64_t k = r - P;
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t j = static_cast<int64_t>(ib[n * isn]);
          if (mask_row ? !(j >= K && j < N) : j != k) continue;
          const auto a = load_pack<VEC>(gb + (P + n) * gsl + v * VEC);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += static_cast<acc_t>(a.v[i]);
        }
      }
      if (mask_row) {
        acc_t* out = partial + (b * C + c) * D + v * VEC;
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = acc[i];
      } else {
        Pack<scalar_t, VEC> o;
#pragma unroll
        for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
        store_pack<VEC>(gxv + (b * (P + K) + r) * D + v * VEC, o);
      }
    }
  }
}

template <typename scalar_t, typename index_t, int VEC>
void launch_restore_backward(const at::Tensor& grad, const at::Tensor& ids, int64_t K, int64_t P, at::Tensor& gxv,
                             at::Tensor& partial) {
  const int64_t B = grad.size(0), D = grad.size(2), C = partial.size(1), rows = B * (P + K + C);
  const auto shape = row_shape(rows, D / VEC);
  SSLOPS_LAUNCH((restore_backward_kernel<scalar_t, index_t, VEC>), shape.grid, shape.block, 0,
                at::cuda::getCurrentCUDAStream(), grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), ids.data_ptr<index_t>(), ids.stride(0),
      ids.stride(1), gxv.data_ptr<scalar_t>(), partial.data_ptr<at::opmath_type<scalar_t>>(), rows, P, K,
      ids.size(1), C, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> restore_tokens_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids,
                                                                int64_t num_visible, int64_t num_prefix) {
  const char* op = "sslops::restore_tokens_backward";
  masking::check_restore_backward(grad_in, ids, num_visible, num_prefix, op);
  TORCH_CHECK(on_cuda_device(grad_in), op, ": expected CUDA tensors, got grad on ", grad_in.device());
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = dense_rows(grad_in);
  const int64_t B = grad.size(0), D = grad.size(2);
  auto grad_xv = new_output({B, num_prefix + num_visible, D}, grad.options());
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  const int64_t C = std::max<int64_t>(1, (ids.size(1) + kChunk - 1) / kChunk);
  auto partial = new_output({B, C, D}, grad.options().dtype(acc_type));
  if (B * D > 0) {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "restore_tokens_backward_cuda_ids", [&] {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "restore_tokens_backward_cuda",
                                      [&] {
                                        constexpr int VEC = 16 / sizeof(scalar_t);
                                        if (can_vectorize<scalar_t>(D, {grad.data_ptr(), grad_xv.data_ptr()},
                                                                    {grad.stride(0), grad.stride(1)}))
                                          launch_restore_backward<scalar_t, index_t, VEC>(grad, ids, num_visible,
                                                                                          num_prefix, grad_xv, partial);
                                        else
                                          launch_restore_backward<scalar_t, index_t, 1>(grad, ids, num_visible,
                                                                                        num_prefix, grad_xv, partial);
                                      });
    });
  }
  // Fixed-order column reduction over (batch, chunk), no atomics: deterministic.
  auto grad_mt = partial.sum(at::IntArrayRef{0, 1}).to(grad.scalar_type());
  return {grad_xv, grad_mt};
}

}  // namespace

SSLOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("gather_tokens_backward", &gather_tokens_backward_cuda);
  m.impl("restore_tokens", &restore_tokens_cuda);
  m.impl("restore_tokens_backward", &restore_tokens_backward_cuda);
}

}  // namespace sslops

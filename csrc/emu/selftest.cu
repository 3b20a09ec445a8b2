// The emulator's own test kernels (tests/test_emu.py): small kernels that
// must trip each detector, and correct ones that must pass (no false alarm)
// and compute the documented results (mma.sync / ldmatrix lane layouts, WMMA,
// shuffles, votes, cp.async).  Only built into the emulator's library.
//
//   torch.ops.sslops_emu._selftest(name, x) -> Tensor
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <string>

#include "cuda/ptx.cuh"

namespace sslops {
namespace selftest {
namespace {

namespace wmma = ::nvcuda::wmma;

// ---- barriers and shared-memory races ----
// mode 0: correct; 1: no barrier (reads a neighbour's element before it is
// written: uninitialised); 2: write-after-read race; 3: read-after-write race.
__global__ void rotate_kernel(const float* x, float* out, int mode) {
  SSLOPS_SHARED(float, s, [64]);
  const int t = threadIdx.x;
  s[t] = x[t];
  if (mode != 1) __syncthreads();
  if (mode == 3) s[t] = 3.0f * x[t];  // thread t - 1 wrote s[t - 1] in this interval too
  const float v = s[mode == 3 ? (t + 63) % 64 : (t + 1) % 64];
  if (mode == 2) s[t] = 2.0f * v;  // thread t - 1 read s[t] in this interval
  out[t] = v;
}

__global__ void divergent_barrier_kernel(float* out) {
  const int t = threadIdx.x;
  if (t < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[t] = 1.0f;
}

__global__ void exit_before_barrier_kernel(float* out) {
  const int t = threadIdx.x;
  if (t >= 48) return;
  __syncthreads();
  out[t] = 1.0f;
}

__global__ void count_kernel(float* out) {
  const int t = threadIdx.x;
  const int c = __syncthreads_count(t % 3 == 0);
  const int a = __syncthreads_and(t < 1000);
  const int o = __syncthreads_or(t == 5);
  if (t == 0) {
    out[0] = static_cast<float>(c);
    out[1] = static_cast<float>(a);
    out[2] = static_cast<float>(o);
  }
}

// ---- warp shuffles and votes ----
// mode 0: full-warp reduction and butterfly (correct); 1: mask without the
// caller's lane; 2: full mask in a partial warp; 3: a lane of the mask exited;
// 4: a lane reads a lane outside the mask; 5: lanes disagree on the mask.
__global__ void shfl_kernel(const float* x, float* out, int mode) {
  const int t = threadIdx.x, lane = t % 32;
  float v = x[t];
  if (mode == 0) {
    float s = v;
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    float m = v;
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    const float up = __shfl_up_sync(0xffffffffu, v, 3);
    const float idx = __shfl_sync(0xffffffffu, v, 7, 16);  // lane 7 of each 16-lane segment
    const unsigned ballot = __ballot_sync(0xffffffffu, v > 0.0f);
    const int any = __any_sync(0xffffffffu, lane == 9);
    const int all = __all_sync(0xffffffffu, lane < 40);
    out[6 * t + 0] = s;
    out[6 * t + 1] = m;
    out[6 * t + 2] = up;
    out[6 * t + 3] = idx;
    out[6 * t + 4] = static_cast<float>(ballot & 0xffffu) + 65536.0f * static_cast<float>(ballot >> 16);
    out[6 * t + 5] = static_cast<float>(any + 2 * all);
    return;
  }
  if (mode == 1) v = __shfl_down_sync(0xffff0000u, v, 1);  // lane 0 is not in it
  if (mode == 2) v = __shfl_down_sync(0xffffffffu, v, 1);
  if (mode == 3) {
    if (lane == 31) return;
    v = __shfl_down_sync(0xffffffffu, v, 1);
  }
  if (mode == 4 && lane < 16) v = __shfl_down_sync(0x0000ffffu, v, 1);  // lane 15 reads lane 16
  if (mode == 5) v = __shfl_down_sync(lane < 16 ? 0xffffffffu : 0xffff0000u, v, 1);
  out[t] = v;
}

// Warp-synchronous shared memory: each lane writes its element, then reads
// the previous lane's (mode 0 with __syncwarp in between: ordered; mode 1
// without: a race; mode 2: ordered by a shuffle instead).
__global__ void warp_sync_kernel(const float* x, float* out, int mode) {
  SSLOPS_SHARED(float, s, [32]);
  const int t = threadIdx.x;
  s[t] = 0.0f;
  __syncthreads();
  s[t] = x[t];
  float u = 0.0f;
  if (mode == 0) __syncwarp();
  if (mode == 2) u = __shfl_xor_sync(0xffffffffu, x[t], 1);
  out[t] = s[(t + 31) % 32] + 0.0f * u;
}

// Lane 0 waits in a shuffle for lane 1, which waits at __syncthreads.
__global__ void deadlock_kernel(float* out) {
  const int t = threadIdx.x;
  float v = 1.0f;
  if (t == 0) v = __shfl_sync(0x3u, v, 1);
  if (t == 1) __syncthreads();
  out[t] = v;
}

// ---- bounds, poison, local memory ----
__global__ void static_oob_kernel(float* out) {
  SSLOPS_SHARED(float, s, [64]);
  const int t = threadIdx.x;
  s[t + 1] = 1.0f;  // thread 63 writes s[64]
  out[t] = 0.0f;
}

__global__ void dynamic_oob_kernel(float* out, int read_at) {
  SSLOPS_DYNAMIC_SHARED(float, dyn, 16);
  const int t = threadIdx.x;
  dyn[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = dyn[read_at + t];
}

__global__ void uninit_kernel(float* out) {
  SSLOPS_SHARED(float, s, [64]);
  const int t = threadIdx.x;
  if (t < 63) s[t] = 1.0f;
  __syncthreads();
  out[t] = s[63 - t];  // thread 0 reads s[63], never written
}

__global__ void global_oob_kernel(const float* x, float* out, int n) {
  const int t = threadIdx.x;
  if (t < n) out[t + 1] = x[t];  // thread n - 1 writes out[n]
}

__global__ void other_stack_kernel(float* out) {
  SSLOPS_SHARED(float*, ptrs, [32]);
  const int t = threadIdx.x;
  float local = static_cast<float>(t);
  ptrs[t] = &local;
  __syncthreads();
  if (t == 0) *ptrs[1] = 5.0f;  // thread 1's local variable
  __syncthreads();
  out[t] = local;
}

__global__ void assert_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  CUDA_KERNEL_ASSERT(x[t] >= 0.0f && "selftest: negative input");
  out[t] = x[t];
}

// ---- cp.async ----
// mode 0: wait_all (correct); 1: no wait (the data is used before it lands);
// 2: two groups, wait_group<1>, read the first (correct); 3: same, read the second;
// 4: the threads exit without waiting.
__global__ void cp_async_kernel(const float* x, float* out, int mode) {
  SSLOPS_SHARED(float, s, [2 * 128]);
  const int t = threadIdx.x;  // 32 threads, 16 bytes each per group
  ptx::cp_async_cg16(&s[4 * t], x + 4 * t);
  ptx::cp_async_commit();
  ptx::cp_async_cg16(&s[128 + 4 * t], x + 128 + 4 * t);
  ptx::cp_async_commit();
  if (mode == 4) return;
  if (mode == 0) ptx::cp_async_wait_all();
  if (mode >= 2) ptx::cp_async_wait_group<1>();
  __syncthreads();
  const int base = mode == 3 ? 128 : 0;
  for (int i = 0; i < 4; ++i) out[4 * t + i] = s[base + 4 * ((t + 1) % 32) + i];
  if (mode >= 2) ptx::cp_async_wait_all();
}

__global__ void cp_async_zfill_kernel(const float* x, float* out) {
  SSLOPS_SHARED(float, s, [128]);
  SSLOPS_SHARED(float, s2, [32]);
  const int t = threadIdx.x;
  ptx::cp_async_cg16_zfill(&s[4 * t], x + 4 * t, t % 2 == 0 ? 16 : 8);  // odd threads: 2 floats, 2 zeros
  ptx::cp_async_ca<4>(&s2[t], x + 200 + t);
  ptx::cp_async_wait_all();
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[4 * t + i] = s[4 * ((t + 1) % 32) + i];
  out[128 + t] = s2[(t + 1) % 32];
}

// ---- mma.sync m16n8k16 with explicit fragment loads (the PTX ISA layout) ----
// x: A (16 x 16, row-major), then B (16 x 8, row-major, K x N), then C (16 x 8).
// mode 0: the documented layout; 1: a wrong lane mapping (rows of A swapped
// between the two halves); 2: A and B through ldmatrix (x4, x2.trans).
template <bool kBF16>
__global__ void mma_kernel(const float* x, float* out, int mode) {
  using T = typename std::conditional<kBF16, __nv_bfloat16, __half>::type;
  SSLOPS_SHARED(T, As, [16 * 16]);
  SSLOPS_SHARED(T, Bs, [16 * 8]);
  const float* A = x;
  const float* B = x + 256;
  const float* C = x + 256 + 128;
  const int lane = threadIdx.x, g = lane >> 2, tq = lane & 3;
  auto pack = [](float lo, float hi) {
    const T l(lo), h(hi);
    uint16_t lb, hb;
    std::memcpy(&lb, &l, 2);
    std::memcpy(&hb, &h, 2);
    return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
  };
  uint32_t a[4], b[2];
  if (mode < 2) {
    for (int r = 0; r < 4; ++r) {
      int row = g + 8 * (r & 1);
      if (mode == 1) row = (row + 8) % 16;
      const int col = tq * 2 + 8 * (r >> 1);
      a[r] = pack(A[row * 16 + col], A[row * 16 + col + 1]);
    }
    for (int r = 0; r < 2; ++r) {
      const int k = tq * 2 + 8 * r;
      b[r] = pack(B[k * 8 + g], B[(k + 1) * 8 + g]);
    }
  } else {
    for (int i = lane; i < 256; i += 32) As[i] = T(A[i]);
    for (int i = lane; i < 128; i += 32) Bs[i] = T(B[i]);
    __syncwarp();
    // A: lanes 0-15 rows 0-15 at column 0, lanes 16-31 the same rows at column 8.
    ptx::ldmatrix_x4(a[0], a[1], a[2], a[3], &As[(lane % 16) * 16 + 8 * (lane / 16)]);
    // B (K x N row-major): lanes 0-15 give rows k = 0..15; .trans yields the col-major fragment.
    ptx::ldmatrix_x2_trans(b[0], b[1], &Bs[(lane % 16) * 8]);
  }
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i >> 1)) * 8 + tq * 2 + (i & 1)];
  if (kBF16) {
    ptx::mma_m16n8k16_bf16(d, a, b, c);
  } else {
    ptx::mma_m16n8k16_f16(d, a, b, c);
  }
  for (int i = 0; i < 4; ++i) out[(g + 8 * (i >> 1)) * 8 + tq * 2 + (i & 1)] = d[i];
}

// ldmatrix alone: every lane's registers, to compare with the documented layout.
// x: a 32 x 8 matrix (4 stacked 8 x 8), values exact in half.
__global__ void ldmatrix_kernel(const float* x, float* out, int trans) {
  SSLOPS_SHARED(__half, m, [32 * 8]);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) m[i] = __half(x[i]);
  __syncwarp();
  uint32_t r[4];
  if (trans) {
    ptx::ldmatrix_x4_trans(r[0], r[1], r[2], r[3], &m[lane * 8]);
  } else {
    ptx::ldmatrix_x4(r[0], r[1], r[2], r[3], &m[lane * 8]);
  }
  for (int j = 0; j < 4; ++j) {
    out[(lane * 4 + j) * 2 + 0] = __half2float(__ushort_as_half(static_cast<unsigned short>(r[j] & 0xffffu)));
    out[(lane * 4 + j) * 2 + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(r[j] >> 16)));
  }
}

// ---- WMMA 16x16x16 ----
// x: A (16 x 16 row-major) then B (16 x 16 row-major) then C (16 x 16).
// mode 0: A row-major, B row-major; 1: B read as col-major from its transpose;
// 2: misaligned pointer.
__global__ void wmma_kernel(const float* x, float* out, int mode) {
  SSLOPS_SHARED(__half, As, [256]);
  SSLOPS_SHARED(__half, Bs, [256 + 16]);
  SSLOPS_SHARED(float, Cs, [256]);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) {
    As[i] = __float2half_rn(x[i]);
    const int k = i / 16, n = i % 16;
    Bs[i] = __float2half_rn(mode == 1 ? x[256 + n * 16 + k] : x[256 + i]);  // mode 1: B^T stored row-major
    Cs[i] = x[512 + i];
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, As, 16);
  wmma::load_matrix_sync(fc, Cs, 16, wmma::mem_row_major);
  if (mode == 1) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
    wmma::load_matrix_sync(fb, Bs, 16);
    wmma::mma_sync(fc, fa, fb, fc);
  } else {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
    wmma::load_matrix_sync(fb, mode == 2 ? Bs + 8 : Bs, 16);
    wmma::mma_sync(fc, fa, fb, fc);
  }
  wmma::store_matrix_sync(out, fc, 16, wmma::mem_row_major);
}

// Atomics on shared and global memory (performed for real, bounds-checked).
__global__ void atomics_kernel(float* out) {
  SSLOPS_SHARED(int, count, [2]);
  const int t = threadIdx.x;
  if (t == 0) {
    count[0] = count[1] = 0;
    out[0] = 0.0f;
  }
  __syncthreads();
  atomicAdd(&count[0], 1);
  atomicMax(&count[1], t);
  atomicAdd(&out[0], 0.5f);
  __syncthreads();
  if (t == 0) {
    out[1] = static_cast<float>(count[0]);
    out[2] = static_cast<float>(count[1]);
  }
}

// float -> half / bfloat16 -> float, round to nearest even (out: 2 per input).
__global__ void convert_kernel(const float* x, float* out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    out[2 * i] = __half2float(__float2half_rn(x[i]));
    out[2 * i + 1] = __bfloat162float(__float2bfloat16_rn(x[i]));
  }
}

__global__ void big_smem_kernel(float* out) {
  SSLOPS_DYNAMIC_SHARED(float, dyn, 16);
  const int t = threadIdx.x;
  dyn[t] = 1.0f;
  __syncthreads();
  out[t] = dyn[(t + 1) % blockDim.x];
}

at::Tensor run(c10::string_view name_view, const at::Tensor& x_in) {
  const std::string name(name_view);
  const at::Tensor x = x_in.contiguous().to(at::kFloat);
  const float* xp = x.data_ptr<float>();
  auto stream = at::cuda::getCurrentCUDAStream();
  auto out = at::empty({x.numel() > 0 ? std::max<int64_t>(x.numel(), 64) : 64}, x.options());
  float* o = out.data_ptr<float>();
  auto mode_of = [&](const char* base) { return std::stoi(name.substr(std::string(base).size())); };
  if (name.rfind("rotate", 0) == 0) {
    SSLOPS_LAUNCH(rotate_kernel, 1, 64, 0, stream, xp, o, mode_of("rotate"));
  } else if (name == "divergent_barrier") {
    SSLOPS_LAUNCH(divergent_barrier_kernel, 1, 64, 0, stream, o);
  } else if (name == "exit_before_barrier") {
    SSLOPS_LAUNCH(exit_before_barrier_kernel, 1, 64, 0, stream, o);
  } else if (name == "count") {
    SSLOPS_LAUNCH(count_kernel, 1, 64, 0, stream, o);
  } else if (name.rfind("shfl", 0) == 0) {
    const int mode = mode_of("shfl");
    out = at::empty({6 * 64}, x.options());
    SSLOPS_LAUNCH(shfl_kernel, 1, mode == 2 ? 48 : 64, 0, stream, xp, out.data_ptr<float>(), mode);
  } else if (name.rfind("warp_sync", 0) == 0) {
    SSLOPS_LAUNCH(warp_sync_kernel, 1, 32, 0, stream, xp, o, mode_of("warp_sync"));
  } else if (name == "deadlock") {
    SSLOPS_LAUNCH(deadlock_kernel, 1, 32, 0, stream, o);
  } else if (name == "static_oob") {
    SSLOPS_LAUNCH(static_oob_kernel, 1, 64, 0, stream, o);
  } else if (name.rfind("dynamic_oob", 0) == 0) {
    SSLOPS_LAUNCH(dynamic_oob_kernel, 1, 32, 32 * sizeof(float), stream, o, mode_of("dynamic_oob"));
  } else if (name == "uninit") {
    SSLOPS_LAUNCH(uninit_kernel, 1, 64, 0, stream, o);
  } else if (name.rfind("global_oob", 0) == 0) {
    out = at::empty({x.numel()}, x.options());
    SSLOPS_LAUNCH(global_oob_kernel, 1, 64, 0, stream, xp, out.data_ptr<float>(),
                  static_cast<int>(x.numel()) - mode_of("global_oob"));
  } else if (name == "other_stack") {
    SSLOPS_LAUNCH(other_stack_kernel, 1, 32, 0, stream, o);
  } else if (name == "assert") {
    SSLOPS_LAUNCH(assert_kernel, 1, 32, 0, stream, xp, o);
  } else if (name.rfind("cp_async", 0) == 0 && name != "cp_async_zfill") {
    out = at::empty({128}, x.options());
    SSLOPS_LAUNCH(cp_async_kernel, 1, 32, 0, stream, xp, out.data_ptr<float>(), mode_of("cp_async"));
  } else if (name == "cp_async_zfill") {
    out = at::empty({160}, x.options());
    SSLOPS_LAUNCH(cp_async_zfill_kernel, 1, 32, 0, stream, xp, out.data_ptr<float>());
  } else if (name.rfind("mma_f16_", 0) == 0 || name.rfind("mma_bf16_", 0) == 0) {
    const bool bf = name.rfind("mma_bf16_", 0) == 0;
    out = at::empty({16 * 8}, x.options());
    const int mode = mode_of(bf ? "mma_bf16_" : "mma_f16_");
    if (bf) {
      SSLOPS_LAUNCH(mma_kernel<true>, 1, 32, 0, stream, xp, out.data_ptr<float>(), mode);
    } else {
      SSLOPS_LAUNCH(mma_kernel<false>, 1, 32, 0, stream, xp, out.data_ptr<float>(), mode);
    }
  } else if (name.rfind("ldmatrix", 0) == 0) {
    out = at::empty({32 * 4 * 2}, x.options());
    SSLOPS_LAUNCH(ldmatrix_kernel, 1, 32, 0, stream, xp, out.data_ptr<float>(), mode_of("ldmatrix"));
  } else if (name.rfind("wmma", 0) == 0) {
    out = at::empty({256}, x.options());
    SSLOPS_LAUNCH(wmma_kernel, 1, 32, 0, stream, xp, out.data_ptr<float>(), mode_of("wmma"));
  } else if (name == "atomics") {
    out = at::zeros({3}, x.options());
    SSLOPS_LAUNCH(atomics_kernel, 1, 64, 0, stream, out.data_ptr<float>());
  } else if (name == "convert") {
    out = at::empty({2 * x.numel()}, x.options());
    SSLOPS_LAUNCH(convert_kernel, 3, 64, 0, stream, xp, out.data_ptr<float>(), static_cast<int>(x.numel()));
  } else if (name.rfind("big_smem", 0) == 0) {
    // big_smem<bytes>[_attr]: a launch with that much dynamic shared memory,
    // with or without raising the kernel's limit first.
    const bool attr = name.size() > 5 && name.substr(name.size() - 5) == "_attr";
    const int bytes = std::stoi(name.substr(8));
    if (attr) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    }
    SSLOPS_LAUNCH(big_smem_kernel, 1, 64, bytes, stream, o);
  } else {
    TORCH_CHECK(false, "sslops_emu::_selftest: unknown test ", name);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace selftest
}  // namespace sslops

TORCH_LIBRARY_FRAGMENT(sslops_emu, m) { m.def("_selftest(str name, Tensor x) -> Tensor"); }

SSLOPS_CUDA_LIBRARY_IMPL(m) { m.impl("_selftest", &sslops::selftest::run); }

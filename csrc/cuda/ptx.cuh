// What every csrc/cuda/*.cu includes instead of writing raw CUDA constructs
// that the host compiler cannot see: kernel launches, shared-memory
// declarations, op registration, the device check, and thin wrappers for the
// inline PTX the kernels use.  Under nvcc each macro/wrapper is the plain CUDA
// construct (`<<<...>>>`, `__shared__`, `asm volatile`); under the CPU
// emulator (csrc/emu, -DSSLOPS_EMU=1, compiled by g++) it is the emulator's
// implementation, so the same source runs in CI without a GPU.
//
//   SSLOPS_LAUNCH(kernel, grid, block, smem, stream, args...)
//       kernel<<<grid, block, smem, stream>>>(args...).  A template kernel
//       whose name has commas is parenthesised: SSLOPS_LAUNCH((k<T, true>), ...).
//   SSLOPS_SHARED(type, name, dims)     __shared__ type name dims;
//       e.g. SSLOPS_SHARED(float, sums, [kThreads / 32]); (dims may be empty)
//   SSLOPS_DYNAMIC_SHARED(type, name, align)
//       extern __shared__ __align__(align) type name[];
//   SSLOPS_CUDA_LIBRARY_IMPL(m) { m.impl(...); }
//       TORCH_LIBRARY_IMPL(sslops, CUDA, m) (emulator: sslops_emu on CPU tensors)
//   sslops::on_cuda_device(t)
//       t.is_cuda() (emulator: the emulated GPU holds CPU tensors)
//
// PTX wrappers (sslops::ptx), sm_80+ (older GPUs get plain copies or a trap):
//   cp_async_cg16(smem, gmem)              cp.async.cg.shared.global 16 B
//   cp_async_cg16_zfill(smem, gmem, n)     same, bytes [n, 16) zero-filled
//   cp_async_ca<N>(smem, gmem)             cp.async.ca.shared.global N = 4, 8, 16 B
//   cp_async_commit()                      cp.async.commit_group
//   cp_async_wait_group<N>()               cp.async.wait_group N
//   cp_async_wait_all()                    cp.async.wait_all
//     (the copy is only guaranteed to have landed after the wait, and other
//      threads see it only after a barrier that follows the wait)
//   ldmatrix_x{1,2,4}[_trans](r..., smem)  ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16
//     (lane l gives the address of row l % 8 of matrix l / 8)
//   mma_m16n8k16_f16 / _bf16(d, a, b, c)  mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.f32
//     (d, c: float[4]; a: uint32_t[4]; b: uint32_t[2]; fragment layouts of the PTX ISA)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/library.h"

#if defined(SSLOPS_EMU)
#include "emu/emu.h"
#endif

#if defined(SSLOPS_EMU)
#define SSLOPS_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::sslops::emu::launch(kernel, #kernel, __PRETTY_FUNCTION__, grid, block, smem, stream, ##__VA_ARGS__)
#define SSLOPS_SHARED(type, name, ...) SSLOPS_EMU_SHARED(type, name, __VA_ARGS__)
#define SSLOPS_DYNAMIC_SHARED(type, name, align) SSLOPS_EMU_DYNAMIC_SHARED(type, name, align)
#define SSLOPS_CUDA_LIBRARY_IMPL(m) SSLOPS_EMU_LIBRARY_IMPL(m)
#else
#define SSLOPS_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define SSLOPS_SHARED(type, name, ...) __shared__ type name __VA_ARGS__
#define SSLOPS_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
#define SSLOPS_CUDA_LIBRARY_IMPL(m) SSLOPS_LIBRARY_IMPL(CUDA, m)
#endif

namespace sslops {

// Whether t is on the device the CUDA kernels run on.
inline bool on_cuda_device(const at::Tensor& t) {
#if defined(SSLOPS_EMU)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

namespace ptx {

#if defined(SSLOPS_EMU)
namespace emu = ::sslops::emu;

// ---- cp.async ----
inline void cp_async_cg16(void* smem, const void* gmem) { emu::cp_async(smem, gmem, 16, 16, true); }
inline void cp_async_cg16_zfill(void* smem, const void* gmem, int src_bytes) {
  emu::cp_async(smem, gmem, 16, src_bytes, true);
}
template <int N>
inline void cp_async_ca(void* smem, const void* gmem) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async.ca copies 4, 8 or 16 bytes");
  emu::cp_async(smem, gmem, N, N, false);
}
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait_group() {
  static_assert(N >= 0, "cp.async.wait_group N >= 0");
  emu::cp_async_wait(N);
}
inline void cp_async_wait_all() { emu::cp_async_wait(-1); }

// ---- ldmatrix ----
inline void ldmatrix_x1(uint32_t& r0, const void* smem) {
  uint32_t r[1];
  emu::ldmatrix(1, false, r, smem);
  r0 = r[0];
}
inline void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* smem) {
  uint32_t r[2];
  emu::ldmatrix(2, false, r, smem);
  r0 = r[0], r1 = r[1];
}
inline void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* smem) {
  uint32_t r[4];
  emu::ldmatrix(4, false, r, smem);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
inline void ldmatrix_x1_trans(uint32_t& r0, const void* smem) {
  uint32_t r[1];
  emu::ldmatrix(1, true, r, smem);
  r0 = r[0];
}
inline void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* smem) {
  uint32_t r[2];
  emu::ldmatrix(2, true, r, smem);
  r0 = r[0], r1 = r[1];
}
inline void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* smem) {
  uint32_t r[4];
  emu::ldmatrix(4, true, r, smem);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

// ---- mma.sync ----
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma_m16n8k16(emu::MmaType::kF16, d, a, b, c);
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma_m16n8k16(emu::MmaType::kBF16, d, a, b, c);
}

#else  // nvcc

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// ---- cp.async ----
__device__ __forceinline__ void cp_async_cg16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_cg16_zfill(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
#else
  unsigned char* d = static_cast<unsigned char*>(smem);
  const unsigned char* s = static_cast<const unsigned char*>(gmem);
  for (int i = 0; i < 16; ++i) d[i] = i < src_bytes ? s[i] : 0;
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "n"(N) : "memory");
#else
  unsigned char* d = static_cast<unsigned char*>(smem);
  const unsigned char* s = static_cast<const unsigned char*>(gmem);
  for (int i = 0; i < N; ++i) d[i] = s[i];
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  static_assert(N >= 0, "cp.async.wait_group N >= 0");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// ---- ldmatrix (sm_75+) ----
__device__ __forceinline__ void ldmatrix_x1(uint32_t& r0, const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r0) : "r"(smem_addr(smem)));
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_addr(smem)));
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(smem)));
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t& r0, const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r0) : "r"(smem_addr(smem)));
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_addr(smem)));
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                  const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(smem)));
#else
  __trap();
#endif
}

// ---- mma.sync (sm_80+) ----
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  __trap();
#endif
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  __trap();
#endif
}

#endif  // SSLOPS_EMU

}  // namespace ptx
}  // namespace sslops

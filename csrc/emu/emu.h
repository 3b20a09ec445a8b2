// The CPU emulator of the CUDA execution model: what an emulated translation
// unit (csrc/cuda/*.cu compiled by g++ -x c++ -DSSLOPS_EMU=1) sees instead of
// nvcc's built-ins.  See csrc/emu/README.md for the design.
//
// Included by every shim header of csrc/emu/include (cuda_runtime.h,
// cuda_fp16.h, mma.h, ATen/cuda/CUDAContext.h, ...) and by csrc/cuda/ptx.cuh.
// The functions declared here are implemented in csrc/emu/runtime.cpp, which
// is compiled without instrumentation; the kernels' own translation units are
// compiled with -fsanitize=thread so that every memory access they make is
// reported to the runtime (shared-memory checks, global bounds checks).
#pragma once

#if !defined(SSLOPS_EMU)
#error "csrc/emu/emu.h is the CUDA emulator; it is only used with -DSSLOPS_EMU=1"
#endif

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/library.h"

// ---------------------------------------------------------------------------
// Keywords
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __grid_constant__
// Shared memory is declared with SSLOPS_SHARED / SSLOPS_DYNAMIC_SHARED
// (csrc/cuda/ptx.cuh) so that the emulator gives every block its own copy.
#define __shared__ \
  _Pragma("GCC error \"__shared__: declare shared memory with SSLOPS_SHARED(type, name, dims) or SSLOPS_DYNAMIC_SHARED(type, name, align) from cuda/ptx.cuh\"")

// ---------------------------------------------------------------------------
// Vector types and dim3
// ---------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define SSLOPS_EMU_VEC2(T, name, align)                        \
  struct __attribute__((aligned(align))) name {                \
    T x, y;                                                    \
  };                                                           \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define SSLOPS_EMU_VEC4(T, name, align)                        \
  struct __attribute__((aligned(align))) name {                \
    T x, y, z, w;                                              \
  };                                                           \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
SSLOPS_EMU_VEC2(int, int2, 8)
SSLOPS_EMU_VEC2(unsigned, uint2, 8)
SSLOPS_EMU_VEC2(float, float2, 8)
SSLOPS_EMU_VEC2(double, double2, 16)
SSLOPS_EMU_VEC2(long long, longlong2, 16)
SSLOPS_EMU_VEC4(int, int4, 16)
SSLOPS_EMU_VEC4(unsigned, uint4, 16)
SSLOPS_EMU_VEC4(float, float4, 16)
SSLOPS_EMU_VEC4(unsigned char, uchar4, 4)
SSLOPS_EMU_VEC4(char, char4, 4)
#undef SSLOPS_EMU_VEC2
#undef SSLOPS_EMU_VEC4
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

// ---------------------------------------------------------------------------
// Host runtime API subset (cuda_runtime.h)
// ---------------------------------------------------------------------------
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
  cudaErrorNotSupported = 801,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

// The fields the kernels' host code may read (names as in the CUDA runtime).
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;         // 48 KB without opt-in
  int regsPerBlock;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int clockRate;
  int major, minor;
  int multiProcessorCount;
  int l2CacheSize;
  int maxThreadsPerMultiProcessor;
  size_t sharedMemPerMultiprocessor;
  int regsPerMultiprocessor;
  size_t sharedMemPerBlockOptin;    // opt-in maximum per block (cudaFuncSetAttribute)
  size_t reservedSharedMemPerBlock; // reserved by the system per resident block
  int maxBlocksPerMultiProcessor;
};

namespace sslops {
namespace emu {

// ---------------------------------------------------------------------------
// Runtime (csrc/emu/runtime.cpp)
// ---------------------------------------------------------------------------
// Built-in variables (per emulated thread).
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

// Barriers.  kind: 0 plain, 1 count, 2 and, 3 or.
int syncthreads(const char* file, int line, int kind = 0, int pred = 0);
void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu);

// Warp shuffles and votes (values as raw bits, at most 8 bytes).
enum ShflMode : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
uint64_t shfl(const char* file, int line, int mode, unsigned mask, uint64_t bits, int arg, int width);
enum VoteKind : int { kBallot = 0, kAny = 1, kAll = 2, kUni = 3, kReduceAdd = 4, kReduceMin = 5, kReduceMax = 6,
                      kReduceAnd = 7, kReduceOr = 8, kReduceXor = 9 };
uint64_t vote(const char* file, int line, int kind, unsigned mask, uint64_t value, bool is_signed);
unsigned active_mask();

[[noreturn]] void trap(const char* what, const char* file, int line);
void device_assert(const char* cond, const char* file, int line, const char* func);

// Shared memory of the current block.
void* static_shared(const void* tag, size_t size, size_t align, const char* name);
void* dynamic_shared(size_t align, const char* name);

// cp.async (the copy lands at the matching wait).
void cp_async(void* smem, const void* gmem, int bytes, int src_bytes, bool cg);
void cp_async_commit();
void cp_async_wait(int n);  // wait_group n; -1: wait_all

// ldmatrix.m8n8.x{1,2,4}[.trans].b16 and mma.sync.m16n8k16.row.col.f32.{f16,bf16}.
void ldmatrix(int count, bool trans, uint32_t* regs, const void* smem);
enum class MmaType : int { kF16 = 0, kBF16 = 1 };
void mma_m16n8k16(MmaType type, float* d, const uint32_t* a, const uint32_t* b, const float* c);

// WMMA fragments (nvcuda::wmma in csrc/emu/include/mma.h).
enum class FragUse : int { kA = 0, kB = 1, kAcc = 2 };
enum class ElemType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };
struct FragDesc {
  void* x;           // this lane's elements
  FragUse use;
  ElemType type;
  int num_elements;  // per lane (16 for f16 A/B: duplicated, as on the hardware)
};
void wmma_load(const FragDesc& f, const void* ptr, unsigned ldm, bool col_major);
void wmma_store(void* ptr, const FragDesc& f, unsigned ldm, bool col_major);
void wmma_mma(const FragDesc& d, const FragDesc& a, const FragDesc& b, const FragDesc& c);

// Launches.
struct LaunchDesc {
  const char* kernel;      // the kernel expression as written
  const char* where;       // the launching host function
  const void* fn;          // kernel function (attribute look-ups)
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const void* frame;       // kernel + arguments
  size_t frame_size;
  void (*invoke)(const void* frame);
};
void launch_impl(const LaunchDesc& d);

// Host API.
cudaError_t func_set_attribute(const void* fn, int attr, int value);
cudaError_t occupancy(int* blocks, const void* fn, int block_size, size_t smem);
cudaError_t get_last_error(bool clear);
const char* error_string(cudaError_t e);
const cudaDeviceProp& device_properties();
void check_device(c10::Device d, const char* what);

// Device memory of the current op: the storages of its tensor arguments and
// every CPU allocation made while it runs (global accesses of a kernel must
// stay inside these).
class OpScope {
 public:
  OpScope();
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;
  void add(const at::Tensor& t);
  void add(const c10::optional<at::Tensor>& t) {
    if (t.has_value()) add(*t);
  }
  void add(at::ArrayRef<at::Tensor> ts) {
    for (const auto& t : ts) add(t);
  }
  template <class T>
  void add(const T&) {}
};

// ---------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------
template <class... P>
struct Frame {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> args;
};

template <class... P>
void invoke_frame(const void* f) {
  const auto* fr = static_cast<const Frame<P...>*>(f);
  std::apply(fr->kernel, fr->args);
}

template <class... P, class... A>
void launch(void (*kernel)(P...), const char* name, const char* where, dim3 grid, dim3 block, size_t smem,
            cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "SSLOPS_LAUNCH: wrong number of kernel arguments");
  const Frame<P...> frame{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  launch_impl(LaunchDesc{name, where, reinterpret_cast<const void*>(kernel), grid, block, smem, stream, &frame,
                         sizeof(frame), &invoke_frame<P...>});
}

// ---------------------------------------------------------------------------
// Op registration: the emulated kernels register on CPU tensors in the
// sslops_emu namespace, each call inside an OpScope.
// ---------------------------------------------------------------------------
class Library {
 public:
  explicit Library(torch::Library& lib) : lib_(lib) {}
  template <class R, class... A>
  Library& impl(const char* name, R (*f)(A...)) {
    lib_.impl(name, [f](A... a) -> R {
      OpScope scope;
      (scope.add(a), ...);
      return f(std::forward<A>(a)...);
    });
    return *this;
  }
 private:
  torch::Library& lib_;
};

// Bit casts for shuffles.
template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle/vote values are at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <class T>
inline T shfl_t(const char* file, int line, int mode, unsigned mask, T var, int arg, int width = 32) {
  return from_bits<T>(shfl(file, line, mode, mask, to_bits(var), arg, width));
}

template <class T>
inline T reduce_t(const char* file, int line, int kind, unsigned mask, T value) {
  static_assert(std::is_integral<T>::value && sizeof(T) == 4, "__reduce_*_sync take int or unsigned");
  return static_cast<T>(vote(file, line, kind, mask, static_cast<uint64_t>(static_cast<int64_t>(value)),
                             std::is_signed<T>::value));
}

}  // namespace emu
}  // namespace sslops

#define SSLOPS_EMU_SHARED(type, name, ...)                                                                \
  using sslops_emu_shared_t_##name = type __VA_ARGS__;                                                    \
  static const char sslops_emu_shared_tag_##name = 0;                                                     \
  sslops_emu_shared_t_##name& name = *static_cast<sslops_emu_shared_t_##name*>(::sslops::emu::static_shared( \
      &sslops_emu_shared_tag_##name, sizeof(sslops_emu_shared_t_##name), alignof(sslops_emu_shared_t_##name), #name))
#define SSLOPS_EMU_DYNAMIC_SHARED(type, name, align) \
  type* const name = static_cast<type*>(::sslops::emu::dynamic_shared((align), #name))

#define SSLOPS_EMU_LIBRARY_IMPL(m) SSLOPS_EMU_LIBRARY_IMPL_(m, C10_UID)
#define SSLOPS_EMU_LIBRARY_IMPL_(m, uid) SSLOPS_EMU_LIBRARY_IMPL__(m, uid)
#define SSLOPS_EMU_LIBRARY_IMPL__(m, uid)                                               \
  static void C10_CONCATENATE(sslops_emu_impl_, uid)(::sslops::emu::Library&);          \
  SSLOPS_LIBRARY_IMPL(CPU, C10_CONCATENATE(sslops_emu_lib_, uid)) {                     \
    ::sslops::emu::Library wrapped(C10_CONCATENATE(sslops_emu_lib_, uid));              \
    C10_CONCATENATE(sslops_emu_impl_, uid)(wrapped);                                    \
  }                                                                                     \
  static void C10_CONCATENATE(sslops_emu_impl_, uid)(::sslops::emu::Library & m)

// ---------------------------------------------------------------------------
// Device built-ins
// ---------------------------------------------------------------------------
#define threadIdx (::sslops::emu::thread_idx())
#define blockIdx (::sslops::emu::block_idx())
#define blockDim (::sslops::emu::block_dim())
#define gridDim (::sslops::emu::grid_dim())
constexpr int warpSize = 32;

#define __syncthreads() ((void)::sslops::emu::syncthreads(__FILE__, __LINE__))
#define __syncthreads_count(p) ::sslops::emu::syncthreads(__FILE__, __LINE__, 1, (p) ? 1 : 0)
#define __syncthreads_and(p) ::sslops::emu::syncthreads(__FILE__, __LINE__, 2, (p) ? 1 : 0)
#define __syncthreads_or(p) ::sslops::emu::syncthreads(__FILE__, __LINE__, 3, (p) ? 1 : 0)
#define __syncwarp(...) ::sslops::emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::sslops::emu::shfl_t(__FILE__, __LINE__, ::sslops::emu::kShflIdx, __VA_ARGS__)
#define __shfl_up_sync(...) ::sslops::emu::shfl_t(__FILE__, __LINE__, ::sslops::emu::kShflUp, __VA_ARGS__)
#define __shfl_down_sync(...) ::sslops::emu::shfl_t(__FILE__, __LINE__, ::sslops::emu::kShflDown, __VA_ARGS__)
#define __shfl_xor_sync(...) ::sslops::emu::shfl_t(__FILE__, __LINE__, ::sslops::emu::kShflXor, __VA_ARGS__)
#define __ballot_sync(mask, pred) \
  static_cast<unsigned>(::sslops::emu::vote(__FILE__, __LINE__, ::sslops::emu::kBallot, (mask), (pred) ? 1 : 0, false))
#define __any_sync(mask, pred) \
  static_cast<int>(::sslops::emu::vote(__FILE__, __LINE__, ::sslops::emu::kAny, (mask), (pred) ? 1 : 0, false))
#define __all_sync(mask, pred) \
  static_cast<int>(::sslops::emu::vote(__FILE__, __LINE__, ::sslops::emu::kAll, (mask), (pred) ? 1 : 0, false))
#define __uni_sync(mask, pred) \
  static_cast<int>(::sslops::emu::vote(__FILE__, __LINE__, ::sslops::emu::kUni, (mask), (pred) ? 1 : 0, false))
#define __reduce_add_sync(mask, v) ::sslops::emu::reduce_t(__FILE__, __LINE__, ::sslops::emu::kReduceAdd, (mask), (v))
#define __reduce_min_sync(mask, v) ::sslops::emu::reduce_t(__FILE__, __LINE__, ::sslops::emu::kReduceMin, (mask), (v))
#define __reduce_max_sync(mask, v) ::sslops::emu::reduce_t(__FILE__, __LINE__, ::sslops::emu::kReduceMax, (mask), (v))
#define __reduce_and_sync(mask, v) ::sslops::emu::reduce_t(__FILE__, __LINE__, ::sslops::emu::kReduceAnd, (mask), (v))
#define __reduce_or_sync(mask, v) ::sslops::emu::reduce_t(__FILE__, __LINE__, ::sslops::emu::kReduceOr, (mask), (v))
#define __reduce_xor_sync(mask, v) ::sslops::emu::reduce_t(__FILE__, __LINE__, ::sslops::emu::kReduceXor, (mask), (v))
#define __activemask() ::sslops::emu::active_mask()
#define __trap() ::sslops::emu::trap("__trap()", __FILE__, __LINE__)

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                   \
  do {                                                                             \
    if (C10_UNLIKELY(!(cond))) ::sslops::emu::device_assert(#cond, __FILE__, __LINE__, __func__); \
  } while (0)
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg)                                          \
  do {                                                                             \
    if (C10_UNLIKELY(!(cond))) ::sslops::emu::device_assert(msg, __FILE__, __LINE__, __func__); \
  } while (0)

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- integer / bit intrinsics ----
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline float __int_as_float(int x) { return sslops::emu::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(static_cast<uint32_t>(sslops::emu::to_bits(x))); }
inline float __uint_as_float(unsigned x) { return sslops::emu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<uint32_t>(sslops::emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return sslops::emu::from_bits<double>(static_cast<uint64_t>(x)); }
inline long long __double_as_longlong(double x) { return static_cast<long long>(sslops::emu::to_bits(x)); }

// ---- math: CUDA's overloads that the host library lacks ----
// min/max as CUDA declares them for device code (same-type overloads).
#define SSLOPS_EMU_MINMAX(T)                            \
  inline T min(T a, T b) { return b < a ? b : a; }      \
  inline T max(T a, T b) { return a < b ? b : a; }
SSLOPS_EMU_MINMAX(int)
SSLOPS_EMU_MINMAX(unsigned)
SSLOPS_EMU_MINMAX(long)
SSLOPS_EMU_MINMAX(unsigned long)
SSLOPS_EMU_MINMAX(long long)
SSLOPS_EMU_MINMAX(unsigned long long)
#undef SSLOPS_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(double(a), b); }
inline double min(double a, float b) { return std::fmin(a, double(b)); }
inline double max(float a, double b) { return std::fmax(double(a), b); }
inline double max(double a, float b) { return std::fmax(a, double(b)); }

// fma(float, float, float) rounds once in float, as CUDA's overload does (the
// C library's ::fma is double only; float arguments would be rounded twice).
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return ::expf(x); }
inline float __logf(float x) { return ::logf(x); }
inline float __sinf(float x) { return ::sinf(x); }
inline float __cosf(float x) { return ::cosf(x); }
inline float __powf(float a, float b) { return ::powf(a, b); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline float rsqrtf(float x) { return 1.0f / ::sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / ::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return ::sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return __builtin_fma(a, b, c); }

// ---- atomics (compiled to __tsan_atomic* calls, which the runtime implements and checks) ----
template <class T>
inline T sslops_emu_atomic_cas_loop(T* p, T (*op)(T, T), T v) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(T) == sizeof(U), "atomics on 4- and 8-byte values");
  U* up = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(up, __ATOMIC_RELAXED);
  for (;;) {
    T o;
    std::memcpy(&o, &old, sizeof(T));
    const T n = op(o, v);
    U nu;
    std::memcpy(&nu, &n, sizeof(T));
    if (__atomic_compare_exchange_n(up, &old, nu, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return o;
  }
}
inline float atomicAdd(float* p, float v) {
  return sslops_emu_atomic_cas_loop<float>(p, [](float a, float b) { return a + b; }, v);
}
inline double atomicAdd(double* p, double v) {
  return sslops_emu_atomic_cas_loop<double>(p, [](double a, double b) { return a + b; }, v);
}
#define SSLOPS_EMU_INT_ATOMICS(T)                                                                         \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }                  \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }                  \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }                \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }                  \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }                    \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }                  \
  inline T atomicMax(T* p, T v) { return sslops_emu_atomic_cas_loop<T>(p, [](T a, T b) { return a < b ? b : a; }, v); } \
  inline T atomicMin(T* p, T v) { return sslops_emu_atomic_cas_loop<T>(p, [](T a, T b) { return b < a ? b : a; }, v); } \
  inline T atomicCAS(T* p, T cmp, T v) {                                                                \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                 \
    return cmp;                                                                                         \
  }
SSLOPS_EMU_INT_ATOMICS(int)
SSLOPS_EMU_INT_ATOMICS(unsigned)
SSLOPS_EMU_INT_ATOMICS(unsigned long long)
SSLOPS_EMU_INT_ATOMICS(long long)
#undef SSLOPS_EMU_INT_ATOMICS
inline float atomicExch(float* p, float v) {
  return sslops_emu_atomic_cas_loop<float>(p, [](float, float b) { return b; }, v);
}

// Emulator shim of <mma.h>: nvcuda::wmma fragments for m16n16k16 with half,
// bfloat16 and float elements.  load/store/mma are warp-collective operations
// of the emulator (csrc/emu/runtime.cpp): every lane of the warp must call
// them with the same arguments.  The lane -> element mapping of a fragment is
// unspecified by CUDA; the emulator uses its own (deliberately not the
// hardware's), so a kernel that relies on a mapping fails here.  mma_sync
// computes D = A B + C with the inputs as stored (already rounded to half /
// bfloat16), exact products and a float32 sum in k order.
#pragma once

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu/emu.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <class T>
struct elem;
template <>
struct elem<__half> {
  static constexpr ::sslops::emu::ElemType type = ::sslops::emu::ElemType::kF16;
};
template <>
struct elem<__nv_bfloat16> {
  static constexpr ::sslops::emu::ElemType type = ::sslops::emu::ElemType::kBF16;
};
template <>
struct elem<float> {
  static constexpr ::sslops::emu::ElemType type = ::sslops::emu::ElemType::kF32;
};
template <class Use>
struct use;
template <>
struct use<matrix_a> {
  static constexpr ::sslops::emu::FragUse value = ::sslops::emu::FragUse::kA;
};
template <>
struct use<matrix_b> {
  static constexpr ::sslops::emu::FragUse value = ::sslops::emu::FragUse::kB;
};
template <>
struct use<accumulator> {
  static constexpr ::sslops::emu::FragUse value = ::sslops::emu::FragUse::kAcc;
};
// Elements per lane as in CUDA's <mma.h> (half A/B hold every element twice).
template <class Use, class T>
constexpr int num_elements() {
  return (std::is_same<Use, accumulator>::value || !std::is_same<T, __half>::value) ? 8 : 16;
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements WMMA m16n16k16");
  static_assert(std::is_same<Use, accumulator>::value ? std::is_same<T, float>::value
                                                      : (std::is_same<T, __half>::value ||
                                                         std::is_same<T, __nv_bfloat16>::value),
                "emulated WMMA: half/bfloat16 A and B, float accumulators");
  static_assert(std::is_same<Use, accumulator>::value || std::is_same<Layout, row_major>::value ||
                    std::is_same<Layout, col_major>::value,
                "matrix_a / matrix_b fragments need a row_major or col_major layout");

 public:
  using element_type = T;
  static constexpr int num_elements = detail::num_elements<Use, T>();
  T x[num_elements];

  ::sslops::emu::FragDesc desc() const {
    return ::sslops::emu::FragDesc{const_cast<T*>(x), detail::use<Use>::value, detail::elem<T>::type, num_elements};
  }
};

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}
template <class Use, int M, int N, int K, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, __half, Layout>& f, float v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = __half(v);
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
  ::sslops::emu::wmma_load(f.desc(), p, ldm, std::is_same<Layout, col_major>::value);
}
template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t l) {
  ::sslops::emu::wmma_load(f.desc(), p, ldm, l == mem_col_major);
}
template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  ::sslops::emu::wmma_store(p, f.desc(), ldm, l == mem_col_major);
}
template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  ::sslops::emu::wmma_mma(d.desc(), a.desc(), b.desc(), c.desc());
}

}  // namespace wmma
}  // namespace nvcuda

// Vectorised row loops of the CPU attention kernel (csrc/cpu/attention.cpp):
// the function table each instruction-set build fills in.
//
// The loops themselves are in attention_rows.inc, compiled once per ISA by
// attention_rows_{default,avx2,avx512}.cpp with CPU_CAPABILITY set the way ATen
// builds its own kernels, so at::vec::Vectorized<float> is 8 or 16 lanes wide
// there and each build lands in a namespace of its own (no ODR clash).  The
// tile loop, GEMMs and tensor handling stay in attention.cpp, built for the
// baseline ISA; it picks a table at run time (SSLOPS_CPU_ISA=base|avx2|avx512
// forces one, for tests).
#pragma once

#include <cstdint>

namespace sslops {
namespace attention_cpu {

template <typename T>
struct RowOps {
  // Forward, one tile of scores s (rn x cn, row stride ld) of rows whose
  // visible prefixes are valid[i] <= cn: s <- exp(s - m_new) on the prefix and
  // 0 after it; (m, l) advance by one online-softmax step; alpha[i] is the
  // factor the row's output accumulator must be multiplied by.
  void (*softmax_tile)(T* s, int64_t ld, int64_t rn, int64_t cn, const int64_t* valid, T* m, T* l, T* alpha);
  // x[i][0:n] *= f[i]
  void (*scale_rows)(T* x, int64_t ld, int64_t rn, int64_t n, const T* f);
  // Backward: s <- exp(s - bwd_shift(lse[i])) on the prefix valid[i], 0 after.
  void (*prob_tile)(T* s, int64_t ld, int64_t rn, int64_t cn, const int64_t* valid, const T* lse);
  // Backward: dp <- p * (dp - delta[i]), elementwise over rn x cn.
  void (*dscore_tile)(T* dp, int64_t lddp, const T* p, int64_t ldp, int64_t rn, int64_t cn, const T* delta);
  // out[i] = sum_d a[i][d] * b[i][d]   (delta = rowsum(dO * O))
  void (*row_dots)(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t rn, int64_t n, T* out);
  const char* isa;
};

// One per build; the AVX ones exist on x86-64 GCC/Clang builds only.
void row_ops_default(RowOps<float>* f, RowOps<double>* d);
void row_ops_avx2(RowOps<float>* f, RowOps<double>* d);
void row_ops_avx512(RowOps<float>* f, RowOps<double>* d);

}  // namespace attention_cpu
}  // namespace sslops

// GEMM on row-major tiles for the CPU kernels (attention, nt_xent): the
// Fortran BLAS that libtorch_cpu links and exports (MKL's sgemm_/dgemm_), else
// at::addmm_out.  SSLOPS_CPU_BLAS=aten forces the latter (read per call, for
// tests).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/isa.h"

// Weak: null when the library does not export them.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace sslops {
namespace cpu_blas {

// Row-major C (m x n, ldc) = alpha * op(A) op(B) + beta * C, with op(A) m x k
// (A stored k x m when ta) and op(B) k x n (B stored n x k when tb).  beta = 0
// never reads C.  Leading dimensions are row strides in elements (unit stride
// along rows).
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // C = beta * C
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  // BLAS wants each leading dimension >= the stored row length even when
  // there is a single row (whose stride is then arbitrary).
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k;
  const int64_t b_rows = tb ? n : k, b_cols = tb ? k : n;
  if (a_rows == 1) lda = std::max(lda, a_cols);
  if (b_rows == 1) ldb = std::max(ldb, b_cols);
  if (m == 1) ldc = std::max(ldc, n);
  const bool have = std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  const int64_t big = std::numeric_limits<int>::max();
  if (have && !cpu_isa::env_is("SSLOPS_CPU_BLAS", "aten") && std::max({m, n, k, lda, ldb, ldc}) <= big) {
    // Column-major view: C^T (n x m) = op(B)^T op(A)^T.
    const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&tra, &trb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    } else {
      dgemm_(&tra, &trb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    }
    return;
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto A = at::from_blob(const_cast<T*>(a), {m, k}, ta ? at::IntArrayRef{1, lda} : at::IntArrayRef{lda, 1}, opts);
  auto B = at::from_blob(const_cast<T*>(b), {k, n}, tb ? at::IntArrayRef{1, ldb} : at::IntArrayRef{ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) C.zero_();  // so that no NaN in C's old bytes can reach it
  at::addmm_out(C, C, A, B, beta, alpha);
}

}  // namespace cpu_blas
}  // namespace sslops

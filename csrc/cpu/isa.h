// Run-time ISA choice shared by the CPU kernels that are built several times
// (baseline, AVX2, AVX-512: attention, nt_xent's symmetric tiles, sup_con).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace sslops {
namespace cpu_isa {

// Whether environment variable `name` equals `value` (read per call, for tests).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// The widest build this CPU runs: 0 baseline, 1 AVX2 + FMA, 2 AVX-512
// (F, DQ, VL, BW); SSLOPS_CPU_ISA=base|avx2 caps it (read per call, so tests
// can run every path).
inline int level() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int widest = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
    return avx512 ? 2 : avx2 ? 1 : 0;
  }();
#else
  constexpr int widest = 0;
#endif
  if (env_is("SSLOPS_CPU_ISA", "base")) return 0;
  if (env_is("SSLOPS_CPU_ISA", "avx2")) return std::min(widest, 1);
  return widest;
}

}  // namespace cpu_isa
}  // namespace sslops

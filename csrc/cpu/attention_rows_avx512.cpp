// AVX-512 build of the attention row loops (see attention_rows.h); used only
// when the CPU has AVX-512 F/DQ/VL/BW (attention.cpp checks at run time).
#include "cpu/attention_rows.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "cpu/vec_prelude.h"  // before the pragma: see vec_prelude.h

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// at::vec (and sleef.h) choose their AVX-512 code by these macros (the target
// pragma enables the instructions but does not define them for the headers).
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/attention_rows.inc"

namespace sslops {
namespace attention_cpu {
void row_ops_avx512(RowOps<float>* f, RowOps<double>* d) {
  *f = AVX512::Rows<float>::table();
  *d = AVX512::Rows<double>::table();
}
}  // namespace attention_cpu
}  // namespace sslops
#pragma GCC pop_options

#else
namespace sslops {
namespace attention_cpu {
void row_ops_avx512(RowOps<float>* f, RowOps<double>* d) { row_ops_default(f, d); }
}  // namespace attention_cpu
}  // namespace sslops
#endif

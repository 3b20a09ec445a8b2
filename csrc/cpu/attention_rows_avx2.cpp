// AVX2/FMA build of the attention row loops (see attention_rows.h); used only
// when the CPU has AVX2 and FMA (attention.cpp checks at run time).
#include "cpu/attention_rows.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "cpu/vec_prelude.h"  // before the pragma: see vec_prelude.h

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// at::vec chooses its AVX2 code by these macros (the target pragma enables the
// instructions but, unlike -mavx2, does not define __AVX2__ for the headers).
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/attention_rows.inc"

namespace sslops {
namespace attention_cpu {
void row_ops_avx2(RowOps<float>* f, RowOps<double>* d) {
  *f = AVX2::Rows<float>::table();
  *d = AVX2::Rows<double>::table();
}
}  // namespace attention_cpu
}  // namespace sslops
#pragma GCC pop_options

#else
namespace sslops {
namespace attention_cpu {
void row_ops_avx2(RowOps<float>* f, RowOps<double>* d) { row_ops_default(f, d); }
}  // namespace attention_cpu
}  // namespace sslops
#endif

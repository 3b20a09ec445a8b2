// Baseline-ISA build of the attention row loops (see attention_rows.h).
#define CPU_CAPABILITY DEFAULT
#include "cpu/attention_rows.inc"

namespace sslops {
namespace attention_cpu {
void row_ops_default(RowOps<float>* f, RowOps<double>* d) {
  *f = DEFAULT::Rows<float>::table();
  *d = DEFAULT::Rows<double>::table();
}
}  // namespace attention_cpu
}  // namespace sslops

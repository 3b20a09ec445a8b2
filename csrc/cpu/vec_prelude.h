// Headers that ATen's at::vec (ATen/cpu/vec/vec.h) pulls in from outside
// ATen/cpu/vec, for a file that builds at::vec for a wider ISA under
// `#pragma GCC target` (attention_rows_avx2.cpp, attention_rows_avx512.cpp).
// Including them first, before the pragma, keeps their inline functions and
// templates compiled for the baseline ISA: the linker keeps one copy of each
// inline function per program, and that copy must run on every x86-64 CPU.
// Only at::vec itself (namespace at::vec::<CPU_CAPABILITY>, distinct per
// build) and the row loops are compiled for the wider ISA.
#pragma once

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <type_traits>
#include <utility>

#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/bit_cast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include "common/attention.h"
#include "cpu/attention_rows.h"

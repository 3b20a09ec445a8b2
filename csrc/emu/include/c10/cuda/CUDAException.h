// Emulator shim of <c10/cuda/CUDAException.h>.
#pragma once

#include <c10/util/Exception.h>

#include "cuda_runtime.h"

#define C10_CUDA_CHECK(EXPR)                                                                           \
  do {                                                                                                 \
    const cudaError_t sslops_emu_err = (EXPR);                                                         \
    TORCH_CHECK(sslops_emu_err == cudaSuccess, "CUDA error (emulated GPU): ",                          \
                ::sslops::emu::error_string(sslops_emu_err), " in ", #EXPR);                           \
  } while (0)
#define C10_CUDA_CHECK_WARN(EXPR)                                                                      \
  do {                                                                                                 \
    const cudaError_t sslops_emu_err = (EXPR);                                                         \
    if (sslops_emu_err != cudaSuccess) TORCH_WARN("CUDA warning (emulated GPU): ",                     \
                                                  ::sslops::emu::error_string(sslops_emu_err));       \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())

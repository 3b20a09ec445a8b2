// Emulator shim of <cuda_runtime.h>: the host runtime API the kernels' host
// code calls, on the emulated GPU (csrc/emu/runtime.cpp).
#pragma once

#include "emu/emu.h"

inline cudaError_t cudaGetLastError() { return ::sslops::emu::get_last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return ::sslops::emu::get_last_error(false); }
inline const char* cudaGetErrorString(cudaError_t e) { return ::sslops::emu::error_string(e); }
inline const char* cudaGetErrorName(cudaError_t e) { return ::sslops::emu::error_string(e); }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  *p = ::sslops::emu::device_properties();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // launches are synchronous
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  return ::sslops::emu::func_set_attribute(reinterpret_cast<const void*>(fn), attr, value);
}
template <class F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F* fn, int block_size,
                                                                 size_t dynamic_smem) {
  return ::sslops::emu::occupancy(blocks, reinterpret_cast<const void*>(fn), block_size, dynamic_smem);
}

// Emulator shim of <c10/cuda/CUDAStream.h>: one stream, launches are synchronous.
#pragma once

#include <c10/core/Device.h>

#include "cuda_runtime.h"

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  CUDAStream() = default;
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return stream(); }
  c10::DeviceIndex device_index() const { return 0; }
  c10::Device device() const { return c10::Device(c10::DeviceType::CPU); }
  void synchronize() const {}
  bool query() const { return true; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }
inline CUDAStream getStreamFromPool(bool = false, c10::DeviceIndex = -1) { return CUDAStream(); }

}  // namespace cuda
}  // namespace c10

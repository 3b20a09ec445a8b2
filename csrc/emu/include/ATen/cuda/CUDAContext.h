// Emulator shim of <ATen/cuda/CUDAContext.h>: the emulated GPU's properties
// (an H100 or an A100, see csrc/emu/README.md) and its one stream.
#pragma once

#include "c10/cuda/CUDAException.h"
#include "c10/cuda/CUDAFunctions.h"
#include "c10/cuda/CUDAStream.h"

namespace at {
namespace cuda {

using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;
using c10::cuda::getStreamFromPool;

inline cudaDeviceProp* getCurrentDeviceProperties() {
  // The runtime keeps the selected properties; each call sees the current choice.
  static thread_local cudaDeviceProp prop;
  prop = ::sslops::emu::device_properties();
  return &prop;
}
inline cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device) {
  TORCH_CHECK(device == -1 || device == 0, "getDeviceProperties: the emulated GPU is device 0, got ", int(device));
  return getCurrentDeviceProperties();
}
inline int warp_size() { return 32; }
inline int64_t getNumGPUs() { return 1; }
inline bool is_available() { return true; }
inline c10::DeviceIndex current_device() { return 0; }

}  // namespace cuda
}  // namespace at

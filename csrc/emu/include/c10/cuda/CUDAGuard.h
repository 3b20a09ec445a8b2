// Emulator shim of <c10/cuda/CUDAGuard.h>: guards do nothing but check that
// the device is the emulated GPU (the CPU tensors the emulated kernels take).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Optional.h>

#include "c10/cuda/CUDAStream.h"

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device d) { ::sslops::emu::check_device(d, "CUDAGuard"); }
  explicit CUDAGuard(c10::DeviceIndex i) { check_index(i); }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  void set_device(c10::Device d) { ::sslops::emu::check_device(d, "CUDAGuard"); }
  void set_index(c10::DeviceIndex i) { check_index(i); }
  c10::Device current_device() const { return c10::Device(c10::DeviceType::CPU); }
  c10::Device original_device() const { return c10::Device(c10::DeviceType::CPU); }

 private:
  static void check_index(c10::DeviceIndex i) {
    TORCH_CHECK(i == -1 || i == 0, "CUDAGuard: the emulated GPU is device 0, got ", int(i));
  }
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(c10::optional<c10::Device> d) {
    if (d.has_value()) ::sslops::emu::check_device(*d, "OptionalCUDAGuard");
  }
  void set_device(c10::Device d) { ::sslops::emu::check_device(d, "OptionalCUDAGuard"); }
  void reset() {}
};

struct CUDAStreamGuard {
  explicit CUDAStreamGuard(const CUDAStream&) {}
};

}  // namespace cuda
}  // namespace c10

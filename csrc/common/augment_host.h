// Host-side argument checks and launch configuration of sslops::augment,
// shared by the CPU and CUDA entry points.  The per-pixel math is in
// common/augment.h.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "common/augment.h"
#include "common/checks.h"
#include "common/output.h"

namespace sslops {
namespace augment {

// The parameter tensors of one call.  Row n of every parameter describes
// output view n, cut from image n % B (B = images.size(0)), so N = V * B
// parameters produce V views of every image in one call.
struct Params {
  at::Tensor crop, flip, jitter, brightness, contrast, saturation, hue, order, grayscale, blur_sigma, solarize;
};

struct Config {
  int64_t B = 0, N = 0, H = 0, W = 0, S = 0, K = 1;
  bool antialias = true, channels_last = false;
  std::array<float, 3> mean{}, std{};
  at::ScalarType out_dtype = at::kFloat;
};

inline void check_param(const at::Tensor& t, const char* name, int64_t n, int64_t cols, at::ScalarType dtype,
                        const at::Tensor& images, const char* op) {
  if (cols == 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, ",), got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == cols, op, ": ", name, " must have shape (", n, ", ",
                cols, "), got ", t.sizes());
  }
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  check_same_device(images, "images", t, name, op);
}

inline Config check_inputs(const at::Tensor& images, const Params& p, int64_t size, int64_t kernel_size,
                           bool antialias, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                           at::ScalarType out_dtype, bool channels_last, const char* op) {
  TORCH_CHECK(images.dim() == 4, op, ": images must be 4-D (B, 3, H, W), got shape ", images.sizes());
  TORCH_CHECK(images.size(1) == 3, op, ": images must have 3 channels (B, 3, H, W), got shape ", images.sizes());
  const auto dt = images.scalar_type();
  TORCH_CHECK(dt == at::kByte || dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": images must be uint8 or floating, got ", dt);
  Config cfg;
  cfg.B = images.size(0);
  cfg.H = images.size(2);
  cfg.W = images.size(3);
  cfg.N = p.crop.dim() >= 1 ? p.crop.size(0) : -1;
  TORCH_CHECK(cfg.N >= 0, op, ": crop must have shape (N, 4), got ", p.crop.sizes());
  TORCH_CHECK(cfg.B > 0 ? cfg.N % cfg.B == 0 : cfg.N == 0, op, ": the parameters describe ", cfg.N,
              " views, which is not a multiple of the batch size B = ", cfg.B);
  TORCH_CHECK(cfg.B == 0 || (cfg.H > 0 && cfg.W > 0), op, ": images must have H, W >= 1, got shape ",
              images.sizes());
  const int64_t n = cfg.N;
  check_param(p.crop, "crop", n, 4, at::kLong, images, op);
  check_param(p.flip, "flip", n, 0, at::kBool, images, op);
  check_param(p.jitter, "jitter", n, 0, at::kBool, images, op);
  check_param(p.brightness, "brightness", n, 0, at::kFloat, images, op);
  check_param(p.contrast, "contrast", n, 0, at::kFloat, images, op);
  check_param(p.saturation, "saturation", n, 0, at::kFloat, images, op);
  check_param(p.hue, "hue", n, 0, at::kFloat, images, op);
  check_param(p.order, "order", n, 4, at::kLong, images, op);
  check_param(p.grayscale, "grayscale", n, 0, at::kBool, images, op);
  check_param(p.blur_sigma, "blur_sigma", n, 0, at::kFloat, images, op);
  check_param(p.solarize, "solarize", n, 0, at::kBool, images, op);
  TORCH_CHECK(size > 0, op, ": size must be > 0, got ", size);
  TORCH_CHECK(kernel_size > 0 && kernel_size % 2 == 1, op, ": kernel_size must be odd and > 0, got ", kernel_size);
  TORCH_CHECK(kernel_size / 2 < size, op, ": kernel_size // 2 must be < size for reflect padding, got kernel_size ",
              kernel_size, " and size ", size);
  TORCH_CHECK(mean.size() == 3, op, ": mean must have 3 values, got ", mean.size());
  TORCH_CHECK(std.size() == 3, op, ": std must have 3 values, got ", std.size());
  for (int c = 0; c < 3; ++c) {
    TORCH_CHECK(std[c] != 0.0, op, ": std must be nonzero, got std[", c, "] = 0");
    cfg.mean[c] = static_cast<float>(mean[c]);
    cfg.std[c] = static_cast<float>(std[c]);
  }
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  cfg.S = size;
  cfg.K = kernel_size;
  cfg.antialias = antialias;
  cfg.channels_last = channels_last;
  cfg.out_dtype = out_dtype;
  return cfg;
}

// Value checks that need the parameter data (the CPU entry point runs them; the
// CUDA entry point relies on the Python layer, which checks before launching,
// and clamps crops in the kernel so that no call can read out of bounds).
inline void check_values(const Config& cfg, const int64_t* crop, const int64_t* order, const float* bri,
                         const float* con, const float* sat, const float* hue_f, const float* sigma, const char* op) {
  for (int64_t n = 0; n < cfg.N; ++n) {
    const int64_t* c = crop + 4 * n;
    // No sums of crop values: top + height wraps in int64 for a huge top (H - top cannot).
    TORCH_CHECK(c[0] >= 0 && c[1] >= 0 && c[2] >= 1 && c[3] >= 1 && c[2] <= cfg.H - c[0] && c[3] <= cfg.W - c[1],
                op, ": crop[", n, "] = (top=", c[0], ", left=", c[1], ", height=", c[2], ", width=", c[3],
                ") is not inside the ", cfg.H, "x", cfg.W, " image");
    const int64_t* o = order + 4 * n;
    int seen = 0;
    for (int j = 0; j < 4; ++j) {
      TORCH_CHECK(o[j] >= 0 && o[j] < 4, op, ": order[", n, "] must be a permutation of 0..3");
      seen |= 1 << o[j];
    }
    TORCH_CHECK(seen == 15, op, ": order[", n, "] must be a permutation of 0..3");
    TORCH_CHECK(bri[n] >= 0 && con[n] >= 0 && sat[n] >= 0, op,
                ": brightness, contrast and saturation factors must be >= 0 (sample ", n, ")");
    TORCH_CHECK(hue_f[n] >= -0.5f && hue_f[n] <= 0.5f, op, ": hue[", n, "] = ", hue_f[n],
                " is outside [-0.5, 0.5]");
    TORCH_CHECK(sigma[n] >= 0 && std::isfinite(sigma[n]), op, ": blur_sigma[", n, "] = ", sigma[n],
                " must be finite and >= 0");
  }
}

// (N, 3, S, S) output in out_dtype, channels_last strides when asked.
inline at::Tensor new_views(const Config& cfg, const at::Tensor& images) {
  const auto opts = images.options().dtype(cfg.out_dtype);
  if (cfg.channels_last) return new_output({cfg.N, cfg.S, cfg.S, 3}, opts).permute({0, 3, 1, 2});
  return new_output({cfg.N, 3, cfg.S, cfg.S}, opts);
}

}  // namespace augment
}  // namespace sslops

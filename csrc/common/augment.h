// Per-pixel math of the fused SSL augmentation pipeline, shared by the CPU
// (csrc/cpu/augment.cpp) and CUDA (csrc/cuda/augment.cu) kernels.
//
// Every function reproduces what torchvision.transforms.v2.functional does on
// float32 tensors in [0, 1] (torchvision 0.2x, torch 2.x), operation by
// operation, so that the fused kernels agree with the per-sample reference to
// float rounding:
//
//   resized_crop  F.interpolate(bilinear, align_corners=False, antialias) on the
//                 crop: separable taps, computed by resample_taps() exactly as
//                 ATen's upsample_bilinear2d (antialias=False) and
//                 _upsample_bilinear2d_aa (antialias=True, triangle filter with
//                 support max(scale, 1), normalised weights) compute them.
//   brightness    clamp(x * f, 0, 1)
//   contrast      clamp(x * f + mean(gray(x)) * (1 - f), 0, 1), mean over the image
//   saturation    clamp(x * f + gray(x) * (1 - f), 0, 1), per pixel
//   hue           RGB -> HSV (Pillow's algorithm as torchvision writes it),
//                 h = (h + hue) mod 1, HSV -> RGB
//   grayscale     0.2989 r + 0.587 g + 0.114 b, on all three channels
//   gaussian blur separable, weights softmax(-(x / sigma)^2) on
//                 x = linspace(-(k-1)/(2 sqrt 2), (k-1)/(2 sqrt 2), k), reflect padding
//   solarize      x >= 0.5 ? 1 - x : x
//   normalize     (x - mean_c) / std_c
//
// The functions are written branch-free (selects, no libm floor on the host)
// so that the CPU loops over rows vectorise.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace sslops {
namespace augment {

// ---- jitter op codes (AugmentParams.order) ----
enum JitterOp : int { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };

constexpr float kGrayR = 0.2989f;
constexpr float kGrayG = 0.587f;
constexpr float kGrayB = 0.114f;
constexpr float kSolarizeThreshold = 0.5f;

// ---- scalar helpers (NaN-agnostic selects that vectorise) ----
SSLOPS_HD float max_(float a, float b) { return a > b ? a : b; }
SSLOPS_HD float min_(float a, float b) { return a < b ? a : b; }
SSLOPS_HD float clamp01(float v) { return min_(max_(v, 0.0f), 1.0f); }

// floor for |x| < 2^31.  On the host a truncating conversion and a fix-up (SSE2
// vectorises it, libm floorf does not without SSE4.1).
SSLOPS_HD float floor_(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  // Arithmetic outside the select: GCC does not if-convert (vectorise) selects
  // whose arms may trap under the default -ftrapping-math.
  const float t = static_cast<float>(static_cast<int32_t>(x));
  const float t_minus_1 = t - 1.0f;
  return t > x ? t_minus_1 : t;
#endif
}

// ---- colour ----
// rgb_to_grayscale: r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)
SSLOPS_HD float gray(float r, float g, float b) { return r * kGrayR + g * kGrayG + b * kGrayB; }

// _blend(image1, image2, ratio) on float images: clamp(a * ratio + b * (1 - ratio), 0, 1)
SSLOPS_HD float blend(float a, float b, float ratio) { return clamp01(a * ratio + b * (1.0f - ratio)); }

SSLOPS_HD float brightness(float v, float factor) { return clamp01(v * factor); }

// adjust_saturation: blend with the pixel's own gray value.
SSLOPS_HD void saturation(float& r, float& g, float& b, float factor) {
  const float l = gray(r, g, b);
  r = blend(r, l, factor);
  g = blend(g, l, factor);
  b = blend(b, l, factor);
}

// adjust_contrast: blend with the mean of the image's gray values (precomputed).
SSLOPS_HD void contrast(float& r, float& g, float& b, float factor, float mean_gray) {
  r = blend(r, mean_gray, factor);
  g = blend(g, mean_gray, factor);
  b = blend(b, mean_gray, factor);
}

// adjust_hue: torchvision's _rgb_to_hsv, h.add_(hue).remainder_(1.0), _hsv_to_rgb.
SSLOPS_HD void hue(float& r, float& g, float& b, float hue_factor) {
  // _rgb_to_hsv
  const float maxc = max_(r, max_(g, b));
  const float minc = min_(r, min_(g, b));
  const bool eqc = maxc == minc;
  const float range = maxc - minc;
  const float s = range / (eqc ? 1.0f : maxc);
  const float div = eqc ? 1.0f : range;
  const float rc = (maxc - r) / div;
  const float gc = (maxc - g) / div;
  const float bc = (maxc - b) / div;
  const bool max_is_r = maxc == r;
  const bool max_is_g = maxc == g;
  // hr where max == r; hg where max == g != r; hb elsewhere (the masks are disjoint).
  const float hr = bc - gc, hg = rc + 2.0f - bc, hb = gc + 4.0f - rc;
  float h = max_is_r ? hr : (max_is_g ? hg : hb);
  h = h * (1.0f / 6.0f) + 1.0f;
  h = h - floor_(h);  // fmod(h, 1) for h > 0
  const float v = maxc;
  // hue shift: remainder(h + hue, 1)
  h = h + hue_factor;
  h = h - floor_(h);
  // _hsv_to_rgb
  const float h6 = h * 6.0f;
  const float fi = floor_(h6);
  const float f = h6 - fi;
  const float sxf = s * f;
  const float one_minus_s = 1.0f - s;
  const float q = clamp01((1.0f - sxf) * v);
  const float t = clamp01((sxf + one_minus_s) * v);
  const float p = clamp01(one_minus_s * v);
  // select = [[v q p p t v], [t v v q p p], [p p t v v q]] indexed by
  // remainder(i, 6); fi is in [0, 6] and sector 6 is sector 0.  Float compares
  // and non-short-circuit ors keep it branch-free (vectorisable).
  const bool s0 = (fi == 0.0f) | (fi == 6.0f), s1 = fi == 1.0f, s2 = fi == 2.0f;
  const bool s3 = fi == 3.0f, s4 = fi == 4.0f, s5 = fi == 5.0f;
  r = (s0 | s5) ? v : (s1 ? q : (s4 ? t : p));
  g = (s1 | s2) ? v : (s0 ? t : (s3 ? q : p));
  b = (s3 | s4) ? v : (s2 ? t : (s5 ? q : p));
}

// A jitter op other than contrast, in place (contrast needs the image mean and
// is applied by the caller with contrast()).
SSLOPS_HD void pointwise_jitter(int op, float& r, float& g, float& b, float bri, float sat, float hue_f) {
  if (op == kBrightness) {
    r = brightness(r, bri);
    g = brightness(g, bri);
    b = brightness(b, bri);
  } else if (op == kSaturation) {
    saturation(r, g, b, sat);
  } else if (op == kHue) {
    hue(r, g, b, hue_f);
  }
}

// Which jitter ops a view applies, split around contrast (a per-image barrier:
// it needs the mean gray value of the image after the ops before it).
// Identity factors are skipped (brightness/contrast/saturation 1, hue 0): on
// images in [0, 1] they change nothing but rounding.  Unknown op codes are
// ignored (the Python layer rejects them).  The op lists are packed 2 bits per
// op into an int (op k at bits 2k, 2k + 1), so that a GPU thread keeps the plan
// in registers: indexing an array with a loop counter puts it in local memory.
struct JitterPlan {
  int n_pre = 0, n_post = 0;  // point-wise ops before / after contrast (<= 3)
  int pre = 0, post = 0;      // their op codes, packed
  bool contrast = false;      // apply contrast (factor != 1)
  SSLOPS_HD int pre_op(int k) const { return (pre >> (2 * k)) & 3; }
  SSLOPS_HD int post_op(int k) const { return (post >> (2 * k)) & 3; }
};

SSLOPS_HD JitterPlan plan_jitter(bool jitter, const int64_t* order, float bri, float con, float sat, float hue_f) {
  JitterPlan plan;
  if (!jitter) return plan;
  plan.contrast = con != 1.0f;
  bool after = false;
  for (int j = 0; j < 4; ++j) {
    const int op = static_cast<int>(order[j]);
    if (op == kContrast) {
      after = plan.contrast;
      continue;
    }
    const bool active = (op == kBrightness && bri != 1.0f) || (op == kSaturation && sat != 1.0f) ||
                        (op == kHue && hue_f != 0.0f);
    if (!active) continue;
    if (after) {
      plan.post |= op << (2 * plan.n_post++);
    } else {
      plan.pre |= op << (2 * plan.n_pre++);
    }
  }
  return plan;
}

SSLOPS_HD float solarize(float v) { return v >= kSolarizeThreshold ? 1.0f - v : v; }

// normalize: (x - mean) / std, written as torchvision does it (sub, then div).
SSLOPS_HD float normalize(float v, float mean, float std) { return (v - mean) / std; }

// ---- resampling (resized_crop) ----

// Maximum number of taps of one output sample when resizing in_size -> out_size.
SSLOPS_HD int max_taps(int in_size, int out_size, bool antialias) {
  if (!antialias) return 2;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  const float support = scale >= 1.0f ? scale : 1.0f;  // (interp_size / 2) * scale, interp_size = 2
  return static_cast<int>(ceilf(support)) * 2 + 1;
}

SSLOPS_HD float triangle(float x) {
  x = x < 0.0f ? -x : x;
  return x < 1.0f ? 1.0f - x : 0.0f;
}

// Taps of output sample i (0 <= i < out_size) on an input of in_size samples:
// writes *start and w[0 .. count) (count <= cap, cap >= max_taps()) and
// returns count; output_i = sum_j w[j] * input[*start + j].
SSLOPS_HD int resample_taps(int i, int in_size, int out_size, bool antialias, int cap, int* start, float* w) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  if (!antialias) {
    // area_pixel_compute_source_index (align_corners=False, not cubic) and
    // guard_index_and_lambda, as in upsample_bilinear2d.
    float src = scale * (static_cast<float>(i) + 0.5f) - 0.5f;
    src = src < 0.0f ? 0.0f : src;
    int i0 = static_cast<int>(floorf(src));
    i0 = i0 < in_size - 1 ? i0 : in_size - 1;
    float l1 = src - static_cast<float>(i0);
    l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
    *start = i0;
    if (i0 < in_size - 1) {
      w[0] = 1.0f - l1;
      w[1] = l1;
      return 2;
    }
    w[0] = 1.0f;  // i1 == i0: (1 - l1) + l1
    return 1;
  }
  // _compute_indices_min_size_weights_aa with the bilinear (triangle) filter.
  const float support = scale >= 1.0f ? scale : 1.0f;
  const float center = scale * (static_cast<float>(i) + 0.5f);
  const float invscale = scale >= 1.0f ? 1.0f / scale : 1.0f;
  int xmin = static_cast<int>(center - support + 0.5f);
  xmin = xmin > 0 ? xmin : 0;
  int xmax = static_cast<int>(center + support + 0.5f);
  xmax = xmax < in_size ? xmax : in_size;
  int count = xmax - xmin;
  count = count < 0 ? 0 : (count > cap ? cap : count);
  float total = 0.0f;
  for (int j = 0; j < count; ++j) {
    const float wj = triangle((static_cast<float>(j + xmin) - center + 0.5f) * invscale);
    w[j] = wj;
    total += wj;
  }
  if (total != 0.0f) {
    for (int j = 0; j < count; ++j) w[j] /= total;
  }
  *start = xmin;
  return count;
}

// ---- gaussian blur ----

// Default kernel size: the odd number nearest to 10% of the output size
// (ties go up), at least 1; 23 at 224, 3 at 32.
inline int default_kernel_size(int64_t size) {
  const double x = static_cast<double>(size) / 10.0;
  const int k = static_cast<int>(std::floor(x / 2.0)) * 2 + 1;
  return k < 1 ? 1 : k;
}

// Weights of torchvision's _get_gaussian_kernel1d(k, sigma) (k odd, sigma > 0):
// softmax(-(x / sigma)^2) over x = linspace(-lim, lim, k), lim = (k - 1) / (2 sqrt 2).
SSLOPS_HD void gaussian_weights(int k, float sigma, float* w) {
  const float lim = static_cast<float>(k - 1) / (2.0f * 1.41421356237309515f);
  const float step = k > 1 ? (2.0f * lim) / static_cast<float>(k - 1) : 0.0f;
  const int half = k / 2;
  float total = 0.0f;
  for (int j = 0; j < k; ++j) {
    // torch.linspace fills the first half from the start and the second from the end.
    const float x = j < half ? -lim + step * static_cast<float>(j) : lim - step * static_cast<float>(k - 1 - j);
    const float z = x / sigma;
    const float e = expf(-(z * z));  // the max logit is 0 (x = 0 at the centre)
    w[j] = e;
    total += e;
  }
  for (int j = 0; j < k; ++j) w[j] /= total;
}

// torch.nn.functional.pad(mode="reflect") index: -1 -> 1, n -> n - 2 (needs pad < n).
SSLOPS_HD int reflect(int i, int n) {
  i = i < 0 ? -i : i;
  return i >= n ? 2 * (n - 1) - i : i;
}

}  // namespace augment
}  // namespace sslops

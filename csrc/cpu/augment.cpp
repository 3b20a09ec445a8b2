// CPU kernel of sslops::augment: resized crop, flip, colour jitter in a
// per-view order, grayscale, gaussian blur, solarize and normalize, fused per
// view.  The per-pixel math is csrc/common/augment.h (shared with CUDA).
//
// Work split: with at least as many views as threads, views run in parallel
// (at::parallel_for over views, the V views of one image back to back so the
// source stays in cache); with fewer, each view's stages run in parallel over
// rows.  A view goes through a per-thread fp32 planar buffer that stays in
// L2 (3 x size x size floats):
//   1. horizontal resampling of the crop rows the vertical taps need (uint8 or
//      float source, any strides) into a (rows, 3, size) buffer,
//   2. vertical resampling per output row, then the jitter ops that precede
//      contrast, in the view's order; a per-row sum of the gray values when
//      contrast follows (summed in a fixed order: deterministic),
//   3. contrast with the image mean, the remaining jitter ops, grayscale,
//   4. separable blur (reflect-padded row copy, then columns), solarize,
//      normalize and the store (float32/float16/bfloat16, NCHW or NHWC).
// Stages merge when an op is absent (no contrast: 2 and 3 are one pass; no
// blur: the store happens in the last colour pass).  Every inner loop runs
// over x with the op fixed outside it, so the compiler vectorises it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

// The colour math selects between arithmetic results; under GCC's default
// -ftrapping-math such selects are not if-converted, which keeps the HSV loop
// scalar.  The kernels never rely on FP exceptions, so drop the flag for the
// augment code (after the ATen headers, so it applies to this file's code only).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "common/augment.h"
#include "common/augment_host.h"

namespace sslops {
namespace augment {
namespace {

constexpr int64_t kRowGrain = 4;
constexpr int64_t kStoreChunk = 256;

// One view's parameters, as the passes use them.
struct View {
  int64_t image = 0;
  int64_t top = 0, left = 0, height = 1, width = 1;
  bool flip = false, grayscale = false, solarize = false;
  float sigma = 0.0f;
  float bri = 1.0f, con = 1.0f, sat = 1.0f, hue = 0.0f;
  JitterPlan plan;
};

// Taps of a 1-D resampling, padded to `count` per output sample (zero weights)
// so that every output reads input[start[i] .. start[i] + count).
struct Taps {
  int count = 0;
  std::vector<int> start;
  std::vector<float> w;
  std::vector<float> scratch;

  void build(int in, int out, bool antialias, bool reverse) {
    const int cap = max_taps(in, out, antialias);
    count = std::min(cap, in);
    start.assign(out, 0);
    w.assign(static_cast<size_t>(out) * count, 0.0f);
    scratch.assign(cap, 0.0f);
    for (int i = 0; i < out; ++i) {
      int s = 0;
      const int c = resample_taps(i, in, out, antialias, cap, &s, scratch.data());
      const int s2 = std::max(0, std::min(s, in - count));
      const int dst = reverse ? out - 1 - i : i;
      start[dst] = s2;
      for (int j = 0; j < c; ++j) w[static_cast<size_t>(dst) * count + (s - s2) + j] = scratch[j];
    }
  }
  int lo() const { return *std::min_element(start.begin(), start.end()); }
  int hi() const { return *std::max_element(start.begin(), start.end()) + count; }
};

// Source (s*) and output (d*) strides, in elements.
struct Strides {
  int64_t sB, sC, sH, sW, dN, dC, dH, dW;
};

// Per-worker buffers.
struct Workspace {
  Taps cols, rows;
  std::vector<float> htmp;   // (rows, 3, S): horizontally resampled crop rows
  std::vector<float> img;    // (3, S, S): the view
  std::vector<float> blur;   // (3, S, S): horizontally blurred view
  std::vector<double> rowsum;
  std::vector<float> gauss;

  Workspace(const Config& cfg) {
    const size_t S = cfg.S;
    htmp.resize(static_cast<size_t>(cfg.H) * 3 * S);
    img.resize(3 * S * S);
    blur.resize(3 * S * S);
    rowsum.resize(S);
    gauss.resize(cfg.K);
  }
};

// Runs body(y0, y1) over [0, n): in parallel over rows, or in one call.
template <typename F>
void for_rows(bool parallel, int64_t n, const F& body) {
  if (parallel) {
    at::parallel_for(0, n, kRowGrain, body);
  } else {
    body(0, n);
  }
}

namespace base {
#include "cpu/augment_rows.inc"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SSLOPS_AUGMENT_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/augment_rows.inc"
}  // namespace avx2
#pragma GCC pop_options
#else
#define SSLOPS_AUGMENT_AVX2 0
#endif

// The AVX2/FMA build of the row kernels when the CPU has them, unless
// SSLOPS_CPU_ISA=base (read per call, so tests can compare both paths).
bool use_avx2() {
#if SSLOPS_AUGMENT_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* isa = std::getenv("SSLOPS_CPU_ISA");
  return ok && !(isa != nullptr && std::strcmp(isa, "base") == 0);
#else
  return false;
#endif
}

View make_view(int64_t n, int64_t B, const int64_t* crop, const bool* flip, const bool* jitter, const float* bri,
               const float* con, const float* sat, const float* hue_f, const int64_t* order, const bool* gray,
               const float* sigma, const bool* sol) {
  View v;
  v.image = n % B;
  v.top = crop[4 * n];
  v.left = crop[4 * n + 1];
  v.height = crop[4 * n + 2];
  v.width = crop[4 * n + 3];
  v.flip = flip[n];
  v.grayscale = gray[n];
  v.solarize = sol[n];
  v.sigma = sigma[n];
  v.bri = bri[n];
  v.con = con[n];
  v.sat = sat[n];
  v.hue = hue_f[n];
  v.plan = plan_jitter(jitter[n], order + 4 * n, v.bri, v.con, v.sat, v.hue);
  return v;
}

template <typename in_t, typename out_t>
void run(const Config& cfg, const at::Tensor& images, const Params& p, at::Tensor& out) {
  const auto crop = p.crop.contiguous(), order = p.order.contiguous();
  const auto flip = p.flip.contiguous(), jitter = p.jitter.contiguous(), gray = p.grayscale.contiguous();
  const auto sol = p.solarize.contiguous();
  const auto bri = p.brightness.contiguous(), con = p.contrast.contiguous(), sat = p.saturation.contiguous();
  const auto hue_t = p.hue.contiguous(), sigma = p.blur_sigma.contiguous();
  const char* op = "sslops::augment";
  check_values(cfg, crop.data_ptr<int64_t>(), order.data_ptr<int64_t>(), bri.data_ptr<float>(),
               con.data_ptr<float>(), sat.data_ptr<float>(), hue_t.data_ptr<float>(), sigma.data_ptr<float>(), op);
  std::vector<View> views(cfg.N);
  for (int64_t n = 0; n < cfg.N; ++n) {
    views[n] = make_view(n, cfg.B, crop.data_ptr<int64_t>(), flip.data_ptr<bool>(), jitter.data_ptr<bool>(),
                         bri.data_ptr<float>(), con.data_ptr<float>(), sat.data_ptr<float>(), hue_t.data_ptr<float>(),
                         order.data_ptr<int64_t>(), gray.data_ptr<bool>(), sigma.data_ptr<float>(),
                         sol.data_ptr<bool>());
  }
  auto run_views = [&](auto runner) {
    const int64_t N = cfg.N, B = cfg.B, V = N / B;
    if (N >= at::get_num_threads()) {
      // Views in parallel; task t is view t % V of image t / V (an image's views together).
      at::parallel_for(0, N, 1, [&](int64_t a, int64_t e) {
        Workspace ws(cfg);
        for (int64_t t = a; t < e; ++t) {
          const int64_t n = (t % V) * B + t / V;
          runner.view(views[n], n, ws, false);
        }
      });
    } else {
      Workspace ws(cfg);
      for (int64_t n = 0; n < N; ++n) runner.view(views[n], n, ws, true);
    }
  };
  const Strides st{images.stride(0), images.stride(1), images.stride(2), images.stride(3),
                   out.stride(0),    out.stride(1),    out.stride(2),    out.stride(3)};
  const float in_scale = std::is_same<in_t, uint8_t>::value ? 1.0f / 255.0f : 1.0f;
#if SSLOPS_AUGMENT_AVX2
  if (use_avx2()) {
    run_views(avx2::Runner<in_t, out_t>{cfg, images.data_ptr<in_t>(), out.data_ptr<out_t>(), st, in_scale});
    return;
  }
#endif
  run_views(base::Runner<in_t, out_t>{cfg, images.data_ptr<in_t>(), out.data_ptr<out_t>(), st, in_scale});
}

template <typename out_t>
void run_input(const Config& cfg, const at::Tensor& images, const Params& p, at::Tensor& out) {
  switch (images.scalar_type()) {
    case at::kByte:
      return run<uint8_t, out_t>(cfg, images, p, out);
    case at::kFloat:
      return run<float, out_t>(cfg, images, p, out);
    case at::kDouble:
      return run<double, out_t>(cfg, images, p, out);
    case at::kHalf:
      return run<at::Half, out_t>(cfg, images, p, out);
    case at::kBFloat16:
      return run<at::BFloat16, out_t>(cfg, images, p, out);
    default:
      TORCH_CHECK(false, "sslops::augment: unsupported images dtype ", images.scalar_type());
  }
}

at::Tensor augment_cpu(const at::Tensor& images, const at::Tensor& crop, const at::Tensor& flip,
                       const at::Tensor& jitter, const at::Tensor& brightness, const at::Tensor& contrast,
                       const at::Tensor& saturation, const at::Tensor& hue, const at::Tensor& order,
                       const at::Tensor& grayscale, const at::Tensor& blur_sigma, const at::Tensor& solarize,
                       int64_t size, int64_t kernel_size, bool antialias, at::ArrayRef<double> mean,
                       at::ArrayRef<double> std, at::ScalarType out_dtype, bool channels_last) {
  const char* op = "sslops::augment";
  const Params p{crop, flip, jitter, brightness, contrast, saturation, hue, order, grayscale, blur_sigma, solarize};
  const Config cfg = check_inputs(images, p, size, kernel_size, antialias, mean, std, out_dtype, channels_last, op);
  TORCH_CHECK(images.device().is_cpu(), op, ": expected CPU tensors, got images on ", images.device());
  auto out = new_views(cfg, images);
  if (cfg.N == 0) return out;
  switch (out_dtype) {
    case at::kFloat:
      run_input<float>(cfg, images, p, out);
      break;
    case at::kHalf:
      run_input<at::Half>(cfg, images, p, out);
      break;
    default:
      run_input<at::BFloat16>(cfg, images, p, out);
      break;
  }
  return out;
}

}  // namespace
}  // namespace augment

TORCH_LIBRARY_IMPL(sslops, CPU, m) { m.impl("augment", &augment::augment_cpu); }

}  // namespace sslops

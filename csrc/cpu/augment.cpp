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
#include <vector>

#include "common/augment.h"
#include "common/augment_host.h"

namespace sslops {
namespace augment {
namespace {

constexpr int64_t kRowGrain = 4;

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

// ---- row kernels (vectorisable loops) ----

template <typename in_t>
void load_row(const in_t* src, int64_t sc, int64_t sw, int64_t width, float* dst /* (3, width) */) {
  for (int c = 0; c < 3; ++c) {
    const in_t* p = src + c * sc;
    float* d = dst + c * width;
    for (int64_t x = 0; x < width; ++x) d[x] = static_cast<float>(p[x * sw]);
  }
}

// dst[x] = sum_j w[x * T + j] * src[start[x] + j]
void resample_row(const float* src, const Taps& t, int64_t S, float* dst) {
  const int T = t.count;
  const int* st = t.start.data();
  const float* w = t.w.data();
  for (int64_t x = 0; x < S; ++x) {
    const float* s = src + st[x];
    const float* wx = w + x * T;
    float acc = 0.0f;
    for (int j = 0; j < T; ++j) acc += wx[j] * s[j];
    dst[x] = acc;
  }
}

// dst[x] = scale * sum_j w[j] * rows[j][x]; rows j at base + j * stride.
void combine_rows(const float* base, int64_t stride, const float* w, int T, float scale, int64_t S, float* dst) {
  for (int64_t x = 0; x < S; ++x) dst[x] = 0.0f;
  for (int j = 0; j < T; ++j) {
    const float wj = w[j];
    const float* s = base + j * stride;
#pragma omp simd
    for (int64_t x = 0; x < S; ++x) dst[x] += wj * s[x];
  }
  if (scale != 1.0f) {
#pragma omp simd
    for (int64_t x = 0; x < S; ++x) dst[x] *= scale;
  }
}

void jitter_row(int op, float* r, float* g, float* b, int64_t S, const View& v) {
  switch (op) {
    case kBrightness:
#pragma omp simd
      for (int64_t x = 0; x < S; ++x) {
        r[x] = brightness(r[x], v.bri);
        g[x] = brightness(g[x], v.bri);
        b[x] = brightness(b[x], v.bri);
      }
      break;
    case kSaturation:
#pragma omp simd
      for (int64_t x = 0; x < S; ++x) {
        float rr = r[x], gg = g[x], bb = b[x];
        saturation(rr, gg, bb, v.sat);
        r[x] = rr;
        g[x] = gg;
        b[x] = bb;
      }
      break;
    case kHue:
#pragma omp simd
      for (int64_t x = 0; x < S; ++x) {
        float rr = r[x], gg = g[x], bb = b[x];
        hue(rr, gg, bb, v.hue);
        r[x] = rr;
        g[x] = gg;
        b[x] = bb;
      }
      break;
    default:
      break;
  }
}

void contrast_row(float* r, float* g, float* b, int64_t S, float factor, float mean) {
#pragma omp simd
  for (int64_t x = 0; x < S; ++x) {
    float rr = r[x], gg = g[x], bb = b[x];
    contrast(rr, gg, bb, factor, mean);
    r[x] = rr;
    g[x] = gg;
    b[x] = bb;
  }
}

double gray_sum_row(const float* r, const float* g, const float* b, int64_t S) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t x = 0; x < S; ++x) acc += gray(r[x], g[x], b[x]);
  return static_cast<double>(acc);
}

void grayscale_row(float* r, float* g, float* b, int64_t S) {
#pragma omp simd
  for (int64_t x = 0; x < S; ++x) {
    const float l = gray(r[x], g[x], b[x]);
    r[x] = l;
    g[x] = l;
    b[x] = l;
  }
}

// out[x] = sum_j w[j] * pad[x + j]
void blur_row(const float* pad, const float* w, int K, int64_t S, float* out) {
  for (int64_t x = 0; x < S; ++x) out[x] = 0.0f;
  for (int j = 0; j < K; ++j) {
    const float wj = w[j];
    const float* s = pad + j;
#pragma omp simd
    for (int64_t x = 0; x < S; ++x) out[x] += wj * s[x];
  }
}

// Solarize, normalize and store one channel row of view n.
template <typename out_t>
void store_row(const float* v, bool sol, float mean, float std, out_t* out, int64_t sx, int64_t S) {
  if (sol) {
    for (int64_t x = 0; x < S; ++x) out[x * sx] = static_cast<out_t>(normalize(solarize(v[x]), mean, std));
  } else {
    for (int64_t x = 0; x < S; ++x) out[x * sx] = static_cast<out_t>(normalize(v[x], mean, std));
  }
}

template <typename in_t, typename out_t>
struct Runner {
  const Config& cfg;
  const in_t* src;
  int64_t ssB, ssC, ssH, ssW;  // source strides
  out_t* dst;
  int64_t sdN, sdC, sdH, sdW;  // output strides
  float in_scale;

  void store(const View& v, int64_t n, int64_t y, const float* r, const float* g, const float* b) const {
    const float* planes[3] = {r, g, b};
    out_t* o = dst + n * sdN + y * sdH;
    for (int c = 0; c < 3; ++c) store_row(planes[c], v.solarize, cfg.mean[c], cfg.std[c], o + c * sdC, sdW, cfg.S);
  }

  // One view, its stages serial (par = false) or parallel over rows.
  void view(const View& v, int64_t n, Workspace& ws, bool par) const {
    const int64_t S = cfg.S;
    const size_t plane = static_cast<size_t>(S) * S;
    float* R = ws.img.data();
    float* G = R + plane;
    float* B = G + plane;
    ws.cols.build(static_cast<int>(v.width), static_cast<int>(S), cfg.antialias, v.flip);
    ws.rows.build(static_cast<int>(v.height), static_cast<int>(S), cfg.antialias, false);
    const int y_lo = ws.rows.lo(), y_hi = ws.rows.hi();
    const bool blur = v.sigma > 0.0f;
    const bool finish_early = !blur;  // store in the last colour pass

    // 1. horizontal resampling of crop rows [y_lo, y_hi)
    const in_t* img_src = src + v.image * ssB + v.top * ssH + v.left * ssW;
    for_rows(par, y_hi - y_lo, [&](int64_t a, int64_t e) {
      std::vector<float> row(3 * v.width);
      for (int64_t i = a; i < e; ++i) {
        const int64_t y = y_lo + i;
        load_row(img_src + y * ssH, ssC, ssW, v.width, row.data());
        float* out = ws.htmp.data() + static_cast<size_t>(i) * 3 * S;
        for (int c = 0; c < 3; ++c) resample_row(row.data() + c * v.width, ws.cols, S, out + c * S);
      }
    });

    // 2. vertical resampling + jitter ops before contrast (+ the rest when no contrast)
    const int T = ws.rows.count;
    for_rows(par, S, [&](int64_t a, int64_t e) {
      for (int64_t y = a; y < e; ++y) {
        float *r = R + y * S, *g = G + y * S, *b = B + y * S;
        const float* base = ws.htmp.data() + static_cast<size_t>(ws.rows.start[y] - y_lo) * 3 * S;
        const float* w = ws.rows.w.data() + y * T;
        combine_rows(base, 3 * S, w, T, in_scale, S, r);
        combine_rows(base + S, 3 * S, w, T, in_scale, S, g);
        combine_rows(base + 2 * S, 3 * S, w, T, in_scale, S, b);
        for (int k = 0; k < v.plan.n_pre; ++k) jitter_row(v.plan.pre[k], r, g, b, S, v);
        if (v.plan.contrast) {
          ws.rowsum[y] = gray_sum_row(r, g, b, S);
        } else {
          if (v.grayscale) grayscale_row(r, g, b, S);
          if (finish_early) store(v, n, y, r, g, b);
        }
      }
    });

    // 3. contrast (image mean of the gray values), remaining jitter ops, grayscale
    if (v.plan.contrast) {
      double total = 0.0;
      for (int64_t y = 0; y < S; ++y) total += ws.rowsum[y];
      const float mean = static_cast<float>(total / static_cast<double>(S * S));
      for_rows(par, S, [&](int64_t a, int64_t e) {
        for (int64_t y = a; y < e; ++y) {
          float *r = R + y * S, *g = G + y * S, *b = B + y * S;
          contrast_row(r, g, b, S, v.con, mean);
          for (int k = 0; k < v.plan.n_post; ++k) jitter_row(v.plan.post[k], r, g, b, S, v);
          if (v.grayscale) grayscale_row(r, g, b, S);
          if (finish_early) store(v, n, y, r, g, b);
        }
      });
    }
    if (!blur) return;

    // 4. separable gaussian blur (reflect padding), solarize, normalize, store
    const int K = static_cast<int>(cfg.K), rad = K / 2;
    gaussian_weights(K, v.sigma, ws.gauss.data());
    const float* gw = ws.gauss.data();
    float* BR = ws.blur.data();
    for_rows(par, 3 * S, [&](int64_t a, int64_t e) {
      std::vector<float> pad(S + 2 * rad);
      for (int64_t i = a; i < e; ++i) {  // row i of the (3 S, S) stack of planes
        const float* in = R + i * S;
        for (int64_t x = 0; x < S + 2 * rad; ++x) pad[x] = in[reflect(static_cast<int>(x - rad), static_cast<int>(S))];
        blur_row(pad.data(), gw, K, S, BR + i * S);
      }
    });
    for_rows(par, S, [&](int64_t a, int64_t e) {
      std::vector<float> acc(3 * S);
      std::vector<const float*> rows_at(K);
      for (int64_t y = a; y < e; ++y) {
        for (int c = 0; c < 3; ++c) {
          float* o = acc.data() + c * S;
          for (int64_t x = 0; x < S; ++x) o[x] = 0.0f;
          for (int j = 0; j < K; ++j) {
            const float* s = BR + c * plane + reflect(static_cast<int>(y + j - rad), static_cast<int>(S)) * S;
            const float wj = gw[j];
#pragma omp simd
            for (int64_t x = 0; x < S; ++x) o[x] += wj * s[x];
          }
        }
        store(v, n, y, acc.data(), acc.data() + S, acc.data() + 2 * S);
      }
    });
  }
};

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
  Runner<in_t, out_t> runner{cfg,
                             images.data_ptr<in_t>(),
                             images.stride(0),
                             images.stride(1),
                             images.stride(2),
                             images.stride(3),
                             out.data_ptr<out_t>(),
                             out.stride(0),
                             out.stride(1),
                             out.stride(2),
                             out.stride(3),
                             std::is_same<in_t, uint8_t>::value ? 1.0f / 255.0f : 1.0f};
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

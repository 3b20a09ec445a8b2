// CUDA kernel of sslops::augment: resized crop, flip, colour jitter in a
// per-view order, grayscale, gaussian blur, solarize and normalize, fused.
// The per-pixel math is csrc/common/augment.h (shared with the CPU kernel).
//
// Four launches, none of which writes an image-sized intermediate:
//
//   prep_kernel      <<<N, 256>>>        per view: the resampling taps of its
//                    crop (rows, and columns with the flip folded in) and its
//                    gaussian weights, into a small workspace
//                    (N x 2 x size x taps floats + N x kernel_size).
//   contrast_kernel  <<<min(N x bands, SMs x 4), 256>>> over the (view, band)
//                    items of the views whose jitter has a contrast factor
//                    != 1 (the others are skipped): contrast blends with the mean gray
//                    value of the image *after the ops that precede it* in the
//                    view's order.  Each block recomputes kBandRows rows of
//                    that intermediate on the fly (resample from the source,
//                    which stays in L2, then the preceding point-wise ops) and
//                    writes one partial sum of gray(r, g, b) per (view, band);
//                    the main kernel sums a view's partials in a fixed order:
//                    deterministic, no atomics, no fp32 intermediate image.
//   main_kernel      <<<(N, tiles x, tiles y), 256>>> twice: the views without
//                    blur (no shared memory), then those with blur; one 32 x 32
//                    output tile of one view per block.  Without blur, each thread computes
//                    its pixels start to end (resample, flip, jitter, grayscale,
//                    solarize, normalize) and stores them.  With blur, the block
//                    first computes the pre-blur pixels of the tile plus a halo
//                    of kernel_size // 2 into shared memory (border tiles
//                    reflect by index arithmetic: pixel reflect(i) is computed
//                    directly, no padding pass), blurs the rows into a second
//                    shared buffer, then the columns, and finishes as above.
//
// Outputs: float32, float16 or bfloat16, NCHW or channels_last strides.
// Inputs: uint8 or floating, any strides.  Crops are clamped to the image in
// the kernels, so a direct call with bad crops cannot read out of bounds (the
// Python layer rejects them with a clear error before launching).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/augment.h"
#include "common/augment_host.h"
#include "cuda/ptx.cuh"

namespace sslops {
namespace augment {
namespace {

constexpr int kTile = 32;       // output tile side of main_kernel
constexpr int kThreads = 256;   // threads per block of every kernel
constexpr int kBandRows = 8;    // rows per block of contrast_kernel
// Blocks per SM the main and contrast kernels are register-limited to (ptxas
// caps them at 65536 / (kThreads * kMinBlocks) registers per thread).
constexpr int kMinBlocks = 4;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Device-side view of the call.
struct Args {
  int64_t B, H, W;
  int S, K, T;  // output side, gaussian kernel size, taps per output sample
  bool antialias;
  float in_scale;
  float mean[3], inv_std[3], std[3];
  // source strides (elements)
  int64_t sB, sC, sH, sW;
  // output strides (elements)
  int64_t oN, oC, oH, oW;
  // parameters (N rows)
  const int64_t* crop;
  const bool* flip;
  const bool* jitter;
  const float* bri;
  const float* con;
  const float* sat;
  const float* hue;
  const int64_t* order;
  const bool* gray;
  const float* sigma;
  const bool* sol;
  // workspace
  float* taps_w;    // (N, 2, S, T): [0] rows, [1] columns
  int* taps_i;      // (N, 2, S, 2): start, count
  float* gauss;     // (N, K)
  float* partial;   // (N, bands)
  int bands;
};

struct Crop {
  int top, left, height, width;
};

// The view's crop, clamped to the image (memory safety only: valid crops pass unchanged).
__device__ __forceinline__ Crop view_crop(const Args& a, int64_t n) {
  const int64_t* c = a.crop + 4 * n;
  Crop r;
  r.top = static_cast<int>(min(max(c[0], int64_t(0)), a.H - 1));
  r.left = static_cast<int>(min(max(c[1], int64_t(0)), a.W - 1));
  r.height = static_cast<int>(min(max(c[2], int64_t(1)), a.H - r.top));
  r.width = static_cast<int>(min(max(c[3], int64_t(1)), a.W - r.left));
  return r;
}

// What one block needs of its view, loaded once (registers) instead of per pixel.
template <typename in_t>
struct View {
  int64_t n;
  const in_t* img;  // the view's source image, moved to its crop's top-left corner
  JitterPlan plan;
  float bri, con, sat, hue;
};

template <typename in_t>
__device__ __forceinline__ View<in_t> load_view(const Args& a, const in_t* __restrict__ src, int64_t n) {
  View<in_t> v;
  v.n = n;
  const Crop c = view_crop(a, n);
  v.img = src + (n % a.B) * a.sB + static_cast<int64_t>(c.top) * a.sH + static_cast<int64_t>(c.left) * a.sW;
  v.bri = a.bri[n];
  v.con = a.con[n];
  v.sat = a.sat[n];
  v.hue = a.hue[n];
  v.plan = plan_jitter(a.jitter[n], a.order + 4 * n, v.bri, v.con, v.sat, v.hue);
  return v;
}

// ---- 1. taps and gaussian weights ----
__global__ void prep_kernel(Args a) {
  const int64_t n = blockIdx.x;
  const Crop c = view_crop(a, n);
  const bool flip = a.flip[n];
  const int S = a.S, T = a.T;
  for (int i = threadIdx.x; i < 2 * S; i += blockDim.x) {
    const int axis = i / S;  // 0 rows, 1 columns
    const int o = i % S;
    const int in_size = axis == 0 ? c.height : c.width;
    const int dst = (axis == 1 && flip) ? S - 1 - o : o;
    const int64_t slot = (n * 2 + axis) * S + dst;
    float* w = a.taps_w + slot * T;
    int start = 0;
    const int count = resample_taps(o, in_size, S, a.antialias, T, &start, w);
    for (int j = count; j < T; ++j) w[j] = 0.0f;
    a.taps_i[slot * 2] = start;
    a.taps_i[slot * 2 + 1] = count;
  }
  if (threadIdx.x == 0) {
    const float s = a.sigma[n];
    if (s > 0.0f) gaussian_weights(a.K, s, a.gauss + n * a.K);
  }
}

// Resampled pixel (y, x) of a view on the [0, 1] scale (the flip is in the column taps).
// Offsets inside one image are int32 (the host checks that they fit): fewer registers.
template <typename in_t>
__device__ __forceinline__ void resample_pixel(const Args& a, const View<in_t>& v, int y, int x, float& r, float& g,
                                               float& b) {
  const int64_t rs = (v.n * 2 + 0) * a.S + y;
  const int64_t cs = (v.n * 2 + 1) * a.S + x;
  const int y0 = a.taps_i[rs * 2], ny = a.taps_i[rs * 2 + 1];
  const int x0 = a.taps_i[cs * 2], nx = a.taps_i[cs * 2 + 1];
  const float* wy = a.taps_w + rs * a.T;
  const float* wx = a.taps_w + cs * a.T;
  const int sH = static_cast<int>(a.sH), sW = static_cast<int>(a.sW), sC = static_cast<int>(a.sC);
  const in_t* img = v.img + (y0 * sH + x0 * sW);
  float ar = 0.0f, ag = 0.0f, ab = 0.0f;
  for (int i = 0; i < ny; ++i) {
    float rr = 0.0f, rg = 0.0f, rb = 0.0f;
    for (int j = 0; j < nx; ++j) {
      const in_t* p = img + (i * sH + j * sW);
      const float w = wx[j];
      rr += w * static_cast<float>(p[0]);
      rg += w * static_cast<float>(p[sC]);
      rb += w * static_cast<float>(p[2 * sC]);
    }
    const float w = wy[i];
    ar += w * rr;
    ag += w * rg;
    ab += w * rb;
  }
  r = ar * a.in_scale;
  g = ag * a.in_scale;
  b = ab * a.in_scale;
}

// ops: n_ops op codes packed 2 bits each (JitterPlan): shifts, no local array.
__device__ __forceinline__ void apply_ops(int ops, int n_ops, float& r, float& g, float& b, float bri, float sat,
                                          float hue_f) {
  for (int k = 0; k < n_ops; ++k) pointwise_jitter((ops >> (2 * k)) & 3, r, g, b, bri, sat, hue_f);
}

// The pre-blur pixel: resample, jitter (contrast with the precomputed mean), grayscale.
template <typename in_t>
__device__ __forceinline__ void preblur_pixel(const Args& a, const View<in_t>& v, float cmean, bool to_gray, int y,
                                              int x, float& r, float& g, float& b) {
  resample_pixel(a, v, y, x, r, g, b);
  apply_ops(v.plan.pre, v.plan.n_pre, r, g, b, v.bri, v.sat, v.hue);
  if (v.plan.contrast) {
    contrast(r, g, b, v.con, cmean);
    apply_ops(v.plan.post, v.plan.n_post, r, g, b, v.bri, v.sat, v.hue);
  }
  if (to_gray) {
    const float l = gray(r, g, b);
    r = l;
    g = l;
    b = l;
  }
}

template <typename out_t>
__device__ __forceinline__ void store_pixel(const Args& a, out_t* __restrict__ out, int y, int x, bool sol, float r,
                                            float g, float b) {
  if (sol) {
    r = solarize(r);
    g = solarize(g);
    b = solarize(b);
  }
  // out: the view's first element; offsets inside one view fit in int32 (S <= 8192)
  out_t* o = out + (y * static_cast<int>(a.oH) + x * static_cast<int>(a.oW));
  const int oC = static_cast<int>(a.oC);
  o[0] = static_cast<out_t>(normalize(r, a.mean[0], a.std[0]));
  o[oC] = static_cast<out_t>(normalize(g, a.mean[1], a.std[1]));
  o[2 * oC] = static_cast<out_t>(normalize(b, a.mean[2], a.std[2]));
}

// ---- 2. contrast means ----
// A persistent grid of at most one wave of resident blocks (contrast_blocks)
// walks the (view, band) items, band fastest; items of views without
// contrast are skipped with one flag test (no block, no partial sum written:
// the main kernel reads none for them).  Which views have contrast is only
// known on the device, so the launch itself cannot be skipped without a host
// sync, but a batch without contrast costs about one wave of blocks that each
// test a few flags, not N x bands blocks.  Every item is summed by one block
// in a fixed order, so the partials do not depend on the grid.
template <typename in_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks) contrast_kernel(Args a, const in_t* __restrict__ src,
                                                                        int64_t items) {
  SSLOPS_SHARED(float, warp_sums, [kThreads / 32]);
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t n = w / a.bands;
    if (!(a.jitter[n] && a.con[n] != 1.0f)) continue;  // = plan.contrast, block-uniform
    const int band = static_cast<int>(w % a.bands);
    const View<in_t> v = load_view(a, src, n);
    float acc = 0.0f;
    const int y0 = band * kBandRows;
    const int rows = min(kBandRows, a.S - y0);
    for (int i = threadIdx.x; i < rows * a.S; i += blockDim.x) {
      const int y = y0 + i / a.S, x = i % a.S;
      float r, g, b;
      resample_pixel(a, v, y, x, r, g, b);
      apply_ops(v.plan.pre, v.plan.n_pre, r, g, b, v.bri, v.sat, v.hue);
      acc += gray(r, g, b);
    }
    // Block reduction in a fixed order.
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f;
      for (int k = 0; k < kThreads / 32; ++k) total += warp_sums[k];
      a.partial[n * a.bands + band] = total;
    }
    __syncthreads();  // warp_sums is rewritten by the next item
  }
}

// Blocks of contrast_kernel: one wave of resident blocks (kMinBlocks per SM),
// fewer for small batches.
int64_t contrast_blocks(int64_t items) {
  const int64_t wave = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * kMinBlocks;
  return std::max<int64_t>(1, std::min(items, wave));
}

// ---- 3. the views ----
// Launched twice: blur_pass = false for the views without blur (no shared
// memory, so they are not limited by the blur's ~56 KB per block), then true
// for the views with blur; in each launch the other views' blocks exit at once.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    main_kernel(Args a, const in_t* __restrict__ src, out_t* __restrict__ out, bool blur_pass) {
  SSLOPS_DYNAMIC_SHARED(float, smem, 16);
  const int64_t n = blockIdx.x;
  const float sigma = a.sigma[n];
  if ((sigma > 0.0f) != blur_pass) return;
  const int S = a.S;
  const int oy0 = blockIdx.z * kTile, ox0 = blockIdx.y * kTile;  // tile row on z, column on y
  const View<in_t> v = load_view(a, src, n);
  const bool to_gray = a.gray[n], sol = a.sol[n];
  out += n * a.oN;
  float cmean = 0.0f;
  if (v.plan.contrast) {
    double total = 0.0;  // the same fixed order in every block of the view
    for (int i = 0; i < a.bands; ++i) total += a.partial[n * a.bands + i];
    cmean = static_cast<float>(total / (static_cast<double>(S) * S));
  }

  if (!blur_pass) {
    for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
      const int y = oy0 + i / kTile, x = ox0 + i % kTile;
      if (y >= S || x >= S) continue;
      float r, g, b;
      preblur_pixel(a, v, cmean, to_gray, y, x, r, g, b);
      store_pixel(a, out, y, x, sol, r, g, b);
    }
    return;
  }

  // Blurred view: pre-blur tile + halo in shared memory, then rows, then columns.
  const int rad = a.K / 2;
  const int ext = kTile + 2 * rad;
  float* pre = smem;                     // (3, ext, ext)
  float* hor = smem + 3 * ext * ext;     // (3, ext, kTile)
  float* gw = hor + 3 * ext * kTile;     // (K)
  for (int j = threadIdx.x; j < a.K; j += blockDim.x) gw[j] = a.gauss[n * a.K + j];
  for (int i = threadIdx.x; i < ext * ext; i += blockDim.x) {
    const int ey = i / ext, ex = i % ext;
    // Positions only tiles overhanging the image need are clamped to the reflect range.
    const int y = reflect(min(max(oy0 - rad + ey, -rad), S - 1 + rad), S);
    const int x = reflect(min(max(ox0 - rad + ex, -rad), S - 1 + rad), S);
    float r, g, b;
    preblur_pixel(a, v, cmean, to_gray, y, x, r, g, b);
    pre[i] = r;
    pre[ext * ext + i] = g;
    pre[2 * ext * ext + i] = b;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 3 * ext * kTile; i += blockDim.x) {
    const int ch = i / (ext * kTile), rem = i % (ext * kTile);
    const int ey = rem / kTile, tx = rem % kTile;
    const float* row = pre + ch * ext * ext + ey * ext + tx;
    float acc = 0.0f;
    for (int j = 0; j < a.K; ++j) acc += gw[j] * row[j];
    hor[i] = acc;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
    const int ty = i / kTile, tx = i % kTile;
    const int y = oy0 + ty, x = ox0 + tx;
    if (y >= S || x >= S) continue;
    float v3[3];
    for (int ch = 0; ch < 3; ++ch) {
      const float* col = hor + ch * ext * kTile + ty * kTile + tx;
      float acc = 0.0f;
      for (int j = 0; j < a.K; ++j) acc += gw[j] * col[j * kTile];
      v3[ch] = acc;
    }
    store_pixel(a, out, y, x, sol, v3[0], v3[1], v3[2]);
  }
}

size_t blur_smem_bytes(int K) {
  const size_t ext = kTile + 2 * (K / 2);
  return (3 * ext * ext + 3 * ext * kTile + K) * sizeof(float);
}

template <typename in_t, typename out_t>
void launch(const Args& a, int64_t N, const at::Tensor& images, at::Tensor& out, cudaStream_t stream) {
  const in_t* src = images.data_ptr<in_t>();
  out_t* dst = out.data_ptr<out_t>();
  SSLOPS_LAUNCH(prep_kernel, static_cast<unsigned>(N), kThreads, 0, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t items = N * a.bands;
  SSLOPS_LAUNCH(contrast_kernel<in_t>, static_cast<unsigned>(contrast_blocks(items)), kThreads, 0, stream, a, src,
                items);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t smem = blur_smem_bytes(a.K);
  auto kernel = main_kernel<in_t, out_t>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  // views on x (up to 2^31 - 1), tile columns on y, tile rows on z (each <= 65535)
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(ceil_div(a.S, kTile)),
                  static_cast<unsigned>(ceil_div(a.S, kTile)));
  SSLOPS_LAUNCH(kernel, grid, kThreads, 0, stream, a, src, dst, false);  // views without blur
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  SSLOPS_LAUNCH(kernel, grid, kThreads, smem, stream, a, src, dst, true);  // views with blur
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename out_t>
void launch_input(const Args& a, int64_t N, const at::Tensor& images, at::Tensor& out, cudaStream_t stream) {
  switch (images.scalar_type()) {
    case at::kByte:
      return launch<uint8_t, out_t>(a, N, images, out, stream);
    case at::kFloat:
      return launch<float, out_t>(a, N, images, out, stream);
    case at::kDouble:
      return launch<double, out_t>(a, N, images, out, stream);
    case at::kHalf:
      return launch<at::Half, out_t>(a, N, images, out, stream);
    case at::kBFloat16:
      return launch<at::BFloat16, out_t>(a, N, images, out, stream);
    default:
      TORCH_CHECK(false, "sslops::augment: unsupported images dtype ", images.scalar_type());
  }
}

at::Tensor augment_cuda(const at::Tensor& images, const at::Tensor& crop, const at::Tensor& flip,
                        const at::Tensor& jitter, const at::Tensor& brightness, const at::Tensor& contrast_f,
                        const at::Tensor& saturation, const at::Tensor& hue_f, const at::Tensor& order,
                        const at::Tensor& grayscale, const at::Tensor& blur_sigma, const at::Tensor& solarize_f,
                        int64_t size, int64_t kernel_size, bool antialias, at::ArrayRef<double> mean,
                        at::ArrayRef<double> std, at::ScalarType out_dtype, bool channels_last) {
  const char* op = "sslops::augment";
  const Params p{crop, flip, jitter, brightness, contrast_f, saturation, hue_f, order, grayscale, blur_sigma,
                 solarize_f};
  const Config cfg = check_inputs(images, p, size, kernel_size, antialias, mean, std, out_dtype, channels_last, op);
  TORCH_CHECK(on_cuda_device(images), op, ": expected CUDA tensors, got images on ", images.device());
  const c10::cuda::CUDAGuard guard(images.device());
  auto out = new_views(cfg, images);
  const int64_t N = cfg.N;
  if (N == 0) return out;
  TORCH_CHECK(cfg.S <= 8192 && cfg.N < (int64_t(1) << 31) && cfg.H < (int64_t(1) << 30) &&
                  cfg.W < (int64_t(1) << 30),
              op, ": sizes too large for the CUDA kernel (size <= 8192)");
  // Offsets inside one source image are int32 in the kernels.
  const int64_t span = 2 * std::abs(images.stride(1)) + (cfg.H - 1) * std::abs(images.stride(2)) +
                       (cfg.W - 1) * std::abs(images.stride(3));
  TORCH_CHECK(span < (int64_t(1) << 31), op, ": one image spans ", span,
              " elements (strides ", images.strides(), "); the CUDA kernel needs < 2^31: use backend='cpu'");
  const size_t smem = blur_smem_bytes(static_cast<int>(cfg.K));
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem <= prop->sharedMemPerBlockOptin, op, ": kernel_size ", cfg.K,
              " needs more shared memory than this GPU has per block (", smem, " > ", prop->sharedMemPerBlockOptin,
              " bytes); use a smaller kernel_size or backend='cpu'");

  const int S = static_cast<int>(cfg.S);
  const int T = max_taps(static_cast<int>(std::max(cfg.H, cfg.W)), S, cfg.antialias);
  const int bands = static_cast<int>(ceil_div(S, kBandRows));
  const auto fopts = images.options().dtype(at::kFloat);
  auto taps_w = at::empty({N, 2, S, T}, fopts);
  auto taps_i = at::empty({N, 2, S, 2}, images.options().dtype(at::kInt));
  auto gauss = at::empty({N, cfg.K}, fopts);
  auto partial = at::empty({N, bands}, fopts);

  const auto crop_c = crop.contiguous(), order_c = order.contiguous();
  const auto flip_c = flip.contiguous(), jit_c = jitter.contiguous(), gray_c = grayscale.contiguous();
  const auto sol_c = solarize_f.contiguous(), bri_c = brightness.contiguous(), con_c = contrast_f.contiguous();
  const auto sat_c = saturation.contiguous(), hue_c = hue_f.contiguous(), sig_c = blur_sigma.contiguous();

  Args a{};
  a.B = cfg.B;
  a.H = cfg.H;
  a.W = cfg.W;
  a.S = S;
  a.K = static_cast<int>(cfg.K);
  a.T = T;
  a.antialias = cfg.antialias;
  a.in_scale = images.scalar_type() == at::kByte ? 1.0f / 255.0f : 1.0f;
  for (int ch = 0; ch < 3; ++ch) {
    a.mean[ch] = cfg.mean[ch];
    a.std[ch] = cfg.std[ch];
    a.inv_std[ch] = 1.0f / cfg.std[ch];
  }
  a.sB = images.stride(0);
  a.sC = images.stride(1);
  a.sH = images.stride(2);
  a.sW = images.stride(3);
  a.oN = out.stride(0);
  a.oC = out.stride(1);
  a.oH = out.stride(2);
  a.oW = out.stride(3);
  a.crop = crop_c.data_ptr<int64_t>();
  a.flip = flip_c.data_ptr<bool>();
  a.jitter = jit_c.data_ptr<bool>();
  a.bri = bri_c.data_ptr<float>();
  a.con = con_c.data_ptr<float>();
  a.sat = sat_c.data_ptr<float>();
  a.hue = hue_c.data_ptr<float>();
  a.order = order_c.data_ptr<int64_t>();
  a.gray = gray_c.data_ptr<bool>();
  a.sigma = sig_c.data_ptr<float>();
  a.sol = sol_c.data_ptr<bool>();
  a.taps_w = taps_w.data_ptr<float>();
  a.taps_i = taps_i.data_ptr<int>();
  a.gauss = gauss.data_ptr<float>();
  a.partial = partial.data_ptr<float>();
  a.bands = bands;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (out_dtype) {
    case at::kFloat:
      launch_input<float>(a, N, images, out, stream);
      break;
    case at::kHalf:
      launch_input<at::Half>(a, N, images, out, stream);
      break;
    default:
      launch_input<at::BFloat16>(a, N, images, out, stream);
      break;
  }
  return out;
}

}  // namespace
}  // namespace augment

SSLOPS_CUDA_LIBRARY_IMPL(m) { m.impl("augment", &augment::augment_cuda); }

}  // namespace sslops

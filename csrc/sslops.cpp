// Every operator schema of sslops lives in this one TORCH_LIBRARY block.
// Kernels are registered per device in csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cu (CUDA); fake (meta) kernels and autograd are registered in
// Python (sslops/<op>.py).  A CPU-only build simply lacks the CUDA kernels.
// The CUDA emulator compiles this file again with SSLOPS_NS=sslops_emu
// (common/library.h): the same schemas, defined once, in its own namespace.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "common/library.h"

#ifndef SSLOPS_WITH_CUDA
#define SSLOPS_WITH_CUDA 0
#endif

#ifndef SSLOPS_EMU
extern "C" {
// `import sslops._C` loads this shared object, which runs the static
// registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

// The kernel images of the CUDA build, e.g. "sm_80,sm_90,compute_90" (setup.py
// passes them from TORCH_CUDA_ARCH_LIST); empty without CUDA.
#ifndef SSLOPS_CUDA_ARCHS
#define SSLOPS_CUDA_ARCHS
#endif
#define SSLOPS_STR_(...) #__VA_ARGS__
#define SSLOPS_STR(...) SSLOPS_STR_(__VA_ARGS__)

namespace sslops {
static bool cuda_built() { return SSLOPS_WITH_CUDA != 0; }
static std::string cuda_archs() { return SSLOPS_STR(SSLOPS_CUDA_ARCHS); }

// SimCLR's case of nt_xent_lse: q = c = z, each row leaves out itself.  One
// device-generic kernel that calls the per-device nt_xent_lse; it exists as an
// op of its own so that its autograd can use nt_xent_lse_backward_sym.
static at::Tensor nt_xent_lse_sym(const at::Tensor& z, double inv_temp) {
  TORCH_CHECK(z.dim() == 2, "sslops::nt_xent_lse_sym: z must be 2-D (M, D), got shape ", z.sizes());
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(SSLOPS_QUALIFIED("nt_xent_lse"), "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // autograd is this op's, not nt_xent_lse's
  return op.call(z, z, at::arange(z.size(0), z.options().dtype(at::kLong)), inv_temp);
}
#ifndef SSLOPS_EMU
// csrc/cpu/attention.cpp: the CPU row-loop build attention uses now.
std::string attention_cpu_isa();
#endif
}  // namespace sslops

SSLOPS_LIBRARY(m) {
  // Whether this build compiled the CUDA kernels.
  m.def("_cuda_built() -> bool", &sslops::cuda_built);
  // The GPU code it holds: "sm_XY" kernel images and "compute_XY" PTX, comma-separated.
  m.def("_cuda_archs() -> str", &sslops::cuda_archs);

  // ---- nt_xent / info_nce (csrc/cpu/nt_xent.cpp, csrc/cuda/nt_xent.cu) ----
  // lse[i] = logsumexp_{j != exclude[i]} inv_temp * <q[i], c[j]>, never building
  // the (M, Kc) matrix.  q (M, D), c (Kc, D): same floating dtype and device.
  // exclude: optional int64 (M,), a column per row to leave out, -1 for none.
  // Returns (M,) float32 (float64 for float64 inputs).
  m.def("nt_xent_lse(Tensor q, Tensor c, Tensor? exclude, float inv_temp) -> Tensor");
  // Gradients of sum_i grad_lse[i] * lse[i] with respect to q and c.
  m.def(
      "nt_xent_lse_backward(Tensor grad_lse, Tensor q, Tensor c, Tensor? exclude, Tensor lse, "
      "float inv_temp) -> (Tensor, Tensor)");
  // Same for q = c = z with exclude[i] = i (SimCLR): the total gradient w.r.t. z,
  // inv_temp * (A + A^T) z with A[i, j] = grad_lse[i] * softmax_i(j).
  m.def("nt_xent_lse_backward_sym(Tensor grad_lse, Tensor z, Tensor lse, float inv_temp) -> Tensor");
  // nt_xent_lse(z, z, arange(M), inv_temp); autograd uses the _sym backward.
  m.def("nt_xent_lse_sym(Tensor z, float inv_temp) -> Tensor");

  // ---- sup_con (csrc/cpu/sup_con.cpp; math: csrc/common/sup_con.h) ----
  // Per-row statistics of SupCon / multi-view SimCLR over x_ij = inv_temp * <z_i, z_j>, never
  // building the (N, N) matrix (the contract of sslops::sup_con_stats_triton, sslops/sup_con.py).
  // z (N, D) floating (CPU: float32/float64), labels (N,) int64 on z's device.  Row i's candidates
  // are the columns j != i, its positives P(i) the candidates with labels[j] == labels[i].
  // Returns (4, N), float32 (float64 for float64 z), per row i:
  //   0: lse_i  = log sum_{j != i} exp(x_ij)   (-inf when N == 1)
  //   1: lpos_i = log sum_{p in P(i)} exp(x_ip) (-inf when P(i) is empty)
  //   2: psum_i = sum_{p in P(i)} x_ip          3: cnt_i = |P(i)|
  m.def("sup_con_stats(Tensor z, Tensor labels, float inv_temp) -> Tensor");
  // Gradient w.r.t. z of sum(grad_stats * stats), grad_stats (4, N) (its row 3, cnt, is ignored),
  // stats the forward's: inv_temp * (W + W^T) z with
  // W_ij = g0_i exp(x_ij - lse_i) + [j in P(i)] (g1_i exp(x_ij - lpos_i) + g2_i).
  m.def("sup_con_stats_backward(Tensor grad_stats, Tensor z, Tensor labels, Tensor stats, float inv_temp) -> Tensor");

  // ---- masking (csrc/cpu/masking.cpp, csrc/cuda/masking.cu) ----
  // Token layout: L = P + N rows per sample, P = num_prefix_tokens prefix rows
  // (cls / registers, never masked) then N patch rows; index tensors (int32 or
  // int64) address patch rows, values in [0, N).  Outputs keep x's dtype.
  // out (B, P + K, D): prefix rows, then x[b, P + ids_keep[b, k]]; pos_embed
  // ((1 or B), L, D), when given, is added to each picked row in the same pass.
  m.def("gather_tokens(Tensor x, Tensor ids_keep, Tensor? pos_embed, int num_prefix_tokens) -> Tensor");
  // grad_x (B, seq_len, D) of gather_tokens: grad rows scattered back (summed
  // where ids repeat), zeros elsewhere.  No atomics: deterministic.
  m.def("gather_tokens_backward(Tensor grad, Tensor ids_keep, int seq_len, int num_prefix_tokens) -> Tensor");
  // out (B, P + N, D), N = ids_restore.size(1): MAE's decoder un-shuffle,
  // cat([x_visible[:, P:], mask_token.expand(B, N - K, D)], 1).gather(1, ids_restore)
  // behind the P prefix rows of x_visible (B, P + K, D).  mask_token (D,).
  m.def("restore_tokens(Tensor x_visible, Tensor ids_restore, Tensor mask_token, int num_prefix_tokens) -> Tensor");
  // (grad_x_visible (B, P + K, D), grad_mask_token (D,)) of restore_tokens, K = num_visible.
  m.def(
      "restore_tokens_backward(Tensor grad, Tensor ids_restore, int num_visible, int num_prefix_tokens) "
      "-> (Tensor, Tensor)");

  // ---- augment (csrc/cpu/augment.cpp, csrc/cuda/augment.cu) ----
  // N = V * B per-view parameters (row n cuts image n % B; see sslops/augment):
  // resized crop + flip + colour jitter in a per-view order + grayscale +
  // gaussian blur + solarize + normalize, fused.  images: uint8 (0..255) or
  // floating (0..1) (B, 3, H, W), any strides.  Returns (N, 3, size, size) in
  // out_dtype (float32/float16/bfloat16), channels_last strides if asked.
  m.def(
      "augment(Tensor images, Tensor crop, Tensor flip, Tensor jitter, Tensor brightness, Tensor contrast, "
      "Tensor saturation, Tensor hue, Tensor order, Tensor grayscale, Tensor blur_sigma, Tensor solarize, "
      "int size, int kernel_size, bool antialias, float[] mean, float[] std, ScalarType out_dtype, "
      "bool channels_last) -> Tensor");

  // ---- attention (csrc/cpu/attention.cpp, csrc/cuda/attention.cu; math: csrc/common/attention.h) ----
  // out = softmax(scale * q k^T [causal mask]) v, exact, never materialising the scores; the forward
  // returns the per-row logsumexp lse, the only thing the backward needs besides q, k, v, out.
  // Layout contract (allocation: csrc/common/attention_host.h; fake kernels: sslops/attention.py):
  //  dense  (cu_seqlens_q = cu_seqlens_k = None): q (B, H, Lq, D), k and v (B, H, Lk, D), any strides
  //         (slices of a packed qkv read in place; a kernel may copy an operand whose D stride is not 1).
  //         max_seqlen_q/k are ignored.  out (B, H, Lq, D) is a contiguous (B, Lq, H, D) buffer
  //         transposed, so out.transpose(1, 2).reshape(B, Lq, H * D) is a view; lse (B, H, Lq) contiguous.
  //  varlen (both given): q (Tq, H, D), k and v (Tk, H, D) (any strides), FlashAttention's convention:
  //         sequence b owns rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1; cu_seqlens int32 (N + 1,) on q's
  //         device, cu[0] = 0, non-decreasing, cu[N] = T; max_seqlen_q/k bound every sequence's length (GPU
  //         grids are sized by them).  out (Tq, H, D) contiguous; lse (H, Tq) contiguous.
  //  q, k, v: one floating dtype and device, same H and D.  CPU: float32/float64; CUDA: fp16/bf16/fp32.
  //  lse: float32 (float64 for float64 inputs); out: q's dtype.  A row with no key (Lk = 0): out 0, lse -inf.
  //  scale: finite (the Python API defaults it to 1/sqrt(D)).  causal: SDPA's convention, aligned top-left:
  //         query row i (within its sequence) sees keys j <= i, also when Lq != Lk (FlashAttention >= 2.1
  //         aligns bottom-right instead; the two agree when Lq == Lk).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale, bool causal) -> (Tensor out, Tensor lse)");
  // Gradients of sum(grad_out * out) with respect to q, k, v (lse is not differentiable), from the forward's
  // out and lse; arguments as attention_fwd's, grad_out of out's shape (any strides).  dq, dk, dv have q's,
  // k's, v's shapes; each is contiguous when its input is (no layout copy in a leaf's AccumulateGrad), else
  // dense (B, H, L, D) = contiguous (B, L, H, D) transposed (out's layout), varlen contiguous (T, H, D).
  // Deterministic (no atomics).
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, bool causal) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
#ifndef SSLOPS_EMU
  // Test hook: the CPU row-loop build (DEFAULT, AVX2, AVX512) attention uses now (SSLOPS_CPU_ISA caps it).
  m.def("_attention_cpu_isa() -> str", &sslops::attention_cpu_isa);
#endif
}

SSLOPS_LIBRARY_IMPL(CompositeExplicitAutograd, m) {
  m.impl("nt_xent_lse_sym", &sslops::nt_xent_lse_sym);
}

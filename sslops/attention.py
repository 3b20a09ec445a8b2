"""Exact flash-style attention for ViT pretraining (short sequences first).

``softmax(scale * q k^T) v`` without materialising the (Lq, Lk) scores: the
fused backends walk key tiles with an online softmax and save only the output
and one logsumexp per row; the backward recomputes the probabilities.

Entry points (shape-annotated like flash-attention's interface):

* :func:`attention`            q (B, H, Lq, D), k/v (B, H, Lk, D): SDPA's layout
* :func:`attention_qkvpacked`  qkv (B, L, 3 * H * D) straight from a ``qkv`` Linear
* :func:`attention_varlen`     packed (T, H, D) tokens + FlashAttention's cu_seqlens

All run on the compiled ops ``sslops::attention_fwd`` / ``attention_bwd``
(schemas and layout contract: csrc/sslops.cpp) or their Triton twins
``sslops::attention_fwd_triton`` / ``attention_bwd_triton`` (same signatures,
same fake kernels), or on plain PyTorch (``reference``).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import _backend, _checks, reference

# Head dims the fused GPU kernels support (the CPU kernel and the reference
# take any).  csrc/cuda/attention.cu instantiates exactly CUDA_HEAD_DIMS.
TRITON_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
CUDA_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
# The CUDA kernel runs fp16/bf16 on tensor cores (mma.sync, fp32 accumulation);
# float32 on a GPU runs on the Triton kernel (auto picks it), which computes fp32.
CUDA_DTYPES = (torch.float16, torch.bfloat16)

_backend.register_op(
    "attention",
    compiled=("attention_fwd", "attention_bwd"),
    triton=True,
    dtypes={
        "triton": (torch.float32, torch.float16, torch.bfloat16),
        "cuda": CUDA_DTYPES,
        "emu": CUDA_DTYPES,  # the same CUDA kernel under the CPU emulator (tests only)
    },
    head_dims={"triton": TRITON_HEAD_DIMS, "cuda": CUDA_HEAD_DIMS, "emu": CUDA_HEAD_DIMS},
)


# ----------------------------------------------------------------------------
# Fake kernels and autograd (shared by the compiled ops and the Triton ops)
# ----------------------------------------------------------------------------
def _lse_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    if cu_seqlens_q is not None:  # varlen: out (Tq, H, D), lse (H, Tq)
        T, H, D = q.shape
        return q.new_empty((T, H, D)), q.new_empty((H, T), dtype=_lse_dtype(q))
    B, H, L, D = q.shape  # dense: out = contiguous (B, L, H, D) transposed, lse (B, H, L)
    return q.new_empty((B, L, H, D)).transpose(1, 2), q.new_empty((B, H, L), dtype=_lse_dtype(q))


def _grad_like(x: Tensor, varlen: bool) -> Tensor:
    # contiguous where x is, else (dense) a contiguous (B, L, H, D) transposed: csrc/common/attention_host.h
    if varlen or x.is_contiguous():
        return x.new_empty(x.shape)
    B, H, L, D = x.shape
    return x.new_empty((B, L, H, D)).transpose(1, 2)


def _fake_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    varlen = cu_seqlens_q is not None
    return _grad_like(q, varlen), _grad_like(k, varlen), _grad_like(v, varlen)


torch.library.register_fake("sslops::attention_fwd")(_fake_fwd)
torch.library.register_fake("sslops::attention_bwd")(_fake_bwd)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal)
    ctx.mark_non_differentiable(lse)


def _make_backward(bwd):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 9
        dq, dk, dv = bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None

    return backward


@_backend.compiled_namespace_setup  # sslops, and sslops_emu (the CUDA emulator) when it loads
def _register_autograd(ns: str) -> None:
    ops = getattr(torch.ops, ns)
    torch.library.register_autograd(f"{ns}::attention_fwd", _make_backward(ops.attention_bwd), setup_context=_setup)


# ----------------------------------------------------------------------------
# Triton ops (triton_kernels/attention.py), same signatures as the compiled ops
# ----------------------------------------------------------------------------
def _tk():
    from .triton_kernels import attention as tk

    return tk


@torch.library.custom_op("sslops::attention_fwd_triton", mutates_args=())
def attention_fwd_triton(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
) -> tuple[Tensor, Tensor]:
    return _tk().attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal)


@torch.library.custom_op("sslops::attention_bwd_triton", mutates_args=())
def attention_bwd_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _tk().attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, scale, causal)


attention_fwd_triton.register_fake(_fake_fwd)
attention_bwd_triton.register_fake(_fake_bwd)
attention_fwd_triton.register_autograd(_make_backward(attention_bwd_triton), setup_context=_setup)


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------
def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _causal(causal) -> bool:
    return _checks.boolean(causal, "causal")


def _check_dense(q: Tensor, k: Tensor, v: Tensor) -> None:
    layout = "(B, H, L, D)"
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _checks.tensor(x, name, ndim=4)
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    _checks.same_dtype(q, "q", k, "k")
    _checks.same_dtype(q, "q", v, "v")
    _checks.same_device(q, "q", k, "k")
    _checks.same_device(q, "q", v, "v")
    for i, what in ((0, "batch size B"), (1, "number of heads H"), (3, "head dim D")):
        if not (q.shape[i] == k.shape[i] == v.shape[i]):
            raise ValueError(
                f"q, k and v {layout} must have the same {what}, got {q.shape[i]}, {k.shape[i]} and {v.shape[i]} "
                f"(shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})"
            )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length Lk, got {k.shape[2]} and {v.shape[2]}")
    for x, name in ((q, "q"), (k, "k")):
        if any(s == 0 for s in x.shape):
            raise ValueError(f"{name} {layout} has an empty dimension: shape {tuple(x.shape)}")


def _check_packed(q: Tensor, k: Tensor, v: Tensor) -> None:
    layout = "(T, H, D)"
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _checks.tensor(x, name, ndim=3)
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    _checks.same_dtype(q, "q", k, "k")
    _checks.same_dtype(q, "q", v, "v")
    _checks.same_device(q, "q", k, "k")
    _checks.same_device(q, "q", v, "v")
    for i, what in ((1, "number of heads H"), (2, "head dim D")):
        if not (q.shape[i] == k.shape[i] == v.shape[i]):
            raise ValueError(
                f"q, k and v {layout} must have the same {what}, got {q.shape[i]}, {k.shape[i]} and {v.shape[i]}"
            )
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same number of tokens Tk, got {k.shape[0]} and {v.shape[0]}")
    if q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"q {layout} must have H >= 1 and D >= 1, got shape {tuple(q.shape)}")


def _cu_seqlens(cu, name: str, total: int, device: torch.device) -> Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with N + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    if cu.device.type == "meta" and not torch.compiler.is_compiling():  # was "Tensor.item() ... meta tensors"
        raise ValueError(f"{name} is a meta tensor: attention_varlen reads the offsets, which meta tensors lack")
    if not torch.compiler.is_compiling():  # value checks read the data (a sync on GPU)
        first, last = int(cu[0]), int(cu[-1])
        if first != 0:
            raise ValueError(f"{name}[0] must be 0, got {first}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing (FlashAttention's cumulative offsets), got {cu.tolist()}")
        if last != total:
            raise ValueError(f"{name}[-1] must equal the number of tokens ({total}), got {last}")
    return cu.to(torch.int32)


def _max_seqlen(value, name: str, cu: Tensor, total: int) -> int:
    if value is None:
        if torch.compiler.is_compiling():
            return total  # a bound without reading the offsets (GPU grids get idle programs)
        return int((cu[1:] - cu[:-1]).max())
    value = _checks.integer(value, name, lo=0)
    if not torch.compiler.is_compiling():
        longest = int((cu[1:] - cu[:-1]).max())
        if value < longest:
            raise ValueError(f"{name} = {value} is shorter than the longest sequence ({longest} tokens)")
    return value


# ----------------------------------------------------------------------------
# Backend switch
# ----------------------------------------------------------------------------
def _run(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend) -> Tensor:
    if backend == "reference":
        if cu_q is None:
            return reference.attention(q, k, v, scale, causal)
        return reference.attention_varlen(q, k, v, cu_q, cu_k, scale, causal)
    if backend == "triton":
        return attention_fwd_triton(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)[0]
    dtype = q.dtype
    if backend == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # the C++ CPU kernel computes float32; autograd casts the gradients back
        q, k, v = q.float(), k.float(), v.float()
    out = _backend.ops(backend).attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)[0]
    return out.to(dtype)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, causal: bool = False,
              backend: str = "auto") -> Tensor:
    """Exact attention in ``F.scaled_dot_product_attention``'s layout.

    Args:
        q: (batch_size, num_heads, seqlen_q, head_dim)
        k: (batch_size, num_heads, seqlen_k, head_dim)
        v: (batch_size, num_heads, seqlen_k, head_dim)
        scale: softmax scale; default 1 / sqrt(head_dim).
        causal: SDPA's ``is_causal`` mask, aligned top-left: query i sees keys
            j <= i (also when seqlen_q != seqlen_k).
        backend: "auto" | "cuda" | "triton" | "cpu" | "reference".

    Returns:
        out: (batch_size, num_heads, seqlen_q, head_dim) in q's dtype.  The
        fused backends return it as a transposed contiguous
        (batch_size, seqlen_q, num_heads, head_dim) buffer (like SDPA's flash
        kernels), so ``out.transpose(1, 2).reshape(B, L, H * D)`` is free.

    Inputs may be any strides (e.g. slices of a packed qkv): the kernels read
    them in place.  fp32/fp64 on CPU (fp16/bf16 computed in fp32); fp16, bf16
    and fp32 on GPU; the forward saves only out and a per-row logsumexp.
    """
    _check_dense(q, k, v)
    scale = _scale(scale, q.shape[-1])
    causal = _causal(causal)
    be = _backend.resolve("attention", backend, q.device, q.dtype, q.shape[-1])
    return _run(q, k, v, None, None, q.shape[2], k.shape[2], scale, causal, be)


def attention_qkvpacked(qkv: Tensor, num_heads: int, *, scale: Optional[float] = None, causal: bool = False,
                        backend: str = "auto") -> Tensor:
    """Self-attention on the output of a ViT block's ``qkv`` Linear.

    Args:
        qkv: (batch_size, seqlen, 3 * num_heads * head_dim), last dim ordered
            (3, num_heads, head_dim) as timm's ``Attention`` splits it.
        num_heads: number of heads H.
        scale, causal, backend: as in :func:`attention`.

    Returns:
        out: (batch_size, seqlen, num_heads * head_dim), ready for ``proj``.

    q, k and v are read in place from qkv and the fused backends write out as
    (B, L, H, D) directly: no permute or contiguous copy on either side (the
    backward stacks dq, dk, dv into one (B, L, 3 * H * D) gradient).
    """
    _checks.tensor(qkv, "qkv", ndim=3)
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got {qkv.dtype}")
    H = _checks.integer(num_heads, "num_heads", lo=1)
    B, L, C = qkv.shape
    if C % (3 * H) != 0 or C == 0:
        raise ValueError(
            f"qkv's last dim must be 3 * num_heads * head_dim; {C} is not a positive multiple of 3 * {H}"
        )
    D = C // (3 * H)
    q, k, v = qkv.reshape(B, L, 3, H, D).unbind(2)  # (B, L, H, D) views
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, causal=causal,
                    backend=backend)
    return out.transpose(1, 2).reshape(B, L, H * D)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, *,
                     scale: Optional[float] = None, causal: bool = False, backend: str = "auto") -> Tensor:
    """Variable-length attention in one call (FlashAttention's varlen convention).

    Args:
        q: (total_q, num_heads, head_dim), the tokens of N sequences packed.
        k: (total_k, num_heads, head_dim)
        v: (total_k, num_heads, head_dim)
        cu_seqlens_q: (N + 1,) int32 (or int64), the cumulative sequence
            lengths: sequence b owns q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]].
            Starts at 0, never decreases, ends at total_q.
        cu_seqlens_k: (N + 1,), the same for k and v.
        max_seqlen_q, max_seqlen_k: the longest sequence (computed from the
            offsets when None; pass them to avoid a GPU sync).
        scale, causal, backend: as in :func:`attention` (the causal mask is
            per sequence, aligned top-left).

    Returns:
        out: (total_q, num_heads, head_dim) in q's dtype.

    E.g. DINO's 2 global crops (197 tokens) and 8 local crops (37 tokens) of a
    batch run as one call; a sequence may be empty (a query without keys gets 0).
    """
    _check_packed(q, k, v)
    cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    cu_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length N + 1, got {cu_q.shape[0]} and {cu_k.shape[0]}"
        )
    max_q = _max_seqlen(max_seqlen_q, "max_seqlen_q", cu_q, q.shape[0])
    max_k = _max_seqlen(max_seqlen_k, "max_seqlen_k", cu_k, k.shape[0])
    scale = _scale(scale, q.shape[-1])
    causal = _causal(causal)
    be = _backend.resolve("attention", backend, q.device, q.dtype, q.shape[-1])
    return _run(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, be)

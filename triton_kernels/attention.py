"""Flash-style exact attention in Triton: forward and backward, dense and varlen.

Notation (per batch b, head h; see csrc/common/attention.h for the full math)
------------------------------------------------------------------------------
q (Lq, D), k, v (Lk, D);  s_ij = scale * <q_i, k_j>;  p_ij = exp(s_ij - lse_i);
o_i = sum_j p_ij v_j.  Backward: delta_i = <dO_i, o_i>, ds_ij = p_ij (dp_ij -
delta_i) with dp_ij = <dO_i, v_j>; dq = scale ds k, dk = scale ds^T q, dv = p^T dO.

Causal masks are SDPA's, aligned top-left: query i sees keys j <= i (also for
Lq != Lk).  Tails are masked in every direction, so any L works (no L % BLOCK
requirement); a query row without keys (varlen, Lk = 0) gets o = 0, lse = -inf.

Kernels
-------
* ``_attn_fwd_kernel``   one program per (b * H + h, block of BLOCK_M query rows):
  online softmax over BLOCK_N key tiles (exp2 with log2(e) folded into the
  scale), fp32 state, writes o and lse.  Causal programs stop at their last
  visible key tile.
* ``_attn_bwd_delta_kernel``  delta = rowsum(dO * o), the pre-pass.
* ``_attn_bwd_dkdv_kernel``   one program per (b * H + h, block of BLOCK_N keys):
  walks the query blocks that see those keys (all of them, or from the key
  block's diagonal on when causal) and accumulates dk and dv in registers.
* ``_attn_bwd_dq_kernel``     one program per (b * H + h, block of BLOCK_M queries):
  walks the visible key tiles and accumulates dq.
  Separate dk/dv and dq passes: every output element has one owner, no atomics,
  deterministic.  (Triton's tutorial 06 backward is causal-only and asserts
  L % 128 == 0; this one is neither.)

Layouts (the contract of csrc/sslops.cpp)
-----------------------------------------
dense:  q (B, H, Lq, D), k/v (B, H, Lk, D), any strides; out is a contiguous
        (B, L, H, D) buffer returned transposed to (B, H, L, D); dq/dk/dv are
        contiguous where q/k/v are, else laid out like out; lse (B, H, Lq) fp32.
varlen: q (Tq, H, D), k/v (Tk, H, D), cu_seqlens int32 (N + 1,); out (Tq, H, D)
        contiguous, lse (H, Tq) fp32.  The grid's query-block axis is sized by
        max_seqlen_q (programs past their sequence's end return at once).
Both share one kernel: a row r of sequence b, head h lives at
ptr + b * stride_b + h * stride_h + (start_b + r) * stride_row, with
stride_b = 0 and start_b = cu_seqlens[b] for varlen.

Inputs are assumed validated by sslops/attention.py; only cheap asserts here.
On a GPU the tensors must be CUDA tensors; under TRITON_INTERPRET=1 CPU tensors
run in the interpreter (fp32 and fp16).
"""
import contextlib
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from sslops._checks import new_output

__all__ = ["attention_fwd", "attention_bwd"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _seq_bounds(cu_ptr, b, L, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: (cu[b], cu[b+1] - cu[b]) or (0, L)."""
    if VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)
        end = tl.load(cu_ptr + b + 1).to(tl.int64)
        return start, end - start
    else:
        return tl.zeros((), dtype=tl.int64), tl.full((), L, dtype=tl.int64)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    H, Lq, Lk, qk_scale,                      # qk_scale = scale * log2(e)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_start, q_len = _seq_bounds(cu_q_ptr, b, Lq, VARLEN)
    k_start, k_len = _seq_bounds(cu_k_ptr, b, Lk, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)

    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)                 # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        kv_end = tl.minimum(k_len, start_m + BLOCK_M)  # keys past the block's last row are masked
    else:
        kv_end = k_len
    for n0 in range(0, kv_end, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < k_len
        kcols = (k_start + cols).to(tl.int64)
        kt = tl.load(k_base + kcols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale        # (BLOCK_M, BLOCK_N) fp32
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with nothing visible yet keeps m = -inf: shift by 0, every p is exp2(-inf) = 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)  # 0 for the empty state (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + kcols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    has = l_i != 0.0  # an empty row (l = 0) gives o = 0, lse = -inf; a NaN l stays NaN (as csrc/common/attention.h)
    inv_l = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
    o = acc * inv_l[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_base = o_ptr + b * stride_ob + h * stride_oh
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_od, o.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + rows, lse, mask=mask_m)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, cu_q_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh,
    H, Lq,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id * o_id (fp32), stored with lse's layout."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_start, q_len = _seq_bounds(cu_q_ptr, b, Lq, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + b * stride_lb + h * stride_lh + rows, tl.sum(o * do, axis=1), mask=offs_m < q_len)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh,
    H, Lq, Lk, scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv of BLOCK_N keys: loops over the query blocks that see them."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_start, q_len = _seq_bounds(cu_q_ptr, b, Lq, VARLEN)
    k_start, k_len = _seq_bounds(cu_k_ptr, b, Lk, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < k_len
    mask_d = offs_d < HEAD_DIM
    kcols = (k_start + offs_n).to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + kcols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + kcols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    l_base = lse_ptr + b * stride_lb + h * stride_lh
    d_base = delta_ptr + b * stride_lb + h * stride_lh

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        m_lo = (start_n // BLOCK_M) * BLOCK_M  # rows before the block's first key see none of it
    else:
        m_lo = 0
    for m0 in range(m_lo, q_len, BLOCK_M):
        offs_m = m0 + offs_m0
        mask_m = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lse = tl.load(l_base + rows, mask=mask_m, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row without keys: p = 0
        delta = tl.load(d_base + rows, mask=mask_m, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # s^T: (BLOCK_N, BLOCK_M)
        valid = mask_n[:, None] & mask_m[None, :]
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :])
        pt = tl.where(valid, tl.exp(st - lse[None, :]), 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)        # dp^T: (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)

    dk = dk * scale
    mask = mask_n[:, None] & mask_d[None, :]
    tl.store(dk_ptr + b * stride_dkb + h * stride_dkh + kcols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + b * stride_dvb + h * stride_dvh + kcols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh,
    H, Lq, Lk, scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq of BLOCK_M query rows: loops over their visible key tiles."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_start, q_len = _seq_bounds(cu_q_ptr, b, Lq, VARLEN)
    k_start, k_len = _seq_bounds(cu_k_ptr, b, Lk, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + rows, mask=mask_m, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_ptr + b * stride_lb + h * stride_lh + rows, mask=mask_m, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        kv_end = tl.minimum(k_len, start_m + BLOCK_M)
    else:
        kv_end = k_len
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + offs_n0
        mask_n = offs_n < k_len
        kcols = (k_start + offs_n).to(tl.int64)
        k = tl.load(k_base + kcols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        vt = tl.load(v_base + kcols[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        valid = mask_m[:, None] & mask_n[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    dq = dq * scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------
class _Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16; D = 80, 96 are padded and masked


def _gpu_config(kind: str, dtype: torch.dtype, D: int, max_len: int, capability: Tuple[int, int]) -> _Config:
    """Block sizes per pass, dtype, head dim, sequence length and compute capability.

    Short sequences (ViT: 50, 197, 257 tokens) get 64-row blocks: at L = 197 a
    128-row tile would do 77 % padding work in its last block and leave the
    GPU with half as many programs.  fp32 uses exact (ieee) or tf32 dots, with
    smaller tiles (more registers per element).  sm_80 has less shared memory
    per SM than sm_90 (164 vs 228 KB): fewer pipeline stages at D = 128.
    Not tuned on hardware yet (no GPU was available when this was written).
    """
    big_d = D > 64
    hopper = capability[0] >= 9
    if dtype == torch.float32:
        # fp32 tiles take twice the registers of 16-bit ones: 32 x 32 tiles, 8 warps past D = 64
        # (no register spills on sm_80 / sm_90, checked by tests/test_attention_triton.py).
        if not big_d:
            return _Config(32, 32, num_warps=4, num_stages=2)
        if kind == "bwd_dkdv":
            return _Config(16, 32, num_warps=8, num_stages=1)
        return _Config(32, 16, num_warps=8, num_stages=1)
    if kind == "fwd":
        block_m = 128 if max_len > 512 else 64
        stages = 3 if (hopper or not big_d) else 2
        return _Config(block_m, 64 if big_d or max_len > 512 else 32, num_warps=8 if block_m == 128 else 4,
                       num_stages=stages)
    if kind == "bwd_dkdv":
        block_n = 64 if max_len > 128 else 32
        return _Config(32, block_n, num_warps=4 if not big_d else 8, num_stages=2 if (hopper or not big_d) else 1)
    # bwd_dq
    block_m = 64 if max_len > 128 else 32
    return _Config(block_m, 32, num_warps=4 if not big_d else 8, num_stages=2 if (hopper or not big_d) else 1)


def _interpreter_config(kind: str) -> _Config:
    # Triton interpreter (CPU tensors): small asymmetric blocks so that test shapes
    # span several ragged tiles in every direction.
    if kind == "fwd":
        return _Config(32, 64, num_warps=1, num_stages=1)
    if kind == "bwd_dkdv":
        return _Config(64, 32, num_warps=1, num_stages=1)
    return _Config(32, 64, num_warps=1, num_stages=1)


def _config(kind: str, t: torch.Tensor, D: int, max_len: int) -> _Config:
    if t.is_cuda:
        return _gpu_config(kind, t.dtype, D, max_len, torch.cuda.get_device_capability(t.device))
    return _interpreter_config(kind)


def _precision(dtype: torch.dtype) -> str:
    # fp32: exact unless the user allowed tf32 for fp32 matmuls (torch.set_float32_matmul_precision).
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------
def _strides(t: torch.Tensor, varlen: bool) -> Tuple[int, int, int, int]:
    """(stride_b, stride_h, stride_row, stride_d) of a (B, H, L, D) or (T, H, D) tensor."""
    if varlen:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> Tuple[int, int]:
    if varlen:  # (H, Tq)
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)  # (B, H, Lq)


def _new_like_out(x: torch.Tensor, varlen: bool) -> torch.Tensor:
    if varlen:
        return new_output(*x.shape, like=x)
    B, H, L, D = x.shape
    return new_output(B, L, H, D, like=x).transpose(1, 2)


def _new_grad(x: torch.Tensor, varlen: bool) -> torch.Tensor:
    # contiguous where x is (no layout copy in a leaf's AccumulateGrad), else like out
    if x.is_contiguous():
        return new_output(*x.shape, like=x)
    return _new_like_out(x, varlen)


def _geometry(q, k, cu_q, max_seqlen_q, max_seqlen_k):
    varlen = cu_q is not None
    if varlen:
        T, H, D = q.shape
        return varlen, cu_q.shape[0] - 1, H, D, max(int(max_seqlen_q), 0), max(int(max_seqlen_k), 0), 0, 0
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    return varlen, B, H, D, Lq, Lk, Lq, Lk


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of exact attention; layouts as in the module docstring."""
    assert (cu_seqlens_q is None) == (cu_seqlens_k is None)
    assert q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
    varlen, N, H, D, max_q, max_k, Lq, Lk = _geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = _new_like_out(q, varlen)
    if varlen:
        lse = new_output(H, q.shape[0], like=q, dtype=torch.float32)
    else:
        lse = new_output(N, H, Lq, like=q, dtype=torch.float32)
    if N * H == 0 or max_q == 0 or q.numel() == 0:
        return out, lse
    cfg = _config("fwd", q, D, max(max_q, max_k))
    cu_q = cu_seqlens_q if varlen else lse  # dummy pointer when dense (never read)
    cu_k = cu_seqlens_k if varlen else lse
    grid = (N * H, triton.cdiv(max_q, cfg.BLOCK_M))
    with _device_guard(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, cu_q, cu_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
            *_lse_strides(lse, varlen),
            H, Lq, Lk, float(scale) * LOG2E,
            HEAD_DIM=D, CAUSAL=bool(causal), VARLEN=varlen, PRECISION=_precision(q.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=_block_d(D),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's out and lse (no atomics: deterministic)."""
    assert (cu_seqlens_q is None) == (cu_seqlens_k is None)
    assert grad_out.shape == q.shape and out.shape == q.shape
    varlen, N, H, D, max_q, max_k, Lq, Lk = _geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    dq, dk, dv = _new_grad(q, varlen), _new_grad(k, varlen), _new_grad(v, varlen)
    if N * H == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if max_q == 0:  # no query anywhere: every key's gradient is 0
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    lse_st = _lse_strides(lse, varlen)
    assert _lse_strides(delta, varlen) == lse_st
    precision = _precision(q.dtype)
    s_q, s_k, s_v, s_do = _strides(q, varlen), _strides(k, varlen), _strides(v, varlen), _strides(grad_out, varlen)
    max_len = max(max_q, max_k)
    block_d = _block_d(D)
    with _device_guard(q):
        pre = _config("bwd_dq", q, D, max_len)
        _attn_bwd_delta_kernel[(N * H, triton.cdiv(max_q, pre.BLOCK_M))](
            out, grad_out, delta, cu_q, *_strides(out, varlen), *s_do, *lse_st, H, Lq,
            HEAD_DIM=D, VARLEN=varlen, BLOCK_M=pre.BLOCK_M, BLOCK_D=block_d, num_warps=4 if q.is_cuda else 1,
        )
        cfg = _config("bwd_dkdv", q, D, max_len)
        if max_k > 0:
            _attn_bwd_dkdv_kernel[(N * H, triton.cdiv(max_k, cfg.BLOCK_N))](
                q, k, v, grad_out, lse, delta, dk, dv, cu_q, cu_k,
                *s_q, *s_k, *s_v, *s_do, *_strides(dk, varlen), *_strides(dv, varlen), *lse_st,
                H, Lq, Lk, float(scale),
                HEAD_DIM=D, CAUSAL=bool(causal), VARLEN=varlen, PRECISION=precision,
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        cfg = _config("bwd_dq", q, D, max_len)
        _attn_bwd_dq_kernel[(N * H, triton.cdiv(max_q, cfg.BLOCK_M))](
            q, k, v, grad_out, lse, delta, dq, cu_q, cu_k,
            *s_q, *s_k, *s_v, *s_do, *_strides(dq, varlen), *lse_st,
            H, Lq, Lk, float(scale),
            HEAD_DIM=D, CAUSAL=bool(causal), VARLEN=varlen, PRECISION=precision,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv

"""Fused supervised / multi-view contrastive statistics (sslops.sup_con) in Triton.

Notation
--------
z: (N, D) rows (fp32 / fp16), labels: (N,) int64, x_ij = inv_temp * <z_i, z_j>
(fp32 accumulation).  Row i's candidates are the columns j != i; its positives
P(i) are the candidates with labels_j == labels_i.

* ``sup_con_stats``: a (4, N) fp32 tensor, per row
    0: lse_i  = log sum_{j != i} exp(x_ij)      (-inf when N == 1)
    1: lpos_i = log sum_{p in P(i)} exp(x_ip)    (-inf when P(i) is empty)
    2: psum_i = sum_{p in P(i)} x_ip
    3: cnt_i  = |P(i)|
  one program per BLOCK_M rows, two online log-sum-exps over BLOCK_N column tiles.
* ``sup_con_stats_backward``: with upstream grads g (4, N) (row 3 ignored),
    W_ij = ga_i exp(x_ij - lse_i) + [j in P(i)] (gp_i exp(x_ij - lpos_i) + gs_i)
    grad_z = inv_temp * (W + W^T) @ z
  x and the positive mask are symmetric, so one logits tile x_IJ gives W_IJ
  (row stats of I) and (W^T)_IJ (column stats of J): one pass per (row block,
  D chunk), no atomics, deterministic (as nt_xent's symmetric backward).

The (N, N) logits are never materialised.  Conventions (strides, poisoned
outputs, -inf handling, interpreter) are those of triton_kernels/nt_xent.py,
whose tile helper and launch configurations this module reuses.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from sslops._checks import new_output

from ._common import Launch, capability, device_guard
from .nt_xent import _Config, _aligned, _block_d, _gpu_config, _interpreter_config, _logits_tile, _precision

__all__ = ["sup_con_stats", "sup_con_stats_backward"]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _sup_con_fwd_kernel(
    z_ptr, lab_ptr, st_ptr,
    N, D, inv_temp,
    stride_zm, stride_zd, stride_lab, stride_st_k, stride_st_n,
    SINGLE_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    rows = offs_m.to(tl.int64)
    lab_i = tl.load(lab_ptr + rows * stride_lab, mask=mask_m, other=-1)
    if SINGLE_D:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        zi = tl.load(z_ptr + rows[:, None] * stride_zm + offs_d[None, :] * stride_zd,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_a = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # every other column
    l_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_p = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # positives only
    l_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
    psum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        cols = offs_n.to(tl.int64)
        lab_j = tl.load(lab_ptr + cols * stride_lab, mask=mask_n, other=-1)
        if SINGLE_D:
            zt = tl.load(z_ptr + cols[None, :] * stride_zm + offs_d[:, None] * stride_zd,
                         mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            x = tl.dot(zi, zt, input_precision=PRECISION) * inv_temp
        else:
            x = _logits_tile(z_ptr, z_ptr, rows, cols, mask_m, mask_n,
                             stride_zm, stride_zd, stride_zm, stride_zd, D, inv_temp,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        valid = mask_m[:, None] & mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
        pos = valid & (lab_i[:, None] == lab_j[None, :])
        xa = tl.where(valid, x, float("-inf"))
        xp = tl.where(pos, x, float("-inf"))
        # online lse over every other column (see nt_xent's forward for the -inf guard)
        m_new = tl.maximum(m_a, tl.max(xa, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_a = l_a * tl.exp(m_a - m_safe) + tl.sum(tl.exp(xa - m_safe[:, None]), axis=1)
        m_a = m_new
        # online lse over the positives
        mp_new = tl.maximum(m_p, tl.max(xp, axis=1))
        mp_safe = tl.where(mp_new == float("-inf"), 0.0, mp_new)
        l_p = l_p * tl.exp(m_p - mp_safe) + tl.sum(tl.exp(xp - mp_safe[:, None]), axis=1)
        m_p = mp_new
        psum += tl.sum(tl.where(pos, x, 0.0), axis=1)
        cnt += tl.sum(pos.to(tl.float32), axis=1)

    # l == 0 (no column) -> -inf; +inf logit -> +inf; NaN stays NaN (as nt_xent)
    lse = tl.where(l_a > 0.0, m_a + tl.log(tl.where(l_a > 0.0, l_a, 1.0)),
                   tl.where(l_a == 0.0, float("-inf"), l_a))
    lse = tl.where(m_a == float("inf"), float("inf"), lse)
    lpos = tl.where(l_p > 0.0, m_p + tl.log(tl.where(l_p > 0.0, l_p, 1.0)),
                    tl.where(l_p == 0.0, float("-inf"), l_p))
    lpos = tl.where(m_p == float("inf"), float("inf"), lpos)
    out = st_ptr + rows * stride_st_n
    tl.store(out, lse, mask=mask_m)
    tl.store(out + stride_st_k, lpos, mask=mask_m)
    tl.store(out + 2 * stride_st_k, psum, mask=mask_m)
    tl.store(out + 3 * stride_st_k, cnt, mask=mask_m)


@triton.jit
def _load_row_stats(g_ptr, st_ptr, idx, mask, stride_g_k, stride_g_n, stride_st_k, stride_st_n, scale):
    """(ga, gp, gs, lse, lpos) for the rows idx; -inf lse -> +inf so exp(x - lse) = 0, never NaN."""
    g = g_ptr + idx * stride_g_n
    ga = tl.load(g, mask=mask, other=0.0).to(tl.float32) * scale
    gp = tl.load(g + stride_g_k, mask=mask, other=0.0).to(tl.float32) * scale
    gs = tl.load(g + 2 * stride_g_k, mask=mask, other=0.0).to(tl.float32) * scale
    s = st_ptr + idx * stride_st_n
    lse = tl.load(s, mask=mask, other=float("inf"))
    lpos = tl.load(s + stride_st_k, mask=mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    lpos = tl.where(lpos == float("-inf"), float("inf"), lpos)
    return ga, gp, gs, lse, lpos


@triton.jit
def _sup_con_bwd_kernel(
    g_ptr, z_ptr, lab_ptr, st_ptr, dz_ptr, scale_ptr,
    N, D, inv_temp,
    stride_g_k, stride_g_n, stride_zm, stride_zd, stride_lab, stride_st_k, stride_st_n,
    stride_dzm, stride_dzd,
    HAS_SCALE: tl.constexpr, SINGLE_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_z[I, Dblk] = inv_temp * sum_J (W_IJ + (W^T)_IJ) @ z[J, Dblk]; grid (row blocks, D chunks)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    rows = offs_m.to(tl.int64)
    offs_do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_do = offs_do < D

    s = 1.0
    out_scale = inv_temp
    if HAS_SCALE:  # fp16 weights: g * s (see _grad_scale)
        s = tl.load(scale_ptr)
        out_scale = inv_temp / s
    ga_i, gp_i, gs_i, lse_i, lpos_i = _load_row_stats(g_ptr, st_ptr, rows, mask_m, stride_g_k, stride_g_n,
                                                      stride_st_k, stride_st_n, s)
    lab_i = tl.load(lab_ptr + rows * stride_lab, mask=mask_m, other=-1)
    if SINGLE_D:
        z_i = tl.load(z_ptr + rows[:, None] * stride_zm + offs_do[None, :] * stride_zd,
                      mask=mask_m[:, None] & mask_do[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        cols = offs_n.to(tl.int64)
        ga_j, gp_j, gs_j, lse_j, lpos_j = _load_row_stats(g_ptr, st_ptr, cols, mask_n, stride_g_k, stride_g_n,
                                                          stride_st_k, stride_st_n, s)
        lab_j = tl.load(lab_ptr + cols * stride_lab, mask=mask_n, other=-1)
        z_j = tl.load(z_ptr + cols[:, None] * stride_zm + offs_do[None, :] * stride_zd,
                      mask=mask_n[:, None] & mask_do[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if SINGLE_D:
            x = tl.dot(z_i, tl.trans(z_j), input_precision=PRECISION) * inv_temp
        else:
            x = _logits_tile(z_ptr, z_ptr, rows, cols, mask_m, mask_n,
                             stride_zm, stride_zd, stride_zm, stride_zd, D, inv_temp,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        valid = mask_m[:, None] & mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
        pos = valid & (lab_i[:, None] == lab_j[None, :])
        x = tl.where(valid, x, float("-inf"))  # masked lanes (incl. the diagonal): weight 0
        xp = tl.where(pos, x, float("-inf"))
        w = (ga_i[:, None] * tl.exp(x - lse_i[:, None]) + tl.exp(x - lse_j[None, :]) * ga_j[None, :]
             + gp_i[:, None] * tl.exp(xp - lpos_i[:, None]) + tl.exp(xp - lpos_j[None, :]) * gp_j[None, :]
             + tl.where(pos, gs_i[:, None] + gs_j[None, :], 0.0))  # (BLOCK_M, BLOCK_N)
        acc = tl.dot(w.to(z_j.dtype), z_j, acc, input_precision=PRECISION)

    dz = acc * out_scale
    tl.store(dz_ptr + rows[:, None] * stride_dzm + offs_do[None, :] * stride_dzd,
             dz.to(dz_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_do[None, :])


# ----------------------------------------------------------------------------------------
# Launch configuration and launches
# ----------------------------------------------------------------------------------------
def _config(kind: str, dtype: torch.dtype, D: int, aligned: bool, cap: Optional[Tuple[int, int]]):
    """Block sizes; cap None: the interpreter's (nt_xent's).

    The backward uses nt_xent's symmetric-backward tiles.  The forward keeps two
    online log-sum-exps (two exp tiles live at once), so nt_xent's forward tiles
    spill here (up to ~500 B on sm_80 / sm_90): half the elements per thread,
    with 8 warps on a 64 x 64 tile.  (Checked by compiling for sm_80 and sm_90,
    tests/test_triton_compile.py.)"""
    if cap is None:
        return _interpreter_config(kind, dtype, D, aligned)
    if kind == "bwd":
        return _gpu_config(kind, dtype, D, aligned, cap)
    bd = _block_d(D, 32 if dtype == torch.float32 or not aligned else 64)
    # sm_80, fp32 rows through registers (unaligned): 96 B of spills at 64 x 64
    bm = 32 if dtype == torch.float32 and not aligned and tuple(cap) < (9, 0) else 64
    return _Config(bm, 64, bd, num_warps=8, num_stages=2 if dtype == torch.float32 or not aligned else 3)


def _grad_scale(grad: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(1,) fp32 power of two s for fp16 weights, or None (fp32).

    A weight of the backward sums up to 6 terms each <= max|g| (3 per
    direction), so s = 2^13 / max|g| keeps them <= 6 * 2^13 < 65504 and away
    from fp16's subnormals (see nt_xent's _grad_scale).  No host sync."""
    if dtype != torch.float16:
        return None
    gmax = grad[:3].detach().abs().amax().float()
    e = torch.floor(13.0 - torch.log2(gmax)).clamp(-100.0, 100.0)
    s = torch.where(torch.isfinite(gmax) & (gmax > 0), torch.exp2(e), torch.ones_like(gmax))
    return s.reshape(1)


def _fwd_launch(z, labels, stats, inv_temp, cap=None) -> Launch:
    N, D = z.shape
    cfg = _config("fwd", z.dtype, D, _aligned(z), cap)
    return Launch(
        _sup_con_fwd_kernel, (triton.cdiv(N, cfg.BLOCK_M),),
        (z, labels, stats, N, D, float(inv_temp),
         z.stride(0), z.stride(1), labels.stride(0), stats.stride(0), stats.stride(1)),
        dict(SINGLE_D=D <= cfg.BLOCK_D, PRECISION=_precision(z.dtype),
             BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
             num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def _bwd_launch(grad, z, labels, stats, dz, scale, inv_temp, cap=None) -> Launch:
    N, D = z.shape
    cfg = _config("bwd", z.dtype, D, _aligned(z), cap)
    n_dblk = triton.cdiv(D, cfg.BLOCK_D)
    return Launch(
        _sup_con_bwd_kernel, (triton.cdiv(N, cfg.BLOCK_M), n_dblk),
        (grad, z, labels, stats, dz, stats if scale is None else scale, N, D, float(inv_temp),
         grad.stride(0), grad.stride(1), z.stride(0), z.stride(1), labels.stride(0),
         stats.stride(0), stats.stride(1), dz.stride(0), dz.stride(1)),
        dict(HAS_SCALE=scale is not None, SINGLE_D=n_dblk == 1, PRECISION=_precision(z.dtype),
             BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
             num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def _check(z: torch.Tensor, labels: torch.Tensor) -> None:
    assert z.dim() == 2 and z.dtype in (torch.float32, torch.float16)
    assert labels.shape == (z.shape[0],) and labels.dtype == torch.int64 and labels.device == z.device


def sup_con_stats(z: torch.Tensor, labels: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """(4, N) float32: lse, lpos, psum, cnt per row (module docstring)."""
    _check(z, labels)
    stats = new_output(4, z.shape[0], like=z, dtype=torch.float32)
    if z.shape[0] == 0:
        return stats
    with device_guard(z):
        _fwd_launch(z, labels, stats, inv_temp, capability(z))()
    return stats


def sup_con_stats_backward(grad: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                           inv_temp: float) -> torch.Tensor:
    """grad_z = inv_temp * (W + W^T) @ z for upstream grads ``grad`` (4, N) of the stats."""
    _check(z, labels)
    N, D = z.shape
    assert grad.shape == (4, N) and stats.shape == (4, N) and stats.dtype == torch.float32
    dz = new_output(N, D, like=z)
    if N == 0 or D == 0:
        return dz.zero_()
    with device_guard(z):
        _bwd_launch(grad, z, labels, stats, dz, _grad_scale(grad, z.dtype), inv_temp, capability(z))()
    return dz

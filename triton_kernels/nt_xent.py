"""Flash-style contrastive log-sum-exp kernels (NT-Xent / InfoNCE) in Triton.

Notation
--------
q: (M, D) queries, c: (Kc, D) candidates, same float dtype (fp32/fp16/bf16).
x_ij = inv_temp * <q_i, c_j> (fp32 accumulation). ``exclude``: optional (M,)
int64, one column per row left out of the sum (-1 = none).

* ``nt_xent_lse``:              lse_i = log sum_{j != exclude_i} exp(x_ij)   (M,) fp32
* ``nt_xent_lse_backward``:     A_ij = grad_lse_i * exp(x_ij - lse_i) (0 when excluded),
                                grad_q = inv_temp * A @ c, grad_c = inv_temp * A^T @ q
* ``nt_xent_lse_backward_sym``: q = c = z, exclude_i = i:
                                grad_z = inv_temp * (A + A^T) @ z

The (M, Kc) logits matrix is never materialised: every kernel walks over tiles
of the other operand and recomputes the logits tile it needs, like
flash-attention's forward and dq / dk-dv passes.  No atomics are used, so the
results are deterministic.

Launcher conventions
--------------------
* Inputs may be non-contiguous: the kernels take explicit strides (no copies).
* Rows with no remaining column get lse = -inf, and contribute nothing to the
  gradients (no NaN).
* Outputs are allocated with ``sslops._checks.new_output`` (``torch.empty``,
  NaN-poisoned under ``SSLOPS_POISON=1``); every element is written.
* Inputs are assumed validated by the Python layer; only cheap asserts here.
* On a GPU the tensors must be CUDA tensors; with ``TRITON_INTERPRET=1`` CPU
  tensors run through the Triton interpreter (fp32 only there).
* Large D: logits are accumulated over D in BLOCK_D chunks inside the kernels.
  The backward kernels also split the *output* D over the grid in BLOCK_D
  chunks; each chunk recomputes its logits tiles, so for D > BLOCK_D the
  backward costs about (1 + ceil(D / BLOCK_D)) / 2 times the ideal flops.
"""
import contextlib
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from sslops._checks import new_output

__all__ = ["nt_xent_lse", "nt_xent_lse_backward", "nt_xent_lse_backward_sym"]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(
    a_ptr, b_ptr,
    rows_a, rows_b,          # int64 row indices, (BLOCK_A,) and (BLOCK_B,)
    mask_a, mask_b,          # row validity, same shapes
    stride_a_row, stride_a_d, stride_b_row, stride_b_d,
    D, inv_temp,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """inv_temp * a[rows_a] @ b[rows_b]^T as a (BLOCK_A, BLOCK_B) fp32 tile, looping over D."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        # a chunk: (BLOCK_A, BLOCK_D);  b chunk loaded transposed: (BLOCK_D, BLOCK_B)
        a = tl.load(
            a_ptr + rows_a[:, None] * stride_a_row + dd[None, :] * stride_a_d,
            mask=mask_a[:, None] & mask_d[None, :], other=0.0,
        )
        bt = tl.load(
            b_ptr + rows_b[None, :] * stride_b_row + dd[:, None] * stride_b_d,
            mask=mask_b[None, :] & mask_d[:, None], other=0.0,
        )
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc * inv_temp


@triton.jit
def _nt_xent_lse_fwd_kernel(
    q_ptr, c_ptr, excl_ptr, lse_ptr,
    M, Kc, D, inv_temp,
    stride_qm, stride_qd, stride_cn, stride_cd, stride_excl, stride_lse,
    HAS_EXCLUDE: tl.constexpr, SINGLE_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_M rows; online log-sum-exp over BLOCK_N column tiles."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)

    if HAS_EXCLUDE:
        excl = tl.load(excl_ptr + rows * stride_excl, mask=mask_m, other=-1)  # (BLOCK_M,)
    if SINGLE_D:
        # The whole D fits in one chunk: keep the q tile in registers for all column tiles.
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q = tl.load(
            q_ptr + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_d[None, :], other=0.0,
        )  # (BLOCK_M, BLOCK_D)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)                # running sum of exp(x - m_i)
    for n0 in range(0, Kc, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Kc
        cols = offs_n.to(tl.int64)
        if SINGLE_D:
            ct = tl.load(
                c_ptr + cols[None, :] * stride_cn + offs_d[:, None] * stride_cd,
                mask=mask_n[None, :] & mask_d[:, None], other=0.0,
            )  # (BLOCK_D, BLOCK_N)
            x = tl.dot(q, ct, input_precision=PRECISION) * inv_temp
        else:
            x = _logits_tile(q_ptr, c_ptr, rows, cols, mask_m, mask_n,
                             stride_qm, stride_qd, stride_cn, stride_cd, D, inv_temp,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        # x: (BLOCK_M, BLOCK_N) fp32; masked entries -> -inf
        valid = mask_m[:, None] & mask_n[None, :]
        if HAS_EXCLUDE:
            valid = valid & (offs_n[None, :] != excl[:, None])
        x = tl.where(valid, x, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        # A row whose columns are all masked so far has m_new = -inf; shift by 0 instead
        # so that exp(-inf - (-inf)) = NaN never happens (everything is exp(-inf) = 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(x - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    # As csrc/common/nt_xent.h lse_finalize: l_i == 0 (no column left) -> -inf (log
    # never sees 0); a +inf logit -> +inf; a NaN logit (l_i NaN) -> NaN.
    lse = tl.where(l_i > 0.0, m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0)),
                   tl.where(l_i == 0.0, float("-inf"), l_i))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    tl.store(lse_ptr + rows * stride_lse, lse, mask=mask_m)


@triton.jit
def _nt_xent_bwd_dq_kernel(
    grad_ptr, q_ptr, c_ptr, excl_ptr, lse_ptr, dq_ptr, scale_ptr,
    M, Kc, D, inv_temp,
    stride_g, stride_qm, stride_qd, stride_cn, stride_cd, stride_excl, stride_lse,
    stride_dqm, stride_dqd,
    HAS_SCALE: tl.constexpr, HAS_EXCLUDE: tl.constexpr, SINGLE_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_q[I, Dblk] = inv_temp * sum_J A_IJ @ c[J, Dblk]; grid (row blocks, D chunks)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # output D chunk
    mask_do = offs_do < D

    g = tl.load(grad_ptr + rows * stride_g, mask=mask_m, other=0.0).to(tl.float32)
    out_scale = inv_temp
    if HAS_SCALE:  # 16-bit weights: g * s with s = 2^14 / max|g| (see _grad_scale)
        s = tl.load(scale_ptr)
        g = g * s
        out_scale = inv_temp / s
    lse = tl.load(lse_ptr + rows * stride_lse, mask=mask_m, other=float("inf")).to(tl.float32)
    # Rows with lse = -inf have no valid column; +inf makes exp(x - lse) = 0 without NaN.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    if HAS_EXCLUDE:
        excl = tl.load(excl_ptr + rows * stride_excl, mask=mask_m, other=-1)
    if SINGLE_D:
        q = tl.load(
            q_ptr + rows[:, None] * stride_qm + offs_do[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_do[None, :], other=0.0,
        )  # (BLOCK_M, BLOCK_D)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, Kc, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Kc
        cols = offs_n.to(tl.int64)
        # c tile for the output chunk: (BLOCK_N, BLOCK_D)
        c = tl.load(
            c_ptr + cols[:, None] * stride_cn + offs_do[None, :] * stride_cd,
            mask=mask_n[:, None] & mask_do[None, :], other=0.0,
        )
        if SINGLE_D:
            x = tl.dot(q, tl.trans(c), input_precision=PRECISION) * inv_temp
        else:
            x = _logits_tile(q_ptr, c_ptr, rows, cols, mask_m, mask_n,
                             stride_qm, stride_qd, stride_cn, stride_cd, D, inv_temp,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        valid = mask_m[:, None] & mask_n[None, :]
        if HAS_EXCLUDE:
            valid = valid & (offs_n[None, :] != excl[:, None])
        # mask before exp: masked lanes give exp(-inf) = 0, never inf / NaN
        a = tl.exp(tl.where(valid, x - lse[:, None], float("-inf"))) * g[:, None]  # (BLOCK_M, BLOCK_N)
        acc = tl.dot(a.to(c.dtype), c, acc, input_precision=PRECISION)

    dq = acc * out_scale
    tl.store(
        dq_ptr + rows[:, None] * stride_dqm + offs_do[None, :] * stride_dqd,
        dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_do[None, :],
    )


@triton.jit
def _nt_xent_bwd_dc_kernel(
    grad_ptr, q_ptr, c_ptr, excl_ptr, lse_ptr, dc_ptr, scale_ptr,
    M, Kc, D, inv_temp,
    stride_g, stride_qm, stride_qd, stride_cn, stride_cd, stride_excl, stride_lse,
    stride_dcn, stride_dcd,
    HAS_SCALE: tl.constexpr, HAS_EXCLUDE: tl.constexpr, SINGLE_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_c[J, Dblk] = inv_temp * sum_I (A_IJ)^T @ q[I, Dblk]; grid (column blocks, D chunks)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Kc
    cols = offs_n.to(tl.int64)
    offs_do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_do = offs_do < D

    if SINGLE_D:
        c = tl.load(
            c_ptr + cols[:, None] * stride_cn + offs_do[None, :] * stride_cd,
            mask=mask_n[:, None] & mask_do[None, :], other=0.0,
        )  # (BLOCK_N, BLOCK_D)

    out_scale = inv_temp
    if HAS_SCALE:
        s = tl.load(scale_ptr)
        out_scale = inv_temp / s
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows = offs_m.to(tl.int64)
        g = tl.load(grad_ptr + rows * stride_g, mask=mask_m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * s
        lse = tl.load(lse_ptr + rows * stride_lse, mask=mask_m, other=float("inf")).to(tl.float32)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        # q tile for the output chunk: (BLOCK_M, BLOCK_D)
        q = tl.load(
            q_ptr + rows[:, None] * stride_qm + offs_do[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_do[None, :], other=0.0,
        )
        # transposed logits tile x^T: (BLOCK_N, BLOCK_M)
        if SINGLE_D:
            xt = tl.dot(c, tl.trans(q), input_precision=PRECISION) * inv_temp
        else:
            xt = _logits_tile(c_ptr, q_ptr, cols, rows, mask_n, mask_m,
                              stride_cn, stride_cd, stride_qm, stride_qd, D, inv_temp,
                              BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
        valid = mask_n[:, None] & mask_m[None, :]
        if HAS_EXCLUDE:
            excl = tl.load(excl_ptr + rows * stride_excl, mask=mask_m, other=-1)
            valid = valid & (offs_n[:, None] != excl[None, :])
        at = tl.exp(tl.where(valid, xt - lse[None, :], float("-inf"))) * g[None, :]  # (BLOCK_N, BLOCK_M)
        acc = tl.dot(at.to(q.dtype), q, acc, input_precision=PRECISION)

    dc = acc * out_scale
    tl.store(
        dc_ptr + cols[:, None] * stride_dcn + offs_do[None, :] * stride_dcd,
        dc.to(dc_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_do[None, :],
    )


@triton.jit
def _nt_xent_bwd_sym_kernel(
    grad_ptr, z_ptr, lse_ptr, dz_ptr, scale_ptr,
    M, D, inv_temp,
    stride_g, stride_zm, stride_zd, stride_lse, stride_dzm, stride_dzd,
    HAS_SCALE: tl.constexpr, SINGLE_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_z[I, Dblk] = inv_temp * sum_J (A_IJ + (A^T)_IJ) @ z[J, Dblk], diagonal excluded.

    S = z z^T is symmetric, so the logits tile x_IJ gives both A_IJ (normalised by the
    row lse_I) and (A^T)_IJ = A_JI^T (normalised by the column lse_J): one pass, no atomics.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_do = offs_do < D

    g_i = tl.load(grad_ptr + rows * stride_g, mask=mask_m, other=0.0).to(tl.float32)
    out_scale = inv_temp
    if HAS_SCALE:
        s = tl.load(scale_ptr)
        g_i = g_i * s
        out_scale = inv_temp / s
    lse_i = tl.load(lse_ptr + rows * stride_lse, mask=mask_m, other=float("inf")).to(tl.float32)
    lse_i = tl.where(lse_i == float("-inf"), float("inf"), lse_i)
    if SINGLE_D:
        z_i = tl.load(
            z_ptr + rows[:, None] * stride_zm + offs_do[None, :] * stride_zd,
            mask=mask_m[:, None] & mask_do[None, :], other=0.0,
        )  # (BLOCK_M, BLOCK_D)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < M
        cols = offs_n.to(tl.int64)
        g_j = tl.load(grad_ptr + cols * stride_g, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g_j = g_j * s
        lse_j = tl.load(lse_ptr + cols * stride_lse, mask=mask_n, other=float("inf")).to(tl.float32)
        lse_j = tl.where(lse_j == float("-inf"), float("inf"), lse_j)
        # z tile for the output chunk: (BLOCK_N, BLOCK_D)
        z_j = tl.load(
            z_ptr + cols[:, None] * stride_zm + offs_do[None, :] * stride_zd,
            mask=mask_n[:, None] & mask_do[None, :], other=0.0,
        )
        if SINGLE_D:
            x = tl.dot(z_i, tl.trans(z_j), input_precision=PRECISION) * inv_temp
        else:
            x = _logits_tile(z_ptr, z_ptr, rows, cols, mask_m, mask_n,
                             stride_zm, stride_zd, stride_zm, stride_zd, D, inv_temp,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        valid = mask_m[:, None] & mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
        x = tl.where(valid, x, float("-inf"))  # masked lanes (incl. the diagonal) -> weight 0
        b = g_i[:, None] * tl.exp(x - lse_i[:, None]) + tl.exp(x - lse_j[None, :]) * g_j[None, :]  # (BLOCK_M, BLOCK_N)
        acc = tl.dot(b.to(z_j.dtype), z_j, acc, input_precision=PRECISION)

    dz = acc * out_scale
    tl.store(
        dz_ptr + rows[:, None] * stride_dzm + offs_do[None, :] * stride_dzd,
        dz.to(dz_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_do[None, :],
    )


# ----------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------
class _Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


def _block_d(D: int, cap: int) -> int:
    # tl.dot needs every block dim >= 16 on GPUs.
    return max(16, min(cap, triton.next_power_of_2(D)))


def _gpu_config(kind: str, dtype: torch.dtype, D: int, aligned: bool = True,
                capability: Tuple[int, int] = (9, 0)) -> _Config:
    """Block sizes for an H100/H200-class GPU. kind: "fwd" or "bwd".

    aligned: every (M, D) operand has unit stride along D, a row stride that is a
    multiple of 16 elements and a 16-byte aligned pointer (what Triton specialises
    on).  Otherwise rows cannot be loaded with vector / async copies and the tiles
    go through registers: narrower D chunks and more warps avoid register spills.
    capability: the GPU's (major, minor).  Before sm_90 the fp32 backward gets
    32 x 32 tiles: A100's 64 x 32 tiles need > 255 registers (272 B of spills).
    (Checked by compiling for sm_80 and sm_90, tests/test_triton_compile.py.)
    """
    if dtype == torch.float32:
        # exact fp32 dots (input_precision="ieee") run on CUDA cores: smaller tiles.
        warps = 4 if aligned else 8
        if kind == "fwd":
            return _Config(64, 64, _block_d(D, 32), num_warps=warps, num_stages=2)
        if tuple(capability) < (9, 0):
            return _Config(32, 32, _block_d(D, 64), num_warps=warps, num_stages=2)
        return _Config(64, 32, _block_d(D, 64), num_warps=warps, num_stages=2)
    # fp16 / bf16 on tensor cores
    if kind == "fwd":
        if aligned:
            return _Config(128, 64, _block_d(D, 128), num_warps=8, num_stages=3)
        return _Config(128, 64, _block_d(D, 64), num_warps=8, num_stages=2)
    if aligned:
        bd = _block_d(D, 128)
        return _Config(64, 64, bd, num_warps=4 if bd <= 64 else 8, num_stages=2)
    return _Config(64, 64, _block_d(D, 64), num_warps=8, num_stages=2)


def _interpreter_config(kind: str, dtype: torch.dtype, D: int, aligned: bool = True) -> _Config:
    # Triton interpreter (CPU tensors): moderate, asymmetric blocks so that test shapes
    # span several (ragged) tiles in every direction.
    return _Config(32, 64, _block_d(D, 64), num_warps=1, num_stages=1)


def _config(kind: str, dtype: torch.dtype, D: int, device: torch.device, aligned: bool = True) -> _Config:
    if device.type == "cuda":
        return _gpu_config(kind, dtype, D, aligned, torch.cuda.get_device_capability(device))
    return _interpreter_config(kind, dtype, D, aligned)


def _aligned(*mats: torch.Tensor) -> bool:
    """Whether all (rows, D) operands allow 16-byte vectorised row loads (see _gpu_config)."""
    return all(
        (t.stride(1) == 1 or t.shape[1] == 1)
        and t.stride(0) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in mats
    )


def _precision(dtype: torch.dtype) -> str:
    # fp32 must be exact (logits are scaled by up to ~100): never tf32.
    # The setting is irrelevant for 16-bit inputs; "tf32" is the default there.
    return "ieee" if dtype == torch.float32 else "tf32"


def _grad_scale(grad_lse: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(1,) fp32 scale s for fp16 weights, or None.

    The weights g_i * exp(x_ij - lse_i) go through fp16 into tl.dot; with g ~ 1/(2N)
    and p ~ 1/(2N) they are fp16 subnormals (2N = 2048) or zero (2N >= 8192).  The
    kernels use g * s with s = 2^14 / max|g| (weights <= 2^14, or 2^15 summed in the
    symmetric pass: inside fp16's 65504) and divide the fp32 result by s.  bf16 has
    fp32's exponent range and fp32 needs no scale.  A power of two: exact.  No host
    sync: s stays on the device.
    """
    if dtype != torch.float16:
        return None
    gmax = grad_lse.detach().abs().amax().float()
    # 2^floor(14 - log2 max|g|), clamped to [2^-100, 2^100]; 1 when max|g| is 0 or not finite.
    e = torch.floor(14.0 - torch.log2(gmax)).clamp(-100.0, 100.0)
    s = torch.where(torch.isfinite(gmax) & (gmax > 0), torch.exp2(e), torch.ones_like(gmax))
    return s.reshape(1)


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's CUDA device (no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def _check_exclude(exclude: Optional[torch.Tensor], M: int, device: torch.device):
    if exclude is not None:
        assert exclude.dim() == 1 and exclude.shape[0] == M, "exclude must be (M,)"
        assert exclude.dtype == torch.int64 and exclude.device == device


def nt_xent_lse(
    q: torch.Tensor, c: torch.Tensor, exclude: Optional[torch.Tensor], inv_temp: float
) -> torch.Tensor:
    """lse_i = log sum_{j != exclude_i} exp(inv_temp * <q_i, c_j>)  -> (M,) float32."""
    # q: (M, D), c: (Kc, D), exclude: (M,) int64 or None
    assert q.dim() == 2 and c.dim() == 2 and q.shape[1] == c.shape[1]
    assert q.dtype == c.dtype and q.device == c.device
    M, D = q.shape
    Kc = c.shape[0]
    _check_exclude(exclude, M, q.device)
    inv_temp = float(inv_temp)

    lse = new_output(M, like=q, dtype=torch.float32)  # (M,)
    if M == 0:
        return lse
    cfg = _config("fwd", q.dtype, D, q.device, _aligned(q, c))
    has_excl = exclude is not None
    excl = exclude if has_excl else lse  # dummy pointer when absent (never read)

    grid = (triton.cdiv(M, cfg.BLOCK_M),)
    with _device_guard(q):
        _nt_xent_lse_fwd_kernel[grid](
            q, c, excl, lse,
            M, Kc, D, inv_temp,
            q.stride(0), q.stride(1), c.stride(0), c.stride(1),
            excl.stride(0), lse.stride(0),
            HAS_EXCLUDE=has_excl, SINGLE_D=D <= cfg.BLOCK_D, PRECISION=_precision(q.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return lse


def nt_xent_lse_backward(
    grad_lse: torch.Tensor,
    q: torch.Tensor,
    c: torch.Tensor,
    exclude: Optional[torch.Tensor],
    lse: torch.Tensor,
    inv_temp: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad_q = inv_temp * A @ c, grad_c = inv_temp * A^T @ q, A_ij = grad_lse_i * exp(x_ij - lse_i)."""
    # grad_lse: (M,), q: (M, D), c: (Kc, D), exclude: (M,) int64 or None, lse: (M,) fp32
    assert q.dim() == 2 and c.dim() == 2 and q.shape[1] == c.shape[1]
    assert q.dtype == c.dtype and q.device == c.device
    M, D = q.shape
    Kc = c.shape[0]
    assert grad_lse.shape == (M,) and lse.shape == (M,)
    _check_exclude(exclude, M, q.device)
    inv_temp = float(inv_temp)

    grad_q = new_output(M, D, like=q)   # (M, D)
    grad_c = new_output(Kc, D, like=c)  # (Kc, D)
    if M == 0 or Kc == 0 or D == 0:
        return grad_q.zero_(), grad_c.zero_()
    cfg = _config("bwd", q.dtype, D, q.device, _aligned(q, c))
    has_excl = exclude is not None
    excl = exclude if has_excl else lse  # dummy pointer when absent (never read)
    n_dblk = triton.cdiv(D, cfg.BLOCK_D)
    scale = _grad_scale(grad_lse, q.dtype)
    common = dict(
        HAS_SCALE=scale is not None, HAS_EXCLUDE=has_excl, SINGLE_D=n_dblk == 1, PRECISION=_precision(q.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    strides_in = (
        grad_lse.stride(0), q.stride(0), q.stride(1), c.stride(0), c.stride(1),
        excl.stride(0), lse.stride(0),
    )
    with _device_guard(q):
        # grad_q: one program per (row block, D chunk), loops over column tiles.
        _nt_xent_bwd_dq_kernel[(triton.cdiv(M, cfg.BLOCK_M), n_dblk)](
            grad_lse, q, c, excl, lse, grad_q, lse if scale is None else scale,
            M, Kc, D, inv_temp,
            *strides_in, grad_q.stride(0), grad_q.stride(1),
            **common,
        )
        # grad_c: one program per (column block, D chunk), loops over row tiles.
        _nt_xent_bwd_dc_kernel[(triton.cdiv(Kc, cfg.BLOCK_N), n_dblk)](
            grad_lse, q, c, excl, lse, grad_c, lse if scale is None else scale,
            M, Kc, D, inv_temp,
            *strides_in, grad_c.stride(0), grad_c.stride(1),
            **common,
        )
    return grad_q, grad_c


def nt_xent_lse_backward_sym(
    grad_lse: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, inv_temp: float
) -> torch.Tensor:
    """q = c = z, exclude_i = i:  grad_z = inv_temp * (A + A^T) @ z."""
    # grad_lse: (M,), z: (M, D), lse: (M,) fp32
    assert z.dim() == 2
    M, D = z.shape
    assert grad_lse.shape == (M,) and lse.shape == (M,)
    inv_temp = float(inv_temp)

    grad_z = new_output(M, D, like=z)  # (M, D)
    if M == 0 or D == 0:
        return grad_z.zero_()
    cfg = _config("bwd", z.dtype, D, z.device, _aligned(z))
    n_dblk = triton.cdiv(D, cfg.BLOCK_D)
    scale = _grad_scale(grad_lse, z.dtype)
    with _device_guard(z):
        _nt_xent_bwd_sym_kernel[(triton.cdiv(M, cfg.BLOCK_M), n_dblk)](
            grad_lse, z, lse, grad_z, lse if scale is None else scale,
            M, D, inv_temp,
            grad_lse.stride(0), z.stride(0), z.stride(1), lse.stride(0),
            grad_z.stride(0), grad_z.stride(1),
            HAS_SCALE=scale is not None, SINGLE_D=n_dblk == 1, PRECISION=_precision(z.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return grad_z

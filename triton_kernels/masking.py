"""Triton kernels of the masked-token ops (``sslops.masking``).

Token layout: L = P + N rows per sample, P prefix rows (cls / registers) then N
patch rows; index tensors (int32 or int64, any strides) address patch rows.
Every kernel is one launch over a (rows, D-blocks) grid, takes the inputs'
strides (no copies for slices or an expanded batch) and writes each output
element once.

* ``gather_tokens``: out[b, r] = x[b, src] (+ pos_embed[b or 0, src]), src = r
  for prefix rows, P + ids_keep[b, r - P] otherwise.  The add is done in fp32
  and rounded once, like ``x + pos_embed``.
* ``gather_tokens_backward``: grad_x[b, l] = sum of grad[b, P + k] over the k
  with ids_keep[b, k] == l - P (masked tile loads: only matching rows are
  read), prefix rows copied, zeros elsewhere.  No atomics: deterministic.
* ``restore_tokens``: MAE's decoder un-shuffle.
* ``restore_tokens_backward``: grad_x_visible rows by the same masked scan, and
  a per-sample partial sum of the mask token's gradient (one extra row per
  sample in the grid), reduced over the batch by ``torch.sum`` (deterministic).

Out-of-range indices: Triton has no always-on device assert, so an index
outside [0, N) is never dereferenced; the output row it names is NaN (and it
contributes nothing to gradients).  The Python API range-checks CPU inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import new_output
from ._common import Launch, device_guard

def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(D: int, cap: int) -> int:
    return max(16, min(triton.next_power_of_2(max(D, 1)), cap))


@triton.jit
def _gather_kernel(x_ptr, ids_ptr, pos_ptr, out_ptr, R, P, N, D,
                   sxb, sxl, sxd, sib, sik, spb, spl, spd,
                   HAS_POS: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // R
    r = row % R
    is_patch = r >= P
    k = tl.maximum(r - P, 0)
    idx = tl.load(ids_ptr + b * sib + k * sik, mask=is_patch, other=0).to(tl.int64)
    ok = (idx >= 0) & (idx < N)
    valid = ok | (r < P)
    src = tl.where(is_patch, P + idx, r)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    offs = offs.to(tl.int64)  # every offset is int64: strides may be large (permuted views)
    m = dmask & valid
    v = tl.load(x_ptr + b * sxb + src * sxl + offs * sxd, mask=m, other=0.0)
    if HAS_POS:
        p = tl.load(pos_ptr + b * spb + src * spl + offs * spd, mask=m, other=0.0)
        v = (v.to(ACC) + p.to(ACC)).to(v.dtype)
    v = tl.where(valid, v, float("nan"))
    tl.store(out_ptr + row * D + offs, v.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _scatter_kernel(g_ptr, ids_ptr, out_ptr, L, P, K, D,
                    sgb, sgl, sgd, sib, sik,
                    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    offs = offs.to(tl.int64)
    # prefix rows: a copy of the same row of grad
    acc = tl.load(g_ptr + b * sgb + l * sgl + offs * sgd, mask=dmask & (l < P), other=0.0).to(ACC)
    n = tl.where(l >= P, l - P, -2)  # -2 never matches: prefix rows take no patch rows
    for k0 in range(0, K, BLOCK_K):
        # int64: (P + k) * stride overflows int32 for large gradients or transposed views
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        ids = tl.load(ids_ptr + b * sib + ks * sik, mask=ks < K, other=-1).to(tl.int64)
        match = ids == n
        tile = tl.load(g_ptr + b * sgb + (P + ks[:, None]) * sgl + offs[None, :] * sgd,
                       mask=match[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(tile.to(ACC), axis=0)
    tl.store(out_ptr + row * D + offs, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _restore_kernel(x_ptr, ids_ptr, mt_ptr, out_ptr, R, P, K, N, D,
                    sxb, sxl, sxd, sib, sin, smd, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // R
    r = row % R
    is_patch = r >= P
    j = tl.load(ids_ptr + b * sib + tl.maximum(r - P, 0) * sin, mask=is_patch, other=0).to(tl.int64)
    valid = (r < P) | ((j >= 0) & (j < N))
    use_x = (r < P) | (j < K)
    src = tl.where(is_patch, P + j, r)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    offs = offs.to(tl.int64)
    vx = tl.load(x_ptr + b * sxb + src * sxl + offs * sxd, mask=dmask & valid & use_x, other=0.0)
    vm = tl.load(mt_ptr + offs * smd, mask=dmask & valid & (~use_x), other=0.0)
    v = tl.where(use_x, vx, vm)
    v = tl.where(valid, v, float("nan"))
    tl.store(out_ptr + row * D + offs, v.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _restore_backward_kernel(g_ptr, ids_ptr, gx_ptr, part_ptr, P, K, N, D,
                             sgb, sgl, sgd, sib, sin,
                             ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # rows r in [0, P + K] of sample b: r < P+K is a row of grad_x_visible,
    # r == P + K the partial sum of the mask token's gradient over sample b.
    R1 = P + K + 1
    row = tl.program_id(0).to(tl.int64)
    b = row // R1
    r = row % R1
    is_mask_row = r == P + K
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    offs = offs.to(tl.int64)
    acc = tl.load(g_ptr + b * sgb + r * sgl + offs * sgd, mask=dmask & (r < P), other=0.0).to(ACC)
    k = tl.where(r >= P, r - P, -2)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # int64 offsets, as in _scatter_kernel
        ids = tl.load(ids_ptr + b * sib + ns * sin, mask=ns < N, other=-1).to(tl.int64)
        match = tl.where(is_mask_row, (ids >= K) & (ids < N), ids == k)
        tile = tl.load(g_ptr + b * sgb + (P + ns[:, None]) * sgl + offs[None, :] * sgd,
                       mask=match[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(tile.to(ACC), axis=0)
    tl.store(gx_ptr + (b * (P + K) + r) * D + offs, acc.to(gx_ptr.dtype.element_ty),
             mask=dmask & (~is_mask_row))
    tl.store(part_ptr + b * D + offs, acc.to(part_ptr.dtype.element_ty), mask=dmask & is_mask_row)


# ----------------------------------------------------------------------------
# Launches (argument checks are done by sslops.masking).  The *_launch functions
# build the launch from the tensors (meta tensors work: the compile test uses
# them); the launchers allocate the outputs and run it on the inputs' device.
# ----------------------------------------------------------------------------
def _gather_launch(x, ids_keep, pos_embed, num_prefix_tokens: int, out) -> Launch:
    B, L, D = x.shape
    P, K = num_prefix_tokens, ids_keep.shape[1]
    has_pos = pos_embed is not None
    pos = pos_embed if has_pos else x
    spb = 0 if (has_pos and pos.shape[0] == 1) else pos.stride(0)
    BLOCK_D = _block_d(D, 1024)
    grid = (B * (P + K), triton.cdiv(D, BLOCK_D))
    args = (x, ids_keep, pos, out, P + K, P, L - P, D,
            x.stride(0), x.stride(1), x.stride(2), ids_keep.stride(0), ids_keep.stride(1),
            spb, pos.stride(1), pos.stride(2))
    return Launch(_gather_kernel, grid, args, dict(HAS_POS=has_pos, ACC=_acc_dtype(x.dtype), BLOCK_D=BLOCK_D))


def _scatter_launch(grad, ids_keep, seq_len: int, num_prefix_tokens: int, out) -> Launch:
    B, _, D = grad.shape
    P, K = num_prefix_tokens, ids_keep.shape[1]
    BLOCK_D = _block_d(D, 256)
    BLOCK_K = 32 if K > 16 else 16
    grid = (B * seq_len, triton.cdiv(D, BLOCK_D))
    args = (grad, ids_keep, out, seq_len, P, K, D,
            grad.stride(0), grad.stride(1), grad.stride(2), ids_keep.stride(0), ids_keep.stride(1))
    return Launch(_scatter_kernel, grid, args, dict(ACC=_acc_dtype(grad.dtype), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D))


def _restore_launch(x_visible, ids_restore, mask_token, num_prefix_tokens: int, out) -> Launch:
    B, R_in, D = x_visible.shape
    P, N = num_prefix_tokens, ids_restore.shape[1]
    BLOCK_D = _block_d(D, 1024)
    grid = (B * (P + N), triton.cdiv(D, BLOCK_D))
    args = (x_visible, ids_restore, mask_token, out, P + N, P, R_in - P, N, D,
            x_visible.stride(0), x_visible.stride(1), x_visible.stride(2),
            ids_restore.stride(0), ids_restore.stride(1), mask_token.stride(0))
    return Launch(_restore_kernel, grid, args, dict(BLOCK_D=BLOCK_D))


def _restore_backward_launch(grad, ids_restore, num_visible: int, num_prefix_tokens: int, grad_xv,
                             partial) -> Launch:
    B, _, D = grad.shape
    P, K, N = num_prefix_tokens, num_visible, ids_restore.shape[1]
    BLOCK_D = _block_d(D, 256)
    BLOCK_N = 32 if N > 16 else 16
    grid = (B * (P + K + 1), triton.cdiv(D, BLOCK_D))
    args = (grad, ids_restore, grad_xv, partial, P, K, N, D,
            grad.stride(0), grad.stride(1), grad.stride(2), ids_restore.stride(0), ids_restore.stride(1))
    return Launch(_restore_backward_kernel, grid, args,
                  dict(ACC=_acc_dtype(grad.dtype), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D))


def _partial_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed, num_prefix_tokens: int) -> torch.Tensor:
    B, _, D = x.shape
    out = new_output(B, num_prefix_tokens + ids_keep.shape[1], D, like=x)
    if out.numel() > 0:
        with device_guard(x):
            _gather_launch(x, ids_keep, pos_embed, num_prefix_tokens, out)()
    return out


def gather_tokens_backward(grad: torch.Tensor, ids_keep: torch.Tensor, seq_len: int,
                           num_prefix_tokens: int) -> torch.Tensor:
    B, _, D = grad.shape
    out = new_output(B, seq_len, D, like=grad)
    if out.numel() > 0:
        with device_guard(grad):
            _scatter_launch(grad, ids_keep, seq_len, num_prefix_tokens, out)()
    return out


def restore_tokens(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   num_prefix_tokens: int) -> torch.Tensor:
    B, _, D = x_visible.shape
    out = new_output(B, num_prefix_tokens + ids_restore.shape[1], D, like=x_visible)
    if out.numel() > 0:
        with device_guard(x_visible):
            _restore_launch(x_visible, ids_restore, mask_token, num_prefix_tokens, out)()
    return out


def restore_tokens_backward(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                            num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, D = grad.shape
    grad_xv = new_output(B, num_prefix_tokens + num_visible, D, like=grad)
    partial = new_output(B, D, like=grad, dtype=_partial_dtype(grad.dtype))
    with device_guard(grad):
        if B * D > 0:
            _restore_backward_launch(grad, ids_restore, num_visible, num_prefix_tokens, grad_xv, partial)()
        grad_mt = partial.sum(0).to(grad.dtype)
    return grad_xv, grad_mt

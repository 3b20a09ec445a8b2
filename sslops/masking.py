"""Masked-token gather for masked-image pretraining (MAE, data2vec 2.0, I-JEPA).

A ViT encoder under masking sees only the visible patch tokens; the decoder
puts them back in place with a learned mask token for the others.  The fused
ops do each of these in one pass over the bytes that must move:

* :func:`gather_tokens` picks rows of x (B, L, D) by ``ids_keep`` (B, K) and adds
  the positional embedding to the picked rows in the same pass (MAE adds it to
  every token first and then gathers: a full extra read and write of x).
* :func:`random_masking` is MAE's per-sample random masking built on it.
* :func:`restore_tokens` is MAE's decoder un-shuffle (cat + gather) in one pass.
* :func:`block_masking` makes data2vec 2.0 / I-JEPA block masks as ``ids_keep``
  on the device, with the same K for every sample.

Token layout: L = P + N rows per sample, ``num_prefix_tokens`` = P prefix rows
(cls / register tokens, always kept, never moved) then N patch rows.  Index
tensors (int32 or int64) address patch rows, values in [0, N), as in MAE
(P = 0 there: MAE masks before appending the cls token) and timm's patch
dropout.

Index range: CPU inputs are always checked (ValueError from the Python API,
RuntimeError from the raw ``torch.ops.sslops`` ops).  GPU inputs are not
checked on the host (that would synchronise); the kernels never read or write
out of bounds: the CUDA kernels raise a device-side assert (like torch.gather),
the Triton kernels write NaN into the output row named by a bad index.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _backend, _checks, reference

# Every backend computes fp32/fp16/bf16/fp64 (copies; adds in fp32, fp64 in fp64);
# under the Triton interpreter bf16 is refused (numpy has no bfloat16).
_DTYPES = {"triton": (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
_backend.register_op("gather_tokens", compiled=("gather_tokens", "gather_tokens_backward"), triton=True,
                     dtypes=_DTYPES)
_backend.register_op("random_masking", compiled=("gather_tokens", "gather_tokens_backward"), triton=True,
                     dtypes=_DTYPES)
_backend.register_op("restore_tokens", compiled=("restore_tokens", "restore_tokens_backward"), triton=True,
                     dtypes=_DTYPES)

INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops (schemas: csrc/sslops.cpp)
# ----------------------------------------------------------------------------
def _gather_fake(x, ids_keep, pos_embed, num_prefix_tokens):
    return x.new_empty((x.shape[0], num_prefix_tokens + ids_keep.shape[1], x.shape[2]))


def _gather_backward_fake(grad, ids_keep, seq_len, num_prefix_tokens):
    return grad.new_empty((grad.shape[0], seq_len, grad.shape[2]))


def _restore_fake(x_visible, ids_restore, mask_token, num_prefix_tokens):
    return x_visible.new_empty((x_visible.shape[0], num_prefix_tokens + ids_restore.shape[1], x_visible.shape[2]))


def _restore_backward_fake(grad, ids_restore, num_visible, num_prefix_tokens):
    B, _, D = grad.shape
    return grad.new_empty((B, num_prefix_tokens + num_visible, D)), grad.new_empty((D,))


torch.library.register_fake("sslops::gather_tokens")(_gather_fake)
torch.library.register_fake("sslops::gather_tokens_backward")(_gather_backward_fake)
torch.library.register_fake("sslops::restore_tokens")(_restore_fake)
torch.library.register_fake("sslops::restore_tokens_backward")(_restore_backward_fake)


def _setup_gather(ctx, inputs, output):
    x, ids_keep, pos_embed, num_prefix_tokens = inputs
    ctx.save_for_backward(ids_keep)
    ctx.seq_len = x.shape[1]
    ctx.num_prefix_tokens = num_prefix_tokens
    ctx.pos_broadcast = pos_embed is not None and pos_embed.shape[0] == 1


def _gather_grads(ctx, grad_x):
    """(grad_x, grad_pos_embed) from the scattered gradient.  A pos_embed of
    batch 1 gets the sum over the batch (torch.sum: a fixed-order reduction,
    deterministic on CPU and GPU, fp32 accumulation for half types)."""
    need_x, _, need_pos, _ = ctx.needs_input_grad
    grad_pos = None
    if need_pos:
        if ctx.pos_broadcast:
            grad_pos = grad_x.sum(0, keepdim=True)
        else:
            grad_pos = grad_x.clone() if need_x else grad_x
    return (grad_x if need_x else None), None, grad_pos, None


def _backward_gather(ctx, grad, ops=torch.ops.sslops):
    (ids_keep,) = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return None, None, None, None
    grad_x = ops.gather_tokens_backward(grad, ids_keep, ctx.seq_len, ctx.num_prefix_tokens)
    return _gather_grads(ctx, grad_x)


def _setup_restore(ctx, inputs, output):
    x_visible, ids_restore, mask_token, num_prefix_tokens = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_visible = x_visible.shape[1] - num_prefix_tokens
    ctx.num_prefix_tokens = num_prefix_tokens


def _backward_restore(ctx, grad, ops=torch.ops.sslops):
    (ids_restore,) = ctx.saved_tensors
    grad_xv, grad_mt = ops.restore_tokens_backward(
        grad, ids_restore, ctx.num_visible, ctx.num_prefix_tokens
    )
    need_xv, _, need_mt, _ = ctx.needs_input_grad
    return (grad_xv if need_xv else None), None, (grad_mt if need_mt else None), None


# Double backward: each backward op is linear in its gradient input, and its
# adjoint is the forward op (without pos_embed): the adjoint of the scatter is
# the gather by the same ids, the adjoint of restore's backward is restore with
# the upstream gradients as (x_visible, mask_token).  So every order of
# derivative goes through the same kernels (create_graph=True is exact).
def _setup_gather_bwd(ctx, inputs, output):
    grad, ids_keep, seq_len, num_prefix_tokens = inputs
    ctx.save_for_backward(ids_keep)
    ctx.num_prefix_tokens = num_prefix_tokens


def _gather_bwd_adjoint(gather):
    def backward(ctx, gg):
        (ids_keep,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return gather(gg, ids_keep, None, ctx.num_prefix_tokens), None, None, None

    return backward


def _setup_restore_bwd(ctx, inputs, output):
    grad, ids_restore, num_visible, num_prefix_tokens = inputs
    ctx.save_for_backward(ids_restore)
    ctx.shape = (grad.shape[0], num_prefix_tokens + num_visible, grad.shape[2])
    ctx.num_prefix_tokens = num_prefix_tokens


def _restore_bwd_adjoint(restore):
    def backward(ctx, gg_xv, gg_mt):
        (ids_restore,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        like = gg_xv if gg_xv is not None else gg_mt
        if gg_xv is None:
            gg_xv = like.new_zeros(ctx.shape)
        if gg_mt is None:
            gg_mt = like.new_zeros(ctx.shape[2])
        return restore(gg_xv, ids_restore, gg_mt, ctx.num_prefix_tokens), None, None, None

    return backward


@_backend.compiled_namespace_setup  # sslops, and sslops_emu (the CUDA emulator) when it loads
def _register_autograd(ns: str) -> None:
    ops = getattr(torch.ops, ns)
    torch.library.register_autograd(f"{ns}::gather_tokens", functools.partial(_backward_gather, ops=ops),
                                    setup_context=_setup_gather)
    torch.library.register_autograd(f"{ns}::restore_tokens", functools.partial(_backward_restore, ops=ops),
                                    setup_context=_setup_restore)
    torch.library.register_autograd(f"{ns}::gather_tokens_backward", _gather_bwd_adjoint(ops.gather_tokens),
                                    setup_context=_setup_gather_bwd)
    torch.library.register_autograd(f"{ns}::restore_tokens_backward", _restore_bwd_adjoint(ops.restore_tokens),
                                    setup_context=_setup_restore_bwd)


# ----------------------------------------------------------------------------
# Triton ops (triton_kernels/masking.py), exposed as torch custom ops
# ----------------------------------------------------------------------------
def _tk():
    from .triton_kernels import masking as tk

    return tk


@torch.library.custom_op("sslops::gather_tokens_triton", mutates_args=())
def gather_tokens_triton(x: Tensor, ids_keep: Tensor, pos_embed: Optional[Tensor], num_prefix_tokens: int) -> Tensor:
    return _tk().gather_tokens(x, ids_keep, pos_embed, num_prefix_tokens)


@torch.library.custom_op("sslops::gather_tokens_backward_triton", mutates_args=())
def gather_tokens_backward_triton(grad: Tensor, ids_keep: Tensor, seq_len: int, num_prefix_tokens: int) -> Tensor:
    return _tk().gather_tokens_backward(grad, ids_keep, seq_len, num_prefix_tokens)


@torch.library.custom_op("sslops::restore_tokens_triton", mutates_args=())
def restore_tokens_triton(x_visible: Tensor, ids_restore: Tensor, mask_token: Tensor, num_prefix_tokens: int) -> Tensor:
    return _tk().restore_tokens(x_visible, ids_restore, mask_token, num_prefix_tokens)


@torch.library.custom_op("sslops::restore_tokens_backward_triton", mutates_args=())
def restore_tokens_backward_triton(
    grad: Tensor, ids_restore: Tensor, num_visible: int, num_prefix_tokens: int
) -> tuple[Tensor, Tensor]:
    return _tk().restore_tokens_backward(grad, ids_restore, num_visible, num_prefix_tokens)


gather_tokens_triton.register_fake(_gather_fake)
gather_tokens_backward_triton.register_fake(_gather_backward_fake)
restore_tokens_triton.register_fake(_restore_fake)
restore_tokens_backward_triton.register_fake(_restore_backward_fake)


def _backward_gather_triton(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return None, None, None, None
    grad_x = gather_tokens_backward_triton(grad, ids_keep, ctx.seq_len, ctx.num_prefix_tokens)
    return _gather_grads(ctx, grad_x)


def _backward_restore_triton(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    grad_xv, grad_mt = restore_tokens_backward_triton(grad, ids_restore, ctx.num_visible, ctx.num_prefix_tokens)
    need_xv, _, need_mt, _ = ctx.needs_input_grad
    return (grad_xv if need_xv else None), None, (grad_mt if need_mt else None), None


gather_tokens_triton.register_autograd(_backward_gather_triton, setup_context=_setup_gather)
restore_tokens_triton.register_autograd(_backward_restore_triton, setup_context=_setup_restore)
gather_tokens_backward_triton.register_autograd(_gather_bwd_adjoint(gather_tokens_triton),
                                                setup_context=_setup_gather_bwd)
restore_tokens_backward_triton.register_autograd(_restore_bwd_adjoint(restore_tokens_triton),
                                                 setup_context=_setup_restore_bwd)


# ----------------------------------------------------------------------------
# Backend switch
# ----------------------------------------------------------------------------
def _gather(x, ids_keep, pos_embed, num_prefix_tokens, backend):
    if backend == "reference":
        return reference.gather_tokens(x, ids_keep, pos_embed, num_prefix_tokens)
    if backend == "triton":
        return gather_tokens_triton(x, ids_keep, pos_embed, num_prefix_tokens)
    return _backend.ops(backend).gather_tokens(x, ids_keep, pos_embed, num_prefix_tokens)


def _restore(x_visible, ids_restore, mask_token, num_prefix_tokens, backend):
    if backend == "reference":
        return reference.restore_tokens(x_visible, ids_restore, mask_token, num_prefix_tokens)
    if backend == "triton":
        return restore_tokens_triton(x_visible, ids_restore, mask_token, num_prefix_tokens)
    return _backend.ops(backend).restore_tokens(x_visible, ids_restore, mask_token, num_prefix_tokens)


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------
def _ratio(value, name: str = "mask_ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _index(ids, name: str, batch: int, ref: Tensor, ref_name: str) -> Tensor:
    _checks.tensor(ids, name, ndim=2)
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {ids.dtype}")
    if ids.shape[0] != batch:
        raise ValueError(f"{name} must have shape (B, *) with B = {batch} like {ref_name}, got {tuple(ids.shape)}")
    _checks.same_device(ref, ref_name, ids, name)
    return ids


def _check_range(ids: Tensor, name: str, n: int) -> None:
    """Index range of CPU inputs (GPU: the kernels guard, see the module doc).
    Skipped while torch.compile traces (the CPU kernel still checks)."""
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} has an index {bad} out of range [0, {n})")


def _check_tokens(x, name: str) -> Tensor:
    _checks.tensor(x, name, ndim=3, floating=True)
    return x


def _check_gather_args(x, ids_keep, pos_embed, num_prefix_tokens, check_range: bool = True) -> None:
    _check_tokens(x, "x")
    B, L, D = x.shape
    _checks.integer(num_prefix_tokens, "num_prefix_tokens", 0, L)
    _index(ids_keep, "ids_keep", B, x, "x")
    if pos_embed is not None:
        _checks.tensor(pos_embed, "pos_embed", ndim=3, floating=True)
        if pos_embed.shape[0] not in (1, B) or tuple(pos_embed.shape[1:]) != (L, D):
            raise ValueError(
                f"pos_embed must have shape (1 or B, L, D) = (1 or {B}, {L}, {D}), got {tuple(pos_embed.shape)}"
            )
        _checks.same_dtype(x, "x", pos_embed, "pos_embed")
        _checks.same_device(x, "x", pos_embed, "pos_embed")
    if check_range:
        _check_range(ids_keep, "ids_keep", L - num_prefix_tokens)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def gather_tokens(
    x: Tensor,
    ids_keep: Tensor,
    *,
    pos_embed: Optional[Tensor] = None,
    num_prefix_tokens: int = 0,
    backend: str = "auto",
) -> Tensor:
    """Pick the visible tokens: ``out[b] = cat(x[b, :P], x[b, P + ids_keep[b]])``.

    Args:
        x: (B, L, D) tokens, fp32/fp16/bf16 (fp64 too), any strides.
        ids_keep: (B, K) int32/int64 patch indices in [0, L - P); repeats are
            allowed (their gradients add up).
        pos_embed: optional ((1 or B), L, D), x's dtype: added to each picked row
            in the same pass, prefix rows included; equal bit for bit to
            ``gather(x + pos_embed)``.
        num_prefix_tokens: P leading tokens (cls / registers), always kept and
            never moved (their pos_embed rows are added: zero them for none).
        backend: "auto" | "cuda" | "triton" | "cpu" | "reference".

    Returns:
        (B, P + K, D) in x's dtype.  Backward: the gradient is scattered back
        into grad_x (zeros at dropped tokens) and, for pos_embed, summed over
        the batch when pos_embed has batch 1; deterministic on every backend.
    """
    _check_gather_args(x, ids_keep, pos_embed, num_prefix_tokens)
    be = _backend.resolve("gather_tokens", backend, x.device, x.dtype)
    return _gather(x, ids_keep, pos_embed, num_prefix_tokens, be)


def random_masking(
    x: Tensor,
    mask_ratio: float,
    *,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    pos_embed: Optional[Tensor] = None,
    num_prefix_tokens: int = 0,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking (``MaskedAutoencoderViT.random_masking``).

    Args:
        x: (B, L, D) tokens: P prefix tokens, then N = L - P patch tokens.
        mask_ratio: fraction of patch tokens removed, in [0, 1);
            ``len_keep = int(N * (1 - mask_ratio))`` as in MAE.
        noise: optional (B, N) floats; the tokens with the smallest noise are
            kept.  Default: ``torch.rand(B, N, generator=generator)`` on x's device.
        generator: torch.Generator for the default noise (on x's device).
        pos_embed: optional ((1 or B), L, D), added to the kept tokens in the
            same pass (MAE adds it to all tokens before masking).
        num_prefix_tokens: P leading tokens kept in front, not moved (pos_embed
            is added to them too, as MAE adds pos_embed[:, :1] to its cls token).
        backend: backend of the gather ("auto" | "cuda" | "triton" | "cpu" | "reference").

    Returns:
        (x_visible (B, P + len_keep, D), mask (B, N) with 0 = kept and 1 =
        removed in the input's order (default float dtype, like MAE),
        ids_restore (B, N) int64).  With the same noise and P = 0 every output
        equals MAE's random_masking(x + pos_embed) bit for bit.
    """
    _check_tokens(x, "x")
    mask_ratio = _ratio(mask_ratio)
    B, L, D = x.shape
    _checks.integer(num_prefix_tokens, "num_prefix_tokens", 0, L)
    N = L - num_prefix_tokens
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if noise is None:
        if generator is not None and generator.device != x.device:
            raise ValueError(f"generator is on {generator.device} but x is on {x.device}")
        noise = torch.rand(B, N, device=x.device, generator=generator)
    else:
        _checks.tensor(noise, "noise", ndim=2)
        if noise.is_complex() or noise.dtype == torch.bool:  # argsort: complex fails inside, bool is all ties
            raise TypeError(f"noise must be a real tensor (floating, like torch.rand), got {noise.dtype}")
        if tuple(noise.shape) != (B, N):
            raise ValueError(f"noise must have shape (B, L - num_prefix_tokens) = ({B}, {N}), got {tuple(noise.shape)}")
        _checks.same_device(x, "x", noise, "noise")
    len_keep = int(N * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    _check_gather_args(x, ids_keep, pos_embed, num_prefix_tokens, check_range=False)  # argsort: in range
    be = _backend.resolve("random_masking", backend, x.device, x.dtype)
    x_visible = _gather(x, ids_keep, pos_embed, num_prefix_tokens, be)
    # MAE: ones, zero the first len_keep, gather by ids_restore; equivalently
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())
    return x_visible, mask, ids_restore


def restore_tokens(
    x_visible: Tensor,
    ids_restore: Tensor,
    mask_token: Tensor,
    *,
    num_prefix_tokens: int = 0,
    backend: str = "auto",
) -> Tensor:
    """MAE's decoder un-shuffle in one pass.

    ``out[:, :P] = x_visible[:, :P]`` and ``out[:, P:] = gather(cat([x_visible[:, P:],
    mask_token.expand(B, N - K, D)], 1), 1, ids_restore)``.

    Args:
        x_visible: (B, P + K, D) decoder-embedded visible tokens.
        ids_restore: (B, N) int32/int64, values in [0, N) (from random_masking),
            N >= K; a value j < K picks visible token j, j >= K the mask token.
        mask_token: D elements ((D,), (1, D) or (1, 1, D)), x_visible's dtype.
        num_prefix_tokens: P leading tokens (MAE's decoder: 1, the cls token).
        backend: "auto" | "cuda" | "triton" | "cpu" | "reference".

    Returns:
        (B, P + N, D).  Backward: grad to x_visible (un-shuffled back) and to
        mask_token (summed over every masked position, deterministic).
    """
    _check_tokens(x_visible, "x_visible")
    B, R, D = x_visible.shape
    _checks.integer(num_prefix_tokens, "num_prefix_tokens", 0, R)
    _index(ids_restore, "ids_restore", B, x_visible, "x_visible")
    N, K = ids_restore.shape[1], R - num_prefix_tokens
    if K > N:
        raise ValueError(f"x_visible has K = {K} visible tokens but ids_restore only N = {N} positions (K <= N)")
    _checks.tensor(mask_token, "mask_token", floating=True)
    if mask_token.dim() == 0 or mask_token.shape[-1] != D or mask_token.numel() != D:
        raise ValueError(f"mask_token must have width D = {D} (shape (D,), (1, D) or (1, 1, D)), "
                         f"got {tuple(mask_token.shape)}")
    _checks.same_dtype(x_visible, "x_visible", mask_token, "mask_token")
    _checks.same_device(x_visible, "x_visible", mask_token, "mask_token")
    _check_range(ids_restore, "ids_restore", N)
    be = _backend.resolve("restore_tokens", backend, x_visible.device, x_visible.dtype)
    return _restore(x_visible, ids_restore, mask_token.reshape(D), num_prefix_tokens, be)


# ----------------------------------------------------------------------------
# Block masks (data2vec 2.0, I-JEPA), made on the device
# ----------------------------------------------------------------------------
KINDS = ("data2vec", "ijepa")


def _pair(value, name: str, lo: float, hi: float) -> Tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers (min, max), got {value!r}") from None
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= min <= max <= {hi}, got {value!r}")
    return a, b


def _first_kept(kept: Tensor, k: int) -> Tensor:
    """The first k kept positions of each row in raster order, (B, k) int64."""
    order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)
    return order[:, :k]


def _data2vec_keep(B, H, W, mask_ratio, mask_length, mask_prob_adjust, generator, device):
    # fairseq examples/data2vec compute_block_mask_2d with inverse_mask=True and
    # require_same_masks=True: blocks of mask_length^2 (clamped at the border)
    # around random centres mark the *visible* tokens; the count is then made
    # exactly int(L * (1 - mask_ratio)) by dropping random block cells (or adding
    # random other cells).  topk over (in_block + U[0, 1)) does both at once.
    L = H * W
    keep_prob = 1 - mask_ratio
    target = int(L * keep_prob)
    n_centres = int(L * ((keep_prob + mask_prob_adjust) / mask_length**2))
    sel = torch.zeros(B, L, dtype=torch.bool, device=device)
    if n_centres > 0:
        centres = torch.randint(0, L, (B, n_centres), generator=generator, device=device)
        off = torch.arange(mask_length, device=device) - mask_length // 2
        ys = (centres // W)[:, :, None, None] + off[None, None, :, None]
        xs = (centres % W)[:, :, None, None] + off[None, None, None, :]
        cells = ys.clamp(0, H - 1) * W + xs.clamp(0, W - 1)
        sel.scatter_(1, cells.reshape(B, -1), True)
    score = sel.to(torch.float32) + torch.rand(B, L, generator=generator, device=device)
    keep = torch.topk(score, target, dim=1).indices
    return torch.sort(keep, dim=1).values


def _ijepa_block_size(scale, aspect_ratio, H, W, generator, device):
    # I-JEPA MaskCollator._sample_block_size: one uniform draw sets both the
    # scale and the aspect ratio.
    r = float(torch.rand(1, generator=generator, device=device))
    s = scale[0] + r * (scale[1] - scale[0])
    max_keep = int(H * W * s)
    ar = aspect_ratio[0] + r * (aspect_ratio[1] - aspect_ratio[0])
    h = int(round(math.sqrt(max_keep * ar)))
    w = int(round(math.sqrt(max_keep / ar)))
    h, w = min(h, H - 1), min(w, W - 1)
    return max(h, 1), max(w, 1)


def _rect_masks(tops, lefts, h, w, H, W):
    rows = torch.arange(H, device=tops.device)
    cols = torch.arange(W, device=tops.device)
    in_r = (rows >= tops[..., None]) & (rows < tops[..., None] + h)  # (..., H)
    in_c = (cols >= lefts[..., None]) & (cols < lefts[..., None] + w)  # (..., W)
    return (in_r[..., :, None] & in_c[..., None, :]).flatten(-2)  # (..., H * W)


def _ijepa_keep(B, H, W, pred_scale, enc_scale, aspect_ratio, num_pred, min_keep, tries, generator, device):
    p_h, p_w = _ijepa_block_size(pred_scale, aspect_ratio, H, W, generator, device)
    e_h, e_w = _ijepa_block_size(enc_scale, (1.0, 1.0), H, W, generator, device)
    # target blocks: num_pred rectangles of p_h x p_w per sample
    # top-left corners as I-JEPA draws them: randint(0, H - h), so a block
    # never touches the last row / column it could reach (I-JEPA's convention)
    p_top = torch.randint(0, H - p_h, (B, num_pred), generator=generator, device=device)
    p_left = torch.randint(0, W - p_w, (B, num_pred), generator=generator, device=device)
    targets = _rect_masks(p_top, p_left, p_h, p_w, H, W)  # (B, num_pred, L)
    in_targets = targets.any(1)  # (B, L)
    # context block: `tries` candidate positions at once; the first whose part
    # outside the targets has more than min_keep tokens wins (I-JEPA samples
    # until one does); if none does, the first candidate overlapping the
    # targets (I-JEPA's constraint relaxation after repeated failures).
    e_top = torch.randint(0, H - e_h, (B, tries), generator=generator, device=device)
    e_left = torch.randint(0, W - e_w, (B, tries), generator=generator, device=device)
    cand = _rect_masks(e_top, e_left, e_h, e_w, H, W)  # (B, tries, L)
    cand_ctx = cand & ~in_targets[:, None]
    ok = cand_ctx.sum(-1) > min_keep  # (B, tries)
    first = torch.argmax(ok.to(torch.uint8), dim=1)  # first True, 0 when none
    any_ok = ok.any(1)
    rows = torch.arange(B, device=device)
    context = torch.where(any_ok[:, None], cand_ctx[rows, first], cand[rows, 0])
    # I-JEPA's collator truncates every mask to the batch minimum, keeping the
    # first tokens in raster order: one host sync for K.
    k = int(context.sum(1).min())
    ids_keep = _first_kept(context, k)
    pos = torch.arange(H * W, device=device)
    ids_targets = pos.expand(B, num_pred, H * W)[targets].reshape(B, num_pred, p_h * p_w)
    return ids_keep, ids_targets


def block_masking(
    batch: int,
    grid: Sequence[int],
    mask_ratio: Optional[float] = None,
    *,
    kind: str = "data2vec",
    mask_length: int = 3,
    mask_prob_adjust: float = 0.07,
    pred_scale: Tuple[float, float] = (0.15, 0.2),
    enc_scale: Tuple[float, float] = (0.85, 1.0),
    aspect_ratio: Tuple[float, float] = (0.75, 1.5),
    num_pred: int = 4,
    min_keep: int = 10,
    return_targets: bool = False,
    generator: Optional[torch.Generator] = None,
    device=None,
):
    """Block masks as ``ids_keep`` (B, K) int64, made on ``device`` with tensor
    ops (no per-sample Python loop), the same K for every sample.  Feed them
    to :func:`gather_tokens`.

    kind="data2vec": data2vec 2.0 inverse block masking (fairseq
        ``compute_block_mask_2d`` with ``inverse_mask=True``,
        ``require_same_masks=True``; defaults from the data2vec 2.0 image
        config: ``mask_ratio=0.8, mask_length=3, mask_prob_adjust=0.07``).
        Random centres, ``int(L * (1 - mask_ratio + mask_prob_adjust) /
        mask_length**2)`` per sample, each opening a mask_length x mask_length
        block of *visible* tokens (clamped at the border); then exactly
        ``K = int(L * (1 - mask_ratio))`` visible tokens per sample, preferring
        block cells.  ids_keep is sorted (raster order).
    kind="ijepa": I-JEPA multi-block masking (``MaskCollator`` defaults for
        ViT/16 at 224: ``pred_scale=(0.15, 0.2), enc_scale=(0.85, 1.0),
        aspect_ratio=(0.75, 1.5), num_pred=4, min_keep=10``, no overlap).
        Target block sizes are drawn once per call (shared by the batch, as
        in I-JEPA's collator); each sample gets ``num_pred`` target rectangles
        and one context rectangle minus the targets.  K is the batch minimum
        of the context sizes, each sample keeping its first K context tokens
        in raster order (I-JEPA's truncation).  ``mask_ratio`` must be None.
        With ``return_targets=True`` returns ``(ids_keep, ids_targets)``,
        ids_targets (B, num_pred, p_h * p_w) the target blocks in raster order.
        Costs two to three small host syncs (block sizes and K).

    Args:
        batch: B >= 1.  grid: (H, W) patch grid (e.g. (14, 14) for ViT/16 at 224).
        generator: torch.Generator on ``device`` (default: the global one).
        device: where the indices are made (default: the generator's device,
            else CPU).
    """
    # K is made per batch (data2vec: fixed; I-JEPA: the batch minimum): no empty batch
    _checks.integer(batch, "batch", 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    try:
        H, W = grid
    except (TypeError, ValueError):
        raise TypeError(f"grid must be a pair of ints (H, W), got {grid!r}") from None
    if any(isinstance(g, bool) or not isinstance(g, numbers.Integral) for g in (H, W)):
        # int(g) truncated (14.5, 14) to (14, 14)
        raise TypeError(f"grid must be a pair of ints (H, W), got {grid!r}")
    H, W = int(H), int(W)
    if H < 1 or W < 1:
        raise ValueError(f"grid must be (H, W) with H, W >= 1, got {grid!r}")
    _checks.choice(kind, "kind", KINDS)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device is {device}")
    if kind == "data2vec":
        mask_ratio = _ratio(0.8 if mask_ratio is None else mask_ratio)
        _checks.integer(mask_length, "mask_length", 1)
        if isinstance(mask_prob_adjust, bool) or not isinstance(mask_prob_adjust, numbers.Real) \
                or not 0 <= mask_prob_adjust < 1:
            raise ValueError(f"mask_prob_adjust must be a number in [0, 1), got {mask_prob_adjust!r}")
        if return_targets:
            raise ValueError("return_targets is only for kind='ijepa' (data2vec's targets are the masked tokens)")
        return _data2vec_keep(batch, H, W, mask_ratio, mask_length, float(mask_prob_adjust), generator, device)
    if mask_ratio is not None:
        raise ValueError("mask_ratio is not used by kind='ijepa' (the block sizes come from pred_scale, "
                         "enc_scale and aspect_ratio); pass None")
    if H < 2 or W < 2:
        raise ValueError(f"kind='ijepa' needs a grid of at least 2 x 2, got {grid!r}")
    pred_scale = _pair(pred_scale, "pred_scale", 0.0, 1.0)
    enc_scale = _pair(enc_scale, "enc_scale", 0.0, 1.0)
    aspect_ratio = _pair(aspect_ratio, "aspect_ratio", 1e-3, 1e3)
    _checks.integer(num_pred, "num_pred", 1)
    _checks.integer(min_keep, "min_keep", 0)
    ids_keep, ids_targets = _ijepa_keep(batch, H, W, pred_scale, enc_scale, aspect_ratio, num_pred, min_keep,
                                        20, generator, device)
    return (ids_keep, ids_targets) if return_targets else ids_keep

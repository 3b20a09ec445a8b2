"""Plain-PyTorch references: the ``reference`` backend and the test oracle.

They follow the published formulas literally and materialise every
intermediate, so they are slow and memory-hungry but easy to audit.  Half
precision inputs are computed in float32; float64 stays float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def nt_xent(z1, z2, temperature=0.5, normalize=True, reduction="mean"):
    """SimCLR's NT-Xent loss, written as lightly's NTXentLoss (no memory bank).

    z1, z2: (N, D).  Returns the mean/sum over the 2N anchors, or (2N,) for
    reduction="none" (z1's anchors first), in z1's dtype.
    """
    out_dtype = z1.dtype
    a, b = _acc(z1), _acc(z2)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n = a.shape[0]
    z = torch.cat([a, b])
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, labels, reduction=reduction).to(out_dtype)


def info_nce(query, key, negatives=None, temperature=0.07, normalize=True, reduction="mean"):
    """MoCo-style InfoNCE.  Row i's positive is key[i]; its negatives are the
    rows of ``negatives`` (a queue) when given, else the other rows of key."""
    out_dtype = query.dtype
    q, k = _acc(query), _acc(key)
    neg = None if negatives is None else _acc(negatives)
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        neg = None if neg is None else F.normalize(neg, dim=1)
    if neg is None:
        logits = q @ k.t() / temperature
        labels = torch.arange(q.shape[0], device=q.device)
    else:
        pos = (q * k).sum(1, keepdim=True)
        logits = torch.cat([pos, q @ neg.t()], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels, reduction=reduction).to(out_dtype)


def nt_xent_lse(q, c, exclude, inv_temp):
    """lse[i] = logsumexp_{j != exclude[i]} inv_temp * <q[i], c[j]> (materialised)."""
    logits = (_acc(q) @ _acc(c).t()) * inv_temp
    if exclude is not None:  # a mask, not boolean indexing (data-dependent: fails on meta tensors)
        cols = torch.arange(c.shape[0], device=c.device)
        logits = logits.masked_fill(cols[None, :] == exclude[:, None], float("-inf"))  # -1: none excluded
    return torch.logsumexp(logits, dim=1)


def sup_con(features, labels=None, temperature=0.1, base_temperature=None, positives="out",
            normalize=True, reduction="mean"):
    """Multi-view / supervised contrastive loss (SupContrast's SupConLoss,
    contrast_mode="all"; solo-learn's simclr_loss_func for positives="in"),
    materialising the (BV, BV) logits.

    features: (B, V, D); labels: None (positives: the other views of the same
    sample) or (B,) ints (positives: every other row with the same label, all
    views).  Rows are taken view-major, as SupConLoss does (row v * B + b is
    features[b, v]).  Each row is an anchor; its candidates are all other rows.

    * "out": loss_i = -(T / T_base) * mean_{p in P(i)} log softmax_{j != i}(x_i)_p
    * "in":  loss_i = -(T / T_base) * log sum_{p in P(i)} softmax_{j != i}(x_i)_p

    Anchors without a positive get loss 0 and are left out of the mean
    (reduction="mean" divides by the number of anchors that have one; 0 when
    none has).  reduction="none" returns (B, V) (entry [b, v]: anchor
    features[b, v]).  The result is in features' dtype.
    """
    out_dtype = features.dtype
    T = float(temperature)
    factor = 1.0 if base_temperature is None else T / float(base_temperature)
    f = _acc(features)
    if normalize:
        f = F.normalize(f, dim=2)
    B, V, D = f.shape
    n = B * V
    z = f.transpose(0, 1).reshape(n, D)  # view-major
    sample = torch.arange(B, device=f.device) if labels is None else labels.to(f.device)
    lab = sample.repeat(V)
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    pos = (lab[:, None] == lab[None, :]) & ~eye
    count = pos.sum(1)
    has = count > 0
    logits = (z @ z.t() / T).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    if positives == "out":
        per = -log_prob.masked_fill(~pos, 0.0).sum(1) / count.clamp_min(1)
    elif positives == "in":
        lp = log_prob.masked_fill(~pos, float("-inf")).masked_fill(~has[:, None], 0.0)
        per = torch.where(has, -torch.logsumexp(lp, dim=1), torch.zeros_like(lp[:, 0]))
    else:
        raise ValueError(f"positives must be 'out' or 'in', got {positives!r}")
    per = per * factor
    if reduction == "mean":
        out = per.sum() / has.sum().clamp_min(1)
    elif reduction == "sum":
        out = per.sum()
    else:
        out = per.reshape(V, B).t()
    return out.to(out_dtype)


# ----------------------------------------------------------------------------
# masking: MAE / data2vec 2.0 / I-JEPA masked-token gather (sslops.masking)
# ----------------------------------------------------------------------------
# Token layout: L = P + N rows per sample, P prefix rows (cls / registers, never
# masked) then N patch rows; index tensors address patch rows (values in [0, N)).
# These are plain torch.gather / torch.cat, so they run in the input's dtype
# (a gather is a copy: no accumulation type is involved).


def mae_random_masking(x, mask_ratio, noise=None):
    """MAE's ``MaskedAutoencoderViT.random_masking``, transcribed
    (facebookresearch/mae, models_mae.py).  x: (N, L, D) patch tokens, without
    cls token; returns (x_masked, mask, ids_restore)."""
    N, L, D = x.shape  # batch, length, dim
    len_keep = int(L * (1 - mask_ratio))

    if noise is None:
        noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]

    # sort noise for each sample
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)

    # keep the first subset
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))

    # generate the binary mask: 0 is keep, 1 is remove
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    # unshuffle to get the binary mask
    mask = torch.gather(mask, dim=1, index=ids_restore)

    return x_masked, mask, ids_restore


def mae_decoder_unshuffle(x, ids_restore, mask_token):
    """The un-shuffle of MAE's ``forward_decoder`` (x: (N, 1 + K, D) with the
    cls token first, mask_token (1, 1, D)), transcribed."""
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
    x = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token
    return x


def gather_tokens(x, ids_keep, pos_embed=None, num_prefix_tokens=0):
    """out (B, P + K, D): the P prefix rows, then x[b, P + ids_keep[b, k]]; with
    pos_embed ((1 or B), L, D) added first, as MAE does (a separate pass)."""
    if pos_embed is not None:
        x = x + pos_embed
    P, D = num_prefix_tokens, x.shape[2]
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, D)
    return torch.cat([x[:, :P], torch.gather(x[:, P:], 1, index)], dim=1)


def restore_tokens(x_visible, ids_restore, mask_token, num_prefix_tokens=0):
    """MAE's decoder un-shuffle generalised to P prefix rows: out (B, P + N, D)
    with N = ids_restore.shape[1]; mask_token has D elements."""
    B, _, D = x_visible.shape
    P, N = num_prefix_tokens, ids_restore.shape[1]
    K = x_visible.shape[1] - P
    mask_tokens = mask_token.reshape(1, 1, D).expand(B, N - K, D)
    x_ = torch.cat([x_visible[:, P:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.long().unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([x_visible[:, :P], x_], dim=1)


# ----------------------------------------------------------------------------
# augment: per-sample torchvision.transforms.v2.functional calls
# ----------------------------------------------------------------------------
def _tv_functional():
    try:
        from torchvision.transforms.v2 import functional as TF
        from torchvision.transforms.v2 import InterpolationMode
    except ImportError as exc:
        raise ImportError(
            "the reference backend of sslops.augment calls torchvision.transforms.v2.functional, "
            "but torchvision is not importable; install it (pip install torchvision) or pick another backend"
        ) from exc
    return TF, InterpolationMode


def augment(images, params, size, kernel_size, antialias, mean, std, out_dtype=torch.float32,
            channels_last=False):
    """The augmentation pipeline, one view at a time with torchvision's v2
    functional ops on the float image x / 255 (floating images as they are):

    resized_crop(bilinear, antialias) -> horizontal_flip if flip -> when jitter,
    adjust_brightness/contrast/saturation/hue in the view's order ->
    rgb_to_grayscale(3 channels) if grayscale -> gaussian_blur([k, k], [s, s])
    if sigma > 0 -> solarize(0.5) if solarize -> normalize(mean, std).

    images: (B, 3, H, W); params: an AugmentParams with N = V * B rows, row n
    cutting image n % B.  Returns (N, 3, size, size) in out_dtype.
    """
    TF, Mode = _tv_functional()
    n_views, batch = len(params), images.shape[0]
    fields = [t.tolist() for t in params.tensors()]
    crop, flip, jitter, bri, con, sat, hue, order, gray, sigma, sol = fields
    jitter_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    outs = []
    for n in range(n_views):
        x = images[n % batch]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        top, left, h, w = crop[n]
        x = TF.resized_crop(x, top, left, h, w, [size, size], interpolation=Mode.BILINEAR, antialias=antialias)
        if flip[n]:
            x = TF.horizontal_flip(x)
        if jitter[n]:
            factors = (bri[n], con[n], sat[n], hue[n])
            for op in order[n]:
                x = jitter_ops[op](x, factors[op])
        if gray[n]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if sigma[n] > 0:
            x = TF.gaussian_blur(x, [kernel_size, kernel_size], [sigma[n], sigma[n]])
        if sol[n]:
            x = TF.solarize(x, 0.5)
        x = TF.normalize(x, list(mean), list(std))
        outs.append(x.to(out_dtype))
    out = torch.stack(outs) if outs else images.new_empty((0, 3, size, size), dtype=out_dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


# ----------------------------------------------------------------------------
# attention: exact softmax attention (sslops.attention)
# ----------------------------------------------------------------------------
# Materialises the (Lq, Lk) scores, in float32 for half inputs (float64 stays
# float64); the causal mask is SDPA's (top-left aligned: row i sees keys j <= i).


def causal_mask(lq, lk, device=None):
    """(Lq, Lk) bool, True where query row i may see key j (j <= i)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()


def attention(q, k, v, scale=None, causal=False):
    """softmax(scale * q k^T) v.  q (..., Lq, D), k and v (..., Lk, D); scale
    defaults to 1/sqrt(D).  Rows without a visible key (Lk == 0), or whose
    scores are all -inf, give 0 (as SDPA).
    Returns (..., Lq, D) in q's dtype."""
    out_dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    a, b, c = _acc(q), _acc(k), _acc(v)
    s = (a @ b.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    if s.shape[-1] == 0:
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=out_dtype, device=q.device)
    # SDPA's softmax (torch's _safe_softmax): a row whose scores are all -inf
    # (every key masked, or -inf scores) gives p = 0, so o = 0, not NaN, and
    # its score gradients are 0 (the row is shifted off -inf before the softmax).
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return (p @ c).to(out_dtype)


def attention_lse(q, k, scale=None, causal=False):
    """Per-row logsumexp of the scaled (masked) scores: (..., Lq), float32
    (float64 for float64 inputs); -inf for a row without a visible key."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (_acc(q) @ _acc(k).transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    if s.shape[-1] == 0:
        return s.new_full(s.shape[:-1], float("-inf"))
    return torch.logsumexp(s, dim=-1)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, causal=False):
    """Packed variable-length attention, one sequence at a time: q (Tq, H, D),
    k and v (Tk, H, D), FlashAttention's cu_seqlens (N + 1,).  Returns (Tq, H, D).

    Under torch.compile (which cannot split by data-dependent lengths) it is
    one (Tq, Tk) attention with a block-diagonal mask instead."""
    if torch.compiler.is_compiling():
        return _attention_varlen_masked(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1)  # (H, Lq, D)
        ks = k[ck[b]:ck[b + 1]].transpose(0, 1)
        vs = v[ck[b]:ck[b + 1]].transpose(0, 1)
        outs.append(attention(qs, ks, vs, scale, causal).transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, dim=0)


def _segments(cu, total):
    """Sequence id and position within it of each of the total tokens."""
    tok = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu.long(), tok, right=True) - 1
    return seg, tok - cu.long()[seg]


def _attention_varlen_masked(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, causal=False):
    out_dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seg_q, pos_q = _segments(cu_seqlens_q, q.shape[0])
    seg_k, pos_k = _segments(cu_seqlens_k, k.shape[0])
    visible = seg_q[:, None] == seg_k[None, :]
    if causal:
        visible = visible & (pos_k[None, :] <= pos_q[:, None])
    a, b, c = (_acc(t).transpose(0, 1) for t in (q, k, v))  # (H, T, D)
    s = (a @ b.transpose(-2, -1)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows without a key: 0
    return (p @ c).transpose(0, 1).to(out_dtype)

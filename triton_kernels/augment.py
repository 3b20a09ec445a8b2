"""Triton kernels of the fused SSL augmentation op (``sslops.augment``, backend "triton").

One call turns a batch of images into one augmented view per sample:

    resized_crop (bilinear, optional antialias) -> hflip -> colour jitter in the sample's
    order (brightness / contrast / saturation / hue) -> grayscale -> gaussian blur ->
    solarize(0.5) -> normalize -> store (fp32 / bf16 / fp16, NCHW or channels_last)

with torchvision.transforms.v2.functional's float semantics.  Everything per sample
(crop box, flip, jitter on/off, factors, order, grayscale, blur sigma, solarize) is a
runtime value loaded from the parameter tensors: one compilation serves every batch with
the same (image dtype, output dtype, kernel_size, antialias, tile sizes).

Design (two kernels, three launches, no image-sized intermediate buffer)
-----------------------------------------------------------------------
``_contrast_mean_kernel`` (pass 0), grid (N, tile columns, tile rows).  adjust_contrast
    blends with the mean of the grayscale of the image *as it is when contrast runs*, i.e. after the jitter ops
    that precede contrast in that sample's order.  Each program recomputes its output tile
    up to (not including) contrast -- crop/resize from the source, then the preceding ops
    (flip does not change a mean) -- and writes the tile's grayscale sum to an (N, tiles)
    fp32 partial-sum buffer (49 floats per view at 224 px).  Views without jitter, or with
    contrast factor exactly 1 (a bit-exact identity), skip the work and write 0.  The
    consumer reduces the partials in a fixed order: deterministic, no atomics.

``_augment_kernel`` (pass 1), grid (N, T x T tile columns, rows), launched twice: once
    specialised for views without blur (BLUR=False) and once for views with blur
    (BLUR=True); in each launch the programs of the other views exit after loading sigma.
    (One kernel with a runtime branch would work too, but the blur path needs ~128
    registers/thread at 16 warps and would cap the occupancy of the plain path at that.)
    Each program reduces its view's partial sums to the contrast mean and evaluates the
    per-pixel pipeline ``_pixels`` (crop/resize straight from the uint8 / float source
    through the caller's strides, flip, jitter in order, grayscale) in registers, then
    solarize + normalize + a strided store (NCHW or channels_last, fp32/bf16/fp16).
    Blurred views do the blur fully fused: the tile plus its (k - 1) halo is covered by
    CH x CH chunks; each chunk's pre-blur pixels are *recomputed* at reflected positions
    (torch "reflect" padding folded into the chunk's coordinates, so the blur itself has
    no boundary logic), blurred horizontally by a tl.dot with a banded (CH x T) Gaussian
    matrix and accumulated, then vertically by a tl.dot with a banded (T x CH) matrix: the
    separable blur as two small banded matmuls (fp32, input_precision="ieee"), which is
    how Triton moves data between lanes without shared-memory indexing.
    Why recompute rather than an intermediate buffer: the pipeline before the blur is a
    few gathers + ~100 flops per pixel, an intermediate would be a full fp32 copy of every
    blurred view (written once, then read k times by two more passes), and the
    recomputation factor is (ceil((T + k - 1) / CH) * CH / T)^2: 4x with the GPU tiles
    (T=32, CH=16) at k = 23 (224 px), paid by blurred views only.  For very large kernels
    (k >> T, e.g. k close to 2 * size) it grows like (k / T)^2: still correct, but slow;
    the CUDA backend is the fast path there.

N parameter rows may be any multiple V * B of the batch: row n cuts image n % B, so all
views of a batch come from one set of launches.

Resize: PyTorch's ``_upsample_bilinear2d_aa`` weights (separable triangle filter with
support scaled by the scale factor on downscale, weights normalised per axis,
align_corners=False).  With antialias=False, or on upscale, the same formula with support 1
is exactly plain bilinear (align_corners=False, source index clamped at 0, last pixel
repeated), so one code path serves both.  The two axes are accumulated as a 2-D tap loop
(ceil(2 * support)^2 taps per output pixel); uint8 is divided by 255 after the weighted
sum (linear, so identical to dividing first).

The module imports without a GPU (no CUDA calls at import).  Under TRITON_INTERPRET=1 the
kernels run on CPU tensors (fp32/fp16 only: numpy has no bf16).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import Launch, capability, device_guard

__all__ = ["augment_views"]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# precision of the fp32 blur matmuls: "ieee" (fp32 FMA, the default) or, for benchmarking
# only, "tf32x3" (tensor cores, about fp32 accuracy; not validated on a GPU yet).
DOT_PREC = tl.constexpr(os.environ.get("SSLOPS_TRITON_DOT_PREC", "ieee"))


# ----------------------------------------------------------------------------------------
# per-pixel helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------
@triton.jit
def _reflect(i, n):
    """torch "reflect" padding index (edge not repeated), periodic for any offset."""
    period = tl.maximum(2 * n - 2, 1)
    m = i % period
    m = tl.where(m < 0, m + period, m)
    return tl.where(m >= n, period - m, m)


@triton.jit
def _tap_weight(pos, center, invscale, pmax):
    # aa_filter (triangle) of PyTorch's _upsample_bilinear2d_aa; taps >= pmax are outside
    x = tl.abs((pos.to(tl.float32) - center + 0.5) * invscale)
    w = tl.where(x < 1.0, 1.0 - x, 0.0)
    return tl.where(pos < pmax, w, 0.0)


@triton.jit
def _resize(img_ptr, base, s_c, s_h, s_w, top, left, ch, cw, oy, ox,
            sc_y, sup_y, inv_y, nt_y, sc_x, sup_x, inv_x, nt_x, IN_SCALE: tl.constexpr):
    """Bilinear(-aa) resize of the crop box at output coords oy [M, 1], ox [1, N]."""
    cy = sc_y * (oy.to(tl.float32) + 0.5)
    cx = sc_x * (ox.to(tl.float32) + 0.5)
    y_lo = tl.maximum((cy - sup_y + 0.5).to(tl.int32), 0)
    y_hi = tl.minimum((cy + sup_y + 0.5).to(tl.int32), ch)
    x_lo = tl.maximum((cx - sup_x + 0.5).to(tl.int32), 0)
    x_hi = tl.minimum((cx + sup_x + 0.5).to(tl.int32), cw)
    # per-axis normalisers (PyTorch divides each axis' weights by their sum)
    sum_y = tl.zeros_like(cy)
    for i in range(nt_y):
        sum_y += _tap_weight(y_lo + i, cy, inv_y, y_hi)
    sum_x = tl.zeros_like(cx)
    for j in range(nt_x):
        sum_x += _tap_weight(x_lo + j, cx, inv_x, x_hi)
    acc_r = tl.zeros_like(cy * cx)
    acc_g = tl.zeros_like(acc_r)
    acc_b = tl.zeros_like(acc_r)
    for i in range(nt_y):
        py = y_lo + i
        wy = _tap_weight(py, cy, inv_y, y_hi)
        row = base + (top + tl.minimum(py, ch - 1)).to(tl.int64) * s_h
        for j in range(nt_x):
            px = x_lo + j
            wx = _tap_weight(px, cx, inv_x, x_hi)
            p = img_ptr + (row + (left + tl.minimum(px, cw - 1)).to(tl.int64) * s_w)
            w = wy * wx
            acc_r += w * tl.load(p).to(tl.float32)
            acc_g += w * tl.load(p + s_c).to(tl.float32)
            acc_b += w * tl.load(p + 2 * s_c).to(tl.float32)
    norm = IN_SCALE / (sum_y * sum_x)
    return acc_r * norm, acc_g * norm, acc_b * norm


@triton.jit
def _gray(r, g, b):
    return r * 0.2989 + g * 0.587 + b * 0.114


@triton.jit
def _hue(r, g, b, hue):
    """torchvision _rgb2hsv -> h = (h + hue) mod 1 -> _hsv2rgb."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    crange = maxc - minc
    s = crange / tl.where(eqc, 1.0, maxc)
    div = tl.where(eqc, 1.0, crange)
    rc = (maxc - r) / div
    gc = (maxc - g) / div
    bc = (maxc - b) / div
    neq_r = maxc != r
    eq_g = maxc == g
    hr = tl.where(neq_r, 0.0, bc - gc)
    hg = tl.where(eq_g & neq_r, rc + 2.0 - bc, 0.0)
    hb = tl.where(neq_r & (maxc != g), gc + 4.0 - rc, 0.0)
    h = (hr + hg + hb) * (1.0 / 6.0) + 1.0
    h = h - tl.floor(h)  # fmod(., 1) of a positive value
    h = h + hue
    h = h - tl.floor(h)  # remainder(., 1)
    v = maxc
    h6 = h * 6.0
    fi = tl.floor(h6)
    f = h6 - fi
    i = fi.to(tl.int32) % 6
    sxf = s * f
    one_minus_s = 1.0 - s
    q = tl.minimum(tl.maximum((1.0 - sxf) * v, 0.0), 1.0)
    t = tl.minimum(tl.maximum((sxf + one_minus_s) * v, 0.0), 1.0)
    p = tl.minimum(tl.maximum(one_minus_s * v, 0.0), 1.0)
    # r: v q p p t v ; g: t v v q p p ; b: p p t v v q
    ro = tl.where(i == 0, v, tl.where(i == 1, q, tl.where(i == 2, p, tl.where(i == 3, p, tl.where(i == 4, t, v)))))
    go = tl.where(i == 0, t, tl.where(i == 1, v, tl.where(i == 2, v, tl.where(i == 3, q, p))))
    bo = tl.where(i == 0, p, tl.where(i == 1, p, tl.where(i == 2, t, tl.where(i == 3, v, tl.where(i == 4, v, q)))))
    return ro, go, bo


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _apply_op(r, g, b, op, bri, con, sat, hue, cmean):
    """One colour-jitter op (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    if op == 0:
        r = _clamp01(r * bri)
        g = _clamp01(g * bri)
        b = _clamp01(b * bri)
    elif op == 1:
        m = cmean * (1.0 - con)
        r = _clamp01(r * con + m)
        g = _clamp01(g * con + m)
        b = _clamp01(b * con + m)
    elif op == 2:
        l = _gray(r, g, b) * (1.0 - sat)
        r = _clamp01(r * sat + l)
        g = _clamp01(g * sat + l)
        b = _clamp01(b * sat + l)
    else:
        r, g, b = _hue(r, g, b, hue)
    return r, g, b


@triton.jit
def _jitter(r, g, b, o0, o1, o2, o3, n_ops, bri, con, sat, hue, cmean):
    """The first n_ops jitter ops of the sample's order."""
    if n_ops > 0:
        r, g, b = _apply_op(r, g, b, o0, bri, con, sat, hue, cmean)
    if n_ops > 1:
        r, g, b = _apply_op(r, g, b, o1, bri, con, sat, hue, cmean)
    if n_ops > 2:
        r, g, b = _apply_op(r, g, b, o2, bri, con, sat, hue, cmean)
    if n_ops > 3:
        r, g, b = _apply_op(r, g, b, o3, bri, con, sat, hue, cmean)
    return r, g, b


@triton.jit
def _pixels(img_ptr, base, s_c, s_h, s_w, top, left, ch, cw, oy, ox, size, flip,
            sc_y, sup_y, inv_y, nt_y, sc_x, sup_x, inv_x, nt_x,
            o0, o1, o2, o3, n_ops, bri, con, sat, hue, cmean, gray,
            IN_SCALE: tl.constexpr):
    """Pre-blur pipeline (resize, flip, jitter, grayscale) at output coords oy [M,1], ox [1,N]."""
    sx = tl.where(flip, size - 1 - ox, ox)
    r, g, b = _resize(img_ptr, base, s_c, s_h, s_w, top, left, ch, cw, oy, sx,
                      sc_y, sup_y, inv_y, nt_y, sc_x, sup_x, inv_x, nt_x, IN_SCALE)
    r, g, b = _jitter(r, g, b, o0, o1, o2, o3, n_ops, bri, con, sat, hue, cmean)
    if gray:
        l = _gray(r, g, b)
        r = l
        g = l
        b = l
    return r, g, b


@triton.jit
def _axis_params(extent, size, ANTIALIAS: tl.constexpr):
    scale = extent.to(tl.float32) / size
    if ANTIALIAS:
        down = scale > 1.0
        support = tl.where(down, scale, 1.0)
        inv = tl.where(down, 1.0 / scale, 1.0)
    else:
        support = scale * 0.0 + 1.0
        inv = scale * 0.0 + 1.0
    ntaps = tl.math.ceil(2.0 * support).to(tl.int32)
    return scale, support, inv, ntaps


@triton.jit
def _load_sample(crop_ptr, order_ptr, jit_ptr, bri_ptr, con_ptr, sat_ptr, hue_ptr, n, H, W):
    # the crop clamped to the H x W image, in int64 before narrowing (memory safety for
    # unvalidated parameters, as the CUDA kernel does; valid crops pass unchanged)
    top = tl.minimum(tl.maximum(tl.load(crop_ptr + 4 * n + 0), 0), H - 1)
    left = tl.minimum(tl.maximum(tl.load(crop_ptr + 4 * n + 1), 0), W - 1)
    ch = tl.minimum(tl.maximum(tl.load(crop_ptr + 4 * n + 2), 1), H - top).to(tl.int32)
    cw = tl.minimum(tl.maximum(tl.load(crop_ptr + 4 * n + 3), 1), W - left).to(tl.int32)
    top = top.to(tl.int32)
    left = left.to(tl.int32)
    o0 = tl.load(order_ptr + 4 * n + 0).to(tl.int32)
    o1 = tl.load(order_ptr + 4 * n + 1).to(tl.int32)
    o2 = tl.load(order_ptr + 4 * n + 2).to(tl.int32)
    o3 = tl.load(order_ptr + 4 * n + 3).to(tl.int32)
    jit = tl.load(jit_ptr + n).to(tl.int32) != 0
    bri = tl.load(bri_ptr + n).to(tl.float32)
    con = tl.load(con_ptr + n).to(tl.float32)
    sat = tl.load(sat_ptr + n).to(tl.float32)
    hue = tl.load(hue_ptr + n).to(tl.float32)
    return top, left, ch, cw, o0, o1, o2, o3, jit, bri, con, sat, hue


# ----------------------------------------------------------------------------------------
# pass 0: per-tile sums of the grayscale image that contrast sees
# ----------------------------------------------------------------------------------------
@triton.jit
def _contrast_mean_kernel(
    img_ptr, s_n, s_c, s_h, s_w, H, W,
    crop_ptr, order_ptr, jit_ptr, bri_ptr, con_ptr, sat_ptr, hue_ptr,
    part_ptr, n_images, size, n_tiles_x, n_tiles,
    IN_SCALE: tl.constexpr, ANTIALIAS: tl.constexpr, T: tl.constexpr,
):
    n = tl.program_id(0)
    tx = tl.program_id(1)  # tile column; tile row on axis 2 (CUDA allows 65535 per axis)
    ty = tl.program_id(2)
    top, left, ch, cw, o0, o1, o2, o3, jit, bri, con, sat, hue = _load_sample(
        crop_ptr, order_ptr, jit_ptr, bri_ptr, con_ptr, sat_ptr, hue_ptr, n, H, W)
    total = 0.0
    if jit & (con != 1.0):
        # contrast's position in the order = number of ops that run before it
        n_ops = tl.where(o0 == 1, 0, tl.where(o1 == 1, 1, tl.where(o2 == 1, 2, 3)))
        sc_y, sup_y, inv_y, nt_y = _axis_params(ch, size, ANTIALIAS)
        sc_x, sup_x, inv_x, nt_x = _axis_params(cw, size, ANTIALIAS)
        oy = ty * T + tl.arange(0, T)[:, None]
        ox = tx * T + tl.arange(0, T)[None, :]
        base = (n % n_images).to(tl.int64) * s_n
        r, g, b = _pixels(img_ptr, base, s_c, s_h, s_w, top, left, ch, cw,
                          tl.minimum(oy, size - 1), tl.minimum(ox, size - 1), size, False,
                          sc_y, sup_y, inv_y, nt_y, sc_x, sup_x, inv_x, nt_x,
                          o0, o1, o2, o3, n_ops, bri, con, sat, hue, 0.0, False, IN_SCALE)
        l = tl.where((oy < size) & (ox < size), _gray(r, g, b), 0.0)
        total = tl.sum(tl.sum(l, axis=1), axis=0)
    tl.store(part_ptr + n.to(tl.int64) * n_tiles + (ty * n_tiles_x + tx), total)


# ----------------------------------------------------------------------------------------
# pass 1: the view
# ----------------------------------------------------------------------------------------
@triton.jit
def _gauss(d, K: tl.constexpr, inv_s, inv_z):
    """Weight of blur tap d (0..K-1) as torchvision's _get_gaussian_kernel1d; 0 outside."""
    e = (d - K // 2).to(tl.float32) * inv_s
    return tl.where((d >= 0) & (d < K), tl.exp(-e * e) * inv_z, 0.0)


@triton.jit
def _augment_kernel(
    img_ptr, s_n, s_c, s_h, s_w, H, W,
    crop_ptr, order_ptr, jit_ptr, bri_ptr, con_ptr, sat_ptr, hue_ptr,
    flip_ptr, gray_ptr, sigma_ptr, sol_ptr,
    part_ptr, n_parts, out_ptr, o_n, o_c, o_h, o_w,
    n_images, size, n_tiles_x, inv_area,
    m0, m1, m2, r0, r1, r2,
    IN_SCALE: tl.constexpr, ANTIALIAS: tl.constexpr, BLUR: tl.constexpr,
    T: tl.constexpr, CH: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    NCH: tl.constexpr, NPP: tl.constexpr,
):
    """Views of the samples with (BLUR=True) or without (BLUR=False) gaussian blur; the
    other samples' programs exit at once.  Two specialisations rather than one kernel with
    a runtime branch, so that the register-hungry blur path does not cap the occupancy of
    the plain one."""
    n = tl.program_id(0)
    tx = tl.program_id(1)  # tile column; tile row on axis 2
    ty = tl.program_id(2)
    sigma = tl.load(sigma_ptr + n).to(tl.float32)
    if BLUR:
        active = sigma > 0.0
    else:
        active = sigma <= 0.0
    if active:
        top, left, ch, cw, o0, o1, o2, o3, jit, bri, con, sat, hue = _load_sample(
            crop_ptr, order_ptr, jit_ptr, bri_ptr, con_ptr, sat_ptr, hue_ptr, n, H, W)
        flip = tl.load(flip_ptr + n).to(tl.int32) != 0
        gray = tl.load(gray_ptr + n).to(tl.int32) != 0
        sol = tl.load(sol_ptr + n).to(tl.int32) != 0
        n_ops = tl.where(jit, 4, 0)

        # contrast mean from pass 0's partial sums (fixed summation order)
        tid = tl.arange(0, NPP)
        parts = tl.load(part_ptr + n.to(tl.int64) * n_parts + tid, mask=tid < n_parts, other=0.0)
        # inv_area = 1 / size^2 from the host (a float: never specialised, whereas
        # size == 1 is a constexpr in a GPU launch and (size * size).to() fails there)
        cmean = tl.sum(parts, axis=0) * inv_area

        sc_y, sup_y, inv_y, nt_y = _axis_params(ch, size, ANTIALIAS)
        sc_x, sup_x, inv_x, nt_x = _axis_params(cw, size, ANTIALIAS)
        base = (n % n_images).to(tl.int64) * s_n  # view n cuts image n % B
        y0 = ty * T
        x0 = tx * T
        oy = y0 + tl.arange(0, T)[:, None]
        ox = x0 + tl.arange(0, T)[None, :]

        if BLUR:
            # fused separable blur: CH x CH chunks of the (T + K - 1)^2 halo region are
            # recomputed at reflected coordinates, then blurred by banded matmuls
            # (horizontal [CH, CH] @ [CH, T], vertical [T, CH] @ [CH, T])
            inv_s = 0.7071067811865476 / sigma  # exp(-((d - K//2) / (sqrt(2) sigma))^2)
            kd = tl.arange(0, KP)
            ke = (kd - K // 2).to(tl.float32) * inv_s
            inv_z = 1.0 / tl.sum(tl.where(kd < K, tl.exp(-ke * ke), 0.0), axis=0)
            r = tl.zeros((T, T), dtype=tl.float32)
            g = tl.zeros((T, T), dtype=tl.float32)
            b = tl.zeros((T, T), dtype=tl.float32)
            for ci in range(NCH):
                hy = ci * CH + tl.arange(0, CH)  # halo row index: image row y0 - K//2 + hy
                ry = _reflect(y0 - K // 2 + hy, size)[:, None]
                h_r = tl.zeros((CH, T), dtype=tl.float32)
                h_g = tl.zeros((CH, T), dtype=tl.float32)
                h_b = tl.zeros((CH, T), dtype=tl.float32)
                for cj in range(NCH):
                    hx = cj * CH + tl.arange(0, CH)
                    rx = _reflect(x0 - K // 2 + hx, size)[None, :]
                    xr, xg, xb = _pixels(img_ptr, base, s_c, s_h, s_w, top, left, ch, cw, ry, rx, size, flip,
                                         sc_y, sup_y, inv_y, nt_y, sc_x, sup_x, inv_x, nt_x,
                                         o0, o1, o2, o3, n_ops, bri, con, sat, hue, cmean, gray, IN_SCALE)
                    # output column x (tile-local) takes halo column hx through tap hx - x
                    wh = _gauss(hx[:, None] - tl.arange(0, T)[None, :], K, inv_s, inv_z)  # [CH, T]
                    h_r += tl.dot(xr, wh, input_precision=DOT_PREC)
                    h_g += tl.dot(xg, wh, input_precision=DOT_PREC)
                    h_b += tl.dot(xb, wh, input_precision=DOT_PREC)
                wv = _gauss(hy[None, :] - tl.arange(0, T)[:, None], K, inv_s, inv_z)  # [T, CH]
                r += tl.dot(wv, h_r, input_precision=DOT_PREC)
                g += tl.dot(wv, h_g, input_precision=DOT_PREC)
                b += tl.dot(wv, h_b, input_precision=DOT_PREC)
        else:
            # lanes past the image edge compute a valid (clamped) pixel that is never stored
            r, g, b = _pixels(img_ptr, base, s_c, s_h, s_w, top, left, ch, cw,
                              tl.minimum(oy, size - 1), tl.minimum(ox, size - 1), size, flip,
                              sc_y, sup_y, inv_y, nt_y, sc_x, sup_x, inv_x, nt_x,
                              o0, o1, o2, o3, n_ops, bri, con, sat, hue, cmean, gray, IN_SCALE)

        if sol:
            r = tl.where(r >= 0.5, 1.0 - r, r)
            g = tl.where(g >= 0.5, 1.0 - g, g)
            b = tl.where(b >= 0.5, 1.0 - b, b)
        r = (r - m0) / r0
        g = (g - m1) / r1
        b = (b - m2) / r2
        mask = (oy < size) & (ox < size)
        p = out_ptr + n.to(tl.int64) * o_n + oy * o_h + ox * o_w
        out_ty = out_ptr.dtype.element_ty
        tl.store(p, r.to(out_ty), mask=mask)
        tl.store(p + o_c, g.to(out_ty), mask=mask)
        tl.store(p + 2 * o_c, b.to(out_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------
def _configs(size: int, cap: Optional[Tuple[int, int]]):
    """Tile edges and warps: (mean pass T, num_warps), (plain views T, num_warps), (blurred
    views T, CH, num_warps).  Tiles are powers of two, >= 16 for tl.dot.  ``cap`` is the
    GPU's compute capability (None: the interpreter).

    Register reports of ptxas (tests/test_triton_compile.py; no GPU was available to time
    them), sm_80 and sm_90 alike: the blur kernel needs 16 warps.  With 8 (or 4) it hits
    255 registers per thread and spills 1.2-4.4 KB per thread (fp32 and fp16 outputs,
    any tile); with 16 it takes 117-128 registers and spills nothing, with the same
    register file per block (one 512-thread block per SM instead of one of 256 threads).
    Up to 32 px (CIFAR) the blur tile is 16: T = 32 spills ~90 B there on sm_90 (k = 3).
    """
    if cap is None:  # interpreter: few, small programs; tiling still exercised
        t = 16 if size <= 16 else 32
        return (t, 4), (16, 4), (16, 16, 4)
    if size <= 16:
        return (16, 4), (16, 4), (16, 16, 16)
    if size <= 32:
        return (32, 8), (32, 8), (16, 16, 16)
    return (32, 8), (32, 8), (32, 16, 16)


def _n_parts(size: int, cap) -> int:
    """Columns of pass 0's partial-sum buffer: its tiles per view."""
    return triton.cdiv(size, _configs(size, cap)[0][0]) ** 2


def _param(t: torch.Tensor, name: str, B: int, device, shape_tail=()):
    assert isinstance(t, torch.Tensor), f"{name} must be a tensor"
    assert tuple(t.shape) == (B, *shape_tail), f"{name}: expected shape {(B, *shape_tail)}, got {tuple(t.shape)}"
    assert t.device == device, f"{name} is on {t.device}, images on {device}"
    return t.contiguous()


def augment_views(images, crop, flip, jitter, brightness, contrast, saturation, hue, order, grayscale,
                  blur_sigma, solarize, size: int, kernel_size: int, antialias: bool,
                  mean, std, out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """One augmented view per parameter row, (N, 3, size, size) in ``out_dtype``.

    N = len(crop) is B (one view per image) or any multiple V * B: row n then cuts image
    n % B, so several views of a batch come out of one launch (views stacked view-major,
    no torch.cat needed).

    ``images``: uint8 (scaled by 1/255) or float in [0, 1], (B, 3, H, W), any strides.
    Parameters as in ``sslops.augment.AugmentParams`` (validated by the caller; only
    cheap, sync-free asserts here).  ``kernel_size`` is odd and <= 2 * size - 1 for
    torchvision's reflect padding to be defined (any odd value works here).
    """
    assert images.dim() == 4 and images.shape[1] == 3, f"images must be (B, 3, H, W), got {tuple(images.shape)}"
    assert images.dtype == torch.uint8 or images.is_floating_point(), f"images dtype {images.dtype}"
    assert out_dtype in _OUT_DTYPES, f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}"
    size = int(size)
    kernel_size = int(kernel_size)
    assert size > 0, "size must be > 0"
    assert kernel_size > 0 and kernel_size % 2 == 1, "kernel_size must be odd and positive"
    B = images.shape[0]
    N = crop.shape[0] if isinstance(crop, torch.Tensor) and crop.dim() >= 1 else -1
    assert N >= 0 and (N == B or (B > 0 and N % B == 0)), f"{N} parameter rows for {B} images"
    dev = images.device
    crop = _param(crop, "crop", N, dev, (4,))
    order = _param(order, "order", N, dev, (4,))
    flip = _param(flip, "flip", N, dev)
    jitter = _param(jitter, "jitter", N, dev)
    grayscale = _param(grayscale, "grayscale", N, dev)
    solarize = _param(solarize, "solarize", N, dev)
    brightness = _param(brightness, "brightness", N, dev)
    contrast = _param(contrast, "contrast", N, dev)
    saturation = _param(saturation, "saturation", N, dev)
    hue = _param(hue, "hue", N, dev)
    blur_sigma = _param(blur_sigma, "blur_sigma", N, dev)
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    assert len(mean) == 3 and len(std) == 3, "mean and std need 3 values"

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((N, 3, size, size), dtype=out_dtype, device=dev, memory_format=fmt)
    if os.environ.get("SSLOPS_POISON", "0") == "1":  # test convention: unwritten -> NaN
        out.fill_(float("nan"))
    if N == 0:
        return out
    cap = capability(images)
    partials = torch.empty((N, _n_parts(size, cap)), dtype=torch.float32, device=dev)
    launches = _launches(images, crop, flip, jitter, brightness, contrast, saturation, hue, order, grayscale,
                         blur_sigma, solarize, size, kernel_size, antialias, mean, std, out, partials, cap)
    with device_guard(images):
        for launch in launches:
            launch()
    return out


def _launches(images, crop, flip, jitter, brightness, contrast, saturation, hue, order, grayscale, blur_sigma,
              solarize, size: int, kernel_size: int, antialias: bool, mean, std, out, partials,
              cap: Optional[Tuple[int, int]]) -> List[Launch]:
    """The three launches of one call (pass 0, then pass 1 without and with blur) on the
    GPU of compute capability ``cap`` (None: the interpreter).  ``partials`` is the
    (N, tiles of pass 0) fp32 buffer.  Works on meta tensors (the compile test)."""
    N = crop.shape[0]
    B = images.shape[0]
    (tm, wm), (tp, wp), (tb, cb, wb) = _configs(size, cap)
    in_scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    s_n, s_c, s_h, s_w = images.stride()
    o_n, o_c, o_h, o_w = out.stride()
    H, W = images.shape[2], images.shape[3]
    common = (images, s_n, s_c, s_h, s_w, H, W, crop, order, jitter, brightness, contrast, saturation, hue)

    # pass 0: per-tile grayscale sums for contrast (fp32, N x tiles)
    ntx = triton.cdiv(size, tm)
    n_parts = ntx * ntx
    assert tuple(partials.shape) == (N, n_parts) == (N, _n_parts(size, cap)), "partials: (N, tiles of pass 0)"
    # grids: views on axis 0, tile columns and rows on axes 1 and 2 (CUDA allows 65535 on
    # each; a (N, tiles) grid put 65536 tiles on axis 1 from size 8161 with T = 32)
    launches = [Launch(_contrast_mean_kernel, (N, ntx, ntx), (*common, partials, B, size, ntx, n_parts),
                       dict(IN_SCALE=in_scale, ANTIALIAS=bool(antialias), T=tm, num_warps=wm))]
    # pass 1: the views, once specialised for samples without blur and once for those with
    for blur, t, chunk, warps in ((False, tp, 16, wp), (True, tb, cb, wb)):
        ntx = triton.cdiv(size, t)
        args = (*common, flip, grayscale, blur_sigma, solarize, partials, n_parts, out, o_n, o_c, o_h, o_w,
                B, size, ntx, 1.0 / (size * size), mean[0], mean[1], mean[2], std[0], std[1], std[2])
        kwargs = dict(IN_SCALE=in_scale, ANTIALIAS=bool(antialias), BLUR=blur, T=t, CH=chunk,
                      K=kernel_size if blur else 1, KP=triton.next_power_of_2(kernel_size) if blur else 1,
                      NCH=triton.cdiv(t + kernel_size - 1, chunk) if blur else 1,
                      NPP=triton.next_power_of_2(n_parts), num_warps=warps)
        launches.append(Launch(_augment_kernel, (N, ntx, ntx), args, kwargs))
    return launches

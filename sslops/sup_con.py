"""Multi-view and supervised contrastive loss (SupCon / SimCLR with V views).

``features`` (B, V, D) is taken view-major, as SupContrast's ``SupConLoss``
does: row ``v * B + b`` of the (N = B V, D) matrix z is ``features[b, v]``.
Every row is an anchor; its candidates are the other N - 1 rows; its positives
P(i) are the other rows with the same label (labels=None: the same sample).
With x_ij = <z_i, z_j> / T:

* ``lse_i  = log sum_{j != i} exp(x_ij)``                (every other column)
* ``psum_i = sum_{p in P(i)} x_ip``, ``cnt_i = |P(i)|``
* ``lpos_i = log sum_{p in P(i)} exp(x_ip)``

``positives="out"``: loss_i = (T / T_base) * (lse_i - psum_i / cnt_i) (SupCon's L_out);
``positives="in"``:  loss_i = (T / T_base) * (lse_i - lpos_i) (solo-learn's form).

No backend but ``reference`` builds the (N, N) logits:

* ``cpu`` and ``triton``: one fused op pair, ``sslops::sup_con_stats`` (C++,
  csrc/cpu/sup_con.cpp) or ``sslops::sup_con_stats_triton``
  (triton_kernels/sup_con.py), with one contract: the forward accumulates,
  per row and tile by tile, the online lse over every other column, the online
  lse over the positives, and the sum and count of the positive logits (the
  (4, N) statistics lse, lpos, psum, cnt); the backward recomputes the tiles
  from the saved per-row statistics.  The C++ kernel computes each tile of the
  symmetric logits once, for its rows' and its columns' statistics (on the
  CPU it is faster than the composition below for both forms: bench/RESULTS.md).
* ``cuda`` (and ``emu``), fp32 and fp64: the same fused op pair,
  ``sslops::sup_con_stats`` (csrc/cuda/sup_con.cu).
* ``cuda`` (and ``emu``), fp16 and bf16: lse_i is ``sslops::nt_xent_lse_sym`` (the fused NT-Xent
  kernels, tiles recomputed in the backward).  psum_i is linear in the
  logits, psum_i = <z_i, S_{y_i} - z_i> / T with S_y the sum of the rows
  labelled y (an index_add over N rows: O(N D)).  lpos_i is a log-sum-exp
  inside row i's class only: labels=None, a (B, V, V) Gram of each sample's
  views; with labels, the rows sorted by class, classes of <= 64 rows batched
  as (k, n, n) Grams and larger ones through the fused ``sslops::nt_xent_lse``
  kernel on the class's rows (O(n D) memory).  That split needs the class
  sizes on the host, so under torch.compile the labelled lpos_i is computed
  from the masked (N, N) logits instead (materialising; eager mode never is).

``gather_distributed=True`` (see :func:`_sup_con_gathered`): the anchors are
this rank's rows, the candidates every rank's rows (a differentiable gather
of the (B_r, V, D) features, B_r may differ between ranks, 0 included).  Every
backend then computes lse_i with the asymmetric ``nt_xent_lse`` (q = own rows,
c = all rows, each anchor's own column left out), psum_i from the class sums
over all rows, and lpos_i within the sample (labels=None: its views are all on
its rank) or from class blocks of the gathered rows (labels).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, reference
from ._distributed import all_gather_ints, gather_uneven_with_grad, rank_and_world
from .nt_xent import REDUCTIONS, _kernel_dtype, _lse, _lse_sym, _normalize

# The Triton kernels keep fp32 state and take fp32 / fp16 inputs (tl.dot in
# "ieee" fp32 or fp16 on tensor cores).  bf16 and float64 are refused by name.
_TRITON_DTYPES = {"triton": (torch.float32, torch.float16)}
# The compiled ops listed are those cuda (and emu) compose; cpu runs the fused
# sslops::sup_con_stats pair (csrc/cpu/sup_con.cpp) instead (see _FUSED).
# positives="out": the compiled NT-Xent lse kernels plus O(N D) class sums.
_backend.register_op(
    "sup_con", compiled=("nt_xent_lse_sym", "nt_xent_lse_backward_sym"), triton=True, dtypes=_TRITON_DTYPES,
)
# positives="in": also a log-sum-exp restricted to the positives (per class, nt_xent_lse).
_backend.register_op(
    "sup_con_in", compiled=("nt_xent_lse_sym", "nt_xent_lse_backward_sym", "nt_xent_lse", "nt_xent_lse_backward"),
    triton=True, dtypes=_TRITON_DTYPES,
)

POSITIVES = ("out", "in")
_N_STATS = 4  # rows of the fused ops' output: lse, lpos, psum, cnt
_FUSED = ("triton", "cpu")  # the backends that compute the (4, N) statistics in one fused op
# cuda (and emu) run the fused sslops::sup_con_stats (csrc/cuda/sup_con.cu, SIMT, one pass) for fp32 and
# fp64; fp16/bf16 keep the composition above, whose NT-Xent lse runs on tensor cores (the fused kernel
# takes them too, without tensor cores; which is faster on a GPU has not been measured).
_FUSED_CUDA_DTYPES = (torch.float32, torch.float64)


def _is_fused(backend: str, dtype: torch.dtype) -> bool:
    return backend in _FUSED or (backend in ("cuda", "emu") and dtype in _FUSED_CUDA_DTYPES)


# ----------------------------------------------------------------------------
# Triton ops (triton_kernels/sup_con.py), exposed as torch custom ops
# ----------------------------------------------------------------------------
def _tk():
    from .triton_kernels import sup_con as tk

    return tk


@torch.library.custom_op("sslops::sup_con_stats_triton", mutates_args=())
def sup_con_stats_triton(z: Tensor, labels: Tensor, inv_temp: float) -> Tensor:
    """(4, N) float32: lse, lpos, psum, cnt per row (see the module docstring)."""
    return _tk().sup_con_stats(z, labels, inv_temp)


@torch.library.custom_op("sslops::sup_con_stats_backward_triton", mutates_args=())
def sup_con_stats_backward_triton(grad_stats: Tensor, z: Tensor, labels: Tensor, stats: Tensor,
                                  inv_temp: float) -> Tensor:
    return _tk().sup_con_stats_backward(grad_stats, z, labels, stats, inv_temp)


sup_con_stats_triton.register_fake(
    lambda z, labels, inv_temp: z.new_empty((_N_STATS, z.shape[0]), dtype=torch.float32)
)
sup_con_stats_backward_triton.register_fake(lambda grad_stats, z, labels, stats, inv_temp: z.new_empty(z.shape))


def _stats_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _stats_formula(z: Tensor, labels: Tensor, inv_temp: float) -> Tensor:
    """The (4, N) statistics as plain differentiable torch ops (materialises the logits):
    the create_graph=True backward goes through it."""
    dt = reference._acc(z).dtype
    zz = z.to(dt)
    n = z.shape[0]
    x = (zz @ zz.mT) * inv_temp
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has = pos.any(1, keepdim=True)
    lse = torch.logsumexp(x.masked_fill(eye, float("-inf")), 1)
    xp = x.masked_fill(~pos, float("-inf")).masked_fill(~has, 0.0)
    lpos = torch.where(has[:, 0], torch.logsumexp(xp, 1), torch.full_like(lse, float("-inf")))
    psum = x.masked_fill(~pos, 0.0).sum(1)
    cnt = pos.sum(1).to(dt)
    return torch.stack([lse, lpos, psum, cnt]).to(_stats_dtype(z))


def _setup_stats(ctx, inputs, output):
    z, labels, inv_temp = inputs
    ctx.save_for_backward(z, labels, output)
    ctx.inv_temp = inv_temp


def _backward_stats(ctx, grad, backward=None):
    """backward: the op's fused backward (default: the Triton one)."""
    z, labels, stats = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiate the plain formula instead
        if not z.requires_grad:
            return torch.zeros_like(z), None, None
        with torch.enable_grad():
            (gz,) = torch.autograd.grad(_stats_formula(z, labels, ctx.inv_temp), z, grad, create_graph=True)
        return gz, None, None
    backward = sup_con_stats_backward_triton if backward is None else backward
    return backward(grad.contiguous(), z, labels, stats, ctx.inv_temp), None, None


sup_con_stats_triton.register_autograd(_backward_stats, setup_context=_setup_stats)


# ----------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops (schemas: csrc/sslops.cpp)
# ----------------------------------------------------------------------------
@torch.library.register_fake("sslops::sup_con_stats")
def _(z, labels, inv_temp):
    return z.new_empty((_N_STATS, z.shape[0]), dtype=_stats_dtype(z))


@torch.library.register_fake("sslops::sup_con_stats_backward")
def _(grad_stats, z, labels, stats, inv_temp):
    return z.new_empty(z.shape)


@_backend.compiled_namespace_setup  # sslops, and sslops_emu (the CUDA emulator) when it loads
def _register_autograd(ns: str) -> None:
    ops = getattr(torch.ops, ns)
    torch.library.register_autograd(
        f"{ns}::sup_con_stats",
        lambda ctx, grad: _backward_stats(ctx, grad, backward=ops.sup_con_stats_backward),
        setup_context=_setup_stats,
    )


def _fused_stats(z: Tensor, labels: Tensor, inv_temp: float, backend: str) -> Tensor:
    """(4, N) statistics of the rows z (N, D) with label ids labels (N,) (backends in _FUSED)."""
    if backend == "triton":
        return sup_con_stats_triton(z, labels, inv_temp)
    return _backend.ops(backend).sup_con_stats(_kernel_dtype(z, backend), labels, inv_temp)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def _check_labels(labels, B: int, V: int, features: Tensor) -> None:
    if labels is None:
        if V < 2:
            raise ValueError(
                f"features has V = {V} view per sample: with labels=None the positives are the other views "
                f"of the same sample, so V must be >= 2 (or pass labels)"
            )
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be None or a torch.Tensor of (B,) integer class ids, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor (class ids), got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must have shape (B,) = ({B},) like features' first dim, got {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels and features must be on the same device, got {labels.device} and {features.device}")


def _dense_ids(labels: Optional[Tensor], B: int, device: torch.device) -> Tensor:
    """(B,) int64 ids in [0, B) with ids[a] == ids[b] iff labels[a] == labels[b]
    (arange(B) for labels=None).  Static shapes (a sort, no torch.unique), so it
    traces under torch.compile(fullgraph=True)."""
    if labels is None:
        return torch.arange(B, device=device)
    srt, perm = torch.sort(labels.long())
    step = torch.ones_like(srt)
    step[0] = 0
    step[1:] = (srt[1:] != srt[:-1]).long()
    return torch.empty_like(srt).scatter_(0, perm, step.cumsum(0))


def _class_stats(z: Tensor, ids: Tensor, B: int, V: int, inv_temp: float) -> tuple[Tensor, Tensor]:
    """psum_i = inv_temp * <z_i, S_{y_i} - z_i> and cnt_i = V * |class y_i| - 1 (O(N D))."""
    za = reference._acc(z)
    rows = ids.repeat(V)  # (N,) view-major
    sums = za.new_zeros(B, z.shape[1]).index_add(0, rows, za)  # (B, D): S per dense id
    size = torch.zeros(B, dtype=za.dtype, device=z.device).index_add(0, ids, torch.ones_like(ids, dtype=za.dtype))
    psum = ((za * sums[rows]).sum(1) - (za * za).sum(1)) * inv_temp
    cnt = size[rows] * V - 1
    return psum, cnt


_BATCHED_CLASS_ROWS = 64  # classes up to this many rows: one batched (k, n, n) Gram per size


def _masked_lse(x: Tensor) -> Tensor:
    """logsumexp over the last dim of (..., n, n) logits with the diagonal left out."""
    n = x.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    return torch.logsumexp(x.masked_fill(eye, float("-inf")), -1)


def _class_lse(z: Tensor, labels: Optional[Tensor], ids: Tensor, B: int, V: int, inv_temp: float,
               backend: str) -> Tensor:
    """lpos_i = log sum_{j != i, y_j = y_i} exp(x_ij) per row ((N,), -inf without a positive),
    without the (N, N) logits (but see the torch.compile note of the module docstring)."""
    za = reference._acc(z)
    n, D = z.shape
    if labels is None:  # class = sample: a (B, V, V) Gram of its views (V >= 2)
        zb = za.reshape(V, B, D).transpose(0, 1)
        return _masked_lse((zb @ zb.mT) * inv_temp).t().reshape(n)
    rows = ids.repeat(V)
    if torch.compiler.is_compiling():  # static shapes: the masked (N, N) logits
        x = (za @ za.mT) * inv_temp
        pos = rows[:, None] == rows[None, :]
        return _masked_lse(x.masked_fill(~pos, float("-inf")))
    order = torch.argsort(rows, stable=True)
    sizes = torch.bincount(rows, minlength=B).tolist()
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    zs = z[order]
    out_sorted = za.new_full((n,), float("-inf"))
    by_size: dict = {}
    for start, size in zip(starts, sizes):
        if size > 1:  # a class of one row has no positive: -inf
            by_size.setdefault(size, []).append(start)
    parts, where = [], []
    for size, class_starts in sorted(by_size.items()):
        if size <= _BATCHED_CLASS_ROWS:
            idx = torch.tensor(class_starts, device=z.device)[:, None] + torch.arange(size, device=z.device)
            blk = reference._acc(zs)[idx]  # (k, size, D)
            parts.append(_masked_lse((blk @ blk.mT) * inv_temp).reshape(-1))
            where.append(idx.reshape(-1))
        else:
            local = torch.arange(size, device=z.device)
            for start in class_starts:
                blk = zs[start:start + size]
                parts.append(_lse(blk, blk, local, inv_temp, backend).to(za.dtype))
                where.append(local + start)
    if parts:
        out_sorted = out_sorted.index_put((torch.cat(where),), torch.cat(parts))
    return out_sorted[torch.argsort(order)]


# ----------------------------------------------------------------------------
# gather_distributed=True: this rank's anchors against every rank's rows
# ----------------------------------------------------------------------------
_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_ranks(features: Tensor, labels: Optional[Tensor]) -> list[int]:
    """Agree on the shapes before the gather (one all_gather of a few ints): every
    rank raises the same ValueError (or TypeError) when B is 0 everywhere, when
    V, D, the dtype or the presence of labels differ between ranks, or when one
    rank's labels are invalid, so that no rank waits for the others.  Returns
    the ranks' batch sizes B_r."""
    rank, world = rank_and_world()
    B, V, D = features.shape
    mine = None
    if labels is not None:
        try:
            _check_labels(labels, B, V, features)
        except (TypeError, ValueError) as e:
            mine = e
    code = _DTYPE_CODES.index(features.dtype) if features.dtype in _DTYPE_CODES else len(_DTYPE_CODES)
    meta = all_gather_ints([B, V, D, labels is not None, mine is not None, code], features.device)
    sizes, views, widths, given, bad, codes = (list(c) for c in zip(*meta))
    where = f"on ranks 0..{world - 1} (this is rank {rank}) for gather_distributed=True"
    if mine is not None:
        raise mine
    if any(bad):
        raise ValueError(f"labels is invalid on rank(s) {[r for r, b in enumerate(bad) if b]} (see the error "
                         f"raised there), so every rank stops {where}")
    if len(set(given)) != 1:
        raise ValueError(f"labels must be given on every rank or on none {where}: labels is a tensor on rank(s) "
                         f"{[r for r, g in enumerate(given) if g]} and None on rank(s) "
                         f"{[r for r, g in enumerate(given) if not g]}")
    if len(set(views)) != 1:
        raise ValueError(f"features must have the same number of views V on every rank, got V = {views} {where}")
    if len(set(widths)) != 1:
        raise ValueError(f"features must have the same width D on every rank, got D = {widths} {where}")
    if len(set(codes)) != 1:
        raise TypeError(f"features must have the same dtype on every rank {where}; this rank has {features.dtype}")
    if V == 0 or sum(sizes) == 0:
        raise ValueError(f"features has no anchors on any rank: B = {sizes}, V = {V} {where}; "
                         f"B must be >= 1 on at least one rank and V >= 1")
    if D == 0:
        raise ValueError("features has width D = 0: D must be >= 1")
    _check_labels(labels, B, V, features)  # labels=None and V = 1: the same error on every rank
    return sizes


def _class_lse_gathered(q: Tensor, q_ids: Tensor, q_col: Tensor, c: Tensor, c_ids: Tensor, k: int,
                        inv_temp: float, backend: str) -> Tensor:
    """lpos_i = log sum_{j != q_col[i], c_ids[j] = q_ids[i]} exp(<q_i, c_j> inv_temp) for this
    rank's anchors q (M, D) against every rank's rows c (N, D) (q_col[i]: row i's own index in c;
    dense class ids in [0, k)); (M,), -inf without a positive.  Eager mode groups the rows by
    class: classes of <= 64 rows in c as batched (classes, m, n) logits, larger ones through
    ``nt_xent_lse`` on the class's rows; under torch.compile the masked (M, N) logits."""
    qa, ca = reference._acc(q), reference._acc(c)
    m, n = q.shape[0], c.shape[0]
    if torch.compiler.is_compiling():
        cols = torch.arange(n, device=c.device)
        pos = (q_ids[:, None] == c_ids[None, :]) & (cols[None, :] != q_col[:, None])
        x = ((qa @ ca.mT) * inv_temp).masked_fill(~pos, float("-inf"))
        return torch.logsumexp(x, 1)
    c_order = torch.argsort(c_ids, stable=True)
    q_order = torch.argsort(q_ids, stable=True)
    c_count = torch.bincount(c_ids, minlength=k)
    c_first = c_count.cumsum(0) - c_count
    c_place = torch.empty_like(c_order).scatter_(0, c_order, torch.arange(n, device=c.device))
    q_sid = q_ids[q_order]
    skip = c_place[q_col[q_order]] - c_first[q_sid]  # each sorted anchor's own index in its class block
    c_sizes, q_sizes = c_count.tolist(), torch.bincount(q_ids, minlength=k).tolist()
    c_starts, q_starts = [0] * k, [0] * k
    for i in range(1, k):
        c_starts[i] = c_starts[i - 1] + c_sizes[i - 1]
        q_starts[i] = q_starts[i - 1] + q_sizes[i - 1]
    qs, cs = qa[q_order], ca[c_order]
    by_shape: dict = {}
    for i in range(k):
        if q_sizes[i] > 0 and c_sizes[i] > 1:  # a class of one row has no positive: -inf
            by_shape.setdefault((q_sizes[i], c_sizes[i]), []).append(i)
    parts, where = [], []
    for (qm, cn), classes in sorted(by_shape.items()):
        if cn <= _BATCHED_CLASS_ROWS:
            qi = torch.tensor([q_starts[i] for i in classes], device=q.device)[:, None] + torch.arange(qm, device=q.device)
            ci = torch.tensor([c_starts[i] for i in classes], device=c.device)[:, None] + torch.arange(cn, device=c.device)
            x = (qs[qi] @ cs[ci].mT) * inv_temp  # (classes, qm, cn)
            x = x.masked_fill(torch.arange(cn, device=c.device) == skip[qi][..., None], float("-inf"))
            parts.append(torch.logsumexp(x, -1).reshape(-1))
            where.append(qi.reshape(-1))
        else:
            local = torch.arange(qm, device=q.device)
            for i in classes:
                rows = local + q_starts[i]
                blk_q = q[q_order[q_starts[i]:q_starts[i] + qm]]
                blk_c = c[c_order[c_starts[i]:c_starts[i] + cn]]
                parts.append(_lse(blk_q, blk_c, skip[rows], inv_temp, backend).to(qa.dtype))
                where.append(rows)
    out_sorted = qa.new_full((m,), float("-inf"))
    if parts:
        out_sorted = out_sorted.index_put((torch.cat(where),), torch.cat(parts))
    return out_sorted[torch.argsort(q_order)]


def _sup_con_gathered(features: Tensor, labels: Optional[Tensor], sizes: list[int], T: float, base: float,
                      positives: str, normalize: bool, reduction: str, be: str) -> Tensor:
    """sup_con(gather_distributed=True) on a world of > 1 ranks, rank r holding sizes[r] samples.

    The global batch is the concatenation of the ranks' features in rank order
    (sample b of rank r is global sample sum(sizes[:r]) + b, so labels=None keeps
    each sample's identity); this rank's anchors are its own B_r V rows, their
    candidates every other row of the global batch.  reduction="mean" divides
    this rank's sum by H / world, H the number of anchors with a positive in the
    global batch: the mean over ranks, and the DDP-averaged gradients, are those
    of one process on the concatenated batch."""
    rank, world = rank_and_world()
    out_dtype = features.dtype
    inv_temp = 1.0 / T
    B, V, D = features.shape
    total, offset = sum(sizes), sum(sizes[:rank])
    f = features
    if normalize:
        f = _normalize(f.reshape(B * V, D)).reshape(B, V, D)
    f_all = gather_uneven_with_grad(f.contiguous(), sizes)  # (total, V, D), differentiable
    z = f.transpose(0, 1).reshape(B * V, D)  # own rows, view-major
    z_all = f_all.transpose(0, 1).reshape(total * V, D)  # every rank's rows, view-major
    dev = features.device
    # own row v * B + b is row v * total + offset + b of z_all: left out of its own lse
    col = (torch.arange(V, device=dev)[:, None] * total + offset + torch.arange(B, device=dev)).reshape(-1)
    lse = _lse(z, z_all, col, inv_temp, be)  # keeps z_all in the graph on a rank with B = 0
    if labels is None:  # the positives (the sample's other views) are all on this rank
        ids = torch.arange(B, device=dev)
        psum, cnt = _class_stats(z, ids, B, V, inv_temp)
        lpos = None if positives == "out" else _class_lse(z, None, ids, B, V, inv_temp, be)
        n_pos = total * V  # V >= 2: every anchor has a positive
    else:
        ids_all = _dense_ids(gather_uneven_with_grad(labels.long(), sizes), total, dev)
        ids = ids_all[offset:offset + B]
        za, ca = reference._acc(z), reference._acc(z_all)
        sums = ca.new_zeros(total, D).index_add(0, ids_all.repeat(V), ca)  # S_y over every rank's rows
        size = torch.zeros(total, dtype=ca.dtype, device=dev).index_add(
            0, ids_all, torch.ones_like(ids_all, dtype=ca.dtype))
        rows = ids.repeat(V)
        psum = ((za * sums[rows]).sum(1) - (za * za).sum(1)) * inv_temp
        cnt = size[rows] * V - 1
        lpos = None if positives == "out" else _class_lse_gathered(
            z, rows, col, z_all, ids_all.repeat(V), total, inv_temp, be)
        n_pos = ((size * V > 1) * size * V).sum()
    acc = reference._acc(z).dtype
    lse = lse.to(acc)
    has = cnt > 0
    if positives == "out":
        losses = lse - psum.to(acc) / cnt.to(acc).clamp_min(1)
    else:
        losses = lse - torch.where(has, lpos.to(acc), lse)
    losses = torch.where(has, losses, torch.zeros_like(losses)) * (T / base)
    if reduction == "mean":
        out = losses.sum() / (torch.as_tensor(n_pos, dtype=acc, device=dev).clamp_min(1) / world)
    elif reduction == "sum":
        out = losses.sum()
    else:
        out = losses.reshape(V, B).t()
    return out.to(out_dtype)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def sup_con(
    features: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 0.1,
    *,
    base_temperature: Optional[float] = None,
    positives: str = "out",
    normalize: bool = True,
    gather_distributed: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Multi-view (SimCLR with V views) and supervised contrastive (SupCon) loss.

    Args:
        features: (B, V, D) embeddings, V views of B samples, as
            SupContrast's ``SupConLoss`` takes them.
        labels: None, or (B,) integer class ids.  None: the positives of an
            anchor are the other V - 1 views of its sample (needs V >= 2).
            Labels: every other row of a sample with the same label, all
            views, is a positive (SupCon).
        temperature: softmax temperature T, > 0.
        base_temperature: SupCon's T_base; the loss is multiplied by
            T / T_base.  Default None: T_base = T (factor 1).
        positives: "out": SupCon's L_out (the paper's recommended form), minus
            the mean over the positives of the log-softmax over all other rows.
            "in": minus the log of the summed softmax probability of the
            positives, the form of solo-learn's ``simclr_loss_func(z, indexes)``
            (its ``indexes`` are ``labels`` here).
        normalize: L2-normalise every embedding first (SupConLoss expects
            normalised features; solo-learn normalises).
        gather_distributed: with torch.distributed initialised (world > 1),
            contrast this rank's anchors against every rank's rows: the
            (B_r, V, D) features and the labels are all-gathered (gradients
            flow back to the rank that owns each row).  Ranks may hold
            different B_r, 0 included (the last batch of an epoch); V, D, the
            dtype and whether labels are given must agree (else every rank
            raises the same error).  The global batch is the ranks' features
            concatenated in rank order, so labels=None still pairs each
            sample's own views, and labels match across ranks.
            reduction="mean": each rank returns the sum of its own anchors'
            losses divided by H / world_size, H the number of anchors with a
            positive in the global batch (B V for labels=None), as
            :func:`nt_xent` does: with equal B_r and labels=None that is the
            mean over its own anchors, and in every case the mean of the
            ranks' losses and the DDP-averaged gradients equal one process on
            the concatenated batch (a rank with B_r = 0 returns 0 and still
            takes part in the backward's collectives).  "sum": the sum over
            its own anchors; "none": (B_r, V).  Without an initialised process
            group (or with one rank) this is the plain loss.
        reduction: "mean" | "sum" | "none" ((B, V) per-anchor losses, entry
            [b, v] for anchor features[b, v]).
        backend: "auto" | "cuda" | "triton" | "cpu" | "reference".
            "triton" takes float32 and float16.  Under torch.compile, cuda
            with labels and positives="in" materialises the (BV, BV) logits
            (see the module docstring).

    Returns:
        The loss in features' dtype: a scalar, or (B, V) for reduction="none".

    Anchors without a positive (possible only with labels and V = 1: a label
    seen once) contribute nothing: their loss is 0, and reduction="mean"
    divides by the number of anchors that have a positive (the loss is 0 if
    none has).  SupConLoss gives them loss 0 too but still counts them in its
    mean; solo-learn's form gives them an infinite loss.

    With V = 2, labels=None: ``sup_con(stack([z1, z2], 1), temperature=T)``
    equals ``nt_xent(z1, z2, T)`` for both forms (each anchor has a single
    positive), and ``T / base_temperature`` times it with a base_temperature.
    """
    _checks.tensor(features, "features", ndim=3, floating=True)
    B, V, D = features.shape
    T = _checks.temperature(temperature)
    base = T if base_temperature is None else _checks.temperature(base_temperature, "base_temperature")
    _checks.choice(positives, "positives", POSITIVES)
    _checks.choice(reduction, "reduction", REDUCTIONS)
    _checks.boolean(normalize, "normalize")
    _checks.boolean(gather_distributed, "gather_distributed")
    world = rank_and_world()[1] if gather_distributed else 1
    if world > 1:  # shapes and labels checked across ranks: every rank raises the same error
        sizes = _check_ranks(features, labels)
    else:
        if B == 0 or V == 0:
            raise ValueError(f"features has no anchors: shape {tuple(features.shape)}, B and V must be >= 1")
        if D == 0:
            raise ValueError("features has width D = 0: D must be >= 1")
        _check_labels(labels, B, V, features)
    op = "sup_con" if positives == "out" else "sup_con_in"
    be = _backend.resolve(op, backend, features.device, features.dtype)
    if world > 1:
        return _sup_con_gathered(features, labels, sizes, T, base, positives, normalize, reduction, be)
    if be == "reference":
        return reference.sup_con(features, labels, T, base_temperature=base, positives=positives,
                                 normalize=normalize, reduction=reduction)

    out_dtype = features.dtype
    inv_temp = 1.0 / T
    n = B * V
    z = features.transpose(0, 1).reshape(n, D)  # view-major rows
    if normalize:
        z = _normalize(z)
    ids = _dense_ids(labels, B, features.device)
    if _is_fused(be, z.dtype):
        lse, lpos, psum, cnt = _fused_stats(z, ids.repeat(V), inv_temp, be).unbind(0)
    else:  # cuda / emu: the fused NT-Xent lse, positives by class sums / class blocks
        lse = _lse_sym(z, inv_temp, be)
        psum, cnt = _class_stats(z, ids, B, V, inv_temp)
        lpos = None if positives == "out" else _class_lse(z, labels, ids, B, V, inv_temp, be)
    acc = reference._acc(z).dtype
    lse = lse.to(acc)
    has = cnt > 0
    if positives == "out":
        losses = lse - psum.to(acc) / cnt.to(acc).clamp_min(1)
    else:
        # lpos = -inf where there is no positive: select before subtracting so no inf reaches the graph
        losses = lse - torch.where(has, lpos.to(acc), lse)
    losses = torch.where(has, losses, torch.zeros_like(losses)) * (T / base)
    if reduction == "mean":
        out = losses.sum() / has.sum().clamp_min(1)
    elif reduction == "sum":
        out = losses.sum()
    else:
        out = losses.reshape(V, B).t()
    return out.to(out_dtype)


class SupConLoss(torch.nn.Module):
    """Module form of :func:`sup_con`: ``forward(features, labels=None)``.

    Same arguments as SupContrast's ``SupConLoss(temperature, base_temperature)``
    for contrast_mode="all", plus sslops' (its defaults are sup_con's: T = 0.1,
    base_temperature = T; pass temperature=0.07, base_temperature=0.07 for
    SupContrast's).  gather_distributed: as in :func:`sup_con`."""

    def __init__(self, temperature: float = 0.1, base_temperature: Optional[float] = None, positives: str = "out",
                 normalize: bool = True, backend: str = "auto", gather_distributed: bool = False):
        super().__init__()
        self.temperature = _checks.temperature(temperature)
        self.base_temperature = (None if base_temperature is None
                                 else _checks.temperature(base_temperature, "base_temperature"))
        self.positives = _checks.choice(positives, "positives", POSITIVES)
        self.normalize = _checks.boolean(normalize, "normalize")
        self.backend = _checks.choice(backend, "backend", _backend.BACKENDS)
        self.gather_distributed = _checks.boolean(gather_distributed, "gather_distributed")

    def forward(self, features: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return sup_con(features, labels, self.temperature, base_temperature=self.base_temperature,
                       positives=self.positives, normalize=self.normalize,
                       gather_distributed=self.gather_distributed, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"positives={self.positives!r}, gather_distributed={self.gather_distributed}, "
                f"backend={self.backend!r}")

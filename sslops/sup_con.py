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
  from the saved per-row statistics.
* ``cuda`` (and ``emu``): lse_i is ``sslops::nt_xent_lse_sym`` (the fused NT-Xent
  kernels, tiles recomputed in the backward).  psum_i is linear in the
  logits, psum_i = <z_i, S_{y_i} - z_i> / T with S_y the sum of the rows
  labelled y (an index_add over N rows: O(N D)).  lpos_i is a log-sum-exp
  inside row i's class only: labels=None, a (B, V, V) Gram of each sample's
  views; with labels, the rows sorted by class, classes of <= 64 rows batched
  as (k, n, n) Grams and larger ones through the fused ``sslops::nt_xent_lse``
  kernel on the class's rows (O(n D) memory).  That split needs the class
  sizes on the host, so under torch.compile the labelled lpos_i is computed
  from the masked (N, N) logits instead (materialising; eager mode never is).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, reference
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
        gather_distributed: not implemented yet (raises NotImplementedError).
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
    if B == 0 or V == 0:
        raise ValueError(f"features has no anchors: shape {tuple(features.shape)}, B and V must be >= 1")
    if D == 0:
        raise ValueError("features has width D = 0: D must be >= 1")
    T = _checks.temperature(temperature)
    base = T if base_temperature is None else _checks.temperature(base_temperature, "base_temperature")
    _checks.choice(positives, "positives", POSITIVES)
    _checks.choice(reduction, "reduction", REDUCTIONS)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    _check_labels(labels, B, V, features)
    if gather_distributed:
        raise NotImplementedError(
            "sup_con(gather_distributed=True) is not implemented yet: gather the features (and labels) "
            "across ranks yourself, or use sslops.nt_xent(gather_distributed=True) for two views without labels"
        )
    op = "sup_con" if positives == "out" else "sup_con_in"
    be = _backend.resolve(op, backend, features.device, features.dtype)
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
    if be in _FUSED:
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
    SupContrast's)."""

    def __init__(self, temperature: float = 0.1, base_temperature: Optional[float] = None, positives: str = "out",
                 normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.temperature = _checks.temperature(temperature)
        self.base_temperature = (None if base_temperature is None
                                 else _checks.temperature(base_temperature, "base_temperature"))
        self.positives = _checks.choice(positives, "positives", POSITIVES)
        self.normalize = normalize
        self.backend = _checks.choice(backend, "backend", _backend.BACKENDS)

    def forward(self, features: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return sup_con(features, labels, self.temperature, base_temperature=self.base_temperature,
                       positives=self.positives, normalize=self.normalize, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"positives={self.positives!r}, backend={self.backend!r}")

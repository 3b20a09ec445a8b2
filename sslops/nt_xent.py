"""Fused contrastive losses: SimCLR's NT-Xent and MoCo-style InfoNCE.

Both reduce to a per-row log-sum-exp over a similarity matrix that the fused
backends never build: ``sslops::nt_xent_lse`` walks it in tiles with an online
log-sum-exp and saves only the (normalised) embeddings and one float per row
for the backward, which recomputes the tiles.  The positive logit of each row
is a plain row-wise dot product, so ``loss_i = lse_i - pos_i``.
"""
from __future__ import annotations

import functools
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, reference
from ._distributed import gather_rows_with_grad, rank_and_world

# The Triton kernels keep fp32 state and use fp32/fp16/bf16 tl.dot: no float64.
_TRITON_DTYPES = {"triton": (torch.float32, torch.float16, torch.bfloat16)}
_backend.register_op(
    "nt_xent", compiled=("nt_xent_lse", "nt_xent_lse_sym", "nt_xent_lse_backward", "nt_xent_lse_backward_sym"),
    triton=True, dtypes=_TRITON_DTYPES,
)
_backend.register_op(
    "info_nce", compiled=("nt_xent_lse", "nt_xent_lse_backward"), triton=True, dtypes=_TRITON_DTYPES,
)

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops (schemas: csrc/sslops.cpp)
# ----------------------------------------------------------------------------
def _lse_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("sslops::nt_xent_lse")
def _(q, c, exclude, inv_temp):
    return q.new_empty((q.shape[0],), dtype=_lse_dtype(q))


@torch.library.register_fake("sslops::nt_xent_lse_sym")
def _(z, inv_temp):
    return z.new_empty((z.shape[0],), dtype=_lse_dtype(z))


@torch.library.register_fake("sslops::nt_xent_lse_backward")
def _(grad_lse, q, c, exclude, lse, inv_temp):
    return q.new_empty(q.shape), c.new_empty(c.shape)


@torch.library.register_fake("sslops::nt_xent_lse_backward_sym")
def _(grad_lse, z, lse, inv_temp):
    return z.new_empty(z.shape)


def _lse_formula(q: Tensor, c: Tensor, exclude: Optional[Tensor], inv_temp: float, sym: bool) -> Tensor:
    """The log-sum-exp as plain differentiable torch ops (materialises the logits)."""
    dt = _lse_dtype(q)
    x = (q.to(dt) @ c.to(dt).mT) * inv_temp  # (M, Kc)
    cols = torch.arange(c.shape[0], device=q.device)
    if sym:
        x = x.masked_fill(cols[None, :] == cols[:, None], float("-inf"))
    elif exclude is not None:
        x = x.masked_fill(cols[None, :] == exclude[:, None], float("-inf"))
    return torch.logsumexp(x, 1)


def _create_graph_backward(grad, tensors, exclude, inv_temp, sym):
    """backward(create_graph=True): the fused backward kernels have no derivative of
    their own, so the gradient is taken through the plain formula, which autograd
    can differentiate again (exact second-order gradients, O(M Kc) memory)."""
    need = [t for t in tensors if t.requires_grad]
    with torch.enable_grad():
        lse = _lse_formula(tensors[0], tensors[-1], exclude, inv_temp, sym)
        got = iter(torch.autograd.grad(lse, need, grad, create_graph=True))
    return [next(got) if t.requires_grad else None for t in tensors]


def _setup_lse(ctx, inputs, output):
    q, c, exclude, inv_temp = inputs
    ctx.save_for_backward(q, c, exclude, output)
    ctx.inv_temp = inv_temp


def _backward_lse(ctx, grad, ops=torch.ops.sslops):
    q, c, exclude, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return (*_create_graph_backward(grad, (q, c), exclude, ctx.inv_temp, False), None, None)
    grad_q, grad_c = ops.nt_xent_lse_backward(grad, q, c, exclude, lse, ctx.inv_temp)
    return grad_q, grad_c, None, None


def _setup_lse_sym(ctx, inputs, output):
    z, inv_temp = inputs
    ctx.save_for_backward(z, output)
    ctx.inv_temp = inv_temp


def _backward_lse_sym(ctx, grad, ops=torch.ops.sslops):
    z, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return _create_graph_backward(grad, (z,), None, ctx.inv_temp, True)[0], None
    return ops.nt_xent_lse_backward_sym(grad, z, lse, ctx.inv_temp), None


@_backend.compiled_namespace_setup  # sslops, and sslops_emu (the CUDA emulator) when it loads
def _register_autograd(ns: str) -> None:
    ops = getattr(torch.ops, ns)
    torch.library.register_autograd(f"{ns}::nt_xent_lse", functools.partial(_backward_lse, ops=ops),
                                    setup_context=_setup_lse)
    torch.library.register_autograd(f"{ns}::nt_xent_lse_sym", functools.partial(_backward_lse_sym, ops=ops),
                                    setup_context=_setup_lse_sym)


# ----------------------------------------------------------------------------
# Triton ops (triton_kernels/nt_xent.py), exposed as torch custom ops
# ----------------------------------------------------------------------------
def _tk():
    from .triton_kernels import nt_xent as tk

    return tk


@torch.library.custom_op("sslops::nt_xent_lse_triton", mutates_args=())
def nt_xent_lse_triton(q: Tensor, c: Tensor, exclude: Optional[Tensor], inv_temp: float) -> Tensor:
    return _tk().nt_xent_lse(q, c, exclude, inv_temp)


@torch.library.custom_op("sslops::nt_xent_lse_sym_triton", mutates_args=())
def nt_xent_lse_sym_triton(z: Tensor, inv_temp: float) -> Tensor:
    exclude = torch.arange(z.shape[0], device=z.device)
    return _tk().nt_xent_lse(z, z, exclude, inv_temp)


@torch.library.custom_op("sslops::nt_xent_lse_backward_triton", mutates_args=())
def nt_xent_lse_backward_triton(
    grad_lse: Tensor, q: Tensor, c: Tensor, exclude: Optional[Tensor], lse: Tensor, inv_temp: float
) -> tuple[Tensor, Tensor]:
    return _tk().nt_xent_lse_backward(grad_lse, q, c, exclude, lse, inv_temp)


@torch.library.custom_op("sslops::nt_xent_lse_backward_sym_triton", mutates_args=())
def nt_xent_lse_backward_sym_triton(grad_lse: Tensor, z: Tensor, lse: Tensor, inv_temp: float) -> Tensor:
    return _tk().nt_xent_lse_backward_sym(grad_lse, z, lse, inv_temp)


nt_xent_lse_triton.register_fake(lambda q, c, exclude, inv_temp: q.new_empty((q.shape[0],), dtype=torch.float32))
nt_xent_lse_sym_triton.register_fake(lambda z, inv_temp: z.new_empty((z.shape[0],), dtype=torch.float32))
nt_xent_lse_backward_triton.register_fake(
    lambda grad_lse, q, c, exclude, lse, inv_temp: (q.new_empty(q.shape), c.new_empty(c.shape))
)
nt_xent_lse_backward_sym_triton.register_fake(lambda grad_lse, z, lse, inv_temp: z.new_empty(z.shape))


def _backward_lse_triton(ctx, grad):
    q, c, exclude, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return (*_create_graph_backward(grad, (q, c), exclude, ctx.inv_temp, False), None, None)
    grad_q, grad_c = nt_xent_lse_backward_triton(grad, q, c, exclude, lse, ctx.inv_temp)
    return grad_q, grad_c, None, None


def _backward_lse_sym_triton(ctx, grad):
    z, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return _create_graph_backward(grad, (z,), None, ctx.inv_temp, True)[0], None
    return nt_xent_lse_backward_sym_triton(grad, z, lse, ctx.inv_temp), None


nt_xent_lse_triton.register_autograd(_backward_lse_triton, setup_context=_setup_lse)
nt_xent_lse_sym_triton.register_autograd(_backward_lse_sym_triton, setup_context=_setup_lse_sym)


# ----------------------------------------------------------------------------
# Backend switch for the log-sum-exp
# ----------------------------------------------------------------------------
def _kernel_dtype(x: Tensor, backend: str) -> Tensor:
    # The C++ CPU kernel takes float32/float64: half types are upcast (autograd
    # casts the gradient back).  GPU backends take fp16/bf16 as they are.
    if backend == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _lse(q: Tensor, c: Tensor, exclude: Optional[Tensor], inv_temp: float, backend: str) -> Tensor:
    if q.shape[0] == 0:  # a rank with an empty batch: keep c in the graph for the gather's backward
        return (reference._acc(c).sum() * 0).expand(0)
    if backend == "reference":
        return reference.nt_xent_lse(q, c, exclude, inv_temp)
    q, c = _kernel_dtype(q, backend), _kernel_dtype(c, backend)
    if backend == "triton":
        return nt_xent_lse_triton(q, c, exclude, inv_temp)
    return _backend.ops(backend).nt_xent_lse(q, c, exclude, inv_temp)


def _lse_sym(z: Tensor, inv_temp: float, backend: str) -> Tensor:
    if backend == "reference":
        return reference.nt_xent_lse(z, z, torch.arange(z.shape[0], device=z.device), inv_temp)
    z = _kernel_dtype(z, backend)
    if backend == "triton":
        return nt_xent_lse_sym_triton(z, inv_temp)
    return _backend.ops(backend).nt_xent_lse_sym(z, inv_temp)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def _embeddings(a: Tensor, a_name: str, b: Tensor, b_name: str, allow_empty: bool = False) -> None:
    _checks.tensor(a, a_name, ndim=2, floating=True)
    _checks.tensor(b, b_name, ndim=2, floating=True)
    _checks.same_dtype(a, a_name, b, b_name)
    _checks.same_device(a, a_name, b, b_name)
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape (N, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{a_name} is an empty batch: N must be >= 1")
    if a.shape[1] == 0:
        raise ValueError(f"{a_name} has width D = 0: D must be >= 1")


def _normalize(x: Tensor) -> Tensor:
    # Norms in float32 (float64 stays float64), result in the input dtype.
    return F.normalize(reference._acc(x), dim=1).to(x.dtype)


def _positive(a: Tensor, b: Tensor, inv_temp: float) -> Tensor:
    return (reference._acc(a) * reference._acc(b)).sum(1) * inv_temp


def _reduce(losses: Tensor, reduction: str, dtype: torch.dtype, count: Optional[float] = None) -> Tensor:
    # count: the mean's denominator when it is not losses.numel() (gathered batches).
    if reduction == "mean":
        losses = losses.mean() if count is None else losses.sum() / count
    elif reduction == "sum":
        losses = losses.sum()
    return losses.to(dtype)


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.5,
    *,
    normalize: bool = True,
    gather_distributed: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """SimCLR's NT-Xent (normalised temperature-scaled cross entropy) loss.

    Args:
        z1: (N, D) embeddings of the first view.
        z2: (N, D) embeddings of the second view; row i is the positive of z1[i].
        temperature: softmax temperature, > 0.
        normalize: L2-normalise the rows first (cosine similarity).
        gather_distributed: with torch.distributed initialised, take candidates
            from every rank (all_gather of the (N, D) embeddings, gradients
            flow back to their rank).  Ranks may hold different N, 0 included
            (the last batch of an epoch); D must agree.  With reduction="mean"
            each rank returns the sum over its own 2N anchors divided by
            2 * (total N) / world_size: with equal N that is the mean over its
            own anchors (lightly's convention), and in every case the mean of
            the ranks' losses and the DDP-averaged gradients equal
            single-process training on the concatenated batch.
        reduction: "mean" | "sum" | "none" ((2N,) per-anchor losses, z1's first).
        backend: "auto" | "cuda" | "triton" | "cpu" | "reference" (| "emu", tests only).

    Returns:
        The loss in z1's dtype: a scalar, or (2N,) for reduction="none".

    Each of the 2N embeddings is an anchor; its positive is its other view; its
    negatives are the other 2N - 2 embeddings.  Same definition as
    ``lightly.loss.NTXentLoss`` (its memory bank: :class:`NTXentLoss`) and the SimCLR paper.
    """
    _checks.boolean(normalize, "normalize")
    rank, world = rank_and_world() if _checks.boolean(gather_distributed, "gather_distributed") else (0, 1)
    _embeddings(z1, "z1", z2, "z2", allow_empty=world > 1)
    inv_temp = 1.0 / _checks.temperature(temperature)
    _checks.choice(reduction, "reduction", REDUCTIONS)
    be = _backend.resolve("nt_xent", backend, z1.device, z1.dtype)
    out_dtype = z1.dtype
    if normalize:
        z1, z2 = _normalize(z1), _normalize(z2)
    pos = _positive(z1, z2, inv_temp)
    count = None
    if world > 1:
        z1_all, sizes = gather_rows_with_grad(z1, "z1")
        z2_all, _ = gather_rows_with_grad(z2, "z2")
        total = sum(sizes)
        q, c = torch.cat([z1, z2]), torch.cat([z1_all, z2_all])
        own = torch.arange(z1.shape[0], device=z1.device) + sum(sizes[:rank])
        exclude = torch.cat([own, own + total])
        lse = _lse(q, c, exclude, inv_temp, be)
        count = 2 * total / world
    else:
        lse = _lse_sym(torch.cat([z1, z2]), inv_temp, be)
    losses = lse.to(pos.dtype) - torch.cat([pos, pos])
    return _reduce(losses, reduction, out_dtype, count)


def info_nce(
    query: Tensor,
    key: Tensor,
    negatives: Optional[Tensor] = None,
    temperature: float = 0.07,
    *,
    normalize: bool = True,
    gather_distributed: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """MoCo-style InfoNCE.

    Args:
        query: (N, D).
        key: (N, D); key[i] is the positive of query[i].
        negatives: optional (K, D) negatives shared by every row (a MoCo queue).
            When absent, the negatives of row i are the other rows of key.
        gather_distributed: in-batch negatives only (negatives=None): the
            candidates of every row are the keys of every rank (MoCo v3);
            uneven N, the mean's denominator and gradients as in :func:`nt_xent`.
        temperature, normalize, reduction, backend: as in :func:`nt_xent`.

    Returns:
        The loss in query's dtype: a scalar, or (N,) for reduction="none".
    """
    _checks.boolean(normalize, "normalize")
    if _checks.boolean(gather_distributed, "gather_distributed") and negatives is not None:
        raise ValueError("gather_distributed=True gathers the in-batch keys: it takes negatives=None "
                         "(gather a negatives queue yourself)")
    rank, world = rank_and_world() if gather_distributed else (0, 1)
    _embeddings(query, "query", key, "key", allow_empty=world > 1)
    inv_temp = 1.0 / _checks.temperature(temperature)
    _checks.choice(reduction, "reduction", REDUCTIONS)
    if negatives is not None:
        _checks.tensor(negatives, "negatives", ndim=2, floating=True)
        _checks.same_dtype(query, "query", negatives, "negatives")
        _checks.same_device(query, "query", negatives, "negatives")
        if negatives.shape[1] != query.shape[1]:
            raise ValueError(
                f"negatives must have width D = {query.shape[1]} like query, got shape {tuple(negatives.shape)}"
            )
        if negatives.shape[0] == 0:
            raise ValueError("negatives is empty: pass None for in-batch negatives, or at least one row")
    be = _backend.resolve("info_nce", backend, query.device, query.dtype)
    out_dtype = query.dtype
    if normalize:
        query, key = _normalize(query), _normalize(key)
        negatives = None if negatives is None else _normalize(negatives)
    pos = _positive(query, key, inv_temp)
    count = None
    if world > 1:
        key_all, sizes = gather_rows_with_grad(key, "key")
        lse = _lse(query, key_all, None, inv_temp, be).to(pos.dtype)
        count = sum(sizes) / world
    elif negatives is None:
        lse = _lse(query, key, None, inv_temp, be).to(pos.dtype)
    else:  # candidates: the row's own key and the queue
        lse = torch.logaddexp(_lse(query, negatives, None, inv_temp, be).to(pos.dtype), pos)
    return _reduce(lse - pos, reduction, out_dtype, count)


def _bank_size(size) -> tuple[int, ...]:
    """lightly 1.6's MemoryBankModule rules for memory_bank_size: 0 or (0, D)
    disables the bank, (K, D) sets it, a bare int K > 0 is refused."""
    if size is None:
        return (0,)
    is_int = isinstance(size, numbers.Integral) and not isinstance(size, bool)
    try:
        entries = (int(size),) if is_int else tuple(size)
    except TypeError:
        raise ValueError(f"memory_bank_size must be 0 or a (num_features, dim) tuple, got {size!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0 for x in entries):
        raise ValueError(f"memory_bank_size={size!r}: entries must be non-negative ints")
    if is_int and size > 0:
        raise ValueError(
            f"memory_bank_size={size} does not specify the feature dimension: set it with "
            f"memory_bank_size=({size}, dim), or pass memory_bank_size=0 to disable the memory bank"
        )
    if entries != (0,) and len(entries) != 2:
        raise ValueError(f"memory_bank_size={size!r}: expected a (num_features, dim) tuple, or 0 for no bank")
    return tuple(int(x) for x in entries)


class _MemoryBank(torch.nn.Module):
    """lightly's MemoryBankModule: a (K, D) first-in first-out queue of
    normalised rows, in buffers ``bank`` and ``bank_ptr`` (persistent here, so
    they are in the state dict; lightly's are not)."""

    def __init__(self, size: tuple[int, int], gather_distributed: bool):
        super().__init__()
        self.size = size
        self.gather_distributed = gather_distributed
        # lightly's initialisation, same RNG draws: randn (K, D) in float32, rows normalised.
        self.register_buffer("bank", F.normalize(torch.randn(size).float(), dim=-1))
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def push(self, batch: Tensor) -> Optional[list[int]]:
        """lightly's _dequeue_and_enqueue: rows past the end of the bank are
        dropped and the pointer goes back to 0.  Returns the ranks' row counts
        when it gathers (ranks may differ, 0 rows included), else None."""
        sizes = None
        if self.gather_distributed and rank_and_world()[1] > 1:
            batch, sizes = gather_rows_with_grad(batch, "out1")
        k, n, ptr = self.size[0], batch.shape[0], int(self.bank_ptr)
        if ptr + n >= k:
            self.bank[ptr:] = batch[: k - ptr].detach()
            self.bank_ptr.zero_()
        else:
            self.bank[ptr: ptr + n] = batch.detach()
            self.bank_ptr[0] = ptr + n
        return sizes


class NTXentLoss(torch.nn.Module):
    """Drop-in for ``lightly.loss.NTXentLoss`` 1.6 (same arguments, in the same
    order, same memory bank).

    Without a memory bank (``memory_bank_size=0``) this is :func:`nt_xent`.
    With ``memory_bank_size=(K, D)`` it is lightly's MoCo-style loss, built on
    the fused :func:`info_nce`: the anchors are out0's rows only, the
    candidates of row i are out1[i] (positive) and the K bank rows, taken
    before this step's update; then, if out0 requires grad, the normalised
    out1 (gathered from every rank first when ``gather_distributed``) is
    pushed into the bank, without autograd, first-in first-out as lightly
    does.  The bank is the buffer ``memory_bank.bank`` (float32 unless the
    module is moved with ``.to(dtype)``; used in the embeddings' dtype).
    Negatives are never gathered (lightly's rule).  When the ranks' batch
    sizes differ (0 rows included) in a gathered training step, the mean's
    denominator is (total N) / world_size as in :func:`nt_xent`, so
    DDP-averaged gradients equal one process on the concatenated batch; with
    equal sizes that is lightly's per-rank mean.

    >>> criterion = sslops.NTXentLoss(temperature=0.5)
    >>> loss = criterion(out0, out1)   # (N, D) projections of two views
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False,
                 normalize: bool = True, backend: str = "auto"):
        super().__init__()
        _checks.boolean(gather_distributed, "gather_distributed")
        _checks.boolean(normalize, "normalize")
        size = _bank_size(memory_bank_size)
        self.memory_bank_size = size if size[0] > 0 else 0
        self.memory_bank = _MemoryBank(size, gather_distributed) if size[0] > 0 else None
        self.temperature = _checks.temperature(temperature)
        self.gather_distributed = gather_distributed
        self.normalize = normalize
        self.backend = _checks.choice(backend, "backend", _backend.BACKENDS)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank is None:
            return nt_xent(out0, out1, self.temperature, normalize=self.normalize,
                           gather_distributed=self.gather_distributed, backend=self.backend)
        _checks.tensor(out0, "out0")  # before reading out0.requires_grad (was an AttributeError)
        _checks.tensor(out1, "out1")
        train = out0.requires_grad  # lightly's rule: no update when evaluating
        gathered = train and self.gather_distributed and rank_and_world()[1] > 1
        _embeddings(out0, "out0", out1, "out1", allow_empty=gathered)
        if out0.shape[1] != self.memory_bank_size[1]:
            raise ValueError(f"memory_bank_size={self.memory_bank_size} holds rows of D = "
                             f"{self.memory_bank_size[1]}, but out0 and out1 have D = {out0.shape[1]}")
        if self.normalize:
            out0, out1 = _normalize(out0), _normalize(out1)
        # Negatives: the bank before this step's update (a copy: the backward must not see the push).
        negatives = self.memory_bank.bank.detach().to(out0.device, out0.dtype, copy=True)
        sizes = self.memory_bank.push(out1) if train else None
        if out0.shape[0] == 0:  # a rank with an empty batch: its loss is 0, its gradients 0
            losses = (out0 * 0).sum(1) + (out1 * 0).sum(1)
        else:
            losses = info_nce(out0, out1, negatives, self.temperature, normalize=False, reduction="none",
                              backend=self.backend)
        count = None if sizes is None else sum(sizes) / rank_and_world()[1]
        return _reduce(losses, "mean", losses.dtype, count)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
                f"gather_distributed={self.gather_distributed}, backend={self.backend!r}")


class InfoNCELoss(torch.nn.Module):
    """Module form of :func:`info_nce`: ``forward(query, key, negatives=None)``."""

    def __init__(self, temperature: float = 0.07, normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.temperature = _checks.temperature(temperature)
        self.normalize = _checks.boolean(normalize, "normalize")
        self.backend = _checks.choice(backend, "backend", _backend.BACKENDS)

    def forward(self, query: Tensor, key: Tensor, negatives: Optional[Tensor] = None) -> Tensor:
        return info_nce(query, key, negatives, self.temperature, normalize=self.normalize, backend=self.backend)

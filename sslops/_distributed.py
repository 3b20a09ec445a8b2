"""torch.distributed helpers shared by the ops."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), or (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient of the
    gathered tensor (all_reduce) and keeps this rank's slice.

    Written on plain ``torch.distributed`` collectives because
    ``torch.distributed.nn.functional.all_gather`` emits a FutureWarning on
    every call since torch 2.x.  Works with gloo and nccl.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rank, world = rank_and_world()
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOwnRows.apply(grad, *ctx.rows)


class _SumOwnRows(torch.autograd.Function):
    """Backward of :class:`_GatherRows`: the sum over ranks of ``grad`` (all_reduce),
    rows ``start:stop``.  Its own backward is the gather again, so a
    ``create_graph=True`` backward through the gather stays differentiable."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[start:stop]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _GatherRows.apply(g), None, None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """all_gather of ``x`` (same shape on every rank) along dim 0, differentiable.

    The backward sums the gradients of every rank's copy and hands each rank the
    slice of its own rows, so DDP-averaged parameter gradients equal those of
    one process on the concatenated batch (works with gloo and nccl).
    """
    return _GatherRows.apply(x)


def gather_rows_with_grad(x: torch.Tensor, name: str) -> tuple[torch.Tensor, list[int]]:
    """all_gather along dim 0 of (n_r, D) tensors whose n_r differ between ranks.

    Gathers the row counts and widths first (so a rank with 0 rows takes part
    like any other and no rank waits forever), pads every rank's rows to the
    largest n_r, gathers them with :func:`gather_with_grad` and strips the
    padding.  Returns the (sum n_r, D) concatenation in rank order and the
    list of n_r.  Every rank raises the same ValueError when the widths differ.
    """
    rank, world = rank_and_world()
    shape = torch.tensor([x.shape[0], x.shape[1]], dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    sizes = [int(s[0]) for s in shapes]
    widths = [int(s[1]) for s in shapes]
    if len(set(widths)) != 1:
        raise ValueError(
            f"{name} must have the same width D on every rank for gather_distributed=True, "
            f"got D = {widths} on ranks 0..{world - 1} (this is rank {rank})"
        )
    if sum(sizes) == 0:
        raise ValueError(f"{name} is an empty batch on every rank: N must be >= 1 on at least one rank")
    top = max(sizes)
    if len(set(sizes)) == 1:
        return gather_with_grad(x), sizes
    padded = torch.cat([x, x.new_zeros(top - x.shape[0], x.shape[1])]) if x.shape[0] < top else x
    parts = gather_with_grad(padded).split(top)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes


def all_gather_ints(values, device) -> list[list[int]]:
    """Every rank's list of a few ints (no autograd): ``out[r]`` is rank r's ``values``.

    Every rank passes as many values; ``device`` is where the collective runs
    (the inputs' device: a CUDA device under nccl).  Used to agree on shapes
    and flags before a gather, so that every rank can raise the same error.
    """
    _, world = rank_and_world()
    mine = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [p.tolist() for p in parts]


def gather_uneven_with_grad(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather along dim 0 of tensors of any trailing shape, rank r holding
    ``sizes[r]`` rows (0 included); every rank passes the same ``sizes`` (from
    :func:`all_gather_ints`) and the same trailing shape and dtype.

    Pads this rank's rows to the largest size, gathers them with
    :func:`gather_with_grad` (differentiable, the backward sums every rank's
    gradient and keeps this rank's rows) and strips the padding: returns the
    (sum sizes, ...) concatenation in rank order.  Integer tensors (labels)
    gather the same way, without autograd.
    """
    rank, _ = rank_and_world()
    if x.shape[0] != sizes[rank]:
        raise ValueError(f"gather_uneven_with_grad: this rank ({rank}) holds {x.shape[0]} rows, sizes says {sizes[rank]}")
    top = max(sizes)
    if len(set(sizes)) == 1:
        return gather_with_grad(x)
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    parts = gather_with_grad(x).split(top)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])

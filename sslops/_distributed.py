"""torch.distributed helpers shared by the ops."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), or (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """all_gather of ``x`` (same shape on every rank) along dim 0, differentiable.

    The backward sums the gradients of every rank's copy and hands each rank the
    slice of its own rows, so DDP-averaged parameter gradients equal those of
    one process on the concatenated batch (works with gloo and nccl).
    """
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)

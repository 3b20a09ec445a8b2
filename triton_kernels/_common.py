"""Launch helpers shared by the Triton launchers (no GPU needed to import).

Each launcher builds its kernel launches as :class:`Launch` values in a plain
function of the tensors (``*_launches``), then runs them under
:func:`device_guard`.  Keeping the argument building apart from running it lets
``tests/test_triton_compile.py`` compile exactly what a real launch would, for
sm_80 / sm_90, from meta tensors on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

# CUDA's grid limits: x < 2**31, y and z <= 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **kwargs)``."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    def __call__(self) -> None:
        check_grid(self.grid, getattr(self.kernel, "__name__", "kernel"))
        self.kernel[self.grid](*self.args, **self.kwargs)


def check_grid(grid: Tuple[int, ...], name: str = "kernel") -> None:
    """ValueError when a grid exceeds what CUDA can launch (the interpreter has no limit)."""
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID)):
        if n > limit:
            raise ValueError(f"{name}: grid {tuple(grid)} exceeds CUDA's limit {limit} on axis {'xyz'[axis]}")


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU and its current stream (no-op for CPU tensors under the interpreter).

    Triton launches on the *current* device: a tensor on cuda:1 while cuda:0 is
    current would otherwise run on the wrong GPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def capability(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """Compute capability of the GPU holding ``t``; None under the interpreter (CPU tensors)."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else None

"""Argument checks shared by the public ops.  Each error names the argument."""
from __future__ import annotations

import math
import numbers
import os

import torch


def tensor(x, name: str, ndim: int | None = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def same_dtype(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}")


def same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}")


def positive_finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


# Smallest temperature the losses accept: 1 / 2**-64 = 1.8e19 keeps logits of
# normalised embeddings (|<z_i, z_j>| <= 1) far inside float32's range (3.4e38),
# with room for unnormalised ones; below it 1/T overflows float32 (T < 2.9e-39)
# or double (T < 5.6e-309) and the kernels would see inf.
MIN_TEMPERATURE = 2.0 ** -64


def temperature(value, name: str = "temperature") -> float:
    """A loss temperature: a real number in [2**-64, inf)."""
    value = positive_finite(value, name)
    if value < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be >= 2**-64 (~5.4e-20) so that 1/{name} fits in float32 logits, got {value}")
    return value


def integer(value, name: str, lo: int = 0, hi: int | None = None) -> int:
    """A Python int (or a SymInt under torch.compile) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value if isinstance(value, torch.SymInt) else int(value)


def boolean(value, name: str) -> bool:
    """A Python bool (a truthy string such as "False" would otherwise switch a flag on)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def choice(value, name: str, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


POISON = os.environ.get("SSLOPS_POISON", "0") == "1"


def new_output(*shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.empty for kernel outputs.  Under SSLOPS_POISON=1 (set by the tests)
    it is filled with NaN (or -1 for integers) so that an element a kernel
    forgets to write fails the comparison instead of passing by luck."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out

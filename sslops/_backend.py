"""Backend choice for every sslops op.

Backends, in the order ``auto`` prefers them:

* ``cuda``      - the CUDA C++ kernels of ``sslops._C`` (CUDA tensors, CUDA build)
* ``triton``    - the Triton kernels (CUDA tensors; CPU tensors only under
                  ``TRITON_INTERPRET=1``, which ``auto`` never picks)
* ``cpu``       - the C++ CPU kernels of ``sslops._C`` (CPU tensors)
* ``reference`` - plain PyTorch (``sslops.reference``), always available

``backend="auto"`` (the default of every op) can be overridden with the
environment variable ``SSLOPS_BACKEND``; an explicit ``backend=`` argument wins
over the variable.  A backend that was asked for by name and cannot run the
call raises ``ValueError`` naming it: nothing silently falls back.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Dict, Sequence, Tuple

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
ENV_VAR = "SSLOPS_BACKEND"

try:  # the compiled extension registers the sslops:: kernels when imported
    from . import _C  # noqa: F401

    _C_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only by broken installs
    _C_ERROR = exc


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """What an op needs: the compiled sslops:: ops it calls, and a Triton path."""

    compiled: Tuple[str, ...]
    triton: bool
    prefer: Tuple[str, ...] = ("cuda", "triton", "cpu", "reference")


_OPS: Dict[str, OpInfo] = {}


def register_op(name: str, compiled: Sequence[str], triton: bool, prefer: Sequence[str] | None = None) -> None:
    info = OpInfo(tuple(compiled), triton)
    if prefer is not None:
        info = dataclasses.replace(info, prefer=tuple(prefer))
    _OPS[name] = info


def compiled_available() -> bool:
    return _C_ERROR is None


def cuda_built() -> bool:
    """Whether this install compiled the CUDA kernels."""
    return compiled_available() and bool(torch.ops.sslops._cuda_built())


def _has_kernels(names: Sequence[str], key: str) -> bool:
    if not compiled_available():
        return False
    return all(torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"sslops::{n}", key) for n in names)


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends(op: str, device="cpu") -> list[str]:
    """Backends that can run ``op`` on tensors on ``device`` in this install.

    >>> sslops.backends("nt_xent", "cpu")
    ['cpu', 'reference']
    """
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    info = _OPS[op]
    dev = torch.device(device)
    found = []
    for name in info.prefer:
        if name == "reference":
            ok = True
        elif name == "cpu":
            ok = dev.type == "cpu" and _has_kernels(info.compiled, "CPU")
        elif name == "cuda":
            ok = dev.type == "cuda" and torch.cuda.is_available() and _has_kernels(info.compiled, "CUDA")
        else:  # triton
            ok = info.triton and triton_importable() and (
                (dev.type == "cuda" and torch.cuda.is_available()) or (dev.type == "cpu" and triton_interpret())
            )
        if ok:
            found.append(name)
    return found


@torch.compiler.assume_constant_result  # torch.compile calls it once while tracing
def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device``.

    ``backend`` is the caller's argument; ``"auto"`` consults ``SSLOPS_BACKEND``
    and then picks the first usable backend in the op's preference order.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    source = "backend"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        backend, source = env, ENV_VAR
    usable = backends(op, device)
    if backend == "auto":
        for name in usable:
            if name == "triton" and torch.device(device).type == "cpu":
                continue  # the interpreter is a test vehicle, never the fast path
            return name
        return "reference"
    if backend not in usable:
        why = ""
        if backend in ("cpu", "cuda") and not compiled_available():
            why = f" (sslops._C failed to import: {_C_ERROR})"
        elif backend == "cuda" and torch.device(device).type == "cuda" and not cuda_built():
            why = " (this install was built without CUDA kernels; reinstall with SSLOPS_CUDA=1)"
        raise ValueError(
            f"{source}={backend!r} cannot run {op} on {torch.device(device)} tensors{why}; "
            f"usable backends here: {usable}"
        )
    return backend

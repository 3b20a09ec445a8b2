"""Backend choice for every sslops op.

Backends, in the order ``auto`` prefers them:

* ``cuda``      - the CUDA C++ kernels of ``sslops._C`` (CUDA tensors, CUDA build)
* ``triton``    - the Triton kernels (CUDA tensors; CPU tensors only under
                  ``TRITON_INTERPRET=1``, which ``auto`` never picks)
* ``cpu``       - the C++ CPU kernels of ``sslops._C`` (CPU tensors)
* ``reference`` - plain PyTorch (``sslops.reference``), always available
* ``emu``       - the CUDA kernels of csrc/cuda compiled for the CPU against the
                  emulator of the CUDA execution model (csrc/emu), on CPU
                  tensors; a test vehicle, usable only after
                  ``sslops._emu.load()`` (the ``emu`` tests do it) and never
                  picked by ``auto``

``backend="auto"`` (the default of every op) can be overridden with the
environment variable ``SSLOPS_BACKEND``; an explicit ``backend=`` argument wins
over the variable.  A backend that was asked for by name and cannot run the
call raises ``ValueError`` naming it: nothing silently falls back.

Backends may compute only some dtypes (``register_op(..., dtypes=...)``): with
a ``dtype``, :func:`backends` lists only the backends that compute it
correctly, ``auto`` skips the others, and asking for one by name raises.
Head dims work the same way (``register_op(..., head_dims=...)``, attention's
fused kernels): an unsupported one is skipped by ``auto`` and refused, with the
supported list in the message, when the backend is asked for by name.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference", "emu")
ENV_VAR = "SSLOPS_BACKEND"
EMU_NAMESPACE = "sslops_emu"  # the emulated CUDA kernels' ops (sslops/_emu.py)

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
    # backend -> the dtypes it computes correctly; a backend not listed takes any dtype
    dtypes: Mapping[str, Tuple[torch.dtype, ...]] = dataclasses.field(default_factory=dict)
    # backend -> the head dims it supports; a backend not listed takes any
    head_dims: Mapping[str, Tuple[int, ...]] = dataclasses.field(default_factory=dict)


_OPS: Dict[str, OpInfo] = {}

# numpy, which runs Triton's interpreter, has no bfloat16 (float64 it has: an op
# whose Triton kernels compute float64 lists it in its own dtypes)
_INTERPRETER_DTYPES = (torch.float32, torch.float16, torch.float64)


def register_op(
    name: str,
    compiled: Sequence[str],
    triton: bool,
    prefer: Sequence[str] | None = None,
    dtypes: Mapping[str, Sequence[torch.dtype]] | None = None,
    head_dims: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Declare an op: the compiled ``sslops::`` ops it calls, whether it has a
    Triton path, the order ``auto`` prefers, per backend the dtypes that
    backend computes correctly (backends left out take any dtype), and per
    backend the head dims it supports (attention; backends left out take any)."""
    info = OpInfo(tuple(compiled), triton)
    if prefer is not None:
        info = dataclasses.replace(info, prefer=tuple(prefer))
    if dtypes:
        unknown = set(dtypes) - set(BACKENDS[1:])
        if unknown:
            raise ValueError(f"register_op({name!r}): unknown backends in dtypes: {sorted(unknown)}")
        info = dataclasses.replace(info, dtypes={k: tuple(v) for k, v in dtypes.items()})
    if head_dims:
        unknown = set(head_dims) - set(BACKENDS[1:])
        if unknown:
            raise ValueError(f"register_op({name!r}): unknown backends in head_dims: {sorted(unknown)}")
        info = dataclasses.replace(info, head_dims={k: tuple(sorted(v)) for k, v in head_dims.items()})
    _OPS[name] = info


def supported_dtypes(op: str, backend: str, device="cpu") -> Optional[Tuple[torch.dtype, ...]]:
    """The dtypes ``backend`` computes for ``op`` on ``device`` (None: any)."""
    info = _op_info(op)
    allowed = info.dtypes.get(backend)
    if backend == "triton" and torch.device(device).type == "cpu":
        allowed = tuple(d for d in (allowed or _INTERPRETER_DTYPES) if d in _INTERPRETER_DTYPES)
    return allowed


def supported_head_dims(op: str, backend: str) -> Optional[Tuple[int, ...]]:
    """The head dims ``backend`` supports for ``op`` (None: any)."""
    return _op_info(op).head_dims.get(backend)


def _op_info(op: str) -> OpInfo:
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    return _OPS[op]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def compiled_available() -> bool:
    return _C_ERROR is None


_EMU_LOADED = False
_NAMESPACE_SETUPS = []


def emu_loaded() -> bool:
    """Whether the CUDA emulator's kernels (``sslops._emu.load()``) are loaded."""
    return _EMU_LOADED


def ops(backend: str):
    """The op namespace that runs the compiled kernels of ``backend``:
    ``torch.ops.sslops``, or ``torch.ops.sslops_emu`` for ``emu``."""
    return getattr(torch.ops, EMU_NAMESPACE) if backend == "emu" else torch.ops.sslops


def compiled_namespace_setup(fn):
    """Decorator: ``fn(ns)`` registers what the compiled ops of namespace ``ns``
    need from Python (autograd, ...).  It runs for ``sslops`` now (when
    sslops._C is importable) and for ``sslops_emu`` when the emulator loads."""
    _NAMESPACE_SETUPS.append(fn)
    if compiled_available():
        fn("sslops")
    if _EMU_LOADED:
        fn(EMU_NAMESPACE)
    return fn


def _emu_did_load() -> None:  # called by sslops._emu.load()
    global _EMU_LOADED
    if not _EMU_LOADED:
        _EMU_LOADED = True
        for fn in _NAMESPACE_SETUPS:
            fn(EMU_NAMESPACE)


def cuda_built() -> bool:
    """Whether this install compiled the CUDA kernels."""
    return compiled_available() and bool(torch.ops.sslops._cuda_built())


def cuda_archs() -> Tuple[str, ...]:
    """The GPU code this install compiled: ``sm_XY`` kernel images and ``compute_XY``
    PTX (from TORCH_CUDA_ARCH_LIST at build time); empty without the CUDA build."""
    if not cuda_built():
        return ()
    return tuple(a for a in str(torch.ops.sslops._cuda_archs()).split(",") if a)


def arch_covered(capability: Tuple[int, int], archs: Sequence[str]) -> bool:
    """Whether a GPU of compute capability ``capability`` can run code built for ``archs``:
    a kernel image sm_XY runs on X.Y' with Y' >= Y (same major), PTX compute_XY is
    JIT-compiled by the driver for any GPU >= X.Y."""
    major, minor = capability
    for arch in archs:
        kind, _, num = arch.partition("_")
        if not num.isdigit() or len(num) < 2:
            continue  # e.g. sm_90a (arch-specific features): not a portable image
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def _cuda_covers(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return arch_covered(torch.cuda.get_device_capability(index), cuda_archs())


def _has_kernels(names: Sequence[str], key: str, namespace: str = "sslops") -> bool:
    if not compiled_available():
        return False
    return all(torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"{namespace}::{n}", key) for n in names)


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends(op: str, device="cpu", dtype: Optional[torch.dtype] = None,
             head_dim: Optional[int] = None) -> list[str]:
    """Backends that can run ``op`` on tensors on ``device`` in this install,
    in the order ``auto`` prefers them; with ``dtype``, only those that compute
    that dtype correctly; with ``head_dim``, only those that support it.

    >>> sslops.backends("nt_xent", "cpu")
    ['cpu', 'reference']
    """
    info = _op_info(op)
    dev = torch.device(device)
    found = []
    # emu is listed (when loaded) just before reference; auto never picks it
    order = [b for b in info.prefer if b != "reference"] + ["emu"] + (["reference"] if "reference" in info.prefer else [])
    for name in order:
        if name == "reference":
            ok = True
        elif name == "emu":
            ok = dev.type == "cpu" and _EMU_LOADED and _has_kernels(info.compiled, "CPU", EMU_NAMESPACE)
        elif name == "cpu":
            ok = dev.type == "cpu" and _has_kernels(info.compiled, "CPU")
        elif name == "cuda":
            ok = (dev.type == "cuda" and torch.cuda.is_available() and _has_kernels(info.compiled, "CUDA")
                  and _cuda_covers(dev))  # e.g. an sm_75 GPU with an sm_80/sm_90 build: no kernel image
        else:  # triton
            ok = info.triton and triton_importable() and (
                (dev.type == "cuda" and torch.cuda.is_available()) or (dev.type == "cpu" and triton_interpret())
            )
        if ok and dtype is not None:
            allowed = supported_dtypes(op, name, dev)
            ok = allowed is None or dtype in allowed
        if ok and head_dim is not None:
            dims = supported_head_dims(op, name)
            ok = dims is None or head_dim in dims
        if ok:
            found.append(name)
    return found


@torch.compiler.assume_constant_result  # torch.compile calls it once while tracing
def resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
            head_dim: Optional[int] = None) -> str:
    """The backend that runs ``op`` for tensors on ``device`` (of ``dtype``,
    with head dim ``head_dim``).

    ``backend`` is the caller's argument; ``"auto"`` consults ``SSLOPS_BACKEND``
    and then picks the first usable backend in the op's preference order that
    computes ``dtype`` and supports ``head_dim``.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    source = "backend"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        backend, source = env, ENV_VAR
    usable = backends(op, device, dtype, head_dim)
    if backend == "auto":
        for name in usable:
            if name == "emu" or (name == "triton" and torch.device(device).type == "cpu"):
                continue  # the interpreter and the emulator are test vehicles, never the fast path
            return name
        return "reference"
    if backend not in usable:
        why = ""
        if backend in ("cpu", "cuda") and not compiled_available():
            why = f" (sslops._C failed to import: {_C_ERROR})"
        elif backend == "cuda" and torch.device(device).type == "cuda" and not cuda_built():
            why = " (this install was built without CUDA kernels; reinstall with SSLOPS_CUDA=1)"
        elif (backend == "cuda" and torch.device(device).type == "cuda" and torch.cuda.is_available()
              and not _cuda_covers(torch.device(device))):
            dev = torch.device(device)
            cap = torch.cuda.get_device_capability(dev.index if dev.index is not None else torch.cuda.current_device())
            why = (f" (this build has GPU code for {', '.join(cuda_archs())}, none of which runs on this "
                   f"sm_{cap[0]}{cap[1]} GPU; rebuild with TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\")")
        elif backend == "emu" and not _EMU_LOADED:
            why = " (the CUDA emulator is not loaded: call sslops._emu.load() first, as the emu tests do)"
        elif backend == "emu" and torch.device(device).type != "cpu":
            why = " (the emulated CUDA kernels take CPU tensors)"
        elif dtype is not None and backend in backends(op, device) and backend not in backends(op, device, dtype):
            allowed = supported_dtypes(op, backend, device) or ()
            why = f" (it computes {', '.join(map(_dtype_name, allowed))}; got {_dtype_name(dtype)})"
        elif head_dim is not None and backend in backends(op, device, dtype):
            dims = supported_head_dims(op, backend) or ()
            why = f" (it supports head dims {', '.join(map(str, dims))}; got head dim {head_dim})"
        what = f"{torch.device(device)} tensors" if dtype is None else f"{_dtype_name(dtype)} tensors on {torch.device(device)}"
        raise ValueError(
            f"{source}={backend!r} cannot run {op} on {what}{why}; usable backends here: {usable}"
        )
    return backend

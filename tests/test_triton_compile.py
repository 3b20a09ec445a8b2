"""Compile every Triton kernel for sm_80 and sm_90 as real launches would, without a GPU.

The interpreter (TRITON_INTERPRET=1, how the other tests run Triton here) neither
type-checks Triton programs nor specialises arguments the way a GPU launch does: an
int argument equal to 1 becomes a constexpr, ints divisible by 16 and 16-byte aligned
pointers get divisibility hints, ints beyond int32 become i64.  This test binds each
launch's real arguments with Triton's own binder for a ``GPUTarget`` (meta tensors
stand in for CUDA tensors: their data_ptr() is 0, aligned like a fresh CUDA
allocation) and runs the whole compile pipeline down to a cubin, for each entry of
``REGISTRY`` and each compute capability in ``ARCHS``.  It fails on a compile error,
on a grid beyond CUDA's limits, and on register spills above SMALL_SPILL_BYTES unless
the entry allows them (with a reason); it prints a table of registers, spills, stack and
shared memory.

Adding kernels: write a function ``entries(cap)`` that yields :class:`Entry` values
and add it to ``REGISTRY``.  Build the launches with the launcher's own code where it
has a ``*_launch(es)`` function (``triton_kernels/_common.py``: ``Launch``) and its own
config-choice functions otherwise, over the sizes the tests use (including 1) and
every dtype the backend accepts; identical specialisations are compiled once.

Run directly for the table:  python tests/test_triton_compile.py [--arch 80 90] [--module masking]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

ARCHS = (80, 90)
# Spills up to this many bytes (stores per thread) are reported, not failed: ptxas trades
# a few L1-resident bytes for occupancy (e.g. 8 B to stay at 64 registers with 256
# threads); the spills this test exists for are kilobytes (issue 9 item 11).
SMALL_SPILL_BYTES = 64
F32, F16, BF16, F64 = "float32", "float16", "bfloat16", "float64"


@dataclasses.dataclass
class Entry:
    """One launch to compile: ``launch`` is a triton_kernels._common.Launch (kernel, grid,
    args, kwargs) whose tensors may be meta tensors; ``case`` names the sizes it came from;
    ``spills_ok`` is the reason spills are accepted (empty: a spill fails the test);
    ``variant`` labels a specialisation family of one kernel in the table."""

    launch: object
    case: str
    spills_ok: str = ""
    variant: str = ""  # a label that splits one kernel's rows in the table (e.g. "blur")


# ----------------------------------------------------------------------------------------
# helpers for entries
# ----------------------------------------------------------------------------------------
def meta(*shape, dtype="float32", stride=None, offset=0):
    """A meta tensor (shape, strides, dtype; data_ptr() = 0 + offset * itemsize)."""
    import torch

    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if stride is None and offset == 0:
        return torch.empty(shape, dtype=dt, device="meta")
    if stride is None:
        stride = torch.empty(shape, device="meta").stride()
    span = 1 + offset + sum((n - 1) * s for n, s in zip(shape, stride) if n > 0)
    return torch.empty(span, dtype=dt, device="meta").as_strided(shape, stride, offset)


# ----------------------------------------------------------------------------------------
# masking (triton_kernels/masking.py)
# ----------------------------------------------------------------------------------------
# (B, L, D, K, P): the test shapes (test_masking.py), odd, 1 and 16-divisible sizes
MASKING_SIZES = [(1, 1, 1, 1, 0), (2, 7, 3, 5, 1), (3, 50, 130, 17, 1), (2, 197, 768, 49, 1),
                 (2, 196, 384, 49, 0), (16, 197, 16, 16, 1), (1, 17, 1, 1, 16)]
# every size in fp32; every dtype the backend takes (fp32/fp16/bf16/fp64) at ViT-B and at 1
MASKING_CASES = ([(F32, size, "int64") for size in MASKING_SIZES]
                 + [(dt, size, "int64") for dt in (F16, BF16, F64) for size in (MASKING_SIZES[0], MASKING_SIZES[3])]
                 + [(F32, MASKING_SIZES[1], "int32"), (BF16, MASKING_SIZES[2], "int32")])


def masking_entries(cap):
    from sslops.triton_kernels import masking as tk

    for dtype, (B, L, D, K, P), ids_dt in MASKING_CASES:
        case = f"{dtype} B={B} L={L} D={D} K={K} P={P} ids={ids_dt}"
        x = meta(B, L, D, dtype=dtype)
        ids = meta(B, K, dtype=ids_dt)
        for pos in (None, meta(1, L, D, dtype=dtype), meta(B, L, D, dtype=dtype)):
            yield Entry(tk._gather_launch(x, ids, pos, P, meta(B, P + K, D, dtype=dtype)), case)
        # non-contiguous x: a transposed (L, B, D) buffer
        xt = meta(L, B, D, dtype=dtype).transpose(0, 1)
        yield Entry(tk._gather_launch(xt, ids, None, P, meta(B, P + K, D, dtype=dtype)), case + " x=(L,B,D).T")
        g = meta(B, P + K, D, dtype=dtype)
        yield Entry(tk._scatter_launch(g, ids, L, P, meta(B, L, D, dtype=dtype)), case)
        gt = meta(P + K, B, D, dtype=dtype).transpose(0, 1)
        yield Entry(tk._scatter_launch(gt, ids, L, P, meta(B, L, D, dtype=dtype)), case + " grad=(L,B,D).T")
        N = L - P
        ir = meta(B, N, dtype=ids_dt)
        xv = meta(B, P + min(K, N), D, dtype=dtype)
        for mt in (meta(D, dtype=dtype), meta(1, dtype=dtype).expand(D)):  # an expanded mask token: stride 0
            yield Entry(tk._restore_launch(xv, ir, mt, P, meta(B, L, D, dtype=dtype)), case)
        gr = meta(B, L, D, dtype=dtype)
        partial = meta(B, D, dtype=tk._partial_dtype(gr.dtype))
        yield Entry(tk._restore_backward_launch(gr, ir, min(K, N), P, xv, partial), case)


# ----------------------------------------------------------------------------------------
# augment (triton_kernels/augment.py)
# ----------------------------------------------------------------------------------------
# (B, H, W, images dtype, channels_last images, views per image, size, kernel_size,
#  antialias): the default recipes, the test shapes (test_augment*.py) and size 1
AUGMENT_CASES = [
    (4, 256, 256, "uint8", True, 2, 224, 23, True),     # ImageNet: FFCV's channels_last uint8
    (4, 256, 256, "uint8", False, 1, 224, 23, False),
    (8, 36, 36, "uint8", False, 2, 32, 3, True),        # CIFAR
    (2, 40, 40, "uint8", False, 1, 1, 1, True),         # output size 1
    (1, 7, 5, "uint8", False, 1, 2, 3, True),
    (3, 12, 12, "uint8", False, 1, 9, 17, True),
    (2, 67, 83, "uint8", True, 2, 45, 5, True),
    (2, 30, 26, "uint8", False, 2, 16, 1, True),
    (3, 20, 20, "float32", False, 1, 17, 9, True),
    (2, 20, 20, "float16", False, 1, 12, 23, False),
    (2, 20, 20, "float64", False, 1, 8, 3, True),
    (2, 20, 20, "bfloat16", False, 1, 57, 7, True),
]
AUGMENT_OUT = [(F32, False), (F16, False), (BF16, False), (BF16, True)]  # every output, for cases 0 and 3


def augment_entries(cap):
    import torch

    from sslops.triton_kernels import augment as tk

    cases = [(c, o) for i, c in enumerate(AUGMENT_CASES) for o in (AUGMENT_OUT if i in (0, 3) else AUGMENT_OUT[:1])]
    for (B, H, W, idt, in_cl, V, size, k, aa), (odt, out_cl) in cases:
        case = f"{idt}{' cl' if in_cl else ''} B={B} {H}x{W} V={V} -> {size} k={k} aa={aa} out={odt}" \
               f"{' cl' if out_cl else ''}"
        images = meta(B, H, W, 3, dtype=idt).permute(0, 3, 1, 2) if in_cl else meta(B, 3, H, W, dtype=idt)
        N = B * V
        out = meta(N, size, size, 3, dtype=odt).permute(0, 3, 1, 2) if out_cl else meta(N, 3, size, size, dtype=odt)
        p = dict(crop=meta(N, 4, dtype="int64"), flip=meta(N, dtype="bool"), jitter=meta(N, dtype="bool"),
                 brightness=meta(N), contrast=meta(N), saturation=meta(N), hue=meta(N),
                 order=meta(N, 4, dtype="int64"), grayscale=meta(N, dtype="bool"), blur_sigma=meta(N),
                 solarize=meta(N, dtype="bool"))
        partials = meta(N, tk._n_parts(size, cap))
        for launch in tk._launches(images, **p, size=size, kernel_size=k, antialias=aa,
                                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), out=out,
                                   partials=partials, cap=cap):
            yield Entry(launch, case, variant="blur" if launch.kwargs.get("BLUR") else "")


# ----------------------------------------------------------------------------------------
# nt_xent (triton_kernels/nt_xent.py): its launchers build the arguments inline, so the
# entries repeat that argument list, with the launcher's config choice (_gpu_config).
# ----------------------------------------------------------------------------------------
NT_XENT_DTYPES = (F32, F16, BF16)
# (M, Kc, D): SimCLR (M = Kc = 2N), MoCo (queue), odd, 1 and 16-divisible sizes
NT_XENT_SIZES = [(1, 1, 1), (6, 6, 3), (256, 4096, 128), (130, 513, 130), (64, 64, 256)]
# every dtype at 1 and at SimCLR's D = 128 (contiguous), unaligned at D = 130 (fp32, bf16);
# odd sizes and two D blocks in fp32
NT_XENT_CASES = ([(dt, NT_XENT_SIZES[i], "contiguous") for dt in NT_XENT_DTYPES for i in (0, 2)]
                 + [(dt, NT_XENT_SIZES[3], "unaligned") for dt in (F32, BF16)]
                 + [(F32, NT_XENT_SIZES[i], "contiguous") for i in (1, 4)])


def nt_xent_entries(cap):
    import torch

    from sslops.triton_kernels import nt_xent as tk

    sig = inspect.signature(tk._gpu_config).parameters
    per_cap = {"capability": cap} if "capability" in sig else {}  # configs per compute capability

    def cfg(kind, dtype, D, aligned):
        return tk._gpu_config(kind, getattr(torch, dtype), D, aligned, **per_cap)

    for dtype, (M, Kc, D), layout in NT_XENT_CASES:
        case = f"{dtype} M={M} Kc={Kc} D={D} {layout}"
        if layout == "contiguous":
            q, c = meta(M, D, dtype=dtype), meta(Kc, D, dtype=dtype)
        else:  # a column slice: row stride D + 1, a pointer off 16-byte alignment
            q = meta(M, D, dtype=dtype, stride=(D + 1, 1), offset=1)
            c = meta(Kc, D, dtype=dtype, stride=(D + 1, 1), offset=1)
        aligned = tk._aligned(q, c)
        prec = tk._precision(q.dtype)
        spills = ""  # for the backward kernels
        lse = meta(M)
        excl = meta(M, dtype="int64")
        for has_excl in (False, True):
            ex = excl if has_excl else lse
            f = cfg("fwd", dtype, D, aligned)
            yield Entry(_launch(tk._nt_xent_lse_fwd_kernel, (triton_cdiv(M, f.BLOCK_M),),
                                (q, c, ex, lse, M, Kc, D, 2.0, q.stride(0), q.stride(1), c.stride(0), c.stride(1),
                                 ex.stride(0), lse.stride(0)),
                                dict(HAS_EXCLUDE=has_excl, SINGLE_D=D <= f.BLOCK_D, PRECISION=prec,
                                     BLOCK_M=f.BLOCK_M, BLOCK_N=f.BLOCK_N, BLOCK_D=f.BLOCK_D,
                                     num_warps=f.num_warps, num_stages=f.num_stages)), case)
            b = cfg("bwd", dtype, D, aligned)
            n_dblk = triton_cdiv(D, b.BLOCK_D)
            has_scale = dtype == F16  # fp16 weights are scaled (tk._grad_scale)
            sc = meta(1) if has_scale else lse
            common = dict(HAS_SCALE=has_scale, HAS_EXCLUDE=has_excl, SINGLE_D=n_dblk == 1, PRECISION=prec, BLOCK_M=b.BLOCK_M,
                          BLOCK_N=b.BLOCK_N, BLOCK_D=b.BLOCK_D, num_warps=b.num_warps, num_stages=b.num_stages)
            g = meta(M)
            strides_in = (g.stride(0), q.stride(0), q.stride(1), c.stride(0), c.stride(1), ex.stride(0),
                          lse.stride(0))
            dq, dc = meta(M, D, dtype=dtype), meta(Kc, D, dtype=dtype)
            yield Entry(_launch(tk._nt_xent_bwd_dq_kernel, (triton_cdiv(M, b.BLOCK_M), n_dblk),
                                (g, q, c, ex, lse, dq, sc, M, Kc, D, 2.0, *strides_in, dq.stride(0), dq.stride(1)),
                                common), case, spills)
            yield Entry(_launch(tk._nt_xent_bwd_dc_kernel, (triton_cdiv(Kc, b.BLOCK_N), n_dblk),
                                (g, q, c, ex, lse, dc, sc, M, Kc, D, 2.0, *strides_in, dc.stride(0), dc.stride(1)),
                                common), case, spills)
        b = cfg("bwd", dtype, D, tk._aligned(q))
        n_dblk = triton_cdiv(D, b.BLOCK_D)
        dz = meta(M, D, dtype=dtype)
        has_scale = dtype == F16
        sc = meta(1) if has_scale else lse
        yield Entry(_launch(tk._nt_xent_bwd_sym_kernel, (triton_cdiv(M, b.BLOCK_M), n_dblk),
                            (meta(M), q, lse, dz, sc, M, D, 2.0, 1, q.stride(0), q.stride(1), 1, dz.stride(0),
                             dz.stride(1)),
                            dict(HAS_SCALE=has_scale, SINGLE_D=n_dblk == 1, PRECISION=prec, BLOCK_M=b.BLOCK_M, BLOCK_N=b.BLOCK_N,
                                 BLOCK_D=b.BLOCK_D, num_warps=b.num_warps, num_stages=b.num_stages)),
                    case, spills)


# ----------------------------------------------------------------------------------------
# sup_con (triton_kernels/sup_con.py): its *_launch functions, with meta tensors
# ----------------------------------------------------------------------------------------
SUP_CON_DTYPES = (F32, F16)  # what the backend accepts (sslops/sup_con.py _TRITON_DTYPES)
# (N = B V, D): 1, odd, SimCLR / SupCon sizes (B = 1024, V = 4), two D blocks
SUP_CON_SIZES = [(1, 1), (6, 3), (4096, 128), (130, 130), (64, 256)]
SUP_CON_CASES = ([(dt, SUP_CON_SIZES[i], "contiguous") for dt in SUP_CON_DTYPES for i in (0, 2)]
                 + [(dt, SUP_CON_SIZES[3], "unaligned") for dt in SUP_CON_DTYPES]
                 + [(F32, SUP_CON_SIZES[i], "contiguous") for i in (1, 4)])


def sup_con_entries(cap):
    import torch

    from sslops.triton_kernels import sup_con as tk

    for dtype, (N, D), layout in SUP_CON_CASES:
        case = f"{dtype} N={N} D={D} {layout}"
        z = meta(N, D, dtype=dtype) if layout == "contiguous" else meta(N, D, dtype=dtype, stride=(D + 1, 1), offset=1)
        labels, stats = meta(N, dtype="int64"), meta(4, N)
        yield Entry(tk._fwd_launch(z, labels, stats, 2.0, cap), case)
        scale = meta(1) if dtype == F16 else None
        yield Entry(tk._bwd_launch(meta(4, N), z, labels, stats, meta(N, D, dtype=dtype), scale, 2.0, cap), case)


def triton_cdiv(a, b):
    return (a + b - 1) // b


def _launch(kernel, grid, args, kwargs):
    from sslops.triton_kernels._common import Launch

    return Launch(kernel, grid, args, kwargs)


# module -> entries(cap); cap is the (major, minor) compute capability the launches target
REGISTRY: Dict[str, Callable[[Tuple[int, int]], Iterable[Entry]]] = {
    "masking": masking_entries,
    "augment": augment_entries,
    "nt_xent": nt_xent_entries,
    "sup_con": sup_con_entries,
}


# ----------------------------------------------------------------------------------------
# the compile driver (runs without TRITON_INTERPRET, in a subprocess of the test)
# ----------------------------------------------------------------------------------------
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _specialise(launch, backend):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run binds them."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    return fn._pack_args(backend, dict(launch.kwargs), bound, specialization, options)


def compile_all(arch: int, modules: Optional[List[str]] = None) -> List[dict]:
    """Compile every distinct specialisation of the registry for sm_<arch>; one row per
    distinct (kernel, specialisation) with the number of entries that share it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    from sslops.triton_kernels._common import MAX_GRID

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    cap = (arch // 10, arch % 10)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output: registers, spills, stack
    rows: Dict[str, dict] = {}
    for module in modules or list(REGISTRY):
        for entry in REGISTRY[module](cap):
            launch = entry.launch
            name = launch.kernel.__name__
            bad_grid = [f"grid {tuple(launch.grid)} exceeds CUDA's limits {MAX_GRID}"] \
                if any(n > m for n, m in zip(launch.grid, MAX_GRID)) else []
            try:
                options, signature, constexprs, attrs = _specialise(launch, backend)
                key = json.dumps([module, name, signature, repr(sorted(constexprs.items())),
                                  repr(sorted(attrs.items())), repr(sorted(options.__dict__.items()))])
            except Exception as exc:  # a launch Triton's binder rejects
                key, options = json.dumps([module, name, entry.case]), None
                bad_grid.append(f"binding failed: {type(exc).__name__}: {exc}")
            row = rows.get(key)
            if row is None:
                label = f"{name}[{entry.variant}]" if entry.variant else name
                row = rows[key] = dict(module=module, kernel=label, arch=arch, case=entry.case, entries=0,
                                       errors=[], spills_ok=entry.spills_ok, regs=None, spill_stores=None,
                                       spill_loads=None, stack=None, shared=None,
                                       num_warps=getattr(options, "num_warps", None), seconds=0.0)
                if options is not None:
                    t0 = time.perf_counter()
                    log = io.StringIO()
                    try:
                        with contextlib.redirect_stdout(log):
                            kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                                    target=target, options=options.__dict__)
                        row["shared"] = kernel.metadata.shared
                    except Exception as exc:
                        msg = str(exc).strip().splitlines()
                        row["errors"].append(f"{type(exc).__name__}: " + " | ".join(msg[-8:]))
                    row["seconds"] = round(time.perf_counter() - t0, 2)
                    text = log.getvalue()
                    regs = _PTXAS_REGS.findall(text)
                    spill = _PTXAS_SPILL.findall(text)
                    if regs:
                        row["regs"] = int(regs[-1])
                    if spill:
                        row["stack"], row["spill_stores"], row["spill_loads"] = map(int, spill[-1])
                    elif not row["errors"]:
                        row["errors"].append("no ptxas report (was the kernel served from a cache?)")
            row["entries"] += 1
            for err in bad_grid:  # once per kernel specialisation, with the first case that hit it
                if not any(e.startswith(err) for e in row["errors"]):
                    row["errors"].append(f"{err} ({entry.case})")
            if entry.spills_ok and not row["spills_ok"]:
                row["spills_ok"] = entry.spills_ok
    return list(rows.values())


def failures(rows: List[dict]) -> List[str]:
    out = []
    for r in rows:
        where = f"{r['module']}.{r['kernel']} sm_{r['arch']} [{r['case']}]"
        out += [f"{where}: {e}" for e in r["errors"]]
        if (r["spill_stores"] or 0) > SMALL_SPILL_BYTES and not r["spills_ok"]:
            out.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
                       f"({r['regs']} registers)")
    return out


def table(rows: List[dict]) -> str:
    """Per kernel and arch: the worst specialisation (most spills, then registers)."""
    lines = [f"{'kernel':42s} {'arch':5s} {'specs':>5s} {'regs':>5s} {'spill st/ld B':>14s} {'stack':>6s} "
             f"{'smem':>7s} {'warps':>5s} {'s':>6s}  worst case / note"]
    groups: Dict[Tuple[str, str, int], List[dict]] = {}
    for r in rows:
        groups.setdefault((r["module"], r["kernel"], r["arch"]), []).append(r)
    for (module, kernel, arch), rs in sorted(groups.items()):
        worst = max(rs, key=lambda r: (bool(r["errors"]), r["spill_stores"] or 0, r["regs"] or 0))
        secs = sum(r["seconds"] for r in rs)
        note = worst["case"]
        if worst["errors"]:
            note = "ERROR " + worst["errors"][0][:150]
        elif worst["spill_stores"] and worst["spills_ok"]:
            note += f"  (spills allowed: {worst['spills_ok']})"
        elif worst["spill_stores"]:
            note += f"  (<= {SMALL_SPILL_BYTES} B: small, allowed)"
        spills = "-" if worst["spill_stores"] is None else f"{worst['spill_stores']}/{worst['spill_loads']}"
        lines.append(f"{module + '.' + kernel:42s} sm_{arch:<2d} {len(rs):5d} {worst['regs'] or '-':>5} "
                     f"{spills:>14s} {worst['stack'] if worst['stack'] is not None else '-':>6} "
                     f"{worst['shared'] if worst['shared'] is not None else '-':>7} "
                     f"{worst['num_warps'] or '-':>5} {secs:6.1f}  {note}")
    stale = sorted({f"{module}.{kernel} sm_{arch}" for (module, kernel, arch), rs in groups.items()
                    if any(r["spills_ok"] for r in rs) and not any(r["errors"] for r in rs)
                    and all((r["spill_stores"] or 0) <= SMALL_SPILL_BYTES for r in rs if r["spills_ok"])})
    if stale:
        lines.append("spills allowed but none seen (drop the allowance): " + ", ".join(stale))
    return "\n".join(lines)


def _run_driver(archs, modules, timeout):
    """Compile in subprocesses (one per arch, in parallel) without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            arch_env = dict(env, TRITON_CACHE_DIR=os.path.join(tmp, f"cache{arch}"))
            cmd = [sys.executable, os.path.abspath(__file__), "--json", "--arch", str(arch)]
            if modules:
                cmd += ["--module", *modules]
            procs.append((arch, subprocess.Popen(cmd, env=arch_env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)))
        rows, errors = [], []
        for arch, p in procs:
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                errors.append(f"sm_{arch}: timed out after {timeout} s")
            if p.returncode != 0:
                errors.append(f"sm_{arch}: driver exited {p.returncode}:\n{err[-4000:]}")
                continue
            rows += json.loads(out.strip().splitlines()[-1])
    return rows, errors


def test_triton_kernels_compile_for_sm80_and_sm90():
    import pytest

    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:  # pragma: no cover - Triton moved its compiler API
        pytest.fail("this Triton has no triton.compiler.ASTSource / GPUTarget: update the compile test")
    rows, errors = _run_driver(ARCHS, None, timeout=1500)
    report = table(rows)
    print("\n" + report)
    assert not errors, "\n".join(errors)
    bad = failures(rows)
    assert not bad, "\n".join(bad[:40]) + f"\n({len(bad)} problems)\n\n" + report
    kernels = {(r["module"], r["kernel"]) for r in rows}
    assert len(kernels) >= 11, f"expected every registered kernel, compiled {sorted(kernels)}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--module", nargs="+", choices=list(REGISTRY))
    ap.add_argument("--json", action="store_true", help="(driver) compile in this process, print rows as JSON")
    args = ap.parse_args(argv)
    if args.json:
        assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
        rows = []
        for arch in args.arch:
            rows += compile_all(arch, args.module)
        sys.stdout.flush()
        print(json.dumps(rows))
        return 0
    rows, errors = _run_driver(args.arch, args.module, timeout=3000)
    print(table(rows))
    bad = errors + failures(rows)
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Triton attention kernels (triton_kernels/attention.py) against float64 math.

Without a GPU they run in the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py; fp32 and fp16 there, small shapes); with a GPU and the
interpreter off they run on CUDA.  A real compile for sm_80 and sm_90 in fp16,
bf16 and fp32 (what the interpreter skips: constexpr specialisation of ints
equal to 1, dtype checks, layouts) runs in a subprocess without the interpreter:
test_kernels_compile_for_sm80_and_sm90.
"""
import os

if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # torch missing: skipped below
        pass

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import sslops  # noqa: E402
from sslops import reference  # noqa: E402
from sslops.triton_kernels import attention as tk  # noqa: E402

try:
    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(tk._attn_fwd_kernel, InterpretedFunction)
except ImportError:  # pragma: no cover
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 set before triton kernels are first imported",
                allow_module_level=True)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _qkv(B, H, Lq, Lk, D, seed=0):
    g = _gen(seed)
    return tuple(torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))


def _close(actual, expected, what, tol):
    size = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=tol, atol=tol * size,
                               msg=lambda m: f"{what}: {m}")


def _check(fn, ref_fn, inputs, up, dtype=torch.float32, tol=3e-5, what=""):
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, up.to(DEVICE, dtype))
    ref_leaves = [x.clone().requires_grad_() for x in inputs]
    ref = ref_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, up)
    assert out.dtype == dtype
    _close(out, ref, f"{what} out", tol)
    for name, a, b in zip("qkv", grads, ref_grads):
        _close(a, b, f"{what} d{name}", tol)


def _dense(causal, scale=None):
    return lambda q, k, v: sslops.attention(q, k, v, scale=scale, causal=causal, backend="triton")


def _math(causal, scale=None):
    return lambda q, k, v: reference.attention(q, k, v, scale, causal)


# ----------------------------------------------------------------------------------------
# Values and gradients (interpreter blocks: 32 x 64 forward, 64 x 32 dk/dv, 32 x 64 dq,
# so these lengths span one to several ragged tiles in every pass)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [1, 2, 17, 37, 63, 64, 65, 130])
def test_lengths(causal, L):
    inputs = _qkv(1, 2, L, L, 32, seed=L)
    up = torch.randn(1, 2, L, 32, generator=_gen(L), dtype=torch.float64)
    _check(_dense(causal), _math(causal), inputs, up, what=f"L={L} causal={causal}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [16, 64, 80, 96, 128])
def test_head_dims(causal, D):
    inputs = _qkv(1, 1, 50, 50, D, seed=D)
    up = torch.randn(1, 1, 50, D, generator=_gen(D), dtype=torch.float64)
    _check(_dense(causal), _math(causal), inputs, up, what=f"D={D}")


def test_vit_length_197():
    inputs = _qkv(1, 1, 197, 197, 64, seed=197)
    up = torch.randn(1, 1, 197, 64, generator=_gen(1), dtype=torch.float64)
    _check(_dense(False), _math(False), inputs, up, what="L=197")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(1, 17), (17, 1), (50, 33), (33, 70)])
def test_lq_differs_from_lk(causal, lq, lk):
    inputs = _qkv(2, 1, lq, lk, 32, seed=lq * lk)
    up = torch.randn(2, 1, lq, 32, generator=_gen(lq), dtype=torch.float64)
    _check(_dense(causal), _math(causal), inputs, up, what=f"Lq={lq} Lk={lk}")


def test_scale_and_large_logits():
    q, k, v = _qkv(1, 1, 40, 40, 32, seed=5)
    up = torch.randn(1, 1, 40, 32, generator=_gen(5), dtype=torch.float64)
    for scale in (1.0, 0.0, -0.7):
        _check(_dense(True, scale), _math(True, scale), (q * 2, k * 2, v), up, tol=2e-4, what=f"scale={scale}")


@pytest.mark.parametrize("causal", [False, True])
def test_slices_of_packed_qkv(causal):
    B, L, H, D = 2, 37, 2, 32
    qkv = torch.randn(B, L, 3, H, D, generator=_gen(7), dtype=torch.float64)
    up = torch.randn(B, L, H * D, generator=_gen(8), dtype=torch.float64)
    x = qkv.reshape(B, L, 3 * H * D)
    out_leaf = x.to(DEVICE, torch.float32).requires_grad_()
    out = sslops.attention_qkvpacked(out_leaf, H, causal=causal, backend="triton")
    (g,) = torch.autograd.grad(out, out_leaf, up.to(DEVICE, torch.float32))
    ref_leaf = x.clone().requires_grad_()
    q, k, v = ref_leaf.reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    ref = reference.attention(q, k, v, None, causal).transpose(1, 2).reshape(B, L, H * D)
    (rg,) = torch.autograd.grad(ref, ref_leaf, up)
    assert out.is_contiguous()
    _close(out, ref, "packed out", 3e-5)
    _close(g, rg, "packed dqkv", 3e-5)


def test_odd_strides():
    q, k, v = _qkv(2, 2, 19, 19, 16, seed=9)
    up = torch.randn(2, 2, 19, 16, generator=_gen(9), dtype=torch.float64)
    cases = {
        "D not unit stride": (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v),
        "expanded batch": (q, k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)),
    }
    for what, inputs in cases.items():
        # .to() keeps the strides of a non-contiguous CPU tensor on the CPU path
        _check(_dense(True), _math(True), inputs, up, what=what)


def _varlen(lens_q, lens_k, H=2, D=16, seed=0):
    g = _gen(seed)
    cu = [torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32) for lens in (lens_q, lens_k)]
    tq, tk_ = int(cu[0][-1]), int(cu[1][-1])
    q = torch.randn(tq, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(tk_, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(tk_, H, D, generator=g, dtype=torch.float64)
    up = torch.randn(tq, H, D, generator=g, dtype=torch.float64)
    return q, k, v, cu[0], cu[1], up


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_q,lens_k", [([37, 37, 9, 9, 9], [37, 37, 9, 9, 9]),
                                           ([5, 0, 17, 1, 70], [9, 4, 17, 0, 33])])
def test_varlen(causal, lens_q, lens_k):
    q, k, v, cu_q, cu_k, up = _varlen(lens_q, lens_k, seed=len(lens_q))
    dq, dk = cu_q.to(DEVICE), cu_k.to(DEVICE)
    _check(lambda a, b, c: sslops.attention_varlen(a, b, c, dq, dk, causal=causal, backend="triton"),
           lambda a, b, c: reference.attention_varlen(a, b, c, cu_q, cu_k, None, causal), (q, k, v), up,
           what=f"varlen {lens_q}")


@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_inputs_as_math(causal):
    """As tests/test_attention.py's test of the C++ kernels: NaN / inf land where
    float64 math puts them (gradients compared without the causal mask only), and a
    row whose scores are all -inf gives 0 as SDPA does."""
    import math

    for val in (math.nan, math.inf, -math.inf):
        for which in range(3):
            inputs = list(_qkv(1, 2, 6, 7, 16, seed=11))
            inputs[which][0, 0, 2, 3] = val
            if which == 0 and val == -math.inf:
                inputs[1][0, 0, :, 3] = inputs[1][0, 0, :, 3].abs() + 0.5
            leaves = [x.to(DEVICE, torch.float32).requires_grad_() for x in inputs]
            ref_leaves = [x.clone().requires_grad_() for x in inputs]
            up = torch.randn(1, 2, 6, 16, generator=_gen(12), dtype=torch.float64)
            out, ref = _dense(causal)(*leaves), _math(causal)(*ref_leaves)
            pairs = [("out", out, ref)]
            if not causal:
                grads = torch.autograd.grad(out, leaves, up.to(DEVICE, torch.float32))
                pairs += zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_leaves, up))
            for name, a, e in pairs:
                a, what = a.detach().double().cpu(), f"{val} in {'qkv'[which]} causal={causal} {name}"
                for kind in ("isnan", "isposinf", "isneginf"):
                    assert torch.equal(getattr(a, kind)(), getattr(e, kind)()), f"{what}: {kind} positions differ"
                _close(a[e.isfinite()], e[e.isfinite()], what, 3e-5)
            if which == 0 and val == -math.inf:
                assert torch.equal(out[0, 0, 2].cpu(), torch.zeros(16)), "an all -inf row is not 0"


def test_float16():
    inputs = _qkv(1, 2, 40, 40, 32, seed=11)
    up = torch.randn(1, 2, 40, 32, generator=_gen(11), dtype=torch.float64)
    _check(_dense(True), _math(True), inputs, up, dtype=torch.float16, tol=3e-2, what="fp16")


def test_backward_is_deterministic():
    q, k, v = (t.to(DEVICE, torch.float32).requires_grad_() for t in _qkv(1, 2, 70, 70, 32, seed=12))
    up = torch.randn(1, 2, 70, 32, generator=_gen(12)).to(DEVICE)
    runs = [torch.autograd.grad(sslops.attention(q, k, v, causal=True, backend="triton"), (q, k, v), up)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_output_layout_contract():
    q, k, v = (t.to(DEVICE, torch.float32) for t in _qkv(2, 3, 17, 9, 16, seed=13))
    out, lse = torch.ops.sslops.attention_fwd_triton(q, k, v, None, None, 17, 9, 0.25, False)
    assert out.shape == (2, 3, 17, 16) and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 3, 17) and lse.dtype == torch.float32 and lse.is_contiguous()
    torch.testing.assert_close(lse.double().cpu(), reference.attention_lse(q.double().cpu(), k.double().cpu(), 0.25),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------
def test_opcheck_triton_ops():
    q, k, v = (t.to(DEVICE, torch.float32).requires_grad_() for t in _qkv(1, 2, 17, 9, 16, seed=14))
    qv, kv, vv, cu_q, cu_k, _ = _varlen([5, 0, 12], [3, 4, 9])
    qv, kv, vv = (t.to(DEVICE, torch.float32).requires_grad_() for t in (qv, kv, vv))
    cu_q, cu_k = cu_q.to(DEVICE), cu_k.to(DEVICE)
    for args in ((q, k, v, None, None, 17, 9, 0.25, True), (qv, kv, vv, cu_q, cu_k, 12, 9, 0.25, False)):
        torch.library.opcheck(torch.ops.sslops.attention_fwd_triton.default, args)
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out, lse = torch.ops.sslops.attention_fwd_triton(*detached)
        a, b, c, cq, ck, mq, mk, scale, causal = detached
        torch.library.opcheck(torch.ops.sslops.attention_bwd_triton.default,
                              (torch.randn_like(out), a, b, c, out, lse, cq, ck, mq, mk, scale, causal))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    B, L, H, D = 1, 21, 2, 16
    x = torch.randn(B, L, 3 * H * D, generator=_gen(15)).to(DEVICE).requires_grad_()

    def step(x):
        return sslops.attention_qkvpacked(x, H, causal=True, backend="triton").square().sum()

    want = step(x)
    (want_g,) = torch.autograd.grad(want, x)
    got = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")(x)
    (got_g,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_g, want_g)


# ----------------------------------------------------------------------------------------
# Real compiles for sm_80 / sm_90 (no GPU needed; the interpreter skips these checks)
# ----------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent(r"""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    from sslops.triton_kernels import attention as tk

    # Capture the launches the launchers make (GPU block sizes for the target),
    # then compile each exactly as a launch would: the JIT's own binder makes the
    # specialisation (ints equal to 1 become constexprs, 16-divisible ints and
    # aligned pointers get their attributes) from the real arguments.
    captured = []

    class Capture:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: captured.append((self.fn, args, kw))

    for name in ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        setattr(tk, name, Capture(getattr(tk, name)))

    def compile_launch(jit, args, kw, cap):
        target = GPUTarget("cuda", cap, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, spec, options = binder(*args, **kw)
        options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, options)
        return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)

    import re, subprocess, tempfile
    import triton.backends.nvidia.compiler as nv

    cuobjdump = os.path.join(os.path.dirname(nv.get_ptxas(90).path), "cuobjdump")  # shipped with triton

    def resources(kernel):
        # 'REG:n LOCAL:n' of the cubin (LOCAL > 0: register spills), or '' without cuobjdump
        if not os.path.exists(cuobjdump):
            return ""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        return " ".join(re.findall(r"REG:\d+|LOCAL:\d+", out))

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    n = 0
    for cap in (80, 90):
        tk._config = lambda kind, t, D, max_len, cap=cap: tk._gpu_config(kind, t.dtype, D, max_len, divmod(cap, 10))
        for dname, dt in dtypes.items():
            for D, L, varlen, causal in ((64, 197, False, False), (128, 1024, False, True), (80, 257, True, True)):
                captured.clear()
                if varlen:
                    cu = torch.tensor([0, L, 2 * L], dtype=torch.int32)
                    q = torch.randn(2 * L, 3, D).to(dt)
                    qkv = (q, q, q, cu, cu, L, L)
                else:
                    x = torch.randn(2, L, 3, 3, D).to(dt)  # slices of a packed qkv: strides like timm's
                    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
                    qkv = (q, k, v, None, None, L, L)
                out, lse = tk.attention_fwd(*qkv, 0.125, causal)
                out = torch.empty_like(qkv[0]) if varlen else torch.empty(2, L, 3, D, dtype=dt).transpose(1, 2)
                lse = torch.empty(3, 2 * L) if varlen else torch.empty(2, 3, L)
                tk.attention_bwd(out, qkv[0], qkv[1], qkv[2], out, lse, *qkv[3:], 0.125, causal)
                for jit, args, kw in captured:
                    kernel = compile_launch(jit, args, kw, cap)
                    n += 1
                    print(f"sm_{cap} {dname} D={D} L={L} varlen={varlen} causal={causal} {jit.__name__}: "
                          f"shared {kernel.metadata.shared} B {resources(kernel)}", flush=True)
    print(f"compiled {n} kernels")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="Triton compiles for CUDA on Linux")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels for real (this is the CPU-CI stand-in)")
def test_kernels_compile_for_sm80_and_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled 72 kernels" in proc.stdout, proc.stdout[-2000:]
    # shared memory within each architecture's per-block limit (sm_80: 163 KB, sm_90: 227 KB),
    # and no register spills (local memory) where cuobjdump can tell
    for line in proc.stdout.splitlines():
        if "shared" in line:
            used = int(line.split("shared ")[1].split()[0])
            assert used <= (163 if line.startswith("sm_80") else 227) * 1024, line
            assert "LOCAL:" not in line or "LOCAL:0" in line, f"register spills: {line}"

"""sslops.attention / attention_qkvpacked / attention_varlen against float64
math attention, on the CPU backends (cpu, reference; the Triton kernels in the
interpreter are in tests/test_attention_triton.py), plus the GPU cases (marked
``cuda``) written over a backend parameter, and sslops.nn.Attention / patch_timm.

Grid (CI time): the issue's full L list on cpu + reference at D = 64, causal
and not; a head-dim sweep at L in {17, 197, 257}; Lq != Lk; long sequences
that take the multi-tile and split-backward paths.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sslops
from sslops import _backend, reference

CPU_BACKENDS = [b for b in sslops.backends("attention", "cpu") if b != "triton"]  # cpu, reference
COMPILED = _backend.compiled_available()
GPU = torch.cuda.is_available()
LS = [1, 2, 17, 37, 49, 50, 63, 64, 65, 127, 128, 129, 196, 197, 256, 257, 320]


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _qkv(B, H, Lq, Lk, D, seed=0, scale=1.0):
    g = _gen(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64)
    return q, k, v


def _grads(fn, inputs, upstream, dtype):
    """fn's output and input gradients for leaves cast to dtype, upstream grad given."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return out.detach(), grads


def _oracle(fn, inputs, upstream):
    return _grads(fn, inputs, upstream, torch.float64)


def _close(actual, expected, what, tol=3e-5):
    """fp32 attention: errors ~1e-6 of the magnitudes involved; bugs give O(1)."""
    assert actual.shape == expected.shape, what
    size = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * size, msg=lambda m: f"{what}: {m}")


def _check(fn, ref_fn, inputs, upstream, dtype=torch.float32, tol=3e-5, what=""):
    out, grads = _grads(fn, inputs, upstream, dtype)
    ref_out, ref_grads = _oracle(ref_fn, inputs, upstream)
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    _close(out, ref_out, f"{what} out", tol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        _close(g, rg, f"{what} d{name}", tol)


def _dense(backend, causal, scale=None):
    return lambda q, k, v: sslops.attention(q, k, v, scale=scale, causal=causal, backend=backend)


def _math(causal, scale=None):
    return lambda q, k, v: reference.attention(q, k, v, scale, causal)


# ----------------------------------------------------------------------------------------
# The reference itself (oracle of everything below) against torch's math SDPA
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(17, 17), (5, 9), (9, 5)])
def test_reference_matches_sdpa_math(causal, lq, lk):
    q, k, v = _qkv(2, 3, lq, lk, 16, seed=lq * lk)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # float64: the math backend
    torch.testing.assert_close(reference.attention(q, k, v, None, causal), want, rtol=1e-12, atol=1e-12)
    lse = torch.logsumexp((q @ k.transpose(-2, -1) / 4).masked_fill(
        ~reference.causal_mask(lq, lk) if causal else torch.zeros(lq, lk, dtype=torch.bool), float("-inf")), -1)
    torch.testing.assert_close(reference.attention_lse(q, k, None, causal), lse)


def test_reference_softmax_by_hand():
    """An independent transcription for one row (no shared code with reference.py)."""
    q, k, v = _qkv(1, 1, 3, 4, 2, seed=1)
    s = [sum(q[0, 0, 2, d] * k[0, 0, j, d] for d in range(2)) / math.sqrt(2) for j in range(3)]  # causal: keys 0..2
    w = [math.exp(x) for x in s]
    row = sum(w[j] / sum(w) * v[0, 0, j] for j in range(3))
    torch.testing.assert_close(reference.attention(q, k, v, None, True)[0, 0, 2], row)


# ----------------------------------------------------------------------------------------
# Values and gradients against float64 math
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", LS)
def test_lengths_d64(backend, causal, L):
    inputs = _qkv(1, 2, L, L, 64, seed=L)
    up = torch.randn(1, 2, L, 64, generator=_gen(L + 1), dtype=torch.float64)
    _check(_dense(backend, causal), _math(causal), inputs, up, what=f"{backend} L={L} causal={causal}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [17, 197, 257])
@pytest.mark.parametrize("D", [16, 32, 80, 96, 128])
def test_head_dims(backend, causal, L, D):
    inputs = _qkv(1, 2, L, L, D, seed=D + L)
    up = torch.randn(1, 2, L, D, generator=_gen(D), dtype=torch.float64)
    _check(_dense(backend, causal), _math(causal), inputs, up, what=f"{backend} D={D} L={L}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(1, 17), (17, 1), (50, 197), (197, 50), (130, 600), (600, 130)])
def test_lq_differs_from_lk(backend, causal, lq, lk):
    inputs = _qkv(2, 1, lq, lk, 32, seed=lq + 7 * lk)
    up = torch.randn(2, 1, lq, 32, generator=_gen(lq), dtype=torch.float64)
    _check(_dense(backend, causal), _math(causal), inputs, up, what=f"{backend} Lq={lq} Lk={lk}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_causal_is_sdpa_top_left(backend, causal):
    """Lq != Lk: the mask is SDPA's is_causal (top-left), checked against torch itself."""
    q, k, v = _qkv(1, 2, 9, 23, 16, seed=3)
    got = sslops.attention(q.float(), k.float(), v.float(), causal=causal, backend=backend)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    _close(got, want, "vs SDPA")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,H,L", [(1, 1, 1100), (2, 3, 600), (16, 2, 300)])
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_take_every_tile_path(backend, B, H, L, causal):
    # (1, 1, 1100): several key tiles forward, a split backward (fewer pairs than threads);
    # (2, 3, 600) and (16, 2, 300): several tiles, one task per (b, h).
    if backend == "reference" and L > 600:
        pytest.skip("materialising reference: the cpu case is the point here")
    inputs = _qkv(B, H, L, L, 32, seed=L)
    up = torch.randn(B, H, L, 32, generator=_gen(B), dtype=torch.float64)
    _check(_dense(backend, causal), _math(causal), inputs, up, what=f"{backend} B={B} H={H} L={L}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scale_and_large_logits(backend):
    # |s| ~ 8 * 64 / 8 * 3: exp overflows without the running max.
    inputs = _qkv(1, 2, 65, 65, 64, seed=9, scale=3.0)
    up = torch.randn(1, 2, 65, 64, generator=_gen(2), dtype=torch.float64)
    for scale in (None, 0.5, 0.0, -0.3):
        _check(_dense(backend, True, scale), _math(True, scale), inputs, up, tol=2e-4, what=f"scale={scale}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_is_exact(backend):
    inputs = _qkv(2, 2, 37, 50, 24, seed=4)
    up = torch.randn(2, 2, 37, 24, generator=_gen(5), dtype=torch.float64)
    _check(_dense(backend, True), _math(True), inputs, up, dtype=torch.float64, tol=1e-12, what="fp64")


# Non-finite inputs: the output has NaN / inf where float64 math has them and the
# same values elsewhere; a row whose scores are all -inf gives 0, as SDPA's softmax
# (torch's _safe_softmax) does.  Without a causal mask the gradients match too, NaN
# and inf positions included (a NaN row used to leave lse = -inf, "no key", so its
# p was 0 in the backward and dv came out finite where math gives NaN).  With a
# causal mask the gradient's NaN pattern differs between SDPA and math themselves
# (masked entries of a NaN row), so only the output is compared there.
NON_FINITE = [(val, which) for val in (math.nan, math.inf, -math.inf) for which in "qkv"]


def _non_finite_inputs(val, which, dtype=torch.float64):
    q, k, v = _qkv(1, 2, 6, 7, 16, seed=11)
    {"q": q, "k": k, "v": v}[which][0, 0, 2, 3] = val
    if which == "q" and val == -math.inf:  # row 2's scores all -inf (both masks)
        k[0, 0, :, 3] = k[0, 0, :, 3].abs() + 0.5
    return [t.to(dtype) for t in (q, k, v)]


def _same_special_values(actual, expected, what, tol):
    a, e = actual.double(), expected.double()
    for kind in ("isnan", "isposinf", "isneginf"):
        assert torch.equal(getattr(a, kind)(), getattr(e, kind)()), f"{what}: {kind} positions differ"
    finite = e.isfinite()
    _close(a[finite], e[finite], what, tol)


def _check_non_finite(backend, causal, val, which, dtype=torch.float64, tol=1e-10):
    inputs = _non_finite_inputs(val, which, dtype)
    up = torch.randn(1, 2, 6, 16, generator=_gen(12), dtype=torch.float64)
    out, grads = _grads(_dense(backend, causal), inputs, up, dtype)
    ref_out, ref_grads = _oracle(_math(causal), inputs, up)
    what = f"{backend} {val} in {which} causal={causal}"
    _same_special_values(out, ref_out, f"{what} out", tol)
    if which == "q" and val == -math.inf:
        assert torch.equal(out[0, 0, 2], torch.zeros_like(out[0, 0, 2])), f"{what}: all -inf row is not 0"
        sd = F.scaled_dot_product_attention(*inputs, is_causal=causal)
        assert torch.equal(sd[0, 0, 2], out[0, 0, 2]), f"{what}: SDPA's all -inf row differs"
    if not causal:
        for name, g, rg in zip("qkv", grads, ref_grads):
            _same_special_values(g, rg, f"{what} d{name}", tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("val,which", NON_FINITE)
def test_non_finite_inputs_as_math(backend, causal, val, which):
    _check_non_finite(backend, causal, val, which)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    inputs = _qkv(1, 2, 37, 37, 32, seed=6)
    up = torch.randn(1, 2, 37, 32, generator=_gen(6), dtype=torch.float64)
    _check(_dense(backend, False), _math(False), inputs, up, dtype=dtype, tol=3e-2, what=str(dtype))


# ----------------------------------------------------------------------------------------
# Non-contiguous inputs, packed and varlen entry points
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_slices_of_packed_qkv(backend, causal):
    B, L, H, D = 2, 50, 3, 32
    qkv = torch.randn(B, L, 3, H, D, generator=_gen(8), dtype=torch.float64)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, L, D), row stride 3 * H * D
    assert not q.is_contiguous()
    up = torch.randn(B, H, L, D, generator=_gen(9), dtype=torch.float64)
    _check(_dense(backend, causal), _math(causal), (q, k, v), up, what="qkv slices")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_strides(backend):
    q, k, v = _qkv(2, 3, 17, 17, 16, seed=10)
    cases = {
        "D not unit stride": (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v),
        "expanded batch (stride 0)": (q, k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)),
        "heads-major permute": (q.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3), k, v),
    }
    up = torch.randn(2, 3, 17, 16, generator=_gen(11), dtype=torch.float64)
    for what, inputs in cases.items():
        _check(_dense(backend, True), _math(True), inputs, up, what=what)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked(backend, causal):
    B, L, H, D = 2, 37, 3, 16
    x = torch.randn(B, L, 3 * H * D, generator=_gen(12), dtype=torch.float64)
    up = torch.randn(B, L, H * D, generator=_gen(13), dtype=torch.float64)

    def timm_style(qkv):  # timm's Attention, transcribed
        q, k, v = qkv.reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        return reference.attention(q, k, v, None, causal).transpose(1, 2).reshape(B, L, H * D)

    out, (g,) = _grads(lambda t: sslops.attention_qkvpacked(t, H, causal=causal, backend=backend), (x,), up,
                       torch.float32)
    ref, (rg,) = _oracle(timm_style, (x,), up)
    _close(out, ref, "qkvpacked out")
    _close(g, rg, "qkvpacked dqkv")


def test_qkvpacked_returns_a_view_of_the_kernel_output():
    """The fused output buffer is (B, L, H, D): (B, L, H * D) needs no copy."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("needs the compiled CPU kernel")
    qkv = torch.randn(2, 17, 3 * 2 * 8)
    out = sslops.attention_qkvpacked(qkv, 2, backend="cpu")
    assert out.is_contiguous() and out._is_view()
    o, lse = torch.ops.sslops.attention_fwd(*(t.transpose(1, 2) for t in qkv.view(2, 17, 3, 2, 8).unbind(2)),
                                            None, None, 17, 17, 8 ** -0.5, False)
    assert o.shape == (2, 2, 17, 8) and o.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 2, 17) and lse.is_contiguous() and lse.dtype == torch.float32


def test_gradient_layouts():
    """Contiguous inputs get contiguous gradients (a leaf's AccumulateGrad keeps them
    without a copy); slices of a packed qkv get (B, L, H, D) buffers (their unbind
    backward stacks them)."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("needs the compiled CPU kernel")
    q = torch.randn(2, 3, 17, 8)
    x = torch.randn(2, 17, 3, 3, 8)
    qs, ks, vs = (t.transpose(1, 2) for t in x.unbind(2))
    for args, contiguous in (((q, q, q), True), ((qs, ks, vs), False)):
        out, lse = torch.ops.sslops.attention_fwd(*args, None, None, 17, 17, 0.3, False)
        grads = torch.ops.sslops.attention_bwd(out, *args, out, lse, None, None, 17, 17, 0.3, False)
        for g in grads:
            assert g.is_contiguous() == contiguous and g.transpose(1, 2).is_contiguous() != contiguous
    leaf = q.clone().requires_grad_()
    sslops.attention(leaf, q, q, backend="cpu").sum().backward()
    assert leaf.grad.is_contiguous()


def _varlen_case(lens_q, lens_k, H=2, D=16, seed=0):
    g = _gen(seed)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0).tolist()), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), H, D, generator=g, dtype=torch.float64)
    k = torch.randn(int(cu_k[-1]), H, D, generator=g, dtype=torch.float64)
    v = torch.randn(int(cu_k[-1]), H, D, generator=g, dtype=torch.float64)
    up = torch.randn(int(cu_q[-1]), H, D, generator=g, dtype=torch.float64)
    return q, k, v, cu_q, cu_k, up


VARLEN_CASES = {
    "dino 2 global + 8 local": ([197, 197] + [37] * 8, [197, 197] + [37] * 8),
    "ragged, empty sequences": ([5, 0, 17, 1, 130], [9, 4, 17, 0, 33]),
    "one sequence": ([65], [65]),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen(backend, causal, case):
    lens_q, lens_k = VARLEN_CASES[case]
    q, k, v, cu_q, cu_k, up = _varlen_case(lens_q, lens_k, seed=len(case))

    def per_sequence(q, k, v):  # each sequence alone through the dense reference
        outs = []
        for b in range(len(lens_q)):
            qs, ks, vs = (t[c[b]:c[b + 1]].transpose(0, 1)[None] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
            if ks.shape[2] == 0:
                outs.append(torch.zeros_like(qs[0].transpose(0, 1)))
                continue
            outs.append(reference.attention(qs, ks, vs, None, causal)[0].transpose(0, 1))
        return torch.cat(outs)

    _check(lambda a, b, c: sslops.attention_varlen(a, b, c, cu_q, cu_k, causal=causal, backend=backend),
           per_sequence, (q, k, v), up, what=f"varlen {case}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen_equals_dense_batch(backend):
    q, k, v = _qkv(3, 2, 29, 29, 16, seed=14)
    flat = [t.transpose(1, 2).reshape(3 * 29, 2, 16).float() for t in (q, k, v)]
    cu = torch.arange(0, 4 * 29, 29, dtype=torch.int64)  # int64 offsets are accepted
    got = sslops.attention_varlen(*flat, cu, cu, 29, 29, causal=True, backend=backend)
    want = sslops.attention(q.float(), k.float(), v.float(), causal=True, backend=backend)
    _close(got.view(3, 29, 2, 16).transpose(1, 2), want.double(), "varlen vs dense")


# ----------------------------------------------------------------------------------------
# Compiled-kernel specifics: ISA builds, BLAS fallback, determinism, poisoning
# ----------------------------------------------------------------------------------------
needs_compiled = pytest.mark.skipif(not COMPILED, reason="sslops._C is not importable")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _isas():
    if not COMPILED:
        return []
    return ["base", "avx2", "auto"]


@needs_compiled
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("blas", ["default", "aten"])
def test_cpu_isa_and_blas_paths(monkeypatch, isa, blas):
    monkeypatch.setenv("SSLOPS_CPU_ISA", isa)
    if blas == "aten":
        monkeypatch.setenv("SSLOPS_CPU_BLAS", "aten")
    best = torch.ops.sslops._attention_cpu_isa()
    if isa == "base":
        assert best == "DEFAULT"
    elif isa == "avx2":
        assert best == ("AVX2" if _cpu_flags() >= {"avx2", "fma"} else "DEFAULT")
    elif _cpu_flags() >= {"avx512f", "avx512dq", "avx512vl", "avx512bw"}:
        assert best == "AVX512"
    for L, causal in ((65, True), (300, False)):
        inputs = _qkv(2, 2, L, L, 32, seed=L)
        up = torch.randn(2, 2, L, 32, generator=_gen(1), dtype=torch.float64)
        _check(_dense("cpu", causal), _math(causal), inputs, up, what=f"isa={best} blas={blas}")


@needs_compiled
def test_cpu_backward_is_deterministic():
    for B, H, L in ((1, 1, 1100), (4, 3, 200)):  # split and unsplit backward
        q, k, v = (t.float().requires_grad_() for t in _qkv(B, H, L, L, 32, seed=2))
        up = torch.randn(B, H, L, 32)
        runs = []
        for _ in range(2):
            out = sslops.attention(q, k, v, causal=True, backend="cpu")
            runs.append(torch.autograd.grad(out, (q, k, v), up))
        for a, b in zip(*runs):
            assert torch.equal(a, b)


@needs_compiled
def test_cpu_single_thread_matches_threads():
    q, k, v = (t.float() for t in _qkv(2, 3, 130, 130, 32, seed=3))
    out_n = sslops.attention(q, k, v, backend="cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out_1 = sslops.attention(q, k, v, backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(out_n, out_1)


# ----------------------------------------------------------------------------------------
# autograd, opcheck, torch.compile
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    for lq, lk, causal in ((5, 5, True), (3, 7, False), (7, 3, True)):
        q, k, v = (t.requires_grad_() for t in _qkv(1, 2, lq, lk, 4, seed=lq * lk))
        assert torch.autograd.gradcheck(lambda a, b, c: sslops.attention(a, b, c, causal=causal, backend=backend),
                                        (q, k, v))
    q, k, v, cu_q, cu_k, _ = _varlen_case([3, 0, 4], [2, 3, 4], H=1, D=3)
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: sslops.attention_varlen(a, b, c, cu_q, cu_k, causal=True, backend=backend), (q, k, v))


def _op_samples():
    q, k, v = (t.float() for t in _qkv(2, 3, 17, 9, 16, seed=15))
    qv, kv, vv, cu_q, cu_k, _ = _varlen_case([5, 0, 12], [3, 4, 9])
    qv, kv, vv = qv.float(), kv.float(), vv.float()
    return [
        (q, k, v, None, None, 17, 9, 0.25, False),
        (q, k, v, None, None, 17, 9, 0.25, True),
        (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, None, 17, 9, 0.3, True),
        (qv, kv, vv, cu_q, cu_k, 12, 9, 0.25, True),
    ]


@needs_compiled
def test_opcheck_compiled_ops():
    for args in _op_samples():
        req = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        torch.library.opcheck(torch.ops.sslops.attention_fwd.default, tuple(req))
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in req)
        out, lse = torch.ops.sslops.attention_fwd(*detached)
        q, k, v, cu_q, cu_k, mq, mk, scale, causal = detached
        grad = torch.randn_like(out)
        torch.library.opcheck(torch.ops.sslops.attention_bwd.default,
                              (grad, q, k, v, out, lse, cu_q, cu_k, mq, mk, scale, causal))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    B, L, H, D = 2, 33, 2, 16
    x = torch.randn(B, L, 3 * H * D, requires_grad=True)
    qv, kv, vv, cu_q, cu_k, _ = _varlen_case([5, 11, 17], [7, 11, 3])
    qv, kv, vv = (t.float().requires_grad_() for t in (qv, kv, vv))

    def step(x, qv, kv, vv):
        a = sslops.attention_qkvpacked(x, H, causal=True, backend=backend)
        q, k, v = x.reshape(B, L, 3, H, D).unbind(2)
        b = sslops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=backend)
        c = sslops.attention_varlen(qv, kv, vv, cu_q, cu_k, 17, 11, causal=True, backend=backend)
        return a.square().sum() + b.square().sum() + c.square().sum()

    want = step(x, qv, kv, vv)
    want_g = torch.autograd.grad(want, (x, qv, kv, vv))
    got = torch.compile(step, fullgraph=True)(x, qv, kv, vv)
    got_g = torch.autograd.grad(got, (x, qv, kv, vv))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Bad input: clear exceptions naming the argument
# ----------------------------------------------------------------------------------------
def test_bad_dense_inputs():
    q = torch.randn(2, 3, 5, 8)
    cases = [
        ((q[0], q, q), ValueError, "q must be 4-D"),
        ((q, q[0], q), ValueError, "k must be 4-D"),
        ((q, q, torch.randn(2, 3, 5, 8, 1)), ValueError, "v must be 4-D"),
        ((q, torch.randn(1, 3, 5, 8), q), ValueError, "batch size B"),
        ((q, torch.randn(2, 4, 5, 8), q), ValueError, "number of heads H"),
        ((q, torch.randn(2, 3, 5, 4), q), ValueError, "head dim D"),
        ((q, q, torch.randn(2, 3, 6, 8)), ValueError, "same length Lk"),
        ((q.long(), q.long(), q.long()), TypeError, "q must be a floating-point"),
        ((q, q.double(), q), TypeError, "same dtype"),
        ((q, q, q.to("meta")), ValueError, "same device"),
        ((torch.randn(2, 3, 0, 8), q, q), ValueError, "empty dimension"),
        (("q", q, q), TypeError, "q must be a torch.Tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            sslops.attention(*args)
    with pytest.raises(ValueError, match="scale must be finite"):
        sslops.attention(q, q, q, scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a real number"):
        sslops.attention(q, q, q, scale="1")
    with pytest.raises(TypeError, match="causal must be a bool"):
        sslops.attention(q, q, q, causal=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        sslops.attention(q, q, q, backend="flash")


def test_bad_packed_inputs():
    with pytest.raises(ValueError, match="qkv must be 3-D"):
        sslops.attention_qkvpacked(torch.randn(2, 5, 3, 2, 4), 2)
    with pytest.raises(ValueError, match="multiple of 3 \\* 2"):
        sslops.attention_qkvpacked(torch.randn(2, 5, 20), 2)
    with pytest.raises(ValueError, match="num_heads must be"):
        sslops.attention_qkvpacked(torch.randn(2, 5, 24), 0)
    with pytest.raises(TypeError, match="qkv must be a floating-point"):
        sslops.attention_qkvpacked(torch.ones(2, 5, 24, dtype=torch.int32), 2)


def test_bad_varlen_inputs():
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [
        (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "cu_seqlens_q must be non-decreasing"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)), r"cu_seqlens_q\[-1\] must equal"),
        (dict(cu_seqlens_k=torch.tensor([1, 4, 10], dtype=torch.int32)), r"cu_seqlens_k\[0\] must be 0"),
        (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), "same length N \\+ 1"),
        (dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32)), "N \\+ 1 >= 2"),
        (dict(max_seqlen_q=5), "max_seqlen_q = 5 is shorter"),
        (dict(max_seqlen_k=-1), "max_seqlen_k must be >= 0"),
    ]
    for kw, msg in cases:
        args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            sslops.attention_varlen(q, q, q, **args)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        sslops.attention_varlen(q, q, q, cu.float(), cu)
    with pytest.raises(ValueError, match="q must be 3-D"):
        sslops.attention_varlen(q[None], q, q, cu, cu)
    with pytest.raises(ValueError, match="number of heads H"):
        sslops.attention_varlen(q, torch.randn(10, 3, 8), torch.randn(10, 3, 8), cu, cu)
    qm, cm = q.to("meta"), cu.to("meta")
    with pytest.raises(ValueError, match="cu_seqlens_q is a meta tensor"):  # was a RuntimeError from .item()
        sslops.attention_varlen(qm, qm, qm, cm, cm, 6, 6)


@needs_compiled
def test_compiled_ops_check_their_arguments():
    """Direct op calls (opcheck, other frontends) get ValueError/TypeError, never a crash."""
    q = torch.randn(2, 3, 5, 8)
    op = torch.ops.sslops.attention_fwd
    with pytest.raises(ValueError, match="q must be 4-D"):
        op(q[0], q, q, None, None, 5, 5, 1.0, False)
    with pytest.raises(ValueError, match="same number of heads"):
        op(q, torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), None, None, 5, 5, 1.0, False)
    with pytest.raises(TypeError, match="floating"):
        op(q.int(), q.int(), q.int(), None, None, 5, 5, 1.0, False)
    with pytest.raises(TypeError, match="CPU kernel takes float32 or float64"):
        op(q.half(), q.half(), q.half(), None, None, 5, 5, 1.0, False)
    with pytest.raises(ValueError, match="scale must be finite"):
        op(q, q, q, None, None, 5, 5, float("inf"), False)
    qv = torch.randn(10, 2, 8)
    bad = torch.tensor([0, 6, 4, 10], dtype=torch.int32)
    good = torch.tensor([0, 4, 6, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        op(qv, qv, qv, bad, good, 10, 10, 1.0, False)
    with pytest.raises(ValueError, match="more than max_seqlen"):
        op(qv, qv, qv, good, good, 3, 10, 1.0, False)
    with pytest.raises(ValueError, match="both given"):
        op(qv, qv, qv, good, None, 10, 10, 1.0, False)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        op(qv, qv, qv, good.long(), good, 10, 10, 1.0, False)
    out, lse = op(q, q, q, None, None, 5, 5, 1.0, False)
    with pytest.raises(ValueError, match="lse must have shape"):
        torch.ops.sslops.attention_bwd(out, q, q, q, out, lse[0], None, None, 5, 5, 1.0, False)
    with pytest.raises(TypeError, match="lse must be"):
        torch.ops.sslops.attention_bwd(out, q, q, q, out, lse.double(), None, None, 5, 5, 1.0, False)


def test_head_dim_limits_in_backend_choice():
    from sslops.attention import TRITON_HEAD_DIMS as dims  # the module (sslops.attention is the function)

    assert 48 not in dims and 64 in dims
    assert _backend.supported_head_dims("attention", "triton") == dims
    assert _backend.supported_head_dims("attention", "cpu") is None
    # a fused backend that cannot take the head dim is left out (auto skips it) ...
    for device in ("cpu", "cuda"):
        assert "triton" not in _backend.backends("attention", device, torch.float32, head_dim=48)
        assert "cuda" not in _backend.backends("attention", device, torch.float16, head_dim=48)
    assert "cpu" in _backend.backends("attention", "cpu", torch.float32, head_dim=48) or not COMPILED
    assert _backend.resolve("attention", "auto", torch.device("cpu"), torch.float32, 48) in ("cpu", "reference")


def test_unsupported_head_dim_is_refused_by_name(monkeypatch):
    # Make triton usable on CPU (the interpreter flag) so the head dim is the only reason.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if "triton" not in _backend.backends("attention", "cpu", torch.float32):
        pytest.skip("triton is not importable")
    with pytest.raises(ValueError, match=r"supports head dims 16, 32, 64, 80, 96, 128; got head dim 48"):
        _backend.resolve("attention", "triton", torch.device("cpu"), torch.float32, 48)
    q = torch.randn(1, 2, 5, 48)
    with pytest.raises(ValueError, match="head dims 16, 32, 64, 80, 96, 128"):
        sslops.attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="computes float32, float16"):
        sslops.attention(q.double(), q.double(), q.double(), backend="triton")


def test_auto_picks_the_cpu_kernel_on_cpu():
    if COMPILED:
        assert _backend.resolve("attention", "auto", torch.device("cpu"), torch.float32, 64) == "cpu"
        assert _backend.resolve("attention", "auto", torch.device("cpu"), torch.float64, 7) == "cpu"
    with pytest.raises(ValueError, match="'cuda'"):
        q = torch.randn(1, 1, 3, 8)
        sslops.attention(q, q, q, backend="cuda")


# ----------------------------------------------------------------------------------------
# GPU (marked cuda): every GPU backend, tolerance 2x SDPA's same-dtype error vs fp32 math.
# ----------------------------------------------------------------------------------------
# (backend, device) pairs: the GPU backends, and csrc/cuda/attention.cu on the CPU under the
# CUDA emulator (backend "emu", marked emu; fp16/bf16 on tensor cores, as on a GPU).
GPU_CASES = [pytest.param(be, "cuda", marks=pytest.mark.cuda, id=f"{be}-cuda") for be in ("cuda", "triton")]
EMU_CASE = pytest.param("emu", "cpu", marks=pytest.mark.emu, id="emu")


def _gpu_backend_or_skip(backend, device, dtype, D):
    if torch.device(device).type == "cuda" and not GPU:
        pytest.skip("needs a CUDA GPU")
    if backend not in _backend.backends("attention", device, dtype, D):
        pytest.skip(f"backend {backend!r} cannot run attention on {dtype} D={D} on {device} in this install "
                    f"(usable: {_backend.backends('attention', device)})")


def _fp32_math(q, k, v, causal, up):
    """Output and gradients in fp32 math, TF32 off."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = reference.attention(*leaves, None, causal)
        grads = torch.autograd.grad(out, leaves, up.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out, grads


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("backend,device", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,D", [(1, 64), (17, 32), (50, 64), (197, 64), (257, 64), (320, 80), (197, 96),
                                 (257, 128), (1024, 128), (129, 16)])
def test_gpu_against_fp32_math(backend, device, dtype, causal, L, D):
    _gpu_backend_or_skip(backend, device, dtype, D)
    g = torch.Generator(device=device).manual_seed(L * D)
    B, H = 2, 3
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    up = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g)
    ref, ref_g = _fp32_math(q, k, v, causal, up)
    # SDPA's error in the same dtype (FlashAttention's rule): the tolerance is twice it.
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    sd = F.scaled_dot_product_attention(*leaves, is_causal=causal)
    sd_g = torch.autograd.grad(sd, leaves, up)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = sslops.attention(*leaves, causal=causal, backend=backend)
    out_g = torch.autograd.grad(out, leaves, up)
    assert out.dtype == dtype and torch.isfinite(out).all()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert _max_err(out, ref) <= 2 * _max_err(sd, ref) + floor
    for name, a, s, r in zip("qkv", out_g, sd_g, ref_g):
        assert _max_err(a, r) <= 2 * _max_err(s, r) + floor, f"d{name}"


@pytest.mark.parametrize("backend,device", GPU_CASES + [EMU_CASE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_varlen_and_packed(backend, device, dtype):
    _gpu_backend_or_skip(backend, device, dtype, 64)
    lens = [197, 197] + [37] * 8 + [0, 1]
    q, k, v, cu_q, cu_k, up = _varlen_case(lens, lens, H=3, D=64, seed=3)
    q, k, v, up = (t.to(device, dtype) for t in (q, k, v, up))
    cu_q, cu_k = cu_q.to(device), cu_k.to(device)
    for causal in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = sslops.attention_varlen(*leaves, cu_q, cu_k, 197, 197, causal=causal, backend=backend)
        out_g = torch.autograd.grad(out, leaves, up)
        ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = reference.attention_varlen(*ref_leaves, cu_q, cu_k, None, causal)
        ref_g = torch.autograd.grad(ref, ref_leaves, up.float())
        assert _max_err(out, ref) < 2e-2
        for a, r in zip(out_g, ref_g):
            assert _max_err(a, r) < 5e-2
    x = torch.randn(4, 197, 3 * 3 * 64, device=device, dtype=dtype)
    got = sslops.attention_qkvpacked(x, 3, backend=backend)
    want = sslops.attention_qkvpacked(x.float(), 3, backend="reference")
    assert got.is_contiguous() and _max_err(got, want) < 2e-2


@pytest.mark.parametrize("backend,device", GPU_CASES + [EMU_CASE])
def test_gpu_head_dim_refused(backend, device):
    _gpu_backend_or_skip(backend, device, torch.bfloat16, 64)
    q = torch.randn(1, 2, 5, 48, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="supports head dims"):
        sslops.attention(q, q, q, backend=backend)
    # auto skips it: the answer still equals the reference
    torch.testing.assert_close(sslops.attention(q, q, q), reference.attention(q, q, q), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend,device", GPU_CASES + [EMU_CASE])
def test_gpu_backward_is_deterministic(backend, device):
    _gpu_backend_or_skip(backend, device, torch.bfloat16, 64)
    q, k, v = (torch.randn(4, 3, 257, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    up = torch.randn_like(q)
    runs = [torch.autograd.grad(sslops.attention(q, k, v, causal=True, backend=backend), (q, k, v), up)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- the CUDA kernel under the emulator: against float64 math on the same rounded inputs ----
# Tolerances: fp16/bf16 operands, P and dS rounded to the input type before their products
# (as every flash kernel does), fp32 accumulation.  Measured worst errors relative to the
# magnitudes: 5.5e-4 (fp16), 5.6e-3 (bf16); a wrong fragment, mask or barrier gives O(1).
EMU_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
EMU_SHAPES = ([(L, L, (32, 64, 80, 128)[i % 4]) for i, L in enumerate(LS)]  # every issue length, D rotating
              + [(197, 197, D) for D in (16, 32, 64, 80, 96, 128)]           # every head dim
              + [(1, 17, 64), (17, 1, 32), (50, 197, 64), (197, 50, 80), (130, 320, 64)])  # Lq != Lk


def _emu_check(fn, inputs, ref_fn, upstream, dtype, what):
    inputs = [x.to(dtype) for x in inputs]  # the oracle sees the same rounded values, in float64
    out, grads = _grads(fn, inputs, upstream.to(dtype), dtype)
    ref_out, ref_grads = _oracle(ref_fn, inputs, upstream.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all(), what
    tol = EMU_TOL[dtype]
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        _close(a, r, f"{what} {name}", tol)


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lq,lk,D", EMU_SHAPES, ids=[f"{a}x{b}-{d}" for a, b, d in EMU_SHAPES])
def test_emu_against_float64(lq, lk, D, causal, dtype):
    from sslops import _emu

    q, k, v = _qkv(1, 2, lq, lk, D, seed=lq * 1000 + lk + D)
    up = torch.randn(1, 2, lq, D, generator=_gen(D), dtype=torch.float64)
    launches = _emu.stats()["launches"]
    _emu_check(_dense("emu", causal), (q, k, v), _math(causal), up, dtype, f"emu {lq}x{lk} D={D} causal={causal}")
    assert _emu.stats()["launches"] >= launches + 4  # forward, delta, dq, dk/dv really ran emulated


@pytest.mark.emu
@pytest.mark.parametrize("device", ["h100", "a100"])
def test_emu_strided_inputs_and_devices(device):
    """Slices of a packed qkv (16-byte row pieces), an odd element offset (the
    scalar load path), a (B, H) grid with B > 1, on both emulated GPUs."""
    from sslops import _emu

    g = _gen(5)
    with _emu.emulated_device(device):
        qkv = torch.randn(2, 129, 3, 3, 64, generator=g, dtype=torch.float64)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views, not contiguous
        up = torch.randn(2, 3, 129, 64, generator=g, dtype=torch.float64)
        for causal in (False, True):
            _emu_check(_dense("emu", causal), (q, k, v), _math(causal), up, torch.float16, "packed slices")
        odd = torch.randn(1, 2, 70, 33, generator=g, dtype=torch.float64)[..., 1:]  # D = 32 at an odd offset
        _emu_check(_dense("emu", False), (odd, odd, odd), _math(False), torch.randn(1, 2, 70, 32, generator=g,
                   dtype=torch.float64), torch.bfloat16, "odd offset")


@pytest.mark.emu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_emu_varlen(causal, case):
    lens_q, lens_k = VARLEN_CASES[case]
    q, k, v, cu_q, cu_k, up = _varlen_case(lens_q, lens_k, D=32, seed=len(case))
    ref = lambda a, b, c: reference.attention_varlen(a, b, c, cu_q, cu_k, None, causal)
    _emu_check(lambda a, b, c: sslops.attention_varlen(a, b, c, cu_q, cu_k, causal=causal, backend="emu"),
               (q, k, v), ref, up, torch.float16, f"emu varlen {case}")


@pytest.mark.emu
@pytest.mark.parametrize("causal", [False, True])
def test_emu_non_finite_inputs_as_math(causal):
    for val, which in NON_FINITE:
        _check_non_finite("emu", causal, val, which, torch.float16, EMU_TOL[torch.float16])


@pytest.mark.emu
def test_emu_refuses_what_the_cuda_kernel_lacks():
    q = torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match="computes float16, bfloat16"):
        sslops.attention(q, q, q, backend="emu")  # float32: the Triton kernel's job on a GPU
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        torch.ops.sslops_emu.attention_fwd(q, q, q, None, None, 0, 0, 0.125, False)
    h = torch.randn(1, 2, 5, 24).half()
    with pytest.raises(ValueError, match="head dims 16, 32, 64, 80, 96, 128"):
        torch.ops.sslops_emu.attention_fwd(h, h, h, None, None, 0, 0, 0.125, False)
    with pytest.raises(ValueError, match="same head dim"):
        torch.ops.sslops_emu.attention_fwd(h, h[..., :16], h, None, None, 0, 0, 0.125, False)
    cu = torch.tensor([0, 3, 2], dtype=torch.int32)
    t = torch.randn(5, 2, 16).half()
    with pytest.raises(ValueError, match="non-decreasing"):
        torch.ops.sslops_emu.attention_fwd(t, t, t, cu, cu, 5, 5, 0.25, False)


@pytest.mark.emu
def test_emu_opcheck_and_compile():
    q, k, v = (torch.randn(1, 2, 37, 32).half() for _ in range(3))
    torch.library.opcheck(torch.ops.sslops_emu.attention_fwd.default, (q, k, v, None, None, 0, 0, 0.2, True))
    fn = torch.compile(lambda a, b, c: sslops.attention(a, b, c, causal=True, backend="emu"), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), sslops.attention(q, k, v, causal=True, backend="emu"), rtol=0, atol=0)


def test_reference_varlen_masked_form_equals_loop():
    """The compile-friendly form of the varlen reference (block-diagonal mask)."""
    q, k, v, cu_q, cu_k, _ = _varlen_case([5, 0, 17, 1, 30], [9, 4, 17, 0, 33])
    for causal in (False, True):
        want = reference.attention_varlen(q, k, v, cu_q, cu_k, None, causal)
        got = reference._attention_varlen_masked(q, k, v, cu_q, cu_k, None, causal)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# sslops.nn.Attention and patch_timm
# ----------------------------------------------------------------------------------------
def _timm():
    return pytest.importorskip("timm")


def _timm_attention(**kw):
    _timm()
    from timm.models.vision_transformer import Attention as TimmAttention

    torch.manual_seed(0)
    return TimmAttention(**kw)


ATTN_CONFIGS = {
    "vit": dict(dim=96, num_heads=3, qkv_bias=True),
    "qk_norm": dict(dim=96, num_heads=3, qk_norm=True, norm_layer=torch.nn.LayerNorm),
    "scale_norm+gated": dict(dim=64, num_heads=2, scale_norm=True, gated=True, norm_layer=torch.nn.LayerNorm),
    "head_dim+dim_out": dict(dim=48, num_heads=2, attn_head_dim=40, dim_out=32, proj_bias=False),
}


@pytest.mark.parametrize("config", list(ATTN_CONFIGS))
def test_nn_attention_is_a_timm_drop_in(config):
    kw = ATTN_CONFIGS[config]
    ref = _timm_attention(**kw).eval()
    ours = sslops.nn.Attention(**kw).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 37, kw["dim"], generator=_gen(1), requires_grad=True)
    for is_causal in (False, True):
        want = ref(x, is_causal=is_causal)
        got = ours(x, is_causal=is_causal)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        gw = torch.autograd.grad(want.square().sum(), [x, *ref.parameters()])
        gg = torch.autograd.grad(got.square().sum(), [x, *ours.parameters()])
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_nn_attention_fallbacks_are_correct():
    ref = _timm_attention(dim=64, num_heads=4, qkv_bias=True, attn_drop=0.3)
    ours = sslops.nn.Attention(dim=64, num_heads=4, qkv_bias=True, attn_drop=0.3)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 17, 64, generator=_gen(2))
    ref.fused_attn = False  # timm's explicit path: the same RNG use as ours under dropout
    # dropout in training: explicit math, same dropout masks for the same seed
    ref.train(), ours.train()
    torch.manual_seed(5)
    want = ref(x)
    torch.manual_seed(5)
    got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    ref.eval(), ours.eval()
    bool_mask = torch.rand(2, 1, 17, 17, generator=_gen(3)) > 0.3
    bool_mask[..., 0] = True  # every row sees a key
    float_mask = torch.randn(2, 4, 17, 17, generator=_gen(4))
    for mask in (bool_mask, float_mask):
        torch.testing.assert_close(ours(x, attn_mask=mask), ref(x, attn_mask=mask), rtol=1e-6, atol=1e-6)
        ref.fused_attn = True  # timm's SDPA path agrees as well
        torch.testing.assert_close(ours(x, attn_mask=mask), ref(x, attn_mask=mask), rtol=1e-5, atol=1e-5)
        ref.fused_attn = False
    # weights for DINO's get_last_selfattention: softmax(q k^T * scale)
    out, attn = ours(x, need_weights=True)
    torch.testing.assert_close(out, ours(x), rtol=1e-5, atol=1e-5)
    q, k, _ = ours.qkv(x).reshape(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(attn, (q @ k.transpose(-2, -1) * 16 ** -0.5).softmax(-1))
    assert ours(x, attn_mask=None, is_causal=True).shape == (2, 17, 64)


def test_patch_timm_vit_tiny():
    timm = _timm()
    import copy

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    before = copy.deepcopy(model)
    x = torch.randn(2, 3, 224, 224, generator=_gen(6))
    params = dict(model.named_parameters())
    patched = sslops.nn.patch_timm(model, backend="auto")
    assert patched is model
    n_patched = sum(isinstance(m, sslops.nn.Attention) for m in model.modules())
    assert n_patched == len(model.blocks) == 12
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # the same tensors: optimizers stay valid
    # strict state-dict round trips, both ways
    model.load_state_dict(before.state_dict(), strict=True)
    before.load_state_dict(model.state_dict(), strict=True)
    for m in (before, model):
        m.train()
    want = before(x)
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    want.square().sum().backward()
    got.square().sum().backward()
    ref_grads = dict(before.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_patch_timm_refuses_models_without_attention():
    _timm()
    with pytest.raises(ValueError, match="found no timm"):
        sslops.nn.patch_timm(torch.nn.Linear(3, 3))
    assert isinstance(sslops.nn.patch_timm(torch.nn.Linear(3, 3), strict=False), torch.nn.Linear)
    with pytest.raises(ValueError, match="backend must be one of"):
        sslops.nn.patch_timm(torch.nn.Linear(3, 3), backend="flash")


def test_nn_attention_empty_batch_and_sequence_like_timm():
    # the kernels refuse empty inputs (test_bad_dense_inputs); the drop-in must not, as timm does not
    ref = _timm_attention(dim=48, num_heads=3, qkv_bias=True).eval()
    ours = sslops.nn.Attention(dim=48, num_heads=3, qkv_bias=True).eval()
    ours.load_state_dict(ref.state_dict())
    for shape in ((0, 7, 48), (2, 0, 48), (0, 0, 48)):
        x = torch.randn(shape, requires_grad=True)
        for is_causal in (False, True):
            got = ours(x, is_causal=is_causal)
            assert got.shape == ref(x, is_causal=is_causal).shape == shape
            got.sum().backward()
            assert x.grad.shape == shape and ours.qkv.weight.grad is not None


def test_nn_attention_bad_arguments():
    _timm()
    for kw, match in ((dict(dim=48, num_heads=0), "num_heads must be >= 1"),  # was ZeroDivisionError
                      (dict(dim=48, num_heads=-2), "num_heads must be >= 1"),  # was accepted: head_dim -24
                      (dict(dim=0, num_heads=2), "dim must be >= 1"),  # was ZeroDivisionError
                      (dict(dim=48, num_heads=2, attn_head_dim=0), "attn_head_dim must be >= 1")):
        with pytest.raises(ValueError, match=match):
            sslops.nn.Attention(**kw)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        sslops.nn.Attention(dim=48, num_heads=2.0)
    ours = sslops.nn.Attention(dim=48, num_heads=3).eval()
    x = torch.randn(2, 5, 48)
    # an integer 0/1 mask was silently added to the scores as a bias (so it masked nothing); SDPA refuses it
    with pytest.raises(TypeError, match="attn_mask must be bool .* got torch.int64"):
        ours(x, attn_mask=(torch.rand(5, 5) > 0.5).long())
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor"):
        ours(x, attn_mask=[[True] * 5] * 5)
    with pytest.raises(TypeError, match="is_causal must be a bool"):  # "no" was truthy: a causal mask
        ours(x, is_causal="no")
    with pytest.raises(ValueError, match="x must be 3-D"):
        ours(x[0])


def test_patch_timm_refuses_non_modules():
    _timm()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):  # was an AttributeError
        sslops.nn.patch_timm("vit_tiny_patch16_224")

"""sslops.nt_xent / info_nce against a float64 reference, on every backend
that runs on this machine (cpu; triton in the interpreter; reference)."""
import contextlib
import os

import pytest
import torch

import sslops
from sslops import reference

CPU_BACKENDS = sslops.backends("nt_xent", "cpu")  # cpu, triton (interpreter), reference
GPU = torch.cuda.is_available()
# The CUDA kernels on the CPU, under the CUDA emulator (csrc/emu): backend "emu",
# marked emu (`pytest -m emu` runs only these).
EMU = pytest.param("emu", marks=pytest.mark.emu)
CPU_AND_EMU = [*CPU_BACKENDS, EMU]


def _views(n, d, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    z2 = z1 + 0.5 * scale * torch.randn(n, d, generator=g, dtype=torch.float64)  # correlated positives
    return z1.to(device, dtype), z2.to(device, dtype)


def _oracle(fn, args, kwargs, upstream=None):
    """Loss and input gradients of fn computed in float64."""
    leaves = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*leaves, **kwargs)
    w = upstream.double() if upstream is not None else torch.ones_like(out)
    grads = torch.autograd.grad((out * w).sum(), [x for x in leaves if isinstance(x, torch.Tensor)])
    return out.detach(), grads


def _run(fn, args, kwargs, upstream=None):
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*leaves, **kwargs)
    w = upstream.to(out.dtype) if upstream is not None else torch.ones_like(out)
    grads = torch.autograd.grad((out * w).sum(), [x for x in leaves if isinstance(x, torch.Tensor)])
    return out.detach(), grads


def _close(actual, expected, inv_temp, what, scale=1.0):
    # fp32 logits carry ~1e-7 relative error of their size, |z|^2 * inv_temp.
    tol = 2e-5 * max(1.0, inv_temp) * scale
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _check(fn, ref_fn, args, kwargs, backend, inv_temp, upstream=None, scale=1.0):
    out, grads = _run(fn, args, dict(kwargs, backend=backend), upstream)
    ref_out, ref_grads = _oracle(ref_fn, args, kwargs, upstream)
    assert torch.isfinite(out).all()
    _close(out, ref_out, inv_temp, f"{backend} loss", scale)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        _close(g, rg, inv_temp, f"{backend} grad of input {i}", scale)


# ---------------------------------------------------------------- nt_xent values
SIZES = [(1, 1), (2, 3), (3, 64), (17, 130), (130, 3), (513, 64)]


@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("temperature", [0.01, 0.1, 0.5])
def test_nt_xent_matches_float64(backend, n, d, temperature):
    if backend == "triton" and n * d > 130 * 64:
        pytest.skip("the Triton interpreter is slow; large sizes run on the GPU test")
    z1, z2 = _views(n, d, seed=n * 1000 + d)
    upstream = torch.rand(2 * n, dtype=torch.float64)
    _check(sslops.nt_xent, reference.nt_xent, (z1, z2), dict(temperature=temperature, reduction="none"),
           backend, 1 / temperature, upstream)


@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nt_xent_reductions(backend, reduction):
    z1, z2 = _views(17, 64, seed=3)
    _check(sslops.nt_xent, reference.nt_xent, (z1, z2), dict(temperature=0.2, reduction=reduction), backend, 5.0)


@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("d", [1, 3, 64, 130])
def test_nt_xent_all_widths(backend, d):
    z1, z2 = _views(33, d, seed=d)
    _check(sslops.nt_xent, reference.nt_xent, (z1, z2), dict(temperature=0.1), backend, 10.0)


@pytest.mark.parametrize("backend", CPU_AND_EMU)
def test_nt_xent_unnormalised_low_temperature_is_stable(backend):
    # |z|^2 ~ 64 * 9: logits ~ 6e4, exp overflows without a running max.  The
    # tolerance scales with |z|^2, the size of the fp32 logits' rounding.
    z1, z2 = _views(17, 64, scale=3.0, seed=7)
    kwargs = dict(temperature=0.01, normalize=False, reduction="none")
    if backend != "triton":
        _check(sslops.nt_xent, reference.nt_xent, (z1, z2), kwargs, backend, 100.0, scale=64 * 9.0)
        return
    # The Triton backward recomputes each logits tile in another orientation than the
    # forward (x^T tiles for grad_c, x_ij against the column's lse in the symmetric
    # pass).  In the interpreter numpy's fp32 matmul rounds by tile position, so the
    # backward's x differs from the forward's by delta ~ 2^-24 * |x| * sqrt(D) ~ 0.03
    # at |x| ~ 6e4.  The softmax here is one-hot, so its weight exp(delta) is off by
    # ~delta: each softmax term inv_temp * p_ij * z_j of the gradient is good to ~delta
    # relative, not to the consistent-rounding bound (the exact gradient here is ~0:
    # the positive is the row maximum).
    out, grads = _run(sslops.nt_xent, (z1, z2), dict(kwargs, backend=backend))
    ref_out, ref_grads = _oracle(reference.nt_xent, (z1, z2), kwargs)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    _close(out, ref_out, 100.0, "triton loss", 64 * 9.0)
    delta = 2.0 ** -24 * 100.0 * (64 * 9.0) * 64 ** 0.5
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        tol = delta * 100.0 * max(z1.abs().max().item(), z2.abs().max().item())
        torch.testing.assert_close(g.double(), rg, rtol=0, atol=tol, msg=lambda m: f"triton grad of input {i}: {m}")


@pytest.mark.parametrize("backend", CPU_AND_EMU)
def test_nt_xent_non_contiguous(backend):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(64, 2 * 17, generator=g)
    z1 = base.t()[:17]            # (17, 64), column-major view
    z2 = base[:, 1::2].t()        # strided
    assert not z1.is_contiguous() and not z2.is_contiguous()
    _check(sslops.nt_xent, reference.nt_xent, (z1, z2), dict(temperature=0.1, reduction="none"), backend, 10.0)


@pytest.mark.parametrize("backend", [*(b for b in CPU_BACKENDS if b != "triton"), EMU])
def test_nt_xent_float64_and_half_inputs(backend):
    z1, z2 = _views(9, 16, dtype=torch.float64)
    _check(sslops.nt_xent, reference.nt_xent, (z1, z2), dict(temperature=0.1), backend, 1e-6)  # fp64: tight
    for dtype in (torch.bfloat16, torch.float16):
        h1, h2 = z1.to(dtype), z2.to(dtype)
        out = sslops.nt_xent(h1, h2, 0.1, backend=backend)
        assert out.dtype == dtype
        ref = reference.nt_xent(h1.double(), h2.double(), 0.1)
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_nt_xent_equals_simclr_formula():
    """Independent transcription of SimCLR's loss (no shared code with reference.py)."""
    z1, z2 = _views(5, 8, dtype=torch.float64, seed=5)
    t = 0.3
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / t
    n2 = z.shape[0]
    losses = []
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(torch.exp(sim[i, k]) for k in range(n2) if k != i)
        losses.append(-torch.log(torch.exp(sim[i, j]) / denom))
    expected = torch.stack(losses)
    for backend in CPU_BACKENDS:
        if backend == "triton":
            continue  # fp32 only; covered above
        got = sslops.nt_xent(z1, z2, t, reduction="none", backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- info_nce
@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (3, 17, 64), (130, 513, 3), (17, 130, 130)])
@pytest.mark.parametrize("with_queue", [False, True])
def test_info_nce_matches_float64(backend, n, k, d, with_queue):
    if backend == "triton" and n * k * d > 17 * 130 * 130:
        pytest.skip("interpreter: large sizes run on the GPU test")
    q, key = _views(n, d, seed=n + k + d)
    neg = torch.randn(k, d, generator=torch.Generator().manual_seed(k)) if with_queue else None
    args = (q, key, neg) if with_queue else (q, key)
    upstream = torch.rand(n, dtype=torch.float64)
    _check(sslops.info_nce, reference.info_nce, args, dict(temperature=0.07, reduction="none"), backend,
           1 / 0.07, upstream)


def test_info_nce_against_moco_formula():
    q, k = _views(6, 8, dtype=torch.float64, seed=1)
    queue = torch.randn(10, 8, dtype=torch.float64)
    qn, kn, negn = (torch.nn.functional.normalize(x, dim=1) for x in (q, k, queue))
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ negn.t()], 1) / 0.07
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    for backend in (b for b in CPU_BACKENDS if b != "triton"):
        torch.testing.assert_close(sslops.info_nce(q, k, queue, backend=backend), expected)


# ---------------------------------------------------------------- autograd, opcheck, compile
@pytest.mark.parametrize("backend", [*(b for b in CPU_BACKENDS if b != "triton"), EMU])
def test_gradcheck_float64(backend):
    z1, z2 = _views(3, 5, dtype=torch.float64, seed=2)
    z1.requires_grad_(), z2.requires_grad_()
    neg = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sslops.nt_xent(a, b, 0.2, reduction="none", backend=backend), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: sslops.info_nce(a, b, backend=backend), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b, c: sslops.info_nce(a, b, c, backend=backend), (z1, z2, neg))


def _lse_args(dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 5, generator=g, dtype=dtype, requires_grad=requires_grad)
    c = torch.randn(9, 5, generator=g, dtype=dtype, requires_grad=requires_grad)
    exclude = torch.tensor([0, -1, 2, 8, 4, -1, 1])
    return q, c, exclude


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="sslops._C not built")
@pytest.mark.parametrize("ns", ["sslops", pytest.param("sslops_emu", marks=pytest.mark.emu)])
def test_opcheck_compiled_ops(ns):
    ops = getattr(torch.ops, ns)  # sslops_emu: the CUDA kernels under the emulator
    q, c, exclude = _lse_args()
    z = torch.randn(6, 5, requires_grad=True)
    torch.library.opcheck(ops.nt_xent_lse.default, (q, c, exclude, 3.0))
    torch.library.opcheck(ops.nt_xent_lse.default, (q, c, None, 3.0))
    torch.library.opcheck(ops.nt_xent_lse_sym.default, (z, 2.0))
    lse = ops.nt_xent_lse(q.detach(), c.detach(), exclude, 3.0)
    grad = torch.rand(7)
    torch.library.opcheck(ops.nt_xent_lse_backward.default, (grad, q.detach(), c.detach(), exclude, lse, 3.0))
    lse_z = ops.nt_xent_lse_sym(z.detach(), 2.0)
    torch.library.opcheck(ops.nt_xent_lse_backward_sym.default, (torch.rand(6), z.detach(), lse_z, 2.0))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not importable or interpreter off")
def test_opcheck_triton_ops():
    q, c, exclude = _lse_args()
    z = torch.randn(6, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.sslops.nt_xent_lse_triton.default, (q, c, exclude, 3.0))
    torch.library.opcheck(torch.ops.sslops.nt_xent_lse_sym_triton.default, (z, 2.0))


def test_backward_sym_equals_general_backward():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("sslops._C not built")
    z = torch.randn(37, 19, dtype=torch.float64)
    lse = torch.ops.sslops.nt_xent_lse_sym(z, 4.0)
    g = torch.rand(37, dtype=torch.float64)
    gq, gc = torch.ops.sslops.nt_xent_lse_backward(g, z, z, torch.arange(37), lse, 4.0)
    gz = torch.ops.sslops.nt_xent_lse_backward_sym(g, z, lse, 4.0)
    torch.testing.assert_close(gz, gq + gc)


# ---------------------------------------------------------------- the symmetric CPU kernels
# nt_xent_lse_sym and nt_xent_lse_backward_sym on the CPU (csrc/cpu/nt_xent.cpp):
# equal blocks of z's rows (<= 256, >= 8 blocks down to 64 rows), tiles (I, J),
# I <= J, in round-robin rounds.  The sizes straddle the block rules: 1 row, 1
# block, 2 blocks (65), an odd block count (129: 3, 2100: 9, with a dummy block
# in the schedule), ragged last blocks (513: 8 x 65 + 58; 1026; 2049: 9 x 228 + 225)
# and widths that are not a multiple of the vector width.
SYM_SIZES = [(1, 3), (2, 5), (3, 1), (65, 17), (129, 64), (513, 33), (1026, 64), (2049, 19), (2100, 8)]
# Every path of a tile: the shared shift from the norm bound (normalised, 1/T <= 30);
# the max pass then a shared tile max, or a shift per row and per column where the
# positives (cos ~ 0.9 at 1/T = 100) or unnormalised rows (|x| ~ 1e3) spread too wide;
# the backward's one- and two-exponential weights likewise.
SYM_CASES = [(2.0, True), (100.0, True), (10.0, False)]
ISAS = ["base", "avx2", "avx512"]


def _sym_inputs(m, d, normalize, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    half = (m + 1) // 2
    a = torch.randn(half, d, generator=g, dtype=torch.float64)
    z = torch.cat([a, a + 0.5 * torch.randn(half, d, generator=g, dtype=torch.float64)])[:m]  # correlated pairs
    z = torch.nn.functional.normalize(z, dim=1) if normalize else 3.0 * z
    return z.to(dtype)


def _sym_oracle(z, inv_temp, grad):
    z64 = z.double().requires_grad_()
    lse = reference.nt_xent_lse(z64, z64, torch.arange(z.shape[0]), inv_temp)
    lse.backward(grad)
    return lse.detach(), z64.grad


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="sslops._C not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("inv_temp,normalize", SYM_CASES, ids=["bound", "lowT", "unnormalised"])
@pytest.mark.parametrize("m,d", SYM_SIZES)
def test_sym_cpu_kernels_match_float64(monkeypatch, isa, dtype, inv_temp, normalize, m, d):
    monkeypatch.setenv("SSLOPS_CPU_ISA", isa)  # caps the ISA of the element loops (a lower one always runs)
    z = _sym_inputs(m, d, normalize, dtype, seed=m * 7 + d)
    grad = torch.rand(m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    lse = torch.ops.sslops.nt_xent_lse_sym(z, inv_temp)
    gz = torch.ops.sslops.nt_xent_lse_backward_sym(grad.to(dtype), z, lse, inv_temp)
    ref, ref_grad = _sym_oracle(z, inv_temp, grad)
    assert lse.dtype == dtype and gz.dtype == dtype
    if m == 1:  # no candidate: lse -inf, gradient exactly 0
        assert lse.isneginf().all() and torch.equal(gz, torch.zeros_like(gz))
        return
    # fp32 logits carry ~1e-7 relative error of their size, |z|^2 inv_temp.
    size = inv_temp * z.double().square().sum(1).max().item()
    tol = (2e-7 if dtype == torch.float32 else 1e-13) * max(1.0, size) * 10
    torch.testing.assert_close(lse.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gz.double(), ref_grad, rtol=tol, atol=tol * max(1.0, ref_grad.abs().max().item()))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="sslops._C not built")
@pytest.mark.parametrize("isa", ISAS)
def test_sym_cpu_kernels_one_hot_softmax_at_large_logits(monkeypatch, isa):
    """Logits ~ 6e4 (unnormalised, T = 0.01): the softmax is one-hot and the exact
    gradient ~0, so the backward must see each logit x_ij with the bits the
    forward's lse saw -- exp(rounding of x) ~ 1 +- 4e-3 otherwise.  Every ISA build
    (an FMA contracting x * inv_temp - lse in one of them failed this)."""
    monkeypatch.setenv("SSLOPS_CPU_ISA", isa)
    for n in (17, 200):  # one diagonal tile; 4 blocks of 100
        z1, z2 = _views(n, 64, scale=3.0, seed=7)
        kwargs = dict(temperature=0.01, normalize=False, reduction="none")
        _check(sslops.nt_xent, reference.nt_xent, (z1, z2), kwargs, "cpu", 100.0, scale=64 * 9.0)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="sslops._C not built")
@pytest.mark.parametrize("inv_temp,normalize", SYM_CASES, ids=["bound", "lowT", "unnormalised"])
def test_sym_cpu_kernels_bitwise_equal_across_threads(inv_temp, normalize):
    """The tiles' rounds fix every row's accumulation order: 1 and 2 threads give
    the same bits, and so do repeated calls."""
    z = _sym_inputs(1026, 64, normalize, torch.float32, seed=1)
    grad = torch.rand(1026)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            lse = torch.ops.sslops.nt_xent_lse_sym(z, inv_temp)
            runs.append((lse, torch.ops.sslops.nt_xent_lse_backward_sym(grad, z, lse, inv_temp)))
    finally:
        torch.set_num_threads(before)
    for lse, gz in runs[1:]:
        assert torch.equal(lse, runs[0][0]) and torch.equal(gz, runs[0][1])


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="sslops._C not built")
def test_sym_cpu_kernels_isas_agree_and_differ(monkeypatch):
    """The three element-loop builds agree to rounding, and really are different
    code (libm's exp, 8- and 16-lane sums), so each ISA case above ran its own."""
    z = _sym_inputs(513, 33, True, torch.float32, seed=2)
    grad = torch.rand(513)
    outs = {}
    for isa in ISAS:
        monkeypatch.setenv("SSLOPS_CPU_ISA", isa)
        lse = torch.ops.sslops.nt_xent_lse_sym(z, 2.0)
        outs[isa] = (lse, torch.ops.sslops.nt_xent_lse_backward_sym(grad, z, lse, 2.0))
    for isa in ISAS[1:]:
        torch.testing.assert_close(outs[isa][0], outs["base"][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outs[isa][1], outs["base"][1], rtol=1e-5, atol=1e-7)

    def same(a, b):
        return torch.equal(outs[a][0], outs[b][0]) and torch.equal(outs[a][1], outs[b][1])

    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert not same("avx2", "base")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not same("avx512", "avx2")


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="sslops._C not built")
def test_sym_forward_has_its_own_cpu_kernel():
    # nt_xent's cpu backend goes through nt_xent_lse_sym: its CPU kernel, not the
    # device-generic one that calls nt_xent_lse with exclude = arange(M).
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sslops::nt_xent_lse_sym", "CPU")


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    z1, z2 = _views(17, 32, seed=4)
    neg = torch.randn(11, 32)

    def step(a, b, c):
        return sslops.nt_xent(a, b, 0.1, backend=backend) + sslops.info_nce(a, b, c, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    a1, b1 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    a2, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    out_c = compiled(a1, b1, neg)
    out_e = step(a2, b2, neg)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward(), out_e.backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


def test_module_matches_function():
    z1, z2 = _views(8, 16)
    crit = sslops.NTXentLoss(temperature=0.3)
    torch.testing.assert_close(crit(z1, z2), sslops.nt_xent(z1, z2, 0.3))
    crit = sslops.InfoNCELoss(temperature=0.3)
    torch.testing.assert_close(crit(z1, z2), sslops.info_nce(z1, z2, temperature=0.3))


def test_matches_lightly_if_installed():
    loss_mod = pytest.importorskip("lightly.loss")
    z1, z2 = _views(31, 24)
    for t in (0.1, 0.5):
        expected = loss_mod.NTXentLoss(temperature=t)(z1, z2)
        torch.testing.assert_close(sslops.NTXentLoss(temperature=t)(z1, z2), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- backends
def test_backends_listing():
    assert sslops.backends("nt_xent", "cpu")[-1] == "reference"
    assert "cuda" not in sslops.backends("nt_xent", "cpu")
    if sslops._backend.compiled_available():
        assert "cpu" in sslops.backends("nt_xent", "cpu")
    if sslops._backend.triton_importable() and os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in sslops.backends("nt_xent", "cpu")
    with pytest.raises(ValueError, match="unknown op"):
        sslops.backends("no_such_op")


def test_explicit_backend_that_cannot_run_raises():
    z1, z2 = _views(4, 8)
    with pytest.raises(ValueError, match="'cuda'"):
        sslops.nt_xent(z1, z2, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        sslops.nt_xent(z1, z2, backend="fastest")


def test_env_backend_override(monkeypatch):
    z1, z2 = _views(4, 8)
    monkeypatch.setenv("SSLOPS_BACKEND", "reference")
    assert sslops._backend.resolve("nt_xent", "auto", torch.device("cpu")) == "reference"
    assert sslops._backend.resolve("nt_xent", "cpu", torch.device("cpu")) == "cpu" or not sslops._backend.compiled_available()
    monkeypatch.setenv("SSLOPS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SSLOPS_BACKEND"):
        sslops.nt_xent(z1, z2)
    monkeypatch.setenv("SSLOPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SSLOPS_BACKEND"):
        sslops.nt_xent(z1, z2)


def test_auto_matches_reference():
    z1, z2 = _views(40, 16)
    torch.testing.assert_close(sslops.nt_xent(z1, z2), sslops.nt_xent(z1, z2, backend="reference"))
    if sslops._backend.compiled_available():
        assert sslops._backend.resolve("nt_xent", "auto", torch.device("cpu")) == "cpu"


def test_cuda_kernels_registered_in_cuda_build():
    if not sslops._backend.compiled_available():
        pytest.skip("sslops._C not built")
    if os.environ.get("SSLOPS_CUDA") == "1":  # CI builds the CUDA kernels without a GPU
        assert sslops.cuda_built()
    if not sslops.cuda_built():
        pytest.skip("CPU-only build")
    for op in ("nt_xent_lse", "nt_xent_lse_backward", "nt_xent_lse_backward_sym"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sslops::{op}", "CUDA"), op


# ---------------------------------------------------------------- bad input
BAD_CALLS = [
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(5, 8)), ValueError, "same shape"),
    (lambda: sslops.nt_xent(torch.randn(4, 8, 2), torch.randn(4, 8, 2)), ValueError, "z1 must be 2-D"),
    (lambda: sslops.nt_xent(torch.randn(0, 8), torch.randn(0, 8)), ValueError, "empty batch"),
    (lambda: sslops.nt_xent(torch.randn(4, 0), torch.randn(4, 0)), ValueError, "D = 0"),
    (lambda: sslops.nt_xent(torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long)), TypeError, "z1 must be a floating"),
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64)), TypeError, "same dtype"),
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0), ValueError, "temperature"),
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=-1), ValueError, "temperature"),
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=float("nan")), ValueError, "temperature"),
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=float("inf")), ValueError, "temperature"),
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature="0.5"), TypeError, "temperature"),
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8), reduction="avg"), ValueError, "reduction"),
    (lambda: sslops.nt_xent([[1.0]], torch.randn(1, 1)), TypeError, "z1 must be a torch.Tensor"),
    (lambda: sslops.info_nce(torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 7)), ValueError, "negatives must have width"),
    (lambda: sslops.info_nce(torch.randn(4, 8), torch.randn(4, 8), torch.randn(0, 8)), ValueError, "negatives is empty"),
    (lambda: sslops.info_nce(torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8, dtype=torch.float64)), TypeError, "same dtype"),
    (lambda: sslops.info_nce(torch.randn(4, 8), torch.randn(3, 8)), ValueError, "same shape"),
    (lambda: sslops.NTXentLoss(temperature=0), ValueError, "temperature"),
    (lambda: sslops.NTXentLoss(backend="gpu"), ValueError, "backend"),
    (lambda: sslops.NTXentLoss(0.5, 4096), ValueError, "memory_bank_size"),
    # truthy non-bools (e.g. the string "False" from a config file) used to switch the flag on
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8), normalize="False"), TypeError,
     "normalize must be a bool, got str"),
    (lambda: sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8), gather_distributed=1), TypeError,
     "gather_distributed must be a bool, got int"),
    (lambda: sslops.info_nce(torch.randn(4, 8), torch.randn(4, 8), normalize=None), TypeError,
     "normalize must be a bool, got NoneType"),
    (lambda: sslops.info_nce(torch.randn(4, 8), torch.randn(4, 8), gather_distributed="no"), TypeError,
     "gather_distributed must be a bool, got str"),
    (lambda: sslops.NTXentLoss(0.5, gather_distributed="yes"), TypeError, "gather_distributed must be a bool"),
    (lambda: sslops.NTXentLoss(0.5, normalize="False"), TypeError, "normalize must be a bool"),
    (lambda: sslops.InfoNCELoss(0.5, normalize="False"), TypeError, "normalize must be a bool"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("t", [1e-38, 1e-45, 5e-324, 2.0 ** -65])
def test_temperature_whose_inverse_overflows_is_refused(t):
    # 1/T overflows float32 logits (or even double): a ValueError naming temperature,
    # never inf/NaN or a C++ error about inv_temp.
    z1, z2 = _views(4, 8)
    for call in (lambda: sslops.nt_xent(z1, z2, temperature=t),
                 lambda: sslops.info_nce(z1, z2, temperature=t),
                 lambda: sslops.NTXentLoss(temperature=t)):
        with pytest.raises(ValueError, match="temperature must be >= 2\\*\\*-64"):
            call()


def test_smallest_accepted_temperature_gives_finite_loss():
    z1, z2 = _views(4, 8)
    out = sslops.nt_xent(z1, z2, temperature=2.0 ** -64, backend="reference")
    assert torch.isfinite(out)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="sslops._C not built")
def test_compiled_op_checks_its_arguments():
    q, c, _ = _lse_args(requires_grad=False)
    with pytest.raises(RuntimeError, match="exclude must have shape"):
        torch.ops.sslops.nt_xent_lse(q, c, torch.tensor([0]), 1.0)
    with pytest.raises(RuntimeError, match="same width"):
        torch.ops.sslops.nt_xent_lse(q, c[:, :3], None, 1.0)
    with pytest.raises(RuntimeError, match="inv_temp"):
        torch.ops.sslops.nt_xent_lse(q, c, None, -1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.sslops.nt_xent_lse(q.half(), c.half(), None, 1.0)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="same device"):
        sslops.nt_xent(torch.randn(4, 8), torch.randn(4, 8, device="cuda"))


# ---------------------------------------------------------------- GPU (and the CUDA kernels emulated on the CPU)
GPU_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")]
GPU_SIZES = [(1, 1), (3, 3), (17, 130), (513, 64), (4096, 128)]
# Under the emulator (backend "emu", CPU tensors): the CPU tests' sizes, which
# cover tails (1, 3, 17, 130), several 64-row tiles and splits (513 -> 1026
# rows), multi-chunk D for every dtype (130 > 128 halves > 64 floats > 32
# doubles), on an emulated H100 and A100 (different SM counts -> splits).
EMU_CASES = [(1, 1, "h100"), (2, 3, "a100"), (3, 64, "h100"), (17, 130, "a100"), (130, 3, "h100"), (513, 64, "h100"),
             (513, 64, "a100")]
GPU_CASES = [pytest.param(b, n, d, None, marks=GPU_ONLY, id=f"{b}-{n}x{d}") for b in ("cuda", "triton")
             for n, d in GPU_SIZES] + [pytest.param("emu", n, d, dev, marks=pytest.mark.emu, id=f"emu-{dev}-{n}x{d}")
                                       for n, d, dev in EMU_CASES]


def _gpu_device(backend, emu_device):
    """The tensors' device and a context with the emulated GPU chosen (emu)."""
    if backend == "emu":
        from sslops import _emu

        return "cpu", _emu.emulated_device(emu_device)
    return "cuda", contextlib.nullcontext()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("backend,n,d,emu_device", GPU_CASES)
def test_gpu_backends_match_float64(backend, dtype, n, d, emu_device):
    device, emulated = _gpu_device(backend, emu_device)
    if backend == "emu":
        assert "emu" in sslops.backends("nt_xent", device, dtype)
    elif backend not in sslops.backends("nt_xent", device, dtype):
        pytest.skip(f"{backend} not available for {dtype}")
    launches = _emu_launches(backend)
    with emulated:
        _check_gpu_backend(backend, device, dtype, n, d)
    assert _emu_launches(backend) > launches  # the emulated kernels really ran


def _emu_launches(backend):
    if backend != "emu":
        return -1
    from sslops import _emu

    return _emu.stats()["launches"]


def _check_gpu_backend(backend, device, dtype, n, d):
    z1, z2 = _views(n, d, dtype=dtype, device=device, seed=n + d)
    upstream = torch.rand(2 * n, dtype=torch.float64, device=device)
    for t in (0.01, 0.5):
        out, grads = _run(sslops.nt_xent, (z1, z2), dict(temperature=t, reduction="none", backend=backend), upstream)
        # the oracle sees the same (rounded) inputs, in float64
        ref, ref_grads = _oracle(reference.nt_xent, (z1, z2), dict(temperature=t, reduction="none"), upstream)
        tol = (2e-5 if dtype in (torch.float32, torch.float64) else 2e-2) * max(1.0, 1 / t)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol)
    q, key = z1, z2
    neg = torch.randn(257, d, device=device, dtype=dtype)
    out, grads = _run(sslops.info_nce, (q, key, neg), dict(reduction="none", backend=backend))
    ref, ref_grads = _oracle(reference.info_nce, (q, key, neg), dict(reduction="none"))
    tol = (2e-5 if dtype in (torch.float32, torch.float64) else 2e-2) / 0.07
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,n,d", [pytest.param("cuda", 1000, 128, marks=GPU_ONLY),
                                         pytest.param("emu", 200, 64, marks=pytest.mark.emu)])
def test_gpu_deterministic(backend, n, d):
    device = "cpu" if backend == "emu" else "cuda"
    if backend == "cuda" and "cuda" not in sslops.backends("nt_xent", "cuda"):
        pytest.skip("cuda backend not available")
    z1, z2 = _views(n, d, device=device)
    runs = [_run(sslops.nt_xent, (z1, z2), dict(backend=backend)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_emu_many_negatives_take_one_split_per_tile(dtype):
    """64 queries x 2560 negatives: one row block against 40 tiles.  Two waves
    of an H100 (2 x 132 SMs x 3 blocks) want far more splits than 40, so the
    forward and the row pass of the backward split the streamed range into
    one tile per split (a fixed cap of 16 used to leave 14 blocks); the
    40-way split reduction must still match float64."""
    from sslops import _emu

    ops = torch.ops.sslops_emu
    g = torch.Generator().manual_seed(5)
    n_tiles, d, inv_temp = 40, 32, 1 / 0.2
    q = torch.nn.functional.normalize(torch.randn(64, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    c = torch.nn.functional.normalize(torch.randn(64 * n_tiles, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    exclude = torch.arange(64) * 7  # row i leaves out column 7 i
    grad = torch.rand(64, generator=g, dtype=torch.float64)
    with _emu.emulated_device("h100"):
        blocks = _emu.stats()["blocks"]
        lse = ops.nt_xent_lse(q, c, exclude, inv_temp)
        assert _emu.stats()["blocks"] - blocks == n_tiles + 1  # 40 tile blocks + 1 reduction block
        gq, gc = ops.nt_xent_lse_backward(grad.float(), q, c, exclude, lse, inv_temp)
    q64, c64 = q.double().requires_grad_(), c.double().requires_grad_()
    logits = (q64 @ c64.T) * inv_temp
    logits = logits.masked_fill(torch.nn.functional.one_hot(exclude, c.shape[0]).bool(), float("-inf"))
    ref = torch.logsumexp(logits, dim=1)
    ref.backward(grad)
    tol = 2e-5 * inv_temp if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(gq.double(), q64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(gc.double(), c64.grad, rtol=tol, atol=tol)


# ---------------------------------------------------------------- distributed (2 gloo processes)
def _ddp_worker(rank, world, init_file, backend, n, d, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z1_all, z2_all = _views(world * n, d, dtype=torch.float64, seed=123)
        z1 = z1_all[rank * n:(rank + 1) * n].clone().requires_grad_()
        z2 = z2_all[rank * n:(rank + 1) * n].clone().requires_grad_()
        per_anchor = sslops.nt_xent(z1, z2, 0.2, gather_distributed=True, reduction="none", backend=backend)
        loss = sslops.nt_xent(z1, z2, 0.2, gather_distributed=True, backend=backend)
        loss.backward()
        torch.save({"per_anchor": per_anchor.detach(), "loss": loss.detach(), "g1": z1.grad, "g2": z2.grad},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_gather_distributed_two_gloo_processes(backend, tmp_path):
    """Each rank's loss is the mean over its own anchors against all ranks'
    candidates; gradients flow back across ranks, so the DDP average of the
    per-rank gradients equals the gradient of the full-batch loss."""
    import torch.multiprocessing as mp

    world, n, d = 2, 5, 8
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), backend, n, d, str(tmp_path)), nprocs=world)
    z1_all, z2_all = _views(world * n, d, dtype=torch.float64, seed=123)
    z1_all.requires_grad_(), z2_all.requires_grad_()
    full = reference.nt_xent(z1_all, z2_all, 0.2, reduction="none")
    full.mean().backward()
    half = world * n
    losses = []
    for rank in range(world):
        r = torch.load(tmp_path / f"{rank}.pt")
        rows = slice(rank * n, (rank + 1) * n)
        own = torch.cat([full[:half][rows], full[half:][rows]]).detach()
        torch.testing.assert_close(r["per_anchor"], own)
        torch.testing.assert_close(r["loss"], own.mean())
        # DDP averages gradients over ranks: grad / world == full-batch gradient.
        torch.testing.assert_close(r["g1"] / world, z1_all.grad[rows])
        torch.testing.assert_close(r["g2"] / world, z2_all.grad[rows])
        losses.append(r["loss"])
    torch.testing.assert_close(torch.stack(losses).mean(), full.mean().detach())


def test_backends_reflect_dtype_limits():
    # The Triton kernels keep fp32 state and use fp32/fp16/bf16 dot products:
    # float64 never goes to them, and the interpreter (numpy) has no bfloat16.
    assert "triton" not in sslops.backends("nt_xent", "cpu", torch.float64)
    assert "triton" not in sslops.backends("info_nce", "cpu", torch.bfloat16)
    assert sslops.backends("nt_xent", "cpu", torch.float64)[-1] == "reference"
    if "triton" in sslops.backends("nt_xent", "cpu"):
        z = torch.randn(5, 8, dtype=torch.float64)
        for dtype in (torch.float64, torch.bfloat16):
            with pytest.raises(ValueError, match=str(dtype).replace("torch.", "")):
                sslops.nt_xent(z.to(dtype), z.to(dtype), backend="triton")
            with pytest.raises(ValueError, match="triton"):
                sslops.info_nce(z.to(dtype), z.to(dtype), backend="triton")


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in sslops.backends("nt_xent", "cpu", torch.float16)])
@pytest.mark.parametrize("sym", [True, False], ids=["nt_xent", "info_nce"])
def test_half_backward_does_not_underflow(backend, sym):
    # reduction="mean" over 2N rows gives g = 1/(2N) and softmax weights p ~ 1/(2N):
    # g * p ~ 2.4e-7 at 2N = 2048 is an fp16 subnormal (a few bits left, or 0 beyond
    # 2N ~ 4096) unless the kernels scale the weights before the fp16 dot.
    z1, z2 = _views(1024, 16, dtype=torch.float16, seed=5)
    fn, ref_fn = (sslops.nt_xent, reference.nt_xent) if sym else (sslops.info_nce, reference.info_nce)
    out, grads = _run(fn, (z1, z2), dict(temperature=0.5, backend=backend))
    _, ref_grads = _oracle(ref_fn, (z1, z2), dict(temperature=0.5))
    for g, rg in zip(grads, ref_grads):
        # fp16 inputs: ~6.5e-4 of the largest entry (cpu, scaled triton); 1.5e-3 unscaled
        torch.testing.assert_close(g.double(), rg, rtol=0, atol=1e-3 * rg.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sym", [True, False], ids=["nt_xent", "info_nce"])
def test_double_backward_matches_reference(backend, sym):
    # create_graph=True: second-order gradients (e.g. a gradient penalty) are exact,
    # never the silent zeros of a backward kernel without a derivative.
    z1, z2 = _views(9, 5, dtype=torch.float64 if backend != "triton" else torch.float32, seed=2)
    fn, ref_fn = (sslops.nt_xent, reference.nt_xent) if sym else (sslops.info_nce, reference.info_nce)

    def penalty(f, **kw):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        ga, gb = torch.autograd.grad(f(a, b, temperature=0.3, **kw), (a, b), create_graph=True)
        return torch.autograd.grad((ga.square().sum() + gb.square().sum()), (a, b))

    got, want = penalty(fn, backend=backend), penalty(ref_fn)
    for g, w in zip(got, want):
        assert w.abs().max() > 1e-3  # the second-order term is not trivially zero
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _same_special_values(out, ref, what):
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN pattern {out} vs reference {ref}"
    assert torch.equal(out.isposinf(), ref.isposinf()) and torch.equal(out.isneginf(), ref.isneginf()), \
        f"{what}: inf pattern {out} vs reference {ref}"
    fin = ref.isfinite()
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", [b for b in CPU_AND_EMU if b != "reference"])
def test_nan_and_inf_propagate_like_the_reference(backend):
    # A NaN in the negatives queue must not give a "perfect" loss of 0 (lse = -inf):
    # every anchor sees it, so every loss is NaN, as in the reference.
    q, k = _views(5, 8, seed=4)
    queue = torch.randn(7, 8)
    queue[3, 2] = float("nan")
    for reduction in ("none", "mean"):
        kw = dict(temperature=0.1, reduction=reduction)
        _same_special_values(sslops.info_nce(q, k, queue, backend=backend, **kw),
                             sslops.info_nce(q, k, queue, backend="reference", **kw), f"info_nce {reduction}")
    # One NaN row in z1: nt_xent rows all see it.
    z1, z2 = _views(6, 8, seed=5)
    z1[2, 0] = float("nan")
    kw = dict(temperature=0.2, reduction="none")
    _same_special_values(sslops.nt_xent(z1, z2, backend=backend, **kw),
                         sslops.nt_xent(z1, z2, backend="reference", **kw), "nt_xent NaN row")
    # normalize=False: logits overflowing to +inf give lse = +inf (loss +inf or NaN
    # as in the reference), never -inf.
    z1, z2 = _views(6, 8, seed=6)
    z1[1] = 1e20
    z1[4] = 1e20
    kw = dict(temperature=0.5, normalize=False, reduction="none")
    _same_special_values(sslops.nt_xent(z1, z2, backend=backend, **kw),
                         sslops.nt_xent(z1, z2, backend="reference", **kw), "nt_xent +inf logits")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_meta_tensors_give_shapes(backend):
    # auto picks reference on meta; its boolean-index exclusion was a NotImplementedError there (nonzero)
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    z1 = m(5, 8).requires_grad_()
    loss = sslops.nt_xent(z1, m(5, 8), backend=backend)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert z1.grad.shape == (5, 8) and z1.grad.device.type == "meta"
    assert sslops.nt_xent(m(5, 8), m(5, 8), reduction="none", backend=backend).shape == (10,)
    assert sslops.info_nce(m(5, 8), m(5, 8), reduction="none", backend=backend).shape == (5,)
    assert sslops.info_nce(m(5, 8), m(5, 8), m(7, 8), reduction="none", backend=backend).shape == (5,)

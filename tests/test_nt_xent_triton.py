"""Triton NT-Xent log-sum-exp kernels vs a float64 torch reference.

Without a GPU the kernels run on CPU through the Triton interpreter
(TRITON_INTERPRET=1, fp32 only; set here when unset, like tests/conftest.py does).
With a GPU and TRITON_INTERPRET unset or 0 they run on CUDA, and fp16 / bf16 are
tested too.

Tolerances are elementwise and derived from the magnitudes involved: an fp32
logit x_ij = inv_temp * <q_i, c_j> carries an error of about
sqrt(D) * eps * inv_temp * <|q_i|, |c_j|>, which becomes a relative error of the
softmax weights A_ij; the gradient bounds are inv_temp * (|A| * rel) @ |c| etc.
"""
import os

# Must happen before triton kernels are first imported.  Only without a GPU: setting
# it on a GPU machine would send every later-imported Triton kernel to the interpreter.
if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # torch missing: skipped below
        pass

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from sslops.triton_kernels import nt_xent as tk  # noqa: E402

# TRITON_INTERPRET is read when @triton.jit runs, i.e. when the kernel module is first
# imported (possibly earlier in the session, by another test module): ask the kernels.
try:
    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(tk._nt_xent_lse_fwd_kernel, InterpretedFunction)
except ImportError:  # pragma: no cover - other triton layouts
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip(
        "Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set before triton kernels are "
        "first imported (export it before starting pytest)",
        allow_module_level=True,
    )

EPS32 = torch.finfo(torch.float32).eps
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------
# Helpers: inputs, float64 reference, tolerance
# ----------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows(n, d, gen, norm=1.0):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm


def _exclude(mode, M, Kc, gen):
    if mode == "none":
        return None
    if mode == "diag":
        ar = torch.arange(M)
        return torch.where(ar < Kc, ar, torch.full_like(ar, -1))
    assert mode == "random"
    return torch.randint(-1, Kc, (M,), generator=gen)  # includes some -1


def _excluded_mask(M, Kc, exclude):
    mask = torch.zeros(M, Kc, dtype=torch.bool)
    if exclude is not None:
        exclude = exclude.cpu()
        r = (exclude >= 0).nonzero().squeeze(1)
        mask[r, exclude[r]] = True
    return mask


def reference(q, c, exclude, inv_temp, grad_lse):
    """float64 lse, grad_q, grad_c (autograd) and the weights A (M, Kc)."""
    M, Kc = q.shape[0], c.shape[0]
    q64 = q.detach().cpu().double().requires_grad_()
    c64 = c.detach().cpu().double().requires_grad_()
    g64 = grad_lse.detach().cpu().double()
    mask = _excluded_mask(M, Kc, exclude)
    x = (q64 @ c64.T * inv_temp).masked_fill(mask, NEG_INF)
    alive = ~mask.all(dim=1)  # rows with at least one column left
    lse = torch.full((M,), NEG_INF, dtype=torch.float64)
    A = torch.zeros(M, Kc, dtype=torch.float64)
    if alive.any():
        lse_alive = torch.logsumexp(x[alive], dim=1)
        (lse_alive * g64[alive]).sum().backward()
        lse[alive] = lse_alive.detach()
        with torch.no_grad():
            A[alive] = g64[alive, None] * torch.exp(x[alive] - lse_alive[:, None])
    gq = q64.grad if q64.grad is not None else torch.zeros_like(q64)
    gc = c64.grad if c64.grad is not None else torch.zeros_like(c64)
    return lse, gq.detach(), gc.detach(), A


def error_bounds(q, c, inv_temp, A, eps_io=EPS32):
    """Per-row logit error bound (M,) and elementwise bounds for grad_q, grad_c.

    eps_io: unit roundoff of the input/output dtype (A is cast to it before the second dot).
    """
    q64 = q.detach().cpu().double().abs()
    c64 = c.detach().cpu().double().abs()
    D = q.shape[1]
    # |error of x_ij| <~ sqrt(D) eps inv_temp <|q_i|, |c_j|>; x2 margin, fp32 accumulation.
    err_x = (2 * math.sqrt(D) + 4) * EPS32 * inv_temp * (q64 @ c64.T).amax(dim=1)  # (M,)
    # relative error of A_ij: x_ij and lse_i errors, exp, cast of A, sums
    rel = 4 * err_x + 8 * eps_io + 1e-5  # (M,)
    absA = A.abs() * rel[:, None]
    bound_q = inv_temp * absA @ c64
    bound_c = inv_temp * absA.T @ q64
    floor = 1e-7 * inv_temp * max(A.abs().max().item(), 1e-30) * max(q64.max().item(), c64.max().item(), 1e-30)
    return err_x, bound_q + floor, bound_c + floor


def assert_within(actual, expected, bound, what):
    actual = actual.detach().cpu().double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs()
    bad = err > bound
    if bad.any():
        i = (err / bound).flatten().argmax().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} / {err.numel()} elements out of bounds; worst at flat {i}: "
            f"got {actual.flatten()[i].item():.9g}, expected {expected.flatten()[i].item():.9g}, "
            f"err {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}"
        )


def assert_lse(lse, ref, err_x, what="lse"):
    lse = lse.detach().cpu().double()
    assert lse.shape == ref.shape
    dead = torch.isinf(ref)
    assert torch.equal(torch.isneginf(lse), dead), f"{what}: -inf pattern differs"
    if (~dead).any():
        bound = 2 * err_x + 1e-6 * ref.abs() + 1e-6
        assert_within(lse[~dead], ref[~dead], bound[~dead], what)


def check_general(q, c, exclude, inv_temp, grad_lse, eps_io=EPS32):
    """Run forward + backward kernels and compare to the reference. Returns kernel outputs."""
    lse = tk.nt_xent_lse(q, c, exclude, inv_temp)
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0],)
    ref_lse, ref_gq, ref_gc, A = reference(q, c, exclude, inv_temp, grad_lse)
    err_x, bq, bc = error_bounds(q, c, inv_temp, A, eps_io)
    assert_lse(lse, ref_lse, err_x)

    gq, gc = tk.nt_xent_lse_backward(grad_lse, q, c, exclude, lse, inv_temp)
    assert gq.dtype == q.dtype and gc.dtype == c.dtype
    assert gq.shape == q.shape and gc.shape == c.shape
    assert_within(gq, ref_gq, bq, "grad_q")
    assert_within(gc, ref_gc, bc, "grad_c")
    return lse, gq, gc, (ref_gq, ref_gc, bq, bc)


# ----------------------------------------------------------------------------------------
# General (q, c, exclude) forward + backward
# ----------------------------------------------------------------------------------------
# (M, Kc, D): M, Kc in {1, 3, 17, 130}, D in {1, 3, 64, 130}; not the full cross product.
SHAPES = [
    (1, 1, 1),
    (1, 17, 3),
    (3, 1, 64),
    (3, 3, 130),
    (17, 3, 1),
    (17, 17, 64),
    (17, 130, 3),
    (3, 130, 1),
    (130, 3, 64),
    (130, 17, 130),
    (130, 130, 64),
]
TEMPS = [2.0, 10.0, 100.0]
MODES = ["none", "random", "diag"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse_and_backward(shape, mode):
    M, Kc, D = shape
    seed = SHAPES.index(shape) * 10 + MODES.index(mode)
    inv_temp = TEMPS[seed % len(TEMPS)]
    gen = _gen(seed)
    # normalised rows for the large temperature, raw gaussians otherwise
    if inv_temp == 100.0:
        q, c = _rows(M, D, gen), _rows(Kc, D, gen)
    else:
        q = torch.randn(M, D, generator=gen, dtype=torch.float64)
        c = torch.randn(Kc, D, generator=gen, dtype=torch.float64)
    q, c = q.float().to(DEVICE), c.float().to(DEVICE)
    exclude = _exclude(mode, M, Kc, gen)
    exclude = exclude.to(DEVICE) if exclude is not None else None
    grad_lse = torch.randn(M, generator=gen).to(DEVICE)
    check_general(q, c, exclude, inv_temp, grad_lse)


@pytest.mark.parametrize("inv_temp", TEMPS)
def test_all_columns_excluded_rows(inv_temp):
    # Kc = 1: rows excluding column 0 have no column left -> lse = -inf, no NaN anywhere.
    gen = _gen(1)
    q = torch.randn(5, 7, generator=gen).to(DEVICE)
    c = torch.randn(1, 7, generator=gen).to(DEVICE)
    exclude = torch.tensor([0, -1, 0, -1, 0], device=DEVICE)
    grad_lse = torch.randn(5, generator=gen).to(DEVICE)
    lse, gq, gc, _ = check_general(q, c, exclude, inv_temp, grad_lse)
    assert torch.isneginf(lse[[0, 2, 4]].cpu()).all() and torch.isfinite(lse[[1, 3]].cpu()).all()
    assert (gq[[0, 2, 4]] == 0).all()
    # every row excluded
    exclude = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    lse, gq, gc, _ = check_general(q, c, exclude, inv_temp, grad_lse)
    assert torch.isneginf(lse.cpu()).all() and (gq == 0).all() and (gc == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_stability_unnormalised_large_logits(mode):
    # inv_temp = 100 with row norms ~10: logits up to ~1e4 (naive exp overflows).
    M, Kc, D = 40, 70, 48
    gen = _gen(7)
    norms_q = 8 + 4 * torch.rand(M, 1, generator=gen, dtype=torch.float64)
    norms_c = 8 + 4 * torch.rand(Kc, 1, generator=gen, dtype=torch.float64)
    q = (_rows(M, D, gen) * norms_q).float().to(DEVICE)
    c = (_rows(Kc, D, gen) * norms_c).float().to(DEVICE)
    c[:5] = q[:5]  # a few exact positives: logits ~ 1e4
    exclude = _exclude(mode, M, Kc, gen)
    exclude = exclude.to(DEVICE) if exclude is not None else None
    grad_lse = torch.randn(M, generator=gen).to(DEVICE)
    lse, gq, gc, _ = check_general(q, c, exclude, 100.0, grad_lse)
    assert lse.abs().max().item() > 5e3


def test_noncontiguous_inputs():
    M, Kc, D = 33, 70, 40
    gen = _gen(3)
    q = torch.randn(D, M, generator=gen).to(DEVICE).T  # (M, D), strides (1, M)
    c = torch.randn(Kc, 2 * D + 1, generator=gen).to(DEVICE)[:, 1::2]  # (Kc, D), strides (2D+1, 2)
    assert not q.is_contiguous() and not c.is_contiguous()
    exclude = torch.randint(-1, Kc, (2 * M,), generator=gen).to(DEVICE)[::2]
    grad_lse = torch.randn(3 * M, generator=gen).to(DEVICE)[::3]
    inv_temp = 10.0

    lse = tk.nt_xent_lse(q, c, exclude, inv_temp)
    ref_lse, ref_gq, ref_gc, A = reference(q, c, exclude, inv_temp, grad_lse)
    err_x, bq, bc = error_bounds(q, c, inv_temp, A)
    assert_lse(lse, ref_lse, err_x)
    # same lse as from contiguous copies
    lse_c = tk.nt_xent_lse(q.contiguous(), c.contiguous(), exclude.contiguous(), inv_temp)
    torch.testing.assert_close(lse, lse_c, rtol=1e-6, atol=1e-5)

    lse_strided = torch.empty(2 * M, device=DEVICE)[::2]
    lse_strided.copy_(lse)
    gq, gc = tk.nt_xent_lse_backward(grad_lse, q, c, exclude, lse_strided, inv_temp)
    assert_within(gq, ref_gq, bq, "grad_q")
    assert_within(gc, ref_gc, bc, "grad_c")

    # grad_lse with stride 0 (what autograd passes for lse.sum())
    g0 = torch.full((1,), 0.7, device=DEVICE).expand(M)
    assert g0.stride(0) == 0
    gq0, gc0 = tk.nt_xent_lse_backward(g0, q, c, exclude, lse, inv_temp)
    _, rq0, rc0, A0 = reference(q, c, exclude, inv_temp, g0)
    _, bq0, bc0 = error_bounds(q, c, inv_temp, A0)
    assert_within(gq0, rq0, bq0, "grad_q (stride-0 grad)")
    assert_within(gc0, rc0, bc0, "grad_c (stride-0 grad)")

    # symmetric variant with a transposed z and strided grad / lse
    z = torch.randn(D, M, generator=gen).to(DEVICE).T
    diag = torch.arange(M, device=DEVICE)
    lse_z = tk.nt_xent_lse(z, z, diag, inv_temp)
    lse_zs = torch.empty(2 * M, device=DEVICE)[::2]
    lse_zs.copy_(lse_z)
    gz = tk.nt_xent_lse_backward_sym(grad_lse, z, lse_zs, inv_temp)
    _, rq, rc, Az = reference(z, z, diag, inv_temp, grad_lse)
    _, bzq, bzc = error_bounds(z, z, inv_temp, Az)
    assert_within(gz, rq + rc, bzq + bzc, "grad_z")


# ----------------------------------------------------------------------------------------
# Symmetric backward (q = c = z, exclude = diagonal)
# ----------------------------------------------------------------------------------------
SYM_CASES = [(1, 3, 10.0), (3, 130, 2.0), (17, 1, 100.0), (17, 64, 10.0), (130, 3, 100.0), (130, 130, 10.0)]


@pytest.mark.parametrize("M,D,inv_temp", SYM_CASES)
def test_backward_sym(M, D, inv_temp):
    gen = _gen(M * 1000 + D)
    z = _rows(M, D, gen).float().to(DEVICE) if inv_temp == 100.0 else torch.randn(M, D, generator=gen).to(DEVICE)
    diag = torch.arange(M, device=DEVICE)
    grad_lse = torch.randn(M, generator=gen).to(DEVICE)

    lse, gq, gc, (rq, rc, bq, bc) = check_general(z, z, diag, inv_temp, grad_lse)
    gz = tk.nt_xent_lse_backward_sym(grad_lse, z, lse, inv_temp)
    assert gz.dtype == z.dtype and gz.shape == z.shape
    # against the float64 reference ...
    assert_within(gz, rq + rc, bq + bc, "grad_z vs reference")
    # ... and against grad_q + grad_c of the general kernels
    assert_within(gz, (gq + gc).cpu().double(), 2 * (bq + bc), "grad_z vs general kernels")
    if M == 1:
        assert torch.isneginf(lse.cpu()).all() and (gz == 0).all()


# ----------------------------------------------------------------------------------------
# The GPU block configurations, exercised here as well (interpreter or GPU)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [(torch.float32, True), (torch.float32, False), (torch.float16, True),
                                 (torch.float16, False)], ids=["fp32", "fp32-unaligned", "fp16", "fp16-unaligned"])
@pytest.mark.parametrize("M,Kc,D", [(130, 150, 130), (70, 45, 64)])
def test_gpu_block_configs(monkeypatch, cfg, M, Kc, D):
    cfg_dtype, cfg_aligned = cfg

    def fake_config(kind, dtype, D, device, aligned=True):
        c = tk._gpu_config(kind, cfg_dtype, D, cfg_aligned)
        for b in (c.BLOCK_M, c.BLOCK_N, c.BLOCK_D):
            assert b >= 16 and b & (b - 1) == 0
        return c

    monkeypatch.setattr(tk, "_config", fake_config)
    gen = _gen(M + Kc + D)
    q = torch.randn(M, D, generator=gen).to(DEVICE)
    c = torch.randn(Kc, D, generator=gen).to(DEVICE)
    exclude = torch.randint(-1, Kc, (M,), generator=gen).to(DEVICE)
    grad_lse = torch.randn(M, generator=gen).to(DEVICE)
    check_general(q, c, exclude, 10.0, grad_lse)

    z = q
    diag = torch.arange(M, device=DEVICE)
    lse, _, _, (rq, rc, bq, bc) = check_general(z, z, diag, 10.0, grad_lse)
    gz = tk.nt_xent_lse_backward_sym(grad_lse, z, lse, 10.0)
    assert_within(gz, rq + rc, bq + bc, "grad_z")


def test_aligned_predicate():
    x = torch.randn(8, 32, device=DEVICE)
    assert tk._aligned(x)
    assert not tk._aligned(torch.randn(8, 30, device=DEVICE))  # row stride 30
    assert not tk._aligned(x.T.contiguous().T)  # column-major
    assert not tk._aligned(x[:, 1:])  # misaligned pointer


def test_large_d_tiled():
    # D = 1024 (tiled over D inside the kernels), few rows to stay fast in the interpreter.
    M, Kc, D = 5, 9, 1024
    gen = _gen(11)
    q = _rows(M, D, gen).float().to(DEVICE)
    c = _rows(Kc, D, gen).float().to(DEVICE)
    c[:3] = q[:3]
    exclude = torch.tensor([0, -1, 2, 8, -1], device=DEVICE)
    grad_lse = torch.randn(M, generator=gen).to(DEVICE)
    check_general(q, c, exclude, 100.0, grad_lse)


# ----------------------------------------------------------------------------------------
# 16-bit inputs (GPU only: the interpreter supports fp32 only)
# ----------------------------------------------------------------------------------------
@pytest.mark.skipif(DEVICE != "cuda", reason="fp16/bf16 need a GPU (interpreter is fp32 only)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,Kc,D", [(130, 257, 64), (300, 300, 200), (17, 5, 1024)])
def test_half_precision_gpu(dtype, M, Kc, D):
    gen = _gen(5)
    q = _rows(M, D, gen).to(dtype).to(DEVICE)
    c = _rows(Kc, D, gen).to(dtype).to(DEVICE)
    exclude = torch.randint(-1, Kc, (M,), generator=gen).to(DEVICE)
    grad_lse = torch.randn(M, generator=gen).to(DEVICE)
    eps = torch.finfo(dtype).eps
    check_general(q, c, exclude, 10.0, grad_lse, eps_io=eps)
    if Kc >= M:
        z = q
        diag = torch.arange(M, device=DEVICE)
        lse, _, _, (rq, rc, bq, bc) = check_general(z, z, diag, 10.0, grad_lse, eps_io=eps)
        gz = tk.nt_xent_lse_backward_sym(grad_lse, z, lse, 10.0)
        assert_within(gz, rq + rc, bq + bc, "grad_z")

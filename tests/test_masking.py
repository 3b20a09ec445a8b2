"""Tests of sslops.masking against transcriptions of MAE's reference code.

Gathers are copies, so values are compared bit for bit (torch.equal), against
both the op-dtype reference and a float64 transcription.  The Triton kernels
run in the interpreter without a GPU (fp32, small shapes).
"""

import contextlib

import pytest
import torch

import sslops
from sslops import _backend, reference
from sslops.masking import (
    gather_tokens_backward_triton,
    gather_tokens_triton,
    restore_tokens_backward_triton,
    restore_tokens_triton,
)

HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = [b for b in ("cpu", "triton", "reference") if b in sslops.backends("gather_tokens", "cpu")]
# The CUDA kernels on the CPU, under the CUDA emulator (csrc/emu): backend "emu", marked emu.
EMU = pytest.param("emu", marks=pytest.mark.emu)
CPU_AND_EMU = [*CPU_BACKENDS, EMU]
needs_triton = pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not importable / not interpreted")
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not (HAS_CUDA and _backend.cuda_built()), reason="needs a GPU and the CUDA build")


def test_backends_listed():
    assert "cpu" in sslops.backends("gather_tokens", "cpu")
    assert "reference" in sslops.backends("restore_tokens", "cpu")
    assert _backend.resolve("gather_tokens", "auto", torch.device("cpu")) == "cpu"


@needs_triton
def test_triton_dtype_limits_under_the_interpreter():
    """bf16 cannot run in the interpreter (numpy has none): refused with ValueError,
    fp64 runs (issue 9 item 5 applied to masking)."""
    for op in ("gather_tokens", "random_masking", "restore_tokens"):
        assert "triton" not in sslops.backends(op, "cpu", torch.bfloat16)
        assert "triton" in sslops.backends(op, "cpu", torch.float64)
    x = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"backend='triton' cannot run gather_tokens on bfloat16"):
        sslops.gather_tokens(x, ids, backend="triton")
    with pytest.raises(ValueError, match=r"cannot run random_masking on bfloat16 .*computes float32, float16"):
        sslops.random_masking(x, 0.5, backend="triton")
    with pytest.raises(ValueError, match="cannot run restore_tokens on bfloat16"):
        sslops.restore_tokens(x, _restore_ids(2, 6, torch.Generator().manual_seed(0)), x[0, 0], backend="triton")
    xd = x.double()
    assert torch.equal(sslops.gather_tokens(xd, ids, backend="triton"), sslops.gather_tokens(xd, ids, backend="cpu"))


def _ids(B, N, K, gen, dtype=torch.int64):
    return torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)]).to(dtype)


def _restore_ids(B, N, gen):
    noise = torch.rand(B, N, generator=gen)
    return torch.argsort(torch.argsort(noise, dim=1), dim=1)


def _mae_gather_f64(x, ids, pos, P):
    """float64 transcription: x + pos_embed in float64, then MAE's gather."""
    xd = x.double() + (pos.double() if pos is not None else 0)
    D = x.shape[2]
    picked = torch.gather(xd[:, P:], 1, ids.long().unsqueeze(-1).repeat(1, 1, D))
    return torch.cat([xd[:, :P], picked], dim=1)


# ----------------------------------------------------------------------------
# gather_tokens: values
# ----------------------------------------------------------------------------
SHAPES_L = [1, 7, 49, 50, 196, 197]
SHAPES_D = [1, 3, 130, 768]


@pytest.mark.parametrize("backend", ["cpu", EMU])
@pytest.mark.parametrize("L", SHAPES_L)
@pytest.mark.parametrize("D", SHAPES_D)
def test_gather_cpu_exact_odd_shapes(L, D, backend):
    gen = torch.Generator().manual_seed(L * 1000 + D)
    B = 3
    P = 1 if L > 1 else 0
    N = L - P
    K = max(1, int(N * 0.25)) if N else 0
    x = torch.randn(B, L, D, generator=gen)
    pos = torch.randn(1, L, D, generator=gen)
    ids = _ids(B, N, K, gen)
    for p in (None, pos):
        out = sslops.gather_tokens(x, ids, pos_embed=p, num_prefix_tokens=P, backend=backend)
        assert out.shape == (B, P + K, D)
        assert torch.equal(out, reference.gather_tokens(x, ids, p, P))
        assert torch.equal(out.double(), _mae_gather_f64(x, ids, p, P).float().double())


@needs_triton
@pytest.mark.parametrize("L,D", [(1, 1), (7, 3), (50, 130), (197, 3), (49, 768)])
def test_gather_triton_exact_odd_shapes(L, D):
    gen = torch.Generator().manual_seed(L * 1000 + D)
    B, P = 2, (1 if L > 1 else 0)
    N = L - P
    K = max(1, N // 4) if N else 0
    x = torch.randn(B, L, D, generator=gen)
    pos = torch.randn(1, L, D, generator=gen)
    ids = _ids(B, N, K, gen, torch.int32)
    for p in (None, pos):
        out = sslops.gather_tokens(x, ids, pos_embed=p, num_prefix_tokens=P, backend="triton")
        assert torch.equal(out, reference.gather_tokens(x, ids, p, P))
        assert torch.equal(out.double(), _mae_gather_f64(x, ids, p, P).float().double())


@pytest.mark.parametrize("backend", ["cpu", EMU])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_gather_cpu_dtypes_exact(dtype, backend):
    gen = torch.Generator().manual_seed(1)
    B, L, D, P = 4, 50, 130, 1
    x = torch.randn(B, L, D, generator=gen).to(dtype)
    pos = torch.randn(B, L, D, generator=gen).to(dtype)  # per-sample pos_embed
    ids = _ids(B, L - P, 12, gen)
    out = sslops.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=P, backend=backend)
    assert out.dtype == dtype
    assert torch.equal(out, reference.gather_tokens(x, ids, pos, P))
    # one rounding of the exact sum, like torch's add
    assert torch.equal(out, _mae_gather_f64(x, ids, pos, P).to(dtype))


@pytest.mark.parametrize("backend", CPU_AND_EMU)
def test_gather_int32_and_noncontiguous(backend):
    gen = torch.Generator().manual_seed(2)
    B, L, D, P, K = 3, 9, 6, 2, 4
    big = torch.randn(L, B, 2 * D, generator=gen)
    x = big.transpose(0, 1)[:, :, ::2]  # (B, L, D), no unit stride anywhere
    assert not x.is_contiguous()
    pos = torch.randn(1, L, D, generator=gen).expand(B, L, D)  # batch stride 0
    ids64 = _ids(B, L - P, K, gen).t().contiguous().t()  # column-major (B, K)
    ids32 = ids64.to(torch.int32)
    want = reference.gather_tokens(x.contiguous(), ids64.contiguous(), pos.contiguous(), P)
    for ids in (ids64, ids32):
        out = sslops.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=P, backend=backend)
        assert torch.equal(out, want)


# ----------------------------------------------------------------------------
# random_masking: equal to MAE's, values and gradients
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_masking_equals_mae(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    B, L, D, ratio = 4, 49, 8, 0.75
    x = torch.randn(B, L, D, generator=gen, dtype=dtype)
    pos = torch.randn(1, L, D, generator=gen, dtype=dtype)
    noise = torch.rand(B, L, generator=gen)
    xa = x.clone().requires_grad_()
    pa = pos.clone().requires_grad_()
    xm, mask, ids_restore = sslops.random_masking(xa, ratio, noise=noise, pos_embed=pa, backend=backend)
    xb = x.clone().requires_grad_()
    pb = pos.clone().requires_grad_()
    xm_ref, mask_ref, ids_restore_ref = reference.mae_random_masking(xb + pb, ratio, noise=noise)
    assert xm.shape == (B, int(L * (1 - ratio)), D)
    assert torch.equal(xm, xm_ref)
    assert torch.equal(mask, mask_ref) and mask.dtype == mask_ref.dtype
    assert torch.equal(ids_restore, ids_restore_ref)
    w = torch.randn(xm.shape, generator=gen, dtype=dtype)
    (xm * w).sum().backward()
    (xm_ref * w).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(pa.grad, pb.grad)


def test_random_masking_prefix_and_generator():
    B, L, D, P = 2, 17, 4, 1
    x = torch.randn(B, L, D)
    a = sslops.random_masking(x, 0.5, generator=torch.Generator().manual_seed(5), num_prefix_tokens=P)
    b = sslops.random_masking(x, 0.5, generator=torch.Generator().manual_seed(5), num_prefix_tokens=P)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    xm, mask, ids_restore = a
    K = int((L - P) * 0.5)
    assert xm.shape == (B, P + K, D) and mask.shape == (B, L - P) and ids_restore.shape == (B, L - P)
    assert torch.equal(xm[:, :P], x[:, :P])  # prefix untouched
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - P - K)))
    # the kept rows are the patches whose mask is 0, in shuffle order
    kept = torch.argsort(ids_restore, dim=1)[:, :K]
    assert torch.equal(xm[:, P:], torch.gather(x[:, P:], 1, kept[..., None].expand(-1, -1, D)))
    assert torch.equal(mask.gather(1, kept), torch.zeros(B, K))


def test_random_masking_ratio_zero_and_tiny():
    x = torch.randn(2, 1, 3)
    xm, mask, _ = sslops.random_masking(x, 0.0)
    assert torch.equal(xm, x) and torch.equal(mask, torch.zeros(2, 1))
    xm, mask, _ = sslops.random_masking(x, 0.5)  # int(1 * 0.5) = 0 kept
    assert xm.shape == (2, 0, 3) and torch.equal(mask, torch.ones(2, 1))


# ----------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("pos_batch", [None, 1, 2])
def test_gather_gradcheck(backend, pos_batch):
    gen = torch.Generator().manual_seed(7)
    B, L, D, P = 2, 6, 3, 1
    x = torch.randn(B, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[4, 0, 2], [1, 1, 3]])  # a repeat: its gradients add up
    inputs = [x]
    if pos_batch is not None:
        inputs.append(torch.randn(pos_batch, L, D, generator=gen, dtype=torch.float64, requires_grad=True))

    def f(x, pos=None):
        return sslops.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=P, backend=backend)

    # fast_mode (random projections) keeps the Triton interpreter quick
    assert torch.autograd.gradcheck(f, tuple(inputs), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", CPU_AND_EMU)
def test_restore_gradcheck(backend):
    gen = torch.Generator().manual_seed(8)
    B, P, K, N, D = 2, 1, 2, 5, 3
    xv = torch.randn(B, P + K, D, generator=gen, dtype=torch.float64, requires_grad=True)
    mt = torch.randn(1, 1, D, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = _restore_ids(B, N, gen)
    f = lambda a, m: sslops.restore_tokens(a, ids, m, num_prefix_tokens=P, backend=backend)
    assert torch.autograd.gradcheck(f, (xv, mt), fast_mode=backend == "triton")


def _second_order(fn, inputs, gen):
    """d/d(inputs) of <d fn(inputs)/d inputs, v> for a quadratic loss of fn's output."""
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad((out * out * w).sum(), inputs, create_graph=True)
    vs = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in grads]
    return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["gather", "restore", "random_masking"])
def test_double_backward_matches_reference(backend, op):
    """create_graph=True through the backward ops (issue: gather_tokens gave 0.0 for 32.0)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    B, L, D, P = 3, 9, 5, 1
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(B, L, D, generator=gen, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, L, D, generator=gen, dtype=dtype, requires_grad=True)
    ids = torch.cat([_ids(B, L - P, 5, gen), _ids(B, L - P, 2, gen)], 1)  # repeats: gradients add up
    xv = torch.randn(B, P + 4, D, generator=gen, dtype=dtype, requires_grad=True)
    mt = torch.randn(D, generator=gen, dtype=dtype, requires_grad=True)
    ir = _restore_ids(B, L - P, gen)
    noise = torch.rand(B, L - P, generator=gen)
    fns = {
        "gather": (lambda x, pos, be: sslops.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=P, backend=be),
                   (x, pos)),
        "restore": (lambda xv, mt, be: sslops.restore_tokens(xv, ir, mt, num_prefix_tokens=P, backend=be), (xv, mt)),
        "random_masking": (lambda x, pos, be: sslops.random_masking(x, 0.5, noise=noise, pos_embed=pos,
                                                                   num_prefix_tokens=P, backend=be)[0], (x, pos)),
    }
    fn, inputs = fns[op]
    got = _second_order(lambda *a: fn(*a, backend), inputs, torch.Generator().manual_seed(5))
    want = _second_order(lambda *a: fn(*a, "reference"), inputs, torch.Generator().manual_seed(5))
    for g, r in zip(got, want):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        assert torch.autograd.gradgradcheck(lambda *a: fn(*a, backend), inputs)


@pytest.mark.parametrize("backend", CPU_AND_EMU)
def test_gather_backward_repeats_zeros_and_pos_sum(backend):
    gen = torch.Generator().manual_seed(9)
    B, L, D, P = 3, 8, 5, 2
    x = torch.randn(B, L, D, generator=gen, requires_grad=True)
    pos = torch.randn(1, L, D, generator=gen, requires_grad=True)
    ids = torch.tensor([[0, 0, 5], [5, 4, 3], [2, 2, 2]], dtype=torch.int32)
    out = sslops.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=P, backend=backend)
    g = torch.randn(out.shape, generator=gen)
    gx, gp = torch.autograd.grad(out, (x, pos), g)
    xr, pr = x.detach().clone().requires_grad_(), pos.detach().clone().requires_grad_()
    gx_ref, gp_ref = torch.autograd.grad(reference.gather_tokens(xr, ids, pr, P), (xr, pr), g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gp, gp_ref, rtol=1e-6, atol=1e-6)
    assert torch.all(gx[0, P + 1 : P + 5] == 0) and torch.all(gx[2, P + 3 :] == 0)  # untouched rows are zero


# ----------------------------------------------------------------------------
# restore_tokens
# ----------------------------------------------------------------------------
# the Triton interpreter gets the small shapes only (it is slow)
RESTORE_CASES = [(be, N, D) for be in CPU_BACKENDS for N, D in [(1, 1), (7, 3), (49, 130), (196, 5)]
                 if not (be == "triton" and N > 50)]
RESTORE_CASES += [pytest.param("emu", N, D, marks=pytest.mark.emu) for N, D in [(1, 1), (7, 3), (49, 130), (196, 5)]]


@pytest.mark.parametrize("backend,N,D", RESTORE_CASES)
def test_restore_equals_mae_decoder(backend, N, D):
    gen = torch.Generator().manual_seed(N * 7 + D)
    B = 3
    K = int(N * 0.25)
    x = torch.randn(B, 1 + K, D, generator=gen, dtype=torch.float64)  # cls token first
    mt = torch.randn(1, 1, D, generator=gen, dtype=torch.float64)
    ids = _restore_ids(B, N, gen)
    for dtype in (torch.float64, torch.float32):
        xa = x.to(dtype).requires_grad_()
        ma = mt.to(dtype).requires_grad_()
        out = sslops.restore_tokens(xa, ids, ma, num_prefix_tokens=1, backend=backend)
        xb = x.to(dtype).requires_grad_()
        mb = mt.to(dtype).requires_grad_()
        want = reference.mae_decoder_unshuffle(xb, ids, mb)
        assert out.shape == (B, 1 + N, D) and out.dtype == dtype
        assert torch.equal(out, want)
        g = torch.randn(out.shape, generator=gen, dtype=dtype)
        gx, gm = torch.autograd.grad(out, (xa, ma), g)
        gx_ref, gm_ref = torch.autograd.grad(want, (xb, mb), g)
        assert torch.equal(gx, gx_ref)  # a permutation: copies
        assert gm.shape == mt.shape
        torch.testing.assert_close(gm, gm_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", EMU])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_restore_cpu_half_types(dtype, backend):
    gen = torch.Generator().manual_seed(11)
    B, P, K, N, D = 3, 2, 5, 12, 24
    xv = torch.randn(B, P + K, D, generator=gen).to(dtype)
    mt = torch.randn(D, generator=gen).to(dtype)
    ids = _restore_ids(B, N, gen).to(torch.int32)
    out = sslops.restore_tokens(xv, ids, mt, num_prefix_tokens=P, backend=backend)
    assert torch.equal(out, reference.restore_tokens(xv, ids, mt, P))


@pytest.mark.parametrize("backend", CPU_AND_EMU)
def test_restore_noncontiguous_int32(backend):
    gen = torch.Generator().manual_seed(12)
    B, P, K, N, D = 2, 1, 3, 8, 4
    xv = torch.randn(P + K, B, 2 * D, generator=gen).transpose(0, 1)[:, :, 1::2]
    mt = torch.randn(2 * D, generator=gen)[::2]
    ids = _restore_ids(B, N, gen).to(torch.int32).t().contiguous().t()
    out = sslops.restore_tokens(xv, ids, mt, num_prefix_tokens=P, backend=backend)
    assert torch.equal(out, reference.restore_tokens(xv.contiguous(), ids.long(), mt.contiguous(), P))


def test_gather_then_restore_roundtrip():
    B, L, D = 2, 16, 4
    x = torch.randn(B, L, D)
    xm, mask, ids_restore = sslops.random_masking(x, 0.5)
    out = sslops.restore_tokens(xm, ids_restore, torch.zeros(D))
    keep = (mask == 0)[..., None]
    assert torch.equal(torch.where(keep, out, 0), torch.where(keep, x, 0))
    assert torch.all(out[~keep.expand_as(out)] == 0)


# ----------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------
def _op_samples():
    gen = torch.Generator().manual_seed(13)
    B, L, D, P, K = 2, 7, 5, 1, 3
    x = torch.randn(B, L, D, generator=gen, requires_grad=True)
    pos = torch.randn(1, L, D, generator=gen, requires_grad=True)
    ids = _ids(B, L - P, K, gen)
    xv = torch.randn(B, P + K, D, generator=gen, requires_grad=True)
    mt = torch.randn(D, generator=gen, requires_grad=True)
    ir = _restore_ids(B, L - P, gen)
    g = torch.randn(B, P + K, D, generator=gen)
    gr = torch.randn(B, L, D, generator=gen)
    return x, pos, ids, P, xv, mt, ir, g, gr


@pytest.mark.parametrize("ns", ["sslops", pytest.param("sslops_emu", marks=pytest.mark.emu)])
def test_opcheck_compiled_ops(ns):
    x, pos, ids, P, xv, mt, ir, g, gr = _op_samples()
    ops = getattr(torch.ops, ns)  # sslops_emu: the CUDA kernels under the emulator
    torch.library.opcheck(ops.gather_tokens.default, (x, ids, pos, P))
    torch.library.opcheck(ops.gather_tokens.default, (x, ids.int(), None, P))
    torch.library.opcheck(ops.gather_tokens_backward.default, (g, ids, x.shape[1], P))
    torch.library.opcheck(ops.restore_tokens.default, (xv, ir, mt, P))
    torch.library.opcheck(ops.restore_tokens.default, (xv, ir.int(), mt, P))
    torch.library.opcheck(ops.restore_tokens_backward.default, (gr, ir, xv.shape[1] - P, P))


@needs_triton
def test_opcheck_triton_ops():
    x, pos, ids, P, xv, mt, ir, g, gr = _op_samples()
    torch.library.opcheck(gather_tokens_triton, (x, ids, pos, P))
    torch.library.opcheck(gather_tokens_backward_triton, (g, ids, x.shape[1], P))
    torch.library.opcheck(restore_tokens_triton, (xv, ir.int(), mt, P))
    torch.library.opcheck(restore_tokens_backward_triton, (gr, ir, xv.shape[1] - P, P))


def _huge_row_stride_grad(rows, value_at):
    """A (1, rows, 1) fp16 gradient whose row stride is 2**30 elements, so row 4
    sits at element 2**32: int32 offset arithmetic wraps it to row 0.  The 8 GiB
    buffer is never touched beyond the rows written (torch.empty maps it lazily)."""
    try:
        buf = torch.empty((rows - 1) * 2**30 + 1, dtype=torch.float16)
    except RuntimeError as exc:  # pragma: no cover - a machine without 8 GiB of address space
        pytest.skip(f"cannot reserve 8 GiB of virtual memory: {exc}")
    g = buf.as_strided((1, rows, 1), (buf.numel(), 2**30, 1))
    for r, v in value_at.items():
        g[0, r, 0] = v
    return g


@needs_triton
def test_triton_backward_offsets_are_int64():
    """(P + k) * row_stride must not wrap in int32 (a transposed (L, B, D) gradient view
    or >= 2**31 elements per sample reach it); here grad row 4 is at element 2**32."""
    from sslops.triton_kernels import masking as tk

    g = _huge_row_stride_grad(5, {0: 1.0, 4: 2.0})
    # scatter: only grad row 4 maps to token 0 (out-of-range ids contribute nothing)
    ids = torch.tensor([[-1, -1, -1, -1, 0]])
    out = tk.gather_tokens_backward(g, ids, 1, 0)
    assert out.item() == 2.0, f"read grad row {'0' if out.item() == 1.0 else '?'} instead of row 4"
    # restore backward: no visible token, the mask token takes every position; only
    # position 4 holds a valid index
    ids_r = torch.tensor([[-1, -1, -1, -1, 0]])
    grad_xv, grad_mt = tk.restore_tokens_backward(g, ids_r, 0, 0)
    assert grad_xv.shape == (1, 0, 1) and grad_mt.item() == 2.0


class _GuardRecorder:
    """Stands in for triton_kernels._common.device_guard: records the device of each
    guard and fails any Launch that runs outside one."""

    def __init__(self, monkeypatch, module):
        from sslops.triton_kernels import _common

        self.devices, self.inside, self.launched = [], 0, []
        run = _common.Launch.__call__

        def launch(launch_self):
            assert self.inside, f"{launch_self.kernel} launched outside device_guard"
            self.launched.append(launch_self.kernel)
            run(launch_self)

        monkeypatch.setattr(module, "device_guard", self.guard)
        monkeypatch.setattr(_common.Launch, "__call__", launch)

    @contextlib.contextmanager
    def guard(self, t):
        self.devices.append(t.device)
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1


def test_device_guard_targets_the_tensors_gpu():
    """The guard of a tensor on cuda:1 switches to cuda:1 (a mock tensor: no GPU here)."""
    from sslops.triton_kernels._common import device_guard

    class OnCuda1:
        is_cuda = True
        device = torch.device("cuda", 1)

    g = device_guard(OnCuda1())
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert isinstance(device_guard(torch.zeros(1)), contextlib.nullcontext)


@needs_triton
def test_triton_launches_run_under_device_guard(monkeypatch):
    from sslops.triton_kernels import masking as tk

    rec = _GuardRecorder(monkeypatch, tk)
    x, pos, ids, P, xv, mt, ir, g, gr = _op_samples()
    tk.gather_tokens(x, ids, pos, P)
    tk.gather_tokens_backward(g, ids, x.shape[1], P)
    tk.restore_tokens(xv, ir, mt, P)
    tk.restore_tokens_backward(gr, ir, xv.shape[1] - P, P)
    assert len(rec.launched) == 4 and rec.devices == [x.device] * 4


def _mae_like(backend):
    def f(x, pos, noise, mt):
        xm, mask, ids_restore = sslops.random_masking(x, 0.75, noise=noise, pos_embed=pos, num_prefix_tokens=1,
                                                      backend=backend)
        y = sslops.restore_tokens(xm * 2, ids_restore, mt, num_prefix_tokens=1, backend=backend)
        return y, mask

    return f


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if "triton" in CPU_BACKENDS else []))
def test_torch_compile_fullgraph(backend):
    gen = torch.Generator().manual_seed(14)
    B, L, D = 2, 17, 8
    x = torch.randn(B, L, D, generator=gen, requires_grad=True)
    pos = torch.randn(1, L, D, generator=gen, requires_grad=True)
    mt = torch.randn(D, generator=gen, requires_grad=True)
    noise = torch.rand(B, L - 1, generator=gen)
    f = _mae_like(backend)
    # inductor for the C++ backend; aot_eager for Triton (the interpreter has
    # nothing for inductor to fuse, and it keeps the test fast)
    cf = torch.compile(f, fullgraph=True, backend="inductor" if backend == "cpu" else "aot_eager")
    y, mask = cf(x, pos, noise, mt)
    y_ref, mask_ref = _mae_like("reference")(x, pos, noise, mt)
    assert torch.equal(y, y_ref) and torch.equal(mask, mask_ref)
    g = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad(y, (x, pos, mt), g)
    grads_ref = torch.autograd.grad(y_ref, (x, pos, mt), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------
def test_bad_inputs_gather():
    x = torch.randn(2, 5, 3)
    ids = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="x must be 3-D"):
        sslops.gather_tokens(x[0], ids)
    with pytest.raises(TypeError, match="x must be a floating"):
        sslops.gather_tokens(x.long(), ids)
    with pytest.raises(TypeError, match="ids_keep must be int32 or int64"):
        sslops.gather_tokens(x, ids.float())
    with pytest.raises(ValueError, match="ids_keep must have shape"):
        sslops.gather_tokens(x, ids[:1])
    with pytest.raises(ValueError, match="ids_keep has an index 5 out of range"):
        sslops.gather_tokens(x, torch.tensor([[0, 5], [0, 1]]))
    with pytest.raises(ValueError, match="ids_keep has an index -1 out of range"):
        sslops.gather_tokens(x, torch.tensor([[0, -1], [0, 1]]))
    with pytest.raises(ValueError, match=r"ids_keep has an index 4 out of range \[0, 4\)"):
        sslops.gather_tokens(x, torch.tensor([[0, 4], [0, 1]]), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        sslops.gather_tokens(x, ids, pos_embed=torch.randn(1, 4, 3))
    with pytest.raises(TypeError, match="x and pos_embed must have the same dtype"):
        sslops.gather_tokens(x, ids, pos_embed=torch.randn(1, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        sslops.gather_tokens(x, ids, num_prefix_tokens=6)
    with pytest.raises(ValueError, match="x and ids_keep must be on the same device"):
        sslops.gather_tokens(x, ids.to("meta"))
    with pytest.raises(ValueError, match="backend='cuda' cannot run gather_tokens"):
        sslops.gather_tokens(x, ids, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        sslops.gather_tokens(x, ids, backend="gpu")
    # the raw op checks the range itself (RuntimeError from C++)
    with pytest.raises(RuntimeError, match=r"ids_keep\[0, 1\] = 7 is out of range"):
        torch.ops.sslops.gather_tokens(x, torch.tensor([[0, 7], [0, 1]]), None, 0)


def test_bad_inputs_random_masking():
    x = torch.randn(2, 5, 3)
    for r in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            sslops.random_masking(x, r)
    with pytest.raises(TypeError, match="mask_ratio must be a real number"):
        sslops.random_masking(x, "0.5")
    with pytest.raises(ValueError, match="x must be 3-D"):
        sslops.random_masking(x.reshape(10, 3), 0.5)
    with pytest.raises(ValueError, match=r"noise must have shape \(B, L - num_prefix_tokens\) = \(2, 4\)"):
        sslops.random_masking(x, 0.5, noise=torch.rand(2, 5), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="noise must be 2-D"):
        sslops.random_masking(x, 0.5, noise=torch.rand(10))
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got str"):  # was AttributeError
        sslops.random_masking(x, 0.5, generator="abc")
    # complex noise was a RuntimeError from argsort; bool noise is all ties (an unspecified order)
    for dtype in (torch.complex64, torch.bool):
        with pytest.raises(TypeError, match=f"noise must be a real tensor .* got {dtype}"):
            sslops.random_masking(x, 0.5, noise=torch.ones(2, 5, dtype=dtype))
    noise = torch.randperm(10, generator=torch.Generator().manual_seed(7)).reshape(2, 5)  # integer noise (no ties) still works
    got = sslops.random_masking(x, 0.4, noise=noise)
    want = sslops.random_masking(x, 0.4, noise=noise.double())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_bad_inputs_restore():
    xv = torch.randn(2, 3, 4)
    ids = _restore_ids(2, 6, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mask_token must have width D = 4"):
        sslops.restore_tokens(xv, ids, torch.randn(5))
    with pytest.raises(ValueError, match="mask_token must have width D = 4"):
        sslops.restore_tokens(xv, ids, torch.randn(2, 4))
    with pytest.raises(TypeError, match="x_visible and mask_token must have the same dtype"):
        sslops.restore_tokens(xv, ids, torch.randn(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="ids_restore has an index 6 out of range"):
        sslops.restore_tokens(xv, torch.tensor([[0, 1, 2, 3, 4, 6]] * 2), torch.randn(4))
    with pytest.raises(ValueError, match="K <= N"):
        sslops.restore_tokens(xv, ids[:, :2], torch.randn(4))
    with pytest.raises(ValueError, match="x_visible must be 3-D"):
        sslops.restore_tokens(xv[0], ids, torch.randn(4))
    with pytest.raises(ValueError, match="x_visible and mask_token must be on the same device"):
        sslops.restore_tokens(xv, ids, torch.randn(4, device="meta"))
    with pytest.raises(RuntimeError, match=r"ids_restore\[1, 0\] = -3 is out of range"):
        torch.ops.sslops.restore_tokens(xv, torch.tensor([[0, 1, 2, 3, 4, 5], [-3, 1, 2, 3, 4, 5]]),
                                        torch.randn(4), 0)


# ----------------------------------------------------------------------------
# block masks
# ----------------------------------------------------------------------------
def _neighbour_fraction(ids, H, W):
    """Fraction of kept cells with at least one kept 4-neighbour."""
    B = ids.shape[0]
    kept = torch.zeros(B, H * W, dtype=torch.bool).scatter_(1, ids, True).view(B, H, W)
    pad = torch.nn.functional.pad(kept, (1, 1, 1, 1))
    nb = pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
    return (nb & kept).sum().item() / kept.sum().item()


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.8), ((14, 14), 0.6), ((16, 12), 0.75), ((7, 7), 0.8)])
def test_block_masking_data2vec(grid, ratio):
    H, W = grid
    L = H * W
    gen = torch.Generator().manual_seed(15)
    ids = sslops.block_masking(64, grid, ratio, generator=gen)
    K = int(L * (1 - ratio))
    assert ids.shape == (64, K) and ids.dtype == torch.int64  # equal K, exact ratio
    assert ids.min() >= 0 and ids.max() < L
    assert torch.all(ids[:, 1:] > ids[:, :-1])  # sorted, hence unique
    assert abs((1 - K / L) - ratio) <= 1 / L
    # blocks: visible tokens come in clumps, unlike MAE's random masking
    rand_ids = torch.sort(torch.rand(64, L, generator=gen).argsort(1)[:, :K], 1).values
    assert _neighbour_fraction(ids, H, W) > 0.85
    assert _neighbour_fraction(ids, H, W) > _neighbour_fraction(rand_ids, H, W) + 0.05


def test_block_masking_data2vec_blocks_are_squares():
    # with plenty of room, the visible set is a union of whole 3x3 blocks
    H = W = 14
    gen = torch.Generator().manual_seed(16)
    ids = sslops.block_masking(32, (H, W), 0.8, mask_prob_adjust=0.0, generator=gen)
    kept = torch.zeros(32, H * W, dtype=torch.bool).scatter_(1, ids, True).view(32, 1, H, W).float()
    # a kept cell inside some fully kept 3x3 window (allowing the cells the
    # count equalisation added or removed)
    F = torch.nn.functional
    windows = (F.avg_pool2d(kept, 3, stride=1) > 0.999).float()  # fully kept 3x3 windows, (H-2, W-2)
    full = F.max_pool2d(F.pad(windows, (2, 2, 2, 2)), 3, stride=1)  # cells covered by one, (H, W)
    frac = (full * kept).sum() / kept.sum()
    assert frac > 0.6


def test_block_masking_seeded_and_device_made():
    a = sslops.block_masking(8, (14, 14), generator=torch.Generator().manual_seed(3))
    b = sslops.block_masking(8, (14, 14), generator=torch.Generator().manual_seed(3))
    c = sslops.block_masking(8, (14, 14), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.device.type == "cpu"


def test_block_masking_ijepa():
    H = W = 14
    L = H * W
    gen = torch.Generator().manual_seed(17)
    for _ in range(5):
        ids, tgt = sslops.block_masking(32, (H, W), kind="ijepa", return_targets=True, generator=gen)
        B, K = ids.shape
        assert B == 32 and K > 10
        assert ids.min() >= 0 and ids.max() < L and torch.all(ids[:, 1:] > ids[:, :-1])
        assert tgt.shape[:2] == (32, 4)
        n_t = tgt.shape[2]
        assert 0.10 * L <= n_t <= 0.25 * L  # pred_scale (0.15, 0.2) after rounding h, w
        # targets are contiguous rectangles: rows x cols = count
        r, c = tgt // W, tgt % W
        hh = r.amax(-1) - r.amin(-1) + 1
        ww = c.amax(-1) - c.amin(-1) + 1
        assert torch.all(hh * ww == n_t)
        # context avoids every target and lies within one enc block (<= 13 x 13)
        t_mask = torch.zeros(32, L, dtype=torch.bool).scatter_(1, tgt.reshape(32, -1), True)
        assert not torch.any(t_mask.gather(1, ids))
        cr, cc = ids // W, ids % W
        assert torch.all(cr.amax(1) - cr.amin(1) < H) and torch.all(cc.amax(1) - cc.amin(1) < W)
        assert K / L <= 1.0 and K / L >= 0.05


def test_block_masking_bad_args():
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        sslops.block_masking(2, (14, 14), 1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        sslops.block_masking(2, (14, 14), kind="beit")
    with pytest.raises(ValueError, match="mask_ratio is not used by kind='ijepa'"):
        sslops.block_masking(2, (14, 14), 0.5, kind="ijepa")
    with pytest.raises(TypeError, match="grid must be a pair"):
        sslops.block_masking(2, 14)
    for grid in ((14.5, 14), (14, 14.0), (True, 14)):  # (14.5, 14) was truncated to (14, 14)
        with pytest.raises(TypeError, match="grid must be a pair of ints"):
            sslops.block_masking(2, grid)
    with pytest.raises(ValueError, match="mask_length"):
        sslops.block_masking(2, (14, 14), mask_length=0)
    with pytest.raises(ValueError, match="pred_scale"):
        sslops.block_masking(2, (14, 14), kind="ijepa", pred_scale=(0.3, 0.2))
    for kind in ("data2vec", "ijepa"):  # was a reshape / min() RuntimeError from deep inside
        with pytest.raises(ValueError, match=r"batch must be >= 1, got 0"):
            sslops.block_masking(0, (14, 14), kind=kind)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got str"):
        sslops.block_masking(2, (14, 14), generator="abc")


def test_block_masks_feed_gather():
    x = torch.randn(4, 1 + 196, 8)
    ids = sslops.block_masking(4, (14, 14), 0.8)
    out = sslops.gather_tokens(x, ids, num_prefix_tokens=1)
    assert out.shape == (4, 1 + 39, 8)
    assert torch.equal(out, reference.gather_tokens(x, ids, None, 1))


# ----------------------------------------------------------------------------
# CUDA (needs a GPU; skipped otherwise)
# ----------------------------------------------------------------------------
# The CUDA kernels also run on the CPU under the emulator (backend "emu", marked emu).
GPU_ONLY = [cuda, needs_cuda]
EMU = pytest.mark.emu
GPU_BACKENDS = [pytest.param("cuda", marks=GPU_ONLY), pytest.param("triton", marks=GPU_ONLY),
                pytest.param("emu", marks=EMU)]


def _dev(backend):
    return "cpu" if backend == "emu" else "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("L,D", [(197, 768), (50, 130), (7, 3), (1, 1), (197, 384)])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_matches_reference(backend, L, D, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    dev = _dev(backend)
    gen = torch.Generator().manual_seed(L + D)
    B, P = 8, (1 if L > 1 else 0)
    N = L - P
    K = int(N * 0.25)
    x = torch.randn(B, L, D, generator=gen).to(dtype).to(dev).requires_grad_()
    pos = torch.randn(1, L, D, generator=gen).to(dtype).to(dev).requires_grad_()
    ids = _ids(B, N, K, gen).to(dev)
    out = sslops.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=P, backend=backend)
    want = reference.gather_tokens(x, ids, pos, P)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    gx, gp = torch.autograd.grad(out, (x, pos), g)
    gx_ref, gp_ref = torch.autograd.grad(want, (x, pos), g)
    assert torch.equal(gx, gx_ref)
    torch.testing.assert_close(gp, gp_ref)
    # restore
    xv = torch.randn(B, P + K, D, generator=gen).to(dtype).to(dev).requires_grad_()
    mt = torch.randn(D, generator=gen).to(dtype).to(dev).requires_grad_()
    ir = _restore_ids(B, N, gen).to(dev).int()
    out = sslops.restore_tokens(xv, ir, mt, num_prefix_tokens=P, backend=backend)
    want = reference.restore_tokens(xv, ir, mt, P)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    gx, gm = torch.autograd.grad(out, (xv, mt), g)
    gx_ref, gm_ref = torch.autograd.grad(want, (xv, mt), g)
    assert torch.equal(gx, gx_ref)
    torch.testing.assert_close(gm, gm_ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=GPU_ONLY), pytest.param("emu", marks=EMU)])
def test_cuda_deterministic_and_unaligned(backend):
    dev = _dev(backend)
    B, L, D = 16, 197, 768
    x = torch.randn(B, L + 1, D + 1, device=dev)[:, 1:, 1:]  # unaligned rows: scalar path
    pos = torch.randn(1, L, D, device=dev)
    ids = torch.rand(B, L - 1, device=dev).argsort(1)[:, :49]
    a = sslops.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=1, backend=backend)
    assert torch.equal(a, reference.gather_tokens(x, ids, pos, 1))
    xg = x.detach().clone().requires_grad_()
    pg = pos.clone().requires_grad_()
    g = torch.randn(B, 50, D, device=dev)
    r1 = torch.autograd.grad(sslops.gather_tokens(xg, ids, pos_embed=pg, num_prefix_tokens=1, backend=backend), (xg, pg), g)
    r2 = torch.autograd.grad(sslops.gather_tokens(xg, ids, pos_embed=pg, num_prefix_tokens=1, backend=backend), (xg, pg), g)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    gx_ref, gp_ref = torch.autograd.grad(reference.gather_tokens(xg, ids, pg, 1), (xg, pg), g)
    assert torch.equal(r1[0], gx_ref)
    torch.testing.assert_close(r1[1], gp_ref)


@EMU
def test_emu_bad_index_is_a_device_side_assert():
    """The raw op is not checked on the host for GPU tensors: a bad index must
    fire the kernel's device-side assert (and never be dereferenced)."""
    ops = torch.ops.sslops_emu
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="device-side assert triggered.*ids_keep out of range"):
        ops.gather_tokens(x, torch.tensor([[0, 4], [1, 2]]), None, 1)  # N = 4 patch rows: 4 is out of range
    with pytest.raises(RuntimeError, match="device-side assert triggered.*ids_restore out of range"):
        ops.restore_tokens(x[:, :3], torch.tensor([[0, 1, 2, -1], [3, 2, 1, 0]]), torch.zeros(8), 1)


@cuda
@needs_cuda
def test_cuda_block_masking_on_device():
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = sslops.block_masking(16, (14, 14), generator=gen)
    assert ids.is_cuda and ids.shape == (16, 39)
    ids = sslops.block_masking(16, (14, 14), kind="ijepa", generator=gen)
    assert ids.is_cuda

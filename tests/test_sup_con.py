"""sslops.sup_con (multi-view / supervised contrastive) against float64 oracles:
SupContrast's SupConLoss and solo-learn's simclr_loss_func, transcribed here
from their published code (no code shared with sslops/reference.py), and
sslops.reference.sup_con; then every backend that runs on this machine (cpu;
triton in the interpreter; reference) against the float64 reference, and the
fused statistics ops (sslops::sup_con_stats, C++; sslops::sup_con_stats_triton)
against their float64 formula."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import sslops
from sslops import reference
from sslops.sup_con import _stats_formula

sup_con_module = importlib.import_module("sslops.sup_con")  # sslops.sup_con is also the function

OUT_BACKENDS = sslops.backends("sup_con", "cpu")  # cpu, triton (interpreter), reference
IN_BACKENDS = sslops.backends("sup_con_in", "cpu")  # the same
CASES = [(p, b) for p, bs in (("out", OUT_BACKENDS), ("in", IN_BACKENDS)) for b in bs]
# The fused (4, N) statistics ops: (forward, dtypes it computes) per backend that has one here.
STATS_OPS = {}
if "cpu" in OUT_BACKENDS:
    STATS_OPS["cpu"] = (torch.ops.sslops.sup_con_stats, (torch.float32, torch.float64))
if "triton" in OUT_BACKENDS:
    STATS_OPS["triton"] = (torch.ops.sslops.sup_con_stats_triton, (torch.float32,))
STATS_CASES = [pytest.param(b, dt, id=f"{b}-{str(dt)[6:]}") for b, (_, dts) in STATS_OPS.items() for dt in dts]
# csrc/cuda/sup_con.cu on the CPU under the CUDA emulator (marked emu; its ops exist once it is loaded).
EMU_STATS_CASES = [pytest.param("emu", dt, marks=pytest.mark.emu, id=f"emu-{str(dt)[6:]}")
                   for dt in (torch.float32, torch.float64)]


def _stats_op(backend, backward=False):
    if backend == "emu":
        return torch.ops.sslops_emu.sup_con_stats_backward if backward else torch.ops.sslops_emu.sup_con_stats
    return getattr(torch.ops.sslops, BACKWARD_OPS[backend]) if backward else STATS_OPS[backend][0]


# ---------------------------------------------------------------- published formulas
def supcontrast_supcon_loss(features, labels=None, temperature=0.07, base_temperature=0.07):
    """HobbitLong/SupContrast losses.py SupConLoss.forward, contrast_mode='all',
    transcribed (with its edge-case handling of anchors without a positive)."""
    device = features.device
    batch_size = features.shape[0]
    if labels is None:
        mask = torch.eye(batch_size, dtype=torch.float64).to(device)
    else:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).double().to(device)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature = contrast_feature
    anchor_count = contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                torch.arange(batch_size * anchor_count).view(-1, 1).to(device), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    loss = loss.view(anchor_count, batch_size).mean()
    return loss


def solo_learn_simclr_loss_func(z, indexes, temperature=0.1):
    """solo-learn solo/losses/simclr.py simclr_loss_func, one process (gather = identity)."""
    z = F.normalize(z, dim=-1)
    gathered_z = z
    sim = torch.exp(torch.einsum("if, jf -> ij", z, gathered_z) / temperature)
    gathered_indexes = indexes
    indexes = indexes.unsqueeze(0)
    gathered_indexes = gathered_indexes.unsqueeze(0)
    pos_mask = indexes.t() == gathered_indexes
    pos_mask[:, z.size(0) * 0:].fill_diagonal_(0)
    neg_mask = indexes.t() != gathered_indexes
    pos = torch.sum(sim * pos_mask, 1)
    neg = torch.sum(sim * neg_mask, 1)
    loss = -(torch.mean(torch.log(pos / (pos + neg))))
    return loss


# ---------------------------------------------------------------- helpers
def _features(b, v, d, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, d, generator=g, dtype=torch.float64)
    f = base + 0.7 * torch.randn(b, v, d, generator=g, dtype=torch.float64)  # correlated views
    return (f * scale).to(dtype)


def _labels(b, classes, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, classes, (b,), generator=g) * 7 - 3  # arbitrary (negative, sparse) ids


def _run(features, labels, kwargs, backend, upstream=None, dtype=torch.float64):
    x = features.detach().to(dtype).requires_grad_()
    out = sslops.sup_con(x, labels, **kwargs, backend=backend) if backend else reference.sup_con(x, labels, **kwargs)
    w = torch.ones_like(out) if upstream is None else upstream.to(out.dtype)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    return out.detach(), grad


def _close(actual, expected, inv_temp, what, scale=1.0):
    tol = 2e-5 * max(1.0, inv_temp) * scale  # fp32 logits: ~1e-7 relative to |z|^2 / T
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _check(features, labels, kwargs, backend, upstream=None, scale=1.0):
    inv_temp = 1.0 / kwargs.get("temperature", 0.1)
    out, grad = _run(features, labels, kwargs, backend, upstream, torch.float32)
    ref, ref_grad = _run(features, labels, kwargs, None, upstream)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    _close(out, ref, inv_temp, f"{backend} loss", scale)
    _close(grad, ref_grad, inv_temp, f"{backend} grad", scale)


# ---------------------------------------------------------------- the reference vs the published code
@pytest.mark.parametrize("b", [1, 3, 17, 130])
@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("d", [3, 32, 128])
def test_reference_matches_supcontrast_and_solo_learn(b, v, d):
    f = _features(b, v, d, seed=b * 100 + v * 10 + d)
    fn = F.normalize(f, dim=2)
    for labels in (None, _labels(b, 3, seed=b), _labels(b, 100, seed=b)):
        for t, bt in ((0.07, 0.07), (0.5, 0.07), (0.1, None)):
            expected = supcontrast_supcon_loss(fn, labels, t, t if bt is None else bt)
            got = reference.sup_con(f, labels, t, base_temperature=bt, positives="out")
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        # solo-learn: z = cat(views), indexes repeated per view (solo/methods/simclr.py)
        idx = torch.arange(b) if labels is None else labels
        z = torch.cat(torch.unbind(f, dim=1))
        expected = solo_learn_simclr_loss_func(z, idx.repeat(v), 0.2)
        torch.testing.assert_close(reference.sup_con(f, labels, 0.2, positives="in"), expected,
                                   rtol=1e-10, atol=1e-10)


def test_published_oracles_are_not_trivially_equal():
    """"out" and "in" differ as soon as an anchor has more than one positive (a test of the tests)."""
    f = _features(6, 3, 8, seed=1)
    a = reference.sup_con(f, None, 0.2, positives="out")
    b = reference.sup_con(f, None, 0.2, positives="in")
    assert (a - b).abs() > 1e-3
    fn = F.normalize(f, dim=2)
    assert (supcontrast_supcon_loss(fn, None, 0.2, 0.2) - solo_learn_simclr_loss_func(
        torch.cat(torch.unbind(f, 1)), torch.arange(6).repeat(3), 0.2)).abs() > 1e-3


# ---------------------------------------------------------------- backends vs the float64 reference
def _sizes_for(backend):
    # B V = 520 rows: more than one row block (128) and column tile (512) of the cpu kernels
    sizes = [(b, v, d) for b in (1, 3, 17, 130) for v in (2, 3, 4) for d in (1, 3, 16, 32, 128, 130)]
    if backend == "triton":  # the interpreter is slow: every B and V, D in {3, 32}, D = 128 at small B V
        sizes = [(b, v, d) for (b, v, d) in sizes if d in (3, 32) or (d == 128 and b * v <= 51)]
    return sizes


def _label_cases(b, seed):
    """None (positives: the other views), few classes, many classes (mostly singletons)."""
    return (None, _labels(b, 3, seed=seed), _labels(b, 3 * b + 1, seed=seed))


@pytest.mark.parametrize("positives,backend", CASES)
def test_backend_matches_reference_all_sizes(positives, backend):
    for k, (b, v, d) in enumerate(_sizes_for(backend)):
        f = _features(b, v, d, seed=b + v + d)
        cases = _label_cases(b, seed=d)
        if backend == "triton":  # one labelling per size in the interpreter
            cases = cases[k % 3:k % 3 + 1]
        up = torch.rand(b, v, generator=torch.Generator().manual_seed(b * v), dtype=torch.float64)
        # D = 1 normalised is sign(f): its gradient is 0 up to fp32 noise over |f| (unbounded for
        # small |f|), so D = 1 runs unnormalised, logits f_i f_j / T
        extra = dict(normalize=False) if d == 1 else {}
        scale = max(1.0, f.abs().max().item() ** 2) if d == 1 else 1.0
        for labels in cases:
            for t in (0.07, 0.5):
                _check(f, labels, dict(temperature=t, positives=positives, reduction="none", **extra), backend, up,
                       scale=scale)


@pytest.mark.parametrize("positives", ["out", "in"])
def test_cpu_composite_path_matches_reference(positives, monkeypatch):
    """The cuda backend's composition (NT-Xent lse kernel, class sums, per-class lse), run on
    the CPU kernels of the same ops: the cpu backend takes the fused op instead, so this is
    the composition's test where no GPU is present."""
    if "cpu" not in OUT_BACKENDS:
        pytest.skip("sslops._C has no CPU kernels here")
    monkeypatch.setattr(sup_con_module, "_FUSED", ("triton",))
    for b, v, d in ((1, 2, 3), (17, 3, 16), (130, 4, 32)):
        f = _features(b, v, d, seed=b * v + d)
        for labels in _label_cases(b, seed=d) + (torch.zeros(b, dtype=torch.int64),):
            _check(f, labels, dict(temperature=0.1, positives=positives, reduction="none"), "cpu")


@pytest.mark.parametrize("positives,backend", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_base_temperature(positives, backend, reduction):
    f = _features(17, 3, 32, seed=5)
    for labels in (None, _labels(17, 5)):
        _check(f, labels, dict(temperature=0.1, base_temperature=0.07, positives=positives, reduction=reduction),
               backend)


@pytest.mark.parametrize("positives,backend", CASES)
def test_labels_many_classes_and_one_class(positives, backend):
    f = _features(40, 2, 16, seed=6)
    for labels in (_labels(40, 100), torch.zeros(40, dtype=torch.int64), torch.arange(40, dtype=torch.int32)):
        _check(f, labels, dict(temperature=0.2, positives=positives), backend)


@pytest.mark.parametrize("positives,backend", CASES)
def test_anchors_without_positives(positives, backend):
    # V = 1: anchors 0 and 4 have a label nobody else has.
    labels = torch.tensor([5, 1, 1, 2, 9, 2, 2])
    f = _features(7, 1, 8, seed=8)
    out, grad = _run(f, labels, dict(temperature=0.3, positives=positives, reduction="none"), backend,
                     dtype=torch.float32)
    assert out.shape == (7, 1)
    assert out[0, 0] == 0 and out[4, 0] == 0 and (out[[1, 2, 3, 5, 6], 0] > 0).all()
    assert torch.isfinite(grad).all()
    _check(f, labels, dict(temperature=0.3, positives=positives, reduction="none"), backend)
    _check(f, labels, dict(temperature=0.3, positives=positives), backend)
    # the mean is over the 5 anchors that have a positive; SupConLoss divides by all 7
    mean = sslops.sup_con(f.float(), labels, 0.3, positives=positives, backend=backend)
    if positives == "out":
        expected = supcontrast_supcon_loss(F.normalize(f, dim=2), labels, 0.3, 0.3) * 7 / 5
        torch.testing.assert_close(mean.double(), expected, rtol=1e-5, atol=1e-5)
    # no anchor has a positive: 0, with zero (finite) gradients
    out, grad = _run(f, torch.arange(7), dict(temperature=0.3, positives=positives), backend, dtype=torch.float32)
    assert out == 0 and (grad == 0).all()


@pytest.mark.parametrize("positives,backend", CASES)
def test_non_contiguous_features(positives, backend):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(24, 3, 9, 2, generator=g, dtype=torch.float64)
    f = base[..., 0].permute(2, 1, 0)[:, :, 3:20]  # (9, 3, 17) with odd strides
    assert not f.is_contiguous()
    _check(f, _labels(9, 3), dict(temperature=0.1, positives=positives, reduction="none"), backend)


@pytest.mark.parametrize("positives,backend", CASES)
def test_unnormalised_low_temperature_is_stable(positives, backend):
    # logits ~ |z|^2 / T ~ 32 * 4 / 0.05: exp overflows without running maxima
    f = _features(9, 2, 32, seed=3, scale=2.0)
    out, grad = _run(f, None, dict(temperature=0.05, normalize=False, positives=positives), backend,
                     dtype=torch.float32)
    ref, _ = _run(f, None, dict(temperature=0.05, normalize=False, positives=positives), None)
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    _close(out, ref, 20.0, "loss", scale=32 * 8.0)


@pytest.mark.parametrize("positives", ["out", "in"])
def test_equals_nt_xent_for_two_views(positives):
    """nt_xent(z1, z2, T) == sup_con(stack([z1, z2], 1), temperature=T): every anchor has
    one positive, so both forms are lse_i - x_ip; base_temperature multiplies by T / T_base."""
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(13, 24, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(13, 24, generator=g, dtype=torch.float64)
    feats = torch.stack([z1, z2], 1)
    for t in (0.1, 0.5):
        nt = sslops.nt_xent(z1, z2, t, backend="reference")
        torch.testing.assert_close(reference.sup_con(feats, None, t, positives=positives), nt)
        torch.testing.assert_close(reference.sup_con(feats, None, t, base_temperature=0.07, positives=positives),
                                   nt * (t / 0.07))
        nt_none = sslops.nt_xent(z1, z2, t, reduction="none", backend="reference")  # (2N,): z1's anchors first
        sc_none = reference.sup_con(feats, None, t, positives=positives, reduction="none")  # (N, 2)
        torch.testing.assert_close(sc_none.t().reshape(-1), nt_none)
        for be in OUT_BACKENDS if positives == "out" else IN_BACKENDS:
            a, b = z1.float(), z2.float()
            torch.testing.assert_close(sslops.sup_con(torch.stack([a, b], 1), None, t, positives=positives, backend=be),
                                       sslops.nt_xent(a, b, t, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in OUT_BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    f = _features(4, 3, 5, seed=2).requires_grad_()
    labels = torch.tensor([0, 1, 0, 1])
    for lab in (None, labels, torch.tensor([0, 0, 0, 1])):
        for pos in ("out", "in"):
            assert torch.autograd.gradcheck(lambda x: sslops.sup_con(
                x, lab, 0.3, base_temperature=0.2, positives=pos, reduction="none", backend=backend), (f,))


@pytest.mark.parametrize("positives,backend", [c for c in CASES if c[1] != "reference"])
def test_half_inputs(positives, backend):
    f = _features(11, 3, 16, seed=9)
    h = f.half()
    out = sslops.sup_con(h, _labels(11, 3), 0.2, positives=positives, backend=backend)
    assert out.dtype == torch.float16
    ref = reference.sup_con(h.double(), _labels(11, 3), 0.2, positives=positives)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    x = h.clone().requires_grad_()
    sslops.sup_con(x, _labels(11, 3), 0.2, positives=positives, reduction="sum", backend=backend).backward()
    x64 = h.double().requires_grad_()
    reference.sup_con(x64, _labels(11, 3), 0.2, positives=positives, reduction="sum").backward()
    assert x.grad.dtype == torch.float16
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- fused statistics ops, compile
BACKWARD_OPS = {"cpu": "sup_con_stats_backward", "triton": "sup_con_stats_backward_triton"}


@pytest.mark.parametrize("backend,dtype", STATS_CASES + EMU_STATS_CASES)
def test_opcheck_stats_ops(backend, dtype):
    fwd = _stats_op(backend)
    bwd = _stats_op(backend, backward=True)
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(11, 5, generator=g, dtype=dtype), dim=1).requires_grad_()
    lab = torch.tensor([0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 5])
    torch.library.opcheck(fwd.default, (z, lab, 3.0))
    stats = fwd(z.detach(), lab, 3.0)
    grad = torch.rand(4, 11, generator=g, dtype=stats.dtype)
    torch.library.opcheck(bwd.default, (grad, z.detach(), lab, stats, 3.0))


def _stats_vs_float64(fwd, z, lab, inv_temp, dtype, tol, seed=0):
    """The (4, N) statistics of fwd on z.to(dtype) and their backward for a random upstream
    (every row and every upstream row) against the float64 formula."""
    g = torch.Generator().manual_seed(seed)
    n = z.shape[0]
    z64 = z.double().clone().requires_grad_()
    ref = _stats_formula(z64, lab, inv_temp)
    up = torch.rand(4, n, generator=g, dtype=torch.float64)
    up[:, ~torch.isfinite(ref).all(0)] = 0  # rows without a positive: lpos = -inf, no gradient
    (gref,) = torch.autograd.grad((torch.where(torch.isfinite(ref), ref, 0) * up).sum(), z64)
    zk = z.to(dtype).requires_grad_()
    st = fwd(zk, lab, inv_temp)
    assert st.shape == (4, n) and st.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(st.double(), ref.detach(), rtol=tol, atol=10 * tol)
    (gz,) = torch.autograd.grad((torch.where(torch.isfinite(st), st, 0) * up.to(st.dtype)).sum(), zk)
    assert gz.dtype == dtype
    torch.testing.assert_close(gz.double(), gref, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("backend,dtype", STATS_CASES + EMU_STATS_CASES)
def test_stats_and_backward_vs_float64(backend, dtype):
    fwd = _stats_op(backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    g = torch.Generator().manual_seed(1)
    sizes = ((1, 3, 1), (2, 1, 1), (37, 20, 4), (70, 130, 30), (65, 64, 65))
    if backend != "triton":  # more than one row block and column tile (128, 512)
        sizes += ((600, 16, 3), (531, 7, 400))
    for n, d, classes in sizes:
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        lab = torch.randint(0, classes, (n,), generator=g) * 5 - 7
        _stats_vs_float64(fwd, z, lab, 2.5, dtype, tol, seed=n)
        if backend == "cpu" and n > 1:  # labels beyond int32 (the kernel renumbers them), equal mod 2^32
            big = torch.where(lab > 0, lab * 2**40 + 1, lab * 2**32 - 3)
            _stats_vs_float64(fwd, z, big, 2.5, dtype, tol, seed=n)


@pytest.mark.parametrize("backend,dtype", STATS_CASES + EMU_STATS_CASES)
def test_stats_positives_far_below_the_row_maximum(backend, dtype):
    """Large logits where each row's positives lie far below its largest logit, further than
    the cpu kernel lets the positives share the candidates' exponentials (40 in fp32, 600 in
    fp64: csrc/common/sup_con.h pos_shift_limit), next to rows where they do not."""
    fwd = _stats_op(backend)
    g = torch.Generator().manual_seed(7)
    n, d = (70, 8) if backend == "triton" else (600, 8)
    u = F.normalize(torch.randn(n // 2, d, generator=g, dtype=torch.float64), dim=1)
    z = torch.cat([u, -u])  # row i's positive is its antipode: x_ip = -|u|^2 inv_temp, the row's minimum
    z = z + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    lab = torch.arange(n // 2).repeat(2)
    lab[: n // 10] = -1  # a few rows share one class: some positives near the maximum too
    inv_temp = 2000.0 if dtype == torch.float64 else 60.0
    gap = (_stats_formula(z, lab, inv_temp)[0] - _stats_formula(z, lab, inv_temp)[1]).double()
    limit = 600.0 if dtype == torch.float64 else 40.0
    assert (gap > limit).sum() > n // 2 and (gap < limit).sum() > 0  # both paths are taken
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _stats_vs_float64(fwd, z, lab, inv_temp, dtype, tol * inv_temp)


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emu_stats_half_inputs(dtype):
    """The CUDA kernel loads fp16/bf16 rows and computes in fp32: against float64 on the same
    rounded values (tiles with tails: 65 and 130 rows, D 20 and 130)."""
    g = torch.Generator().manual_seed(3)
    for n, d, classes in ((65, 20, 4), (130, 130, 7), (1, 3, 1)):
        z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype).double()
        lab = torch.randint(0, classes, (n,), generator=g)
        _stats_vs_float64(torch.ops.sslops_emu.sup_con_stats, z, lab, 5.0, dtype, 1e-3, seed=n)


@pytest.mark.emu
@pytest.mark.parametrize("positives", ["out", "in"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_emu_sup_con_matches_reference(positives, dtype):
    """sup_con(backend="emu"): fp32 runs the fused CUDA kernel, fp16 the NT-Xent composition."""
    from sslops import _emu

    for b, v, d in ((1, 2, 3), (17, 3, 16), (70, 2, 128)):
        f = _features(b, v, d, seed=b + v + d)
        for labels in _label_cases(b, seed=d):
            launches = _emu.stats()["launches"]
            x = f.to(dtype).requires_grad_()
            out = sslops.sup_con(x, labels, temperature=0.2, positives=positives, reduction="none", backend="emu")
            (grad,) = torch.autograd.grad(out.sum(), x)
            assert _emu.stats()["launches"] > launches  # the emulated kernels ran
            ref, ref_grad = _run(f.to(dtype).double(), labels, dict(temperature=0.2, positives=positives,
                                                                    reduction="none"), None)
            tol = 2e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.skipif("cpu" not in OUT_BACKENDS, reason="sslops._C has no CPU kernels here")
def test_cpu_stats_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, 4, generator=g, dtype=torch.float64).requires_grad_()
    lab = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 0])  # row 3 (class 2) has no positive: lpos = -inf
    up = torch.rand(4, 9, generator=g, dtype=torch.float64)
    up[1, 3] = 0

    def fn(x):
        st = torch.ops.sslops.sup_con_stats(x, lab, 1.7)
        return torch.where(torch.isfinite(st), st, 0) * up

    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))  # create_graph=True: through the formula


@pytest.mark.skipif("cpu" not in OUT_BACKENDS, reason="sslops._C has no CPU kernels here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["bound", "tile_max", "split"])
def test_cpu_stats_symmetric_tiles(dtype, mode):
    """The cpu kernel's symmetric tiles (csrc/cpu/sup_con.cpp): N = 1 .. 2100 rows give 1 to 9
    blocks (an odd count sits one block out per round, a short last block), and each
    tile's shift: "bound" (normalised rows, inv_temp 10: the norms bound the logits),
    "tile_max" (inv_temp 45: the bound's spread is too wide, the tile's maximum is shared),
    "split" (unnormalised rows, logits spread over hundreds: shifts per row and column, and
    the backward's two exponentials), forward and backward against float64."""
    g = torch.Generator().manual_seed(21)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for n in (1, 2, 5, 63, 65, 130, 390, 513, 1030, 2100):
        d = 3 + n % 13
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        if mode == "split":
            z = 3 * z
            inv_temp = 10.0
        else:
            z = F.normalize(z, dim=1)
            inv_temp = 10.0 if mode == "bound" else 45.0
        scale = inv_temp * max(1.0, z.norm(dim=1).max().item() ** 2 / 10)  # |logits| up to ~1000 for "split"
        for lab in (torch.randint(0, 4, (n,), generator=g),  # large classes
                    torch.randint(0, max(1, n), (n,), generator=g) * 3 - 5):  # many single-member classes
            _stats_vs_float64(torch.ops.sslops.sup_con_stats, z, lab, inv_temp, dtype, tol * scale, seed=n)


@pytest.mark.skipif("cpu" not in OUT_BACKENDS, reason="sslops._C has no CPU kernels here")
@pytest.mark.parametrize("positives", ["out", "in"])
def test_cpu_odd_sizes_and_views(positives):
    """sup_con on the cpu backend for B in {1, 3, 17, 130}, V = 1 .. 4 (V = 1 with labels only),
    no labels, few classes, mostly single-member classes, at T = 0.1 and T = 0.02 (the
    kernel's two shared-shift paths), against the float64 reference."""
    for b in (1, 3, 17, 130):
        for v in (1, 2, 3, 4):
            f = _features(b, v, 24, seed=10 * b + v)
            cases = _label_cases(b, seed=b + v)
            for labels in cases[1:] if v == 1 else cases:
                for t in (0.1, 0.02):
                    up = torch.rand(b, v, generator=torch.Generator().manual_seed(b + v), dtype=torch.float64)
                    _check(f, labels, dict(temperature=t, positives=positives, reduction="none"), "cpu", up)


@pytest.mark.skipif("cpu" not in OUT_BACKENDS, reason="sslops._C has no CPU kernels here")
def test_cpu_stats_do_not_depend_on_the_thread_count():
    """Every row's summation order is fixed by N alone (the tiles' rounds), not by the threads."""
    g = torch.Generator().manual_seed(4)
    z = F.normalize(torch.randn(1500, 32, generator=g), dim=1)
    lab = torch.randint(0, 7, (1500,), generator=g)
    up = torch.rand(4, 1500, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            st = torch.ops.sslops.sup_con_stats(z, lab, 10.0)
            results.append((st, torch.ops.sslops.sup_con_stats_backward(up, z, lab, st, 10.0)))
    finally:
        torch.set_num_threads(threads)
    for st, gz in results[1:]:
        assert torch.equal(st, results[0][0]) and torch.equal(gz, results[0][1])


@pytest.mark.skipif("cpu" not in OUT_BACKENDS, reason="sslops._C has no CPU kernels here")
def test_cpu_stats_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(13, 2, 40, generator=g, dtype=torch.float64)
    z = base[:, 1, ::3].t()  # (14, 13), strides (3, 80)
    lab = torch.randint(0, 4, (28,), generator=g)[::2]
    assert not z.is_contiguous() and not lab.is_contiguous()
    torch.testing.assert_close(torch.ops.sslops.sup_con_stats(z, lab, 2.0),
                               torch.ops.sslops.sup_con_stats(z.contiguous(), lab.contiguous(), 2.0), rtol=0, atol=0)
    _stats_vs_float64(torch.ops.sslops.sup_con_stats, z, lab, 2.0, torch.float64, 1e-12)
    stats = torch.ops.sslops.sup_con_stats(z, lab, 2.0)
    grad = torch.rand(2, 4, 14, generator=g, dtype=torch.float64)[1]  # (4, 14), not contiguous
    torch.testing.assert_close(torch.ops.sslops.sup_con_stats_backward(grad, z, lab, stats, 2.0),
                               torch.ops.sslops.sup_con_stats_backward(grad.contiguous(), z.contiguous(),
                                                                       lab.contiguous(), stats, 2.0), rtol=0, atol=0)


@pytest.mark.skipif("cpu" not in OUT_BACKENDS, reason="sslops._C has no CPU kernels here")
@pytest.mark.parametrize("isa", ["base", "avx2", "auto"])
def test_cpu_isa_paths(monkeypatch, isa):
    """The baseline, AVX2 and (where the CPU has them) AVX-512 builds of the cpu kernels' row
    loops (SSLOPS_CPU_ISA caps the choice, read per call): every one against float64."""
    monkeypatch.setenv("SSLOPS_CPU_ISA", isa)
    g = torch.Generator().manual_seed(13)
    z = torch.randn(530, 20, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 9, (530,), generator=g)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        _stats_vs_float64(torch.ops.sslops.sup_con_stats, z, lab, 2.0, dtype, tol, seed=1)
    _check(_features(17, 3, 16, seed=3), _labels(17, 4), dict(temperature=0.1, positives="in"), "cpu")


class _OpLog(TorchDispatchMode):
    """The ops the dispatcher runs, with their largest output."""

    def __init__(self):
        super().__init__()
        self.names, self.largest = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.add(str(func.overloadpacket))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.skipif("cpu" not in OUT_BACKENDS, reason="sslops._C has no CPU kernels here")
@pytest.mark.parametrize("positives", ["out", "in"])
def test_cpu_backend_is_the_fused_op_and_never_builds_the_logits(positives):
    assert sslops._backend.resolve("sup_con" if positives == "out" else "sup_con_in", "auto",
                                   torch.device("cpu")) == "cpu"
    b, v = 150, 4  # N = 600
    f = _features(b, v, 8, seed=2).float().requires_grad_()
    with _OpLog() as log:
        sslops.sup_con(f, _labels(b, 5), 0.1, positives=positives).backward()
    assert "sslops.sup_con_stats" in log.names and "sslops.sup_con_stats_backward" in log.names
    assert not any("nt_xent" in name for name in log.names)
    assert log.largest < (b * v) ** 2 // 10


@pytest.mark.parametrize("backend", [b for b in ("triton", "cpu") if b in OUT_BACKENDS])
def test_double_backward(backend):
    f = _features(5, 2, 6, seed=3)
    x = f.float().requires_grad_()
    (gx,) = torch.autograd.grad(sslops.sup_con(x, None, 0.5, positives="in", backend=backend), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    x64 = f.clone().requires_grad_()
    (g64,) = torch.autograd.grad(reference.sup_con(x64, None, 0.5, positives="in"), x64, create_graph=True)
    (gg64,) = torch.autograd.grad(g64.pow(2).sum(), x64)
    torch.testing.assert_close(gx.double(), g64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ggx.double(), gg64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positives,backend", [c for c in CASES if c[1] != "reference"])
def test_torch_compile_fullgraph(positives, backend):
    torch._dynamo.reset()
    f = _features(9, 3, 16, seed=4).float()
    labels = _labels(9, 3)

    def step(x, y):
        return sslops.sup_con(x, y, 0.2, positives=positives, backend=backend) + sslops.sup_con(
            x, None, 0.3, positives=positives, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    out_c, out_e = compiled(a, labels), step(b, labels)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward(), out_e.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_module_matches_function():
    f = _features(8, 2, 16).float()
    crit = sslops.SupConLoss(temperature=0.07, base_temperature=0.07)
    torch.testing.assert_close(crit(f, _labels(8, 3)), sslops.sup_con(f, _labels(8, 3), 0.07))


# ---------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    f = _features(4, 2, 8).float()
    with pytest.raises(ValueError, match="features must be 3-D"):
        sslops.sup_con(f[:, 0])
    with pytest.raises(TypeError, match="features"):
        sslops.sup_con(f.numpy())
    with pytest.raises(TypeError, match="features must be a floating"):
        sslops.sup_con(f.long())
    with pytest.raises(ValueError, match="features has no anchors"):
        sslops.sup_con(f[:0])
    with pytest.raises(ValueError, match="D = 0"):
        sslops.sup_con(f[:, :, :0])
    with pytest.raises(ValueError, match="V must be >= 2"):
        sslops.sup_con(f[:, :1])
    sslops.sup_con(f[:, :1], torch.tensor([0, 0, 1, 1]))  # V = 1 with labels is fine
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\) = \(4,\)"):
        sslops.sup_con(f, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="labels must have shape"):
        sslops.sup_con(f, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        sslops.sup_con(f, torch.zeros(4))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        sslops.sup_con(f, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="labels must be None or a torch.Tensor"):
        sslops.sup_con(f, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="labels and features must be on the same device"):
        sslops.sup_con(f, torch.zeros(4, dtype=torch.long, device="meta"))
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            sslops.sup_con(f, temperature=bad)
        with pytest.raises(ValueError, match="base_temperature"):
            sslops.sup_con(f, base_temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        sslops.sup_con(f, temperature="0.1")
    with pytest.raises(ValueError, match="positives"):
        sslops.sup_con(f, positives="both")
    with pytest.raises(ValueError, match="reduction"):
        sslops.sup_con(f, reduction="avg")
    with pytest.raises(TypeError, match="normalize"):
        sslops.sup_con(f, normalize="yes")
    with pytest.raises(ValueError, match="backend"):
        sslops.sup_con(f, backend="fastest")
    with pytest.raises(TypeError, match="gather_distributed"):
        sslops.sup_con(f, gather_distributed=1)
    with pytest.raises(TypeError, match="normalize"):  # at construction, not at the first forward
        sslops.SupConLoss(normalize="False")
    with pytest.raises(TypeError, match="gather_distributed"):
        sslops.SupConLoss(gather_distributed="no")


@pytest.mark.skipif("cpu" not in OUT_BACKENDS, reason="sslops._C has no CPU kernels here")
def test_cpu_stats_ops_bad_input_names_the_argument():
    z = torch.randn(6, 4)
    lab = torch.arange(6)
    ops = torch.ops.sslops
    with pytest.raises(RuntimeError, match="z must be 2-D"):
        ops.sup_con_stats(z[0], lab, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64 z, got Half"):
        ops.sup_con_stats(z.half(), lab, 1.0)
    with pytest.raises(RuntimeError, match="labels must be int64, got Int"):
        ops.sup_con_stats(z, lab.int(), 1.0)
    with pytest.raises(RuntimeError, match=r"labels must have shape \(N,\) = \(6,\)"):
        ops.sup_con_stats(z, lab[:5], 1.0)
    with pytest.raises(RuntimeError, match="inv_temp must be finite and > 0"):
        ops.sup_con_stats(z, lab, 0.0)
    with pytest.raises(RuntimeError, match="inv_temp must be finite and > 0"):
        ops.sup_con_stats(z, lab, float("inf"))
    stats = ops.sup_con_stats(z, lab, 1.0)
    with pytest.raises(RuntimeError, match=r"grad_stats must have shape \(4, N\) = \(4, 6\)"):
        ops.sup_con_stats_backward(stats[:3], z, lab, stats, 1.0)
    with pytest.raises(RuntimeError, match=r"stats must have shape \(4, N\)"):
        ops.sup_con_stats_backward(stats, z, lab, stats.t(), 1.0)
    with pytest.raises(RuntimeError, match="grad_stats must be floating"):
        ops.sup_con_stats_backward(stats.long(), z, lab, stats, 1.0)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        ops.sup_con_stats_backward(stats, z, lab.float(), stats, 1.0)


def test_backends_that_cannot_run_raise():
    f = _features(4, 2, 8).float()
    with pytest.raises(ValueError, match="'cuda'"):
        sslops.sup_con(f, backend="cuda")
    if "triton" in OUT_BACKENDS:
        for dtype in (torch.float64, torch.bfloat16):
            with pytest.raises(ValueError, match="backend='triton' cannot run sup_con"):
                sslops.sup_con(f.to(dtype), backend="triton")
    expected = "cpu" if "cpu" in OUT_BACKENDS else "reference"
    assert sslops._backend.resolve("sup_con", "auto", torch.device("cpu")) == expected
    assert sslops._backend.resolve("sup_con_in", "auto", torch.device("cpu")) == expected

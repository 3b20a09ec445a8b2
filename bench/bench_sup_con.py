"""sup_con forward+backward on CPU: sslops vs the materialising formulas.

Baselines, re-implemented here from their published definitions:

* SupContrast's ``SupConLoss`` (HobbitLong/SupContrast losses.py,
  contrast_mode="all"): the (BV, BV) logits, masks and log-probabilities;
  compared with ``sslops.sup_con(positives="out")``.
* solo-learn's ``simclr_loss_func(z, indexes)`` (its "in" form, with label
  ids as ``indexes``); compared with ``sslops.sup_con(positives="in")``.

sslops, side by side in each case:

* ``sslops (cpu)``: the cpu backend, the fused ``sslops::sup_con_stats``
  kernels (csrc/cpu/sup_con.cpp): one pass over the symmetric tiles of the
  logits for the (4, BV) per-row statistics, one for their backward.
* ``sslops (auto)``: ``backend="auto"``, whatever it picks on the CPU.
* ``sslops composite``: the composition the cuda backend runs, here on the CPU
  kernels of its ops (the cpu backend before the fused kernels): the fused
  NT-Xent lse kernel plus O(N D) class sums ("out"), plus a per-class
  log-sum-exp over the positives ("in": batched Grams for small classes, the
  fused nt_xent_lse kernel on each large class's rows).

    pytest bench/bench_sup_con.py --benchmark-only
"""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import sslops
from conftest import peak_memory

_sup_con_module = importlib.import_module("sslops.sup_con")

TEMPERATURE = 0.1


def supcon_formula(features, labels, temperature=TEMPERATURE, base_temperature=TEMPERATURE):
    """SupConLoss.forward (contrast_mode='all'), transcribed; features normalised first."""
    features = F.normalize(features, dim=2)
    device = features.device
    batch_size = features.shape[0]
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).float().to(device)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature, anchor_count = contrast_feature, contrast_count
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
    return loss.view(anchor_count, batch_size).mean()


def solo_learn_formula(features, labels, temperature=TEMPERATURE):
    """solo-learn simclr_loss_func(z, indexes) on one process, transcribed."""
    z = F.normalize(torch.cat(torch.unbind(features, dim=1)), dim=-1)
    indexes = labels.repeat(features.shape[1])
    sim = torch.exp(torch.einsum("if, jf -> ij", z, z) / temperature)
    indexes = indexes.unsqueeze(0)
    pos_mask = indexes.t() == indexes
    pos_mask.fill_diagonal_(0)
    neg_mask = indexes.t() != indexes
    pos = torch.sum(sim * pos_mask, 1)
    neg = torch.sum(sim * neg_mask, 1)
    return -(torch.mean(torch.log(pos / (pos + neg))))


@contextlib.contextmanager
def _composite():
    """The cpu backend runs cuda's composition instead of the fused statistics ops."""
    saved = _sup_con_module._FUSED
    _sup_con_module._FUSED = tuple(b for b in saved if b != "cpu")
    try:
        yield
    finally:
        _sup_con_module._FUSED = saved


def _sslops(form, composite=False, backend="cpu"):
    def fn(f, y):
        with _composite() if composite else contextlib.nullcontext():
            return sslops.sup_con(f, y, TEMPERATURE, positives=form, backend=backend)

    return fn


IMPLS = {
    "out": {
        "SupConLoss formula": supcon_formula,
        "sslops (cpu)": _sslops("out"),
        "sslops (auto)": _sslops("out", backend="auto"),
        "sslops composite": _sslops("out", composite=True),
    },
    "in": {
        "solo-learn formula": solo_learn_formula,
        "sslops (cpu)": _sslops("in"),
        "sslops (auto)": _sslops("in", backend="auto"),
        "sslops composite": _sslops("in", composite=True),
    },
}
BASELINE = {"out": "SupConLoss formula", "in": "solo-learn formula"}


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("views", [2, 4])
@pytest.mark.parametrize("form,impl", [(f, i) for f, impls in IMPLS.items() for i in impls])
def test_sup_con_cpu(benchmark, record, form, impl, views, classes):
    B, D = 512, 128
    g = torch.Generator().manual_seed(0)
    features = torch.randn(B, views, D, generator=g).requires_grad_()
    labels = torch.randint(0, classes, (B,), generator=g)
    fn = IMPLS[form][impl]

    def run():
        features.grad = None
        fn(features, labels).backward()

    run()  # warm-up
    with peak_memory("cpu") as mem:
        run()
    benchmark.group = f"sup_con cpu positives={form} B={B} V={views} D={D} classes={classes}"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=0)
    record(benchmark.group, impl, benchmark, peak_mb=mem["mb"], baseline=impl == BASELINE[form])


GPU = torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
# bf16/fp16: cuda = the tensor-core NT-Xent composition; fp32: cuda = the fused csrc/cuda/sup_con.cu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [8192, 32768])  # B * V, V = 4, 100 classes
@pytest.mark.parametrize("impl", ["SupConLoss formula", "sslops-cuda", "sslops-triton"])
def test_sup_con_gpu(benchmark, record, impl, n, dtype):
    views, D = 4, 128
    B = n // views
    if impl.startswith("sslops-") and impl[7:] not in sslops.backends("sup_con", "cuda", dtype):
        pytest.skip(f"{impl} does not run sup_con on {dtype} here")
    g = torch.Generator(device="cuda").manual_seed(0)
    features = torch.randn(B, views, D, generator=g, device="cuda", dtype=dtype).requires_grad_()
    labels = torch.randint(0, 100, (B,), generator=g, device="cuda")
    fn = supcon_formula if impl == "SupConLoss formula" else (
        lambda f, y: sslops.sup_con(f, y, TEMPERATURE, backend=impl[7:]))

    def run():
        features.grad = None
        fn(features, labels).backward()
        torch.cuda.synchronize()

    run()
    with peak_memory("cuda") as mem:
        run()
    benchmark.group = f"sup_con cuda {str(dtype)[6:]} positives=out B={B} V={views} D={D} classes=100"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=0)
    record(benchmark.group, impl, benchmark, peak_mb=mem["mb"], baseline=impl == "SupConLoss formula")

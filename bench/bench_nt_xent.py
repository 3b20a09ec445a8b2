"""NT-Xent forward+backward: sslops backends vs the materialising formula.

The materialising formula is lightly's NTXentLoss (and the SimCLR reference
code): four (N, N) logit blocks, diagonal masking, concatenation and
cross-entropy; it also runs under torch.compile.  lightly itself runs too when
installed.

    pytest bench/bench_nt_xent.py --benchmark-only
    pytest bench/bench_nt_xent.py --benchmark-only -k "cpu and 4096"   # the CPU target case
"""
import pytest
import torch
import torch.nn.functional as F

import sslops
from conftest import peak_memory

GPU = torch.cuda.is_available()


def materialising(out0, out1, temperature=0.5):
    """lightly.loss.NTXentLoss.forward without memory bank, transcribed."""
    out0 = F.normalize(out0, dim=1)
    out1 = F.normalize(out1, dim=1)
    n = out0.shape[0]
    logits_00 = torch.einsum("nc,mc->nm", out0, out0) / temperature
    logits_01 = torch.einsum("nc,mc->nm", out0, out1) / temperature
    logits_10 = torch.einsum("nc,mc->nm", out1, out0) / temperature
    logits_11 = torch.einsum("nc,mc->nm", out1, out1) / temperature
    diag_mask = ~torch.eye(n, dtype=torch.bool, device=out0.device)
    logits_00 = logits_00[diag_mask].view(n, -1)
    logits_11 = logits_11[diag_mask].view(n, -1)
    logits_0100 = torch.cat([logits_01, logits_00], dim=1)
    logits_1011 = torch.cat([logits_10, logits_11], dim=1)
    logits = torch.cat([logits_0100, logits_1011], dim=0)
    labels = torch.arange(n, device=out0.device).repeat(2)
    return F.cross_entropy(logits, labels)


def _impls(device):
    impls = {"materialising": materialising}
    try:
        from lightly.loss import NTXentLoss

        impls["lightly"] = NTXentLoss(temperature=0.5)
    except ImportError:
        pass
    # The formula under torch.compile (inductor; C++/OpenMP code on the CPU): what a
    # user who does not take a fused kernel would reach for.
    impls["materialising+compile"] = torch.compile(materialising)
    for be in sslops.backends("nt_xent", device):
        if be == "reference" or (be == "triton" and torch.device(device).type == "cpu"):
            continue  # reference materialises too; the interpreter is not a speed path
        impls[f"sslops-{be}"] = lambda a, b, be=be: sslops.nt_xent(a, b, 0.5, backend=be)
    return impls


def _inputs(n, d, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_()
    z2 = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_()
    return z1, z2


def _step(fn, z1, z2, device):
    def run():
        z1.grad = z2.grad = None
        fn(z1, z2).backward()
        if GPU and torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    return run


def _bench(benchmark, record, impl, fn, n, d, dtype, device, rounds):
    z1, z2 = _inputs(n, d, dtype, device)
    run = _step(fn, z1, z2, device)
    try:
        run()  # warm-up (compilation, allocator)
        with peak_memory(device) as mem:
            run()
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of GPU memory at N={n}")
    benchmark.group = f"nt_xent {device} {str(dtype)[6:]} N={n} D={d}"
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    record(benchmark.group, impl, benchmark, peak_mb=mem["mb"], baseline=impl == "materialising")


CPU_IMPLS = list(_impls("cpu"))


@pytest.mark.parametrize("n", [256, 1024, 4096])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nt_xent_cpu(benchmark, record, impl, n):
    rounds = {256: 20, 1024: 5, 4096: 3}[n]
    _bench(benchmark, record, impl, _impls("cpu")[impl], n, 128, torch.float32, "cpu", rounds)


GPU_IMPLS = ["materialising", "materialising+compile", "sslops-cuda", "sslops-triton"]


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1024, 8192, 32768])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_nt_xent_gpu(benchmark, record, impl, n, dtype):
    impls = _impls("cuda")
    if impl not in impls:
        pytest.skip(f"{impl} not available")
    if impl.startswith("materialising") and n > 8192 and dtype == torch.float32:
        pytest.skip("the materialising formula needs > 100 GB here")
    _bench(benchmark, record, impl, impls[impl], n, 128, dtype, "cuda", rounds=10 if n <= 8192 else 3)

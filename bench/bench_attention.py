"""Exact attention, forward and forward+backward: sslops vs torch SDPA, timm, flash-attn.

    pytest bench/bench_attention.py --benchmark-only

FLOPs (the issue's convention): 4 * B * H * Lq * Lk * D per forward, 2.5x
that for the backward (fwd+bwd = 3.5x); causal is off everywhere.

CPU (fp32, side by side in one run): sslops ``cpu`` vs torch's own CPU
``F.scaled_dot_product_attention`` (the baseline) and vs timm's unfused
attention (``fused_attn = False``: explicit q k^T, softmax, @ v), at ViT shapes
B = 16, H = 12, D = 64, L in {50, 197, 257}, and L = 1024 with D = 64 / 128
(B = 4 there: a CPU round of B = 16 takes seconds).

GPU (bf16, only with a GPU): every SDPA backend pinned one at a time (FLASH,
EFFICIENT, CUDNN, MATH), flash-attn's ``flash_attn_func`` when importable,
sslops ``cuda`` and ``triton``; ViT shapes at B = 256 and L = 4096, D = 128 at
B = 8, H = 16.  The baseline of each group is SDPA-FLASH.
"""
import math
import time

import pytest
import torch
import torch.nn.functional as F

import sslops
from conftest import peak_memory, rounds_for

GPU = torch.cuda.is_available()


def _flops(B, H, L, D, mode):
    fwd = 4 * B * H * L * L * D
    return fwd if mode == "fwd" else 3.5 * fwd


def timm_unfused(q, k, v):
    """timm's Attention with fused_attn = False, transcribed (scale, softmax, @ v)."""
    q = q * q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn @ v


def _sdpa_pinned(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(kind):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _flash_attn():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    # flash-attn takes (B, L, H, D); the transposes are views, as for a packed qkv
    return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _impls(device):
    impls = {}
    if device == "cpu":
        impls["torch-sdpa"] = F.scaled_dot_product_attention
        impls["timm-unfused"] = timm_unfused
    else:
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            impls[f"sdpa-{name.split('_')[0]}"] = _sdpa_pinned(name)
        fa = _flash_attn()
        if fa is not None:
            impls["flash-attn"] = fa
    for be in sslops.backends("attention", device):
        if be == "reference" or (be == "triton" and device == "cpu"):
            continue  # reference materialises; the interpreter is not a speed path
        impls[f"sslops-{be}"] = lambda q, k, v, be=be: sslops.attention(q, k, v, backend=be)
    return impls


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, record, impl, fn, B, H, L, D, dtype, device, mode, rounds, baseline):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    grad = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen)
    if mode == "fwd+bwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v)
        else:
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(grad)
        _sync(device)

    try:
        run()  # warm-up: compilation, allocator, autotuning
        with peak_memory(device) as mem:
            start = time.perf_counter()
            run()
            once = time.perf_counter() - start
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # e.g. an SDPA backend refusing the shape
        pytest.skip(f"{impl}: {str(exc).splitlines()[0][:200]}")
    benchmark.group = f"attention {mode} {device} {str(dtype)[6:]} B={B} H={H} L={L} D={D}"
    # Short calls (a few ms at L = 50) get rounds for ~0.5 s: their median is not five samples of noise.
    benchmark.pedantic(run, rounds=rounds_for(once, rounds), iterations=1, warmup_rounds=1)
    flops = _flops(B, H, L, D, mode)
    benchmark.extra_info["flops"] = flops
    record(benchmark.group, impl, benchmark, peak_mb=mem["mb"], baseline=impl == baseline, flops=flops, stat="median")


# ---------------------------------------------------------------- CPU
# One flat list, implementations innermost: the rows of a group run back to back
# (on a shared machine, minutes apart would compare different loads).
CPU_SHAPES = [(16, 12, 50, 64), (16, 12, 197, 64), (16, 12, 257, 64), (4, 12, 1024, 64), (4, 12, 1024, 128)]
CPU_CASES = [(B, H, L, D, mode, impl) for B, H, L, D in CPU_SHAPES for mode in ("fwd", "fwd+bwd")
             for impl in _impls("cpu")]


@pytest.mark.parametrize("B,H,L,D,mode,impl", CPU_CASES, ids=[f"B{c[0]}-L{c[2]}-D{c[3]}-{c[4]}-{c[5]}" for c in CPU_CASES])
def test_attention_cpu(benchmark, record, impl, B, H, L, D, mode):
    rounds = 5 if L <= 257 else 3
    _bench(benchmark, record, impl, _impls("cpu")[impl], B, H, L, D, torch.float32, "cpu", mode, rounds,
           baseline="torch-sdpa")


# ---------------------------------------------------------------- GPU
GPU_SHAPES = [(256, 12, 50, 64), (256, 12, 197, 64), (256, 12, 257, 64), (8, 16, 4096, 128)]
GPU_IMPLS = ["sdpa-FLASH", "sdpa-EFFICIENT", "sdpa-CUDNN", "sdpa-MATH", "flash-attn", "sslops-cuda", "sslops-triton"]
GPU_CASES = [(B, H, L, D, mode, impl) for B, H, L, D in GPU_SHAPES for mode in ("fwd", "fwd+bwd")
             for impl in GPU_IMPLS]


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("B,H,L,D,mode,impl", GPU_CASES, ids=[f"B{c[0]}-L{c[2]}-D{c[3]}-{c[4]}-{c[5]}" for c in GPU_CASES])
def test_attention_gpu(benchmark, record, impl, B, H, L, D, mode):
    impls = _impls("cuda")
    if impl not in impls:
        pytest.skip(f"{impl} not available here")
    if impl == "sdpa-MATH" and L > 1024:
        pytest.skip("the math backend materialises (B, H, L, L): minutes at L = 4096")
    _bench(benchmark, record, impl, impls[impl], B, H, L, D, torch.bfloat16, "cuda", mode, rounds=10,
           baseline="sdpa-FLASH")

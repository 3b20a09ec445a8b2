"""Benchmarks of sslops.masking against MAE's torch implementation.

    pytest bench/bench_masking.py --benchmark-only [--benchmark-group-by=group]

MAE's encoder adds the positional embedding to every token and then gathers
the kept ones with an expanded index (``ids_keep.unsqueeze(-1).repeat(1, 1, D)``):
two passes over x plus a (B, K, D) int64 index.  The fused gather reads the
kept rows of x and pos_embed once and writes the output once.  The decoder's
un-shuffle (cat + gather with an expanded index) is compared the same way.

Shapes: ViT-B/16 (B=256, L=196, D=768) and ViT-S/16 (D=384) at mask ratio
0.75 (K=49); decoder D=512.  CPU rounds are few (each call moves ~0.3 GB).
Each case records in extra_info the bytes that must move and the achieved
GB/s; on a GPU a device-to-device copy of those bytes is the ceiling.
"""
import pytest
import torch

import sslops
from sslops import reference

B, L, RATIO = 256, 196, 0.75
K = int(L * (1 - RATIO))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, record, impl, fn, device, nbytes):
    def call():
        out = fn()
        _sync(device)
        return out

    if device == "cpu":
        benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(call, rounds=50, iterations=5, warmup_rounds=5)
    benchmark.extra_info["bytes_moved"] = nbytes
    # the side-by-side summary (bench/conftest.py): ms, GB/s of the bytes that must move,
    # speed-up over MAE's torch code measured in the same run
    record(benchmark.group, impl, benchmark, baseline=impl == "torch-mae", throughput=(nbytes / 1e9, "GB/s"))


_CACHE = {}


def _inputs(device, D):
    key = (device, D)
    if key not in _CACHE:
        _CACHE.clear()  # one shape at a time: CPU memory on small boxes
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(B, L, D, device=device, generator=gen)
        pos = torch.randn(1, L, D, device=device, generator=gen)
        noise = torch.rand(B, L, device=device, generator=gen)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_keep = ids_shuffle[:, :K]
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        _CACHE[key] = (x, pos, ids_keep, ids_restore)
    return _CACHE[key]


def _mae_gather_pos(x, pos, ids_keep):
    """MAE models_mae.py: x = x + pos_embed[:, 1:]; then random_masking's gather."""
    x = x + pos
    D = x.shape[2]
    return torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))


def _backends(op, device):
    found = [b for b in sslops.backends(op, device) if b != "reference"]
    return [b for b in found if not (b == "triton" and device == "cpu")]  # interpreter: not a fast path


GATHER_CASES = [(dev, D, be) for dev in DEVICES for D in (768, 384)
                for be in ["torch-mae"] + _backends("gather_tokens", dev) + (["copy"] if dev == "cuda" else [])]


@pytest.mark.parametrize("device,D,impl", GATHER_CASES, ids=[f"{d}-D{D}-{i}" for d, D, i in GATHER_CASES])
def test_gather_pos_embed(benchmark, record, device, D, impl):
    """Forward of gather + pos-embed add at ViT-B / ViT-S shapes."""
    x, pos, ids_keep, _ = _inputs(device, D)
    benchmark.group = f"gather+pos {device} B={B} L={L} D={D} K={K}"
    nbytes = 3 * B * K * D * x.element_size()  # kept rows of x and pos read, output written
    if impl == "torch-mae":
        fn = lambda: _mae_gather_pos(x, pos, ids_keep)
    elif impl == "copy":
        src = torch.empty(B * K * D * 2, device=device)
        dst = torch.empty(B * K * D, device=device)
        fn = lambda: dst.copy_(src[: B * K * D])  # 2/3 of the bytes: copy reads 1, writes 1
        nbytes = 2 * B * K * D * x.element_size()
    else:
        want = _mae_gather_pos(x, pos, ids_keep)
        got = sslops.gather_tokens(x, ids_keep, pos_embed=pos, backend=impl)
        assert torch.equal(got, want)
        fn = lambda: sslops.gather_tokens(x, ids_keep, pos_embed=pos, backend=impl)
    _run(benchmark, record, impl, fn, device, nbytes)


RESTORE_CASES = [(dev, be) for dev in DEVICES for be in ["torch-mae"] + _backends("restore_tokens", dev)]


@pytest.mark.parametrize("device,impl", RESTORE_CASES, ids=[f"{d}-{i}" for d, i in RESTORE_CASES])
def test_restore_decoder(benchmark, record, device, impl):
    """MAE decoder un-shuffle, decoder width 512, cls token in front."""
    D = 512
    gen = torch.Generator(device=device).manual_seed(1)
    xv = torch.randn(B, 1 + K, D, device=device, generator=gen)
    mt = torch.randn(1, 1, D, device=device, generator=gen)
    ids_restore = _inputs(device, 384)[3]
    benchmark.group = f"restore {device} B={B} L={L} D={D} K={K}"
    nbytes = (B * (1 + K) * D + B * (1 + L) * D) * xv.element_size()
    if impl == "torch-mae":
        fn = lambda: reference.mae_decoder_unshuffle(xv, ids_restore, mt)
    else:
        assert torch.equal(sslops.restore_tokens(xv, ids_restore, mt, num_prefix_tokens=1, backend=impl),
                           reference.mae_decoder_unshuffle(xv, ids_restore, mt))
        fn = lambda: sslops.restore_tokens(xv, ids_restore, mt, num_prefix_tokens=1, backend=impl)
    _run(benchmark, record, impl, fn, device, nbytes)


BACKWARD_CASES = [(dev, be) for dev in DEVICES for be in ["torch-mae"] + _backends("gather_tokens", dev)]


@pytest.mark.parametrize("device,impl", BACKWARD_CASES, ids=[f"{d}-{i}" for d, i in BACKWARD_CASES])
def test_gather_pos_embed_forward_backward(benchmark, record, device, impl):
    """Forward + backward (grad_x scattered, grad_pos_embed summed over B), ViT-B."""
    D = 768
    x0, pos0, ids_keep, _ = _inputs(device, D)
    x = x0.clone().requires_grad_()
    pos = pos0.clone().requires_grad_()
    g = torch.randn(B, K, D, device=device)
    benchmark.group = f"gather+pos fwd+bwd {device} B={B} L={L} D={D} K={K}"
    # forward as above; backward reads grad, writes grad_x, reads it for the pos sum
    nbytes = (3 * B * K * D + B * K * D + 2 * B * L * D + L * D) * x.element_size()
    if impl == "torch-mae":
        f = lambda: _mae_gather_pos(x, pos, ids_keep)
    else:
        f = lambda: sslops.gather_tokens(x, ids_keep, pos_embed=pos, backend=impl)
    fn = lambda: torch.autograd.grad(f(), (x, pos), g)
    _run(benchmark, record, impl, fn, device, nbytes)

"""gather_distributed=True with different batch sizes on the ranks (2 gloo
processes): losses, and DDP-averaged gradients, equal one process on the
concatenated batch; a rank with 0 rows takes part without hanging; ranks
whose D differs raise a ValueError naming the argument on every rank."""
import datetime
import os
import time
import warnings

import pytest
import torch

import sslops
from sslops import reference

BACKENDS = [b for b in sslops.backends("nt_xent", "cpu", torch.float64)]  # cpu, reference
WORLD, D, T = 2, 8, 0.2
BANK = 16


def _batch(sizes, d=D, seed=7):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    return a, b


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _worker(rank, sizes, widths, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            out = _work(rank, sizes, widths)
        out["future_warnings"] = [f"{w.filename}:{w.lineno}: {w.message}" for w in log
                                  if issubclass(w.category, FutureWarning)]
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _work(rank, sizes, widths):
    from sslops._distributed import gather_rows_with_grad

    out = {}
    a_all, b_all = _batch(sizes)
    for backend in BACKENDS:
        for op in ("nt_xent", "info_nce"):
            a = a_all[_rows(sizes, rank)].clone().requires_grad_()
            b = b_all[_rows(sizes, rank)].clone().requires_grad_()
            fn = getattr(sslops, op)
            per_row = fn(a, b, temperature=T, gather_distributed=True, reduction="none", backend=backend)
            loss = fn(a, b, temperature=T, gather_distributed=True, backend=backend)
            loss.backward()
            out[backend, op] = dict(per_row=per_row.detach(), loss=loss.detach(), ga=a.grad, gb=b.grad)
    # Memory bank, gathered update: two steps (13 rows each for (8, 5): the FIFO wraps).
    torch.manual_seed(0)
    m = sslops.NTXentLoss(T, memory_bank_size=(BANK, D), gather_distributed=True).double()
    for step in range(2):
        a_all, b_all = _batch(sizes, seed=11 + step)
        a = a_all[_rows(sizes, rank)].clone().requires_grad_()
        b = b_all[_rows(sizes, rank)].clone().requires_grad_()
        loss = m(a, b)
        loss.backward()
        out["bank", step] = dict(loss=loss.detach(), ga=a.grad, gb=b.grad, bank=m.memory_bank.bank.clone(),
                                 ptr=int(m.memory_bank.bank_ptr))
    # D differs between ranks: every rank raises, none waits for the others.
    z = torch.randn(3, widths[rank], dtype=torch.float64)
    try:
        sslops.nt_xent(z, z, gather_distributed=True)
    except ValueError as e:
        out["width_error"] = str(e)
    # Double backward through the gather: every rank computes sum(y**3) of the gathered y,
    # so x_r's gradient is WORLD * 3 x_r**2 and that of its sum WORLD * 6 x_r.
    x = a_all[_rows(sizes, rank)].clone().requires_grad_()
    y, _ = gather_rows_with_grad(x, "x")
    (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    g.sum().backward()
    out["double"] = dict(x=x.detach(), g=g.detach(), gg=x.grad)
    return out


def _spawn(args, timeout=120):
    import torch.multiprocessing as mp

    ctx = mp.spawn(_worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"gloo workers still running after {timeout} s (a rank hangs)")


def _full(op, a, b):
    """Per-row losses of one process on the concatenated batch, and the
    gradients of their mean."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    per_row = getattr(reference, op)(a, b, temperature=T, reduction="none")
    per_row.mean().backward()
    return per_row.detach(), a.grad, b.grad


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(8, 5), (1, 0), (0, 3)])
def test_uneven_batches_two_gloo_processes(sizes, tmp_path):
    _spawn((sizes, (D, D + 3), str(tmp_path / "init"), str(tmp_path)))
    a_all, b_all = _batch(sizes)
    total = sum(sizes)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    for op, anchors in (("nt_xent", 2), ("info_nce", 1)):
        per_row, ga_full, gb_full = _full(op, a_all, b_all)
        for backend in BACKENDS:
            losses = []
            for rank, res in enumerate(results):
                r, rows = res[backend, op], _rows(sizes, rank)
                own = torch.cat([per_row[:total][rows], per_row[total:][rows]]) if anchors == 2 else per_row[rows]
                torch.testing.assert_close(r["per_row"], own)
                # Rank loss: own sum over anchors * total / world; 0 (not nan) on an empty rank.
                torch.testing.assert_close(r["loss"], own.sum() / (anchors * total / WORLD))
                # DDP averages gradients over ranks: grad / world == gradient of the full-batch mean.
                torch.testing.assert_close(r["ga"] / WORLD, ga_full[rows])
                torch.testing.assert_close(r["gb"] / WORLD, gb_full[rows])
                losses.append(r["loss"])
            torch.testing.assert_close(torch.stack(losses).mean(), per_row.mean())
    # Memory bank: one process with the concatenated batch and no gather is the reference
    # (tests/test_nt_xent_memory_bank.py checks that one against lightly).
    torch.manual_seed(0)
    ref = sslops.NTXentLoss(T, memory_bank_size=(BANK, D)).double()
    for step in range(2):
        a_all, b_all = _batch(sizes, seed=11 + step)
        a, b = a_all.clone().requires_grad_(), b_all.clone().requires_grad_()
        loss = ref(a, b)
        loss.backward()
        for rank, res in enumerate(results):
            r, rows = res["bank", step], _rows(sizes, rank)
            torch.testing.assert_close(r["bank"], ref.memory_bank.bank)  # every rank pushed every rank's rows
            assert r["ptr"] == int(ref.memory_bank.bank_ptr)
            torch.testing.assert_close(r["ga"] / WORLD, a.grad[rows])
            torch.testing.assert_close(r["gb"] / WORLD, b.grad[rows])
        torch.testing.assert_close(torch.stack([res["bank", step]["loss"] for res in results]).mean(), loss.detach())
    for rank, res in enumerate(results):
        # The gather (forward and backward) is warning-free: torch.distributed.nn.functional
        # emits a FutureWarning on every all_gather.
        assert res["future_warnings"] == [], res["future_warnings"]
        x, g, gg = res["double"]["x"], res["double"]["g"], res["double"]["gg"]
        torch.testing.assert_close(g, WORLD * 3 * x**2)
        torch.testing.assert_close(gg, WORLD * 6 * x)
        assert "z1" in res["width_error"] and "same width D" in res["width_error"], res.get("width_error")


def test_info_nce_gather_takes_no_queue():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="gather_distributed"):
        sslops.info_nce(z, z, negatives=z, gather_distributed=True)

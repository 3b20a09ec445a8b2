"""sup_con(gather_distributed=True) with different batch sizes on the ranks (2
gloo processes): per-anchor losses, the ranks' losses and the DDP-averaged
gradients equal one process on the concatenated batch (float64 reference),
for labels=None (each sample's views stay its positives after the gather) and
labels (positives across ranks), positives "out" and "in", anchors without a
positive, classes small and large (the batched and the fused class paths);
a rank with 0 rows takes part without hanging; ranks whose V, D, dtype or
labels disagree raise a ValueError (TypeError) naming the argument on every
rank."""
import datetime
import os
import time

import pytest
import torch

import sslops
from sslops import reference

BACKENDS = sslops.backends("sup_con", "cpu", torch.float64)  # cpu, reference
# Triton in the interpreter (float32) when TRITON_INTERPRET=1, on one configuration.
TRITON = "triton" in sslops.backends("sup_con", "cpu", torch.float32)
WORLD, D, T = 2, 8, 0.2
# name: (V, labels kind, batch scale, extra kwargs)
CONFIGS = {
    "views": (3, None, 1, {}),  # labels=None: positives are the sample's other views
    "labels": (2, "few", 1, {}),  # 3 classes spread over both ranks
    "labels_v1": (1, "singletons", 1, {}),  # V = 1: labels seen once have no positive
    "big_class": (2, "big", 5, {}),  # one class > 64 rows: the fused nt_xent_lse class path
    "unnormalised": (2, "few", 1, dict(normalize=False, base_temperature=0.5)),
}


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _data(name, sizes, seed=3):
    """Global features (total, V, D) and labels (total,) or None, float64."""
    v, kind, scale, kwargs = CONFIGS[name]
    sizes = [s * scale for s in sizes]
    total = sum(sizes)
    g = torch.Generator().manual_seed(seed + len(name))
    f = torch.randn(total, 1, D, generator=g, dtype=torch.float64) + 0.7 * torch.randn(
        total, v, D, generator=g, dtype=torch.float64)
    if kind is None:
        labels = None
    elif kind == "few":
        labels = torch.randint(0, 3, (total,), generator=g) * 5 - 4
    elif kind == "singletons":  # ids 0..total/2: some appear once, some more often
        labels = torch.randint(0, max(total // 2, 1), (total,), generator=g)
    else:  # "big": about 70 % of the rows in class 11
        labels = torch.where(torch.rand(total, generator=g) < 0.7, 11, 2)
    return f, labels, sizes, kwargs


def _worker(rank, sizes, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_work(rank, sizes), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _one(rank, name, sizes, backend, positives, dtype=torch.float64):
    f_all, labels_all, sizes, kwargs = _data(name, sizes)
    rows = _rows(sizes, rank)
    f = f_all[rows].to(dtype).clone().requires_grad_()
    labels = None if labels_all is None else labels_all[rows]
    args = dict(temperature=T, positives=positives, gather_distributed=True, backend=backend, **kwargs)
    per_row = sslops.sup_con(f, labels, reduction="none", **args)
    total = sslops.sup_con(f, labels, reduction="sum", **args)
    loss = sslops.sup_con(f, labels, **args)
    loss.backward()
    return dict(per_row=per_row.detach(), sum=total.detach(), loss=loss.detach(), grad=f.grad)


def _work(rank, sizes):
    out = {}
    for name in CONFIGS:
        for positives in ("out", "in"):
            for backend in BACKENDS:
                out[name, positives, backend] = _one(rank, name, sizes, backend, positives)
            if TRITON and name == "labels":
                out[name, positives, "triton"] = _one(rank, name, sizes, "triton", positives, torch.float32)
    # The module form passes gather_distributed on.
    f_all, labels_all, s, _ = _data("labels", sizes)
    crit = sslops.SupConLoss(T, gather_distributed=True)
    out["module"] = crit(f_all[_rows(s, rank)], labels_all[_rows(s, rank)])
    # Bad input: every rank raises (none waits in a collective), naming the argument.
    errors = {}
    b = sizes[rank]
    z = torch.randn(b, 2, D, dtype=torch.float64)
    cases = {
        "views": lambda: sslops.sup_con(torch.randn(b, 2 + rank, D, dtype=torch.float64), gather_distributed=True),
        "width": lambda: sslops.sup_con(torch.randn(b, 2, D + rank, dtype=torch.float64), gather_distributed=True),
        "labels_on_one_rank": lambda: sslops.sup_con(
            z, torch.zeros(b, dtype=torch.long) if rank == 0 else None, gather_distributed=True),
        "bad_labels_on_one_rank": lambda: sslops.sup_con(
            z, torch.zeros(b + rank, dtype=torch.long), gather_distributed=True),
        "dtype": lambda: sslops.sup_con(z.float() if rank == 0 else z, gather_distributed=True),
        "one_view_no_labels": lambda: sslops.sup_con(z[:, :1], gather_distributed=True),
        "empty_everywhere": lambda: sslops.sup_con(z[:0], gather_distributed=True),
    }
    for what, call in cases.items():
        try:
            call()
            errors[what] = None
        except (TypeError, ValueError) as e:
            errors[what] = (type(e).__name__, str(e))
    out["errors"] = errors
    return out


def _spawn(args, timeout=300):
    import torch.multiprocessing as mp

    ctx = mp.spawn(_worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"gloo workers still running after {timeout} s (a rank hangs)")


def _full(name, sizes, positives):
    """One process on the concatenated batch: (total, V) per-anchor losses, the
    mean (the reference's: over the anchors that have a positive), its gradient,
    and H, the number of anchors with a positive (counted here from the labels)."""
    f_all, labels_all, sizes, kwargs = _data(name, sizes)
    f = f_all.clone().requires_grad_()
    args = dict(temperature=T, positives=positives, **kwargs)
    per_row = reference.sup_con(f, labels_all, reduction="none", **args)
    loss = reference.sup_con(f, labels_all, **args)
    loss.backward()
    v = f.shape[1]
    if labels_all is None:
        has = sum(sizes) * v
    else:
        counts = torch.unique(labels_all, return_counts=True)[1] * v
        has = int(counts[counts > 1].sum())
    return per_row.detach(), loss.detach(), f.grad, has, sizes


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(8, 5), (1, 0), (0, 3)])
def test_uneven_batches_two_gloo_processes(sizes, tmp_path):
    _spawn((sizes, str(tmp_path / "init"), str(tmp_path)))
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    checked = 0
    for name in CONFIGS:
        for positives in ("out", "in"):
            per_row, loss_full, grad_full, has, scaled = _full(name, sizes, positives)
            if name == "labels_v1" and sizes == (1, 0):
                assert has == 0  # one row, no positive: the loss is 0 on every rank
            for backend in BACKENDS + (["triton"] if TRITON and name == "labels" else []):
                tol = {} if backend != "triton" else dict(rtol=1e-4, atol=1e-5)
                losses = []
                for rank, res in enumerate(results):
                    r, rows = res[name, positives, backend], _rows(scaled, rank)
                    own = per_row[rows]
                    assert r["per_row"].shape == own.shape
                    torch.testing.assert_close(r["per_row"].double(), own, **tol)
                    torch.testing.assert_close(r["sum"].double(), own.sum(), **tol)
                    # Rank loss: own sum / (H / world); 0 (not nan) on an empty rank or with H = 0.
                    torch.testing.assert_close(r["loss"].double(), own.sum() / (max(has, 1) / WORLD), **tol)
                    # DDP averages gradients over ranks: grad / world == gradient of the full-batch mean.
                    torch.testing.assert_close(r["grad"].double() / WORLD, grad_full[rows], **tol)
                    losses.append(r["loss"].double())
                    checked += 1
                torch.testing.assert_close(torch.stack(losses).mean(), loss_full, **tol)
    assert checked == WORLD * len(CONFIGS) * 2 * len(BACKENDS) + (WORLD * 2 if TRITON else 0)
    f_all, labels_all, _, _ = _data("labels", sizes)
    full = reference.sup_con(f_all, labels_all, T)
    torch.testing.assert_close(torch.stack([res["module"] for res in results]).mean(), full)
    expected = {
        "views": ("ValueError", "same number of views V"),
        "width": ("ValueError", "same width D"),
        "labels_on_one_rank": ("ValueError", "labels must be given on every rank or on none"),
        "bad_labels_on_one_rank": ("ValueError", "labels"),
        "dtype": ("TypeError", "features must have the same dtype on every rank"),
        "one_view_no_labels": ("ValueError", "V must be >= 2"),
        "empty_everywhere": ("ValueError", "features has no anchors on any rank"),
    }
    for rank, res in enumerate(results):
        for what, (kind, text) in expected.items():
            got = res["errors"][what]
            assert got is not None and got[0] == kind and text in got[1], (rank, what, got)
        assert "features" in res["errors"]["views"][1] and "features" in res["errors"]["width"][1]
    # The rank with the bad labels names its own problem, the other names the rank that has it.
    assert "labels must have shape (B,)" in results[1]["errors"]["bad_labels_on_one_rank"][1]
    assert "labels is invalid on rank(s) [1]" in results[0]["errors"]["bad_labels_on_one_rank"][1]


def test_without_process_group_is_the_plain_loss():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(7, 3, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (7,), generator=g)
    for positives in ("out", "in"):
        for lab in (None, labels):
            torch.testing.assert_close(
                sslops.sup_con(f, lab, T, positives=positives, gather_distributed=True),
                sslops.sup_con(f, lab, T, positives=positives))
    with pytest.raises(TypeError, match="gather_distributed must be a bool"):
        sslops.sup_con(f, gather_distributed="yes")
    with pytest.raises(ValueError, match="features has no anchors"):
        sslops.sup_con(f[:0], gather_distributed=True)  # one process: an empty batch is refused as before

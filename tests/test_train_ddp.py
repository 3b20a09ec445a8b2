"""sslops-train under a 2-process gloo torchrun: disjoint, complete shards; the logged loss is the global-batch loss."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
pytest.importorskip("mlxtend")

import sslops  # noqa: E402
from sslops.data import embedded_dataset, split_indices, write_beton  # noqa: E402
from sslops.train import loop, methods  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    n = 160  # 32 held out, 128 = 2 ranks x 2 steps x batch 32
    images, _ = embedded_dataset()
    labels = np.arange(n)  # label = index: the trace shows which samples each rank saw
    beton = write_beton(str(tmp_path / "d.beton"), images[:n], labels)
    train_idx, _ = split_indices(n)
    assert len(train_idx) == 128
    trace, out = tmp_path / "trace", tmp_path / "run"
    trace.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{loop.TRACE_ENV: str(trace)}, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sslops.train",
           "--data", beton, "--out", str(out), "--epochs", "2", "--batch-size", "32", "--threads", "1",
           "--num-workers", "1", "--no-progress", "--no-plot", "--seed", "4", "--temperature", "0.3"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    seen = [json.load(open(trace / f"labels_rank{k}.json")) for k in range(2)]
    for epoch in range(2):  # 2 steps per epoch per rank
        shards = [set(sum(s[2 * epoch:2 * epoch + 2], [])) for s in seen]
        assert len(shards[0]) == len(shards[1]) == 64
        assert not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(train_idx.tolist())
    assert seen[0][:2] != seen[0][2:]  # a new order every epoch

    # only rank 0 wrote, each epoch once
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [rec["epoch"] for rec in recs if not rec.get("final")] == [0, 1]
    assert (out / "encoder.pt").exists() and torch.load(out / "checkpoint.pt", weights_only=False)["config"][
        "world_size"] == 2

    # step 0's logged loss == single-process NT-Xent over the two ranks' embeddings concatenated
    torch.manual_seed(4)
    model = methods.make_method("simclr", "tiny", temperature=0.3)
    model.train()
    z = [[], []]
    for k in range(2):
        step0 = torch.load(trace / f"step0_rank{k}.pt", weights_only=False)
        with torch.no_grad():  # per-rank BatchNorm statistics, as each rank computed them
            zk = model.projector(model.backbone(torch.cat(step0["views"]))).chunk(2)
        z[0].append(zk[0])
        z[1].append(zk[1])
    want = sslops.nt_xent(torch.cat(z[0]).double(), torch.cat(z[1]).double(), 0.3, backend="reference")
    assert step0["loss"] == pytest.approx(want.item(), rel=1e-4, abs=1e-5)

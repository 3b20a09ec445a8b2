"""loss.png: training loss and kNN top-1 per epoch."""
from __future__ import annotations


def plot_metrics(records, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in records if not r.get("final")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["epoch"] + 1 for r in epochs], [r["loss"] for r in epochs], "o-", label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NT-Xent loss")
    knn = [(r["epoch"] + 1, r["knn_top1"]) for r in epochs if "knn_top1" in r]
    final = [r for r in records if r.get("final")]
    if knn:
        ax2 = ax.twinx()
        xs, ys = zip(*knn)
        if final:
            xs, ys = (0,) + xs, (final[0]["knn_top1_init"],) + ys
        ax2.plot(xs, ys, "s--", color="tab:orange", label="kNN top-1")
        ax2.set_ylabel("kNN top-1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

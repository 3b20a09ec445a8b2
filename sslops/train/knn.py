"""Weighted kNN top-1 (cosine similarity, k = 20, temperature 0.07; Wu et al. 2018) on frozen features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslops.augment import IMAGENET_MEAN, IMAGENET_STD


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, normalised like the training views."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def features(backbone, batches) -> tuple:
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, y in batches:
        feats.append(F.normalize(backbone(normalise(images)).float(), dim=1))
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(train_feats, train_labels, test_feats, test_labels, k: int = 20, t: float = 0.07,
             chunk: int = 1024) -> float:
    """Top-1 accuracy of similarity-weighted kNN voting (features L2-normalised)."""
    n_cls = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_feats))
    correct = 0
    for i in range(0, len(test_feats), chunk):
        sim = test_feats[i:i + chunk] @ train_feats.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), n_cls, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (w / t).exp())
        correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return correct / len(test_feats)

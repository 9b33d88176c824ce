"""Quick probes of a frozen backbone: features of a non-augmented dataset, a linear probe
fitted in closed loop on them, and cosine kNN. Used to compare a pretrained backbone with
a randomly initialised one at the end of a run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def extract_features(
    backbone: nn.Module, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (float32, on the CPU) and labels of every item, in order."""
    was_training = backbone.training
    backbone.eval().to(device)
    feats, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        feats.append(backbone(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    steps: int = 100,
    weight_decay: float = 1e-4,
) -> float:
    """Top-1 accuracy (%) of a multinomial logistic regression on standardised features,
    fitted with full-batch L-BFGS (deterministic, no learning rate to tune)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    linear = nn.Linear(xs.shape[1], num_classes)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(xs), train_y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * (linear(xt).argmax(1) == test_y).float().mean().item()


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 20
) -> float:
    """Top-1 accuracy (%) of a majority vote among the k nearest (cosine) training features."""
    if k > len(train_x):
        raise ValueError(f"k={k} is larger than the {len(train_x)} training samples")
    sims = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    neighbours = train_y[sims.topk(k, dim=1).indices]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    votes = F.one_hot(neighbours, num_classes).sum(1)
    return 100.0 * (votes.argmax(1) == test_y).float().mean().item()

"""Classification metrics from logits: running sums, top-k, confusion matrix, per-class scores."""

from __future__ import annotations

import torch


def top1_top5_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many labels are the top prediction, and how many are among the top five (one sync)."""
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices == labels.unsqueeze(1)
    top1, top5 = torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).tolist()
    return top1, top5


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows: true class, columns: predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_scores(confusion: torch.Tensor) -> list[dict]:
    """Precision, recall, F1 and support for each class (0 where undefined)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    scores = []
    for c in range(confusion.shape[0]):
        precision = float(true_positive[c] / predicted[c]) if predicted[c] else 0.0
        recall = float(true_positive[c] / actual[c]) if actual[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append({"precision": precision, "recall": recall, "f1": f1, "support": int(actual[c])})
    return scores

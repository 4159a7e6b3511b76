"""Classification metrics from logits: running sums, top-k, confusion matrix, per-class scores.

Sums over a pass stay on the device (`RunningSums`): adding a batch queues
a few small kernels and never waits for the GPU. They are read once, when
the pass is over or at the loop's every-N-steps check, into `EpochStats`,
plain numbers that are summed over the ranks before anything is reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from . import distributed


def top1_top5_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[top-1 count, top-5 count] as a tensor on the logits' device (no synchronisation)."""
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices == labels.unsqueeze(1)
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


def top1_top5_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many labels are the top prediction, and how many are among the top five (one sync)."""
    top1, top5 = top1_top5_hits(logits, labels).tolist()
    return top1, top5


@dataclass
class EpochStats:
    """What one pass measured, as numbers; summed across ranks before anything is reported."""

    loss_sum: float = 0.0
    correct: float = 0.0
    top5: float = 0.0
    images: float = 0.0
    data_seconds: float = 0.0     # host time blocked waiting for the next batch
    compute_seconds: float = 0.0  # inside the steps: GPU time (CUDA events), or host time on a CPU
    seconds: float = 0.0          # wall time of the pass, from its first batch to its numbers read

    def __add__(self, other: "EpochStats") -> "EpochStats":
        return EpochStats(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    @classmethod
    def from_dict(cls, values: dict) -> "EpochStats":
        """From a checkpoint's dict (keys it lacks, from older checkpoints, count as 0)."""
        return cls(**{f.name: values.get(f.name, 0.0) for f in fields(cls)})

    def reduced(self, device: torch.device) -> "EpochStats":
        return EpochStats(*distributed.all_sum(list(asdict(self).values()), device))

    def summary(self, prefix: str) -> dict:
        n = max(self.images, 1)
        return {f"{prefix}_loss": self.loss_sum / n, f"{prefix}_acc": self.correct / n,
                f"{prefix}_top5": self.top5 / n, f"{prefix}_images": int(self.images)}


class RunningSums:
    """Loss, top-1 and top-5 sums of a pass on the device; the image count on the host (it is known there)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, top-1, top-5
        self.images = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        self.sums[0] += loss.detach().double() * n
        self.sums[1:] += top1_top5_hits(logits.detach(), labels)
        self.images += n

    @property
    def loss_sum(self) -> torch.Tensor:
        """A NaN or inf in any batch's loss makes this sum NaN or inf: the non-finite check reads it."""
        return self.sums[0]

    def read(self) -> EpochStats:
        """The sums as numbers (one synchronisation), this rank's only."""
        loss_sum, correct, top5 = self.sums.tolist()
        return EpochStats(loss_sum=loss_sum, correct=correct, top5=top5, images=float(self.images))


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

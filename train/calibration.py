"""Calibration of a run: a temperature for its probabilities, and per-class thresholds below which an image is
"unclassified". Fitted on the run's validation split, kept in RUN/calibration.json.

- Temperature scaling (Guo et al., 2017): the logits are divided by one
  number T, fitted to minimise the validation set's negative log-likelihood;
  the top-1 class never changes, the probabilities become honest.
- Thresholds: for each class, the lowest probability t at which the
  validation images the model puts in that class with probability >= t are
  that class at least `target` of the time (precision, default 0.9). Below
  its class's threshold an image is "unclassified" (a person looks at it).
  The lowest such t keeps the most images classified at that precision;
  precision need not grow with t, so every candidate t (each validation
  probability of the class) is tried. A class the model never reaches the
  target for gets the threshold 1.0 (all of its images go to a person), and
  one it never predicts on the validation split likewise: said in the file.
- The expected calibration error (15 equal-width bins of the top-1
  probability) and accuracy and coverage at the thresholds measure both:
  `train evaluate` reports them where a run has a calibration.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from planktonio.errors import PlanktonioError
from planktonio.files import write_atomic

CALIBRATION = "calibration.json"
UNCLASSIFIED = "unclassified"
BINS = 15


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the mean NLL of softmax(logits / T) (one parameter: LBFGS on log T)."""
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    logits, labels = logits.double(), labels.long()
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss
    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and t > 0 else 1.0


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """Sum over equal-width bins of the top-1 probability of |accuracy - confidence| weighted by the bin's share."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    error = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high) if low > 0 else (confidence <= high)
        if inside.any():
            error += float(inside.double().mean()) * abs(float(correct[inside].mean()) -
                                                        float(confidence[inside].double().mean()))
    return error


def fit_thresholds(probabilities: torch.Tensor, labels: torch.Tensor, classes: list[str],
                   target: float) -> tuple[list[float], dict[str, str]]:
    """Per class, the lowest t with precision >= target among images put in it with probability >= t; and
    a note for each class whose threshold had to be 1.0."""
    confidence, predicted = probabilities.max(dim=1)
    thresholds, notes = [], {}
    for c, name in enumerate(classes):
        mine = predicted == c
        if not mine.any():
            thresholds.append(1.0)
            notes[name] = "never predicted on the validation split: every image goes to a person"
            continue
        p, right = confidence[mine], (labels[mine] == c).double()
        order = torch.argsort(p, descending=True)
        p, right = p[order], right[order]
        precision = right.cumsum(0) / torch.arange(1, len(p) + 1, dtype=torch.float64)  # over {p >= p_i}
        # (images with equal probabilities enter together: judge a candidate with all of its ties)
        last_of_tie = torch.ones(len(p), dtype=torch.bool)
        last_of_tie[:-1] = p[:-1] != p[1:]
        good = (precision >= target) & last_of_tie
        if good.any():
            thresholds.append(float(p[good.nonzero().max()]))
        else:
            thresholds.append(1.0)
            notes[name] = f"its validation precision never reaches {target}: every image goes to a person"
    return thresholds, notes


def labelled(probabilities: torch.Tensor, thresholds: list[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 class, whether it clears its class's threshold) per image (all True without thresholds)."""
    confidence, predicted = probabilities.max(dim=1)
    if thresholds is None:
        return predicted, torch.ones_like(predicted, dtype=torch.bool)
    return predicted, confidence >= torch.tensor(thresholds, dtype=confidence.dtype)[predicted]


def scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float, thresholds: list[float] | None) -> dict:
    """ECE before and after the temperature, and accuracy and coverage at the thresholds."""
    before = F.softmax(logits.double(), dim=1)
    after = F.softmax(logits.double() / temperature, dim=1)
    result = {"ece_before": expected_calibration_error(before, labels),
              "ece_after": expected_calibration_error(after, labels),
              "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, temperature)}
    if thresholds is not None:
        predicted, kept = labelled(after, thresholds)
        result["coverage"] = float(kept.double().mean())
        result["accuracy_of_classified"] = float((predicted[kept] == labels[kept]).double().mean()) if kept.any() \
            else None
    return result


# ------------------------------------------------------------------ the file


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def calibrate(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], target: float) -> dict:
    temperature = fit_temperature(logits, labels)
    probabilities = F.softmax(logits.double() / temperature, dim=1)
    thresholds, notes = fit_thresholds(probabilities, labels, classes, target)
    return {"temperature": temperature, "target_precision": target,
            "thresholds": dict(zip(classes, thresholds)), "notes": notes,
            "fitted_on": {"split": "valid", "images": len(labels)},
            "validation": scores(logits, labels, temperature, thresholds),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write(run: Path, calibration: dict, checkpoint: Path) -> Path:
    path = Path(run) / CALIBRATION
    write_atomic(path, json.dumps({**calibration, "checkpoint": checkpoint.name,
                                   "checkpoint_sha256": file_sha256(checkpoint)}, indent=2) + "\n")
    return path


def read(run: Path, classes: list[str], checkpoint: Path | None = None) -> dict:
    """RUN/calibration.json for these classes (and checkpoint, when given); a one-line error where it is missing,
    is of other classes, or was fitted for another checkpoint."""
    path = Path(run) / CALIBRATION
    if not path.is_file():
        raise PlanktonioError(f"{path}: not found: thresholds and a temperature were asked for but the run has "
                              f"none; fit them first with `python -m train calibrate --run {run}`")
    try:
        calibration = json.loads(path.read_text())
        thresholds = [float(calibration["thresholds"][c]) for c in classes]
        temperature = float(calibration["temperature"])
    except (ValueError, KeyError, TypeError) as error:
        raise PlanktonioError(f"{path}: not a calibration of this run's classes ({error}); calibrate again") from None
    if not (math.isfinite(temperature) and temperature > 0 and all(0 <= t <= 1 for t in thresholds)):
        raise PlanktonioError(f"{path}: its temperature or thresholds are out of range; calibrate again")
    if checkpoint is not None and calibration.get("checkpoint_sha256") != file_sha256(checkpoint):
        raise PlanktonioError(f"{path}: fitted for another {calibration.get('checkpoint', 'checkpoint')} than "
                              f"{checkpoint}; calibrate again for it (--checkpoint)")
    return {**calibration, "threshold_list": thresholds}

"""`python -m train evaluate` (train/evaluate.py, train/metrics.py): per-class scores, a confusion matrix,
only the evaluated split's loader built."""

from __future__ import annotations

import json

import pytest
import torch

from planktonio import PlanktonioError, prepare
from planktonio.preparation import SplitPlan

from .helpers import run_train


def test_evaluate_writes_per_class_scores_and_confusion(run_copy, capsys):
    code, out, err = run_train(["evaluate", "--run", run_copy, "--split", "test"], capsys)
    assert code == 0, err
    assert out.startswith("test: accuracy ") and "wrote " in out
    evaluation = json.loads((run_copy / "eval-test.json").read_text())
    assert evaluation["images"] == 40 and set(evaluation["per_class"]) == {
        "chaetognath", "copepod", "diatom_chain", "radiolarian"}
    rows = (run_copy / "confusion-test.csv").read_text().splitlines()
    counts = [list(map(int, row.split(",")[1:])) for row in rows[1:]]
    assert sum(map(sum, counts)) == 40 and all(sum(row) == 10 for row in counts)
    assert sum(counts[i][i] for i in range(4)) / 40 == pytest.approx(evaluation["acc"])
    assert (run_copy / "confusion-test.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_needs_no_training_split(plankton, run_copy, tmp_path):
    """Evaluation builds the model and the evaluated split's loader only: a data set whose training
    split makes no full batch (4 images, batch 16) still scores a run."""
    from planktonio import make_loader
    from train.evaluate import evaluate_run
    prepare(plankton.parent / "images", tmp_path / "few", plan=SplitPlan(per_class=(1, 10, 10)), workers=1)
    with pytest.raises(PlanktonioError, match="no full batch"):
        make_loader("torchvision", tmp_path / "few", "train", batch_size=16, workers=0)
    result = evaluate_run(run_copy, "valid", tmp_path / "few", other_data=True)  # not its own data
    assert result["images"] == 40 and set(result["per_class"]) == {
        "chaetognath", "copepod", "diatom_chain", "radiolarian"}


def test_top1_and_top5_counts_on_known_logits():
    from train.metrics import confusion_matrix, per_class_scores, top1_top5_correct
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 6], [0.0, 9, 1, 2, 3, 4, 5], [6.0, 5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 6, 6])  # right; in the top 5 only; outside the top 5
    assert top1_top5_correct(logits, labels) == (1, 2)
    confusion = confusion_matrix(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 0]), 2)
    assert confusion.tolist() == [[1, 1], [0, 2]]
    scores = per_class_scores(confusion)
    assert scores[0] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert scores[1]["precision"] == pytest.approx(2 / 3) and scores[1]["recall"] == 1.0

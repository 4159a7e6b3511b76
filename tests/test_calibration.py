"""Calibration (train/calibration.py, `train calibrate`): a temperature that lowers the validation NLL,
per-class thresholds below which an image is "unclassified", and what evaluate and predict do with them."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from train import calibration, predict as predict_module
from train.loop import fit

from .helpers import one_line_error, run_train, small_config


def test_the_temperature_undoes_known_overconfidence():
    """Logits drawn from a calibrated model, then multiplied by 3: the fitted temperature is about 3, and it
    lowers the NLL and the calibration error."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=generator) * 2
    labels = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    sharp = logits * 3
    t = calibration.fit_temperature(sharp, labels)
    assert 2.7 < t < 3.3
    assert calibration.nll(sharp, labels, t) < calibration.nll(sharp, labels)
    before = calibration.expected_calibration_error(F.softmax(sharp, dim=1), labels)
    after = calibration.expected_calibration_error(F.softmax(sharp / t, dim=1), labels)
    assert after < before / 3


def test_a_class_s_threshold_is_the_lowest_probability_that_reaches_the_precision():
    """Class 0 is predicted for six images with probabilities 0.95 .. 0.7; the ones at 0.8 and 0.7 are wrong.
    Precision over {p >= t}: 1, 1, 1, 0.75, 0.8, 0.67 for t = 0.95 .. 0.7 (not growing with t): for a target
    of 0.8 the lowest t that reaches it is 0.75; for 0.9, 0.85. Class 1 is never predicted: 1.0, with a note."""
    p0 = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.75, 0.7], dtype=torch.float64)
    probabilities = torch.stack([p0, 1 - p0], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 0, 1])
    assert calibration.fit_thresholds(probabilities, labels, ["a", "b"], 0.8)[0] == [0.75, 1.0]
    thresholds, notes = calibration.fit_thresholds(probabilities, labels, ["a", "b"], 0.9)
    assert thresholds == [0.85, 1.0] and "never predicted" in notes["b"]
    predicted, kept = calibration.labelled(probabilities, thresholds)
    assert kept.tolist() == [True, True, True, False, False, False]


def test_calibrate_writes_the_run_s_calibration_and_evaluate_reports_it(run_copy, capsys):
    code, out, err = run_train(["calibrate", "--run", run_copy], capsys)
    assert code == 0, err
    fitted = json.loads((run_copy / "calibration.json").read_text())
    assert fitted["validation"]["nll_after"] <= fitted["validation"]["nll_before"]
    assert set(fitted["thresholds"]) == {"chaetognath", "copepod", "diatom_chain", "radiolarian"}
    assert fitted["checkpoint"] == "best.pt" and fitted["fitted_on"] == {"split": "valid", "images": 40}
    assert "temperature" in out and "ECE" in out
    code, out, _ = run_train(["evaluate", "--run", run_copy, "--split", "valid"], capsys)
    assert code == 0 and "calibrated: ECE" in out
    report = json.loads((run_copy / "eval-valid.json").read_text())["calibration"]
    assert report["ece_after"] == pytest.approx(fitted["validation"]["ece_after"])
    assert 0 <= report["coverage"] <= 1


def test_thresholds_change_only_the_label_and_missing_ones_are_an_error(run_copy, plankton, tmp_path, capsys):
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(str(p) for p in sorted((plankton.parent / "images").rglob("*.jpg"))[:60]))
    code, _, err = run_train(["predict", "--run", run_copy, "--images", listing, "--out", tmp_path / "none",
                              "--calibrated"], capsys)
    assert "calibration.json: not found" in one_line_error(code, err) and "train calibrate" in err
    assert run_train(["calibrate", "--run", run_copy, "--target", "0.99"], capsys)[0] == 0
    lenient = shutil.copytree(run_copy, tmp_path / "lenient")
    fitted = json.loads((lenient / "calibration.json").read_text())
    fitted["thresholds"] = {name: 0.0 for name in fitted["thresholds"]}  # the same temperature, no threshold
    (lenient / "calibration.json").write_text(json.dumps(fitted))
    for run, out in ((run_copy, tmp_path / "strict"), (lenient, tmp_path / "lenient-out")):
        assert run_train(["predict", "--run", run, "--images", listing, "--out", out, "--calibrated"], capsys)[0] == 0
    strict, loose = (predict_module.read_predictions(p) for p in (tmp_path / "strict", tmp_path / "lenient-out"))
    others = [c for c in strict.columns if c != "label"]
    assert strict[others].equals(loose[others])
    assert (loose["label"] == loose["top1"]).all()
    assert (strict["label"] == "unclassified").any() and \
        ((strict["label"] == strict["top1"]) | (strict["label"] == "unclassified")).all()
    samples = pd.read_csv(tmp_path / "strict" / "samples.csv")
    assert samples["label_unclassified"].sum() == (strict["label"] == "unclassified").sum()


def test_fit_calibrates_at_its_end_when_asked(plankton, tmp_path):
    assert fit(small_config(training={"epochs": 1, "calibrate": True}), plankton, tmp_path / "run") == 0
    fitted = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert fitted["temperature"] > 0 and fitted["fitted_on"]["images"] == 40


@pytest.mark.parametrize("margin", [4.0, 200.0])  # plainly right, and saturated (probabilities exactly 1.0)
def test_a_perfect_model_keeps_every_image_classified_and_says_the_split_is_too_easy(margin):
    """Every validation image right: the temperature stays within its range (not run towards 0), every class
    keeps threshold 0 (all the images the model puts in it keep their class), and the file says why."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    logits = torch.randn(60, 3, generator=generator) + margin * F.one_hot(labels, 3)
    fitted = calibration.calibrate(logits, labels, ["a", "b", "c"], 0.9)
    low, high = calibration.TEMPERATURE_RANGE
    assert low <= fitted["temperature"] <= high
    assert fitted["thresholds"] == {"a": 0.0, "b": 0.0, "c": 0.0} and fitted["notes"] == {}
    warnings = " ".join(fitted["warnings"])
    assert "too easy to calibrate on" in warnings and "holds 60 images" in warnings
    new = torch.randn(200, 3, generator=generator)  # new images, far less sure than the validation ones
    _, kept = calibration.labelled(F.softmax(new / fitted["temperature"], dim=1), list(fitted["thresholds"].values()))
    assert kept.all()


def test_a_class_that_is_always_right_admits_every_image_put_in_it():
    """Class a is right at every threshold (lowest validation probability 0.6): threshold 0, not 0.6; class b
    (0.9 right, 0.8 wrong, 0.7 right) keeps the lowest probability that reaches the precision."""
    p0 = torch.tensor([0.9, 0.8, 0.6, 0.3, 0.2, 0.1], dtype=torch.float64)
    probabilities = torch.stack([p0, 1 - p0], dim=1)  # a for the first three, b (0.7, 0.8, 0.9) for the rest
    labels = torch.tensor([0, 0, 0, 1, 0, 1])
    thresholds, _ = calibration.fit_thresholds(probabilities, labels, ["a", "b"], 0.9)
    assert thresholds == [0.0, pytest.approx(0.9)]


def test_checkpoint_last_is_calibrated_and_used_for_last_pt(run_copy, test_split_list, tmp_path, capsys):
    """`calibrate --checkpoint last` writes calibration-last.json, which `predict --calibrated --checkpoint last`
    uses; without it, the error names the command that makes it. best.pt's calibration.json is left alone."""
    args = ["predict", "--run", run_copy, "--images", test_split_list, "--calibrated", "--checkpoint", "last"]
    code, _, err = run_train([*args, "--out", tmp_path / "before"], capsys)
    assert "calibration-last.json: not found" in one_line_error(code, err)
    assert f"train calibrate --run {run_copy} --checkpoint last" in err
    assert not (tmp_path / "before").exists()
    code, out, err = run_train(["calibrate", "--run", run_copy, "--checkpoint", "last"], capsys)
    assert code == 0, err
    assert "calibration-last.json" in out and not (run_copy / "calibration.json").exists()
    fitted = json.loads((run_copy / "calibration-last.json").read_text())
    assert fitted["checkpoint"] == "last.pt"
    code, _, err = run_train([*args, "--out", tmp_path / "after"], capsys)
    assert code == 0, err
    provenance = predict_module.provenance_of(next((tmp_path / "after" / "units").glob("*.parquet")))
    assert provenance["checkpoint"] == "last.pt" and provenance["calibration"]["temperature"] == fitted["temperature"]

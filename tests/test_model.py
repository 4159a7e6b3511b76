"""Models (train/model.py): AlexNet and other torchvision models get a new head and freeze as asked;
weights come from a local file only, and a wrong or missing file is a one-line error."""

from __future__ import annotations

import pytest
import torch
import torchvision

from planktonio import PlanktonioError
from train.model import build_model

from .helpers import REPO, one_line_error, run_train


def test_alexnet_head_and_freezing_modes():
    model = build_model("alexnet", 17, freeze_mode="all-but-head")
    assert model.classifier[6].out_features == 17 and model.classifier[6].in_features == 4096
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.6.weight", "classifier.6.bias"]
    features = build_model("alexnet", 17, freeze_mode="features")
    trainable = {n for n, p in features.named_parameters() if p.requires_grad}
    assert trainable == {f"classifier.{i}.{w}" for i in (1, 4, 6) for w in ("weight", "bias")}
    assert all(p.requires_grad for p in build_model("alexnet", 17).parameters())


@pytest.mark.parametrize("name, head", [("vgg11", "classifier.6"), ("resnet18", "fc"), ("squeezenet1_1", "classifier.1")])
def test_other_torchvision_models_get_a_new_head(name, head):
    model = build_model(name, 5, freeze_mode="all-but-head")
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {head}
    assert model(torch.randn(1, 3, 96, 96) if name != "vgg11" else torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_missing_and_mismatched_weights_are_clear_errors(tmp_path, plankton, capsys):
    with pytest.raises(PlanktonioError, match="weights file .*nowhere.pth: not found"):
        build_model("alexnet", 4, str(tmp_path / "nowhere.pth"))
    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    with pytest.raises(PlanktonioError, match="does not fit model alexnet: .*missing .*unexpected"):
        build_model("alexnet", 4, str(resnet))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(PlanktonioError, match="cannot be read"):
        build_model("alexnet", 4, str(garbage))
    code, _, err = run_train(["fit", "--config", REPO / "train" / "configs" / "study.yaml", "--data", plankton,
                               "--out", tmp_path / "run"], capsys)
    assert "alexnet-owt-7be5be79.pth: not found" in one_line_error(code, err)

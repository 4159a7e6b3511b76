"""Real plankton images (../shared/data/ndsb): prepare + both loaders. Skipped when absent."""

from __future__ import annotations

import pytest
import torch

from planktonio import EVAL_TRANSFORM, TRAIN_AUGMENT, make_loader, prepare
from planktonio.dataset import SplitPlan


@pytest.fixture(scope="module")
def ndsb_prepared(tmp_path_factory):
    from .conftest import NDSB
    if not NDSB.is_dir():
        pytest.skip(f"real plankton images not found at {NDSB}")
    out = tmp_path_factory.mktemp("ndsb") / "prepared"
    result = prepare(NDSB, out, min_images=300, plan=SplitPlan(per_class=(40, 10, 10)), seed=0)
    return result


def test_prepare_keeps_the_classes_with_enough_images(ndsb_prepared):
    # The data's README: 20 classes have at least 300 images; every file decodes.
    assert len(ndsb_prepared.classes) == 20
    assert not ndsb_prepared.rejected
    assert {s: len(e) for s, e in ndsb_prepared.splits.items()} == {"train": 800, "valid": 200, "test": 200}


def test_loaders_agree_on_real_images(ndsb_prepared):
    """Bound on real data: mean difference < 1 grey level, median image < 0.5.

    Larger than on the 255 px synthetic set: NDSB images are ~56 px and get
    upscaled ~5x to 256, and DALI scales by exactly 256/short side (subpixel
    scale) while torchvision stretches to a whole number of pixels: a shift of
    a fraction of a source pixel moves sharp organism edges, so a few pixels
    differ a lot while most agree. Measured here (200 images): mean 0.47,
    median image 0.28, worst image 7.3.
    """
    kwargs = dict(batch_size=50, device="cpu", workers=2)
    dali = make_loader("dali-cpu", ndsb_prepared.out, "valid", **kwargs)
    tv = make_loader("torchvision", ndsb_prepared.out, "valid", **kwargs)
    std = torch.tensor(EVAL_TRANSFORM.std).view(1, 3, 1, 1)
    per_image = []
    for (x_dali, y_dali), (x_tv, y_tv) in zip(dali, tv, strict=True):
        assert torch.equal(y_dali, y_tv)
        per_image.append(((x_dali - x_tv).abs() * std * 255).mean(dim=(1, 2, 3)))
    per_image = torch.cat(per_image)
    assert per_image.numel() == 200
    assert per_image.mean() < 1.0 and per_image.median() < 0.5


@pytest.mark.parametrize("backend", ["dali-cpu", "torchvision"])
def test_training_epoch_on_real_images(ndsb_prepared, backend):
    loader = make_loader(backend, ndsb_prepared.out, "train", batch_size=64, device="cpu", workers=2,
                         transform=TRAIN_AUGMENT)
    labels = torch.cat([y for x, y in loader if x.shape == (64, 3, 224, 224)])
    assert labels.numel() == 12 * 64  # 800 // 64 full batches
    assert labels.unique().numel() == 20

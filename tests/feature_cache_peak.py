"""The peak host memory of a feature cache's pass and file, in a process of its own (run by
tests/test_feature_cache.py; prints one JSON line):

    python -m tests.feature_cache_peak WORK_DIR

A run whose frozen prefix is cheap but wide (a 1x1 convolution to 256 channels at 12 x 12 px: 36,864 values
per image, 147 KiB) over 2,150 small images: a store of about 310 MiB, in host memory chunks of 16 MiB.
Prints the store's bytes and how far the process's peak resident memory rose above what it used when the
feature cache started: its pass, its file, and two epochs read from it (the learning-curves plot, which
is not the cache's, is not drawn).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import nn

from planktonio import memory, prepare
from planktonio.preparation import SplitPlan
from train import config as config_module, feature_cache, model as model_module, writers
from train.loop import fit

from .conftest import jpeg_bytes


class Wide(model_module.TinyCNN):
    """tiny-cnn's shape (features, avgpool, classifier: the feature cache knows where to cut it), wide."""

    def __init__(self, num_classes: int = 4):
        nn.Module.__init__(self)
        self.features = nn.Sequential(nn.Conv2d(3, 256, 1), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(12)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256 * 144, num_classes))


def main(work: Path) -> dict:
    model_module.LOCAL_MODELS["wide"] = Wide
    memory.CHUNK_BYTES = 16 * 2**20
    if not (work / "prepared").exists():
        for c in range(4):
            (work / "source" / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(550):
                (work / "source" / f"c{c}" / f"{i}.jpg").write_bytes(jpeg_bytes(32, seed=1000 * c + i))
        prepare(work / "source", work / "prepared", plan=SplitPlan(per_class=(500, 25, 25)), workers=1)
    small = {"crop": "center", "size": 12, "resize": 12}
    config = config_module.from_dict({
        "model": {"name": "wide", "freeze": "all-but-head"},
        "loader": {"backend": "torchvision", "batch_size": 32, "workers": 0},
        "optimizer": {"name": "sgd", "lr": 0.01}, "training": {"epochs": 2, "progress": False},
        "augment": {"train": small, "eval": small}})
    started = {}
    prepare_cache = feature_cache.FeatureCache.prepare

    def measured(self, specs):
        started["rss"] = start_peak()
        result = prepare_cache(self, specs)
        started["after"] = peak()
        return result
    feature_cache.FeatureCache.prepare = measured
    writers.plot_curves = lambda *args: None  # matplotlib's import and drawing (30 MB) is not the cache's
    assert fit(config, work / "prepared", work / "run") == 0
    growth = peak() - started["rss"]
    store = json.loads((work / "run" / "summary.json").read_text())["feature_cache"]["bytes"]
    return {"store": store, "growth": growth, "ratio": growth / store, "after_prepare": started["after"] - started["rss"]}


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def start_peak() -> int:
    """Start measuring the peak from now: the resident memory now (the peak is reset to it). Not
    getrusage's ru_maxrss: it is kept across exec, so a child of a large test process starts with its
    parent's peak."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident memory, to VmRSS
    return _status("VmRSS")


def peak() -> int:
    return _status("VmHWM")


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))

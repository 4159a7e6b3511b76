"""The one batch timer (train/timing.py)."""

from __future__ import annotations

import torch

from train import timing


class FakeEvent:
    recorded_on: list = []

    def __init__(self, enable_timing=False):
        pass

    def record(self, stream=None):
        FakeEvent.recorded_on.append(stream)


def test_the_timer_records_its_events_on_the_batches_device(monkeypatch):
    """With training.device cuda:1 the steps run on cuda:1's stream; events recorded on the current device's
    (cuda:0) would time nothing. The stream asked for must be cuda:1's."""
    asked = []
    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(timing.torch.cuda, "current_stream", lambda device=None: asked.append(device) or device)
    FakeEvent.recorded_on = []
    batches = timing.TimedBatches([1, 2], torch.device("cuda", 1))
    assert list(batches) == [1, 2]
    batches._end_step()
    assert asked and all(device == torch.device("cuda", 1) for device in asked)
    assert FakeEvent.recorded_on == [torch.device("cuda", 1)] * 4  # a start and an end per step

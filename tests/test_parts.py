"""The small named pieces the programs are made of, each on known inputs: early stopping, the checkpoint
policy, the metrics writers, the batch timer's device, a rank's GPU, precisions by compute capability,
settings declared once, and the layering rules of the code (backends as plugins)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from planktonio.loaders import ALIASES, BACKENDS
from train import checkpoint, distributed
from train.early_stopping import EarlyStopping
from train.step import has_bf16_hardware, precisions_for
from train.writers import MetricsLog, MetricsWriters

from .conftest import REPO


# ------------------------------------------------------------------ the fit loop's parts


def test_early_stopping_counts_epochs_without_a_better_loss():
    early = EarlyStopping(patience=2)
    assert [early.update(e, loss) for e, loss in enumerate([1.0, 0.8, 0.9, 0.8, 0.7])] == \
        [True, True, False, False, True]
    assert (early.best_epoch, early.bad_epochs, early.should_stop) == (4, 0, False)
    early.update(5, 0.7)
    early.update(6, float("nan"))  # a NaN is never better
    assert early.should_stop and early.best_loss == 0.7
    again = EarlyStopping(patience=2)
    again.restore(early.state())
    assert again == early


def test_the_checkpoint_policy_follows_its_clock(monkeypatch):
    now = {"s": 100.0}
    monkeypatch.setattr(checkpoint, "clock", lambda: now["s"])
    policy = checkpoint.CheckpointPolicy(every_s=60)
    now["s"] = 159.0
    assert not policy.due()
    now["s"] = 160.0
    assert policy.due()
    policy.written()
    assert not policy.due()
    assert checkpoint.CheckpointPolicy(every_s=0).due()  # 0: every epoch


def record(epoch: int, loss: float) -> dict:
    return {"epoch": epoch, "train_loss": loss, "train_acc": 0.5, "val_loss": loss + 0.1, "val_acc": 0.4,
            "val_top5": 0.9, "images_per_s": 100.0, "data_wait_fraction": 0.1, "epoch_seconds": 1.0}


def test_the_metrics_writers_write_every_record_a_plot_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writers = MetricsWriters(tmp_path, "run", first_epoch=0, tensorboard=True)
    for epoch in range(3):
        writers.write(record(epoch, 2.0 - epoch))
    writers.close()
    assert [r["epoch"] for r in MetricsLog(tmp_path / "metrics.jsonl").records()] == [0, 1, 2]
    assert (tmp_path / "learning-curves.png").read_bytes()[:4] == b"\x89PNG" and writers.curves.error is None
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/train_loss")]
    assert losses == [(0, 2.0), (1, 1.0), (2, 0.0)]
    # A resume at epoch 1 drops what came after, in the log and in TensorBoard alike.
    resumed = MetricsWriters(tmp_path, "run", first_epoch=1, tensorboard=True)
    resumed.write(record(1, 5.0))
    resumed.close()
    assert [(r["epoch"], r["train_loss"]) for r in MetricsLog(tmp_path / "metrics.jsonl").records()] == \
        [(0, 2.0), (1, 5.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/train_loss")] == [(0, 2.0), (1, 5.0)]


def test_the_learning_curves_are_redrawn_at_most_once_per_interval_and_at_close(tmp_path, monkeypatch):
    # Redrawn after every fast epoch, the plot's thread held the GIL long enough to make a cached run 6.5x
    # slower: within an interval only the latest records are kept, and close() draws them.
    from train import writers as writers_module
    drawn = []
    monkeypatch.setattr(writers_module, "plot_curves", lambda records, path, title: drawn.append(len(records)))
    monkeypatch.setattr(writers_module.CurvesPlot, "every_s", 3600.0)
    writers = MetricsWriters(tmp_path, "run", first_epoch=0, tensorboard=False)
    for epoch in range(50):
        writers.write(record(epoch, 1.0))
    assert drawn == []  # nothing within the first interval
    writers.close()
    assert drawn == [50]


def test_a_run_draws_its_learning_curves(tmp_path, synthetic):
    from train import config as config_module
    from train.loop import fit
    config = config_module.from_dict({
        "model": {"name": "tiny-cnn"}, "loader": {"backend": "torchvision", "batch_size": 8, "workers": 0},
        "training": {"epochs": 2, "progress": False},
        "augment": {"train": {"crop": "random_resized", "size": 32, "resize": 36},
                    "eval": {"crop": "center", "size": 32, "resize": 36}}})
    assert fit(config, synthetic, tmp_path / "run") == 0
    assert (tmp_path / "run" / "learning-curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "run" / "tensorboard").exists()  # only when training.tensorboard is on


# ------------------------------------------------------------------ devices


class FakeEvent:
    recorded_on: list = []

    def __init__(self, enable_timing=False):
        pass

    def record(self, stream=None):
        FakeEvent.recorded_on.append(stream)


def test_the_timer_records_its_events_on_the_batches_device(monkeypatch):
    """With training.device cuda:1 the steps run on cuda:1's stream; events recorded on the current device's
    (cuda:0) would time nothing. The stream asked for must be cuda:1's."""
    from train import timing
    asked = []
    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(timing.torch.cuda, "current_stream", lambda device=None: asked.append(device) or device)
    FakeEvent.recorded_on = []
    batches = timing.TimedBatches([1, 2], torch.device("cuda", 1))
    assert list(batches) == [1, 2]
    batches._end_step()
    assert asked and all(device == torch.device("cuda", 1) for device in asked)
    assert FakeEvent.recorded_on == [torch.device("cuda", 1)] * 4  # a start and an end per step


@pytest.mark.parametrize("local_rank, visible, expected", [(0, 4, 0), (3, 4, 3), (3, 1, 0), (5, 4, 1), (2, 0, 0)])
def test_a_rank_takes_its_local_rank_modulo_the_gpus_it_sees(local_rank, visible, expected):
    """All four of a node's GPUs visible to every task: local ranks 0-3 take cuda:0-3. One GPU bound per task
    (each task sees only its own, as cuda:0): every rank takes cuda:0, not "invalid device ordinal"."""
    assert distributed.device_index(local_rank, visible) == expected


def test_executor_device_under_both_bindings(monkeypatch):
    from train.executor import rank_device
    ctx = distributed.Context(rank=3, world_size=4, local_rank=3)
    assert rank_device(torch.device("cuda"), ctx, visible=4) == torch.device("cuda", 3)
    assert rank_device(torch.device("cuda"), ctx, visible=1) == torch.device("cuda", 0)
    assert rank_device(torch.device("cpu"), ctx, visible=0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    alone = distributed.Context()
    assert rank_device(torch.device("cuda", 1), alone, visible=2) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda"), alone, visible=2) == torch.device("cuda", 0)


@pytest.mark.parametrize("capability, bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True),
                                              ((9, 0), True)])
def test_bf16_is_measured_only_where_the_gpu_has_the_hardware(monkeypatch, capability, bf16):
    assert has_bf16_hardware(capability) is bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    kept, left_out = precisions_for(torch.device("cuda", 0), ("fp32", "amp-fp16", "amp-bf16"))
    assert ("amp-bf16" in kept) is bf16 and ("amp-bf16" in left_out) is (not bf16)
    if not bf16:
        assert f"compute capability {capability[0]}.{capability[1]} has no bf16 hardware" in left_out["amp-bf16"]
    assert precisions_for(torch.device("cpu"), ("fp32", "amp-bf16")) == (("fp32", "amp-bf16"), {})


def test_a_lost_peer_is_one_line_naming_it(monkeypatch):
    ctx = distributed.Context(rank=0, world_size=2, local_rank=0,
                              peers=((0, "node1", 11), (1, "node2", 22)))
    monkeypatch.setattr(distributed.socket, "gethostname", lambda: "node1")
    monkeypatch.setattr(distributed.socket, "gethostbyaddr", lambda address: ("node2", [], [address]))
    error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                         "[10.0.0.2]:41234")
    line = str(distributed.peer_lost(ctx, error, "validation (all_reduce)", "at epoch 3, step 5"))
    assert line == ("rank 0 on node1: rank 1 on node2 left during validation (all_reduce) at epoch 3, step 5 "
                    "(Connection closed by peer [10.0.0.2]:41234)")
    hung = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation")
    assert "stopped answering during" in str(distributed.peer_lost(ctx, hung, "x", "at epoch 0, step 1"))


# ------------------------------------------------------------------ settings declared once


def test_command_line_defaults_are_the_settings_defaults():
    from profiling.__main__ import build_parser
    from profiling.settings import AmpBenchmark, LoaderBenchmark, Smoke, Suite
    parser = build_parser()
    for command, cls, required in (("loaders", LoaderBenchmark, ["--data", "D"]), ("amp", AmpBenchmark, []),
                                   ("smoke", Smoke, ["--data", "D"]),
                                   ("suite", Suite, ["--data", "D", "--out", "O"])):
        args = vars(parser.parse_args([command, *required]))
        defaults = cls(**{k: args[k] for k in cls.__dataclass_fields__})
        assert defaults == cls(**{k: args[k] for k in cls.__dataclass_fields__ if k in ("data", "out")}), command
    args = parser.parse_args(["loaders", "--data", "D", "--backends", "dali-cpu,cache", "--no-eval-transform"])
    assert args.backends == ("dali-cpu", "cache") and args.eval_transform is False


# ------------------------------------------------------------------ the layering of the code


def python_files(*folders):
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def backend_module_of(name: str) -> Path:
    module = next(m for m in __import__("planktonio.loaders", fromlist=["BACKEND_MODULES"]).BACKEND_MODULES
                  if any(b.name == name for b in m.BACKENDS) or name in getattr(m, "ALIASES", {}))
    return Path(module.__file__)


# Literals equal to a backend's name that mean a library there (a version, an import, an environment key).
LIBRARIES = {"torchvision", "dali"}
LIBRARY_FILES = {"planktonio/doctor.py", "profiling/environment.py", "profiling/render/common.py",
                 "profiling/accuracy.py"}


def test_no_backend_name_is_a_literal_outside_its_own_module():
    """A new backend must not need edits elsewhere: the rest of the code reads the registry, never names."""
    names = set(BACKENDS) | set(ALIASES)
    found = []
    for path in python_files("planktonio", "train", "profiling"):
        relative = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                library = node.value in LIBRARIES and relative in LIBRARY_FILES
                if path != backend_module_of(node.value) and not library:
                    found.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_backends_import_shared_pieces_never_each_other():
    from planktonio.loaders import BACKEND_MODULES
    backend_modules = {Path(m.__file__).stem for m in BACKEND_MODULES}
    for module in BACKEND_MODULES:
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {node.module.split(".")[-1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        assert not (imported & (backend_modules - {Path(module.__file__).stem})), module.__name__


def test_layers_import_downwards_only():
    """profiling -> train -> planktonio: planktonio imports neither, train does not import profiling."""
    for folder, forbidden in (("planktonio", ("train", "profiling")), ("train", ("profiling",))):
        for path in python_files(folder):
            text = path.read_text()
            for name in forbidden:
                assert not re.search(rf"^\s*(from|import) {name}\b", text, re.M), f"{path} imports {name}"


def test_dali_outputs_are_bound_to_torchs_stream_and_held_until_used(monkeypatch):
    """On a GPU, DALI's outputs are asked for on torch's current stream of the loader's device (DALI then
    makes that stream wait on the GPU; no host wait, as a share_outputs() without a stream would do), and
    each batch's tensors are held until an event recorded after its use has completed."""
    from planktonio.loaders import dali_graph

    class FakeOutput:
        def __init__(self, value):
            self.value = value

        def as_tensor(self):
            return self

    class FakePipe:
        def __init__(self):
            self.asked, self.count = [], 0

        def schedule_run(self):
            pass

        def share_outputs(self, cuda_stream=None):
            self.asked.append(cuda_stream)
            self.count += 1
            return [FakeOutput(self.count)]

        def release_outputs(self):
            pass

    done = {"events": []}

    class FakeEvent:
        def __init__(self):
            self.finished = False
            done["events"].append(self)

        def record(self, stream):
            self.stream = stream

        def query(self):
            return self.finished

    device = torch.device("cuda", 1)
    monkeypatch.setattr(dali_graph.torch.cuda, "current_stream", lambda d=None: f"stream of {d}")
    monkeypatch.setattr(dali_graph.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(dali_graph.torch, "from_dlpack", lambda output: torch.tensor([output.value]))
    pipe = FakePipe()
    outputs = dali_graph.PipelineOutputs(pipe, device)
    first = outputs.next()
    second = outputs.next()  # asking for batch 2 means batch 1's work is queued: an event marks it
    assert pipe.asked == [f"stream of {device}"] * 2 and first[0].item() == 1 and second[0].item() == 2
    assert len(outputs._held) == 1 and done["events"][0].stream == f"stream of {device}"
    outputs.next()
    assert len(outputs._held) == 2  # batch 1's event has not completed: still held
    for event in done["events"]:
        event.finished = True
    outputs.next()
    assert len(outputs._held) == 1  # completed ones let go; the batch just consumed is held anew

"""Loaders: the contract every backend of the registry keeps, and the equivalence of their batches.

The contract tests iterate the registry (planktonio.loaders.BACKENDS): every
backend this machine can run, so a new backend is tested by being
registered. The upper bound (role "upper-bound": batches made once and
replayed) keeps the format contract only. DALI runs here on the CPU
(dali-cpu: the same pipeline code as dali-gpu but for the decoder's device);
the GPU path is tested in test_gpu.py.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from planktonio import (
    EVAL_TRANSFORM,
    TRAIN_AUGMENT,
    Output,
    PlanktonioError,
    make_loader,
    prepare,
)
from planktonio.dataset import PreparedDataset
from planktonio.loaders import BACKENDS, runnable_backends, sharding
from planktonio.preparation import SplitPlan

from .conftest import batch_indices
from .helpers import loader, python

CPU = torch.device("cpu")
# Every backend this machine runs, and those that read every image as planned (not the upper bound).
ALL_BACKENDS = runnable_backends(CPU)
READERS = runnable_backends(CPU, roles=("reference", "baseline", "candidate"))
# The reference implementation the others are compared with, pixel by pixel: decode with
# libjpeg-turbo, cut the box, torch's antialiased uint8 resize.
REFERENCE = "torchvision"

# Normalised values of 0 and 255 under ImageNet mean/std: the possible range.
LOWEST = min((0 - m) / s for m, s in zip(EVAL_TRANSFORM.mean, EVAL_TRANSFORM.std))
HIGHEST = max((1 - m) / s for m, s in zip(EVAL_TRANSFORM.mean, EVAL_TRANSFORM.std))


def test_the_registry_declares_what_every_consumer_asks():
    """Every backend names its devices, a known role and a builder; there is one reference or baseline."""
    from planktonio.loaders.backend import ROLES
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.devices and set(backend.devices) <= {"cpu", "cuda"}
        assert backend.role in ROLES and callable(backend.build)
        assert all(goal.over in ("reference", "candidates", "peers") for goal in backend.goals)
    assert any(b.role in ("reference", "baseline") for b in BACKENDS.values())
    assert REFERENCE in READERS


def grey_level_differences(a, b, transform) -> torch.Tensor:
    """|a - b| of two normalised batches, back on the 0..255 scale of the source pixels."""
    std = torch.tensor(transform.std).view(1, 3, 1, 1)
    return (a.float() - b.float()).abs() * std * 255


@pytest.mark.parametrize("backend", [name for name in READERS if name != REFERENCE])
@pytest.mark.parametrize("split, transform", [("train", TRAIN_AUGMENT), ("valid", EVAL_TRANSFORM)])
def test_backends_agree_pixel_by_pixel(synthetic, backend, split, transform):
    """Each backend against the reference implementation, same seed and epochs: the same images, crops
    and flips (one plan).

    Measure: absolute difference of the outputs, in grey levels (0..255).
    Bound: mean < 0.3 and every value within 2. Why not 0: the JPEG decoders
    (DALI's nvImageCodec with a region-of-interest decode vs torchvision's
    libjpeg-turbo build of the whole image) may round the IDCT and chroma
    upsampling a level apart, and antialiased linear resizes (DALI's, PIL's
    and torchvision's) round differently. Measured here for dali-cpu: mean
    0.18, max 1.0, in both splits and both epochs. turbo and the cache on a
    CPU resize enlarged boxes with OpenCV's fixed-point bilinear (within a
    level of the reference's filter there) and shrunk ones with the
    reference's own kernel; turbo decodes with libjpeg-turbo's accurate IDCT.
    """
    other = loader(backend, synthetic, split, batch_size=5, seed=3, transform=transform)
    tv = loader(REFERENCE, synthetic, split, batch_size=5, seed=3, transform=transform)
    for epoch in range(2):
        diffs = []
        for (x_other, y_other), (x_tv, y_tv) in zip(other, tv, strict=True):
            assert torch.equal(y_other, y_tv)
            diffs.append(grey_level_differences(x_other, x_tv, transform).flatten())
        diff = torch.cat(diffs)
        assert diff.numel() == (60 if split == "train" else 16) * 3 * 224 * 224  # 64 // 5 full batches; 16
        assert diff.mean() < 0.3, f"epoch {epoch}: mean difference {diff.mean():.3f} grey levels"
        assert diff.max() <= 2.0, f"epoch {epoch}: max difference {diff.max():.2f} grey levels"


def test_training_crops_differ_between_epochs_and_flips_mirror(synthetic):
    """The plans really augment: other crops in another epoch, and a flip is an exact mirror."""
    tv = loader("torchvision", synthetic, "train", batch_size=16, seed=3, transform=TRAIN_AUGMENT)
    first, _ = next(iter(tv))
    tv.set_epoch(1)
    second, _ = next(iter(tv))
    assert grey_level_differences(first, second, TRAIN_AUGMENT).mean() > 5
    flip = dataclasses.replace(TRAIN_AUGMENT, hflip=1.0)
    plain = dataclasses.replace(TRAIN_AUGMENT, hflip=0.0)
    for backend in READERS:
        mirrored, _ = next(iter(loader(backend, synthetic, "train", batch_size=8, seed=3, transform=flip)))
        upright, _ = next(iter(loader(backend, synthetic, "train", batch_size=8, seed=3, transform=plain)))
        assert torch.equal(mirrored, upright.flip(-1)), backend


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("output", [Output("float32", "NCHW"), Output("float16", "NHWC")])
def test_train_batches_shape_dtype_layout_range(synthetic, backend, output):
    batches = list(loader(backend, synthetic, "train", batch_size=6, output=output, transform=TRAIN_AUGMENT))
    assert len(batches) == 64 // 6  # drop last partial batch
    for images, labels in batches:
        assert images.shape == (6, 3, 224, 224) and images.dtype == output.torch_dtype
        assert images.is_contiguous(memory_format=output.memory_format)
        assert labels.shape == (6,) and labels.dtype == torch.int64
        assert LOWEST - 0.01 <= images.min() and images.max() <= HIGHEST + 0.01
        assert images.float().std() > 0.1  # real pictures, not a constant
    if BACKENDS[backend].role != "upper-bound":  # (the bound replays its first batches only)
        labels = torch.cat([y for _, y in batches])
        assert set(labels.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("backend", READERS)
def test_train_labels_travel_with_their_images(coloured, backend):
    """Random crops and flips keep a flat image's colour: the colour names the image and its label."""
    prepared, index_by_path = coloured
    label_of_index = {index_by_path[p]: label for p, label in PreparedDataset.load(prepared).entries("train")}
    seen = []
    for images, labels in loader(backend, prepared, "train", batch_size=4, transform=TRAIN_AUGMENT):
        indices = batch_indices(images, TRAIN_AUGMENT)
        assert [label_of_index[i] for i in indices] == labels.tolist()
        seen += indices
    assert len(seen) == len(set(seen)) == 28  # 30 images, batches of 4, last partial dropped


@pytest.mark.parametrize("backend", READERS)
@pytest.mark.parametrize("shards", [1, 3, 4])
def test_every_eval_image_exactly_once_per_epoch(coloured, backend, shards):
    prepared, index_by_path = coloured
    entries = PreparedDataset.load(prepared).entries("train")  # 30 images: uneven over 4 shards
    expected = sorted(index_by_path[p] for p, _ in entries)
    label_of_index = {index_by_path[p]: label for p, label in entries}
    loaders = [loader(backend, prepared, "train", batch_size=4, train=False, shard_index=i, shard_count=shards)
               for i in range(shards)]
    for epoch in range(2):
        seen = []
        for shard in loaders:
            batches = list(shard)
            assert len(batches) == len(shard)
            shard_seen = [i for images, _ in batches for i in batch_indices(images, EVAL_TRANSFORM)]
            assert len(shard_seen) == shard.images_per_epoch
            for images, labels in batches:  # labels match the manifest
                assert labels.tolist() == [label_of_index[i] for i in batch_indices(images, EVAL_TRANSFORM)]
            seen += shard_seen
        assert sorted(seen) == expected, f"epoch {epoch}"


@pytest.mark.parametrize("backend", READERS)
def test_training_shards_are_disjoint_equal_and_reshuffled(coloured, backend):
    prepared, _ = coloured
    shards = [loader(backend, prepared, "train", batch_size=3, shard_index=i, shard_count=4, seed=5)
              for i in range(4)]
    orders = []
    for epoch in range(2):
        per_shard = []
        for shard in shards:
            shard.set_epoch(epoch)
            batches = list(shard)
            assert len(batches) == len(shard) == (30 // 4) // 3  # equal steps on every rank
            per_shard.append([i for images, _ in batches for i in batch_indices(images, TRAIN_AUGMENT)])
        flat = [i for s in per_shard for i in s]
        assert len(flat) == len(set(flat)) == 4 * 2 * 3  # no image on two ranks
        orders.append(flat)
    assert orders[0] != orders[1]  # a new permutation every epoch


@pytest.mark.parametrize("backend", READERS)
def test_a_resumed_epoch_reads_what_the_whole_epoch_read(synthetic, backend):
    """Batch k of epoch e is the same whether the epoch is read whole or entered at k (a resume),
    and whatever the number of workers or threads."""
    def epoch_batches(epoch, skip=0, workers=None):
        kwargs = {} if workers is None else {"workers": workers}
        source = loader(backend, synthetic, "train", batch_size=4, seed=3, transform=TRAIN_AUGMENT, **kwargs)
        source.set_epoch(epoch, skip_batches=skip)
        return [x for x, _ in source]
    whole = epoch_batches(2)
    assert len(whole) == 16
    resumed = epoch_batches(2, skip=11, workers=1)
    assert len(resumed) == 5 and all(torch.equal(a, b) for a, b in zip(whole[11:], resumed, strict=True))
    assert not torch.equal(whole[0], epoch_batches(3)[0])


def test_backends_read_the_same_training_order(coloured):
    """Same seed, epoch and shard: DALI and torchvision see the same images in the same order."""
    prepared, _ = coloured
    for epoch in (0, 3):
        orders = []
        for backend in READERS:
            shard = loader(backend, prepared, "train", batch_size=4, seed=9, shard_index=1, shard_count=2)
            shard.set_epoch(epoch)
            orders.append([i for images, _ in shard for i in batch_indices(images, TRAIN_AUGMENT)])
        assert all(order == orders[0] for order in orders) and len(orders[0]) == 12


def test_one_dali_pipeline_serves_every_epoch(synthetic):
    """Epochs in a row, an epoch abandoned half-way, a jump to another epoch and batch: one pipeline,
    and every batch still the one the plan says (checked against a fresh loader)."""
    def reference(epoch, index):
        fresh = loader("dali-cpu", synthetic, "train", batch_size=8, seed=4, transform=TRAIN_AUGMENT)
        fresh.set_epoch(epoch, skip_batches=index)
        return next(iter(fresh))[0]

    with loader("dali-cpu", synthetic, "train", batch_size=8, seed=4, transform=TRAIN_AUGMENT) as dali:
        for epoch in range(3):
            dali.set_epoch(epoch)
            batches = [x for x, _ in dali]
            assert len(batches) == 8
        assert dali.batches_dropped == 0  # epochs in order: the stream just went on
        dali.set_epoch(3)
        for _ in zip(range(2), dali):  # abandon epoch 3 after two batches
            pass
        dali.set_epoch(7, skip_batches=5)  # then jump elsewhere
        jumped = next(iter(dali))[0]
        assert dali.pipelines_built == 1 and dali.batches_dropped > 0
    assert torch.equal(jumped, reference(7, 5))


def test_an_empty_evaluation_shard_yields_nothing(coloured):
    prepared, _ = coloured  # 15 validation images over 16 shards: shard 0 gets none
    for backend in ALL_BACKENDS:
        shard = loader(backend, prepared, "valid", batch_size=4, shard_index=0, shard_count=16)
        assert len(shard) == 0 and list(shard) == [] and list(shard) == []


def test_lengths_follow_the_sharding_rules(coloured):
    prepared, _ = coloured
    for split, train, n in (("train", True, 30), ("valid", False, 15)):
        for shards in (1, 2, 4):
            for index in range(shards):
                tv = loader("torchvision", prepared, split, batch_size=2, train=train,
                            shard_index=index, shard_count=shards)
                if train:
                    assert len(tv) == sharding.train_batches(n, shards, 2) == (n // shards) // 2
                else:
                    size = len(sharding.eval_shard_range(n, index, shards))
                    assert len(tv) == -(-size // 2) and tv.images_per_epoch == size


def test_bad_arguments_are_clear_errors(coloured, tmp_path):
    prepared, _ = coloured
    with pytest.raises(PlanktonioError, match="unknown loader backend 'nosuch'"):
        make_loader("nosuch", prepared, "train", batch_size=2, device="cpu")
    with pytest.raises(PlanktonioError, match="backend dali-gpu needs device cuda"):
        make_loader("dali-gpu", prepared, "train", batch_size=2, device="cpu")
    with pytest.raises(PlanktonioError, match="shard index must be in"):
        make_loader("dali-cpu", prepared, "train", batch_size=2, device="cpu", shard_index=2, shard_count=2)
    with pytest.raises(PlanktonioError, match="make no full batch of 64"):
        make_loader("torchvision", prepared, "train", batch_size=64, device="cpu")
    with pytest.raises(PlanktonioError, match="split must be one of"):
        make_loader("torchvision", prepared, "holdout", batch_size=2, device="cpu")


def test_a_folder_prepared_before_plans_says_to_rerun_prepare(coloured, tmp_path):
    import shutil
    prepared, _ = coloured
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    shutil.rmtree(old / "index")  # as an older prepare left it (its image_info.json is not read)
    with pytest.raises(PlanktonioError, match="train.npz: not found.*rerun `python -m planktonio prepare`"):
        make_loader("dali-cpu", old, "train", batch_size=2, device="cpu")


@pytest.fixture
def copied(coloured, tmp_path):
    """A private copy of the coloured set (source and prepared folder), free to damage."""
    import shutil
    prepared, _ = coloured
    root = PreparedDataset.load(prepared).root
    shutil.copytree(root, tmp_path / "source", copy_function=shutil.copy2)  # copy2 keeps mtimes
    shutil.copytree(prepared, tmp_path / "prepared")
    meta = tmp_path / "prepared" / "classes.json"
    meta.write_text(meta.read_text().replace(str(root), str(tmp_path / "source")))
    return tmp_path / "prepared", tmp_path / "source"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("backend", READERS)
def test_a_file_changed_after_prepare_is_named_before_the_run(copied, backend):
    prepared, source = copied
    victim, _ = PreparedDataset.load(prepared).entries("valid")[3]
    _truncate(source / victim)
    with pytest.raises(PlanktonioError, match=f"{victim}: changed since prepare.*rerun prepare"):
        loader(backend, prepared, "valid", batch_size=4)


def test_a_file_broken_during_a_run(copied, caplog):
    """torchvision reports and skips it (the batch is one image short); DALI, which cannot skip,
    stops with an error that names the file instead of a C++ message."""
    prepared, source = copied
    victim, _ = PreparedDataset.load(prepared).entries("valid")[9]
    tv = loader("torchvision", prepared, "valid", batch_size=4)
    dali = loader("dali-cpu", prepared, "valid", batch_size=4)
    _truncate(source / victim)
    assert sum(len(y) for _, y in tv) == 14
    assert victim in caplog.text and "cannot decode" in caplog.text
    with pytest.raises(PlanktonioError, match=f"{victim}: truncated .*DALI stopped on it"):
        list(dali)


def test_turbo_reports_and_skips_a_file_broken_during_a_run(copied, caplog):
    """The turbo backend, like the worker pools, leaves a file that broke since prepare out of its batch and
    names it; a training batch whose every file broke stops it (a step left out would misplace a resume)."""
    prepared, source = copied
    entries = PreparedDataset.load(prepared).entries("valid")
    turbo = loader("turbo", prepared, "valid", batch_size=4)
    _truncate(source / entries[9][0])
    assert sum(len(y) for _, y in turbo) == 14
    assert entries[9][0] in caplog.text and "cannot decode" in caplog.text
    train = loader("turbo", prepared, "train", batch_size=2, transform=TRAIN_AUGMENT)
    victims = [train.spec.entries[p][0] for p in train.batch_plan(0, 1).positions.tolist()]
    for victim in victims:
        _truncate(source / victim)
    batches = iter(train)
    assert len(next(batches)[1]) == 2
    with pytest.raises(PlanktonioError, match=f"{victims[0]} and the other 1 file.* batch 1 of epoch 0 broke"):
        next(batches)


def test_turbo_decodes_what_torchvision_decodes():
    """simplejpeg with the accurate IDCT (the default) gives torchvision.io's pixels exactly; a JPEG whose
    EXIF turns it is left to the shared decoder, which applies the orientation."""
    import io

    import simplejpeg
    from torchvision.io import decode_jpeg

    from planktonio.loaders.ops import is_upright_jpeg

    from .conftest import jpeg_bytes
    data = jpeg_bytes(size=64, seed=4)
    ours = simplejpeg.decode_jpeg(data, "RGB")
    theirs = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, theirs) and is_upright_jpeg(data)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = io.BytesIO()
    Image.open(io.BytesIO(data)).save(turned, "JPEG", exif=exif.tobytes())
    assert not is_upright_jpeg(turned.getvalue()) and not is_upright_jpeg(b"\x89PNG")


def test_a_training_batch_whose_every_file_broke_stops_the_torchvision_loader(copied):
    """Skipping the whole batch would leave out a training step: a resume would then start one
    batch late, and under DDP the other ranks would wait for this one in all-reduce."""
    prepared, source = copied
    tv = loader("torchvision", prepared, "train", batch_size=2, transform=TRAIN_AUGMENT)
    entries = tv.spec.entries
    victims = [entries[p][0] for p in tv.batch_plan(0, 1).positions.tolist()]
    for victim in victims:
        _truncate(source / victim)
    batches = iter(tv)
    images, labels = next(batches)  # batch 0 is whole
    assert len(labels) == 2
    with pytest.raises(PlanktonioError, match=f"{victims[0]} and the other 1 file.* batch 1 of epoch 0 broke.*rerun prepare"):
        next(batches)


@pytest.mark.parametrize("transform", [TRAIN_AUGMENT, EVAL_TRANSFORM])
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_gpu_pipeline_graphs_are_well_formed_without_a_gpu(coloured, transform, decode):
    """The dali-gpu graph (mixed decoder, its memory hints, .gpu() transfers) is defined here,
    where DALI checks every operator argument against its schema; only building it needs a GPU."""
    from planktonio.loaders.dali_graph import decoder_hints
    from planktonio.loaders.dali_loader import build_pipeline
    prepared, _ = coloured
    cpu_loader = loader("dali-cpu", prepared, "train", batch_size=4, transform=transform)
    spec = dataclasses.replace(cpu_loader.spec, output=Output("float16", "NHWC"), device=torch.device("cuda", 0))
    pipe = build_pipeline(spec, decode == "gpu", feed=lambda: None)
    pipe._build_graph()  # raises on an unknown argument or a bad value
    assert len(pipe._ops) >= 5
    # Sized for the 48 px test images: 2 x 48 x 48 x 3 bytes, rounded up to 1 MiB, per thread.
    assert decoder_hints(spec.widths, spec.heights) == {"device_memory_padding": 1 << 20, "host_memory_padding": 1 << 20,
                                   "preallocate_width_hint": 48, "preallocate_height_hint": 48}


@pytest.mark.parametrize("collect", [False, True])
def test_a_dropped_torchvision_loader_ends_its_workers(coloured, collect):
    """Workers ignore SIGTERM (the training process handles scancel's), so nothing but the loader
    may stop them: dropped without close(), whether freed at once or by the cyclic garbage
    collector, or still alive at exit, its workers end and the process exits."""
    prepared, _ = coloured
    code = ("import gc, sys; from planktonio import make_loader\n"
            "def use():\n"
            f"    loader = make_loader('torchvision', {str(prepared)!r}, 'train', batch_size=4, device='cpu', workers=2)\n"
            "    next(iter(loader))\n"  # an epoch abandoned: batches of the next ones are in flight
            "    return loader if sys.argv[1] == 'keep' else None\n"
            "kept = use()\n"
            "gc.collect()\n")
    for mode in ("drop", "keep"):
        result = python("-c", code if collect else code.replace("gc.collect()", ""), mode, timeout=120)
        assert result.returncode == 0, result.stderr


def test_exif_orientation_is_applied_alike_by_every_backend(tmp_path):
    """Chosen: every backend shows the picture upright (DALI's decoders do; torchvision now applies
    the EXIF orientation too), and prepare records the upright size for the plans."""
    source = tmp_path / "source"
    for c in range(2):
        (source / f"c{c}").mkdir(parents=True)
        for i in range(3):
            pixels = np.zeros((40, 80, 3), dtype=np.uint8)  # 80 wide, 40 high: left half dark, right bright
            pixels[:, 40:] = 230
            pixels[:, :40] = 30 + 20 * i + 5 * c  # no two alike: a copy under two classes would be dropped
            exif = Image.Exif()
            exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
            Image.fromarray(pixels).save(source / f"c{c}" / f"img{i}.jpg", exif=exif.tobytes(), quality=95)
    prepare(source, tmp_path / "prepared", plan=SplitPlan(per_class=(1, 1, 1)), workers=1)
    info = PreparedDataset.load(tmp_path / "prepared").index("valid")
    assert info.width.tolist() == [40, 40] and info.height.tolist() == [80, 80]  # upright: 40 wide, 80 high
    transform = EVAL_TRANSFORM.__class__(size=32, resize=32)
    outputs = {}
    for backend in ("dali-cpu", "torchvision"):
        with make_loader(backend, tmp_path / "prepared", "valid", batch_size=2, device="cpu", workers=1,
                         transform=transform) as loader:
            outputs[backend] = next(iter(loader))[0]
    std = torch.tensor(transform.std).view(1, 3, 1, 1)
    assert ((outputs["dali-cpu"] - outputs["torchvision"]).abs() * std * 255).max() <= 2
    # Turned clockwise, the dark left half is on top: the top rows are darker than the bottom ones.
    image = outputs["torchvision"][0].mean(dim=0)
    assert image[:8].mean() < image[-8:].mean() - 1


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

        def synchronize(self):
            done["waited"].append(self)
            self.finished = True

    done["waited"] = []
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
    # Closing waits for torch's work on what it still holds (the last batch handed out included): DALI
    # frees a buffer in its own stream's order, and the next allocation could overwrite it while torch's
    # kernels still read it.
    outputs.next()  # batches 4 and 5 handed out: 3's and 4's events pending, 5 just consumed
    outputs.close()
    assert len(done["waited"]) == 3 and outputs._held == deque() and outputs.pipe is None


def test_workers_and_threads_are_capped_at_the_cpus_this_process_may_use(coloured, caplog):
    """Finding 7: `loader.workers: 1000` started a thousand processes on 2 cores (load 59, no progress, and
    they outlived a SIGTERM). More than the usable CPUs only queue for the same cores: capped, said once."""
    from planktonio.loaders import available_cpus, loader_spec
    prepared, _ = coloured
    with caplog.at_level("WARNING", logger="planktonio"):
        specs = [loader_spec(prepared, "train", batch_size=4, device="cpu", workers=1000, threads=999)
                 for _ in range(2)]
    assert all(s.workers == available_cpus() and s.threads == available_cpus() for s in specs)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"loader workers: 1000 asked for, capped at the {available_cpus()} CPU(s) this process may use",
                     f"DALI threads: 999 asked for, capped at the {available_cpus()} CPU(s) this process may use"]

"""Loaders: equivalence of the backends, epoch and shard rules, batch format.

DALI runs here on the CPU (dali-cpu: the same pipeline code as dali-gpu but
for the decoder's device); the GPU path is tested in test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from planktonio import EVAL_TRANSFORM, TRAIN_AUGMENT, Output, PlanktonioError, make_loader
from planktonio.dataset import PreparedDataset
from planktonio.loaders import sharding

from .conftest import batch_indices

CPU_BACKENDS = ["dali-cpu", "torchvision"]

# Normalised values of 0 and 255 under ImageNet mean/std: the possible range.
LOWEST = min((0 - m) / s for m, s in zip(EVAL_TRANSFORM.mean, EVAL_TRANSFORM.std))
HIGHEST = max((1 - m) / s for m, s in zip(EVAL_TRANSFORM.mean, EVAL_TRANSFORM.std))


def loader(backend, prepared, split, **kwargs):
    kwargs.setdefault("workers", 2 if backend.startswith("dali") else 0)
    return make_loader(backend, prepared, split, device="cpu", **kwargs)


def test_eval_pipelines_agree(synthetic):
    """DALI CPU and torchvision, same images in the same order, evaluation transform.

    Measure: absolute difference of the outputs, in grey levels (0..255).
    Bound: mean < 0.5 and every pixel within 4. Why not 0: the two JPEG
    decoders (nvImageCodec vs torchvision's libjpeg-turbo build) may differ by
    a level in chroma upsampling and IDCT rounding, and the two antialiased
    linear resizes round differently. Measured here: mean 0.19, max 1.0.
    """
    dali = loader("dali-cpu", synthetic, "valid", batch_size=5)
    tv = loader("torchvision", synthetic, "valid", batch_size=5)
    std = torch.tensor(EVAL_TRANSFORM.std).view(1, 3, 1, 1)
    diffs = []
    for (x_dali, y_dali), (x_tv, y_tv) in zip(dali, tv, strict=True):
        assert torch.equal(y_dali, y_tv)
        diffs.append(((x_dali - x_tv).abs() * std * 255).flatten())
    diff = torch.cat(diffs)
    assert diff.numel() == 16 * 3 * 224 * 224
    assert diff.mean() < 0.5, f"mean difference {diff.mean():.3f} grey levels"
    assert diff.max() <= 4.0, f"max difference {diff.max():.2f} grey levels"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
    labels = torch.cat([y for _, y in batches])
    assert set(labels.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
            assert len(shard_seen) == shard.num_samples
            for images, labels in batches:  # labels match the manifest
                assert labels.tolist() == [label_of_index[i] for i in batch_indices(images, EVAL_TRANSFORM)]
            seen += shard_seen
        assert sorted(seen) == expected, f"epoch {epoch}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


def test_torchvision_augmentation_is_a_function_of_seed_and_epoch(synthetic):
    """Same seed and epoch: same batch, whatever the worker count; another epoch: another batch."""
    def first_batch(workers, epoch):
        tv = loader("torchvision", synthetic, "train", batch_size=4, workers=workers, seed=3)
        tv.set_epoch(epoch)
        images, _ = next(iter(tv))
        return images
    a, b, c = first_batch(0, 1), first_batch(2, 1), first_batch(0, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_backends_read_the_same_training_order(coloured):
    """Same seed, epoch and shard: DALI and torchvision see the same images in the same order."""
    prepared, _ = coloured
    for epoch in (0, 3):
        orders = []
        for backend in CPU_BACKENDS:
            shard = loader(backend, prepared, "train", batch_size=4, seed=9, shard_index=1, shard_count=2)
            shard.set_epoch(epoch)
            orders.append([i for images, _ in shard for i in batch_indices(images, TRAIN_AUGMENT)])
        assert orders[0] == orders[1] and len(orders[0]) == 12


def test_dali_epoch_is_reproducible_from_seed_and_epoch(synthetic):
    """A resumed run rebuilds epoch k from (seed, k): same images, same random crops."""
    def epoch_batches(epoch):
        dali = loader("dali-cpu", synthetic, "train", batch_size=8, seed=4)
        dali.set_epoch(epoch)
        return [x for x, _ in dali]
    once, again, other = epoch_batches(2), epoch_batches(2), epoch_batches(3)
    assert all(torch.equal(a, b) for a, b in zip(once, again, strict=True))
    assert not torch.equal(once[0], other[0])


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
                    assert len(tv) == -(-size // 2) and tv.num_samples == size


def test_bad_arguments_are_clear_errors(coloured, tmp_path):
    prepared, _ = coloured
    with pytest.raises(PlanktonioError, match="unknown loader backend 'ffcv'"):
        make_loader("ffcv", prepared, "train", batch_size=2, device="cpu")
    with pytest.raises(PlanktonioError, match="dali-gpu decodes on the GPU"):
        make_loader("dali-gpu", prepared, "train", batch_size=2, device="cpu")
    with pytest.raises(PlanktonioError, match="shard index must be in"):
        make_loader("dali-cpu", prepared, "train", batch_size=2, device="cpu", shard_index=2, shard_count=2)
    with pytest.raises(PlanktonioError, match="make no full batch of 64"):
        make_loader("torchvision", prepared, "train", batch_size=64, device="cpu")
    with pytest.raises(PlanktonioError, match="split must be one of"):
        make_loader("torchvision", prepared, "holdout", batch_size=2, device="cpu")


def test_a_file_broken_after_prepare_is_skipped_and_reported(coloured, tmp_path, caplog):
    """torchvision reports and skips it; the batch is one image short, the run goes on."""
    import shutil
    prepared, _ = coloured
    copy = tmp_path / "copy"
    shutil.copytree(PreparedDataset.load(prepared).root, copy / "source")
    shutil.copytree(prepared, copy / "prepared")
    meta = (copy / "prepared" / "classes.json")
    meta.write_text(meta.read_text().replace(str(PreparedDataset.load(prepared).root), str(copy / "source")))
    victim, _ = PreparedDataset.load(copy / "prepared").entries("valid")[0]
    (copy / "source" / victim).write_bytes(b"overwritten")
    batches = list(loader("torchvision", copy / "prepared", "valid", batch_size=4))
    assert sum(len(y) for _, y in batches) == 14
    assert victim in caplog.text and "cannot decode" in caplog.text


@pytest.mark.parametrize("transform, train", [(TRAIN_AUGMENT, True), (EVAL_TRANSFORM, False)])
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_gpu_pipeline_graphs_are_well_formed_without_a_gpu(coloured, transform, train, decode):
    """The dali-gpu graph (mixed decoder, its memory hints, .gpu() transfers) is defined here,
    where DALI checks every operator argument against its schema; only building it needs a GPU."""
    from planktonio.loaders.base import LoaderSpec
    from planktonio.loaders.dali_loader import _build_pipeline
    prepared, _ = coloured
    dataset = PreparedDataset.load(prepared)
    spec = LoaderSpec(dataset, "train", 4, transform, Output("float16", "NHWC"), torch.device("cuda", 0),
                      train, 0, 1, 2, 0, dataset.entries("train"))
    files, labels = (["x.jpg"], [0]) if train else (None, None)
    pipe = _build_pipeline(spec, decode, files, labels, seed=1)
    pipe._build_graph()  # raises on an unknown argument or a bad value
    assert len(pipe._ops) >= 4

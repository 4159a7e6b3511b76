"""The cache backend: decode once, then crop/resize/flip/normalise as tensor operations (CPU here).

The GPU runs the same torch code on cuda tensors, with DALI's mixed decoder
instead of its CPU one: test_the_gpu_cache_matches_the_cpu_cache (marked gpu).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from planktonio import (
    EVAL_TRANSFORM,
    TRAIN_AUGMENT,
    PlanktonioError,
    make_loader,
    memory,
    prepare,
)
from planktonio.dataset import PreparedDataset
from planktonio.loaders import BACKENDS, runnable_backends
from planktonio.loaders.cache_loader import CacheLoader, CacheOptions
from planktonio.preparation import SplitPlan

from .conftest import NDSB, batch_indices, colour_of
from .helpers import loader


def grey_levels(a, b, transform) -> torch.Tensor:
    """|a - b| of two normalised batches, on the 0..255 scale of the source pixels."""
    return (a.float() - b.float()).abs() * torch.tensor(transform.std).view(1, 3, 1, 1) * 255


def differences(first, second, transform, epochs=1) -> torch.Tensor:
    """Grey-level differences of two loaders' batches over some epochs; the labels must be equal."""
    diffs = []
    for epoch in range(epochs):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        for (x1, y1), (x2, y2) in zip(first, second, strict=True):
            assert torch.equal(y1, y2)
            diffs.append(grey_levels(x1, x2, transform).flatten())
    return torch.cat(diffs)


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    """3 classes x 8 flat-colour JPEGs of 21 to 97 px a side, not square: the slow (variable-size) path."""
    root = tmp_path_factory.mktemp("mixed")
    index_by_path = {}
    for c in range(3):
        (root / "source" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            index = c * 8 + i
            size = (21 + 11 * i, 97 - 9 * (index % 5))
            rel = f"class{c}/img{i}.jpg"
            Image.new("RGB", size, colour_of(index)).save(root / "source" / rel, quality=95)
            index_by_path[rel] = index
    prepare(root / "source", root / "prepared", plan=SplitPlan(per_class=(6, 2, 0)), seed=1, workers=1)
    return root / "prepared", index_by_path


def test_cache_is_an_ordinary_backend():
    assert "cache" in BACKENDS and "cache" in runnable_backends(torch.device("cpu"))


def test_eval_batches_match_dali_cpu(synthetic):
    """Measure: |cache - dali-cpu| in grey levels. Bound: mean < 0.05, every value within 2.

    Why not 0: DALI decodes only the box (region-of-interest decode) where the
    cache decodes the whole image with the same DALI decoder, and the resizes
    differ: DALI's own antialiased linear resampler against torch's
    (the cache's weights), each rounding to whole levels.
    Measured here: mean below 0.001, max 1 (a value near x.5 rounded either way).
    """
    cache = loader("cache", synthetic, "valid", batch_size=5, transform=EVAL_TRANSFORM)
    batched = CacheLoader(cache.spec, fast_path=True)  # the path a GPU takes
    dali = loader("dali-cpu", synthetic, "valid", batch_size=5, transform=EVAL_TRANSFORM)
    diff = differences(batched, dali, EVAL_TRANSFORM, epochs=2)
    assert diff.numel() == 2 * 16 * 3 * 224 * 224
    assert diff.mean() < 0.05 and diff.max() <= 2.001, (diff.mean(), diff.max())
    # On a CPU the cache resizes with torchvision's uint8 kernel, which rounds after each of its
    # two passes: then it sits as far from DALI as the torchvision backend does (mean 0.18).
    dali = loader("dali-cpu", synthetic, "valid", batch_size=5, transform=EVAL_TRANSFORM)
    diff = differences(cache, dali, EVAL_TRANSFORM, epochs=2)
    assert diff.mean() < 0.3 and diff.max() <= 2.001, (diff.mean(), diff.max())


def test_the_batched_fast_path_equals_the_per_image_path(synthetic):
    """Two batched matrix products per batch (equal sizes) against F.interpolate per image:
    at most one level apart (a value at x.5 rounded either way), almost never."""
    fast = loader("cache", synthetic, "train", batch_size=8, seed=5, transform=TRAIN_AUGMENT)
    fast = CacheLoader(fast.spec, fast_path=True)  # the GPU's batched path, forced on the CPU
    slow = CacheLoader(fast.spec, fast_path=False)
    assert fast.store is None and slow.store is None
    diff = differences(fast, slow, TRAIN_AUGMENT)
    assert fast.store.equal and diff.max() <= 1.001 and (diff > 0.5).float().mean() < 1e-3


def test_variable_sizes_take_the_slow_path_and_agree_with_torchvision(mixed_sizes):
    prepared, _ = mixed_sizes
    for split, transform in (("train", TRAIN_AUGMENT), ("valid", EVAL_TRANSFORM)):
        cache = loader("cache", prepared, split, batch_size=3, seed=2, transform=transform)
        tv = loader("torchvision", prepared, split, batch_size=3, seed=2, transform=transform)
        diff = differences(cache, tv, transform, epochs=2)
        assert not cache.store.equal
        assert diff.mean() < 0.3 and diff.max() <= 2.001, (split, diff.mean(), diff.max())


def test_variable_sizes_in_host_memory_give_the_batches_of_the_device(mixed_sizes):
    """Past the budget, images of different sizes are cut out in host memory and sent in one staging buffer
    per batch (a slice of a pinned chunk would go through pageable memory, a host wait on a GPU): the
    batches are the same as from the device, in both of the GPU's per-image paths."""
    prepared, _ = mixed_sizes
    kwargs = dict(batch_size=3, seed=2, transform=TRAIN_AUGMENT)
    on_device = CacheLoader(loader("cache", prepared, "train", **kwargs).spec, fast_path=False)
    in_host = CacheLoader(loader("cache", prepared, "train", **kwargs).spec, CacheOptions(budget_bytes=0),
                          fast_path=False)
    assert (on_device.placement, in_host.placement) == ("device", "host")
    for (a, _), (b, _) in zip(on_device, in_host, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shards", [1, 3, 4])
def test_every_eval_image_exactly_once_with_its_label(mixed_sizes, shards):
    prepared, index_by_path = mixed_sizes
    entries = PreparedDataset.load(prepared).entries("train")  # 18 images: uneven over 4 shards
    label_of_index = {index_by_path[p]: label for p, label in entries}
    seen = []
    for index in range(shards):
        shard = loader("cache", prepared, "train", batch_size=4, train=False, shard_index=index,
                       shard_count=shards)
        for images, labels in shard:
            indices = batch_indices(images, EVAL_TRANSFORM)
            assert labels.tolist() == [label_of_index[i] for i in indices]
            seen += indices
        assert len(shard.cached_positions) == shard.images_per_epoch  # a shard decodes only its range
    assert sorted(seen) == sorted(index_by_path[p] for p, _ in entries)


def test_reported_memory_is_what_it_holds(synthetic, mixed_sizes):
    cache = loader("cache", synthetic, "train", batch_size=8)
    assert cache.cache_bytes == 0  # nothing decoded before the first iteration
    next(iter(cache))
    stats = cache.stats()
    assert stats["placement"] == "device" and stats["decode_seconds"] > 0
    assert stats["cache_bytes"] == stats["device_bytes"] == cache.store.nbytes == 64 * 3 * 255 * 255
    assert stats["bytes_per_image"] == 3 * 255 * 255
    prepared, _ = mixed_sizes
    mixed = loader("cache", prepared, "train", batch_size=4)
    next(iter(mixed))
    index = PreparedDataset.load(prepared).index("train")
    assert mixed.cache_bytes == mixed.store.nbytes == int((3 * index.width * index.height).sum())


def test_a_budget_too_small_keeps_the_images_in_host_memory_or_refuses(synthetic):
    kwargs = dict(batch_size=8, seed=1, transform=TRAIN_AUGMENT)
    needed = 64 * 3 * 255 * 255
    within = loader("cache", synthetic, "train", options={"budget_bytes": needed}, **kwargs)
    over = loader("cache", synthetic, "train", options={"budget_bytes": needed - 1, "overflow": "host"}, **kwargs)
    assert within.placement == "device" and over.placement == "host"
    for (a, _), (b, _) in zip(within, over, strict=True):  # the same batches, gathered and copied per batch
        assert torch.equal(a, b)
    assert over.device_bytes == 0 and over.cache_bytes == needed
    with pytest.raises(PlanktonioError, match=r"needs 11\.9 MiB decoded, over .* cache budget on cpu \(image cache: "
                                              r"at most 11\.9 MiB"):
        loader("cache", synthetic, "train", options={"budget_bytes": needed - 1, "overflow": "error"}, **kwargs)
    with pytest.raises(PlanktonioError, match="loader.options.overflow must be one of host, error, not 'disk'"):
        loader("cache", synthetic, "train", options={"overflow": "disk"}, **kwargs)
    with pytest.raises(PlanktonioError, match="loader backend cache: unknown key 'loader.options.budget'"):
        loader("cache", synthetic, "train", options={"budget": 1}, **kwargs)


def test_one_budget_is_shared_by_a_process_s_cache_loaders(synthetic):
    """A run's train, valid and test loaders together stay within the budget: the train split (64 images)
    fits, the valid split (16) still fits what is left, the test split (16) does not and goes to host
    memory; a closed loader gives its share back."""
    image = 3 * 255 * 255
    budget = memory.Budget.of(torch.device("cpu"))
    before = budget.reserved.get("image cache", 0)  # loaders of other tests not yet collected
    options = {"budget_bytes": before + (64 + 16 + 8) * image, "overflow": "host"}
    train = loader("cache", synthetic, "train", batch_size=8, options=options)
    valid = loader("cache", synthetic, "valid", batch_size=8, options=options)
    test = loader("cache", synthetic, "test", batch_size=8, options=options)
    assert (train.placement, valid.placement, test.placement) == ("device", "device", "host")
    assert budget.reserved["image cache"] - before == (64 + 16) * image  # the test split's is counted apart
    valid.close()
    assert loader("cache", synthetic, "test", batch_size=8, options=options).placement == "device"


def test_host_stores_are_allocated_in_chunks_of_a_power_of_two():
    """torch's pinned allocator rounds each allocation up to a power of two: a 9 GB store in one piece
    would pin 16 GB. In chunks of 256 MiB, what is pinned (each chunk rounded up) stays within one
    chunk of what is needed, and every image lies wholly inside one chunk."""
    from planktonio.memory import CHUNK_BYTES, plan_chunks
    image = 3 * 255 * 255
    item_bytes = np.full(9 * 2**30 // image, image, dtype=np.int64)  # 9 GiB of 255 px images
    chunk_of, offset, sizes = plan_chunks(item_bytes, CHUNK_BYTES)
    pinned = sum(1 << (size - 1).bit_length() for size in sizes)  # each allocation rounded up
    assert max(sizes) <= CHUNK_BYTES and pinned - item_bytes.sum() < CHUNK_BYTES
    assert 1 << (int(item_bytes.sum()) - 1).bit_length() == 16 * 2**30  # what one allocation would pin
    assert np.all(offset + item_bytes <= np.asarray(sizes)[chunk_of])  # no image crosses a chunk
    varied = np.array([100, 300, 50, 400, 10])
    chunk_of, offset, sizes = plan_chunks(varied, 400)
    assert chunk_of.tolist() == [0, 0, 1, 2, 3] and offset.tolist() == [0, 100, 0, 0, 0]
    assert sizes == [400, 50, 400, 10]


def test_a_store_in_several_chunks_gives_the_batches_of_one_in_one_piece(synthetic, monkeypatch):
    """Host placement, chunks of 5 images: gathering a batch across chunks gives the same batches."""
    kwargs = dict(batch_size=8, seed=1, transform=TRAIN_AUGMENT)
    whole = CacheLoader(loader("cache", synthetic, "train", **kwargs).spec, fast_path=True)
    monkeypatch.setattr(memory, "CHUNK_BYTES", 5 * 3 * 255 * 255)
    chunked = loader("cache", synthetic, "train", options={"budget_bytes": 0}, **kwargs)
    chunked = CacheLoader(chunked.spec, CacheOptions(budget_bytes=0), fast_path=True)
    assert chunked.placement == "host"
    for (a, _), (b, _) in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)
    assert len(chunked.store.chunks) == 13 and chunked.store.nbytes == 64 * 3 * 255 * 255


def test_a_file_broken_after_prepare_is_an_error_naming_it(coloured, tmp_path):
    prepared, _ = coloured
    copy = tmp_path / "copy"
    shutil.copytree(PreparedDataset.load(prepared).root, copy / "source")
    shutil.copytree(prepared, copy / "prepared")
    meta = copy / "prepared" / "classes.json"
    meta.write_text(meta.read_text().replace(str(PreparedDataset.load(prepared).root), str(copy / "source")))
    victim, _ = PreparedDataset.load(copy / "prepared").entries("valid")[3]
    # Same size and modification time, so make_loader's cheap check passes and the decode finds it.
    broken = copy / "source" / victim
    stat, data = broken.stat(), broken.read_bytes()
    broken.write_bytes(bytes(64) + data[64:])
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(PlanktonioError, match=f"{victim}: cannot decode"):
        next(iter(loader("cache", copy / "prepared", "valid", batch_size=4)))


@pytest.fixture(scope="module")
def ndsb_sample(tmp_path_factory):
    """12 raw NDSB images (their own sizes) from each of 3 classes."""
    if not NDSB.is_dir():
        pytest.skip(f"real plankton images not found at {NDSB}")
    root = tmp_path_factory.mktemp("ndsb_sample")
    classes = [sorted(d.glob("*.jpg"))[:12] for d in sorted(NDSB.iterdir()) if d.is_dir()]
    for files in [files for files in classes if len(files) == 12][:3]:
        (root / "source" / files[0].parent.name).mkdir(parents=True)
        for path in files:
            shutil.copy(path, root / "source" / path.parent.name / path.name)
    prepare(root / "source", root / "prepared", plan=SplitPlan(per_class=(8, 4, 0)), seed=0, workers=1)
    return root / "prepared"


@pytest.mark.parametrize("split, transform", [("train", TRAIN_AUGMENT), ("valid", EVAL_TRANSFORM)])
def test_raw_ndsb_images_of_many_sizes(ndsb_sample, split, transform):
    widths = PreparedDataset.load(ndsb_sample).index(split).width
    assert len(np.unique(widths)) > 3  # really variable sizes
    cache = loader("cache", ndsb_sample, split, batch_size=4, seed=1, transform=transform)
    tv = loader("torchvision", ndsb_sample, split, batch_size=4, seed=1, transform=transform)
    diff = differences(cache, tv, transform)
    assert diff.mean() < 0.3 and diff.max() <= 2.001, (diff.mean(), diff.max())


@pytest.mark.gpu
def test_the_gpu_cache_matches_the_cpu_cache(synthetic):
    """Same plans, DALI's mixed decoder and cuda tensors against DALI's CPU decoder and the CPU paths.

    Bound: mean < 1 grey level, 99.9% of values within 8, as test_gpu.py's
    decoder comparison. The causes: the decoders differ (nvJPEG's CUDA IDCT
    and chroma upsampling, or the hardware decoder on A100/H100/H200, against
    libjpeg-turbo: a few levels at sharp edges), and the GPU takes the batched
    matrix-product resize (rounded once) where the CPU takes torch's uint8
    kernel (rounded per pass; on the CPU alone the two differ by up to 1-2).
    A bound of 2 on every value, as for two CPU paths, would fail on the decoders alone.
    """
    kwargs = dict(batch_size=8, seed=3, transform=TRAIN_AUGMENT, workers=2)
    gpu = make_loader("cache", synthetic, "train", device="cuda", **kwargs)
    cpu = make_loader("cache", synthetic, "train", device="cpu", **kwargs)
    diffs = []
    for (xg, yg), (xc, yc) in zip(gpu, cpu, strict=True):
        assert xg.is_cuda and torch.equal(yg.cpu(), yc)
        diffs.append(grey_levels(xg.cpu(), xc, TRAIN_AUGMENT).flatten())
    diff = torch.cat(diffs)
    assert diff.mean() < 1.0 and torch.quantile(diff[:: max(1, diff.numel() // 1_000_000)], 0.999) < 8
    assert gpu.placement == "device" and gpu.device_bytes == 64 * 3 * 255 * 255
    host = make_loader("cache", synthetic, "train", device="cuda", options={"budget_bytes": 0}, **kwargs)
    gpu.set_epoch(0)
    assert torch.equal(next(iter(host))[0], next(iter(gpu))[0]) and host.store.is_pinned()


def test_the_loader_benchmark_reports_the_decode_and_the_memory(synthetic):
    from profiling.loader_bench import run
    from profiling.settings import LoaderBenchmark
    bench = run(LoaderBenchmark(data=str(synthetic), backends=("cache",), batch_size=8, epochs=1, warmup=1,
                                repeats=1, workers=2))
    (result,) = bench["results"]
    stats = result["stats"]  # the backend's own figures, from its stats()
    assert result["backend"] == "cache" and stats["placement"] == "device"
    assert stats["decode_seconds"] > 0 and result["pipelines_built"] == 1
    assert stats["cache_bytes"] == 64 * 3 * 255 * 255 and stats["bytes_per_image"] == 3 * 255 * 255

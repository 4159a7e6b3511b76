"""Packed shards: `pack`, and every backend reading them exactly as it reads the loose files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tarfile

import pytest
import torch

from planktonio import EVAL_TRANSFORM, TRAIN_AUGMENT, PlanktonioError, shards as shards_module
from planktonio.__main__ import main
from planktonio.dataset import SPLITS, PreparedDataset
from planktonio.declared import parse_size, shown_size
from planktonio.shards import SHARDS_DIR, ShardIndex, ShardSet, pack

from .conftest import batch_indices
from .helpers import loader

BACKENDS = ["dali-cpu", "torchvision", "cache", "turbo"]
SMALL = 8 * 1024  # a few 48 px JPEGs per shard, so every split has several shards


def copy_prepared(prepared, to):
    """A copy of a prepared folder (manifests; the images stay where they are), without shards."""
    shutil.copytree(prepared, to, ignore=shutil.ignore_patterns(SHARDS_DIR))
    return to


@pytest.fixture(scope="module")
def packed(coloured, tmp_path_factory):
    prepared, index_by_path = coloured
    folder = copy_prepared(prepared, tmp_path_factory.mktemp("packed") / "prepared")
    results = pack(folder, SMALL)
    return prepared, folder, index_by_path, results


def test_pack_writes_webdataset_shards_and_leaves_the_loose_files(coloured, tmp_path):
    prepared, _ = coloured
    root = PreparedDataset.load(prepared).root
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*.jpg")}
    folder = copy_prepared(prepared, tmp_path / "prepared")
    results = pack(folder, SMALL)
    assert [r.split for r in results] == list(SPLITS) and [r.images for r in results] == [30, 15, 15]
    assert all(r.shards > 1 and r.reused == 0 for r in results)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*.jpg")} == before
    dataset = PreparedDataset.load(folder)
    for split in SPLITS:
        entries = dataset.entries(split)
        members = {}
        for shard in sorted((folder / SHARDS_DIR).glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
        # Each manifest position once: its file's bytes under KEY.jpg and its label under KEY.cls.
        assert len(members) == 2 * len(entries)
        for position, (path, label) in enumerate(entries):
            assert members[f"{position:08d}.jpg"] == (dataset.root / path).read_bytes()
            assert members[f"{position:08d}.cls"] == str(label).encode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_and_loose_give_identical_batches(packed, backend):
    loose_folder, packed_folder, _, _ = packed
    for split, transform, train in (("train", TRAIN_AUGMENT, True), ("valid", EVAL_TRANSFORM, False)):
        loose = loader(backend, loose_folder, split, batch_size=4, seed=3, transform=transform, train=train)
        from_shards = loader(backend, packed_folder, split, batch_size=4, seed=3, transform=transform, train=train)
        assert loose.spec.shards is None and from_shards.spec.shards is not None
        for epoch in range(2):
            pairs = list(zip(loose, from_shards, strict=True))
            assert len(pairs) == len(loose) > 0
            for (x1, y1), (x2, y2) in pairs:
                assert torch.equal(x1, x2) and torch.equal(y1, y2), (split, epoch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_image_exactly_once_from_shards(packed, backend):
    _, packed_folder, index_by_path, _ = packed
    entries = PreparedDataset.load(packed_folder).entries("valid")
    seen = []
    for index in range(3):
        shard = loader(backend, packed_folder, "valid", batch_size=4, shard_index=index, shard_count=3)
        seen += [i for images, _ in shard for i in batch_indices(images, EVAL_TRANSFORM)]
    assert sorted(seen) == sorted(index_by_path[p] for p, _ in entries)


def damaged_copy(packed_folder, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(packed_folder, folder)
    return folder, ShardSet.open(PreparedDataset.load(folder), "train")


def test_a_truncated_shard_is_an_error_naming_it_and_the_sample(packed, tmp_path):
    folder, shards = damaged_copy(packed[1], tmp_path)
    victim = folder / SHARDS_DIR / shards.names[1]
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(PlanktonioError, match=rf"{victim}: truncated .*sample \d{{8}} \(class\d/img\d+\.jpg\)"):
        loader("cache", folder, "train", batch_size=4)


def test_a_flipped_byte_is_an_error_naming_the_shard_and_the_sample(packed, tmp_path):
    folder, shards = damaged_copy(packed[1], tmp_path)
    position = int((shards.shard == 2).nonzero()[0][1])  # the second sample of the third shard
    victim = folder / SHARDS_DIR / shards.names[2]
    data = bytearray(victim.read_bytes())
    data[shards.offset[position] + 100] ^= 0x01
    victim.write_bytes(bytes(data))
    path = PreparedDataset.load(folder).index("train").path(position)
    with pytest.raises(PlanktonioError, match=rf"{victim}: sample {position:08d} \({path}\) at offset "
                                              rf"{shards.offset[position]} fails its sha256 check"):
        loader("torchvision", folder, "train", batch_size=4)


def test_an_interrupted_pack_completes_when_rerun(coloured, tmp_path, monkeypatch):
    prepared, _ = coloured
    reference = copy_prepared(prepared, tmp_path / "reference")
    pack(reference, SMALL)
    folder = copy_prepared(prepared, tmp_path / "interrupted")
    real_write, calls = shards_module.write_shard, []

    def dies_on_the_third_shard(path, *args):
        calls.append(path.name)
        if len(calls) == 3:
            (path.parent / f".{path.name}.killed.tmp").write_bytes(b"half a shard")  # what a killed pack leaves
            raise KeyboardInterrupt
        return real_write(path, *args)

    monkeypatch.setattr(shards_module, "write_shard", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pack(folder, SMALL)
    assert not (folder / SHARDS_DIR / "train.npz").exists()  # no index: loaders still read the loose files
    monkeypatch.setattr(shards_module, "write_shard", real_write)
    results = pack(folder, SMALL)
    assert results[0].reused == 2  # the two finished shards were kept, the rest written
    written = sorted(p.name for p in (folder / SHARDS_DIR).iterdir())
    assert written == sorted(p.name for p in (reference / SHARDS_DIR).iterdir())
    for name in written:  # byte-identical to an uninterrupted pack, but for the stamps' mtimes
        mine, theirs = (folder / SHARDS_DIR / name).read_bytes(), (reference / SHARDS_DIR / name).read_bytes()
        if name.endswith(".verified.json"):
            mine, theirs = (sorted(json.loads(side)["shards"]) for side in (mine, theirs))
        assert mine == theirs, name


def test_a_rerun_pack_rewrites_a_damaged_shard(packed, tmp_path):
    folder, shards = damaged_copy(packed[1], tmp_path)
    victim = folder / SHARDS_DIR / shards.names[0]
    data = bytearray(victim.read_bytes())
    data[shards.offset[0]] ^= 0xFF
    victim.write_bytes(bytes(data))
    results = pack(folder, SMALL)
    assert results[0].reused == results[0].shards - 1
    assert len(list(loader("cache", folder, "train", batch_size=4))) == 7


def test_shards_from_an_older_manifest_say_to_repack(packed, tmp_path):
    folder, _ = damaged_copy(packed[1], tmp_path)
    index_file = folder / SHARDS_DIR / "train.npz"
    index = ShardIndex.read(index_file)  # packed from another manifest (prepare listed the files otherwise)
    dataclasses.replace(index, manifest_sha256=hashlib.sha256(b"another manifest").digest()).write(index_file)
    with pytest.raises(PlanktonioError, match="not those of .*train.txt.*rerun `python -m planktonio pack`"):
        loader("dali-cpu", folder, "train", batch_size=4)

    # packed by the planktonio before the index became columns: a JSON index, never read as loose files
    (folder / SHARDS_DIR / "train.npz").rename(folder / SHARDS_DIR / "train.json")
    with pytest.raises(PlanktonioError, match="train.json: shards packed by an older planktonio; rerun `python -m "
                                              "planktonio pack`"):
        loader("torchvision", folder, "train", batch_size=4)


def test_dali_reads_the_shards_as_webdataset(packed):
    """The layout is webdataset's: DALI's own reader finds every image and label."""
    from nvidia.dali import fn, pipeline_def
    _, folder, _, _ = packed
    paths = [str(p) for p in sorted((folder / SHARDS_DIR).glob("valid-*.tar"))]
    entries = PreparedDataset.load(folder).entries("valid")

    @pipeline_def
    def read():
        return tuple(fn.readers.webdataset(paths=paths, ext=["jpg", "cls"]))

    pipe = read(batch_size=len(entries), num_threads=1, device_id=None)
    pipe.build()
    images, labels = pipe.run()
    root = PreparedDataset.load(folder).root
    assert [images.at(i).tobytes() for i in range(len(entries))] == [(root / p).read_bytes() for p, _ in entries]
    assert [int(labels.at(i).tobytes()) for i in range(len(entries))] == [label for _, label in entries]


def test_pack_command_and_sizes(packed, tmp_path, capsys):
    assert parse_size("256MB") == 256 * 2**20 and parse_size("1gb") == 2**30 and parse_size("4096") == 4096
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("512 KiB") == 2**19
    # and back: a small size is never shown as 0.0 of a larger unit, and what is shown parses again
    assert [shown_size(n) for n in (0, 1000, 12 * 2**10, 310 * 2**20, 2**31)] == \
        ["0 B", "1000 B", "12.0 KiB", "310.0 MiB", "2.0 GiB"]
    assert all(parse_size(shown_size(n)) == n for n in (1000, 12 * 2**10, 310 * 2**20, 2**31))
    with pytest.raises(PlanktonioError, match="--shard-size '12 parsecs'"):
        parse_size("12 parsecs", "--shard-size")
    folder = copy_prepared(packed[0], tmp_path / "cli")
    assert main(["pack", "--data", str(folder), "--shard-size", "16KB"]) == 0
    assert "train: 30 images in" in capsys.readouterr().out
    assert main(["pack", "--data", str(folder), "--shard-size", "lots"]) == 2
    assert main(["pack", "--data", str(folder), "--shard-size", "0"]) == 2


# ------------------------------------------------------------------ verified once, then by size and mtime


@pytest.fixture
def counted_hashes(monkeypatch):
    """The samples the shards module reads back and hashes: one entry per sample verified."""
    calls = []
    real = shards_module._verify_shard

    def counting(path, positions, *args):
        calls.extend([1] * len(positions))
        return real(path, positions, *args)

    monkeypatch.setattr(shards_module, "_verify_shard", counting)
    return calls


def open_train(folder):
    return ShardSet.open(PreparedDataset.load(folder), "train")


def test_opening_packed_shards_again_checks_their_stamp_not_their_bytes(packed, tmp_path, counted_hashes):
    folder = tmp_path / "copy"
    shutil.copytree(packed[1], folder)  # copy2: the shards keep the mtime that pack stamped
    stamp = json.loads((folder / SHARDS_DIR / "train.verified.json").read_text())
    shards = open_train(folder)
    assert sorted(stamp["shards"]) == sorted(shards.names)
    assert counted_hashes == []  # pack verified every sample and stamped each shard: nothing is read again
    victim = folder / SHARDS_DIR / shards.names[1]
    status = victim.stat()
    os.utime(victim, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # touched: verified again, alone
    open_train(folder)
    assert len(counted_hashes) == int((shards.shard == 1).sum()) > 0
    counted_hashes.clear()
    open_train(folder)
    assert counted_hashes == []  # and stamped again


def test_a_shard_changed_in_place_is_verified_again_and_names_the_sample(packed, tmp_path):
    """Same size, one byte changed, a new mtime: what a bad copy or a disk error over a rewrite leaves."""
    folder, shards = damaged_copy(packed[1], tmp_path)
    victim = folder / SHARDS_DIR / shards.names[0]
    status = victim.stat()
    with open(victim, "r+b") as f:
        f.seek(int(shards.offset[0]) + 7)
        byte = f.read(1)
        f.seek(int(shards.offset[0]) + 7)
        f.write(bytes([byte[0] ^ 0x10]))
    os.utime(victim, ns=(status.st_atime_ns, status.st_mtime_ns + 1))
    assert victim.stat().st_size == status.st_size
    first = PreparedDataset.load(folder).index("train").path(0)
    with pytest.raises(PlanktonioError, match=rf"{victim}: sample 00000000 \({first}\) at offset "
                                              rf"{shards.offset[0]} fails its sha256 check"):
        open_train(folder)
    with pytest.raises(PlanktonioError, match="fails its sha256 check"):  # a failed check stamps nothing
        open_train(folder)


@pytest.mark.parametrize("name", ["../../outside.tar", "OUTSIDE", "sub/train-00000.tar", "..", "", ".hidden.tar", 7])
def test_a_shard_name_that_leaves_the_shards_folder_is_refused(packed, tmp_path, name):
    """The index names the tars to read: a name must be a plain file name in PREPARED/shards/, never a
    path elsewhere, even to a file that is a perfectly good copy of a shard."""
    folder, shards = damaged_copy(packed[1], tmp_path)
    outside = tmp_path / "outside.tar"  # folder/shards/../../outside.tar
    shutil.copy2(folder / SHARDS_DIR / shards.names[0], outside)
    name = str(outside) if name == "OUTSIDE" else name
    index_file = folder / SHARDS_DIR / "train.npz"
    index = ShardIndex.read(index_file)  # a crafted index (its checksum made to match), not a damaged one
    dataclasses.replace(index, names=[name, *index.names[1:]]).write(index_file)
    with pytest.raises(PlanktonioError) as error:
        open_train(folder)
    message = str(error.value)
    assert message.startswith(f"{index_file}: shard {name!r} is not a file name in {folder / SHARDS_DIR}")
    assert message.endswith("rerun `python -m planktonio pack`") and "\n" not in message


def test_prepared_shards_and_predict_s_tars_are_read_through_one_reader(packed):
    """ShardSet (a prepared split) and TarShards (predict's input) are ShardReaders reading through the same
    memory maps: the same member bytes at the same offsets, from worker processes too (maps not pickled)."""
    import pickle

    from planktonio.shard_reading import MemberMaps, ShardReader
    from planktonio.unlabelled import discover
    _, folder, _, _ = packed
    dataset = PreparedDataset.load(folder)
    shards = ShardSet.open(dataset, "train")
    catalog = discover(folder / SHARDS_DIR)
    assert isinstance(shards, ShardReader) and isinstance(catalog.shards, ShardReader)
    assert isinstance(shards, MemberMaps) and isinstance(catalog.shards, MemberMaps)
    member = next(p for p in range(len(catalog)) if catalog.shards.describe(p).endswith("train-00000.tar:00000000.jpg"))
    assert catalog.shards.read(member).tobytes() == shards.read(0).tobytes() == \
        (dataset.root / dataset.index("train").path(0)).read_bytes()
    copy = pickle.loads(pickle.dumps(shards))
    assert copy._maps == {} and copy.read(0).tobytes() == shards.read(0).tobytes()

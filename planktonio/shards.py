"""Packed shards: each split's images in a few large tar files, for file systems where opening files costs most.

On Lustre (Cirrus) opening thousands of small files costs more than reading
them; a split packed into shards of a few hundred MB is opened once per
shard. `python -m planktonio pack --data PREPARED` writes, per split:

    PREPARED/shards/train-00000.tar ...   the webdataset layout: for manifest position p,
                                          members "{p:08d}.jpg" (the file's bytes, its own
                                          extension) and "{p:08d}.cls" (the label, in ASCII),
                                          so DALI's readers.webdataset and the webdataset
                                          library read them too
    PREPARED/shards/train-00000.json      that shard's samples, written once the shard is
                                          complete: what makes an interrupted pack restartable
    PREPARED/shards/train.json            the split's index, in manifest order: each sample's
                                          shard, offset and size of its image bytes, sha256
    PREPARED/shards/train.verified.json   the stamp of the last full check: each shard's size
                                          and mtime_ns when its every sample matched the index

The loose files are not touched. Which samples go into which shard follows
from the manifest and the file sizes alone, so a rerun of an interrupted
pack finds the same shards: complete ones (their record present, their
members verified) are kept, the unfinished one is written again.

Reading (`ShardSet`): every backend reads a split from its shards when the
prepared folder has them, in manifest order, with the same plans: the
image bytes at the sample's offset, sliced from a memory map of the shard.
The index only names shards inside PREPARED/shards/ (plain file names; any
other name is refused), and every sample is checked against it in full
(truncation, then sha256) once: by pack, and again by `ShardSet.open` for a
shard whose size or modification time differs from the stamp of its last
check, so a damaged shard is an error naming the shard and the sample
before training starts. Otherwise open only compares the stamp with a stat
per shard: hashing a split costs minutes at ImageNet scale, which every
run would pay before its first step. The trust is the same as make_loader
gives the loose files (size and mtime, see dataset.check_files_unchanged).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import SPLITS, PreparedDataset
from .errors import PlanktonioError
from .files import atomic_file, write_atomic

SHARDS_DIR = "shards"
FORMAT = 1
STAMP_FORMAT = 1
# What pack names a shard ("train-00000.tar"): a plain file name, never a path or a hidden file.
SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.tar")
DEFAULT_SHARD_SIZE = 256 * 2**20
REPACK = "rerun `python -m planktonio pack`"


def key_of(position: int) -> str:
    """The webdataset key of manifest position p: a name with no dot, so the extension is unambiguous."""
    return f"{position:08d}"


def image_member(position: int, path: str) -> str:
    suffix = os.path.splitext(path)[1].lower().lstrip(".") or "jpg"
    return f"{key_of(position)}.{suffix}"


def _member_bytes(size: int) -> int:
    """Bytes a tar member takes: its 512-byte header and its data padded to 512 bytes."""
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def plan_shards(sizes: list[int], shard_size: int) -> list[list[int]]:
    """Manifest positions per shard, in order: a new shard starts where the next sample would pass shard_size."""
    shards, current, used = [], [], 0
    for position, size in enumerate(sizes):
        need = _member_bytes(size) + _member_bytes(4)  # the image and its label
        if current and used + need > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(position)
        used += need
    if current:
        shards.append(current)
    return shards


# ---------------------------------------------------------------- writing


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """Fixed metadata, so the same inputs always give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info


def write_shard(path: Path, root: Path, entries: list[tuple[str, int]], positions: list[int]) -> dict:
    """Write one shard (via a temporary file and a rename) and return its record: samples with offsets."""
    samples = {"position": [], "offset": [], "size": [], "sha256": []}
    with atomic_file(path, "wb", durable=True) as raw, \
            tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for position in positions:
            relpath, label = entries[position]
            data = (root / relpath).read_bytes()
            info = _tar_info(image_member(position, relpath), len(data))
            offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
            tar.addfile(info, io.BytesIO(data))
            cls = str(label).encode()
            tar.addfile(_tar_info(f"{key_of(position)}.cls", len(cls)), io.BytesIO(cls))
            for field, value in (("position", position), ("offset", offset), ("size", len(data)),
                                 ("sha256", hashlib.sha256(data).hexdigest())):
                samples[field].append(value)
    return {"name": path.name, "bytes": path.stat().st_size, "samples": samples}


def _record_if_complete(path: Path, positions: list[int], sizes: list[int]) -> dict | None:
    """A shard from an earlier run, if it is complete and intact for these positions; else None (redo it)."""
    record_file = path.with_suffix(".json")
    if not (path.is_file() and record_file.is_file()):
        return None
    try:
        record = json.loads(record_file.read_text())
        samples = record["samples"]
        if samples["position"] != positions or samples["size"] != [sizes[p] for p in positions]:
            return None
        _verify_shard(path, record)
    except (json.JSONDecodeError, KeyError, TypeError, PlanktonioError):
        return None
    return record


@dataclass
class PackResult:
    split: str
    images: int
    shards: int
    reused: int      # shards kept from an interrupted earlier run
    bytes: int


def pack(data: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE) -> list[PackResult]:
    """Write every split of a prepared folder as tar shards plus an index; restartable; loose files untouched."""
    dataset = PreparedDataset.load(data)
    out = dataset.path / SHARDS_DIR
    out.mkdir(exist_ok=True)
    for stale in out.glob(".*.tmp"):  # what an interrupted pack was writing: written again below
        stale.unlink(missing_ok=True)
    results = []
    for split in SPLITS:
        entries = dataset.entries(split)
        dataset.check_files_unchanged(split, entries, dataset.image_info(split, len(entries)))
        sizes = [(dataset.root / path).stat().st_size for path, _ in entries]
        # No index until every shard is there: loaders read the loose files meanwhile, not half a pack.
        (out / f"{split}.json").unlink(missing_ok=True)
        records, reused = [], 0
        for number, positions in enumerate(plan_shards(sizes, shard_size)):
            path = out / f"{split}-{number:05d}.tar"
            record = _record_if_complete(path, positions, sizes)
            if record is None:
                record = write_shard(path, dataset.root, entries, positions)
                write_atomic(path.with_suffix(".json"), json.dumps(record))
            else:
                reused += 1
            records.append(record)
        index = _split_index(split, entries, records)
        write_atomic(out / f"{split}.json", json.dumps(index))
        # Read back every member before saying it is done; the stamp spares later opens doing it again.
        ShardSet(dataset, split, index).verify(_stat(out / f"{split}.json"), everything=True)
        results.append(PackResult(split, len(entries), len(records), reused,
                                  sum(r["bytes"] for r in records)))
    return results


def _split_index(split: str, entries: list[tuple[str, int]], records: list[dict]) -> dict:
    index = {"format": FORMAT, "split": split, "shards": [{"name": r["name"], "bytes": r["bytes"]} for r in records],
             "path": [path for path, _ in entries], "shard": [], "offset": [], "size": [], "sha256": []}
    for number, record in enumerate(records):
        samples = record["samples"]
        index["shard"] += [number] * len(samples["position"])
        for field in ("offset", "size", "sha256"):
            index[field] += samples[field]
    return index


# ---------------------------------------------------------------- reading


def _verify_shard(path: Path, record: dict, paths: list[str] | None = None) -> None:
    """Every sample of one shard: present in full (else truncated) and with its sha256 (else corrupt)."""
    actual = path.stat().st_size
    samples = record["samples"]
    with open(path, "rb") as shard:
        for position, offset, size, digest in zip(samples["position"], samples["offset"], samples["size"],
                                                  samples["sha256"]):
            sample = f"sample {key_of(position)}" + (f" ({paths[position]})" if paths else "")
            if offset + size > actual:
                raise PlanktonioError(f"{path}: truncated ({actual} bytes): {sample} needs bytes "
                                      f"{offset}-{offset + size}; {REPACK}")
            shard.seek(offset)
            if hashlib.sha256(shard.read(size)).hexdigest() != digest:
                raise PlanktonioError(f"{path}: {sample} at offset {offset} fails its sha256 check "
                                      f"(the shard is corrupt); {REPACK}")


def _stat(path: Path) -> dict:
    status = path.stat()
    return {"bytes": status.st_size, "mtime_ns": status.st_mtime_ns}


def _read_stamp(stamp_file: Path, index_stat: dict) -> dict:
    """{shard name: {bytes, mtime_ns}} at its last full check, if the stamp is of this index; else {}.

    A missing, unreadable or damaged stamp is no error: it only means every
    shard is checked in full again, as on the first open.
    """
    try:
        stamp = json.loads(stamp_file.read_text())
        if stamp["format"] == STAMP_FORMAT and stamp["index"] == index_stat and isinstance(stamp["shards"], dict):
            return stamp["shards"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        pass
    return {}


def _write_stamp(stamp_file: Path, stamp: dict) -> None:
    try:
        write_atomic(stamp_file, json.dumps(stamp))
    except OSError:
        # A read-only prepared folder (a shared copy) verifies in full at every open, as before
        # the stamp; ranks opening the same split at once all verified it and any one may win.
        pass


class ShardSet:
    """One split's shards: the image bytes of manifest position p, read from a memory map of its shard."""

    def __init__(self, dataset: PreparedDataset, split: str, index: dict):
        self.dataset, self.split = dataset, split
        self.directory = dataset.path / SHARDS_DIR
        self.names = [s["name"] for s in index["shards"]]
        self.paths = index["path"]
        self.shard = np.asarray(index["shard"], dtype=np.int64)
        self.offset = np.asarray(index["offset"], dtype=np.int64)
        self.size = np.asarray(index["size"], dtype=np.int64)
        self.sha256 = index["sha256"]
        self._maps: dict[int, np.memmap] = {}

    @classmethod
    def open(cls, dataset: PreparedDataset, split: str, entries: list[tuple[str, int]]) -> "ShardSet | None":
        """The split's shards, verified, if the prepared folder has them; None for loose files."""
        directory = dataset.path / SHARDS_DIR
        index_file = directory / f"{split}.json"
        if not index_file.is_file():
            return None
        index_stat = _stat(index_file)  # before reading: an index replaced meanwhile is checked again next time
        try:
            index = json.loads(index_file.read_text())
            fields_ok = index["format"] == FORMAT and all(
                len(index[f]) == len(index["path"]) for f in ("shard", "offset", "size", "sha256"))
            shards = cls(dataset, split, index)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
                OverflowError) as error:
            raise PlanktonioError(f"{index_file}: not a valid shard index ({error}); {REPACK}") from None
        for name in shards.names:
            # The index says which files to read: only pack's own tars in shards/, never a path
            # elsewhere (an absolute path, "..", a sub-folder), whatever the index was edited to say.
            if not (isinstance(name, str) and SHARD_NAME.fullmatch(name)):
                raise PlanktonioError(f"{index_file}: shard {name!r} is not a file name in {directory} "
                                      f"(pack names them like {split}-00000.tar); {REPACK}")
        in_range = not len(shards.shard) or (0 <= shards.shard.min() and shards.shard.max() < len(shards.names)
                                             and shards.offset.min() >= 0 and shards.size.min() >= 0)
        if not (fields_ok and in_range):
            raise PlanktonioError(f"{index_file}: not a valid shard index; {REPACK}")
        if index["path"] != [path for path, _ in entries]:
            raise PlanktonioError(f"{index_file}: its samples are not those of {dataset.manifest(split)} "
                                  f"(prepared again since the pack?); {REPACK}")
        shards.verify(index_stat, everything=False)
        return shards

    def verify(self, index_stat: dict, everything: bool = True) -> list[str]:
        """Check every sample of the shards against the index; the names of the shards read.

        A missing, truncated or corrupt shard is an error naming it and the
        sample. everything=False reads only the shards whose size or mtime
        differ from the stamp of their last full check (all of them when the
        stamp is missing, damaged or of another index); the others cost a stat.
        Then the stamp is written anew.
        """
        stamp_file = self.directory / f"{self.split}.verified.json"
        stamped = {} if everything else _read_stamp(stamp_file, index_stat)
        now, read = {}, []
        for number, name in enumerate(self.names):
            path = self.directory / name
            if not path.is_file():
                raise PlanktonioError(f"{path}: shard missing; {REPACK}")
            now[name] = _stat(path)  # before reading it: a change during the check shows at the next open
            if stamped.get(name) == now[name]:
                continue
            mine = np.flatnonzero(self.shard == number)
            record = {"samples": {"position": mine.tolist(), "offset": self.offset[mine].tolist(),
                                  "size": self.size[mine].tolist(), "sha256": [self.sha256[p] for p in mine]}}
            _verify_shard(path, record, self.paths)
            read.append(name)
        if read:
            _write_stamp(stamp_file, {"format": STAMP_FORMAT, "index": index_stat, "shards": now})
        return read

    def describe(self, position: int) -> str:
        """Where a sample lives, for messages: shard file and key."""
        return f"{self.directory / self.names[self.shard[position]]}:{key_of(position)} ({self.paths[position]})"

    def read(self, position: int) -> np.ndarray:
        """The encoded image of manifest position p: uint8 bytes, a view of the shard's memory map."""
        number = int(self.shard[position])
        if number not in self._maps:
            self._maps[number] = np.memmap(self.directory / self.names[number], dtype=np.uint8, mode="r")
        start = int(self.offset[position])
        return np.asarray(self._maps[number][start:start + int(self.size[position])])

    def __getstate__(self):
        # Worker processes open their own maps rather than receive (a copy of) the parent's.
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

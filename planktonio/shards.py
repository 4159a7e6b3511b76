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
    PREPARED/shards/train.npz             the split's index, in manifest order, as numpy
                                          columns: each sample's shard, offset and size of its
                                          image bytes, sha256; the shards' names; the sha256 of
                                          the manifest it was packed from
    PREPARED/shards/train.verified.json   the stamp of the last full check: each shard's size
                                          and mtime_ns when its every sample matched the index

Which samples go into which shard follows from the manifest and the file
sizes alone, so a rerun of an interrupted pack finds the same shards and
keeps the complete ones.

Reading (`ShardSet`): the image bytes at the sample's offset, sliced from a
memory map of the shard. The index may name only plain file names inside
PREPARED/shards/. Every sample is checked in full (truncation, then sha256)
once, by pack, and again by `ShardSet.open` for a shard whose size or
modification time differs from its stamp; otherwise open compares the stamp
with a stat per shard, because hashing a split before every run costs
minutes at ImageNet scale. The trust is the one make_loader gives loose
files (dataset.check_files_unchanged). docs/data.md ("Packed shards").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import SPLITS, PreparedDataset
from .errors import PlanktonioError
from .files import atomic_file, write_arrays, write_atomic
from .shard_reading import MemberMaps

SHARDS_DIR = "shards"
FORMAT = 2  # 2: the split's index in numpy columns (.npz), not JSON
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


def write_shard(path: Path, dataset: PreparedDataset, split: str, positions: list[int]) -> dict:
    """Write one shard (via a temporary file and a rename) and return its record: samples with offsets."""
    index = dataset.index(split)
    samples = {"position": [], "offset": [], "size": [], "sha256": []}
    with atomic_file(path, "wb", durable=True) as raw, \
            tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for position in positions:
            relpath, label = index.path(position), int(index.label[position])
            data = (dataset.root / relpath).read_bytes()
            info = _tar_info(image_member(position, relpath), len(data))
            offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
            tar.addfile(info, io.BytesIO(data))
            cls = str(label).encode()
            tar.addfile(_tar_info(f"{key_of(position)}.cls", len(cls)), io.BytesIO(cls))
            for field, value in (("position", position), ("offset", offset), ("size", len(data)),
                                 ("sha256", hashlib.sha256(data).hexdigest())):
                samples[field].append(value)
    return {"name": path.name, "bytes": path.stat().st_size, "samples": samples}


def _record_if_complete(path: Path, positions: list[int], sizes: np.ndarray) -> dict | None:
    """A shard from an earlier run, if it is complete and intact for these positions; else None (redo it)."""
    record_file = path.with_suffix(".json")
    if not (path.is_file() and record_file.is_file()):
        return None
    try:
        record = json.loads(record_file.read_text())
        samples = record["samples"]
        if samples["position"] != positions or samples["size"] != sizes[positions].tolist():
            return None
        _verify_shard(path, np.asarray(samples["position"]), np.asarray(samples["offset"]),
                      np.asarray(samples["size"]), _digests(samples["sha256"]), lambda p: f"sample {key_of(p)}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, PlanktonioError):
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
        index = dataset.index(split)
        dataset.check_files_unchanged(split)  # so the recorded sizes are the files' sizes now
        # No index until every shard is there: loaders read the loose files meanwhile, not half a pack.
        (out / f"{split}.npz").unlink(missing_ok=True)
        records, reused = [], 0
        for number, positions in enumerate(plan_shards(index.bytes.tolist(), shard_size)):
            path = out / f"{split}-{number:05d}.tar"
            record = _record_if_complete(path, positions, index.bytes)
            if record is None:
                record = write_shard(path, dataset, split, positions)
                write_atomic(path.with_suffix(".json"), json.dumps(record))
            else:
                reused += 1
            records.append(record)
        _split_index(index, records).write(out / f"{split}.npz")
        # Read back every member before saying it is done; the stamp spares later opens doing it again.
        ShardSet.open(dataset, split, everything=True)
        results.append(PackResult(split, len(index), len(records), reused, sum(r["bytes"] for r in records)))
    return results


def _digests(hexes: list[str]) -> np.ndarray:
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(-1, 32)


@dataclass(frozen=True)
class ShardIndex:
    """A split's samples in its shards, in manifest order, as columns (`PREPARED/shards/<split>.npz`)."""

    names: list[str]           # the shards' file names
    shard: np.ndarray          # int32: each sample's shard
    offset: np.ndarray         # int64: where its image bytes start in the shard
    size: np.ndarray           # int64: how many
    sha256: np.ndarray         # N x 32 uint8
    manifest_sha256: bytes     # of the manifest it was packed from

    def checksum(self) -> str:
        digest = hashlib.sha256(f"planktonio shards {FORMAT}".encode() + json.dumps(self.names).encode())
        for array in (self.shard, self.offset, self.size, self.sha256):
            digest.update(np.ascontiguousarray(array).data)
        digest.update(self.manifest_sha256)
        return digest.hexdigest()

    def write(self, path: Path) -> None:
        write_arrays(path, {"names": np.frombuffer(json.dumps(self.names).encode(), np.uint8), "shard": self.shard,
                            "offset": self.offset, "size": self.size, "sha256": self.sha256,
                            "manifest_sha256": np.frombuffer(self.manifest_sha256, np.uint8),
                            "format": np.asarray(FORMAT),
                            "checksum": np.frombuffer(bytes.fromhex(self.checksum()), np.uint8)})

    @classmethod
    def read(cls, path: Path) -> "ShardIndex":
        try:
            with np.load(path, allow_pickle=False) as arrays:
                if int(arrays["format"]) != FORMAT:
                    raise ValueError(f"format {int(arrays['format'])}, this planktonio reads {FORMAT}")
                index = cls(json.loads(arrays["names"].tobytes()), arrays["shard"], arrays["offset"], arrays["size"],
                            arrays["sha256"], arrays["manifest_sha256"].tobytes())
                recorded = arrays["checksum"].tobytes().hex()
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as error:
            raise PlanktonioError(f"{path}: not a valid shard index ({error}); {REPACK}") from None
        if recorded != index.checksum():
            raise PlanktonioError(f"{path}: its content does not match its checksum; {REPACK}")
        return index


def _split_index(index, records: list[dict]) -> ShardIndex:
    shard = np.concatenate([np.full(len(r["samples"]["position"]), n, np.int32) for n, r in enumerate(records)]) \
        if records else np.zeros(0, np.int32)
    column = {field: np.concatenate([np.asarray(r["samples"][field], np.int64) for r in records]) if records else
              np.zeros(0, np.int64) for field in ("offset", "size")}
    digests = _digests([h for r in records for h in r["samples"]["sha256"]])
    return ShardIndex([r["name"] for r in records], shard, column["offset"], column["size"], digests,
                      index.manifest_sha256)


# ---------------------------------------------------------------- reading


def _verify_shard(path: Path, positions: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, digests: np.ndarray,
                  describe) -> None:
    """Every sample of one shard: present in full (else truncated) and with its sha256 (else corrupt)."""
    actual = path.stat().st_size
    with open(path, "rb") as shard:
        for position, offset, size, digest in zip(positions.tolist(), offsets.tolist(), sizes.tolist(), digests):
            if offset + size > actual:
                raise PlanktonioError(f"{path}: truncated ({actual} bytes): {describe(position)} needs bytes "
                                      f"{offset}-{offset + size}; {REPACK}")
            shard.seek(offset)
            if hashlib.sha256(shard.read(size)).digest() != digest.tobytes():
                raise PlanktonioError(f"{path}: {describe(position)} at offset {offset} fails its sha256 check "
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


class ShardSet(MemberMaps):
    """One split's shards: the image bytes of manifest position p, read from a memory map of its shard."""

    def __init__(self, dataset: PreparedDataset, split: str, index: ShardIndex):
        super().__init__(dataset.path / SHARDS_DIR, index.names, index.shard, index.offset, index.size)
        self.dataset, self.split, self.sha256 = dataset, split, index.sha256

    @classmethod
    def open(cls, dataset: PreparedDataset, split: str, everything: bool = False) -> "ShardSet | None":
        """The split's shards, verified, if the prepared folder has them; None for loose files."""
        directory = dataset.path / SHARDS_DIR
        index_file = directory / f"{split}.npz"
        if not index_file.is_file():
            if (directory / f"{split}.json").is_file():  # packed by an older planktonio (a JSON index)
                raise PlanktonioError(f"{directory / f'{split}.json'}: shards packed by an older planktonio; "
                                      f"{REPACK}")
            return None
        index_stat = _stat(index_file)  # before reading: an index replaced meanwhile is checked again next time
        index = ShardIndex.read(index_file)
        for name in index.names:
            # The index says which files to read: only pack's own tars in shards/, never a path
            # elsewhere (an absolute path, "..", a sub-folder), whatever the index was edited to say.
            if not (isinstance(name, str) and SHARD_NAME.fullmatch(name)):
                raise PlanktonioError(f"{index_file}: shard {name!r} is not a file name in {directory} "
                                      f"(pack names them like {split}-00000.tar); {REPACK}")
        n = len(index.shard)
        fields_ok = all(len(a) == n for a in (index.offset, index.size, index.sha256)) and \
            index.sha256.shape == (n, 32)
        in_range = not n or (0 <= index.shard.min() and index.shard.max() < len(index.names)
                             and index.offset.min() >= 0 and index.size.min() >= 0)
        if not (fields_ok and in_range):
            raise PlanktonioError(f"{index_file}: not a valid shard index; {REPACK}")
        if index.manifest_sha256 != dataset.index(split).manifest_sha256 or n != len(dataset.index(split)):
            raise PlanktonioError(f"{index_file}: its samples are not those of {dataset.manifest(split)} "
                                  f"(prepared again since the pack?); {REPACK}")
        shards = cls(dataset, split, index)
        shards.verify(index_stat, everything=everything)
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
        order = np.argsort(self.shard, kind="stable")  # the samples of each shard, found without a scan per shard
        bounds = np.searchsorted(self.shard[order], np.arange(len(self.names) + 1))
        for number, name in enumerate(self.names):
            path = self.directory / name
            if not path.is_file():
                raise PlanktonioError(f"{path}: shard missing; {REPACK}")
            now[name] = _stat(path)  # before reading it: a change during the check shows at the next open
            if stamped.get(name) == now[name]:
                continue
            mine = order[bounds[number]:bounds[number + 1]]
            _verify_shard(path, mine, self.offset[mine], self.size[mine], self.sha256[mine],
                          lambda p: f"sample {key_of(p)} ({self.dataset.index(self.split).path(p)})")
            read.append(name)
        if read:
            _write_stamp(stamp_file, {"format": STAMP_FORMAT, "index": index_stat, "shards": now})
        return read

    def describe(self, position: int) -> str:
        """Where a sample lives, for messages: shard file and key."""
        return (f"{self.directory / self.names[self.shard[position]]}:{key_of(position)} "
                f"({self.dataset.index(self.split).path(position)})")

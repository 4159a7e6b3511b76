"""Where a cache's bytes live: one budget per process and device for every cache, in bytes.

Two caches keep large stores for a run's life: the decoded-image cache
(loaders/cache_loader.py: uint8 images) and the feature cache
(train/feature_cache.py: a frozen prefix's activations). Both place their
bytes here, so that together they stay within one budget:

- `Budget.of(device)`: what the process's caches may keep on one device. On a
  GPU, half its free memory when first asked (not its total: the model, other
  processes and DALI's pools are there already); in host memory ("cpu"), half
  the memory available when first asked, counted once per node: the node's
  available memory, capped by the job's memory cgroup (Slurm confines a job
  to what it asked for, and psutil does not see that limit), divided by the
  ranks on the node (`host_memory`). One per process and device, shared
  by both caches, so that the two together cannot take all of a GPU.
- a cache's own option (the cache backend's `budget_bytes`, the training
  config's `feature_cache_budget_bytes`) caps what that kind of cache takes on
  the device, within the budget; it never raises the budget.
- `place(...)`: the device when its budget takes the bytes, else host memory
  when the caller allows it (pinned on a GPU host: its per-batch copy is
  asynchronous) and the host budget takes them, else nothing. What is placed
  is given back with `Reservation.release()`, or when it is garbage collected.
- `Rows.in_file`: rows in a memory-mapped file on disk, for a store that no
  memory budget takes (the feature cache at millions of images): the kernel
  keeps what fits of it in its page cache and reads the rest from disk.
- `allocate_chunks`: host memory in pieces of at most CHUNK_BYTES, because
  torch's pinned allocator rounds every allocation up to a power of two
  (PowerOf2Ceil in ATen's CachingHostAllocator.h, no setting turns it off): a
  9 GB store in one piece would pin 16 GB.

docs/loaders.md ("The cache's memory") and docs/feature-cache.md.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from .declared import shown_size
from .errors import DiskError

SHARE = 0.5            # default budget: this share of a GPU's free memory, or of the host's available memory
CHUNK_BYTES = 1 << 28  # host stores are allocated in chunks of 256 MiB (a power of two: see above)
HOST = torch.device("cpu")


@dataclass
class Budget:
    """The bytes a process's caches may keep together on one device."""

    device: str
    limit: int
    reserved: dict[str, int] = field(default_factory=dict)  # by kind of cache
    said: str = ""  # how the limit was found, for the log (host memory)

    _budgets = {}  # one per process and device: {device: Budget}

    @classmethod
    def of(cls, device: torch.device) -> "Budget":
        key = str(device if device.type != "cuda" or device.index is not None
                  else torch.device("cuda", torch.cuda.current_device()))
        if key not in cls._budgets:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(torch.device(key))
                cls._budgets[key] = cls(key, int(free * SHARE))
            else:
                host = host_memory()
                cls._budgets[key] = cls(key, host.budget, said=host.describe())
        return cls._budgets[key]

    @property
    def used(self) -> int:
        return sum(self.reserved.values())

    @property
    def left(self) -> int:
        return self.limit - self.used

    def fits(self, nbytes: int, kind: str, cap: int | None = None) -> bool:
        """Whether nbytes more of `kind` fit the budget, and `kind`'s own cap if it has one."""
        mine = self.reserved.get(kind, 0)
        return nbytes <= self.left and (cap is None or mine + nbytes <= cap)

    def reserve(self, nbytes: int, kind: str) -> None:
        self.reserved[kind] = self.reserved.get(kind, 0) + nbytes

    def release(self, nbytes: int, kind: str) -> None:
        self.reserved[kind] = self.reserved.get(kind, 0) - nbytes


class Reservation:
    """Bytes of a cache for `asked` placed there (`where`: "device") or in host memory ("host"); given back
    once."""

    def __init__(self, where: str, asked: torch.device, nbytes: int, kind: str):
        self.where, self.asked, self.nbytes, self.kind = where, asked, nbytes, kind
        self.device = asked if where == "device" else HOST  # where the bytes are
        budget = Budget.of(self.device)
        # A kind's cap counts what it keeps on its device; past it, in host memory, it counts apart
        # (on a CPU in the same budget: the same memory).
        key = kind if where == "device" else f"{kind} past its cap"
        budget.reserve(nbytes, key)
        self._release = weakref.finalize(self, budget.release, nbytes, key)
        self.placement = str(self.device)  # for the log and the summary

    @property
    def pinned(self) -> bool:
        """Host memory for a GPU: page-locked, so that each batch's copy is asynchronous."""
        return self.where == "host" and self.asked.type == "cuda"

    def release(self) -> None:
        self._release()


def place(nbytes: int, device: torch.device, kind: str, cap: int | None = None,
          host: bool = True) -> Reservation | None:
    """Where nbytes of a `kind` of cache go: on `device` within its budget (and `cap`, the cache's own option),
    else in host memory if `host` and the host's budget takes them (on a CPU the device is host memory), else
    None. The caller says what None means (a one-line error with the sizes, or no cache)."""
    if Budget.of(device).fits(nbytes, kind, cap):
        return Reservation("device", device, nbytes, kind)
    # (on a CPU, host memory is the device's own: past the cap, the same memory read the way a GPU's
    # host placement reads it, which keeps that path tested on machines without a GPU)
    if host and Budget.of(HOST).fits(nbytes, kind):
        return Reservation("host", device, nbytes, kind)
    return None


def describe(device: torch.device, kind: str, cap: int | None) -> str:
    """The budget a placement was refused by, in words, for an error message."""
    budget = Budget.of(device)
    text = (f"{shown_size(budget.left)} left of the process's {shown_size(budget.limit)} cache budget on "
            f"{budget.device}")
    if cap is not None:
        text += f" ({kind}: at most {shown_size(cap)}, {shown_size(budget.reserved.get(kind, 0))} taken)"
    return text


# ---------------------------------------------------------------- host memory, once per node

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # cgroup v1 says "no limit" with a number near 2**63 (v2 says "max")
# (limit, usage, page cache the kernel can drop) files of cgroup v2 and v1
_CGROUP_FILES = {"v2": ("memory.max", "memory.current", "inactive_file"),
                 "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


@dataclass(frozen=True)
class HostMemory:
    """What one rank's caches may keep in host memory: half of what the node has available, within the job's
    memory cgroup, divided by the ranks on the node."""

    available: int          # the node's available memory (psutil: blind to cgroups)
    room: int | None        # what the job's tightest cgroup limit leaves (None: no limit)
    limit: int | None       # that limit
    cgroup: str             # where it was read
    ranks: int              # ranks on this node

    @property
    def usable(self) -> int:
        return self.available if self.room is None else min(self.available, self.room)

    @property
    def budget(self) -> int:
        return int(self.usable * SHARE) // self.ranks

    def describe(self) -> str:
        text = f"{self.budget / 2**30:.1f} GiB per rank: half of {self.usable / 2**30:.1f} GiB available"
        if self.room is not None and self.room <= self.available:
            text += f" within the job's memory limit ({self.limit / 2**30:.1f} GiB, {self.cgroup})"
        return text + (f", over {self.ranks} ranks on this node" if self.ranks > 1 else "")


def ranks_on_node(environ=os.environ) -> int:
    """This node's ranks: torchrun's LOCAL_WORLD_SIZE, else srun's tasks on this node
    (SLURM_STEP_TASKS_PER_NODE, e.g. "4(x2),3", at SLURM_NODEID), else 1."""
    if environ.get("LOCAL_WORLD_SIZE"):
        return max(1, int(environ["LOCAL_WORLD_SIZE"]))
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE")
    if not per_node:
        return 1
    counts = []
    for part in per_node.split(","):
        tasks, _, repeat = part.partition("(x")
        counts += [int(tasks)] * int(repeat.rstrip(")") or 1)
    node = int(environ.get("SLURM_NODEID", 0))
    return max(1, counts[node] if node < len(counts) else counts[-1])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _stat(path: Path, key: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.split()[:1] == [key]), 0)


def cgroup_room(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> tuple[int, int, str] | None:
    """(room, limit, folder) of the tightest memory limit over this process's cgroups and their parents
    (v2 memory.max, v1 memory.limit_in_bytes), room being the limit less what the cgroup uses, page cache
    it can drop excepted; None where no limit is set."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    tightest = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, files = root, _CGROUP_FILES["v2"]
        elif "memory" in controllers.split(","):
            base, files = root / "memory", _CGROUP_FILES["v1"]
        else:
            continue
        folder = base / path.strip("/")
        for where in [folder, *folder.parents]:  # a container's own cgroup may be its namespace's root
            limit = _read_int(where / files[0])
            if limit is not None and limit < UNLIMITED:
                used = _read_int(where / files[1]) or 0
                room = max(0, limit - used + _stat(where / "memory.stat", files[2]))
                if tightest is None or room < tightest[0]:
                    tightest = (room, limit, str(where))
            if where == base:
                break
    return tightest


def host_memory(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT, environ=os.environ) -> HostMemory:
    room, limit, where = cgroup_room(proc_cgroup, root) or (None, None, "")
    return HostMemory(psutil.virtual_memory().available, room, limit, where, ranks_on_node(environ))


# ---------------------------------------------------------------- host memory in chunks


def plan_chunks(item_bytes: np.ndarray, chunk_bytes: int | None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Pack items, in order, into chunks of at most chunk_bytes (an item larger than that gets a chunk of its own).

    Returns each item's chunk and its byte offset there, and each chunk's size.
    chunk_bytes None: one chunk for everything.
    """
    chunk_of = np.zeros(len(item_bytes), dtype=np.int64)
    offset = np.zeros(len(item_bytes), dtype=np.int64)
    sizes, used = [], 0
    for i, size in enumerate(item_bytes.tolist()):
        if sizes and (chunk_bytes is None or used + size <= chunk_bytes):
            offset[i], used = used, used + size
        else:
            if sizes:
                sizes[-1] = used
            offset[i], used = 0, size
            sizes.append(0)
        chunk_of[i] = len(sizes) - 1
    if sizes:
        sizes[-1] = used
    return chunk_of, offset, sizes


def allocate_chunks(chunk_sizes: list[int], device: torch.device, pin: bool) -> list[torch.Tensor]:
    """Flat uint8 tensors of these sizes (pinned if asked: host memory for a GPU)."""
    return [torch.empty(n, dtype=torch.uint8, device=device, pin_memory=pin) for n in chunk_sizes]


class Rows:
    """`count` rows of `width` values of one dtype: on a device in one piece, or in host memory in chunks of
    whole rows of at most CHUNK_BYTES (pinned for a GPU). Written in place (`write`), read by gathering rows
    (`gather`) straight into the batch's own buffer: pinned on a GPU host, then copied without a host wait."""

    on_disk = False
    read_only = False  # a peer's store, mapped for reading (of_peer)
    descriptor = None  # the open file of a store in a file (in_file)

    def __init__(self, count: int, width: int, dtype: torch.dtype, device: torch.device, pin: bool = False):
        self.count, self.width, self.dtype, self.device, self.pin = count, width, dtype, device, pin
        row_bytes = width * torch.empty((), dtype=dtype).element_size()
        per_chunk = count if device.type != "cpu" else max(1, CHUNK_BYTES // row_bytes)
        self.rows_per_chunk = max(per_chunk, 1)
        sizes = [min(self.rows_per_chunk, count - start) for start in range(0, count, self.rows_per_chunk)] or [0]
        self.chunks = [raw.view(dtype).view(n, width) for raw, n in
                       zip(allocate_chunks([n * row_bytes for n in sizes], device, pin), sizes)]

    @classmethod
    def in_file(cls, count: int, width: int, dtype: torch.dtype, folder: Path, what: str) -> "Rows":
        """The rows in a memory-mapped file in `folder` (node-local disk), its blocks reserved up front (a full
        disk is a DiskError now, not a crash at a write into the mapping later). The file is unlinked as
        soon as it is made, and mapped through its descriptor (Linux's /proc/self/fd): the mapping keeps
        it while the process lives, and the disk gets its space back however the process ends, a SIGKILL
        included. The descriptor stays open while the rows live (`descriptor`): the other ranks of the node
        map the same file through it (`of_peer`), one store per node."""
        rows = cls(0, width, dtype, HOST)
        nbytes = count * width * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return rows
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix="rows-", suffix=".bin", dir=folder)
        except OSError as error:
            raise DiskError(f"{what} {folder}: cannot hold a store of {shown_size(nbytes)} "
                            f"({error.strerror or error})") from None
        try:
            os.unlink(name)  # before anything can stop the process: the open descriptor keeps the file
            os.posix_fallocate(handle, 0, nbytes)
            raw = torch.from_file(f"/proc/self/fd/{handle}", shared=True, size=nbytes, dtype=torch.uint8)
        except (OSError, RuntimeError) as error:  # torch reports a failed mmap as a RuntimeError
            full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            os.close(handle)
            raise DiskError(f"{what} {folder}: {'no room for' if full else 'cannot hold'} a store of "
                            f"{shown_size(nbytes)} ({getattr(error, 'strerror', None) or error})") from None
        weakref.finalize(rows, os.close, handle)
        rows.count, rows.rows_per_chunk, rows.on_disk, rows.descriptor = count, count, True, handle
        rows.chunks = [raw.view(dtype).view(count, width)]
        return rows

    @classmethod
    def of_peer(cls, pid: int, descriptor: int, count: int, width: int, dtype: torch.dtype) -> "Rows":
        """The rows another process of this node keeps in a file (`in_file`), mapped read-only through its
        descriptor (/proc/PID/fd: the file has no name), for reading only."""
        rows = cls(0, width, dtype, HOST)
        nbytes = count * width * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return rows
        handle = os.open(f"/proc/{pid}/fd/{descriptor}", os.O_RDONLY)
        try:
            mapped = mmap.mmap(handle, nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(handle)
        with warnings.catch_warnings():  # read-only by design: nothing writes into these rows here
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(mapped, dtype=torch.uint8)
        rows.count, rows.rows_per_chunk, rows.on_disk, rows.read_only = count, count, True, True
        rows.chunks = [raw.view(dtype).view(count, width)]
        return rows

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)

    def write(self, start: int, values: torch.Tensor) -> None:
        """Rows [start, start + len(values)) from `values` (any device: copied over; from a GPU into pinned
        memory without waiting: synchronise before reading them on the host)."""
        if self.read_only:  # (a write into a read-only mapping would be a segmentation fault)
            raise RuntimeError("internal error: a write into a peer's store, mapped for reading only")
        done = 0
        while done < len(values):
            chunk, at = divmod(start + done, self.rows_per_chunk)
            n = min(len(values) - done, self.rows_per_chunk - at)
            self.chunks[chunk][at:at + n].copy_(values[done:done + n], non_blocking=self.pin)
            done += n

    def host_chunks(self) -> list[torch.Tensor]:
        """The rows as host tensors, in order, without joining them (for saving: no second copy of a host
        store; a device store is copied over once)."""
        return [chunk if chunk.device.type == "cpu" else chunk.cpu() for chunk in self.chunks]

    def gather(self, index: torch.Tensor, to: torch.device) -> torch.Tensor:
        """The rows of `index` (a long tensor on the store's device) as one tensor on `to`."""
        if len(self.chunks) == 1 and self.device == to:
            return self.chunks[0].index_select(0, index)
        # Host rows for a GPU are gathered into a pinned buffer, then copied without a host wait.
        staged = self.device.type == "cpu" and to.type == "cuda"
        out = torch.empty((len(index), self.width), dtype=self.dtype, pin_memory=staged)
        if len(self.chunks) == 1:
            torch.index_select(self.chunks[0], 0, index, out=out)
        else:
            chunk_of = torch.div(index, self.rows_per_chunk, rounding_mode="floor")
            for chunk in torch.unique(chunk_of).tolist():
                rows = (chunk_of == chunk).nonzero().squeeze(1)
                out[rows] = self.chunks[chunk].index_select(0, index[rows] - chunk * self.rows_per_chunk)
        # The caching host allocator keeps a pinned buffer from reuse until its copy has completed.
        return out.to(to, non_blocking=staged)

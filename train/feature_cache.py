"""The feature cache: compute once what every epoch would compute identically, and train the rest on it.

The study's recipe freezes every AlexNet layer but a new last one and feeds
every split a fixed transform, so each epoch decodes the same JPEGs and runs
the same frozen layers on the same pixels. Here that part of the model, the
*prefix*, runs once per image (one pass over each split with the run's own
loader), its outputs are kept, and every epoch trains the rest on them: the
same run, not an approximation.

- `find_cut`: the prefix ends at the input of the first module that trains,
  is random in training mode (Dropout) or changes state in training (a
  BatchNorm that trains; a fully frozen one runs in eval mode,
  train/model.py set_train_mode). No known sequence of modules: no cut.
- The same numbers: the activations in the dtype the uncached step feeds the
  rest (under the same autocast), the batches in the loaders' order and
  shards (planktonio/loaders/sharding.py), the pass on a copy of the random
  state so that dropout draws what it would uncached. Random augmentation is
  cached only with `augment.train.period: K` (K views per image).
- The same inputs: checked once as every loader checks them (train/inputs.py)
  before the pass or the file is read; an image the pass could not read makes
  the run read images uncached, and no file is kept.
- Where it lives: placed by planktonio/memory.py (device, pinned host, else a
  memory-mapped file on node-local disk, one per node: its first rank
  writes it, the node's other ranks map it), and on disk under a
  fingerprint of everything that decides its values, so a resume or a
  sweep's runs compute it once; a file that does not match is recomputed.
- The pass writes into the store made for it: each rank computes its share
  (the evaluation sharding) and the ranks exchange each step's batches, so
  each holds the whole split and no more than a step's worth besides. A stop
  signal during the pass stops every rank at the next step, nothing written.

docs/feature-cache.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from planktonio import memory
from planktonio.declared import shown_size
from planktonio.errors import DiskError, PlanktonioError
from planktonio.files import check_folder_writable
from planktonio.loaders import LoaderSpec, sharding
from planktonio.loaders.base import entry_labels

from . import checkpoint_file, distributed
from .feature_batches import FeatureBatches, OnDisk, disk_free_bytes
from .model import forward_steps, set_train_mode
from .signals import StopFlag
from .step import autocast

KIND = "feature cache"  # what its bytes are called in the process's cache budget (planktonio/memory.py)
FORMAT = 2              # the file's layout: a file of another one is computed again


# ------------------------------------------------------------------ where to cut


def why_not_prefix(module: nn.Module, frozen_eval: bool) -> str | None:
    """Why a module cannot be computed once for every epoch (None: it can)."""
    if any(p.requires_grad for p in module.parameters()):
        return "trains"
    random = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if random and not frozen_eval:
        return f"is random in training ({type(random[0]).__name__})"
    return None


@dataclass
class Cut:
    prefix: nn.Sequential   # computed once per image
    rest: nn.Sequential     # what every step runs, on the kept activations
    names: list[str]        # the prefix's modules
    at: str                 # where the cut is, for the log


def find_cut(model: nn.Module, frozen_eval: bool = False) -> Cut | str:
    """The cut of `model` (its freezing applied), or why there is none."""
    steps = forward_steps(model)
    if steps is None:
        return f"{type(model).__name__}'s forward is not a sequence of modules this cache knows how to cut"
    index = next((i for i, (_, module) in enumerate(steps) if why_not_prefix(module, frozen_eval)), None)
    if index is None:
        return "every module is frozen: nothing would train"
    name, module = steps[index]
    reason = why_not_prefix(module, frozen_eval)
    if index == 0:
        return f"its first module, {name}, {reason}: nothing before it to compute once (model.freeze none?)"
    return Cut(nn.Sequential(*(m for _, m in steps[:index])), nn.Sequential(*(m for _, m in steps[index:])),
               [n for n, _ in steps[:index]], f"the input of {name} ({type(module).__name__}, which {reason})")


# ------------------------------------------------------------------ which images a file holds


def split_identity(spec: LoaderSpec) -> str:
    """The images whose activations a file holds, in order: the checksum of the split's index (its manifest's
    lines, each image's recorded bytes, date, size and content digest)."""
    return spec.dataset.index(spec.split).checksum()


# ------------------------------------------------------------------ the decision, the pass, the file


class FeatureCache:
    """Decides whether a run caches, computes or loads the activations, and makes the batches."""

    def __init__(self, executor, out: Path, log=print, stop_flag: StopFlag | None = None):
        self.ex, self.config, self.log = executor, executor.config, log
        self.stop_flag = stop_flag or StopFlag()
        self.cut: Cut | None = None
        self.reason = ""
        self.stores: dict[str, memory.Rows] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.report: dict = {"used": False}
        t = self.config.training
        self.folder = Path(t.feature_cache_dir) if t.feature_cache_dir else out / "feature-cache"

    # ------------------------------------------------------------ when

    def decide(self, specs: dict[str, LoaderSpec]) -> bool:
        """Whether this run caches the splits of `specs`; the reason either way is in self.reason."""
        mode = self.config.training.feature_cache
        if mode == "off":
            self.reason = "training.feature_cache is off"
            return False
        cut = find_cut(self.ex.model, self.config.model.frozen_mode == "eval")
        train = self.config.transform("train")
        why_not = None
        if isinstance(cut, str):
            why_not = f"no cut: {cut}"
        elif not train.deterministic and train.period is None:
            why_not = ("the training transform is random (crop or flip) and does not repeat: set "
                       "augment.train.period to K to keep K views")
        elif self.config.profile.enabled:
            why_not = "a traced run traces the whole model"
        if why_not is None:
            self.cut = cut
            self.counts = {split: len(spec.entries) for split, spec in specs.items()}
            why_not = self._place()
            # Every rank caches or none does (a rank alone in a pass of collectives would wait forever), and
            # in memory all or on disk all (a node's ranks share its store on disk): budgets and disks differ.
            refusing, on_disk = distributed.all_sum([float(why_not is not None),
                                                     float(isinstance(self.reservation, OnDisk))], self.ex.device)
            if 0 < on_disk < self.ex.ctx.world_size:  # (every rank sees the same sums)
                if why_not is None and not isinstance(self.reservation, OnDisk):
                    self.reservation.release()
                    why_not = self._place(in_memory=False)
                refusing = distributed.all_sum([float(why_not is not None)], self.ex.device)[0]
            if why_not is None and refusing:
                self.reservation.release()
                why_not = (f"{refusing:.0f} other rank(s) cannot keep the activations (over their memory budgets, "
                           f"and their training.feature_cache_dir without the room)")
            if why_not is None:
                self.reason = f"cut at {cut.at}"
                return True
        self.cut = None
        self.refuse_if_on(why_not)
        self.reason = why_not
        return False

    def refuse_if_on(self, why_not: str) -> None:
        if self.config.training.feature_cache == "on":
            raise PlanktonioError(f"training.feature_cache on: it cannot apply here: {why_not}; set it to auto "
                                  f"or off")

    def views(self) -> int:
        """Views kept of each training image: 1 for a deterministic transform, else the plans' period."""
        train = self.config.transform("train")
        return 1 if train.deterministic else train.period

    def _row_shape(self) -> tuple[int, torch.dtype]:
        """Values per image after the prefix, and their dtype (one image through it, on a copy of the
        random state, frozen BatchNorm untouched)."""
        size = self.config.transform("train").size
        probe = torch.zeros(1, 3, size, size, device=self.ex.device, dtype=self.ex.output.torch_dtype)
        set_train_mode(self.ex.model, self.config.model.frozen_mode)
        with torch.no_grad(), torch.random.fork_rng(devices=self._rng_devices()), \
                autocast(self.ex.device, self.ex.amp_dtype):
            out = self.cut.prefix(probe.contiguous(memory_format=self.ex.output.memory_format))
        return int(out[0].numel()), out.dtype

    def _place(self, in_memory: bool = True) -> str | None:
        """Reserve the stores' bytes (planktonio/memory.py), in memory if asked and a budget takes them, else
        on disk; None, or why they do not fit."""
        self.width, self.dtype = self._row_shape()
        per_image = self.width * torch.empty((), dtype=self.dtype).element_size()
        self.needed = per_image * sum(n * (self.views() if split == "train" else 1) for split, n in self.counts.items())
        device, cap = self.ex.device, self.config.training.feature_cache_budget_bytes
        self.reservation = memory.place(self.needed, device, KIND, cap, host=device.type == "cuda") if in_memory \
            else None
        if self.reservation is None:  # no memory budget takes them: a file on disk, if it has the room
            free = disk_free_bytes(self.folder)
            if free < self.needed:  # one store per node: its first rank writes it, the others map it
                return (f"the activations need {shown_size(self.needed)} ({self.width} values per image), "
                        f"over {memory.describe(device, KIND, cap)} "
                        f"(training.feature_cache_budget_bytes), and {self.folder} has {shown_size(free)} "
                        f"free (training.feature_cache_dir: node-local disk with room)")
            self.reservation = OnDisk(self.folder, self._ranks_on_this_node())
        return None

    def _node(self) -> list[tuple[int, int]]:
        """(rank, pid) of this node's ranks, the first first (one process: this one)."""
        ctx = self.ex.ctx
        mine = next((host for rank, host, _ in ctx.peers if rank == ctx.rank), None)
        return sorted((rank, pid) for rank, host, pid in ctx.peers if host == mine) or [(ctx.rank, os.getpid())]

    def _ranks_on_this_node(self) -> int:
        return len(self._node())

    @property
    def writes(self) -> bool:
        """Whether this rank writes its stores: in memory each rank its own; on disk the node's first rank
        alone, whose file the node's other ranks map for reading (one store per node, not one per rank)."""
        return not isinstance(self.reservation, OnDisk) or self._node()[0][0] == self.ex.ctx.rank

    # ------------------------------------------------------------ the one pass, or the file

    def fingerprint(self) -> str:
        """What the kept activations depend on, and nothing else (so a sweep's runs share them)."""
        train = self.config.transform("train")
        parts = {
            "prefix_weights": checkpoint_file.content_checksum(self.cut.prefix.state_dict()),
            "prefix_modules": repr(self.cut.prefix),
            "transforms": {"train": train.to_dict(), "eval": self.config.transform("eval").to_dict()},
            "data": self.ex.dataset.fingerprint(),
            "index": {split: self.ex.dataset.index(split).checksum() for split in self.counts},
            "input": [self.ex.output.dtype, self.ex.output.layout], "amp": str(self.ex.amp_dtype),
            "frozen_mode": self.config.model.frozen_mode, "views": self.views(),
            # the plans of a random transform depend on the seed; a fixed one's do not
            "seed": None if train.deterministic else self.config.training.seed,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def prepare(self, specs: dict[str, LoaderSpec]) -> bool:
        """Load the activations from their file, or compute them (in one sharded pass) and keep the file.
        False when the pass could not read an image: the run then reads images, as an uncached run."""
        started = time.perf_counter()
        fingerprint = self.fingerprint()
        path = self.folder / f"features-{fingerprint[:16]}.pt"
        identities = {split: split_identity(spec) for split, spec in specs.items()}
        self._allocate()
        source = self._load(path, fingerprint, identities)
        if source is not None:
            self._filled()
        else:
            writable = self._writable()
            self.log(f"feature cache: computing {', '.join(self.cut.names[-3:])} once per image "
                     f"({shown_size(self.needed)}, {self.views()} view(s) of each training image)")
            for split, spec in specs.items():
                if not self._compute(split, spec):
                    return self._give_up(f"an image of the {split} split could not be read in the pass (the "
                                         f"loader skipped it: its log says which)")
            if self.ex.device.type == "cuda":
                torch.cuda.synchronize(self.ex.device)  # the asynchronous copies into host memory are done
            self._filled()
            if writable:
                self._save(path, fingerprint, identities)
            # (the others wait on the store, not in a barrier that NCCL's watchdog would end: see first_rank_says)
            distributed.first_rank_says(None, f"writing the feature store {path}")
            source = "computed"
        for split, spec in specs.items():
            self.labels[split] = torch.as_tensor(entry_labels(spec.entries), device=self.ex.device)
        seconds = time.perf_counter() - started
        self.report = {"used": True, "cut": self.cut.at, "source": source, "file": str(path),
                       "bytes": sum(store.nbytes for store in self.stores.values()), "seconds": seconds,
                       "placement": self.reservation.placement, "views": self.views(),
                       "values_per_image": self.width, "dtype": str(self.dtype).removeprefix("torch.")}
        if isinstance(self.reservation, OnDisk) and not self.config.training.feature_cache_dir:
            self.log(f"feature cache: the activations are read from {self.folder} every epoch: set "
                     f"training.feature_cache_dir to node-local disk (Slurm's $TMPDIR), not a shared file system")
        self.log(f"feature cache: {source}: {self.width} values per image ({self.report['dtype']}), "
                 f"{shown_size(self.report['bytes'])} on {self.reservation.placement}, {seconds:.1f} s; each "
                 f"step runs the rest from {self.cut.at}")
        return True

    def _allocate(self) -> None:
        """The stores the pass (or the file) fills: every split's rows, where the reservation put them. On
        disk, the node's first rank makes the files and says their descriptors through the rendezvous
        store; the node's other ranks map them from it (/proc/PID/fd: the files have no name)."""
        rows = {split: count * (self.views() if split == "train" else 1) for split, count in self.counts.items()}
        if not isinstance(self.reservation, OnDisk):
            for split, count in rows.items():
                self.stores[split] = memory.Rows(count, self.width, self.dtype, self.reservation.device,
                                                 pin=self.reservation.pinned)
            return
        writer, pid = self._node()[0]
        key = f"planktonio/feature-store/{pid}"
        if self.writes:
            for split, count in rows.items():
                self.stores[split] = memory.Rows.in_file(count, self.width, self.dtype, self.folder,
                                                         "training.feature_cache_dir")
            if self.ex.ctx.distributed:
                distributed.publish(key, {split: store.descriptor for split, store in self.stores.items()})
            return
        descriptors = distributed.wait_for(key, "making this node's feature store", f"rank {writer}")
        for split, count in rows.items():
            self.stores[split] = memory.Rows.of_peer(pid, descriptors[split], count, self.width, self.dtype)

    def _filled(self) -> None:
        """On disk, the node's other ranks wait until its first rank has written every row."""
        if not isinstance(self.reservation, OnDisk) or not self.ex.ctx.distributed:
            return
        writer, pid = self._node()[0]
        if self.writes:
            distributed.publish(f"planktonio/feature-store/{pid}/filled", True)
        else:
            distributed.wait_for(f"planktonio/feature-store/{pid}/filled", "filling this node's feature store",
                                 f"rank {writer}")

    def _give_up(self, why: str) -> bool:
        self.stores.clear()
        self.reservation.release()
        self.refuse_if_on(why)
        self.reason = why
        self.log(f"feature cache off: {why}; the run reads images instead, as without the cache")
        return False

    def _writable(self) -> bool:
        """Whether the file can be kept (rank 0 writes it): checked before the pass, so a full or read-only
        disk costs one line, not the pass's work."""
        if not self.ex.ctx.is_main:
            return True
        try:
            check_folder_writable(self.folder, "training.feature_cache_dir")
        except DiskError as error:
            self.log(f"feature cache: not kept on disk ({error}); the activations are used from memory in this "
                     f"run only")
            return False
        return True

    def _rng_devices(self) -> list:
        return [self.ex.device] if self.ex.device.type == "cuda" else []

    @torch.no_grad()
    def _compute(self, split: str, spec: LoaderSpec) -> bool:
        """Fill the split's store with the prefix's activations, view after view. Each rank reads its
        contiguous share (the evaluation sharding) in batches; at each step the ranks exchange that step's
        batches (and whether any was short, or a signal asks to stop), and every rank writes every rank's
        batch into its store. False if a batch came back short (the loader skipped an image)."""
        ex, ctx = self.ex, self.ex.ctx
        count, batch = len(spec.entries), self.ex.eval_batch_size()
        views = self.views() if split == "train" else 1
        shares = [sharding.eval_shard_range(count, rank, ctx.world_size) for rank in range(ctx.world_size)]
        steps = max(math.ceil(len(share) / batch) for share in shares)
        pass_spec = dataclasses.replace(spec, train=False, batch_size=batch)  # every image once, in order
        store, mine = self.stores[split], shares[ctx.rank]
        set_train_mode(ex.model, self.config.model.frozen_mode)  # the modes the uncached step runs the prefix in
        loader = ex.loader_for(split, batch, False, pass_spec)
        try:
            with torch.random.fork_rng(devices=self._rng_devices()):  # the run's random numbers stay untouched
                for view in range(views):
                    loader.set_epoch(view)  # the plans of epoch `view` (the period makes them repeat)
                    batches = iter(loader)
                    for step in range(steps):
                        expected = max(0, min(batch, len(mine) - step * batch))
                        images = next(batches, None)[0] if expected else None
                        rows = None
                        if images is not None:
                            with autocast(ex.device, ex.amp_dtype):
                                rows = self.cut.prefix(images).flatten(1).to(self.dtype)
                        short, stop = False, False
                        for rank, got, planned, stopped, values in self._exchange(rows, expected, batch):
                            short, stop = short or got < planned, stop or stopped
                            if got and self.writes:
                                store.write(view * count + shares[rank].start + step * batch, values[:got])
                        if stop:  # on every rank at the same step: each saw every rank's flag
                            raise self.stop_flag.interrupted("the feature cache's pass")
                        if short:
                            return False
        finally:
            loader.close()
        return True

    def _exchange(self, rows: torch.Tensor | None, expected: int, batch: int):
        """(rank, rows it got, rows it planned, whether it was asked to stop, its rows) of every rank for this
        step: all-gathered under DDP (on the process group's device), this rank's own in one process."""
        got = 0 if rows is None else rows.shape[0]
        stopped = self.stop_flag.raised
        if not self.ex.ctx.distributed:
            return [(0, got, expected, stopped, rows)]
        device = distributed.collective_device(self.ex.ctx)
        statuses = distributed.all_gather(torch.tensor([got, expected, int(stopped)], dtype=torch.long,
                                                       device=device))
        padded = torch.zeros(batch, self.width, dtype=self.dtype, device=device)
        if got:
            padded[:got] = rows
        gathered = distributed.all_gather(padded)
        return [(rank, *map(int, status.tolist()), rows) for rank, (status, rows) in enumerate(zip(statuses, gathered))]

    # ------------------------------------------------------------ the file

    def _save(self, path: Path, fingerprint: str, identities: dict[str, str]) -> None:
        """Rank 0 keeps the stores in a file (written whole or not at all); a disk that cannot take it costs
        one line, and the run goes on from memory."""
        if not self.ex.ctx.is_main:
            return
        state = {"format": FORMAT, "fingerprint": fingerprint, "width": self.width, "dtype": str(self.dtype),
                 "splits": {split: {"count": self.counts[split], "views": self.stores[split].count // self.counts[split],
                                    "identity": identities[split], "rows": self.stores[split].host_chunks()}
                            for split in self.stores}}
        try:
            checkpoint_file.save_atomic(state, path)
        except DiskError as error:
            self.log(f"feature cache: not kept on disk ({error}); the activations are used from memory in this "
                     f"run only")

    def _load(self, path: Path, fingerprint: str, identities: dict[str, str]) -> str | None:
        """Fill the stores from the file if it holds exactly these activations; where they came from, or None."""
        if not path.is_file():
            return None
        try:
            state = checkpoint_file.load(path, mmap=True)
        except PlanktonioError as error:  # cut short or changed: recompute, never use it
            self.log(f"feature cache: {path} is unusable ({error}); computing it again")
            return None
        if state.get("fingerprint") != fingerprint:
            return None
        problem = self._mismatch(state, identities)
        if problem:
            self.log(f"feature cache: {path} holds {problem}; computing it again")
            return None
        for split, store in self.stores.items():
            start = 0
            for chunk in state["splits"][split]["rows"] if self.writes else ():
                store.write(start, chunk)
                start += len(chunk)
        return f"read from {path}"

    def _mismatch(self, state: dict, identities: dict[str, str]) -> str | None:
        """What in a file with the right fingerprint differs from what this run reads, or None."""
        if state.get("format") != FORMAT:
            return f"another format ({state.get('format')}, this planktonio writes {FORMAT})"
        if state.get("width") != self.width or state.get("dtype") != str(self.dtype):
            return f"rows of {state.get('width')} {state.get('dtype')} values, not {self.width} {self.dtype}"
        splits = state.get("splits", {})
        for split, store in self.stores.items():
            kept = splits.get(split)
            if kept is None:
                return f"no {split} split"
            rows = sum(len(chunk) for chunk in kept["rows"])
            if kept["identity"] != identities[split] or kept["count"] != self.counts[split] or rows != store.count:
                return (f"other images of the {split} split ({rows} rows of {kept['count']} images; this run reads "
                        f"{self.counts[split]})")
            if any(chunk.dim() != 2 or chunk.shape[1] != self.width for chunk in kept["rows"]):
                return f"rows of another shape in the {split} split"
        return None

    # ------------------------------------------------------------ batches

    def batches(self, split: str, batch_size: int, train: bool) -> FeatureBatches:
        ctx = self.ex.ctx
        return FeatureBatches(self.stores[split], self.counts[split], self.stores[split].count // self.counts[split],
                              self.labels[split], batch_size=batch_size, train=train, seed=self.config.training.seed,
                              shard_index=ctx.rank, shard_count=ctx.world_size, device=self.ex.device)

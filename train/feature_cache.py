"""The feature cache: compute once what every epoch would compute identically, and train the rest on it.

The study's recipe freezes every AlexNet layer but a new last one and feeds
every split a fixed transform (resize 256, centre crop 224): each of its
epochs decodes the same JPEGs and runs the same frozen convolutions on the
same pixels. Here that part of the model, the *prefix*, runs once per image
(in one pass over each split with the run's own loader backend, DALI's GPU
decoder on a GPU), its outputs are kept, and every epoch trains the rest of
the model on the kept activations. It is the same run, not an approximation:

- where to cut (`find_cut`): the prefix ends at the input of the first module
  that trains, or is random in training mode (Dropout), or changes state in
  training (a BatchNorm with trainable parameters; a fully frozen one runs
  in eval mode, train/model.py set_train_mode). AlexNet or VGG with
  all-but-head or features frozen: the 9,216 pooled features (the classifier
  starts with Dropout, so its two frozen Linear layers and their dropout
  still run every step); a ResNet with all-but-head: the input of `fc`;
  tiny-cnn: the input of its last Linear. A model whose forward is not a
  sequence of modules known here has no cut: the run goes on uncached;
- the same numbers: each image's activations in the dtype the uncached step
  feeds the rest (fp32, or the autocast dtype under AMP: computed under the
  same autocast), the batches in the order and shards of the loaders' rules
  (planktonio/loaders/sharding.py), the same random numbers for dropout (the
  prefix draws none, and the pass runs on a copy of the random state);
- the same inputs: the run's inputs are checked once, as every loader checks
  them (train/inputs.py: files unchanged since prepare, a full training
  batch, shards), before the pass or the file is read; an image the pass
  could not read (the loader skipped it) makes the run read images as an
  uncached run would, and no file is kept that would pass for the full set;
- random augmentation repeats only with `augment.train.period: K` (epoch e
  uses the plans of epoch e mod K): then K views of each training image are
  kept; without a period, random augmentation is never cached;
- where it lives: on the training device within the process's cache budget
  (planktonio/memory.py), else in host memory (pinned, in chunks, on a GPU
  host), each batch gathered there and copied without a host wait; where
  neither budget takes it (millions of images), in a memory-mapped file in
  `training.feature_cache_dir` (node-local disk: Slurm's $TMPDIR), each
  epoch's batches gathered a few ahead by a background reader, in the
  epoch's order; the same values, so the same run. And on
  disk in the run folder (or `training.feature_cache_dir`, which a sweep
  shares), named by a fingerprint of the prefix's weights and structure, the
  transforms, the data (class names, manifests, each split's index), the
  dtype and the views: a resume, or a sweep's runs that share the prefix,
  compute it once. The file says which images it holds (the checksum of
  each split's index: its paths, labels, recorded sizes, dates and content
  digests); one that does not
  match the run's, or whose content does not match its checksum (cut short,
  changed), is computed again; one that cannot be written (a full or
  read-only disk) leaves the activations used from memory, said in one line.
- the pass writes into the store made for it (no list of batches to join):
  each rank computes its share of every split (the evaluation sharding), and
  at every step the ranks exchange that step's batches, so that each holds
  the whole split and no more than a step's worth besides. A stop signal
  during the pass stops it at the next step, on every rank alike, with
  nothing written (signals.Interrupted).

`training.feature_cache`: auto (the default) caches where a cut exists, the
training transform is deterministic or periodic, and the cache fits its
budget, and says why not otherwise; on does the same or stops with the
reason; off never caches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from planktonio import memory
from planktonio.errors import DiskError, PlanktonioError
from planktonio.files import check_folder_writable
from planktonio.loaders import LoaderSpec, sharding
from planktonio.loaders.base import entry_labels

from . import checkpoint_file, distributed
from .model import forward_steps, set_train_mode
from .signals import StopFlag
from .step import autocast

KIND = "feature cache"  # what its bytes are called in the process's cache budget (planktonio/memory.py)
READ_AHEAD = 4          # batches a store on disk is read ahead of the step
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


# ------------------------------------------------------------------ the kept activations


class FeatureBatches:
    """Batches of kept activations in the order and shards in which the training or evaluation loader
    would read the images (the loaders' rules, sharding.py), with their labels: looks like a Loader."""

    backend = "feature cache"

    def __init__(self, store: memory.Rows, count: int, views: int, labels: torch.Tensor, *, batch_size: int,
                 train: bool, seed: int, shard_index: int, shard_count: int, device: torch.device):
        self.store, self.count, self.views, self.labels = store, count, views, labels  # rows: view v at v*count
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shard_index, self.shard_count, self.device = shard_index, shard_count, device
        self.epoch, self.skip_batches = 0, 0

    def __len__(self) -> int:
        if self.train:
            return sharding.train_batches(self.count, self.shard_count, self.batch_size)
        return sharding.eval_batches(self.count, self.shard_index, self.shard_count, self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def _order(self) -> torch.Tensor:
        if self.train:
            order = sharding.train_order(self.count, self.seed, self.epoch, self.shard_index, self.shard_count)
        else:
            order = sharding.eval_shard_range(self.count, self.shard_index, self.shard_count)
        return torch.as_tensor(list(order), dtype=torch.long)

    def __iter__(self):
        order = self._order()
        rows = order + (self.epoch % self.views) * self.count  # the epoch's view: its plans repeat with the period
        # The epoch's order goes to where the rows and the labels are once, not per batch: a cached epoch on
        # a GPU is a fraction of a second of small kernels, and a copy from pageable memory waits.
        rows, labels_order = rows.to(self.store.device), order.to(self.labels.device)

        def batch(index: int):
            taken = slice(index * self.batch_size, (index + 1) * self.batch_size)
            return self.store.gather(rows[taken], self.device), self.labels.index_select(0, labels_order[taken])
        indices = range(self.skip_batches, len(self))
        if not self.store.on_disk:
            yield from map(batch, indices)
        else:  # a reader thread gathers (reads from disk) the next batches while the step runs on this one
            reader = ThreadPoolExecutor(1, thread_name_prefix="feature-cache-reader")
            try:
                ahead = deque(reader.submit(batch, i) for i in indices[:READ_AHEAD])
                for i in indices[READ_AHEAD:]:
                    ahead.append(reader.submit(batch, i))
                    yield ahead.popleft().result()
                while ahead:
                    yield ahead.popleft().result()
            finally:  # an epoch left early (a stop signal): the batches read ahead are not waited for
                reader.shutdown(wait=True, cancel_futures=True)
        self.set_epoch(self.epoch + 1)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ a store on disk


class OnDisk:
    """Where the stores go when no memory budget takes them: memory-mapped files in `folder`
    (memory.Rows.in_file), in host memory's place; nothing reserved in a budget."""

    device, pinned = memory.HOST, False

    def __init__(self, folder: Path):
        self.folder = folder
        self.placement = f"disk ({folder}, memory-mapped)"

    def release(self) -> None:
        pass


def disk_free_bytes(folder: Path) -> int:
    """Free bytes where `folder` is (or would be made: its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


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
            # Every rank caches or none does (a rank alone in a pass of collectives would wait forever):
            # budgets and disks can differ between nodes.
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

    def _place(self) -> str | None:
        """Reserve the stores' bytes (planktonio/memory.py); None, or why they do not fit."""
        self.width, self.dtype = self._row_shape()
        per_image = self.width * torch.empty((), dtype=self.dtype).element_size()
        self.needed = per_image * sum(n * (self.views() if split == "train" else 1) for split, n in self.counts.items())
        device, cap = self.ex.device, self.config.training.feature_cache_budget_bytes
        self.reservation = memory.place(self.needed, device, KIND, cap, host=device.type == "cuda")
        if self.reservation is None:  # no memory budget takes them: a file on disk, if it has the room
            free, node = disk_free_bytes(self.folder), self._ranks_on_this_node()
            if free < self.needed * node:  # each rank on the node maps a store of its own there
                return (f"the activations need {self.needed / 2**20:.1f} MiB ({self.width} values per image)"
                        f"{f' for each of {node} ranks' if node > 1 else ''}, over {memory.describe(device, KIND, cap)} "
                        f"(training.feature_cache_budget_bytes), and {self.folder} has {free / 2**20:.1f} MiB "
                        f"free (training.feature_cache_dir: node-local disk with room)")
            self.reservation = OnDisk(self.folder)
        return None

    def _ranks_on_this_node(self) -> int:
        peers = self.ex.ctx.peers
        mine = next((host for rank, host, _ in peers if rank == self.ex.ctx.rank), None)
        return max(1, sum(1 for _, host, _ in peers if host == mine))

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
        if source is None:
            writable = self._writable()
            self.log(f"feature cache: computing {', '.join(self.cut.names[-3:])} once per image "
                     f"({self.needed / 2**20:.1f} MiB, {self.views()} view(s) of each training image)")
            for split, spec in specs.items():
                if not self._compute(split, spec):
                    return self._give_up(f"an image of the {split} split could not be read in the pass (the "
                                         f"loader skipped it: its log says which)")
            if self.ex.device.type == "cuda":
                torch.cuda.synchronize(self.ex.device)  # the asynchronous copies into host memory are done
            if writable:
                self._save(path, fingerprint, identities)
            distributed.barrier()
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
                 f"{self.report['bytes'] / 2**20:.1f} MiB on {self.reservation.placement}, {seconds:.1f} s; each "
                 f"step runs the rest from {self.cut.at}")
        return True

    def _allocate(self) -> None:
        """The stores the pass (or the file) fills: every split's rows, where the reservation put them."""
        device = self.reservation.device
        for split, count in self.counts.items():
            views = self.views() if split == "train" else 1
            if isinstance(self.reservation, OnDisk):
                self.stores[split] = memory.Rows.in_file(views * count, self.width, self.dtype, self.folder,
                                                         "training.feature_cache_dir")
            else:
                self.stores[split] = memory.Rows(views * count, self.width, self.dtype, device,
                                                 pin=self.reservation.pinned)

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
                            if got:
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
            for chunk in state["splits"][split]["rows"]:
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

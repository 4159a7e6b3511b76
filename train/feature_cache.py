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
- random augmentation repeats only with `augment.train.period: K` (epoch e
  uses the plans of epoch e mod K): then K views of each training image are
  kept; without a period, random augmentation is never cached;
- where it lives: on the training device within the budget, else in host
  memory (pinned on a GPU host) and copied per batch; and on disk in the run
  folder (or `training.feature_cache_dir`, which a sweep shares), named by a
  fingerprint of the prefix's weights and structure, the transforms, the
  data (class names, manifests, image sizes and dates), the dtype and the
  views: a resume, or a sweep's runs that share the prefix, compute it once.
  A file whose fingerprint differs is never read; one whose content does not
  match its checksum (cut short, changed) is recomputed.

`training.feature_cache`: auto (the default) caches where a cut exists, the
training transform is deterministic or periodic, and the cache fits its
budget, and says why not otherwise; on does the same or stops with the
reason; off never caches.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from planktonio import make_loader, memory
from planktonio.dataset import SPLITS
from planktonio.errors import PlanktonioError
from planktonio.loaders import sharding

from . import checkpoint, distributed
from .model import forward_steps, set_train_mode
from .step import autocast

KIND = "feature cache"  # what its bytes are called in the process's cache budget (planktonio/memory.py)


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
    for index, (name, module) in enumerate(steps):
        reason = why_not_prefix(module, frozen_eval)
        if reason:
            break
    else:
        return "every module is frozen: nothing would train"
    if index == 0:
        return f"its first module, {name}, {reason}: nothing before it to compute once (model.freeze none?)"
    return Cut(nn.Sequential(*(m for _, m in steps[:index])), nn.Sequential(*(m for _, m in steps[index:])),
               [n for n, _ in steps[:index]], f"the input of {name} ({type(module).__name__}, which {reason})")


# ------------------------------------------------------------------ the kept activations


class FeatureBatches:
    """Batches of kept activations in the order and shards in which the training or evaluation loader
    would read the images (the loaders' rules, sharding.py), with their labels: looks like a Loader."""

    backend = "feature cache"

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, train: bool, seed: int,
                 shard_index: int, shard_count: int, device: torch.device):
        self.features, self.labels = features, labels  # features: views x N x D (views > 1: periodic plans)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shard_index, self.shard_count, self.device = shard_index, shard_count, device
        self.epoch, self.skip_batches = 0, 0
        self.count = features.shape[1]

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
        order, view = self._order(), self.features[self.epoch % self.features.shape[0]]
        # The epoch's order is copied to where the activations and the labels are once, not per batch:
        # a cached epoch on a GPU is a fraction of a second of small kernels, and a copy from pageable
        # host memory makes the host wait.
        order_at_view, order_at_labels = order.to(view.device), order.to(self.labels.device)
        for index in range(self.skip_batches, len(self)):
            batch_slice = slice(index * self.batch_size, (index + 1) * self.batch_size)
            batch = view.index_select(0, order_at_view[batch_slice])
            if view.device != self.device:  # host memory: gathered there, the batch is copied over
                batch = (batch.pin_memory() if self.device.type == "cuda" else batch).to(self.device, non_blocking=True)
            yield batch, self.labels.index_select(0, order_at_labels[batch_slice])
        self.set_epoch(self.epoch + 1)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ the decision and the pass


class FeatureCache:
    """Decides whether a run caches, computes or loads the activations, and makes the batches."""

    def __init__(self, executor, out: Path, log=print):
        self.ex, self.config, self.log = executor, executor.config, log
        self.cut: Cut | None = None
        self.reason = ""
        self.features: dict[str, torch.Tensor] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self.report: dict = {"used": False}
        t = self.config.training
        self.folder = Path(t.feature_cache_dir) if t.feature_cache_dir else out / "feature-cache"

    # ------------------------------------------------------------ when

    def decide(self) -> bool:
        """Whether this run caches; the reason either way is in self.reason (and the log)."""
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
            fits, why_not = self._fits()
            if fits:
                self.reason = f"cut at {cut.at}"
                return True
        self.cut = None
        if mode == "on":
            raise PlanktonioError(f"training.feature_cache on: it cannot apply here: {why_not}; set it to auto "
                                  f"or off")
        self.reason = why_not
        return False

    def views(self) -> int:
        """Views kept of each training image: 1 for a deterministic transform, else the plans' period."""
        train = self.config.transform("train")
        return 1 if train.deterministic else train.period

    def _feature_size(self) -> tuple[int, torch.dtype]:
        size = self.config.transform("train").size
        probe = torch.zeros(1, 3, size, size, device=self.ex.device, dtype=self.ex.output.torch_dtype)
        set_train_mode(self.ex.model, self.config.model.frozen_mode)  # frozen BatchNorm: eval, untouched
        with torch.no_grad(), torch.random.fork_rng(devices=self._rng_devices()), \
                autocast(self.ex.device, self.ex.amp_dtype):
            out = self.cut.prefix(probe.contiguous(memory_format=self.ex.output.memory_format))
        return int(out[0].numel()), out.dtype

    def _fits(self) -> tuple[bool, str | None]:
        """Whether the activations fit the budget; self.placement says where they go."""
        width, dtype = self._feature_size()
        # the images of each split there is (a data set may have no test split), read once for the run
        self.counts = {split: len(self.ex.dataset.entries(split)) for split in SPLITS
                       if (self.ex.dataset.path / f"{split}.txt").is_file()}
        per_image = width * torch.empty((), dtype=dtype).element_size()
        self.needed = per_image * (self.views() * self.counts["train"] +
                                   sum(n for split, n in self.counts.items() if split != "train"))
        device, cap = self.ex.device, self.config.training.feature_cache_budget_bytes
        # On the device within the process's cache budget (planktonio/memory.py), else pinned host memory.
        self.reservation = memory.place(self.needed, device, KIND, cap, host=device.type == "cuda")
        if self.reservation is None:
            return False, (f"the activations need {self.needed / 2**20:.1f} MiB ({width} values per image), over "
                           f"{memory.describe(device, KIND, cap)} (training.feature_cache_budget_bytes)")
        self.placement = self.reservation.device
        return True, None

    # ------------------------------------------------------------ the one pass, or the file

    def fingerprint(self) -> str:
        """What the kept activations depend on, and nothing else (so a sweep's runs share them)."""
        train = self.config.transform("train")
        info = self.ex.dataset.path / "image_info.json"
        parts = {
            "prefix_weights": checkpoint.content_checksum(self.cut.prefix.state_dict()),
            "prefix_modules": repr(self.cut.prefix),
            "transforms": {"train": train.to_dict(), "eval": self.config.transform("eval").to_dict()},
            "data": self.ex.dataset.fingerprint(),
            "image_info": hashlib.sha256(info.read_bytes()).hexdigest() if info.is_file() else None,
            "input": [self.ex.output.dtype, self.ex.output.layout], "amp": str(self.ex.amp_dtype),
            "frozen_mode": self.config.model.frozen_mode, "views": self.views(),
            # the plans of a random transform depend on the seed; a fixed one's do not
            "seed": None if train.deterministic else self.config.training.seed,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def prepare(self) -> None:
        """Load the activations from their file, or compute them (in one sharded pass) and write the file."""
        started = time.perf_counter()
        fingerprint = self.fingerprint()
        path = self.folder / f"features-{fingerprint[:16]}.pt"
        stored = self._load(path, fingerprint)
        if stored is None:
            self.log(f"feature cache: computing {', '.join(self.cut.names[-3:])} once per image "
                     f"({self.needed / 2**20:.1f} MiB, {self.views()} view(s) of each training image)")
            stored = {split: self._compute(split) for split, count in self.counts.items() if count}
            if self.ex.ctx.is_main:
                self.folder.mkdir(parents=True, exist_ok=True)
                checkpoint.save_atomic({"fingerprint": fingerprint, "features": {k: v[0].cpu() for k, v in
                                                                                  stored.items()},
                                        "labels": {k: v[1].cpu() for k, v in stored.items()}}, path)
            distributed.barrier()
            source = "computed"
        else:
            source = f"read from {path}"
        for split, (features, labels) in stored.items():
            pin = self.reservation.pinned
            features = features.to(self.placement)
            self.features[split] = features.pin_memory() if pin else features
            self.labels[split] = labels.to(self.ex.device)
        seconds = time.perf_counter() - started
        nbytes = sum(f.numel() * f.element_size() for f in self.features.values())
        self.report = {"used": True, "cut": self.cut.at, "source": source, "file": str(path),
                       "bytes": nbytes, "seconds": seconds, "placement": str(self.placement),
                       "views": self.views(), "values_per_image": int(self.features["train"].shape[-1]),
                       "dtype": str(self.features["train"].dtype).removeprefix("torch.")}
        self.log(f"feature cache: {source}: {self.report['values_per_image']} values per image "
                 f"({self.report['dtype']}), {nbytes / 2**20:.1f} MiB on {self.placement}, {seconds:.1f} s; "
                 f"each step runs the rest from {self.cut.at}")

    def _load(self, path: Path, fingerprint: str) -> dict | None:
        if not path.is_file():
            return None
        try:
            state = checkpoint.load(path)
        except PlanktonioError as error:  # cut short or changed: recompute, never use it
            self.log(f"feature cache: {path} is unusable ({error}); computing it again")
            return None
        if state.get("fingerprint") != fingerprint:
            return None
        return {split: (state["features"][split], state["labels"][split]) for split in state["features"]}

    def _rng_devices(self) -> list:
        return [self.ex.device] if self.ex.device.type == "cuda" else []

    @torch.no_grad()
    def _compute(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """views x N x D activations of a whole split and its labels: each rank computes its contiguous
        share of the images (the evaluation sharding), then the shares are gathered."""
        ex, c = self.ex, self.config
        which = "train" if split == "train" else "eval"
        views = self.views() if split == "train" else 1
        set_train_mode(ex.model, c.model.frozen_mode)  # the modes the uncached step runs the prefix in
        loader = make_loader(c.loader.backend, ex.dataset, split, batch_size=c.loader.eval_batch_size or
                             c.loader.batch_size, transform=c.transform(which), output=ex.output, device=ex.device,
                             train=False, shard_index=ex.ctx.rank, shard_count=ex.ctx.world_size,
                             workers=c.loader.workers, threads=c.loader.threads, seed=c.training.seed,
                             options=c.loader.options)
        per_view, labels = [], []
        try:
            with torch.random.fork_rng(devices=self._rng_devices()):  # the run's random numbers stay untouched
                for view in range(views):
                    loader.set_epoch(view)  # the plans of epoch `view` (the period makes them repeat)
                    outputs = []
                    for images, batch_labels in loader:
                        with autocast(ex.device, ex.amp_dtype):
                            outputs.append(self.cut.prefix(images).to(self.placement))
                        if view == 0:
                            labels.append(batch_labels)
                    per_view.append(torch.cat(outputs) if outputs else torch.empty(0))
        finally:
            loader.close()
        mine = torch.stack(per_view)
        labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
        return _gather_shares(mine, labels.to(mine.device), ex.ctx, self.counts[split])

    # ------------------------------------------------------------ batches

    def batches(self, split: str, batch_size: int, train: bool) -> FeatureBatches:
        ctx = self.ex.ctx
        return FeatureBatches(self.features[split], self.labels[split], batch_size=batch_size, train=train,
                              seed=self.config.training.seed, shard_index=ctx.rank, shard_count=ctx.world_size,
                              device=self.ex.device)


def _gather_shares(mine: torch.Tensor, labels: torch.Tensor, ctx, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's contiguous share of a split, in manifest order, on every rank (one process: as is)."""
    if not ctx.distributed:
        return mine, labels
    views, _, width = mine.shape
    sizes = [len(sharding.eval_shard_range(total, r, ctx.world_size)) for r in range(ctx.world_size)]
    largest = max(sizes)
    # gloo gathers CPU tensors, NCCL cuda ones: the activations travel on the process group's device
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(views, largest, width, dtype=mine.dtype, device=device)
    padded[:, :mine.shape[1]] = mine.to(device)
    padded_labels = torch.full((largest,), -1, dtype=torch.long, device=device)
    padded_labels[:labels.shape[0]] = labels.to(device)
    shares = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    label_shares = [torch.empty_like(padded_labels) for _ in range(ctx.world_size)]
    dist.all_gather(shares, padded)
    dist.all_gather(label_shares, padded_labels)
    features = torch.cat([share[:, :n] for share, n in zip(shares, sizes)], dim=1).to(mine.device)
    return features, torch.cat([share[:n] for share, n in zip(label_shares, sizes)]).to(mine.device)


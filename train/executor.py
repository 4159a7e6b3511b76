"""What a run is made of before any optimisation: processes, device, precision, data set, model.

`Executor` builds them and runs the model forward (evaluation). `fit`
(train/loop.py) adds the optimizer, the training loader and the epochs on
top; `python -m train evaluate` and `python -m profiling trace` build only
what they use, so evaluating a run never needs its training split.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from planktonio import PreparedDataset
from planktonio.errors import PlanktonioError
from planktonio.loaders import BACKENDS, Loader, LoaderSpec, loader_spec, resolve_backend

from . import distributed, random_state
from .config import Config
from .metrics import EpochStats, RunningSums
from .model import build_model
from .step import AMP_DTYPES, autocast, loader_output, resolve_precision


def check_batch_fits(batch_size: int, size: int, output, device: torch.device, which: str) -> None:
    """Refuse, with the estimate, a batch whose images alone would take over half the memory the device has
    (a typo such as `size: 10000` would otherwise thrash a node for minutes before it fails); the model's
    activations come on top of this, so it is a lower bound of what a step needs."""
    batch_bytes = batch_size * 3 * size * size * torch.empty((), dtype=output.torch_dtype).element_size()
    if device.type == "cuda":
        room = torch.cuda.get_device_properties(device).total_memory
        where = f"the {torch.cuda.get_device_name(device)}'s {room / 2**30:.1f} GiB"
    else:
        room = psutil.virtual_memory().available
        where = f"the {room / 2**30:.1f} GiB of memory available on this machine"
    if batch_bytes > room / 2:
        raise PlanktonioError(f"augment.{which}.size {size} with batch size {batch_size}: one batch of images is "
                              f"{batch_bytes / 2**30:.1f} GiB ({output.dtype}), over half of {where}, before the "
                              f"model's own memory; lower the size or the batch size")


class Executor:
    """The model of a run on this rank's device, in its precision, over its data set (a context manager:
    closing it lets go of the DistributedDataParallel wrapper, which holds the process group)."""

    def __init__(self, config: Config, data: Path | PreparedDataset, ctx: distributed.Context):
        self.config, self.ctx, self.device = config, ctx, ctx.device
        t = config.training
        if self.device.type == "cuda":
            # Fixed-size batches: let cuDNN time its algorithms once and keep the fastest
            # (results then vary in the last bits between runs; resume is bitwise on CPUs only).
            torch.backends.cudnn.benchmark = True
        self.precision = resolve_precision(t.precision, self.device)
        self.amp_dtype = AMP_DTYPES[self.precision]
        self.output = loader_output(self.precision, self.device, t.channels_last)  # what loaders emit
        # (a prepared folder; or, for predict, a PreparedDataset made for unlabelled images: the classes)
        self.dataset = data if isinstance(data, PreparedDataset) else PreparedDataset.load(data)

        torch.manual_seed(t.seed)  # the same initial head on every rank (DDP also broadcasts it)
        m = config.model
        memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model = build_model(m.name, self.dataset.num_classes, m.weights, m.freeze).to(
            self.device, memory_format=memory_format)
        self._compiled: dict[int, torch.nn.Module] = {}
        self._ddp = None
        self.net = self.compiled(self.model)  # what evaluation runs by default
        random_state.seed_rank(t.seed, self.ctx.rank)  # from here on, each rank its own dropout masks

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the DDP wrapper (and of its compiled form): its Reducer holds the process group, which
        distributed.Session destroys after this (the order that cannot hang at exit). Dynamo's caches keep
        the compiled modules' guards and graphs, and through them the DDP wrapper: reset when anything was
        compiled."""
        self._ddp = None
        if self._compiled:
            self._compiled.clear()
            torch._dynamo.reset()
        self.net = self.model

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` torch.compile'd when training.compile is on (once per module), else itself."""
        if not self.config.training.compile:
            return module
        if id(module) not in self._compiled:
            self._compiled[id(module)] = torch.compile(module)
        return self._compiled[id(module)]

    def training_net(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the steps run (the model, or its part after a feature cache's cut): wrapped in
        DistributedDataParallel when there are several ranks, then compiled when training.compile is on
        (PyTorch's order: compile the DDP-wrapped module, so that its graph breaks at the buckets). The
        Executor is the wrapper's one owner."""
        if not self.ctx.distributed:
            return self.compiled(module)
        if self._ddp is None:
            self._ddp = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            distributed.holds_the_group(self._ddp)
        return self.compiled(self._ddp)

    def loader_spec(self, split: str, batch_size: int, train: bool, check_files: bool = True) -> LoaderSpec:
        """A split's loader settings for this run and rank, after every check a loader makes before reading
        (planktonio.loaders.loader_spec): files unchanged since prepare (check_files), a full training batch,
        shards."""
        c = self.config
        transform = c.transform("train" if train else "eval")
        check_batch_fits(batch_size, transform.size, self.output, self.device, "train" if train else "eval")
        return loader_spec(self.dataset, split, batch_size=batch_size, transform=transform, output=self.output,
                           device=self.device, train=train, shard_index=self.ctx.rank,
                           shard_count=self.ctx.world_size, workers=c.loader.workers, threads=c.loader.threads,
                           seed=c.training.seed, check_files=check_files)

    def loader_for(self, split: str, batch_size: int, train: bool, spec: LoaderSpec | None = None) -> Loader:
        """The run's backend over a split (on `spec`, when its checks were made already)."""
        c = self.config
        backend = BACKENDS[resolve_backend(c.loader.backend, self.device)]
        options = backend.parse_options(c.loader.options)
        return backend.build(spec or self.loader_spec(split, batch_size, train), options)

    def has_test_split(self) -> bool:
        """Whether the data set has test images (the best weights are tested on them at the end)."""
        return (self.dataset.path / "test.txt").is_file() and bool(self.dataset.entries("test"))

    def eval_batch_size(self) -> int:
        loader = self.config.loader
        return loader.eval_batch_size or loader.batch_size

    def eval_loader(self, split: str, spec: LoaderSpec | None = None) -> Loader:
        return self.loader_for(split, self.eval_batch_size(), False, spec)

    def forward(self, images: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return (self.net if net is None else net)(images)

    @torch.no_grad()
    def evaluate(self, loader, collect: bool = False, net: torch.nn.Module | None = None):
        """Loss, accuracy and top-5 over a whole split (every image once across ranks).

        collect: also return this rank's logits (float32) and labels, as CPU tensors.
        net: what to run on the batches (the model's part after a feature cache's cut; default the model).
        """
        self.model.eval()
        distributed.broadcast_buffers(self.model)
        sums, predictions, targets = RunningSums(self.device), [], []
        for images, labels in loader:
            logits = self.forward(images, net).float()
            sums.add(F.cross_entropy(logits, labels), logits, labels)
            if collect:
                predictions.append(logits)
                targets.append(labels)
        stats: EpochStats = sums.read().reduced(self.device)
        if collect:
            return stats, torch.cat(predictions).cpu(), torch.cat(targets).cpu()
        return stats

"""What a run is made of before any optimisation: processes, device, precision, data set, model.

`Executor` builds them and runs the model forward (evaluation). `fit`
(train/loop.py) adds the optimizer, the training loader and the epochs on
top; `python -m train evaluate` and `python -m profiling trace` build only
what they use, so evaluating a run never needs its training split.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from planktonio import PreparedDataset, make_loader

from . import checkpoint, distributed
from .config import Config
from .metrics import EpochStats, RunningSums
from .model import build_model
from .step import AMP_DTYPES, autocast, loader_output, resolve_precision


class Executor:
    """The model of a run on this rank's device, in its precision, over its data set (a context manager:
    closing it lets go of the DistributedDataParallel wrapper, which holds the process group)."""

    def __init__(self, config: Config, data: Path, ctx: distributed.Context):
        self.config, self.ctx, self.device = config, ctx, ctx.device
        t = config.training
        if self.device.type == "cuda":
            # Fixed-size batches: let cuDNN time its algorithms once and keep the fastest
            # (results then vary in the last bits between runs; resume is bitwise on CPUs only).
            torch.backends.cudnn.benchmark = True
        self.precision = resolve_precision(t.precision, self.device)
        self.amp_dtype = AMP_DTYPES[self.precision]
        self.output = loader_output(self.precision, self.device, t.channels_last)  # what loaders emit
        self.dataset = PreparedDataset.load(data)

        torch.manual_seed(t.seed)  # the same initial head on every rank (DDP also broadcasts it)
        m = config.model
        memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model = build_model(m.name, self.dataset.num_classes, m.weights, m.freeze).to(
            self.device, memory_format=memory_format)
        self.net = torch.compile(self.model) if t.compile else self.model
        checkpoint.seed_rank(t.seed, self.ctx.rank)  # from here on, each rank its own dropout masks
        self._ddp = None

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the DDP wrapper: its Reducer holds the process group, which distributed.Session
        destroys after this (the order that cannot hang at exit)."""
        self._ddp = None

    def training_net(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the steps run (the model, or its part after a feature cache's cut): wrapped in
        DistributedDataParallel when there are several ranks. The Executor is the wrapper's one owner."""
        if not self.ctx.distributed:
            return module
        if self._ddp is None:
            self._ddp = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            distributed.holds_the_group(self._ddp)
        return self._ddp

    def loader_for(self, split: str, batch_size: int, train: bool):
        c = self.config
        return make_loader(
            c.loader.backend, self.dataset, split, batch_size=batch_size,
            transform=c.transform("train" if train else "eval"), output=self.output, device=self.device,
            train=train, shard_index=self.ctx.rank, shard_count=self.ctx.world_size,
            workers=c.loader.workers, threads=c.loader.threads, seed=c.training.seed, options=c.loader.options)

    def eval_loader(self, split: str):
        loader = self.config.loader
        return self.loader_for(split, loader.eval_batch_size or loader.batch_size, False)

    def forward(self, images: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return (self.net if net is None else net)(images)

    @torch.no_grad()
    def evaluate(self, loader, collect: bool = False, net: torch.nn.Module | None = None):
        """Loss, accuracy and top-5 over a whole split (every image once across ranks).

        collect: also return this rank's predictions and labels (CPU tensors).
        net: what to run on the batches (the model's part after a feature cache's cut; default the model).
        """
        self.model.eval()
        distributed.broadcast_buffers(self.model)
        sums, predictions, targets = RunningSums(self.device), [], []
        for images, labels in loader:
            logits = self.forward(images, net).float()
            sums.add(F.cross_entropy(logits, labels), logits, labels)
            if collect:
                predictions.append(logits.argmax(dim=1))
                targets.append(labels)
        stats: EpochStats = sums.read().reduced(self.device)
        if collect:
            return stats, torch.cat(predictions).cpu(), torch.cat(targets).cpu()
        return stats

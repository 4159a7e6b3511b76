"""A run's model and evaluation transform over a catalog of images: batches in, results to the writer."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from planktonio import PreparedDataset
from planktonio.errors import PlanktonioError
from planktonio.files import check_folder_writable
from planktonio.loaders import (
    BACKENDS,
    LoaderSpec,
    reference_backend,
    resolve_backend,
    resolve_device,
    usable_count,
)
from planktonio.loaders.dali_loader import BrokenFile
from planktonio.unlabelled import Unit, discover, read_headers

from .. import calibration, checkpoint_file, distributed
from ..executor import Executor
from ..model import head_name
from ..signals import EXIT_INTERRUPTED, EXIT_OK, StopFlag
from ..step import autocast
from .options import FORMATS, UNITS, PredictOptions
from .settings import provenance, run_config
from .writer import Writer

# What Ctrl-C says: predict has no checkpoint, its finished units are what a stop keeps.
STOPPING = ("stopping after the batch under way (SIGINT): the units written are kept and the same command goes "
            "on from there; press Ctrl-C again to stop at once")
ABORTED = "stopped at once by a second Ctrl-C: the units written are kept, the one under way is done again"


@dataclass
class Timing:
    """Where a classify call's time went (printed, and read by `profiling predict`)."""

    images: int = 0
    header_seconds: float = 0.0   # the header scan that finds unreadable files before any decoding
    seconds: float = 0.0          # the whole call: headers, every batch, the last unit written


class Predictor:
    """A run's model and evaluation transform over a catalog of images.

    Built, it has checked the options and read the run, its checkpoint and
    the catalog (cheap); `with predictor:` puts the model on its device (and
    joins the one-process group the Executor expects); `classify(units)`
    predicts and writes them. `profiling predict` times its parts (`loader`,
    `forward`) on the same objects.
    """

    def __init__(self, options: PredictOptions):
        o = self.options = options
        self.run, self.out = Path(o.run), Path(o.out)
        self.config = run_config(self.run, o)
        if o.format not in FORMATS:
            raise PlanktonioError(f"--format {o.format}: one of {', '.join(FORMATS)}")
        if o.top_k < 1:
            raise PlanktonioError(f"--top-k {o.top_k}: at least 1")
        weights = self.run / f"{o.checkpoint}.pt"
        self.state = checkpoint_file.load(weights)
        self.classes = list(self.state["classes"])
        self.calibrated = calibration.read(self.run, self.classes, weights) if o.calibrated else None
        self.catalog = discover(o.images)  # nothing is created in OUT before the images are known
        if not len(self.catalog):
            raise PlanktonioError(f"--images {o.images}: holds no images; check the path")
        self.provenance = provenance(self.run, weights, self.classes, self.config, self.calibrated, o)
        self.executor: Executor | None = None
        self.timing = Timing()

    def __enter__(self) -> Predictor:
        t = self.config.training
        self._stack = contextlib.ExitStack()
        with self._stack as stack:
            self.stop_flag = stack.enter_context(StopFlag(STOPPING, ABORTED))
            ctx = stack.enter_context(distributed.Session(resolve_device(t.device), t.collective_timeout_s))
            dataset = PreparedDataset(self.out, self.catalog.root, tuple(self.classes))
            self.executor = stack.enter_context(Executor(self.config, dataset, ctx))
            self.executor.model.load_state_dict(self.state["model"])
            self.executor.model.eval()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self.executor = None
        self._stack.__exit__(*exc)

    def use_backend(self, name: str) -> str:
        """Load with another backend from now on (`profiling predict` takes turns); its resolved name."""
        self.config.loader.backend = name
        self.provenance["backend"] = name
        return resolve_backend(name, self.executor.device)

    def headers(self, positions: np.ndarray) -> tuple[dict, dict]:
        """Each image's (width, height) from its header, and the files no loader can read, with the reason."""
        widths, heights, rejected = read_headers(self.catalog, positions, usable_count(self.options.workers,
                                                                                        "header workers"))
        return {int(p): (int(w), int(h)) for p, w, h in zip(positions, widths, heights)}, rejected

    def loader(self, positions: list[int], sizes: dict, backend: str | None = None, batch_size: int | None = None):
        """A loader over these images: the evaluation transform, every image once, in order; each image's
        label is its catalog position, so the batches say which images they hold. The run's backend and
        batch size unless given."""
        executor, catalog = self.executor, self.catalog
        backend = BACKENDS[resolve_backend(backend or executor.config.loader.backend, executor.device)]
        c = executor.config
        workers = usable_count(c.loader.workers, "loader workers")
        spec = LoaderSpec(
            dataset=executor.dataset, split="predict",
            batch_size=batch_size or c.loader.eval_batch_size or c.loader.batch_size,
            transform=c.transform("eval"), output=executor.output, device=executor.device, train=False,
            shard_index=0, shard_count=1, workers=workers,
            threads=max(1, workers) if c.loader.threads is None else usable_count(c.loader.threads, "DALI threads"),
            seed=c.training.seed, entries=[(catalog.paths[p], p) for p in positions],
            widths=np.asarray([sizes[p][0] for p in positions]), heights=np.asarray([sizes[p][1] for p in positions]),
            shards=None if catalog.shards is None else _Subset(catalog.shards, positions))
        return backend.build(spec, backend.parse_options(c.loader.options))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a batch (with the calibrated temperature, where asked for)."""
        temperature = 1.0 if self.calibrated is None else self.calibrated["temperature"]
        with autocast(self.executor.device, self.executor.amp_dtype):
            logits = self.executor.net(images)
        return F.softmax(logits.float() / temperature, dim=1)

    def classify(self, todo: list[Unit]) -> int:
        """Predict and write these units; EXIT_INTERRUPTED where a signal stopped it (the units written are
        kept, the rest are done by the same command again)."""
        started = time.perf_counter()
        check_folder_writable(self.out / UNITS, "--out")
        positions = np.concatenate([np.arange(u.start, u.stop) for u in todo])
        sizes, rejected = self.headers(positions)
        self.timing.header_seconds = time.perf_counter() - started
        writer = Writer(self.catalog, todo, rejected, self.out, self.provenance, self.calibrated, self.options,
                        self.executor.device)
        try:
            remaining = [int(p) for p in positions if int(p) not in rejected]
            while remaining and not self.stop_flag.raised:
                remaining = self._pass(remaining, sizes, writer, rejected)
            writer.finish(complete=not self.stop_flag.raised)
        finally:
            writer.close()
        self.timing.images = len(positions)
        self.timing.seconds = time.perf_counter() - started
        if self.stop_flag.raised:
            print(f"predict: stopping on {self.stop_flag.signal_name}: {writer.units_written} unit(s) written; "
                  f"the same command goes on from there", flush=True)
            return EXIT_INTERRUPTED
        print(f"predict: {len(positions)} images in {self.timing.seconds:.1f} s "
              f"({len(positions) / self.timing.seconds:.0f} images/s; the header scan "
              f"{self.timing.header_seconds:.1f} s)", flush=True)
        return EXIT_OK

    def _pass(self, remaining: list[int], sizes: dict, writer: Writer, rejected: dict) -> list[int]:
        """One loader over the remaining images; what is left to do after it: nothing, unless the decoder
        stopped (then the images after the batches handed over, which hold every image once, in order)."""
        loader = self.loader(remaining, sizes)
        handed, stop = self._run_batches(loader, writer)
        done = handed * loader.spec.batch_size
        if stop is None:
            return []
        if isinstance(stop, BrokenFile):  # DALI stopped on a file that no decoder reads
            position = remaining[stop.position]
            rejected[position] = (stop.reason, stop.detail)
            print(f"predict: {stop.path}: {stop.reason} ({stop.detail}): rejected; going on without it", flush=True)
            return [p for p in remaining[done:] if p != position]
        # The decoder stopped on a file that PIL reads (a GPU decoder is pickier than PIL): the batches it had
        # in flight again with the reference backend, image by image, then on with the run's backend.
        suspects = remaining[done:done + (getattr(loader, "prefetch_depth", 0) + 1) * loader.spec.batch_size]
        fallback = reference_backend(self.executor.device)
        if fallback is None or fallback == resolve_backend(self.config.loader.backend, self.executor.device):
            raise stop.__cause__ or stop
        print(f"predict: the {self.config.loader.backend} decoder stopped on one of {len(suspects)} images from "
              f"{self.catalog.paths[suspects[0]]} ({stop}); decoding them with {fallback}, image by image",
              flush=True)
        _, again = self._run_batches(self.loader(suspects, sizes, backend=fallback, batch_size=1), writer)
        if again is not None:
            raise again.__cause__ or again
        return remaining[done + len(suspects):]

    @torch.no_grad()
    def _run_batches(self, loader, writer: Writer) -> tuple[int, BrokenFile | DecoderStopped | None]:
        """Every batch of the loader through the model; the results to the writer, without waiting for the
        device. Returns how many batches were handed over and, where the decoder stopped, why."""
        executor = self.executor
        captured = {}
        hook = None
        if self.options.embeddings:  # the head's input: the penultimate activations
            head = executor.model.get_submodule(head_name(executor.model))
            hook = head.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))
        pin = executor.device.type == "cuda"
        handed = 0
        try:
            for images, positions in _batches_of(loader):
                parts = [self.forward(images), positions]
                if self.options.embeddings:
                    parts.append(captured["x"].flatten(1).half())
                host = [_to_host(p, pin) for p in parts]
                # the copies are queued: the writer waits for this event, the loop goes on
                writer.put(copies_done(executor.device) if pin else None, host)
                handed += 1
                if self.stop_flag.raised:
                    break
        except (BrokenFile, DecoderStopped) as stop:
            return handed, stop
        finally:
            if hook is not None:
                hook.remove()
            loader.close()
        return handed, None


class _Subset:
    """A catalog's tar shards seen through a loader's positions (its entries' labels are catalog positions)."""

    def __init__(self, shards, positions: list[int]):
        self.shards, self.positions = shards, positions

    def read(self, position: int):
        return self.shards.read(self.positions[position])

    def describe(self, position: int) -> str:
        return self.shards.describe(self.positions[position])


class DecoderStopped(Exception):
    """The loader's decoder failed on an image that PIL decodes (DALI then names no file)."""


def _batches_of(loader):
    """The loader's batches; an error of the loader itself (not of the model) as DecoderStopped."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except BrokenFile:
            raise
        except RuntimeError as error:
            raise DecoderStopped(str(error).splitlines()[0] if str(error) else type(error).__name__) from error
        yield batch


def copies_done(device: torch.device) -> torch.cuda.Event:
    """An event after the work queued so far on the device's current stream. Blocking: the writer thread
    that waits for it sleeps in synchronize(), where a default event would spin one of the node's cores."""
    event = torch.cuda.Event(blocking=True)
    event.record(torch.cuda.current_stream(device))
    return event


def _to_host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """On the host: from a GPU into pinned memory without waiting (the caching host allocator keeps it from
    reuse until the copy is done); a CPU tensor as it is."""
    if not pin:
        return tensor.cpu()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out

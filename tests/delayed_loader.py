"""`python -m profiling ...` with one rank's training batches held back: a slow loader made on purpose.

    DELAY_RANK=1 DELAY_SECONDS=0.2 python -m tests.delayed_loader trace --config ... --out DIR
    (also under `python -m torch.distributed.run ... -m tests.delayed_loader trace ...`)

The delay is a sleep each time the training loader hands over a batch, so it
falls in the step's "data" range, where a slow loader's time falls. The
Executor (which builds the loaders for training and for `profiling trace`)
is patched from outside, before profiling's main runs: production code
carries no test hook. Without DELAY_RANK every rank is delayed.
"""

from __future__ import annotations

import os
import sys
import time

from profiling.__main__ import main
from train.executor import Executor


class DelayedLoader:
    """Looks like the loader it wraps; each batch comes `seconds` late."""

    def __init__(self, loader, seconds: float):
        self._loader, self._seconds = loader, seconds

    def __iter__(self):
        for batch in self._loader:
            time.sleep(self._seconds)
            yield batch

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def delay_training_batches(seconds: float, rank: int | None) -> None:
    build = Executor.loader_for

    def loader_for(self, split, batch_size, train, spec=None):
        loader = build(self, split, batch_size, train, spec)
        slowed = train and (rank is None or self.ctx.rank == rank)
        return DelayedLoader(loader, seconds) if slowed else loader

    Executor.loader_for = loader_for


if __name__ == "__main__":
    rank = os.environ.get("DELAY_RANK")
    delay_training_batches(float(os.environ["DELAY_SECONDS"]), None if rank is None else int(rank))
    sys.exit(main(sys.argv[1:]))

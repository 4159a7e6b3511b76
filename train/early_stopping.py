"""Early stopping on the validation loss: the best epoch so far, and how long since it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs in a row without a lower validation loss than the best so far."""

    patience: int
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, epoch: int, val_loss: float) -> bool:
        """Record an epoch's validation loss; whether it is the new best."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        """What last.pt keeps (patience is the config's: a resumed run may raise it)."""
        return {k: v for k, v in asdict(self).items() if k != "patience"}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch, self.bad_epochs = state["best_loss"], state["best_epoch"], state["bad_epochs"]

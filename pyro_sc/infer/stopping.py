"""Early stopping on the validation loss (the training loss without validation cells), and the best state."""

from __future__ import annotations

from typing import Sequence

import torch

from .step import restore, snapshot

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stop when the monitored loss has not improved by ``min_delta`` for ``patience`` epochs.

    Only epochs at full KL weight count: a loss under warm-up is not comparable from epoch to epoch.
    ``best_loss`` and ``epochs_since_best`` live in the run's progress (checkpointed with it); the best
    parameters and buffers (``best_state``, when ``restore_best``) are put back by :meth:`finish`.
    """

    def __init__(self, enabled: bool, patience: int, min_delta: float, restore_best: bool):
        self.enabled, self.patience, self.min_delta, self.restore_best = enabled, patience, min_delta, restore_best
        self.best_state: dict | None = None

    def update(
        self, progress, monitored: float, kl_weight: float,
        params: Sequence[torch.Tensor], modules: Sequence[torch.nn.Module],
    ) -> bool:
        """Record an epoch's loss; True when training should stop."""
        if not self.enabled or kl_weight < 1.0:
            return False
        if monitored < progress.best_loss - self.min_delta:
            progress.best_loss, progress.epochs_since_best = monitored, 0
            self.best_state = snapshot(params, modules) if self.restore_best else None
            return False
        progress.epochs_since_best += 1
        return progress.epochs_since_best >= self.patience

    def finish(self, params: Sequence[torch.Tensor], modules: Sequence[torch.nn.Module]) -> None:
        """Put the best epoch's parameters and buffers back (when asked to and there is one)."""
        if self.enabled and self.restore_best and self.best_state is not None:
            restore(self.best_state, params, modules)

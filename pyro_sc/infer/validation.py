"""The validation pass: the negative ELBO per held-out cell, with every module's mode kept."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from pyro.infer import ELBO

from ..data import AnnDataSetup, iterate_minibatches
from .step import TrainingWarning

__all__ = ["evaluate_loss", "modes_kept", "validation_loss"]


@contextlib.contextmanager
def modes_kept(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Restore every sub-module's own train / eval mode on exit (a frozen sub-module stays in eval mode),
    whatever the code inside switched (a validation pass, a callback's query of the model)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def evaluate_loss(
    model: Callable,
    guide: Callable,
    data: AnnDataSetup,
    indices: np.ndarray,
    *,
    elbo: ELBO,
    modules: Sequence[torch.nn.Module] = (),
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> float:
    """Negative ELBO per cell over ``indices`` (networks in eval mode, full KL weight)."""
    with modes_kept(modules):
        for m in modules:
            m.eval()
        total = 0.0
        for idx in iterate_minibatches(indices, batch_size, shuffle=False):
            mb = data.minibatch(idx, device=device)
            # The plate scales by n_obs / len(idx): undo it to sum over exactly these cells.
            total += elbo.loss(model, guide, mb) * len(idx) / mb.n_obs
        return total / max(len(indices), 1)


def validation_loss(
    model: Callable, guide: Callable, data: AnnDataSetup, share: np.ndarray, *, elbo: ELBO,
    modules: Sequence[torch.nn.Module], batch_size: int, device: torch.device, replicas,
    epoch: int, train_loss: float,
) -> float:
    """:func:`evaluate_loss` over this process's ``share`` of the validation cells, averaged over the
    processes; a :class:`TrainingWarning` when it is not finite."""
    loss = evaluate_loss(model, guide, data, share, elbo=elbo, modules=modules, batch_size=batch_size, device=device)
    if replicas.enabled:  # each process's share of the validation cells, summed
        total_loss, n_cells = replicas.sum([loss * len(share), len(share)])
        loss = total_loss / n_cells
    if not math.isfinite(loss):
        warnings.warn(
            f"the validation loss is {loss} at epoch {epoch} (the training loss is {train_loss:.6g}): some "
            "validation cells are not fitted by the model; early stopping does not count this epoch as an "
            "improvement",
            TrainingWarning,
            stacklevel=4,
        )
    return loss

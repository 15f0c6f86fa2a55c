"""The one training driver: stochastic variational inference over minibatches of cells.

:func:`fit` trains any Pyro ``model`` / ``guide`` pair that takes a :class:`~pyro_sc.data.Minibatch`
(the package's methods, or a user's own). Each step draws a minibatch, evaluates the ELBO with the
``cells`` plate subsampled (Pyro scales the minibatch to the whole data set), and takes an Adam step.

The loss reported and optimised is the negative ELBO divided by the number of cells, so learning rates,
weight decay and gradient clipping mean the same whatever the data set size.

A method adds a term to the loss through ``extra_loss(mb) -> scalar tensor`` (added to that per-cell
loss; e.g. a classifier's cross-entropy or a batch-mixing penalty), and watches training through
``callbacks`` called after every epoch. It never copies this loop.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, TraceEnum_ELBO
from tqdm.auto import tqdm

from .data import AnnDataSetup, Minibatch, iterate_minibatches, split_indices

__all__ = ["TrainingError", "fit", "evaluate_loss", "collect_parameters"]

EpochCallback = Callable[[dict], "bool | None"]


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the epoch and the step."""


def collect_parameters(
    model: Callable, guide: Callable, mb: Minibatch, elbo: ELBO, modules: Sequence[torch.nn.Module]
) -> list[torch.Tensor]:
    """Every trainable tensor: the modules' parameters plus any ``pyro.param`` the pair creates.

    The pair is run once under a parameter-only trace, as ``pyro.infer.SVI`` does, so lazily created
    parameters (autoguides, ``pyro.param`` in a user's model) exist before the optimiser is built.
    """
    with poutine.trace(param_only=True) as capture:
        elbo.differentiable_loss(model, guide, mb)
    params: dict[int, torch.Tensor] = {}
    for module in modules:
        for p in module.parameters():
            params[id(p)] = p
    for site in capture.trace.nodes.values():
        p = site["value"].unconstrained()
        params[id(p)] = p
    return [p for p in params.values() if p.requires_grad]


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
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        total = 0.0
        for idx in iterate_minibatches(indices, batch_size, shuffle=False):
            mb = data.minibatch(idx, device=device)
            # The plate scales by n_obs / len(idx): undo it to sum over exactly these cells.
            total += elbo.loss(model, guide, mb) * len(idx) / mb.n_obs
        return total / max(len(indices), 1)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def fit(
    model: Callable,
    guide: Callable,
    data: AnnDataSetup,
    *,
    modules: Sequence[torch.nn.Module] = (),
    elbo: ELBO | None = None,
    max_epochs: int = 400,
    batch_size: int = 128,
    lr: float = 1e-3,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    train_size: float = 0.9,
    train_indices: np.ndarray | None = None,
    validation_indices: np.ndarray | None = None,
    early_stopping: bool = False,
    patience: int = 45,
    min_delta: float = 0.0,
    restore_best: bool = True,
    kl_warmup_steps: int | None = None,
    extra_loss: Callable[[Minibatch], torch.Tensor] | None = None,
    callbacks: Iterable[EpochCallback] = (),
    parameters: Iterable[torch.Tensor] | None = None,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    progress_bar: bool = True,
    validation_batch_size: int = 1024,
) -> pd.DataFrame:
    """Train ``model`` / ``guide`` on ``data`` by SVI with Adam; return the per-epoch history.

    Parameters
    ----------
    model, guide
        Callables taking one :class:`~pyro_sc.data.Minibatch`. Their cells must be one
        ``pyro.plate("cells", mb.n_obs, subsample=mb.idx_n)``.
    data
        The registered AnnData.
    modules
        The ``nn.Module`` s holding the parameters (moved to ``device``, switched between train and
        eval mode). ``pyro.param`` sites found by tracing the pair are optimised too.
    elbo
        Defaults to ``TraceEnum_ELBO()`` (without its warning for models with nothing to enumerate), which sums enumerated discrete sites out exactly (Pyro finds
        ``max_plate_nesting`` by tracing the model once unless the ELBO is given it).
    max_epochs, batch_size, lr, eps, weight_decay, clip_norm
        Adam on the per-cell negative ELBO; ``clip_norm`` clips the global gradient norm.
    train_size, train_indices, validation_indices
        A seeded split of the cells (``train_size`` of them for training, the rest for validation),
        or explicit index arrays. With ``train_size=1`` there is no validation set.
    early_stopping, patience, min_delta, restore_best
        Stop when the validation loss (the training loss without a validation set) has not improved by
        ``min_delta`` for ``patience`` epochs; then restore the parameters of the best epoch.
    kl_warmup_steps
        Linear KL annealing: ``mb.kl_weight`` grows from 0 to 1 over this many steps. Models apply it
        with ``poutine.scale`` on their latent sites. Validation always uses weight 1.
    extra_loss
        The documented hook for method-specific terms: ``extra_loss(mb)`` returns a scalar added to
        the per-cell loss of each training step (recorded as ``extra_loss`` in the history).
    callbacks
        Called after each epoch with the epoch's record (a dict they may add entries to, e.g. an ARI);
        a callback returning ``True`` stops training.
    parameters
        Train only these tensors (e.g. to freeze a classifier); default: everything found.
    seed
        Seeds Pyro / torch / numpy and the minibatch order.
    device
        ``"cpu"`` or ``"cuda"``; minibatches are densified on the host and moved there.

    Returns
    -------
    A DataFrame with one row per epoch: ``epoch``, ``train_loss``, ``validation_loss``, ``extra_loss``,
    ``kl_weight``, ``seconds`` and anything the callbacks record.
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    elbo = elbo if elbo is not None else TraceEnum_ELBO(strict_enumeration_warning=False)
    for module in modules:
        module.to(device)
        module.train()

    if train_indices is None:
        train_indices, split_val = split_indices(data.n_obs, train_size=train_size, seed=0 if seed is None else seed)
        validation_indices = split_val if validation_indices is None else validation_indices
    train_indices = np.asarray(train_indices, dtype=np.int64)
    validation_indices = (
        np.zeros(0, dtype=np.int64) if validation_indices is None else np.asarray(validation_indices, np.int64)
    )
    if len(train_indices) == 0:
        raise ValueError("no cells to train on")

    first = data.minibatch(train_indices[: min(batch_size, len(train_indices))], device=device)
    found = collect_parameters(model, guide, first, elbo, modules)
    params = list(parameters) if parameters is not None else found
    if not params:
        raise TrainingError("the model and guide have no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr, eps=eps, weight_decay=weight_decay)

    records: list[dict] = []
    best_loss, best_state, epochs_since_best = math.inf, None, 0
    step = 0
    bar = tqdm(range(1, max_epochs + 1), desc="training", disable=not progress_bar, leave=False)
    for epoch in bar:
        started = time.perf_counter()
        train_total, extra_total, n_seen = 0.0, 0.0, 0
        for batch_step, idx in enumerate(iterate_minibatches(train_indices, batch_size, rng=rng), 1):
            step += 1
            kl_weight = 1.0 if not kl_warmup_steps else min(1.0, step / kl_warmup_steps)
            mb = data.minibatch(idx, device=device).with_kl_weight(kl_weight)
            loss = elbo.differentiable_loss(model, guide, mb) / mb.n_obs
            extra = extra_loss(mb) if extra_loss is not None else None
            total = loss if extra is None else loss + extra
            if not torch.isfinite(total):
                raise TrainingError(
                    f"the loss became {float(total)} at epoch {epoch}, step {batch_step} (global step "
                    f"{step}); the parameters were not updated and hold the values of the last good step. "
                    "Try a lower learning rate, clip_norm=..., or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm else math.inf)
            if not torch.isfinite(grad_norm):
                raise TrainingError(
                    f"non-finite gradients at epoch {epoch}, step {batch_step} (global step {step}); the "
                    "parameters were not updated. Try a lower learning rate or clip_norm=..."
                )
            optimizer.step()
            train_total += loss.item() * len(idx)
            extra_total += 0.0 if extra is None else extra.item() * len(idx)
            n_seen += len(idx)

        record = {
            "epoch": epoch,
            "train_loss": train_total / n_seen,
            "validation_loss": float("nan"),
            "extra_loss": extra_total / n_seen,
            "kl_weight": kl_weight,
        }
        if len(validation_indices):
            record["validation_loss"] = evaluate_loss(
                model, guide, data, validation_indices, elbo=elbo, modules=modules,
                batch_size=validation_batch_size, device=device,
            )
        stop = False
        for callback in callbacks:
            stop = bool(callback(record)) or stop
        record["seconds"] = time.perf_counter() - started
        records.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.4g}", val=f"{record['validation_loss']:.4g}")

        if early_stopping:
            # Only a fully annealed loss is comparable from epoch to epoch.
            monitored = record["validation_loss"] if len(validation_indices) else record["train_loss"]
            if kl_weight >= 1.0 and monitored < best_loss - min_delta:
                best_loss, epochs_since_best = monitored, 0
                best_state = [p.detach().clone() for p in params] if restore_best else None
            elif kl_weight >= 1.0:
                epochs_since_best += 1
                stop = stop or epochs_since_best >= patience
        if stop:
            break
    bar.close()
    if early_stopping and restore_best and best_state is not None:
        with torch.no_grad():
            for p, best in zip(params, best_state):
                p.copy_(best)
    for module in modules:
        module.eval()
    history = pd.DataFrame.from_records(records)
    history.attrs["stopped_early"] = len(records) < max_epochs
    return history

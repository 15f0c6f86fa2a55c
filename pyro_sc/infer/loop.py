"""The loop: :func:`fit` composes the driver's parts over epochs and minibatch steps.

:func:`fit` trains any Pyro ``model`` / ``guide`` pair that takes a :class:`~pyro_sc.data.Minibatch`
(the package's methods, or a user's own). Each step draws a minibatch, evaluates the ELBO with the
``cells`` plate subsampled (Pyro scales the minibatch to the whole data set), and takes an Adam step.
The loss reported and optimised is the negative ELBO divided by the number of cells, so learning rates,
weight decay and gradient clipping mean the same whatever the data set size.

The parts: a guarded step (:mod:`.step`), the KL schedule (:mod:`.schedule`), the validation pass
(:mod:`.validation`), early stopping (:mod:`.stopping`), the checkpointer (:mod:`.checkpoint`) and the
replicas of a distributed run (:mod:`pyro_sc.distributed`).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import ELBO, TraceEnum_ELBO
from tqdm.auto import tqdm

from ..data import AnnDataSetup, Minibatch, iterate_minibatches, load_minibatches, split_indices
from ..distributed import Replicas
from .checkpoint import Checkpointer, Progress, check_compatible, read_checkpoint, resume_from, rng_states
from .schedule import kl_weight, warmup_steps
from .step import GuardedStep, TrainingError, TrainingWarning, buffers, collect_parameters, restore, snapshot
from .stopping import EarlyStopping
from .validation import modes_kept, validation_loss

__all__ = ["fit"]

EpochCallback = Callable[[dict], "bool | None"]
NonFinitePolicy = Literal["raise", "reduce_lr"]


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
    kl_warmup_epochs: float | None = None,
    extra_loss: Callable[[Minibatch], torch.Tensor] | None = None,
    callbacks: Iterable[EpochCallback] = (),
    parameters: Iterable[torch.Tensor] | None = None,
    frozen: Sequence[torch.nn.Module] = (),
    seed: int | None = 0,
    device: torch.device | str = "auto",
    progress_bar: bool = True,
    validation_batch_size: int = 1024,
    on_nonfinite: NonFinitePolicy = "raise",
    lr_reduction_factor: float = 0.1,
    max_lr_reductions: int = 3,
    checkpoint_every: int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    prefetch: int | None = None,
    distributed: bool | None = None,
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
        Adam on the per-cell negative ELBO; ``clip_norm`` clips the global gradient norm. In a
        distributed run ``batch_size`` is the minibatch of all processes together.
    train_size, train_indices, validation_indices
        A seeded split of the cells (``train_size`` of them for training, the rest for validation),
        or explicit index arrays. With ``train_size=1`` there is no validation set.
    early_stopping, patience, min_delta, restore_best
        Stop when the validation loss (the training loss without a validation set) has not improved by
        ``min_delta`` for ``patience`` epochs; then restore the parameters (and buffers) of the best epoch.
    kl_warmup_steps, kl_warmup_epochs
        Linear KL annealing: ``mb.kl_weight`` grows from 0 to 1 over this many optimiser steps, or
        epochs (converted to steps by :mod:`pyro_sc.infer.schedule`; give one of the two). Models apply
        it with ``poutine.scale`` on their latent sites. Validation always uses weight 1. A warm-up that
        has not finished when training ends is a :class:`TrainingWarning`.
    extra_loss
        The documented hook for method-specific terms: ``extra_loss(mb)`` returns a scalar added to
        the per-cell loss of each training step (recorded as ``extra_loss`` in the history).
    callbacks
        Called after each epoch with the epoch's record (a dict they may add entries to, e.g. an ARI);
        a callback returning ``True`` stops training. A callback may query the model (embeddings,
        predictions): every module's train / eval mode is restored after the callbacks.
    parameters
        Train only these tensors; default: everything found.
    frozen
        Sub-modules (of ``modules``) held fixed: kept in eval mode (no dropout, batch normalisation with
        its running statistics), without gradients, and left out of the optimiser (e.g. a pre-trained
        classifier whose output the rest of the model learns from).
    seed
        Seeds Pyro / torch / numpy and the minibatch order.
    device
        ``"auto"`` (the default, as scvi-tools' ``accelerator="auto"``: CUDA when
        ``torch.cuda.is_available()``, else the CPU), ``"cpu"`` or ``"cuda"`` (or ``"cuda:1"``...): the
        modules are moved there, and each minibatch
        (its rows read on the host) is moved there, sparse counts as a sparse tensor densified on the device.
    progress_bar
        Show a progress bar over the epochs (process 0 only).
    validation_batch_size
        Cells per minibatch when the validation loss is evaluated (changes no result, only memory and speed).
    on_nonfinite, lr_reduction_factor, max_lr_reductions
        A NaN or inf in the loss or the gradients is caught at the step it appears, before any update.
        ``"raise"``: a :class:`TrainingError` naming the epoch and step; the parameters and buffers hold
        the values of the last good step. ``"reduce_lr"``: the epoch starts again from its first state
        (parameters, buffers, optimiser) with the learning rate multiplied by ``lr_reduction_factor``,
        with a :class:`TrainingWarning`; after ``max_lr_reductions`` such restarts in one run, the next
        fault raises. The history's ``lr`` and ``lr_reductions`` columns record it.
    checkpoint_every, checkpoint_path
        Every ``checkpoint_every`` epochs, write the state of the run to ``checkpoint_path`` (a file,
        replaced each time, or a directory to hold ``checkpoint.pt``): the modules, the trained tensors,
        the optimiser, the epoch and step, early stopping's best loss and state, the history so far, the
        split, and the states of the torch, CUDA, Python, NumPy and minibatch-order generators. An epoch
        at which training stops early is not written, so resuming replays it.
    resume
        A checkpoint written by a run with the same model, data and options (a different number of
        cells or seed is an error): training continues from it (its split, learning rate and counters
        replace the arguments') up to ``max_epochs``. On CPU,
        an interrupted and resumed run ends with the same parameters, bit for bit, as an uninterrupted
        one. Entries that callbacks add to the history must be numbers or strings to be checkpointed.
    prefetch
        Minibatches read ahead by a background thread while the model trains (0: none). ``None``: 2 when
        the counts are backed on disk, else 0. Results are the same with and without.
    distributed
        ``None`` (default): train data-parallel when a ``torch.distributed`` process group of more than
        one process is initialised (e.g. by :func:`pyro_sc.distributed.init_process_group` under
        ``torchrun``); ``True``: require one; ``False``: train alone in this process. Each process trains
        on its share of every minibatch and the gradients are averaged; process 0 writes the checkpoints.
        See :mod:`pyro_sc.distributed` for what is shared. A resumed distributed run continues
        correctly but is not bit-identical to an uninterrupted one.

    Returns
    -------
    A DataFrame with one row per epoch: ``epoch``, ``train_loss``, ``validation_loss``, ``extra_loss``,
    ``kl_weight``, ``lr``, ``lr_reductions``, anything the callbacks record, and ``seconds``.
    """
    _check_options(max_epochs, on_nonfinite, lr_reduction_factor, batch_size, modules, frozen, prefetch,
                   kl_warmup_steps, kl_warmup_epochs)
    checkpointer = Checkpointer(checkpoint_every, checkpoint_path)
    checkpoint = None if resume is None else read_checkpoint(resume)
    if checkpoint is not None:
        check_compatible(checkpoint, resume, n_obs=data.n_obs, seed=seed)
    prefetch = (2 if data._backed else 0) if prefetch is None else prefetch
    device = _named_device(resolve_device(device))
    replicas = Replicas(distributed, device)
    if replicas.enabled and batch_size < 2 * replicas.world_size:
        raise ValueError(
            f"batch_size={batch_size} is the minibatch of all {replicas.world_size} processes together: it "
            f"must give each process at least two cells (batch_size >= {2 * replicas.world_size})"
        )
    checkpointer.rank = replicas.rank
    seed = replicas.agree_on_seed(seed)
    if seed is not None:
        pyro.set_rng_seed(seed)
    rng = np.random.default_rng(seed)
    elbo = elbo if elbo is not None else TraceEnum_ELBO(strict_enumeration_warning=False)
    with _frozen(modules, frozen, device):
        if checkpoint is not None:
            train_indices, validation_indices = checkpoint["train_indices"], checkpoint["validation_indices"]
        train_indices, validation_indices = _split(data.n_obs, train_size, train_indices, validation_indices, seed)
        first = data.minibatch(train_indices[: min(batch_size, len(train_indices))], device=device)
        found = collect_parameters(model, guide, first, elbo, modules)
        params = [p for p in (list(parameters) if parameters is not None else found) if p.requires_grad]
        if not params:
            raise TrainingError("the model and guide have no trainable parameters")
        optimizer = adam(params, lr=lr, eps=eps, weight_decay=weight_decay)
        progress, stopping = Progress(), EarlyStopping(early_stopping, patience, min_delta, restore_best)
        if checkpoint is not None:
            progress, stopping.best_state = resume_from(
                checkpoint, modules=modules, params=params, optimizer=optimizer, rng=rng
            )
        # every process starts from process 0's state (lazily created parameters included)
        module_params = [p for module in modules for p in module.parameters()]
        replicas.broadcast(list({id(t): t for t in [*module_params, *params, *buffers(modules)]}.values()))
        own_seed = None if seed is None else replicas.process_seed(seed, progress.epoch)
        if own_seed is not None:
            pyro.set_rng_seed(own_seed)
        warmup = kl_warmup_steps or warmup_steps(kl_warmup_epochs, len(train_indices), batch_size)
        step = GuardedStep(model, guide, elbo, params, modules, optimizer, extra_loss=extra_loss,
                           clip_norm=clip_norm, replicas=replicas, n_train=len(train_indices))
        guard = _NonFiniteGuard(on_nonfinite, lr_reduction_factor, max_lr_reductions)
        validate = _validator(model, guide, data, replicas.split(validation_indices), elbo, modules,
                              validation_batch_size, device, replicas)
        bar = tqdm(total=max_epochs, initial=progress.epoch, desc="training", leave=False,
                   disable=not progress_bar or replicas.rank != 0)
        while progress.epoch < max_epochs:
            epoch, started = progress.epoch + 1, time.perf_counter()
            epoch_start = guard.before_epoch(params, modules, optimizer)
            done = _train_epoch(step, data, train_indices, batch_size, rng, replicas, device, prefetch,
                                progress.step, warmup, epoch)
            if done.fault is not None:
                guard.recover(done.fault, epoch, epoch_start, params, modules, optimizer, progress)
                continue
            progress.step = done.step
            replicas.average_buffers(modules)
            record = _record(epoch, done, replicas, optimizer, progress)
            if len(validation_indices):
                record["validation_loss"] = validate(epoch, record["train_loss"])
            stop = _call_back(callbacks, record, modules, replicas)
            record["seconds"] = time.perf_counter() - started
            progress.records.append(record)
            progress.epoch = epoch
            bar.update()
            bar.set_postfix(loss=f"{record['train_loss']:.4g}", val=f"{record['validation_loss']:.4g}")
            monitored = record["validation_loss"] if len(validation_indices) else record["train_loss"]
            if stopping.update(progress, monitored, done.kl_weight, params, modules) or stop:
                break
            if checkpointer.due(epoch):
                checkpointer.write(
                    progress, n_obs=data.n_obs, seed=seed, modules=[module.state_dict() for module in modules],
                    params=[p.detach() for p in params], optimizer=optimizer.state_dict(),
                    best_state=stopping.best_state, train_indices=torch.from_numpy(train_indices),
                    validation_indices=torch.from_numpy(validation_indices), rng=rng_states(rng),
                )
        bar.close()
        stopping.finish(params, modules)
        for module in modules:
            module.eval()
    history = pd.DataFrame.from_records(progress.records)
    history.attrs["stopped_early"] = len(progress.records) < max_epochs
    _warn_unfinished_warmup(warmup, progress, stopped_early=history.attrs["stopped_early"])
    return history


def adam(params: Sequence[torch.Tensor], **options) -> torch.optim.Adam:
    """``torch.optim.Adam`` over ``params``, fused (one kernel per step for all of them, instead of about
    ten passes per tensor) where torch has the fused kernel: floating-point tensors on one CPU or CUDA
    device. Same algorithm; the results differ from the unfused loop's by float rounding."""
    devices = {p.device for p in params}
    fused = len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and all(
        p.is_floating_point() for p in params
    )
    return torch.optim.Adam(params, fused=fused or None, **options)


def _check_options(max_epochs, on_nonfinite, lr_reduction_factor, batch_size, modules, frozen, prefetch,
                   kl_warmup_steps, kl_warmup_epochs) -> None:
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if on_nonfinite not in ("raise", "reduce_lr"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'reduce_lr', got {on_nonfinite!r}")
    if not 0 < lr_reduction_factor < 1:
        raise ValueError(f"lr_reduction_factor must be in (0, 1), got {lr_reduction_factor}")
    if kl_warmup_steps and kl_warmup_epochs:
        raise ValueError("give the KL warm-up in steps (kl_warmup_steps) or in epochs (kl_warmup_epochs), not both")
    batch_norm = torch.nn.modules.batchnorm._BatchNorm
    if batch_size < 2 and any(isinstance(m, batch_norm) for module in modules for m in module.modules()):
        raise ValueError(
            f"batch_size={batch_size}: the networks use batch normalisation, which needs at least two cells "
            "per minibatch; use batch_size >= 2 (scVI's default is 128)"
        )
    inside = {id(m) for module in modules for m in module.modules()}
    if any(id(module) not in inside for module in frozen):
        raise ValueError("frozen modules must be among the modules (or inside one of them)")
    if prefetch is not None and prefetch < 0:
        raise ValueError(f"prefetch must be >= 0 (or None), got {prefetch}")


def resolve_device(device: torch.device | str) -> torch.device:
    """``"auto"``: CUDA if torch sees a GPU, else the CPU; any other value as ``torch.device`` reads it."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _named_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # the current device is per thread: name it, for the prefetch thread (and each process's own GPU)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def _frozen(modules: Sequence[torch.nn.Module], frozen: Sequence[torch.nn.Module], device: torch.device):
    """The modules on ``device`` in train mode; frozen ones in eval mode (dropout off, batch-norm running
    statistics) without gradients (so out of the optimiser), their gradients given back on exit."""
    frozen_params = [p for module in frozen for p in module.parameters() if p.requires_grad]
    for p in frozen_params:
        p.requires_grad_(False)
    try:
        for module in modules:
            module.to(device)
            module.train()
        for module in frozen:
            module.eval()
        yield
    finally:
        for p in frozen_params:
            p.requires_grad_(True)


def _split(n_obs: int, train_size: float, train_indices, validation_indices, seed: int | None):
    """The training and validation cells: given, or a seeded split."""
    if train_indices is None:
        train_indices, split_val = split_indices(n_obs, train_size=train_size, seed=0 if seed is None else seed)
        validation_indices = split_val if validation_indices is None else validation_indices
    train_indices = np.asarray(train_indices, dtype=np.int64)
    validation_indices = (
        np.zeros(0, dtype=np.int64) if validation_indices is None else np.asarray(validation_indices, np.int64)
    )
    if len(train_indices) == 0:
        raise ValueError("no cells to train on")
    for name, idx in [("train_indices", train_indices), ("validation_indices", validation_indices)]:
        if len(idx) and (idx.min() < 0 or idx.max() >= n_obs):
            raise ValueError(f"{name} must lie in [0, {n_obs}) (the registered cells)")
    shared = np.intersect1d(train_indices, validation_indices)
    if len(shared):
        raise ValueError(
            f"{len(shared)} cells are both training and validation cells (e.g. cell {shared[0]}): a validation "
            "loss must be measured on cells the model does not train on"
        )
    return train_indices, validation_indices


@dataclass
class _Epoch:
    """What one pass over the training cells gave: totals over cells, the last step and its KL weight."""

    train_total: float = 0.0
    extra_total: float = 0.0
    n_seen: int = 0
    step: int = 0
    kl_weight: float = 1.0
    fault: str | None = None


def _train_epoch(step_fn: GuardedStep, data, train_indices, batch_size, rng, replicas, device, prefetch,
                 step: int, warmup: int | None, epoch: int) -> _Epoch:
    """One epoch of guarded steps over this process's share of each minibatch (read ahead if asked)."""
    done = _Epoch(step=step)
    shares = replicas.shard(list(iterate_minibatches(train_indices, batch_size, rng=rng)))
    minibatches = load_minibatches(data, [idx for idx, _ in shares], device=device, prefetch=prefetch)
    with contextlib.closing(minibatches):
        for batch_step, ((idx, weight), mb) in enumerate(zip(shares, minibatches), 1):
            done.step += 1
            done.kl_weight = kl_weight(done.step, warmup)
            out = step_fn(replace(mb, kl_weight=done.kl_weight), weight)
            if isinstance(out, str):
                done.fault = f"{out} at epoch {epoch}, step {batch_step} (global step {done.step})"
                return done
            done.train_total += out[0] * len(idx)
            done.extra_total += out[1] * len(idx)
            done.n_seen += len(idx)
    return done


class _NonFiniteGuard:
    """What a faulty epoch does: raise, or (``"reduce_lr"``) start the epoch again from its first state
    with a lower learning rate, at most ``max_reductions`` times in a run."""

    def __init__(self, policy: NonFinitePolicy, factor: float, max_reductions: int):
        self.policy, self.factor, self.max_reductions = policy, factor, max_reductions

    def before_epoch(self, params, modules, optimizer) -> dict | None:
        return snapshot(params, modules, optimizer) if self.policy == "reduce_lr" else None

    def recover(self, fault: str, epoch: int, epoch_start, params, modules, optimizer, progress: Progress) -> None:
        if self.policy == "raise":
            raise TrainingError(
                f"{fault}; the parameters were not updated and hold the values of the last good step. "
                "Try a lower learning rate, clip_norm=..., on_nonfinite='reduce_lr', or check the data."
            )
        restore(epoch_start, params, modules, optimizer)
        if progress.lr_reductions >= self.max_reductions:
            raise TrainingError(
                f"{fault}, after {progress.lr_reductions} learning-rate reductions; the parameters hold "
                f"the values of the start of epoch {epoch}, the last good state. Check the data, or try "
                "clip_norm=..."
            )
        progress.lr_reductions += 1
        for group in optimizer.param_groups:
            group["lr"] *= self.factor
        warnings.warn(
            f"{fault}: epoch {epoch} starts again from its first state with lr "
            f"{optimizer.param_groups[0]['lr']:.3g} (reduction {progress.lr_reductions} of at most "
            f"{self.max_reductions})",
            TrainingWarning,
            stacklevel=3,
        )


def _record(epoch: int, done: _Epoch, replicas, optimizer, progress: Progress) -> dict:
    train_total, extra_total, n_seen = replicas.sum([done.train_total, done.extra_total, done.n_seen])
    return {
        "epoch": epoch,
        "train_loss": train_total / n_seen,
        "validation_loss": float("nan"),
        "extra_loss": extra_total / n_seen,
        "kl_weight": done.kl_weight,
        "lr": optimizer.param_groups[0]["lr"],
        "lr_reductions": progress.lr_reductions,
    }


def _validator(model, guide, data, share, elbo, modules, batch_size, device, replicas):
    def validate(epoch: int, train_loss: float) -> float:
        return validation_loss(model, guide, data, share, elbo=elbo, modules=modules, batch_size=batch_size,
                               device=device, replicas=replicas, epoch=epoch, train_loss=train_loss)

    return validate


def _call_back(callbacks: Iterable[EpochCallback], record: dict, modules, replicas) -> bool:
    """Every callback sees the record (a callback may query the model: the modules' modes are kept);
    True when one of them, in any process, asks to stop."""
    stop = False
    with modes_kept(modules):
        for callback in callbacks:
            stop = bool(callback(record)) or stop
    return replicas.any(stop)


def _warn_unfinished_warmup(warmup: int | None, progress: Progress, *, stopped_early: bool) -> None:
    if warmup and not stopped_early and progress.step < warmup:
        warnings.warn(
            f"the KL warm-up of {warmup} steps had not finished when training ended (step {progress.step}, KL "
            f"weight {kl_weight(progress.step, warmup):.3g}): the model was not trained on the ELBO itself, and "
            "early stopping, which waits for the full weight, could not act. Train longer or shorten the warm-up.",
            TrainingWarning,
            stacklevel=3,
        )

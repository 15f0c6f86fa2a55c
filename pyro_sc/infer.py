"""The one training driver: stochastic variational inference over minibatches of cells.

:func:`fit` trains any Pyro ``model`` / ``guide`` pair that takes a :class:`~pyro_sc.data.Minibatch`
(the package's methods, or a user's own). Each step draws a minibatch, evaluates the ELBO with the
``cells`` plate subsampled (Pyro scales the minibatch to the whole data set), and takes an Adam step.

The loss reported and optimised is the negative ELBO divided by the number of cells, so learning rates,
weight decay and gradient clipping mean the same whatever the data set size.

A method adds a term to the loss through ``extra_loss(mb) -> scalar tensor`` (added to that per-cell
loss; e.g. a classifier's cross-entropy or a batch-mixing penalty), and watches training through
``callbacks`` called after every epoch. It never copies this loop.

Long runs are protected twice over. ``on_nonfinite="reduce_lr"`` turns a NaN / inf loss or gradient
from a fatal error into a rollback: the epoch starts again from its first state (parameters, buffers,
optimiser) with a smaller learning rate. ``checkpoint_every`` writes the whole state of the run (modules,
optimiser, the driver's counters and history, the split, every random number generator), and
``resume=`` continues an interrupted run to exactly the parameters of an uninterrupted one (on CPU).

Large data. Minibatches are read from the registered data as they are needed, so an AnnData backed on
disk trains without being loaded; ``prefetch`` reads the next minibatches in a background thread while
the current one trains. ``device="cuda"`` trains on a GPU. Launched with ``torchrun`` in an initialised
process group, the same loop trains data-parallel over several processes (see :mod:`pyro_sc.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
import pyro
import pyro.util
import torch
from pyro import poutine
from pyro.infer import ELBO, TraceEnum_ELBO
from tqdm.auto import tqdm

from . import __version__
from .data import AnnDataSetup, Minibatch, iterate_minibatches, load_minibatches, split_indices
from .distributed import Replicas

__all__ = [
    "CHECKPOINT_FORMAT", "TrainingError", "TrainingWarning", "fit", "evaluate_loss", "collect_parameters",
]

EpochCallback = Callable[[dict], "bool | None"]
NonFinitePolicy = Literal["raise", "reduce_lr"]

CHECKPOINT_FORMAT = 1  # the layout of the files ``fit`` checkpoints to; bumped whenever it changes
_CHECKPOINT_KIND = "pyro_sc training checkpoint"


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the epoch and the step."""


class TrainingWarning(RuntimeWarning):
    """Training went on after a fault (e.g. a non-finite loss answered by a lower learning rate)."""


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
        value = site["value"]
        # a constrained pyro.param exposes its unconstrained leaf; a module's plain nn.Parameter is the leaf
        p = value.unconstrained() if hasattr(value, "unconstrained") else value
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
    with _modes_kept(modules):
        for m in modules:
            m.eval()
        total = 0.0
        for idx in iterate_minibatches(indices, batch_size, shuffle=False):
            mb = data.minibatch(idx, device=device)
            # The plate scales by n_obs / len(idx): undo it to sum over exactly these cells.
            total += elbo.loss(model, guide, mb) * len(idx) / mb.n_obs
        return total / max(len(indices), 1)


@contextlib.contextmanager
def _modes_kept(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Restore every sub-module's own train / eval mode on exit (a frozen sub-module stays in eval mode),
    whatever the code inside switched (a validation pass, a callback's query of the model)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class _Progress:
    """The driver's counters and history: what, besides tensors, a checkpoint carries."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken (they drive the KL warm-up)
    best_loss: float = math.inf
    epochs_since_best: int = 0
    lr_reductions: int = 0
    records: list[dict] = field(default_factory=list)


def _buffers(modules: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """The modules' buffers (e.g. batch-norm running statistics), which a forward pass may change."""
    return [b for module in modules for b in module.buffers()]


def _snapshot(
    params: Sequence[torch.Tensor],
    modules: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Copies of the trained tensors, the modules' buffers and (when given) the optimiser's state."""
    return {
        "params": [p.detach().clone() for p in params],
        "buffers": [b.clone() for b in _buffers(modules)],
        "optimizer": None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
    }


def _restore(
    snapshot: dict,
    params: Sequence[torch.Tensor],
    modules: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Put a :func:`_snapshot` back (the snapshot stays usable: the optimiser gets copies)."""
    with torch.no_grad():
        for tensor, saved in zip([*params, *_buffers(modules)], [*snapshot["params"], *snapshot["buffers"]]):
            tensor.copy_(saved)
    if optimizer is not None:
        optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))


def _rng_states(rng: np.random.Generator) -> dict:
    """Every generator training draws from: Pyro's (torch, Python, NumPy's global one), CUDA's, and the
    minibatch order's. NumPy's key becomes a tensor, so checkpoints load with ``weights_only=True``."""
    states = pyro.util.get_rng_state()
    kind, key, *rest = states["numpy"]
    states["numpy"] = (kind, torch.from_numpy(key.astype(np.int64)), *rest)
    states["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    states["minibatch_order"] = rng.bit_generator.state
    return states


def _set_rng_states(states: dict, rng: np.random.Generator) -> None:
    kind, key, *rest = states["numpy"]
    pyro.util.set_rng_state({**states, "numpy": (kind, key.numpy().astype(np.uint32), *rest)})
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    rng.bit_generator.state = states["minibatch_order"]


def _checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a directory."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def _plain(value):
    """NumPy scalars (e.g. a callback's metric) as Python numbers, which ``weights_only`` loading accepts."""
    return value.item() if isinstance(value, np.generic) else value


def _write_checkpoint(path: Path, **state) -> None:
    """Write atomically (a temporary file, then a rename): an interruption never leaves half a checkpoint."""
    progress: _Progress = state.pop("progress")
    payload = {
        "kind": _CHECKPOINT_KIND,
        "format_version": CHECKPOINT_FORMAT,
        "pyro_sc_version": __version__,
        "progress": {
            "epoch": progress.epoch,
            "step": progress.step,
            "best_loss": progress.best_loss,
            "epochs_since_best": progress.epochs_since_best,
            "lr_reductions": progress.lr_reductions,
            "records": [{k: _plain(v) for k, v in record.items()} for record in progress.records],
        },
        **state,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`fit`, or say clearly why ``path`` is not one it can resume."""
    file = _checkpoint_file(path)
    if not file.exists():
        raise FileNotFoundError(f"no checkpoint at {file}")
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != _CHECKPOINT_KIND:
        raise ValueError(
            f"{file} is not a pyro_sc training checkpoint (a model written by save() is read with load())"
        )
    if checkpoint["format_version"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{file} is a checkpoint in format {checkpoint['format_version']} (written by pyro_sc "
            f"{checkpoint['pyro_sc_version']}); this pyro_sc ({__version__}) resumes format "
            f"{CHECKPOINT_FORMAT} only"
        )
    return checkpoint


def _resume(
    checkpoint: dict,
    *,
    modules: Sequence[torch.nn.Module],
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
) -> tuple[_Progress, dict | None]:
    """Put the state of a checkpoint back into the modules, the parameters, the optimiser and every RNG."""
    saved_shapes = [tuple(t.shape) for t in checkpoint["params"]]
    shapes = [tuple(p.shape) for p in params]
    if len(checkpoint["modules"]) != len(modules) or len(saved_shapes) != len(shapes):
        raise ValueError(
            f"the checkpoint does not match this model: it holds {len(saved_shapes)} trained tensors in "
            f"{len(checkpoint['modules'])} modules, this model has {len(shapes)} in {len(modules)}"
        )
    other = [(saved, shape) for saved, shape in zip(saved_shapes, shapes) if saved != shape]
    if other:
        raise ValueError(
            f"the checkpoint does not match this model: {len(other)} trained tensors have other shapes "
            f"(e.g. {other[0][0]} in the checkpoint, {other[0][1]} here)"
        )
    try:
        for module, state in zip(modules, checkpoint["modules"]):
            module.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"the checkpoint does not match this model: {error}") from None
    with torch.no_grad():
        for p, saved in zip(params, checkpoint["params"]):
            p.copy_(saved)
    optimizer.load_state_dict(checkpoint["optimizer"])
    _set_rng_states(checkpoint["rng"], rng)
    return _Progress(**checkpoint["progress"]), checkpoint["best_state"]


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
    frozen: Sequence[torch.nn.Module] = (),
    seed: int | None = 0,
    device: torch.device | str = "cpu",
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
    kl_warmup_steps
        Linear KL annealing: ``mb.kl_weight`` grows from 0 to 1 over this many steps. Models apply it
        with ``poutine.scale`` on their latent sites. Validation always uses weight 1.
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
        ``"cpu"`` or ``"cuda"`` (or ``"cuda:1"``...): the modules are moved there, and each minibatch
        (its rows read on the host) is moved there, sparse counts as a sparse tensor densified on the device.
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
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if on_nonfinite not in ("raise", "reduce_lr"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'reduce_lr', got {on_nonfinite!r}")
    if not 0 < lr_reduction_factor < 1:
        raise ValueError(f"lr_reduction_factor must be in (0, 1), got {lr_reduction_factor}")
    if (checkpoint_every is None) != (checkpoint_path is None):
        raise ValueError("checkpoint_every and checkpoint_path go together: pass both, or neither")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    batch_norm = torch.nn.modules.batchnorm._BatchNorm
    if batch_size < 2 and any(isinstance(m, batch_norm) for module in modules for m in module.modules()):
        raise ValueError(
            f"batch_size={batch_size}: the networks use batch normalisation, which needs at least two cells "
            "per minibatch; use batch_size >= 2 (scVI's default is 128)"
        )
    checkpoint = None if resume is None else _read_checkpoint(resume)
    if checkpoint is not None and checkpoint["n_obs"] != data.n_obs:
        raise ValueError(
            f"the checkpoint {resume} was written for {checkpoint['n_obs']} cells, not {data.n_obs}"
        )
    if checkpoint is not None and checkpoint["seed"] != seed:
        raise ValueError(
            f"the checkpoint {resume} was written by a run with seed {checkpoint['seed']}, not {seed}: resume "
            "a run with the options it was started with"
        )
    if prefetch is not None and prefetch < 0:
        raise ValueError(f"prefetch must be >= 0 (or None), got {prefetch}")
    prefetch = (2 if data._backed else 0) if prefetch is None else prefetch
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # the current device is per thread: name it, for the prefetch thread (and each process's own GPU)
        device = torch.device("cuda", torch.cuda.current_device())
    replicas = Replicas(distributed, device)
    if replicas.enabled and batch_size < 2 * replicas.world_size:
        raise ValueError(
            f"batch_size={batch_size} is the minibatch of all {replicas.world_size} processes together: it "
            f"must give each process at least two cells (batch_size >= {2 * replicas.world_size})"
        )
    seed = replicas.agree_on_seed(seed)
    if seed is not None:
        pyro.set_rng_seed(seed)
    rng = np.random.default_rng(seed)
    elbo = elbo if elbo is not None else TraceEnum_ELBO(strict_enumeration_warning=False)
    # frozen modules: evaluated in eval mode (dropout off, batch-norm running statistics) with no
    # gradients, their parameters left out of the optimiser; restored when training ends
    inside = {id(m) for module in modules for m in module.modules()}
    if any(id(module) not in inside for module in frozen):
        raise ValueError("frozen modules must be among the modules (or inside one of them)")
    frozen_params = [p for module in frozen for p in module.parameters() if p.requires_grad]
    for p in frozen_params:
        p.requires_grad_(False)
    try:
        for module in modules:
            module.to(device)
            module.train()
        for module in frozen:
            module.eval()

        if checkpoint is not None:
            train_indices, validation_indices = checkpoint["train_indices"], checkpoint["validation_indices"]
        elif train_indices is None:
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
        params = [p for p in params if p.requires_grad]
        if not params:
            raise TrainingError("the model and guide have no trainable parameters")
        optimizer = torch.optim.Adam(params, lr=lr, eps=eps, weight_decay=weight_decay)

        progress, best_state = _Progress(), None
        if checkpoint is not None:
            progress, best_state = _resume(
                checkpoint, modules=modules, params=params, optimizer=optimizer, rng=rng
            )
        # every process starts from process 0's state (lazily created parameters included)
        module_params = [p for module in modules for p in module.parameters()]
        replicas.broadcast(list({id(t): t for t in [*module_params, *params, *_buffers(modules)]}.values()))
        own_seed = None if seed is None else replicas.process_seed(seed, progress.epoch)
        if own_seed is not None:
            pyro.set_rng_seed(own_seed)
        validation_share = replicas.split(validation_indices)
        bar = tqdm(
            total=max_epochs, initial=progress.epoch, desc="training", leave=False,
            disable=not progress_bar or replicas.rank != 0,
        )
        while progress.epoch < max_epochs:
            epoch = progress.epoch + 1
            started = time.perf_counter()
            epoch_start = _snapshot(params, modules, optimizer) if on_nonfinite == "reduce_lr" else None
            step, fault = progress.step, None
            train_total, extra_total, n_seen = 0.0, 0.0, 0
            # this process's share of each minibatch (all of it in a 1-process run), read ahead if asked
            shares = replicas.shard(list(iterate_minibatches(train_indices, batch_size, rng=rng)))
            minibatches = load_minibatches(data, [idx for idx, _ in shares], device=device, prefetch=prefetch)
            with contextlib.closing(minibatches):
                for batch_step, ((idx, weight), mb) in enumerate(zip(shares, minibatches), 1):
                    step += 1
                    kl_weight = 1.0 if not kl_warmup_steps else min(1.0, step / kl_warmup_steps)
                    mb = mb.with_kl_weight(kl_weight)
                    buffers = [b.clone() for b in _buffers(modules)]
                    loss = elbo.differentiable_loss(model, guide, mb) / mb.n_obs
                    extra = extra_loss(mb) if extra_loss is not None else None
                    total = loss if extra is None else loss + extra
                    fault = None if torch.isfinite(total) else f"the loss became {total.item()}"
                    if fault is None:
                        optimizer.zero_grad(set_to_none=True)
                        total.backward()
                    fault = replicas.reduce_gradients(params, weight, fault)  # averaged over the processes
                    if fault is None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm else math.inf)
                        fault = None if torch.isfinite(grad_norm) else "the gradients became non-finite"
                    if fault is not None:
                        with torch.no_grad():  # this step's forward pass may have moved batch-norm statistics
                            for b, saved in zip(_buffers(modules), buffers):
                                b.copy_(saved)
                        fault += f" at epoch {epoch}, step {batch_step} (global step {step})"
                        break
                    optimizer.step()
                    train_total += loss.item() * len(idx)
                    extra_total += 0.0 if extra is None else extra.item() * len(idx)
                    n_seen += len(idx)

            if fault is not None:
                if on_nonfinite == "raise":
                    raise TrainingError(
                        f"{fault}; the parameters were not updated and hold the values of the last good step. "
                        "Try a lower learning rate, clip_norm=..., on_nonfinite='reduce_lr', or check the data."
                    )
                _restore(epoch_start, params, modules, optimizer)
                if progress.lr_reductions >= max_lr_reductions:
                    raise TrainingError(
                        f"{fault}, after {progress.lr_reductions} learning-rate reductions; the parameters hold "
                        f"the values of the start of epoch {epoch}, the last good state. Check the data, or try "
                        "clip_norm=..."
                    )
                progress.lr_reductions += 1
                for group in optimizer.param_groups:
                    group["lr"] *= lr_reduction_factor
                warnings.warn(
                    f"{fault}: epoch {epoch} starts again from its first state with lr "
                    f"{optimizer.param_groups[0]['lr']:.3g} (reduction {progress.lr_reductions} of at most "
                    f"{max_lr_reductions})",
                    TrainingWarning,
                    stacklevel=2,
                )
                continue

            progress.step = step
            replicas.average_buffers(modules)
            train_total, extra_total, n_seen = replicas.sum([train_total, extra_total, n_seen])
            record = {
                "epoch": epoch,
                "train_loss": train_total / n_seen,
                "validation_loss": float("nan"),
                "extra_loss": extra_total / n_seen,
                "kl_weight": kl_weight,
                "lr": optimizer.param_groups[0]["lr"],
                "lr_reductions": progress.lr_reductions,
            }
            if len(validation_indices):
                validation_loss = evaluate_loss(
                    model, guide, data, validation_share, elbo=elbo, modules=modules,
                    batch_size=validation_batch_size, device=device,
                )
                if replicas.enabled:  # each process's share of the validation cells, summed
                    n_share = len(validation_share)
                    total_loss, n_cells = replicas.sum([validation_loss * n_share, n_share])
                    validation_loss = total_loss / n_cells
                record["validation_loss"] = validation_loss
                if not math.isfinite(validation_loss):
                    warnings.warn(
                        f"the validation loss is {validation_loss} at epoch {epoch} (the training loss is "
                        f"{record['train_loss']:.6g}): some validation cells are not fitted by the model; early "
                        "stopping does not count this epoch as an improvement",
                        TrainingWarning,
                        stacklevel=2,
                    )
            stop = False
            with _modes_kept(modules):  # a callback may query the model (which switches it to eval mode)
                for callback in callbacks:
                    stop = bool(callback(record)) or stop
            stop = replicas.any(stop)
            record["seconds"] = time.perf_counter() - started
            progress.records.append(record)
            progress.epoch = epoch
            bar.update()
            bar.set_postfix(loss=f"{record['train_loss']:.4g}", val=f"{record['validation_loss']:.4g}")

            if early_stopping:
                # Only a fully annealed loss is comparable from epoch to epoch.
                monitored = record["validation_loss"] if len(validation_indices) else record["train_loss"]
                if kl_weight >= 1.0 and monitored < progress.best_loss - min_delta:
                    progress.best_loss, progress.epochs_since_best = monitored, 0
                    best_state = _snapshot(params, modules) if restore_best else None
                elif kl_weight >= 1.0:
                    progress.epochs_since_best += 1
                    stop = stop or progress.epochs_since_best >= patience
            if stop:
                break
            if checkpoint_every is not None and epoch % checkpoint_every == 0 and replicas.rank == 0:
                _write_checkpoint(
                    _checkpoint_file(checkpoint_path),
                    progress=progress,
                    n_obs=data.n_obs,
                    seed=seed,
                    modules=[module.state_dict() for module in modules],
                    params=[p.detach() for p in params],
                    optimizer=optimizer.state_dict(),
                    best_state=best_state,
                    train_indices=torch.from_numpy(train_indices),
                    validation_indices=torch.from_numpy(validation_indices),
                    rng=_rng_states(rng),
                )
        bar.close()
        if early_stopping and restore_best and best_state is not None:
            _restore(best_state, params, modules)
        for module in modules:
            module.eval()
        history = pd.DataFrame.from_records(progress.records)
        history.attrs["stopped_early"] = len(progress.records) < max_epochs
        return history
    finally:
        for p in frozen_params:
            p.requires_grad_(True)

"""The state of a run: its progress, every random number generator, writing, reading and resuming.

A checkpoint holds the modules, the trained tensors, the optimiser, the driver's counters and history,
early stopping's best loss and state, the split, and the states of the torch, CUDA, Python, NumPy and
minibatch-order generators: resuming from it continues the run to the parameters an uninterrupted run
reaches (bit for bit on CPU).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyro
import pyro.util
import torch

from .. import __version__

__all__ = ["CHECKPOINT_FORMAT", "Progress", "Checkpointer", "read_checkpoint", "resume_from", "atomic_save"]

#: The layout of the files ``fit`` checkpoints to; bumped whenever it changes.
CHECKPOINT_FORMAT = 1
_KIND = "pyro_sc training checkpoint"


@dataclass
class Progress:
    """The driver's counters and history: what, besides tensors, a checkpoint carries."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken (they drive the KL warm-up)
    best_loss: float = math.inf
    epochs_since_best: int = 0
    lr_reductions: int = 0
    records: list[dict] = field(default_factory=list)


def rng_states(rng: np.random.Generator) -> dict:
    """Every generator training draws from: Pyro's (torch, Python, NumPy's global one), CUDA's, and the
    minibatch order's. NumPy's key becomes a tensor, so checkpoints load with ``weights_only=True``."""
    states = pyro.util.get_rng_state()
    kind, key, *rest = states["numpy"]
    states["numpy"] = (kind, torch.from_numpy(key.astype(np.int64)), *rest)
    states["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    states["minibatch_order"] = rng.bit_generator.state
    return states


def set_rng_states(states: dict, rng: np.random.Generator) -> None:
    kind, key, *rest = states["numpy"]
    pyro.util.set_rng_state({**states, "numpy": (kind, key.numpy().astype(np.uint32), *rest)})
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    rng.bit_generator.state = states["minibatch_order"]


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a directory."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def _plain(value):
    """NumPy scalars (e.g. a callback's metric) as Python numbers, which ``weights_only`` loading accepts."""
    return value.item() if isinstance(value, np.generic) else value


def atomic_save(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then a rename: an interruption never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Writes the run's state every ``every`` epochs to ``path`` (process 0 only)."""

    def __init__(self, every: int | None, path: str | os.PathLike | None, *, rank: int = 0):
        if (every is None) != (path is None):
            raise ValueError("checkpoint_every and checkpoint_path go together: pass both, or neither")
        if every is not None and every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.every, self.path, self.rank = every, path, rank

    def due(self, epoch: int) -> bool:
        """Whether a checkpoint is to be written after ``epoch`` (every ``every`` epochs, on process 0)."""
        return self.every is not None and epoch % self.every == 0 and self.rank == 0

    def write(self, progress: Progress, **state) -> None:
        """Write ``progress`` and the rest of the run's ``state`` (modules, optimiser, random number
        generators, ...) to ``path`` (a file, or ``checkpoint.pt`` in a directory), atomically
        (:func:`atomic_save`)."""
        records = [{k: _plain(v) for k, v in record.items()} for record in progress.records]
        payload = {
            "kind": _KIND, "format_version": CHECKPOINT_FORMAT, "pyro_sc_version": __version__,
            "progress": {**asdict(progress), "records": records}, **state,
        }
        atomic_save(payload, checkpoint_file(self.path))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`~pyro_sc.infer.fit`, or say clearly why ``path`` is not one."""
    file = checkpoint_file(path)
    if not file.exists():
        raise FileNotFoundError(f"no checkpoint at {file}")
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != _KIND:
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


def check_compatible(checkpoint: dict, path, *, n_obs: int, seed: int | None) -> None:
    """A checkpoint resumes only the run it was written by: the same cells and seed."""
    if checkpoint["n_obs"] != n_obs:
        raise ValueError(f"the checkpoint {path} was written for {checkpoint['n_obs']} cells, not {n_obs}")
    if checkpoint["seed"] != seed:
        raise ValueError(
            f"the checkpoint {path} was written by a run with seed {checkpoint['seed']}, not {seed}: resume "
            "a run with the options it was started with"
        )


def resume_from(
    checkpoint: dict,
    *,
    modules: Sequence[torch.nn.Module],
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
) -> tuple[Progress, dict | None]:
    """Put the state of a checkpoint back into the modules, the parameters, the optimiser and every RNG;
    returns the progress and early stopping's best state."""
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
    set_rng_states(checkpoint["rng"], rng)
    return Progress(**checkpoint["progress"]), checkpoint["best_state"]

"""Restarts and stages as one training plan, checkpointed and resumed as a whole.

A method that trains in several runs of :func:`~pyro_sc.infer.fit` (CellAssign's screened restarts, capVI's
three stages) runs each as a named *phase* of a :class:`TrainingPlan`. With a checkpoint directory the
plan writes, inside it, each running phase's own checkpoint (``<phase>.pt``, every ``checkpoint_every``
epochs) and, when a phase ends, ``plan.pt``: the phases done so far, each with its history and the state
the method needs to take up the next phase (e.g. every restart's parameters). Resuming replays the plan:
a phase already done puts its saved state back and returns its history without training; the phase
that was interrupted resumes from its own checkpoint; the rest run as they would have. Each phase's run
seeds itself, so a resumed plan ends with the parameters of an uninterrupted one (on CPU, bit for bit).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .. import __version__
from .checkpoint import CHECKPOINT_FORMAT, atomic_save

__all__ = ["TrainingPlan"]

_KIND = "pyro_sc training plan"


class TrainingPlan:
    """Phases run in order; see the module's description.

    Parameters
    ----------
    checkpoint_every
        Each running phase writes its state every this many epochs (with ``checkpoint_path``).
    checkpoint_path
        A directory (created if needed) for the plan's files.
    resume
        A directory written by the same plan: done phases are taken from it, the interrupted one resumes.
    """

    def __init__(
        self,
        *,
        checkpoint_every: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None,
    ):
        if (checkpoint_every is None) != (checkpoint_path is None):
            raise ValueError("checkpoint_every and checkpoint_path go together: pass both, or neither")
        self.every = checkpoint_every
        self.folder = None if checkpoint_path is None else _folder(checkpoint_path, create=True)
        self.resume_folder = None if resume is None else _folder(resume, create=False)
        self.done: list[dict] = []  # the phases completed in this run or taken from the resumed plan
        self._resumed: dict[str, dict] = {}
        if self.resume_folder is not None:
            self._resumed = {phase["name"]: phase for phase in _read_plan(self.resume_folder)}

    def run(
        self,
        name: str,
        train: Callable[..., pd.DataFrame],
        *,
        state: Callable[[], dict] | None = None,
        load: Callable[[dict], None] | None = None,
    ) -> pd.DataFrame:
        """Run phase ``name``: ``train(**checkpointing)`` (the options to pass on to ``fit``); then save
        ``state()`` with its history. A phase the resumed plan finished is not run: ``load(saved state)``
        puts its end state back and its history is returned."""
        if any(phase["name"] == name for phase in self.done):
            raise ValueError(f"the plan already has a phase {name!r}")
        if name in self._resumed:
            phase = self._resumed[name]
            if load is not None:
                load(phase["state"])
            history = pd.DataFrame(phase["history"])
        else:
            history = train(**self._checkpointing(name))
            saved = {} if state is None else copy.deepcopy(state())  # copies: training goes on in place
            phase = {"name": name, "history": history.to_dict(orient="list"), "state": saved}
        self.done.append(phase)
        if self.folder is not None:
            atomic_save({"kind": _KIND, "format_version": CHECKPOINT_FORMAT, "pyro_sc_version": __version__,
                         "phases": self.done}, self.folder / "plan.pt")
        return history

    def _checkpointing(self, name: str) -> dict:
        """``fit``'s checkpoint options for phase ``name``: its own file in the plan's directory."""
        options = {}
        if self.folder is not None:
            options.update(checkpoint_every=self.every, checkpoint_path=self.folder / f"{name}.pt")
        if self.resume_folder is not None and (self.resume_folder / f"{name}.pt").exists():
            options["resume"] = self.resume_folder / f"{name}.pt"
        return options


def _folder(path: str | os.PathLike, *, create: bool) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"{path} is a file: a model that trains in several runs (restarts, stages) checkpoints to a directory"
        )
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def _read_plan(folder: Path) -> list[dict]:
    """The phases a plan in ``folder`` finished (none when it was interrupted in its first phase)."""
    file = folder / "plan.pt"
    if not file.exists():
        if not any(folder.glob("*.pt")):
            raise FileNotFoundError(f"no checkpoint at {folder}")
        return []
    saved = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("kind") != _KIND:
        raise ValueError(f"{file} is not a pyro_sc training plan")
    if saved["format_version"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{file} is a plan in format {saved['format_version']} (written by pyro_sc {saved['pyro_sc_version']}); "
            f"this pyro_sc ({__version__}) resumes format {CHECKPOINT_FORMAT} only"
        )
    return saved["phases"]

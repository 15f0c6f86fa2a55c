"""One guarded SVI step, and the tensors a step reads and writes.

A step evaluates the per-cell loss of a minibatch (the negative ELBO over the number of cells, plus a
method's extra term), computes the gradients, and checks both for NaN / inf before the optimiser moves:
a faulty step changes nothing (its forward pass's batch-norm statistics are put back) and is reported.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.infer import ELBO

from ..data import Minibatch

__all__ = ["TrainingError", "TrainingWarning", "collect_parameters", "GuardedStep", "snapshot", "restore"]


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the epoch and the step."""


class TrainingWarning(RuntimeWarning):
    """Training went on after a fault (e.g. a non-finite loss answered by a lower learning rate), or its
    options leave it short of its objective (e.g. a KL warm-up that does not finish)."""


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


def buffers(modules: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """The modules' buffers (e.g. batch-norm running statistics), which a forward pass may change."""
    return [b for module in modules for b in module.buffers()]


def snapshot(
    params: Sequence[torch.Tensor],
    modules: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Copies of the trained tensors, the modules' buffers and (when given) the optimiser's state."""
    return {
        "params": [p.detach().clone() for p in params],
        "buffers": [b.clone() for b in buffers(modules)],
        "optimizer": None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
    }


def restore(
    saved: dict,
    params: Sequence[torch.Tensor],
    modules: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Put a :func:`snapshot` back (the snapshot stays usable: the optimiser gets copies)."""
    with torch.no_grad():
        for tensor, value in zip([*params, *buffers(modules)], [*saved["params"], *saved["buffers"]]):
            tensor.copy_(value)
    if optimizer is not None:
        optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))


class CellsStandFor(Messenger):
    """Scales every site inside the ``cells`` plate by ``factor``.

    The plate's size is the number of registered cells (per-cell parameters, e.g. an ``AutoNormal``'s,
    are indexed by position among them), so Pyro scales a minibatch to all of them, validation cells
    included. With ``factor = n_train / n_obs`` the local terms stand for the training cells alone,
    and global priors (e.g. CellAssign's on pi and delta) keep their weight against the cells trained on.
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def _process_message(self, msg):
        if any(frame.name == "cells" for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


class GuardedStep:
    """``step(mb, weight)``: one optimiser step on minibatch ``mb``; returns ``(loss, extra)`` per training
    cell, or the fault (a string) when the loss or the gradients are not finite, in which case nothing moved.

    ``weight`` is this process's share of the minibatch, for averaging gradients over processes. The ELBO
    is that of the ``n_train`` training cells (see :class:`CellsStandFor`).
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        elbo: ELBO,
        params: Sequence[torch.Tensor],
        modules: Sequence[torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        *,
        extra_loss: Callable[[Minibatch], torch.Tensor] | None,
        clip_norm: float | None,
        replicas,
        n_train: int,
    ):
        self.model, self.guide, self.elbo, self.n_train = model, guide, elbo, n_train
        self.params, self.modules, self.optimizer = params, modules, optimizer
        self.extra_loss, self.clip_norm, self.replicas = extra_loss, clip_norm, replicas
        self._scaled: tuple[int, Callable, Callable] | None = None  # (n_obs, model, guide) under CellsStandFor

    def _pair_for(self, n_obs: int) -> tuple[Callable, Callable]:
        """The model and guide with the cells standing for the training cells, built once per run."""
        if self.n_train == n_obs:  # every registered cell trains: nothing to rescale
            return self.model, self.guide
        if self._scaled is None or self._scaled[0] != n_obs:
            cells = CellsStandFor(self.n_train / n_obs)
            self._scaled = (n_obs, cells(self.model), cells(self.guide))
        return self._scaled[1], self._scaled[2]

    def __call__(self, mb: Minibatch, weight: float) -> tuple[float, float] | str:
        saved_buffers = [b.clone() for b in buffers(self.modules)]
        model, guide = self._pair_for(mb.n_obs)
        loss = self.elbo.differentiable_loss(model, guide, mb) / self.n_train
        extra = self.extra_loss(mb) if self.extra_loss is not None else None
        total = loss if extra is None else loss + extra
        fault = None if torch.isfinite(total) else f"the loss became {total.item()}"
        if fault is None:
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
        fault = self.replicas.reduce_gradients(self.params, weight, fault)  # averaged over the processes
        if fault is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm if self.clip_norm else math.inf)
            fault = None if torch.isfinite(grad_norm) else "the gradients became non-finite"
        if fault is not None:
            with torch.no_grad():  # this step's forward pass may have moved batch-norm statistics
                for b, value in zip(buffers(self.modules), saved_buffers):
                    b.copy_(value)
            return fault
        self.optimizer.step()
        return loss.item(), 0.0 if extra is None else extra.item()

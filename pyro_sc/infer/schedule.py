"""The KL warm-up: one rule for every method, counted in optimiser steps.

The KL weight grows linearly from 0 to 1 over the warm-up, ``weight(step) = min(1, step / warmup_steps)``
(step 1 is the first optimiser step). A warm-up given in epochs becomes ``epochs * steps_per_epoch``
steps, where an epoch has the number of minibatches :func:`pyro_sc.data.iterate_minibatches` makes of
the training cells (the ceiling of ``n_train / batch_size``, a last minibatch of one cell merged).

The default (``kl_warmup_epochs="auto"`` in the methods) is :func:`default_warmup_epochs`:
``min(400, ceil(max_epochs / 2))`` epochs. scvi-tools warms up for 400 epochs against a default of
``min(round(20000 / n * 400), 400)`` epochs, so above 20,000 cells its KL weight never reaches 1 (0.4 at
50,000 cells) and below it reaches 1 only at the last step; here the second half of every default run
is trained on the ELBO itself, at any data size, and early stopping (which waits for the full weight)
has that half to act in.
"""

from __future__ import annotations

import math

__all__ = ["steps_per_epoch", "warmup_steps", "kl_weight", "default_warmup_epochs"]


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimiser steps in one epoch over ``n_train`` cells (as :func:`~pyro_sc.data.iterate_minibatches`)."""
    n_steps = max(1, math.ceil(n_train / batch_size))
    if n_steps > 1 and n_train - (n_steps - 1) * batch_size == 1:
        n_steps -= 1  # a last minibatch of one cell is merged into the one before
    return n_steps


def warmup_steps(n_epochs: float | None, n_train: int, batch_size: int) -> int | None:
    """A warm-up of ``n_epochs`` epochs in optimiser steps (None or 0: no warm-up)."""
    if not n_epochs:
        return None
    return max(1, round(n_epochs * steps_per_epoch(n_train, batch_size)))


def kl_weight(step: int, warmup: int | None) -> float:
    """The KL weight at optimiser step ``step`` (1-based) of a warm-up of ``warmup`` steps."""
    return 1.0 if not warmup else min(1.0, step / warmup)


def default_warmup_epochs(max_epochs: int) -> int:
    """``min(400, ceil(max_epochs / 2))``: the weight is 1 for (at least) the second half of the run."""
    return min(400, math.ceil(max_epochs / 2))

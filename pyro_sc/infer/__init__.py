"""The one training driver: stochastic variational inference over minibatches of cells.

:func:`fit` trains any Pyro ``model`` / ``guide`` pair that takes a :class:`~pyro_sc.data.Minibatch`
(the package's methods, or a user's own). Each step draws a minibatch, evaluates the ELBO with the
``cells`` plate subsampled (Pyro scales the minibatch to the whole data set), and takes an Adam step.

The loss reported and optimised is the negative ELBO divided by the number of cells, so learning rates,
weight decay and gradient clipping mean the same whatever the data set size.

A method adds a term to the loss through ``extra_loss(mb) -> scalar tensor`` (added to that per-cell
loss; e.g. a classifier's cross-entropy or a batch-mixing penalty), and watches training through
``callbacks`` called after every epoch. It never copies this loop. Restarts and stages (CellAssign's
screened initialisations, capVI's three stages) are a :class:`TrainingPlan` of such runs, checkpointed
and resumed as a whole.

Long runs are protected twice over. ``on_nonfinite="reduce_lr"`` turns a NaN / inf loss or gradient
from a fatal error into a rollback: the epoch starts again from its first state (parameters, buffers,
optimiser) with a smaller learning rate. ``checkpoint_every`` writes the whole state of the run (modules,
optimiser, the driver's counters and history, the split, every random number generator), and
``resume=`` continues an interrupted run to exactly the parameters of an uninterrupted one (on CPU).

Large data. Minibatches are read from the registered data as they are needed, so an AnnData backed on
disk trains without being loaded; ``prefetch`` reads the next minibatches in a background thread while
the current one trains. ``device="cuda"`` trains on a GPU. Launched with ``torchrun`` in an initialised
process group, the same loop trains data-parallel over several processes (see :mod:`pyro_sc.distributed`).

The parts, one file each: ``loop`` (:func:`fit`), ``step`` (a guarded SVI step), ``schedule`` (the KL
warm-up), ``validation``, ``stopping`` (early stopping), ``checkpoint`` (the run's state) and ``plan``
(restarts and stages).
"""

from .checkpoint import CHECKPOINT_FORMAT
from .loop import fit
from .plan import TrainingPlan
from .step import TrainingError, TrainingWarning, collect_parameters
from .validation import evaluate_loss

__all__ = [
    "CHECKPOINT_FORMAT", "TrainingError", "TrainingWarning", "TrainingPlan", "fit", "evaluate_loss",
    "collect_parameters",
]

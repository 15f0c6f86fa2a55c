"""pyro_sc: probabilistic models of single-cell RNA-seq counts, each a Pyro model / guide pair.

The parameters of pyro_sc's models live in the modules that own them, never in Pyro's global parameter
store, so two models in one process never share state and ``save`` / ``load`` round-trip through
``state_dict``. Importing the package changes nothing global: Pyro's settings (``module_local_params``
included) are switched only around pyro_sc's own code (:func:`pyro_sc.nn.local_params`), so a user's
own Pyro models and ``pyro.param`` statements behave exactly as without pyro_sc.
"""

__version__ = "0.1.0"

from . import datasets, de, distributed, nmf, settings
from .data import AnnDataSetup, DataError, Minibatch
from .distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from .infer import TrainingError, fit
from .models import CAPVI, ETM, SCANVI, SCVI, CellAssign

__all__ = [
    "AnnDataSetup",
    "CAPVI",
    "CellAssign",
    "DataError",
    "ETM",
    "Minibatch",
    "NegativeBinomial",
    "SCANVI",
    "SCVI",
    "TrainingError",
    "ZeroInflatedNegativeBinomial",
    "datasets",
    "de",
    "fit",
    "nmf",
    "settings",
]

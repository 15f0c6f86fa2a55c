"""pyro_sc: probabilistic models of single-cell RNA-seq counts, each a Pyro model / guide pair.

Importing the package sets Pyro's ``module_local_params`` setting: parameters of ``PyroModule`` s live
in the modules that own them, not in Pyro's global parameter store, so two models in one process never
share state and ``save`` / ``load`` round-trip through ``state_dict``.
"""

__version__ = "0.1.0"

import pyro

pyro.settings.set(module_local_params=True)

from . import datasets, de, distributed, nmf, settings  # noqa: E402
from .data import AnnDataSetup, DataError, Minibatch  # noqa: E402
from .distributions import NegativeBinomial, ZeroInflatedNegativeBinomial  # noqa: E402
from .infer import TrainingError, fit  # noqa: E402
from .models import CAPVI, ETM, SCANVI, SCVI, CellAssign  # noqa: E402

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

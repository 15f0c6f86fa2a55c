"""What every method class shares.

A method is two classes in one file: a ``PyroModule`` that owns the parameters and holds the
generative story (``model``) beside its variational family (``guide``), and a user-facing class
derived from :class:`BaseModel`, which registers the AnnData, trains the module with the package's one
driver (:func:`pyro_sc.infer.fit`), saves / loads it, and answers queries.

A subclass writes ``_make_module`` and its queries, and may override ``_elbo`` (the loss),
``_extra_loss`` (the driver's hook for an additional loss term) and ``_train_defaults``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import pyro
import torch
from anndata import AnnData
from pyro.infer import ELBO, TraceEnum_ELBO
from pyro.nn import PyroModule

from .. import __version__
from ..data import AnnDataSetup, Minibatch, iterate_minibatches
from ..infer import fit
from ..metrics import marginal_log_likelihood

__all__ = ["BaseModel"]


class BaseModel:
    """The shared user API: ``m = Method(adata, ...)``, ``m.train()``, queries, ``m.save()``, ``Method.load()``."""

    def __init__(self, setup: AnnDataSetup, **module_kwargs: Any):
        self.setup = setup
        self.module_kwargs = module_kwargs
        self.module: PyroModule = self._make_module(setup, **module_kwargs)
        self.history: pd.DataFrame | None = None
        self.device = torch.device("cpu")

    # ----------------------------------------------------------------------- for subclasses to write
    @classmethod
    def _make_module(cls, setup: AnnDataSetup, **module_kwargs: Any) -> PyroModule:
        """Build the method's PyroModule (with ``model`` and ``guide`` methods) for registered data."""
        raise NotImplementedError

    def _elbo(self) -> ELBO:
        """The loss; ``TraceEnum_ELBO`` sums enumerated discrete latents out exactly."""
        return TraceEnum_ELBO(max_plate_nesting=self.module.max_plate_nesting)

    def _extra_loss(self) -> Callable[[Minibatch], torch.Tensor] | None:
        """An additional loss term for the driver's hook (e.g. a classifier or a penalty); none here."""
        return None

    def _train_defaults(self) -> dict:
        return {}

    @classmethod
    def _setup_from_registry(cls, adata: AnnData, registry: dict, module_kwargs: dict) -> AnnDataSetup:
        """Register new data exactly as the training data was (override when a method transforms it)."""
        return AnnDataSetup.from_registry(adata, registry)

    # ------------------------------------------------------------------------------- model and guide
    def model(self, mb: Minibatch):
        return self.module.model(mb)

    def guide(self, mb: Minibatch):
        return self.module.guide(mb)

    @property
    def adata(self) -> AnnData:
        return self.setup.adata

    @property
    def is_trained(self) -> bool:
        return self.history is not None

    # -------------------------------------------------------------------------------------- training
    def train(self, **fit_kwargs: Any) -> pd.DataFrame:
        """Train with :func:`pyro_sc.infer.fit`; the method's defaults are overridden by ``fit_kwargs``.

        The first ``train`` with a ``seed`` builds the parameters under that seed, so the same seed and
        data give the same model. Training again continues from the current parameters; ``history``
        gets the new epochs appended.
        """
        options = {**self._train_defaults(), **fit_kwargs}
        if not self.is_trained and options.get("seed") is not None:
            pyro.set_rng_seed(options["seed"])
            self.module = self._make_module(self.setup, **self.module_kwargs)
        self.device = torch.device(options.get("device", "cpu"))
        history = fit(
            self.model,
            self.guide,
            self.setup,
            modules=[self.module],
            elbo=options.pop("elbo", None) or self._elbo(),
            extra_loss=options.pop("extra_loss", None) or self._extra_loss(),
            **options,
        )
        if self.history is not None:
            history["epoch"] += int(self.history["epoch"].max())
            history = pd.concat([self.history, history], ignore_index=True)
        self.history = history
        return history

    # --------------------------------------------------------------------------------------- queries
    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError(f"{type(self).__name__} is not trained yet: call .train() first")

    def _setup_for(self, adata: AnnData | None) -> AnnDataSetup:
        """The registered training data, or new data registered the same way (same genes, known batches)."""
        if adata is None or adata is self.setup.adata:
            return self.setup
        return self._setup_from_registry(adata, self.setup.registry(), self.module_kwargs)

    def _minibatches(self, setup: AnnDataSetup, batch_size: int) -> Iterator[Minibatch]:
        """All cells of ``setup`` in order, for queries (call under ``torch.no_grad`` in eval mode)."""
        self.module.eval()
        for idx in iterate_minibatches(np.arange(setup.n_obs), batch_size, shuffle=False):
            yield setup.minibatch(idx, device=self.device)

    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        *,
        n_samples: int = 100,
        batch_size: int = 128,
        seed: int | None = 0,
    ) -> float:
        """Mean over the cells of ``adata`` (default: the training data) of the importance-sampling
        estimate of ``log p(x_n)`` with ``n_samples`` draws of the guide per cell; higher is better.

        New data is registered as the training data was (same genes, known batches), e.g. held-out
        cells. Global latents are held at the guide's value (the MAP for a MAP guide) and enumerated
        discrete latents are summed out exactly; see :func:`pyro_sc.metrics.marginal_log_likelihood`.
        ``seed`` makes the estimate reproducible (the global RNG is left as it was); ``None`` draws afresh.
        """
        self._check_trained()
        setup = self._setup_for(adata)
        ll_n = marginal_log_likelihood(
            self.model, self.guide, setup, n_samples=n_samples, batch_size=batch_size,
            max_plate_nesting=self.module.max_plate_nesting, modules=[self.module], device=self.device,
            seed=seed,
        )
        return float(ll_n.mean())

    # ------------------------------------------------------------------------------ saving, loading
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the parameters, the data registry, the options and the history to one file."""
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        torch.save(
            {
                "class": type(self).__name__,
                "pyro_sc_version": __version__,
                "module_kwargs": self.module_kwargs,
                "registry": self.setup.registry(),
                "state_dict": {k: v.cpu() for k, v in self.module.state_dict().items()},
                "history": None if self.history is None else self.history.to_dict(orient="list"),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, adata: AnnData):
        """Rebuild a saved model on ``adata`` (the same genes; batches among the known ones)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("class") != cls.__name__:
            raise TypeError(f"{path} holds a {saved.get('class')!r} model, not a {cls.__name__}")
        setup = cls._setup_from_registry(adata, saved["registry"], saved["module_kwargs"])
        obj = cls.__new__(cls)
        BaseModel.__init__(obj, setup, **saved["module_kwargs"])
        obj.module.load_state_dict(saved["state_dict"])
        obj.module.eval()
        obj.history = None if saved["history"] is None else pd.DataFrame(saved["history"])
        return obj

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "not trained"
        return f"{type(self).__name__}({self.setup!r}, {state})"

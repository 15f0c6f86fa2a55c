"""What every method class shares.

A method is two classes in one file: a ``PyroModule`` that owns the parameters and holds the
generative story (``model``) beside its variational family (``guide``), and a user-facing class
derived from :class:`BaseModel`, which registers the AnnData, trains the module with the package's one
driver (:func:`pyro_sc.infer.fit`), saves / loads it, and answers queries.

A subclass writes ``_make_module`` and its queries, and may override ``_elbo`` (the loss),
``_extra_loss`` (the driver's hook for an additional loss term) and ``_train_defaults``.

Files written by :meth:`BaseModel.save` carry a format version (:data:`SAVE_FORMAT`) and the package
version; :meth:`BaseModel.load` states its rule for files from other versions.
"""

from __future__ import annotations

import os
import warnings
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

__all__ = ["BaseModel", "SAVE_FORMAT"]

SAVE_FORMAT = 1  # the layout of the files save() writes; bumped whenever it changes (0: before versioning)


class BaseModel:
    """The shared user API: ``m = Method(adata, ...)``, ``m.train()``, queries, ``m.save()``, ``Method.load()``."""

    def __init__(self, setup: AnnDataSetup, **module_kwargs: Any):
        self.setup = setup
        self.module_kwargs = module_kwargs
        self.module: PyroModule = self._make_module(setup, **module_kwargs)
        # The first seeded train() rebuilds this freshly made module under its seed; a module whose
        # parameters were set otherwise (loaded, copied from another model) sets this False.
        self._rebuild_on_seeded_train = True
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

    def _marginal_ll_pair(self) -> tuple[Callable, Callable]:
        """The model and guide whose marginal likelihood :meth:`get_marginal_ll` estimates."""
        return self.model, self.guide

    @classmethod
    def _setup_from_registry(cls, adata: AnnData, registry: dict, module_kwargs: dict) -> AnnDataSetup:
        """Register new data exactly as the training data was (override when a method transforms it)."""
        return AnnDataSetup.from_registry(adata, registry)

    def _build_under_seed(self, seed: int | None) -> None:
        """Rebuild the freshly made module under ``seed`` (once, before the first training)."""
        if not self.is_trained and seed is not None and self._rebuild_on_seeded_train:
            pyro.set_rng_seed(seed)
            self.module = self._make_module(self.setup, **self.module_kwargs)
            self._rebuild_on_seeded_train = False

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
    def train(
        self,
        *,
        checkpoint_every: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None,
        **fit_kwargs: Any,
    ) -> pd.DataFrame:
        """Train with :func:`pyro_sc.infer.fit`; the method's defaults are overridden by ``fit_kwargs``.

        The first ``train`` with a ``seed`` builds the parameters under that seed, so the same seed and
        data give the same model (unless they were set otherwise: loaded, or copied from a trained
        model). Training again continues from the current parameters; ``history`` gets the new epochs
        appended.

        Every ``checkpoint_every`` epochs the whole state of the run is written to ``checkpoint_path``;
        after an interruption, ``train(resume=checkpoint_path, ...)`` with the same options, on a model
        built the same way (e.g. in a new process), continues it to the parameters the uninterrupted run
        would have reached; the history then holds the interrupted run's epochs too.
        """
        options = {
            **self._train_defaults(),
            **fit_kwargs,
            "checkpoint_every": checkpoint_every,
            "checkpoint_path": checkpoint_path,
            "resume": resume,
        }
        self._build_under_seed(options.get("seed"))
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
        model, guide = self._marginal_ll_pair()
        ll_n = marginal_log_likelihood(
            model, guide, setup, n_samples=n_samples, batch_size=batch_size,
            max_plate_nesting=self.module.max_plate_nesting, modules=[self.module], device=self.device,
            seed=seed,
        )
        return float(ll_n.mean())

    # ------------------------------------------------------------------------------ saving, loading
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the parameters, the data registry, the options and the history to one file, with the
        file format (:data:`SAVE_FORMAT`) and the package version."""
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        torch.save(
            {
                "format_version": SAVE_FORMAT,
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
        """Rebuild a saved model on ``adata`` (the same genes; batches among the known ones).

        The rule for files from other versions: a file of a newer format than this package's
        :data:`SAVE_FORMAT` is an error (upgrade pyro_sc); formats up to it are read (format 0, written
        before files were versioned, has the same layout). A file from another package version in a
        readable format loads with a ``UserWarning``; if that version's parameters no longer fit the
        method, the error says so. A file of another class is a ``TypeError``.
        """
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or "class" not in saved or "state_dict" not in saved:
            raise ValueError(
                f"{path} is not a model written by pyro_sc's save() (a training checkpoint is resumed with "
                "train(resume=...))"
            )
        if saved["class"] != cls.__name__:
            raise TypeError(f"{path} holds a {saved['class']!r} model, not a {cls.__name__}")
        file_format, version = saved.get("format_version", 0), saved.get("pyro_sc_version", "unknown")
        if file_format > SAVE_FORMAT:
            raise ValueError(
                f"{path} was written by pyro_sc {version} in file format {file_format}; this pyro_sc "
                f"({__version__}) reads formats up to {SAVE_FORMAT}: upgrade pyro_sc to load it"
            )
        if version != __version__:
            warnings.warn(
                f"{path} was written by pyro_sc {version}, this is {__version__}: its format is readable, "
                "but results may differ from those of the saving version",
                UserWarning,
                stacklevel=2,
            )
        setup = cls._setup_from_registry(adata, saved["registry"], saved["module_kwargs"])
        obj = cls.__new__(cls)
        BaseModel.__init__(obj, setup, **saved["module_kwargs"])
        try:
            obj.module.load_state_dict(saved["state_dict"])
        except RuntimeError as error:
            raise ValueError(
                f"the parameters in {path} (pyro_sc {version}) do not fit this version's {cls.__name__}: "
                f"{error}"
            ) from None
        obj._rebuild_on_seeded_train = False
        obj.module.eval()
        obj.history = None if saved["history"] is None else pd.DataFrame(saved["history"])
        return obj

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "not trained"
        return f"{type(self).__name__}({self.setup!r}, {state})"

"""What every method class shares.

A method is two classes in one file: a ``PyroModule`` that owns the parameters and holds the
generative story (``model``) beside its variational family (``guide``), and a user-facing class
derived from :class:`BaseModel`, which registers the AnnData, trains the module with the package's one
driver (:func:`pyro_sc.infer.fit`), saves / loads it, and answers queries.

A subclass writes ``_make_module`` and its queries, and may override ``_elbo`` (the loss),
``_extra_loss`` (the driver's hook for an additional loss term) and ``_train_defaults``.

**Another guide, the model untouched.** :meth:`BaseModel.set_guide` replaces the guide that training
uses (``guide``) by a Pyro autoguide class built on the method's model, or by any callable taking a
:class:`~pyro_sc.data.Minibatch` (a function, a ``PyroModule``); ``set_guide(None)`` goes back to the
method's own guide (``method_guide``). A subclass may instead override ``guide`` (or ``method_guide``).
The driver trains a custom guide's parameters with the module's, and ``save`` / ``load`` keep them.

Files written by :meth:`BaseModel.save` carry a format version (:data:`SAVE_FORMAT`) and the package
version; :meth:`BaseModel.load` states its rule for files from other versions.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyro
import torch
from anndata import AnnData
from pyro import poutine
from pyro.infer import ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch import nn

from .. import __version__
from ..data import AnnDataSetup, Minibatch, iterate_minibatches
from ..infer import fit
from ..infer.loop import resolve_device
from ..metrics import marginal_log_likelihood
from ..nn import local_params

__all__ = ["BaseModel", "SAVE_FORMAT"]

#: The layout of the files ``save()`` writes; bumped whenever it changes (0: before versioning;
#: 2: the method's own attributes, e.g. CellAssign's restart_losses, SCANVI's pretrained, under "attributes").
SAVE_FORMAT = 2


class BaseModel:
    """The shared user API: ``m = Method(adata, ...)``, ``m.train()``, queries, ``m.save()``, ``Method.load()``."""

    #: module options a file saved before they existed lacks, with the value that file's model had
    _module_kwargs_of_old_files: dict[str, Any] = {}

    def __init__(self, setup: AnnDataSetup, **module_kwargs: Any):
        self.setup = setup
        self.module_kwargs = module_kwargs
        self.module: PyroModule = self._build_module()
        # The first seeded train() rebuilds this freshly made module under its seed; a loaded module sets
        # this False. Parameters copied from another model (_copied_state) are loaded into the rebuilt one.
        self._rebuild_on_seeded_train = True
        self._copied_state: dict[str, torch.Tensor] | None = None
        self._in_training = False  # queries are open while train() runs (for callbacks)
        self.history: pd.DataFrame | None = None
        self.device = torch.device("cpu")
        # set_guide's state: the custom guide (None: the method's own), how it was built from an autoguide
        # class (class, its sites, its options; None otherwise) and a guide module's initial parameters.
        self._custom_guide: Callable | None = None
        self._autoguide_spec: tuple[type, list[str], dict] | None = None
        self._guide_initial_state: dict | None = None
        self._latent_sites: dict[str, bool] | None = None  # the method guide's latent sites -> discrete?
        self._init_attributes()

    # ----------------------------------------------------------------------- for subclasses to write
    @classmethod
    def _make_module(cls, setup: AnnDataSetup, **module_kwargs: Any) -> PyroModule:
        """Build the method's PyroModule (with ``model`` and ``guide`` methods) for registered data."""
        raise NotImplementedError

    def _build_module(self) -> PyroModule:
        """A fresh module for the registered data (:meth:`_make_module`), its parameters local to it."""
        with local_params():
            return self._make_module(self.setup, **self.module_kwargs)

    def _elbo(self) -> ELBO:
        """The loss; ``TraceEnum_ELBO`` sums enumerated discrete latents out exactly."""
        return TraceEnum_ELBO(max_plate_nesting=self.module.max_plate_nesting)

    def _extra_loss(self) -> Callable[[Minibatch], torch.Tensor] | None:
        """An additional loss term for the driver's hook (e.g. a classifier or a penalty); none here."""
        return None

    def _train_defaults(self) -> dict:
        return {}

    def _init_attributes(self) -> None:
        """Set the method's own attributes beside its parameters (the same for a new and a loaded model)."""

    def _saved_attributes(self) -> dict:
        """The attributes :meth:`save` writes and :meth:`load` puts back (plain values)."""
        return {}

    def _marginal_ll_pair(self) -> tuple[Callable, Callable]:
        """The model and guide whose marginal likelihood :meth:`get_marginal_ll` estimates."""
        return self.model, self.guide

    @classmethod
    def _setup_from_registry(cls, adata: AnnData, registry: dict, module_kwargs: dict) -> AnnDataSetup:
        """Register new data exactly as the training data was (override when a method transforms it)."""
        return AnnDataSetup.from_registry(adata, registry)

    def _build_under_seed(self, seed: int | None) -> None:
        """Rebuild the freshly made module (and a custom guide) under ``seed`` (once, before the first training)."""
        if not self.is_trained and seed is not None and self._rebuild_on_seeded_train:
            pyro.set_rng_seed(seed)
            self.module = self._build_module()
            if self._copied_state is not None:  # parameters copied from another model (e.g. SCANVI.from_scvi_model)
                self.module.load_state_dict(self._copied_state, strict=False)
            self._reset_guide()
            self._rebuild_on_seeded_train = False
        self._copied_state = None

    # ------------------------------------------------------------------------------- model and guide
    def model(self, mb: Minibatch):
        """The method's generative model (its module's ``model``)."""
        return self.module.model(mb)

    def method_guide(self, mb: Minibatch):
        """The method's own guide (its module's ``guide``), whatever :meth:`set_guide` installed."""
        return self.module.guide(mb)

    def guide(self, mb: Minibatch):
        """The guide training, validation and the marginal likelihood use: the one :meth:`set_guide`
        installed, else :meth:`method_guide`. An autoguide built from a class samples its sites under the
        KL warm-up weight (as the package's models scale their latent sites); the method's own guide
        samples the latent sites the autoguide does not cover."""
        if self._custom_guide is None:
            return self.method_guide(mb)
        guide = self._custom_guide
        if isinstance(guide, nn.Module):
            # The driver trains a guide module's parameters as those of one of its modules (see
            # _modules); its param statements are hidden from it, as a PyroModule's plain nn.Parameters
            # (e.g. AutoMultivariateNormal's loc) reach them without the constrained/unconstrained pair
            # that infer.collect_parameters reads.
            guide = poutine.block(guide, hide_types=["param"])
        with local_params(*self._modules()[1:]):
            if self._autoguide_spec is None:
                return guide(mb)
            _, sites, _ = self._autoguide_spec
            with poutine.scale(scale=mb.kl_weight):
                values = guide(mb)
        if set(self._guide_latent_sites()) - set(sites):
            poutine.block(self.method_guide, hide=sites)(mb)
        return values

    @property
    def custom_guide(self) -> Callable | None:
        """The guide installed by :meth:`set_guide` (an autoguide built from a class: the autoguide), or None."""
        return self._custom_guide

    def set_guide(
        self, guide: Callable | type | None, *, sites: Sequence[str] | None = None, **autoguide_kwargs: Any
    ) -> "BaseModel":
        """Train (and query) with another guide; the model is left as it is. Returns ``self``.

        ``guide`` is one of

        * a Pyro autoguide **class** (``AutoNormal``, ``AutoDelta``, ``AutoMultivariateNormal``,
          ``AutoLowRankMultivariateNormal``, ...). It is built here on the method's model with every site
          but ``sites`` blocked (``poutine.block(model, expose=sites)``); ``sites`` defaults to the
          continuous latent sites of the method's own guide: CellAssign's ``pi`` and ``delta`` (its cell
          type ``z`` is enumerated in the model, so it stays blocked: an autoguide cannot sample a site
          that is summed out), scVI's ``z`` (and ``l``): one set of parameters per cell, not amortised,
          so for ``AutoNormal`` / ``AutoDelta``, which follow the ``cells`` plate's subsample; the
          ``AutoContinuous`` family (``AutoMultivariateNormal``, ...) handles global sites only. The
          method's own guide goes on sampling its latent sites outside ``sites`` (e.g. a cell type it
          enumerates). ``autoguide_kwargs`` go to the class (e.g. ``init_scale=0.05``). The guide is
          rebuilt whenever the parameters are (the first seeded ``train``, each CellAssign restart).
        * any **callable** taking a :class:`~pyro_sc.data.Minibatch`: a function, a ``PyroModule``, an
          autoguide instance (e.g. ``AutoNormal(poutine.block(m.model, expose=["delta"]))``). It must
          sample every latent site of the model that the model does not enumerate, with the ``cells``
          plate as ``pyro.plate("cells", mb.n_obs, subsample=mb.idx_n)``. The parameters of an
          ``nn.Module`` are trained, saved and put back to their initial values at each restart;
          ``pyro.param`` sites of a plain function are trained (they live in Pyro's global parameter
          store) but cannot be saved.
        * ``None``: the method's own guide again.

        Queries that read the method's own networks (e.g. scVI's latent representation) still use them;
        CellAssign's ``predict`` uses the custom guide's posterior. A subclass may instead override
        ``guide`` (called with the raw minibatch, like ``model``).
        """
        self._custom_guide, self._autoguide_spec, self._guide_initial_state = None, None, None
        if guide is None:
            if sites is not None or autoguide_kwargs:
                raise ValueError("sites= and autoguide options go with an autoguide class, not guide=None")
            return self
        if isinstance(guide, type):
            if not issubclass(guide, AutoGuide):
                raise TypeError(
                    f"a guide class must be a Pyro autoguide (pyro.infer.autoguide), got {guide.__name__}; "
                    "pass a guide instance or function instead"
                )
            available = self._guide_latent_sites()
            chosen = [s for s in available if not self._guide_site_is_discrete(s)] if sites is None else list(sites)
            unknown = [s for s in chosen if s not in available]
            if unknown:
                raise ValueError(
                    f"{unknown} are not latent sites of {type(self).__name__}'s guide; it samples {available}"
                )
            if not chosen:
                raise ValueError(f"no continuous latent site for {guide.__name__} in {type(self).__name__}'s guide")
            self._autoguide_spec = (guide, chosen, dict(autoguide_kwargs))
            self._custom_guide = self._build_autoguide()
        else:
            if sites is not None or autoguide_kwargs:
                raise ValueError("sites= and autoguide options go with an autoguide class, not a guide instance")
            if not callable(guide):
                raise TypeError(f"guide must be callable (taking a Minibatch), got {type(guide).__name__}")
            self._custom_guide = guide
            self._materialize_guide()
        if isinstance(self._custom_guide, nn.Module):
            self._guide_initial_state = copy.deepcopy(self._custom_guide.state_dict())
        return self

    # helpers of set_guide
    @contextmanager
    def _probing(self) -> Iterator[Minibatch]:
        """A few cells to trace the model or a guide on, with every module in eval mode meanwhile (a probe
        must not move batch-norm statistics); the modes are restored after."""
        modules = self._modules()
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            yield self.setup.minibatch(np.arange(min(self.setup.n_obs, 8)), device=self.device)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def _guide_latent_sites(self) -> list[str]:
        """The latent sites the method's own guide samples (not observed, auxiliary or subsample sites)."""
        if self._latent_sites is None:
            with self._probing() as mb, torch.no_grad():
                trace = poutine.trace(self.method_guide).get_trace(mb)
            self._latent_sites = {
                name: bool(getattr(site["fn"].support, "is_discrete", False))
                for name, site in trace.nodes.items()
                if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
                and not site["infer"].get("is_auxiliary")
            }
        return list(self._latent_sites)

    def _guide_site_is_discrete(self, name: str) -> bool:
        self._guide_latent_sites()
        return self._latent_sites[name]

    def _build_autoguide(self) -> Callable:
        guide_class, sites, kwargs = self._autoguide_spec
        if "create_plates" in inspect.signature(guide_class).parameters and "create_plates" not in kwargs:
            # the autoguide's cells plate subsamples the minibatch's cells, as the model's does
            kwargs = {**kwargs, "create_plates": lambda mb: pyro.plate("cells", mb.n_obs, subsample=mb.idx_n)}
        with local_params():
            self._custom_guide = guide_class(poutine.block(self.model, expose=sites), **kwargs)
        self._materialize_guide()
        return self._custom_guide

    def _materialize_guide(self) -> None:
        """Run the custom guide once so lazily made parameters (autoguides) exist, and fail early."""
        if isinstance(self._custom_guide, nn.Module):
            self._custom_guide.to(self.device)
        try:
            with self._probing() as mb, poutine.block():
                self.guide(mb)
        except NotImplementedError as error:
            raise ValueError(
                f"the guide cannot handle {type(self).__name__}'s sites ({error}); cell-level sites need "
                "AutoNormal / AutoDelta or sites=[...] naming global sites only"
            ) from error

    def _reset_guide(self) -> None:
        """A fresh custom guide for freshly made parameters: an autoguide class is built again, a guide
        module gets its initial parameters back."""
        if self._autoguide_spec is not None:
            self._custom_guide = self._build_autoguide()
        elif isinstance(self._custom_guide, nn.Module) and self._guide_initial_state is not None:
            self._custom_guide.load_state_dict(copy.deepcopy(self._guide_initial_state))

    def _modules(self) -> list[nn.Module]:
        """The modules holding the trained parameters: the method's module, and a custom guide module."""
        return [self.module] + ([self._custom_guide] if isinstance(self._custom_guide, nn.Module) else [])

    @property
    def adata(self) -> AnnData:
        """The AnnData the model was built on (registered, never modified)."""
        return self.setup.adata

    @property
    def is_trained(self) -> bool:
        """Whether the model has been trained, or loaded trained (its ``history`` is set)."""
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
        return self._append_history(self._run_fit(**options))

    def _run_fit(
        self, *, model: Callable | None = None, guide: Callable | None = None, extra_loss: Any = "method",
        elbo: ELBO | None = None, **options: Any,
    ) -> pd.DataFrame:
        """One run of :func:`pyro_sc.infer.fit` on this model's modules (queries stay open meanwhile, for
        callbacks); ``model``, ``guide``, ``elbo`` and ``extra_loss`` (``"method"``: :meth:`_extra_loss`;
        a callable, or None for none) default to the method's own."""
        options["device"] = self.device = resolve_device(options.get("device", "auto"))
        self._in_training = True
        try:
            return fit(
                model or self.model,
                guide or self.guide,
                self.setup,
                modules=self._modules(),
                elbo=elbo or self._elbo(),
                extra_loss=self._extra_loss() if isinstance(extra_loss, str) and extra_loss == "method" else extra_loss,
                **options,
            )
        finally:
            self._in_training = False

    def _append_history(self, history: pd.DataFrame) -> pd.DataFrame:
        """``history`` after the epochs trained so far (its epochs renumbered to follow them)."""
        if self.history is not None:
            history["epoch"] += int(self.history["epoch"].max())
            history = pd.concat([self.history, history], ignore_index=True)
        self.history = history
        return history

    # --------------------------------------------------------------------------------------- queries
    def _check_trained(self) -> None:
        if not (self.is_trained or self._in_training):
            raise RuntimeError(f"{type(self).__name__} is not trained yet: call .train() first")

    def _setup_for(self, adata: AnnData | None) -> AnnDataSetup:
        """The registered training data, or new data registered the same way (same genes, known batches)."""
        if adata is None or adata is self.setup.adata:
            return self.setup
        return self._setup_from_registry(adata, self.setup.registry(), self.module_kwargs)

    def _query_cells(self, adata: AnnData | None, indices: Sequence[int] | np.ndarray | None) -> tuple[AnnDataSetup, np.ndarray]:
        """The data a query reads (:meth:`_setup_for`) and the positions of its cells asked for: all, or
        ``indices`` (integer positions in ``adata``, or a boolean mask over its cells), as scvi-tools'
        ``indices=``; a query's rows follow that order."""
        setup = self._setup_for(adata)
        if indices is None:
            return setup, np.arange(setup.n_obs)
        cells = np.asarray(indices)
        if cells.dtype == bool:
            if cells.shape != (setup.n_obs,):
                raise ValueError(f"a boolean indices mask needs one entry per cell ({setup.n_obs}), got shape {cells.shape}")
            cells = np.flatnonzero(cells)
        if cells.ndim != 1 or not (cells.size == 0 or np.issubdtype(cells.dtype, np.integer)):
            raise TypeError(f"indices must be a 1-d sequence of integer positions or a boolean mask, got {cells.dtype} of shape {cells.shape}")
        if cells.size == 0:
            raise ValueError("indices selects no cells")
        if cells.min() < 0 or cells.max() >= setup.n_obs:
            raise IndexError(f"indices must be positions in [0, {setup.n_obs}), got {cells.min()} .. {cells.max()}")
        return setup, cells.astype(np.int64)

    def _minibatches(self, setup: AnnDataSetup, batch_size: int, cells: np.ndarray | None = None) -> Iterator[Minibatch]:
        """Cells ``cells`` of ``setup`` (default all) in order, for queries (call under ``torch.no_grad``;
        the module is put in eval mode)."""
        self.module.eval()
        cells = np.arange(setup.n_obs) if cells is None else cells
        for idx in iterate_minibatches(cells, batch_size, shuffle=False):
            yield setup.minibatch(idx, device=self.device)

    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
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
        ``indices``: the cells to average over (positions or a boolean mask; default all).
        """
        self._check_trained()
        setup, cells = self._query_cells(adata, indices)
        model, guide = self._marginal_ll_pair()
        ll_n = marginal_log_likelihood(
            model, guide, setup, indices=cells, n_samples=n_samples, batch_size=batch_size,
            max_plate_nesting=self.module.max_plate_nesting, modules=self._modules(), device=self.device,
            seed=seed,
        )
        return float(ll_n.mean())

    # ------------------------------------------------------------------------------ saving, loading
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the parameters, the data registry, the options and the history to one file, with the
        file format (:data:`~pyro_sc.models._base.SAVE_FORMAT`) and the package version.

        A custom guide (:meth:`set_guide`) that is an ``nn.Module`` (an autoguide, a ``PyroModule``) is
        written too, its parameters and how it was built (an autoguide class's name and sites); one that
        is a plain function is refused (its ``pyro.param`` sites live in Pyro's global store)."""
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        guide = None
        if self._custom_guide is not None:
            if not isinstance(self._custom_guide, nn.Module):
                raise TypeError(
                    f"the custom guide {getattr(self._custom_guide, '__name__', self._custom_guide)!r} is not an "
                    "nn.Module, so save() cannot find its parameters (pyro.param sites live in Pyro's global "
                    "parameter store): write it as a PyroModule, or pass an autoguide to set_guide()"
                )
            spec = self._autoguide_spec
            guide = {
                "class": spec[0].__name__ if spec else type(self._custom_guide).__name__,
                "sites": list(spec[1]) if spec else None,
                "state_dict": {k: v.cpu() for k, v in self._custom_guide.state_dict().items()},
            }
        torch.save(
            {
                "format_version": SAVE_FORMAT,
                "class": type(self).__name__,
                "pyro_sc_version": __version__,
                "module_kwargs": self.module_kwargs,
                "registry": self.setup.registry(),
                "state_dict": {k: v.cpu() for k, v in self.module.state_dict().items()},
                "history": None if self.history is None else self.history.to_dict(orient="list"),
                "guide": guide,
                "attributes": self._saved_attributes(),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, adata: AnnData, *, guide: Callable | type | None = None):
        """Rebuild a saved model on ``adata`` (the same genes; batches among the known ones).

        A model saved with a custom guide needs ``guide``: the same autoguide class, or a guide module
        built the same way as the saved one (e.g. a new instance of the user's ``PyroModule``); its saved
        parameters are put into it (:meth:`set_guide` installs it). Without ``guide`` that is an error,
        as is a ``guide`` for a file saved without one.

        The rule for files from other versions: a file of a newer format than this package's
        :data:`~pyro_sc.models._base.SAVE_FORMAT` is an error (upgrade pyro_sc); formats up to it are read
        (format 0, written before files were versioned, has the same layout). A file from another package
        version in a readable format loads with a ``UserWarning``; if that version's parameters no longer fit
        the method, the error says so. A file of another class is a ``TypeError``.
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
        module_kwargs = {**cls._module_kwargs_of_old_files, **saved["module_kwargs"]}
        setup = cls._setup_from_registry(adata, saved["registry"], module_kwargs)
        obj = cls.__new__(cls)
        BaseModel.__init__(obj, setup, **module_kwargs)
        try:
            obj.module.load_state_dict(saved["state_dict"])
        except RuntimeError as error:
            raise ValueError(
                f"the parameters in {path} (pyro_sc {version}) do not fit this version's {cls.__name__}: "
                f"{error}"
            ) from None
        obj._rebuild_on_seeded_train = False
        obj._load_guide(path, saved.get("guide"), guide)
        obj.module.eval()
        obj.history = None if saved["history"] is None else pd.DataFrame(saved["history"])
        for name, value in saved.get("attributes", {}).items():  # format 1 files have none: the defaults
            setattr(obj, name, value)
        return obj

    def _load_guide(self, path, saved: dict | None, guide: Callable | type | None) -> None:
        """Install ``guide`` with the custom guide's parameters saved in ``path`` (see :meth:`load`)."""
        if saved is None and guide is None:
            return
        if saved is None:
            raise ValueError(
                f"{path} was saved without a custom guide, so it holds no parameters for the guide passed; "
                "load it without guide= and call set_guide() to train a new one"
            )
        if guide is None:
            raise ValueError(
                f"{path} was saved with a custom guide ({saved['class']}) whose parameters it holds: pass it "
                f"again, e.g. {type(self).__name__}.load(path, adata, guide={saved['class']})"
            )
        if isinstance(guide, type) and saved["sites"] is not None:
            self.set_guide(guide, sites=saved["sites"])
        else:
            self.set_guide(guide)
        if not isinstance(self._custom_guide, nn.Module):
            raise TypeError(
                f"the guide passed is not an nn.Module: it cannot take the saved {saved['class']}'s parameters"
            )
        try:
            self._custom_guide.load_state_dict(saved["state_dict"])
        except RuntimeError as error:
            raise ValueError(
                f"the guide passed does not fit the saved custom guide ({saved['class']}) of {path}: {error}"
            ) from None
        self._guide_initial_state = copy.deepcopy(self._custom_guide.state_dict())
        self._custom_guide.eval()

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "not trained"
        return f"{type(self).__name__}({self.setup!r}, {state})"


class CellTypePredictor:
    """Mixin of the methods that assign cell types (CellAssign, SCANVI, capVI): they write ``predict``
    (cells x types probabilities); :meth:`predict_labels` reads the most probable type from it."""

    def predict_labels(self, adata: AnnData | None = None, *, threshold: float = 0.0, **kwargs) -> pd.Series:
        """The most probable type of each cell, indexed like ``adata``; ``"unassigned"`` where its
        probability is below ``threshold``. Other options pass to :meth:`predict` (for the VAEs,
        ``predict(soft=False)`` gives the same labels as an array, as scvi-tools)."""
        probs = self._probabilities(adata, **kwargs)
        labels = probs.idxmax(axis=1).astype(object)
        labels[probs.max(axis=1) < threshold] = "unassigned"
        return labels.rename("cell_type")

    def _probabilities(self, adata: AnnData | None, **kwargs) -> pd.DataFrame:
        """The cells x types probability table of :meth:`predict`."""
        return self.predict(adata, **kwargs)

    @torch.no_grad()
    def _probability_table(
        self, adata: AnnData | None, logits: Callable[[Minibatch], torch.Tensor], batch_size: int,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> pd.DataFrame:
        """``softmax(logits(mb))`` over the cells of ``adata`` (default: the training data; ``indices``:
        some of them), as a table indexed by cell names."""
        self._check_trained()
        setup, cells = self._query_cells(adata, indices)
        out = [torch.softmax(logits(mb), -1) for mb in self._minibatches(setup, batch_size, cells)]
        return pd.DataFrame(torch.cat(out).cpu().numpy(), index=setup.obs_names[cells], columns=self.setup.label_categories)


class LabelsOrProbabilities(CellTypePredictor):
    """Mixin of the VAEs with types (SCANVI, capVI): ``predict`` as scvi-tools' SCANVI, the labels
    (``soft=False``, the default; an array, so ``adata.obs["pred"] = model.predict()`` works) or the
    cells x types probabilities (``soft=True``)."""

    def _probabilities(self, adata: AnnData | None, **kwargs) -> pd.DataFrame:
        return self.predict(adata, soft=True, **kwargs)

    @staticmethod
    def _labels_or_table(probs: pd.DataFrame, soft: bool) -> np.ndarray | pd.DataFrame:
        return probs if soft else probs.columns.to_numpy()[probs.to_numpy().argmax(1)]

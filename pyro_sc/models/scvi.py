r"""scVI: single-cell variational inference (Lopez et al. 2018, Nature Methods 15:1053).

Generative process for cell :math:`n` of batch :math:`s_n` and gene :math:`g`:

.. math::

    z_n &\sim \mathcal N(0, I_K) \\
    \ell_n &= \textstyle\sum_g x_{ng} \quad\text{(observed, default)} \quad\text{or}\quad
        \ell_n \sim \mathrm{LogNormal}(\nu_{s_n}, \tau^2_{s_n}) \\
    \rho_n &= \mathrm{softmax}(f_w(z_n, s_n)) \qquad \pi_n = f_h(z_n, s_n) \\
    x_{ng} &\sim \mathrm{ZINB}(\mu = \ell_n \rho_{ng},\ \theta_g\ \text{or}\ \theta_{g s_n},\ \mathrm{logit}\,\pi_{ng})
        \quad\text{or}\quad \mathrm{NB}(\ell_n \rho_{ng}, \theta)

with :math:`\nu_s, \tau^2_s` the empirical mean and variance of the log library size in batch
:math:`s`. Nuisance covariates (as scvi-tools' ``categorical_covariate_keys`` /
``continuous_covariate_keys``) enter :math:`f_w, f_h` beside the batch: each categorical one as a
learned offset of every decoder layer, the continuous ones as inputs of its first layer, so the latent
need not carry them. With ``size_factor_key`` the library size :math:`\ell_n` is that column (observed). The guide is amortised: :math:`q(z_n \mid x_n) = \mathcal N(\mu_\phi, \sigma^2_\phi)` and
:math:`q(\ell_n \mid x_n)` log-normal, encoders reading :math:`\log(1 + x_n)`.

The defaults follow the reference implementation (scvi-tools): 10 latent dimensions, one hidden layer
of 128 units, dropout 0.1 in the encoder, per-gene dispersion, observed library size, KL warm-up over
400 epochs, Adam (lr 1e-3, eps 0.01, weight decay 1e-6), analytic KL.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from anndata import AnnData
from pyro import poutine
from pyro.infer import ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule
from torch import nn

from ..data import AnnDataSetup, DataError, Minibatch
from ..distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from ..nn import MLP, GaussianEncoder
from ..infer.schedule import default_warmup_epochs
from ._base import BaseModel

__all__ = ["SCVI", "SCVIModule"]

Likelihood = Literal["zinb", "nb"]
Dispersion = Literal["gene", "gene-batch"]
Covariates = tuple[Sequence[torch.Tensor], "torch.Tensor | None"]
"""A minibatch's nuisance covariates besides the batch: categorical codes (one tensor each), continuous (cells, k)."""


class SCVIModule(PyroModule):
    """scVI's model and guide, and the networks they share. ``max_plate_nesting = 1`` (cells)."""

    max_plate_nesting = 1

    def __init__(
        self,
        n_genes: int,
        *,
        n_batch: int = 1,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        likelihood: Likelihood = "zinb",
        dispersion: Dispersion = "gene",
        latent_library: bool = False,
        encode_covariates: bool = False,
        n_cats_per_cov: Sequence[int] = (),
        n_continuous_cov: int = 0,
        use_size_factor: bool = False,
        library_log_means: Sequence[float] | None = None,
        library_log_vars: Sequence[float] | None = None,
    ):
        super().__init__()
        if likelihood not in ("zinb", "nb"):
            raise ValueError(f"likelihood must be 'zinb' or 'nb', got {likelihood!r}")
        if dispersion not in ("gene", "gene-batch"):
            raise ValueError(f"dispersion must be 'gene' or 'gene-batch', got {dispersion!r}")
        self.n_latent, self.likelihood, self.dispersion = n_latent, likelihood, dispersion
        self.n_cats_per_cov, self.n_continuous_cov = [int(n) for n in n_cats_per_cov], int(n_continuous_cov)
        self.use_size_factor = use_size_factor
        self.latent_library = latent_library and not use_size_factor  # size factors are the library
        covariate_cats = [n_batch, *self.n_cats_per_cov]
        encoder_cats, encoder_cont = (covariate_cats, self.n_continuous_cov) if encode_covariates else ([], 0)
        self.encode_covariates = encode_covariates
        self.z_encoder = GaussianEncoder(
            n_genes, n_latent, n_hidden=n_hidden, n_layers=n_layers, n_cat_list=encoder_cats, n_cont=encoder_cont,
            dropout_rate=dropout_rate,
        )
        if self.latent_library:
            self.l_encoder = GaussianEncoder(
                n_genes, 1, n_hidden=n_hidden, n_layers=1, n_cat_list=encoder_cats, n_cont=encoder_cont,
                dropout_rate=dropout_rate,
            )
        self.decoder = MLP(
            n_latent, n_hidden=n_hidden, n_layers=n_layers, n_cat_list=covariate_cats, n_cont=self.n_continuous_cov,
            dropout_rate=0.0,
        )
        self.rho_head = nn.Linear(n_hidden, n_genes)
        self.zi_head = nn.Linear(n_hidden, n_genes) if likelihood == "zinb" else None
        self.log_theta_gb = nn.Parameter(torch.randn(n_genes, n_batch if dispersion == "gene-batch" else 1))
        means = torch.zeros(n_batch) if library_log_means is None else torch.as_tensor(library_log_means)
        vars_ = torch.ones(n_batch) if library_log_vars is None else torch.as_tensor(library_log_vars)
        self.register_buffer("library_log_mean_b", means.float())
        self.register_buffer("library_log_var_b", vars_.float())

    # ------------------------------------------------------------------------------ shared pieces
    @staticmethod
    def _batch(mb: Minibatch) -> torch.Tensor:
        return mb.batch_n if mb.batch_n is not None else torch.zeros(len(mb), dtype=torch.long, device=mb.x_ng.device)

    def covariates(self, mb: Minibatch) -> Covariates:
        """The cells' nuisance covariates besides the batch: the codes of each categorical one, and the
        continuous ones (cells, n_continuous_cov) or None."""
        cats: list[torch.Tensor] = []
        if self.n_cats_per_cov:
            if mb.cat_covs_nk is None or mb.cat_covs_nk.shape[-1] != len(self.n_cats_per_cov):
                raise ValueError(f"the module takes {len(self.n_cats_per_cov)} categorical covariates; the minibatch has none or another number")
            cats = list(mb.cat_covs_nk.unbind(-1))
        if self.n_continuous_cov and mb.cont_covs_nk is None:
            raise ValueError(f"the module takes {self.n_continuous_cov} continuous covariates; the minibatch has none")
        return cats, (mb.cont_covs_nk if self.n_continuous_cov else None)

    def _encoder_inputs(self, mb: Minibatch) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """What the encoders read besides the counts: batch and covariates if ``encode_covariates``."""
        if not self.encode_covariates:
            return [], None
        cats, cont_nk = self.covariates(mb)
        return [self._batch(mb), *cats], cont_nk

    def encode(self, mb: Minibatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and scale of q(z_n | x_n)."""
        cats, cont_nk = self._encoder_inputs(mb)
        return self.z_encoder(torch.log1p(mb.x_ng), *cats, cont=cont_nk)

    def decode(
        self, z_nk: torch.Tensor, batch_n: torch.Tensor, covariates: Covariates = ([], None)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised expression rho_ng (rows sum to one) and zero-inflation logits (None for NB), given
        the batch and the other covariates (:meth:`covariates`)."""
        cats, cont_nk = covariates
        h = self.decoder(z_nk, batch_n, *cats, cont=cont_nk)
        rho_ng = torch.softmax(self.rho_head(h), dim=-1)
        return rho_ng, (self.zi_head(h) if self.zi_head is not None else None)

    def theta(self, batch_n: torch.Tensor) -> torch.Tensor:
        """Inverse dispersion: (genes,) per gene, or (cells, genes) per gene and batch."""
        theta_gb = self.log_theta_gb.exp()
        return theta_gb[:, 0] if self.dispersion == "gene" else theta_gb.T[batch_n]

    def likelihood_fn(self, mu_ng: torch.Tensor, theta: torch.Tensor, zi_logits_ng: torch.Tensor | None):
        """p(x_ng | mu_ng, theta): the zero-inflated (``likelihood="zinb"``) or plain negative binomial."""
        if self.likelihood == "zinb":
            return ZeroInflatedNegativeBinomial(mu_ng, theta, zi_logits_ng, validate_args=False)
        return NegativeBinomial(mu_ng, theta, validate_args=False)

    def library(self, mb: Minibatch, batch_n: torch.Tensor) -> torch.Tensor:
        """:math:`\\ell_n`, in the model: the size factors (``use_size_factor``), else a draw of the site ``l``
        from its log-normal prior (``latent_library``, not annealed, as scvi-tools), else the total count."""
        if self.use_size_factor:
            return mb.size_factor_n
        if self.latent_library:
            scale_n = self.library_log_var_b[batch_n].sqrt()
            return pyro.sample("l", dist.LogNormal(self.library_log_mean_b[batch_n], scale_n))
        return mb.x_ng.sum(-1)

    def guide_library(self, mb: Minibatch) -> None:
        """q(l_n | x_n), log-normal, when the library size is latent."""
        if self.latent_library:
            cats, cont_nk = self._encoder_inputs(mb)
            l_loc, l_scale = self.l_encoder(torch.log1p(mb.x_ng), *cats, cont=cont_nk)
            pyro.sample("l", dist.LogNormal(l_loc.squeeze(-1), l_scale.squeeze(-1)))

    def prior_z(self, mb: Minibatch) -> dist.Distribution:
        """p(z_n): a standard normal. Override to compose another prior (e.g. a mixture)."""
        zeros = mb.x_ng.new_zeros(self.n_latent)
        return dist.Normal(zeros, 1.0).to_event(1)

    # --------------------------------------------------------------------------------- model, guide
    def model(self, mb: Minibatch):
        """The generative process of the module docstring: z_n from :meth:`prior_z`, the library
        (:meth:`library`), and the counts x_ng from :meth:`likelihood_fn` of the decoded mean."""
        batch_n = self._batch(mb)
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            with poutine.scale(scale=mb.kl_weight):  # the KL warm-up anneals z's term only, as scvi-tools
                z_nk = pyro.sample("z", self.prior_z(mb))
            l_n = self.library(mb, batch_n)
            rho_ng, zi_logits_ng = self.decode(z_nk, batch_n, self.covariates(mb))
            mu_ng = l_n.unsqueeze(-1) * rho_ng
            pyro.sample("x", self.likelihood_fn(mu_ng, self.theta(batch_n), zi_logits_ng).to_event(1), obs=mb.x_ng)

    def guide(self, mb: Minibatch):
        """The amortised guide: q(z_n | x_n) a diagonal normal from the encoder, and q(l_n | x_n) when
        the library size is latent (:meth:`guide_library`)."""
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            loc_nk, scale_nk = self.encode(mb)
            with poutine.scale(scale=mb.kl_weight):
                pyro.sample("z", dist.Normal(loc_nk, scale_nk).to_event(1))
            self.guide_library(mb)


def _with_reference_genes(adata: AnnData, genes: Sequence[str]) -> AnnData:
    """``adata`` with the reference's genes in the reference's order (reordered in a copy if needed)."""
    genes = pd.Index(genes)
    mine = pd.Index(adata.var_names.astype(str))
    if mine.equals(genes):
        return adata
    missing, extra = genes.difference(mine), mine.difference(genes)
    if len(missing) or len(extra):
        parts = [f"{len(missing)} reference genes missing (e.g. {list(missing[:5])})"] if len(missing) else []
        parts += [f"{len(extra)} genes the reference does not know (e.g. {list(extra[:5])})"] if len(extra) else []
        raise DataError(f"the query's genes do not match the reference model's: {', '.join(parts)}; "
                        "subset the query to the reference's genes (and add absent ones as zero counts)")
    if mine.has_duplicates:
        raise DataError("the query has duplicated gene names")
    return adata[:, mine.get_indexer(genes)].copy()


def _query_batches(adata: AnnData, batch_key: str, reference_batches: list[str]) -> list[str]:
    """The query's batches, in their categorical order (else sorted); all must be new."""
    if batch_key not in adata.obs.columns:
        raise DataError(f"the query has no obs column {batch_key!r}, the reference's batch key")
    column = adata.obs[batch_key]
    values = column.astype(str)
    if isinstance(column.dtype, pd.CategoricalDtype):
        batches = [str(c) for c in column.cat.categories if str(c) in set(values)]
    else:
        batches = sorted(set(values))
    reused = [b for b in batches if b in reference_batches]
    if reused:
        raise DataError(f"the query reuses batch names of the reference: {reused}; a query's batches must be "
                        "new (rename them, or train the reference on those cells)")
    return batches


def _widen_into(reference: nn.Module, query: nn.Module, n_reference: int) -> dict[str, int]:
    """Copy ``reference``'s tensors into ``query``'s. A tensor that grew along one dimension (the batch) gets
    the reference's values in its first ``n_reference`` entries and, in the new ones, their mean (a
    parameter) or the query's own values (a buffer: the library-size statistics of the query's batches);
    a parameter the reference lacks (batch weights, when the reference had one batch) starts at zero.
    Returns the parameters that grew, each with its batch dimension."""
    ref_state = reference.state_dict()
    parameters = {name for name, _ in query.named_parameters()}
    grown: dict[str, int] = {}
    with torch.no_grad():
        for name, tensor in query.state_dict(keep_vars=True).items():
            ref = ref_state.get(name)
            if ref is None:
                if name not in parameters:
                    raise ValueError(f"the reference has no {name} to copy")
                tensor.zero_()
                grown[name] = 0  # category weights: (categories, units)
                continue
            if ref.shape == tensor.shape:
                tensor.copy_(ref)
                continue
            dims = [d for d in range(tensor.dim()) if tensor.shape[d] != ref.shape[d]] if tensor.dim() == ref.dim() else []
            if len(dims) != 1 or ref.shape[dims[0]] != n_reference:
                raise ValueError(f"cannot widen the reference's {name} {tuple(ref.shape)} to {tuple(tensor.shape)}")
            dim = dims[0]
            tensor.narrow(dim, 0, n_reference).copy_(ref)
            if name in parameters:
                new = tensor.narrow(dim, n_reference, tensor.shape[dim] - n_reference)
                new.copy_(ref.mean(dim, keepdim=True).expand_as(new))
                grown[name] = dim
    return grown


def _reference_fixed(module: nn.Module, query: dict):
    """What a query model trains: the new batches' entries of the parameters that grew (gradient hooks zero
    the reference's entries; remove them after training); and the modules it holds fixed: every batch
    normalisation but the decoder's."""
    n_reference, grown = query["n_reference_batches"], query["grown"]
    parameters, hooks = [], []
    for name, p in module.named_parameters():
        if name in grown:
            mask = torch.ones_like(p)
            mask.narrow(grown[name], 0, n_reference).zero_()
            hooks.append(p.register_hook(lambda grad, mask=mask: grad * mask))
            parameters.append(p)
    frozen = [m for name, m in module.named_modules() if isinstance(m, nn.BatchNorm1d) and not name.startswith("decoder")]
    return parameters, frozen, hooks


def check_library_options(latent_library: bool, size_factor_key: str | None) -> None:
    if latent_library and size_factor_key is not None:
        raise ValueError(
            f"size_factor_key={size_factor_key!r} gives the library size and latent_library=True would infer it: "
            "choose one"
        )


def covariate_sizes(setup: AnnDataSetup) -> dict:
    """The module options that follow from the registered covariates and size factors."""
    return dict(
        n_cats_per_cov=setup.n_cats_per_covariate, n_continuous_cov=len(setup.continuous_covariate_keys),
        use_size_factor=setup.size_factor_key is not None,
    )


class SCVI(BaseModel):
    """scVI on an AnnData of raw counts.

    Parameters
    ----------
    adata
        Cells x genes, raw counts in ``X`` or ``layer`` (dense, sparse or backed).
    layer, batch_key
        Where the counts are; the ``obs`` column of batches (None: one batch).
    likelihood
        ``"zinb"`` (default) or ``"nb"``.
    dispersion
        ``"gene"`` (default) or ``"gene-batch"``.
    n_latent, n_hidden, n_layers, dropout_rate
        Network sizes (scvi-tools defaults: 10, 128, 1, 0.1).
    latent_library
        Infer the library size with a log-normal prior per batch instead of observing it.
    categorical_covariate_keys, continuous_covariate_keys
        ``obs`` columns of nuisance covariates (e.g. donor; percent mitochondrial, cell-cycle scores), as
        scvi-tools: given to the decoder with the batch, so the latent need not carry them.
    size_factor_key
        A numeric ``obs`` column used as the library size :math:`\\ell_n` instead of the total count
        (linear scale, as scvi-tools; e.g. the total counts of all genes when ``adata`` holds a panel).
    encode_covariates
        Give the batch and the covariates to the encoders too (default: the decoder only).
    allow_non_integer
        Accept non-integer counts (e.g. ambient-corrected data); see :class:`~pyro_sc.data.AnnDataSetup`.
    module_kwargs
        Further options of :attr:`module_class` (a custom module's, e.g. a prior's number of components).

    Notes
    -----
    Another prior, or any other change to the module, is a subclass of :class:`SCVIModule` overriding
    one method (``prior_z``, ``theta``, ``decode``, ...) plugged in as :attr:`module_class`::

        class MoGSCVI(pyro_sc.SCVI):
            module_class = MixturePriorModule

    Examples
    --------
    >>> model = pyro_sc.SCVI(adata, batch_key="condition")
    >>> model.train(max_epochs=100)
    >>> adata.obsm["X_scvi"] = model.get_latent_representation()
    """

    module_class: type[SCVIModule] = SCVIModule
    """The PyroModule built for the data: ``module_class(n_genes, n_batch=..., library_log_means=...,
    library_log_vars=..., **options)``; a subclass of SCVI sets its own."""

    def __init__(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        likelihood: Likelihood = "zinb",
        dispersion: Dispersion = "gene",
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        latent_library: bool = False,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        size_factor_key: str | None = None,
        encode_covariates: bool = False,
        allow_non_integer: bool = False,
        module_kwargs: dict | None = None,
    ):
        check_library_options(latent_library, size_factor_key)
        setup = AnnDataSetup(
            adata, layer=layer, batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys, size_factor_key=size_factor_key,
            allow_non_integer=allow_non_integer,
        )
        options = dict(
            likelihood=likelihood, dispersion=dispersion, n_latent=n_latent, n_hidden=n_hidden,
            n_layers=n_layers, dropout_rate=dropout_rate, latent_library=latent_library,
            encode_covariates=encode_covariates,
        )
        clash = sorted(set(module_kwargs or {}) & set(options))
        if clash:
            raise ValueError(f"module_kwargs repeats options of SCVI itself: {clash}; pass them as arguments")
        super().__init__(setup, **options, **(module_kwargs or {}))

    @classmethod
    def _make_module(cls, setup: AnnDataSetup, **kwargs) -> SCVIModule:
        means, vars_ = setup.log_library_stats()
        return cls.module_class(
            setup.n_vars, n_batch=setup.n_batch, library_log_means=means, library_log_vars=vars_,
            **covariate_sizes(setup), **kwargs,
        )

    def _elbo(self) -> ELBO:
        # No discrete latents; the KL of the Gaussian latents is computed in closed form, as in scVI.
        return TraceMeanField_ELBO(max_plate_nesting=self.module.max_plate_nesting)

    def _train_defaults(self) -> dict:
        # a query model (load_query_data) trains without weight decay, which would move the reference's weights
        weight_decay = 0.0 if self._query is not None else 1e-6
        return {"lr": 1e-3, "eps": 0.01, "weight_decay": weight_decay, "batch_size": 128, "train_size": 0.9}

    def _init_attributes(self) -> None:
        # load_query_data's model: {"n_reference_batches": n, "unfrozen": bool, "grown": {parameter: batch
        # dimension}}; None otherwise. Saved.
        self._query: dict | None = None

    def _saved_attributes(self) -> dict:
        return {"_query": self._query}

    # ---------------------------------------------------------------------------- query mapping
    @classmethod
    def load_query_data(cls, adata: AnnData, reference_model: "SCVI", *, unfrozen: bool = False) -> "SCVI":
        """A model of new cells (a query) on a trained reference model, as scArches / scvi-tools'
        ``load_query_data``: the reference's networks, with their batch inputs widened for the query's new
        batches. Train it with :meth:`train` (on the query cells only).

        By default only what belongs to the new batches trains: their weights in every layer the batch
        enters (decoder; encoders too with ``encode_covariates``) and their dispersions
        (``dispersion="gene-batch"``); everything of the reference stays as it was, the encoders' batch
        normalisation included (the decoder's running statistics follow the query, as scvi-tools'
        default). New batches start as the mean of the reference's batches. ``unfrozen=True`` trains
        every parameter: on ifnb_2800 (CTRL reference, STIM query, 3 seeds, ``benchmarks/query_ifnb.py``) a
        SCANVI query trained so for 100 epochs labelled STIM within 0.2-0.8 points of a de novo SCANVI at
        about a tenth of its time; only the new batch's weights, 50 epochs: 2.3-4.6 points below. A SCANVI
        query keeps the reference's classifier, so :meth:`SCANVI.predict <pyro_sc.SCANVI.predict>` transfers the reference's labels to the query's
        cells; query cells without a labels column are unlabelled.

        The query must have the reference's genes: the same set in another order is reordered (a copy of
        ``adata``; the user's is left as it is); missing or extra genes are an error (subset or pad the
        query first). Its batches must all be new, and its covariates among the reference's categories.
        """
        if not isinstance(reference_model, cls):
            raise TypeError(f"load_query_data needs a trained pyro_sc.{cls.__name__} as the reference, "
                            f"got {type(reference_model).__name__}")
        reference_model._check_trained()
        registry = reference_model.setup.registry()
        if registry["batch_key"] is None:
            raise ValueError("the reference model was set up without batch_key, so it has no batch inputs to widen "
                             "for the query's batches: train the reference with batch_key=...")
        adata = _with_reference_genes(adata, registry["var_names"])
        reference_batches = list(registry["batch_categories"])
        new_batches = _query_batches(adata, registry["batch_key"], reference_batches)
        adata = cls._query_labels(adata, registry)
        setup = cls._setup_from_registry(adata, {**registry, "batch_categories": reference_batches + new_batches},
                                         reference_model.module_kwargs)
        model = cls.__new__(cls)
        BaseModel.__init__(model, setup, **reference_model.module_kwargs)
        grown = _widen_into(reference_model.module, model.module, len(reference_batches))
        model._query = {"n_reference_batches": len(reference_batches), "unfrozen": bool(unfrozen), "grown": grown}
        model._rebuild_on_seeded_train = False
        return model

    @classmethod
    def _query_labels(cls, adata: AnnData, registry: dict) -> AnnData:
        """The query as the method reads it (SCANVI: with a labels column)."""
        return adata

    def _run_fit(self, **options):
        if self._query is None or self._query["unfrozen"]:
            return super()._run_fit(**options)
        parameters, frozen, hooks = _reference_fixed(self.module, self._query)
        # the reference's parameters need no gradients (the backward pass then skips what only they need)
        trained = {id(p) for p in parameters}
        held = [p for p in self.module.parameters() if p.requires_grad and id(p) not in trained]
        for p in held:
            p.requires_grad_(False)
        try:
            return super()._run_fit(parameters=parameters, frozen=[*options.pop("frozen", ()), *frozen], **options)
        finally:
            for hook in hooks:
                hook.remove()
            for p in held:
                p.requires_grad_(True)

    def train(
        self,
        *,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        n_epochs_kl_warmup: float | Literal["auto"] | None = "auto",
        early_stopping: bool = False,
        train_size: float = 0.9,
        seed: int | None = 0,
        device: str = "auto",
        progress_bar: bool = True,
        **fit_kwargs,
    ) -> pd.DataFrame:
        """Train by SVI (see :func:`pyro_sc.infer.fit` for every option).

        ``max_epochs`` defaults to scvi-tools' rule, ``min(round(20000 / n_cells * 400), 400)``.
        The KL weight of z grows linearly over ``n_epochs_kl_warmup`` epochs (counted in steps; None: no
        warm-up); ``"auto"`` is :func:`pyro_sc.infer.schedule.default_warmup_epochs`,
        ``min(400, ceil(max_epochs / 2))``, so the second half of the run is on the ELBO itself at any
        data size (scvi-tools' 400 epochs never finish above 20,000 cells).
        """
        n_obs = self.setup.n_obs
        if max_epochs is None:
            max_epochs = int(min(round(20000 / n_obs * 400), 400))
        if n_epochs_kl_warmup == "auto":
            n_epochs_kl_warmup = default_warmup_epochs(max_epochs)
        return super().train(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr, kl_warmup_epochs=n_epochs_kl_warmup,
            early_stopping=early_stopping, train_size=train_size, seed=seed, device=device,
            progress_bar=progress_bar, **fit_kwargs,
        )

    # --------------------------------------------------------------------------------------- queries
    @torch.no_grad()
    def get_latent_representation(
        self, adata: AnnData | None = None, *, indices: Sequence[int] | np.ndarray | None = None,
        give_mean: bool = True, batch_size: int = 1024,
    ) -> np.ndarray:
        """The posterior mean of z (or one sample, ``give_mean=False``) for every cell of ``adata``
        (default: the training data; ``indices``: those cells, positions or a boolean mask): (cells, n_latent)."""
        self._check_trained()
        setup, cells = self._query_cells(adata, indices)
        out = []
        for mb in self._minibatches(setup, batch_size, cells):
            loc_nk, scale_nk = self.module.encode(mb)
            out.append(loc_nk if give_mean else dist.Normal(loc_nk, scale_nk).sample())
        return torch.cat(out).cpu().numpy()

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        library_size: float = 1.0,
        n_samples: int = 1,
        transform_batch: str | None = None,
        transform_covariates: dict[str, Any] | None = None,
        gene_list: Sequence[str] | None = None,
        return_mean: bool = True,
        batch_size: int = 1024,
    ) -> pd.DataFrame | np.ndarray:
        """Decoded expression ``library_size * rho_ng``, denoised and (optionally) as if in one batch.

        With ``n_samples > 1`` z is sampled from the guide; ``return_mean=False`` then returns an array
        (n_samples, cells, genes), otherwise the mean over samples as a DataFrame (cells x genes).
        ``indices`` selects cells of ``adata`` (positions or a boolean mask; default all).
        ``transform_covariates`` decodes every cell as if its covariates had the values given (a dict
        ``{key: value}`` over registered covariates, e.g. ``{"percent_mito": 0.0, "donor": "d1"}``), as
        ``transform_batch`` does for the batch: the expression with their effect removed.
        """
        self._check_trained()
        setup, cells = self._query_cells(adata, indices)
        genes = setup.var_names
        gene_idx = np.arange(setup.n_vars) if gene_list is None else genes.get_indexer(list(gene_list))
        if (gene_idx < 0).any():
            raise KeyError(f"genes not in the model: {[g for g, i in zip(gene_list, gene_idx) if i < 0][:10]}")
        if transform_batch is not None:
            if setup.batch_categories is None or transform_batch not in setup.batch_categories:
                known = [] if setup.batch_categories is None else list(setup.batch_categories)
                raise KeyError(f"unknown batch {transform_batch!r}; known: {known}")
            batch_code = int(setup.batch_categories.get_loc(transform_batch))
        set_covariates = self._covariate_setter(setup, transform_covariates or {})
        out = []
        for mb in self._minibatches(setup, batch_size, cells):
            loc_nk, scale_nk = self.module.encode(mb)
            z_snk = dist.Normal(loc_nk, scale_nk).sample((n_samples,)) if n_samples > 1 else loc_nk[None]
            batch_n = self.module._batch(mb) if transform_batch is None else torch.full_like(mb.idx_n, batch_code)
            covariates = set_covariates(self.module.covariates(mb))
            rho_sng = torch.stack([self.module.decode(z_nk, batch_n, covariates)[0] for z_nk in z_snk])
            out.append(library_size * rho_sng[..., gene_idx])
        rho_sng = torch.cat(out, dim=1).cpu().numpy()
        if not return_mean:
            return rho_sng
        return pd.DataFrame(rho_sng.mean(0), index=setup.obs_names[cells], columns=genes[gene_idx])

    @staticmethod
    def _covariate_setter(setup: AnnDataSetup, values: dict[str, Any]) -> Callable[[Covariates], Covariates]:
        """A function putting ``values`` (covariate key -> value) in place of the cells' own covariates."""
        cat_keys, cont_keys = setup.categorical_covariate_keys, setup.continuous_covariate_keys
        unknown = sorted(set(values) - set(cat_keys) - set(cont_keys))
        if unknown:
            raise KeyError(f"transform_covariates names keys that are not registered covariates: {unknown}; "
                           f"registered: {cat_keys + cont_keys}")
        codes = {}
        for key in set(values) & set(cat_keys):
            categories = setup.categorical_covariate_categories[key]
            if str(values[key]) not in categories:
                raise KeyError(f"unknown value {values[key]!r} of covariate {key!r}; known: {list(categories)}")
            codes[cat_keys.index(key)] = int(categories.get_loc(str(values[key])))
        conts = {cont_keys.index(key): float(values[key]) for key in set(values) & set(cont_keys)}

        def set_covariates(covariates: Covariates) -> Covariates:
            cats, cont_nk = covariates
            cats = [torch.full_like(c, codes[i]) if i in codes else c for i, c in enumerate(cats)]
            if conts:
                cont_nk = cont_nk.clone()
                for i, value in conts.items():
                    cont_nk[:, i] = value
            return cats, cont_nk

        return set_covariates

    def differential_expression(
        self, adata: AnnData | None = None, groupby: str | None = None, group1=None, group2=None,
        idx1=None, idx2=None, **kwargs,
    ) -> pd.DataFrame:
        """Differential expression as scvi-tools' ``model.differential_expression``: every group of
        ``groupby`` against the rest (``group1=None``), ``group1`` (one or a list) against the rest or
        ``group2``, or cells ``idx1`` against ``idx2`` / the rest.

        Delegates to :func:`pyro_sc.de.differential_expression`, which documents every option, the
        columns (scvi-tools' names) and what differs from scvi-tools on purpose.

        >>> model.differential_expression(groupby="cell_type")  # one-vs-rest, one block per type
        >>> model.differential_expression(groupby="cell_type", group1="B", group2="CD14 Mono", mode="change")
        """
        from ..de import differential_expression

        return differential_expression(
            self, adata, groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2, **kwargs
        )

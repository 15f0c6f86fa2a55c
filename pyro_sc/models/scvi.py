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
:math:`s`. The guide is amortised: :math:`q(z_n \mid x_n) = \mathcal N(\mu_\phi, \sigma^2_\phi)` and
:math:`q(\ell_n \mid x_n)` log-normal, encoders reading :math:`\log(1 + x_n)`.

The defaults follow the reference implementation (scvi-tools): 10 latent dimensions, one hidden layer
of 128 units, dropout 0.1 in the encoder, per-gene dispersion, observed library size, KL warm-up over
400 epochs, Adam (lr 1e-3, eps 0.01, weight decay 1e-6), analytic KL.
"""

from __future__ import annotations

from typing import Literal, Sequence

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

from ..data import AnnDataSetup, Minibatch
from ..distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from ..nn import MLP, GaussianEncoder
from ..infer.schedule import default_warmup_epochs
from ._base import BaseModel

__all__ = ["SCVI", "SCVIModule"]

Likelihood = Literal["zinb", "nb"]
Dispersion = Literal["gene", "gene-batch"]


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
        library_log_means: Sequence[float] | None = None,
        library_log_vars: Sequence[float] | None = None,
    ):
        super().__init__()
        if likelihood not in ("zinb", "nb"):
            raise ValueError(f"likelihood must be 'zinb' or 'nb', got {likelihood!r}")
        if dispersion not in ("gene", "gene-batch"):
            raise ValueError(f"dispersion must be 'gene' or 'gene-batch', got {dispersion!r}")
        self.n_latent, self.likelihood, self.dispersion = n_latent, likelihood, dispersion
        self.latent_library = latent_library
        encoder_cats = [n_batch] if encode_covariates else []
        self.encode_covariates = encode_covariates
        self.z_encoder = GaussianEncoder(
            n_genes, n_latent, n_hidden=n_hidden, n_layers=n_layers, n_cat_list=encoder_cats,
            dropout_rate=dropout_rate,
        )
        if latent_library:
            self.l_encoder = GaussianEncoder(
                n_genes, 1, n_hidden=n_hidden, n_layers=1, n_cat_list=encoder_cats, dropout_rate=dropout_rate
            )
        self.decoder = MLP(n_latent, n_hidden=n_hidden, n_layers=n_layers, n_cat_list=[n_batch], dropout_rate=0.0)
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

    def encode(self, mb: Minibatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and scale of q(z_n | x_n)."""
        cats = [self._batch(mb)] if self.encode_covariates else []
        return self.z_encoder(torch.log1p(mb.x_ng), *cats)

    def decode(self, z_nk: torch.Tensor, batch_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised expression rho_ng (rows sum to one) and zero-inflation logits (None for NB)."""
        h = self.decoder(z_nk, batch_n)
        rho_ng = torch.softmax(self.rho_head(h), dim=-1)
        return rho_ng, (self.zi_head(h) if self.zi_head is not None else None)

    def theta(self, batch_n: torch.Tensor) -> torch.Tensor:
        """Inverse dispersion: (genes,) per gene, or (cells, genes) per gene and batch."""
        theta_gb = self.log_theta_gb.exp()
        return theta_gb[:, 0] if self.dispersion == "gene" else theta_gb.T[batch_n]

    def likelihood_fn(self, mu_ng: torch.Tensor, theta: torch.Tensor, zi_logits_ng: torch.Tensor | None):
        if self.likelihood == "zinb":
            return ZeroInflatedNegativeBinomial(mu_ng, theta, zi_logits_ng, validate_args=False)
        return NegativeBinomial(mu_ng, theta, validate_args=False)

    def prior_z(self, mb: Minibatch) -> dist.Distribution:
        """p(z_n): a standard normal. Override to compose another prior (e.g. a mixture)."""
        zeros = mb.x_ng.new_zeros(self.n_latent)
        return dist.Normal(zeros, 1.0).to_event(1)

    # --------------------------------------------------------------------------------- model, guide
    def model(self, mb: Minibatch):
        batch_n = self._batch(mb)
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            with poutine.scale(scale=mb.kl_weight):  # the KL warm-up anneals z's term only, as scvi-tools
                z_nk = pyro.sample("z", self.prior_z(mb))
            if self.latent_library:
                loc_n = self.library_log_mean_b[batch_n]
                scale_n = self.library_log_var_b[batch_n].sqrt()
                l_n = pyro.sample("l", dist.LogNormal(loc_n, scale_n))
            else:
                l_n = mb.x_ng.sum(-1)
            rho_ng, zi_logits_ng = self.decode(z_nk, batch_n)
            mu_ng = l_n.unsqueeze(-1) * rho_ng
            pyro.sample("x", self.likelihood_fn(mu_ng, self.theta(batch_n), zi_logits_ng).to_event(1), obs=mb.x_ng)

    def guide(self, mb: Minibatch):
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            loc_nk, scale_nk = self.encode(mb)
            with poutine.scale(scale=mb.kl_weight):
                pyro.sample("z", dist.Normal(loc_nk, scale_nk).to_event(1))
            if self.latent_library:
                cats = [self._batch(mb)] if self.encode_covariates else []
                l_loc, l_scale = self.l_encoder(torch.log1p(mb.x_ng), *cats)
                pyro.sample("l", dist.LogNormal(l_loc.squeeze(-1), l_scale.squeeze(-1)))


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
    encode_covariates
        Give the batch to the encoder too (default: the decoder only).
    allow_non_integer
        Accept non-integer counts (e.g. ambient-corrected data); see :class:`~pyro_sc.data.AnnDataSetup`.
    module_kwargs
        Further options of :attr:`module_class` (a custom module's, e.g. a prior's number of components).

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
        encode_covariates: bool = False,
        allow_non_integer: bool = False,
        module_kwargs: dict | None = None,
    ):
        setup = AnnDataSetup(adata, layer=layer, batch_key=batch_key, allow_non_integer=allow_non_integer)
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
            setup.n_vars, n_batch=setup.n_batch, library_log_means=means, library_log_vars=vars_, **kwargs
        )

    def _elbo(self) -> ELBO:
        # No discrete latents; the KL of the Gaussian latents is computed in closed form, as in scVI.
        return TraceMeanField_ELBO(max_plate_nesting=self.module.max_plate_nesting)

    def _train_defaults(self) -> dict:
        return {"lr": 1e-3, "eps": 0.01, "weight_decay": 1e-6, "batch_size": 128, "train_size": 0.9}

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
        gene_list: Sequence[str] | None = None,
        return_mean: bool = True,
        batch_size: int = 1024,
    ) -> pd.DataFrame | np.ndarray:
        """Decoded expression ``library_size * rho_ng``, denoised and (optionally) as if in one batch.

        With ``n_samples > 1`` z is sampled from the guide; ``return_mean=False`` then returns an array
        (n_samples, cells, genes), otherwise the mean over samples as a DataFrame (cells x genes).
        ``indices`` selects cells of ``adata`` (positions or a boolean mask; default all).
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
        out = []
        for mb in self._minibatches(setup, batch_size, cells):
            loc_nk, scale_nk = self.module.encode(mb)
            z_snk = dist.Normal(loc_nk, scale_nk).sample((n_samples,)) if n_samples > 1 else loc_nk[None]
            batch_n = self.module._batch(mb) if transform_batch is None else torch.full_like(mb.idx_n, batch_code)
            rho_sng = torch.stack([self.module.decode(z_nk, batch_n)[0] for z_nk in z_snk])
            out.append(library_size * rho_sng[..., gene_idx])
        rho_sng = torch.cat(out, dim=1).cpu().numpy()
        if not return_mean:
            return rho_sng
        return pd.DataFrame(rho_sng.mean(0), index=setup.obs_names[cells], columns=genes[gene_idx])

    def differential_expression(self, adata: AnnData | None = None, **kwargs) -> pd.DataFrame:
        """Differential expression between two groups of cells (``groupby``, ``group1``, ``group2``, ...).

        Delegates to :func:`pyro_sc.de.differential_expression`, which documents every option.

        >>> model.differential_expression(groupby="cell_type", group1="B", group2="CD14 Mono")
        """
        from ..de import differential_expression

        return differential_expression(self, adata, **kwargs)

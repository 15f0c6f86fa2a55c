r"""The semi-supervised VAE of single-cell counts with cell type :math:`y`, latents :math:`z_1, z_2` and
library :math:`\ell` (the scANVI family: Kingma et al. 2014's M1 + M2 stacked model, as applied to scRNA-seq
by Xu et al. 2021, Molecular Systems Biology 17:e9620).

Generative process for cell :math:`n` of batch :math:`s_n` and gene :math:`g`:

.. math::

    y_n &\sim \mathrm{Categorical}(\pi_y) \qquad z_{2,n} \sim \mathcal N(0, I) \\
    z_{1,n} \mid z_{2,n}, y_n &\sim \mathcal N\big(\mu_\psi(z_{2,n}, y_n),\ \sigma^2_\psi(z_{2,n}, y_n)\big) \\
    \ell_n &= \textstyle\sum_g x_{ng} \ \text{(observed, default)} \quad\text{or}\quad
        \ell_n \sim \mathrm{LogNormal}(\nu_{s_n}, \tau^2_{s_n}) \\
    x_{ng} \mid z_{1,n}, \ell_n &\sim \mathrm{ZINB}\big(\ell_n \rho_{ng}, \theta_g, \pi_{ng}\big),
        \quad \rho_n = \mathrm{softmax}(f_w(z_{1,n}, s_n)) \ \text{(or NB)}

**It is** :math:`z_1` **that is decoded into counts** (scvi-tools' convention, which this module
follows so that a trained scVI's encoder / decoder carry over as they are); :math:`z_2` only structures
:math:`z_1` by cell type. :math:`\pi_y` is fixed at the labelled cells' type frequencies (default),
uniform, or a parameter (``label_prior``).

Guide: :math:`q(z_1 \mid x)\, q(\ell \mid x)\, q(y \mid z_1)\, q(z_2 \mid z_1, y)`, all networks (the
first two are scVI's encoders). A labelled cell's :math:`y` is observed; an unlabelled cell's is
enumerated *in the guide* (``infer={"enumerate": "parallel"}``), so ``TraceEnum_ELBO`` computes
:math:`\sum_y q(y \mid z_1)\,[\log p(\cdot, y) - \log q(\cdot, y)]` exactly rather than by sampling.
In Pyro this is one site with ``obs_mask``: the model's ``y`` is observed where the label is known
and its latent part ``y_unobserved`` is proposed by the guide for the others (for a labelled cell the
guide's ``y_unobserved`` is a point mass on its label, see :func:`known_labels_as_point_masses`).

Labelled cells add the classification term of Kingma et al. (weight ``classification_ratio``,
default 50 as scvi-tools): the cross-entropy of :math:`q(y \mid \bar z_1)` at the posterior-mean
:math:`\bar z_1`, over a minibatch of labelled cells drawn at every step, through the driver's
``extra_loss`` hook.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from anndata import AnnData
from pyro import poutine
from pyro.infer import ELBO, TraceEnum_ELBO
from torch import nn

from ..data import AnnDataSetup, DataError, Minibatch
from ..nn import MLP, GaussianEncoder
from ._base import BaseModel, LabelsOrProbabilities
from .scvi import SCVI, Dispersion, Likelihood, SCVIModule, check_library_options, covariate_sizes

__all__ = ["SCANVI", "SCANVIModule", "known_labels_as_point_masses", "without_labels"]


def without_labels(mb: Minibatch) -> Minibatch:
    """The minibatch with every cell's type unknown."""
    return dataclasses.replace(mb, y_n=None)


def known_labels_as_point_masses(
    logits_nc: torch.Tensor, y_obs_n: torch.Tensor, labelled_n: torch.Tensor
) -> torch.Tensor:
    """The guide's logits of an enumerated cell type, with each labelled cell's put on its label.

    The guide enumerates the type of every cell of the minibatch; ``TraceEnum_ELBO`` weights each value
    by its guide probability. A labelled cell's distribution is a point mass on its label (the model
    observes it there), so the other values get weight exactly zero: logits of -1e4, finite, so that
    ``q log q`` is 0, not NaN.
    """
    point_nc = torch.full_like(logits_nc, -1e4).scatter(-1, y_obs_n.unsqueeze(-1), 0.0)
    return torch.where(labelled_n.unsqueeze(-1), point_nc, logits_nc)


class SCANVIModule(SCVIModule):
    """The semi-supervised VAE: scVI's encoders and decoder (inherited) plus the classifier
    :math:`q(y \\mid z_1)`, the encoder :math:`q(z_2 \\mid z_1, y)` and the prior network
    :math:`p(z_1 \\mid z_2, y)`. ``max_plate_nesting = 1`` (cells)."""

    max_plate_nesting = 1

    def __init__(
        self,
        n_genes: int,
        *,
        n_labels: int,
        classifier_n_hidden: int = 128,
        classification_ratio: float = 50.0,
        class_weights: str | None = None,
        label_prior: str = "labelled",
        label_proportions: Sequence[float] | None = None,
        **scvi_kwargs,
    ):
        super().__init__(n_genes, **scvi_kwargs)
        if n_labels < 2:
            raise ValueError(f"the semi-supervised VAE needs at least 2 cell types, got {n_labels}")
        if class_weights not in (None, "balanced"):
            raise ValueError(f"class_weights must be None or 'balanced', got {class_weights!r}")
        if label_prior not in ("uniform", "labelled", "learned"):
            raise ValueError(f"label_prior must be 'uniform', 'labelled' or 'learned', got {label_prior!r}")
        self.n_labels = n_labels
        self.classification_ratio, self.class_weights = float(classification_ratio), class_weights
        n_latent, n_hidden = self.n_latent, scvi_kwargs.get("n_hidden", 128)
        dropout = scvi_kwargs.get("dropout_rate", 0.1)
        self.classifier = nn.Sequential(
            MLP(n_latent, n_hidden=classifier_n_hidden, dropout_rate=dropout), nn.Linear(classifier_n_hidden, n_labels)
        )
        self.z2_encoder = GaussianEncoder(
            n_latent, n_latent, n_hidden=n_hidden, n_cat_list=[n_labels], dropout_rate=dropout
        )
        self.z1_prior_net = GaussianEncoder(n_latent, n_latent, n_hidden=n_hidden, n_cat_list=[n_labels], dropout_rate=0.0)
        # logits of pi_y: fixed at uniform or at label_proportions, or a parameter (the type proportions,
        # fitted by the ELBO) starting from label_proportions
        start_y = np.full(n_labels, 1.0 / n_labels) if label_proportions is None else label_proportions
        logits_y = torch.as_tensor(np.log(np.asarray(start_y, dtype=np.float64))).float()
        if label_prior == "uniform":
            self.register_buffer("logits_pi_y", torch.zeros(n_labels))
        elif label_prior == "labelled":
            self.register_buffer("logits_pi_y", logits_y)
        else:
            self.logits_pi_y = nn.Parameter(logits_y)

    @staticmethod
    def _labels(mb: Minibatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Label codes (0 where unknown) and the mask of labelled cells."""
        y_n = mb.y_n if mb.y_n is not None else torch.full((len(mb),), -1, dtype=torch.long, device=mb.x_ng.device)
        return y_n.clamp(min=0), y_n >= 0

    def classify(self, z1_nk: torch.Tensor) -> torch.Tensor:
        """Logits of q(y | z1): (..., n_labels)."""
        return self.classifier(z1_nk)

    def model(self, mb: Minibatch):
        """The generative process of the module docstring: y_n (observed where labelled, else enumerated),
        z2_n, z1_n | z2_n, y_n, the library and the counts x_ng decoded from z1_n."""
        batch_n = self._batch(mb)
        y_obs_n, labelled_n = self._labels(mb)
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            y_n = pyro.sample(
                "y", dist.Categorical(logits=self.logits_pi_y).expand([len(mb)]), obs=y_obs_n, obs_mask=labelled_n
            )
            with poutine.scale(scale=mb.kl_weight):
                z2_nk = pyro.sample("z2", dist.Normal(mb.x_ng.new_zeros(self.n_latent), 1.0).to_event(1))
                loc_nk, scale_nk = self.z1_prior_net(z2_nk, y_n)  # broadcasts over the enumerated y
                z1_nk = pyro.sample("z1", dist.Normal(loc_nk, scale_nk).to_event(1))
            l_n = self.library(mb, batch_n)
            rho_ng, zi_logits_ng = self.decode(z1_nk, batch_n, self.covariates(mb))
            mu_ng = l_n.unsqueeze(-1) * rho_ng
            pyro.sample("x", self.likelihood_fn(mu_ng, self.theta(batch_n), zi_logits_ng).to_event(1), obs=mb.x_ng)

    def guide(self, mb: Minibatch):
        """q(z1_n | x_n), q(l_n | x_n), q(y_n | z1_n) (the known labels as point masses, the others
        enumerated) and q(z2_n | z1_n, y_n)."""
        y_obs_n, labelled_n = self._labels(mb)
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            with poutine.scale(scale=mb.kl_weight):
                loc_nk, scale_nk = self.encode(mb)
                z1_nk = pyro.sample("z1", dist.Normal(loc_nk, scale_nk).to_event(1))
            self.guide_library(mb)
            logits_nc = known_labels_as_point_masses(self.classify(z1_nk), y_obs_n, labelled_n)
            y_n = pyro.sample("y_unobserved", dist.Categorical(logits=logits_nc), infer={"enumerate": "parallel"})
            with poutine.scale(scale=mb.kl_weight):
                loc2, scale2 = self.z2_encoder(z1_nk, y_n)
                pyro.sample("z2", dist.Normal(loc2, scale2).to_event(1))


class SCANVI(SCVI, LabelsOrProbabilities):
    """The semi-supervised VAE on an AnnData of raw counts with partly known cell types.

    Parameters
    ----------
    adata
        Cells x genes, raw counts in ``X`` or ``layer``.
    labels_key, unlabeled_category
        The ``obs`` column of cell types, and its value for cells whose type is unknown.
    batch_key, layer, likelihood, dispersion, n_latent, n_hidden, n_layers, dropout_rate
        As :class:`pyro_sc.SCVI`.
    latent_library, categorical_covariate_keys, continuous_covariate_keys, size_factor_key, encode_covariates
        As :class:`pyro_sc.SCVI`.
    allow_non_integer
        Accept non-integer counts (e.g. ambient-corrected).
    classification_ratio
        Weight of the labelled cells' cross-entropy in the loss (per cell, as the negative ELBO).
    class_weights
        ``"balanced"`` weights the cross-entropy of each type by the inverse of its share of labelled
        cells (rare types count as much as common ones); ``None`` (default): unweighted.
    label_prior
        :math:`\\pi_y`: ``"labelled"`` (default): fixed at the labelled cells' type frequencies (plus one
        cell of each type), the estimate of the types' proportions when the labelled cells are a random
        sample; ``"uniform"`` (scvi-tools' choice): with it the ELBO gains by spreading the cells of a large
        type over the types with few labels (on ifnb with 5 % of labels, up to 140 of the 871 unlabelled CD14
        monocytes were called DC, a type with one labelled cell); ``"learned"``: a parameter fitted by the
        ELBO, starting from the labelled frequencies, for labels that are not a random sample of the cells.
        A prior that follows the proportions predicts the common types better and the rare ones worse
        than a uniform one.

    Notes
    -----
    The queries of :class:`pyro_sc.SCVI` (latent z1, normalised expression, differential expression)
    work as there, plus :meth:`predict`.

    Examples
    --------
    >>> scvi = pyro_sc.SCVI(adata, batch_key="condition"); scvi.train()
    >>> model = pyro_sc.SCANVI.from_scvi_model(scvi, "Unknown", labels_key="seed_labels")
    >>> model.train()
    >>> adata.obs["predicted"] = model.predict()  # labels; predict(soft=True): probabilities
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        labels_key: str,
        unlabeled_category: str,
        batch_key: str | None = None,
        layer: str | None = None,
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
        classification_ratio: float = 50.0,
        class_weights: str | None = None,
        label_prior: str = "labelled",
        allow_non_integer: bool = False,
    ):
        check_library_options(latent_library, size_factor_key)
        setup = AnnDataSetup(
            adata, layer=layer, batch_key=batch_key, labels_key=labels_key, unlabeled_category=unlabeled_category,
            categorical_covariate_keys=categorical_covariate_keys, continuous_covariate_keys=continuous_covariate_keys,
            size_factor_key=size_factor_key, allow_non_integer=allow_non_integer,
        )
        BaseModel.__init__(
            self, setup, likelihood=likelihood, dispersion=dispersion, n_latent=n_latent, n_hidden=n_hidden,
            n_layers=n_layers, dropout_rate=dropout_rate, latent_library=latent_library,
            encode_covariates=encode_covariates, classification_ratio=classification_ratio,
            class_weights=class_weights, label_prior=label_prior,
        )

    @classmethod
    def _make_module(cls, setup: AnnDataSetup, **kwargs) -> SCANVIModule:
        means, vars_ = setup.log_library_stats()
        # a learned pi_y starts at the labelled cells' type frequencies (plus one cell of each type)
        counts_y = np.bincount(setup.label_codes_n[setup.label_codes_n >= 0], minlength=setup.n_labels) + 1.0
        return SCANVIModule(
            setup.n_vars, n_labels=setup.n_labels, n_batch=setup.n_batch, library_log_means=means,
            library_log_vars=vars_, label_proportions=counts_y / counts_y.sum(), **covariate_sizes(setup), **kwargs,
        )

    @classmethod
    def _setup_from_registry(cls, adata: AnnData, registry: dict, module_kwargs: dict) -> AnnDataSetup:
        # New cells need no labels (their types are what is predicted); known ones must be known types.
        return AnnDataSetup.from_registry(adata, registry)

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: SCVI,
        unlabeled_category: str,
        *,
        labels_key: str,
        adata: AnnData | None = None,
        **options,
    ) -> "SCANVI":
        """A semi-supervised VAE whose encoders, decoder and dispersions start as a trained scVI's.

        ``adata`` defaults to the scVI's training data; it must have the same genes and batches.
        ``options`` are the semi-supervised ones of the constructor (``classification_ratio``,
        ``class_weights``, ``label_prior``); the architecture is the scVI's. The name and the order of
        the first two arguments are scvi-tools'; ``from_scvi`` is an alias.
        """
        if not isinstance(scvi_model, SCVI):
            raise TypeError(f"from_scvi_model needs a trained pyro_sc.SCVI, got {type(scvi_model).__name__}")
        scvi_model._check_trained()
        standard = ("likelihood", "dispersion", "n_latent", "n_hidden", "n_layers", "dropout_rate",
                    "latent_library", "encode_covariates")
        extra = sorted(set(scvi_model.module_kwargs) - set(standard))
        if extra or type(scvi_model).module_class is not SCVIModule:
            raise TypeError(
                f"from_scvi_model copies a plain SCVI; this one has module_class {type(scvi_model).module_class.__name__} "
                f"and options {extra}, which the semi-supervised VAE does not have"
            )
        architecture = {k: scvi_model.module_kwargs[k] for k in standard}
        adata = scvi_model.adata if adata is None else adata
        registry = scvi_model.setup.registry()
        if adata is not scvi_model.adata:
            AnnDataSetup.from_registry(adata, {**registry, "labels_key": None})  # same genes, known batches
        model = cls(
            adata, labels_key=labels_key, unlabeled_category=unlabeled_category, batch_key=registry["batch_key"],
            layer=registry["layer"], allow_non_integer=registry["allow_non_integer"],
            categorical_covariate_keys=registry["categorical_covariate_keys"],
            continuous_covariate_keys=registry["continuous_covariate_keys"], size_factor_key=registry["size_factor_key"],
            **architecture, **options,
        )
        mine, theirs = (
            [] if s.batch_categories is None else list(s.batch_categories) for s in (model.setup, scvi_model.setup)
        )
        if mine != theirs:
            raise DataError(f"the batches of this AnnData {mine} differ from the scVI's {theirs}")
        mine, theirs = (s.registry()["categorical_covariate_categories"] for s in (model.setup, scvi_model.setup))
        if mine != theirs:
            raise DataError(f"the categorical covariates of this AnnData {mine} differ from the scVI's {theirs}")
        # the copied parameters are kept to be copied again when the first seeded train() rebuilds the
        # module: the new networks then start from the training seed, whatever ran before
        model._copied_state = {k: v.detach().clone() for k, v in scvi_model.module.state_dict().items()}
        model.module.load_state_dict(model._copied_state, strict=False)
        model.pretrained = True
        return model

    from_scvi = from_scvi_model

    def _init_attributes(self) -> None:
        super()._init_attributes()
        self.pretrained = False  # set by from_scvi_model: shortens the default training; saved
        self._labelled_batch_size = 128  # the classification term's labelled cells per step (train's batch_size)

    def _saved_attributes(self) -> dict:
        return {**super()._saved_attributes(), "pretrained": self.pretrained}

    @classmethod
    def _query_labels(cls, adata: AnnData, registry: dict) -> AnnData:
        # a query without the labels column is unlabelled (its types are what the classifier transfers)
        if registry["labels_key"] in adata.obs.columns:
            return adata
        adata = adata.copy()
        adata.obs[registry["labels_key"]] = registry["unlabeled_category"]
        return adata

    def _elbo(self) -> ELBO:
        return TraceEnum_ELBO(max_plate_nesting=self.module.max_plate_nesting, strict_enumeration_warning=False)

    def _extra_loss(self):
        labelled = np.flatnonzero(self.setup.label_codes_n >= 0)
        if len(labelled) == 0:  # e.g. an unlabelled query (load_query_data): the ELBO alone
            return None
        codes = self.setup.label_codes_n[labelled]
        weight_c = None
        if self.module.class_weights == "balanced":
            counts = np.bincount(codes, minlength=self.setup.n_labels).astype(np.float32)
            weight_c = torch.as_tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0))
        batch_size = self._labelled_batch_size

        def classification_loss(mb: Minibatch) -> torch.Tensor:
            # drawn from torch's generator, which fit seeds and checkpoints: seeded runs differ by seed and
            # a resumed run draws what the uninterrupted one would have
            chosen = torch.randperm(len(labelled))[:batch_size].numpy() if len(labelled) > batch_size else slice(None)
            idx = labelled[chosen]
            if len(idx) < 2:  # batch normalisation needs two cells
                idx = np.repeat(idx, 2)
            lab = self.setup.minibatch(np.sort(idx), device=mb.x_ng.device)
            loc_nk, _ = self.module.encode(lab)
            w = None if weight_c is None else weight_c.to(loc_nk.device)
            return self.module.classification_ratio * F.cross_entropy(self.module.classify(loc_nk), lab.y_n, weight=w)

        return classification_loss

    def train(
        self,
        *,
        max_epochs: int | None = None,
        batch_size: int = 128,
        n_epochs_kl_warmup: int | None = None,
        seed: int | None = 0,
        **fit_kwargs,
    ) -> pd.DataFrame:
        """Train by SVI with the ELBO summed exactly over unknown types (see :func:`pyro_sc.infer.fit`).

        ``max_epochs`` defaults to scvi-tools' rule for scVI, ``min(round(20000 / n_cells * 400), 400)``,
        two thirds of that (at least 20) when the model starts from a trained scVI (on ifnb with 5 % of
        labels, the accuracy on the unlabelled cells still rose from 0.84 to 0.86 between epochs 133 and
        267, on two initialisations). Each step also draws up to
        ``batch_size`` labelled cells for the classification term. KL warm-up (``n_epochs_kl_warmup``,
        in epochs) is off by default.
        """
        n_obs = self.setup.n_obs
        if max_epochs is None:
            max_epochs = int(min(round(20000 / n_obs * 400), 400))
            if self.pretrained:
                max_epochs = max(20, round(2 * max_epochs / 3))
        self._labelled_batch_size = batch_size
        return BaseModel.train(
            self, max_epochs=max_epochs, batch_size=batch_size, kl_warmup_epochs=n_epochs_kl_warmup, seed=seed,
            **fit_kwargs,
        )

    def _marginal_ll_pair(self):
        # log p(x_n) with the type summed out: labels that new data may carry are not used.
        return (lambda mb: self.model(without_labels(mb))), (lambda mb: self.guide(without_labels(mb)))

    def get_marginal_ll(self, adata: AnnData | None = None, **kwargs) -> float:
        """Mean over cells of the importance-sampling estimate of ``log p(x_n)``, the cell type summed
        out exactly (known labels are not used); options as :meth:`pyro_sc.SCVI.get_marginal_ll`."""
        return super().get_marginal_ll(adata, **kwargs)

    # ------------------------------------------------------------------------------------- queries
    def predict(
        self, adata: AnnData | None = None, *, indices: Sequence[int] | np.ndarray | None = None, soft: bool = False,
        batch_size: int = 1024,
    ) -> np.ndarray | pd.DataFrame:
        """The cell type of each cell of ``adata`` (default: the training data; ``indices``: some of its
        cells), as scvi-tools: the most probable label under q(y | z1) at the posterior-mean z1, an array
        (``soft=False``), or the cells x types probabilities, a table indexed by cell (``soft=True``)."""
        probs = self._probability_table(
            adata, lambda mb: self.module.classify(self.module.encode(mb)[0]), batch_size, indices
        )
        return self._labels_or_table(probs, soft)

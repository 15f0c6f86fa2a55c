r"""CellAssign: marker-based cell-type assignment (Zhang et al. 2019, Nature Methods 16:1007).

For cell :math:`n` with size factor :math:`s_n` and covariates :math:`D_n` (a design row), marker gene
:math:`g` and cell type :math:`c`, with :math:`\rho_{gc} \in \{0, 1\}` the marker matrix:

.. math::

    \pi &\sim \mathrm{Dirichlet}(\alpha = 0.01)\ \text{(density evaluated at}\ \pi + 10^{-20}\text{, as the original)} \\
    \delta_{gc} &\sim \mathrm{LogNormal}(m, \sigma^2)\ \text{truncated to}\ [\delta_{\min}, \infty)
        \quad\text{for each}\ \rho_{gc} = 1 \\
    z_n &\sim \mathrm{Categorical}(\pi) \\
    \log \mu_{ngc} &= \log s_n + \beta_{g0} + \textstyle\sum_i D_{ni} \beta_{gi} + \delta_{gc} \rho_{gc} \\
    \phi_{ngc} &= \textstyle\sum_{b=1}^{B} a_b \exp\!\big(-b_0\, (\log \mu_{ngc} - v_b)^2\big) \\
    x_{ng} \mid z_n = c &\sim \mathrm{NB}(\mu_{ngc}, \phi_{ngc})

:math:`m` and :math:`\sigma` are learned (shrinkage of the marker effects); :math:`\beta`, :math:`\log a_b`
too. The cell types :math:`z_n` are enumerated and summed out exactly by ``TraceEnum_ELBO``.

**Inverse dispersion.** As in the original TensorFlow implementation, the radial basis functions are
evaluated at the *log* mean, with :math:`B = 10` centres :math:`v_b` evenly spaced from 0 to the
largest count and :math:`b_0 = 1 / (2 (v_2 - v_1)^2)`. (Evaluating them at the mean on the count scale
lets a marker's boosted mean fall beyond the centres, :math:`\phi \to 0`, and the NB collapses onto
zero, so cells that express none of a type's markers fit it at no cost.) The log mean is clamped to
the span of the centres, so :math:`\phi` stays sane even far outside it.

**Guide.** MAP: point masses on :math:`\pi` and :math:`\delta` (with :math:`\delta \ge \delta_{\min}`
built into the parametrisation, :math:`\delta = \delta_{\min} + e^u`). With :math:`z` marginalised in the
model, each step is an exact E step (the responsibilities) and a gradient M step on a minibatch. The
loss is the negative log joint, with no entropy term rewarding confident assignments. Any other guide
over ``pi`` and ``delta`` trains through the same driver (:meth:`BaseModel.set_guide`, e.g.
``set_guide(AutoNormal)`` or ``set_guide(AutoMultivariateNormal)`` for a posterior over them; ``z`` stays
enumerated in the model); ``predict(n_samples=...)`` then averages the type probabilities over it.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import pyro.distributions as dist
import torch
from anndata import AnnData
from pyro.distributions import constraints
from pyro.ops.indexing import Vindex
from pyro.infer import TraceEnum_ELBO
from pyro.nn import PyroModule
from torch import nn

from ..data import AnnDataSetup, DataError, Minibatch, _chunks, split_indices
from ..infer import TrainingPlan
from ..infer.loop import resolve_device
from ..distributions import NegativeBinomial
from ._base import BaseModel, CellTypePredictor

__all__ = ["CellAssign", "CellAssignModule", "TruncatedLogNormal"]


class TruncatedLogNormal(dist.TorchDistribution):
    """LogNormal(loc, scale) restricted to ``[low, inf)`` and renormalised: the prior on the marker effects."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, loc, scale, low: float, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        self.low = float(low)
        self._log_low = math.log(self.low)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        """The interval ``[low, inf)``."""
        return constraints.greater_than(self.low)

    def _alpha(self):
        return (self._log_low - self.loc) / self.scale

    def log_prob(self, value):
        """log LogNormal(value | loc, scale) - log P(X >= low) for ``value >= low``."""
        log_value = value.log()
        normal = dist.Normal(self.loc, self.scale, validate_args=False).log_prob(log_value)
        # log P(X >= low) = log Phi(-alpha), stable in the far tails
        return normal - log_value - torch.special.log_ndtr(-self._alpha())

    def rsample(self, sample_shape=torch.Size()):
        """A reparametrised draw by the inverse CDF of the truncated normal of ``log X``."""
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        lower = torch.special.ndtr(self._alpha())
        p = (lower + u * (1 - lower)).clamp(max=1 - 1e-7)
        return (self.loc + self.scale * torch.special.ndtri(p)).exp().clamp(min=self.low)

    def expand(self, batch_shape, _instance=None):
        """The same distribution with ``loc`` and ``scale`` expanded to ``batch_shape``."""
        new = self._get_checked_instance(TruncatedLogNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        new.low, new._log_low = self.low, self._log_low
        super(TruncatedLogNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


class FlooredDirichlet(dist.Dirichlet):
    """A Dirichlet whose log density is evaluated at ``value + floor``, as the original CellAssign evaluates
    its prior on the type proportions (``THETA_LOWER_BOUND = 1e-20``).

    With a concentration below one the density grows without bound as a proportion goes to zero: when a
    type of the marker matrix is absent from the data (common: panels list more types than a sample
    holds), the MAP objective would be unbounded, the type's logit running off to non-finite gradients.
    At ``value + floor`` the reward stops near ``floor`` and so does the logit; present types are
    unaffected (their proportions are many orders of magnitude above the floor).
    """

    def __init__(self, concentration: torch.Tensor, floor: float = 1e-20, validate_args=None):
        super().__init__(concentration, validate_args=validate_args)
        self.floor = floor

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FlooredDirichlet, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.floor = self.floor
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return super().log_prob(value + self.floor)


class CellAssignModule(PyroModule):
    """CellAssign's model and MAP guide. ``max_plate_nesting = 1`` (cells); z is enumerated at dim -2."""

    max_plate_nesting = 1

    def __init__(
        self,
        rho_gc: Sequence[Sequence[float]],
        *,
        n_covariates: int = 0,
        max_count: float,
        min_delta: float = 2.0,
        dirichlet_concentration: float = 0.01,
        n_basis: int = 10,
    ):
        super().__init__()
        rho_gc = torch.as_tensor(np.asarray(rho_gc, dtype=np.float32))
        self.n_genes, self.n_types = rho_gc.shape
        self.min_delta = float(min_delta)
        self.register_buffer("rho_gc", rho_gc)
        gene_m, type_m = rho_gc.nonzero(as_tuple=True)
        self.register_buffer("marker_gene_m", gene_m)
        self.register_buffer("marker_type_m", type_m)
        self.register_buffer("alpha_c", torch.full((self.n_types,), float(dirichlet_concentration)))
        centres_b = torch.linspace(0.0, max(float(max_count), 1.0), n_basis)
        self.register_buffer("basis_centres_b", centres_b)

        # Initialisation as in the method description.
        self.beta0_g = nn.Parameter(torch.randn(self.n_genes))
        self.beta_gp = nn.Parameter(torch.randn(self.n_genes, n_covariates))
        self.log_a_b = nn.Parameter(torch.zeros(n_basis))
        self.delta_log_mean = nn.Parameter(torch.zeros(()))
        self.delta_log_scale_raw = nn.Parameter(torch.zeros(()))  # log of the prior's scale
        # MAP guide parameters: pi = softmax(logits) starts uniform; delta = min_delta + exp(u),
        # with delta - min_delta drawn from LogNormal(0, 1).
        self.pi_logits_c = nn.Parameter(torch.zeros(self.n_types))
        self.delta_excess_log_m = nn.Parameter(torch.randn(len(gene_m)))

    # ------------------------------------------------------------------------------ shared pieces
    @property
    def n_markers(self) -> int:
        """The number of (type, gene) marker entries, i.e. the length of delta."""
        return int(self.marker_gene_m.shape[0])

    def delta_cg(self, delta_m: torch.Tensor) -> torch.Tensor:
        """The marker effects as a dense (types, genes) matrix, zero where rho_gc = 0."""
        out = delta_m.new_zeros(delta_m.shape[:-1] + (self.n_types, self.n_genes))
        out[..., self.marker_type_m, self.marker_gene_m] = delta_m
        return out

    def inverse_dispersion(self, log_mu: torch.Tensor) -> torch.Tensor:
        """phi = sum_b a_b exp(-b0 (log mu - v_b)^2), log mu clamped to the span of the centres."""
        v_b = self.basis_centres_b
        width = 0.5 / (v_b[1] - v_b[0]) ** 2
        log_mu = log_mu.clamp(min=float(v_b[0]), max=float(v_b[-1])).unsqueeze(-1)
        return (self.log_a_b - width * (log_mu - v_b) ** 2).logsumexp(-1).exp()

    def log_base_mean(self, mb: Minibatch) -> torch.Tensor:
        """log s_n + beta_g0 + D_n beta_g: the log mean of every gene before marker effects, (cells, genes)."""
        log_base_ng = mb.size_factor_n.log().unsqueeze(-1) + self.beta0_g
        design_np = mb.extra.get("design_np")
        if design_np is not None and design_np.shape[-1]:
            log_base_ng = log_base_ng + design_np @ self.beta_gp.T
        return log_base_ng

    def type_means(self, mb: Minibatch, delta_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log mu_cng and phi_cng of every cell under every type: (types, cells, genes) each.

        phi depends on the type only where a gene marks it, so the basis functions are evaluated on the
        base means and on the marker entries, not on every (type, cell, gene).
        """
        log_base_ng = self.log_base_mean(mb)
        log_mu_cng = log_base_ng + self.delta_cg(delta_m).unsqueeze(-2)
        phi_cng = self.inverse_dispersion(log_base_ng).unsqueeze(0).repeat(self.n_types, 1, 1)
        phi_marker_mn = self.inverse_dispersion(log_base_ng[:, self.marker_gene_m].T + delta_m.unsqueeze(-1))
        phi_cng[self.marker_type_m, :, self.marker_gene_m] = phi_marker_mn
        return log_mu_cng, phi_cng

    def map_pi(self) -> torch.Tensor:
        """The MAP guide's type proportions pi, (types,)."""
        return torch.softmax(self.pi_logits_c, -1)

    def map_delta(self) -> torch.Tensor:
        """The MAP guide's marker effects delta (each at least ``min_delta``), (markers,)."""
        return self.min_delta + self.delta_excess_log_m.exp()

    # --------------------------------------------------------------------------------- model, guide
    def model(self, mb: Minibatch):
        """The generative process of the module docstring: pi, the marker effects delta, each cell's type
        z_n (enumerated) and its counts x_ng, negative binomial."""
        pi_c = pyro.sample("pi", FlooredDirichlet(self.alpha_c))
        delta_scale = self.delta_log_scale_raw.exp()
        delta_m = pyro.sample(
            "delta",
            TruncatedLogNormal(self.delta_log_mean, delta_scale, self.min_delta).expand([self.n_markers]).to_event(1),
        )
        log_mu_cng, phi_cng = self.type_means(mb, delta_m)
        cell_n = torch.arange(len(mb), device=mb.x_ng.device)
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            z_n = pyro.sample("z", dist.Categorical(pi_c), infer={"enumerate": "parallel"})
            # each cell's row under its type; under enumeration z_n is (types, 1) -> (types, cells, genes)
            mu_ng = Vindex(log_mu_cng)[z_n, cell_n].exp()
            phi_ng = Vindex(phi_cng)[z_n, cell_n]
            pyro.sample("x", NegativeBinomial(mu_ng, phi_ng, validate_args=False).to_event(1), obs=mb.x_ng)

    def guide(self, mb: Minibatch):
        """The MAP guide: point masses at :meth:`map_pi` and :meth:`map_delta` (z is summed out)."""
        pyro.sample("pi", dist.Delta(self.map_pi(), event_dim=1))
        pyro.sample("delta", dist.Delta(self.map_delta(), event_dim=1))


def _marker_matrix(marker_matrix: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(marker_matrix, pd.DataFrame):
        raise TypeError("marker_matrix must be a pandas DataFrame (genes x cell types, 0/1)")
    if marker_matrix.shape[0] == 0 or marker_matrix.shape[1] == 0:
        raise DataError("the marker matrix is empty")
    index = marker_matrix.index.astype(str)
    if index.has_duplicates:
        raise DataError(f"the marker matrix lists genes more than once: {sorted(set(index[index.duplicated()]))[:10]}")
    types = marker_matrix.columns.astype(str)
    if types.has_duplicates:
        raise DataError(f"the marker matrix lists cell types more than once: {sorted(set(types[types.duplicated()]))}")
    values = marker_matrix.to_numpy()
    if not np.isin(values, [0, 1]).all():
        raise DataError("the marker matrix must be binary (0/1): found other values")
    rho = pd.DataFrame(values.astype(np.float32), index=index, columns=marker_matrix.columns.astype(str))
    empty = rho.columns[rho.sum(0) == 0]
    if len(empty):
        raise DataError(f"cell types with no marker gene: {list(empty)}")
    return rho


class CellAssign(BaseModel, CellTypePredictor):
    """CellAssign on an AnnData of raw counts and a binary marker matrix.

    Parameters
    ----------
    adata
        Cells x genes, raw counts (all genes: the size factors use them).
    marker_matrix
        Genes x cell types, 0/1, indexed by gene names as in ``adata.var_names`` (or ``var_key``).
    size_factor_key
        ``obs`` column of size factors. Default: each cell's total count over all genes divided by the
        mean total.
    layer, batch_key, categorical_covariate_keys, continuous_covariate_keys
        Counts layer and the covariates of the design matrix (categorical ones are coded as indicators
        of all but their first category).
    var_key
        ``var`` column holding the gene names the marker matrix uses (e.g. ``"gene_symbol"``).
    drop_missing_markers
        Marker genes absent from the data are an error (listing them) unless this is set; then they
        are dropped with a warning.
    min_delta, dirichlet_concentration, n_basis
        The lower bound of the marker effects, the Dirichlet prior's concentration, and the number of
        basis functions of the dispersion (2, 0.01, 10 as in the paper).

    Notes
    -----
    Cells with zero counts over every marker are kept: their assignment follows from the size factor
    (a type whose markers they do not express) and the prior.
    """

    def __init__(
        self,
        adata: AnnData,
        marker_matrix: pd.DataFrame,
        *,
        size_factor_key: str | None = None,
        layer: str | None = None,
        batch_key: str | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        var_key: str | None = None,
        drop_missing_markers: bool = False,
        min_delta: float = 2.0,
        dirichlet_concentration: float = 0.01,
        n_basis: int = 10,
    ):
        rho = _marker_matrix(marker_matrix)
        names = self._gene_names(adata, var_key)
        missing = [g for g in rho.index if g not in set(names)]
        if missing and not drop_missing_markers:
            raise DataError(
                f"{len(missing)} marker genes are not in the data: {missing}"
                + ("" if var_key else " (if adata.var_names are IDs, pass var_key= naming the symbols column)")
                + "; pass drop_missing_markers=True to drop them"
            )
        if missing:
            warnings.warn(f"dropping {len(missing)} marker genes absent from the data: {missing}", stacklevel=2)
            rho = _marker_matrix(rho.drop(index=missing))
        setup_kwargs = dict(
            layer=layer, batch_key=batch_key, size_factor_key=size_factor_key,
            continuous_covariate_keys=continuous_covariate_keys, categorical_covariate_keys=categorical_covariate_keys,
        )
        setup, library_mean = self._marker_setup(adata, rho.index, var_key, setup_kwargs, library_mean=None)
        super().__init__(
            setup,
            rho_gc=rho.to_numpy().tolist(),
            marker_genes=list(rho.index),
            cell_types=list(rho.columns),
            var_key=var_key,
            library_mean=library_mean,
            min_delta=min_delta,
            dirichlet_concentration=dirichlet_concentration,
            n_basis=n_basis,
        )

    # ------------------------------------------------------------------------ data registration
    @staticmethod
    def _gene_names(adata: AnnData, var_key: str | None) -> pd.Index:
        if var_key is None:
            return pd.Index(adata.var_names.astype(str))
        if var_key not in adata.var.columns:
            raise DataError(f"var_key {var_key!r} not found in adata.var (columns: {list(adata.var.columns)})")
        return pd.Index(adata.var[var_key].astype(str))

    @classmethod
    def _marker_setup(cls, adata, marker_genes, var_key, setup_kwargs, *, library_mean):
        """Register the marker genes of ``adata`` (in the marker matrix's order), with size factors
        computed from all genes unless a size factor column is given."""
        names = cls._gene_names(adata, var_key)
        position = {}
        for i, name in enumerate(names):
            position.setdefault(name, []).append(i)
        ambiguous = [g for g in marker_genes if len(position.get(g, [])) > 1]
        if ambiguous:
            raise DataError(f"marker genes found in more than one column of the data: {ambiguous[:10]}")
        columns = [position[g][0] for g in marker_genes]
        if setup_kwargs.get("size_factor_key") is None:
            # checks every count of all genes; genes without counts are harmless for size factors
            full = AnnDataSetup(adata, layer=setup_kwargs.get("layer"), allow_empty_genes=True)
            library_mean = float(full.library_n.mean()) if library_mean is None else library_mean
            size_factor_n = full.library_n / library_mean
        if adata.isbacked and setup_kwargs.get("layer") is None:
            # on disk: read the rows in chunks and keep the marker columns only (a small matrix)
            x_nm = sp.vstack([sp.csr_matrix(adata.X[rows])[:, columns] for rows in _chunks(adata.n_obs)]).tocsr()
            markers = AnnData(x_nm, obs=adata.obs.copy(), var=pd.DataFrame(index=list(marker_genes)))
        else:
            markers = adata[:, columns].copy()  # only the marker columns: the user's AnnData is untouched
        markers.var_names = pd.Index(list(marker_genes))
        kwargs = dict(setup_kwargs)
        if kwargs.get("size_factor_key") is None:
            markers.obs["_cellassign_size_factor"] = size_factor_n.astype(np.float32)
            kwargs["size_factor_key"] = "_cellassign_size_factor"
        return AnnDataSetup(markers, allow_empty_cells=True, **kwargs), library_mean

    @classmethod
    def _setup_from_registry(cls, adata: AnnData, registry: dict, module_kwargs: dict) -> AnnDataSetup:
        own_sf = registry["size_factor_key"] != "_cellassign_size_factor"
        setup_kwargs = dict(
            layer=registry["layer"], batch_key=registry["batch_key"],
            size_factor_key=registry["size_factor_key"] if own_sf else None,
            continuous_covariate_keys=registry["continuous_covariate_keys"],
            categorical_covariate_keys=registry["categorical_covariate_keys"],
        )
        setup, _ = cls._marker_setup(
            adata, module_kwargs["marker_genes"], module_kwargs["var_key"], setup_kwargs,
            library_mean=module_kwargs["library_mean"],
        )
        # same batch / covariate coding as at training time
        return AnnDataSetup.from_registry(setup.adata, registry)

    @classmethod
    def _make_module(cls, setup: AnnDataSetup, **kwargs) -> CellAssignModule:
        n_covariates = (setup.n_batch - 1) + sum(n - 1 for n in setup.n_cats_per_covariate)
        n_covariates += len(setup.continuous_covariate_keys)
        return CellAssignModule(
            kwargs["rho_gc"], n_covariates=n_covariates, max_count=setup.max_count, min_delta=kwargs["min_delta"],
            dirichlet_concentration=kwargs["dirichlet_concentration"], n_basis=kwargs["n_basis"],
        )

    def _design(self, mb: Minibatch) -> Minibatch:
        """Attach the design matrix D (indicators of all but the first category, then continuous covariates)."""
        columns = []
        if mb.batch_n is not None and self.setup.n_batch > 1:
            columns.append(nn.functional.one_hot(mb.batch_n, self.setup.n_batch)[:, 1:].float())
        for k, n_cat in enumerate(self.setup.n_cats_per_covariate):
            if n_cat > 1:
                columns.append(nn.functional.one_hot(mb.cat_covs_nk[:, k], n_cat)[:, 1:].float())
        if mb.cont_covs_nk is not None:
            columns.append(mb.cont_covs_nk)
        design_np = torch.cat(columns, -1) if columns else mb.x_ng.new_zeros(len(mb), 0)
        return replace(mb, extra={**mb.extra, "design_np": design_np})

    def model(self, mb: Minibatch):
        """The module's model on ``mb`` with its covariates' design matrix (:class:`CellAssignModule`)."""
        return self.module.model(self._design(mb))

    def method_guide(self, mb: Minibatch):
        """The module's MAP guide on ``mb`` with its covariates' design matrix."""
        return self.module.guide(self._design(mb))

    def _elbo(self):
        return TraceEnum_ELBO(max_plate_nesting=1)

    # --------------------------------------------------------------------------------------- training
    def train(
        self,
        *,
        max_epochs: int = 400,
        batch_size: int = 1024,
        lr: float = 0.1,
        num_restarts: int = 3,
        screen_epochs: int | None = 5,
        early_stopping: bool = True,
        patience: int = 10,
        early_stopping_min_delta: float = 1e-3,
        train_size: float = 0.9,
        seed: int | None = 0,
        guide=None,
        progress_bar: bool = False,
        checkpoint_every: int | None = None,
        checkpoint_path=None,
        resume=None,
        **fit_kwargs,
    ) -> pd.DataFrame:
        """Fit by minibatch MAP-EM from ``num_restarts`` initialisations; keep the best held-out likelihood.

        **Restarts: successive halving.** Every initialisation trains ``screen_epochs`` epochs; the better
        half (rounded up) by validation loss (the negative log joint per held-out cell, types summed out;
        the best epoch's) trains twice as many more, and so on until one is left, which trains on until
        that loss has not improved by ``early_stopping_min_delta`` for ``patience`` epochs, at most
        ``max_epochs`` epochs in all (its screening included). With 3 restarts the screening costs 35
        epochs (15 for one round), and a restart that starts well but settles in a poor optimum has
        twice the time to show it. ``screen_epochs=None`` trains every restart to convergence and keeps
        the best. ``restart_losses`` records each restart's best validation loss when it left (or won).

        A second ``train()`` continues the trained model (no restarts) and appends to ``history``.

        ``checkpoint_every`` / ``checkpoint_path`` (a directory) checkpoint the whole plan of restarts;
        ``resume=`` that directory continues it, interrupted in any restart, to the model an uninterrupted
        run reaches.

        ``guide`` replaces the MAP guide: it is ``set_guide(guide)`` (see :meth:`BaseModel.set_guide`:
        an autoguide class such as ``AutoNormal``, built over ``pi`` and ``delta``, or a callable over
        them taking a Minibatch); without it the guide last set is used (the MAP guide by default).
        Each restart starts the guide afresh (an autoguide class is built again, a guide module gets its
        initial parameters back) and the winning restart's guide is kept.
        """
        if num_restarts < 1:
            raise ValueError(f"num_restarts must be >= 1, got {num_restarts}")
        if screen_epochs is not None and screen_epochs < 1:
            raise ValueError(f"screen_epochs must be >= 1 (or None), got {screen_epochs}")
        if guide is not None:
            self.set_guide(guide)
        train_idx, val_idx = split_indices(self.setup.n_obs, train_size=train_size, seed=0 if seed is None else seed)
        options = dict(
            batch_size=batch_size, lr=lr, early_stopping=early_stopping, patience=patience,
            min_delta=early_stopping_min_delta, train_indices=train_idx,
            validation_indices=val_idx if len(val_idx) else None, progress_bar=progress_bar, **fit_kwargs,
        )
        checkpointing = dict(checkpoint_every=checkpoint_every, checkpoint_path=checkpoint_path, resume=resume)
        if self.is_trained and resume is None:  # continue the trained model, as BaseModel.train does
            return BaseModel.train(self, max_epochs=max_epochs, seed=seed, **checkpointing, **options)
        self.device = resolve_device(fit_kwargs.get("device", "auto"))  # where queries put their minibatches
        plan = TrainingPlan(**checkpointing)
        self._in_training = True
        try:
            winner = _Restarts(self, plan, options, seed, bool(len(val_idx))).run(num_restarts, screen_epochs, max_epochs)
        finally:
            self._in_training = False
        self.module.eval()
        self.restart_losses = winner.losses
        self.history = winner.history
        return self.history

    def _fit(self, **options) -> pd.DataFrame:
        return self._run_fit(**options)

    def _init_attributes(self) -> None:
        self.restart_losses: list[float] | None = None  # each restart's best validation loss; saved

    def _saved_attributes(self) -> dict:
        return {"restart_losses": self.restart_losses}

    # --------------------------------------------------------------------------------------- queries
    @property
    def cell_types(self) -> list[str]:
        """The types of the marker matrix, in its column order (the columns of :meth:`predict`)."""
        return list(self.module_kwargs["cell_types"])

    def _guide_draw(self) -> dict[str, torch.Tensor]:
        """One draw of pi and delta from the guide (the MAP guide: its point masses)."""
        with self._probing() as mb:
            trace = pyro.poutine.trace(self.guide).get_trace(mb)
        return {name: trace.nodes[name]["value"] for name in ("pi", "delta")}

    def _point_estimates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """pi and delta at the MAP, or at the posterior median of a custom guide (e.g. an autoguide;
        a guide without ``median`` gives one draw, its value for a point-mass guide)."""
        if self.custom_guide is None:
            return self.module.map_pi(), self.module.map_delta()
        values = dict(self.custom_guide.median()) if hasattr(self.custom_guide, "median") else {}
        if not {"pi", "delta"} <= set(values):
            values = {**self._guide_draw(), **values}
        return values["pi"], values["delta"]

    def _guide_draws(self, n_samples: int, seed: int | None) -> list[dict[str, torch.Tensor]]:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return [self._guide_draw() for _ in range(n_samples)]

    @torch.no_grad()
    def posterior_samples(self, n_samples: int = 100, *, seed: int | None = 0) -> dict[str, np.ndarray]:
        """``n_samples`` draws of the guide's posterior: ``"pi"`` (samples, types) and ``"delta"``
        (samples, genes, types; 0 where a gene is not a marker). Every draw is the same under the MAP guide.
        ``seed`` makes them reproducible (the global RNG is left as it was)."""
        self._check_trained()
        draws = self._guide_draws(n_samples, seed)
        pi_sc = torch.stack([d["pi"] for d in draws])
        delta_sgc = self.module.delta_cg(torch.stack([d["delta"] for d in draws])).transpose(-1, -2)
        return {"pi": pi_sc.cpu().numpy(), "delta": delta_sgc.cpu().numpy()}

    @torch.no_grad()
    def predict(
        self, adata: AnnData | None = None, *, indices: Sequence[int] | np.ndarray | None = None, n_samples: int = 0,
        seed: int | None = 0, batch_size: int = 4096,
    ) -> pd.DataFrame:
        """Posterior probabilities gamma_nc of each cell type (cells x types), for the cells of ``adata``
        (default: the training data; ``indices``: some of them). As scvi-tools' CellAssign, ``predict``
        gives the probabilities; :meth:`predict_labels` the most probable type.

        By default at the point estimate of pi and delta (the MAP; a custom guide's median). With
        ``n_samples > 0``, averaged over that many draws of pi and delta from the guide (a custom guide
        with a posterior over them, see :meth:`set_guide`), so their uncertainty enters each cell's
        probabilities; ``seed`` makes the draws reproducible.
        """
        self._check_trained()
        setup, cells = self._query_cells(adata, indices)
        if n_samples > 0:
            params = [(d["pi"], d["delta"]) for d in self._guide_draws(n_samples, seed)]
        else:
            params = [self._point_estimates()]
        out = []
        for mb in self._minibatches(setup, batch_size, cells):
            gamma_nc = 0.0
            for pi_c, delta_m in params:
                log_mu_cng, phi_cng = self.module.type_means(self._design(mb), delta_m)
                log_lik_cn = NegativeBinomial(log_mu_cng.exp(), phi_cng, validate_args=False).log_prob(mb.x_ng).sum(-1)
                gamma_nc = gamma_nc + torch.softmax(log_lik_cn.T + pi_c.log(), -1)
            out.append(gamma_nc / len(params))
        return pd.DataFrame(torch.cat(out).cpu().numpy(), index=setup.obs_names[cells], columns=self.cell_types)

    @property
    def delta(self) -> pd.DataFrame:
        """The learned marker effects delta_gc (genes x types; 0 where a gene is not a marker)."""
        self._check_trained()
        delta_cg = self.module.delta_cg(self._point_estimates()[1].detach()).cpu().numpy()
        return pd.DataFrame(delta_cg.T, index=self.module_kwargs["marker_genes"], columns=self.cell_types)


@dataclass
class _Candidate:
    """One restart: its module, its guide's state, its history so far and its best validation loss."""

    restart: int
    module: CellAssignModule
    guide_state: dict | None
    history: pd.DataFrame
    loss: float


class _Restarts:
    """CellAssign's restarts as phases of a :class:`~pyro_sc.infer.TrainingPlan`: rounds of successive
    halving (each restart seeded by ``seed + 1000 * restart``), then the winner trained to the end."""

    def __init__(self, model: "CellAssign", plan: TrainingPlan, options: dict, seed: int | None, validated: bool):
        self.model, self.plan, self.options, self.seed, self.validated = model, plan, options, seed, validated

    def run(self, num_restarts: int, screen_epochs: int | None, max_epochs: int) -> "_Candidate":
        losses = {}
        if screen_epochs is None or num_restarts == 1:  # every restart to the end; the best is kept
            done = [self._phase(k, 0, max_epochs, None) for k in range(num_restarts)]
            winner = min(done, key=lambda c: c.loss)
            losses = {c.restart: c.loss for c in done}
        else:
            alive, trained, done, round_ = list(range(num_restarts)), 0, {}, 0
            while len(alive) > 1 and trained < max_epochs:
                n_epochs = min(screen_epochs * 2**round_, max_epochs - trained)
                done = {k: self._phase(k, round_, n_epochs, done.get(k)) for k in alive}
                trained += n_epochs
                alive = sorted(alive, key=lambda k: done[k].loss)
                losses.update({k: done[k].loss for k in alive[math.ceil(len(alive) / 2):]})
                alive, round_ = alive[: math.ceil(len(alive) / 2)], round_ + 1
            winner = done[alive[0]]
            if trained < max_epochs:
                winner = self._phase(winner.restart, round_, max_epochs - trained, winner)
            losses[winner.restart] = winner.loss
        self._install(winner)
        winner.losses = [losses[k] for k in range(num_restarts)]
        return winner

    def _phase(self, restart: int, round_: int, n_epochs: int, previous: _Candidate | None) -> _Candidate:
        """Train restart ``restart`` for ``n_epochs`` more epochs (from scratch when ``previous`` is None)."""
        m = self.model
        restart_seed = None if self.seed is None else self.seed + 1000 * restart
        if previous is None:
            if restart_seed is not None:
                pyro.set_rng_seed(restart_seed)
            m.module = m._build_module()
            m._reset_guide()
        else:
            self._install(previous)
        history = self.plan.run(
            f"restart{restart}-round{round_}",
            lambda **checkpointing: m._fit(max_epochs=n_epochs, seed=None if restart_seed is None else restart_seed + round_,
                                           **self.options, **checkpointing),
            state=lambda: {"module": m.module.state_dict(), "guide": self._guide_state() or {}},
            load=lambda saved: self._install(_Candidate(restart, m.module, saved["guide"] or None, None, math.nan),
                                             module_state=saved["module"]),
        )
        if previous is not None:
            history = history.assign(epoch=history["epoch"] + int(previous.history["epoch"].max()))
            history = pd.concat([previous.history, history], ignore_index=True)
        monitored = history["validation_loss"] if self.validated else history["train_loss"]
        return _Candidate(restart, m.module, copy.deepcopy(self._guide_state()), history, float(monitored.min()))

    def _guide_state(self) -> dict | None:
        guide = self.model.custom_guide
        return guide.state_dict() if isinstance(guide, nn.Module) else None

    def _install(self, candidate: _Candidate, module_state: dict | None = None) -> None:
        """Make ``candidate`` the model's current parameters (and its guide's)."""
        self.model.module = candidate.module
        if module_state is not None:
            candidate.module.load_state_dict(module_state)
        if candidate.guide_state is not None:
            self.model.custom_guide.load_state_dict(candidate.guide_state)

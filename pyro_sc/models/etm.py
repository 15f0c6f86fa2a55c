r"""ETM / scETM: the embedded topic model (Dieng et al. 2020, TACL 8:439) and its single-cell form
(Zhao et al. 2021, Nature Communications 12:5261).

Generative process for cell :math:`n` of batch :math:`s_n` with :math:`N_n = \sum_g x_{ng}` counts,
:math:`K` topics and :math:`L`-dimensional embeddings:

.. math::

    \delta_n &\sim \mathcal N(0, I_K), \qquad \theta_n = \mathrm{softmax}(\delta_n)
        \quad\text{(logistic normal topic proportions)} \\
    \beta_{s,k} &= \mathrm{softmax}_g\big(\alpha_k \rho^\top + \lambda_s\big)
        \quad\text{(topic } k\text{'s distribution over genes)} \\
    x_n &\sim \mathrm{Multinomial}\big(N_n,\ \textstyle\sum_k \theta_{nk} \beta_{s_n,k}\big)

with topic embeddings :math:`\alpha \in \mathbb R^{K \times L}` and gene embeddings
:math:`\rho \in \mathbb R^{G \times L}` (both learnt, as in scETM), and scETM's batch-specific gene bias
:math:`\lambda_s \in \mathbb R^G` inside the softmax when a ``batch_key`` is given (ETM: none).

The guide is amortised (ETM's variational inference network):
:math:`q(\delta_n \mid x_n) = \mathcal N(\mu_\phi(\tilde x_n), \sigma^2_\phi(\tilde x_n))`, an encoder on the
library-normalised counts :math:`\tilde x_n = x_n / N_n` (one hidden layer, batch normalisation, ReLU,
dropout) giving the mean and the log-variance of :math:`\delta_n`.

The likelihood is the exact multinomial log-probability of the counts, multinomial coefficient
included, so the loss is the negative ELBO proper; the KL term is analytic.

Defaults are scETM's: 50 topics, 400-dimensional embeddings, 128 hidden units, dropout 0.1, Adam with
learning rate 5e-3, minibatches of 2,000 cells, all cells used for training. Where this differs from the
scETM code: it mixes topics on the probability scale (ETM's :math:`\theta_n \beta`, as written above)
where scETM's default mixes logits, :math:`\mathrm{softmax}(\theta_n \alpha\rho^\top + \lambda_s)`; the
likelihood is of the raw counts (scETM's default scores normalised counts) with the KL at full weight
(scETM anneals it to 1e-7); no learning-rate decay.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Literal, Sequence

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
from ..nn import GaussianEncoder
from ._base import BaseModel

__all__ = ["ETM", "ETMModule", "multinomial_log_prob"]

Embedding = Literal["delta", "theta"]

_TINY = 1e-30  # floor of a gene's probability: a count on a gene of probability 0 would be -inf


def multinomial_log_prob(x_ng: torch.Tensor, probs_ng: torch.Tensor) -> torch.Tensor:
    r"""Exact :math:`\log \mathrm{Multinomial}(x_n \mid N_n = \sum_g x_{ng}, p_n)` per row: (cells,).

    ``probs_ng`` rows must sum to one. torch's ``Multinomial`` takes one total count for all rows; here
    each cell has its own.
    """
    log_coefficient_n = torch.lgamma(x_ng.sum(-1) + 1) - torch.lgamma(x_ng + 1).sum(-1)
    return log_coefficient_n + (x_ng * probs_ng.clamp_min(_TINY).log()).sum(-1)


class ETMModule(PyroModule):
    """ETM's model and guide, the topic and gene embeddings and the encoder. ``max_plate_nesting = 1``."""

    max_plate_nesting = 1

    def __init__(
        self,
        n_genes: int,
        *,
        n_batch: int = 1,
        n_topics: int = 50,
        n_embedding: int = 400,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
    ):
        super().__init__()
        for name, value in [("n_genes", n_genes), ("n_topics", n_topics), ("n_embedding", n_embedding),
                            ("n_hidden", n_hidden), ("n_batch", n_batch)]:
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        self.n_topics = n_topics
        self.encoder = GaussianEncoder(
            n_genes, n_topics, n_hidden=n_hidden, n_layers=1, dropout_rate=dropout_rate
        )
        # alpha rho^T starts with unit-variance logits: topics close to uniform over genes
        self.alpha_kl = nn.Parameter(torch.randn(n_topics, n_embedding))
        self.rho_gl = nn.Parameter(torch.randn(n_genes, n_embedding) / n_embedding**0.5)
        self.lambda_sg = nn.Parameter(torch.zeros(n_batch, n_genes)) if n_batch > 1 else None

    # ------------------------------------------------------------------------------ shared pieces
    def beta(self, with_batch_bias: bool = True) -> torch.Tensor:
        """Topics over genes, (batches, topics, genes) with the batch biases, else (1, topics, genes)."""
        logits_kg = self.alpha_kl @ self.rho_gl.T
        if self.lambda_sg is None or not with_batch_bias:
            return torch.softmax(logits_kg, -1)[None]
        return torch.softmax(logits_kg + self.lambda_sg[:, None, :], -1)

    def mix(self, theta_nk: torch.Tensor, batch_n: torch.Tensor | None) -> torch.Tensor:
        """Each cell's distribution over genes, ``theta_n beta_{s_n}``: (cells, genes)."""
        beta_skg = self.beta()
        if beta_skg.shape[0] == 1:
            return theta_nk @ beta_skg[0]
        # one product for all batches: theta placed in its batch's block of a (cells, batches * topics) matrix
        n_batch, n_topics, n_genes = beta_skg.shape
        onehot_ns = nn.functional.one_hot(batch_n, n_batch).to(theta_nk.dtype)
        theta_nsk = onehot_ns[:, :, None] * theta_nk[:, None, :]
        return theta_nsk.reshape(len(theta_nk), -1) @ beta_skg.reshape(n_batch * n_topics, n_genes)

    def encode(self, mb: Minibatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and scale of q(delta_n | x_n), from the library-normalised counts."""
        return self.encoder(mb.x_ng / mb.x_ng.sum(-1, keepdim=True))

    # --------------------------------------------------------------------------------- model, guide
    def model(self, mb: Minibatch):
        """The generative process of the module docstring: delta_n standard normal, theta_n its softmax,
        and the counts x_n multinomial with probabilities theta_n beta (:meth:`mix`)."""
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            with poutine.scale(scale=mb.kl_weight):
                zeros_k = mb.x_ng.new_zeros(self.n_topics)
                delta_nk = pyro.sample("delta", dist.Normal(zeros_k, 1.0).to_event(1))
            theta_nk = torch.softmax(delta_nk, -1)
            probs_ng = self.mix(theta_nk, mb.batch_n)
            # x_n ~ Multinomial(N_n, theta_n beta): its exact log-probability, per-cell totals
            pyro.factor("x", multinomial_log_prob(mb.x_ng, probs_ng))

    def guide(self, mb: Minibatch):
        """q(delta_n | x_n): a diagonal normal from the encoder (:meth:`encode`)."""
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n), poutine.scale(scale=mb.kl_weight):
            loc_nk, scale_nk = self.encode(mb)
            pyro.sample("delta", dist.Normal(loc_nk, scale_nk).to_event(1))


class ETM(BaseModel):
    """ETM (scETM with a ``batch_key``) on an AnnData of raw counts.

    Parameters
    ----------
    adata
        Cells x genes, raw counts in ``X`` or ``layer`` (dense, sparse or backed).
    layer, batch_key
        Where the counts are; the ``obs`` column of batches (None: one batch, no batch bias = ETM).
    n_topics, n_embedding, n_hidden, dropout_rate
        Topics K, embedding size L, the encoder's hidden units and dropout (scETM: 50, 400, 128, 0.1).

    Examples
    --------
    >>> model = pyro_sc.ETM(adata, n_topics=16)
    >>> model.train(max_epochs=1000, labels_key="cell_type")   # history gets the ARI per iteration
    >>> theta = model.get_cell_topics()                         # cells x topics
    >>> model.top_genes(5)                                      # topics x rank
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        n_topics: int = 50,
        n_embedding: int = 400,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
    ):
        setup = AnnDataSetup(adata, layer=layer, batch_key=batch_key)
        super().__init__(
            setup, n_topics=n_topics, n_embedding=n_embedding, n_hidden=n_hidden, dropout_rate=dropout_rate
        )

    @classmethod
    def _make_module(cls, setup: AnnDataSetup, **kwargs) -> ETMModule:
        return ETMModule(setup.n_vars, n_batch=setup.n_batch, **kwargs)

    def _elbo(self) -> ELBO:
        # No discrete latents; the Gaussian KL of delta is computed in closed form.
        return TraceMeanField_ELBO(max_plate_nesting=self.module.max_plate_nesting)

    def _train_defaults(self) -> dict:
        return {"lr": 5e-3, "batch_size": 2000, "train_size": 1.0}

    def train(
        self,
        *,
        max_epochs: int = 800,
        batch_size: int = 2000,
        lr: float = 5e-3,
        train_size: float = 1.0,
        n_epochs_kl_warmup: int | None = None,
        labels_key: str | None = None,
        monitor_every: int = 1,
        resolution: float = 1.0,
        cluster_method: str = "leiden",
        n_neighbors: int = 15,
        embedding: Embedding = "delta",
        callbacks: Iterable[Callable[[dict], bool | None]] = (),
        seed: int | None = 0,
        device: str = "auto",
        progress_bar: bool = True,
        **fit_kwargs,
    ) -> pd.DataFrame:
        """Train by SVI (see :func:`pyro_sc.infer.fit` for every option); returns the history.

        With 2,000 cells a minibatch (scETM's default) a data set of up to 2,000 cells takes one step
        per epoch, so an epoch is an iteration. ``n_epochs_kl_warmup`` anneals the KL weight linearly
        (counted in steps; default none: the KL is small beside the likelihood of thousands of counts).

        **Monitor.** With ``labels_key`` (an ``obs`` column of known cell types), every
        ``monitor_every`` epochs (and at the last) the cells' ``embedding`` (``"delta"``, the posterior
        mean of :math:`\\delta_n`, which scETM clusters; or ``"theta"``) is clustered by
        :func:`pyro_sc.metrics.clustering_scores` (``cluster_method`` "leiden" or "louvain", at the
        declared ``resolution``, ``n_neighbors``) and the history gets ``ari`` and ``n_clusters`` (NaN on
        the other epochs) and ``monitor_seconds`` (included in ``seconds``). Further ``callbacks``
        receive each epoch's record too.
        """
        labels_n = self._check_monitor(labels_key, monitor_every, embedding, cluster_method)
        callbacks = list(callbacks)
        if labels_n is not None:
            callbacks.insert(
                0, self._ari_monitor(labels_n, monitor_every, max_epochs, resolution, cluster_method, n_neighbors,
                                     embedding, 0 if seed is None else seed)
            )
        return super().train(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr, train_size=train_size, kl_warmup_epochs=n_epochs_kl_warmup,
            callbacks=callbacks, seed=seed, device=device, progress_bar=progress_bar, **fit_kwargs,
        )

    def _check_monitor(
        self, labels_key: str | None, monitor_every: int, embedding: str, cluster_method: str
    ) -> np.ndarray | None:
        if embedding not in ("delta", "theta"):
            raise ValueError(f"embedding must be 'delta' or 'theta', got {embedding!r}")
        if cluster_method not in ("leiden", "louvain"):
            raise ValueError(f"cluster_method must be 'leiden' or 'louvain', got {cluster_method!r}")
        if not isinstance(monitor_every, (int, np.integer)) or monitor_every < 1:
            raise ValueError(f"monitor_every must be a positive integer, got {monitor_every!r}")
        if labels_key is None:
            return None
        obs = self.adata.obs
        if labels_key not in obs.columns:
            raise DataError(f"labels key {labels_key!r} not found in adata.obs (columns: {list(obs.columns)})")
        if obs[labels_key].isna().any():
            raise DataError(f"labels key {labels_key!r} has {int(obs[labels_key].isna().sum())} missing values")
        return obs[labels_key].astype(str).to_numpy()

    def _ari_monitor(
        self, labels_n: np.ndarray, every: int, max_epochs: int, resolution: float, method: str,
        n_neighbors: int, embedding: Embedding, seed: int,
    ) -> Callable[[dict], None]:
        from ..metrics import clustering_scores

        def monitor(record: dict) -> None:
            record["ari"], record["n_clusters"], record["monitor_seconds"] = np.nan, np.nan, 0.0
            if record["epoch"] % every and record["epoch"] != max_epochs:
                return
            started = time.perf_counter()
            embedding_nk = self._embedding(self.setup, embedding, batch_size=2000)  # the driver restores the modes
            scores = clustering_scores(
                embedding_nk, labels_n, n_neighbors=n_neighbors, resolution=resolution, method=method, seed=seed
            )
            record["ari"], record["n_clusters"] = scores["ari"], scores["n_clusters"]
            record["monitor_seconds"] = time.perf_counter() - started

        return monitor

    # --------------------------------------------------------------------------------------- queries
    @torch.no_grad()
    def _embedding(self, setup: AnnDataSetup, kind: Embedding, batch_size: int, cells: np.ndarray | None = None) -> np.ndarray:
        """Posterior mean of delta, or its softmax theta, for cells ``cells`` of ``setup`` (default all): (cells, topics)."""
        out = []
        for mb in self._minibatches(setup, batch_size, cells):
            loc_nk, _ = self.module.encode(mb)
            out.append(loc_nk if kind == "delta" else torch.softmax(loc_nk, -1))
        return torch.cat(out).cpu().numpy()

    def _topic_names(self) -> list[str]:
        return [f"topic_{k}" for k in range(self.module.n_topics)]

    def get_latent_representation(
        self, adata: AnnData | None = None, *, indices: Sequence[int] | np.ndarray | None = None, batch_size: int = 2000
    ) -> np.ndarray:
        """The posterior mean of delta (unnormalised topic proportions), (cells, topics): what scETM clusters.
        ``indices`` selects cells of ``adata`` (default: the training data, all cells)."""
        self._check_trained()
        setup, cells = self._query_cells(adata, indices)
        return self._embedding(setup, "delta", batch_size, cells)

    def get_cell_topics(
        self, adata: AnnData | None = None, *, indices: Sequence[int] | np.ndarray | None = None, batch_size: int = 2000
    ) -> pd.DataFrame:
        """Topic proportions theta = softmax(posterior mean of delta): cells x topics, rows sum to one."""
        self._check_trained()
        setup, cells = self._query_cells(adata, indices)
        theta_nk = self._embedding(setup, "theta", batch_size, cells)
        return pd.DataFrame(theta_nk, index=setup.obs_names[cells], columns=self._topic_names())

    @torch.no_grad()
    def get_topic_genes(self, *, batch: str | None = None) -> pd.DataFrame:
        """beta: topics x genes, each row a distribution over the genes.

        With a ``batch_key``, ``batch=None`` gives the topics without batch bias,
        ``softmax(alpha rho^T)``; ``batch="name"`` that batch's ``softmax(alpha rho^T + lambda_s)``.
        """
        self._check_trained()
        if batch is None:
            beta_kg = self.module.beta(with_batch_bias=False)[0]
        else:
            categories = self.setup.batch_categories
            if categories is None or batch not in categories:
                known = [] if categories is None else list(categories)
                raise KeyError(f"unknown batch {batch!r}; known: {known}")
            beta_kg = self.module.beta()[int(categories.get_loc(batch))]
        return pd.DataFrame(beta_kg.cpu().numpy(), index=self._topic_names(), columns=self.setup.var_names)

    def top_genes(self, n: int = 10, *, batch: str | None = None) -> pd.DataFrame:
        """The ``n`` genes of highest probability in each topic: topics x rank (1..n), gene names."""
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= self.setup.n_vars:
            raise ValueError(f"n must be an integer in [1, {self.setup.n_vars}], got {n!r}")
        beta = self.get_topic_genes(batch=batch)
        order_kn = np.argsort(-beta.to_numpy(), axis=1, kind="stable")[:, :n]
        return pd.DataFrame(beta.columns.to_numpy()[order_kn], index=beta.index, columns=range(1, n + 1))

    def topic_enrichment(self, labels: Sequence | str) -> pd.DataFrame:
        """Each cell type's mean topic proportions minus those of all the other cells: types x topics.

        ``labels`` is an ``obs`` key or one label per cell. The topic most associated with each type is
        ``model.topic_enrichment("cell_type").idxmax(axis=1)``.
        """
        theta = self.get_cell_topics()
        if isinstance(labels, str):
            if labels not in self.adata.obs.columns:
                raise KeyError(f"labels key {labels!r} not found in adata.obs")
            labels = self.adata.obs[labels]
        labels_n = np.asarray(labels).astype(str)
        if labels_n.shape != (len(theta),):
            raise ValueError(f"labels must have one entry per cell ({len(theta)}), got shape {labels_n.shape}")
        rows = {}
        for label in pd.unique(labels_n):
            inside = labels_n == label
            rest = theta[~inside].mean() if (~inside).any() else 0.0
            rows[label] = theta[inside].mean() - rest
        return pd.DataFrame(rows).T

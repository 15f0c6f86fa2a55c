r"""Non-negative matrix factorisation baselines: squared error and Poisson (Lee & Seung 2001).

Not Pyro: plain numpy on the same counts and with the same metrics as the package's models, for the
comparisons of topic models with the factorisations they are usually set against.

**Orientation.** The counts are **genes x cells**, as in the papers' :math:`V \approx WH`:
:math:`X \in \mathbb R_{\ge 0}^{G \times N}` (pass ``adata.X.T`` for an AnnData, or the AnnData itself),
:math:`W \in \mathbb R_{\ge 0}^{G \times K}` the factors' gene loadings ("topics" over genes) and
:math:`H \in \mathbb R_{\ge 0}^{K \times N}` the cells' factor activities.

* :func:`nmf_sse` minimises :math:`\lVert X - WH \rVert_F^2` by the multiplicative updates

  .. math:: H \leftarrow H \odot \frac{W^\top X}{W^\top W H}, \qquad
            W \leftarrow W \odot \frac{X H^\top}{W H H^\top}.

* :func:`nmf_poisson` maximises the Poisson log-likelihood
  :math:`\sum_{gn} x_{gn} \log (WH)_{gn} - (WH)_{gn} - \log x_{gn}!` (equivalently minimises the
  generalised KL divergence) by

  .. math:: H \leftarrow H \odot \frac{W^\top (X \oslash WH)}{W^\top \mathbf 1}, \qquad
            W \leftarrow W \odot \frac{(X \oslash WH) H^\top}{\mathbf 1 H^\top}.

Each update does not increase (SSE) / decrease (Poisson) the objective (Lee & Seung 2001, Theorems 1
and 2). Every denominator is floored at ``eps`` (1e-12 times the data's scale), so a factor whose
loadings all reach zero stays at zero instead of producing NaN; the floor is far below any value the
updates produce otherwise, so the monotonicity is kept in practice (the tests check it).

**The cell embedding** scored against known labels is each cell's factor proportions: :math:`W`'s
columns are rescaled to sum to one (:math:`H` scaled the other way, :math:`WH` unchanged), and each
cell's column of :math:`H` is normalised to sum to one -- the analogue of a topic model's
:math:`\theta_n`, free of the library size. It is clustered by :func:`pyro_sc.metrics.clustering_scores`
(Leiden or Louvain at one declared resolution).
"""

from __future__ import annotations

import time
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.special import gammaln

__all__ = ["NMFResult", "nmf_sse", "nmf_poisson", "cell_proportions"]


class NMFResult(NamedTuple):
    """``w_gk`` (genes x K), ``h_kn`` (K x cells) and the per-iteration ``history`` (a DataFrame).

    Unpacks as ``w_gk, h_kn, history = nmf_poisson(...)``.
    """

    w_gk: np.ndarray
    h_kn: np.ndarray
    history: pd.DataFrame


def cell_proportions(w_gk: np.ndarray, h_kn: np.ndarray) -> np.ndarray:
    """Each cell's factor proportions (cells x K, rows sum to one; all-zero cells stay zero).

    ``W``'s columns are rescaled to sum to one and ``H`` the other way (``WH`` unchanged), then each
    cell's activities are normalised to sum to one.
    """
    h_kn = h_kn * w_gk.sum(0)[:, None]
    total_n = h_kn.sum(0)
    return (h_kn / np.where(total_n > 0, total_n, 1.0)).T


def _counts_gn(x: Any) -> sp.csc_matrix:
    """A checked float64 genes x cells matrix, sparse by cells (the updates touch X only at its non-zeros)."""
    if isinstance(x, AnnData):
        x = x.X.T
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"x must be a non-empty 2-d genes x cells matrix, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"x holds {x.dtype} values, expected real numbers")
    x = sp.csc_matrix(x, dtype=np.float64)
    x.sort_indices()
    if not np.isfinite(x.data).all():
        raise ValueError("x has NaN or inf values")
    if (x.data < 0).any():
        raise ValueError("x has negative values; NMF needs a non-negative matrix")
    x.eliminate_zeros()
    if x.nnz == 0:
        raise ValueError("x is all zeros")
    return x


def _wh_at(w_gk: np.ndarray, h_kn: np.ndarray, x_gn: sp.csc_matrix, max_entries: int = 1 << 22) -> np.ndarray:
    """``WH`` at the non-zeros of ``x_gn`` (CSC), in ``x_gn.data`` order: dense products over blocks of
    cells of at most ``max_entries`` entries (bounded memory), gathered at the non-zeros."""
    out = np.empty(x_gn.nnz)
    n_genes, n_cells = x_gn.shape
    step = max(1, max_entries // n_genes)
    for start in range(0, n_cells, step):
        stop = min(start + step, n_cells)
        lo, hi = x_gn.indptr[start], x_gn.indptr[stop]
        cols = np.repeat(np.arange(stop - start), np.diff(x_gn.indptr[start : stop + 1]))
        out[lo:hi] = (w_gk @ h_kn[:, start:stop])[x_gn.indices[lo:hi], cols]
    return out


def _check_options(x_gn: sp.csc_matrix, k: int, n_iter: int, labels: Sequence | None) -> np.ndarray | None:
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= min(x_gn.shape):
        raise ValueError(f"k must be an integer in [1, min(genes, cells)] = [1, {min(x_gn.shape)}], got {k!r}")
    if not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    if labels is None:
        return None
    labels_n = np.asarray(labels)
    if labels_n.shape != (x_gn.shape[1],):
        raise ValueError(
            f"labels must have one entry per cell ({x_gn.shape[1]}, the columns of the genes x cells x), "
            f"got shape {labels_n.shape}"
        )
    if pd.isna(labels_n).any():
        raise ValueError("labels has missing values")
    return labels_n


def _init(x_gn: sp.csc_matrix, k: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random factors scaled so that WH matches the mean of X on average."""
    rng = np.random.default_rng(seed)
    scale = np.sqrt(x_gn.mean() / k)
    return rng.uniform(0.0, 2.0 * scale, (x_gn.shape[0], k)), rng.uniform(0.0, 2.0 * scale, (k, x_gn.shape[1]))


def _run(
    kind: Literal["sse", "poisson"],
    x: Any,
    k: int,
    n_iter: int,
    seed: int | None,
    labels: Sequence | None,
    resolution: float,
    method: str,
    n_neighbors: int,
    ari_every: int,
) -> NMFResult:
    x_gn = _counts_gn(x)
    labels_n = _check_options(x_gn, k, n_iter, labels)
    if ari_every < 1:
        raise ValueError(f"ari_every must be >= 1, got {ari_every}")
    if labels_n is not None:
        from .metrics import clustering_scores
    w_gk, h_kn = _init(x_gn, k, seed)
    eps = 1e-12 * max(x_gn.data.max(), 1.0)
    x_nz = x_gn.data
    size = x_gn.shape[0] * x_gn.shape[1]
    sum_x2 = float(x_nz @ x_nz)
    log_factorial = float(gammaln(x_nz + 1.0).sum())

    def objective(wh_nz: np.ndarray) -> float:
        """The objective from WH at the non-zeros of X (the rest in closed form)."""
        if kind == "sse":
            # ||X - WH||^2 = ||X||^2 - 2 <X, WH> + tr(W'W HH'), without forming WH
            sse = sum_x2 - 2.0 * float(x_nz @ wh_nz) + float(np.sum((w_gk.T @ w_gk) * (h_kn @ h_kn.T)))
            return max(sse, 0.0) / size
        total_wh = float(w_gk.sum(0) @ h_kn.sum(1))
        return (float(x_nz @ np.log(np.maximum(wh_nz, eps))) - total_wh - log_factorial) / size

    def ratio(wh_nz: np.ndarray) -> sp.csc_matrix:
        """X / WH, non-zero only where X is."""
        return sp.csc_matrix((x_nz / np.maximum(wh_nz, eps), x_gn.indices, x_gn.indptr), shape=x_gn.shape)

    wh_nz = _wh_at(w_gk, h_kn, x_gn)
    records = []
    for it in range(1, n_iter + 1):
        started = time.perf_counter()
        if kind == "sse":
            h_kn *= np.asarray((x_gn.T @ w_gk).T) / np.maximum((w_gk.T @ w_gk) @ h_kn, eps)
            w_gk *= np.asarray(x_gn @ h_kn.T) / np.maximum(w_gk @ (h_kn @ h_kn.T), eps)
        else:
            h_kn *= np.asarray((ratio(wh_nz).T @ w_gk).T) / np.maximum(w_gk.sum(0)[:, None], eps)
            w_gk *= np.asarray(ratio(_wh_at(w_gk, h_kn, x_gn)) @ h_kn.T) / np.maximum(h_kn.sum(1)[None, :], eps)
        wh_nz = _wh_at(w_gk, h_kn, x_gn)
        seconds = time.perf_counter() - started
        record = {"iteration": it, "objective": objective(wh_nz), "seconds": seconds}
        if labels_n is not None:
            record["ari"] = np.nan
            if it % ari_every == 0 or it == n_iter:
                scores = clustering_scores(
                    cell_proportions(w_gk, h_kn), labels_n, n_neighbors=n_neighbors, resolution=resolution,
                    method=method, seed=0 if seed is None else seed,
                )
                record["ari"], record["n_clusters"] = scores["ari"], scores["n_clusters"]
        records.append(record)
    history = pd.DataFrame.from_records(records)
    history.attrs.update(
        {"objective": "mean squared error" if kind == "sse" else "mean Poisson log-likelihood",
         "resolution": resolution, "method": method, "n_neighbors": n_neighbors}
    )
    return NMFResult(w_gk, h_kn, history)


def nmf_sse(
    x: Any,
    k: int,
    *,
    n_iter: int = 100,
    seed: int | None = 0,
    labels: Sequence | None = None,
    resolution: float = 1.0,
    method: str = "leiden",
    n_neighbors: int = 15,
    ari_every: int = 1,
) -> NMFResult:
    """NMF minimising the squared error :math:`\\lVert X - WH \\rVert^2` by Lee & Seung's updates.

    Parameters
    ----------
    x
        **Genes x cells**, non-negative (dense, scipy-sparse, or an AnnData, whose ``X.T`` is used).
    k
        Number of factors.
    n_iter
        Iterations (one update of H then of W each).
    seed
        Seeds the uniform random initialisation (and the clustering).
    labels, resolution, method, n_neighbors, ari_every
        With ``labels`` (one per cell), every ``ari_every`` iterations (and at the last) the ARI of the
        cells' factor proportions (:func:`cell_proportions`) clustered by
        :func:`pyro_sc.metrics.clustering_scores` (``method`` "leiden" or "louvain" at the declared
        ``resolution``) against them.

    Returns
    -------
    :class:`NMFResult` ``(w_gk, h_kn, history)``; ``history`` has one row per iteration: ``iteration``,
    ``objective`` (the mean squared error over the entries of X after the iteration), ``seconds`` (of the
    update), and with labels ``ari`` (NaN where not computed) and ``n_clusters``.
    """
    return _run("sse", x, k, n_iter, seed, labels, resolution, method, n_neighbors, ari_every)


def nmf_poisson(
    x: Any,
    k: int,
    *,
    n_iter: int = 100,
    seed: int | None = 0,
    labels: Sequence | None = None,
    resolution: float = 1.0,
    method: str = "leiden",
    n_neighbors: int = 15,
    ari_every: int = 1,
) -> NMFResult:
    """NMF maximising the Poisson log-likelihood of counts :math:`x_{gn} \\sim \\mathrm{Poisson}((WH)_{gn})`.

    Options as :func:`nmf_sse`. ``history["objective"]`` is the mean over the entries of X of the Poisson
    log-likelihood :math:`x \\log (WH) - WH - \\log x!` (higher is better; the constant
    :math:`\\log x!` is included so that it is the log-likelihood proper).
    """
    return _run("poisson", x, k, n_iter, seed, labels, resolution, method, n_neighbors, ari_every)

"""Evaluation metrics for single-cell embeddings and label predictions.

Four families:

* **Label transfer** -- :func:`accuracy`, :func:`balanced_accuracy`, :func:`per_type_recall`,
  :func:`confusion_matrix` (numpy / pandas only).
* **Clustering agreement** -- :func:`cluster_embedding`, :func:`clustering_scores`,
  :func:`best_over_resolutions`: Leiden (or Louvain) on scanpy's kNN graph of an embedding, scored
  against known labels with the adjusted Rand index and normalised mutual information.
* **Mixing** -- :func:`lisi` (Local Inverse Simpson's Index, Korsunsky et al. 2019), its aliases
  :func:`ilisi` / :func:`clisi`, :func:`pairwise_ilisi` and :func:`batch_mixing_summary`.
* **Model fit** -- :func:`marginal_log_likelihood`: held-out log p(x_n) of any model / guide pair by
  importance sampling, enumerated discrete latents summed out exactly (torch / Pyro only).

The clustering and LISI functions need the optional ``analysis`` extra (scanpy, scikit-learn,
leidenalg, igraph); they import it lazily and raise an :class:`ImportError` naming
``pip install pyro_sc[analysis]`` when it is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from pyro import poutine
from pyro.ops import packed
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import prune_subsample_sites

from .data import AnnDataSetup, Minibatch, iterate_minibatches

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "per_type_recall",
    "confusion_matrix",
    "cluster_embedding",
    "clustering_scores",
    "best_over_resolutions",
    "DEFAULT_RESOLUTIONS",
    "lisi",
    "ilisi",
    "clisi",
    "pairwise_ilisi",
    "batch_mixing_summary",
    "marginal_log_likelihood",
]

_ANALYSIS_HINT = "pip install pyro_sc[analysis]"

#: Resolution grid of :func:`best_over_resolutions`: 0.1, 0.2, ..., 2.0.
DEFAULT_RESOLUTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 21))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _import_optional(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"{what} needs the optional dependency '{module}'; install it with `{_ANALYSIS_HINT}`."
        ) from err


def _labels_1d(labels: Any, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _paired_labels(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _labels_1d(y_true, "y_true")
    p = _labels_1d(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError("y_true and y_pred are empty")
    return t, p


def _category_order(*label_sets: Any) -> list:
    """Union of the labels: categorical inputs keep their category order, the rest are sorted
    (order of first appearance where the labels are not mutually comparable)."""
    cats: list = []
    seen: set = set()
    plain = []
    for labels in label_sets:
        if isinstance(labels, pd.Categorical) or isinstance(
            getattr(labels, "dtype", None), pd.CategoricalDtype
        ):
            for c in pd.Categorical(labels).categories:
                if c not in seen:
                    seen.add(c)
                    cats.append(c)
        else:
            plain.append(np.asarray(labels))
    if plain:
        values = pd.unique(pd.Series(np.concatenate([p.astype(object) for p in plain])))
        rest = [v for v in values if v not in seen]
        try:
            rest = sorted(rest)
        except TypeError:
            pass
        cats.extend(rest)
    return cats


def _as_embedding(embedding_nk: Any) -> np.ndarray:
    x = np.asarray(embedding_nk, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embedding_nk must be a 2-d (cells x dims) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embedding_nk contains NaN or infinite values")
    return x


def _check_same_length(embedding_nk: np.ndarray, labels_n: np.ndarray, name: str) -> None:
    if labels_n.shape[0] != embedding_nk.shape[0]:
        raise ValueError(
            f"{name} has {labels_n.shape[0]} entries but the embedding has {embedding_nk.shape[0]} rows"
        )


def _codes(labels_n: Any, name: str) -> tuple[np.ndarray, int]:
    arr = _labels_1d(labels_n, name)
    codes, uniques = pd.factorize(pd.Series(arr), use_na_sentinel=True)
    if np.any(codes < 0):
        raise ValueError(f"{name} contains missing values")
    return codes.astype(np.int64), len(uniques)


# ----------------------------------------------------------------------------------------------
# label transfer
# ----------------------------------------------------------------------------------------------
def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of cells whose predicted label equals the true label."""
    t, p = _paired_labels(y_true, y_pred)
    return float(np.mean(t == p))


def per_type_recall(y_true: Any, y_pred: Any) -> pd.Series:
    """Recall of every true cell type: the fraction of its cells predicted as that type.

    Indexed by the categories present in ``y_true`` (categorical order, else sorted); named
    ``"recall"``.
    """
    t, p = _paired_labels(y_true, y_pred)
    cats = [c for c in _category_order(y_true) if np.any(t == c)]
    recall = [float(np.mean(p[t == c] == c)) for c in cats]
    return pd.Series(recall, index=pd.Index(cats, name="true"), name="recall")


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean of :func:`per_type_recall` over the types present in ``y_true`` (as scikit-learn's
    ``balanced_accuracy_score``): every cell type weighs the same whatever its size."""
    return float(per_type_recall(y_true, y_pred).mean())


def confusion_matrix(y_true: Any, y_pred: Any, *, normalize: str | None = None) -> pd.DataFrame:
    """Confusion matrix: rows are true labels (index ``"true"``), columns predicted labels
    (``"predicted"``), both over the union of the labels of ``y_true`` and ``y_pred``.

    normalize:
        ``None`` (counts), ``"true"`` (each row sums to 1: row-wise recall), ``"pred"`` (each
        column sums to 1: precision) or ``"all"`` (the matrix sums to 1). As in scikit-learn, a row
        or column with no cells is left at 0 rather than NaN.
    """
    if normalize not in (None, "true", "pred", "all"):
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}")
    t, p = _paired_labels(y_true, y_pred)
    cats = _category_order(y_true, y_pred)
    index = pd.Index(cats)
    ti = index.get_indexer(t.astype(object))
    pi = index.get_indexer(p.astype(object))
    m = len(cats)
    counts = np.bincount(ti * m + pi, minlength=m * m).reshape(m, m)
    if normalize is None:
        values: np.ndarray = counts
    else:
        c = counts.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            if normalize == "true":
                values = c / c.sum(axis=1, keepdims=True)
            elif normalize == "pred":
                values = c / c.sum(axis=0, keepdims=True)
            else:
                values = c / c.sum()
        values = np.nan_to_num(values)
    return pd.DataFrame(
        values,
        index=pd.Index(cats, name="true"),
        columns=pd.Index(cats, name="predicted"),
    )


# ----------------------------------------------------------------------------------------------
# clustering
# ----------------------------------------------------------------------------------------------
_METHODS = ("leiden", "louvain")


def _neighbours_adata(embedding_nk: Any, n_neighbors: int, seed: int) -> Any:
    """A throwaway AnnData holding the embedding and scanpy's kNN graph on it."""
    sc = _import_optional("scanpy", "Graph clustering")
    anndata = _import_optional("anndata", "Graph clustering")
    x = _as_embedding(embedding_nk)
    n = x.shape[0]
    if not 1 < n_neighbors < n:
        raise ValueError(f"n_neighbors must be in [2, n_cells - 1] = [2, {n - 1}], got {n_neighbors}")
    adata = anndata.AnnData(
        obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)), obsm={"X_emb": x.astype(np.float32)}
    )
    sc.pp.neighbors(adata, use_rep="X_emb", n_neighbors=n_neighbors, random_state=seed)
    return adata


def _louvain(connectivities: Any, resolution: float, seed: int) -> np.ndarray:
    """Louvain (igraph's ``community_multilevel``, modularity with ``resolution``) on a symmetric
    weighted adjacency matrix; clusters numbered by decreasing size. igraph draws its vertex orders
    from a ``random.Random(seed)`` installed for the call (then Python's ``random`` again, its default)."""
    import random

    igraph = _import_optional("igraph", "Louvain clustering")
    sparse = _import_optional("scipy.sparse", "Louvain clustering")
    upper = sparse.triu(sparse.csr_matrix(connectivities), k=1).tocoo()  # each undirected edge once
    graph = igraph.Graph(n=connectivities.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist())
    graph.es["weight"] = upper.data.astype(np.float64).tolist()
    igraph.set_random_number_generator(random.Random(seed))
    try:
        partition = graph.community_multilevel(weights="weight", resolution=resolution)
        membership = np.asarray(partition.membership)
    finally:
        igraph.set_random_number_generator(random)
    _, first, codes, sizes = np.unique(membership, return_index=True, return_inverse=True, return_counts=True)
    rank = np.empty(len(sizes), dtype=np.int64)
    rank[np.lexsort((first, -sizes))] = np.arange(len(sizes))  # biggest first, ties by first cell
    return rank[codes]


def _cluster_adata(adata: Any, resolution: float, method: str, seed: int) -> np.ndarray:
    sc = _import_optional("scanpy", "Graph clustering")
    key = "_pyro_sc_cluster"
    if method == "leiden":
        _import_optional("igraph", "Leiden clustering")
        sc.tl.leiden(
            adata,
            resolution=resolution,
            random_state=seed,
            key_added=key,
            flavor="igraph",
            n_iterations=2,
            directed=False,
        )
    elif method == "louvain":
        return _louvain(adata.obsp["connectivities"], resolution, seed)
    else:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return adata.obs[key].astype(int).to_numpy()


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def cluster_embedding(
    embedding_nk: Any,
    *,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    method: str = "leiden",
    seed: int = 0,
) -> np.ndarray:
    """Graph-cluster the cells of an embedding; returns integer cluster labels (n,).

    Builds scanpy's kNN graph (``sc.pp.neighbors(use_rep=..., n_neighbors=...)``, UMAP
    connectivities) on a throwaway AnnData and runs ``sc.tl.leiden`` (``flavor="igraph"``,
    ``n_iterations=2``, undirected) or Louvain: python-igraph's ``Graph.community_multilevel``
    (modularity at ``resolution``) on the same connectivities, each edge once with its weight -- the
    algorithm of ``sc.tl.louvain`` without its extra ``louvain`` package. ``seed`` seeds both the
    neighbour search and the clustering.
    """
    _check_method(method)
    adata = _neighbours_adata(embedding_nk, n_neighbors, seed)
    return _cluster_adata(adata, resolution, method, seed)


def _agreement(labels_n: np.ndarray, clusters_n: np.ndarray) -> dict[str, float]:
    metrics = _import_optional("sklearn.metrics", "Clustering scores")
    return {
        "ari": float(metrics.adjusted_rand_score(labels_n, clusters_n)),
        "nmi": float(metrics.normalized_mutual_info_score(labels_n, clusters_n)),
    }


def clustering_scores(
    embedding_nk: Any,
    labels_n: Any,
    *,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    method: str = "leiden",
    seed: int = 0,
) -> dict[str, Any]:
    """Cluster the embedding (:func:`cluster_embedding`) and compare with known labels.

    Returns ``{"ari", "nmi", "n_clusters", "resolution", "method", "n_neighbors"}``: the adjusted
    Rand index and normalised mutual information (scikit-learn, arithmetic normalisation) between
    the clusters and ``labels_n`` at this single, pre-chosen resolution.
    """
    _check_method(method)
    x = _as_embedding(embedding_nk)
    labels = _labels_1d(labels_n, "labels_n")
    _check_same_length(x, labels, "labels_n")
    clusters = cluster_embedding(
        x, n_neighbors=n_neighbors, resolution=resolution, method=method, seed=seed
    )
    return {
        **_agreement(labels, clusters),
        "n_clusters": int(np.unique(clusters).size),
        "resolution": float(resolution),
        "method": method,
        "n_neighbors": int(n_neighbors),
    }


def best_over_resolutions(
    embedding_nk: Any,
    labels_n: Any,
    *,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    n_neighbors: int = 15,
    method: str = "leiden",
    seed: int = 0,
    criterion: str = "ari",
) -> pd.DataFrame:
    """Clustering scores over a grid of resolutions, with the best one marked.

    The kNN graph is built once and clustered at every resolution. Returns one row per resolution
    with columns ``resolution, n_clusters, ari, nmi, best``; ``best`` is True on exactly one row,
    the first with the maximal ``criterion`` (``"ari"`` or ``"nmi"``).

    The best-over-grid score is chosen *with the true labels* and is therefore optimistic: report
    it as "best over resolutions {grid}", never as the score at a fixed resolution. Some published
    numbers are of this kind, which is why this function exists.
    """
    _check_method(method)
    if criterion not in ("ari", "nmi"):
        raise ValueError(f"criterion must be 'ari' or 'nmi', got {criterion!r}")
    resolutions = [float(r) for r in resolutions]
    if not resolutions:
        raise ValueError("resolutions is empty")
    x = _as_embedding(embedding_nk)
    labels = _labels_1d(labels_n, "labels_n")
    _check_same_length(x, labels, "labels_n")
    adata = _neighbours_adata(x, n_neighbors, seed)
    rows = []
    for res in resolutions:
        clusters = _cluster_adata(adata, res, method, seed)
        rows.append(
            {"resolution": res, "n_clusters": int(np.unique(clusters).size), **_agreement(labels, clusters)}
        )
    table = pd.DataFrame(rows, columns=["resolution", "n_clusters", "ari", "nmi"])
    table["best"] = False
    table.loc[int(np.argmax(table[criterion].to_numpy())), "best"] = True
    table.attrs.update({"criterion": criterion, "method": method, "n_neighbors": n_neighbors, "seed": seed})
    return table


# ----------------------------------------------------------------------------------------------
# LISI
# ----------------------------------------------------------------------------------------------
_LISI_CHUNK = 65536


def _default_lisi_k(perplexity: float) -> int:
    # 3 * perplexity neighbours besides the cell itself, as harmonypy >= 2 (C++ backend). The R
    # package and harmonypy <= 0.0.10 search 3 * perplexity neighbours *including* the cell and
    # drop it, i.e. use one neighbour fewer (pass n_neighbors=3 * perplexity - 1 to match them).
    return int(3 * perplexity)


def _lisi_knn(
    x: np.ndarray, perplexity: float, n_neighbors: int | None, algorithm: str = "brute"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k nearest neighbours of every cell, the cell itself excluded; sorted."""
    if perplexity <= 0:
        raise ValueError(f"perplexity must be positive, got {perplexity}")
    n = x.shape[0]
    if n < 2:
        raise ValueError("LISI needs at least two cells")
    k = _default_lisi_k(perplexity) if n_neighbors is None else int(n_neighbors)
    if k < 1:
        raise ValueError(f"need at least one neighbour, got n_neighbors={k}")
    k = min(k, n - 1)
    neighbors = _import_optional("sklearn.neighbors", "LISI")
    # kneighbors() without a query excludes every point from its own neighbour list.
    dist, idx = neighbors.NearestNeighbors(n_neighbors=k, algorithm=algorithm).fit(x).kneighbors()
    return dist, idx


def _perplexity_weights(dist: np.ndarray, perplexity: float, tol: float, max_iter: int) -> np.ndarray:
    """Per-row kernel weights ``P_ij ∝ exp(-beta_i * d_ij)`` with beta_i from the reference's
    bisection so that the entropy of row i matches log(perplexity); vectorised over rows.

    Replicates ``Hbeta`` / ``compute_simpson_index`` of immunogenomics/LISI (and harmonypy's
    ``compute_simpson``) step for step: beta starts at 1, doubles (halves) while no upper (lower)
    bound is known, bisects once it is, stops per row when |H - log(perplexity)| <= tol or after
    ``max_iter`` updates. Distances are shifted by the row minimum before exponentiating, which
    leaves P and H unchanged but avoids the reference's underflow for large distances.
    """
    d = dist - dist[:, :1]
    m = d.shape[0]
    log_u = np.log(perplexity)

    def hbeta(d_rows: np.ndarray, beta_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.exp(-d_rows * beta_rows[:, None])
        sum_p = p.sum(axis=1)  # >= 1: the nearest neighbour has weight exp(0)
        h = np.log(sum_p) + beta_rows * (d_rows * p).sum(axis=1) / sum_p
        return h, p / sum_p[:, None]

    beta = np.ones(m)
    beta_min = np.full(m, -np.inf)
    beta_max = np.full(m, np.inf)
    h, p = hbeta(d, beta)
    h_diff = h - log_u
    for _ in range(max_iter):
        rows = np.flatnonzero(np.abs(h_diff) > tol)
        if rows.size == 0:
            break
        b, bmin, bmax = beta[rows], beta_min[rows], beta_max[rows]
        too_flat = h_diff[rows] > 0  # entropy too high: sharpen the kernel (raise beta)
        beta_min[rows] = np.where(too_flat, b, bmin)
        beta_max[rows] = np.where(too_flat, bmax, b)
        beta[rows] = np.where(
            too_flat,
            np.where(np.isfinite(bmax), (b + bmax) / 2, b * 2),
            np.where(np.isfinite(bmin), (b + bmin) / 2, b / 2),
        )
        h_rows, p_rows = hbeta(d[rows], beta[rows])
        h_diff[rows] = h_rows - log_u
        p[rows] = p_rows
    return p


def _inverse_simpson(p: np.ndarray, labels_of_neighbours: np.ndarray, n_categories: int) -> np.ndarray:
    """1 / sum_b (sum of the weights of the neighbours labelled b)^2, row by row."""
    sparse = _import_optional("scipy.sparse", "LISI")
    m, k = p.shape
    mass = sparse.csr_matrix(
        (p.ravel(), (np.repeat(np.arange(m), k), labels_of_neighbours.ravel())), shape=(m, n_categories)
    )  # duplicate entries are summed
    simpson = np.asarray(mass.multiply(mass).sum(axis=1)).ravel()
    return 1.0 / simpson


def _lisi_from_knn(
    dist: np.ndarray,
    idx: np.ndarray,
    codings: Sequence[tuple[np.ndarray, int]],
    perplexity: float,
    tol: float,
    max_iter: int,
) -> list[np.ndarray]:
    """LISI of one kNN graph under one or more labelings (the kernel weights are shared)."""
    n = dist.shape[0]
    out = [np.empty(n) for _ in codings]
    for start in range(0, n, _LISI_CHUNK):
        sl = slice(start, min(start + _LISI_CHUNK, n))
        p = _perplexity_weights(dist[sl], perplexity, tol, max_iter)
        for res, (codes, n_cat) in zip(out, codings):
            res[sl] = _inverse_simpson(p, codes[idx[sl]], n_cat)
    return out


def lisi(
    embedding_nk: Any,
    labels_n: Any,
    *,
    perplexity: float = 30,
    n_neighbors: int | None = None,
    tol: float = 1e-5,
    max_iter: int = 50,
    algorithm: str = "brute",
) -> np.ndarray:
    """Local Inverse Simpson's Index of every cell (Korsunsky et al. 2019, the Harmony paper).

    For each cell: take its ``n_neighbors`` Euclidean nearest neighbours (itself excluded;
    default ``int(3 * perplexity)``), weight neighbour j by ``exp(-beta * d_j)``
    normalised to sum to one, with beta found per cell by the reference's bisection so that the
    entropy of the weights equals ``log(perplexity)`` (to ``tol``, at most ``max_iter`` steps),
    sum the weights per label and return ``1 / sum_b w_b**2`` -- the effective number of labels
    in the cell's neighbourhood, between 1 and the number of labels.

    Definitions follow the reference implementations (R ``lisi::compute_lisi`` /
    ``compute_simpson_index``, harmonypy ``compute_lisi``): the kernel is applied to the
    *unsquared* Euclidean distances, exactly as there. The default neighbour count is that of
    harmonypy >= 2 (agreement to ~1e-14); the R package and harmonypy <= 0.0.10 use
    ``3 * perplexity - 1`` neighbours (they search 3 * perplexity including the cell and drop it):
    pass ``n_neighbors=3 * perplexity - 1`` to reproduce them. Two deliberate differences, neither of
    which changes a result the reference computes normally: distances are shifted by each cell's
    nearest distance before exponentiating (P and the entropy are invariant; the reference's float
    arithmetic underflows at distances of roughly 90 and beyond), and a cell whose search ends with
    all weight on one neighbour gets LISI 1 instead of the reference's sentinel -1. If the data
    has fewer than ``n_neighbors + 1`` cells, all other cells are used.

    With batch labels this is iLISI (:func:`ilisi`, higher = better mixed), with cell-type labels
    cLISI (:func:`clisi`, lower = purer neighbourhoods).

    ``algorithm`` is scikit-learn's ``NearestNeighbors`` algorithm; all are exact. The default,
    brute force, is the fastest measured on 10-30-dimensional embeddings of <= 1e5 cells (30k cells
    in 10 / 30 dims: 5 / 6 s, against 17 / 94 s for a k-d tree); trees may win on larger data.
    """
    x = _as_embedding(embedding_nk)
    codes, n_cat = _codes(labels_n, "labels_n")
    _check_same_length(x, codes, "labels_n")
    dist, idx = _lisi_knn(x, perplexity, n_neighbors, algorithm)
    return _lisi_from_knn(dist, idx, [(codes, n_cat)], perplexity, tol, max_iter)[0]


def ilisi(embedding_nk: Any, batch_n: Any, **kwargs: Any) -> np.ndarray:
    """Integration LISI: :func:`lisi` over batch labels (1 = unmixed, n_batches = ideal)."""
    return lisi(embedding_nk, batch_n, **kwargs)


def clisi(embedding_nk: Any, cell_type_n: Any, **kwargs: Any) -> np.ndarray:
    """Cell-type LISI: :func:`lisi` over cell-type labels (1 = pure neighbourhoods, lower is better)."""
    return lisi(embedding_nk, cell_type_n, **kwargs)


def pairwise_ilisi(
    embedding_nk: Any,
    batch_n: Any,
    *,
    perplexity: float = 30,
    n_neighbors: int | None = None,
    tol: float = 1e-5,
    max_iter: int = 50,
    algorithm: str = "brute",
) -> np.ndarray:
    """Pairwise iLISI of every cell (the capVI paper's batch-mixing score), in [1, 2].

    Our reading of the definition: for every unordered pair of batches (a, b), restrict the data
    to the cells of a and b, recompute the kNN graph on that subset and compute the two-label
    :func:`ilisi` of each of its cells. A cell of batch a thus gets one value per other batch b;
    its pairwise iLISI is the median of those ``n_batches - 1`` values. Unlike plain iLISI, whose
    maximum is the number of batches and which cannot reach it where batches differ in
    composition, every cell is scored on the same 1-to-2 scale. With two batches it equals
    :func:`ilisi`. Costs ``n_batches * (n_batches - 1) / 2`` kNN searches. A pair with fewer than
    ``n_neighbors + 1`` cells uses all its other cells as neighbours. The options are those of
    :func:`lisi`.
    """
    x = _as_embedding(embedding_nk)
    codes, n_batches = _codes(batch_n, "batch_n")
    _check_same_length(x, codes, "batch_n")
    if n_batches < 2:
        raise ValueError("pairwise_ilisi needs at least two batches")
    per_pair = np.full((x.shape[0], n_batches), np.nan)  # column b: value against batch b
    for a, b in itertools.combinations(range(n_batches), 2):
        cells = np.flatnonzero((codes == a) | (codes == b))
        sub_codes = (codes[cells] == b).astype(np.int64)
        dist, idx = _lisi_knn(x[cells], perplexity, n_neighbors, algorithm)
        values = _lisi_from_knn(dist, idx, [(sub_codes, 2)], perplexity, tol, max_iter)[0]
        in_a = sub_codes == 0
        per_pair[cells[in_a], b] = values[in_a]
        per_pair[cells[~in_a], a] = values[~in_a]
    return np.nanmedian(per_pair, axis=1)


def batch_mixing_summary(
    embedding_nk: Any,
    batch_n: Any,
    *,
    perplexity: float = 30,
    n_neighbors: int | None = None,
    random_reference: bool = True,
    pairwise: bool = False,
    seed: int = 0,
    algorithm: str = "brute",
) -> dict[str, Any]:
    """Summary of batch mixing in an embedding.

    Returns a dict with
      * ``ilisi_median``, ``ilisi_mean``: of the per-cell :func:`ilisi`;
      * ``n_batches``: the nominal maximum of iLISI. The kernel-weighted index does not reach it
        even for perfect mixing (the weights are concentrated on ~perplexity neighbours, whose
        batch counts fluctuate), hence
      * ``ilisi_random_median`` (if ``random_reference``): median iLISI of the same embedding with
        the batch labels randomly permuted (``seed``) -- "perfectly mixed" at the observed batch
        sizes; it reuses the kNN graph and kernel weights, so it is nearly free;
      * ``ilisi_scaled``: ``(ilisi_median - 1) / (n_batches - 1)`` (scIB-style, 0 = unmixed,
        1 = nominal maximum) and ``ilisi_relative_to_random``:
        ``(ilisi_median - 1) / (ilisi_random_median - 1)``;
      * ``pairwise_ilisi_median`` (if ``pairwise``): median :func:`pairwise_ilisi`;
      * ``perplexity``.

    ``perplexity``, ``n_neighbors`` and ``algorithm`` are those of :func:`lisi`.
    """
    x = _as_embedding(embedding_nk)
    codes, n_batches = _codes(batch_n, "batch_n")
    _check_same_length(x, codes, "batch_n")
    dist, idx = _lisi_knn(x, perplexity, n_neighbors, algorithm)
    codings = [(codes, n_batches)]
    if random_reference:
        codings.append((np.random.default_rng(seed).permutation(codes), n_batches))
    values = _lisi_from_knn(dist, idx, codings, perplexity, 1e-5, 50)
    med = float(np.median(values[0]))
    out: dict[str, Any] = {
        "ilisi_median": med,
        "ilisi_mean": float(np.mean(values[0])),
        "n_batches": int(n_batches),
        "ilisi_scaled": (med - 1.0) / (n_batches - 1) if n_batches > 1 else float("nan"),
    }
    if random_reference:
        rand = float(np.median(values[1]))
        out["ilisi_random_median"] = rand
        out["ilisi_relative_to_random"] = (med - 1.0) / (rand - 1.0) if rand > 1.0 else float("nan")
    if pairwise and n_batches > 1:
        out["pairwise_ilisi_median"] = float(
            np.median(
                pairwise_ilisi(
                    x, batch_n, perplexity=perplexity, n_neighbors=n_neighbors, algorithm=algorithm
                )
            )
        )
    out["perplexity"] = float(perplexity)
    return out



# ----------------------------------------------------------------------------------------------
# marginal log-likelihood
# ----------------------------------------------------------------------------------------------
_CELLS = "cells"
_ROWS_PER_PASS = 8192  # (cells x importance samples) per pass of the model, by default


def _in_cells_plate(site: dict) -> bool:
    return any(frame.name == _CELLS and frame.vectorized for frame in site["cond_indep_stack"])


def _local_sites(name: str, site: dict) -> bool:
    return _in_cells_plate(site)


def _replicate(mb: Minibatch, n_copies: int) -> Minibatch:
    """The minibatch with its cells stacked ``n_copies`` times: copy s of cell n is row ``s * len(mb) + n``.

    Tensor fields are repeated along their first (cells) dimension, and so are the tensors of
    ``mb.extra`` whose first dimension is the number of cells.
    """
    n = len(mb)

    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(n_copies, *([1] * (t.dim() - 1)))

    fields = {name: repeat(v) for name, v in vars(mb).items() if isinstance(v, torch.Tensor)}
    extra = {
        k: repeat(v) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
        for k, v in mb.extra.items()
    }
    return dataclasses.replace(mb, extra=extra, **fields)


def _global_trace(
    model: Callable, guide: Callable, mb: Minibatch, first_available_dim: int
) -> tuple[poutine.Trace, bool]:
    """One run of the guide reduced to its sample sites outside the cells plate (the global latents),
    and whether the cells' importance weights are random: whether the guide samples inside the plate,
    or the model samples there a latent that is neither in the guide nor enumerated (drawn from its prior)."""
    guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(mb))
    enumerated = poutine.enum(model, first_available_dim=first_available_dim)
    model_trace = poutine.trace(poutine.replay(enumerated, trace=guide_trace)).get_trace(mb)
    random_weights = any(
        site["type"] == "sample" and _in_cells_plate(site) for site in guide_trace.nodes.values()
    ) or any(
        site["type"] == "sample" and _in_cells_plate(site) and not site["is_observed"]
        and name not in guide_trace.nodes and site["infer"].get("_enumerate_dim") is None
        for name, site in prune_subsample_sites(model_trace).nodes.items()
    )
    for name, site in list(guide_trace.nodes.items()):
        if site["type"] != "sample" or _in_cells_plate(site):
            guide_trace.remove_node(name)
    return guide_trace, random_weights


def _log_importance_weights(
    model: Callable, guide: Callable, mb: Minibatch, first_available_dim: int
) -> torch.Tensor:
    """``log p(x_n, h_n) - log q(h_n | x_n)`` of every row of ``mb`` at one draw of the guide, with the
    enumerated discrete sites (of the model or of the guide) summed out exactly: (rows,)."""
    # As TraceEnum_ELBO: the guide enumerates from first_available_dim, the model to the left of it.
    guide_trace = poutine.trace(EnumMessenger(first_available_dim=first_available_dim)(guide)).get_trace(mb)
    enumerated = EnumMessenger()(model)  # keeps the enumeration allocator's state after the guide
    model_trace = poutine.trace(poutine.replay(enumerated, trace=guide_trace)).get_trace(mb)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    guide_trace.compute_log_prob(_local_sites)
    model_trace.compute_log_prob(_local_sites)
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)

    def ordinal(trace, site) -> frozenset:
        return frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)

    tensor_tree: OrderedDict = OrderedDict()
    sum_dims: set = set()
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        is_enumerated = site["infer"].get("_enumerate_dim") is not None
        if not _in_cells_plate(site):
            if is_enumerated:
                raise ValueError(
                    f"site {name!r} is enumerated outside the {_CELLS!r} plate: a global discrete latent "
                    "cannot be summed out cell by cell"
                )
            continue  # a global latent, held at the guide's value; its prior is not a cell's term
        if is_enumerated:
            sum_dims.add(site["infer"]["_enumerate_symbol"])
        elif not site["is_observed"] and name not in guide_trace.nodes:
            continue  # a local latent the guide leaves out is drawn from its prior, its proposal: p / q = 1
        packed_site = site["packed"]
        log_p = packed.scale_and_mask(packed_site["unscaled_log_prob"], mask=packed_site["mask"])
        tensor_tree.setdefault(ordinal(model_trace, site), []).append(log_p)
    if not tensor_tree:
        raise ValueError(f"the model has no sample site inside a plate named {_CELLS!r}")
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and _in_cells_plate(site) and site["infer"].get("_enumerate_dim") is None:
            # (a site the guide enumerates is summed over, not proposed: no -log q for it)
            packed_site = site["packed"]
            log_q = packed.scale_and_mask(packed_site["unscaled_log_prob"], mask=packed_site["mask"])
            minus_log_q = packed.neg(log_q)
            tensor_tree.setdefault(ordinal(guide_trace, site), []).append(minus_log_q)

    cells = model_trace.plate_to_symbol[_CELLS]
    log_w = contract_to_tensor(tensor_tree, sum_dims, target_ordinal=frozenset({cells}))
    if not set(log_w._pyro_dims) <= {cells}:  # pragma: no cover - contract_to_tensor guarantees it
        raise RuntimeError(f"unexpected dimensions {log_w._pyro_dims!r} after the contraction")
    return torch.broadcast_to(log_w.reshape(-1), (len(mb),))


@torch.no_grad()
def marginal_log_likelihood(
    model: Callable,
    guide: Callable,
    data: AnnDataSetup,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    n_samples: int = 100,
    batch_size: int = 128,
    particles_per_pass: int | None = None,
    max_plate_nesting: int = 1,
    modules: Sequence[torch.nn.Module] = (),
    device: torch.device | str = "cpu",
    seed: int | None = None,
    return_log_weights: bool = False,
) -> np.ndarray:
    r"""Importance-sampling estimate of each cell's marginal log-likelihood :math:`\log p(x_n)`.

    With the guide as proposal for the cell's local latents :math:`h_n` (the sites inside the
    ``cells`` plate, amortised or not),

    .. math::

        \log \hat p(x_n) = \log \frac1K \sum_{k=1}^K
            \frac{p(x_n, h_n^{(k)})}{q(h_n^{(k)} \mid x_n)}, \qquad h_n^{(k)} \sim q(\cdot \mid x_n),

    a stochastic lower bound (in expectation) of :math:`\log p(x_n)` that tightens as ``n_samples``
    :math:`= K` grows (Burda et al. 2016); with K = 1 it is an unbiased estimate of the cell's ELBO.
    It is exact for any K when the guide is the exact posterior.

    **Discrete latents.** Sites marked ``infer={"enumerate": "parallel"}`` are not sampled. In the model
    (e.g. CellAssign's cell type) they are enumerated to the left of the guide's dimensions, the model
    replayed against the guide's draw, and every log-density inside the cells plate is broadcast to the
    enumeration grid and summed out exactly -- a log-sum-exp over the enumeration dimensions, per cell,
    by Pyro's tensor contraction (``pyro.ops.contract``), as ``TraceEnum_ELBO`` does. In the guide
    (e.g. the semi-supervised VAE's cell type :math:`c`, on which the continuous proposal depends) the
    guide is enumerated from ``-(max_plate_nesting + 1)``; such a site is summed over rather than
    proposed, so its :math:`q(c \mid x)` cancels and the estimate is
    :math:`\log \frac1K \sum_k \sum_c p(x, c, h^{(k)}_c) / q(h^{(k)}_c \mid x, c)` (this needs the
    guide's enumerated distribution to have full support). A site enumerated outside the cells plate is
    an error.

    **Global latents.** Sample sites outside the cells plate (e.g. CellAssign's MAP ``pi`` and ``delta``,
    or a decoder's weights) are held at one draw of the guide -- its value for a ``Delta`` / MAP guide
    -- for all cells and samples; their prior terms are *not* part of a cell's likelihood. The result
    is thus :math:`\log p(x_n \mid \text{globals})`, as in scvi-tools' ``get_marginal_ll``.

    Log-densities are unscaled (the plate's minibatch scale and ``poutine.scale``, e.g. the KL warm-up
    weight, are ignored) and masked by the sites' masks. A local latent the model samples but the guide
    leaves out (and the model does not enumerate) is drawn from its prior, which is then its proposal.
    When nothing random is drawn inside the cells plate (e.g. CellAssign: its only local latent is
    enumerated) the weights are deterministic and one draw is used whatever ``n_samples``.

    Parameters
    ----------
    model, guide
        Callables taking one :class:`~pyro_sc.data.Minibatch`, cells in
        ``pyro.plate("cells", mb.n_obs, subsample=mb.idx_n)`` (as for :func:`pyro_sc.fit`).
    data, indices
        The registered AnnData and the positions of the cells to score (default: all).
    n_samples
        Importance samples K per cell.
    batch_size, particles_per_pass
        Cells per minibatch and samples evaluated together: each pass runs the model once on the
        minibatch's cells stacked ``particles_per_pass`` times (default ``8192 // batch_size``), which
        bounds the memory whatever K.
    max_plate_nesting
        The model's number of nested plates (the cells plate included); enumeration uses the dims left
        of them.
    modules
        ``nn.Module`` s put in eval mode (dropout off, batch-norm running statistics) for the estimate.
    device
        Where the minibatches go.
    seed
        Seeds the samples (the global torch RNG is left as it was); ``None``: not seeded.
    return_log_weights
        Return the log importance weights themselves, cells x draws, in place of the estimate (e.g. for
        its Monte Carlo standard error, or the estimate at fewer samples from the first draws).

    Returns
    -------
    ``log p(x_n)`` estimates, float64, one per cell of ``indices`` in that order (with
    ``return_log_weights``: their ``log w``, float64, cells x draws; the estimate is
    ``logsumexp(log_w, axis=1) - log(draws)``; one draw when the weights are deterministic).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_plate_nesting < 1:
        raise ValueError(f"max_plate_nesting must be >= 1 (the cells plate), got {max_plate_nesting}")
    indices = np.arange(data.n_obs) if indices is None else np.asarray(indices, dtype=np.int64).ravel()
    if len(indices) == 0:
        raise ValueError("no cells to score: indices is empty")
    if indices.min() < 0 or indices.max() >= data.n_obs:
        raise IndexError(f"indices must lie in [0, {data.n_obs - 1}]")
    per_pass = particles_per_pass if particles_per_pass is not None else max(1, _ROWS_PER_PASS // batch_size)
    if per_pass < 1:
        raise ValueError(f"particles_per_pass must be >= 1, got {per_pass}")
    device = torch.device(device)
    first_available_dim = -(max_plate_nesting + 1)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    rng_devices = []  # whose RNG state fork_rng restores
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            first = data.minibatch(indices[: min(batch_size, len(indices))], device=device)
            global_trace, random_weights = _global_trace(model, guide, first, first_available_dim)
            guide = poutine.replay(guide, trace=global_trace)
            n_draws = n_samples if random_weights else 1
            out = []
            for idx in iterate_minibatches(indices, batch_size, shuffle=False):
                mb = data.minibatch(idx, device=device)
                log_w = []  # (draws, cells) blocks
                for start in range(0, n_draws, per_pass):
                    n_copies = min(per_pass, n_draws - start)
                    copies = _replicate(mb, n_copies)
                    rows = _log_importance_weights(model, guide, copies, first_available_dim)
                    log_w.append(rows.reshape(n_copies, len(idx)).double())
                log_w_kn = torch.cat(log_w)
                out.append(log_w_kn.T if return_log_weights else torch.logsumexp(log_w_kn, 0) - math.log(n_draws))
            return torch.cat(out).cpu().numpy()
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)

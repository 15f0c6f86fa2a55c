r"""Differential expression from posterior samples of normalised expression.

Two groups of cells :math:`A` (group 1) and :math:`B` (group 2) are compared gene by gene through
posterior samples of their normalised expression :math:`\rho_{ng}` (a model's decoded expression, rows
summing to one; e.g. :meth:`pyro_sc.SCVI.get_normalized_expression` with ``return_mean=False``). The
samples of each group are pooled over its cells, so the posterior of a group's expression reads

.. math::

    p(\rho_g^A \mid x_A) \approx \frac{1}{|A|} \sum_{n \in A} q(\rho_{ng} \mid x_n),

and the two pools are compared through :math:`P` random pairs :math:`(\rho^A_{pg}, \rho^B_{pg})`, one
sample of each pool drawn uniformly with replacement, the same pairs for every gene (the "permutation"
pairing of scvi-tools, Lopez et al. 2018; Boyeau et al. 2019). With the log fold change of a pair

.. math::

    r_{pg} = \log_2(\rho^A_{pg} + \epsilon) - \log_2(\rho^B_{pg} + \epsilon)
    \qquad (\epsilon\text{: the pseudocount, default } 0),

the two hypothesis tests are

* ``"vanilla"`` (Lopez et al. 2018): :math:`M_1: \rho^A_g > \rho^B_g` against :math:`M_2: \rho^A_g \le
  \rho^B_g`; ``proba_de`` :math:`= P(M_1) \approx \frac1P \sum_p [\rho^A_{pg} > \rho^B_{pg}]`, which is
  one-sided: near 1 for genes up in group 1, near 0 for genes down, near 0.5 for unchanged genes.
* ``"change"`` (Boyeau et al. 2019): :math:`M_1: |r_g| \ge \delta` against :math:`M_2: |r_g| < \delta`;
  ``proba_de`` :math:`= P(M_1) \approx \frac1P \sum_p [|r_{pg}| \ge \delta]`, two-sided (the sign is that
  of ``lfc_mean``).

In both, ``proba_not_de`` :math:`= 1 - ` ``proba_de`` and ``bayes_factor`` :math:`= \log(p + 10^{-8}) -
\log(1 - p + 10^{-8})` (the log posterior odds of :math:`M_1`, finite at :math:`p \in \{0, 1\}`).

Genes are called differentially expressed by controlling the posterior expected false discovery rate
(Boyeau et al. 2019): with genes sorted by ``proba_de`` :math:`p_{(1)} \ge p_{(2)} \ge \dots`, the
expected FDR of the top :math:`k` is :math:`\frac1k \sum_{i \le k} (1 - p_{(i)})`; the largest :math:`k`
whose expected FDR is at most ``fdr_target`` is flagged (column ``is_de_fdr_<fdr_target>``).

:func:`de_from_samples` works on arrays of samples (no model needed); :func:`differential_expression`
samples them from a trained model for two groups of an ``obs`` column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

if TYPE_CHECKING:
    from .models._base import BaseModel

__all__ = ["de_from_samples", "differential_expression", "flag_de_at_fdr"]

Mode = Literal["vanilla", "change"]

_EPS = 1e-8  # keeps the Bayes factor finite at proba 0 or 1 (as scvi-tools)
_PAIR_ELEMENTS = 1 << 22  # pairs x genes evaluated at a time (bounds the memory of the comparison)


def flag_de_at_fdr(proba_de_g: np.ndarray | Sequence[float], fdr_target: float) -> np.ndarray:
    r"""Genes called DE at a posterior expected false discovery rate of at most ``fdr_target``.

    Genes are sorted by ``proba_de_g`` descending (ties keep their order); the expected FDR of the top
    :math:`k` is :math:`\frac1k\sum_{i\le k}(1 - p_{(i)})`, a running mean of a non-decreasing
    sequence, hence non-decreasing in :math:`k`; the largest :math:`k` with expected FDR
    :math:`\le` ``fdr_target`` (up to 1e-12 of rounding) is flagged. Returns a boolean array (genes,).
    """
    if not 0 < fdr_target < 1:
        raise ValueError(f"fdr_target must be in (0, 1), got {fdr_target}")
    proba_g = np.asarray(proba_de_g, dtype=np.float64)
    if proba_g.ndim != 1 or not np.all((proba_g >= 0) & (proba_g <= 1)):
        raise ValueError("proba_de_g must be a 1-d array of probabilities in [0, 1]")
    order = np.argsort(-proba_g, kind="stable")
    expected_fdr_k = np.cumsum(1.0 - proba_g[order]) / np.arange(1, proba_g.size + 1)
    within = np.flatnonzero(expected_fdr_k <= fdr_target + 1e-12)
    n_flagged = int(within[-1]) + 1 if within.size else 0
    flags_g = np.zeros(proba_g.size, dtype=bool)
    flags_g[order[:n_flagged]] = True
    return flags_g


def _as_samples(rho_sg, name: str) -> np.ndarray:
    rho_sg = np.asarray(rho_sg)
    if rho_sg.ndim != 2 or rho_sg.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-d array (samples, genes), got shape {rho_sg.shape}")
    if not np.issubdtype(rho_sg.dtype, np.floating):
        rho_sg = rho_sg.astype(np.float64)
    if not np.isfinite(rho_sg).all() or (rho_sg < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative expression values")
    return rho_sg


def de_from_samples(
    rho1_sg: np.ndarray,
    rho2_sg: np.ndarray,
    *,
    gene_names: Sequence[str] | pd.Index | None = None,
    mode: Mode = "change",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    pseudocount: float = 0.0,
    n_pairs: int = 10_000,
    seed: int | np.random.Generator | None = 0,
) -> pd.DataFrame:
    r"""Bayesian differential expression between two pools of posterior samples (see the module docstring).

    Parameters
    ----------
    rho1_sg, rho2_sg
        Posterior samples of normalised expression of group 1 and group 2, (samples, genes) each, pooled
        over the cells of the group (e.g. an array (samples, cells, genes) reshaped to (-1, genes)). The
        numbers of samples may differ; the genes must be the same, in the same order.
    gene_names
        The genes (the index of the result); default ``0 .. genes - 1``.
    mode
        ``"change"`` (default): ``proba_de`` :math:`= P(|r_g| \ge \delta)`; ``"vanilla"``:
        ``proba_de`` :math:`= P(\rho^1_g > \rho^2_g)`.
    delta
        The smallest absolute log2 fold change :math:`\delta` that counts as DE (``"change"`` only).
    fdr_target
        The posterior expected false discovery rate controlled by the ``is_de_fdr_<fdr_target>`` flag.
    pseudocount
        :math:`\epsilon` added to :math:`\rho` before the logarithm, in units of :math:`\rho` (e.g. 1e-5
        is 0.1 count in a library of 10,000); 0 needs strictly positive samples.
    n_pairs
        Number :math:`P` of random pairs of samples (one of each group, with replacement).
    seed
        Seed (or generator) of the pairing.

    Returns
    -------
    DataFrame indexed by gene, sorted by ``proba_de`` descending (ties by ``|lfc_mean|`` descending),
    with columns ``proba_de``, ``proba_not_de``, ``bayes_factor`` (log posterior odds of DE),
    ``lfc_mean``, ``lfc_median``, ``lfc_std`` (of :math:`r_{pg}` over the pairs), ``scale1``,
    ``scale2`` (mean :math:`\rho` of all samples of each group) and ``is_de_fdr_<fdr_target>``.
    """
    rho1_sg = _as_samples(rho1_sg, "rho1_sg")
    rho2_sg = _as_samples(rho2_sg, "rho2_sg")
    n_genes = rho1_sg.shape[1]
    if rho2_sg.shape[1] != n_genes:
        raise ValueError(f"rho1_sg has {n_genes} genes but rho2_sg has {rho2_sg.shape[1]}")
    genes = pd.RangeIndex(n_genes) if gene_names is None else pd.Index(gene_names)
    if len(genes) != n_genes:
        raise ValueError(f"{len(genes)} gene_names for {n_genes} genes")
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}")
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if not 0 < fdr_target < 1:
        raise ValueError(f"fdr_target must be in (0, 1), got {fdr_target}")
    if not pseudocount >= 0:
        raise ValueError(f"pseudocount must be >= 0, got {pseudocount}")
    if pseudocount == 0 and ((rho1_sg == 0).any() or (rho2_sg == 0).any()):
        raise ValueError("the samples contain zeros: pass pseudocount > 0 for a finite log fold change")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")

    rng = np.random.default_rng(seed)
    pair1_p = rng.integers(rho1_sg.shape[0], size=n_pairs)
    pair2_p = rng.integers(rho2_sg.shape[0], size=n_pairs)
    stats = {k: np.empty(n_genes) for k in ("proba_de", "lfc_mean", "lfc_median", "lfc_std")}
    chunk = max(1, _PAIR_ELEMENTS // n_pairs)
    for start in range(0, n_genes, chunk):
        genes_c = slice(start, start + chunk)
        a_pg = rho1_sg[pair1_p, genes_c].astype(np.float64)
        b_pg = rho2_sg[pair2_p, genes_c].astype(np.float64)
        lfc_pg = np.log2(a_pg + pseudocount) - np.log2(b_pg + pseudocount)
        m1_pg = a_pg > b_pg if mode == "vanilla" else np.abs(lfc_pg) >= delta
        stats["proba_de"][genes_c] = m1_pg.mean(0)
        stats["lfc_mean"][genes_c] = lfc_pg.mean(0)
        stats["lfc_median"][genes_c] = np.median(lfc_pg, axis=0)
        stats["lfc_std"][genes_c] = lfc_pg.std(0)

    proba_g = stats["proba_de"]
    table = pd.DataFrame(
        {
            "proba_de": proba_g,
            "proba_not_de": 1.0 - proba_g,
            "bayes_factor": np.log(proba_g + _EPS) - np.log(1.0 - proba_g + _EPS),
            "lfc_mean": stats["lfc_mean"],
            "lfc_median": stats["lfc_median"],
            "lfc_std": stats["lfc_std"],
            "scale1": rho1_sg.mean(0, dtype=np.float64),
            "scale2": rho2_sg.mean(0, dtype=np.float64),
        },
        index=genes,
    )
    table = table.iloc[np.lexsort((-np.abs(table["lfc_mean"].to_numpy()), -proba_g))]
    table[f"is_de_fdr_{fdr_target}"] = flag_de_at_fdr(table["proba_de"].to_numpy(), fdr_target)
    return table


def _group_masks(adata: AnnData, groupby: str, group1, group2) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (cells,) of the two groups; a clear error for an unknown column or group, or no cells."""
    if groupby not in adata.obs.columns:
        columns = list(adata.obs.columns)
        raise KeyError(f"groupby column {groupby!r} not found in adata.obs (columns: {columns})")
    column = adata.obs[groupby]
    values_n = column.astype(str).to_numpy()
    categorical = isinstance(column.dtype, pd.CategoricalDtype)
    known = [str(v) for v in column.cat.categories] if categorical else sorted(set(values_n))

    def mask(group) -> np.ndarray:
        if str(group) not in known:
            raise KeyError(f"group {group!r} not found in adata.obs[{groupby!r}] (values: {known[:20]})")
        mask_n = values_n == str(group)
        if not mask_n.any():
            raise ValueError(f"group {group!r} of adata.obs[{groupby!r}] has no cells")
        return mask_n

    mask1_n = mask(group1)
    if group2 is None:
        mask2_n = ~mask1_n
        if not mask2_n.any():
            raise ValueError(f"every cell is in group {group1!r}: no rest to compare with")
    else:
        if str(group2) == str(group1):
            raise ValueError(f"group1 and group2 are the same group {group1!r}")
        mask2_n = mask(group2)
    return mask1_n, mask2_n


def _pooled_samples(
    model: BaseModel, adata: AnnData, idx: np.ndarray, *, n_samples: int, batch_size: int
) -> np.ndarray:
    """Posterior samples of rho of cells ``idx``, pooled: (n_samples * cells, genes)."""
    subset = adata[np.sort(idx)]
    subset = subset.to_memory() if adata.isbacked else subset.copy()
    rho_scg = model.get_normalized_expression(
        subset, n_samples=n_samples, return_mean=False, batch_size=batch_size
    )
    return np.asarray(rho_scg).reshape(-1, rho_scg.shape[-1])


def differential_expression(
    model: BaseModel,
    adata: AnnData | None = None,
    *,
    groupby: str,
    group1: str,
    group2: str | None = None,
    mode: Mode = "change",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    pseudocount: float = 0.0,
    n_samples: int = 10,
    cells_per_group: int | None = 500,
    n_pairs: int = 10_000,
    batch_size: int = 1024,
    seed: int | None = 0,
) -> pd.DataFrame:
    r"""Differential expression between two groups of cells from a trained model's posterior.

    Up to ``cells_per_group`` cells of each group are drawn at random (without replacement); for each,
    ``model.get_normalized_expression(..., n_samples=n_samples, return_mean=False)`` gives
    ``n_samples`` samples of :math:`\rho_n` (z drawn from the guide; each cell decoded with its own
    batch); the samples of a group are pooled and compared by :func:`de_from_samples`. The defaults
    (500 cells x 10 samples) give at most 5,000 samples a group, as scvi-tools.

    Parameters
    ----------
    model
        A trained model with ``get_normalized_expression`` (e.g. :class:`pyro_sc.SCVI`).
    adata
        The cells (default: the model's data); the same genes as the model, batches among the known ones.
    groupby, group1, group2
        The ``obs`` column of groups, the first group, and the second (None: every other cell). Values
        are compared as strings.
    mode, delta, fdr_target, pseudocount, n_pairs
        As in :func:`de_from_samples` (``mode="change"``, :math:`\delta = 0.25` by default).
    n_samples
        Posterior samples per cell (1 decodes the posterior mean of z instead of sampling it).
    cells_per_group
        At most this many cells of each group (None: all).
    batch_size
        Cells decoded at a time.
    seed
        Seed of the choice of cells, of the posterior samples (torch's generator, restored afterwards)
        and of the pairing.

    Returns
    -------
    The DataFrame of :func:`de_from_samples`, indexed by the genes of ``adata``: positive ``lfc_*`` means
    higher in ``group1``.
    """
    adata = model.adata if adata is None else adata
    mask1_n, mask2_n = _group_masks(adata, groupby, group1, group2)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if cells_per_group is not None and cells_per_group < 1:
        raise ValueError(f"cells_per_group must be >= 1 or None, got {cells_per_group}")
    rng = np.random.default_rng(seed)

    def choose(mask_n: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(mask_n)
        if cells_per_group is None or idx.size <= cells_per_group:
            return idx
        return rng.choice(idx, size=cells_per_group, replace=False)

    idx1, idx2 = choose(mask1_n), choose(mask2_n)
    with torch.random.fork_rng():
        torch.manual_seed(int(rng.integers(2**31 - 1)))
        rho1_sg = _pooled_samples(model, adata, idx1, n_samples=n_samples, batch_size=batch_size)
        rho2_sg = _pooled_samples(model, adata, idx2, n_samples=n_samples, batch_size=batch_size)
    return de_from_samples(
        rho1_sg, rho2_sg, gene_names=adata.var_names, mode=mode, delta=delta, fdr_target=fdr_target,
        pseudocount=pseudocount, n_pairs=n_pairs, seed=rng,
    )

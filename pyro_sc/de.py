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
\log(1 - p + 10^{-8})` (the log posterior odds of :math:`M_1`, finite at :math:`p \in \{0, 1\}`); the
``lfc_*`` columns summarise :math:`r_{pg}` over the pairs (mean, median, standard deviation, min, max).

Genes are called differentially expressed by controlling the posterior expected false discovery rate
(Boyeau et al. 2019): with genes sorted by ``proba_de`` :math:`p_{(1)} \ge p_{(2)} \ge \dots`, the
expected FDR of the top :math:`k` is :math:`\frac1k \sum_{i \le k} (1 - p_{(i)})`; the largest :math:`k`
whose expected FDR is at most ``fdr_target`` is flagged (column ``is_de_fdr_<fdr_target>``).

:func:`de_from_samples` works on arrays of samples (no model needed); :func:`differential_expression`
samples them from a trained model, for groups of an ``obs`` column (one against the rest, or against
another group) or for cells given by index, and adds statistics of the raw counts.

Relation to scvi-tools
----------------------
:func:`differential_expression` takes the arguments of scvi-tools' (1.x)
``model.differential_expression`` (``groupby``, ``group1`` (one group, a list, or None for every group),
``group2`` (None: the rest), ``idx1``, ``idx2``, ``mode``, ``delta``, ``fdr_target``, ``all_stats``) and
returns a table with its column names and order: ``proba_de``, ``proba_not_de``, ``bayes_factor``,
``scale1``, ``scale2``, (``"change"`` only: ``pseudocounts``, ``delta``), ``lfc_mean``, ``lfc_median``,
``lfc_std``, ``lfc_min``, ``lfc_max``, ``raw_mean1``, ``raw_mean2``, ``non_zeros_proportion1``,
``non_zeros_proportion2``, ``raw_normalized_mean1``, ``raw_normalized_mean2``, ``is_de_fdr_<target>``,
``comparison``, ``group1``, ``group2``; rows indexed by gene, most probably DE first within each
comparison, the comparisons concatenated. Deliberate differences:

* **Default mode.** As scvi-tools, :func:`differential_expression` defaults to ``mode="vanilla"`` (one-sided:
  ``proba_de`` near 0 for genes down in group 1); ``mode="change"`` (``delta`` 0.25 by default) is the
  test of Boyeau et al. (2019), two-sided with an effect size below which a change does not count,
  usually the better choice for ranking and calling genes. :func:`de_from_samples` (arrays, no model)
  defaults to ``"change"``.
* **Pseudocount.** pyro_sc's default is :math:`\epsilon = 0`: ``lfc_*`` are the fold changes of the
  decoded expression itself, and every comparison of a call uses the same :math:`\epsilon`, so
  one-vs-rest blocks are comparable. scvi-tools 1.1 documents ``pseudocounts=0.0`` too; its current
  releases default to ``pseudocounts=None``: per comparison, :math:`\epsilon` is estimated from the
  largest decoded scales of genes with almost no counts in a group (at least 1e-5), which shrinks the
  fold changes of barely expressed genes, differently in each comparison. The decoders here give
  strictly positive :math:`\rho`, so 0 is always finite; on real data a small fixed ``pseudocount``
  (e.g. 1e-4, one count in 10,000) keeps genes near zero in one group from topping a ranking by fold
  change.
* **Change test.** ``proba_de`` is :math:`P(|r_g| \ge \delta)`, Boyeau et al.'s definition (scvi-tools'
  ``test_mode="two"``), with an unsigned Bayes factor; the direction is the sign of ``lfc_mean``.
  scvi-tools' current default, ``test_mode="three"``, reports :math:`\max(P(r_g \ge \delta), P(r_g <
  -\delta))` and signs the Bayes factor by the direction (its releases have differed here).
* **FDR flag in both modes.** ``is_de_fdr_<target>`` is :func:`flag_de_at_fdr`, the same rule as
  scvi-tools' (the largest prefix of genes sorted by ``proba_de`` whose mean ``1 - proba_de`` is within the
  target), in ``"vanilla"`` mode too (scvi-tools flags only in ``"change"`` mode), where it controls the
  FDR of calls "up in group 1". Ties in ``proba_de`` are ordered by ``|lfc_mean|`` descending.
* **Vanilla columns.** ``"vanilla"`` keeps the names ``proba_de`` / ``proba_not_de`` (scvi-tools calls
  them ``proba_m1`` / ``proba_m2``) and also reports the ``lfc_*`` summaries.
* **Groups without cells** (unused categories) are skipped in one-vs-rest; naming one is an error.
* **Cells in both idx1 and idx2** count in both groups (scvi-tools moves them to group 2).
* **Sampling.** Up to ``cells_per_group`` cells of each group, ``n_samples`` posterior samples each
  (scvi-tools: 5,000 samples a group drawn over all its cells); the raw-count statistics use every cell
  of each group, as scvi-tools. Each comparison draws from its own seed, derived from ``seed`` and its
  label, so a comparison gives the same result whichever other comparisons the call makes.
* The user's AnnData is never modified (scvi-tools caches the library scaling in ``adata.obs``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .data import _chunks

if TYPE_CHECKING:
    from .data import AnnDataSetup
    from .models._base import BaseModel

__all__ = ["de_from_samples", "differential_expression", "flag_de_at_fdr"]

Mode = Literal["vanilla", "change"]

_EPS = 1e-8  # keeps the Bayes factor finite at proba 0 or 1 (as scvi-tools)
_PAIR_ELEMENTS = 1 << 22  # pairs x genes evaluated at a time (bounds the memory of the comparison)
_NORMALIZED_LIBRARY = 1e4  # raw_normalized_mean: counts per 10,000 of the cell's total (as scvi-tools)
_REST = "Rest"
_LFC_STATS = ("lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max")
_RAW_STATS = (
    "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
    "raw_normalized_mean2",
)


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


def _check_options(mode, delta, fdr_target, pseudocount, n_pairs) -> None:
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}")
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if not 0 < fdr_target < 1:
        raise ValueError(f"fdr_target must be in (0, 1), got {fdr_target}")
    if not pseudocount >= 0:
        raise ValueError(f"pseudocount must be >= 0, got {pseudocount}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")


def _compare(rho1_sg, rho2_sg, *, mode, delta, pseudocount, n_pairs, rng) -> pd.DataFrame:
    """The posterior statistics of every gene, in gene order (RangeIndex), up to ``lfc_max``."""
    rho1_sg = _as_samples(rho1_sg, "rho1_sg")
    rho2_sg = _as_samples(rho2_sg, "rho2_sg")
    n_genes = rho1_sg.shape[1]
    if rho2_sg.shape[1] != n_genes:
        raise ValueError(f"rho1_sg has {n_genes} genes but rho2_sg has {rho2_sg.shape[1]}")
    if pseudocount == 0 and ((rho1_sg == 0).any() or (rho2_sg == 0).any()):
        raise ValueError("the samples contain zeros: pass pseudocount > 0 for a finite log fold change")

    pair1_p = rng.integers(rho1_sg.shape[0], size=n_pairs)
    pair2_p = rng.integers(rho2_sg.shape[0], size=n_pairs)
    stats = {k: np.empty(n_genes) for k in ("proba_de",) + _LFC_STATS}
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
        stats["lfc_min"][genes_c] = lfc_pg.min(0)
        stats["lfc_max"][genes_c] = lfc_pg.max(0)

    proba_g = stats["proba_de"]
    columns = {
        "proba_de": proba_g,
        "proba_not_de": 1.0 - proba_g,
        "bayes_factor": np.log(proba_g + _EPS) - np.log(1.0 - proba_g + _EPS),
        "scale1": rho1_sg.mean(0, dtype=np.float64),
        "scale2": rho2_sg.mean(0, dtype=np.float64),
    }
    if mode == "change":
        columns["pseudocounts"] = np.full(n_genes, float(pseudocount))
        columns["delta"] = np.full(n_genes, float(delta))
    columns.update({k: stats[k] for k in _LFC_STATS})
    return pd.DataFrame(columns)


def _sort_and_flag(table: pd.DataFrame, fdr_target: float) -> pd.DataFrame:
    """Rows by ``proba_de`` descending (ties: ``|lfc_mean|`` descending), then the FDR flag column."""
    order = np.lexsort((-np.abs(table["lfc_mean"].to_numpy()), -table["proba_de"].to_numpy()))
    table = table.iloc[order].copy()
    table[f"is_de_fdr_{fdr_target}"] = flag_de_at_fdr(table["proba_de"].to_numpy(), fdr_target)
    return table


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
    with scvi-tools' column names: ``proba_de``, ``proba_not_de``, ``bayes_factor`` (log posterior odds
    of DE), ``scale1``, ``scale2`` (mean :math:`\rho` of all samples of each group), in ``"change"`` mode
    ``pseudocounts`` and ``delta`` (the values used), ``lfc_mean``, ``lfc_median``, ``lfc_std``,
    ``lfc_min``, ``lfc_max`` (of :math:`r_{pg}` over the pairs) and ``is_de_fdr_<fdr_target>``.
    """
    _check_options(mode, delta, fdr_target, pseudocount, n_pairs)
    table = _compare(
        rho1_sg, rho2_sg, mode=mode, delta=delta, pseudocount=pseudocount, n_pairs=n_pairs,
        rng=np.random.default_rng(seed),
    )
    n_genes = len(table)
    genes = pd.RangeIndex(n_genes) if gene_names is None else pd.Index(gene_names)
    if len(genes) != n_genes:
        raise ValueError(f"{len(genes)} gene_names for {n_genes} genes")
    table.index = genes
    return _sort_and_flag(table, fdr_target)


# ------------------------------------------------------------------------------ groups of cells
@dataclass(frozen=True)
class _Comparison:
    """One comparison: its labels and the "atoms" (classes of cells, see :func:`_resolve`) of each side."""

    label1: object
    label2: object
    atoms1: tuple[int, ...]
    atoms2: tuple[int, ...]
    named: bool  # written in the comparison / group1 / group2 columns (groupby, not idx1 / idx2)

    @property
    def name(self) -> str:
        return f"{self.label1} vs {self.label2}"


def _group_comparisons(
    obs: pd.DataFrame, groupby: str, group1, group2
) -> tuple[np.ndarray, list[_Comparison]]:
    """Atoms are the values of ``obs[groupby]`` (missing values one more atom, always in the rest)."""
    if groupby not in obs.columns:
        raise KeyError(f"groupby column {groupby!r} not found in adata.obs (columns: {list(obs.columns)})")
    column = obs[groupby]
    present_n = column.notna().to_numpy()
    categories = column.astype("category").cat.categories  # a categorical's own order, else sorted
    known = [str(c) for c in categories]
    codes_n, uniques = pd.factorize(pd.Series(column.astype(str).to_numpy()).where(present_n))
    codes_n = np.where(codes_n < 0, len(uniques), codes_n).astype(np.int64)
    atom_of = {str(u): i for i, u in enumerate(uniques)}
    all_atoms = set(np.unique(codes_n).tolist())

    def atom(group) -> int:
        key = str(group)
        if key not in known:
            raise KeyError(f"group {group!r} not found in adata.obs[{groupby!r}] (values: {known[:20]})")
        if key not in atom_of:
            raise ValueError(f"group {group!r} of adata.obs[{groupby!r}] has no cells")
        return atom_of[key]

    atom2 = None if group2 is None else atom(group2)
    if group1 is None:
        groups1 = [c for c in categories if str(c) in atom_of]
        if atom2 is not None:
            groups1 = [c for c in groups1 if atom_of[str(c)] != atom2]
            if not groups1:
                raise ValueError(f"no group of adata.obs[{groupby!r}] besides {group2!r} has cells")
        elif len(groups1) < 2:
            raise ValueError(
                f"one-vs-rest needs at least two groups with cells in adata.obs[{groupby!r}], found {groups1}"
            )
    else:
        groups1 = [group1] if isinstance(group1, str) or not isinstance(group1, Iterable) else list(group1)
        if not groups1:
            raise ValueError("group1 is an empty list; pass None for every group against the rest")
    comparisons = []
    for group in groups1:
        atom1 = atom(group)
        if atom2 is None:
            rest = tuple(sorted(all_atoms - {atom1}))
            if not rest:
                raise ValueError(f"every cell is in group {group!r}: no rest to compare with")
            comparisons.append(_Comparison(group, _REST, (atom1,), rest, named=True))
        else:
            if atom1 == atom2:
                raise ValueError(f"group1 and group2 are the same group {group!r}")
            comparisons.append(_Comparison(group, group2, (atom1,), (atom2,), named=True))
    return codes_n, comparisons


def _cell_mask(idx, name: str, obs: pd.DataFrame) -> np.ndarray:
    """Boolean mask (cells,) of ``idx``: a boolean mask, integer positions or an ``obs.query`` string."""
    n_obs = len(obs)
    if isinstance(idx, str):
        positions = obs.set_axis(pd.RangeIndex(n_obs), axis=0).query(idx).index.to_numpy()
        mask_n = np.zeros(n_obs, dtype=bool)
        mask_n[positions] = True
    else:
        array = np.asarray(idx)
        if array.dtype == bool:
            if array.ndim != 1 or array.size != n_obs:
                raise ValueError(f"{name} is a boolean mask of shape {array.shape} for {n_obs} cells")
            mask_n = array
        elif array.size == 0:
            mask_n = np.zeros(n_obs, dtype=bool)
        elif np.issubdtype(array.dtype, np.integer) and array.ndim == 1:
            if array.min() < -n_obs or array.max() >= n_obs:
                raise IndexError(
                    f"{name} has positions outside the {n_obs} cells: {array.min()} .. {array.max()}"
                )
            mask_n = np.zeros(n_obs, dtype=bool)
            mask_n[array] = True
        else:
            raise TypeError(
                f"{name} must be a boolean mask, integer positions or an adata.obs query string, got an "
                f"array of {array.dtype} with shape {array.shape}"
            )
    if not mask_n.any():
        raise ValueError(f"{name} selects no cells")
    return mask_n


def _index_comparisons(obs: pd.DataFrame, idx1, idx2) -> tuple[np.ndarray, list[_Comparison]]:
    """Atoms: 0 neither, 1 only idx1, 2 only idx2, 3 both (a cell may be in both groups)."""
    in1_n = _cell_mask(idx1, "idx1", obs)
    if idx2 is None:
        if in1_n.all():
            raise ValueError("idx1 selects every cell: no rest to compare with")
        return in1_n.astype(np.int64), [_Comparison("idx1", _REST, (1, 3), (0, 2), named=False)]
    in2_n = _cell_mask(idx2, "idx2", obs)
    codes_n = in1_n.astype(np.int64) + 2 * in2_n.astype(np.int64)
    return codes_n, [_Comparison("idx1", "idx2", (1, 3), (2, 3), named=False)]


def _resolve(obs: pd.DataFrame, groupby, group1, group2, idx1, idx2) -> tuple[np.ndarray, list[_Comparison]]:
    """Every cell's atom code (cells alike for every comparison of the call) and the comparisons, each side
    a union of atoms; all checked before anything is computed."""
    by_group = groupby is not None or group1 is not None or group2 is not None
    by_index = idx1 is not None or idx2 is not None
    if by_group and by_index:
        raise ValueError("pass either groupby (with group1 / group2) or idx1 / idx2, not both")
    if by_index:
        if idx1 is None:
            raise ValueError("idx2 needs idx1 (the first group of cells)")
        return _index_comparisons(obs, idx1, idx2)
    if groupby is None:
        if by_group:
            raise ValueError("group1 / group2 need groupby (the adata.obs column of the groups)")
        raise ValueError("pass groupby (an adata.obs column of groups) or idx1 (the cells of group 1)")
    return _group_comparisons(obs, groupby, group1, group2)


# ------------------------------------------------------------------------------ raw counts
@dataclass
class _AtomSums:
    """Per atom: its cells, and per gene the sum of counts, of nonzero counts and of normalised counts."""

    cells_a: np.ndarray
    counts_ag: np.ndarray
    nonzero_ag: np.ndarray
    normalized_ag: np.ndarray

    def stats(self, atoms: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean count, proportion of nonzero counts and mean normalised count over the cells of ``atoms``."""
        atoms = list(atoms)
        n_cells = float(self.cells_a[atoms].sum())
        return (
            self.counts_ag[atoms].sum(0) / n_cells,
            self.nonzero_ag[atoms].sum(0) / n_cells,
            self.normalized_ag[atoms].sum(0) / n_cells,
        )


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def _atom_sums(setup: AnnDataSetup, codes_n: np.ndarray, n_atoms: int) -> _AtomSums:
    """One pass over the registered counts (in memory, sparse or backed, by chunks of rows). Sums of
    integer counts are exact in float64, so the means equal numpy's on the same cells. A cell's normalised
    counts are its counts per 10,000 of its total over the registered genes (0 for a cell without counts)."""
    n_genes = setup.n_vars
    library_n = np.asarray(setup.library_n, dtype=np.float64)
    scale_n = np.zeros_like(library_n)
    np.divide(_NORMALIZED_LIBRARY, library_n, out=scale_n, where=library_n > 0)
    sums = _AtomSums(
        np.bincount(codes_n, minlength=n_atoms), np.zeros((n_atoms, n_genes)), np.zeros((n_atoms, n_genes)),
        np.zeros((n_atoms, n_genes)),
    )
    for rows in _chunks(setup.n_obs):
        cells = np.arange(rows.start, rows.stop)
        block = setup._rows(cells)
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float64)
            nonzero = block.copy()
            nonzero.data = (nonzero.data != 0).astype(np.float64)
        else:
            block = np.asarray(block, dtype=np.float64)
            nonzero = (block != 0).astype(np.float64)
        columns = (codes_n[rows], np.arange(len(cells)))
        member = sp.csr_matrix((np.ones(len(cells)), columns), shape=(n_atoms, len(cells)))
        scaled = sp.csr_matrix((scale_n[rows], columns), shape=(n_atoms, len(cells)))
        sums.counts_ag += _dense(member @ block)
        sums.nonzero_ag += _dense(member @ nonzero)
        sums.normalized_ag += _dense(scaled @ block)
    return sums


# ------------------------------------------------------------------------------ from a model
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


def _comparison_rng(seed: int | None, name: str) -> np.random.Generator:
    """The generator of one comparison: from ``seed`` and the comparison's label (None: fresh entropy)."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def differential_expression(
    model: BaseModel,
    adata: AnnData | None = None,
    *,
    groupby: str | None = None,
    group1=None,
    group2=None,
    idx1=None,
    idx2=None,
    mode: Mode = "vanilla",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    all_stats: bool = True,
    pseudocount: float = 0.0,
    n_samples: int = 10,
    cells_per_group: int | None = 500,
    n_pairs: int = 10_000,
    batch_size: int = 1024,
    seed: int | None = 0,
) -> pd.DataFrame:
    r"""Differential expression between groups of cells from a trained model's posterior, as scvi-tools'.

    The groups are given either by an ``obs`` column (``groupby``) or by cells (``idx1``, ``idx2``):

    * ``groupby`` alone: every group with cells against the rest of the cells ("one-vs-rest"), in the
      column's category order (sorted values for a column that is not categorical);
    * ``group1``: that group, or each group of a list, against the rest (``group2=None``) or against
      ``group2``; ``group2`` alone: every other group against it;
    * ``idx1`` (a boolean mask, integer positions, or an ``adata.obs.query`` string) against ``idx2``
      (the same kinds; a cell may be in both) or, if None, against every cell not in ``idx1``.

    For each comparison, up to ``cells_per_group`` cells of each side are drawn at random (without
    replacement) and ``model.get_normalized_expression(..., n_samples=n_samples, return_mean=False)``
    samples their :math:`\rho_n` (z drawn from the guide; each cell decoded with its own batch); the
    pooled samples are compared as in :func:`de_from_samples`. The defaults (500 cells x 10 samples)
    give at most 5,000 samples a side, as scvi-tools. The module docstring lists what differs from
    scvi-tools and why.

    Parameters
    ----------
    model
        A trained model with ``get_normalized_expression`` (e.g. :class:`pyro_sc.SCVI`).
    adata
        The cells (default: the model's data); the same genes as the model, batches among the known ones.
        Registered as the model registered its data (the same counts layer), also for the raw statistics.
    groupby, group1, group2
        The ``obs`` column of the groups; the first group(s) (None: every group with cells); the second
        group (None: the rest of the cells). Values are matched as strings.
    idx1, idx2
        Cells of group 1 and group 2 instead of ``groupby``.
    mode
        ``"vanilla"`` (default, as scvi-tools): ``proba_de`` :math:`= P(\rho^1_g > \rho^2_g)`, one-sided;
        ``"change"``: :math:`P(|r_g| \ge \delta)`, two-sided with an effect size (often the better test).
    delta
        :math:`\delta`, the smallest absolute log2 fold change that counts as DE (``"change"``), 0.25 as
        scvi-tools.
    fdr_target
        The posterior expected FDR of the ``is_de_fdr_<fdr_target>`` column (0.05 as scvi-tools).
    all_stats
        Add the statistics of the raw counts (``raw_mean1`` ... ``raw_normalized_mean2``).
    pseudocount, n_pairs
        As in :func:`de_from_samples` (:math:`\epsilon = 0` by default; see the module docstring).
    n_samples
        Posterior samples per cell (1 decodes the posterior mean of z instead of sampling it).
    cells_per_group
        At most this many cells of each side are sampled (None: all). The raw statistics use all.
    batch_size
        Cells decoded at a time.
    seed
        Seed of each comparison's choice of cells, posterior samples (torch's generator, restored
        afterwards) and pairing, combined with the comparison's label; None draws afresh.

    Returns
    -------
    DataFrame indexed by gene (``adata.var_names``), one block of all genes per comparison, blocks in the
    order above, each sorted by ``proba_de`` descending (ties: ``|lfc_mean|`` descending). Columns, as
    scvi-tools: ``proba_de``, ``proba_not_de``, ``bayes_factor``, ``scale1``, ``scale2``, in ``"change"``
    mode ``pseudocounts`` and ``delta``, ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``,
    ``lfc_max`` (positive: higher in group 1), with ``all_stats`` ``raw_mean1``, ``raw_mean2`` (mean
    count of every cell of each side), ``non_zeros_proportion1``, ``non_zeros_proportion2`` (fraction of
    those cells with a nonzero count), ``raw_normalized_mean1``, ``raw_normalized_mean2`` (mean of count
    / cell total x 10,000), then ``is_de_fdr_<fdr_target>`` and, for ``groupby`` comparisons,
    ``comparison`` (``"<group1> vs <group2>"``, ``"<group1> vs Rest"`` against the rest), ``group1`` and
    ``group2`` (``"Rest"``). The counts are those of the layer the model was set up with.

    Examples
    --------
    >>> de = model.differential_expression(groupby="cell_type")  # each type against the rest
    >>> de[de["is_de_fdr_0.05"] & (de["lfc_mean"] > 1)].groupby("comparison").head(10)
    >>> model.differential_expression(groupby="cell_type", group1="B", group2="CD14 Mono")
    """
    _check_options(mode, delta, fdr_target, pseudocount, n_pairs)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if cells_per_group is not None and cells_per_group < 1:
        raise ValueError(f"cells_per_group must be >= 1 or None, got {cells_per_group}")
    adata = model.adata if adata is None else adata
    codes_n, comparisons = _resolve(adata.obs, groupby, group1, group2, idx1, idx2)
    model._check_trained()
    if all_stats:  # atoms without cells (e.g. no cell in both idx1 and idx2) sum to zero
        n_atoms = 1 + max(int(codes_n.max()), *(max(c.atoms1 + c.atoms2) for c in comparisons))
        sums = _atom_sums(model._setup_for(adata), codes_n, n_atoms)
    else:
        sums = None

    blocks = []
    for comparison in comparisons:
        rng = _comparison_rng(seed, comparison.name)

        def choose(atoms: tuple[int, ...]) -> np.ndarray:
            idx = np.flatnonzero(np.isin(codes_n, atoms))
            if cells_per_group is None or idx.size <= cells_per_group:
                return idx
            return rng.choice(idx, size=cells_per_group, replace=False)

        cells1, cells2 = choose(comparison.atoms1), choose(comparison.atoms2)
        with torch.random.fork_rng():
            torch.manual_seed(int(rng.integers(2**31 - 1)))
            rho1_sg = _pooled_samples(model, adata, cells1, n_samples=n_samples, batch_size=batch_size)
            rho2_sg = _pooled_samples(model, adata, cells2, n_samples=n_samples, batch_size=batch_size)
        table = _compare(
            rho1_sg, rho2_sg, mode=mode, delta=delta, pseudocount=pseudocount, n_pairs=n_pairs, rng=rng
        )
        if sums is not None:
            mean1, nonzero1, normalized1 = sums.stats(comparison.atoms1)
            mean2, nonzero2, normalized2 = sums.stats(comparison.atoms2)
            raw = (mean1, mean2, nonzero1, nonzero2, normalized1, normalized2)
            for name, values in zip(_RAW_STATS, raw):
                table[name] = values
        table = _sort_and_flag(table, fdr_target)
        table.index = adata.var_names[table.index.to_numpy()]
        if comparison.named:
            table["comparison"] = comparison.name
            table["group1"] = [comparison.label1] * len(table)
            table["group2"] = [comparison.label2] * len(table)
        blocks.append(table)
    return pd.concat(blocks, axis=0)

"""Simulators of the methods' generative models, with known parameters (for tests and tutorials)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["simulate_cellassign", "simulate_scvi"]


def simulate_cellassign(
    n_cells: int = 10_000,
    *,
    type_fractions: tuple[float, ...] = (0.4, 0.25, 0.15, 0.12, 0.08),
    n_markers_per_type: int = 6,
    n_other_genes: int = 200,
    min_delta: float = 2.0,
    phi: float = 5.0,
    n_absent_markers: int = 0,
    seed: int = 0,
) -> tuple[AnnData, pd.DataFrame, pd.DataFrame]:
    """Counts from CellAssign's generative model, with known types and marker effects.

    Types of uneven sizes; each has ``n_markers_per_type`` markers of its own, with effects
    ``delta = min_delta + LogNormal(-1, 0.5)``; ``n_other_genes`` non-marker genes; size factors
    LogNormal(0, 0.3); baseline log means ``beta_0 ~ N(1, 1)``; NB noise with inverse dispersion ``phi``.
    Returns ``(adata, marker_matrix, true_delta)`` with ``obs["cell_type"]`` the true type and
    ``obs["size_factor"]`` the true size factors (the model's :math:`s_n`; size factors estimated from
    total counts are inflated by each type's own markers when markers are a large share of the genes).

    ``n_absent_markers > 0`` adds a type ``"absent"`` to the marker matrix that no cell has, with that
    many markers of its own (genes ``absent_marker_*``, zero counts in every cell, appended last): a panel
    listing more types than the sample holds.
    """
    rng = np.random.default_rng(seed)
    n_types = len(type_fractions)
    types = [f"type_{c}" for c in range(n_types)]
    n_markers = n_types * n_markers_per_type
    genes = [f"marker_{g}" for g in range(n_markers)] + [f"other_{g}" for g in range(n_other_genes)]
    rho_gc = np.zeros((n_markers, n_types))
    for c in range(n_types):
        rho_gc[c * n_markers_per_type : (c + 1) * n_markers_per_type, c] = 1
    delta_gc = rho_gc * (min_delta + rng.lognormal(-1.0, 0.5, size=rho_gc.shape))
    pi_c = np.asarray(type_fractions) / np.sum(type_fractions)
    z_n = rng.choice(n_types, size=n_cells, p=pi_c)
    s_n = rng.lognormal(0.0, 0.3, size=n_cells)
    beta0_g = rng.normal(1.0, 1.0, size=len(genes))
    log_mu_ng = np.log(s_n)[:, None] + beta0_g
    log_mu_ng[:, :n_markers] += delta_gc.T[z_n]
    x_ng = rng.poisson(rng.gamma(phi, np.exp(log_mu_ng) / phi)).astype(np.float32)
    empty = x_ng.sum(1) == 0
    x_ng[empty, -1] = 1  # every cell has a count somewhere
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([types[c] for c in z_n], categories=types), "size_factor": s_n},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    adata = AnnData(sp.csr_matrix(x_ng), obs=obs, var=pd.DataFrame(index=genes))
    markers = pd.DataFrame(rho_gc.astype(int), index=genes[:n_markers], columns=types)
    true_delta = pd.DataFrame(delta_gc, index=genes[:n_markers], columns=types)
    if n_absent_markers > 0:
        absent = [f"absent_marker_{i}" for i in range(n_absent_markers)]
        counts = sp.hstack([adata.X, sp.csr_matrix((n_cells, len(absent)), dtype=np.float32)]).tocsr()
        adata = AnnData(counts, obs=adata.obs, var=pd.DataFrame(index=[*genes, *absent]))
        markers = pd.concat([markers.assign(absent=0), pd.DataFrame(0, index=absent, columns=[*types, "absent"])])
        markers.loc[absent, "absent"] = 1
    return adata, markers, true_delta


def simulate_scvi(
    n_cells: int = 2000,
    n_genes: int = 500,
    *,
    n_latent: int = 5,
    n_types: int = 5,
    n_batches: int = 2,
    theta: float = 5.0,
    zero_inflation: float = 0.0,
    mean_library: float = 2000.0,
    batch_effect: float = 0.5,
    n_donors: int = 0,
    donor_effect: float = 1.0,
    continuous_effect: float = 0.0,
    seed: int = 0,
) -> AnnData:
    """Counts from scVI's generative model with a known latent structure.

    Cell types are clusters in a ``n_latent``-dimensional latent space; a random linear decoder plus a
    per-batch gene offset, softmax over genes, log-normal library sizes and NB (optionally
    zero-inflated) noise give the counts. ``obs``: ``cell_type``, ``batch``; ``obsm["z_true"]``.

    Nuisance covariates, independent of the types: with ``n_donors > 0`` each cell's donor
    (``obs["donor"]``) adds a gene offset drawn N(0, ``donor_effect``²) to the decoder's logits; with
    ``continuous_effect > 0`` a score ``obs["nuisance"]`` ~ U(-1, 1) (like a percent mitochondrial or
    cell-cycle score) adds ``nuisance * beta_g``, beta_g ~ N(0, ``continuous_effect``²), stored in
    ``var["nuisance_beta"]``. They are drawn from their own stream, so the rest does not depend on them.
    """
    rng = np.random.default_rng(seed)
    nuisance_rng = np.random.default_rng([seed, 1])
    centres_tk = rng.normal(0, 2.0, size=(n_types, n_latent))
    type_n = rng.integers(0, n_types, size=n_cells)
    z_nk = centres_tk[type_n] + rng.normal(0, 0.5, size=(n_cells, n_latent))
    batch_n = rng.integers(0, n_batches, size=n_cells)
    w_kg = rng.normal(0, 1.0 / np.sqrt(n_latent), size=(n_latent, n_genes))
    offset_g = rng.normal(0, 1.0, size=n_genes)
    batch_bg = rng.normal(0, batch_effect, size=(n_batches, n_genes))
    logits_ng = z_nk @ w_kg + offset_g + batch_bg[batch_n]
    obs_nuisance, var_nuisance = {}, {}
    if n_donors > 0:
        donor_n = nuisance_rng.integers(0, n_donors, size=n_cells)
        logits_ng = logits_ng + nuisance_rng.normal(0, donor_effect, size=(n_donors, n_genes))[donor_n]
        obs_nuisance["donor"] = pd.Categorical([f"donor_{d}" for d in donor_n])
    if continuous_effect > 0:
        u_n = nuisance_rng.uniform(-1, 1, size=n_cells)
        beta_g = nuisance_rng.normal(0, continuous_effect, size=n_genes)
        logits_ng = logits_ng + u_n[:, None] * beta_g
        obs_nuisance["nuisance"] = u_n
        var_nuisance["nuisance_beta"] = beta_g
    rho_ng = np.exp(logits_ng - logits_ng.max(1, keepdims=True))
    rho_ng /= rho_ng.sum(1, keepdims=True)
    library_n = rng.lognormal(np.log(mean_library), 0.3, size=n_cells)
    mu_ng = library_n[:, None] * rho_ng
    x_ng = rng.poisson(rng.gamma(theta, mu_ng / theta))
    if zero_inflation > 0:
        x_ng[rng.random(x_ng.shape) < zero_inflation] = 0
    empty = x_ng.sum(1) == 0
    x_ng[empty, rng.integers(0, n_genes, size=int(empty.sum()))] = 1  # every cell has a count
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{t}" for t in type_n]),
            "batch": pd.Categorical([f"batch_{b}" for b in batch_n]),
            **obs_nuisance,
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(var_nuisance, index=[f"gene_{g}" for g in range(n_genes)])
    adata = AnnData(sp.csr_matrix(x_ng.astype(np.float32)), obs=obs, var=var)
    adata.obsm["z_true"] = z_nk.astype(np.float32)
    return adata

"""Data sets: loaders of the real sets in the data directory, and simulators of the models.

The real sets are read from :data:`pyro_sc.settings.data_dir` (environment variable
``PYRO_SC_DATA_DIR``; default ``../shared/data``). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from . import settings

__all__ = ["data_path", "read_dataset", "load_ifnb", "select_hvg", "simulate_scvi"]

# folder -> file of each real set (see the data directory's README).
DATASETS = {
    "ifnb_2800": "ifnb_2800_counts.h5ad",
    "cellbench_3cl": "cellbench_3cl_celseq2_dropseq_counts.h5ad",
    "baron_mouse1": "baron_mouse1_counts.h5ad",
    "pbmc3k_hvg2000": "pbmc3k_hvg2000_counts.h5ad",
}


def data_path(name: str) -> Path:
    """The file of real data set ``name`` under the data directory; a clear error when absent."""
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    path = Path(settings.data_dir) / name / DATASETS[name]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Point pyro_sc at the data directory with the environment variable "
            f"{settings.DATA_DIR_ENV} or pyro_sc.settings.data_dir (now {settings.data_dir!s})."
        )
    return path


def read_dataset(name: str, *, backed: bool = False) -> AnnData:
    """Read a real data set (raw counts in ``X``, CSR); ``backed=True`` leaves the matrix on disk."""
    import anndata

    return anndata.read_h5ad(data_path(name), backed="r" if backed else None)


def select_hvg(adata: AnnData, n_top_genes: int = 2000, *, batch_key: str | None = None) -> AnnData:
    """A copy of ``adata`` restricted to scanpy's ``seurat_v3`` highly variable genes (on raw counts)."""
    try:
        import scanpy as sc
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("select_hvg needs scanpy and scikit-misc: pip install pyro_sc[analysis]") from err
    adata = adata.copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat_v3", batch_key=batch_key)
    return adata[:, adata.var["highly_variable"].to_numpy()].copy()


def load_ifnb(*, n_top_genes: int | None = 2000) -> AnnData:
    """IFN-beta stimulated vs control PBMCs (Kang et al. 2018), 2,800 cells; ``obs``: condition, cell_type.

    With ``n_top_genes`` the genes are restricted to the ``seurat_v3`` highly variable genes selected
    with ``batch_key="condition"``.
    """
    adata = read_dataset("ifnb_2800")
    return adata if n_top_genes is None else select_hvg(adata, n_top_genes, batch_key="condition")


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
    seed: int = 0,
) -> AnnData:
    """Counts from scVI's generative model with a known latent structure.

    Cell types are clusters in a ``n_latent``-dimensional latent space; a random linear decoder plus a
    per-batch gene offset, softmax over genes, log-normal library sizes and NB (optionally
    zero-inflated) noise give the counts. ``obs``: ``cell_type``, ``batch``; ``obsm["z_true"]``.
    """
    rng = np.random.default_rng(seed)
    centres_tk = rng.normal(0, 2.0, size=(n_types, n_latent))
    type_n = rng.integers(0, n_types, size=n_cells)
    z_nk = centres_tk[type_n] + rng.normal(0, 0.5, size=(n_cells, n_latent))
    batch_n = rng.integers(0, n_batches, size=n_cells)
    w_kg = rng.normal(0, 1.0 / np.sqrt(n_latent), size=(n_latent, n_genes))
    offset_g = rng.normal(0, 1.0, size=n_genes)
    batch_bg = rng.normal(0, batch_effect, size=(n_batches, n_genes))
    logits_ng = z_nk @ w_kg + offset_g + batch_bg[batch_n]
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
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)])
    adata = AnnData(sp.csr_matrix(x_ng.astype(np.float32)), obs=obs, var=var)
    adata.obsm["z_true"] = z_nk.astype(np.float32)
    return adata

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

__all__ = [
    "data_path", "read_dataset", "load_ifnb", "load_cellbench", "load_markers", "select_hvg",
    "simulate_scvi", "simulate_cellassign", "load_baron_mouse1",
]

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


def load_cellbench(*, drop_doublets: bool = True) -> AnnData:
    """CellBench 3 cell lines (Tian et al. 2019), CEL-seq2 and Drop-seq; truth ``obs["cell_line_demuxlet"]``.

    ``var_names`` are Ensembl IDs, ``var["gene_symbol"]`` the symbols. Doublets (by genotype) dropped.
    """
    adata = read_dataset("cellbench_3cl")
    if drop_doublets:
        adata = adata[adata.obs["demuxlet_cls"] != "DBL"].copy()
    return adata


def load_markers(name: str) -> pd.DataFrame:
    """A CellAssign-paper marker matrix (genes x types, 0/1), e.g. ``"tian_73_73"`` or ``"tian_20_73"``."""
    base = Path(settings.data_dir)
    candidates = [base / "cellbench_3cl" / "markers" / f"{name}_markers_binary_matrix.csv",
                  base / "markers" / f"{name}_binary_matrix.csv", base / "markers" / f"{name}.csv"]
    for path in candidates:
        if path.exists():
            return pd.read_csv(path, index_col=0)
    yaml_path = base / "markers" / "cellassign_paper_marker_lists" / f"{name}.yaml"
    if not yaml_path.exists():
        yaml_path = base / "cellbench_3cl" / "markers" / f"{name}_markers.yaml"
    if yaml_path.exists():
        return marker_list_to_matrix(_read_marker_yaml(yaml_path))
    raise FileNotFoundError(f"no marker matrix {name!r} under {base} (looked for {[str(p) for p in candidates]})")


def _read_marker_yaml(path: Path) -> dict[str, list[str]]:
    """A ``type: [genes]`` YAML file (the CellAssign papers' format: plain keys and '- gene' items)."""
    markers: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("- ") and current is not None:
            markers[current].append(stripped[2:].strip().strip("'\""))
        elif stripped.endswith(":"):
            current = stripped[:-1].strip().strip("'\"")
            markers[current] = []
    return markers


def marker_list_to_matrix(markers: dict[str, list[str]]) -> pd.DataFrame:
    """``{type: [genes]}`` -> binary genes x types DataFrame (genes in first-seen order)."""
    genes = list(dict.fromkeys(g for gs in markers.values() for g in gs))
    return pd.DataFrame({t: [int(g in set(gs)) for g in genes] for t, gs in markers.items()}, index=genes)


def simulate_cellassign(
    n_cells: int = 10_000,
    *,
    type_fractions: tuple[float, ...] = (0.4, 0.25, 0.15, 0.12, 0.08),
    n_markers_per_type: int = 6,
    n_other_genes: int = 200,
    min_delta: float = 2.0,
    phi: float = 5.0,
    seed: int = 0,
) -> tuple[AnnData, pd.DataFrame, pd.DataFrame]:
    """Counts from CellAssign's generative model, with known types and marker effects.

    Types of uneven sizes; each has ``n_markers_per_type`` markers of its own, with effects
    ``delta = min_delta + LogNormal(-1, 0.5)``; ``n_other_genes`` non-marker genes; size factors
    LogNormal(0, 0.3); baseline log means ``beta_0 ~ N(1, 1)``; NB noise with inverse dispersion ``phi``.
    Returns ``(adata, marker_matrix, true_delta)`` with ``obs["cell_type"]`` the true type and
    ``obs["size_factor"]`` the true size factors (the model's :math:`s_n`; size factors estimated from
    total counts are inflated by each type's own markers when markers are a large share of the genes).
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


def load_baron_mouse1(*, n_top_genes: int | None = None, min_cells: int = 1) -> AnnData:
    """Mouse pancreas, mouse 1 of Baron et al. 2016 (inDrop): 822 cells, 13 curated types in
    ``obs["cell_type"]`` (beta 343, ductal 236, delta 85, ..., alpha 9).

    Genes detected in at least ``min_cells`` cells: by default all genes but the 519 of the file's
    14,878 with no count at all (14,359; the scETM paper's all-genes protocol); with ``n_top_genes``
    only the ``seurat_v3`` highly variable genes among them.
    """
    adata = read_dataset("baron_mouse1")
    detected_g = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    adata = adata[:, detected_g >= min_cells].copy()
    return adata if n_top_genes is None else select_hvg(adata, n_top_genes)

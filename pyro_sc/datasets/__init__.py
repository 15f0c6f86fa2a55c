"""Real data sets and marker lists, loaded with one call, and simulators of each method's model.

Each real set is found in this order:

1. a **data directory** of ready files laid out as ``<dir>/<name>/<file>.h5ad``: the ``data_dir``
   argument, else :data:`pyro_sc.settings.data_dir` (environment variable ``PYRO_SC_DATA_DIR``);
2. the **per-user cache** (:data:`pyro_sc.settings.cache_dir`, e.g. ``~/.cache/pyro_sc``);
3. a **download** of the set's public original files (GitHub, at pinned commits; sha256-checked by
   pooch), converted here with pure-Python readers and written to the cache (about 1-8 MB a set).

Nothing defaults to a path relative to the working directory. :func:`available` lists every set with
its size, source and license. ``settings.base_url`` (``PYRO_SC_BASE_URL``) points the downloads at a
mirror of the originals; ``settings.download = False`` (``PYRO_SC_DOWNLOAD=0``) forbids them.

>>> from pyro_sc import datasets
>>> datasets.available()[["cells x genes", "download MB", "license"]]   # doctest: +SKIP
>>> adata = datasets.load_ifnb()                                         # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from . import _convert
from ._fetch import (
    ChecksumError,
    DataUnavailableError,
    cache_dir,
    explicit_dir,
    fetch,
    require_downloads,
    write_atomically,
)
from ._simulate import simulate_cellassign, simulate_scvi
from ._sources import DATASETS, MARKER_GROUP, MARKER_LICENSE, MARKERS

__all__ = [
    "ChecksumError", "DataUnavailableError", "available", "data_path", "read_dataset", "load_ifnb",
    "load_cellbench", "load_baron_mouse1", "load_pbmc3k", "load_markers", "marker_list_to_matrix",
    "select_hvg", "simulate_scvi", "simulate_cellassign",
]

PathLike = str | os.PathLike


def _dataset(name: str):
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def data_path(name: str, *, data_dir: PathLike | None = None) -> Path:
    """The h5ad file of real data set ``name``: from the data directory, the cache, or downloaded.

    Parameters
    ----------
    name
        One of :func:`available`'s names, e.g. ``"ifnb_2800"``.
    data_dir
        A folder of ready files (``<data_dir>/<name>/<file>.h5ad``) to look in first; default
        :data:`pyro_sc.settings.data_dir`.

    Raises
    ------
    ValueError
        ``name`` is not a known data set (the message lists the known ones).
    DataUnavailableError
        The set is in neither place and cannot be downloaded (no network, or downloads turned off); the
        message names the URL and where to put the file by hand.
    ChecksumError
        A downloaded original is not the published file; nothing of it is kept.
    """
    dataset = _dataset(name)
    looked_at = []
    directory = explicit_dir(data_dir)
    if directory is not None:
        looked_at.append(directory / name / dataset.file)
        if looked_at[-1].exists():
            return looked_at[-1]
    cached = cache_dir() / name / dataset.file
    if cached.exists():
        return cached
    require_downloads(f"data set {name!r}", [*looked_at, cached])
    folder = cache_dir() / "originals" / name
    hint = f", or point pyro_sc.settings.data_dir at a folder holding {name}/{dataset.file}"
    files = {original.name: fetch(name, original, folder, manual_hint=hint) for original in dataset.originals}
    write_atomically(getattr(_convert, name)(files), cached)
    return cached


def read_dataset(name: str, *, backed: bool = False, data_dir: PathLike | None = None) -> AnnData:
    """Read real data set ``name`` (raw counts in ``X``, float32 CSR); ``backed=True`` leaves ``X`` on disk.

    Found as :func:`data_path` says (data directory, cache, download).
    """
    import anndata

    return anndata.read_h5ad(data_path(name, data_dir=data_dir), backed="r" if backed else None)


def available() -> pd.DataFrame:
    """Every real data set and marker list that can be loaded: what it is, size, source, license, where.

    ``location`` says where it would be read from now: ``"data_dir"``, ``"cache"`` or ``"download"``.
    """
    rows = []
    directory = explicit_dir(None)
    for name, dataset in DATASETS.items():
        if directory is not None and (directory / name / dataset.file).exists():
            location = "data_dir"
        else:
            location = "cache" if (cache_dir() / name / dataset.file).exists() else "download"
        rows.append({"name": name, "kind": "counts", "description": dataset.description,
                     "download MB": round(dataset.download_size / 1e6, 2), "files": len(dataset.originals),
                     "source": dataset.originals[0].url.rsplit("/", 1)[0], "license": dataset.license,
                     "citation": dataset.citation, "location": location})
    for name, original in MARKERS.items():
        location = "cache" if (cache_dir() / "markers" / MARKER_GROUP / original.name).exists() else "download"
        if directory is not None and _marker_in_dir(directory, name) is not None:
            location = "data_dir"
        rows.append({"name": name, "kind": "markers", "description": "CellAssign paper marker list (type: genes)",
                     "download MB": round(original.size / 1e6, 4), "files": 1,
                     "source": original.url.rsplit("/", 1)[0], "license": MARKER_LICENSE,
                     "citation": "Zhang et al. 2019, Nat Methods (CellAssign)", "location": location})
    return pd.DataFrame(rows).set_index("name")


def select_hvg(adata: AnnData, n_top_genes: int = 2000, *, batch_key: str | None = None) -> AnnData:
    """A copy of ``adata`` restricted to scanpy's ``seurat_v3`` highly variable genes (on raw counts)."""
    try:
        import scanpy as sc
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("select_hvg needs scanpy and scikit-misc: pip install pyro_sc[analysis]") from err
    adata = adata.copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat_v3", batch_key=batch_key)
    return adata[:, adata.var["highly_variable"].to_numpy()].copy()


def load_ifnb(*, n_top_genes: int | None = 2000, data_dir: PathLike | None = None) -> AnnData:
    """IFN-beta stimulated vs control PBMCs (Kang et al. 2018), 2,800 cells; ``obs``: condition, cell_type.

    With ``n_top_genes`` the genes are restricted to the ``seurat_v3`` highly variable genes selected
    with ``batch_key="condition"``.
    """
    adata = read_dataset("ifnb_2800", data_dir=data_dir)
    return adata if n_top_genes is None else select_hvg(adata, n_top_genes, batch_key="condition")


def load_cellbench(*, drop_doublets: bool = True, data_dir: PathLike | None = None) -> AnnData:
    """CellBench 3 cell lines (Tian et al. 2019), CEL-seq2 and Drop-seq; truth ``obs["cell_line_demuxlet"]``.

    ``var_names`` are Ensembl IDs, ``var["gene_symbol"]`` the symbols. Doublets (by genotype) dropped.
    """
    adata = read_dataset("cellbench_3cl", data_dir=data_dir)
    if drop_doublets:
        adata = adata[adata.obs["demuxlet_cls"] != "DBL"].copy()
    return adata


def load_baron_mouse1(
    *, n_top_genes: int | None = None, min_cells: int = 1, data_dir: PathLike | None = None
) -> AnnData:
    """Mouse pancreas, mouse 1 of Baron et al. 2016 (inDrop): 822 cells, 13 curated types in
    ``obs["cell_type"]`` (beta 343, ductal 236, delta 85, ..., alpha 9).

    Genes detected in at least ``min_cells`` cells: by default all genes but the 519 of the file's
    14,878 with no count at all (14,359; the scETM paper's all-genes protocol); with ``n_top_genes``
    only the ``seurat_v3`` highly variable genes among them.
    """
    adata = read_dataset("baron_mouse1", data_dir=data_dir)
    detected_g = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    adata = adata[:, detected_g >= min_cells].copy()
    return adata if n_top_genes is None else select_hvg(adata, n_top_genes)


def load_pbmc3k(*, data_dir: PathLike | None = None) -> AnnData:
    """10x PBMC 3k, the Seurat tutorial's 2,000 variable genes and 9 annotated types (``obs["cell_type"]``).

    ``obs["nCount_RNA"]`` is each cell's library size over all genes (only 2,000 are in ``X``).
    """
    return read_dataset("pbmc3k_hvg2000", data_dir=data_dir)


def _marker_in_dir(directory: Path, name: str) -> Path | None:
    """A marker matrix (csv, genes x types) or list (yaml) named ``name`` in a data directory, if any."""
    candidates = [
        directory / "cellbench_3cl" / "markers" / f"{name}_markers_binary_matrix.csv",
        directory / "markers" / f"{name}_binary_matrix.csv",
        directory / "markers" / f"{name}.csv",
        directory / "markers" / MARKER_GROUP / f"{name}.yaml",
        directory / "cellbench_3cl" / "markers" / f"{name}_markers.yaml",
    ]
    if name in MARKERS:
        candidates.append(directory / "markers" / MARKER_GROUP / MARKERS[name].name)
    return next((path for path in candidates if path.exists()), None)


def load_markers(name: str, *, data_dir: PathLike | None = None) -> pd.DataFrame:
    """A CellAssign-paper marker matrix (genes x types, 0/1, genes sorted), e.g. ``"tian_73_73"``.

    From the data directory if it holds the list (a binary csv or the paper's yaml), else the cache,
    else downloaded from the paper's repository at a pinned commit (see :func:`available`).
    """
    directory = explicit_dir(data_dir)
    found = None if directory is None else _marker_in_dir(directory, name)
    if found is None:
        if name not in MARKERS:
            raise ValueError(f"unknown marker list {name!r}; known: {', '.join(sorted(MARKERS))}")
        original = MARKERS[name]
        found = cache_dir() / "markers" / MARKER_GROUP / original.name
        if not found.exists():
            require_downloads(f"marker list {name!r}", [found])
            hint = f", or point pyro_sc.settings.data_dir at a folder holding markers/{MARKER_GROUP}/{original.name}"
            found = fetch(MARKER_GROUP, original, found.parent, manual_hint=hint)
    if found.suffix == ".csv":
        matrix = pd.read_csv(found, index_col=0)
    else:
        matrix = marker_list_to_matrix(_read_marker_yaml(found))
    return matrix.sort_index().rename_axis(index="gene")


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

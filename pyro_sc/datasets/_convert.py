"""Each data set's conversion from its public originals to an AnnData of raw counts.

Every function takes ``{original file name: local path}`` and returns cells x genes float32 CSR counts
in ``X``; label columns are categoricals with sorted categories. The results equal the h5ad files of
the project's data directory (matrix, names, labels; checked by the tests against those files).
Readers are pure Python: ``rdata`` for R's ``.rda``, pandas for ``.csv(.gz)``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def _read_rda(path: Path):
    """The one object of an ``.rda`` file, converted by ``rdata`` (S4 classes come back as their slots)."""
    import rdata

    with warnings.catch_warnings():
        # rdata has no constructor for Matrix's dgCMatrix and says so; its slots are what we read
        warnings.filterwarnings("ignore", message="Missing constructor for R class", category=UserWarning)
        objects = rdata.read_rda(str(path))
    (value,) = objects.values()
    return value


def _categorical(values) -> pd.Categorical:
    values = np.asarray(values, dtype=str).astype(object)
    return pd.Categorical(values, categories=sorted(set(values)))


def _counts(matrix) -> sp.csr_matrix:
    return sp.csr_matrix(matrix, dtype=np.float32)


def ifnb_2800(files: dict[str, Path]) -> AnnData:
    data = _read_rda(files["ifnb_2800.rda"])
    expr, meta = data["expr"], data["meta"]  # genes x cells (xarray), data.frame of the cells
    genes, cells = (np.asarray(expr.coords[dim].values, dtype=str) for dim in expr.dims)
    obs = pd.DataFrame(
        {"condition": _categorical(meta["sample"]), "cell_type": _categorical(meta["cell_type"])},
        index=pd.Index(cells.astype(object)),
    )
    return AnnData(_counts(np.asarray(expr.values).T), obs=obs, var=pd.DataFrame(index=genes.astype(object)))


def _demangle(r_name: str) -> str:
    """Undo R's ``make.names`` on a mouse gene symbol (the order matters; see the data README)."""
    if r_name == "Gt.ROSA.26Sor":
        return "Gt(ROSA)26Sor"
    return re.sub(r"^X(?=\d)", "", r_name).replace(".", "-")


def baron_mouse1(files: dict[str, Path]) -> AnnData:
    counts = _read_rda(files["baron_mouse_1.rda"])  # genes x cells data.frame of integers
    truth = _read_rda(files["baron_mouse_1_ground_truth.rda"])  # cells, clust_assign; same cell order
    r_names = counts.index.astype(str)
    var = pd.DataFrame({"r_mangled_name": r_names.to_numpy(dtype=object)},
                       index=pd.Index([_demangle(name) for name in r_names], dtype=object))
    obs = pd.DataFrame(
        {"cell_type": _categorical(truth["clust_assign"]), "batch": _categorical(["mouse1"] * counts.shape[1])},
        index=pd.Index(counts.columns.astype(str), dtype=object),
    )
    return AnnData(_counts(counts.to_numpy().T), obs=obs, var=var)


def cellbench_3cl(files: dict[str, Path]) -> AnnData:
    protocols = {"CELseq2": "sc_celseq2", "Dropseq": "sc_dropseq"}
    counts, metas = {}, {}
    for batch, stem in protocols.items():
        table = pd.read_csv(files[f"{stem}.count.csv.gz"], index_col=0)  # genes x cells
        counts[batch] = table[~table.index.str.startswith("ERCC-")]
        metas[batch] = pd.read_csv(files[f"{stem}.metadata.csv.gz"], index_col=0)
    genes = sorted(set.intersection(*(set(table.index) for table in counts.values())))
    matrix = sp.vstack([_counts(table.loc[genes].to_numpy().T) for table in counts.values()], format="csr")
    columns = ["cell_line", "cell_line_demuxlet", "demuxlet_cls"]
    obs = pd.concat(
        [meta.assign(batch=batch).set_axis([f"{batch}_{cell}" for cell in counts[batch].columns])
         for batch, meta in metas.items()]
    )
    obs = pd.DataFrame(
        {"batch": _categorical(obs["batch"]), **{c: _categorical(obs[c]) for c in columns},
         "total_count_per_cell": obs["total_count_per_cell"].astype(np.int64).to_numpy(),
         "number_of_genes": obs["number_of_genes"].astype(np.int64).to_numpy()},
        index=pd.Index(obs.index, dtype=object),
    )
    symbols = pd.read_csv(files["GENCODEv44_Gene_id2name.csv"], header=None, index_col=0).iloc[:, 0]
    symbols = symbols[~symbols.index.duplicated()]
    var = pd.DataFrame({"gene_symbol": symbols.reindex(genes).to_numpy(dtype=object)},
                       index=pd.Index(genes, dtype=object, name="ensembl_id"))
    return AnnData(matrix, obs=obs, var=var)


def pbmc3k_hvg2000(files: dict[str, Path]) -> AnnData:
    parts = _read_rda(files["pbmc_matrix_small.rda"])  # a dgCMatrix's slots: log-normalised genes x cells
    n_genes, n_cells = (int(d) for d in parts.Dim)
    genes, cells = (np.asarray(names, dtype=str).astype(object) for names in parts.Dimnames)
    lognorm = sp.csc_matrix((parts.x, parts.i, parts.p), shape=(n_genes, n_cells)).T.tocsr()
    meta = _read_rda(files["pbmc_meta.rda"]).loc[cells]
    library_n = meta["nCount_RNA"].to_numpy(dtype=np.float64)
    # Seurat's LogNormalize: log1p(x / nCount_RNA * 1e4), kept in double precision: exact counts back
    counts = lognorm.copy()
    counts.data = np.round(np.expm1(lognorm.data) * np.repeat(library_n / 1e4, np.diff(lognorm.indptr)))
    obs = pd.DataFrame(
        {"nCount_RNA": library_n.astype(np.int64), "nFeature_RNA": meta["nFeature_RNA"].to_numpy(dtype=np.int64),
         "percent.mt": meta["percent.mt"].to_numpy(dtype=np.float64),
         "seurat_clusters": meta["seurat_clusters"].astype(str).astype(np.int64).to_numpy(),
         "cell_type": _categorical(meta["classified"])},
        index=pd.Index(cells),
    )
    return AnnData(_counts(counts), obs=obs, var=pd.DataFrame(index=genes))

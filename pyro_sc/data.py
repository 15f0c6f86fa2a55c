"""From an AnnData to the tensors a Pyro model sees.

:class:`AnnDataSetup` registers an AnnData once: it finds the counts (``X`` or a named layer; dense,
scipy-sparse or backed on disk), checks them, and encodes batches, labels and covariates into integer
codes whose mapping it keeps. :meth:`AnnDataSetup.minibatch` then densifies only the rows of one
minibatch into a :class:`Minibatch`, the single argument every model and guide of the package takes.

**Out of core.** A matrix backed on disk (``anndata.read_h5ad(path, backed="r")``) is never loaded:
the checks scan it in chunks of rows, and a minibatch reads only its rows. A CSR matrix stored
uncompressed in an ``.h5ad`` (anndata's default) is read by positional reads of the rows' byte ranges
(its row pointers, 8 bytes a cell, are held in memory); other backed matrices through anndata / h5py.
:func:`load_minibatches` can prepare the next minibatches in a background thread while the model
trains. On a GPU, a sparse minibatch is moved as a sparse tensor and densified there.

The user's AnnData is never modified.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .distributions import _remember_nonzeros

__all__ = [
    "AnnDataSetup", "DataError", "DataWarning", "Minibatch", "iterate_minibatches", "load_minibatches",
    "split_indices",
]

CHUNK_ROWS = 8192  # rows read at a time when scanning a whole matrix (validation, library statistics)


class DataError(ValueError):
    """The AnnData handed to a model cannot be used as it is; the message names the problem."""


class DataWarning(UserWarning):
    """The AnnData can be used, but something in it is probably not what the user meant."""


@dataclass(frozen=True)
class Minibatch:
    """One minibatch of cells, as a model and its guide receive it.

    ``idx_n`` are the positions of the cells in the registered data and ``n_obs`` the size of the whole
    ``cells`` plate, so ``pyro.plate("cells", mb.n_obs, subsample=mb.idx_n)`` scales the minibatch to
    the data set. Optional fields are ``None`` when the AnnData registered no such key.
    """

    idx_n: torch.Tensor
    n_obs: int
    x_ng: torch.Tensor
    batch_n: torch.Tensor | None = None  # integer batch codes
    y_n: torch.Tensor | None = None  # integer label codes, -1 for unlabelled cells
    size_factor_n: torch.Tensor | None = None
    cat_covs_nk: torch.Tensor | None = None  # integer codes, one column per categorical covariate
    cont_covs_nk: torch.Tensor | None = None
    kl_weight: float = 1.0  # KL annealing weight set by the driver (1 outside warm-up)
    extra: dict = field(default_factory=dict)  # method-specific tensors (e.g. a design matrix)

    def __len__(self) -> int:
        return int(self.idx_n.shape[0])


def _is_backed_matrix(matrix) -> bool:
    # anndata's on-disk sparse datasets and h5py datasets are read lazily, by rows.
    return not isinstance(matrix, (np.ndarray, sp.spmatrix, sp.sparray)) and hasattr(matrix, "shape")


class _NoFastPath(Exception):
    """The backed matrix is not stored in a way :class:`_H5CSRRows` reads directly (e.g. compressed)."""


class _RawExtent:
    """Where the elements of an uncompressed 1-D HDF5 dataset lie in its file: one byte offset
    (contiguous layout) or one per chunk (chunked layout, no filters)."""

    def __init__(self, ds):
        import h5py

        plist = ds.id.get_create_plist()
        if ds.ndim != 1 or not ds.dtype.isnative or ds.dtype.kind not in "iuf" or plist.get_nfilters():
            raise _NoFastPath
        self.dtype, self.size = ds.dtype, int(ds.shape[0])
        layout = plist.get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            offset = ds.id.get_offset()
            if offset is None and self.size:
                raise _NoFastPath
            self.chunk, self.offsets = max(self.size, 1), np.array([offset or 0], dtype=np.int64)
        elif layout == h5py.h5d.CHUNKED:
            self.chunk = int(ds.chunks[0])
            n_chunks = -(-self.size // self.chunk)
            self.offsets = np.full(n_chunks, -1, dtype=np.int64)

            def note(info):
                self.offsets[info.chunk_offset[0] // self.chunk] = info.byte_offset

            if hasattr(ds.id, "chunk_iter"):
                ds.id.chunk_iter(note)
            else:
                for i in range(ds.id.get_num_chunks()):
                    note(ds.id.get_chunk_info(i))
            if (self.offsets < 0).any():  # chunks never written hold fill values, not bytes on disk
                raise _NoFastPath
        else:
            raise _NoFastPath

    def read(self, fd: int, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Elements ``[starts[i], stops[i])`` for every i, concatenated."""
        out = np.empty(int((stops - starts).sum()), dtype=self.dtype)
        if not len(out):
            return out
        # ranges that continue one another (consecutive rows) become one read
        breaks = np.flatnonzero(starts[1:] != stops[:-1]) + 1
        firsts, lasts = np.r_[0, breaks], np.r_[breaks, len(starts)] - 1
        buffer = out.view(np.uint8)
        itemsize, chunk, pos = self.dtype.itemsize, self.chunk, 0
        for start, stop in zip(starts[firsts].tolist(), stops[lasts].tolist()):
            while start < stop:
                k = start // chunk
                end = min(stop, (k + 1) * chunk)
                nbytes = (end - start) * itemsize
                offset = int(self.offsets[k]) + (start - k * chunk) * itemsize
                view = buffer[pos : pos + nbytes]
                while len(view):
                    got = os.preadv(fd, [view], offset)
                    if got <= 0:
                        raise OSError(f"unexpected end of file reading a backed matrix at byte {offset}")
                    view, offset = view[got:], offset + got
                pos, start = pos + nbytes, end
        return out


class _H5CSRRows:
    """Rows of a CSR matrix stored uncompressed in an HDF5 file, read with ``os.preadv`` at the byte
    ranges of the rows (no HDF5 call per row, and the GIL is released while reading, so a prefetch
    thread overlaps with training). The row pointers are held in memory."""

    def __init__(self, matrix):
        import h5py

        group = getattr(matrix, "group", None)
        if not isinstance(group, h5py.Group) or getattr(matrix, "format", None) != "csr":
            raise _NoFastPath
        if group.file.id.get_create_plist().get_userblock():
            raise _NoFastPath
        self.shape = tuple(matrix.shape)
        self.data, self.indices = _RawExtent(group["data"]), _RawExtent(group["indices"])
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self._file = open(group.file.filename, "rb", buffering=0)  # closed when this reader is collected
        # a check that the layout was understood: the first and last rows, read both ways
        probe = np.unique([0, self.shape[0] - 1])
        expected = sp.vstack([sp.csr_matrix(matrix[int(i) : int(i) + 1]) for i in probe], format="csr")
        if (self.rows(probe) != expected).nnz:
            raise _NoFastPath

    def rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """Rows ``idx`` (increasing; repeats allowed) as an in-memory CSR matrix."""
        starts, stops = self.indptr[idx], self.indptr[idx + 1]
        fd = self._file.fileno()
        indptr = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(stops - starts, out=indptr[1:])
        return sp.csr_matrix(
            (self.data.read(fd, starts, stops), self.indices.read(fd, starts, stops), indptr),
            shape=(len(idx), self.shape[1]),
        )


def _row_reader(matrix):
    """The fast reader of a backed CSR matrix in an uncompressed .h5ad, or None (read through anndata)."""
    try:
        return _H5CSRRows(matrix)
    except (_NoFastPath, ImportError, OSError, KeyError, AttributeError, TypeError, ValueError):
        return None


def _sparse_tensor(rows: sp.csr_matrix) -> torch.Tensor:
    """A torch sparse CSR tensor (float32 values) of a scipy CSR matrix, sharing nothing with it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(rows.indptr.astype(np.int64)),
            torch.from_numpy(rows.indices.astype(np.int64)),
            torch.from_numpy(rows.data.astype(np.float32)),
            size=rows.shape,
            check_invariants=False,  # built from a valid scipy matrix
        )


def _dense_tensor(rows, device: torch.device) -> torch.Tensor:
    """Counts (dense array or CSR rows) as a dense float32 tensor on ``device``. Sparse rows go to an
    accelerator as a sparse tensor and are densified there; on the CPU they are densified directly."""
    if sp.issparse(rows) and device.type != "cpu":
        return _sparse_tensor(rows).to(device, non_blocking=True).to_dense()
    if sp.issparse(rows):
        dense = torch.as_tensor(rows.toarray().astype(np.float32, copy=False), device=device)
        return _remember_nonzeros(dense, _csr_nonzero_offsets(rows))
    return torch.as_tensor(np.asarray(rows).astype(np.float32, copy=False), device=device)


def _csr_nonzero_offsets(rows: sp.spmatrix) -> torch.Tensor:
    """Row-major offsets of the entries of sparse rows that are nonzero in float32 (the NB / ZINB log-prob
    then need not search the dense minibatch for them)."""
    rows = sp.csr_matrix(rows)
    if not rows.has_canonical_format:  # duplicate entries (summed by toarray) or unsorted columns
        rows = rows.copy()
        rows.sum_duplicates()
    row_of = np.repeat(np.arange(rows.shape[0], dtype=np.int64), np.diff(rows.indptr))
    flat = row_of * rows.shape[1] + rows.indices
    nonzero = rows.data.astype(np.float32, copy=False) != 0
    return torch.from_numpy(flat if nonzero.all() else flat[nonzero])


def _chunks(n: int, size: int | None = None) -> Iterator[slice]:
    size = CHUNK_ROWS if size is None else size
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class AnnDataSetup:
    """An AnnData registered for a model: where the counts are and how obs columns are encoded.

    Parameters
    ----------
    adata
        Cells x genes. Counts in ``X`` or in ``layers[layer]``: a numpy array, a scipy sparse matrix
        (CSR is read by rows as is; CSC is converted once to CSR, a copy held here, not in ``adata``),
        or a matrix backed on disk (``anndata.read_h5ad(path, backed="r")``), read one minibatch at a time.
    layer
        Layer holding the raw counts; ``None`` for ``X``.
    batch_key, labels_key
        Categorical ``obs`` columns. A batch key with a single category is fine.
    unlabeled_category
        The value of ``labels_key`` that marks cells without a label (coded -1).
    size_factor_key
        A numeric ``obs`` column of positive size factors.
    categorical_covariate_keys, continuous_covariate_keys
        Further ``obs`` columns passed to the model as ``cat_covs_nk`` / ``cont_covs_nk``.
    allow_non_integer
        Accept non-integer counts (e.g. ambient-corrected data). Off by default: most likelihoods
        here are count distributions, and non-integer values usually mean normalised data was passed.
    allow_empty_cells
        Accept cells whose counts are all zero (e.g. over a panel of marker genes, when the size
        factors come from all genes). Off by default: such cells carry no information for most models.
    allow_empty_genes
        Genes with zero counts in every cell are fitted (to zero) harmlessly but waste time, so they get
        a :class:`DataWarning` unless this is set (as for new data, where a few cells may miss a gene).
    batch_categories, label_categories, categorical_covariate_categories
        Fixed category orders (used when a trained model meets new data); values outside them are an error.
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        allow_non_integer: bool = False,
        allow_empty_cells: bool = False,
        allow_empty_genes: bool = False,
        batch_categories: Sequence | None = None,
        label_categories: Sequence | None = None,
        categorical_covariate_categories: dict[str, Sequence] | None = None,
    ):
        if not isinstance(adata, AnnData):
            raise DataError(f"expected an AnnData, got {type(adata).__name__}")
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise DataError(f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
        self.adata = adata
        self.layer = layer
        self.batch_key = batch_key
        self.labels_key = labels_key
        self.unlabeled_category = unlabeled_category
        self.size_factor_key = size_factor_key
        self.categorical_covariate_keys = list(categorical_covariate_keys or [])
        self.continuous_covariate_keys = list(continuous_covariate_keys or [])
        self.allow_non_integer = allow_non_integer
        self.allow_empty_cells = allow_empty_cells
        self.allow_empty_genes = allow_empty_genes

        self.matrix = self._find_matrix()
        self._backed = _is_backed_matrix(self.matrix)
        self._reader = _row_reader(self.matrix) if self._backed else None
        self.var_names = pd.Index(adata.var_names.astype(str))
        self.obs_names = pd.Index(adata.obs_names.astype(str))

        self.batch_categories, self.batch_codes_n = self._encode(
            batch_key, batch_categories, what="batch"
        )
        self.label_categories, self.label_codes_n = self._encode(
            labels_key, label_categories, what="label", unlabeled=unlabeled_category
        )
        fixed = categorical_covariate_categories or {}
        self.categorical_covariate_categories: dict[str, pd.Index] = {}
        codes = []
        for key in self.categorical_covariate_keys:
            cats, code_n = self._encode(key, fixed.get(key), what="categorical covariate")
            self.categorical_covariate_categories[key] = cats
            codes.append(code_n)
        self.cat_covs_nk = np.stack(codes, axis=1) if codes else None
        self.cont_covs_nk = self._continuous_covariates()
        self.size_factor_n = self._size_factors()
        self.library_n = self._check_counts()

    # ----------------------------------------------------------------------------------------- checks
    def _find_matrix(self):
        if self.layer is None:
            matrix = self.adata.X
            if matrix is None:
                raise DataError("adata.X is empty; pass layer=... naming the layer with the counts")
        else:
            if self.layer not in self.adata.layers:
                raise DataError(
                    f"layer {self.layer!r} not found in adata.layers "
                    f"(available: {sorted(self.adata.layers.keys()) or 'none'})"
                )
            matrix = self.adata.layers[self.layer]
        if sp.issparse(matrix) and matrix.format != "csr":
            matrix = sp.csr_matrix(matrix)  # rows are read per minibatch; CSC row slicing is slow
        if _is_backed_matrix(matrix) and getattr(matrix, "format", None) == "csc":
            raise DataError(
                "the counts are a CSC matrix backed on disk: a minibatch of cells cannot be read without "
                "loading every column; write the file with a CSR matrix (adata.X = scipy.sparse.csr_matrix("
                "adata.X) before write_h5ad), or load it into memory (adata.to_memory())"
            )
        return matrix

    def _obs_column(self, key: str, what: str) -> pd.Series:
        if key not in self.adata.obs.columns:
            raise DataError(
                f"{what} key {key!r} not found in adata.obs (columns: {list(self.adata.obs.columns)})"
            )
        return self.adata.obs[key]

    def _encode(self, key, categories, *, what: str, unlabeled=None) -> tuple[pd.Index | None, np.ndarray | None]:
        if key is None:
            return None, None
        column = self._obs_column(key, what)
        if column.isna().any():
            raise DataError(f"{what} key {key!r} has {int(column.isna().sum())} missing values")
        values = column.astype(str)
        unlabeled = None if unlabeled is None else str(unlabeled)
        if categories is None:
            if isinstance(column.dtype, pd.CategoricalDtype):
                observed = set(values)
                order = [str(c) for c in column.cat.categories if str(c) in observed]
            else:
                order = sorted(set(values))
            categories = [c for c in order if c != unlabeled]
        categories = pd.Index([str(c) for c in categories])
        codes = categories.get_indexer(values).astype(np.int64)
        unknown = (codes < 0) & (values.to_numpy() != unlabeled)
        if unknown.any():
            bad = sorted(set(values[unknown]))
            raise DataError(
                f"{what} key {key!r} has values not seen when the model was set up: {bad[:10]} "
                f"(known: {list(categories)[:20]})"
            )
        if len(categories) == 0:
            raise DataError(f"{what} key {key!r} has no categories besides {unlabeled!r}")
        return categories, codes

    def _continuous_covariates(self) -> np.ndarray | None:
        if not self.continuous_covariate_keys:
            return None
        cols = []
        for key in self.continuous_covariate_keys:
            col = pd.to_numeric(self._obs_column(key, "continuous covariate"), errors="coerce").to_numpy(
                dtype=np.float64
            )
            if not np.isfinite(col).all():
                raise DataError(f"continuous covariate {key!r} has NaN, inf or non-numeric values")
            cols.append(col)
        return np.stack(cols, axis=1).astype(np.float32)

    def _size_factors(self) -> np.ndarray | None:
        if self.size_factor_key is None:
            return None
        sf = pd.to_numeric(self._obs_column(self.size_factor_key, "size factor"), errors="coerce")
        sf = sf.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(sf) | (sf <= 0)
        if bad.any():
            raise DataError(
                f"size factor key {self.size_factor_key!r} has {int(bad.sum())} values that are "
                f"zero, negative, NaN or inf (first cells: {list(self.obs_names[bad][:5])})"
            )
        return sf.astype(np.float32)

    def _check_counts(self) -> np.ndarray:
        """Scan the counts once, by chunks of rows; return each cell's total count (and note the largest
        count). Cells without counts are an error, genes without counts a warning (see the class doc)."""
        where = "adata.X" if self.layer is None else f"adata.layers[{self.layer!r}]"
        if self.matrix.shape != (self.adata.n_obs, self.adata.n_vars):
            raise DataError(f"{where} has shape {self.matrix.shape}, expected {self.adata.shape}")
        library = np.empty(self.adata.n_obs, dtype=np.float64)
        gene_total = np.zeros(self.adata.n_vars, dtype=np.float64)
        self.max_count = 0.0
        for rows in _chunks(self.adata.n_obs):
            if self._reader is None:
                block = self.matrix[rows]
            else:
                block = self._reader.rows(np.arange(rows.start, rows.stop))
            values = block.data if sp.issparse(block) else np.asarray(block)
            if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
                raise DataError(f"{where} holds {values.dtype} values, expected numeric counts")
            if not np.isfinite(values).all():
                raise DataError(f"{where} has NaN or inf values; counts must be finite")
            if (values < 0).any():
                raise DataError(f"{where} has negative values; counts must be >= 0")
            if not self.allow_non_integer and np.issubdtype(values.dtype, np.floating):
                if (values != np.round(values)).any():
                    raise DataError(
                        f"{where} has non-integer values: expected raw counts, not normalised or "
                        "log-transformed data (pass layer=... for a counts layer, or "
                        "allow_non_integer=True for e.g. ambient-corrected counts)"
                    )
            library[rows] = np.asarray(block.sum(axis=1)).ravel()
            gene_total += np.asarray(block.sum(axis=0)).ravel()
            if values.size:
                self.max_count = max(self.max_count, float(values.max()))
        zero = library == 0
        if zero.any() and not self.allow_empty_cells:
            raise DataError(
                f"{int(zero.sum())} cells have zero total counts (first: {list(self.obs_names[zero][:5])}); "
                "remove them first, e.g. scanpy.pp.filter_cells(adata, min_counts=1)"
            )
        empty_genes = gene_total == 0
        if empty_genes.any() and not self.allow_empty_genes:
            warnings.warn(
                f"{where}: {int(empty_genes.sum())} genes have zero counts in every cell (first: "
                f"{list(self.var_names[empty_genes][:5])}); they carry no information: remove them first, "
                "e.g. scanpy.pp.filter_genes(adata, min_cells=1)",
                DataWarning,
                stacklevel=3,
            )
        return library

    # ---------------------------------------------------------------------------------------- queries
    @property
    def n_obs(self) -> int:
        """The number of cells."""
        return self.adata.n_obs

    @property
    def n_vars(self) -> int:
        """The number of genes."""
        return self.adata.n_vars

    @property
    def n_batch(self) -> int:
        """The number of batches (1 without ``batch_key``)."""
        return 1 if self.batch_categories is None else len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        """The number of cell-type labels (0 without ``labels_key``)."""
        return 0 if self.label_categories is None else len(self.label_categories)

    @property
    def n_cats_per_covariate(self) -> list[int]:
        """The number of categories of each categorical covariate, in the order of their keys."""
        return [len(c) for c in self.categorical_covariate_categories.values()]

    def _rows(self, idx: np.ndarray):
        """Rows ``idx`` in that order: CSR rows of a sparse (or backed sparse) matrix, else a dense array.
        A backed matrix is read at increasing, distinct positions (as h5py requires), then reordered."""
        if not self._backed:
            return self.matrix[idx]
        unique, inverse = np.unique(idx, return_inverse=True)
        rows = self._reader.rows(unique) if self._reader is not None else self.matrix[unique]
        rows = sp.csr_matrix(rows) if sp.issparse(rows) else np.asarray(rows)
        return rows if len(unique) == len(idx) and (unique == idx).all() else rows[inverse]

    def counts(self, idx: np.ndarray) -> np.ndarray:
        """Dense float32 counts of the cells ``idx`` (only these rows are densified)."""
        rows = self._rows(np.asarray(idx, dtype=np.int64))
        rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
        return rows.astype(np.float32, copy=False)

    def minibatch(self, idx: np.ndarray, *, device: torch.device | str = "cpu") -> Minibatch:
        """The :class:`Minibatch` of cells ``idx`` (positions in the registered AnnData), on ``device``
        (sparse counts are densified there)."""
        idx = np.asarray(idx, dtype=np.int64)
        device = torch.device(device)

        def tensor(array, dtype):
            return None if array is None else torch.as_tensor(array[idx], dtype=dtype, device=device)

        return Minibatch(
            idx_n=torch.as_tensor(idx, device=device),
            n_obs=self.n_obs,
            x_ng=_dense_tensor(self._rows(idx), device),
            batch_n=tensor(self.batch_codes_n, torch.long),
            y_n=tensor(self.label_codes_n, torch.long),
            size_factor_n=tensor(self.size_factor_n, torch.float32),
            cat_covs_nk=tensor(self.cat_covs_nk, torch.long),
            cont_covs_nk=tensor(self.cont_covs_nk, torch.float32),
        )

    def log_library_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and variance of log total counts (the scVI library-size prior)."""
        log_lib = np.log(self.library_n)
        codes = np.zeros(self.n_obs, dtype=np.int64) if self.batch_codes_n is None else self.batch_codes_n
        mean = np.zeros(self.n_batch, dtype=np.float32)
        var = np.ones(self.n_batch, dtype=np.float32)
        for b in range(self.n_batch):
            values = log_lib[codes == b]
            if values.size:
                mean[b] = values.mean()
                var[b] = values.var() if values.size > 1 else 1.0
        return mean, var

    # ------------------------------------------------------------------------ saving and new data
    def registry(self) -> dict:
        """What a trained model needs to read new data the same way (plain types, for ``save``)."""

        def as_list(index):
            return None if index is None else [str(v) for v in index]

        return {
            "layer": self.layer,
            "batch_key": self.batch_key,
            "labels_key": self.labels_key,
            "unlabeled_category": self.unlabeled_category,
            "size_factor_key": self.size_factor_key,
            "categorical_covariate_keys": self.categorical_covariate_keys,
            "continuous_covariate_keys": self.continuous_covariate_keys,
            "allow_non_integer": self.allow_non_integer,
            "allow_empty_cells": self.allow_empty_cells,
            "batch_categories": as_list(self.batch_categories),
            "label_categories": as_list(self.label_categories),
            "categorical_covariate_categories": {
                k: as_list(v) for k, v in self.categorical_covariate_categories.items()
            },
            "var_names": as_list(self.var_names),
        }

    @classmethod
    def from_registry(cls, adata: AnnData, registry: dict, *, require_labels: bool = False) -> "AnnDataSetup":
        """Register new data exactly as the data a model was trained on.

        The genes must be the same, in the same order; batches and covariate categories must be among
        the known ones. Labels are read only when ``adata`` has the labels column (or ``require_labels``).
        Genes without counts in these cells are expected (few cells), not warned about.
        """
        var_names = pd.Index(registry["var_names"])
        new_var = pd.Index(adata.var_names.astype(str))
        if not new_var.equals(var_names):
            missing = var_names.difference(new_var)
            extra = new_var.difference(var_names)
            if len(missing) == 0 and len(extra) == 0:
                detail = "the same genes in a different order; reorder with adata[:, model_genes]"
            else:
                parts = []
                if len(missing):
                    parts.append(f"{len(missing)} model genes missing (e.g. {list(missing[:5])})")
                if len(extra):
                    parts.append(f"{len(extra)} genes the model does not know (e.g. {list(extra[:5])})")
                detail = ", ".join(parts)
            raise DataError(f"the genes of this AnnData do not match the model's: {detail}")
        labels_key = registry["labels_key"]
        if labels_key is not None and labels_key not in adata.obs.columns and not require_labels:
            labels_key = None
        return cls(
            adata,
            layer=registry["layer"],
            batch_key=registry["batch_key"],
            labels_key=labels_key,
            unlabeled_category=registry["unlabeled_category"],
            size_factor_key=registry["size_factor_key"],
            categorical_covariate_keys=registry["categorical_covariate_keys"],
            continuous_covariate_keys=registry["continuous_covariate_keys"],
            allow_non_integer=registry["allow_non_integer"],
            allow_empty_cells=registry.get("allow_empty_cells", False),
            allow_empty_genes=True,
            batch_categories=registry["batch_categories"],
            label_categories=registry["label_categories"] if labels_key is not None else None,
            categorical_covariate_categories=registry["categorical_covariate_categories"],
        )

    def __repr__(self) -> str:
        kind = "backed" if self._backed else ("sparse" if sp.issparse(self.matrix) else "dense")
        return (
            f"AnnDataSetup({self.n_obs} cells x {self.n_vars} genes, {kind}, layer={self.layer!r}, "
            f"batch_key={self.batch_key!r} ({self.n_batch}), labels_key={self.labels_key!r} ({self.n_labels}))"
        )


def split_indices(
    n_obs: int, *, train_size: float = 0.9, validation_size: float | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``range(n_obs)`` with ``seed`` and split it into train and validation indices: ``ceil(train_size
    * n_obs)`` training cells and ``round(validation_size * n_obs)`` of the rest (default: all the rest) for
    validation; cells in neither are left out."""
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}")
    validation_size = 1 - train_size if validation_size is None else validation_size
    if validation_size < 0 or train_size + validation_size > 1 + 1e-9:
        raise ValueError(f"train_size + validation_size must be <= 1, got {train_size} + {validation_size}")
    perm = np.random.default_rng(seed).permutation(n_obs)
    n_train = min(int(np.ceil(train_size * n_obs)), n_obs)
    n_val = min(int(round(validation_size * n_obs)), n_obs - n_train)
    return np.sort(perm[:n_train]), np.sort(perm[n_train : n_train + n_val])


def iterate_minibatches(
    indices: np.ndarray, batch_size: int, *, shuffle: bool = True, rng: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """Index minibatches over ``indices``. A last batch of one cell is merged into the one before
    (batch normalisation needs two cells)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = np.asarray(indices, dtype=np.int64)
    if shuffle:
        indices = (rng or np.random.default_rng()).permutation(indices)
    starts = list(range(0, len(indices), batch_size))
    if len(starts) > 1 and len(indices) - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else len(indices)
        yield indices[start:stop]


def load_minibatches(
    data: AnnDataSetup,
    batches: Sequence[np.ndarray],
    *,
    device: torch.device | str = "cpu",
    prefetch: int = 0,
) -> Iterator[Minibatch]:
    """The :class:`Minibatch` of each index array of ``batches``, in order.

    With ``prefetch > 0`` a background thread reads (and moves to ``device``) up to ``prefetch``
    minibatches ahead while the caller trains on the current one, so training from disk need not wait
    on I/O. The minibatches are the same either way. An error in the thread is raised here; closing
    the iterator (e.g. ``contextlib.closing``, or leaving a loop over it) stops the thread.
    """
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    if prefetch == 0:
        for idx in batches:
            yield data.minibatch(idx, device=device)
        return
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for idx in batches:
                if not put((data.minibatch(idx, device=device), None)):
                    return
            put((None, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((None, error))

    worker = threading.Thread(target=produce, name="pyro_sc-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            mb, error = ready.get()
            if error is not None:
                raise error
            if mb is None:
                return
            yield mb
    finally:
        stop.set()
        worker.join()

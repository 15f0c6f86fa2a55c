"""Property-based tests of the data layer over random shapes, sparsity (dense / CSR / CSC) and dtypes."""

import re
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyro_sc.data import AnnDataSetup, DataError, DataWarning, iterate_minibatches, split_indices

SETTINGS = settings(max_examples=40, deadline=None)
DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint16]
FORMATS = ["dense", "csr", "csc"]


@st.composite
def count_matrices(draw, min_cells: int = 1):
    """Counts of a random shape and dtype, with a drawn share of the entries set to zero, and a format."""
    n_cells = draw(st.integers(min_cells, 30))
    n_genes = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(hnp.arrays(dtype, (n_cells, n_genes), elements=st.integers(0, 5000)))
    zero_share = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    keep = draw(hnp.arrays(np.float64, x.shape, elements=st.floats(0, 1))) >= zero_share
    return (x * keep).astype(dtype), draw(st.sampled_from(FORMATS))


def as_adata(x: np.ndarray, fmt: str) -> anndata.AnnData:
    matrix = {"dense": x, "csr": sp.csr_matrix(x), "csc": sp.csc_matrix(x)}[fmt]
    return anndata.AnnData(
        matrix,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])]),
    )


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


@SETTINGS
@given(data=count_matrices(), draw=st.data())
def test_minibatch_rows_equal_the_source_rows(data, draw):
    x, fmt = data
    adata = as_adata(x, fmt)
    setup = AnnDataSetup(adata, allow_empty_cells=True, allow_empty_genes=True)
    idx = np.array(draw.draw(st.lists(st.integers(0, x.shape[0] - 1), min_size=1, max_size=40)))
    mb = setup.minibatch(idx)
    assert mb.x_ng.dtype.is_floating_point and mb.x_ng.shape == (len(idx), x.shape[1])
    np.testing.assert_array_equal(mb.x_ng.numpy(), x[idx].astype(np.float32))
    assert mb.idx_n.tolist() == idx.tolist() and mb.n_obs == x.shape[0] and len(mb) == len(idx)
    np.testing.assert_allclose(setup.library_n, x.sum(1, dtype=np.float64))
    assert setup.max_count == x.max()
    # the user's matrix keeps its format and values
    assert (fmt == "dense") != sp.issparse(adata.X) and (not sp.issparse(adata.X) or adata.X.format == fmt)
    np.testing.assert_array_equal(dense(adata.X), x)


@SETTINGS
@given(data=count_matrices())
def test_cells_without_counts_are_an_error_and_genes_without_counts_a_warning(data):
    x, fmt = data
    empty_cells, empty_genes = (x.sum(1) == 0).sum(), (x.sum(0) == 0).sum()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if empty_cells:
            with pytest.raises(DataError, match=f"^{empty_cells} cells have zero total counts"):
                AnnDataSetup(as_adata(x, fmt))
        else:
            AnnDataSetup(as_adata(x, fmt))
    warned = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(warned) == (1 if empty_genes and not empty_cells else 0)
    if warned:
        assert f"{empty_genes} genes have zero counts in every cell" in str(warned[0].message)


@SETTINGS
@given(
    data=count_matrices(),
    bad=st.sampled_from([(-1.0, "negative values"), (np.nan, "NaN or inf"), (-np.inf, "NaN or inf"),
                         (np.inf, "NaN or inf"), (0.5, "non-integer values")]),
    where=st.tuples(st.integers(0, 10 ** 6), st.integers(0, 10 ** 6)),
)
def test_a_bad_value_anywhere_is_caught(data, bad, where):
    x, fmt = data
    value, message = bad
    x = x.astype(np.float64)
    x[:, 0] += 1  # no empty cells: the bad value alone must be what is reported
    x[where[0] % x.shape[0], where[1] % x.shape[1]] = value
    with pytest.raises(DataError, match=message):
        AnnDataSetup(as_adata(x, fmt), allow_empty_genes=True)
    if message == "non-integer values":
        setup = AnnDataSetup(as_adata(x, fmt), allow_non_integer=True, allow_empty_genes=True)
        np.testing.assert_array_equal(setup.counts(np.arange(x.shape[0])), x.astype(np.float32))


@SETTINGS
@given(data=count_matrices(min_cells=1))
def test_negative_integers_are_caught_in_every_signed_dtype(data):
    x, fmt = data
    if not np.issubdtype(x.dtype, np.signedinteger):
        x = x.astype(np.int32)
    x = x.copy()
    x[:, 0] += 1
    x[-1, -1] = -3
    with pytest.raises(DataError, match="negative values"):
        AnnDataSetup(as_adata(x, fmt), allow_empty_genes=True)


LABELS = st.sampled_from(["a", "b", "C", "10", "2", "Unknown"])


@SETTINGS
@given(
    values=st.lists(LABELS, min_size=1, max_size=30),
    categorical=st.booleans(),
    draw=st.data(),
)
def test_label_codes_round_trip_and_new_data_is_coded_the_same_way(values, categorical, draw):
    n = len(values)
    x = np.ones((n, 2), dtype=np.float32)
    labels = pd.Categorical(values) if categorical else values
    obs = pd.DataFrame({"label": labels}, index=[f"c{i}" for i in range(n)])
    adata = anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=["g0", "g1"]))
    labelled = [v for v in values if v != "Unknown"]
    if not labelled:
        with pytest.raises(DataError, match="has no categories besides 'Unknown'"):
            AnnDataSetup(adata, labels_key="label", unlabeled_category="Unknown")
        return
    setup = AnnDataSetup(adata, labels_key="label", unlabeled_category="Unknown")
    codes = setup.label_codes_n
    assert set(setup.label_categories) == set(labelled) and "Unknown" not in setup.label_categories
    assert all((c == -1) == (v == "Unknown") for c, v in zip(codes, values))
    assert [setup.label_categories[c] for c in codes if c >= 0] == labelled
    # any subset of the cells, in any order, registered from the registry: the same code per value
    order = np.array(draw.draw(st.permutations(range(n))))[: draw.draw(st.integers(1, n))]
    again = AnnDataSetup.from_registry(adata[order].copy(), setup.registry(), require_labels=True)
    assert list(again.label_categories) == list(setup.label_categories)
    np.testing.assert_array_equal(again.label_codes_n, codes[order])


@SETTINGS
@given(batches=st.lists(st.integers(0, 4), min_size=2, max_size=30), draw=st.data())
def test_numeric_batch_codes_round_trip_and_unknown_batches_are_named(batches, draw):
    n = len(batches)
    obs = pd.DataFrame({"batch": batches}, index=[f"c{i}" for i in range(n)])
    adata = anndata.AnnData(np.ones((n, 1), dtype=np.float32), obs=obs, var=pd.DataFrame(index=["g0"]))
    setup = AnnDataSetup(adata, batch_key="batch")
    assert [setup.batch_categories[c] for c in setup.batch_codes_n] == [str(b) for b in batches]
    new = adata.copy()
    new.obs["batch"] = draw.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    unseen = sorted({str(b) for b in new.obs["batch"]} - {str(b) for b in batches})
    if unseen:
        with pytest.raises(DataError, match=re.escape(f"values not seen when the model was set up: {unseen}")):
            AnnDataSetup.from_registry(new, setup.registry())
    else:
        again = AnnDataSetup.from_registry(new, setup.registry())
        assert [again.batch_categories[c] for c in again.batch_codes_n] == [str(b) for b in new.obs["batch"]]


@SETTINGS
@given(n=st.integers(0, 300), batch_size=st.integers(1, 64), seed=st.integers(0, 2 ** 32 - 1))
def test_minibatches_partition_the_cells(n, batch_size, seed):
    indices = np.random.default_rng(seed).choice(10 * n + 1, size=n, replace=False)
    batches = list(iterate_minibatches(indices, batch_size, rng=np.random.default_rng(seed)))
    flat = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    assert sorted(flat.tolist()) == sorted(indices.tolist())
    assert all(len(b) == batch_size for b in batches[:-1]) and all(len(b) <= batch_size + 1 for b in batches)
    assert n < 2 or len(batches[-1]) >= 2  # a last batch of one cell is merged (batch norm needs two)
    again = list(iterate_minibatches(indices, batch_size, rng=np.random.default_rng(seed)))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


@SETTINGS
@given(n=st.integers(1, 500), train_size=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_split_is_disjoint_sorted_and_sized(n, train_size, seed):
    train, val = split_indices(n, train_size=train_size, seed=seed)
    assert not set(train) & set(val) and len(train) + len(val) <= n
    assert list(train) == sorted(train) and list(val) == sorted(val)
    assert len(train) == min(n, int(np.ceil(train_size * n))) and len(train) >= 1

"""The data layer: encodings, minibatches over dense / sparse / backed matrices, and every bad input."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_sc.data import AnnDataSetup, DataError, iterate_minibatches, split_indices


def make_adata(n_cells=40, n_genes=12, seed=0, fmt="csr"):
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    matrix = {"dense": x, "csr": sp.csr_matrix(x), "csc": sp.csc_matrix(x)}[fmt]
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["b1", "b2"], n_cells)),
            "cell_type": rng.choice(["T", "B", "NK", "Unknown"], n_cells),
            "donor": rng.choice(["d1", "d2", "d3"], n_cells),
            "pct_mito": rng.random(n_cells),
            "sf": rng.uniform(0.5, 2.0, n_cells),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    return anndata.AnnData(matrix, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_minibatch_matches_the_matrix_in_every_format(fmt):
    adata = make_adata(fmt=fmt)
    dense = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    setup = AnnDataSetup(adata, batch_key="batch", labels_key="cell_type", unlabeled_category="Unknown")
    idx = np.array([5, 0, 17, 3])
    mb = setup.minibatch(idx)
    np.testing.assert_array_equal(mb.x_ng.numpy(), dense[idx])
    assert mb.n_obs == 40 and mb.idx_n.tolist() == idx.tolist()
    assert mb.x_ng.dtype == torch.float32
    # categories keep their mapping; unlabelled cells are -1
    batches = setup.batch_categories[mb.batch_n.numpy()]
    assert list(batches) == list(adata.obs["batch"].iloc[idx].astype(str))
    labels = adata.obs["cell_type"].iloc[idx].to_numpy()
    codes = mb.y_n.numpy()
    assert all((c == -1) == (lab == "Unknown") for c, lab in zip(codes, labels))
    assert all(setup.label_categories[c] == lab for c, lab in zip(codes, labels) if c >= 0)
    assert "Unknown" not in setup.label_categories


def test_backed_matrix_gives_the_same_minibatches(tmp_path):
    adata = make_adata(n_cells=60)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    setup_mem = AnnDataSetup(adata, batch_key="batch")
    setup_disk = AnnDataSetup(backed, batch_key="batch")
    idx = np.array([50, 2, 33, 7, 8])  # unsorted: the backed reader must restore the order
    np.testing.assert_array_equal(setup_disk.minibatch(idx).x_ng, setup_mem.minibatch(idx).x_ng)
    np.testing.assert_allclose(setup_disk.library_n, setup_mem.library_n)
    backed.file.close()


def test_covariates_and_size_factors():
    adata = make_adata()
    setup = AnnDataSetup(
        adata, categorical_covariate_keys=["donor"], continuous_covariate_keys=["pct_mito"], size_factor_key="sf"
    )
    mb = setup.minibatch(np.arange(10))
    assert mb.cat_covs_nk.shape == (10, 1) and mb.cont_covs_nk.shape == (10, 1)
    np.testing.assert_allclose(mb.cont_covs_nk[:, 0].numpy(), adata.obs["pct_mito"].to_numpy()[:10], rtol=1e-6)
    np.testing.assert_allclose(mb.size_factor_n.numpy(), adata.obs["sf"].to_numpy()[:10], rtol=1e-6)
    assert list(setup.categorical_covariate_categories["donor"]) == ["d1", "d2", "d3"]


def test_single_category_batch_is_fine():
    adata = make_adata()
    adata.obs["batch"] = "only"
    setup = AnnDataSetup(adata, batch_key="batch")
    assert setup.n_batch == 1


def test_user_adata_is_not_modified():
    adata = make_adata(fmt="csc")
    before_x = adata.X.copy()
    before_obs = adata.obs.copy()
    AnnDataSetup(adata, batch_key="batch", labels_key="cell_type", size_factor_key="sf")
    assert adata.X.format == "csc" and (adata.X != before_x).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    assert not adata.uns and not adata.obsm


# ------------------------------------------------------------------------------------- bad inputs
def with_value(value, fmt="csr"):
    adata = make_adata(fmt="dense")
    adata.X[3, 4] = value
    if fmt == "csr":
        adata.X = sp.csr_matrix(adata.X)
    return adata


@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize(
    "value, message",
    [(-1.0, "negative"), (np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (2.5, "non-integer")],
)
def test_bad_counts_are_named(fmt, value, message):
    with pytest.raises(DataError, match=message):
        AnnDataSetup(with_value(value, fmt))


def test_non_integer_counts_with_explicit_opt_in():
    setup = AnnDataSetup(with_value(2.5), allow_non_integer=True)
    assert setup.minibatch(np.array([3])).x_ng[0, 4] == pytest.approx(2.5 + 0)


def test_cells_with_zero_counts_are_counted():
    adata = make_adata(fmt="dense")
    adata.X[[2, 9, 11]] = 0
    with pytest.raises(DataError, match=r"3 cells have zero total counts .*'c2', 'c9', 'c11'"):
        AnnDataSetup(adata)


def test_missing_layer_and_keys_are_named():
    adata = make_adata()
    with pytest.raises(DataError, match=r"layer 'counts' not found .*available: none"):
        AnnDataSetup(adata, layer="counts")
    with pytest.raises(DataError, match=r"batch key 'sample' not found in adata.obs"):
        AnnDataSetup(adata, batch_key="sample")
    with pytest.raises(DataError, match=r"label key 'celltype' not found"):
        AnnDataSetup(adata, labels_key="celltype")
    with pytest.raises(DataError, match=r"size factor key 'size' not found"):
        AnnDataSetup(adata, size_factor_key="size")
    with pytest.raises(DataError, match=r"continuous covariate key 'mt' not found"):
        AnnDataSetup(adata, continuous_covariate_keys=["mt"])


def test_counts_layer_is_used():
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.multiply(0.5).tocsr()  # "normalised" X must not be read
    setup = AnnDataSetup(adata, layer="counts")
    np.testing.assert_array_equal(setup.minibatch(np.arange(3)).x_ng, adata.layers["counts"][:3].toarray())


def test_bad_size_factors_are_named():
    adata = make_adata()
    adata.obs.loc["c4", "sf"] = 0.0
    adata.obs.loc["c6", "sf"] = np.nan
    with pytest.raises(DataError, match=r"size factor key 'sf' has 2 values .*'c4', 'c6'"):
        AnnDataSetup(adata, size_factor_key="sf")


def test_empty_adata_and_wrong_type():
    with pytest.raises(DataError, match="empty"):
        AnnDataSetup(anndata.AnnData(np.zeros((0, 5), dtype=np.float32)))
    with pytest.raises(DataError, match="expected an AnnData"):
        AnnDataSetup(np.ones((3, 3)))


def test_missing_category_values_are_named():
    adata = make_adata()
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.loc["c1", "batch"] = None
    with pytest.raises(DataError, match=r"batch key 'batch' has 1 missing values"):
        AnnDataSetup(adata, batch_key="batch")


def test_new_data_registered_like_the_training_data():
    adata = make_adata()
    setup = AnnDataSetup(adata, batch_key="batch")
    query = make_adata(seed=1)
    query.obs["batch"] = pd.Categorical(["b2"] * query.n_obs)  # a subset of known batches, new order
    again = AnnDataSetup.from_registry(query, setup.registry())
    assert list(again.batch_categories) == list(setup.batch_categories)
    assert (again.batch_codes_n == list(setup.batch_categories).index("b2")).all()

    query.obs["batch"] = pd.Categorical(["b3"] * query.n_obs)
    with pytest.raises(DataError, match=r"values not seen .*\['b3'\]"):
        AnnDataSetup.from_registry(query, setup.registry())

    with pytest.raises(DataError, match="genes of this AnnData do not match.*different order"):
        AnnDataSetup.from_registry(adata[:, ::-1].copy(), setup.registry())
    with pytest.raises(DataError, match="2 model genes missing"):
        AnnDataSetup.from_registry(adata[:, 2:].copy(), setup.registry())


def test_split_and_minibatches_are_seeded_and_complete():
    train, val = split_indices(100, train_size=0.9, seed=3)
    assert len(train) == 90 and len(val) == 10 and not set(train) & set(val)
    train2, _ = split_indices(100, train_size=0.9, seed=3)
    np.testing.assert_array_equal(train, train2)
    batches = list(iterate_minibatches(np.arange(65), 16, rng=np.random.default_rng(0)))
    assert sorted(np.concatenate(batches).tolist()) == list(range(65))
    assert min(len(b) for b in batches) >= 2  # a last batch of one cell is merged
    again = list(iterate_minibatches(np.arange(65), 16, rng=np.random.default_rng(0)))
    assert all((a == b).all() for a, b in zip(batches, again))

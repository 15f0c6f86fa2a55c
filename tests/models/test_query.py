"""Query mapping (scArches, scvi-tools' load_query_data): new batches on a trained reference model."""

import re

import numpy as np
import pytest
import torch

import pyro_sc
from pyro_sc import datasets
from pyro_sc.data import DataError

SMALL = dict(n_latent=3, n_hidden=16)


@pytest.fixture(scope="module")
def split():
    adata = datasets.simulate_scvi(900, 40, n_types=3, n_batches=3, batch_effect=0.7, seed=0)
    adata.obs["labels"] = adata.obs["cell_type"].astype(str)
    reference = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] == "batch_2"].copy()
    del query.obs["labels"]  # the query's types are unknown
    return reference, query


@pytest.fixture(scope="module")
def references(split):
    reference, _ = split
    scvi = pyro_sc.SCVI(reference, batch_key="batch", dispersion="gene-batch", encode_covariates=True, **SMALL)
    scvi.train(max_epochs=40, seed=0, progress_bar=False)
    scanvi = pyro_sc.SCANVI.from_scvi_model(scvi, "Unknown", labels_key="labels")
    scanvi.train(max_epochs=20, seed=0, progress_bar=False)
    return scvi, scanvi


def test_only_the_new_batches_train_and_the_reference_is_unchanged(split, references):
    reference, query = split
    scvi, _ = references
    mapped = pyro_sc.SCVI.load_query_data(query, scvi)
    assert list(mapped.setup.batch_categories) == ["batch_0", "batch_1", "batch_2"]
    grown = mapped._query["grown"]
    # the batch enters the decoder, both encoders (encode_covariates) and the dispersions (gene-batch)
    assert grown["decoder.layers.0.cat_weights.0"] == 0 and grown["z_encoder.body.layers.0.cat_weights.0"] == 0
    assert grown["log_theta_gb"] == 1
    before = {k: v.clone() for k, v in mapped.module.state_dict().items()}
    reference_state = scvi.module.state_dict()
    mapped.train(max_epochs=5, seed=0, progress_bar=False)
    after = mapped.module.state_dict()
    for name, value in after.items():
        if name in grown:
            dim = grown[name]
            assert torch.equal(value.narrow(dim, 0, 2), reference_state[name])  # the reference's entries, as they were
            assert not torch.equal(value.narrow(dim, 2, 1), before[name].narrow(dim, 2, 1))  # the new batch's train
        elif name.startswith("decoder.post"):  # the decoder's batch-norm statistics follow the query (scvi-tools)
            continue
        elif name in reference_state and reference_state[name].shape == value.shape:
            assert torch.equal(value, reference_state[name]), name
    # the library-size prior of the new batch is the query's
    log_lib = np.log(np.asarray(query.X.sum(1)).ravel())
    np.testing.assert_allclose(after["library_log_mean_b"][2].item(), log_lib.mean(), rtol=1e-5)
    # reference cells get the reference's latent (the encoders did not move)
    np.testing.assert_array_equal(mapped.get_latent_representation(reference), scvi.get_latent_representation())


def test_scanvi_transfers_the_reference_labels_to_the_query(split, references, tmp_path):
    _, query = split
    _, scanvi = references
    mapped = pyro_sc.SCANVI.load_query_data(query, scanvi)
    assert "labels" not in query.obs  # the user's query is left as it was
    mapped.train(max_epochs=20, seed=0, progress_bar=False)
    accuracy = (mapped.predict() == query.obs["cell_type"].astype(str).to_numpy()).mean()
    assert accuracy > 0.9, accuracy
    # saved and loaded, a query model still holds the reference fixed when trained further
    mapped.save(tmp_path / "q.pt")
    loaded = pyro_sc.SCANVI.load(tmp_path / "q.pt", mapped.adata)
    assert loaded._query == mapped._query
    fixed = {k: v.clone() for k, v in loaded.module.state_dict().items() if k.startswith("z_encoder.body.layers")}
    loaded.train(max_epochs=2, seed=1, progress_bar=False)
    name = "z_encoder.body.layers.0.linear.weight"
    assert torch.equal(loaded.module.state_dict()[name], fixed[name])


def test_unfrozen_trains_the_encoder_too(split, references):
    _, query = split
    scvi, _ = references
    mapped = pyro_sc.SCVI.load_query_data(query, scvi, unfrozen=True)
    name = "z_encoder.body.layers.0.linear.weight"
    start = mapped.module.state_dict()[name].clone()
    mapped.train(max_epochs=2, seed=0, progress_bar=False)
    assert not torch.equal(mapped.module.state_dict()[name], start)


def test_one_reference_batch_gets_batch_weights_in_the_query(split):
    reference, query = split
    one = reference[reference.obs["batch"] == "batch_0"].copy()
    scvi = pyro_sc.SCVI(one, batch_key="batch", **SMALL)  # one batch: no batch weights at all
    scvi.train(max_epochs=2, seed=0, progress_bar=False)
    assert not any("cat_weights" in k for k in scvi.module.state_dict())
    mapped = pyro_sc.SCVI.load_query_data(query, scvi)
    weights = mapped.module.state_dict()["decoder.layers.0.cat_weights.0"]
    assert weights.shape == (2, 16) and (weights == 0).all()  # the reference's row is 0: its function is unchanged
    mapped.train(max_epochs=1, seed=0, progress_bar=False)
    assert (mapped.module.state_dict()["decoder.layers.0.cat_weights.0"][0] == 0).all()
    np.testing.assert_array_equal(mapped.get_latent_representation(one), scvi.get_latent_representation())


def test_bad_queries_are_named(split, references):
    reference, query = split
    scvi, _ = references
    with pytest.raises(DataError, match=re.escape("the query's genes do not match the reference model's: "
                                                  "2 reference genes missing (e.g. ['gene_0', 'gene_1'])")):
        pyro_sc.SCVI.load_query_data(query[:, 2:].copy(), scvi)
    reordered = query[:, ::-1].copy()
    mapped = pyro_sc.SCVI.load_query_data(reordered, scvi)  # the same genes in another order: reordered
    assert list(mapped.adata.var_names) == list(reference.var_names) and reordered.var_names[0] == "gene_39"
    reused = query.copy()
    reused.obs["batch"] = "batch_1"
    with pytest.raises(DataError, match=re.escape("the query reuses batch names of the reference: ['batch_1']")):
        pyro_sc.SCVI.load_query_data(reused, scvi)
    no_batch = pyro_sc.SCVI(reference, **SMALL)
    no_batch.train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="the reference model was set up without batch_key"):
        pyro_sc.SCVI.load_query_data(query, no_batch)
    with pytest.raises(TypeError, match="load_query_data needs a trained pyro_sc.SCVI as the reference, got str"):
        pyro_sc.SCVI.load_query_data(query, "model.pt")
    with pytest.raises(RuntimeError, match="not trained yet"):
        pyro_sc.SCVI.load_query_data(query, pyro_sc.SCVI(reference, batch_key="batch", **SMALL))
    unknown_donor = query.copy()
    del unknown_donor.obs["batch"]
    with pytest.raises(DataError, match="the query has no obs column 'batch', the reference's batch key"):
        pyro_sc.SCVI.load_query_data(unknown_donor, scvi)

"""scVI: structure recovered from its own generative model, queries, save / load, isolation, real data."""

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_sc
from pyro_sc import datasets, metrics
from pyro_sc.data import DataError


@pytest.fixture(scope="module")
def simulated():
    return datasets.simulate_scvi(1200, 300, n_latent=4, n_types=4, n_batches=2, seed=0)


@pytest.fixture(scope="module")
def trained(simulated):
    model = pyro_sc.SCVI(simulated, batch_key="batch", n_latent=5)
    model.train(max_epochs=25, progress_bar=False, seed=0)
    return model


def test_latent_recovers_the_simulated_cell_types(trained, simulated):
    latent_nk = trained.get_latent_representation()
    assert latent_nk.shape == (simulated.n_obs, 5) and np.isfinite(latent_nk).all()
    types_n = simulated.obs["cell_type"].to_numpy()
    # each cell's 15 nearest neighbours in the latent space share its simulated type
    from sklearn.neighbors import NearestNeighbors

    _, neighbours = NearestNeighbors(n_neighbors=16).fit(latent_nk).kneighbors(latent_nk)
    votes = pd.DataFrame(types_n[neighbours[:, 1:]]).mode(axis=1)[0].to_numpy()
    assert (votes == types_n).mean() > 0.95
    assert metrics.clustering_scores(latent_nk, types_n, resolution=0.1)["ari"] > 0.85
    history = trained.history
    assert len(history) == 25
    assert history["validation_loss"].iloc[-1] < history["validation_loss"].iloc[0]


def test_normalized_expression_is_a_composition_and_tracks_the_truth(trained, simulated):
    rho = trained.get_normalized_expression(library_size=1e4)
    assert isinstance(rho, pd.DataFrame) and rho.index.equals(simulated.obs_names)
    np.testing.assert_allclose(rho.sum(1), 1e4, rtol=1e-4)
    # denoised expression correlates with the observed normalised counts gene by gene on average
    x = simulated.X.toarray()
    observed = x / x.sum(1, keepdims=True) * 1e4
    corr = np.corrcoef(np.log1p(rho.to_numpy()).mean(0), np.log1p(observed).mean(0))[0, 1]
    assert corr > 0.95
    subset = trained.get_normalized_expression(gene_list=["gene_3", "gene_1"], transform_batch="batch_1")
    assert list(subset.columns) == ["gene_3", "gene_1"]
    samples = trained.get_normalized_expression(n_samples=3, return_mean=False)
    assert samples.shape == (3, simulated.n_obs, simulated.n_vars)
    with pytest.raises(KeyError, match="unknown batch"):
        trained.get_normalized_expression(transform_batch="batch_9")
    with pytest.raises(KeyError, match="genes not in the model"):
        trained.get_normalized_expression(gene_list=["nope"])


def test_save_load_round_trip_gives_identical_latents(trained, simulated, tmp_path):
    path = tmp_path / "scvi.pt"
    trained.save(path)
    loaded = pyro_sc.SCVI.load(path, simulated)
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())
    pd.testing.assert_frame_equal(loaded.history, trained.history)
    with pytest.raises(FileExistsError):
        trained.save(path)
    with pytest.raises(DataError, match="genes of this AnnData do not match"):
        pyro_sc.SCVI.load(path, simulated[:, :100].copy())


def test_two_models_in_one_process_do_not_share_parameters(trained, simulated):
    before = {k: v.clone() for k, v in trained.module.state_dict().items()}
    other = pyro_sc.SCVI(simulated, batch_key="batch", n_latent=5)
    other.train(max_epochs=2, progress_bar=False, seed=1)
    after = trained.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(other.module.log_theta_gb, trained.module.log_theta_gb)


def test_queries_on_new_data_and_untrained_model(trained, simulated):
    query = simulated[:50].copy()
    np.testing.assert_allclose(
        trained.get_latent_representation(query), trained.get_latent_representation()[:50], rtol=1e-5, atol=1e-6
    )
    query.obs["batch"] = pd.Categorical(["batch_7"] * 50)
    with pytest.raises(DataError, match="values not seen"):
        trained.get_latent_representation(query)
    with pytest.raises(RuntimeError, match="not trained"):
        pyro_sc.SCVI(simulated).get_latent_representation()


def test_a_callback_can_score_the_latent_during_the_first_training(simulated):
    truth_n = simulated.obs["cell_type"].astype(str).to_numpy()
    model = pyro_sc.SCVI(simulated, batch_key="batch", n_latent=5)

    def nearest_centroid_accuracy(record):  # how well the types separate in the latent, per epoch
        latent_nk = model.get_latent_representation()
        types = np.unique(truth_n)
        centroids_tk = np.stack([latent_nk[truth_n == t].mean(0) for t in types])
        nearest_n = types[((latent_nk[:, None, :] - centroids_tk) ** 2).sum(-1).argmin(1)]
        record["accuracy"] = metrics.accuracy(truth_n, nearest_n)

    history = model.train(max_epochs=6, callbacks=[nearest_centroid_accuracy], progress_bar=False, seed=0)
    assert history["accuracy"].notna().all() and history["accuracy"].iloc[-1] > 0.9
    with pytest.raises(RuntimeError, match="not trained"):  # the queries are open during training only
        pyro_sc.SCVI(simulated).get_latent_representation()


@pytest.mark.parametrize(
    "options", [{"likelihood": "nb"}, {"dispersion": "gene-batch"}, {"latent_library": True, "encode_covariates": True}]
)
def test_variants_train_to_finite_losses(simulated, options):
    model = pyro_sc.SCVI(simulated[:300].copy(), batch_key="batch", **options)
    history = model.train(max_epochs=3, progress_bar=False)
    assert np.isfinite(history["train_loss"]).all()
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]


def test_bad_options_are_named(simulated):
    with pytest.raises(ValueError, match="likelihood must be"):
        pyro_sc.SCVI(simulated, likelihood="poisson")
    with pytest.raises(ValueError, match="dispersion must be"):
        pyro_sc.SCVI(simulated, dispersion="cell")


@pytest.mark.slow
@pytest.mark.real_data
def test_ifnb_latent_separates_cell_types_and_mixes_conditions(real_data):
    """Real data: 2,800 PBMCs, 13 curated types, CTRL / STIM. A short run (60 epochs, KL warm-up over
    20) must already separate the types (Leiden ARI > 0.45 at resolution 1) and mix the conditions
    (median iLISI > 1.5 of at most 2)."""
    real_data("ifnb_2800")
    adata = datasets.load_ifnb(n_top_genes=2000)
    model = pyro_sc.SCVI(adata, batch_key="condition")
    model.train(max_epochs=60, n_epochs_kl_warmup=20, progress_bar=False, seed=0)  # KL fully on by epoch 20
    latent_nk = model.get_latent_representation()
    labels_n = adata.obs["cell_type"].astype(str).to_numpy()
    ari = metrics.clustering_scores(latent_nk, labels_n, resolution=1.0)["ari"]
    ilisi = np.median(metrics.ilisi(latent_nk, adata.obs["condition"].astype(str).to_numpy()))
    assert ari > 0.45, ari
    assert ilisi > 1.5, ilisi

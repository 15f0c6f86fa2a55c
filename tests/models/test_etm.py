"""ETM / scETM: the exact likelihood, planted topics recovered, the ARI monitor, queries, bad input, and
the biology of mouse pancreas (the beta-cell topic ranks Ins1 / Ins2 first)."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData
from scipy.optimize import linear_sum_assignment
from scipy.stats import multinomial

import pyro_sc
from pyro_sc import datasets, metrics
from pyro_sc.data import DataError
from pyro_sc.models.etm import multinomial_log_prob


def simulate_etm(n_cells=600, n_genes=200, n_topics=4, *, n_batches=1, seed=0):
    """Counts from ETM's generative process with planted topics (each topic: 40 genes of its own)."""
    rng = np.random.default_rng(seed)
    logits_kg = rng.normal(0, 0.5, (n_topics, n_genes))
    for k in range(n_topics):
        logits_kg[k, k * 40 : (k + 1) * 40] += 3.0
    beta_kg = np.exp(logits_kg) / np.exp(logits_kg).sum(1, keepdims=True)
    delta_nk = rng.normal(0, 2.0, (n_cells, n_topics))
    theta_nk = np.exp(delta_nk) / np.exp(delta_nk).sum(1, keepdims=True)
    batch_n = rng.integers(0, n_batches, n_cells)
    lambda_sg = rng.normal(0, 0.5, (n_batches, n_genes)) if n_batches > 1 else np.zeros((1, n_genes))
    library_n = rng.integers(1000, 3000, n_cells)
    x_ng = np.empty((n_cells, n_genes))
    for n in range(n_cells):
        beta_s = np.exp(np.log(beta_kg) + lambda_sg[batch_n[n]])
        p_g = theta_nk[n] @ (beta_s / beta_s.sum(1, keepdims=True))
        x_ng[n] = rng.multinomial(library_n[n], p_g / p_g.sum())
    obs = pd.DataFrame(
        {"dominant": [f"topic_{k}" for k in theta_nk.argmax(1)], "batch": [f"b{s}" for s in batch_n]},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"g{g}" for g in range(n_genes)])
    adata = AnnData(sp.csr_matrix(x_ng.astype(np.float32)), obs=obs, var=var)
    return adata, beta_kg, theta_nk


def match_topics(true_kg, fitted_kg):
    """Hungarian matching of fitted to true rows by correlation; the matched correlations, true order."""
    corr = np.corrcoef(true_kg, fitted_kg)[: len(true_kg), len(true_kg) :]
    rows, cols = linear_sum_assignment(-corr)
    return corr[rows, cols], cols


@pytest.fixture(scope="module")
def simulated():
    return simulate_etm()


@pytest.fixture(scope="module")
def trained(simulated):
    adata, _, _ = simulated
    model = pyro_sc.ETM(adata, n_topics=4, n_embedding=16, n_hidden=64)
    model.train(max_epochs=100, lr=1e-2, labels_key="dominant", monitor_every=50, progress_bar=False, seed=0)
    return model


def test_multinomial_log_prob_matches_scipy():
    rng = np.random.default_rng(1)
    p_ng = rng.dirichlet(np.ones(6), size=4)
    x_ng = np.stack([rng.multinomial(n, p) for n, p in zip([0, 1, 17, 300], p_ng)])
    expected = [multinomial.logpmf(x, x.sum(), p) for x, p in zip(x_ng, p_ng)]
    got = multinomial_log_prob(torch.tensor(x_ng, dtype=torch.float64), torch.tensor(p_ng))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
    # a zero probability where the count is zero is fine (0 log 0 = 0)
    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    assert torch.isfinite(multinomial_log_prob(torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64), p)).all()


def test_planted_topics_and_proportions_are_recovered(trained, simulated):
    adata, beta_kg, theta_nk = simulated
    fitted = trained.get_topic_genes()
    assert fitted.shape == (4, adata.n_vars) and list(fitted.columns) == list(adata.var_names)
    np.testing.assert_allclose(fitted.sum(1), 1.0, rtol=1e-5)
    corr_k, match = match_topics(beta_kg, fitted.to_numpy())
    assert corr_k.min() > 0.95, corr_k
    theta = trained.get_cell_topics()
    assert theta.index.equals(adata.obs_names) and theta.shape == (adata.n_obs, 4)
    np.testing.assert_allclose(theta.sum(1), 1.0, rtol=1e-5)
    theta_corr = [np.corrcoef(theta_nk[:, k], theta.to_numpy()[:, match[k]])[0, 1] for k in range(4)]
    assert min(theta_corr) > 0.9, theta_corr
    # each planted topic's own genes are its top genes
    top = trained.top_genes(10)
    for k in range(4):
        own = {f"g{g}" for g in range(k * 40, (k + 1) * 40)}
        assert set(top.iloc[match[k]]) <= own


def test_history_has_the_loss_and_the_monitored_ari(trained):
    history = trained.history
    assert len(history) == 100
    assert history["train_loss"].iloc[-10:].mean() < history["train_loss"].iloc[:10].mean()
    monitored = history.dropna(subset=["ari"])
    assert list(monitored["epoch"]) == [50, 100]
    assert (history["monitor_seconds"] <= history["seconds"]).all()
    # the monitor scored the final embedding as metrics.clustering_scores does (Leiden, resolution 1)
    final = metrics.clustering_scores(
        trained.get_latent_representation(), trained.adata.obs["dominant"].to_numpy(), resolution=1.0, seed=0
    )
    assert monitored["ari"].iloc[-1] == pytest.approx(final["ari"])
    assert monitored["n_clusters"].iloc[-1] == final["n_clusters"]
    assert final["ari"] > 0.1  # the dominant topic is only a blurred cluster label of mixed cells


def test_save_load_round_trip(trained, simulated, tmp_path):
    adata, _, _ = simulated
    trained.save(tmp_path / "etm.pt")
    loaded = pyro_sc.ETM.load(tmp_path / "etm.pt", adata)
    pd.testing.assert_frame_equal(loaded.get_cell_topics(), trained.get_cell_topics())
    pd.testing.assert_frame_equal(loaded.get_topic_genes(), trained.get_topic_genes())


def test_scetm_batch_bias_mixes_each_cell_with_its_batch_topics():
    adata, _, _ = simulate_etm(300, 60, 3, n_batches=2, seed=2)
    model = pyro_sc.ETM(adata, batch_key="batch", n_topics=3, n_embedding=8, n_hidden=16)
    model.train(max_epochs=3, progress_bar=False)
    module = model.module
    assert module.lambda_sg.shape == (2, 60)
    with torch.no_grad():
        module.lambda_sg.normal_()
        theta_nk = torch.softmax(torch.randn(5, 3), -1)
        batch_n = torch.tensor([0, 1, 1, 0, 1])
        beta_skg = module.beta()
        expected = torch.stack([theta_nk[i] @ beta_skg[batch_n[i]] for i in range(5)])
        torch.testing.assert_close(module.mix(theta_nk, batch_n), expected)
    assert np.allclose(model.get_topic_genes(batch="b1").sum(1), 1.0, rtol=1e-5)
    with pytest.raises(KeyError, match="unknown batch"):
        model.get_topic_genes(batch="b7")


def test_bad_input_is_named_before_training(simulated):
    adata, _, _ = simulated
    model = pyro_sc.ETM(adata, n_topics=3, n_embedding=8)
    with pytest.raises(RuntimeError, match="not trained"):
        model.get_cell_topics()
    with pytest.raises(DataError, match="labels key 'nope'"):
        model.train(max_epochs=1, labels_key="nope", progress_bar=False)
    with pytest.raises(ValueError, match="embedding"):
        model.train(max_epochs=1, embedding="z", progress_bar=False)
    with pytest.raises(ValueError, match="monitor_every"):
        model.train(max_epochs=1, labels_key="dominant", monitor_every=0, progress_bar=False)
    assert not model.is_trained
    with pytest.raises(ValueError, match="n_topics"):
        pyro_sc.ETM(adata, n_topics=0)
    bad = adata.copy()
    bad.X = bad.X.toarray() / 3.0
    with pytest.raises(DataError, match="non-integer"):
        pyro_sc.ETM(bad)
    with_nan = adata.copy()
    with_nan.obs.loc[with_nan.obs_names[0], "dominant"] = np.nan
    with pytest.raises(DataError, match="missing values"):
        pyro_sc.ETM(with_nan, n_topics=3).train(max_epochs=1, labels_key="dominant", progress_bar=False)


def test_top_genes_rejects_a_bad_n(trained):
    with pytest.raises(ValueError, match="n must be"):
        trained.top_genes(0)


@pytest.fixture(scope="module")
def pancreas(real_data):
    real_data("baron_mouse1")
    # genes detected in >= 300 of the 822 cells (674): small enough for a test
    return datasets.load_baron_mouse1(min_cells=300)


@pytest.mark.real_data
def test_beta_cell_topic_ranks_insulin_first_on_mouse_pancreas(pancreas):
    model = pyro_sc.ETM(pancreas, n_topics=16, n_embedding=64)
    model.train(max_epochs=60, lr=1e-2, progress_bar=False, seed=0)
    enrichment = model.topic_enrichment("cell_type")
    assert enrichment.shape == (13, 16)
    beta_topic = enrichment.loc["beta"].idxmax()
    top5 = list(model.top_genes(5).loc[beta_topic])
    assert {"Ins1", "Ins2"} <= set(top5), top5
    # insulin is that topic's signature, not everyone's: the ductal topic gives it little weight
    beta = model.get_topic_genes()
    ductal_topic = enrichment.loc["ductal"].idxmax()
    assert ductal_topic != beta_topic
    assert beta.loc[beta_topic, "Ins2"] > 10 * beta.loc[ductal_topic, "Ins2"]

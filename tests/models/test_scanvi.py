"""The semi-supervised VAE: hidden labels recovered on simulated and real data, from_scvi, queries."""

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_sc
from pyro_sc import datasets, metrics
from pyro_sc.data import DataError


def with_hidden_labels(adata, fraction: float, seed: int = 0, key: str = "cell_type"):
    """A copy of adata whose obs["seed_labels"] keeps ``fraction`` of the labels; and the hidden mask."""
    adata = adata.copy()
    rng = np.random.default_rng(seed)
    hidden_n = rng.random(adata.n_obs) >= fraction
    truth_n = adata.obs[key].astype(str).to_numpy()
    adata.obs["seed_labels"] = np.where(hidden_n, "Unknown", truth_n)
    return adata, hidden_n, truth_n


@contextlib.contextmanager
def deterministic_kernels():
    """torch's deterministic kernels while the block runs (the previous setting restored after).

    Two SCANVI runs with the same seed on CPU are bit for bit the same with one torch thread, and with
    any number of threads under these kernels; with several threads and torch's defaults they differ by
    float rounding (2e-7 to 4e-7 after 3 epochs at 128 hidden units, seen with 2 threads). The cause is
    one op: the gradient of ``weight[codes]`` in ``pyro_sc.nn._CovariateLinear`` (the enumerated cell
    type indexing its weight rows) is ``index_put_(accumulate=True)``, which on CPU adds with parallel
    atomic float additions in whatever order the threads run once it has >= 32768 elements (types x
    cells x hidden units: 4 x 128 x 128 here) -- unless deterministic algorithms are on, when it adds
    serially. Small networks stay under that size (``tests/test_reliability.py``'s n_hidden=16).
    """
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.fixture(scope="module")
def simulated():
    return with_hidden_labels(datasets.simulate_scvi(800, 200, n_latent=4, n_types=4, n_batches=2, seed=0), 0.1)


@pytest.fixture(scope="module")
def scvi(simulated):
    adata, _, _ = simulated
    model = pyro_sc.SCVI(adata, batch_key="batch", n_latent=5)
    model.train(max_epochs=15, progress_bar=False, seed=0)
    return model


@pytest.fixture(scope="module")
def trained(scvi):
    model = pyro_sc.SCANVI.from_scvi_model(scvi, labels_key="seed_labels", unlabeled_category="Unknown")
    model.train(max_epochs=15, progress_bar=False, seed=0)
    return model


def test_from_scvi_starts_from_the_scvi_and_predicts_hidden_labels(simulated, scvi, trained):
    adata, hidden_n, truth_n = simulated
    fresh = pyro_sc.SCANVI.from_scvi_model(scvi, labels_key="seed_labels", unlabeled_category="Unknown")
    fresh.history = pd.DataFrame()  # the latent of the copied encoder, before any training
    np.testing.assert_array_equal(fresh.get_latent_representation(), scvi.get_latent_representation())

    probs = trained.predict(soft=True)
    assert list(probs.columns) == [f"type_{t}" for t in range(4)] and probs.index.equals(adata.obs_names)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    predicted_n = trained.predict()  # scvi-tools' default: the labels, an array to put in adata.obs
    assert isinstance(predicted_n, np.ndarray) and predicted_n.shape == (adata.n_obs,)
    np.testing.assert_array_equal(predicted_n, probs.idxmax(axis=1).to_numpy())
    np.testing.assert_array_equal(predicted_n, trained.predict_labels().to_numpy())
    assert metrics.accuracy(truth_n[hidden_n], predicted_n[hidden_n]) > 0.95
    history = trained.history
    assert history["extra_loss"].iloc[-1] < history["extra_loss"].iloc[0]  # the classification term learns
    assert trained.get_latent_representation().shape == (adata.n_obs, 5)


def test_from_scvi_then_train_depends_on_the_seed_not_on_what_ran_before(scvi):
    runs = []
    for noise in (0, 1000):
        torch.randn(noise)  # other work using the global random state before the model is made
        model = pyro_sc.SCANVI.from_scvi_model(scvi, labels_key="seed_labels", unlabeled_category="Unknown")
        with deterministic_kernels():  # bit for bit whatever the number of threads (see there)
            model.train(max_epochs=2, progress_bar=False, seed=3)
        runs.append((model.module.state_dict(), model.predict(soft=True)))
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    pd.testing.assert_frame_equal(runs[0][1], runs[1][1], check_exact=True)
    # the encoder still starts as the scVI's after the seeded rebuild: the first epoch's loss is far
    # below that of a semi-supervised VAE started from scratch
    fresh = pyro_sc.SCANVI(scvi.adata, labels_key="seed_labels", unlabeled_category="Unknown", batch_key="batch",
                           n_latent=5)
    fresh.train(max_epochs=1, progress_bar=False, seed=3)
    assert model.history["train_loss"].iloc[0] < fresh.history["train_loss"].iloc[0]


def test_marginal_ll_sums_the_type_and_ignores_labels(simulated, trained):
    adata, _, _ = simulated
    ll = trained.get_marginal_ll(n_samples=20)
    assert np.isfinite(ll)
    unlabelled = adata.copy()
    unlabelled.obs["seed_labels"] = "Unknown"
    # labels are not used: the same estimate with every label hidden (same seed, same draws)
    assert trained.get_marginal_ll(unlabelled, n_samples=20) == pytest.approx(ll, rel=1e-6)
    # K = 20 importance samples give a tighter bound than K = 1 (the ELBO): E[log mean of K weights]
    # grows with K (Burda et al. 2016), so the mean over seeds of the K = 20 estimate exceeds the K = 1
    # one by more than three Monte Carlo standard errors of the difference (seen over seeds 0-7: gap
    # 6.6 nats per cell; seed-to-seed SD 0.16 at K = 1 and 0.08 at K = 20, so 3 SE of 4 seeds is 0.27)
    seeds = range(4)
    k1 = np.array([trained.get_marginal_ll(n_samples=1, seed=s) for s in seeds])
    k20 = np.array([ll] + [trained.get_marginal_ll(n_samples=20, seed=s) for s in seeds[1:]])  # seed 0: ll
    gap = k20.mean() - k1.mean()
    standard_error = np.sqrt(k1.var(ddof=1) / len(k1) + k20.var(ddof=1) / len(k20))
    assert gap > 3 * standard_error


def test_training_from_scratch_and_save_load(simulated, tmp_path):
    adata, hidden_n, truth_n = simulated
    model = pyro_sc.SCANVI(adata, labels_key="seed_labels", unlabeled_category="Unknown", batch_key="batch",
                           n_latent=5, class_weights="balanced")
    model.train(max_epochs=20, progress_bar=False, seed=0)
    assert metrics.accuracy(truth_n[hidden_n], model.predict_labels().to_numpy()[hidden_n]) > 0.95
    path = tmp_path / "scanvi.pt"
    model.save(path)
    loaded = pyro_sc.SCANVI.load(path, adata)
    pd.testing.assert_frame_equal(loaded.predict(soft=True), model.predict(soft=True))
    # new cells without the labels column are predicted too
    query = adata[:50].copy()
    del query.obs["seed_labels"]
    pd.testing.assert_frame_equal(model.predict(query, soft=True), model.predict(soft=True)[:50])


def test_queries_take_indices_as_scvi_tools(simulated, trained):
    adata, _, _ = simulated
    some = np.array([7, 3, 40, 3])
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[[3, 7, 40]] = True
    probs = trained.predict(soft=True)
    pd.testing.assert_frame_equal(trained.predict(indices=some, soft=True), probs.iloc[some])
    np.testing.assert_array_equal(trained.predict(indices=mask), trained.predict()[mask])
    np.testing.assert_array_equal(trained.get_latent_representation(indices=some),
                                  trained.get_latent_representation()[some])
    expression = trained.get_normalized_expression()
    pd.testing.assert_frame_equal(trained.get_normalized_expression(indices=mask), expression[mask])
    assert np.isfinite(trained.get_marginal_ll(indices=some, n_samples=2))
    with pytest.raises(IndexError, match=rf"indices must be positions in \[0, {adata.n_obs}\), got 3 .. {adata.n_obs}"):
        trained.predict(indices=[3, adata.n_obs])
    with pytest.raises(ValueError, match=rf"a boolean indices mask needs one entry per cell \({adata.n_obs}\), got shape \(3,\)"):
        trained.predict(indices=[True, False, True])
    with pytest.raises(TypeError, match="indices must be a 1-d sequence of integer positions or a boolean mask"):
        trained.predict(indices=["a", "b"])
    with pytest.raises(ValueError, match="indices selects no cells"):
        trained.predict(indices=np.zeros(adata.n_obs, dtype=bool))


def test_from_scvi_is_an_alias_of_from_scvi_model_with_scvi_tools_argument_order(scvi):
    assert pyro_sc.SCANVI.from_scvi.__func__ is pyro_sc.SCANVI.from_scvi_model.__func__
    model = pyro_sc.SCANVI.from_scvi_model(scvi, "Unknown", labels_key="seed_labels")
    assert model.setup.unlabeled_category == "Unknown" and model.pretrained


def test_bad_input(simulated, scvi):
    adata, _, _ = simulated
    none = adata.copy()
    none.obs["seed_labels"] = "Unknown"
    with pytest.raises(DataError, match="no categories besides"):
        pyro_sc.SCANVI(none, labels_key="seed_labels", unlabeled_category="Unknown")
    with pytest.raises(DataError, match="not found in adata.obs"):
        pyro_sc.SCANVI(adata, labels_key="nope", unlabeled_category="Unknown")
    with pytest.raises(ValueError, match="class_weights"):
        pyro_sc.SCANVI(adata, labels_key="seed_labels", unlabeled_category="Unknown", class_weights="yes")
    with pytest.raises(TypeError, match="trained pyro_sc.SCVI"):
        pyro_sc.SCANVI.from_scvi_model("scvi", labels_key="seed_labels", unlabeled_category="Unknown")
    other = adata.copy()
    other.obs["batch"] = other.obs["batch"].astype(str).replace({"batch_1": "batch_0"})
    with pytest.raises(DataError, match="batch"):
        pyro_sc.SCANVI.from_scvi_model(scvi, labels_key="seed_labels", unlabeled_category="Unknown", adata=other)
    untrained = pyro_sc.SCVI(adata, batch_key="batch")
    with pytest.raises(RuntimeError, match="not trained"):
        pyro_sc.SCANVI.from_scvi_model(untrained, labels_key="seed_labels", unlabeled_category="Unknown")


@pytest.mark.slow
@pytest.mark.real_data
def test_cellbench_cell_lines_from_five_percent_of_labels(real_data):
    real_data("cellbench_3cl")
    adata = datasets.select_hvg(datasets.load_cellbench(), 2000, batch_key="batch")
    adata, hidden_n, truth_n = with_hidden_labels(adata, 0.05, seed=0, key="cell_line_demuxlet")
    scvi = pyro_sc.SCVI(adata, batch_key="batch")
    scvi.train(max_epochs=100, progress_bar=False, seed=0)
    model = pyro_sc.SCANVI.from_scvi_model(scvi, labels_key="seed_labels", unlabeled_category="Unknown")
    model.train(max_epochs=30, progress_bar=False, seed=0)
    predicted_n = model.predict_labels().to_numpy()
    assert metrics.accuracy(truth_n[hidden_n], predicted_n[hidden_n]) > 0.95


def test_learned_label_prior_finds_the_type_proportions():
    full = datasets.simulate_scvi(1600, 200, n_latent=4, n_types=4, n_batches=2, seed=1)
    type_n = full.obs["cell_type"].astype(str).to_numpy()
    keep_share = {"type_0": 1.0, "type_1": 0.5, "type_2": 0.25, "type_3": 0.125}  # uneven types
    rng = np.random.default_rng(0)
    adata = full[rng.random(full.n_obs) < np.vectorize(keep_share.get)(type_n)].copy()
    truth_n = adata.obs["cell_type"].astype(str).to_numpy()
    # labels biased towards the rarest type: its share among the labelled cells is ~5x its true share
    label_share = {"type_0": 0.05, "type_1": 0.05, "type_2": 0.05, "type_3": 0.4}
    hidden_n = rng.random(adata.n_obs) >= np.vectorize(label_share.get)(truth_n)
    adata.obs["seed_labels"] = np.where(hidden_n, "Unknown", truth_n)
    model = pyro_sc.SCANVI(adata, labels_key="seed_labels", unlabeled_category="Unknown", batch_key="batch",
                           n_latent=5, label_prior="learned")
    start_y = torch.softmax(model.module.logits_pi_y.detach(), -1).numpy()
    model.train(max_epochs=60, lr=1e-2, progress_bar=False, seed=0)
    pi_y = torch.softmax(model.module.logits_pi_y.detach(), -1).numpy()
    share_y = pd.Series(truth_n).value_counts(normalize=True).reindex(model.setup.label_categories).to_numpy()
    assert np.abs(start_y - share_y).max() > 0.2  # it starts at the (biased) labelled frequencies
    np.testing.assert_allclose(pi_y, share_y, atol=0.04)  # and ends at the true 0.53 / 0.27 / 0.13 / 0.07
    assert metrics.accuracy(truth_n[hidden_n], model.predict_labels().to_numpy()[hidden_n]) > 0.95
    with pytest.raises(ValueError, match="label_prior must be 'uniform', 'labelled' or 'learned'"):
        pyro_sc.SCANVI(adata, labels_key="seed_labels", unlabeled_category="Unknown", label_prior="empirical")


def test_labelled_label_prior_is_the_labelled_frequencies_and_stays_fixed(tmp_path):
    adata = datasets.simulate_scvi(300, 50, n_latent=3, n_types=3, n_batches=1, seed=2)
    truth_n = adata.obs["cell_type"].astype(str).to_numpy()
    labelled_n = np.zeros(adata.n_obs, dtype=bool)
    for t, k in {"type_0": 30, "type_1": 10, "type_2": 5}.items():
        labelled_n[np.flatnonzero(truth_n == t)[:k]] = True
    adata.obs["seed_labels"] = np.where(labelled_n, truth_n, "Unknown")
    model = pyro_sc.SCANVI(adata, labels_key="seed_labels", unlabeled_category="Unknown", n_latent=3,
                           label_prior="labelled")
    model.train(max_epochs=3, progress_bar=False, seed=0)
    pi_y = pd.Series(torch.softmax(model.module.logits_pi_y, -1).numpy(), index=model.setup.label_categories)
    # the labelled cells' frequencies with one more cell of each type: 31 / 11 / 6 of 48
    np.testing.assert_allclose(pi_y[["type_0", "type_1", "type_2"]], np.array([31, 11, 6]) / 48, rtol=1e-5)
    assert not any(p is model.module.logits_pi_y for p in model.module.parameters())
    model.save(tmp_path / "m.pt")
    loaded = pyro_sc.SCANVI.load(tmp_path / "m.pt", adata)
    torch.testing.assert_close(loaded.module.logits_pi_y, model.module.logits_pi_y)

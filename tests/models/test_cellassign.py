"""CellAssign: recovery from its own generative model, the dispersion guard, bad input, another guide,
save / load, and accuracy on real data with the paper's markers."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal

import pyro_sc
from pyro_sc import datasets, metrics
from pyro_sc.data import DataError
from pyro_sc.models.cellassign import CellAssignModule, TruncatedLogNormal


@pytest.fixture(scope="module")
def simulated():
    return datasets.simulate_cellassign(3000, seed=1)


@pytest.fixture(scope="module")
def trained(simulated):
    adata, markers, _ = simulated
    model = pyro_sc.CellAssign(adata, markers, size_factor_key="size_factor")  # the model's own s_n
    model.train(num_restarts=2, seed=0)
    return model


def test_recovers_types_and_marker_effects_from_simulated_data(trained, simulated):
    adata, markers, true_delta = simulated
    labels = trained.predict_labels()
    assert metrics.accuracy(adata.obs["cell_type"].astype(str), labels) >= 0.99
    is_marker = markers.to_numpy() == 1
    learned = trained.delta.loc[markers.index, markers.columns].to_numpy()
    assert np.corrcoef(learned[is_marker], true_delta.to_numpy()[is_marker])[0, 1] > 0.95
    assert (learned[is_marker] >= 2.0).all() and (learned[~is_marker] == 0).all()
    assert len(trained.restart_losses) == 2
    # the best screened restart was trained on, and only got better
    assert trained.history["validation_loss"].min() <= min(trained.restart_losses)


def test_probabilities_and_unassigned_threshold(trained, simulated):
    adata, markers, _ = simulated
    gamma = trained.predict()
    assert gamma.index.equals(adata.obs_names) and list(gamma.columns) == list(markers.columns)
    np.testing.assert_allclose(gamma.sum(1), 1.0, rtol=1e-5)
    labels = trained.predict_labels(threshold=1.01)  # nothing is that certain
    assert (labels == "unassigned").all()


def test_default_size_factors_use_all_genes_before_restricting_to_markers(simulated):
    adata, markers, _ = simulated
    model = pyro_sc.CellAssign(adata, markers)
    total = np.asarray(adata.X.sum(1)).ravel()
    np.testing.assert_allclose(model.setup.size_factor_n, total / total.mean(), rtol=1e-5)
    assert list(model.setup.var_names) == list(markers.index)
    assert "_cellassign_size_factor" not in adata.obs  # the user's AnnData is untouched


def test_inverse_dispersion_stays_sane_far_outside_the_basis():
    # basis centres from 0 to the largest count (100); a marker's boosted log-mean far beyond them
    module = CellAssignModule([[1.0]], max_count=100.0)
    phi = module.inverse_dispersion(torch.tensor([0.0, 3.0, 8.0, 50.0, 1e3]))
    assert torch.isfinite(phi).all() and (phi > 0.5).all(), phi
    # evaluated on the count scale instead (mu = e^8 ~ 3000 >> 100), the same basis collapses to ~0:
    v_b = module.basis_centres_b
    width = 0.5 / (v_b[1] - v_b[0]) ** 2
    count_scale = torch.exp(-width * (math.exp(8.0) - v_b) ** 2).sum()
    assert count_scale < 1e-10


def test_truncated_lognormal_prior_against_scipy():
    loc, scale, low = 0.3, 0.8, 2.0
    d = TruncatedLogNormal(torch.tensor(loc), torch.tensor(scale), low)
    x = torch.tensor([2.0, 2.5, 4.0, 20.0])
    a = (math.log(low) - loc) / scale
    expected = scipy.stats.truncnorm(a, np.inf, loc=loc, scale=scale).logpdf(np.log(x.numpy())) - np.log(x.numpy())
    np.testing.assert_allclose(d.log_prob(x).numpy(), expected, rtol=1e-5)
    samples = d.sample((20000,))
    assert samples.min() >= low
    mean = scipy.integrate.quad(lambda v: math.exp(d.log_prob(torch.tensor(v)).item()) * v, low, 200)[0]
    assert samples.mean().item() == pytest.approx(mean, rel=0.03)


def test_a_different_guide_trains_through_the_same_driver(simulated):
    adata, markers, _ = simulated
    model = pyro_sc.CellAssign(adata, markers, size_factor_key="size_factor")
    guide = AutoNormal(poutine.block(model.model, expose=["pi", "delta"]))
    model.train(num_restarts=1, guide=guide, seed=0)
    accuracy = metrics.accuracy(adata.obs["cell_type"].astype(str), model.predict_labels())
    assert accuracy >= 0.98
    scales = guide.scales.delta.detach()  # posterior uncertainty over every marker effect
    assert scales.shape == (markers.to_numpy().sum(),) and (scales > 0).all()


def test_save_load_round_trip(trained, simulated, tmp_path):
    adata, _, _ = simulated
    trained.save(tmp_path / "ca.pt")
    loaded = pyro_sc.CellAssign.load(tmp_path / "ca.pt", adata)
    pd.testing.assert_frame_equal(loaded.predict(), trained.predict())


def test_covariates_enter_the_design_matrix(simulated):
    adata, markers, _ = simulated
    adata = adata[:600].copy()
    rng = np.random.default_rng(0)
    adata.obs["batch"] = rng.choice(["a", "b", "c"], adata.n_obs)
    adata.obs["depth"] = rng.normal(size=adata.n_obs)
    model = pyro_sc.CellAssign(adata, markers, batch_key="batch", continuous_covariate_keys=["depth"])
    assert model.module.beta_gp.shape == (markers.shape[0], 2 + 1)
    history = model.train(num_restarts=1, max_epochs=5, early_stopping=False)
    assert np.isfinite(history["train_loss"]).all()


def test_cells_without_marker_counts_are_kept_and_assigned(simulated):
    adata, markers, _ = simulated
    adata = adata[:500].copy()
    x = adata.X.toarray()
    x[:5, : markers.shape[0]] = 0  # no marker counts; other genes keep the size factor positive
    adata.X = type(adata.X)(x)
    model = pyro_sc.CellAssign(adata, markers)
    model.train(num_restarts=1, max_epochs=20)
    gamma = model.predict()
    assert np.isfinite(gamma.to_numpy()).all() and gamma.shape[0] == 500


def test_bad_markers_and_size_factors_are_named(simulated):
    adata, markers, _ = simulated
    missing = pd.concat([markers, pd.DataFrame([[1, 0, 0, 0, 0]], index=["NOTAGENE"], columns=markers.columns)])
    with pytest.raises(DataError, match=r"1 marker genes are not in the data: \['NOTAGENE'\]"):
        pyro_sc.CellAssign(adata, missing)
    with pytest.warns(UserWarning, match="dropping 1 marker genes"):
        model = pyro_sc.CellAssign(adata, missing, drop_missing_markers=True)
    assert model.setup.n_vars == markers.shape[0]
    with pytest.raises(DataError, match="must be binary"):
        pyro_sc.CellAssign(adata, markers * 2)
    no_marker = markers.copy()
    no_marker["type_4"] = 0
    with pytest.raises(DataError, match=r"cell types with no marker gene: \['type_4'\]"):
        pyro_sc.CellAssign(adata, no_marker)
    with pytest.raises(DataError, match="more than once"):
        pyro_sc.CellAssign(adata, pd.concat([markers, markers.iloc[:1]]))
    bad = adata.copy()
    bad.obs["sf"] = 1.0
    bad.obs.loc[bad.obs_names[3], "sf"] = 0.0
    with pytest.raises(DataError, match="size factor key 'sf' has 1 values"):
        pyro_sc.CellAssign(bad, markers, size_factor_key="sf")
    with pytest.raises(DataError, match="var_key 'symbol' not found"):
        pyro_sc.CellAssign(adata, markers, var_key="symbol")


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("marker_set, target", [("tian_73_73", 0.99), ("tian_20_73", 0.95)])
def test_cellbench_accuracy_with_the_papers_markers(marker_set, target, real_data):
    real_data("cellbench_3cl")  # and its markers/
    adata = datasets.load_cellbench()
    markers = datasets.load_markers(marker_set)
    model = pyro_sc.CellAssign(adata, markers, var_key="gene_symbol", drop_missing_markers=True)
    model.train(seed=0)
    accuracy = metrics.accuracy(adata.obs["cell_line_demuxlet"].astype(str), model.predict_labels())
    assert accuracy >= target, accuracy


def test_a_type_absent_from_the_data_leaves_the_objective_bounded():
    """Dirichlet(0.01) on pi rewards a proportion going to zero without bound; evaluated at pi + 1e-20, as
    the original CellAssign does, the reward stops there, and with it the absent type's logit."""
    from pyro_sc.models.cellassign import FlooredDirichlet

    alpha = torch.full((3,), 0.01)
    at = [torch.tensor([0.6, 0.4 - p, p]) for p in (1e-30, 1e-40)]
    floored = [float(FlooredDirichlet(alpha).log_prob(v)) for v in at]
    plain = [float(torch.distributions.Dirichlet(alpha).log_prob(v)) for v in at]
    assert plain[1] - plain[0] == pytest.approx(0.99 * math.log(1e10), rel=1e-3)  # unbounded: +22.8 per decade x10
    assert abs(floored[1] - floored[0]) < 1e-5
    assert floored[0] == pytest.approx(float(torch.distributions.Dirichlet(alpha).log_prob(at[0] + 1e-20)), rel=1e-6)
    # the gradient that drives an absent type's logit down vanishes once its proportion is below the floor
    logits = torch.tensor([5.0, 5.0, -60.0], requires_grad=True)
    FlooredDirichlet(alpha).log_prob(torch.softmax(logits, -1)).backward()
    assert abs(float(logits.grad[2])) < 1e-6
    assert FlooredDirichlet(alpha).expand([2]).floor == 1e-20


def test_a_type_absent_from_the_data_trains_to_the_end_and_the_present_ones_are_found():
    adata, markers, _ = datasets.simulate_cellassign(300, n_other_genes=20, n_absent_markers=4, seed=1)
    assert markers.columns[-1] == "absent" and adata[:, markers.index[markers["absent"] == 1]].X.sum() == 0
    model = pyro_sc.CellAssign(adata, markers, size_factor_key="size_factor")
    history = model.train(max_epochs=250, num_restarts=1, early_stopping=False, lr=0.5, seed=0)
    assert len(history) == 250 and np.isfinite(history["train_loss"]).all()
    pi = model.module.map_pi().detach()
    assert 1e-30 < float(pi[-1]) < 1e-15, float(pi[-1])  # gone, but bounded away from zero (as the original)
    assert (model.predict_labels().to_numpy() == adata.obs["cell_type"].astype(str).to_numpy()).mean() > 0.97

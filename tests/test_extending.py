"""Extending pyro_sc (tutorials/extending.ipynb): another guide without touching the model, another prior by
overriding one method, a new model trained by the package's driver, and Pyro's own tools on its models."""

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO, infer_discrete
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal
from torch import nn
from torch.distributions import kl_divergence

import pyro_sc
from pyro_sc import datasets, metrics
from pyro_sc.models import SCVIModule
from pyro_sc.plotting import plot_posterior_predictive


# --------------------------------------------------------------------------- 1. another guide, same model
@pytest.fixture(scope="module")
def cellassign_data():
    return datasets.simulate_cellassign(2000, n_other_genes=30, seed=2)


def _full_posterior(adata, markers, n_cells):
    model = pyro_sc.CellAssign(adata[:n_cells].copy(), markers, size_factor_key="size_factor")
    model.set_guide(AutoMultivariateNormal)  # a joint Gaussian over pi (stick-breaking) and delta (log scale)
    model.train(num_restarts=1, seed=0)
    return model


@pytest.fixture(scope="module")
def full_posterior(cellassign_data):
    adata, markers, _ = cellassign_data
    return _full_posterior(adata, markers, 2000)


def test_a_full_posterior_over_pi_and_delta_is_accurate_and_its_sd_shrinks_with_more_cells(
    full_posterior, cellassign_data
):
    adata, markers, true_delta = cellassign_data
    assert full_posterior.custom_guide is not None and full_posterior._autoguide_spec[1] == ["pi", "delta"]
    assert metrics.accuracy(adata.obs["cell_type"].astype(str), full_posterior.predict_labels()) >= 0.99
    is_marker = markers.to_numpy() == 1
    draws = full_posterior.posterior_samples(300)
    delta_sgc = draws["delta"]
    assert delta_sgc.shape == (300, *markers.shape) and (delta_sgc[:, ~is_marker] == 0).all()
    sd_large = delta_sgc.std(0)[is_marker]
    mean = delta_sgc.mean(0)[is_marker]
    truth = true_delta.to_numpy()[is_marker]
    assert np.corrcoef(mean, truth)[0, 1] > 0.95
    # the errors are of the order of the posterior sd (mean-field over pi / delta with the other parameters
    # at point estimates is somewhat over-confident, not wildly so)
    z = np.abs(mean - truth) / sd_large
    assert np.median(z) < 2.5, np.median(z)
    np.testing.assert_allclose(draws["pi"].mean(0), adata.obs["cell_type"].value_counts(normalize=True, sort=False),
                               atol=0.03)
    # four times the cells: the sd shrinks by about two (1 / sqrt(n))
    small = _full_posterior(adata, markers, 500)
    sd_small = small.posterior_samples(300)["delta"].std(0)[is_marker]
    ratio = np.median(sd_small / sd_large)
    assert 1.4 < ratio < 3.0, ratio
    # averaging the type probabilities over the posterior keeps them probabilities
    gamma = full_posterior.predict(n_samples=5)
    np.testing.assert_allclose(gamma.sum(1), 1.0, rtol=1e-5)


def test_a_custom_guide_is_saved_and_loaded_or_refused_clearly(full_posterior, cellassign_data, tmp_path):
    adata, markers, _ = cellassign_data
    full_posterior.save(tmp_path / "ca.pt")
    loaded = pyro_sc.CellAssign.load(tmp_path / "ca.pt", adata, guide=AutoMultivariateNormal)
    pd.testing.assert_frame_equal(loaded.predict(n_samples=10), full_posterior.predict(n_samples=10))
    with pytest.raises(ValueError, match=r"saved with a custom guide \(AutoMultivariateNormal\).*guide="):
        pyro_sc.CellAssign.load(tmp_path / "ca.pt", adata)
    with pytest.raises(ValueError, match="does not fit the saved custom guide"):
        pyro_sc.CellAssign.load(tmp_path / "ca.pt", adata, guide=AutoDelta)
    # a plain function guide keeps its parameters in Pyro's global store: save refuses it by name
    model = pyro_sc.CellAssign(adata[:200].copy(), markers, size_factor_key="size_factor")

    def map_guide(mb):
        logits = pyro.param("pi_logits", torch.zeros(markers.shape[1]))
        pyro.sample("pi", dist.Delta(torch.softmax(logits, -1), event_dim=1))
        pyro.sample("delta", dist.Delta(2.0 + pyro.param("delta_excess", torch.ones(int(markers.values.sum()))),
                                        event_dim=1))

    model.set_guide(map_guide)
    with pytest.raises(TypeError, match="'map_guide' is not an nn.Module"):
        model.save(tmp_path / "fn.pt")
    with pytest.raises(TypeError, match="must be a Pyro autoguide"):
        model.set_guide(nn.Linear)
    with pytest.raises(ValueError, match=r"\['z'\] are not latent sites of CellAssign's guide"):
        model.set_guide(AutoNormal, sites=["z"])


def test_guide_replacement_is_generic_autoguide_on_scvi_cells_and_subclass_override():
    adata = datasets.simulate_scvi(300, 60, n_latent=2, n_types=3, n_batches=1, seed=3)
    model = pyro_sc.SCVI(adata, n_latent=2, n_hidden=16)
    model.set_guide(AutoNormal)  # one Gaussian per cell: its locs follow the cells plate's subsample
    assert model._autoguide_spec[1] == ["z"]
    history = model.train(max_epochs=3, batch_size=100, progress_bar=False, n_epochs_kl_warmup=None)
    assert np.isfinite(history["train_loss"]).all()
    assert model.custom_guide.locs.z.shape == (300, 2)  # trained by the driver with the module

    class FixedScaleGuide(pyro_sc.SCVI):  # a subclass overriding guide: the encoder's mean, a fixed scale
        def guide(self, mb):
            with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n), poutine.scale(scale=mb.kl_weight):
                loc_nk, _ = self.module.encode(mb)
                pyro.sample("z", dist.Normal(loc_nk, 0.1).to_event(1))

    sub = FixedScaleGuide(adata, n_latent=2, n_hidden=16)
    sub.train(max_epochs=2, batch_size=100, progress_bar=False)
    trace = poutine.trace(sub.guide).get_trace(sub.setup.minibatch(np.arange(10)))
    assert torch.allclose(trace.nodes["z"]["fn"].base_dist.scale, torch.tensor(0.1))


# ------------------------------------------------------------------- 2. another prior, one method overridden
class MixturePriorModule(SCVIModule):
    """scVI with a mixture of K Gaussians as the prior of z, its weights, means and scales learned."""

    def __init__(self, n_genes, *, n_components=10, **kwargs):
        super().__init__(n_genes, **kwargs)
        self.mixture_logits_k = nn.Parameter(torch.zeros(n_components))
        self.component_loc_kd = nn.Parameter(torch.randn(n_components, self.n_latent))
        self.component_log_scale_kd = nn.Parameter(torch.zeros(n_components, self.n_latent))

    def components(self):
        return dist.Normal(self.component_loc_kd, self.component_log_scale_kd.exp()).to_event(1)

    def prior_z(self, mb):
        return dist.MixtureSameFamily(dist.Categorical(logits=self.mixture_logits_k), self.components())


class MixturePriorSCVI(pyro_sc.SCVI):
    module_class = MixturePriorModule


@pytest.fixture(scope="module")
def scvi_data():
    return datasets.simulate_scvi(1000, 200, n_latent=4, n_types=4, n_batches=1, seed=0)


@pytest.fixture(scope="module")
def mixture_scvi(scvi_data):
    model = MixturePriorSCVI(scvi_data, n_latent=4, module_kwargs={"n_components": 10})
    model.train(max_epochs=40, lr=1e-2, n_epochs_kl_warmup=None, progress_bar=False, seed=1)
    return model


def test_mixture_prior_components_land_on_the_simulated_cell_types(mixture_scvi, scvi_data):
    module = mixture_scvi.module
    assert isinstance(module, MixturePriorModule) and module.component_loc_kd.shape == (10, 4)
    z_nk = torch.as_tensor(mixture_scvi.get_latent_representation())
    with torch.no_grad():
        log_r_nk = module.components().log_prob(z_nk.unsqueeze(-2)) + module.mixture_logits_k.log_softmax(-1)
    component_n = log_r_nk.argmax(-1).numpy()
    table = pd.crosstab(scvi_data.obs["cell_type"].to_numpy(), component_n)
    # each component holds (almost) one cell type, and every type is the main type of some component
    purity = table.max(0).sum() / table.to_numpy().sum()
    assert purity > 0.9, table
    assert set(table.idxmax(0)) == set(scvi_data.obs["cell_type"]), table
    # the prior's weights follow the components' mean responsibilities for the cells (EM's fixed point)
    weights_k = module.mixture_logits_k.softmax(-1).detach().numpy()
    shares_k = log_r_nk.softmax(-1).mean(0).numpy()
    assert np.abs(weights_k - shares_k).sum() < 0.3, (weights_k, shares_k)


def test_trace_mean_field_elbo_falls_back_to_monte_carlo_for_the_mixture_kl(mixture_scvi):
    mb = mixture_scvi.setup.minibatch(np.arange(200))
    module = mixture_scvi.module
    module.eval()
    guide_trace = poutine.trace(mixture_scvi.guide).get_trace(mb)
    with pytest.raises(NotImplementedError):  # no closed form: the ELBO samples log q - log p instead
        kl_divergence(guide_trace.nodes["z"]["fn"], module.prior_z(mb))
    torch.manual_seed(0)
    with torch.no_grad():
        model, guide = mixture_scvi.model, mixture_scvi.guide
        mean_field = np.array([TraceMeanField_ELBO().loss(model, guide, mb) for _ in range(30)])
        monte_carlo = np.array([Trace_ELBO().loss(model, guide, mb) for _ in range(30)])
    assert np.isfinite(mean_field).all() and mean_field.std() > 0  # sampled, not closed form
    se = np.sqrt(mean_field.var() / 30 + monte_carlo.var() / 30)
    assert abs(mean_field.mean() - monte_carlo.mean()) < 4 * se + 1e-3 * abs(monte_carlo.mean())


# ------------------------------------------------------------------- 3. a new model, the package's driver
def test_a_new_model_from_scratch_recovers_gene_dispersions():
    rng = np.random.default_rng(0)
    n_cells, n_genes = 2000, 40
    mean_g = np.exp(rng.normal(1.0, 1.0, n_genes))
    theta_g = np.exp(rng.uniform(np.log(0.5), np.log(20.0), n_genes))
    size_factor_n = rng.lognormal(0.0, 0.3, n_cells)
    mu_ng = size_factor_n[:, None] * mean_g
    x_ng = rng.poisson(rng.gamma(theta_g, mu_ng / theta_g)).astype(np.float32)
    obs = pd.DataFrame({"sf": size_factor_n}, index=[f"c{i}" for i in range(n_cells)])
    adata = AnnData(sp.csr_matrix(x_ng), obs=obs)
    adata.var_names = [f"g{g}" for g in range(n_genes)]

    def model(mb):
        n = mb.x_ng.shape[-1]
        log_mean_g = pyro.sample("log_mean_g", dist.Normal(0.0, 5.0).expand([n]).to_event(1))
        log_theta_g = pyro.sample("log_theta_g", dist.Normal(0.0, 3.0).expand([n]).to_event(1))
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            mu_ng = mb.size_factor_n.unsqueeze(-1) * log_mean_g.exp()
            pyro.sample("x", pyro_sc.NegativeBinomial(mu_ng, log_theta_g.exp()).to_event(1), obs=mb.x_ng)

    def guide(mb):
        n = mb.x_ng.shape[-1]
        for name in ("log_mean_g", "log_theta_g"):
            loc = pyro.param(f"{name}_loc", torch.zeros(n))
            scale = pyro.param(f"{name}_scale", torch.full((n,), 0.1), constraint=dist.constraints.positive)
            pyro.sample(name, dist.Normal(loc, scale).to_event(1))

    pyro.clear_param_store()
    history = pyro_sc.fit(model, guide, pyro_sc.AnnDataSetup(adata, size_factor_key="sf"), max_epochs=60,
                          batch_size=500, lr=0.05, train_size=1.0, progress_bar=False)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    loc_g, scale_g = pyro.param("log_theta_g_loc").detach().numpy(), pyro.param("log_theta_g_scale").detach().numpy()
    assert np.corrcoef(loc_g, np.log(theta_g))[0, 1] > 0.95
    assert np.median(np.abs(loc_g - np.log(theta_g))) < 0.15
    inside = np.abs(loc_g - np.log(theta_g)) < 1.96 * scale_g  # 95% intervals: roughly nominal coverage
    assert inside.mean() > 0.75, inside.mean()
    np.testing.assert_allclose(np.exp(pyro.param("log_mean_g_loc").detach().numpy()), mean_g, rtol=0.1)
    pyro.clear_param_store()


# ------------------------------------------------------------------- 4. Pyro's tools on pyro_sc's models
def _thinned(adata, fraction, seed=0):
    """Counts binomially thinned to ``fraction`` (size factors scaled alike): cells whose type is uncertain."""
    rng = np.random.default_rng(seed)
    x = adata.X.toarray()
    thin = adata.copy()
    thin.X = sp.csr_matrix(rng.binomial(x.astype(np.int64), fraction).astype(np.float32))
    thin.obs["size_factor"] = thin.obs["size_factor"] * fraction
    return thin


def test_condition_block_and_trace_give_the_type_probabilities_predict_gives(full_posterior, cellassign_data):
    adata, markers, _ = cellassign_data
    thin = _thinned(adata[:300], 0.01)
    gamma = full_posterior.predict(thin)
    mb = full_posterior._setup_for(thin).minibatch(np.arange(300))
    median = full_posterior.custom_guide.median()
    at_median = poutine.condition(full_posterior.model, data={"pi": median["pi"], "delta": median["delta"]})
    blocked = poutine.trace(poutine.block(at_median, hide=["x"])).get_trace(mb)
    assert {"pi", "delta", "z"} <= set(blocked.nodes) and "x" not in blocked.nodes
    log_lik_cn = []
    for c in range(markers.shape[1]):
        given_type = poutine.condition(at_median, data={"z": torch.full((300,), c)})
        trace = poutine.trace(given_type).get_trace(mb)
        log_lik_cn.append(trace.nodes["x"]["fn"].log_prob(trace.nodes["x"]["value"]))
    bayes = torch.softmax(torch.stack(log_lik_cn, -1) + median["pi"].log(), -1).detach().numpy()
    np.testing.assert_allclose(bayes, gamma.to_numpy(), atol=1e-4)


def test_infer_discrete_samples_cell_types_at_the_frequencies_predict_gives(full_posterior, cellassign_data):
    adata, _, _ = cellassign_data
    thin = _thinned(adata[:200], 0.01, seed=1)
    gamma = full_posterior.predict(thin).to_numpy()
    assert ((gamma.max(1) > 0.55) & (gamma.max(1) < 0.95)).sum() >= 30  # some cells really are uncertain
    mb = full_posterior._setup_for(thin).minibatch(np.arange(200))
    median = full_posterior.custom_guide.median()
    at_median = poutine.condition(full_posterior.model, data={"pi": median["pi"], "delta": median["delta"]})
    sampler = infer_discrete(at_median, first_available_dim=-2, temperature=1)
    n_draws = 300
    pyro.set_rng_seed(0)
    counts = np.zeros_like(gamma)
    with torch.no_grad():
        for _ in range(n_draws):
            z_n = poutine.trace(sampler).get_trace(mb).nodes["z"]["value"].numpy()
            counts[np.arange(200), z_n] += 1
    frequency = counts / n_draws
    tolerance = 4.5 * np.sqrt(gamma * (1 - gamma) / n_draws) + 0.01
    assert (np.abs(frequency - gamma) <= tolerance).all(), np.abs(frequency - gamma).max()


def test_predictive_posterior_check_reproduces_per_gene_statistics(mixture_scvi, scvi_data):
    pyro.set_rng_seed(0)
    mb = mixture_scvi.setup.minibatch(np.arange(scvi_data.n_obs))
    mixture_scvi.module.eval()
    predictive = Predictive(poutine.uncondition(mixture_scvi.model), guide=mixture_scvi.guide, num_samples=10,
                            return_sites=["x"])
    x_sng = predictive(mb)["x"].numpy()
    x_ng = mb.x_ng.numpy()
    assert x_sng.shape == (10, *x_ng.shape) and not np.array_equal(x_sng[0], x_ng)  # simulated, not the data
    assert np.allclose(x_sng, np.round(x_sng)) and (x_sng >= 0).all()
    # a short run: the means and variances follow the data's over three orders of magnitude, with a few
    # per cent too many zeros and somewhat inflated variances (what the plot shows)
    mean_obs, mean_sim = x_ng.mean(0), x_sng.mean(1).mean(0)
    assert np.corrcoef(np.log(mean_obs), np.log(mean_sim))[0, 1] > 0.98
    assert np.median(np.abs(mean_sim / mean_obs - 1)) < 0.25
    var_obs, var_sim = x_ng.var(0), x_sng.var(1).mean(0)
    assert np.corrcoef(np.log(var_obs), np.log(var_sim))[0, 1] > 0.95
    zero_obs, zero_sim = (x_ng == 0).mean(0), (x_sng == 0).mean(1).mean(0)
    assert np.abs(zero_obs - zero_sim).mean() < 0.08
    figure = plot_posterior_predictive(x_ng, x_sng, title="scVI, mixture prior")
    assert len(figure.axes) == 3 and "of genes in the 90% interval" in figure.axes[0].get_title()
    with pytest.raises(ValueError, match="same cells and genes"):
        plot_posterior_predictive(x_ng, x_sng[:, :10])

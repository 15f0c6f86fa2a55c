"""Held-out marginal log-likelihood by importance sampling (metrics.marginal_log_likelihood,
BaseModel.get_marginal_ll), checked on models whose marginal likelihood is known in closed form."""

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scipy.special
import scipy.stats
import torch
from anndata import AnnData
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

import pyro_sc
from pyro_sc import datasets, metrics
from pyro_sc.data import AnnDataSetup
from pyro_sc.infer import evaluate_loss

A, B = 3.0, 0.5  # rate_n ~ Gamma(shape A, rate B)


def register(x_ng) -> AnnDataSetup:
    x_ng = np.asarray(x_ng, dtype=np.float32)
    adata = AnnData(x_ng, var=pd.DataFrame(index=[f"g{g}" for g in range(x_ng.shape[1])]))
    return AnnDataSetup(adata, allow_empty_cells=True)  # Poisson counts may be all zero


def nb_logpmf(x_n):
    """The Gamma-Poisson marginal: NB(n = A, p = B / (B + 1))."""
    return scipy.stats.nbinom.logpmf(x_n, A, B / (B + 1))


# ----------------------------------------------------------------------------------------------
# (a) Gamma-Poisson: rate_n ~ Gamma(A, B), x_n ~ Poisson(rate_n)
# ----------------------------------------------------------------------------------------------
def gamma_poisson_model(mb):
    with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
        rate_n = pyro.sample("rate", dist.Gamma(A, B))
        pyro.sample("x", dist.Poisson(rate_n), obs=mb.x_ng[:, 0])


def exact_posterior_guide(mb):
    with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
        pyro.sample("rate", dist.Gamma(A + mb.x_ng[:, 0], B + 1.0))


def lognormal_guide(mb, widen: float = 2.0):
    """Log-normal moment-matched to the exact Gamma posterior, then widened: a deliberately poor guide."""
    alpha_n, beta = A + mb.x_ng[:, 0], B + 1.0
    var_log_n = torch.log1p(1.0 / alpha_n)
    loc_n = torch.log(alpha_n / beta) - var_log_n / 2
    with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
        pyro.sample("rate", dist.LogNormal(loc_n, widen * var_log_n.sqrt()))


@pytest.fixture(scope="module")
def gamma_poisson():
    rng = np.random.default_rng(0)
    x_n = rng.poisson(rng.gamma(A, 1.0 / B, size=600))
    return register(x_n[:, None]), nb_logpmf(x_n)


@pytest.mark.parametrize("n_samples", [1, 7])
def test_exact_posterior_guide_gives_the_exact_marginal(gamma_poisson, n_samples):
    setup, truth_n = gamma_poisson
    # small minibatches and passes, so the chunking over cells and samples is exercised
    ll_n = metrics.marginal_log_likelihood(
        gamma_poisson_model, exact_posterior_guide, setup, n_samples=n_samples, batch_size=64,
        particles_per_pass=3,
    )
    assert ll_n.shape == truth_n.shape and ll_n.dtype == np.float64
    np.testing.assert_allclose(ll_n, truth_n, rtol=1e-5, atol=1e-4)
    subset = np.array([5, 0, 599, 17])
    np.testing.assert_allclose(
        metrics.marginal_log_likelihood(gamma_poisson_model, exact_posterior_guide, setup, subset),
        truth_n[subset], rtol=1e-5, atol=1e-4,
    )


def test_imperfect_guide_is_below_the_truth_and_converges(gamma_poisson):
    setup, truth_n = gamma_poisson
    gaps, ses = {}, {}
    for k in (1, 10, 200):
        error_n = metrics.marginal_log_likelihood(
            gamma_poisson_model, lognormal_guide, setup, n_samples=k, seed=k, batch_size=600,
            particles_per_pass=200,
        ) - truth_n
        gaps[k], ses[k] = error_n.mean(), error_n.std() / np.sqrt(error_n.size)
    # Jensen: E[log p_hat_K] <= log p(x), clearly so at K = 1 (the ELBO); the gap shrinks with K
    assert gaps[1] + 4 * ses[1] < 0
    assert 0.25 * gaps[1] < gaps[10] < 0  # K = 1: -0.68 +- 0.10; K = 10: -0.034 +- 0.010
    assert abs(gaps[200]) < 4 * ses[200] + 1e-3 and abs(gaps[200]) < 0.05 * abs(gaps[1])


def test_log_weights_are_returned_per_cell_and_draw(gamma_poisson):
    setup, truth_n = gamma_poisson
    cells = np.arange(50)
    # the exact posterior as proposal: every weight is p(x_n) itself
    log_w = metrics.marginal_log_likelihood(
        gamma_poisson_model, exact_posterior_guide, setup, cells, n_samples=6, particles_per_pass=4,
        return_log_weights=True,
    )
    assert log_w.shape == (50, 6) and log_w.dtype == np.float64
    np.testing.assert_allclose(log_w, np.repeat(truth_n[cells, None], 6, axis=1), rtol=1e-5, atol=1e-4)
    # a poor proposal: weights vary over the draws, and the estimate is their log-mean-exp (same seed)
    kwargs = dict(n_samples=40, seed=3, batch_size=20, particles_per_pass=7)
    log_w = metrics.marginal_log_likelihood(gamma_poisson_model, lognormal_guide, setup, cells, return_log_weights=True, **kwargs)
    estimate_n = metrics.marginal_log_likelihood(gamma_poisson_model, lognormal_guide, setup, cells, **kwargs)
    assert log_w.shape == (50, 40) and (log_w.std(axis=1) > 0.01).all()
    np.testing.assert_allclose(scipy.special.logsumexp(log_w, axis=1) - np.log(40), estimate_n, rtol=1e-10)


def test_masked_sites_count_for_nothing(gamma_poisson):
    setup, truth_n = gamma_poisson

    def kept(mb):
        return mb.idx_n % 3 != 0

    def masked_model(mb):
        with poutine.mask(mask=kept(mb)):
            gamma_poisson_model(mb)

    def masked_guide(mb):
        with poutine.mask(mask=kept(mb)):
            exact_posterior_guide(mb)

    ll_n = metrics.marginal_log_likelihood(masked_model, masked_guide, setup, n_samples=3)
    expected_n = np.where(np.arange(setup.n_obs) % 3 != 0, truth_n, 0.0)
    np.testing.assert_allclose(ll_n, expected_n, rtol=1e-5, atol=1e-4)


def test_latent_left_out_of_the_guide_is_proposed_from_its_prior(gamma_poisson):
    setup, truth_n = gamma_poisson
    cells = np.arange(60)
    error_n = metrics.marginal_log_likelihood(
        gamma_poisson_model, lambda mb: None, setup, cells, n_samples=2000, batch_size=60,
        particles_per_pass=2000, seed=0,
    ) - truth_n[cells]
    # prior importance sampling: consistent (its prior density is not counted as a weight)
    assert abs(error_n.mean()) < 4 * error_n.std() / np.sqrt(error_n.size) + 0.01


def test_seed_reproduces_and_leaves_the_global_rng_alone(gamma_poisson):
    setup, _ = gamma_poisson
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = metrics.marginal_log_likelihood(gamma_poisson_model, lognormal_guide, setup, n_samples=3, seed=1)
    np.testing.assert_array_equal(torch.rand(3), expected_next)
    b = metrics.marginal_log_likelihood(gamma_poisson_model, lognormal_guide, setup, n_samples=3, seed=1)
    np.testing.assert_array_equal(a, b)


def test_bad_arguments(gamma_poisson):
    setup, _ = gamma_poisson
    with pytest.raises(ValueError, match="n_samples"):
        metrics.marginal_log_likelihood(gamma_poisson_model, exact_posterior_guide, setup, n_samples=0)
    with pytest.raises(IndexError):
        metrics.marginal_log_likelihood(gamma_poisson_model, exact_posterior_guide, setup, [600])

    def no_plate_model(mb):
        pyro.sample("x", dist.Poisson(3.0).expand([len(mb)]).to_event(1), obs=mb.x_ng[:, 0])

    with pytest.raises(ValueError, match="cells"):
        metrics.marginal_log_likelihood(no_plate_model, lambda mb: None, setup, n_samples=1)


# ----------------------------------------------------------------------------------------------
# (b) a mixture with an enumerated type, a continuous latent and a global latent
#     pi ~ Dirichlet(ALPHA) (MAP guide at PI), c_n ~ Categorical(pi), x_n,1..3 ~ Poisson(RATES[c_n]),
#     rate_n ~ Gamma(A, B), x_n,0 ~ Poisson(rate_n)
# ----------------------------------------------------------------------------------------------
ALPHA = torch.tensor([2.0, 3.0, 4.0])  # the prior of pi: its density at PI is far from 1
PI = torch.tensor([0.5, 0.3, 0.2])
RATES = torch.tensor([[1.0, 8.0, 3.0], [6.0, 0.5, 3.0], [2.0, 2.0, 12.0]])  # types x genes


def mixture_model(mb):
    pi_c = pyro.sample("pi", dist.Dirichlet(ALPHA))
    with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
        rate_n = pyro.sample("rate", dist.Gamma(A, B))
        pyro.sample("x0", dist.Poisson(rate_n), obs=mb.x_ng[:, 0])
        c_n = pyro.sample("c", dist.Categorical(pi_c), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Poisson(RATES[c_n]).to_event(1), obs=mb.x_ng[:, 1:])


def mixture_guide(mb):
    pyro.sample("pi", dist.Delta(PI, event_dim=1))
    exact_posterior_guide(mb)


def test_enumerated_type_is_summed_exactly_and_the_global_prior_left_out():
    rng = np.random.default_rng(1)
    c_n = rng.choice(3, size=400, p=PI.numpy())
    x_ng = np.column_stack([rng.poisson(rng.gamma(A, 1.0 / B, size=400)), rng.poisson(RATES.numpy()[c_n])])
    setup = register(x_ng)
    log_lik_cn = scipy.stats.poisson.logpmf(x_ng[None, :, 1:], RATES.numpy()[:, None, :]).sum(-1)
    log_mixture_n = scipy.special.logsumexp(log_lik_cn + np.log(PI.numpy())[:, None], axis=0)
    truth_n = nb_logpmf(x_ng[:, 0]) + log_mixture_n
    ll_n = metrics.marginal_log_likelihood(mixture_model, mixture_guide, setup, n_samples=4, batch_size=50)
    np.testing.assert_allclose(ll_n, truth_n, rtol=1e-5, atol=1e-4)
    assert abs(scipy.stats.dirichlet.logpdf(PI.numpy(), ALPHA.numpy())) > 0.1  # 1000 x atol: it would show


def test_global_enumerated_site_is_an_error():
    setup = register(np.ones((10, 1)))

    def model(mb):
        c = pyro.sample("c", dist.Categorical(PI), infer={"enumerate": "parallel"})
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            pyro.sample("x", dist.Poisson(RATES[c, 0]), obs=mb.x_ng[:, 0])

    with pytest.raises(ValueError, match="outside the 'cells' plate"):
        metrics.marginal_log_likelihood(model, lambda mb: None, setup, n_samples=1)


# ----------------------------------------------------------------------------------------------
# (c) the package's models
# ----------------------------------------------------------------------------------------------
def test_cellassign_marginal_is_the_closed_form_mixture():
    adata, markers, _ = datasets.simulate_cellassign(300, n_other_genes=10, seed=2)
    model = pyro_sc.CellAssign(adata, markers, size_factor_key="size_factor")
    model.train(max_epochs=1, num_restarts=1, progress_bar=False)
    with torch.no_grad():
        mb = model._design(model.setup.minibatch(np.arange(adata.n_obs)))
        log_mu_cng, phi_cng = model.module.type_means(mb, model.module.map_delta())
        log_lik_cn = pyro_sc.NegativeBinomial(log_mu_cng.exp(), phi_cng).log_prob(mb.x_ng).sum(-1)
        truth_n = torch.logsumexp(log_lik_cn + model.module.map_pi().log()[:, None], 0).double().numpy()
    ll_n = metrics.marginal_log_likelihood(
        model.model, model.guide, model.setup, n_samples=50, modules=[model.module], batch_size=100
    )
    np.testing.assert_allclose(ll_n, truth_n, rtol=1e-5, atol=1e-3)
    assert model.get_marginal_ll() == pytest.approx(truth_n.mean(), rel=1e-5)


@pytest.fixture(scope="module")
def scvi_split():
    adata = datasets.simulate_scvi(500, 120, n_latent=3, n_types=3, seed=1)
    train, held_out = adata[:400].copy(), adata[400:].copy()
    model = pyro_sc.SCVI(train, batch_key="batch", n_latent=3)
    model.train(max_epochs=15, progress_bar=False, seed=0)
    return model, held_out


def test_scvi_held_out_estimate_is_finite_and_tightens_with_samples(scvi_split):
    model, held_out = scvi_split
    setup = model._setup_for(held_out)
    est = {
        (k, seed): metrics.marginal_log_likelihood(
            model.model, model.guide, setup, n_samples=k, modules=[model.module], seed=seed
        )
        for k, seed in [(1, 0), (1, 1), (10, 0), (100, 0)]
    }
    assert all(np.isfinite(v).all() for v in est.values())
    # Monte-Carlo standard error of a mean over cells at K = 1, from two independent runs
    se_1 = np.std(est[1, 0] - est[1, 1]) / np.sqrt(2 * setup.n_obs)
    # K = 1 is an unbiased estimate of the ELBO (whose KL the training loss computes analytically)
    elbo = -evaluate_loss(
        model.model, model.guide, setup, np.arange(setup.n_obs), elbo=TraceMeanField_ELBO(),
        modules=[model.module],
    )
    assert abs(est[1, 0].mean() - elbo) < 5 * se_1 + 1e-4 * abs(elbo)
    # more samples: the bound tightens (up to Monte-Carlo error)
    assert est[10, 0].mean() > est[1, 0].mean() - 3 * se_1
    assert est[100, 0].mean() > est[10, 0].mean() - 3 * se_1
    assert est[100, 0].mean() > elbo
    # the model API: the mean over the held-out cells, reproducible with its default seed
    mean_ll = model.get_marginal_ll(held_out, n_samples=100)
    assert mean_ll == pytest.approx(est[100, 0].mean(), abs=5 * se_1)
    assert model.get_marginal_ll(held_out, n_samples=100) == mean_ll
    assert np.isfinite(model.get_marginal_ll(n_samples=5))  # the training data by default


def test_get_marginal_ll_needs_a_trained_model():
    adata = datasets.simulate_scvi(50, 20, seed=3)
    with pytest.raises(RuntimeError, match="not trained"):
        pyro_sc.SCVI(adata).get_marginal_ll()


# ----------------------------------------------------------------------------------------------
# (d) A type enumerated in the guide: c ~ Cat(PI_D), z | c ~ N(M_c, 1), x | z ~ N(z, S_D^2)
# ----------------------------------------------------------------------------------------------
PI_D, M_D, S_D = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([10.0, 13.0, 17.0]), 0.7  # x stays positive


def guide_typed_model(mb):
    with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
        c_n = pyro.sample("c", dist.Categorical(PI_D))
        z_n = pyro.sample("z", dist.Normal(M_D[c_n], 1.0))
        pyro.sample("x", dist.Normal(z_n, S_D), obs=mb.x_ng[:, 0])


def guide_typed_guide(mb, widen: float = 1.0):
    """q(c | x) deliberately wrong (uniform-ish); q(z | x, c) the exact conditional posterior, widened."""
    x_n = mb.x_ng[:, 0]
    with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
        c_n = pyro.sample("c", dist.Categorical(logits=torch.zeros(3)), infer={"enumerate": "parallel"})
        precision = 1.0 + 1.0 / S_D**2
        loc_n = (M_D[c_n] + x_n / S_D**2) / precision
        pyro.sample("z", dist.Normal(loc_n, widen / precision**0.5))


@pytest.fixture(scope="module")
def guide_typed():
    rng = np.random.default_rng(1)
    c_n = rng.choice(3, size=400, p=PI_D.numpy())
    x_n = rng.normal(rng.normal(M_D.numpy()[c_n], 1.0), S_D)
    # the exact marginal: sum_c PI_c N(x; M_c, 1 + S_D^2)
    log_terms = np.log(PI_D.numpy())[None] + scipy.stats.norm.logpdf(
        x_n[:, None], M_D.numpy()[None], np.sqrt(1 + S_D**2)
    )
    adata = AnnData(x_n[:, None].astype(np.float32), var=pd.DataFrame(index=["g0"]))
    return AnnDataSetup(adata, allow_non_integer=True), scipy.special.logsumexp(log_terms, axis=1)


def test_a_type_the_guide_enumerates_is_summed_out_exactly(guide_typed):
    setup, truth_n = guide_typed
    # exact conditional proposals: every weight is p(x, c), whatever q(c | x), for any K
    ll_n = metrics.marginal_log_likelihood(guide_typed_model, guide_typed_guide, setup, n_samples=3, batch_size=50)
    np.testing.assert_allclose(ll_n, truth_n, rtol=1e-5, atol=1e-4)
    # a widened proposal: a lower bound that closes in on the truth as K grows
    ll_1 = metrics.marginal_log_likelihood(
        guide_typed_model, lambda mb: guide_typed_guide(mb, 2.0), setup, n_samples=1, seed=0
    )
    ll_200 = metrics.marginal_log_likelihood(
        guide_typed_model, lambda mb: guide_typed_guide(mb, 2.0), setup, n_samples=200, seed=0
    )
    assert ll_1.mean() < ll_200.mean() - 0.1
    assert abs(ll_200.mean() - truth_n.mean()) < 0.02

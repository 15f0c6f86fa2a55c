"""Tests of pyro_sc.distributions: accuracy against float64 / arbitrary-precision references, gradients,
moments of the samplers, shapes under broadcasting, expand, plates and enumeration, and validation.

The grids here are mostly nonzero, so float32 parameters take the dense lgamma path; the fused float32
path of sparse counts (what training takes), with its second derivatives, is tested in
test_distributions_float32.py."""

import itertools
import math
import warnings

import mpmath  # a dependency of sympy, hence of torch
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from scipy import stats

from pyro_sc.distributions import NegativeBinomial, TopKCategorical, ZeroInflatedNegativeBinomial

MUS = [1e-6, 1e-3, 0.1, 1.0, 10.0, 1e3, 1e5]
THETAS = [1e-3, 0.1, 1.0, 10.0, 1e3, 1e5]
COUNTS = [0.0, 1.0, 2.0, 10.0, 100.0, 1e3, 1e4, 1e5]
GRID = list(itertools.product(MUS, THETAS, COUNTS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@mpmath.workdps(50)
def _mp_nb_log_prob(mu: float, theta: float, x: float) -> mpmath.mpf:
    """log NB(x | mu, theta) in 50-digit arithmetic."""
    mu, theta, x = mpmath.mpf(mu), mpmath.mpf(theta), mpmath.mpf(x)
    return (
        mpmath.loggamma(x + theta)
        - mpmath.loggamma(theta)
        - mpmath.loggamma(x + 1)
        + theta * mpmath.log(theta / (theta + mu))
        + x * mpmath.log(mu / (theta + mu))
    )


@mpmath.workdps(50)
def _mp_nb_log_derivatives(
    mu: float, theta: float, x: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(d log NB / d log mu, d log NB / d log theta) in 50-digit arithmetic, and for each the sum of the
    magnitudes of its terms (the scale of its rounding error)."""
    mu, theta, x = mpmath.mpf(mu), mpmath.mpf(theta), mpmath.mpf(x)
    mu_terms = [x, -mu * (x + theta) / (mu + theta)]
    theta_terms = [
        theta * (mpmath.digamma(x + theta) - mpmath.digamma(theta)),
        theta * mpmath.log(theta / (theta + mu)),
        theta * (mu - x) / (theta + mu),
    ]
    return (
        (float(sum(mu_terms)), float(sum(theta_terms))),
        (float(sum(map(abs, mu_terms))), float(sum(map(abs, theta_terms)))),
    )


def _grid_tensors(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mu, theta, x = torch.tensor(GRID, dtype=dtype).T
    return mu, theta, x


def _float64_nb_log_prob(mu: np.ndarray, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Reference log NB via scipy (n = theta, p = theta / (theta + mu)), for well-conditioned values."""
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


# ------------------------------------------------------------------------------------------------- accuracy


def test_nb_log_prob_matches_scipy():
    mu, theta, x = _grid_tensors(torch.float64)
    # scipy takes p = theta / (theta + mu): below mu / theta = 1e-6 the float64 p no longer carries
    # 1 - p = mu / (theta + mu) accurately and scipy's logpmf is off by up to 1.1 nats (mu = 1e-6,
    # theta = x = 1e5). Those corners are covered by the mpmath test below.
    keep = mu / theta >= 1e-6
    mu, theta, x = mu[keep], theta[keep], x[keep]
    expected = _float64_nb_log_prob(mu.numpy(), theta.numpy(), x.numpy())
    actual = NegativeBinomial(mu, theta).log_prob(x).numpy()
    # scipy subtracts lgamma values directly: its own error reaches 1e-10 relative at x = theta = 1e5.
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nb_log_prob_matches_mpmath(dtype):
    mu, theta, x = _grid_tensors(dtype)
    actual = NegativeBinomial(mu, theta).log_prob(x).double().numpy()
    # The reference is exact at the (rounded) inputs the distribution sees.
    points = list(zip(mu.tolist(), theta.tolist(), x.tolist()))
    expected = np.array([float(_mp_nb_log_prob(*p)) for p in points])
    derivatives = np.abs(np.array([_mp_nb_log_derivatives(*p)[0] for p in points]))
    # No float implementation beats its own inputs and output: relative perturbations of one ulp in mu and
    # theta move log p by eps |d log p / d log mu| and eps |d log p / d log theta|, rounding the result costs
    # eps |log p|. Allowed: 8 times that condition number. Measured: 3.9 (float64), 3.4 (float32); the naive
    # lgamma(x + theta) - lgamma(theta) - ... formula reaches 3e5 (float64) and 2e5 (float32) at theta = 1e5.
    condition = np.abs(expected) + derivatives.sum(1)
    tolerance = 8 * torch.finfo(dtype).eps * condition
    error = np.abs(actual - expected)
    worst = int(np.argmax(error / tolerance))
    assert np.all(error <= tolerance), f"(mu, theta, x) = {GRID[worst]}: error {error[worst]:.3g}"


def test_nb_small_counts_large_theta_float32():
    """Where float32 lgamma(x + theta) - lgamma(theta) cancels against x log(theta + mu): theta = 1e5."""
    x = torch.arange(0.0, 8.0)
    actual = NegativeBinomial(torch.tensor(3.0), torch.tensor(1e5)).log_prob(x).double().numpy()
    expected = _float64_nb_log_prob(3.0, 1e5, x.double().numpy())
    # log p is about -2 and well conditioned. Measured: 5e-7 for x > 0; 2.6e-6 at x = 0, where the float32
    # logits log(mu) - log(theta) = -10.4 carry 5e-7. The naive lgamma formula is off by 0.09.
    np.testing.assert_allclose(actual, expected, rtol=0, atol=5e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nb_gradients_match_closed_form(dtype):
    mu, theta, x = _grid_tensors(dtype)
    log_mu, log_theta = mu.log().requires_grad_(True), theta.log().requires_grad_(True)
    NegativeBinomial(log_mu.exp(), log_theta.exp()).log_prob(x).sum().backward()
    points = zip(log_mu.exp().tolist(), log_theta.exp().tolist(), x.tolist())
    expected, scale = (np.array(v) for v in zip(*(_mp_nb_log_derivatives(*p) for p in points)))
    actual = torch.stack([log_mu.grad, log_theta.grad], 1).double().numpy()
    # Allowed: 32 ulps of the sum of the magnitudes of the terms of each derivative, x - mu (x + theta) /
    # (mu + theta) and theta (digamma(x + theta) - digamma(theta) + log(theta / (theta + mu)) + (mu - x) /
    # (theta + mu)). Measured: 14 (float64), 6 (float32); the naive formula reaches 2e11 and 4e6.
    error = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(error / scale), error.shape)
    assert np.all(error <= 32 * torch.finfo(dtype).eps * scale), f"{GRID[worst[0]]}, d/d log param {worst[1]}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_finite_at_grid_extremes(dtype):
    corners = itertools.product([1e-6, 1e5], [1e-3, 1e5], [0.0, 1.0, 1e5], [-1e4, -30.0, 0.0, 30.0, 1e4])
    corners = list(corners)
    mu, theta, x, zi_logits = torch.tensor(corners, dtype=dtype).T
    for params in ([mu, theta], [mu, theta, zi_logits]):
        params = [p.clone().requires_grad_(True) for p in params]
        cls = NegativeBinomial if len(params) == 2 else ZeroInflatedNegativeBinomial
        log_prob = cls(*params).log_prob(x)
        assert torch.isfinite(log_prob).all()
        grads = torch.autograd.grad(log_prob.sum(), params)
        for name, grad in zip(["mu", "theta", "zi_logits"], grads):
            assert torch.isfinite(grad).all(), f"{cls.__name__}: non-finite d/d{name}"


@mpmath.workdps(50)
def _mp_zinb(mu: float, theta: float, zi_logits: float, x: float) -> float:
    """log ZINB in 50-digit arithmetic: log(pi + (1 - pi) NB(0)) at 0, log(1 - pi) + log NB(x) above."""
    pi = 1 / (1 + mpmath.exp(-mpmath.mpf(zi_logits)))
    log_nb = _mp_nb_log_prob(mu, theta, x)
    if x == 0:
        return float(mpmath.log(pi + (1 - pi) * mpmath.exp(log_nb)))
    return float(mpmath.log(1 - pi) + log_nb)


def test_zinb_log_prob_matches_mpmath():
    cases = list(
        itertools.product([1e-3, 1.0, 50.0], [0.1, 2.0, 1e4], [-8.0, 0.0, 3.0], [0.0, 1.0, 7.0, 300.0])
    )
    mu, theta, zi_logits, x = torch.tensor(cases, dtype=torch.float64).T
    actual = ZeroInflatedNegativeBinomial(mu, theta, zi_logits).log_prob(x).numpy()
    expected = np.array([_mp_zinb(*c) for c in cases])
    np.testing.assert_allclose(actual, expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("zi_logits", [-math.inf, -1e4])
def test_zinb_without_inflation_is_nb(zi_logits):
    mu, theta, x = _grid_tensors(torch.float64)
    zinb = ZeroInflatedNegativeBinomial(mu, theta, torch.full_like(mu, zi_logits)).log_prob(x)
    nb = NegativeBinomial(mu, theta).log_prob(x)
    # An extra zero of probability e^-1e4 still matters where NB(0) is smaller (mu = theta = 1e5).
    negligible = nb > zi_logits + 50
    torch.testing.assert_close(zinb[negligible], nb[negligible], rtol=0, atol=0)


def test_zinb_full_inflation_puts_mass_at_zero():
    mu, theta = torch.tensor([1e-3, 1.0, 1e3, 1e5]), torch.tensor([0.1, 1.0, 10.0, 1e5])
    zinb = ZeroInflatedNegativeBinomial(mu, theta, torch.tensor(50.0))
    torch.testing.assert_close(zinb.log_prob(torch.zeros(4)), torch.zeros(4), rtol=0, atol=1e-20)
    # For x > 0 only the log(1 - pi) = -50 penalty is added to the NB term.
    x = torch.tensor([1.0, 3.0, 900.0, 1e5])
    torch.testing.assert_close(zinb.log_prob(x), NegativeBinomial(mu, theta).log_prob(x) - 50.0)


# ------------------------------------------------------------------------------------------------- sampling

N_SAMPLES = 200_000


def _assert_moments(samples: torch.Tensor, mean: float, variance: float) -> None:
    """Sample mean and variance within 5 standard errors of the exact moments."""
    samples = samples.double()
    n = samples.numel()
    centered = samples - samples.mean()
    sample_var = centered.square().mean()
    # Standard error of the sample variance from the sample fourth central moment.
    se_var = math.sqrt((centered.pow(4).mean() - sample_var.square()).item() / n)
    assert abs(samples.mean().item() - mean) < 5 * math.sqrt(variance / n)
    assert abs(sample_var.item() - variance) < 5 * se_var


@pytest.mark.parametrize("mu, theta", [(0.3, 0.2), (5.0, 2.0), (50.0, 100.0)])
def test_nb_sample_moments(mu, theta):
    d = NegativeBinomial(torch.tensor(mu), torch.tensor(theta))
    samples = d.sample((N_SAMPLES,))
    assert samples.shape == (N_SAMPLES,)
    assert torch.all(samples == samples.round()) and torch.all(samples >= 0)
    _assert_moments(samples, d.mean.item(), d.variance.item())
    assert d.variance.item() == pytest.approx(mu + mu**2 / theta)


@pytest.mark.parametrize("mu, theta, zi_logits", [(0.3, 0.2, -1.0), (5.0, 2.0, 0.5), (50.0, 100.0, 1.0)])
def test_zinb_sample_moments(mu, theta, zi_logits):
    d = ZeroInflatedNegativeBinomial(torch.tensor(mu), torch.tensor(theta), torch.tensor(zi_logits))
    samples = d.sample((N_SAMPLES,))
    _assert_moments(samples, d.mean.item(), d.variance.item())
    pi = 1 / (1 + math.exp(-zi_logits))
    assert d.mean.item() == pytest.approx((1 - pi) * mu)
    # Mixture variance: E[Var] + Var[E] = (1 - pi)(mu + mu^2 / theta) + pi (1 - pi) mu^2.
    assert d.variance.item() == pytest.approx((1 - pi) * (mu + mu**2 / theta) + pi * (1 - pi) * mu**2)


# ------------------------------------------------------------------------------------------------- shapes


def _counts(*shape: int, seed: int = 1) -> torch.Tensor:
    """Sparse counts: about 60% zeros, the rest up to a few hundred."""
    generator = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(shape, generator=generator).pow(12) * 300, generator=generator)


def test_per_gene_theta_broadcasts_without_expanding():
    n_cells, n_genes = 6, 5
    mu = torch.rand(n_cells, n_genes, dtype=torch.float64) * 20 + 0.01
    theta = torch.rand(n_genes, dtype=torch.float64) * 5 + 0.1
    zi_logits = torch.randn(n_genes, dtype=torch.float64)
    x = _counts(n_cells, n_genes).double()
    nb = NegativeBinomial(mu, theta)
    assert nb.batch_shape == (n_cells, n_genes) and nb.theta.shape == (n_genes,)
    expected = _float64_nb_log_prob(mu.numpy(), theta.expand_as(mu).numpy(), x.numpy())
    np.testing.assert_allclose(nb.log_prob(x).numpy(), expected, rtol=1e-12)
    zinb = ZeroInflatedNegativeBinomial(mu, theta, zi_logits)
    assert zinb.batch_shape == (n_cells, n_genes) and zinb.zi_logits.shape == (n_genes,)
    explicit = ZeroInflatedNegativeBinomial(mu, theta.expand_as(mu), zi_logits.expand_as(mu))
    torch.testing.assert_close(zinb.log_prob(x), explicit.log_prob(x), rtol=1e-14, atol=0)


def test_log_prob_extremes_of_sparsity():
    mu, theta = torch.full((3, 4), 2.0), torch.full((4,), 0.5)
    for x in (torch.zeros(3, 4), torch.ones(3, 4)):
        expected = _float64_nb_log_prob(2.0, 0.5, x.numpy())
        np.testing.assert_allclose(NegativeBinomial(mu, theta).log_prob(x).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("cls", [NegativeBinomial, ZeroInflatedNegativeBinomial])
def test_expand(cls):
    n_genes = 4
    params = [torch.rand(n_genes) + 0.5 for _ in cls.arg_constraints]
    d = cls(*params)
    expanded = d.expand((2, 3, n_genes))
    assert type(expanded) is cls and expanded.batch_shape == (2, 3, n_genes)
    assert all(getattr(expanded, name).shape == (n_genes,) for name in cls.arg_constraints)
    assert expanded.mean.shape == expanded.variance.shape == (2, 3, n_genes)
    assert expanded.sample().shape == (2, 3, n_genes)
    assert expanded.sample((5,)).shape == (5, 2, 3, n_genes)
    x = _counts(3, n_genes)
    log_prob = expanded.log_prob(x)
    assert log_prob.shape == (2, 3, n_genes)
    torch.testing.assert_close(log_prob, cls(*(p.expand(2, 3, n_genes) for p in params)).log_prob(x))
    # A value smaller than batch_shape still yields a full batch_shape log_prob.
    assert expanded.log_prob(torch.tensor(1.0)).shape == (2, 3, n_genes)
    for bad_shape in [(3, 2), (n_genes + 1,), ()]:
        with pytest.raises(ValueError):
            d.expand(bad_shape)


@pytest.mark.parametrize("cls", [NegativeBinomial, ZeroInflatedNegativeBinomial])
def test_enumeration_shapes(cls):
    """Parameters with an enumeration dim (C, 1, N, G) against (N, G) data, as under parallel enumeration."""
    n_states, n_cells, n_genes = 3, 5, 4
    mu = torch.rand(n_states, 1, n_cells, n_genes, dtype=torch.float64) * 10 + 0.1
    theta = torch.rand(n_genes, dtype=torch.float64) + 0.5
    extra = [torch.randn(n_genes, dtype=torch.float64)] if cls is ZeroInflatedNegativeBinomial else []
    x = _counts(n_cells, n_genes).double()
    d = cls(mu, theta, *extra)
    log_prob = d.log_prob(x)
    assert log_prob.shape == (n_states, 1, n_cells, n_genes)
    for c in range(n_states):
        torch.testing.assert_close(log_prob[c, 0], cls(mu[c, 0], theta, *extra).log_prob(x))
    event = d.to_event(1)
    assert event.batch_shape == (n_states, 1, n_cells) and event.event_shape == (n_genes,)
    torch.testing.assert_close(event.log_prob(x), log_prob.sum(-1))
    # Samples carry the sample dims in front; their log_prob broadcasts against batch_shape.
    samples = d.sample((2,))
    assert samples.shape == (2, n_states, 1, n_cells, n_genes)
    assert d.log_prob(samples).shape == samples.shape


@pytest.mark.parametrize("cls", [NegativeBinomial, ZeroInflatedNegativeBinomial])
def test_observation_site_under_plate(cls):
    """Per-gene parameters in a cells plate: pyro expands the distribution to (cells, genes)."""
    n_cells, n_genes = 6, 4
    params = [torch.rand(n_genes) + 0.5 for _ in cls.arg_constraints]
    x = _counts(n_cells, n_genes)

    def model():
        with pyro.plate("cells", n_cells):
            pyro.sample("x", cls(*params).to_event(1), obs=x)

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    site = trace.nodes["x"]
    assert site["fn"].batch_shape == (n_cells,)
    expected = cls(*params).log_prob(x).sum(-1)
    torch.testing.assert_close(site["log_prob"], expected)


def test_trace_enum_elbo_marginalises_cluster_through_nb():
    """TraceEnum_ELBO over a discrete cluster feeding mu equals the hand-computed log-sum-exp marginal."""
    pyro.clear_param_store()
    n_clusters, n_cells, n_genes = 3, 7, 5
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    rates = torch.rand(n_clusters, n_genes, dtype=torch.float64) * 8 + 0.2
    size_factors = torch.rand(n_cells, dtype=torch.float64) + 0.5
    theta = torch.rand(n_genes, dtype=torch.float64) * 3 + 0.2
    x = _counts(n_cells, n_genes).double().clamp(max=40)

    @config_enumerate
    def model():
        # A second (size-1) plate puts the enumeration dim at -3: mu gets shape (C, 1, N, G).
        with pyro.plate("batches", 1, dim=-2), pyro.plate("cells", n_cells, dim=-1):
            z = pyro.sample("z", dist.Categorical(weights))
            mu = rates[z] * size_factors.unsqueeze(-1)
            assert mu.shape == (n_clusters, 1, n_cells, n_genes)
            pyro.sample("x", NegativeBinomial(mu, theta).to_event(1), obs=x)

    loss = TraceEnum_ELBO(max_plate_nesting=2).loss(model, lambda: None)

    mu = (rates[:, None, :] * size_factors[None, :, None]).numpy()  # (C, N, G)
    log_nb = _float64_nb_log_prob(mu, np.broadcast_to(theta.numpy(), mu.shape), x.numpy()).sum(-1)
    joint = np.log(weights.numpy())[:, None] + log_nb  # (C, N)
    peak = joint.max(0)
    expected = -np.sum(peak + np.log(np.exp(joint - peak).sum(0)))
    assert math.isfinite(loss)
    assert loss == pytest.approx(expected, rel=1e-10)


def test_jit_trace_elbo_matches_eager_on_new_data():
    """Under JitTrace_ELBO the nonzero pattern is data, not a traced constant."""
    n_cells, n_genes = 8, 5
    mu, theta = torch.rand(n_genes) * 4 + 0.5, torch.rand(n_genes) + 0.5
    zi_logits = torch.randn(n_genes)

    def model(x):
        with pyro.plate("cells", n_cells):
            pyro.sample("nb", NegativeBinomial(mu, theta).to_event(1), obs=x)
            pyro.sample("zinb", ZeroInflatedNegativeBinomial(mu, theta, zi_logits).to_event(1), obs=x)

    jit_elbo = JitTrace_ELBO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings
        jit_elbo.loss(model, lambda x: None, _counts(n_cells, n_genes))
        x = _counts(n_cells, n_genes, seed=2)
        jit_loss = jit_elbo.loss(model, lambda x: None, x)
    assert jit_loss == pytest.approx(Trace_ELBO().loss(model, lambda x: None, x), rel=1e-6)


# ------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("cls", [NegativeBinomial, ZeroInflatedNegativeBinomial])
@pytest.mark.parametrize("value", [-1.0, 0.5, 2.25])
def test_validate_args_rejects_non_counts(cls, value):
    params = [torch.ones(3) for _ in cls.arg_constraints]
    d = cls(*params, validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([0.0, value, 1.0]))
    d.log_prob(torch.tensor([0.0, 3.0, 1.0]))


@pytest.mark.parametrize("cls", [NegativeBinomial, ZeroInflatedNegativeBinomial])
def test_validate_args_rejects_bad_parameters(cls):
    good = [torch.ones(2) for _ in cls.arg_constraints]
    for index in (0, 1):
        bad = list(good)
        bad[index] = torch.tensor([1.0, -1.0])
        with pytest.raises(ValueError):
            cls(*bad, validate_args=True)


def test_top_k_categorical_keeps_the_k_most_probable_values_renormalised():
    logits = torch.randn(5, 6)
    q = TopKCategorical(logits, k=3)
    values = q.enumerate_support()
    assert values.shape == (3, 5)
    for n in range(5):
        top = np.argsort(-logits[n].numpy())[:3]
        assert list(values[:, n].numpy()) == list(top)
        expected = logits[n, top].numpy() - np.log(np.exp(logits[n, top].numpy()).sum())
        np.testing.assert_allclose(q.log_prob(values)[:, n].numpy(), expected, rtol=1e-5, atol=1e-6)
        outside = [c for c in range(6) if c not in top]
        assert torch.isinf(q.log_prob(torch.full((5,), outside[0]))[n])
    draws = q.sample((20000,))
    frequencies = torch.stack([(draws == c).float().mean(0) for c in range(6)], -1)
    torch.testing.assert_close(frequencies, q.probs, atol=0.02, rtol=0)
    assert q.expand((2, 5)).enumerate_support().shape == (3, 2, 5)
    for k in (0, 7):
        with pytest.raises(ValueError, match=rf"k must be between 1 and the number of categories \(6\), got {k}"):
            TopKCategorical(logits, k=k)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_trace_enum_elbo_sums_over_the_top_k_only(k):
    """With a TopKCategorical guide, TraceEnum_ELBO is the exact ELBO of the truncated guide: the sum over
    each cell's k values of q (log p(c) + log p(x | c) - log q); at k = all it is the Categorical guide's."""
    pi_c = torch.tensor([0.1, 0.2, 0.3, 0.4])
    loc_c = torch.tensor([-3.0, -1.0, 1.0, 3.0])
    x_n = torch.tensor([-2.5, 0.2, 2.9, 1.1, -0.7])
    logits_nc = torch.randn(5, 4, requires_grad=True)

    def model():
        with pyro.plate("cells", 5):
            c = pyro.sample("c", dist.Categorical(pi_c))
            pyro.sample("x", dist.Normal(loc_c[c], 1.0), obs=x_n)

    def guide(q):
        with pyro.plate("cells", 5):
            pyro.sample("c", q, infer={"enumerate": "parallel"})

    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, lambda: guide(TopKCategorical(logits_nc, k)))
    q = TopKCategorical(logits_nc, k)
    c_kn = q.enumerate_support()
    log_q = q.log_prob(c_kn)
    terms = log_q.exp() * (pi_c.log()[c_kn] + dist.Normal(loc_c[c_kn], 1.0).log_prob(x_n) - log_q)
    torch.testing.assert_close(loss, -terms.sum())
    if k == 4:
        exact = elbo.differentiable_loss(model, lambda: guide(dist.Categorical(logits=logits_nc)))
        torch.testing.assert_close(loss, exact)

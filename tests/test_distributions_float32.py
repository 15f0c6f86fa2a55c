"""The fused float32 log-prob (``pyro_sc.distributions._FusedLogProb``), the path that training on sparse
counts takes, against float64 autograd of the textbook formula.

Why a file of its own: float32 parameters take the fused path only when at most half the counts are
nonzero (``_mostly_nonzero``); the grids of ``test_distributions.py`` are 87.5 % nonzero and take the dense
lgamma path. Here the counts are about 90 % zeros, in scRNA-seq ranges (mu 0.01..100, theta 0.1..50,
counts up to 500), and every test checks, through a spy on ``_FusedLogProb.apply``, that the fused path is
the one it measures. Covered: values, first derivatives in mu, theta, zi_logits (per-entry and per-gene
theta, the two branches of the nonzero gather), second derivatives (``create_graph=True``, which the fused
backward once answered with the constant first derivatives, dropping the log-prob's curvature), and
pyro's ``AutoLaplaceApproximation`` (a Hessian-based guide) on float32 data.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoLaplaceApproximation
from pyro.ops.hessian import hessian
from scipy import stats

import pyro_sc.distributions as D
from pyro_sc import settings
from pyro_sc.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

EPS = torch.finfo(torch.float32).eps
CELLS, GENES = 200, 40


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls of the fused float32 log-prob: a test asserts it is non-empty, so it measures that path."""
    calls = []
    apply = D._FusedLogProb.apply

    def spy(*args):
        calls.append(tuple(a.shape if a is not None else None for a in args))
        return apply(*args)

    monkeypatch.setattr(D._FusedLogProb, "apply", staticmethod(spy))
    return calls


def _sparse_counts(seed: int = 0, cells: int = CELLS, genes: int = GENES):
    """(mu, per-gene theta, zi_logits, counts), float64 numpy: mu log-uniform in 0.01..100 per entry,
    theta log-uniform in 0.1..50 per gene, zi_logits uniform in -4..4, counts NB(mu, theta) capped at
    500 with 80 % of them then set to zero (about 90 % zeros in all)."""
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.uniform(math.log(0.01), math.log(100.0), (cells, genes)))
    theta = np.exp(rng.uniform(math.log(0.1), math.log(50.0), genes))
    counts = np.minimum(rng.poisson(rng.gamma(theta, mu / theta)), 500) * (rng.random((cells, genes)) > 0.8)
    zi_logits = rng.uniform(-4.0, 4.0, (cells, genes))
    return mu, theta, zi_logits, counts.astype(np.float64)


def test_sparse_counts_are_realistic():
    _, _, _, x = _sparse_counts()
    assert 0.87 < (x == 0).mean() < 0.93
    assert x.max() >= 300 and (x >= 100).sum() >= 10


def _nb64(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB by the lgamma formula in float64 (its cancellation, about 1e-13 here, is far below float32's
    rounding)."""
    log_total = (theta + mu).log()
    return (
        torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
        + theta * (theta.log() - log_total) + x * (mu.log() - log_total)
    )


def _zinb64(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    nb = _nb64(x, mu, theta)
    log_zero = torch.logaddexp(F.logsigmoid(zi_logits), F.logsigmoid(-zi_logits) + nb)
    return torch.where(x == 0, log_zero, F.logsigmoid(-zi_logits) + nb)


def _float32_and_float64(zinb: bool, theta_per: str, seed: int = 0):
    """Parameters on the log scale (log mu, log theta, zi_logits) in float32 and the same (float32-rounded)
    values in float64, all requiring gradients, and the counts in float32 and float64."""
    mu, theta, zi_logits, x = _sparse_counts(seed)
    if theta_per == "entry":
        theta = np.broadcast_to(theta, mu.shape).copy()
    params = [np.log(mu), np.log(theta)] + ([zi_logits] if zinb else [])
    p32 = [torch.tensor(p, dtype=torch.float32).requires_grad_(True) for p in params]
    p64 = [p.detach().double().requires_grad_(True) for p in p32]
    x32 = torch.tensor(x, dtype=torch.float32)
    return p32, p64, x32, x32.double()


def _log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits=None) -> torch.Tensor:
    """The package's log-prob (float32: the fused path) or the float64 reference, by the dtype of x."""
    if x.dtype == torch.float64:
        return _nb64(x, mu, theta) if zi_logits is None else _zinb64(x, mu, theta, zi_logits)
    if zi_logits is None:
        return NegativeBinomial(mu, theta).log_prob(x)
    return ZeroInflatedNegativeBinomial(mu, theta, zi_logits).log_prob(x)


def _log_scale_log_prob(x, log_mu, log_theta, zi_logits=None):
    return _log_prob(x, log_mu.exp(), log_theta.exp(), zi_logits)


# ------------------------------------------------------------------------------------- values, gradients


def test_float64_reference_matches_scipy():
    mu, theta, zi_logits, x = _sparse_counts()
    t = [torch.tensor(a) for a in (x, mu, theta)]
    expected = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    np.testing.assert_allclose(_nb64(*t).numpy(), expected, rtol=1e-11, atol=1e-11)


@pytest.fixture
def kernels(request, monkeypatch):
    """The fused log-prob's element-wise kernels as plain torch, or compiled by ``torch.compile`` (what
    training uses by default; the rest of the suite runs with compilation off, see conftest.py), as the
    test's parameter says. Checks that every kernel the test called was of that kind."""
    compiled = request.param == "compiled"
    monkeypatch.setattr(settings, "compile", compiled)
    monkeypatch.setattr(D, "_COMPILE_MIN_ELEMENTS", 0)  # the test's 200 x 40 entries are below the default
    chosen, kernel = [], D._kernel

    def spy(fn, n_elements, compiled_form=None):
        out = kernel(fn, n_elements, compiled_form)
        chosen.append(out is not fn)
        return out

    monkeypatch.setattr(D, "_kernel", spy)
    yield request.param
    assert chosen and all(c == compiled for c in chosen) and not D._compile_failure


# Compiled: the training case (ZINB, per-gene theta) only. Each further case is another compilation, 45-65 s
# with an empty cache (the suite's time); the other branches are the same function, run plain here.
@pytest.mark.parametrize(
    "kernels, zinb, theta_per",
    [("plain", False, "gene"), ("plain", False, "entry"), ("plain", True, "gene"), ("plain", True, "entry"),
     ("compiled", True, "gene")],
    ids=["plain-NB-gene", "plain-NB-entry", "plain-ZINB-gene", "plain-ZINB-entry", "compiled-ZINB-gene"],
    indirect=["kernels"],
)
def test_fused_float32_log_prob_and_gradients_match_float64(fused_calls, kernels, zinb, theta_per):
    p32, p64, x32, x64 = _float32_and_float64(zinb, theta_per)
    lp32, lp64 = _log_scale_log_prob(x32, *p32), _log_scale_log_prob(x64, *p64)
    assert fused_calls and lp32.dtype == torch.float32
    g32 = torch.autograd.grad(lp32.sum(), p32)
    g64 = torch.autograd.grad(lp64.sum(), p64)

    x, mu = x64, p64[0].detach().exp()
    theta = p64[1].detach().exp().expand_as(mu)
    # Values: a float32 result of float64-accurate work can be no better than the float32 inputs: one ulp
    # in log mu, log theta (zi_logits) moves log p by eps times the derivatives in them, rounding the result
    # costs eps |log p|. For the ZINB the float32 logaddexp of the zero term adds a few ulps of its inputs'
    # magnitudes |log sigmoid(+-zi_logits)| + |log NB(0)|.
    lp64 = lp64.detach()
    condition = lp64.abs() + _per_entry_derivative_magnitudes(x64, p64).sum(0)
    if zinb:
        z = p64[2].detach()
        nb0 = _nb64(torch.zeros_like(mu), mu, theta)
        condition = condition + (F.logsigmoid(z).abs() + F.logsigmoid(-z).abs() + nb0.abs()) * (x == 0)
    error = (lp32.detach().double() - lp64).abs()
    # Allowed: 8 eps condition. Measured: 2.4 (NB), 0.5 (ZINB); max abs error 3.3e-6 (NB) and 6e-7 (ZINB),
    # max relative 5.7e-7 (NB) and 1.9e-5 (ZINB, where log p is near 0: mostly extra zeros).
    worst = int((error / condition).argmax())
    assert torch.all(error <= 8 * EPS * condition), f"value at flat index {worst}: error {error.max():.3g}"
    # Gradients (d / d log mu, d / d log theta, d / d zi_logits): scales of the float32 rounding, per entry.
    # d/d log mu = x - mu (x + theta) / (mu + theta); at a zero count it is mu (p - 1) with p = mu / (mu +
    # theta) from float32 logits, so its error is eps mu, not eps times the result, where mu >> theta.
    # d/d log theta: the magnitudes of theta (digamma(x + theta) - digamma(theta)), theta log(theta / (theta
    # + mu)), theta (mu - x) / (theta + mu). d/d zi_logits: terms of size at most 1.
    scale_mu = x + mu
    scale_theta = theta * (
        (torch.digamma(x + theta) - torch.digamma(theta)).abs()
        + (theta.log() - (theta + mu).log()).abs() + (mu - x).abs() / (theta + mu)
    )
    scales = [scale_mu, scale_theta, torch.ones_like(mu)]
    # Allowed: 8 eps scale. Measured: d/d log mu 1.0 (NB), 1.6 (ZINB); d/d log theta 0.5 and 1.1 (NB, per
    # gene and per entry), 0.2 and 1.0 (ZINB); d/d zi_logits 2.0. Max relative errors: 5.9e-5 (log mu: mu
    # (p - 1) at mu / theta = 500), 6e-4 (log theta, at a zero where the result is 1e-3 of its terms),
    # 2.7e-4 (zi_logits, where sigmoid(-zi_logits) - w nearly cancels; absolute 2.4e-7).
    for name, a, b, scale in zip(["log mu", "log theta", "zi_logits"], g32, g64, scales):
        error = (a.double() - b).abs()
        scale = scale.sum(0) if b.shape != scale.shape else scale  # per-gene theta: summed over cells
        assert torch.all(error <= 8 * EPS * scale), f"d/d {name}: error {error.max():.3g}"


def _per_entry_derivative_magnitudes(x, p64):
    """|d log p / d param| per entry, for each parameter (float64, per-entry copies of the parameters)."""
    shape = x.shape
    params = [p.detach().expand(shape).clone().requires_grad_(True) for p in p64]
    lp = _log_scale_log_prob(x, *params)
    return torch.stack([g.abs() for g in torch.autograd.grad(lp.sum(), params)])


# ------------------------------------------------------------------------------------- second derivatives


def _natural(zinb: bool, seed: int, cells: int = CELLS, genes: int = GENES):
    """(mu, per-gene theta[, per-gene zi_logits]) on their natural scale, float32 and float64 copies
    requiring gradients, and the counts in both dtypes."""
    mu, theta, zi_logits, x = _sparse_counts(seed, cells, genes)
    params = [mu, theta] + ([zi_logits[0]] if zinb else [])
    p32 = [torch.tensor(p, dtype=torch.float32).requires_grad_(True) for p in params]
    p64 = [p.detach().double().requires_grad_(True) for p in p32]
    return p32, p64, torch.tensor(x, dtype=torch.float32), torch.tensor(x)


def test_issue_case_d2_dmu2_of_nb_plus_mu_squared(fused_calls):
    """d2/dmu2 of sum(log NB(x | mu, theta)) + sum(mu^2), per entry (the Hessian in mu is diagonal)."""
    p32, p64, x32, x64 = _natural(zinb=False, seed=1)
    diagonals = []
    for x, (mu, theta) in ((x32, p32), (x64, p64)):
        objective = _log_prob(x, mu, theta).sum() + mu.square().sum()
        (grad,) = torch.autograd.grad(objective, mu, create_graph=True)
        (diagonal,) = torch.autograd.grad(grad.sum(), mu)
        diagonals.append(diagonal.double())
    assert fused_calls
    h32, h64 = diagonals
    mu, theta = p64[0].detach(), p64[1].detach()
    closed_form = -x64 / mu**2 + (x64 + theta) / (mu + theta) ** 2 + 2
    torch.testing.assert_close(h64, closed_form, rtol=1e-12, atol=1e-12)
    # Scale of the float32 rounding: the two terms' magnitudes, and 1 / (mu + theta) at the zeros, where
    # the curvature p (1 - p) / mu comes from the float32 p = mu / (mu + theta).
    scale = x64 / mu**2 + (x64 + theta) / (mu + theta) ** 2 + 1 / (mu + theta) + 2
    error = (h32 - h64).abs()
    # Allowed: 8 eps scale. Measured: 1.1 (max abs 4.8e-5, max relative 2.8e-6); summed over the 8,000
    # entries, 7881.18 (float32) and 7881.17 (float64). Before the fix the float32 value was 2 everywhere
    # (the mu^2 term alone): 16,000 summed.
    assert torch.all(error <= 8 * EPS * scale), f"d2/dmu2: error {error.max():.3g}"
    assert abs(h32.sum() - h64.sum()) <= 1e-5 * h64.abs().sum()


@pytest.mark.parametrize("zinb", [False, True], ids=["NB", "ZINB"])
def test_fused_float32_hessian_matches_float64(fused_calls, zinb):
    """The full Hessian in (mu per entry, theta per gene, zi_logits per gene) of a small sparse problem."""
    p32, p64, x32, x64 = _natural(zinb, seed=2, cells=12, genes=5)
    assert 2 <= (x64 != 0).sum() <= 12
    hessians = []
    for x, params in ((x32, p32), (x64, p64)):
        hessians.append(hessian(_log_prob(x, *params).sum(), params).double())
    assert fused_calls
    h32, h64 = hessians
    # Entries against the geometric mean of their row's and column's diagonal entries (the Hessian's own
    # scale), each widened for mu at a zero count by 1 + mu / theta: its curvature p (1 - p) / mu comes
    # from the float32 p = mu / (mu + theta), whose 1 - p keeps eps / (1 - p) relative accuracy.
    mu, theta = p64[0].detach(), p64[1].detach()
    widen = torch.ones(h64.shape[0], dtype=torch.float64)
    widen[: mu.numel()] += ((mu / theta) * (x64 == 0)).reshape(-1)
    diagonal = h64.diagonal().abs() * widen
    scale = (diagonal[:, None] * diagonal[None, :]).sqrt()
    error = (h32 - h64).abs()
    # Allowed: 16 eps scale. Measured: 6.3 (NB), 3.3 (ZINB); max abs error 4.8e-6 and 1.6e-6 (max |H|
    # 56 and 21).
    assert torch.all(error <= 16 * EPS * scale), f"Hessian: error {error.max():.3g}"


@pytest.mark.parametrize("zinb", [False, True], ids=["NB", "ZINB"])
def test_create_graph_does_not_change_first_derivatives(fused_calls, zinb):
    p32, _, x32, _ = _natural(zinb, seed=3)
    plain = torch.autograd.grad(_log_prob(x32, *p32).sum(), p32)
    with_graph = torch.autograd.grad(_log_prob(x32, *p32).sum(), p32, create_graph=True)
    assert len(fused_calls) == 2
    assert all(g.grad_fn is not None for g in with_graph)
    for a, b in zip(plain, with_graph):
        # the same float32 operations on the same inputs (a backward with a graph recomputes them)
        assert torch.equal(a, b.detach())


# ------------------------------------------------------------------------------------- Laplace approximation

LAPLACE_GENES, LAPLACE_CELLS = 3, 300


def _laplace_data(dtype: torch.dtype):
    """Counts of 3 genes in 300 cells (about 90 % zeros) and the cells' library sizes."""
    rng = np.random.default_rng(0)
    library = np.exp(0.3 * rng.standard_normal(LAPLACE_CELLS))
    rate, theta = np.array([0.04, 0.08, 0.25]), np.array([0.5, 2.0, 1.0])
    counts = rng.poisson(rng.gamma(theta, library[:, None] * rate / theta))
    return torch.tensor(counts, dtype=dtype), torch.tensor(library, dtype=dtype)


def _laplace_model(counts: torch.Tensor, library: torch.Tensor, zinb: bool) -> None:
    zero = torch.zeros((), dtype=counts.dtype)
    with pyro.plate("genes", LAPLACE_GENES):
        log_rate = pyro.sample("log_rate", dist.Normal(zero - 2, 3.0))
        log_theta = pyro.sample("log_theta", dist.Normal(zero, 3.0))
        if zinb:
            zi_logits = pyro.sample("zi_logits", dist.Normal(zero - 2, 1.0))
    with pyro.plate("cells", LAPLACE_CELLS, dim=-2):
        mu, theta = library[:, None] * log_rate.exp(), log_theta.exp()
        if zinb:
            likelihood = ZeroInflatedNegativeBinomial(mu, theta, zi_logits)
        else:
            likelihood = NegativeBinomial(mu, theta)
        pyro.sample("counts", likelihood, obs=counts)


def _laplace_guide(counts, library, zinb, loc=None):
    """An AutoLaplaceApproximation of the model on these data, its loc set to ``loc`` (or fitted to the
    MAP by L-BFGS when None)."""
    guide = AutoLaplaceApproximation(lambda: _laplace_model(counts, library, zinb))
    guide()
    if loc is not None:
        with torch.no_grad():
            guide.loc.copy_(loc)
        return guide
    optimizer = torch.optim.LBFGS(
        [guide.loc], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = Trace_ELBO().differentiable_loss(guide.model, guide)
        loss.backward()
        return loss

    optimizer.step(closure)
    return guide


@pytest.mark.parametrize("zinb", [False, True], ids=["NB", "ZINB"])
def test_laplace_approximation_on_float32_counts_matches_float64(fused_calls, zinb):
    counts64, library64 = _laplace_data(torch.float64)
    assert 0.85 < (counts64 == 0).double().mean() < 0.95
    with pyro.settings.context(module_local_params=True):
        mode = _laplace_guide(counts64, library64, zinb).loc.detach().float()
        assert not fused_calls
        covariances = {}
        for dtype in (torch.float32, torch.float64):
            counts, library = _laplace_data(dtype)
            guide = _laplace_guide(counts, library, zinb, loc=mode.to(dtype))
            calls = len(fused_calls)
            posterior = guide.laplace_approximation().get_posterior()
            assert (len(fused_calls) > calls) == (dtype == torch.float32)  # the Hessian of the fused path
            covariances[dtype] = posterior.covariance_matrix.double()
    cov32, cov64 = covariances[torch.float32], covariances[torch.float64]
    sd = cov64.diagonal().sqrt()
    error = (cov32 - cov64).abs() / (sd[:, None] * sd[None, :])
    # Hessian entries good to a few ulps (see above), times the condition number of the Hessian (about 300
    # here). Allowed: 1e-4 of sd_i sd_j. Measured: 4.3e-7 (NB), 5.7e-6 (ZINB); posterior sd 0.13..2.3.
    assert torch.all(error <= 1e-4), f"Laplace covariance: error {error.max():.3g} of sd_i sd_j"


# ------------------------------------------------------------------------------------- compiled kernels


def test_compiled_kernels_give_the_plain_values_and_gradients(monkeypatch):
    """The training case (ZINB, per-gene theta, sparse counts): compiled and plain kernels agree to a few
    float32 ulps of the terms, values and all three gradients."""
    monkeypatch.setattr(D, "_COMPILE_MIN_ELEMENTS", 0)
    p32, _, x32, _ = _float32_and_float64(zinb=True, theta_per="gene", seed=3)
    results = {}
    for compiled in (False, True):
        monkeypatch.setattr(settings, "compile", compiled)
        lp = _log_scale_log_prob(x32, *p32)
        results[compiled] = [lp.detach(), *torch.autograd.grad(lp.sum(), p32)]
    assert not D._compile_failure and set(D._compiled) == {D._terms_vectorised, D._chain_rule}
    for plain, compiled in zip(results[False], results[True]):
        np.testing.assert_allclose(compiled.numpy(), plain.numpy(), rtol=1e-5, atol=1e-5 * plain.abs().max().item())


def test_a_failed_compilation_warns_once_and_runs_plain(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(D, "_compiled", {})
    monkeypatch.setattr(D, "_compile_failure", [])
    monkeypatch.setattr(D, "_COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(settings, "compile", False)
    p32, _, x32, _ = _float32_and_float64(zinb=True, theta_per="gene")
    plain = _log_scale_log_prob(x32, *p32).detach()
    monkeypatch.setattr(settings, "compile", True)
    message = (
        "pyro_sc could not compile the NB / ZINB log-probability (RuntimeError: no C++ compiler found); it "
        "runs uncompiled from now on (same values, slower). pyro_sc.settings.compile = False skips the attempt."
    )
    with pytest.warns(RuntimeWarning) as caught:
        first = _log_scale_log_prob(x32, *p32).detach()
        second = _log_scale_log_prob(x32, *p32).detach()  # no second attempt, no second warning
    assert [str(w.message) for w in caught] == [message]
    assert torch.equal(first, plain) and torch.equal(second, plain)


def test_no_compilation_when_settings_compile_is_off(monkeypatch):
    def no_compile(fn, **kwargs):
        raise AssertionError("torch.compile was called")

    monkeypatch.setattr(torch, "compile", no_compile)
    monkeypatch.setattr(D, "_compiled", {})
    monkeypatch.setattr(D, "_COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(settings, "compile", False)
    p32, _, x32, _ = _float32_and_float64(zinb=True, theta_per="gene")
    lp = _log_scale_log_prob(x32, *p32)
    torch.autograd.grad(lp.sum(), p32)
    assert D._compiled == {}


def test_scvi_trains_the_same_with_compiled_kernels(monkeypatch):
    """Two epochs of scVI from the same seed: the per-epoch losses with compiled kernels match the plain
    run's to float32 rounding accumulated over the steps."""
    import pyro_sc

    monkeypatch.setattr(D, "_COMPILE_MIN_ELEMENTS", 0)
    adata = pyro_sc.datasets.simulate_scvi(300, 100, n_latent=5, n_types=3, n_batches=2, seed=0)
    losses = {}
    for compiled in (False, True):
        monkeypatch.setattr(settings, "compile", compiled)
        model = pyro_sc.SCVI(adata, batch_key="batch")
        history = model.train(max_epochs=2, seed=0, progress_bar=False)
        losses[compiled] = history[["train_loss", "validation_loss"]].to_numpy()
    assert not D._compile_failure and D._compiled
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_vectorising_lgamma_and_digamma_match_scipy():
    """The compiled kernel's float64 lgamma / digamma (recurrence below 8, asymptotic series above), from
    1e-8 to 1e30, integers and half-integers near the recurrence's edge included."""
    from scipy import special

    z = np.concatenate([np.logspace(-8, 30, 4000), np.arange(1, 300.0), np.arange(0, 20, 0.25) + 0.125, [7.999999, 8.0]])
    got_l = D._lgamma64(torch.tensor(z)).numpy()
    got_d = D._digamma64(torch.tensor(z)).numpy()
    np.testing.assert_allclose(got_l, special.gammaln(z), rtol=2e-14, atol=2e-14)
    np.testing.assert_allclose(got_d, special.digamma(z), rtol=2e-14, atol=2e-14)


# ------------------------------------------------------------------- nonzeros known from the sparse rows


def test_minibatch_from_sparse_rows_carries_its_nonzeros_and_gives_the_same_log_prob(fused_calls):
    """A minibatch densified from CSR rows carries the offsets of its nonzeros (duplicates summed, explicit
    zeros left out), the fused ZINB finds the same ones by searching, on the minibatch's shape and with
    enumerated types in front, and its values and gradients are bit for bit the same either way; a
    minibatch changed in place is searched again."""
    from pyro_sc.data import _dense_tensor

    mu, theta, zi_logits, x = _sparse_counts()
    rows = sp.csr_matrix(x)
    rows.data[:5] = 0  # explicit zeros
    # and row 0's last entry stored twice (1 + its count): a CSR matrix with a duplicate, summed by toarray
    last = rows.indptr[1] - 1
    duplicated = sp.csr_matrix(
        (np.insert(rows.data, last, 1.0), np.insert(rows.indices, last, rows.indices[last]),
         rows.indptr + (np.arange(len(rows.indptr)) > 0)), shape=x.shape,
    )
    assert not duplicated.has_canonical_format
    for matrix in (rows, duplicated):
        value = _dense_tensor(matrix, torch.device("cpu"))
        searched = (value != 0).reshape(-1).nonzero().squeeze(-1)
        assert torch.equal(D._known_nonzeros(value), searched)
        enumerated = torch.Size([3, *value.shape])
        assert torch.equal(
            D._Nonzeros(value, enumerated).flat, (value != 0).expand(enumerated).reshape(-1).nonzero().squeeze(-1)
        )

    value = _dense_tensor(duplicated, torch.device("cpu"))
    params = [torch.tensor(a, dtype=torch.float32) for a in (mu, theta, zi_logits)]
    enumerated_mu = params[0] * torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    results = []
    for counts in (value, value.clone()):  # carries its nonzeros; a copy does not
        for m in (params[0], enumerated_mu):
            leaves = [p.clone().requires_grad_() for p in (m, *params[1:])]
            lp = ZeroInflatedNegativeBinomial(*leaves, validate_args=False).log_prob(counts)
            results.append([lp.detach(), *torch.autograd.grad(lp.sum(), leaves)])
    assert len(fused_calls) == 4
    assert D._known_nonzeros(value) is not None and D._known_nonzeros(value.clone()) is None
    for known, searched in zip(results[:2], results[2:]):
        assert all(torch.equal(a, b) for a, b in zip(known, searched))

    value[0, 0] += 1  # in place: the offsets it carries may be stale, so they are not used
    assert D._known_nonzeros(value) is None

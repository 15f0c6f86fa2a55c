"""NMF baselines: monotone objectives, a planted factorisation recovered, the ARI record, bad input."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from scipy.optimize import linear_sum_assignment
from scipy.stats import poisson

from pyro_sc import nmf


def planted(n_genes=120, n_cells=200, k=4, seed=0):
    """W (genes x K) with 30 genes of its own per factor on a faint background; H (K x cells) with one
    dominant factor per cell; the dominant factor as the cell's label."""
    rng = np.random.default_rng(seed)
    w_gk = rng.uniform(0.0, 0.1, (n_genes, k))
    for j in range(k):
        w_gk[j * 30 : (j + 1) * 30, j] += rng.uniform(1.0, 3.0, 30)
    label_n = rng.integers(0, k, n_cells)
    h_kn = rng.uniform(0.0, 1.0, (k, n_cells))
    h_kn[label_n, np.arange(n_cells)] += rng.uniform(5.0, 10.0, n_cells)
    return w_gk, h_kn, label_n


def matched_correlations(true_gk, fitted_gk):
    corr = np.corrcoef(true_gk.T, fitted_gk.T)[: true_gk.shape[1], true_gk.shape[1] :]
    rows, cols = linear_sum_assignment(-corr)
    return corr[rows, cols]


def test_sse_is_monotone_and_recovers_an_exact_low_rank_matrix():
    w_gk, h_kn, _ = planted()
    x_gn = w_gk @ h_kn
    w_fit, h_fit, history = nmf.nmf_sse(x_gn, 4, n_iter=300, seed=1)
    assert w_fit.shape == (120, 4) and h_fit.shape == (4, 200)
    assert (w_fit >= 0).all() and (h_fit >= 0).all()
    mse = history["objective"].to_numpy()
    assert (np.diff(mse) <= 1e-12 * mse[0]).all()  # never increases
    np.testing.assert_allclose(mse[-1], np.mean((x_gn - w_fit @ h_fit) ** 2), rtol=1e-6)
    assert mse[-1] < 1e-3 * np.mean(x_gn**2)
    assert matched_correlations(w_gk, w_fit).min() > 0.99
    assert matched_correlations(h_kn.T, h_fit.T).min() > 0.99
    assert list(history["iteration"]) == list(range(1, 301)) and "ari" not in history


def test_poisson_is_monotone_and_recovers_the_factors_of_counts():
    w_gk, h_kn, _ = planted(seed=3)
    rng = np.random.default_rng(4)
    x_gn = rng.poisson(5.0 * w_gk @ h_kn)
    w_fit, h_fit, history = nmf.nmf_poisson(sp.csr_matrix(x_gn), 4, n_iter=200, seed=0)
    ll = history["objective"].to_numpy()
    assert (np.diff(ll) >= -1e-12 * abs(ll[0])).all()  # never decreases
    expected = poisson.logpmf(x_gn, w_fit @ h_fit).mean()
    np.testing.assert_allclose(ll[-1], expected, rtol=1e-8)
    assert matched_correlations(w_gk, w_fit).min() > 0.97
    # Poisson NMF at its fit is at least as likely as the truth it was simulated from, nearly
    assert ll[-1] > poisson.logpmf(x_gn, 5.0 * w_gk @ h_kn).mean() - 0.01


def test_ari_is_recorded_at_the_declared_resolution_and_orientation_is_genes_by_cells():
    w_gk, h_kn, label_n = planted(seed=5)
    x_gn = np.random.default_rng(6).poisson(5.0 * w_gk @ h_kn)
    result = nmf.nmf_poisson(x_gn, 4, n_iter=30, seed=0, labels=label_n, resolution=0.3, ari_every=10)
    history = result.history
    assert history["ari"].notna().tolist() == [(i % 10 == 0) for i in range(1, 31)]
    assert history["ari"].iloc[-1] > 0.9
    assert history.attrs["resolution"] == 0.3 and history.attrs["method"] == "leiden"
    proportions_nk = nmf.cell_proportions(result.w_gk, result.h_kn)
    np.testing.assert_allclose(proportions_nk.sum(1), 1.0)
    assert (proportions_nk.argmax(1)[:, None] == np.arange(4)).any(0).all()
    # an AnnData (cells x genes) is read as its transpose; the same seed gives the same factors
    adata = AnnData(x_gn.T.astype(np.float32), obs=pd.DataFrame(index=[f"c{i}" for i in range(200)]))
    again = nmf.nmf_poisson(adata, 4, n_iter=30, seed=0)
    np.testing.assert_allclose(again.w_gk, result.w_gk, rtol=1e-6)
    other_seed = nmf.nmf_poisson(x_gn, 4, n_iter=30, seed=1)
    assert not np.allclose(other_seed.w_gk, result.w_gk)


def test_a_factor_driven_to_zero_stays_finite():
    x_gn = np.zeros((20, 30))
    x_gn[:10, :15] = 3.0  # rank one: with k=3 the extra factors collapse
    for fit in (nmf.nmf_sse, nmf.nmf_poisson):
        w_fit, h_fit, history = fit(x_gn, 3, n_iter=200, seed=0)
        assert np.isfinite(w_fit).all() and np.isfinite(h_fit).all()
        assert np.isfinite(history["objective"]).all()


@pytest.mark.parametrize(
    "x, k, kwargs, message",
    [
        (-np.ones((5, 4)), 2, {}, "negative"),
        (np.full((5, 4), np.nan), 2, {}, "NaN"),
        (np.zeros((5, 4)), 2, {}, "all zeros"),
        (np.ones(5), 2, {}, "2-d"),
        (np.ones((5, 4)), 0, {}, "k must be"),
        (np.ones((5, 4)), 5, {}, "k must be"),
        (np.ones((5, 4)), 2, {"n_iter": 0}, "n_iter"),
        (np.ones((5, 4)), 2, {"labels": ["a", "b", "c"]}, "one entry per cell"),
        (np.ones((5, 4)), 2, {"labels": ["a", None, "b", "a"]}, "missing"),
        (np.ones((5, 4)), 2, {"labels": list("abab"), "ari_every": 0}, "ari_every"),
        (np.array([["1", "2"], ["3", "4"]]), 1, {}, "expected real numbers"),
    ],
)
def test_bad_input_is_named(x, k, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nmf.nmf_sse(x, k, **kwargs)

"""Tests of pyro_sc.metrics: label-transfer scores, graph clustering agreement, LISI."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")

from pyro_sc import metrics  # noqa: E402


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def blobs(n_per: int, n_blobs: int, dim: int = 2, sep: float = 50.0, seed: int = 0):
    """Well-separated isotropic Gaussian blobs (unit variance) along the first axis."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n_blobs, dim))
    centres[:, 0] = sep * np.arange(n_blobs)
    labels = np.repeat(np.arange(n_blobs), n_per)
    return centres[labels] + rng.standard_normal((n_per * n_blobs, dim)), labels


def reference_lisi(x, labels, perplexity, n_neighbors=None, tol=1e-5, max_iter=50):
    """Slow, loop-based LISI following immunogenomics/LISI's compute_simpson_index line by line
    (full distance matrix, unshifted distances, per-cell scalar bisection); 3 * perplexity
    neighbours besides the cell itself by default, as harmonypy >= 2."""
    n = x.shape[0]
    k = int(3 * perplexity) if n_neighbors is None else n_neighbors
    d_full = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    _, codes = np.unique(labels, return_inverse=True)
    log_u = np.log(perplexity)
    out = np.empty(n)
    for i in range(n):
        order = np.argsort(d_full[i])
        order = order[order != i][:k]
        d = d_full[i, order]

        def hbeta(beta):
            p = np.exp(-d * beta)
            s = p.sum()
            return np.log(s) + beta * (d * p).sum() / s, p / s

        beta, beta_min, beta_max = 1.0, -np.inf, np.inf
        h, p = hbeta(beta)
        h_diff = h - log_u
        tries = 0
        while abs(h_diff) > tol and tries < max_iter:
            if h_diff > 0:
                beta_min = beta
                beta = beta * 2 if not np.isfinite(beta_max) else (beta + beta_max) / 2
            else:
                beta_max = beta
                beta = beta / 2 if not np.isfinite(beta_min) else (beta + beta_min) / 2
            h, p = hbeta(beta)
            h_diff = h - log_u
            tries += 1
        simpson = 0.0
        for b in np.unique(codes):
            mass = p[codes[order] == b].sum()
            simpson += mass * mass
        out[i] = 1.0 / simpson
    return out


# ----------------------------------------------------------------------------------------------
# label transfer
# ----------------------------------------------------------------------------------------------
Y_TRUE = np.array(["a", "a", "a", "b", "b", "c"])
Y_PRED = np.array(["a", "b", "a", "b", "b", "a"])


def test_accuracy_and_balanced_accuracy():
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    # recalls a: 2/3, b: 2/2, c: 0/1
    assert metrics.balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx((2 / 3 + 1 + 0) / 3)
    recall = metrics.per_type_recall(Y_TRUE, Y_PRED)
    assert list(recall.index) == ["a", "b", "c"]
    np.testing.assert_allclose(recall.to_numpy(), [2 / 3, 1.0, 0.0])
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert metrics.balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(Y_TRUE, Y_PRED)
    )


def test_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        metrics.accuracy(Y_TRUE, Y_PRED[:-1])


def test_confusion_matrix_counts_and_normalisation():
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED)
    expected = np.array([[2, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert list(cm.index) == ["a", "b", "c"] and list(cm.columns) == ["a", "b", "c"]
    assert cm.index.name == "true" and cm.columns.name == "predicted"
    np.testing.assert_array_equal(cm.to_numpy(), expected)
    np.testing.assert_allclose(
        metrics.confusion_matrix(Y_TRUE, Y_PRED, normalize="true").to_numpy(),
        expected / expected.sum(1, keepdims=True),
    )
    # column "c" has no predictions: left at 0, as in scikit-learn
    np.testing.assert_allclose(
        metrics.confusion_matrix(Y_TRUE, Y_PRED, normalize="pred").to_numpy(),
        [[2 / 3, 1 / 3, 0], [0, 2 / 3, 0], [1 / 3, 0, 0]],
    )
    np.testing.assert_allclose(
        metrics.confusion_matrix(Y_TRUE, Y_PRED, normalize="all").to_numpy(), expected / 6
    )
    with pytest.raises(ValueError):
        metrics.confusion_matrix(Y_TRUE, Y_PRED, normalize="rows")


def test_confusion_matrix_union_of_labels_and_categorical_order():
    y_true = pd.Categorical(["x", "y", "x"], categories=["y", "x"])
    y_pred = np.array(["x", "z", "x"])
    cm = metrics.confusion_matrix(y_true, y_pred)
    assert list(cm.index) == ["y", "x", "z"] == list(cm.columns)
    assert cm.loc["x", "x"] == 2 and cm.loc["y", "z"] == 1 and cm.to_numpy().sum() == 3


# ----------------------------------------------------------------------------------------------
# LISI
# ----------------------------------------------------------------------------------------------
def test_ilisi_separated_batches_is_one():
    x, blob = blobs(150, 2)
    values = metrics.ilisi(x, blob)
    assert values.shape == (300,)
    np.testing.assert_allclose(values, 1.0, atol=1e-12)


def test_ilisi_random_batches_two_and_three():
    x, _ = blobs(150, 2)
    rng = np.random.default_rng(1)
    two = rng.permutation(np.repeat(["p", "q"], 150))
    v2 = metrics.ilisi(x, two)
    assert np.median(v2) > 1.8 and v2.max() <= 2 + 1e-12 and v2.min() >= 1 - 1e-12
    three = rng.permutation(np.repeat([0, 1, 2], 100))
    v3 = metrics.ilisi(x, three)
    assert np.median(v3) > 2.6 and v3.max() <= 3 + 1e-12


@pytest.mark.parametrize(
    "perplexity,n_neighbors", [(10, None), (30, None), (30, 89), (5, 40), (7.5, None), (40, None)]
)
def test_lisi_matches_loop_reference(perplexity, n_neighbors):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, (60, 3)), rng.normal(1.5, 1, (40, 3))])
    labels = rng.choice(["a", "b", "c"], size=100, p=[0.5, 0.3, 0.2])
    fast = metrics.lisi(x, labels, perplexity=perplexity, n_neighbors=n_neighbors)
    slow = reference_lisi(x, labels, perplexity, n_neighbors)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)
    assert np.all((fast >= 1 - 1e-12) & (fast <= 3 + 1e-12))


def test_lisi_matches_harmonypy():
    # harmonypy is in the test extra (setup.cfg): this cross-check runs, it is not skipped when missing
    import harmonypy.lisi as harmonypy_lisi
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.normal(0, 1, (300, 5)), rng.normal(1.5, 1, (200, 5))])
    meta = pd.DataFrame({"label": rng.choice(["a", "b", "c"], size=500)})
    ref = harmonypy_lisi.compute_lisi(x, meta, ["label"], perplexity=20)[:, 0]
    np.testing.assert_allclose(metrics.lisi(x, meta["label"], perplexity=20), ref, atol=1e-6)


def test_lisi_large_distances_are_stable():
    # At distances ~1e3 the reference's exp(-d) underflows; shifting by the nearest distance keeps
    # the kernel family (and so, up to the search tolerance, the LISI) scale-invariant.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 2))
    labels = rng.integers(0, 2, size=120)
    small = metrics.lisi(x, labels, perplexity=10)
    large = metrics.lisi(1000 * x, labels, perplexity=10)
    assert np.all(np.isfinite(large))
    np.testing.assert_allclose(large, small, atol=1e-3)


def test_lisi_knn_algorithms_agree():
    x, _ = blobs(100, 2, dim=4)
    labels = np.random.default_rng(11).integers(0, 2, size=200)
    brute = metrics.lisi(x, labels, perplexity=10)
    np.testing.assert_allclose(metrics.lisi(x, labels, perplexity=10, algorithm="kd_tree"), brute, atol=1e-12)


def test_clisi_and_ilisi_are_lisi():
    x, blob = blobs(50, 2)
    labels = np.random.default_rng(4).integers(0, 3, size=100)
    ref = metrics.lisi(x, labels, perplexity=10)
    np.testing.assert_array_equal(metrics.clisi(x, labels, perplexity=10), ref)
    np.testing.assert_array_equal(metrics.ilisi(x, labels, perplexity=10), ref)


def test_lisi_input_validation():
    x, blob = blobs(20, 2)
    with pytest.raises(ValueError):
        metrics.lisi(x, blob[:-1])
    with pytest.raises(ValueError):
        metrics.lisi(x[:, 0], blob)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        metrics.lisi(bad, blob)


def test_pairwise_ilisi_two_batches_equals_ilisi():
    x, _ = blobs(100, 2)
    batch = np.random.default_rng(5).permutation(np.repeat(["u", "v"], 100))
    np.testing.assert_allclose(metrics.pairwise_ilisi(x, batch), metrics.ilisi(x, batch), atol=1e-12)


def test_pairwise_ilisi_is_median_over_pairs():
    # Batches A and B are mixed in blob 0; batch C sits alone in blob 1.
    x, blob = blobs(120, 2)
    rng = np.random.default_rng(6)
    batch = np.full(blob.shape, "C")
    batch[blob == 0] = rng.permutation(np.repeat(["A", "B"], 60))
    values = metrics.pairwise_ilisi(x, batch)
    ab = np.isin(batch, ["A", "B"])
    a_b = metrics.ilisi(x[ab], batch[ab])  # ~2
    # an A (B) cell: median of its A-B value (~2) and its A-C (B-C) value (exactly 1)
    np.testing.assert_allclose(values[ab], (a_b + 1.0) / 2, atol=1e-12)
    # a C cell: median of C-A and C-B, both exactly 1
    np.testing.assert_allclose(values[~ab], 1.0, atol=1e-12)
    assert np.all((values >= 1 - 1e-12) & (values <= 2 + 1e-12))


def test_batch_mixing_summary():
    x, blob = blobs(100, 2)
    s = metrics.batch_mixing_summary(x, blob, pairwise=True)
    assert s["n_batches"] == 2
    assert s["ilisi_median"] == pytest.approx(1.0)
    assert s["ilisi_scaled"] == pytest.approx(0.0, abs=1e-9)
    assert 1.8 < s["ilisi_random_median"] <= 2.0
    assert s["ilisi_relative_to_random"] == pytest.approx(0.0, abs=1e-9)
    assert s["pairwise_ilisi_median"] == pytest.approx(1.0)
    mixed = np.random.default_rng(7).permutation(blob)
    s = metrics.batch_mixing_summary(x, mixed, random_reference=False)
    assert s["ilisi_median"] > 1.8 and "ilisi_random_median" not in s


# ----------------------------------------------------------------------------------------------
# clustering
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_blobs():
    pytest.importorskip("scanpy")
    pytest.importorskip("igraph")
    return blobs(80, 3, dim=5, sep=30.0, seed=8)


def test_cluster_embedding_recovers_blobs(three_blobs):
    x, labels = three_blobs
    clusters = metrics.cluster_embedding(x, resolution=0.2)
    assert clusters.shape == labels.shape and clusters.dtype.kind == "i"
    np.testing.assert_array_equal(clusters, metrics.cluster_embedding(x, resolution=0.2))  # seeded


def test_clustering_scores_known_and_shuffled_labels(three_blobs):
    x, labels = three_blobs
    s = metrics.clustering_scores(x, labels, resolution=0.2)
    assert s["ari"] > 0.99 and s["nmi"] > 0.99 and s["n_clusters"] == 3
    assert s["resolution"] == 0.2 and s["method"] == "leiden"
    shuffled = np.random.default_rng(9).permutation(labels)
    s = metrics.clustering_scores(x, shuffled, resolution=0.2)
    assert abs(s["ari"]) < 0.05 and s["nmi"] < 0.1


def test_best_over_resolutions_marks_one_best(three_blobs):
    x, labels = three_blobs
    table = metrics.best_over_resolutions(x, labels, resolutions=(0.1, 0.5, 1.0, 2.0))
    assert list(table.columns) == ["resolution", "n_clusters", "ari", "nmi", "best"]
    assert list(table["resolution"]) == [0.1, 0.5, 1.0, 2.0]
    assert table["best"].dtype == bool and table["best"].sum() == 1
    assert table.loc[table["best"], "ari"].item() == table["ari"].max()
    assert table["ari"].max() > 0.99


def test_clustering_bad_method(three_blobs):
    x, labels = three_blobs
    with pytest.raises(ValueError):
        metrics.cluster_embedding(x, method="kmeans")


def test_louvain_recovers_blobs_reproducibly(three_blobs):
    x, labels = three_blobs
    s = metrics.clustering_scores(x, labels, resolution=0.2, method="louvain")
    assert s["ari"] > 0.99 and s["nmi"] > 0.99 and s["n_clusters"] == 3 and s["method"] == "louvain"
    # a graph whose partition is arbitrary (one Gaussian cloud at a high resolution): the seed fixes it,
    # and igraph's RNG is seeded without consuming Python's global random state
    import random

    cloud = np.random.default_rng(12).standard_normal((300, 5))
    random.seed(1)
    expected_next = random.random()
    random.seed(1)
    clusters = metrics.cluster_embedding(cloud, resolution=2.0, method="louvain", seed=3)
    assert random.random() == expected_next
    assert clusters.dtype.kind == "i" and clusters.shape == (300,) and np.unique(clusters).size > 3
    sizes = np.bincount(clusters)
    assert np.all(sizes[:-1] >= sizes[1:])  # numbered by decreasing size
    again = metrics.cluster_embedding(cloud, resolution=2.0, method="louvain", seed=3)
    np.testing.assert_array_equal(clusters, again)
    others = [metrics.cluster_embedding(cloud, resolution=2.0, method="louvain", seed=s) for s in (4, 5)]
    assert any(not np.array_equal(clusters, other) for other in others)  # the seed matters here
    table = metrics.best_over_resolutions(x, labels, resolutions=(0.2, 1.0), method="louvain")
    assert table["ari"].max() > 0.99


def test_plot_lisi_one_violin_per_model():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.collections import PolyCollection

    from pyro_sc import plotting

    rng = np.random.default_rng(13)
    # a constant column (e.g. cLISI 1 in every cell) must plot too
    values = {"scVI": 1 + rng.random(200), "PCA": 1 + 0.5 * rng.random(150), "raw counts": np.full(90, 1.2)}
    fig = plotting.plot_lisi(values, kind="iLISI", title="condition mixing")
    ax = fig.axes[0]
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 3
    assert [t.get_text() for t in ax.get_xticklabels()] == list(values)
    assert [t.get_text() for t in ax.texts] == [f"{np.median(v):.2f}" for v in values.values()]
    assert ax.get_title() == "condition mixing" and "iLISI" in ax.get_ylabel()
    frame = pd.DataFrame({"a": [1.0, 1.5, 2.0, np.nan], "b": [1.0, 1.1, 1.2, 1.3]})
    fig2, ax2 = plt.subplots()
    assert plotting.plot_lisi(frame, kind="cLISI", ax=ax2) is fig2
    assert [t.get_text() for t in ax2.texts] == ["1.50", "1.15"]  # NaN dropped
    with pytest.raises(ValueError):
        plotting.plot_lisi({})
    plt.close("all")

"""Differential expression: known answers on synthetic posterior samples, FDR control, recovery of
simulated DE genes through a trained scVI, and marker genes of real PBMCs."""

import contextlib

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

import pyro_sc
from pyro_sc import datasets
from pyro_sc.de import de_from_samples, flag_de_at_fdr

FLAG = "is_de_fdr_0.05"


# ------------------------------------------------------------------------------ synthetic samples
def lognormal_samples(log2_mean_g, *, n_samples, sd=0.1, seed):
    """Samples (n_samples, genes) with log2 rho ~ N(log2_mean_g, sd^2)."""
    rng = np.random.default_rng(seed)
    return 2.0 ** (log2_mean_g + sd * rng.standard_normal((n_samples, len(log2_mean_g))))


@pytest.fixture(scope="module")
def shifted():
    """40 genes: 20 identical in both groups, then 10 up (log2 FC +2) and 10 down (-1.5) in group 1."""
    base_g = np.random.default_rng(0).uniform(-14, -6, size=40)
    true_lfc_g = np.r_[np.zeros(20), np.full(10, 2.0), np.full(10, -1.5)]
    rho1_sg = lognormal_samples(base_g + true_lfc_g, n_samples=3000, seed=1)
    rho2_sg = lognormal_samples(base_g, n_samples=2000, seed=2)
    genes = [f"g{i}" for i in range(40)]
    return rho1_sg, rho2_sg, pd.Series(true_lfc_g, index=genes)


def test_vanilla_mode_probabilities(shifted):
    rho1_sg, rho2_sg, true_lfc = shifted
    res = de_from_samples(rho1_sg, rho2_sg, gene_names=true_lfc.index, mode="vanilla", seed=0)
    assert list(res.columns) == [
        "proba_de", "proba_not_de", "bayes_factor", "lfc_mean", "lfc_median", "lfc_std", "scale1", "scale2",
        FLAG,
    ]
    assert set(res.index) == set(true_lfc.index)
    res = res.loc[true_lfc.index]
    same, up, down = true_lfc == 0, true_lfc > 0, true_lfc < 0
    # P(rho1 > rho2) = 1/2 for identical distributions (10,000 pairs: standard error 0.005)
    np.testing.assert_allclose(res.loc[same, "proba_de"], 0.5, atol=0.04)
    assert (res.loc[up, "proba_de"] > 0.999).all() and (res.loc[down, "proba_de"] < 0.001).all()
    np.testing.assert_allclose(res["proba_not_de"], 1 - res["proba_de"])
    p = res["proba_de"].to_numpy()
    np.testing.assert_allclose(res["bayes_factor"], np.log(p + 1e-8) - np.log(1 - p + 1e-8))
    # one-sided: the genes up in group 1 are called, not those down
    assert res.loc[up, FLAG].all() and not res.loc[down, FLAG].any()
    assert np.mean(res.loc[res[FLAG], "proba_not_de"]) <= 0.05


def test_change_mode_probabilities_and_fold_changes(shifted):
    rho1_sg, rho2_sg, true_lfc = shifted
    res = de_from_samples(rho1_sg, rho2_sg, gene_names=true_lfc.index, mode="change", delta=0.5, seed=0)
    res = res.loc[true_lfc.index]
    same = true_lfc == 0
    # identical genes: lfc of a pair ~ N(0, 2 * 0.1^2), so P(|lfc| >= 0.5) ~ 4e-4
    assert (res.loc[same, "proba_de"] < 0.01).all()
    assert (res.loc[~same, "proba_de"] > 0.999).all()
    np.testing.assert_allclose(res["lfc_mean"], true_lfc, atol=0.01)
    np.testing.assert_allclose(res["lfc_median"], true_lfc, atol=0.02)
    np.testing.assert_allclose(res["lfc_std"], 0.1 * np.sqrt(2), rtol=0.05)
    np.testing.assert_allclose(res["scale1"], rho1_sg.mean(0))
    np.testing.assert_allclose(res["scale2"], rho2_sg.mean(0))
    # every DE gene is called; with 20 near-certain calls, one sure non-DE gene still fits under 5%
    assert res.loc[~same, FLAG].all() and res[FLAG].sum() <= 21
    # sorted by proba_de, most confident first
    ordered = de_from_samples(rho1_sg, rho2_sg, delta=0.5, seed=0)["proba_de"].to_numpy()
    assert (np.diff(ordered) <= 0).all()


def test_delta_and_pseudocount():
    rng = np.random.default_rng(0)
    # a true log2 fold change of 0.4: DE at delta 0.25, not at delta 1
    rho2_sg = 2.0 ** (-10 + 0.03 * rng.standard_normal((2000, 1)))
    rho1_sg = rho2_sg * 2**0.4
    assert de_from_samples(rho1_sg, rho2_sg, delta=0.25)["proba_de"].iloc[0] > 0.99
    assert de_from_samples(rho1_sg, rho2_sg, delta=1.0)["proba_de"].iloc[0] < 0.01
    # a pseudocount far above the expression (~1e-3) shrinks the fold change to 0
    shrunk = de_from_samples(rho1_sg, rho2_sg, pseudocount=0.1)
    assert abs(shrunk["lfc_mean"].iloc[0]) < 0.01
    with pytest.raises(ValueError, match="pseudocount > 0"):
        de_from_samples(np.zeros((5, 1)), rho2_sg)
    assert np.isfinite(de_from_samples(np.zeros((5, 1)), rho2_sg, pseudocount=1e-6)["lfc_mean"]).all()


def test_seed_reproducibility_and_bad_input(shifted):
    rho1_sg, rho2_sg, _ = shifted
    once, again = de_from_samples(rho1_sg, rho2_sg, seed=3), de_from_samples(rho1_sg, rho2_sg, seed=3)
    pd.testing.assert_frame_equal(once, again)
    with pytest.raises(ValueError, match="genes but rho2_sg has"):
        de_from_samples(rho1_sg, rho2_sg[:, :5])
    with pytest.raises(ValueError, match="gene_names"):
        de_from_samples(rho1_sg, rho2_sg, gene_names=["a", "b"])
    with pytest.raises(ValueError, match="mode"):
        de_from_samples(rho1_sg, rho2_sg, mode="both")
    with pytest.raises(ValueError, match="finite, non-negative"):
        de_from_samples(-rho1_sg, rho2_sg)
    with pytest.raises(ValueError, match="2-d array"):
        de_from_samples(rho1_sg[0], rho2_sg)
    with pytest.raises(ValueError, match="fdr_target"):
        de_from_samples(rho1_sg, rho2_sg, fdr_target=1.5)


def test_fdr_flag_is_the_largest_prefix_within_target():
    # by hand: running means of 1 - p are 0.01, 0.02, 0.0467, 0.16
    np.testing.assert_array_equal(flag_de_at_fdr([0.5, 0.99, 0.9, 0.97], 0.05), [False, True, True, True])
    assert not flag_de_at_fdr([0.9, 0.8], 0.05).any()
    assert flag_de_at_fdr([0.95, 0.95, 1.0], 0.05).all()  # exactly at the target
    rng = np.random.default_rng(0)
    for target in (0.01, 0.05, 0.1, 0.3):
        proba_g = np.concatenate([rng.beta(20, 1, 50), rng.uniform(0, 1, 200)])
        flags_g = flag_de_at_fdr(proba_g, target)
        k = int(flags_g.sum())
        order = np.argsort(-proba_g)
        assert flags_g[order[:k]].all()  # the flagged genes are the most probable ones
        assert np.mean(1 - proba_g[flags_g]) <= target + 1e-12
        assert np.mean(1 - proba_g[order[: k + 1]]) > target  # one more gene would exceed it


# ------------------------------------------------------------------------------ end to end, scVI
def simulate_two_groups(n_cells=800, n_genes=200, n_de_pairs=10, *, seed=0):
    """NB counts of two groups A, B of cells; 2 * n_de_pairs genes DE with |log2 FC| in [1, 2.5].

    Baseline logits are N(0, 1); DE genes come in pairs whose group-A logits differ by ln 2 * U(1, 2.5)
    and which swap them in group B, so the softmax normaliser, hence every other gene, is unchanged.
    Cells vary a little within a group (a 2-d latent). Returns the AnnData and log2(rho_A / rho_B).
    """
    rng = np.random.default_rng(seed)
    logit_a_g = rng.normal(0, 1, n_genes)
    de = rng.choice(n_genes, 2 * n_de_pairs, replace=False)
    low, high = de[:n_de_pairs], de[n_de_pairs:]
    logit_a_g[high] = logit_a_g[low] + np.log(2) * rng.uniform(1, 2.5, n_de_pairs)
    logit_b_g = logit_a_g.copy()
    logit_b_g[low], logit_b_g[high] = logit_a_g[high], logit_a_g[low]
    in_b_n = rng.permutation(np.arange(n_cells) % 2 == 1)
    z_nk = rng.standard_normal((n_cells, 2))
    logits_ng = np.where(in_b_n[:, None], logit_b_g, logit_a_g) + z_nk @ rng.normal(0, 0.05, (2, n_genes))
    rho_ng = np.exp(logits_ng - logits_ng.max(1, keepdims=True))
    rho_ng /= rho_ng.sum(1, keepdims=True)
    mu_ng = rng.lognormal(np.log(3000), 0.3, n_cells)[:, None] * rho_ng
    x_ng = rng.poisson(rng.gamma(10.0, mu_ng / 10.0)).astype(np.float32)
    genes = [f"gene_{g}" for g in range(n_genes)]
    obs = pd.DataFrame(
        {"group": pd.Categorical(np.where(in_b_n, "B", "A"), categories=["A", "B", "C"])},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    adata = AnnData(sp.csr_matrix(x_ng), obs=obs, var=pd.DataFrame(index=genes))
    return adata, pd.Series((logit_a_g - logit_b_g) / np.log(2), index=genes)


@contextlib.contextmanager
def one_thread():
    """Train on one torch thread: as fast for these small networks, far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_two_groups():
    adata, true_lfc = simulate_two_groups(seed=0)
    model = pyro_sc.SCVI(adata, likelihood="nb", n_latent=5)
    with one_thread():
        model.train(
            max_epochs=30, lr=1e-2, batch_size=64, n_epochs_kl_warmup=None, progress_bar=False, seed=0
        )
    return model, adata, true_lfc


def test_scvi_de_recovers_simulated_de_genes_at_the_target_fdr(trained_two_groups):
    model, adata, true_lfc = trained_two_groups
    res = model.differential_expression(groupby="group", group1="A", group2="B", mode="change", delta=0.5)
    assert res.index.sort_values().equals(adata.var_names.sort_values())
    is_de = (true_lfc.abs() >= 1).reindex(res.index)
    flagged = res[FLAG]
    realised_fdr = (flagged & ~is_de).sum() / max(flagged.sum(), 1)
    recall = (flagged & is_de).sum() / is_de.sum()
    assert realised_fdr <= 0.05 + 0.1, res[flagged & ~is_de]
    assert recall >= 0.7
    error = (res["lfc_mean"] - true_lfc.reindex(res.index))[is_de]
    assert error.abs().mean() < 0.35
    # the same seed gives the same table; the rest of the cells is group B here
    rest = model.differential_expression(groupby="group", group1="A", mode="change", delta=0.5)
    pd.testing.assert_frame_equal(rest, res)
    # vanilla: P(rho_A > rho_B) is near 1 for genes up in A, near 0 for genes down
    vanilla = pyro_sc.de.differential_expression(model, groupby="group", group1="A", mode="vanilla")
    assert (vanilla.loc[true_lfc.index[true_lfc >= 1], "proba_de"] > 0.9).all()
    assert (vanilla.loc[true_lfc.index[true_lfc <= -1], "proba_de"] < 0.1).all()


def test_model_de_input_errors(trained_two_groups):
    model, adata, _ = trained_two_groups
    with pytest.raises(KeyError, match="groupby column 'celltype' not found"):
        model.differential_expression(groupby="celltype", group1="A")
    with pytest.raises(KeyError, match="group 'Z' not found"):
        model.differential_expression(groupby="group", group1="A", group2="Z")
    with pytest.raises(ValueError, match="'C' of adata.obs\\['group'\\] has no cells"):
        model.differential_expression(groupby="group", group1="C")
    with pytest.raises(ValueError, match="same group"):
        model.differential_expression(groupby="group", group1="A", group2="A")
    only_a = adata[adata.obs["group"] == "A"].copy()
    with pytest.raises(ValueError, match="no rest"):
        model.differential_expression(only_a, groupby="group", group1="A")


# ------------------------------------------------------------------------------ real data
@pytest.mark.slow
@pytest.mark.real_data
def test_ifnb_monocyte_and_b_cell_markers(real_data):
    real_data("ifnb_2800")
    adata = datasets.load_ifnb(n_top_genes=2000)
    model = pyro_sc.SCVI(adata, batch_key="condition")
    with one_thread():
        model.train(max_epochs=100, progress_bar=False, seed=0)
    # a pseudocount of ~1 count in 10,000 keeps genes near zero in one group (rho ~ 1e-5) from dominating
    # the ranking by fold change; CD14 is also down in stimulated monocytes, which widens its lfc
    res = model.differential_expression(groupby="cell_type", group1="CD14 Mono", group2="B", pseudocount=1e-4)
    called = res[res[FLAG]]
    up_mono = called.sort_values("lfc_mean", ascending=False)
    up_b = called.sort_values("lfc_mean")
    top_mono, top_b = up_mono.head(50), up_b.head(50)
    columns = ["lfc_mean", "lfc_std", "proba_de", "scale1", "scale2"]
    print(f"\n{int(res[FLAG].sum())} of {adata.n_vars} genes called DE")
    print(f"top up in CD14 Mono:\n{top_mono.head(15)[columns]}\ntop up in B:\n{top_b.head(15)[columns]}")
    markers = [("CD14", up_mono), ("LYZ", up_mono), ("S100A8", up_mono), ("MS4A1", up_b), ("CD79A", up_b)]
    for gene, ranked in markers:
        if gene in ranked.index:
            row = ranked.loc[gene]
            rank = ranked.index.get_loc(gene) + 1
            print(f"{gene}: rank {rank}, lfc_mean {row['lfc_mean']:.2f}, proba_de {row['proba_de']:.4f}")
        else:
            print(f"{gene}: {'not called' if gene in adata.var_names else 'not among the HVGs'}")
    for gene in ("CD14", "LYZ", "S100A8"):
        if gene in adata.var_names:
            assert gene in top_mono.index, (gene, res.loc[gene])
    for gene in ("MS4A1", "CD79A"):
        if gene in adata.var_names:
            assert gene in top_b.index, (gene, res.loc[gene])

"""Nuisance covariates in SCVI, SCANVI and capVI (scvi-tools' categorical_covariate_keys,
continuous_covariate_keys, size_factor_key): counts simulated with a donor offset and a continuous
score; registered, the latent no longer carries them and the normalised expression removes them."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import pyro_sc
from pyro_sc import datasets, metrics

COVARIATES = dict(categorical_covariate_keys=["donor"], continuous_covariate_keys=["nuisance"])
NO_EFFECT = {"donor": "donor_0", "nuisance": 0.0}


@pytest.fixture(scope="module")
def nuisance():
    # 3 types, one batch; 3 donors and a score in (-1, 1), each moving every gene's log mean by N(0, 0.7^2)
    return datasets.simulate_scvi(600, 60, n_types=3, n_batches=1, n_donors=3, donor_effect=0.7,
                                  continuous_effect=0.7, seed=0)


def r_squared(z_nk: np.ndarray, u_n: np.ndarray) -> float:
    """How much of u a linear function of z explains."""
    design = np.c_[z_nk, np.ones(len(z_nk))]
    coef, *_ = np.linalg.lstsq(design, u_n, rcond=None)
    return 1 - (u_n - design @ coef).var() / u_n.var()


def summary(model, adata, transform_covariates=None) -> dict:
    z_nk = model.get_latent_representation()
    types = adata.obs["cell_type"].to_numpy()
    u_n = adata.obs["nuisance"].to_numpy()
    strongest = np.argsort(-np.abs(adata.var["nuisance_beta"].to_numpy()))[:10]
    rho_ng = model.get_normalized_expression(transform_covariates=transform_covariates).to_numpy()
    return {
        "donor_ilisi": float(np.mean(metrics.ilisi(z_nk, adata.obs["donor"].to_numpy()))),
        "nuisance_r2": r_squared(z_nk, u_n),
        "type_ari": adjusted_rand_score(types, KMeans(3, n_init=10, random_state=0).fit_predict(z_nk)),
        # |correlation| of the normalised expression of the 10 genes the score moves most with the score
        "expression_corr": float(np.mean([abs(np.corrcoef(np.log(rho_ng[:, g]), u_n)[0, 1]) for g in strongest])),
    }


@pytest.fixture(scope="module")
def with_and_without(nuisance):
    out = {}
    for registered in (False, True):
        model = pyro_sc.SCVI(nuisance, n_latent=5, n_hidden=32, **(COVARIATES if registered else {}))
        model.train(max_epochs=200, seed=0, progress_bar=False)
        out[registered] = summary(model, nuisance, NO_EFFECT if registered else None), model
    return out


def test_registered_covariates_leave_the_latent_and_the_normalised_expression(with_and_without):
    plain, registered = with_and_without[False][0], with_and_without[True][0]
    # unregistered, the latent separates the donors and encodes the score (seeds 0-2 of this simulation:
    # donor iLISI 1.17-1.45, R^2 0.84-0.85; registered: 2.23-2.54 and 0.035-0.045, benchmarks/covariates.py)
    assert plain["donor_ilisi"] < 1.7 and plain["nuisance_r2"] > 0.6, plain
    # registered: the donors mix (3 is perfect mixing), the score is gone from the latent ...
    assert registered["donor_ilisi"] > max(2.0, plain["donor_ilisi"] + 0.6), (plain, registered)
    assert registered["nuisance_r2"] < 0.15, registered
    # ... the types are found as well as before ...
    assert registered["type_ari"] >= plain["type_ari"] - 0.05 and registered["type_ari"] > 0.9, (plain, registered)
    # ... and decoding at one covariate value removes the score's effect on the genes it moves most
    assert plain["expression_corr"] > 0.25 and registered["expression_corr"] < 0.1, (plain, registered)


def test_transform_covariates_sets_the_value_and_names_bad_ones(with_and_without, nuisance):
    model = with_and_without[True][1]
    own = model.get_normalized_expression().to_numpy()
    fixed = model.get_normalized_expression(transform_covariates={"nuisance": 0.5}).to_numpy()
    assert not np.allclose(own, fixed)
    # a cell whose own score is 0.5 decodes the same either way
    one = np.array([0])
    adata = nuisance.copy()
    adata.obs.loc[adata.obs_names[0], "nuisance"] = 0.5
    np.testing.assert_allclose(model.get_normalized_expression(adata, indices=one).to_numpy(), fixed[one], rtol=1e-5)
    with pytest.raises(KeyError, match=r"transform_covariates names keys that are not registered covariates: \['age'\]"):
        model.get_normalized_expression(transform_covariates={"age": 3})
    with pytest.raises(KeyError, match=r"unknown value 'donor_9' of covariate 'donor'"):
        model.get_normalized_expression(transform_covariates={"donor": "donor_9"})


def test_size_factors_are_the_library_size(nuisance):
    adata = nuisance.copy()
    adata.obs["sf"] = np.linspace(100.0, 5000.0, adata.n_obs)
    model = pyro_sc.SCVI(adata, size_factor_key="sf", n_latent=2, n_hidden=8)
    mb = model.setup.minibatch(np.arange(5))
    np.testing.assert_array_equal(model.module.library(mb, model.module._batch(mb)).numpy(),
                                  adata.obs["sf"].to_numpy(np.float32)[:5])
    with pytest.raises(ValueError, match="size_factor_key='sf' gives the library size and latent_library=True would infer it: choose one"):
        pyro_sc.SCVI(adata, size_factor_key="sf", latent_library=True)


def test_covariates_in_scanvi_and_capvi_round_trip(nuisance, tmp_path):
    adata = nuisance[:300].copy()
    adata.obs["labels"] = np.where(np.arange(adata.n_obs) % 4 == 0, adata.obs["cell_type"].astype(str), "Unknown")
    small = dict(n_latent=3, n_hidden=16)
    scvi = pyro_sc.SCVI(adata, encode_covariates=True, **COVARIATES, **small)
    scvi.train(max_epochs=2, seed=0, progress_bar=False)
    scanvi = pyro_sc.SCANVI.from_scvi_model(scvi, "Unknown", labels_key="labels")  # takes the covariates along
    assert scanvi.setup.categorical_covariate_keys == ["donor"] and scanvi.module.n_continuous_cov == 1
    capvi = pyro_sc.CAPVI(adata, labels_key="labels", unlabeled_category="Unknown", **COVARIATES, **small)
    for model, epochs in ((scanvi, 2), (capvi, (2, 1, 1))):
        model.train(max_epochs=epochs, seed=0, progress_bar=False)
        # the decoder reads the covariates: changing a cell's score changes its expression
        moved = adata.copy()
        moved.obs["nuisance"] += 1.0
        z_nk = torch.zeros(1, 3)
        mb, mb_moved = model.setup.minibatch(np.array([0])), model._setup_for(moved).minibatch(np.array([0]))
        with torch.no_grad():
            rho = model.module.decode(z_nk, model.module._batch(mb), model.module.covariates(mb))[0]
            rho_moved = model.module.decode(z_nk, model.module._batch(mb), model.module.covariates(mb_moved))[0]
        assert not torch.allclose(rho, rho_moved)
        path = tmp_path / f"{type(model).__name__}.pt"
        model.save(path)
        loaded = type(model).load(path, adata)
        np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    other_donor = adata.copy()
    other_donor.obs["donor"] = "donor_7"
    with pytest.raises(pyro_sc.DataError, match="categorical covariate key 'donor' has values not seen"):
        scvi.get_latent_representation(other_donor)

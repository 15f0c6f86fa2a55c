"""capVI: the three stages, the prior's modes, the batch-mixing penalty, queries."""

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_sc
from pyro_sc import datasets, metrics
from pyro_sc.data import DataError


@pytest.fixture(scope="module")
def simulated():
    return datasets.simulate_scvi(600, 200, n_latent=4, n_types=4, n_batches=2, seed=0)


@pytest.fixture(scope="module")
def staged(simulated):
    """(model, the classifier's state after stage 1, after stage 2, accuracy after stage 1)."""
    model = pyro_sc.CAPVI(simulated, labels_key="cell_type", batch_key="batch", n_latent=4, sigma=0.25)
    model.train(max_epochs=(30, 1, 1), stages=(1,), progress_bar=False, seed=0)
    truth_n = simulated.obs["cell_type"].astype(str).to_numpy()
    accuracy_1 = metrics.accuracy(truth_n, model.predict_labels().to_numpy())
    after_1 = {k: v.clone() for k, v in model.module.classifier.state_dict().items()}
    model.train(max_epochs=(1, 40, 1), stages=(2,), progress_bar=False, seed=0)
    after_2 = {k: v.clone() for k, v in model.module.classifier.state_dict().items()}
    model.train(max_epochs=(1, 1, 10), stages=(3,), progress_bar=False, seed=0)
    return model, after_1, after_2, accuracy_1


def test_stages_train_what_they_should(staged, simulated):
    model, after_1, after_2, accuracy_1 = staged
    truth_n = simulated.obs["cell_type"].astype(str).to_numpy()
    assert accuracy_1 > 0.95  # stage 1: the classifier learns the labels
    for name, value in after_1.items():  # stage 2: the classifier is frozen (running statistics too)
        torch.testing.assert_close(after_2[name], value, rtol=0, atol=0)
    assert any(not torch.equal(v, after_2[k]) for k, v in model.module.classifier.state_dict().items())  # stage 3
    # stage 3 trains q(c | x) on the ELBO alone, without labels: it may drift, but stays close
    assert metrics.accuracy(truth_n, model.predict_labels().to_numpy()) > 0.9
    history = model.history
    assert sorted(history["stage"].unique()) == [1, 2, 3]
    stage_2 = history[history["stage"] == 2]["train_loss"]
    assert stage_2.iloc[-1] < stage_2.iloc[0]


def test_latent_sits_at_the_prior_modes(staged, simulated):
    model, *_ = staged
    latent_nk = model.get_latent_representation()
    truth_n = simulated.obs["cell_type"].astype(str).to_numpy()
    centroids = model.centroids
    assert list(centroids.index) == ["type_0", "type_1", "type_2", "type_3"]
    # each type's cells lie closer to their own centroid than to any other
    d_nc = ((latent_nk[:, None, :] - centroids.to_numpy()[None]) ** 2).sum(-1)
    assert (centroids.index[d_nc.argmin(1)] == truth_n).mean() > 0.95
    ll = model.get_marginal_ll(n_samples=10)
    assert np.isfinite(ll)


def test_penalty_pulls_batches_onto_the_centroids():
    small = datasets.simulate_scvi(300, 100, n_latent=3, n_types=3, n_batches=2, batch_effect=1.0, seed=0)

    def offsets(penalty):
        model = pyro_sc.CAPVI(small, labels_key="cell_type", batch_key="batch", n_latent=3, sigma=0.25,
                              penalty=penalty, n_hidden=32)
        model.train(max_epochs=(20, 15, 1), stages=(1, 2), progress_bar=False, seed=0)
        mb = model.setup.minibatch(np.arange(small.n_obs))
        model.module.eval()
        with torch.no_grad():
            return float(model.module.batch_mixing_penalty(mb, 1.0))

    assert offsets(50.0) < 0.5 * offsets(0.0)


def test_bad_input_and_save_load(staged, simulated, tmp_path):
    model, *_ = staged
    with pytest.raises(ValueError, match="sigma"):
        pyro_sc.CAPVI(simulated, labels_key="cell_type", sigma=0.0)
    with pytest.raises(ValueError, match="penalty"):
        pyro_sc.CAPVI(simulated, labels_key="cell_type", penalty=-1.0)
    with pytest.raises(ValueError, match="one per stage"):
        model.train(max_epochs=(1, 2), progress_bar=False)
    with pytest.raises(ValueError, match="stages are"):
        model.train(stages=(4,), progress_bar=False)
    unknown = simulated.copy()
    unknown.obs["cell_type"] = "?"
    with pytest.raises(DataError, match="no categories besides"):
        pyro_sc.CAPVI(unknown, labels_key="cell_type", unlabeled_category="?")
    path = tmp_path / "capvi.pt"
    model.save(path)
    loaded = pyro_sc.CAPVI.load(path, simulated)
    pd.testing.assert_frame_equal(loaded.predict(soft=True), model.predict(soft=True))
    np.testing.assert_array_equal(loaded.predict(), model.predict())
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_sum_over_the_top_types_decodes_only_those(monkeypatch):
    small = datasets.simulate_scvi(600, 200, n_latent=4, n_types=4, n_batches=2, seed=0)
    model = pyro_sc.CAPVI(small, labels_key="cell_type", batch_key="batch", n_latent=4, sigma=0.25, n_hidden=32)
    decode, shapes = pyro_sc.models.CAPVIModule.decode, set()

    def recording(self, z, *args):
        shapes.add(tuple(z.shape[:-2]))
        return decode(self, z, *args)

    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=rf"n_types_summed must be a positive integer or None, got {bad!r}"):
            model.train(n_types_summed=bad, progress_bar=False)
    model.set_guide(lambda mb: model.module.guide(mb))
    with pytest.raises(ValueError, match="n_types_summed applies to capVI's own guide, not to a guide set by set_guide"):
        model.train(n_types_summed=2, progress_bar=False)
    model.set_guide(None)
    truth_n = small.obs["cell_type"].astype(str).to_numpy()
    model.train(max_epochs=(30, 10, 5), stages=(1,), progress_bar=False, seed=0)
    assert metrics.accuracy(truth_n, model.predict()) > 0.95  # 1.0 after stage 1
    monkeypatch.setattr(pyro_sc.models.CAPVIModule, "decode", recording)
    model.train(max_epochs=(30, 10, 5), n_types_summed=2, stages=(2, 3), progress_bar=False, seed=0)
    assert shapes == {(2,)}  # 2 types per cell decoded, never all 4
    later = model.history[model.history["stage"] > 1]
    assert np.isfinite(later["train_loss"]).all() and later["train_loss"].iloc[-1] < later["train_loss"].iloc[0]
    # stage 3 trains q(c | x) on the ELBO without labels, and here it drifts (0.87 with the centred
    # encoder, 0.99 without; with all types summed 0.95 and 0.91; seed 1: 0.66 / 0.84 / 0.78 / 0.83)
    assert metrics.accuracy(truth_n, model.predict()) > 0.8
    shapes.clear()
    assert np.isfinite(model.get_marginal_ll(n_samples=5))  # exact: every type decoded
    assert (4,) in shapes and (2,) not in shapes, shapes


def test_centred_encoder_starts_the_cells_at_their_modes(tmp_path):
    small = datasets.simulate_scvi(400, 100, n_latent=3, n_types=3, n_batches=2, seed=1)
    train_n, validation_n = np.arange(0, 400, 2), np.arange(1, 400, 2)

    def distance_in_sigmas(centred_encoder, epochs):
        """Median distance of each validation cell's q(z | x, c) mean to mu_c (c its type), in sigmas."""
        model = pyro_sc.CAPVI(small, labels_key="cell_type", batch_key="batch", n_latent=3, sigma=1 / 32,
                              n_hidden=32, centred_encoder=centred_encoder)
        model.train(max_epochs=(20, epochs, 1), stages=(1, 2), train_indices=train_n,
                    validation_indices=validation_n, progress_bar=False, seed=0)
        module, c_n = model.module, torch.as_tensor(model.setup.label_codes_n[validation_n])
        with torch.no_grad():
            module.eval()
            loc_nk, _ = module.encode_z(model.setup.minibatch(validation_n), c_n)
            return float(((loc_nk - module.mu_ck[c_n]).norm(dim=-1) / module.sigma).median()), model

    # the modes are drawn from N(0, I), far from the uncentred encoder's output: after one epoch, 61 sigma
    (centred, model), (uncentred, _) = distance_in_sigmas(True, 1), distance_in_sigmas(False, 1)
    assert centred < 20 < 40 < uncentred, (centred, uncentred)  # 14 and 61
    # a file saved before the option existed holds an uncentred encoder, and loads as one
    path = tmp_path / "old.pt"
    model.save(path)
    saved = torch.load(path, weights_only=True)
    del saved["module_kwargs"]["centred_encoder"]
    torch.save(saved, path)
    old = pyro_sc.CAPVI.load(path, small)
    assert old.module_kwargs["centred_encoder"] is False and old.module.centred_encoder is False
    assert model.module.centred_encoder is True
    np.testing.assert_allclose(
        old.get_latent_representation() + model.predict(soft=True).to_numpy() @ model.centroids.to_numpy(),
        model.get_latent_representation(), rtol=1e-4, atol=1e-4,
    )

"""The driver trains any model / guide pair over minibatches: a user's own model, with its guarantees."""

import math

import anndata
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam

import pyro_sc
from pyro_sc.data import AnnDataSetup
from pyro_sc.infer import TrainingError, fit
from pyro_sc.infer.loop import resolve_device


def poisson_adata(n_cells=600, n_genes=8, seed=0):
    rng = np.random.default_rng(seed)
    rate_g = rng.uniform(1.0, 20.0, n_genes)
    x = rng.poisson(rate_g, size=(n_cells, n_genes)).astype(np.float32)
    x[:, 0] = np.maximum(x[:, 0], 1)
    return anndata.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])), rate_g


class PoissonRates(PyroModule):
    """x_ng ~ Poisson(lambda_g), lambda_g ~ Gamma(1, 0.01): a user's model with a MAP-like point guide."""

    def __init__(self, n_genes):
        super().__init__()
        self.log_rate_g = PyroParam(torch.zeros(n_genes))

    def model(self, mb):
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            pyro.sample("x", dist.Poisson(self.log_rate_g.exp()).to_event(1), obs=mb.x_ng)

    def guide(self, mb):
        pass


def test_a_users_own_model_recovers_known_rates():
    adata, rate_g = poisson_adata()
    setup = AnnDataSetup(adata)
    module = PoissonRates(adata.n_vars)
    history = fit(module.model, module.guide, setup, modules=[module], max_epochs=40, batch_size=100,
                  train_size=1.0, lr=0.05, progress_bar=False, seed=1)
    # continue from there with a small step to settle Adam's minibatch jitter
    fit(module.model, module.guide, setup, modules=[module], max_epochs=20, batch_size=100,
        train_size=1.0, lr=0.002, progress_bar=False, seed=2)
    est_g = module.log_rate_g.exp().detach().numpy()
    mle_g = np.asarray(adata.X.mean(0)).ravel()
    np.testing.assert_allclose(est_g, mle_g, rtol=0.01)  # the maximum-likelihood estimate
    np.testing.assert_allclose(est_g, rate_g, rtol=0.1)  # and the truth, within sampling error
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert list(history.columns[:5]) == ["epoch", "train_loss", "validation_loss", "extra_loss", "kl_weight"]


def test_autoguide_parameters_are_found_and_posterior_matches_conjugate_result():
    # w ~ Gamma(2, 0.1); x_n ~ Poisson(w): the posterior is Gamma(2 + sum x, 0.1 + n).
    rng = np.random.default_rng(0)
    x_n = rng.poisson(7.0, size=400).astype(np.float32) + 0  # no zero-count cells in one gene
    x_n[x_n == 0] = 1
    adata = anndata.AnnData(x_n[:, None], var=pd.DataFrame(index=["x"]))
    setup = AnnDataSetup(adata)

    def model(mb):
        w = pyro.sample("w", dist.Gamma(2.0, 0.1))
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            pyro.sample("x", dist.Poisson(w), obs=mb.x_ng[:, 0])

    guide = AutoNormal(model)  # its parameters are created lazily, on the first call
    fit(model, guide, setup, modules=[guide], elbo=Trace_ELBO(num_particles=16, vectorize_particles=True),
        max_epochs=600, batch_size=400, train_size=1.0, lr=0.03, progress_bar=False, seed=0)
    shape, rate = 2.0 + x_n.sum(), 0.1 + len(x_n)
    # q is log-normal: its median exp(loc) sits at the Gamma posterior's centre, its scale is the CV
    assert np.exp(guide.locs.w.item()) == pytest.approx(shape / rate, rel=0.01)
    assert guide.scales.w.item() == pytest.approx(shape ** -0.5, rel=0.3)


def test_nan_guard_names_epoch_and_step_and_keeps_last_good_parameters():
    adata, _ = poisson_adata(n_cells=200)
    setup = AnnDataSetup(adata)
    module = PoissonRates(adata.n_vars)
    calls = {"n": 0}
    snapshot = {}

    def extra_loss(mb):
        calls["n"] += 1
        if calls["n"] == 3:
            snapshot["params"] = module.log_rate_g.detach().clone()
            return torch.tensor(float("nan"))
        return torch.zeros(())

    with pytest.raises(TrainingError, match=r"epoch 1, step 3 .*not updated"):
        fit(module.model, module.guide, setup, modules=[module], extra_loss=extra_loss, max_epochs=2,
            batch_size=50, progress_bar=False)
    assert torch.equal(module.log_rate_g.detach(), snapshot["params"])


def test_early_stopping_stops_and_restores_the_best_epoch():
    adata, _ = poisson_adata(n_cells=300)
    setup = AnnDataSetup(adata)
    module = PoissonRates(adata.n_vars)
    # lr and min_delta such that the loss creeps down by less than min_delta near the end: the best epoch
    # by the rule is then not the lowest loss (seen: best 67 at 18.792, lowest 70 at 18.761, stop at 72)
    patience, min_delta = 5, 0.05
    history = fit(module.model, module.guide, setup, modules=[module], max_epochs=500, batch_size=300,
                  lr=0.05, early_stopping=True, patience=patience, min_delta=min_delta, progress_bar=False)
    assert len(history) < 500 and history.attrs["stopped_early"]
    assert (history["kl_weight"] == 1.0).all()  # every epoch is monitored
    loss_e = history["validation_loss"].to_numpy()
    # the rule, replayed: an epoch improves when it beats the best so far by more than min_delta; training
    # goes on until `patience` epochs in a row have not improved, and stops at the first such epoch
    record, best_e, since = math.inf, None, 0
    for e, loss in enumerate(loss_e):
        record, best_e, since = (loss, e, 0) if loss < record - min_delta else (record, best_e, since + 1)
        if e < len(loss_e) - 1:
            assert since < patience, f"{patience} epochs without an improvement at epoch {e}, yet it went on"
    assert since == patience and best_e == len(loss_e) - 1 - patience
    # min_delta did count: a later epoch is lower than the best one (by less than min_delta)
    assert loss_e[best_e + 1:].min() < loss_e[best_e]
    best = loss_e[best_e]
    from pyro_sc.infer import evaluate_loss
    from pyro.infer import TraceEnum_ELBO
    from pyro_sc.data import split_indices

    _, val_idx = split_indices(setup.n_obs, train_size=0.9, seed=0)
    restored = evaluate_loss(module.model, module.guide, setup, val_idx, elbo=TraceEnum_ELBO(strict_enumeration_warning=False))
    assert restored == pytest.approx(best, rel=1e-5)


class FailsOnOneCell(PoissonRates):
    """PoissonRates whose log-likelihood is -inf for cell 0 when evaluated (networks in eval mode)."""

    def model(self, mb):
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            pyro.sample("x", dist.Poisson(self.log_rate_g.exp()).to_event(1), obs=mb.x_ng)
            if not self.training:
                bad_n = torch.as_tensor(mb.idx_n == 0)
                pyro.factor("broken", torch.where(bad_n, torch.tensor(-math.inf), torch.tensor(0.0)))


def test_a_non_finite_validation_loss_is_reported_and_never_counted_as_the_best():
    adata, _ = poisson_adata(n_cells=100)
    setup = AnnDataSetup(adata)
    module = FailsOnOneCell(adata.n_vars)
    with pytest.warns(pyro_sc.infer.TrainingWarning, match=r"^the validation loss is inf at epoch 1 \(the training"):
        history = fit(module.model, module.guide, setup, modules=[module], max_epochs=8, batch_size=50, lr=0.1,
                      train_indices=np.setdiff1d(np.arange(1, 100), np.arange(0, 100, 5)),
                      validation_indices=np.arange(0, 100, 5),
                      early_stopping=True, patience=3, progress_bar=False)
    assert np.isinf(history["validation_loss"]).all() and np.isfinite(history["train_loss"]).all()
    assert len(history) == 3  # no epoch improves on the (infinite) best: stopped after `patience` epochs


def test_kl_warmup_schedule_and_seeded_reproducibility():
    adata, _ = poisson_adata(n_cells=200)
    setup = AnnDataSetup(adata)
    runs = []
    for _ in range(2):
        module = PoissonRates(adata.n_vars)
        history = fit(module.model, module.guide, setup, modules=[module], max_epochs=4, batch_size=30,
                      kl_warmup_steps=12, progress_bar=False, seed=7)
        runs.append(module.log_rate_g.detach().clone())
    # 180 training cells / 30 = 6 steps per epoch: weight 6/12 after epoch 1, 1 from epoch 2 on
    np.testing.assert_allclose(history["kl_weight"], [0.5, 1.0, 1.0, 1.0])
    assert torch.equal(runs[0], runs[1])


def test_extra_loss_hook_changes_the_optimum():
    adata, _ = poisson_adata(n_cells=200)
    setup = AnnDataSetup(adata)
    module = PoissonRates(adata.n_vars)
    # a strong penalty pulling every log-rate to zero wins over the likelihood
    fit(module.model, module.guide, setup, modules=[module], max_epochs=40, batch_size=200, lr=0.1,
        extra_loss=lambda mb: 1e4 * (module.log_rate_g ** 2).sum(), progress_bar=False)
    assert module.log_rate_g.abs().max() < 0.05


class ScaledRates(PyroModule):
    """x_ng ~ Poisson(exp(log_rate_g + offset_g)): ``offset`` is a sub-module (with dropout) to freeze."""

    def __init__(self, n_genes):
        super().__init__()
        self.log_rate_g = PyroParam(torch.zeros(n_genes))
        self.offset = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(1, n_genes))
        self.offset_modes: list[bool] = []

    def model(self, mb):
        self.offset_modes.append(self.offset.training)
        offset_g = self.offset(torch.ones(1)).squeeze(0)
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            pyro.sample("x", dist.Poisson((self.log_rate_g + offset_g).exp()).to_event(1), obs=mb.x_ng)

    def guide(self, mb):
        pass


def test_frozen_modules_stay_fixed_in_eval_mode_while_the_rest_fits_around_them():
    adata, _ = poisson_adata(n_cells=200)
    setup = AnnDataSetup(adata)
    module = ScaledRates(adata.n_vars)
    before = {k: v.clone() for k, v in module.offset.state_dict().items()}
    fit(module.model, module.guide, setup, modules=[module], frozen=[module.offset], max_epochs=300,
        batch_size=200, lr=0.05, train_size=0.9, progress_bar=False)  # validation after each epoch too
    for k, v in module.offset.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(module.offset_modes)  # never run in training mode (dropout off)
    assert all(p.requires_grad for p in module.offset.parameters())  # unfrozen again afterwards
    # the free parameters absorbed the fixed offset: exp(log_rate + offset) is the mean count
    offset_g = module.offset[1](torch.ones(1)).detach().squeeze(0)
    from pyro_sc.data import split_indices

    train_idx, _ = split_indices(setup.n_obs, train_size=0.9, seed=0)
    mle_g = torch.as_tensor(np.asarray(adata.X[train_idx].mean(0)).ravel())
    np.testing.assert_allclose((module.log_rate_g.detach() + offset_g).exp(), mle_g, rtol=0.02)

    # a callback querying the model in eval mode (as an ARI monitor does) leaves training in training mode
    module.offset_modes.clear()
    fit(module.model, module.guide, setup, modules=[module], max_epochs=3, batch_size=100, train_size=1.0,
        callbacks=[lambda record: module.eval()], progress_bar=False)
    assert len(module.offset_modes) > 3 and all(module.offset_modes), module.offset_modes

    other = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"^frozen modules must be among the modules"):
        fit(module.model, module.guide, setup, modules=[module], frozen=[other], max_epochs=1, progress_bar=False)


def test_device_auto_is_cuda_when_torch_sees_a_gpu_else_the_cpu(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    adata = pyro_sc.datasets.simulate_scvi(n_cells=40, n_genes=10, n_types=2, seed=0)
    model = pyro_sc.SCVI(adata, n_hidden=8, n_latent=2)
    model.train(max_epochs=1, progress_bar=False)  # device defaults to "auto", as scvi-tools' accelerator
    assert model.device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(RuntimeError):
        resolve_device("tpu")


def test_the_driver_adam_is_fused_and_steps_as_torch_adam():
    """fit's optimiser is torch's fused Adam on one CPU device, taking the unfused loop's steps to float
    rounding (weight decay included)."""
    from pyro_sc.infer.loop import adam

    torch.manual_seed(0)
    start = [torch.randn(50, 7), torch.randn(7)]
    target = torch.randn(50, 7)
    ends = []
    for make in (adam, torch.optim.Adam):
        params = [p.clone().requires_grad_(True) for p in start]
        optimizer = make(params, lr=0.05, eps=0.01, weight_decay=0.1)
        for _ in range(20):
            optimizer.zero_grad()
            ((params[0] + params[1] - target) ** 2).sum().backward()
            optimizer.step()
        ends.append([p.detach() for p in params])
        if make is adam:
            assert optimizer.defaults["fused"] is True
    for fused, loop in zip(*ends):
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ends[0][0], start[0], atol=0.5)  # it moved

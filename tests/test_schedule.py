"""The KL warm-up rule, the split of the cells, and what the cells plate stands for during training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_sc
from pyro_sc import AnnDataSetup, datasets, fit
from pyro_sc.data import iterate_minibatches, split_indices
from pyro_sc.infer import TrainingWarning
from pyro_sc.infer.schedule import default_warmup_epochs, kl_weight, steps_per_epoch, warmup_steps


@pytest.mark.parametrize("n_train,batch_size", [(1000, 128), (129, 128), (257, 128), (128, 128), (5, 128), (900, 1)])
def test_an_epoch_has_as_many_steps_as_minibatches(n_train, batch_size):
    assert steps_per_epoch(n_train, batch_size) == len(list(iterate_minibatches(np.arange(n_train), batch_size)))
    assert steps_per_epoch(1000, 128) == 8  # the ceiling; the floor (7) made warm-ups end early


@pytest.mark.parametrize("n_cells", [2_800, 20_000, 50_000, 1_000_000])
def test_the_default_warm_up_finishes_in_the_first_half_of_the_default_run(n_cells):
    max_epochs = int(min(round(20000 / n_cells * 400), 400))  # scVI's default length
    n_epochs = default_warmup_epochs(max_epochs)
    n_train, batch_size = math.ceil(0.9 * n_cells), 128
    steps = warmup_steps(n_epochs, n_train, batch_size)
    last_step = max_epochs * steps_per_epoch(n_train, batch_size)
    assert kl_weight(steps, steps) == 1.0 and kl_weight(steps - 1, steps) < 1.0
    assert steps <= math.ceil(last_step / 2) + steps_per_epoch(n_train, batch_size)
    assert kl_weight(last_step, steps) == 1.0  # scvi-tools' 400 epochs: 0.4 at 50,000 cells, 0.008 at 1M


def test_scvi_trains_on_the_elbo_for_the_second_half_by_default():
    adata = datasets.simulate_scvi(300, 40, n_latent=3, n_types=3, seed=0)
    model = pyro_sc.SCVI(adata, n_latent=3, n_hidden=16)
    history = model.train(max_epochs=8, batch_size=64, progress_bar=False)
    assert history["kl_weight"].iloc[3] == 1.0 and history["kl_weight"].iloc[2] < 1.0  # 4 of 8 epochs


def test_a_warm_up_that_does_not_finish_is_a_warning():
    adata = datasets.simulate_scvi(300, 40, n_latent=3, n_types=3, seed=0)
    model = pyro_sc.SCVI(adata, n_latent=3, n_hidden=16)
    with pytest.warns(TrainingWarning, match=r"^the KL warm-up of 50 steps had not finished when training ended "
                                             r"\(step 15, KL weight 0\.3\): the model was not trained on the ELBO"):
        model.train(max_epochs=3, batch_size=54, n_epochs_kl_warmup=10, progress_bar=False)  # 270 cells: 5 steps


def test_the_library_size_kl_is_not_annealed():
    adata = datasets.simulate_scvi(100, 30, n_latent=3, n_types=3, seed=0)
    model = pyro_sc.SCVI(adata, n_latent=3, n_hidden=16, latent_library=True)
    mb = dataclasses.replace(model.setup.minibatch(np.arange(10)), kl_weight=0.25)
    for program in (model.module.model, model.module.guide):
        trace = poutine.trace(program).get_trace(mb)
        assert float(trace.nodes["z"]["scale"]) == pytest.approx(0.25 * 100 / 10)
        assert float(trace.nodes["l"]["scale"]) == pytest.approx(100 / 10)


def test_split_sizes():
    train, val = split_indices(100, train_size=0.5, validation_size=0)
    assert (len(train), len(val)) == (50, 0)
    train, val = split_indices(100, train_size=0.5)
    assert (len(train), len(val)) == (50, 50) and not set(train) & set(val)
    train, val = split_indices(100, train_size=1.0)
    assert (len(train), len(val)) == (100, 0)


class GlobalAndLocal(torch.nn.Module):
    """x_n ~ Poisson(exp(g)) with a global g ~ N(0, 1) at a point estimate; records the plate size it sees."""

    def __init__(self):
        super().__init__()
        self.g = torch.nn.Parameter(torch.zeros(()))
        self.plate_sizes = []

    def model(self, mb):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        self.plate_sizes.append(mb.n_obs)
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            pyro.sample("x", dist.Poisson(g.exp()).expand([len(mb), mb.x_ng.shape[-1]]).to_event(1), obs=mb.x_ng)

    def guide(self, mb):
        pyro.sample("g", dist.Delta(self.g))


def test_the_elbo_is_that_of_the_training_cells():
    """A global prior weighs once against the training cells: the per-cell loss of a full-batch step is
    -(sum over the training cells of log p(x_n | g) + log p(g)) / n_train, validation cells left out."""
    adata = datasets.simulate_scvi(200, 10, seed=0)
    setup, module = AnnDataSetup(adata), GlobalAndLocal()
    with torch.no_grad():
        module.g.fill_(0.7)
    train, val = np.arange(150), np.arange(150, 200)
    history = fit(module.model, module.guide, setup, modules=[module], max_epochs=1, batch_size=150, lr=0.0,
                  train_indices=train, validation_indices=val, progress_bar=False)
    x = torch.as_tensor(adata.X[:150].toarray())
    local = dist.Poisson(torch.tensor(0.7).exp()).log_prob(x).sum()
    expected = -(local + dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.7))) / 150
    assert history["train_loss"].iloc[0] == pytest.approx(float(expected), rel=1e-6)


def test_validation_cells_must_not_be_training_cells():
    adata = datasets.simulate_scvi(100, 10, seed=0)
    setup, module = AnnDataSetup(adata), GlobalAndLocal()
    with pytest.raises(ValueError, match=r"^10 cells are both training and validation cells \(e\.g\. cell 80\): a "
                                         r"validation loss must be measured on cells the model does not train on$"):
        fit(module.model, module.guide, setup, modules=[module], max_epochs=1, train_indices=np.arange(90),
            validation_indices=np.arange(80, 100), progress_bar=False)
    with pytest.raises(ValueError, match=r"^validation_indices must lie in \[0, 100\) \(the registered cells\)$"):
        fit(module.model, module.guide, setup, modules=[module], max_epochs=1, train_indices=np.arange(90),
            validation_indices=np.arange(90, 101), progress_bar=False)

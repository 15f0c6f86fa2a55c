"""Restarts and stages as one training plan: interrupted anywhere, resumed to the uninterrupted result.

Each interruption stands in for a crash or a kill: a callback raises after a given number of epochs
(counted over all the runs of the plan), and a new model, built as in a new process, resumes from the
checkpoint directory. The resumed model must equal the uninterrupted one bit for bit (on CPU).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_sc
from pyro_sc import datasets


class Interrupt(Exception):
    """Stands in for a crash, a kill or a Ctrl-C during an epoch."""


def interrupt_after(n_epochs: int):
    """A callback that raises at the ``n_epochs``-th epoch it sees, whichever run of the plan it is in."""
    seen = iter(range(1, 10**6))

    def callback(record):
        if next(seen) == n_epochs:
            raise Interrupt

    return callback


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def assert_same_model(resumed, uninterrupted) -> None:
    a, b = state_of(resumed), state_of(uninterrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    pd.testing.assert_frame_equal(resumed.history.drop(columns="seconds"), uninterrupted.history.drop(columns="seconds"))


@pytest.fixture(scope="module")
def cellassign_data():
    adata, markers, _ = datasets.simulate_cellassign(300, n_other_genes=20, seed=1)
    return adata, markers


CA = dict(max_epochs=14, num_restarts=3, screen_epochs=2, batch_size=64, early_stopping=False, seed=2)
# successive halving with 3 restarts: 2 epochs each (calls 1-6), the better 2 for 4 more (calls 7-14),
# the winner for the last 8 (calls 15-22)


@pytest.fixture(scope="module")
def cellassign_uninterrupted(cellassign_data):
    model = pyro_sc.CellAssign(*cellassign_data)
    model.train(**CA)
    return model


@pytest.mark.parametrize("n_epochs", [3, 10, 18], ids=["screening, round 1", "screening, round 2", "the winner"])
def test_cellassign_restarts_resume_bit_for_bit(cellassign_data, cellassign_uninterrupted, n_epochs, tmp_path):
    interrupted = pyro_sc.CellAssign(*cellassign_data)
    with pytest.raises(Interrupt):
        interrupted.train(checkpoint_every=1, checkpoint_path=tmp_path, callbacks=[interrupt_after(n_epochs)], **CA)
    resumed = pyro_sc.CellAssign(*cellassign_data)  # as in a new process
    resumed.train(resume=tmp_path, checkpoint_every=1, checkpoint_path=tmp_path, **CA)
    assert_same_model(resumed, cellassign_uninterrupted)
    assert resumed.restart_losses == cellassign_uninterrupted.restart_losses
    np.testing.assert_array_equal(resumed.predict().to_numpy(), cellassign_uninterrupted.predict().to_numpy())


def test_cellassign_successive_halving(cellassign_uninterrupted):
    history = cellassign_uninterrupted.history
    assert list(history["epoch"]) == list(range(1, 15))  # the winner's 2 + 4 + 8 epochs, numbered in order
    losses = cellassign_uninterrupted.restart_losses
    assert len(losses) == 3 and np.isfinite(losses).all()
    # the winner's is its best over all its epochs; the others' their best when they were left out
    assert sum(loss == history["validation_loss"].min() for loss in losses) == 1


def test_cellassign_short_run_with_restarts(cellassign_data):
    """max_epochs no longer than the screening: the restarts share it and the best is kept."""
    model = pyro_sc.CellAssign(*cellassign_data)
    history = model.train(max_epochs=5, num_restarts=2, batch_size=64, seed=0)
    assert list(history["epoch"]) == [1, 2, 3, 4, 5]
    assert len(model.restart_losses) == 2


def test_cellassign_trains_through_the_shared_path(cellassign_data):
    """A callback may query the model during the first train(); a second train() continues it."""
    model = pyro_sc.CellAssign(*cellassign_data)
    assigned = []
    model.train(max_epochs=4, num_restarts=1, batch_size=64, seed=0,
                callbacks=[lambda record: assigned.append(model.predict().idxmax(axis=1))])
    assert len(assigned) == 4
    first = model.history.copy()
    before = state_of(model)
    model.train(max_epochs=3, batch_size=64, seed=0)
    assert list(model.history["epoch"]) == list(range(1, 8))
    pd.testing.assert_frame_equal(model.history.iloc[:4], first)
    assert any(not torch.equal(before[k], v) for k, v in state_of(model).items())  # it trained on


@pytest.fixture(scope="module")
def capvi_data():
    return datasets.simulate_scvi(300, 60, n_latent=3, n_types=3, n_batches=2, seed=0)


CAP = dict(max_epochs=(3, 3, 3), early_stopping=(True, False, False), seed=1, batch_size=64, progress_bar=False)


def capvi(adata):
    return pyro_sc.CAPVI(adata, labels_key="cell_type", batch_key="batch", n_latent=3, n_hidden=16)


@pytest.fixture(scope="module")
def capvi_uninterrupted(capvi_data):
    model = capvi(capvi_data)
    model.train(**CAP)
    return model


@pytest.mark.parametrize("n_epochs", [2, 5, 8], ids=["stage 1", "stage 2", "stage 3"])
def test_capvi_stages_resume_bit_for_bit(capvi_data, capvi_uninterrupted, n_epochs, tmp_path):
    interrupted = capvi(capvi_data)
    with pytest.raises(Interrupt):
        interrupted.train(checkpoint_every=1, checkpoint_path=tmp_path, callbacks=[interrupt_after(n_epochs)], **CAP)
    resumed = capvi(capvi_data)
    resumed.train(resume=tmp_path, checkpoint_every=1, checkpoint_path=tmp_path, **CAP)
    assert_same_model(resumed, capvi_uninterrupted)
    assert list(resumed.history["stage"]) == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_a_plan_checkpoints_to_a_directory(cellassign_data, tmp_path):
    (tmp_path / "file.pt").write_text("")
    with pytest.raises(ValueError, match=r"file\.pt is a file: a model that trains in several runs \(restarts, "
                                         r"stages\) checkpoints to a directory$"):
        pyro_sc.CellAssign(*cellassign_data).train(checkpoint_every=1, checkpoint_path=tmp_path / "file.pt", **CA)
    with pytest.raises(FileNotFoundError, match=r"^no checkpoint at .*missing$"):
        pyro_sc.CellAssign(*cellassign_data).train(resume=tmp_path / "missing", **CA)


def test_plan_without_checkpoints_writes_nothing(cellassign_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the way either
        pyro_sc.CellAssign(*cellassign_data).train(max_epochs=3, num_restarts=2, screen_epochs=1, batch_size=64)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- one-run methods resume too
@pytest.fixture(scope="module")
def scanvi_data():
    adata = datasets.simulate_scvi(300, 60, n_latent=3, n_types=3, n_batches=2, seed=3)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(adata.n_obs) < 0.7] = "Unknown"  # 30 % labelled: > batch_size
    adata.obs["seed_labels"] = labels
    return adata


def scanvi(adata):
    return pyro_sc.SCANVI(adata, labels_key="seed_labels", unlabeled_category="Unknown", batch_key="batch",
                          n_latent=3, n_hidden=16)


SSV = dict(max_epochs=6, batch_size=32, seed=4, progress_bar=False)


def test_scanvi_resumes_bit_for_bit_and_its_labelled_draws_follow_the_seed(scanvi_data, tmp_path):
    uninterrupted = scanvi(scanvi_data)
    uninterrupted.train(**SSV)
    interrupted = scanvi(scanvi_data)
    with pytest.raises(Interrupt):
        interrupted.train(checkpoint_every=1, checkpoint_path=tmp_path, callbacks=[interrupt_after(4)], **SSV)
    resumed = scanvi(scanvi_data)
    resumed.train(resume=tmp_path, checkpoint_every=1, checkpoint_path=tmp_path, **SSV)
    assert_same_model(resumed, uninterrupted)
    # the labelled cells of the classification term are drawn under the seed: same seed, same run ...
    again = scanvi(scanvi_data)
    again.train(**SSV)
    assert_same_model(again, uninterrupted)
    # ... and the labelled cells drawn for the classification term follow torch's generator (which fit seeds)
    model = scanvi(scanvi_data)
    model.module.eval()  # no dropout: the draw of cells is the only randomness
    model._labelled_batch_size = 16  # of about 90 labelled cells (train() sets it to its batch_size)
    term, mb = model._extra_loss(), model.setup.minibatch(np.arange(10))
    losses = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        losses.append(float(term(mb)))
    assert losses[0] == losses[1] != losses[2]


def test_etm_resumes_bit_for_bit(tmp_path):
    adata = datasets.simulate_scvi(200, 80, n_latent=3, n_types=3, n_batches=1, seed=5)
    options = dict(max_epochs=6, batch_size=50, seed=1, progress_bar=False)
    uninterrupted = pyro_sc.ETM(adata, n_topics=4)
    uninterrupted.train(**options)
    interrupted = pyro_sc.ETM(adata, n_topics=4)
    with pytest.raises(Interrupt):
        interrupted.train(checkpoint_every=2, checkpoint_path=tmp_path, callbacks=[interrupt_after(5)], **options)
    resumed = pyro_sc.ETM(adata, n_topics=4)
    resumed.train(resume=tmp_path, checkpoint_every=2, checkpoint_path=tmp_path, **options)
    assert_same_model(resumed, uninterrupted)


def test_save_and_load_keep_the_methods_own_attributes(cellassign_uninterrupted, scanvi_data, tmp_path):
    cellassign_uninterrupted.save(tmp_path / "ca.pt")
    loaded = pyro_sc.CellAssign.load(tmp_path / "ca.pt", cellassign_uninterrupted.adata)
    assert loaded.restart_losses == cellassign_uninterrupted.restart_losses
    scvi = pyro_sc.SCVI(scanvi_data, batch_key="batch", n_latent=3, n_hidden=16)
    scvi.train(max_epochs=1, batch_size=32, progress_bar=False)
    ssv = pyro_sc.SCANVI.from_scvi_model(scvi, labels_key="seed_labels", unlabeled_category="Unknown")
    ssv.train(max_epochs=1, batch_size=32, progress_bar=False)
    ssv.save(tmp_path / "ssv.pt")
    assert pyro_sc.SCANVI.load(tmp_path / "ssv.pt", scanvi_data).pretrained is True
    assert pyro_sc.SCANVI.load(tmp_path / "ssv.pt", scanvi_data)._labelled_batch_size == 128

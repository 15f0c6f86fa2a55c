"""Reliability (issue 9): every bad input gets an error that names it; numerical faults are caught, or
survived on request; an interrupted run resumes to bit-identical parameters; saved files are versioned;
a seed fixes the result; no call mutates the user's AnnData."""

import types
import warnings

import anndata
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from pyro.nn import PyroModule, PyroParam

import pyro_sc
from pyro_sc import datasets
from pyro_sc.data import AnnDataSetup, DataError, DataWarning
from pyro_sc.infer import TrainingError, TrainingWarning, fit
from pyro_sc.models._base import SAVE_FORMAT

SMALL = dict(n_hidden=16, n_latent=3)  # a small scVI: these tests check behaviour, not fit quality
FAST = dict(progress_bar=False, batch_size=64, n_epochs_kl_warmup=2)  # 108 training cells: 2 steps an epoch


def scvi_data(n_cells: int = 120, n_genes: int = 30, seed: int = 0) -> anndata.AnnData:
    return datasets.simulate_scvi(n_cells, n_genes, n_latent=3, n_types=3, n_batches=2, seed=seed)


def cellassign_data() -> tuple[anndata.AnnData, pd.DataFrame]:
    adata, markers, _ = datasets.simulate_cellassign(300, n_other_genes=20, seed=1)
    return adata, markers


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Small data sets, a trained scVI, and the files the loading cases read."""
    tmp = tmp_path_factory.mktemp("reliability")
    adata = scvi_data()
    trained = pyro_sc.SCVI(adata, batch_key="batch", **SMALL)
    trained.train(max_epochs=2, **FAST)
    trained.save(tmp / "scvi.pt")
    other = pyro_sc.SCVI(adata, batch_key="batch", **SMALL)
    other.train(max_epochs=2, checkpoint_every=2, checkpoint_path=tmp / "checkpoint.pt", **FAST)
    ca_adata, markers = cellassign_data()
    return types.SimpleNamespace(adata=adata, trained=trained, ca_adata=ca_adata, markers=markers, tmp=tmp)


# --------------------------------------------------------------------------------------- bad input
def with_count(adata: anndata.AnnData, value: float) -> anndata.AnnData:
    x = adata.X.toarray()
    x[3, 4] = value
    return anndata.AnnData(sp.csr_matrix(x), obs=adata.obs.copy(), var=adata.var.copy())


def in_layer(adata: anndata.AnnData) -> anndata.AnnData:
    out = adata.copy()
    out.layers["counts"] = out.X.copy()
    out.layers["counts"].data = out.layers["counts"].data * 0.5
    return out


def with_empty_cells(adata: anndata.AnnData) -> anndata.AnnData:
    x = adata.X.toarray()
    x[[3, 7]] = 0
    return anndata.AnnData(x, obs=adata.obs.copy(), var=adata.var.copy())


def with_missing_batch(adata: anndata.AnnData) -> anndata.AnnData:
    out = adata.copy()
    out.obs["batch"] = out.obs["batch"].astype(object)
    out.obs.iloc[5, out.obs.columns.get_loc("batch")] = None
    return out


def relabelled(adata: anndata.AnnData, column: str, value: str) -> anndata.AnnData:
    out = adata[:20].copy()
    out.obs[column] = pd.Categorical([value] * out.n_obs)
    return out


def with_size_factor(adata: anndata.AnnData, value: float) -> anndata.AnnData:
    out = adata.copy()
    out.obs.iloc[2, out.obs.columns.get_loc("size_factor")] = value
    return out


def with_marker_rows(markers: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([markers, rows])


def with_symbols(adata: anndata.AnnData) -> anndata.AnnData:
    """A ``symbol`` column naming two columns of the data ``marker_0``."""
    out = adata.copy()
    out.var["symbol"] = out.var_names
    out.var.loc["other_0", "symbol"] = "marker_0"
    return out


def labelled_setup(adata: anndata.AnnData) -> AnnDataSetup:
    return AnnDataSetup(adata, labels_key="cell_type")


def tampered(path, tmp, **changes) -> str:
    saved = torch.load(path, weights_only=True)
    saved.update(changes)
    out = tmp / f"tampered_{'_'.join(changes)}.pt"
    torch.save(saved, out)
    return out


# (what the user did wrong, the call, the error, the message it must show)
BAD_INPUTS = [
    ("negative counts", lambda e: pyro_sc.SCVI(with_count(e.adata, -1.0)),
     DataError, r"^adata\.X has negative values; counts must be >= 0$"),
    ("NaN counts", lambda e: pyro_sc.SCVI(with_count(e.adata, np.nan)),
     DataError, r"^adata\.X has NaN or inf values; counts must be finite$"),
    ("inf counts", lambda e: pyro_sc.SCVI(with_count(e.adata, np.inf)),
     DataError, r"^adata\.X has NaN or inf values; counts must be finite$"),
    ("non-integer counts", lambda e: pyro_sc.SCVI(with_count(e.adata, 2.5)),
     DataError, r"^adata\.X has non-integer values: expected raw counts, .*allow_non_integer=True for e\.g\. "
                r"ambient-corrected counts\)$"),
    ("non-integer counts in the named layer", lambda e: pyro_sc.SCVI(in_layer(e.adata), layer="counts"),
     DataError, r"^adata\.layers\['counts'\] has non-integer values"),
    ("boolean matrix", lambda e: pyro_sc.SCVI(anndata.AnnData(e.adata.X.toarray() > 0)),
     DataError, r"^adata\.X holds bool values, expected numeric counts$"),
    ("all-zero cells", lambda e: pyro_sc.SCVI(with_empty_cells(e.adata)),
     DataError, r"^2 cells have zero total counts \(first: \['cell_3', 'cell_7'\]\); remove them first"),
    ("empty AnnData (no cells)", lambda e: pyro_sc.SCVI(e.adata[:0].copy()),
     DataError, r"^the AnnData is empty \(0 cells x 30 genes\)$"),
    ("empty AnnData (no genes)", lambda e: pyro_sc.SCVI(e.adata[:, :0].copy()),
     DataError, r"^the AnnData is empty \(120 cells x 0 genes\)$"),
    ("layer that does not exist", lambda e: pyro_sc.SCVI(e.adata, layer="counts"),
     DataError, r"^layer 'counts' not found in adata\.layers \(available: none\)$"),
    ("obs key that does not exist", lambda e: pyro_sc.SCVI(e.adata, batch_key="sample"),
     DataError, r"^batch key 'sample' not found in adata\.obs \(columns: \['cell_type', 'batch'\]\)$"),
    ("obs key with missing values", lambda e: pyro_sc.SCVI(with_missing_batch(e.adata), batch_key="batch"),
     DataError, r"^batch key 'batch' has 1 missing values$"),
    ("size factor key that does not exist",
     lambda e: pyro_sc.CellAssign(e.ca_adata, e.markers, size_factor_key="sf"),
     DataError, r"^size factor key 'sf' not found in adata\.obs"),
    ("zero size factor",
     lambda e: pyro_sc.CellAssign(with_size_factor(e.ca_adata, 0.0), e.markers, size_factor_key="size_factor"),
     DataError, r"^size factor key 'size_factor' has 1 values that are zero, negative, NaN or inf "
                r"\(first cells: \['cell_2'\]\)$"),
    ("label unseen at training time",
     lambda e: AnnDataSetup.from_registry(
         relabelled(e.adata, "cell_type", "type_9"), labelled_setup(e.adata).registry(), require_labels=True),
     DataError, r"^label key 'cell_type' has values not seen when the model was set up: \['type_9'\] "
                r"\(known: \['type_0', 'type_1', 'type_2'\]\)$"),
    ("batch unseen at training time",
     lambda e: e.trained.get_latent_representation(relabelled(e.adata, "batch", "batch_7")),
     DataError, r"^batch key 'batch' has values not seen when the model was set up: \['batch_7'\]"),
    ("query with fewer genes", lambda e: e.trained.get_latent_representation(e.adata[:, 2:].copy()),
     DataError, r"^the genes of this AnnData do not match the model's: 2 model genes missing "
                r"\(e\.g\. \['gene_0', 'gene_1'\]\)$"),
    ("query with genes reordered", lambda e: e.trained.get_latent_representation(e.adata[:, ::-1].copy()),
     DataError, r"^the genes of this AnnData do not match the model's: the same genes in a different order"),
    ("loading onto other genes", lambda e: pyro_sc.SCVI.load(e.tmp / "scvi.pt", scvi_data(n_genes=31)),
     DataError, r"^the genes of this AnnData do not match the model's: 1 genes the model does not know "
                r"\(e\.g\. \['gene_30'\]\)$"),
    ("marker gene absent from the data",
     lambda e: pyro_sc.CellAssign(
         e.ca_adata, with_marker_rows(e.markers, pd.DataFrame([[1, 0, 0, 0, 0]], index=["NOTAGENE"],
                                                              columns=e.markers.columns))),
     DataError, r"^1 marker genes are not in the data: \['NOTAGENE'\] \(if adata\.var_names are IDs, pass "
                r"var_key= naming the symbols column\); pass drop_missing_markers=True to drop them$"),
    ("marker gene listed twice",
     lambda e: pyro_sc.CellAssign(e.ca_adata, with_marker_rows(e.markers, e.markers.iloc[:1])),
     DataError, r"^the marker matrix lists genes more than once: \['marker_0'\]$"),
    ("cell type listed twice",
     lambda e: pyro_sc.CellAssign(e.ca_adata, e.markers.set_axis(["A", "B", "C", "D", "A"], axis=1)),
     DataError, r"^the marker matrix lists cell types more than once: \['A'\]$"),
    ("marker gene in two columns of the data",
     lambda e: pyro_sc.CellAssign(with_symbols(e.ca_adata), e.markers, var_key="symbol"),
     DataError, r"^marker genes found in more than one column of the data: \['marker_0'\]$"),
    ("model loaded with the wrong class", lambda e: pyro_sc.CellAssign.load(e.tmp / "scvi.pt", e.adata),
     TypeError, r"scvi\.pt holds a 'SCVI' model, not a CellAssign$"),
    ("file from a newer file format",
     lambda e: pyro_sc.SCVI.load(tampered(e.tmp / "scvi.pt", e.tmp, format_version=3, pyro_sc_version="9.0"),
                                 e.adata),
     ValueError, r"was written by pyro_sc 9\.0 in file format 3; this pyro_sc \(0\.1\.0\) reads formats up to "
                 r"2: upgrade pyro_sc to load it$"),
    ("parameters that no longer fit",
     lambda e: pyro_sc.SCVI.load(tampered(e.tmp / "scvi.pt", e.tmp, state_dict={}), e.adata),
     ValueError, r"(?s)^the parameters in .* \(pyro_sc 0\.1\.0\) do not fit this version's SCVI: .*Missing key"),
    ("a checkpoint loaded as a model", lambda e: pyro_sc.SCVI.load(e.tmp / "checkpoint.pt", e.adata),
     ValueError, r"is not a model written by pyro_sc's save\(\) \(a training checkpoint is resumed with "
                 r"train\(resume=\.\.\.\)\)$"),
    ("a model file passed as a checkpoint",
     lambda e: pyro_sc.SCVI(e.adata, batch_key="batch", **SMALL).train(resume=e.tmp / "scvi.pt", **FAST),
     ValueError, r"scvi\.pt is not a pyro_sc training checkpoint \(a model written by save\(\) is read with "
                 r"load\(\)\)$"),
    ("a checkpoint of another model",
     lambda e: pyro_sc.SCVI(e.adata, batch_key="batch", n_hidden=8, n_latent=3).train(
         resume=e.tmp / "checkpoint.pt", **FAST),
     ValueError, r"^the checkpoint does not match this model: 13 trained tensors have other shapes \(e\.g\. "
                 r"\(16, 30\) in the checkpoint, \(8, 30\) here\)$"),
    ("a checkpoint of a run with another seed",
     lambda e: pyro_sc.SCVI(e.adata, batch_key="batch", **SMALL).train(
         resume=e.tmp / "checkpoint.pt", seed=1, **FAST),
     ValueError, r"checkpoint\.pt was written by a run with seed 0, not 1: resume a run with the options it was "
                 r"started with$"),
    ("a minibatch of one cell under batch normalisation",
     lambda e: pyro_sc.SCVI(e.adata, **SMALL).train(**{**FAST, "batch_size": 1}),
     ValueError, r"^batch_size=1: the networks use batch normalisation, which needs at least two cells per "
                 r"minibatch; use batch_size >= 2"),
    ("a checkpoint of other data",
     lambda e: pyro_sc.SCVI(scvi_data(n_cells=100), batch_key="batch", **SMALL).train(
         resume=e.tmp / "checkpoint.pt", **FAST),
     ValueError, r"checkpoint\.pt was written for 120 cells, not 100$"),
]


@pytest.mark.parametrize("action, error, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_an_error_naming_it(env, action, error, message):
    with pytest.raises(error, match=message):
        action(env)


def test_non_integer_counts_are_accepted_with_the_opt_in(env):
    setup = AnnDataSetup(with_count(env.adata, 2.5), allow_non_integer=True)
    assert setup.counts(np.array([3]))[0, 4] == 2.5


def test_genes_without_counts_warn_at_registration_but_not_in_queries(env):
    adata = env.adata.copy()
    x = adata.X.toarray()
    x[:, [5, 9]] = 0
    adata.X = sp.csr_matrix(x)
    with pytest.warns(DataWarning, match=r"^adata\.X: 2 genes have zero counts in every cell \(first: "
                                         r"\['gene_5', 'gene_9'\]\); .*filter_genes"):
        pyro_sc.SCVI(adata)
    ca_x = env.ca_adata.X.toarray()
    ca_x[:, 3] = 0
    ca_adata = anndata.AnnData(ca_x, obs=env.ca_adata.obs, var=env.ca_adata.var)
    with pytest.warns(DataWarning, match=r"1 genes have zero counts in every cell \(first: \['marker_3'\]\)"):
        pyro_sc.CellAssign(ca_adata, env.markers, size_factor_key="size_factor")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        env.trained.get_latent_representation(adata)  # few query cells may well miss a gene


def test_a_file_from_another_package_version_loads_with_a_warning(env):
    old = tampered(env.tmp / "scvi.pt", env.tmp, pyro_sc_version="0.0.9")
    with pytest.warns(UserWarning, match=r"was written by pyro_sc 0\.0\.9, this is 0\.1\.0: its format is readable"):
        loaded = pyro_sc.SCVI.load(old, env.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), env.trained.get_latent_representation())
    # format 0: written before files carried a format version, with the same layout
    unversioned = torch.load(env.tmp / "scvi.pt", weights_only=True)
    del unversioned["format_version"]
    torch.save(unversioned, env.tmp / "unversioned.pt")
    loaded = pyro_sc.SCVI.load(env.tmp / "unversioned.pt", env.adata)
    assert_same_state(state_of(loaded), state_of(env.trained))
    assert torch.load(env.tmp / "scvi.pt", weights_only=True)["format_version"] == SAVE_FORMAT


# -------------------------------------------------------------------------------- numerical faults
def extreme_counts(n_cells: int = 200, n_genes: int = 40, seed: int = 0) -> anndata.AnnData:
    """Library sizes log-uniform from 1e1 to 1e6 counts per cell; gene 0 takes 5/6 of every library."""
    rng = np.random.default_rng(seed)
    library_n = np.exp(rng.uniform(np.log(1e1), np.log(1e6), n_cells))
    library_n[:2] = [1e1, 1e6]
    w_g = rng.dirichlet(np.ones(n_genes))
    w_g[0] = 5.0
    x_ng = np.stack([rng.multinomial(int(lib), w_g / w_g.sum()) for lib in library_n]).astype(np.float32)
    obs = pd.DataFrame({"batch": rng.choice(["a", "b"], n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    return anndata.AnnData(x_ng, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


@pytest.mark.parametrize(
    "options", [{}, {"latent_library": True, "likelihood": "nb", "dispersion": "gene-batch"}]
)
def test_extreme_library_sizes_and_a_huge_gene_train_to_finite_values(options):
    adata = extreme_counts()
    assert adata.X.sum(1).min() == 10 and adata.X.sum(1).max() == 1e6 and adata.X[:, 0].max() > 5e5
    model = pyro_sc.SCVI(adata, batch_key="batch", **SMALL, **options)
    history = model.train(max_epochs=8, lr=1e-2, **FAST)  # a high learning rate, to provoke overflow
    assert np.isfinite(history[["train_loss", "validation_loss"]].to_numpy()).all()
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert np.isfinite(model.get_latent_representation()).all()
    rho = model.get_normalized_expression(library_size=1e4).to_numpy()
    assert np.isfinite(rho).all() and np.allclose(rho.sum(1), 1e4, rtol=1e-3)
    assert np.isfinite(model.get_marginal_ll(n_samples=5))


def test_cellassign_on_extreme_library_sizes_stays_finite():
    adata = extreme_counts()
    markers = pd.DataFrame(0, index=adata.var_names, columns=["A", "B"])
    markers.iloc[[0, 1], 0] = 1
    markers.iloc[[2, 3], 1] = 1
    model = pyro_sc.CellAssign(adata, markers)
    history = model.train(max_epochs=10, num_restarts=1)
    assert np.isfinite(history[["train_loss", "validation_loss"]].to_numpy()).all()
    gamma = model.predict().to_numpy()
    assert np.isfinite(gamma).all() and np.allclose(gamma.sum(1), 1.0, rtol=1e-5)


def nan_at(call: int, model, states: list, fault: str, *, once: bool = False):
    """An extra loss term that records the module's state at each step and turns bad from its ``call``-th
    call on (at that call only, ``once``)."""

    def extra_loss(mb):
        states.append(state_of(model))
        if len(states) < call or (once and len(states) > call):
            return torch.zeros(())
        if fault == "loss":
            return torch.tensor(float("nan"))
        # finite (zero) value, NaN gradient: d|x|/dx * d sqrt(u)/du = 0 * inf at zero
        return (model.module.log_theta_gb * 0).abs().sqrt().sum()

    return extra_loss


@pytest.mark.parametrize(
    "fault, message", [("loss", "the loss became nan"), ("gradient", "the gradients became non-finite")]
)
def test_a_nan_is_caught_at_its_step_with_the_last_good_state_kept(env, fault, message):
    model = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)
    states: list = []
    with pytest.raises(TrainingError, match=rf"^{message} at epoch 3, step 1 \(global step 5\); the parameters "
                                            "were not updated and hold the values of the last good step"):
        model.train(max_epochs=4, extra_loss=nan_at(5, model, states, fault), **FAST)
    # parameters as they were at the bad step (after 4 updates); batch-norm statistics as before its forward pass
    buffers = dict(model.module.named_buffers())
    expected = {k: (states[3] if k in buffers else states[4])[k] for k in states[4]}
    assert any(not torch.equal(states[3][k], states[4][k]) for k in buffers)  # the bad step moved them
    assert any(not torch.equal(states[3][k], states[4][k]) for k in expected if k not in buffers)
    assert_same_state(state_of(model), expected)


def test_reduce_lr_restarts_the_epoch_from_its_first_state_and_continues(env):
    model = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)
    states: list = []
    at_epoch_end = {}

    def callback(record):
        at_epoch_end[record["epoch"]] = state_of(model)

    with pytest.warns(TrainingWarning, match=r"^the loss became nan at epoch 3, step 2 \(global step 6\): epoch 3 "
                                             r"starts again from its first state with lr 0\.0001 \(reduction 1 of "
                                             r"at most 3\)$") as caught:
        history = model.train(max_epochs=5, lr=1e-3, extra_loss=nan_at(6, model, states, "loss", once=True),
                              callbacks=[callback], on_nonfinite="reduce_lr", **FAST)
    assert len([w for w in caught if issubclass(w.category, TrainingWarning)]) == 1
    assert len(history) == 5 and np.isfinite(history["train_loss"]).all()
    np.testing.assert_allclose(history["lr"], [1e-3, 1e-3, 1e-4, 1e-4, 1e-4])
    assert history["lr_reductions"].tolist() == [0, 0, 1, 1, 1]
    # the restarted epoch's first step (the 7th call) starts where epoch 2 ended, not from step 5's update
    # (compared on the parameters: the step's forward pass has already moved the batch-norm statistics)
    buffers = dict(model.module.named_buffers())
    params = [k for k in states[6] if k not in buffers]
    assert all(torch.equal(states[6][k], at_epoch_end[2][k]) for k in params)
    assert not all(torch.equal(states[5][k], at_epoch_end[2][k]) for k in params)


def test_reduce_lr_gives_up_after_its_last_reduction(env):
    model = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)
    states: list = []
    at_epoch_end = {}
    with pytest.warns(TrainingWarning), pytest.raises(
        TrainingError, match=r"^the loss became nan at epoch 2, step 1 \(global step 3\), after 2 learning-rate "
                             r"reductions; the parameters hold the values of the start of epoch 2, the last good state"
    ):
        model.train(max_epochs=4, extra_loss=nan_at(3, model, states, "loss"), on_nonfinite="reduce_lr",
                    max_lr_reductions=2, callbacks=[lambda r: at_epoch_end.update({r["epoch"]: state_of(model)})],
                    **FAST)
    assert len(states) == 5  # two good steps, then three tries of epoch 2's first step
    assert_same_state(state_of(model), at_epoch_end[1])


def test_bad_fault_and_checkpoint_options_are_named(env):
    model = pyro_sc.SCVI(env.adata, **SMALL)
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise' or 'reduce_lr', got 'skip'"):
        model.train(on_nonfinite="skip", **FAST)
    with pytest.raises(ValueError, match=r"lr_reduction_factor must be in \(0, 1\), got 2"):
        model.train(on_nonfinite="reduce_lr", lr_reduction_factor=2, **FAST)
    with pytest.raises(ValueError, match="checkpoint_every and checkpoint_path go together"):
        model.train(checkpoint_every=2, **FAST)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        model.train(resume=env.tmp / "nothing.pt", **FAST)


# --------------------------------------------------------------------------------- interrupted runs
class Interrupt(Exception):
    """Stands in for a crash, a kill or a Ctrl-C during an epoch."""


def interrupt_at(epoch: int):
    def callback(record):
        if record["epoch"] == epoch:
            raise Interrupt

    return callback


def test_scvi_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(env, tmp_path):
    options = dict(max_epochs=7, seed=3, **FAST)
    uninterrupted = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)
    expected = uninterrupted.train(**options)

    interrupted = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)
    with pytest.raises(Interrupt):  # epochs 1-5 trained, the last checkpoint after epoch 4
        interrupted.train(checkpoint_every=2, checkpoint_path=tmp_path, callbacks=[interrupt_at(5)], **options)
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "checkpoint.pt.tmp").exists()

    resumed = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)  # as in a new process
    history = resumed.train(resume=tmp_path, checkpoint_every=2, checkpoint_path=tmp_path, **options)
    assert_same_state(state_of(resumed), state_of(uninterrupted))
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), expected.drop(columns="seconds"))
    np.testing.assert_array_equal(resumed.get_latent_representation(), uninterrupted.get_latent_representation())


def test_a_finished_runs_checkpoint_continues_as_a_longer_run(env, tmp_path):
    longer = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)
    longer.train(max_epochs=6, **FAST)
    shorter = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)
    shorter.train(max_epochs=4, checkpoint_every=4, checkpoint_path=tmp_path / "run.pt", **FAST)
    continued = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)
    history = continued.train(max_epochs=6, resume=tmp_path / "run.pt", **FAST)
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    assert_same_state(state_of(continued), state_of(longer))


class PoissonRates(PyroModule):
    """x_ng ~ Poisson(exp(log_rate_g)): a user's model small enough to stop early within a few epochs."""

    def __init__(self, n_genes: int):
        super().__init__()
        self.log_rate_g = PyroParam(torch.zeros(n_genes))

    def model(self, mb):
        with pyro.plate("cells", mb.n_obs, subsample=mb.idx_n):
            pyro.sample("x", dist.Poisson(self.log_rate_g.exp()).to_event(1), obs=mb.x_ng)

    def guide(self, mb):
        pass


def test_resume_carries_early_stopping_and_learning_rate_reductions(env, tmp_path):
    setup = AnnDataSetup(env.adata)
    options = dict(max_epochs=200, batch_size=32, lr=0.3, early_stopping=True, patience=3, min_delta=1e-3,
                   on_nonfinite="reduce_lr", lr_reduction_factor=0.5, progress_bar=False, seed=1)

    def nan_at_second_step():
        calls = iter(range(1, 10 ** 6))
        return lambda mb: torch.tensor(float("nan") if next(calls) == 2 else 0.0)

    uninterrupted = PoissonRates(setup.n_vars)
    with pytest.warns(TrainingWarning, match="epoch 1 starts again"):
        expected = fit(uninterrupted.model, uninterrupted.guide, setup, modules=[uninterrupted],
                       extra_loss=nan_at_second_step(), **options)
    n_epochs = len(expected)
    assert expected.attrs["stopped_early"] and 8 <= n_epochs < 200
    assert expected["lr_reductions"].iloc[-1] == 1

    interrupted = PoissonRates(setup.n_vars)
    with pytest.warns(TrainingWarning), pytest.raises(Interrupt):
        fit(interrupted.model, interrupted.guide, setup, modules=[interrupted], extra_loss=nan_at_second_step(),
            checkpoint_every=3, checkpoint_path=tmp_path / "run.pt", callbacks=[interrupt_at(n_epochs - 1)],
            **options)
    resumed = PoissonRates(setup.n_vars)
    history = fit(resumed.model, resumed.guide, setup, modules=[resumed], extra_loss=lambda mb: torch.zeros(()),
                  resume=tmp_path / "run.pt", **options)  # the fault lies before the checkpoint
    assert torch.equal(resumed.log_rate_g.detach(), uninterrupted.log_rate_g.detach())  # the best epoch's
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), expected.drop(columns="seconds"))
    assert history.attrs["stopped_early"]


def test_cellassign_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(env, tmp_path):
    # early stopping on: its best loss, patience count and best state travel in the checkpoint too
    options = dict(max_epochs=9, num_restarts=1, batch_size=128, patience=3, seed=2)
    uninterrupted = pyro_sc.CellAssign(env.ca_adata, env.markers)
    expected = uninterrupted.train(**options)

    interrupted = pyro_sc.CellAssign(env.ca_adata, env.markers)
    with pytest.raises(Interrupt):
        interrupted.train(checkpoint_every=3, checkpoint_path=tmp_path / "ca.pt", callbacks=[interrupt_at(5)],
                          **options)
    resumed = pyro_sc.CellAssign(env.ca_adata, env.markers)
    history = resumed.train(resume=tmp_path / "ca.pt", **options)
    assert_same_state(state_of(resumed), state_of(uninterrupted))
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), expected.drop(columns="seconds"))
    pd.testing.assert_frame_equal(resumed.predict(), uninterrupted.predict())


# ---------------------------------------------------------------------------------- reproducibility
def test_scvi_same_seed_same_data_same_result(env):
    runs = []
    for seed in (5, 5, 6):
        model = pyro_sc.SCVI(env.adata, batch_key="batch", **SMALL)
        model.train(max_epochs=3, seed=seed, **FAST)
        runs.append((state_of(model), model.get_latent_representation(),
                     model.get_normalized_expression(n_samples=3)))
    assert_same_state(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    pd.testing.assert_frame_equal(runs[0][2], runs[1][2])
    assert not np.array_equal(runs[0][1], runs[2][1])  # the seed does matter


def test_cellassign_same_seed_same_data_same_result(env):
    runs = []
    for seed in (5, 5, 6):
        model = pyro_sc.CellAssign(env.ca_adata, env.markers)
        model.train(max_epochs=6, num_restarts=2, screen_epochs=2, seed=seed)
        runs.append((state_of(model), model.predict(), model.restart_losses))
    assert_same_state(runs[0][0], runs[1][0])
    pd.testing.assert_frame_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]
    assert not torch.equal(runs[0][0]["beta0_g"], runs[2][0]["beta0_g"])


# ------------------------------------------------------------------------------------- no mutation
def assert_same_adata(a: anndata.AnnData, b: anndata.AnnData) -> None:
    assert type(a.X) is type(b.X) and (a.X != b.X).nnz == 0
    assert a.layers.keys() == b.layers.keys()
    for key in a.layers:
        assert type(a.layers[key]) is type(b.layers[key]) and (a.layers[key] != b.layers[key]).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert a.uns.keys() == b.uns.keys() and a.obsm.keys() == b.obsm.keys()
    assert a.varm.keys() == b.varm.keys() and a.obsp.keys() == b.obsp.keys()


def test_no_call_mutates_the_users_anndata(env, tmp_path):
    adata = env.adata.copy()
    adata.layers["counts"] = sp.csc_matrix(adata.X)  # a format the data layer converts (on its own copy)
    adata.X = adata.X.multiply(0.5).tocsr()  # a "normalised" X the models must not read
    before = adata.copy()
    model = pyro_sc.SCVI(adata, layer="counts", batch_key="batch", **SMALL)
    model.train(max_epochs=2, checkpoint_every=1, checkpoint_path=tmp_path / "c.pt", **FAST)
    model.get_latent_representation(adata)
    model.get_normalized_expression(adata, transform_batch="batch_0")
    model.get_marginal_ll(adata, n_samples=2)
    model.save(tmp_path / "m.pt")
    pyro_sc.SCVI.load(tmp_path / "m.pt", adata)
    assert_same_adata(adata, before)

    ca_adata = env.ca_adata.copy()
    ca_before = ca_adata.copy()
    model = pyro_sc.CellAssign(ca_adata, env.markers)
    model.train(max_epochs=2, num_restarts=1)
    model.predict(ca_adata)
    assert_same_adata(ca_adata, ca_before)


def with_seed_labels(adata: anndata.AnnData) -> anndata.AnnData:
    adata = adata.copy()
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    adata.obs["seed_labels"] = np.where(np.arange(adata.n_obs) % 5 == 0, truth, "Unknown")
    return adata


@pytest.mark.parametrize("method", ["SCANVI", "CAPVI"])
def test_cell_type_vaes_same_seed_same_data_same_result_and_no_mutation(env, method, tmp_path):
    adata = with_seed_labels(env.adata)
    before = adata.copy()

    def run(seed):
        if method == "SCANVI":
            model = pyro_sc.SCANVI(adata, labels_key="seed_labels", unlabeled_category="Unknown",
                                   batch_key="batch", **SMALL)
            model.train(max_epochs=3, seed=seed, progress_bar=False, batch_size=64)
        else:
            model = pyro_sc.CAPVI(adata, labels_key="seed_labels", unlabeled_category="Unknown",
                                  batch_key="batch", **SMALL)
            model.train(max_epochs=(3, 2, 2), seed=seed, progress_bar=False, batch_size=64)
        return model, state_of(model), model.predict(adata, soft=True), model.get_latent_representation(adata)

    model, *first = run(5)
    _, *second = run(5)
    _, *other = run(6)
    assert_same_state(first[0], second[0])
    pd.testing.assert_frame_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])
    assert not np.array_equal(first[2], other[2])  # the seed does matter
    model.get_marginal_ll(adata, n_samples=2)
    model.save(tmp_path / "m.pt")
    type(model).load(tmp_path / "m.pt", adata)
    assert_same_adata(adata, before)

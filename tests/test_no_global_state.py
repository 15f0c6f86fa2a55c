"""Importing and using pyro_sc changes nothing global for the user's own Pyro code.

Each check runs in a fresh interpreter, so "before the import" really is before it.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np

# A user's own PyroModule with a global pyro.param inside (the pattern Pyro's tutorials teach), trained
# by SVI for a few steps from a fixed seed; prints the losses.
USER_MODEL = textwrap.dedent(
    """
    import pyro, torch
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.nn import PyroModule

    class UserModel(PyroModule):
        def forward(self, y):
            loc = pyro.param("user_loc", torch.tensor(0.0))
            with pyro.plate("data", len(y)):
                pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    def user_losses():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        y = torch.randn(50) + 3.0
        model = UserModel()
        guide = lambda y: None
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
        return [svi.step(y) for _ in range(20)]
    """
)


def run_python(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pyro_sc_changes_nothing_global_and_its_models_share_no_parameters():
    out = run_python(USER_MODEL + textwrap.dedent(
        """
        import json
        import numpy as np
        settings_before = dict(pyro.settings.get())
        before = user_losses()
        import pyro_sc
        from pyro.infer.autoguide import AutoNormal
        settings_after_import = dict(pyro.settings.get())
        after_import = user_losses()
        adata = pyro_sc.datasets.simulate_scvi(n_cells=60, n_genes=20, n_types=2, seed=0)
        sparse = adata.copy()  # mostly zeros, so that the log-prob takes its fused (compiled) path
        x = np.asarray(sparse.X.todense() if hasattr(sparse.X, "todense") else sparse.X)
        x = x * (np.random.default_rng(0).random(x.shape) < 0.2)
        x[np.arange(len(x)), np.arange(len(x)) % x.shape[1]] += 1  # no empty cell
        sparse.X = x
        model = pyro_sc.SCVI(sparse, n_hidden=8, n_latent=2)
        # with the log-prob's kernels compiled, as in a user's session (the suite turns compiling off)
        pyro_sc.settings.compile, pyro_sc.distributions._COMPILE_MIN_ELEMENTS = True, 0
        model.train(max_epochs=2, seed=0, progress_bar=False)
        compiled = len(pyro_sc.distributions._compiled) > 0 and not pyro_sc.distributions._compile_failure
        pyro_sc.settings.compile = False
        # two models with autoguides (PyroModules built and run by pyro_sc), under Pyro's global mode
        a = pyro_sc.SCVI(adata, n_hidden=8, n_latent=2).set_guide(AutoNormal, sites=["z"])
        b = pyro_sc.SCVI(adata, n_hidden=8, n_latent=2).set_guide(AutoNormal, sites=["z"])
        b_before = {k: v.clone() for k, v in b.custom_guide.state_dict().items()}
        a.train(max_epochs=3, seed=0, progress_bar=False)
        a_state = a.custom_guide.state_dict()
        moved = max((a_state[k] - b_before[k]).abs().max().item() for k in b_before)
        unchanged = max((b.custom_guide.state_dict()[k] - b_before[k]).abs().max().item() for k in b_before)
        shared = [k for k, v in a_state.items() if v.data_ptr() == b.custom_guide.state_dict()[k].data_ptr()]
        store_after_training = sorted(pyro.get_param_store().keys())
        settings_after_training = dict(pyro.settings.get())
        after_training = user_losses()
        print(json.dumps({
            "before": before, "after_import": after_import, "after_training": after_training,
            "settings": [settings_before, settings_after_import, settings_after_training],
            "store_after_training": store_after_training,
            "moved": moved, "unchanged": unchanged, "shared": shared, "compiled": compiled,
        }))
        """
    ))
    # a user's PyroModule with a global pyro.param trains the same before the import, after it and after
    # pyro_sc models trained in the same process
    assert np.isfinite(out["before"]).all() and out["before"][-1] < out["before"][0]  # it does train
    assert out["compiled"]  # the first model trained with compiled kernels
    assert out["after_import"] == out["before"]
    assert out["after_training"] == out["before"]
    before, after_import, after_training = out["settings"]
    assert before["module_local_params"] is False
    assert after_import == before and after_training == before
    # pyro_sc put nothing in the global store (the user's own parameter is from the first user_losses())
    assert out["store_after_training"] == ["user_loc"]
    # two models never share parameters: a's guide trained, b's did not move with it
    assert out["moved"] > 0 and out["unchanged"] == 0.0 and out["shared"] == []

"""capVI against scVI of the same architecture, as the capVI paper ran them: held-out log-likelihood, batch
mixing, classifier accuracy (ifnb_2800, or pbmc3k_hvg2000 with ``--dataset pbmc3k``).

Protocol (issues 5 and 18), per seed:

* data: ifnb_2800 with 2,000 ``seurat_v3`` variable genes (``batch_key="condition"``), or pbmc3k_hvg2000
  (one batch: the batch-mixing penalty has nothing to mix, so only ``lambda = 0`` runs there). The cells
  split 50 / 25 / 25 into train / validation / test with the seed; the test cells are removed before
  training. Labels (``cell_type``) reach capVI only through its stage-1 classifier.
* networks (``--arch paper``, the default): 3 hidden layers of 256 units, dropout 0.25, for scVI and for
  capVI's encoders and decoder (``--arch scvi``: scVI's defaults, 1 x 128, dropout 0.1, the earlier runs).
* scVI: ``SCVI(dispersion="gene-batch", latent_library=True, encode_covariates=True)``, Adam (lr 1e-3, eps
  0.01, as capVI), no KL warm-up (capVI has none), early stopping on the validation loss (patience
  ``--patience``), at most ``--max-epochs``.
* capVI for every ``sigma`` in ``--sigmas`` and ``lambda`` in ``--penalties``: stage 1 (the classifier,
  early stopping on the validation cross-entropy) is trained once per seed and shared (it does not depend
  on sigma or lambda); stages 2 and 3 each stop early on the validation loss (at most ``--max-epochs``).
  The paper stops on the validation reconstruction error; this stops on the validation ELBO, as scvi-tools'
  default. ``--uncentred`` runs capVI with its earlier encoder (the mean of q(z | x, c)
  itself, not its offset from mu_c).

Reported per model: the marginal log-likelihood per cell by importance sampling
(:func:`pyro_sc.metrics.marginal_log_likelihood`) on a fixed subset of ``--ll-cells`` test cells (the same
cells and draws K for every model) at each K of ``--ll-samples`` (the estimate at a smaller K uses the
first K draws), with its Monte Carlo standard error (delta method, per cell, summed over the cells); the
validation log-likelihood at ``--val-ll-samples`` on ``--ll-cells`` validation cells (for model selection);
the medians of cLISI (``cell_type``) and iLISI (``condition``) over all test cells' latent means; capVI's
classifier accuracy on all test cells; epochs to the stop. The capVI configuration with the best
validation log-likelihood is marked selected. The paper (PBMC-11K): capVI -655.85 vs scVI -662.79 (sigma
= 1/32, lambda = 0.1, 5,000 samples).

    python benchmarks/capvi_ifnb.py [--dataset ifnb] [--sigmas 1 0.125 0.03125] [--penalties 0 0.01 0.1]

writes ``benchmarks/results/capvi_<dataset>.json`` (after every model, so an interrupted run keeps its
results).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from _common import NOT_MEASURED, write_results

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = {"paper": dict(n_hidden=256, n_layers=3, dropout_rate=0.25),
                 "scvi": dict(n_hidden=128, n_layers=1, dropout_rate=0.1)}


def split(n_obs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n_obs)
    n_train, n_val = int(round(0.5 * n_obs)), int(round(0.25 * n_obs))
    return np.sort(perm[:n_train]), np.sort(perm[n_train : n_train + n_val]), np.sort(perm[n_train + n_val :])


def log_likelihoods(fitted, adata, cells: np.ndarray, ks: list[int], seed: int) -> dict:
    """The importance-sampling estimate at each K (first K of max(ks) draws per cell), its Monte Carlo
    standard error, and the per-cell estimates at the largest K (for paired differences)."""
    from pyro_sc import metrics

    setup, _ = fitted._query_cells(adata, None)
    model, guide = fitted._marginal_ll_pair()
    started = time.perf_counter()
    log_w_nk = metrics.marginal_log_likelihood(
        model, guide, setup, cells, n_samples=max(ks), max_plate_nesting=fitted.module.max_plate_nesting,
        modules=fitted._modules(), device=fitted.device, seed=seed, return_log_weights=True,
    )
    out = {"seconds": time.perf_counter() - started, "n_cells": len(cells), "by_k": {}}
    for k in sorted(ks):
        lw = log_w_nk[:, :k]
        w = np.exp(lw - lw.max(1, keepdims=True))  # per cell: se of log mean w ~ sd(w) / (sqrt(K) mean(w))
        se_n = w.std(1, ddof=1) / (math.sqrt(k) * w.mean(1)) if k > 1 else np.full(len(lw), np.nan)
        ll_n = np.log(w.mean(1)) + lw.max(1)
        out["by_k"][str(k)] = {"mean": float(ll_n.mean()), "mc_se": float(np.sqrt((se_n**2).sum()) / len(ll_n))}
    out["per_cell_at_max_k"] = ll_n.tolist()
    return out


def scores(fitted, adata, test, ll_test, ll_val, args, seed: int, batch_key: str | None) -> dict:
    """Log-likelihoods on the fixed cells of ``adata``; LISI on every test cell (``test``)."""
    from pyro_sc import metrics

    out = {"test_ll": log_likelihoods(fitted, adata, ll_test, args.ll_samples, seed)}
    out["validation_ll"] = log_likelihoods(fitted, adata, ll_val, [args.val_ll_samples], seed)["by_k"][
        str(args.val_ll_samples)]["mean"]
    latent_nk = fitted.get_latent_representation(test)
    out["clisi_median"] = float(np.median(metrics.clisi(latent_nk, test.obs["cell_type"].astype(str).to_numpy())))
    if batch_key is not None:
        out["ilisi_median"] = float(np.median(metrics.ilisi(latent_nk, test.obs[batch_key].astype(str).to_numpy())))
    return out


def show(run: dict) -> None:
    print(json.dumps({k: v for k, v in run.items() if k != "test_ll"} | {"test_ll": run["test_ll"]["by_k"]}), flush=True)


def epochs_per_stage(history) -> dict:
    if "stage" not in history:
        return {"epochs": int(len(history))}
    return {f"stage{s}_epochs": int((history["stage"] == s).sum()) for s in sorted(history["stage"].unique())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["ifnb", "pbmc3k"], default="ifnb")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 1 / 8, 1 / 32])
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="paper")
    parser.add_argument("--max-epochs", type=int, default=400, help="the most epochs of scVI and of each capVI stage")
    parser.add_argument("--patience", type=int, default=10, help="early stopping's patience, in epochs")
    parser.add_argument("--uncentred", action="store_true", help="capVI with centred_encoder=False")
    parser.add_argument("--no-scvi", action="store_true", help="skip scVI (e.g. a second run of other capVI settings)")
    parser.add_argument("--ll-samples", type=int, nargs="+", default=[20, 100, 1000], help="importance samples K")
    parser.add_argument("--ll-cells", type=int, default=100, help="test (and validation) cells scored")
    parser.add_argument("--val-ll-samples", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out_path = args.out or str(ROOT / "benchmarks" / "results" / f"capvi_{args.dataset}.json")

    import pyro_sc
    from pyro_sc import datasets, metrics

    if args.dataset == "ifnb":
        adata, batch_key = datasets.load_ifnb(n_top_genes=2000), "condition"
        described = "ifnb_2800, 2,000 seurat_v3 HVGs (batch_key=condition)"
    else:
        adata, batch_key = datasets.load_pbmc3k(), None
        described = "pbmc3k_hvg2000 (one batch: lambda = 0 only)"
        args.penalties = [0.0]
    arch = ARCHITECTURES[args.arch]
    results = {
        "data": described + "; 50/25/25 train/validation/test per seed",
        "architecture": {"name": args.arch, **arch},
        "max_epochs": args.max_epochs, "patience": args.patience, "centred_encoder": not args.uncentred,
        "ll_samples": args.ll_samples, "ll_cells": args.ll_cells, "val_ll_samples": args.val_ll_samples,
        NOT_MEASURED: {
            "value": {
                "capvi_marginal_ll": -655.85, "scvi_marginal_ll": -662.79, "sigma": 1 / 32, "lambda": 0.1,
            },
            "source": "the capVI paper (Clivio et al.), its PBMC-11K data set (not this one): marginal "
            "log-likelihood per cell of capVI (at that sigma and lambda) and scVI, 5,000 importance samples; "
            "copied from the paper, not measured here",
        },
        "runs": [],
    }
    stopping = dict(early_stopping=True, patience=args.patience)
    for seed in args.seeds:
        train_idx, val_idx, test_idx = split(adata.n_obs, seed)
        fit_idx = np.sort(np.concatenate([train_idx, val_idx]))
        data, test = adata[fit_idx].copy(), adata[test_idx].copy()
        position = {c: i for i, c in enumerate(fit_idx)}
        tr = np.array([position[c] for c in train_idx])
        va = np.array([position[c] for c in val_idx])
        # the fixed cells whose likelihood is estimated: the first --ll-cells of a seeded permutation
        pick = np.random.default_rng(seed + 1000)
        ll_test = np.sort(pick.permutation(test_idx)[: args.ll_cells])
        ll_val = np.sort(pick.permutation(val_idx)[: args.ll_cells])
        common = dict(train_indices=tr, validation_indices=va, seed=seed, progress_bar=False)

        if not args.no_scvi:
            scvi = pyro_sc.SCVI(data, batch_key=batch_key, dispersion="gene-batch", latent_library=True,
                                encode_covariates=True, **arch)
            started = time.perf_counter()
            scvi.train(max_epochs=args.max_epochs, n_epochs_kl_warmup=None, eps=0.01, **stopping, **common)
            run = {"model": "scVI", "seed": seed, "train_seconds": time.perf_counter() - started,
                   **epochs_per_stage(scvi.history)}
            run.update(scores(scvi, adata, test, ll_test, ll_val, args, seed, batch_key))
            results["runs"].append(run)
            show(run)
            write_results(out_path, results)

        stage1 = None
        for sigma in args.sigmas:
            for penalty in args.penalties:
                model = pyro_sc.CAPVI(data, labels_key="cell_type", batch_key=batch_key, sigma=sigma,
                                      penalty=penalty, centred_encoder=not args.uncentred, **arch)
                started = time.perf_counter()
                if stage1 is None:
                    model.train(max_epochs=(200, 1, 1), stages=(1,), **common)
                    stage1 = {
                        "state": {k: v.clone() for k, v in model.module.classifier.state_dict().items()},
                        "history": model.history.copy(),
                        "seconds": time.perf_counter() - started,
                    }
                    started = time.perf_counter()
                else:  # the same initial parameters (same seed), the shared trained classifier
                    model._build_under_seed(seed)
                    model.module.classifier.load_state_dict(stage1["state"])
                    model.history = stage1["history"].copy()
                model.train(max_epochs=(1, args.max_epochs, args.max_epochs), stages=(2, 3),
                            early_stopping=(True, True, True), patience=args.patience, **common)
                predicted = model.predict_labels(test).to_numpy()
                run = {
                    "model": "capVI", "seed": seed, "sigma": sigma, "penalty": penalty,
                    "stage1_seconds": stage1["seconds"], "train_seconds": time.perf_counter() - started,
                    **epochs_per_stage(model.history),
                    "classifier_accuracy_test": metrics.accuracy(test.obs["cell_type"].astype(str), predicted),
                }
                run.update(scores(model, adata, test, ll_test, ll_val, args, seed, batch_key))
                results["runs"].append(run)
                show(run)
                capvi = [r for r in results["runs"] if r["model"] == "capVI" and r["seed"] == seed]
                best = max(capvi, key=lambda r: r["validation_ll"])
                for r in capvi:
                    r["selected_by_validation_ll"] = r is best
                write_results(out_path, results)


if __name__ == "__main__":
    main()

"""Nuisance covariates in scVI: the latent and the normalised expression with and without them registered.

Counts from :func:`pyro_sc.datasets.simulate_scvi` with 3 cell types, one batch, 3 donors (a gene
offset N(0, effect^2) each) and a continuous score u ~ U(-1, 1) moving each gene's log mean by
u * beta_g, beta_g ~ N(0, effect^2). scVI (5 latent dimensions, 32 hidden units) is trained with and
without ``categorical_covariate_keys=["donor"], continuous_covariate_keys=["nuisance"]``. Reported per
seed and as mean / spread: donor iLISI of the latent (3 = fully mixed), R^2 of the score on the latent
(linear), ARI of k-means (k = 3) on the latent against the types, and the mean |correlation| between the
score and the log normalised expression of the 10 genes it moves most (registered: decoded with the
covariates fixed, ``transform_covariates``).

    python benchmarks/covariates.py [--seeds 0 1 2] [--n-cells 1200] [--n-genes 100] [--epochs 200]

writes ``benchmarks/results/covariates.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import write_results

ROOT = Path(__file__).resolve().parents[1]
COVARIATES = dict(categorical_covariate_keys=["donor"], continuous_covariate_keys=["nuisance"])
FIXED = dict(donor="donor_0", nuisance=0.0)  # where the registered model decodes every cell


def r_squared(z_nk: np.ndarray, u_n: np.ndarray) -> float:
    design = np.c_[z_nk, np.ones(len(z_nk))]
    coef, *_ = np.linalg.lstsq(design, u_n, rcond=None)
    return float(1 - (u_n - design @ coef).var() / u_n.var())


def run_one(seed: int, n_cells: int, n_genes: int, effect: float, epochs: int) -> list[dict]:
    import pyro_sc
    from pyro_sc import datasets, metrics
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    adata = datasets.simulate_scvi(n_cells, n_genes, n_types=3, n_batches=1, n_donors=3, donor_effect=effect,
                                   continuous_effect=effect, seed=seed)
    u_n = adata.obs["nuisance"].to_numpy()
    strongest = np.argsort(-np.abs(adata.var["nuisance_beta"].to_numpy()))[:10]
    rows = []
    for registered in (False, True):
        model = pyro_sc.SCVI(adata, n_latent=5, n_hidden=32, **(COVARIATES if registered else {}))
        started = time.perf_counter()
        model.train(max_epochs=epochs, seed=seed, progress_bar=False)
        seconds = time.perf_counter() - started
        z_nk = model.get_latent_representation()
        fixed = FIXED if registered else None
        rho_ng = model.get_normalized_expression(transform_covariates=fixed).to_numpy()
        rows.append({
            "seed": seed, "registered": registered, "train_seconds": round(seconds, 1),
            "donor_ilisi": float(np.mean(metrics.ilisi(z_nk, adata.obs["donor"].to_numpy()))),
            "nuisance_r2": r_squared(z_nk, u_n),
            "type_ari": float(adjusted_rand_score(adata.obs["cell_type"], KMeans(3, n_init=10, random_state=0).fit_predict(z_nk))),
            "expression_corr": float(np.mean([abs(np.corrcoef(np.log(rho_ng[:, g]), u_n)[0, 1]) for g in strongest])),
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-cells", type=int, default=1200)
    parser.add_argument("--n-genes", type=int, default=100)
    parser.add_argument("--effect", type=float, default=0.7)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "covariates.json"))
    args = parser.parse_args()
    runs = [row for seed in args.seeds for row in run_one(seed, args.n_cells, args.n_genes, args.effect, args.epochs)]
    summary = {}
    for registered in (False, True):
        rows = [r for r in runs if r["registered"] == registered]
        summary["registered" if registered else "not_registered"] = {
            key: {"mean": float(np.mean([r[key] for r in rows])), "min": float(np.min([r[key] for r in rows])),
                  "max": float(np.max([r[key] for r in rows]))}
            for key in ("donor_ilisi", "nuisance_r2", "type_ari", "expression_corr")
        }
    write_results(args.out, {"settings": vars(args), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()

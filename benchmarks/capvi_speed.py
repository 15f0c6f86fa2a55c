"""capVI's epoch against scVI's on ifnb_2800 (13 types), exact and summed over each cell's top types.

Epoch times, side by side in one process (an untimed warm-up round, which compiles the kernels, then
``--repeats`` rounds; each round trains every variant for ``--epochs`` epochs, in turn, so that the
machine's load falls on all alike): scVI of capVI's architecture (``dispersion="gene-batch",
latent_library=True, encode_covariates=True``) and capVI's
stage 3 (everything trained, the batch-mixing penalty on) with the ELBO summed over all 13 types
(exact) and over each cell's ``k`` most probable types (``n_types_summed=k``, for each ``k`` in ``--top``).
Both train on the same cells with no per-epoch validation; the figure is wall seconds per epoch.

The likelihood cost of the truncation (``--likelihood-epochs E1 E2 E3``, 0 to skip): capVI trained
through its three stages from the same seed, exact and with each ``k``; the test cells' marginal
log-likelihood per cell (importance sampling with every type summed out, ``--n-samples``), the same
estimator for all.

    python benchmarks/capvi_speed.py [--threads 2] [--epochs 3] [--repeats 3] [--top 1 2 3]
        [--likelihood-epochs 50 50 50] [--n-samples 50]

writes ``benchmarks/results/capvi_speed.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import write_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--likelihood-epochs", type=int, nargs=3, default=[0, 0, 0])
    parser.add_argument("--n-samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "capvi_speed.json"))
    args = parser.parse_args()

    import torch

    import pyro_sc
    from pyro_sc import datasets

    if args.threads:
        torch.set_num_threads(args.threads)
    adata = datasets.load_ifnb(n_top_genes=2000)
    perm = np.random.default_rng(args.seed).permutation(adata.n_obs)
    test, data = adata[np.sort(perm[: adata.n_obs // 4])].copy(), adata[np.sort(perm[adata.n_obs // 4 :])].copy()
    train_n, no_validation = np.arange(data.n_obs), np.zeros(0, dtype=np.int64)
    n_types = data.obs["cell_type"].nunique()

    scvi = pyro_sc.SCVI(data, batch_key="condition", dispersion="gene-batch", latent_library=True,
                        encode_covariates=True)
    capvi = pyro_sc.CAPVI(data, labels_key="cell_type", batch_key="condition")
    capvi.train(max_epochs=(20, 1, 1), stages=(1,), seed=args.seed, progress_bar=False)

    def scvi_epochs():
        scvi.train(max_epochs=args.epochs, train_indices=train_n, validation_indices=no_validation,
                   seed=args.seed, progress_bar=False)

    def capvi_epochs(k):
        return lambda: capvi.train(max_epochs=(1, 1, args.epochs), stages=(3,), n_types_summed=k,
                                   train_indices=train_n, validation_indices=no_validation, seed=None,
                                   progress_bar=False)

    variants = {"scVI": scvi_epochs, "capVI exact": capvi_epochs(None)}
    variants.update({f"capVI top {k}": capvi_epochs(k) for k in args.top})
    warmup = {}  # one untimed round first: it holds the first minibatch's kernel compilation (settings.compile)
    for name, run in variants.items():
        started = time.perf_counter()
        run()
        warmup[name] = time.perf_counter() - started
    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            seconds[name].append((time.perf_counter() - started) / args.epochs)
    per_epoch = {name: float(np.median(s)) for name, s in seconds.items()}
    results = {
        "data": f"ifnb_2800, 2,000 seurat_v3 HVGs, {data.n_obs} training cells, {n_types} types, batch 128",
        "threads": torch.get_num_threads(),
        "seconds_per_epoch_median": per_epoch,
        "ratio_to_scvi": {name: s / per_epoch["scVI"] for name, s in per_epoch.items()},
        # each round's capVI epoch over the same round's scVI epoch: the machine's load shared
        "ratio_to_scvi_each_round_median": {
            name: float(np.median(np.array(s) / np.array(seconds["scVI"]))) for name, s in seconds.items()
        },
        "seconds_per_epoch_each_round": seconds,
        "warmup_round_seconds": warmup,
        "settings": vars(args),
    }
    if sum(args.likelihood_epochs):
        results["likelihood"] = {}
        for k in [None, *args.top]:
            model = pyro_sc.CAPVI(data, labels_key="cell_type", batch_key="condition")
            started = time.perf_counter()
            model.train(max_epochs=tuple(args.likelihood_epochs), n_types_summed=k, seed=args.seed,
                        progress_bar=False)
            name = "exact" if k is None else f"top {k}"
            truth = test.obs["cell_type"].astype(str).to_numpy()
            results["likelihood"][name] = {
                "train_seconds": time.perf_counter() - started,
                "test_marginal_ll": model.get_marginal_ll(test, n_samples=args.n_samples, seed=args.seed),
                "classifier_accuracy_test": float(np.mean(model.predict(test) == truth)),
            }
            print(name, results["likelihood"][name], flush=True)
            write_results(args.out, results)
    write_results(args.out, results)


if __name__ == "__main__":
    main()

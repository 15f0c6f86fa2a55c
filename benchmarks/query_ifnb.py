"""Query mapping on ifnb_2800: labels transferred from CTRL cells to STIM cells, against a de novo model.

ifnb_2800 with 2,000 ``seurat_v3`` genes, ``batch_key="condition"``, ``encode_covariates=True`` (as scArches
advises: the encoder reads the batch, so the query's batch weights move its cells in the latent). Per seed:

* **reference**: scVI on the CTRL cells, then ``SCANVI.from_scvi_model`` with every CTRL cell's label;
* **query**: ``SCANVI.load_query_data(stim, reference)``, STIM cells without labels, timed; its
  ``predict()`` on STIM. One query per entry of ``--queries`` (each from the same reference): ``50`` trains
  only the new batch's weights for 50 epochs (the default of ``load_query_data``), ``100u`` trains every
  parameter (``unfrozen=True``) for 100 epochs;
* **de novo**: scVI on all cells, then ``SCANVI.from_scvi_model`` with the CTRL labels and STIM
  ``"Unknown"``, timed (both stages); its ``predict()`` on STIM.

scVI and SCANVI get the same epochs in the reference and de novo (``--scvi-epochs``, ``--scanvi-epochs``;
default: the methods' own defaults). Reported: STIM accuracy of both, the query's training time and its
ratio to the de novo time (goal: within 2 points of de novo at a fifth of its time or less), per query.

    python benchmarks/query_ifnb.py [--seeds 0 1 2] [--queries 50 200 100u] [--scvi-epochs N] [--scanvi-epochs N]

writes ``benchmarks/results/query_ifnb.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import write_results

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_one(adata, seed: int, args) -> dict:
    import pyro_sc

    truth = adata.obs["cell_type"].astype(str).to_numpy()
    stim = (adata.obs["condition"] == "STIM").to_numpy()
    scvi_opts = {} if args.scvi_epochs is None else {"max_epochs": args.scvi_epochs}
    scanvi_opts = {} if args.scanvi_epochs is None else {"max_epochs": args.scanvi_epochs}

    ctrl = adata[~stim].copy()
    ctrl.obs["labels"] = truth[~stim]
    ref_scvi = pyro_sc.SCVI(ctrl, batch_key="condition", encode_covariates=True)
    t_ref = timed(lambda: ref_scvi.train(seed=seed, progress_bar=False, **scvi_opts))
    reference = pyro_sc.SCANVI.from_scvi_model(ref_scvi, "Unknown", labels_key="labels")
    t_ref += timed(lambda: reference.train(seed=seed, progress_bar=False, **scanvi_opts))

    queries = {}
    for spec in args.queries:
        epochs, unfrozen = int(spec.rstrip("u")), spec.endswith("u")
        query = pyro_sc.SCANVI.load_query_data(adata[stim].copy(), reference, unfrozen=unfrozen)
        seconds = timed(lambda: query.train(max_epochs=epochs, seed=seed, progress_bar=False))
        queries[spec] = {"accuracy": float(np.mean(query.predict() == truth[stim])), "seconds": round(seconds, 1),
                         "epochs": len(query.history), "unfrozen": unfrozen}
        print(spec, queries[spec], flush=True)

    full = adata.copy()
    full.obs["labels"] = np.where(stim, "Unknown", truth)
    denovo_scvi = pyro_sc.SCVI(full, batch_key="condition", encode_covariates=True)
    t_denovo = timed(lambda: denovo_scvi.train(seed=seed, progress_bar=False, **scvi_opts))
    denovo = pyro_sc.SCANVI.from_scvi_model(denovo_scvi, "Unknown", labels_key="labels")
    t_denovo += timed(lambda: denovo.train(seed=seed, progress_bar=False, **scanvi_opts))
    acc_denovo = float(np.mean(denovo.predict(indices=np.flatnonzero(stim)) == truth[stim]))
    for spec, query in queries.items():
        query["time_ratio_to_de_novo"] = query["seconds"] / t_denovo
        query["accuracy_gap_points"] = 100 * (acc_denovo - query["accuracy"])
    row = {"seed": seed, "accuracy_de_novo": acc_denovo, "de_novo_seconds": round(t_denovo, 1),
           "reference_seconds": round(t_ref, 1), "queries": queries,
           "reference_epochs": [len(ref_scvi.history), len(reference.history)],
           "de_novo_epochs": [len(denovo_scvi.history), len(denovo.history)]}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--queries", nargs="+", default=["50", "200", "100u"],
                        help="epochs of each query, 'u' for unfrozen=True")
    parser.add_argument("--scvi-epochs", type=int, default=None)
    parser.add_argument("--scanvi-epochs", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "query_ifnb.json"))
    args = parser.parse_args()
    from pyro_sc import datasets

    adata = datasets.load_ifnb(n_top_genes=2000)
    runs = [run_one(adata, seed, args) for seed in args.seeds]
    def spread(values):
        return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}

    summary = {key: spread([r[key] for r in runs]) for key in ("accuracy_de_novo", "de_novo_seconds")}
    summary["queries"] = {
        spec: {key: spread([r["queries"][spec][key] for r in runs])
               for key in ("accuracy", "accuracy_gap_points", "seconds", "time_ratio_to_de_novo")}
        for spec in args.queries
    }
    write_results(args.out, {"settings": vars(args), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()

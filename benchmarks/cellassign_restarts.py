"""CellAssign's restart rule: accuracy and time over seeds, on CellBench and on simulated counts.

For each rule and seed, CellAssign with 3 restarts; the accuracy of its labels against the truth and
the wall time of ``train``. Rules: ``default`` (what ``train()`` does: successive halving from 5 epochs
since issue 16; 5-epoch screening before), ``all`` (``screen_epochs=None``: every restart trained to
convergence, the best validation likelihood kept). Run it with another checkout on ``PYTHONPATH`` to
measure that version's default rule side by side.

    python3 benchmarks/cellassign_restarts.py [--seeds 0 1 2 3 4] [--rules default all]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

from _common import write_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rules", nargs="+", default=["default", "all"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cellassign_restarts.json"))
    args = parser.parse_args()

    import pyro_sc
    from pyro_sc import datasets, metrics

    cellbench = datasets.load_cellbench()
    simulated, sim_markers, _ = datasets.simulate_cellassign(3000, seed=0)
    cases = {
        "cellbench_tian_20_73": (cellbench, datasets.load_markers("tian_20_73"), "cell_line_demuxlet",
                                 dict(var_key="gene_symbol", drop_missing_markers=True)),
        "simulated_3000": (simulated, sim_markers, "cell_type", dict(size_factor_key="size_factor")),
    }
    runs = []
    for case, (adata, markers, truth_key, options) in cases.items():
        truth = adata.obs[truth_key].astype(str)
        for rule in args.rules:
            for seed in args.seeds:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = pyro_sc.CellAssign(adata, markers, **options)
                    started = time.perf_counter()
                    history = model.train(num_restarts=3, seed=seed, **({} if rule == "default" else {"screen_epochs": None}))
                    seconds = time.perf_counter() - started
                runs.append({"case": case, "rule": rule, "seed": seed, "seconds": round(seconds, 2),
                             "accuracy": metrics.accuracy(truth, model.predict_labels()),
                             "winner_epochs": len(history), "restart_losses": [float(x) for x in model.restart_losses]})
                print(runs[-1], flush=True)
    summary = {}
    for case in cases:
        for rule in args.rules:
            rows = [r for r in runs if r["case"] == case and r["rule"] == rule]
            acc = [r["accuracy"] for r in rows]
            summary[f"{case}/{rule}"] = {"accuracy_mean": float(np.mean(acc)), "accuracy_min": float(np.min(acc)),
                                         "seconds_total": round(sum(r["seconds"] for r in rows), 1)}
    write_results(args.out, {"pyro_sc": pyro_sc.__file__, "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()

"""CellAssign with a marker type absent from the data, early stopping off: is the run finite to the end?

Simulated counts (``simulate_cellassign``, 400 cells, 5 types) and their marker matrix with a sixth type
whose 4 markers have no counts in any cell (panels often list more types than a sample holds). Records
whether every epoch's loss is finite, the absent type's pi and logit at the end, the present types'
accuracy and the wall time.

    python3 benchmarks/cellassign_absent_type.py [--epochs 3000]
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
    parser.add_argument("--epochs", type=int, default=3000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cellassign_absent_type.json"))
    args = parser.parse_args()

    import pyro_sc
    from pyro_sc import datasets, metrics

    adata, markers, _ = datasets.simulate_cellassign(400, n_other_genes=20, n_absent_markers=4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pyro_sc.CellAssign(adata, markers, size_factor_key="size_factor")
        started = time.perf_counter()
        history = model.train(max_epochs=args.epochs, num_restarts=1, early_stopping=False, seed=0)
        seconds = time.perf_counter() - started
    write_results(args.out, {
        "epochs_trained": len(history),
        "all_losses_finite": bool(np.isfinite(history["train_loss"]).all()),
        "absent_pi": float(model.module.map_pi()[-1]),
        "logits": [float(x) for x in model.module.pi_logits_c.detach()],
        "accuracy_present_types": metrics.accuracy(adata.obs["cell_type"].astype(str), model.predict_labels()),
        "seconds": round(seconds, 1),
    })


if __name__ == "__main__":
    main()

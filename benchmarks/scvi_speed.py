"""scVI training speed and peak memory: pyro_sc, and scvi-tools side by side when it is available.

Simulates a 10,000 x 2,000 count matrix from scVI's generative model, then trains scVI at batch size
128 and 512 and reports training cells per second (epochs after one warm-up epoch, no validation set)
and the peak resident memory of the process. Each configuration runs in a fresh subprocess, so peak
memory is its own. A per-step profile of pyro_sc says where the time goes.

scvi-tools is run with the interpreter given by ``--scvi-tools-python`` (a separate environment with
``scvi-tools`` and the same torch), on the same data, same architecture (its defaults), same threads.

    python benchmarks/scvi_speed.py --scvi-tools-python /path/to/env/bin/python

writes ``benchmarks/results/scvi_speed.json``. Quote ratios from one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident memory of this process since its exec (VmHWM; ru_maxrss would include the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best available


def worker_pyro_sc(path: str, batch_size: int, epochs: int) -> dict:
    import anndata

    import pyro_sc

    adata = anndata.read_h5ad(path)
    model = pyro_sc.SCVI(adata, batch_key="batch")
    model.train(max_epochs=1, batch_size=batch_size, train_size=1.0, progress_bar=False)  # warm-up
    started = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=1.0, progress_bar=False)
    seconds = time.perf_counter() - started
    return {"cells_per_second": adata.n_obs * epochs / seconds, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def worker_scvi_tools(path: str, batch_size: int, epochs: int) -> dict:
    import anndata
    import scvi

    adata = anndata.read_h5ad(path)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata)
    kwargs = dict(batch_size=batch_size, train_size=1.0, accelerator="cpu", enable_progress_bar=False)
    model.train(max_epochs=1, **kwargs)  # warm-up
    started = time.perf_counter()
    model.train(max_epochs=epochs, **kwargs)
    seconds = time.perf_counter() - started
    return {
        "cells_per_second": adata.n_obs * epochs / seconds,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "version": scvi.__version__,
    }


def profile_pyro_sc(path: str, batch_size: int, repeats: int = 30) -> dict:
    """Milliseconds per training step and its parts."""
    import anndata
    import numpy as np
    import torch

    import pyro_sc
    from pyro_sc.distributions import ZeroInflatedNegativeBinomial

    adata = anndata.read_h5ad(path)
    model = pyro_sc.SCVI(adata, batch_key="batch")
    module, setup, elbo = model.module, model.setup, model._elbo()
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01)
    rng = np.random.default_rng(0)
    mb = setup.minibatch(np.sort(rng.choice(setup.n_obs, batch_size, replace=False)))

    def timed(fn) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats * 1000

    def step():
        loss = elbo.differentiable_loss(module.model, module.guide, mb) / mb.n_obs
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def networks():
        loc, scale = module.encode(mb)
        rho, zi = module.decode(loc + scale * torch.randn_like(scale), mb.batch_n)
        (rho.sum() + zi.sum()).backward()

    mu = torch.rand(batch_size, setup.n_vars, requires_grad=True)
    zi = torch.randn(batch_size, setup.n_vars, requires_grad=True)
    theta = torch.rand(setup.n_vars, requires_grad=True)

    def log_prob():
        ZeroInflatedNegativeBinomial(mu, theta, zi, validate_args=False).log_prob(mb.x_ng).sum().backward()

    return {
        "batch_size": batch_size,
        "step_ms": timed(step),
        "minibatch_from_sparse_ms": timed(lambda: setup.minibatch(rng.choice(setup.n_obs, batch_size))),
        "networks_forward_backward_ms": timed(networks),
        "zinb_log_prob_forward_backward_ms": timed(log_prob),
    }


def run_worker(python: str, kind: str, path: str, batch_size: int, epochs: int) -> dict:
    cmd = [python, __file__, "--worker", kind, "--data", path, "--batch-size", str(batch_size), "--epochs", str(epochs)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--scvi-tools-python", default=None, help="interpreter of an environment with scvi-tools")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scvi_speed.json"))
    parser.add_argument("--worker", choices=["pyro_sc", "scvi_tools", "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        fn = {"pyro_sc": worker_pyro_sc, "scvi_tools": worker_scvi_tools}.get(args.worker)
        result = profile_pyro_sc(args.data, args.batch_size) if fn is None else fn(args.data, args.batch_size, args.epochs)
        print(json.dumps(result))
        return

    import torch

    from pyro_sc import datasets

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "simulated.h5ad")
        adata = datasets.simulate_scvi(args.n_cells, args.n_genes, n_latent=10, n_types=10, n_batches=2, seed=0)
        adata.write_h5ad(path)
        results = {
            "data": {"n_cells": args.n_cells, "n_genes": args.n_genes, "density": adata.X.nnz / (args.n_cells * args.n_genes)},
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
            "epochs_timed": args.epochs,
            "runs": [],
            "profile": [],
        }
        for batch_size in args.batch_sizes:
            row = {"batch_size": batch_size, "pyro_sc": run_worker(sys.executable, "pyro_sc", path, batch_size, args.epochs)}
            if args.scvi_tools_python:
                row["scvi_tools"] = run_worker(args.scvi_tools_python, "scvi_tools", path, batch_size, args.epochs)
                ours, theirs = row["pyro_sc"], row["scvi_tools"]
                if "cells_per_second" in ours and "cells_per_second" in theirs:
                    row["speedup"] = ours["cells_per_second"] / theirs["cells_per_second"]
                    row["peak_rss_ratio"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
            results["runs"].append(row)
            results["profile"].append(run_worker(sys.executable, "profile", path, batch_size, 0))
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()

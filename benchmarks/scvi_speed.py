"""scVI training speed and peak memory: pyro_sc, and scvi-tools side by side when it is available.

Two data sets: ``simulated`` (10,000 x 2,000 counts from scVI's generative model, 22 % nonzero, two
batches; batch size 128 and 512, no validation set) and ``ifnb`` (ifnb_2800 with 2,000 ``seurat_v3``
variable genes, 6 % nonzero, batch = condition; batch size 128 and each tool's default validation split,
so pyro_sc's epochs include its per-epoch validation pass). Each tool trains scVI with the same
architecture (its defaults) for one warm-up epoch (timed apart: it holds pyro_sc's kernel compilation),
then ``--epochs`` timed epochs, in a fresh subprocess per run (so peak memory is its own), the two tools
alternating ``--pairs`` times, at each thread count of ``--threads`` (``torch.set_num_threads`` and
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in both). Reported per run: training cells per second (wall),
CPU seconds per epoch, peak resident memory, pyro_sc's per-epoch training loss (seed 0); per pair the
ratio of cells per second, and its median over the pairs; the warm-up epoch of a pyro_sc process whose
``torch.compile`` cache is empty (the first process on a machine compiles its kernels).

A profile of pyro_sc (torch profiler over two epochs after a warm-up epoch) gives the top operators by
self CPU time per training step, and the share of the wall time spent outside torch operators (Python,
Pyro's trace); a per-step breakdown times a training step and its parts on their own.

scvi-tools is run with the interpreter given by ``--scvi-tools-python`` (a separate environment with
``scvi-tools`` and the same torch), on the same data file. ``--baseline DIR`` adds a third process to each
round: pyro_sc imported from another checkout (e.g. a ``git worktree`` of an earlier commit, put first on
``PYTHONPATH``), so that a change is timed before and after in the same run, alternating.

    python benchmarks/scvi_speed.py --scvi-tools-python /path/to/env/bin/python [--threads 1 2] [--datasets ifnb] [--no-compile]

writes ``benchmarks/results/scvi_speed.json``. Quote ratios from one run, not absolute times: the
machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {  # run settings: batch sizes, timed epochs, train_size (None: the tool's default split, with validation)
    "simulated": dict(batch_sizes=[128, 512], epochs=3, train_size=1.0),
    "ifnb": dict(batch_sizes=[128], epochs=30, train_size=None),
}


def peak_rss_mb() -> float:
    """Peak resident memory of this process since its exec (VmHWM; ru_maxrss would include the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best available


def timed_epochs(train, n_obs: int, epochs: int) -> dict:
    """Run ``train(1)`` (warm-up: its wall time) and ``train(epochs)`` (wall and CPU time)."""
    wall = time.perf_counter()
    train(1)
    warm_wall = time.perf_counter() - wall
    wall, cpu = time.perf_counter(), time.process_time()
    out = train(epochs)
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "cells_per_second": n_obs * epochs / seconds,
        "seconds_per_epoch": seconds / epochs,
        "cpu_seconds_per_epoch": cpu_seconds / epochs,
        "warmup_epoch_seconds": warm_wall,
        "peak_rss_mb": peak_rss_mb(),
        **(out or {}),
    }


def worker_pyro_sc(args) -> dict:
    import anndata

    import pyro_sc

    adata = anndata.read_h5ad(args.data)
    model = pyro_sc.SCVI(adata, batch_key=args.batch_key)
    kwargs = dict(batch_size=args.batch_size, progress_bar=False, seed=0)
    if args.train_size is not None:
        kwargs["train_size"] = args.train_size

    def train(epochs):
        model.train(max_epochs=epochs, **kwargs)
        return {"train_loss": [float(v) for v in model.history["train_loss"]]}

    return {**timed_epochs(train, adata.n_obs, args.epochs), "imported_from": str(Path(pyro_sc.__file__).parent)}


def worker_scvi_tools(args) -> dict:
    import anndata
    import scvi

    adata = anndata.read_h5ad(args.data)
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key=args.batch_key)
    model = scvi.model.SCVI(adata)
    kwargs = dict(batch_size=args.batch_size, accelerator="cpu", enable_progress_bar=False)
    if args.train_size is not None:
        kwargs["train_size"] = args.train_size
    out = timed_epochs(lambda epochs: model.train(max_epochs=epochs, **kwargs), adata.n_obs, args.epochs)
    return {**out, "version": scvi.__version__}


def profile_pyro_sc(args, repeats: int = 20) -> dict:
    """Top operators over two profiled epochs, and milliseconds per training step and its parts."""
    import anndata
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    import pyro_sc
    from pyro_sc.data import split_indices
    from pyro_sc.distributions import ZeroInflatedNegativeBinomial

    adata = anndata.read_h5ad(args.data)
    model = pyro_sc.SCVI(adata, batch_key=args.batch_key)
    kwargs = dict(batch_size=args.batch_size, progress_bar=False, seed=0)
    if args.train_size is not None:
        kwargs["train_size"] = args.train_size
    model.train(max_epochs=1, **kwargs)  # warm-up (and compilation)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.train(max_epochs=2, **kwargs)
    wall_ms = (time.perf_counter() - started) * 1000
    n_train = len(split_indices(adata.n_obs, train_size=args.train_size or 0.9, seed=0)[0])
    steps = 2 * -(-n_train // args.batch_size)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    top = [
        {"op": e.key, "ms_per_step": e.self_cpu_time_total / 1000 / steps, "share": e.self_cpu_time_total / total_us}
        for e in events[:15]
    ]

    module, setup, elbo = model.module, model.setup, model._elbo()
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01)
    rng = np.random.default_rng(0)
    mb = setup.minibatch(np.sort(rng.choice(setup.n_obs, args.batch_size, replace=False)))

    def timed(fn) -> float:
        fn()
        begun = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - begun) / repeats * 1000

    def step():
        loss = elbo.differentiable_loss(module.model, module.guide, mb) / mb.n_obs
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def networks():
        loc, scale = module.encode(mb)
        rho, zi = module.decode(loc + scale * torch.randn_like(scale), mb.batch_n)
        (rho.sum() + zi.sum()).backward()

    mu = torch.rand(args.batch_size, setup.n_vars, requires_grad=True)
    zi = torch.randn(args.batch_size, setup.n_vars, requires_grad=True)
    theta = torch.rand(setup.n_vars, requires_grad=True)

    def log_prob():
        ZeroInflatedNegativeBinomial(mu, theta, zi, validate_args=False).log_prob(mb.x_ng).sum().backward()

    return {
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "profiled_steps": steps,
        "wall_ms_per_step": wall_ms / steps,
        "torch_ops_self_cpu_ms_per_step": total_us / 1000 / steps,
        "top_ops": top,
        "step_ms": timed(step),
        "minibatch_from_sparse_ms": timed(lambda: setup.minibatch(rng.choice(setup.n_obs, args.batch_size))),
        "networks_forward_backward_ms": timed(networks),
        "zinb_log_prob_forward_backward_ms": timed(log_prob),
    }


def run_worker(python: str, kind: str, path: str, batch_key: str, batch_size: int, epochs: int,
               train_size: float | None, threads: int, extra_env: dict | None = None) -> dict:
    cmd = [python, __file__, "--worker", kind, "--data", path, "--batch-key", batch_key,
           "--batch-size", str(batch_size), "--epochs", str(epochs), "--worker-threads", str(threads)]
    if train_size is not None:
        cmd += ["--train-size", str(train_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(extra_env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_data(name: str, folder: str, n_cells: int, n_genes: int) -> tuple[str, str, dict]:
    """The data set as an h5ad file both tools read; its batch key and a description."""
    from pyro_sc import datasets

    if name == "simulated":
        adata = datasets.simulate_scvi(n_cells, n_genes, n_latent=10, n_types=10, n_batches=2, seed=0)
        batch_key = "batch"
    else:
        adata = datasets.load_ifnb(n_top_genes=2000)
        adata = adata.copy()
        batch_key = "condition"
    path = str(Path(folder) / f"{name}.h5ad")
    adata.write_h5ad(path)
    about = {"n_cells": adata.n_obs, "n_genes": adata.n_vars, "density": adata.X.nnz / (adata.n_obs * adata.n_vars),
             "batch_key": batch_key}
    return path, batch_key, about


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch / OpenMP threads of both tools")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each tool, alternating")
    parser.add_argument("--n-cells", type=int, default=10_000, help="simulated cells")
    parser.add_argument("--n-genes", type=int, default=2_000, help="simulated genes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: per data set")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs; default: per data set")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="pyro_sc with settings.compile off (PYRO_SC_COMPILE=0)")
    parser.add_argument("--scvi-tools-python", default=None, help="interpreter of an environment with scvi-tools")
    parser.add_argument("--baseline", default=None, help="a checkout of pyro_sc to time alternately as 'before'")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scvi_speed.json"))
    parser.add_argument("--worker", choices=["pyro_sc", "scvi_tools", "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--batch-key", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--train-size", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(args.worker_threads)
        fn = {"pyro_sc": worker_pyro_sc, "scvi_tools": worker_scvi_tools, "profile": profile_pyro_sc}[args.worker]
        print(json.dumps(fn(args)))
        return

    import torch

    import pyro_sc

    if args.no_compile:
        os.environ.update(PYRO_SC_COMPILE="0")  # the workers inherit it
    results = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "pyro_sc": pyro_sc.__version__,
        "baseline": args.baseline,
        "pyro_sc_compile": os.environ.get("PYRO_SC_COMPILE", "1"),
        "pairs": args.pairs,
        "datasets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            setting = DATASETS[name]
            path, batch_key, about = write_data(name, tmp, args.n_cells, args.n_genes)
            epochs = args.epochs or setting["epochs"]
            entry = results["datasets"][name] = {"data": about, "epochs_timed": epochs, "runs": [], "profile": []}
            for threads in args.threads:
                for batch_size in args.batch_sizes or setting["batch_sizes"]:
                    common = (path, batch_key, batch_size, epochs, setting["train_size"], threads)
                    row = {"threads": threads, "batch_size": batch_size, "pyro_sc": [], "scvi_tools": [], "ratio": []}
                    if args.baseline:
                        row.update(baseline=[], ratio_to_baseline=[])
                    for _ in range(args.pairs):
                        if args.baseline:
                            before = run_worker(sys.executable, "pyro_sc", *common,
                                                {"PYTHONPATH": str(Path(args.baseline).resolve())})
                            row["baseline"].append(before)
                        ours = run_worker(sys.executable, "pyro_sc", *common)
                        row["pyro_sc"].append(ours)
                        if args.baseline and "cells_per_second" in ours and "cells_per_second" in before:
                            row["ratio_to_baseline"].append(ours["cells_per_second"] / before["cells_per_second"])
                        if args.scvi_tools_python:
                            theirs = run_worker(args.scvi_tools_python, "scvi_tools", *common)
                            row["scvi_tools"].append(theirs)
                            if "cells_per_second" in ours and "cells_per_second" in theirs:
                                row["ratio"].append(ours["cells_per_second"] / theirs["cells_per_second"])
                    if row["ratio"]:
                        row["ratio_median"] = statistics.median(row["ratio"])
                    if row.get("ratio_to_baseline"):
                        row["ratio_to_baseline_median"] = statistics.median(row["ratio_to_baseline"])
                    entry["runs"].append(row)
                    print(json.dumps({"dataset": name, "threads": threads, "batch_size": batch_size,
                                      "pyro_sc_cells_per_second": [r.get("cells_per_second") for r in row["pyro_sc"]],
                                      "scvi_tools_cells_per_second": [r.get("cells_per_second") for r in row["scvi_tools"]],
                                      "ratio": row["ratio"], "ratio_to_baseline": row.get("ratio_to_baseline")}),
                          flush=True)
                    if not args.no_profile:
                        entry["profile"].append(run_worker(sys.executable, "profile", *common))
                    # a first process on a machine: torch.compile's on-disk cache empty (its warm-up epoch)
                    cold = run_worker(sys.executable, "pyro_sc", path, batch_key, batch_size, 1, setting["train_size"],
                                      threads, {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / f"inductor_{threads}")})
                    row["pyro_sc_first_process_warmup_epoch_seconds"] = cold.get("warmup_epoch_seconds", cold)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()

"""Out of core: scVI on a million cells read from disk, with peak memory and where the time goes.

1. ``write``: simulates a ``--n-cells`` x ``--n-genes`` sparse count matrix and writes it to an .h5ad in
   chunks of cells, appending to the CSR arrays on disk (never holding the matrix, dense or sparse).
   The counts follow scVI's generative process (cell types in a latent space, a batch effect, a
   softmax decoder, log-normal library sizes, gamma-Poisson noise) for a template of ``--template``
   cells; each written cell is a template cell binomially thinned with its own capture rate, so cells
   are distinct with varied library sizes (about 13% of the entries are non-zero).
2. ``io``: data loading alone: registering the backed file (the chunked scan of every count) and reading
   minibatches of ``--batch-size`` random cells into tensors, with the file in the page cache (warm)
   and after evicting it (cold, ``posix_fadvise(DONTNEED)``).
3. ``compare``: training cells per second from disk and in memory in the same process, on the same
   ``--subset`` random cells (from disk: the 1M-cell file with ``train_indices``; in memory: those
   cells loaded), interleaved over ``--repeats`` epochs after a warm-up, medians reported.
4. ``epoch``: one epoch of scVI over every cell from disk (prefetch on, the default for backed data):
   epoch time, cells per second, peak resident memory.

Each phase runs in a fresh subprocess, so each peak RSS is its own. ``--n-cells 20000`` makes a quick
run. The .h5ad goes to ``benchmarks/results/`` (not committed) and is deleted unless ``--keep``.

    OMP_NUM_THREADS=1 python benchmarks/scale.py                 # 1,000,000 x 2,000
    OMP_NUM_THREADS=1 python benchmarks/scale.py --n-cells 20000 --subset 5000

writes ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------- write
def simulate_template(
    n_cells: int, n_genes: int, rng: np.random.Generator, *, n_types=8, n_latent=10, n_batches=2
):
    """CSR counts of ``n_cells`` cells from scVI's generative process, and their batch codes."""
    import scipy.sparse as sp

    centres_tk = rng.normal(0, 1.5, (n_types, n_latent))
    w_kg = rng.normal(0, 1 / np.sqrt(n_latent), (n_latent, n_genes))
    offset_g = rng.normal(0, 1.5, n_genes)
    batch_bg = rng.normal(0, 0.3, (n_batches, n_genes))
    blocks, batches = [], []
    for start in range(0, n_cells, 2000):
        m = min(2000, n_cells - start)
        z_nk = centres_tk[rng.integers(0, n_types, m)] + rng.normal(0, 0.5, (m, n_latent))
        batch_n = rng.integers(0, n_batches, m)
        logits_ng = z_nk @ w_kg + offset_g + batch_bg[batch_n]
        rho_ng = np.exp(logits_ng - logits_ng.max(1, keepdims=True))
        rho_ng /= rho_ng.sum(1, keepdims=True)
        mu_ng = rng.lognormal(np.log(1000.0), 0.5, m)[:, None] * rho_ng
        x_ng = rng.poisson(rng.gamma(2.0, mu_ng / 2.0))
        blocks.append(sp.csr_matrix(x_ng.astype(np.float32)))
        batches.append(batch_n)
    return sp.vstack(blocks, format="csr"), np.concatenate(batches)


def worker_write(args) -> dict:
    import anndata
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    template, template_batch = simulate_template(min(args.template, args.n_cells), args.n_genes, rng)
    rows_n = rng.integers(0, template.shape[0], args.n_cells)  # which template cell each cell thins
    obs = pd.DataFrame(
        {"batch": pd.Categorical.from_codes(template_batch[rows_n], ["batch_0", "batch_1"])},
        index=pd.Index([f"cell_{i}" for i in range(args.n_cells)]),
    )
    var = pd.DataFrame(index=[f"gene_{g}" for g in range(args.n_genes)])
    anndata.AnnData(obs=obs, var=var).write_h5ad(args.h5ad)  # obs and var; X is appended below
    nnz = 0
    with h5py.File(args.h5ad, "r+") as f:
        x = f.create_group("X")
        x.attrs.update(
            {
                "encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                "shape": (args.n_cells, args.n_genes),
            }
        )
        data = x.create_dataset("data", (0,), dtype=np.float32, maxshape=(None,), chunks=(1 << 20,))
        indices = x.create_dataset("indices", (0,), dtype=np.int32, maxshape=(None,), chunks=(1 << 20,))
        indptr = x.create_dataset("indptr", (1,), dtype=np.int64, maxshape=(None,), chunks=(1 << 16,))
        indptr[0] = 0
        for start in range(0, args.n_cells, args.chunk_cells):
            rows = rows_n[start : start + args.chunk_cells]
            block = template[rows]
            capture = rng.uniform(0.5, 1.0, len(rows))
            capture_nnz = np.repeat(capture, np.diff(block.indptr))
            block.data = rng.binomial(block.data.astype(np.int64), capture_nnz).astype(np.float32)
            block.eliminate_zeros()
            empty = np.flatnonzero(np.diff(block.indptr) == 0)  # every cell keeps a count
            ones = sp.csr_matrix((np.ones(len(empty), np.float32), (empty, 0 * empty)), shape=block.shape)
            block = block + ones
            block.sort_indices()
            n = block.nnz
            for ds, values in ((data, block.data), (indices, block.indices.astype(np.int32))):
                ds.resize((nnz + n,))
                ds[nnz:] = values
            end = indptr.shape[0]
            indptr.resize((end + len(rows),))
            indptr[end:] = block.indptr[1:].astype(np.int64) + nnz
            nnz += n
    with open(args.h5ad, "rb+") as handle:
        os.fsync(handle.fileno())  # written through, so the cold reads below can evict it
    return {
        "seconds": time.perf_counter() - started,
        "nnz": nnz,
        "density": nnz / (args.n_cells * args.n_genes),
        "file_gb": os.path.getsize(args.h5ad) / 1e9,
        "peak_rss_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------------------------------------- io
def random_batches(n_batches: int, n_cells: int, batch_size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n_cells, batch_size, replace=False) for _ in range(n_batches)]


def evict(path: str) -> None:
    """Drop the file from the page cache (Linux), so the next reads come from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def worker_io(args) -> dict:
    import anndata

    from pyro_sc.data import AnnDataSetup, load_minibatches

    adata = anndata.read_h5ad(args.h5ad, backed="r")
    started = time.perf_counter()
    setup = AnnDataSetup(adata, batch_key="batch")
    setup_seconds = time.perf_counter() - started
    out = {"setup_seconds": setup_seconds, "fast_reader": setup._reader is not None}
    n_batches = max(1, args.io_cells // args.batch_size)
    for kind in ("warm", "cold"):
        if kind == "cold":
            if not hasattr(os, "posix_fadvise"):
                continue
            evict(args.h5ad)
            n_batches = max(1, n_batches // 10)
        batches = random_batches(n_batches, setup.n_obs, args.batch_size, seed=1 if kind == "warm" else 2)
        started = time.perf_counter()
        for _ in load_minibatches(setup, batches):
            pass
        seconds = time.perf_counter() - started
        out[f"{kind}_cells_per_second"] = n_batches * args.batch_size / seconds
        out[f"{kind}_cells"] = n_batches * args.batch_size
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ------------------------------------------------------------------------------------------ training
def worker_compare(args) -> dict:
    import anndata
    import torch

    import pyro_sc

    torch.set_num_threads(args.threads)
    backed = anndata.read_h5ad(args.h5ad, backed="r")
    n_subset = min(args.subset, backed.n_obs)
    subset = np.sort(np.random.default_rng(3).choice(backed.n_obs, n_subset, replace=False))
    memory = backed[subset].to_memory()
    models = {
        "disk": pyro_sc.SCVI(backed, batch_key="batch"),
        "disk_no_prefetch": pyro_sc.SCVI(backed, batch_key="batch"),
        "memory": pyro_sc.SCVI(memory, batch_key="batch"),
    }
    options = {
        "disk": dict(train_indices=subset),
        "disk_no_prefetch": dict(train_indices=subset, prefetch=0),
        "memory": dict(train_size=1.0),
    }
    rates = {kind: [] for kind in models}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for kind, model in models.items():
            history = model.train(
                max_epochs=1, batch_size=args.batch_size, progress_bar=False, **options[kind]
            )
            if repeat:
                rates[kind].append(len(subset) / float(history["seconds"].iloc[-1]))
    out = {f"{kind}_cells_per_second": float(np.median(r)) for kind, r in rates.items()}
    out["disk_over_memory"] = out["disk_cells_per_second"] / out["memory_cells_per_second"]
    out["disk_no_prefetch_over_memory"] = (
        out["disk_no_prefetch_cells_per_second"] / out["memory_cells_per_second"]
    )
    out["runs"] = rates
    out["subset_cells"] = len(subset)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def worker_epoch(args) -> dict:
    import anndata
    import torch

    import pyro_sc

    torch.set_num_threads(args.threads)
    adata = anndata.read_h5ad(args.h5ad, backed="r")
    started = time.perf_counter()
    model = pyro_sc.SCVI(adata, batch_key="batch")
    setup_seconds = time.perf_counter() - started
    history = model.train(max_epochs=1, batch_size=args.batch_size, train_size=1.0, progress_bar=False)
    seconds = float(history["seconds"].iloc[-1])
    return {
        "setup_seconds": setup_seconds,
        "epoch_seconds": seconds,
        "cells_per_second": adata.n_obs / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


WORKERS = {"write": worker_write, "io": worker_io, "compare": worker_compare, "epoch": worker_epoch}


def run_worker(phase: str, argv: list[str]) -> dict:
    """Run one phase in a fresh interpreter; its result is the last line of its output."""
    print(f"--- {phase}", flush=True)
    done = subprocess.run(
        [sys.executable, __file__, "--worker", phase, *argv], capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--template", type=int, default=50_000, help="cells simulated from the model")
    parser.add_argument("--chunk-cells", type=int, default=20_000, help="cells written at a time")
    parser.add_argument("--subset", type=int, default=10_000, help="cells of the disk / memory comparison")
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each kind in the comparison")
    parser.add_argument("--io-cells", type=int, default=None, help="cells the I/O phase reads (all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--h5ad", default=None, help="default: benchmarks/results/scale_<cells>x<genes>.h5ad")
    parser.add_argument("--keep", action="store_true", help="keep the .h5ad (and reuse one that exists)")
    parser.add_argument("--phases", default="write,io,compare,epoch")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    default_h5ad = ROOT / "benchmarks" / "results" / f"scale_{args.n_cells}x{args.n_genes}.h5ad"
    args.h5ad = args.h5ad or str(default_h5ad)
    args.io_cells = args.n_cells if args.io_cells is None else args.io_cells
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    Path(args.h5ad).parent.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:] if a != "--keep"]
    phases = args.phases.split(",")
    results = {
        "benchmark": "scale",
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "n_cells": args.n_cells,
        "n_genes": args.n_genes,
        "batch_size": args.batch_size,
        "torch_threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
    }
    try:
        for phase in phases:
            if phase == "write" and args.keep and Path(args.h5ad).exists():
                continue
            results[phase] = run_worker(phase, argv)
            write_results(args.out, results)  # after every phase: a long run keeps what it measured
    finally:
        if not args.keep and Path(args.h5ad).exists():
            os.remove(args.h5ad)
    summary = {}
    if "epoch" in results:
        summary.update(
            epoch_seconds=results["epoch"]["epoch_seconds"],
            cells_per_second_from_disk=results["epoch"]["cells_per_second"],
            peak_rss_mb=results["epoch"]["peak_rss_mb"],
        )
    if "compare" in results:
        summary.update(
            subset_disk_cells_per_second=results["compare"]["disk_cells_per_second"],
            subset_memory_cells_per_second=results["compare"]["memory_cells_per_second"],
            disk_over_memory=results["compare"]["disk_over_memory"],
        )
    if "io" in results:
        summary.update(io_cells_per_second_warm=results["io"]["warm_cells_per_second"],
                       io_cells_per_second_cold=results["io"].get("cold_cells_per_second"))
    results["summary"] = summary
    results["machine"]["load_average_end"] = os.getloadavg()
    write_results(args.out, results)


if __name__ == "__main__":
    main()

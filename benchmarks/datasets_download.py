"""Every data set through the downloader from an empty cache: download + conversion time, and equality.

The public originals (``<data>/originals/``, byte for byte the GitHub files) are served by an HTTP
server on 127.0.0.1 and ``settings.base_url`` points at it, so the run is offline and repeatable; the
time is that of the local transfer plus the conversion, not of a download over the internet. Each
result is compared with the h5ad shipped in the data directory (matrix, names, every obs / var column).

    python3 benchmarks/datasets_download.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import http.server
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import anndata
import numpy as np

from _common import write_results
from pyro_sc import datasets, settings
from pyro_sc.datasets._sources import DATASETS, MARKER_GROUP


def differences(adata: anndata.AnnData, shipped: anndata.AnnData) -> list[str]:
    """What differs between a converted set and the shipped file (empty when they are equal)."""
    found = []
    if adata.shape != shipped.shape or (adata.X != shipped.X).nnz:
        found.append("X")
    for axis in ["obs", "var"]:
        frame, reference = getattr(adata, axis), getattr(shipped, axis)
        if not frame.index.equals(reference.index):
            found.append(f"{axis}_names")
        for column in reference.columns:
            if column == "percent.mt":  # shipped rounded to 15 significant digits
                same = np.allclose(frame[column], reference[column], rtol=0, atol=1e-12)
            else:
                same = column in frame and frame[column].equals(reference[column])
            if not same:
                found.append(f"{axis}.{column}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the data directory holding originals/ and the h5ad files")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "datasets_download.json"))
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        mirror = Path(tmp) / "mirror"
        mirror.mkdir()
        for name in DATASETS:
            (mirror / name).symlink_to(data_dir / "originals" / name)
        (mirror / MARKER_GROUP).symlink_to(data_dir / "markers" / MARKER_GROUP)
        handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        settings.data_dir, settings.cache_dir, settings.download = None, Path(tmp) / "cache", True
        settings.base_url = f"http://127.0.0.1:{server.server_address[1]}"
        runs = []
        for name, dataset in DATASETS.items():
            started = time.perf_counter()
            path = datasets.data_path(name)
            seconds = time.perf_counter() - started
            diff = differences(anndata.read_h5ad(path), anndata.read_h5ad(data_dir / name / dataset.file))
            runs.append({"dataset": name, "download_and_convert_s": round(seconds, 2),
                         "originals_MB": round(dataset.download_size / 1e6, 2),
                         "h5ad_MB": round(path.stat().st_size / 1e6, 2),
                         "equal_to_shipped": not diff, "differences": diff})
            print(runs[-1])
        started = time.perf_counter()
        markers = datasets.load_markers("tian_73_73")
        marker_s = time.perf_counter() - started
        server.shutdown()
    write_results(args.out, {
        "what": "each data set from an empty cache through the downloader, originals served on 127.0.0.1",
        "all_equal": all(run["equal_to_shipped"] for run in runs),
        "total_s": round(sum(run["download_and_convert_s"] for run in runs), 2),
        "markers_tian_73_73": {"seconds": round(marker_s, 3), "shape": list(markers.shape)},
        "runs": runs,
    })


if __name__ == "__main__":
    main()

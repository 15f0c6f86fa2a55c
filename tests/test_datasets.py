"""The downloader, for real and offline: the public originals served on 127.0.0.1 from ``originals/``.

Every data set fetched from an empty cache and converted must equal the h5ad shipped in the data
directory; each fault (checksum mismatch, interrupted download, no network, unknown name, downloads
off) must fail with its message and leave nothing usable behind.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

import pyro_sc
from pyro_sc import datasets, settings
from pyro_sc.datasets import ChecksumError, DataUnavailableError
from pyro_sc.datasets._sources import DATASETS, MARKER_GROUP, MARKERS

SHIPPED = settings.data_dir  # the tests' data directory (tests/conftest.py), or None
NEEDED = ["originals", f"markers/{MARKER_GROUP}", *DATASETS]  # what the downloader is checked against


@pytest.fixture(scope="module")
def originals(real_data) -> Path:
    """The public originals (skips, naming what is missing, without a data directory holding them)."""
    return real_data(*NEEDED) / "originals"


def _serve(directory: Path, handler=None):
    """An HTTP server on 127.0.0.1 serving ``directory``; returns (base URL, stop)."""
    handler = handler or partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


def _mirror(root: Path, originals: Path) -> Path:
    """A mirror laid out as the downloader expects: ``<name>/<file>``, marker lists in their folder."""
    root.mkdir()
    for name in DATASETS:
        (root / name).symlink_to(originals / name, target_is_directory=True)
    (root / MARKER_GROUP).symlink_to(Path(SHIPPED) / "markers" / MARKER_GROUP, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def mirror_url(tmp_path_factory, originals):
    url, stop = _serve(_mirror(tmp_path_factory.mktemp("mirror") / "root", originals))
    yield url
    stop()


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """Settings of a new user: no data directory, an empty cache, downloads on (from no server yet)."""
    monkeypatch.setattr(settings, "data_dir", None)
    monkeypatch.setattr(settings, "cache_dir", tmp_path / "cache")
    monkeypatch.setattr(settings, "base_url", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(settings, "download", True)
    return tmp_path / "cache"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _assert_same(adata: anndata.AnnData, shipped: anndata.AnnData) -> None:
    assert adata.shape == shipped.shape
    assert adata.X.dtype == shipped.X.dtype == np.float32
    assert (adata.X != shipped.X).nnz == 0
    pd.testing.assert_index_equal(adata.obs_names, shipped.obs_names)
    pd.testing.assert_index_equal(adata.var_names, shipped.var_names)
    for frame, reference in [(adata.obs, shipped.obs), (adata.var, shipped.var)]:
        assert list(frame.columns) == list(reference.columns)
        for column in reference.columns:
            if column == "percent.mt":  # the shipped value is rounded to 15 significant digits
                np.testing.assert_allclose(frame[column], reference[column], rtol=0, atol=1e-12)
            else:
                pd.testing.assert_series_equal(frame[column], reference[column])


@pytest.mark.real_data
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_download_from_empty_cache_equals_shipped_file(name, fresh, mirror_url, monkeypatch):
    monkeypatch.setattr(settings, "base_url", mirror_url)
    assert datasets.available().loc[name, "location"] == "download"
    path = datasets.data_path(name)
    assert path == fresh / name / DATASETS[name].file
    _assert_same(anndata.read_h5ad(path), anndata.read_h5ad(Path(SHIPPED) / name / DATASETS[name].file))
    originals = [fresh / "originals" / name / original.name for original in DATASETS[name].originals]
    assert _files(fresh) == sorted([path, *originals])
    assert datasets.available().loc[name, "location"] == "cache"
    # the second call reads the cache: the server is gone
    monkeypatch.setattr(settings, "base_url", f"http://127.0.0.1:{_closed_port()}")
    assert datasets.data_path(name) == path


@pytest.mark.real_data
def test_marker_lists_download_and_equal_the_shipped_matrices(fresh, mirror_url, monkeypatch):
    monkeypatch.setattr(settings, "base_url", mirror_url)
    for name in ["tian_73_73", "tian_20_73"]:
        downloaded = datasets.load_markers(name)
        shipped = pd.read_csv(Path(SHIPPED) / "cellbench_3cl" / "markers" / f"{name}_markers_binary_matrix.csv",
                              index_col=0)
        pd.testing.assert_frame_equal(downloaded, shipped)
        # from the data directory (its csv) the matrix is the same
        pd.testing.assert_frame_equal(datasets.load_markers(name, data_dir=SHIPPED), shipped)
    assert _files(fresh) == [fresh / "markers" / MARKER_GROUP / MARKERS[n].name for n in ["tian_20_73", "tian_73_73"]]
    with pytest.raises(ValueError, match=r"^unknown marker list 'tian_99'; known: example_TME_marker_list, "):
        datasets.load_markers("tian_99")


@pytest.mark.real_data
def test_checksum_mismatch_names_the_file_and_both_hashes_and_keeps_nothing(fresh, originals, tmp_path, monkeypatch):
    tampered = tmp_path / "tampered"
    shutil.copytree(originals / "pbmc3k_hvg2000", tampered / "pbmc3k_hvg2000")
    target = tampered / "pbmc3k_hvg2000" / "pbmc_meta.rda"
    content = bytearray(target.read_bytes())
    content[len(content) // 2] ^= 0xFF  # one byte changed
    target.chmod(0o644)
    target.write_bytes(bytes(content))
    url, stop = _serve(tampered)
    monkeypatch.setattr(settings, "base_url", url)
    try:
        with pytest.raises(ChecksumError) as caught:
            datasets.load_pbmc3k()
    finally:
        stop()
    expected = DATASETS["pbmc3k_hvg2000"].originals[1]
    assert expected.name == "pbmc_meta.rda"
    assert str(caught.value).startswith(
        f"checksum mismatch for pbmc_meta.rda downloaded from {url}/pbmc3k_hvg2000/pbmc_meta.rda: "
        f"expected sha256 {expected.sha256}, got {hashlib.sha256(content).hexdigest()}. "
        "The file was deleted and nothing was kept in the cache"
    )
    # the matrix downloaded before it passed its own checksum and may stay; nothing of the bad file does
    assert _files(fresh) == [fresh / "originals" / "pbmc3k_hvg2000" / "pbmc_matrix_small.rda"]


class _CutHandler(_QuietHandler):
    """Announces the whole file, sends half of it, and drops the connection."""

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        content = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content[: len(content) // 2])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


@pytest.mark.real_data
def test_interrupted_download_leaves_no_file_that_is_used_later(fresh, originals, mirror_url, monkeypatch):
    url, stop = _serve(originals, handler=partial(_CutHandler, directory=str(originals)))
    monkeypatch.setattr(settings, "base_url", url)
    try:
        with pytest.raises(DataUnavailableError, match=r"^could not download pbmc_matrix_small.rda from "):
            datasets.load_pbmc3k()
    finally:
        stop()
    assert _files(fresh) == []  # not even a temporary file
    # a truncated file at the final place (say, copied by hand and cut short) is not used: downloaded again
    folder = fresh / "originals" / "pbmc3k_hvg2000"
    folder.mkdir(parents=True, exist_ok=True)
    partial_copy = (originals / "pbmc3k_hvg2000" / "pbmc_matrix_small.rda").read_bytes()[:1000]
    (folder / "pbmc_matrix_small.rda").write_bytes(partial_copy)
    monkeypatch.setattr(settings, "base_url", mirror_url)
    adata = datasets.load_pbmc3k()
    assert adata.shape == (2638, 2000)
    assert (folder / "pbmc_matrix_small.rda").read_bytes() == (originals / "pbmc3k_hvg2000" / "pbmc_matrix_small.rda").read_bytes()


def test_no_network_names_the_url_and_where_to_put_the_file(fresh):
    base = settings.base_url  # a closed port on 127.0.0.1
    original = DATASETS["ifnb_2800"].originals[0]
    with pytest.raises(DataUnavailableError) as caught:
        datasets.load_ifnb()
    message = str(caught.value)
    assert message.startswith(f"could not download ifnb_2800.rda from {base}/ifnb_2800/ifnb_2800.rda: ")
    assert message.endswith(
        f"Without network access, download it elsewhere and put it at {fresh / 'originals' / 'ifnb_2800' / 'ifnb_2800.rda'} "
        f"(sha256 {original.sha256}, 2,228,941 bytes), or point pyro_sc.settings.data_dir at a folder holding "
        "ifnb_2800/ifnb_2800_counts.h5ad."
    )
    assert _files(fresh) == []
    assert isinstance(caught.value, FileNotFoundError)  # code that caught FileNotFoundError still does


def test_without_settings_the_public_url_is_used(monkeypatch):
    monkeypatch.setattr(settings, "base_url", None)
    from pyro_sc.datasets._fetch import source_url

    original = DATASETS["ifnb_2800"].originals[0]
    assert source_url("ifnb_2800", original) == original.url
    assert original.url == ("https://raw.githubusercontent.com/chthub/rDeepmaps/"
                            "2d0baac86ccb806a52834062287fd1d6cfbc09cd/data/ifnb_2800.rda")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as caught:
        datasets.read_dataset("pbmc68k")
    assert str(caught.value) == (
        "unknown data set 'pbmc68k'; known: baron_mouse1, cellbench_3cl, ifnb_2800, pbmc3k_hvg2000"
    )


def test_downloads_turned_off(fresh, monkeypatch):
    monkeypatch.setattr(settings, "download", False)
    with pytest.raises(DataUnavailableError) as caught:
        datasets.data_path("baron_mouse1")
    assert str(caught.value) == (
        f"data set 'baron_mouse1' not found (looked at {fresh / 'baron_mouse1' / 'baron_mouse1_counts.h5ad'}) "
        "and downloads are turned off (pyro_sc.settings.download = False or PYRO_SC_DOWNLOAD=0). Turn them on, "
        "or point pyro_sc.settings.data_dir / PYRO_SC_DATA_DIR at a folder that holds it."
    )


@pytest.mark.real_data
def test_the_data_directory_comes_first_then_the_cache(fresh, real_data, tmp_path):
    real_data("cellbench_3cl")
    shipped = Path(SHIPPED) / "cellbench_3cl" / DATASETS["cellbench_3cl"].file
    assert datasets.data_path("cellbench_3cl", data_dir=SHIPPED) == shipped
    settings.data_dir = Path(SHIPPED)
    assert datasets.data_path("cellbench_3cl") == shipped
    assert datasets.available().loc["cellbench_3cl", "location"] == "data_dir"
    # a data directory without the set: the cache is next
    settings.data_dir = tmp_path / "empty"
    cached = fresh / "cellbench_3cl" / DATASETS["cellbench_3cl"].file
    cached.parent.mkdir(parents=True)
    shutil.copyfile(shipped, cached)
    assert datasets.data_path("cellbench_3cl") == cached


def test_available_lists_every_set_with_size_source_and_license(fresh):
    table = datasets.available()
    counts = table[table["kind"] == "counts"]
    assert sorted(counts.index) == ["baron_mouse1", "cellbench_3cl", "ifnb_2800", "pbmc3k_hvg2000"]
    assert counts.loc["ifnb_2800", "download MB"] == 2.23
    assert counts.loc["cellbench_3cl", "files"] == 5
    assert counts["license"].str.startswith("MIT").all()
    assert counts["source"].str.startswith("https://raw.githubusercontent.com/").all()
    assert set(counts["location"]) == {"download"}
    assert {"tian_73_73", "tian_20_73", "koh_markers"} <= set(table.index[table["kind"] == "markers"])


def test_no_default_path_relative_to_the_working_directory(tmp_path):
    """With no environment variable, importing pyro_sc sets no data directory, wherever it runs."""
    (tmp_path / "work").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)  # ../shared/data exists from the working directory
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYRO_SC_")}
    env["PYTHONPATH"] = str(Path(pyro_sc.__file__).parents[1])
    result = subprocess.run(
        [sys.executable, "-c", "import pyro_sc; print(pyro_sc.settings.data_dir, pyro_sc.settings.download)"],
        cwd=tmp_path / "work", env=env, capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip() == "None True"

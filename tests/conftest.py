"""Test session set-up: where the real data sets are, no downloads, and the real-data guard.

The data directory is decided once, when this file is imported (before any test module imports
pyro_sc): the environment variable ``PYRO_SC_DATA_DIR`` if set and not empty, else ``../shared/data``
beside the repository if it is a directory, else none. When there is one, ``pyro_sc.settings.data_dir``
is set to its resolved absolute path and ``PYRO_SC_DATA_DIR`` is exported with it (notebook kernels
inherit it). The cache is a temporary folder of the session's own (``PYRO_SC_CACHE_DIR``), never the
user's. Downloading is always off (``pyro_sc.settings.download = False``, ``PYRO_SC_DOWNLOAD=0``):
no test reaches the internet; the downloader's own tests turn it back on against a local server.
Kernel compilation is off too (``pyro_sc.settings.compile = False``, ``PYRO_SC_COMPILE=0``): compiling
costs seconds per kernel and process, and the plain kernels compute the same functions; the compiled
kernels' own tests (in test_distributions_float32.py) turn it on.

A test that reads real data carries ``@pytest.mark.real_data`` and asks the ``real_data`` fixture for
the sets it needs: ``real_data("ifnb_2800")`` skips the test, with a reason naming what is missing,
when there is no data directory or the set is not in it, and returns the data directory otherwise.

Guard: when a data directory was found but every collected ``real_data`` test skipped, the session
fails (exit status 1) with a message saying so, so that a broken data path cannot pass CI silently.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "PYRO_SC_DATA_DIR"
DOWNLOAD_ENV = "PYRO_SC_DOWNLOAD"
NO_DATA_DIR = "no data directory: set PYRO_SC_DATA_DIR or place ../shared/data beside the repository"


def find_data_dir() -> Path | None:
    """``$PYRO_SC_DATA_DIR`` if set (resolved, whether or not it exists), else ``<repo>/../shared/data``
    if it is a directory, else None."""
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser().resolve()
    beside = ROOT.parent / "shared" / "data"
    return beside.resolve() if beside.is_dir() else None


DATA_DIR = find_data_dir()
# the tests never read or fill the user's own cache: an empty one of their own, removed at exit
CACHE_DIR = Path(tempfile.mkdtemp(prefix="pyro_sc_test_cache_"))
atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)
os.environ["PYRO_SC_CACHE_DIR"] = str(CACHE_DIR)
os.environ[DOWNLOAD_ENV] = "0"
os.environ["PYRO_SC_COMPILE"] = "0"
if DATA_DIR is not None:
    os.environ[DATA_DIR_ENV] = str(DATA_DIR)
else:
    os.environ.pop(DATA_DIR_ENV, None)

import pyro_sc  # noqa: E402  (after the environment above, which pyro_sc.settings reads on import)

pyro_sc.settings.data_dir = DATA_DIR
pyro_sc.settings.cache_dir = CACHE_DIR
pyro_sc.settings.download = False
pyro_sc.settings.compile = False


def _dataset_file(name: str) -> str | None:
    """The file name of data set ``name`` inside its folder, when pyro_sc.datasets knows it."""
    from pyro_sc import datasets

    entry = getattr(datasets, "DATASETS", {}).get(name)  # a file name, or a record with .file
    file = entry if isinstance(entry, str) else getattr(entry, "file", None)
    return file if isinstance(file, str) else None


def require_dataset(*names: str) -> Path:
    """Skip the calling test unless there is a data directory holding each named set; return the directory.

    A name is a folder of the data directory (``"ifnb_2800"``, ``"cellbench_3cl"``, ``"markers"``, ...)
    or a path below it (``"cellbench_3cl/markers/tian_20_73_markers.yaml"``); for a data set
    ``pyro_sc.datasets`` knows, its h5ad file must be there too.
    """
    __tracebackhide__ = True  # the skip is reported at the calling test's line
    if DATA_DIR is None:
        pytest.skip(NO_DATA_DIR)
    for name in names:
        path = DATA_DIR / name
        file = _dataset_file(name)
        if file is not None:
            path = path / file
        if not path.exists():
            pytest.skip(f"{path} not found")
    return DATA_DIR


@pytest.fixture(scope="session")
def real_data():
    """``real_data("ifnb_2800", ...)``: :func:`require_dataset` as a fixture (for any scope)."""
    return require_dataset


# ------------------------------------------------------------------------------ the real-data guard
_real_data = {"collected": 0, "ran": 0, "skipped": 0}  # real_data tests; "ran": passed or failed
_guard_message: list[str] = []


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(config, items):
    for item in items:  # a test asking for the fixture is a real-data test even without the marker
        if "real_data" in getattr(item, "fixturenames", ()) and item.get_closest_marker("real_data") is None:
            item.add_marker(pytest.mark.real_data)


def pytest_collection_finish(session):
    _real_data["collected"] = sum(item.get_closest_marker("real_data") is not None for item in session.items)


def pytest_runtest_logreport(report):
    if "real_data" not in report.keywords:
        return
    if (report.when == "call" and report.passed) or report.failed:  # it ran (or broke in set-up/teardown)
        _real_data["ran"] += 1
    elif report.skipped:
        _real_data["skipped"] += 1


def pytest_sessionfinish(session, exitstatus):
    n = _real_data
    if DATA_DIR is not None and n["collected"] > 0 and n["ran"] == 0 and exitstatus == pytest.ExitCode.OK:
        _guard_message.append(
            f"data directory {DATA_DIR} was found but all {n['collected']} real_data tests were skipped "
            f"and none ran; their skip reasons (pytest -rs) say what is missing. Fix the data directory "
            f"({DATA_DIR_ENV} or ../shared/data beside the repository), or remove it to run without real data."
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    for message in _guard_message:
        terminalreporter.write_sep("!", "real-data guard", red=True, bold=True)
        terminalreporter.write_line(message, red=True)

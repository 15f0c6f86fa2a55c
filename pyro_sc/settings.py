"""Package-wide settings: where the real data sets are found, cached and downloaded from, and whether
kernels are compiled.

Each is read once from its environment variable when pyro_sc is imported, and can be changed at run
time, e.g. ``pyro_sc.settings.data_dir = "/path/to/data"``.

``data_dir`` (``PYRO_SC_DATA_DIR``; default None)
    A folder of ready data sets laid out as ``<data_dir>/<name>/<file>.h5ad`` (and ``markers/``).
    Looked at first. Nothing defaults to a path relative to the working directory.
``cache_dir`` (``PYRO_SC_CACHE_DIR``; default the per-user cache, e.g. ``~/.cache/pyro_sc`` on Linux)
    Where downloaded originals (``<cache_dir>/originals/<name>/``) and the converted h5ad files
    (``<cache_dir>/<name>/``) are kept. Looked at second.
``base_url`` (``PYRO_SC_BASE_URL``; default None)
    A mirror of the original files laid out as ``<base_url>/<name>/<original file>``; None fetches each
    file from its public URL (GitHub, at a pinned commit). The checksums are the same either way.
``download`` (``PYRO_SC_DOWNLOAD``; default True, ``0`` / ``false`` / ``no`` turn it off)
    Whether a data set in neither place may be downloaded.
``compile`` (``PYRO_SC_COMPILE``; default True, ``0`` / ``false`` / ``no`` turn it off)
    Whether the NB / ZINB log-probability's element-wise work (during training: float32, large
    minibatches) runs as kernels compiled by ``torch.compile``, each one fused parallel loop; the first
    use in a process compiles them (seconds; cached on disk for later processes). Same values either
    way, to float32 rounding. Where compilation fails (no C++ compiler, an unsupported device), pyro_sc
    warns once and runs uncompiled.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "PYRO_SC_DATA_DIR"
CACHE_DIR_ENV = "PYRO_SC_CACHE_DIR"
BASE_URL_ENV = "PYRO_SC_BASE_URL"
DOWNLOAD_ENV = "PYRO_SC_DOWNLOAD"
COMPILE_ENV = "PYRO_SC_COMPILE"


def _default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("pyro_sc", appauthor=False))


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value).expanduser().resolve() if value else None


#: A folder of ready data sets, looked at first (``PYRO_SC_DATA_DIR``; default None).
data_dir: Path | None = _env_path(DATA_DIR_ENV)
#: The per-user cache of downloaded and converted data sets, looked at second (``PYRO_SC_CACHE_DIR``).
cache_dir: Path = _env_path(CACHE_DIR_ENV) or _default_cache_dir()
#: A mirror of the data sets' original files (``PYRO_SC_BASE_URL``; default None: their public URLs).
base_url: str | None = os.environ.get(BASE_URL_ENV) or None
#: Whether a data set in neither place may be downloaded (``PYRO_SC_DOWNLOAD``; default True).
download: bool = os.environ.get(DOWNLOAD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
#: Whether the NB / ZINB log-probability runs compiled kernels where it can (``PYRO_SC_COMPILE``; default True).
compile: bool = os.environ.get(COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")

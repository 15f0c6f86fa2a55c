"""Finding a data set's file: a data directory, then the per-user cache, then a checksummed download.

Downloads go through pooch: each file is streamed to a temporary name beside its final place, its
sha256 checked, and only then moved into place, so an interrupted or corrupted download never leaves a
file that a later call would use. A converted h5ad is written the same way (temporary name, then an
atomic rename).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import settings
from ._sources import Original


class DataUnavailableError(FileNotFoundError):
    """A data set is in neither the data directory nor the cache, and could not be downloaded."""


class ChecksumError(ValueError):
    """A downloaded file's sha256 differs from the published one; nothing of it was kept."""


def explicit_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The directory of ready files to look in first: the argument, else ``settings.data_dir``."""
    chosen = data_dir if data_dir is not None else settings.data_dir
    return None if chosen is None else Path(chosen).expanduser()


def cache_dir() -> Path:
    return Path(settings.cache_dir).expanduser()


def source_url(group: str, original: Original) -> str:
    """``original``'s URL: on the mirror ``settings.base_url`` if one is set, else its public URL."""
    if settings.base_url:
        return f"{settings.base_url.rstrip('/')}/{group}/{original.name}"
    return original.url


def require_downloads(what: str, looked_at: list[Path]) -> None:
    """Raise :class:`DataUnavailableError` when downloads are turned off."""
    if settings.download:
        return
    places = ", ".join(str(p) for p in looked_at)
    raise DataUnavailableError(
        f"{what} not found (looked at {places}) and downloads are turned off "
        f"(pyro_sc.settings.download = False or {settings.DOWNLOAD_ENV}=0). Turn them on, or point "
        f"pyro_sc.settings.data_dir / {settings.DATA_DIR_ENV} at a folder that holds it."
    )


def fetch(group: str, original: Original, folder: Path, *, manual_hint: str = "") -> Path:
    """``folder / original.name``, downloaded and checked against its sha256 unless already there.

    A file already at that place is used only if its checksum matches; otherwise it is downloaded again.
    """
    import pooch
    import requests

    url = source_url(group, original)
    target = folder / original.name
    try:
        path = pooch.retrieve(
            url,
            known_hash=f"sha256:{original.sha256}",
            fname=original.name,
            path=folder,
            downloader=pooch.HTTPDownloader(progressbar=False, timeout=60),
        )
    except ValueError as err:  # pooch's hash mismatch: it has already deleted the download
        got = re.search(r"but got ([0-9a-fA-F]+)", str(err))
        raise ChecksumError(
            f"checksum mismatch for {original.name} downloaded from {url}: expected sha256 {original.sha256}, "
            f"got {got.group(1) if got else 'another'}. The file was deleted and nothing was kept in the "
            f"cache ({folder}). The server's copy is not the published original: check "
            f"{settings.BASE_URL_ENV} / pyro_sc.settings.base_url (now {settings.base_url!r})."
        ) from err
    except (requests.RequestException, OSError) as err:
        raise DataUnavailableError(
            f"could not download {original.name} from {url}: {err}. Without network access, download it "
            f"elsewhere and put it at {target} (sha256 {original.sha256}, {original.size:,} bytes)"
            f"{manual_hint}."
        ) from err
    return Path(path)


def write_atomically(adata, path: Path) -> None:
    """Write ``adata`` to ``path`` under a temporary name first, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

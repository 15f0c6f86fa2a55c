"""Every notebook in tutorials/ runs top to bottom (at the small setting its PYRO_SC_TUTORIAL_SMALL selects)."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def test_there_are_tutorials():
    assert any(nb.name == "quickstart.ipynb" for nb in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, monkeypatch):
    monkeypatch.setenv("PYRO_SC_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    data_dir = os.environ.get("PYRO_SC_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    if not Path(data_dir).is_dir():
        pytest.skip(f"the tutorials read real data; no data directory at {data_dir}")
    monkeypatch.setenv("PYRO_SC_DATA_DIR", str(Path(data_dir).resolve()))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell

"""Every notebook in tutorials/ runs top to bottom at the small setting (PYRO_SC_TUTORIAL_SMALL=1).

Each runs in a copy of tutorials/, which is its kernel's working directory (as when a user opens it in
Jupyter), with the data directory given explicitly by PYRO_SC_DATA_DIR and downloads off. The notebooks
assert the numbers they report, so a wrong result fails here, not only a crash.
"""

import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))

# loader in a notebook's code -> the data set it reads
LOADERS = {"load_ifnb": "ifnb_2800", "load_cellbench": "cellbench_3cl", "load_baron_mouse1": "baron_mouse1",
           "load_pbmc3k": "pbmc3k_hvg2000", "load_markers": "cellbench_3cl"}


def datasets_read_by(notebook) -> list[str]:
    """The data sets a notebook reads, from its code cells' loader calls."""
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    names = {LOADERS[f] for f in re.findall(r"\b(" + "|".join(LOADERS) + r")\(", code)}
    names |= set(re.findall(r"""read_dataset\(\s*["']([\w.-]+)["']""", code))
    return sorted(names)


def test_there_are_tutorials():
    assert any(nb.name == "quickstart.ipynb" for nb in NOTEBOOKS)


def test_the_notebooks_find_their_data_sets():
    needs = {path.stem: datasets_read_by(nbformat.read(path, as_version=4)) for path in NOTEBOOKS}
    assert needs["quickstart"] == ["ifnb_2800"]
    assert needs["extending"] == ["cellbench_3cl", "pbmc3k_hvg2000"]


@pytest.mark.real_data
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, real_data, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    data_dir = real_data(*datasets_read_by(notebook))
    copy = tmp_path / "tutorials"
    shutil.copytree(path.parent, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "pyro_sc_output"))
    monkeypatch.setenv("PYRO_SC_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYRO_SC_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PYRO_SC_DOWNLOAD", "0")
    notebook = nbformat.read(copy / path.name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(copy)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell (and a failed assertion's message)

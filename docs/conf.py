"""Sphinx configuration of pyro_sc's documentation site.

Build (from the repository root; warnings are errors):

    python3 -m pip install -c constraints.txt -e ".[docs]"
    python3 -m sphinx -W --keep-going -b html docs docs/_build/html

The landing page includes the README and the changelog page includes CHANGELOG.md (never copies). The
tutorials (``docs/tutorials`` is a link to ``../tutorials``) are rendered by myst-nb from the outputs
committed in the notebooks: nothing is executed. The API reference is written by autodoc from the
docstrings (numpydoc style, read by napoleon; math by MathJax).

Two checks make a reference that is wrong a warning, so the build fails on it:

* ``nitpicky``: every cross-reference to a pyro_sc object must resolve. A reference through a re-export
  (``pyro_sc.SCVI``, ``pyro_sc.fit``) resolves to the object where it is documented
  (``pyro_sc.models.scvi.SCVI``, ``pyro_sc.infer.loop.fit``); references to other packages (torch,
  NumPy, AnnData, ...) and to Python's builtins are not checked (the build reads no inventory over the
  network).
* every name in the ``__all__`` of every public module of pyro_sc (none of whose dotted parts starts
  with an underscore) must be documented somewhere in the API reference, and every public module too.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import pkgutil

from sphinx.util import logging

import pyro_sc

logger = logging.getLogger("pyro_sc.docs")

project = "pyro_sc"
author = "the pyro_sc authors"
copyright = "the pyro_sc authors (MIT License)"
release = version = pyro_sc.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "**/.ipynb_checkpoints", "**/pyro_sc_output"]
html_theme = "furo"
html_title = f"pyro_sc {release}"
html_static_path = ["_static"]
html_css_files = ["pyro_sc.css"]
templates_path: list[str] = []

# --- notebooks and Markdown: render what is committed, execute nothing
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "remove"  # the committed runs' stderr is noise (tqdm's and umap's warnings, with paths)
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# --- autodoc / napoleon
# Each page names its ``:members:`` (a package's page shows its docstring; what it re-exports is
# documented where it is defined). A method's page also shows what its class inherits from pyro_sc's base
# classes (train, save, load, ...), through ``:inherited-members:`` less torch's and Pyro's ``Module``.
autodoc_default_options = {"member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
add_module_names = False
autosummary_generate = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True

# --- cross-references: pyro_sc's must resolve
nitpicky = True

EXTERNAL = {
    "anndata", "torch", "pyro", "numpy", "np", "pandas", "pd", "scipy", "sp", "matplotlib", "plt", "h5py",
    "typing", "typing_extensions", "collections", "os", "pathlib", "contextlib", "io", "_io", "numbers",
    "enum", "abc", "datetime", "threading", "concurrent", "types", "functools", "dataclasses", "scanpy",
    "sklearn", "pooch", "platformdirs", "tqdm",
    "AnnData",  # annotations of modules that import it only for type checking
}


def public_modules() -> list[str]:
    """pyro_sc and each of its modules with no dotted part starting with an underscore."""
    names = [pyro_sc.__name__]
    for info in pkgutil.walk_packages(pyro_sc.__path__, prefix="pyro_sc."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


def _lookup(dotted: str):
    """The object a dotted name reaches (importing the longest importable module prefix), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        try:
            for attr in parts[i:]:
                obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _key(obj):
    obj = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
    obj = obj.fget if isinstance(obj, property) else obj
    return id(obj)


def _documented(env) -> dict:
    """``{id(object): documented name}`` over the Python objects that the API reference documents."""
    objects = env.get_domain("py").objects
    cache = env.__dict__.setdefault("_pyro_sc_documented", {})
    if cache.get("n") != len(objects):
        by_id = {}
        for name, entry in objects.items():
            if entry.objtype in ("module", "data", "attribute") or getattr(entry, "aliased", False):
                continue
            obj = _lookup(name)
            if obj is not None and (callable(obj) or isinstance(obj, (property, classmethod, staticmethod))):
                by_id.setdefault(_key(obj), name)
        cache.update(n=len(objects), by_id=by_id)
    return cache["by_id"]


def _candidates(node) -> list[str]:
    target = node["reftarget"].lstrip(".~")
    module, cls = node.get("py:module"), node.get("py:class")
    names = [target]
    if module:
        names.append(f"{module}.{target}")
        if cls:
            names.append(f"{module}.{cls}.{target}")
    return names


def resolve_reexports(app, env, node, contnode):
    """Resolve a reference to a pyro_sc object through another of its names to where it is documented."""
    if node.get("refdomain") != "py":
        return None
    documented = _documented(env)
    for name in _candidates(node):
        if not name.startswith("pyro_sc"):
            continue
        obj = _lookup(name)
        if obj is None or not (callable(obj) or isinstance(obj, (property, classmethod, staticmethod))):
            continue
        canonical = documented.get(_key(obj))
        if canonical and canonical != name:
            return env.get_domain("py").resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode
            )
    return None


def quiet_external(app, domain, node):
    """Do not warn about a reference that cannot be to a documented pyro_sc object: to other packages and
    Python's builtins (no inventory is read), to a private name, or to a type alias of a pyro_sc module
    (``Likelihood = Literal["zinb", "nb"]`` in a signature: its values are in the parameter's text)."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    head = target.split(".")[0].split("[")[0]
    if head in EXTERNAL or (head == target and hasattr(builtins, target)) or target in ("None", "Ellipsis"):
        return True
    if target.startswith("_"):
        return True
    module = node.get("py:module")
    if module and "." not in target:
        obj = _lookup(f"{module}.{target}")
        if obj is not None and type(obj).__module__ == "typing":
            return True
    return None


def check_api_complete(app, env):
    """Warn about a public module, or a name in a public module's ``__all__``, that is not documented."""
    objects = env.get_domain("py").objects
    documented = _documented(env)
    for modname in public_modules():
        if modname not in objects:
            logger.warning(f"public module {modname} is not in the API reference")
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                found = obj.__name__ in objects
            elif callable(obj):
                found = _key(obj) in documented
            else:  # data: documented under this module's name or the module it comes from
                found = any(full.rsplit(".", 1)[-1] == name and entry.objtype == "data"
                            for full, entry in objects.items())
            if not found:
                logger.warning(f"{modname}.{name} is public (in __all__) but not in the API reference")


def setup(app):
    app.connect("missing-reference", resolve_reexports)
    app.connect("warn-missing-reference", quiet_external)
    app.connect("env-check-consistency", check_api_complete)

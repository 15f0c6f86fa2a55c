"""One docstring convention (numpydoc), checked over the whole public API.

The public API is every name in the ``__all__`` of every public module of pyro_sc (a module none of whose
dotted parts starts with ``_``, ``__main__`` aside), and the public methods and properties of the public
classes among them, those inherited from pyro_sc's own (private) base classes included; what a class
inherits from torch, Pyro or Python is theirs to document.

Each such callable has a docstring. Where a docstring has a numpydoc ``Parameters`` (or ``Other
Parameters``) section, the names it documents are exactly the signature's: a documented name that is
not a parameter fails, and so does a parameter left out (``self``, ``cls``, ``*args`` and ``**kwargs``
excepted; ``a, b : int`` documents ``a`` and ``b``). A class's section documents its constructor.
A docstring without such a section is not checked against the signature (short docstrings that name
their arguments in prose are fine).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import pyro_sc

SECTION_RULE = re.compile(r"^\s*-{3,}\s*$")
PARAMETER_SECTIONS = ("Parameters", "Other Parameters")


def public_modules() -> list:
    """pyro_sc and each of its modules with no dotted part starting with an underscore."""
    names = [pyro_sc.__name__]
    for info in pkgutil.walk_packages(pyro_sc.__path__, prefix="pyro_sc."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return [importlib.import_module(name) for name in sorted(names)]


def _is_ours(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "pyro_sc"


def public_api() -> dict:
    """``{qualified name: object}`` for every public callable, method and property (each object once)."""
    api, seen = {}, set()

    def add(name, obj):
        key = id(obj.fget) if isinstance(obj, property) else id(obj)
        if key not in seen:
            seen.add(key)
            api[name] = obj

    for module in public_modules():
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not callable(obj) or not _is_ours(obj):
                continue
            add(f"{obj.__module__}.{obj.__qualname__}", obj)  # where it is defined: one name for each
            if not inspect.isclass(obj):
                continue
            for attr in sorted(dir(obj)):
                if attr.startswith("_"):
                    continue
                owner = next((base for base in obj.__mro__ if attr in vars(base)), None)
                if owner is None or not _is_ours(owner):
                    continue
                member = vars(owner)[attr]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property) or inspect.isfunction(member):
                    add(f"{owner.__module__}.{owner.__qualname__}.{attr}", member)
    return api


def own_docstring(obj) -> str | None:
    doc = obj.fget.__doc__ if isinstance(obj, property) else vars(obj).get("__doc__", None)
    if doc is None and not inspect.isclass(obj):
        doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if doc and doc.strip() else None


def documented_parameters(doc: str) -> list[str] | None:
    """The names in the docstring's Parameters / Other Parameters sections; None when it has neither."""
    lines = doc.splitlines()
    names, found = [], False
    i = 0
    while i < len(lines) - 1:
        if lines[i].strip() in PARAMETER_SECTIONS and SECTION_RULE.match(lines[i + 1]):
            found = True
            indent = len(lines[i]) - len(lines[i].lstrip())
            i += 2
            while i < len(lines):
                line = lines[i]
                if i + 1 < len(lines) and line.strip() and SECTION_RULE.match(lines[i + 1]):
                    break  # the next section's header
                if line.strip() and len(line) - len(line.lstrip()) == indent:
                    head = line.strip().split(" : ")[0].rstrip(":")
                    # a name line ending in a comma continues on the next line, which numpydoc cannot read
                    names.extend(part.strip().lstrip("*") or "," for part in head.split(","))
                i += 1
            continue
        i += 1
    return names if found else None


def signature_parameters(obj) -> tuple[list[str], bool, bool]:
    """The signature's named parameters (no self / cls), and whether it has ``*args`` / ``**kwargs``."""
    signature = inspect.signature(obj)
    names, var_positional, var_keyword = [], False, False
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            var_positional = True
        elif parameter.kind is parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.name not in ("self", "cls"):
            names.append(parameter.name)
    return names, var_positional, var_keyword


def parameter_mismatch(obj) -> str | None:
    """What is wrong with the Parameters section of ``obj``'s docstring, or None."""
    doc = own_docstring(obj)
    documented = documented_parameters(doc)
    if isinstance(obj, property) or documented is None:
        return None
    if inspect.isclass(obj) and documented == [] and own_docstring(obj.__init__):
        return None
    names, var_positional, var_keyword = signature_parameters(obj)
    if "," in documented:
        return "a line of parameter names ends with a comma (numpydoc reads one line of names)"
    excepted = {"args"} if var_positional else set()
    excepted |= {"kwargs"} if var_keyword else set()
    extra = [name for name in documented if name not in names and name not in excepted]
    missing = [name for name in names if name not in documented]
    problems = []
    if extra:
        problems.append(f"documented but not in the signature: {', '.join(extra)}")
    if missing:
        problems.append(f"in the signature but not documented: {', '.join(missing)}")
    return "; ".join(problems) or None


API = public_api()


def test_the_public_api_is_found():
    # A guard against the discovery finding nothing (and so checking nothing).
    for name in ("pyro_sc.models.scvi.SCVI", "pyro_sc.infer.loop.fit", "pyro_sc.de.differential_expression",
                 "pyro_sc.models._base.BaseModel.save", "pyro_sc.datasets.load_ifnb"):
        assert name in API
    assert len(API) > 150


OTHER_STYLES = re.compile(
    r"^\s*(:param\b|:type\b|:returns?:|:rtype:|Args:$|Returns:$|Raises:$)", re.MULTILINE
)


@pytest.mark.parametrize("name", sorted(API))
def test_docstring_is_numpydoc_style(name):
    # Sphinx fields (":param x:") and Google sections ("Args:") would render apart from the numpydoc ones.
    doc = own_docstring(API[name]) or ""
    found = OTHER_STYLES.search(doc)
    assert found is None, f"{name}: {found.group(1)!r}: use numpydoc sections (Parameters / Returns / Raises)"


@pytest.mark.parametrize("name", sorted(API))
def test_public_callable_has_a_docstring(name):
    assert own_docstring(API[name]) is not None, f"{name} has no docstring"


@pytest.mark.parametrize("name", sorted(API))
def test_documented_parameters_match_the_signature(name):
    obj = API[name]
    if own_docstring(obj) is None:
        pytest.skip("no docstring (reported by test_public_callable_has_a_docstring)")
    problem = parameter_mismatch(obj)
    assert problem is None, f"{name}: {problem}"


def test_the_parameter_parser():
    doc = inspect.cleandoc(
        """Summary.

        Parameters
        ----------
        n_latent, n_hidden : int
            Sizes.
        *args
            Passed on.
        flag
            A flag: with a colon in its text
            that runs over two lines.

        Returns
        -------
        out
            Not a parameter.
        """
    )
    assert documented_parameters(doc) == ["n_latent", "n_hidden", "args", "flag"]
    assert documented_parameters("Summary only.") is None
    continued = inspect.cleandoc(
        """Summary.

        Parameters
        ----------
        a, b,
        c
            Three names over two lines.
        """
    )
    assert "," in documented_parameters(continued)

    def f(n_latent, n_hidden, *args, flag=False, other=1, **kwargs):
        """Summary.

        Parameters
        ----------
        n_latent, n_hidden
            Sizes.
        kwargs
            Passed on.
        ghost
            Not a parameter.
        """

    assert parameter_mismatch(f) == ("documented but not in the signature: ghost; "
                                     "in the signature but not documented: flag, other")

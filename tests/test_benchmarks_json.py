"""The benchmark scripts label what their JSON does not measure: a figure typed into a script (an
scvi-tools run made earlier, a paper's value) may sit only under ``benchmarks/_common.NOT_MEASURED``.

Read from the scripts' syntax trees (nothing is run). What is checked: every dict display
(``{...}``) and every item assignment (``d[key] = ...``) in ``benchmarks/*.py``; a *figure* is a number
literal (``0.76``, ``-481.6``, ``1 / 32``, ``float(0.5)``: literals, arithmetic and ``float`` / ``int`` /
``round`` of literals only), in a list or tuple too, or a string that is only a number
(``"0.574 +- 0.043"``). Computed values (``round(seconds, 2)``, ``x[-1]``, ``n / 2``, ``a.mean(0)``) are
not figures; item assignments count only with a string key (``indptr[0] = 0`` fills an array). Not
checked: numbers inside prose strings, and JSON built another way (``dict(key=0.5)``, ``json.dumps`` of
a list) -- the scripts build theirs from dict displays and item assignments, and their ``dict(...)``
calls are keyword arguments for training, not results.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))
NUMBER_CALLS = {"float", "int", "round", "abs", "Decimal", "Fraction"}
NUMBER = r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?"
NUMBER_STRING = re.compile(rf"^\s*{NUMBER}(\s*(\+-|±|\+/-)\s*{NUMBER})?\s*%?\s*$", re.I)


def not_measured_key() -> str:
    """The value of ``NOT_MEASURED`` in benchmarks/_common.py."""
    for node in ast.parse((BENCHMARKS / "_common.py").read_text()).body:
        names = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and names == ["NOT_MEASURED"]:
            return node.value.value
    raise AssertionError("benchmarks/_common.py defines no NOT_MEASURED")


KEY = not_measured_key()


def is_key(node: ast.AST | None) -> bool:
    return (isinstance(node, ast.Name) and node.id == "NOT_MEASURED") or (
        isinstance(node, ast.Constant) and node.value == KEY
    )


def is_figure(node: ast.AST) -> bool:
    """A number typed into the script (or an expression of such numbers only)."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            return False
        if isinstance(node.value, (int, float)):
            return True
        return isinstance(node.value, str) and bool(NUMBER_STRING.match(node.value))
    if isinstance(node, ast.UnaryOp):
        return is_figure(node.operand)
    if isinstance(node, ast.BinOp):
        return is_figure(node.left) and is_figure(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in NUMBER_CALLS:
        args = [*node.args, *(k.value for k in node.keywords)]
        return bool(args) and all(is_figure(a) for a in args)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return any(is_figure(e) for e in node.elts)
    return False


def unlabelled_figures(source: str) -> list[str]:
    """``line: key = value`` of every figure in a dict display or item assignment outside the key."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if is_key(key):
                    continue  # the one place for figures not measured by the run
                if is_figure(value):
                    name = ast.unparse(key) if key else "**"
                    found.append(f"{value.lineno}: {name} = {ast.unparse(value)}")
                visit(value)
            return
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Subscript) for t in node.targets):
            # a results dict's item: a string key (``summary["x"]``, ``summary[f"{k}_mean"]``) or the key
            # itself; an integer index (``indptr[0] = 0``) writes an array, not JSON
            targets = [t for t in node.targets if isinstance(t, ast.Subscript) and (
                is_key(t.slice) or isinstance(t.slice, ast.JoinedStr)
                or (isinstance(t.slice, ast.Constant) and isinstance(t.slice.value, str)))]
            if any(is_key(t.slice) for t in targets):
                return
            if targets and is_figure(node.value):
                found.append(f"{node.lineno}: {ast.unparse(targets[0])} = {ast.unparse(node.value)}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_a_benchmark_writes_figures_it_did_not_measure_only_under_the_not_measured_key(script):
    found = unlabelled_figures(script.read_text())
    assert not found, (
        f"{script.name}: literal figures in a results dict outside {KEY!r} (put what this run does not "
        f"measure there, as {{'value': ..., 'source': ...}}):\n" + "\n".join(found)
    )


def test_the_check_catches_what_it_should_and_passes_what_it_should():
    # the kinds of lines the scripts had before the key existed
    assert len(unlabelled_figures('s = {"reference_scvi_tools": {"ari": 0.76, "ll": -481.6}}')) == 2
    assert unlabelled_figures('s = {"paper": {"sigma": 1 / 32}}') == ["1: 'sigma' = 1 / 32"]
    assert len(unlabelled_figures('s["ref"] = {"accuracy": [0.754, 0.779]}')) == 1
    assert len(unlabelled_figures('s = {"ari": "0.574 +- 0.043", "n": float(2)}')) == 2
    assert len(unlabelled_figures('s["ilisi_max_possible"] = 2')) == 1
    assert len(unlabelled_figures('s[f"{name}_reference"] = -662.79')) == 1
    # under the key, or computed, or prose: allowed
    assert unlabelled_figures('s = {NOT_MEASURED: {"value": {"ari": 0.76}, "source": "a paper"}}') == []
    assert unlabelled_figures(f's = {{"{KEY}": {{"value": -655.85, "source": "x"}}}}') == []
    assert unlabelled_figures('s[NOT_MEASURED] = {"value": [0.75, 1.0], "source": "x"}') == []
    assert unlabelled_figures(
        's = {"t": round(t, 2), "last": h[-1], "half": n / 2, "ok": True, "data": "2,000 genes, 5 %"}'
    ) == []
    not_results = 'indptr[0] = 0\nrows[t] = x.mean(0) - y.mean(0)\nopts = {"m": dict(lr=1.0)}'
    assert unlabelled_figures(not_results) == []


def test_the_benchmarks_with_references_put_them_under_the_key():
    using = {p.name for p in SCRIPTS if any(is_key(n) for n in ast.walk(ast.parse(p.read_text())))}
    assert {"scvi_ifnb.py", "scvi_heldout.py", "capvi_ifnb.py", "cellassign_speed.py",
            "cellassign_cellbench.py", "scanvi_labels.py", "etm_nmf.py"} <= using

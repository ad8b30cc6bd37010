"""The module paths of the flat layout (``reftgraph.compile``, ``reftgraph.runtime``, ...) still
import, as the very modules that hold their contents now, each with one DeprecationWarning
naming the new path; the package's own doctests use the new paths."""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys

import reftgraph as rg

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reftgraph"
OLD = dict(rg._OLD_PATHS, **{"compile.plan": "engine.plan"})  # and a path below an old one
SHORT = {path for path in OLD if rg._is_public(path)}   # under an exported module: rg.patching, rg.das, ...

# Runs in a fresh interpreter, so that no old path was imported before: prints what each
# step warned and which module each old path imports.
SCRIPT = r"""
import importlib, json, sys, warnings

def record(code):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "<caller>", "exec"), {})
    return [{"category": w.category.__name__, "message": str(w.message), "filename": w.filename}
            for w in caught if "old module path" in str(w.message)]

old = json.loads(sys.argv[1])
steps = {"package": record("import reftgraph as rg\nfor name in rg.__all__: getattr(rg, name)")}
steps["from"] = record("from reftgraph.runtime import forward, tokenize\nfrom reftgraph.ops.rotate import Rotate")
steps["attribute"] = record("import reftgraph as rg\nrg.compile.compile_graph, rg.sites.Site, rg.compile, rg.sites")
same = {}
for path, new in old.items():
    steps[path] = record(f"import reftgraph.{path}\nimport reftgraph.{path}")
    same[path] = sys.modules[f"reftgraph.{path}"] is importlib.import_module(f"reftgraph.{new}")
steps["again"] = record("\n".join(f"import reftgraph.{path}" for path in old) + "\nimport reftgraph as rg\nrg.ops, rg.io")
print(json.dumps({"steps": steps, "same": same}))
"""


def _run_fresh() -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(OLD)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_each_old_path_imports_its_new_module_and_warns_once_naming_it():
    out = _run_fresh()
    steps = out["steps"]
    assert out["same"] == {path: True for path in OLD}
    assert steps["package"] == [], "the package's own names must not warn"
    warned = [w for step in steps.values() for w in step]
    assert all(w["category"] == "DeprecationWarning" for w in warned)
    assert all(w["filename"] == "<caller>" for w in warned), "the warning points at the importing line"
    for path, new in OLD.items():
        mine = [w["message"] for w in warned if w["message"].startswith(f"reftgraph.{path} is an old module path")]
        assert len(mine) == (0 if path in SHORT else 1), (path, mine)
        assert path in SHORT or f"use reftgraph.{new}" in mine[0], mine[0]
    assert {"patching", "patching.sweeps", "das", "data", "models", "memorisation"} <= SHORT
    assert not SHORT & {"compile", "runtime", "ops", "sites", "io", "compile.plan"}
    assert {w["message"].split()[0] for w in steps["from"]} == {"reftgraph.runtime", "reftgraph.ops",
                                                               "reftgraph.ops.rotate"}
    assert {w["message"].split()[0] for w in steps["attribute"]} == {"reftgraph.compile", "reftgraph.sites"}
    assert steps["again"] == []


def test_old_paths_are_the_same_modules_in_this_process():
    import reftgraph.compile
    import reftgraph.runtime
    from reftgraph.compile import compile_graph
    from reftgraph.patching.data import Counterfactual

    assert reftgraph.compile is rg.engine and reftgraph.runtime is sys.modules["reftgraph.engine.run"]
    assert compile_graph is rg.engine.compile_graph
    assert reftgraph.compile.__spec__.name == "reftgraph.engine" and reftgraph.compile.__name__ == "reftgraph.engine"
    from reftgraph.methods.patching.data import Counterfactual as before
    from reftgraph.training.counterfactual import Counterfactual as now
    assert Counterfactual is before is now is rg.patching.Counterfactual


ATTRIBUTES = sorted(name for name in rg._OLD_PATHS if "." not in name and name not in rg.__all__)
IMPORT = re.compile(r"(?:\bfrom|\bimport)\s+reftgraph\.([\w.]+)")
ATTRIBUTE = re.compile(r"\b(?:rg|reftgraph)\.(" + "|".join(ATTRIBUTES) + r")\b")


def old_paths_in(line: str) -> list:
    """The old paths a doctest line imports or reads as an attribute of the package."""
    found = [path for path in IMPORT.findall(line) if rg._new_path(path) is not None]
    return found + ATTRIBUTE.findall(IMPORT.sub("", line))


def doctest_lines(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for line in (ast.get_docstring(node, clean=False) or "").splitlines():
                if line.strip().startswith((">>>", "...")):
                    yield line.strip()


def test_the_scan_finds_old_paths():
    assert old_paths_in(">>> from reftgraph.compile import compile_graph") == ["compile"]
    assert old_paths_in(">>> import reftgraph.ops.rotate as r") == ["ops.rotate"]
    assert old_paths_in(">>> rg.runtime.forward") == ["runtime"]
    assert old_paths_in(">>> from reftgraph.engine.plan import compile_graph") == []
    assert old_paths_in(">>> data = rg.patching.Counterfactual(['a'], ['b'])") == []      # a public name
    assert old_paths_in(">>> from reftgraph.training import State") == []


def test_no_doctest_in_the_package_uses_an_old_path():
    found = [f"{path.relative_to(ROOT)}: {line}  ({', '.join(old)})"
             for path in sorted(PACKAGE.rglob("*.py")) for line in doctest_lines(path)
             if (old := old_paths_in(line))]
    assert not found, "doctests on old module paths:\n" + "\n".join(found)

"""The package's shape: layers that import one way, no cycles, no private names across
modules, every op registered and round-tripping, one loop and one engine."""

from __future__ import annotations

import ast
import inspect
import re
import pathlib
import pkgutil
import importlib

import networkx as nx
import pytest
import torch

import reftgraph as rg
from reftgraph.core.ops import OPS, Op

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reftgraph"


def test_import_linter_contracts_are_kept():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_no_import_cycles_between_modules():
    import grimp

    graph = grimp.build_graph("reftgraph")
    edges = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("reftgraph"):
                edges.add_edge(module, imported)
    assert nx.is_directed_acyclic_graph(edges), f"import cycles: {list(nx.simple_cycles(edges))[:5]}"


def _modules():
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(rg.__path__, "reftgraph.")
            if not m.name.endswith("__main__")]


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("reftgraph")):
                offenders += [f"{path.relative_to(ROOT)}: {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not offenders, offenders


def _package_ops() -> set:
    found = set()
    for module in _modules():
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Op) and obj.__module__.startswith("reftgraph") \
                    and not obj.__name__.startswith("_"):  # internal ops of a method, never saved
                found.add(obj)
    return found


# one instance of every op the package defines (a new op without an example fails below)
def _trained_dictionary():
    sae = rg.Dictionary(32, 64, activation="jumprelu", name="res1", seed=3)
    sae.W_dec.mul_(1.5)   # not the seed's weights: the file must carry them
    return sae


EXAMPLES = {
    "Dictionary": _trained_dictionary,
    "Patch": lambda: rg.Patch("source"),
    "Add": lambda: rg.Add(torch.randn(32), scale=2.0),
    "Set": lambda: rg.Set(torch.randn(32), mask=torch.rand(1, 1, 32) > 0.5),
    "Ablate": lambda: rg.Ablate("mean", value=torch.randn(32)),
    "Collect": lambda: rg.Collect(),
    "Classify": lambda: rg.Classify(width=32, n_classes=3),
    "Rotate": lambda: rg.Rotate(width=32, k=4, source="source", seed=1),
    "Without": lambda: rg.core.ops.Without(rg.Add(torch.randn(32)), directions=torch.eye(32)[:2]),
    **{name: (lambda cls=cls: cls(width=32, rank=3, seed=2)) for name, cls in rg.core.ops.REFT_OPS.items()},
}


def test_every_op_of_the_package_is_registered_and_has_an_example():
    ops = {cls for cls in _package_ops() if cls is not Op and cls is not rg.ReFT}
    assert {cls.__name__ for cls in ops} <= set(OPS), "unregistered ops"
    assert all(OPS[cls.__name__] is cls for cls in ops)
    assert {cls.__name__ for cls in ops} == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_op_round_trips_through_save_and_load(name, tmp_path):
    lm = rg.models.tiny("llama")
    op = EXAMPLES[name]()
    for p in op.parameters():  # non-trivial weights, so a load that drops one shows
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.1)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), op, name="op")
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(), name="seen")
    g.save(tmp_path / "g", model=lm)
    loaded = rg.load_graph(tmp_path / "g", model=lm)
    assert type(loaded["op"].op) is type(op) and loaded["op"].op.config() == op.config()
    a, b = op.state_dict(), loaded["op"].op.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sources = {"source": ["xyz", "uvw"]} if op.reads_stream else None
    want, got = g.run(lm, ["abc", "de"], sources=sources), loaded.run(lm, ["abc", "de"], sources=sources)
    assert torch.equal(want.logits, got.logits) and torch.equal(want["seen"], got["seen"])


def test_one_loop_and_one_engine():
    """ReFT training, DAS and memorisation go through fit; sweeps and runs through forward."""
    import reftgraph.methods.das as das
    import reftgraph.methods.memorisation as memorisation
    import reftgraph.methods.patching.sweeps as sweeps
    import reftgraph.training.supervised as train

    for module in (das, memorisation, train):
        source = inspect.getsource(module)
        assert "fit(" in source and ".backward(" not in source and "optim." not in source, module.__name__
    source = inspect.getsource(sweeps)
    assert "forward(" in source and ".trace(" not in source and ".skip(" not in source
    for module in _modules():   # nnsight's skip (blocks not run) is the engine's trace's alone
        if module.__name__ not in ("reftgraph.engine.traces", "reftgraph.engine.prefix"):
            assert not re.search(r"(?<!cache)\.skip\(", inspect.getsource(module)), module.__name__


ABOVE_THE_ENGINE = ("files", "training", "methods", "datasets", "experiments", "cli")


def test_layers_above_use_the_engines_public_api_only():
    """Above the engine, code imports the names of ``reftgraph.engine.API`` from the package
    itself: never a submodule (``engine.run``, ``engine.bind``), never another name."""
    offenders = []
    for layer in ABOVE_THE_ENGINE:
        for path in (PACKAGE / layer).rglob("*.py"):
            depth = len(path.relative_to(PACKAGE).parts)   # how many dots reach the package
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                module = ("reftgraph." + (node.module or "")) if node.level == depth else (node.module or "")
                if node.level and node.level != depth:
                    continue   # within the layer
                if module.startswith("reftgraph.engine."):
                    offenders.append(f"{path.relative_to(ROOT)}: imports {module}")
                elif module == "reftgraph.engine":
                    offenders += [f"{path.relative_to(ROOT)}: {a.name} is not in reftgraph.engine.API"
                                  for a in node.names if a.name not in rg.engine.API]
    assert not offenders, offenders

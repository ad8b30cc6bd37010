"""Save and load graphs as a directory: ``graph.json`` + ``weights.safetensors``. No pickle.

>>> import tempfile, torch, reftgraph as rg
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=1, positions="f1+l1"), rg.LoReFT(width=32, rank=2), name="r")
>>> d = tempfile.mkdtemp() + "/g"
>>> _ = rg.save(g, d)
>>> rg.load_graph(d)["r"].op.rank
2

Writes are atomic: everything goes to a temporary folder that is renamed into place, so
an interrupted save leaves the previous graph (or nothing), never half a graph.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from .graph import Graph, Node
from .ops import OPS
from .sites import Site, SiteError

FORMAT = "reftgraph-graph"
VERSION = 1


def _model_info(model) -> dict:
    a = model.arch
    return {"name": model.name, "family": a.family.name, "d_model": a.d_model, "n_layers": a.n_layers}


def unique_ops(graph: Graph) -> list:
    """The graph's ops, each once, in order of first use: op ``i`` is saved as ``op{i}.*``."""
    return list({id(n.op): n.op for n in graph.nodes}.values())


def graph_state(graph: Graph, model=None) -> tuple[dict, dict]:
    """``(spec, tensors)``: the JSON-able description and the weights (shared ops once)."""
    ops = unique_ops(graph)
    index = {id(op): i for i, op in enumerate(ops)}
    tensors = {f"op{i}.{name}": t.detach().cpu().contiguous()
               for i, op in enumerate(ops) for name, t in op.state_dict().items()}
    nodes = [{"name": n.name, "site": n.site.to_dict(), "stream": n.stream, "op": index[id(n.op)]}
             for n in graph.nodes]
    spec = {"format": FORMAT, "version": VERSION, "model": None if model is None else _model_info(model),
            "ops": [{"type": type(op).__name__, "config": op.config()} for op in ops], "nodes": nodes}
    return spec, tensors


def load_weights(graph: Graph, tensors: dict) -> None:
    """Load ``op{i}.*`` tensors (as :func:`graph_state` writes them) into the graph's ops."""
    for i, op in enumerate(unique_ops(graph)):
        op.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"op{i}.")})


def build_graph(spec: dict, tensors: dict) -> Graph:
    """Rebuild a graph from :func:`graph_state`'s output."""
    if spec.get("format") != FORMAT:
        raise SiteError(f"not a reftgraph graph (format {spec.get('format')!r})")
    if spec.get("version", 0) > VERSION:
        raise SiteError(f"graph format version {spec['version']} is newer than this reftgraph ({VERSION})")
    ops = []
    for i, entry in enumerate(spec["ops"]):
        cls = OPS.get(entry["type"])
        if cls is None:
            raise SiteError(f"unknown op type {entry['type']!r}; known: {sorted(OPS)}")
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"op{i}.")}
        params = inspect.signature(cls).parameters
        kwargs = dict(entry["config"])
        kwargs.update({k: v for k, v in state.items() if k in params})
        op = cls(**kwargs)
        missing, unexpected = op.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SiteError(f"op {i} ({entry['type']}): weights missing {missing}, unexpected {unexpected}")
        ops.append(op)
    return Graph(Node(n["name"], Site.from_dict(n["site"]), ops[n["op"]], n["stream"]) for n in spec["nodes"])


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "g")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` by renames,
    on any failure it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_graph(folder: Path, graph: Graph, model=None) -> None:
    """``graph.json`` and ``weights.safetensors`` into an existing folder."""
    spec, tensors = graph_state(graph, model)
    (folder / "graph.json").write_text(json.dumps(spec, indent=1))
    save_file(tensors, str(folder / "weights.safetensors"), metadata={"format": FORMAT})


def save(graph: Graph, path, model=None) -> Path:
    """Write ``graph`` to the directory ``path`` (replacing it atomically)."""
    with atomic_dir(path) as tmp:
        write_graph(tmp, graph, model)
    return Path(path)


def load_graph(path, model=None) -> Graph:
    """Read a saved graph; with ``model``, check it fits (family, width, every site)."""
    path = Path(path)
    for name in ("graph.json", "weights.safetensors"):
        if not (path / name).is_file():
            raise SiteError(f"{path} is not a saved graph: {name} is missing")
    try:
        spec = json.loads((path / "graph.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SiteError(f"{path / 'graph.json'} is not valid JSON ({e})") from None
    try:
        tensors = load_file(str(path / "weights.safetensors"))
    except Exception as e:  # noqa: BLE001 - truncated or not a safetensors file
        raise SiteError(f"{path / 'weights.safetensors'} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(spec, dict):
        raise SiteError(f"{path / 'graph.json'}: expected a JSON object")
    graph = build_graph(spec, tensors)
    if model is not None:
        check_fits(graph, spec.get("model"), model)
    return graph


def check_fits(graph: Graph, saved: dict, model) -> None:
    from .compile import compile_graph

    if saved:
        now = _model_info(model)
        for key in ("family", "d_model"):
            if saved[key] != now[key]:
                raise SiteError(f"the graph was saved for {saved['name']!r} ({key} {saved[key]}), "
                                f"not {now['name']!r} ({key} {now[key]})")
    compile_graph(graph, model.arch)

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


def graph_state(graph: Graph, model=None) -> tuple[dict, dict]:
    """``(spec, tensors)``: the JSON-able description and the weights (shared ops once)."""
    op_ids, ops, tensors = {}, [], {}
    nodes = []
    for node in graph.nodes:
        key = id(node.op)
        if key not in op_ids:
            op_ids[key] = len(ops)
            ops.append({"type": type(node.op).__name__, "config": node.op.config()})
            for name, t in node.op.state_dict().items():
                tensors[f"op{op_ids[key]}.{name}"] = t.detach().cpu().contiguous()
        nodes.append({"name": node.name, "site": node.site.to_dict(), "stream": node.stream, "op": op_ids[key]})
    spec = {"format": FORMAT, "version": VERSION, "model": None if model is None else _model_info(model),
            "ops": ops, "nodes": nodes}
    return spec, tensors


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


def save(graph: Graph, path, model=None) -> Path:
    """Write ``graph`` to the directory ``path`` (replacing it atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec, tensors = graph_state(graph, model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "graph.json").write_text(json.dumps(spec, indent=1))
        save_file(tensors, str(tmp / "weights.safetensors"), metadata={"format": FORMAT})
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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

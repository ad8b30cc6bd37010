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
import glob
import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.graph import Graph, Node
from ..core.ops import OPS
from ..core.sites import Site
from ..errors import GraphFileError, SiteError

__all__ = ["save", "load_graph", "graph_state", "build_graph", "load_weights", "unique_ops"]

FORMAT = "reftgraph-graph"
VERSION = 1


def _model_info(model) -> dict:
    a = model.arch
    return {"name": model.name, "family": a.family.name, "d_model": a.d_model, "n_layers": a.n_layers}


def unique_ops(graph: Graph) -> list:
    """The graph's ops, each once, in order of first use: op ``i`` is saved as ``op{i}.*``.

    >>> import reftgraph as rg
    >>> g = rg.reft_graph(rg.models.tiny("llama"), layers=[0, 1], positions="last", share_layers=True)
    >>> len(g), len(unique_ops(g))        # one LoReFT shared by both layers
    (2, 1)
    """
    return list({id(n.op): n.op for n in graph.nodes}.values())


def graph_state(graph: Graph, model=None) -> tuple[dict, dict]:
    """``(spec, tensors)``: the JSON-able description and the weights (shared ops once).

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), rg.LoReFT(width=32, rank=2), name="r")
    >>> spec, tensors = graph_state(g)
    >>> spec["ops"][0]["type"], spec["nodes"][0]["site"]["positions"], sorted(tensors)
    ('LoReFT', 'last', ['op0.bias', 'op0.rotate', 'op0.weight'])
    """
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
    """Load ``op{i}.*`` tensors (as :func:`graph_state` writes them) into the graph's ops.

    >>> import reftgraph as rg
    >>> a, b = rg.Graph(), rg.Graph()
    >>> _ = a.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2, seed=1))
    >>> _ = b.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2, seed=2))
    >>> load_weights(b, graph_state(a)[1])
    >>> torch.equal(a.nodes[0].op.rotate, b.nodes[0].op.rotate)
    True
    """
    for i, op in enumerate(unique_ops(graph)):
        op.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"op{i}.")})


# -- reading: every field checked, only registered ops built ------------------------------

SPEC_KEYS = ("format", "version", "model", "ops", "nodes")
MODEL_KEYS = {"name": str, "family": str, "d_model": int, "n_layers": int}
NODE_KEYS = ("name", "site", "stream", "op")
SCALARS = (type(None), bool, int, float, str)
MAX_JSON_BYTES = 64 * 2**20


def _keys(d, keys, where: str) -> None:
    if not isinstance(d, dict) or set(d) != set(keys):
        got = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
        raise GraphFileError(f"{where} must be a mapping with exactly the keys {list(keys)}, got {got}")


def _int(value, where: str, low: int = 0, high: int = 2**63 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise GraphFileError(f"{where} must be an int in {low}..{high}, got {str(value)[:50]}")
    return value


def _check_spec(spec) -> None:
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise GraphFileError(f"not a reftgraph graph (format {str(got)[:50]!r}, expected {FORMAT!r})")
    version = _int(spec.get("version"), "version", 1)
    if version > VERSION:
        raise GraphFileError(f"graph format version {version} is newer than this reftgraph ({VERSION})")
    _keys(spec, SPEC_KEYS, "graph.json")
    if spec["model"] is not None:
        _keys(spec["model"], MODEL_KEYS, "graph.json 'model'")
        for key, kind in MODEL_KEYS.items():
            if not isinstance(spec["model"][key], kind) or isinstance(spec["model"][key], bool):
                raise GraphFileError(f"graph.json 'model': {key} must be {'an int' if kind is int else 'a string'}")
    for key in ("ops", "nodes"):
        if not isinstance(spec[key], list):
            raise GraphFileError(f"graph.json '{key}' must be a list, got {type(spec[key]).__name__}")


def _op_tensors(tensors: dict, n_ops: int) -> list:
    """``tensors`` grouped per op (``op{i}.name``); any other name is refused."""
    state = [{} for _ in range(n_ops)]
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        i = index[2:]
        if not (index.startswith("op") and i.isdigit() and str(int(i)) == i and int(i) < n_ops and name):
            raise GraphFileError(f"unexpected tensor {key!r} in weights.safetensors: tensors are named op<i>.<name> "
                            f"for the graph's {n_ops} ops (op0..op{n_ops - 1})")
        state[int(i)][name] = value
    return state


def _config(cls, entry: dict, state: dict, where: str) -> dict:
    """Constructor kwargs: JSON scalars (a site for ``site``) for known parameters, plus the
    tensors that are constructor arguments (e.g. ``Add``'s vector)."""
    params = {k: p for k, p in inspect.signature(cls).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}  # Collect(*args, **kwargs) takes none
    kwargs = {}
    for key, value in entry["config"].items():
        if key not in params:
            raise GraphFileError(f"{where}: unknown config key {str(key)[:50]!r}; {cls.__name__} takes "
                            f"{[k for k in params if k not in state]}")
        if key == "site" and isinstance(value, dict):
            try:
                value = Site.from_dict(value)
            except SiteError as e:
                raise GraphFileError(f"{where}: config 'site': {e}") from None
        elif isinstance(value, dict) and set(value) == {"type", "config"}:  # an op inside the op
            value = _build_op(f"{where}.{key}", value, {k[len(key) + 1:]: v for k, v in state.items()
                                                       if k.startswith(key + ".")})
        elif not isinstance(value, SCALARS):
            raise GraphFileError(f"{where}: config {key!r} must be a number, string, bool or null, "
                            f"got {type(value).__name__}")
        if isinstance(value, bool) != isinstance(params[key].default, bool):
            raise GraphFileError(f"{where}: config {key!r} = {value!r} has the wrong type")
        if isinstance(value, float) and not math.isfinite(value) or isinstance(value, int) and abs(value) >= 2**63:
            raise GraphFileError(f"{where}: config {key!r} = {str(value)[:50]} is out of range")
        kwargs[key] = value
    kwargs.update({k: v for k, v in state.items() if k in params and k not in kwargs})
    missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise GraphFileError(f"{where}: missing {missing} (config or tensors op<i>.{missing[0]})")
    return kwargs


def _build_op(i, entry, state: dict):
    _keys(entry, ("type", "config"), f"graph.json op {i}")
    cls = OPS.get(entry["type"]) if isinstance(entry["type"], str) else None
    if cls is None or not isinstance(entry["config"], dict):
        raise GraphFileError(f"op {i}: unknown op type {str(entry['type'])[:50]!r} or config not a mapping; "
                        f"registered op types: {sorted(OPS)}")
    where = f"op {i} ({entry['type']})"
    for name, t in state.items():
        if not t.is_floating_point():
            raise GraphFileError(f"{where}: tensor op{i}.{name} has dtype {t.dtype}; ops hold floating-point tensors")
        if not bool(torch.isfinite(t).all()):
            raise GraphFileError(f"{where}: tensor op{i}.{name} holds NaN or infinite values")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:
        raise GraphFileError(f"{where}: tensors of several dtypes {sorted(map(str, dtypes))}; one op has one dtype")
    kwargs = _config(cls, entry, state, where)
    try:
        with torch.device("meta"):  # shapes only: a crafted size allocates nothing
            expected = {k: tuple(v.shape) for k, v in cls(**kwargs).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - the op's own argument checks
        raise GraphFileError(f"{where}: cannot build from config {entry['config']}: {e}") from None
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GraphFileError(f"{where}: weights missing {[f'op{i}.{k}' for k in missing]}, "
                        f"unexpected {[f'op{i}.{k}' for k in unexpected]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise GraphFileError(f"{where}: tensor op{i}.{name} has shape {list(state[name].shape)}, "
                            f"config {entry['config']} needs {list(shape)}")
    op = cls(**kwargs)
    if dtypes:
        op.to(dtypes.pop())
    op.load_state_dict(state)
    return op


def build_graph(spec: dict, tensors: dict) -> Graph:
    """Rebuild a graph from :func:`graph_state`'s output, checking every field.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("head_out", layer=1, head=2), rg.Patch("source"), name="p")
    >>> print(build_graph(*graph_state(g)))
    Graph(1 nodes, 0 trainable parameters)
      p: Patch head_out[1].h2 pos=all

    Only registered op types are built, from JSON scalars and tensors of the shapes they need.
    """
    _check_spec(spec)
    state = _op_tensors(tensors, len(spec["ops"]))
    ops = [_build_op(i, entry, s) for i, (entry, s) in enumerate(zip(spec["ops"], state))]
    nodes = []
    try:  # a node that does not make a valid site or graph is a fault of the file
        for j, n in enumerate(spec["nodes"]):
            _keys(n, NODE_KEYS, f"graph.json node {j}")
            i = _int(n["op"], f"node {str(n['name'])[:50]!r}: op index", 0, len(ops) - 1)
            nodes.append(Node(n["name"], Site.from_dict(n["site"]), ops[i], n["stream"]))
        unused = sorted(set(range(len(ops))) - {spec["nodes"][j]["op"] for j in range(len(nodes))})
        if unused:
            raise GraphFileError(f"graph.json: ops {unused} are not used by any node")
        return Graph(nodes)
    except SiteError as e:
        raise GraphFileError(str(e)) from None


# -- writing: a temporary folder renamed into place -----------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path, kind: str) -> list:
    """``kind`` ('tmp' or 'old') folders beside ``path`` left by processes that no longer run."""
    if os.name != "posix" or not path.parent.is_dir():
        return []
    prefix = f".{path.name}.{kind}-"
    found = [d for d in path.parent.glob(glob.escape(prefix) + "*")
             if d.name[len(prefix):].split("-")[0].isdigit() and not _alive(int(d.name[len(prefix):].split("-")[0]))]
    return sorted(found, key=lambda d: d.stat().st_mtime)


def _recover(path) -> None:
    """Clean up after a save that was killed: if it had moved the previous graph aside but
    not yet renamed the new one into place, the previous one is put back; temporary
    folders of dead processes are removed. Called by :func:`save` and :func:`load_graph`."""
    path = Path(path)
    old = _leftovers(path, "old")
    if not path.exists() and old and (old[-1] / "g").exists():
        os.replace(old[-1] / "g", path)
    for d in old + _leftovers(path, "tmp"):
        shutil.rmtree(d, ignore_errors=True)


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
        os.replace(path, old / "g")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / "g", path)  # put the previous graph back
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` by renames,
    on any failure it is removed and ``path`` is left as it was.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out"
    >>> with atomic_dir(target) as tmp:
    ...     _ = (tmp / "a.txt").write_text("done")
    >>> (target / "a.txt").read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_graph(folder: Path, graph: Graph, model=None) -> None:
    """``graph.json`` and ``weights.safetensors`` into an existing folder.

    >>> import os, tempfile, reftgraph as rg
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_graph(folder, rg.Graph())
    >>> sorted(os.listdir(folder))
    ['graph.json', 'weights.safetensors']
    """
    spec, tensors = graph_state(graph, model)
    (folder / "graph.json").write_text(json.dumps(spec, indent=1))
    save_file(tensors, str(folder / "weights.safetensors"), metadata={"format": FORMAT})


def save(graph: Graph, path, model=None) -> Path:
    """Write ``graph`` to the directory ``path`` (``graph.json`` + ``weights.safetensors``).

    >>> import json, tempfile, reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1), rg.Add(torch.ones(32), scale=2.0), name="steer")
    >>> path = save(g, tempfile.mkdtemp() + "/steer", model=rg.models.tiny("llama"))
    >>> json.loads((path / "graph.json").read_text())["model"]
    {'name': 'tiny-llama', 'family': 'llama', 'd_model': 32, 'n_layers': 2}

    A saved graph already at ``path`` is replaced atomically; any other file or non-empty
    folder at ``path`` is refused, never overwritten.
    """
    path = Path(path)
    _recover(path)
    if path.is_symlink() or path.exists() and not (
            path.is_dir() and ((path / "graph.json").is_file() or not any(path.iterdir()))):
        raise GraphFileError(f"{path} exists and is not a saved graph (no graph.json): not replacing it; "
                        "pick another path or remove it")
    with atomic_dir(path) as tmp:
        write_graph(tmp, graph, model)
    return path


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_graph(path, model=None) -> Graph:
    """Read a saved graph; with ``model``, check it fits (family, width, every site).

    >>> import tempfile, reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1), rg.Add(torch.ones(32), scale=2.0), name="steer")
    >>> path = save(g, tempfile.mkdtemp() + "/steer")
    >>> load_graph(path, model=rg.models.tiny("llama"))["steer"].op.scale
    2.0

    What it accepts and refuses: docs/loading.md.
    """
    path = Path(path)
    _recover(path)
    for name in ("graph.json", "weights.safetensors"):
        if not (path / name).is_file():
            raise GraphFileError(f"{path} is not a saved graph: {name} is missing")
    size = (path / "graph.json").stat().st_size
    if size > MAX_JSON_BYTES:
        raise GraphFileError(f"{path / 'graph.json'} is {size} bytes; a graph description is at most {MAX_JSON_BYTES}")
    try:
        spec = json.loads((path / "graph.json").read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise GraphFileError(f"{path / 'graph.json'} is not valid JSON ({str(e)[:200]})") from None
    try:
        tensors = load_file(str(path / "weights.safetensors"))
    except Exception as e:  # noqa: BLE001 - truncated or not a safetensors file
        raise GraphFileError(f"{path / 'weights.safetensors'} cannot be read ({type(e).__name__}: {e})") from None
    graph = build_graph(spec, tensors)
    if model is not None:
        check_fits(graph, spec.get("model"), model)
    return graph


def check_fits(graph: Graph, saved: dict, model) -> None:
    """Refuse a graph saved for another model family or width, or whose sites do not fit ``model``."""
    from ..engine.plan import compile_graph

    if saved:
        now = _model_info(model)
        for key in ("family", "d_model"):
            if saved[key] != now[key]:
                raise GraphFileError(f"the graph was saved for {saved['name']!r} ({key} {saved[key]}), "
                                f"not {now['name']!r} ({key} {now[key]})")
    compile_graph(graph, model.arch)

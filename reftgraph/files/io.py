"""Save and load graphs: ``graph.json`` + ``weights.safetensors``, in versions of a folder. No pickle.

>>> import tempfile, torch, reftgraph as rg
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=1, positions="f1+l1"), rg.LoReFT(width=32, rank=2), name="r")
>>> d = tempfile.mkdtemp() + "/g"
>>> _ = rg.save(g, d)
>>> rg.load_graph(d)["r"].op.rank
2

``save`` refuses, before it writes anything, every graph that ``load_graph`` would refuse.
Replacing a saved graph is atomic for readers: they see the previous graph or the new
one, whole (:mod:`reftgraph.files.versions`). ``load_graph`` checks graph.json and the
names, dtypes and shapes in the weights' header before it reads any tensor. What is
accepted and refused: docs/loading.md.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.graph import Graph, Node
from ..core.ops import OPS, Op
from ..core.sites import Site
from ..errors import GraphFileError
from .header import MAX_TENSORS, parse_json, read_header, read_tensors
from .versions import atomic_dir, current_folder, write_version

__all__ = ["save", "load_graph", "graph_state", "build_graph", "load_weights", "unique_ops", "write_graph",
           "atomic_dir", "current_folder"]

FORMAT = "reftgraph-graph"
VERSION = 2                   # 2: "shared" names tensors stored once for several ops (1: no such key)
MAX_JSON_BYTES = 64 * 2**20   # graph.json
MAX_NODES = 10_000            # nodes of a saved graph (and so ops: each is used by a node)
MAX_OP_DEPTH = 8              # ops inside ops' configs (Without(Without(op)) is depth 2)
MAX_TRIES = 10                # reads of a graph replaced meanwhile, before giving up
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _tensors(ops: list) -> tuple[dict, dict]:
    """``(tensors, shared)``: each op's tensors as ``op{i}.{name}`` (as the ops hold them); a
    tensor several ops hold (a dictionary they all use as basis) is in ``tensors`` once, under
    its first name, and ``shared`` maps its other names to that one."""
    tensors, shared, first = {}, {}, {}
    for i, op in enumerate(ops):
        for name, t in op.state_dict().items():
            key = f"op{i}.{name}"
            same = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if same in first:
                shared[key] = first[same]
            else:
                first[same], tensors[key] = key, t
    return tensors, shared


def graph_state(graph: Graph, model=None) -> tuple[dict, dict]:
    """``(spec, tensors)``: the JSON-able description and the weights (shared ops once).

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), rg.LoReFT(width=32, rank=2), name="r")
    >>> spec, tensors = graph_state(g)
    >>> spec["ops"][0]["type"], spec["nodes"][0]["site"]["positions"], sorted(tensors)
    ('LoReFT', 'last', ['op0.bias', 'op0.rotate', 'op0.weight'])

    A dictionary that several ops use as basis is stored once: ``spec["shared"]`` names its
    tensors in the other ops (format version 2; a graph without one is written as version 1).
    """
    ops = unique_ops(graph)
    index = {id(op): i for i, op in enumerate(ops)}
    tensors, shared = _tensors(ops)
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    nodes = [{"name": n.name, "site": n.site.to_dict(), "stream": n.stream, "op": index[id(n.op)]}
             for n in graph.nodes]
    spec = {"format": FORMAT, "version": 2 if shared else 1, "model": None if model is None else _model_info(model),
            "ops": [{"type": type(op).__name__, "config": op.config()} for op in ops], "nodes": nodes}
    if shared:
        spec["shared"] = shared
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

    A tensor the graph's ops share (a dictionary as the basis of several) is loaded once.
    """
    ops = unique_ops(graph)
    shared = _tensors(ops)[1]
    for i, op in enumerate(ops):
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"op{i}.")}
        result = op.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if f"op{i}.{k}" not in shared]
        if missing or result.unexpected_keys:
            raise GraphFileError(f"op {i} ({type(op).__name__}): tensors missing {missing}, unexpected "
                                 f"{result.unexpected_keys}")


# -- reading: every field checked, only registered ops built ------------------------------

SPEC_KEYS = ("format", "version", "model", "ops", "nodes")   # and "shared", from version 2
MODEL_KEYS = {"name": str, "family": str, "d_model": int, "n_layers": int}
NODE_KEYS = ("name", "site", "stream", "op")
SCALARS = (type(None), bool, int, float, str)


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
    _keys(spec, SPEC_KEYS + (("shared",) if version >= 2 and "shared" in spec else ()), "graph.json")
    if spec["model"] is not None:
        _keys(spec["model"], MODEL_KEYS, "graph.json 'model'")
        for key, kind in MODEL_KEYS.items():
            if not isinstance(spec["model"][key], kind) or isinstance(spec["model"][key], bool):
                raise GraphFileError(f"graph.json 'model': {key} must be {'an int' if kind is int else 'a string'}")
    for key in ("ops", "nodes"):
        if not isinstance(spec[key], list):
            raise GraphFileError(f"graph.json '{key}' must be a list, got {type(spec[key]).__name__}")
    if len(spec["nodes"]) > MAX_NODES:
        raise GraphFileError(f"graph.json has {len(spec['nodes'])} nodes; a saved graph holds at most {MAX_NODES}")
    if len(spec["ops"]) > len(spec["nodes"]):
        raise GraphFileError(f"graph.json has {len(spec['ops'])} ops for {len(spec['nodes'])} nodes; every op "
                             "is used by a node")


def _users(spec: dict, i: int) -> str:
    """`` of node 'a'`` (the nodes that use op ``i``, for messages), or ''."""
    names = [n["name"] for n in spec["nodes"] if isinstance(n, dict) and type(n.get("op")) is int
             and n["op"] == i and isinstance(n.get("name"), str)]
    if not names:
        return ""
    shown = ", ".join(repr(name[:50]) for name in names[:3]) + (", ..." if len(names) > 3 else "")
    return f" of node{'s' if len(names) > 1 else ''} {shown}"


def _with_shared(spec: dict, tensors: dict) -> dict:
    """``tensors`` with the names in ``spec["shared"]`` added, each the tensor it names."""
    if "shared" not in spec:
        return tensors
    shared = spec["shared"]
    if not isinstance(shared, dict) or not shared or len(shared) > MAX_TENSORS:
        raise GraphFileError(f"graph.json 'shared' must be a mapping of 1..{MAX_TENSORS} tensor names to the "
                             f"names they are stored under, got {str(shared)[:50]}")
    for alias, name in shared.items():
        if not isinstance(name, str) or name not in tensors:
            raise GraphFileError(f"graph.json 'shared': {alias[:50]!r} names {str(name)[:50]!r}, which is not a "
                                 "tensor of weights.safetensors")
        if alias in tensors:
            raise GraphFileError(f"graph.json 'shared': {alias[:50]!r} is stored in weights.safetensors too")
    return {**tensors, **{alias: tensors[name] for alias, name in shared.items()}}


def _share_bases(spec: dict, ops: list) -> None:
    """Give ops whose basis is stored as another op's (every tensor of it, the same config)
    that op's dictionary itself, as the saved graph had it: one module, not copies."""
    targets: dict = {}
    for alias, name in spec.get("shared", {}).items():
        (j, a), (i, b) = (key.split(".", 1) for key in (alias, name))
        if a.startswith("basis.") and a == b:
            targets.setdefault(int(j[2:]), set()).add(int(i[2:]))
    for j, found in targets.items():
        i = min(found)
        same = spec["ops"][j]["config"].get("basis") == spec["ops"][i]["config"].get("basis")
        basis = ops[j].basis                  # (every op has one: a dictionary, or None)
        every = basis is not None and all(f"op{j}.basis.{k}" in spec["shared"] for k in basis.state_dict())
        if len(found) == 1 and same and every and ops[i].basis is not None:
            ops[j].use_basis(ops[i].basis)


def _op_tensors(tensors: dict, n_ops: int) -> list:
    """``tensors`` grouped per op (``op{i}.name``); any other name is refused."""
    state = [{} for _ in range(n_ops)]
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        i = index[2:]
        if not (index.startswith("op") and i.isdigit() and str(int(i)) == i and int(i) < n_ops and name):
            raise GraphFileError(f"unexpected tensor {key[:50]!r} in weights.safetensors: tensors are named "
                                 f"op<i>.<name> for the graph's {n_ops} ops (op0..op{n_ops - 1})")
        state[int(i)][name] = value
    return state


def _config(cls, entry: dict, state: dict, where: str, label: str, users: str, depth: int) -> dict:
    """Constructor kwargs: JSON scalars (a site for ``site``, an op for an op entry) for known
    parameters, plus the tensors that are constructor arguments (e.g. ``Add``'s vector)."""
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
            except Exception as e:  # noqa: BLE001 - whatever the site's checks raise: the file's fault
                raise GraphFileError(f"{where}: config 'site': {e}") from None
        elif isinstance(value, dict) and set(value) == {"type", "config"}:  # an op inside the op
            value = _build_op(f"{label}.{key}", value, {k[len(key) + 1:]: v for k, v in state.items()
                                                        if k.startswith(key + ".")}, users, depth + 1)
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


def _build_op(label: str, entry, state: dict, users: str = "", depth: int = 0):
    """The op ``label`` ('op 0', 'op 0.inner') of graph.json from its entry and tensors
    (keys without the ``op0.`` prefix); ``users`` names its nodes in messages."""
    prefix = label.replace(" ", "", 1) + "."  # 'op 0.inner' -> tensors 'op0.inner.*'
    _keys(entry, ("type", "config"), f"graph.json {label}{users}")
    where = f"{label} ({str(entry['type'])[:50]}){users}"
    if depth > MAX_OP_DEPTH:
        raise GraphFileError(f"{where}: ops nested more than {MAX_OP_DEPTH} deep (an op inside an op's config)")
    cls = OPS.get(entry["type"]) if isinstance(entry["type"], str) else None
    if cls is None or not isinstance(entry["config"], dict):
        raise GraphFileError(f"{where}: unknown op type {str(entry['type'])[:50]!r} or config not a mapping; "
                             f"registered op types: {sorted(OPS)} (reftgraph.register_op adds one)")
    for name, t in state.items():
        if t.dtype not in FLOATS:
            raise GraphFileError(f"{where}: tensor {prefix}{name} has dtype {t.dtype}; ops hold floating-point "
                                 "tensors (float16, bfloat16, float32, float64)")
        if not t.is_meta and not bool(torch.isfinite(t).all()):
            raise GraphFileError(f"{where}: tensor {prefix}{name} holds NaN or infinite values")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:
        raise GraphFileError(f"{where}: tensors of several dtypes {sorted(map(str, dtypes))}; one op has one dtype")
    kwargs = _config(cls, entry, state, where, label, users, depth)
    try:
        with torch.device("meta"):  # shapes only: a crafted size allocates nothing
            expected = {k: tuple(v.shape) for k, v in cls(**kwargs).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - the op's own argument checks
        raise GraphFileError(f"{where}: cannot build from config {entry['config']}: {e}") from None
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GraphFileError(f"{where}: weights missing {[prefix + k for k in missing]}, "
                             f"unexpected {[prefix + k for k in unexpected]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise GraphFileError(f"{where}: tensor {prefix}{name} has shape {list(state[name].shape)}, "
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

    Only registered op types are built, from JSON scalars and tensors of the shapes they
    need. With tensors on the ``meta`` device (under ``torch.device("meta")``) it checks
    everything but the values and allocates nothing: :func:`load_graph` does this first.
    """
    _check_spec(spec)
    state = _op_tensors(_with_shared(spec, tensors), len(spec["ops"]))
    ops = [_build_op(f"op {i}", entry, s, _users(spec, i)) for i, (entry, s) in enumerate(zip(spec["ops"], state))]
    _share_bases(spec, ops)
    nodes = []
    for j, n in enumerate(spec["nodes"]):
        _keys(n, NODE_KEYS, f"graph.json node {j}")
        where = f"node {str(n['name'])[:50]!r}"
        i = _int(n["op"], f"{where}: op index", 0, len(ops) - 1)
        try:  # whatever the site's and node's checks raise is a fault of the file
            nodes.append(Node(n["name"], Site.from_dict(n["site"]), ops[i], n["stream"]))
        except Exception as e:  # noqa: BLE001
            raise GraphFileError(f"graph.json {where}: {e}") from None
    unused = sorted(set(range(len(ops))) - {n["op"] for n in spec["nodes"]})
    if unused:
        raise GraphFileError(f"graph.json: ops {unused} are not used by any node")
    try:
        return Graph(nodes)
    except Exception as e:  # noqa: BLE001 - e.g. two nodes of one name
        raise GraphFileError(f"graph.json: {e}") from None


def _read(folder: Path) -> tuple[dict, Graph]:
    """graph.json and the weights of one folder: both opened first (a later save may remove
    them), then graph.json and the header checked on ``meta``, then the tensors read."""
    files = folder / "graph.json", folder / "weights.safetensors"
    try:
        with open(files[0], "rb") as text, open(files[1], "rb") as weights:
            size = text.seek(0, 2)
            if size > MAX_JSON_BYTES:
                raise GraphFileError(f"{files[0]} is {size} bytes; a graph description is at most {MAX_JSON_BYTES}")
            text.seek(0)
            spec = parse_json(text.read(), str(files[0]))
            header = read_header(weights, str(files[1]))
            try:
                with torch.device("meta"):  # names, dtypes, shapes and configs: nothing read or allocated
                    build_graph(spec, {k: torch.empty(e.shape, dtype=e.dtype) for k, e in header.items()})
                graph = build_graph(spec, read_tensors(weights, header, header))
            except GraphFileError as e:
                raise GraphFileError(f"{folder}: {e}") from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise GraphFileError(f"{folder} cannot be read ({e.strerror}: {e.filename})") from None
    return spec, graph


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
    for _ in range(MAX_TRIES):
        folder = current_folder(path)
        try:
            spec, graph = _read(folder)
            break
        except FileNotFoundError as e:
            if current_folder(path) == folder:  # not replaced meanwhile: the folder is damaged
                raise GraphFileError(f"{folder} is not a saved graph: {Path(str(e.filename)).name} is missing") \
                    from None
    else:
        raise GraphFileError(f"{path} was replaced {MAX_TRIES} times while being read; try again")
    if model is not None:
        check_fits(graph, spec["model"], model)
    return graph


def check_fits(graph: Graph, saved: dict, model) -> None:
    """Refuse a graph saved for another model family or width, or whose sites do not fit ``model``."""
    from ..engine import compile_graph

    if saved:
        now = _model_info(model)
        for key in ("family", "d_model"):
            if saved[key] != now[key]:
                raise GraphFileError(f"the graph was saved for {saved['name']!r} ({key} {saved[key]}), "
                                     f"not {now['name']!r} ({key} {now[key]})")
    compile_graph(graph, model.arch)


# -- writing: only what loads --------------------------------------------------------------

def _not_json(value, key: str = ""):
    """``(key, value)`` of the first value in a config that is not standard JSON, or None."""
    if isinstance(value, float) and not math.isfinite(value) or not isinstance(value, (*SCALARS, dict, list)):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _not_json(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def _op_modules(op: Op) -> list:
    return [(name, type(m)) for name, m in op.named_modules() if isinstance(m, Op)]


def savable_json(graph: Graph, spec: dict, tensors: dict) -> str:
    """graph.json's text for :func:`graph_state`'s output, once it is checked that
    :func:`load_graph` loads it as ``graph``; else a :class:`GraphFileError` naming the node.

    >>> import math, reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0), rg.Add(torch.ones(4), scale=math.inf), name="steer")
    >>> savable_json(g, *graph_state(g))        # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.GraphFileError: cannot save op 0 (Add) of node 'steer': config scale = inf is not a finite ...
    """
    if len(spec["nodes"]) > MAX_NODES:
        raise GraphFileError(f"cannot save a graph of {len(spec['nodes'])} nodes; a saved graph holds at most "
                             f"{MAX_NODES}")
    for i, entry in enumerate(spec["ops"]):
        bad = _not_json(entry["config"])
        if bad:
            what = "is not a finite JSON number" if isinstance(bad[1], float) else \
                f"is a {type(bad[1]).__name__}, not a JSON number, string, bool, null, list or mapping"
            raise GraphFileError(f"cannot save op {i} ({entry['type']}){_users(spec, i)}: config {bad[0]} = "
                                 f"{str(bad[1])[:50]} {what}")
    if len(tensors) > MAX_TENSORS or any(t.dim() > 32 for t in tensors.values()):
        raise GraphFileError(f"cannot save: weights.safetensors holds at most {MAX_TENSORS} tensors of at most 32 "
                             f"dims; the graph has {len(tensors)}, of up to {max(t.dim() for t in tensors.values())}")
    text = json.dumps(spec, indent=1, allow_nan=False)
    if len(text.encode()) > MAX_JSON_BYTES:
        raise GraphFileError(f"cannot save: graph.json would be {len(text.encode())} bytes; at most {MAX_JSON_BYTES}")
    try:
        with torch.device("meta"):  # the loader's checks, on shapes only
            loaded = build_graph(parse_json(text, "graph.json"), {k: t.to("meta") for k, t in tensors.items()})
        for i, s in enumerate(_op_tensors(tensors, len(spec["ops"]))):
            for name, t in s.items():
                if not bool(torch.isfinite(t).all()):
                    raise GraphFileError(f"op {i} ({spec['ops'][i]['type']}){_users(spec, i)}: tensor "
                                         f"op{i}.{name} holds NaN or infinite values")
    except GraphFileError as e:
        raise GraphFileError(f"cannot save {e}") from None
    for node in graph.nodes:  # a subclass named as a registered op would load as that op
        ours, back = _op_modules(node.op), _op_modules(loaded[node.name].op)
        for (name, cls), (_, loads_as) in zip(ours, back):
            if cls is not loads_as:
                raise GraphFileError(
                    f"cannot save node {node.name!r}: its op{' ' + name if name else ''} is "
                    f"{cls.__module__}.{cls.__qualname__}, which is not registered: it would load as "
                    f"{loads_as.__module__}.{loads_as.__qualname__}; give it a name of its own and register it "
                    "with reftgraph.register_op")
        if len(ours) != len(back):
            raise GraphFileError(f"cannot save node {node.name!r}: its op holds ops {[n for n, _ in ours]}, "
                                 f"its config() rebuilds {[n for n, _ in back]}")
    return text


def _write(folder: Path, text: str, tensors: dict) -> None:
    (folder / "graph.json").write_text(text, encoding="utf-8")
    save_file(tensors, str(folder / "weights.safetensors"), metadata={"format": FORMAT})


def write_graph(folder: Path, graph: Graph, model=None) -> None:
    """``graph.json`` and ``weights.safetensors`` into an existing folder (checked as :func:`save` does).

    >>> import os, tempfile, reftgraph as rg
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_graph(folder, rg.Graph())
    >>> sorted(os.listdir(folder))
    ['graph.json', 'weights.safetensors']
    """
    spec, tensors = graph_state(graph, model)
    _write(Path(folder), savable_json(graph, spec, tensors), tensors)


def save(graph: Graph, path, model=None) -> Path:
    """Write ``graph`` to the folder ``path`` as a new version (``graph.json`` + ``weights.safetensors``).

    >>> import json, tempfile, reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1), rg.Add(torch.ones(32), scale=2.0), name="steer")
    >>> path = save(g, tempfile.mkdtemp() + "/steer", model=rg.models.tiny("llama"))
    >>> json.loads((current_folder(path) / "graph.json").read_text())["model"]
    {'name': 'tiny-llama', 'family': 'llama', 'd_model': 32, 'n_layers': 2}

    A graph that :func:`load_graph` would refuse (NaN weights, an infinite config value,
    an op that is not registered, ...) is refused before anything is written. A saved graph
    already at ``path`` is replaced atomically for readers; any other file or non-empty
    folder at ``path`` is refused, never overwritten.
    """
    path = Path(path)
    spec, tensors = graph_state(graph, model)
    text = savable_json(graph, spec, tensors)
    write_version(path, lambda folder: _write(folder, text, tensors))
    return path

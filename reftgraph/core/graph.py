"""Interventions as nodes of a causal graph.

>>> import torch, reftgraph as rg
>>> g = rg.Graph()
>>> g.add(rg.Site("head_out", layer=1, head=0, positions=[0]), rg.Patch(source="source"), name="a")
'a'
>>> g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(), name="r1")
'r1'
>>> list(g.edges)
[('a', 'r1')]
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Iterable, Optional

import networkx as nx
import pandas as pd
from torch import nn

from ..errors import SiteError
from .ops.base import Op
from .sites import STAGES, Site

# What higher layers provide to Graph's methods (run, generate, save, draw): the core
# imports nothing above it; each layer registers its function when it is imported.
ACTIONS: dict = {}


def provide(name: str, fn) -> None:
    """Register ``fn`` as the implementation behind ``Graph.<name>`` (done by the engine,
    files and viz layers on import).

    >>> sorted(ACTIONS)
    ['draw', 'generate', 'run', 'save']
    """
    ACTIONS[name] = fn


@dataclass(frozen=True)
class Node:
    """One intervention: a name, where (``site``), what (``op``) and on which ``stream``.

    >>> import reftgraph as rg
    >>> print(Node("p", rg.Site("resid_pre", layer=2, positions="last"), rg.Patch("s1"), stream="base"))
    p: Patch resid_pre[2] pos=last
    """

    name: str
    site: Site
    op: Op
    stream: str = "base"

    @property
    def reads(self) -> tuple[str, Site]:
        """The (stream, site) whose value the op reads: its source for a Patch, else its own.

        >>> import reftgraph as rg
        >>> node = Node("p", rg.Site("resid_pre", layer=2), rg.Patch("source", site=rg.Site("resid_pre", layer=1)))
        >>> stream, site = node.reads
        >>> stream, str(site)
        ('source', 'resid_pre[1] pos=all')
        """
        if self.op.source is not None:
            return self.op.source, getattr(self.op, "site", None) or self.site
        return self.stream, self.site

    def __str__(self) -> str:
        stream = "" if self.stream == "base" else f" @{self.stream}"
        return f"{self.name}: {type(self.op).__name__} {self.site}{stream}"


def site_order(site: Site) -> tuple:
    """Model-agnostic forward order; negative layers (counted from the end) sort after
    non-negative ones (the compiled plan orders them exactly).

    >>> import reftgraph as rg
    >>> site_order(rg.Site("resid_post", layer=1)) < site_order(rg.Site("resid_pre", layer=2))
    True
    """
    layer = site.layer if site.layer >= 0 else 10**6 + site.layer
    return (layer, STAGES[site.component])


def check_node(node: Node) -> None:
    """Raise :class:`SiteError` when ``node``'s stream or what its op reads is not well formed.

    >>> import reftgraph as rg
    >>> check_node(Node("p", rg.Site("resid_pre", layer=0), rg.Patch(source=None)))
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: node 'p' at resid_pre[0] pos=all: Patch reads another stream: source= must be a stream name such as 'source', got None
    """
    where = f"node {node.name!r} at {node.site}: "
    if not (isinstance(node.stream, str) and node.stream):
        raise SiteError(f"{where}stream must be a non-empty string such as 'base' or 'source', got {node.stream!r}")
    problem = node.op.check_config()
    if problem:
        raise SiteError(f"{where}{type(node.op).__name__}: {problem}")
    if node.op.reads_stream:
        if not (isinstance(node.op.source, str) and node.op.source):
            raise SiteError(f"{where}{type(node.op).__name__} reads another stream: source= must be a stream "
                            f"name such as 'source', got {node.op.source!r}")
        site = getattr(node.op, "site", None)
        if site is not None and not isinstance(site, Site):
            raise SiteError(f"{where}{type(node.op).__name__}(site=...) must be a reftgraph.Site, "
                            f"got {type(site).__name__}")


def _positions_overlap(a, b) -> bool:
    """False only when both are explicit ints of one sign with no common entry."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        if all(p >= 0 for p in a + b) or all(p < 0 for p in a + b):
            return bool(set(a) & set(b))
    return True


def _overlap(a, b) -> bool:
    return a is None or b is None or bool(set(a) & set(b))


class Graph:
    """A set of intervention nodes; an edge ``u -> v`` means v reads what u wrote.

    >>> import reftgraph as rg
    >>> g = Graph()
    >>> _ = g.add(rg.Site("head_out", layer=0, head=1, positions=[0]), rg.Patch("source"), name="a")
    >>> _ = g.add(rg.Site("head_out", layer=1, head=3, positions=[1]), rg.Patch("source"), name="b")
    >>> print(g)
    Graph(2 nodes, 0 trainable parameters)
      a: Patch head_out[0].h1 pos=[0]
      b: Patch head_out[1].h3 pos=[1]

    Nodes on one stream form a chain in forward order; a node that reads another
    stream (a ``Patch``) gets edges from that stream's upstream nodes.
    """

    def __init__(self, nodes: Iterable[Node] = ()):
        self._nodes: dict[str, Node] = {}
        self.ops = nn.ModuleDict()
        self.version = 0  # counts added nodes; with the ops' revisions it keys compiled plans (see state)
        self._dag = None  # the edges, built when first asked for (see dag)
        for node in nodes:
            self._insert(node)

    # -- building ------------------------------------------------------------
    def add(self, site: Site, op: Op, name: Optional[str] = None, stream: str = "base") -> str:
        """Add a node and return its name (made from op and site when not given).

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> g.add(rg.Site("mlp_out", layer=3), rg.Collect()), g.add(rg.Site("mlp_out", layer=3), rg.Collect())
        ('collect_mlp_out3', 'collect_mlp_out3_2')
        """
        if not isinstance(site, Site):
            raise SiteError(f"node {name!r}: site must be a reftgraph.Site, got {type(site).__name__}")
        if not isinstance(op, Op):
            raise SiteError(f"node {name!r} at {site}: op must be a reftgraph op, got {type(op).__name__}")
        if name is None:
            base = f"{type(op).__name__.lower()}_{site.component}{site.layer}"
            name, i = base, 1
            while name in self._nodes:
                i += 1
                name = f"{base}_{i}"
        self._insert(Node(name, site, op, stream))
        return name

    def _insert(self, node: Node) -> None:
        if not isinstance(node.name, str) or not node.name or "." in node.name:
            raise SiteError(f"node name {node.name!r} (at {node.site}): a name is a non-empty string without '.'")
        if node.name in self._nodes:
            raise SiteError(
                f"duplicate node name {node.name!r} (at {node.site}); "
                f"existing node: {self._nodes[node.name]}. Pick another name="
            )
        check_node(node)
        self._nodes[node.name] = node
        self.ops[node.name] = node.op
        self.version += 1
        self._dag = None

    def state(self) -> tuple:
        """What compiled plans depend on: the nodes added and every op's configuration.

        >>> import torch, reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_post", layer=0), rg.Add(torch.ones(4)), name="a")
        >>> before = g.state()
        >>> g["a"].op.scale = 3.0            # any change to an op's settings or tensors ...
        >>> g.state() != before              # ... makes plans compiled before it stale
        True

        Ops stay mutable after being added (e.g. a steering sweep sets ``Add.scale``);
        setting any attribute of an op (``scale``, ``source``, ``site``, ``mode``, a new
        ``vector``) changes its :attr:`~reftgraph.core.ops.base.Op.revision`, so the next
        run checks the graph again and compiles a new plan. Editing a tensor in place
        (``op.vector.data[0] = 1``) keeps its shape and needs no new plan.
        """
        return self.version, tuple(op.revision for op in self.ops.values())

    def check(self) -> None:
        """Check every node again (after its op's settings changed); raises :class:`SiteError`.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_pre", layer=1), rg.Patch("source"), name="p")
        >>> g["p"].op.source = ""
        >>> g.check()
        Traceback (most recent call last):
        ...
        reftgraph.errors.SiteError: node 'p' at resid_pre[1] pos=all: Patch reads another stream: source= must be a stream name such as 'source', got ''
        """
        for node in self._nodes.values():
            check_node(node)
        self._dag = None

    @staticmethod
    def _feeds(a: Node, b: Node, same_place_ok: bool) -> bool:
        stream, site = b.reads
        if a.op.collects or a.stream != stream:
            return False
        # a patch reading another place reads it after every edit there, whatever the insertion order
        same_place_ok = same_place_ok or (b.op.source is not None and site_order(site) != site_order(b.site))
        return site_order(a.site) < site_order(site) or (same_place_ok and site_order(a.site) == site_order(site))

    @property
    def dag(self) -> nx.DiGraph:
        """The graph as a ``networkx.DiGraph``: nodes in insertion order (attribute ``node``)
        and the "reads from" edges.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_pre", layer=0), rg.Ablate(), name="knock")
        >>> _ = g.add(rg.Site("resid_pre", layer=1), rg.Collect(), name="look")
        >>> list(g.dag.predecessors("look"))
        ['knock']

        Edges are built when first asked for (adding, loading, compiling and running a
        graph never build them): a chain of n nodes on one stream has n(n-1)/2 edges.
        """
        key = self.state()
        if self._dag is None or self._dag[0] != key:
            self._dag = (key, self._build_dag())
        return self._dag[1]

    def _build_dag(self) -> nx.DiGraph:
        dag = nx.DiGraph()
        dag.add_nodes_from((name, {"node": node}) for name, node in self._nodes.items())
        order = {name: i for i, name in enumerate(self._nodes)}
        writers: dict[str, list] = {}   # stream -> [(site order, insertion order, node)], sorted
        for node in self._nodes.values():
            if not node.op.collects:
                writers.setdefault(node.stream, []).append((site_order(node.site), order[node.name], node))
        for entries in writers.values():
            entries.sort(key=lambda e: (e[0], e[1]))
        for b in self._nodes.values():
            stream, site = b.reads
            at = site_order(site)
            for where, i, a in writers.get(stream, ()):
                if where > at:
                    break
                if a is b:
                    continue
                earlier = i < order[b.name]
                if self._feeds(a, b, same_place_ok=earlier):
                    dag.add_edge(a.name, b.name)
        return dag
    # -- access --------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        """The nodes, in insertion order.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_post", layer=1), rg.Collect(), name="late")
        >>> _ = g.add(rg.Site("resid_post", layer=0), rg.Collect(), name="early")
        >>> [n.name for n in g.nodes]
        ['late', 'early']
        """
        return list(self._nodes.values())

    @property
    def edges(self):
        """The "reads from" edges ``(u, v)``: v reads what u wrote (the networkx edge view).

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_pre", layer=0), rg.Ablate(), name="knock")
        >>> _ = g.add(rg.Site("resid_pre", layer=1), rg.Collect(), name="look")
        >>> list(g.edges)
        [('knock', 'look')]
        """
        return self.dag.edges

    @property
    def streams(self) -> set[str]:
        """Every stream the graph writes to or reads from.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_pre", layer=0), rg.Patch("s1"))
        >>> sorted(g.streams)
        ['base', 's1']
        """
        return {n.stream for n in self.nodes} | {n.reads[0] for n in self.nodes}

    def __getitem__(self, name: str) -> Node:
        if name not in self._nodes:
            raise KeyError(f"no node {name!r}; nodes: {list(self._nodes)}")
        return self._nodes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self):
        return iter(self.nodes)

    # -- composition ---------------------------------------------------------
    def __or__(self, other: "Graph") -> "Graph":
        """Both graphs' nodes; refuses clashing names and overlapping subspaces."""
        if not isinstance(other, Graph):
            raise SiteError(f"cannot compose a Graph with {type(other).__name__}; use g1 | g2 with two graphs")
        places: dict[tuple, list] = {}   # (stream, component, layer) -> this graph's editing nodes there
        for b in self.nodes:
            if not b.op.collects:
                places.setdefault((b.stream, b.site.component, b.site.layer), []).append(b)
        for a in other.nodes:
            if a.name in self._nodes:
                raise SiteError(
                    f"cannot compose: both graphs have a node named {a.name!r} "
                    f"({self[a.name].site} and {a.site}); rename one"
                )
            if a.op.collects:
                continue
            for b in places.get((a.stream, a.site.component, a.site.layer), ()):
                if (_positions_overlap(a.site.positions, b.site.positions)
                        and _overlap(a.site.head, b.site.head) and _overlap(a.site.subspace, b.site.subspace)):
                    raise SiteError(
                        f"cannot compose: nodes {b.name!r} ({b.site}) and {a.name!r} ({a.site}) edit "
                        "overlapping subspaces of the same site; give them disjoint subspace= dims"
                    )
        return Graph(self.nodes + other.nodes)

    def subgraph(self, names: Iterable[str]) -> "Graph":
        """A graph of the named nodes (sharing their ops).

        >>> import reftgraph as rg
        >>> g = rg.reft_graph(rg.models.tiny("llama"), layers=[0, 1], positions="last", rank=2)
        >>> sub = g.subgraph(["L1"])
        >>> [n.name for n in sub], sub["L1"].op is g["L1"].op
        (['L1'], True)
        """
        names = list(names)
        for n in names:
            self[n]
        return Graph(n for n in self.nodes if n.name in names)

    # -- parameters ----------------------------------------------------------
    def parameters(self):
        """The parameters of the graph's ops (each shared op once), e.g. for an optimizer.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2))
        >>> [tuple(p.shape) for p in g.parameters()]
        [(32, 2), (2, 32), (2,)]
        """
        return self.ops.parameters()

    def num_parameters(self, trainable_only: bool = True) -> int:
        """How many (trainable, by default) parameters the graph's ops hold.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2))
        >>> g.num_parameters()
        130
        """
        return sum(p.numel() for p in self.ops.parameters() if p.requires_grad or not trainable_only)

    def freeze(self) -> "Graph":
        """Stop training the graph's ops (``requires_grad=False``); returns the graph.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2))
        >>> g.freeze().num_parameters(), g.num_parameters(trainable_only=False)
        (0, 130)
        """
        self.ops.requires_grad_(False)
        return self

    # -- views ---------------------------------------------------------------
    def summary(self) -> pd.DataFrame:
        """One row per node: name, op, stream, component, layer, positions, head, subspace, params.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("head_out", layer=1, head=2, positions="last"), rg.Patch("source"), name="p")
        >>> g.summary()[["name", "op", "component", "positions", "head", "reads"]].values.tolist()
        [['p', 'Patch', 'head_out', 'last', '2', 'source']]
        """
        rows = []
        for n in self.nodes:
            d = n.site.to_dict()
            rows.append({
                "name": n.name,
                "op": type(n.op).__name__,
                "stream": n.stream,
                "component": d["component"],
                "layer": d["layer"],
                "positions": str(n.site).split(" pos=")[1].split(" dims=")[0],
                "head": None if n.site.head is None else ",".join(map(str, n.site.head)),
                "subspace": None if n.site.subspace is None else ",".join(map(str, n.site.subspace)),
                "reads": None if n.op.source is None else n.reads[0],
                "params": sum(p.numel() for p in n.op.parameters()),
            })
        columns = ["name", "op", "stream", "component", "layer", "positions", "head", "subspace", "reads", "params"]
        return pd.DataFrame(rows, columns=columns)

    def __repr__(self) -> str:
        lines = [f"Graph({len(self)} nodes, {self.num_parameters()} trainable parameters)"]
        lines += [f"  {n}" for n in self.nodes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        title = html.escape(f"reftgraph.Graph: {len(self)} nodes, {self.num_parameters()} trainable parameters")
        return f"<p><b>{title}</b></p>" + self.summary().to_html(index=False, na_rep="")

    def draw(self, ax=None):
        """A matplotlib figure: nodes laid out by layer (x) and stream (y), coloured by stream.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_pre", layer=3, positions="last"), rg.Patch("source"), name="p")
        >>> g.draw().axes[0].get_title()
        '1 nodes, 0 trainable parameters'
        """
        return ACTIONS["draw"](self, ax=ax)

    def save(self, path, model=None):
        """Save to the folder ``path``: ``graph.json`` + ``weights.safetensors`` in a new version
        beside the old one, switched to atomically (see :mod:`reftgraph.files.io`).

        >>> import os, tempfile, reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2))
        >>> folder = g.save(tempfile.mkdtemp() + "/g")
        >>> sorted(os.listdir(rg.files.current_folder(folder))), len(rg.load_graph(folder))
        (['graph.json', 'weights.safetensors'], 1)
        """
        return ACTIONS["save"](self, path, model)

    # -- running -------------------------------------------------------------
    def run(self, model, prompts, sources=None, **kwargs):
        """Run the graph on ``prompts`` (the base stream). See :func:`reftgraph.engine.run`.

        >>> import reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_pre", layer=1, positions="last"), rg.Patch("source"))
        >>> g.run(rg.models.tiny("llama"), ["a b", "c"], sources={"source": ["d e f"]}).next_token_logits.shape
        torch.Size([2, 259])
        """
        return ACTIONS["run"](self, model, prompts, sources=sources, **kwargs)

    def generate(self, model, prompts, max_new_tokens: int = 32, **kwargs):
        """Generate with the graph's edits. See :func:`reftgraph.engine.generate`.

        >>> import torch, reftgraph as rg
        >>> g = Graph()
        >>> _ = g.add(rg.Site("resid_post", layer=0, positions="all"), rg.Add(torch.ones(32)))
        >>> g.generate(rg.models.tiny("llama"), ["hi", "hello"], max_new_tokens=4).new_ids.shape
        torch.Size([2, 4])
        """
        return ACTIONS["generate"](self, model, prompts, max_new_tokens=max_new_tokens, **kwargs)

"""Circuits as graphs: score heads and MLPs by attribution, keep the top ones, and return
the circuit as an :class:`~reftgraph.Graph` that patches everything outside it.

A circuit is run on the clean prompts (``data.source``, in the denoising convention of
:class:`~reftgraph.patching.Counterfactual` where ``data.base`` holds the corrupted ones)
with every head (and, if scored, every MLP) outside it taking its value from the corrupted
run (stream ``"corrupt"``) or its mean over the corrupted prompts. Because it is a graph it
runs, saves, loads, draws and combines like any other; :func:`faithfulness` runs it.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
>>> circuit = rg.circuits.discover(lm, data, size=2)
>>> members(circuit, lm).values.tolist()          # the 2 heads kept (of 8)
[['head', 0, 0], ['head', 1, 1]]
>>> sorted(faithfulness(circuit, lm, data))
['circuit', 'empty', 'faithfulness', 'full', 'normalised', 'size']
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import pandas as pd

from ..core.graph import Graph
from ..core.masks import masked_mean
from ..core.ops import Ablate, Collect, Patch
from ..core.settings import Settings, number, one_of, option
from ..core.sites import Site
from ..engine import as_model, run
from ..errors import DataError
from ..training.counterfactual import Counterfactual
from ..viz.circuits import draw_circuit, plot_curve
from .edge_circuits import (MIB_FRACTIONS, EdgeCircuit, carrying, discover_edges, draw_edges, edge_circuit,
                            edge_faithfulness, load_edge_circuit, mean_writes, metric_runs, mib, mib_areas, node_edges,
                            plot_mib)
from .edges import edge_scores, edges
from .features import discover as discover_features
from .patching.attribution import attribute, one_length
from .patching.metrics import METRICS

__all__ = ["Circuit", "CircuitConfig", "EdgeCircuit", "MIB_FRACTIONS", "carrying", "edges", "edge_scores",
           "edge_circuit", "discover_edges", "edge_faithfulness", "load_edge_circuit", "mean_writes", "mib", "mib_areas",
           "node_edges", "draw_edges", "plot_mib", "scores", "discover", "circuit_graph", "members", "faithfulness", "curve",
           "top_layers", "draw", "plot_curve"]

NODES = ("heads", "heads+mlps")
ABLATE = ("corrupt", "mean")
RANKS = ("effect", "magnitude", "mean_abs")
STREAM = "corrupt"


def scores(model, data: Counterfactual, nodes: str = "heads", method: str = "atp", ig_steps: int = 5,
           metric="logit_diff", rank: str = "effect", per_position: bool = False,
           progress: bool = True) -> pd.DataFrame:
    """Every head's (and MLP's) estimated effect of corrupting it in the clean run.

    >>> import reftgraph as rg
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> table = scores(rg.models.tiny("llama"), data, nodes="heads+mlps")
    >>> table.columns.tolist(), len(table)                  # 2 layers x (4 heads + 1 MLP)
    (['kind', 'layer', 'head', 'estimate', 'score'], 10)

    ``method``: ``"atp"`` (attribution patching, one backward) or ``"ig"`` (the gradient
    averaged over ``ig_steps`` points between the clean and corrupted inputs, as EAP-IG
    does). ``estimate`` is the estimated change of the metric when the node alone takes its
    corrupted value. ``score`` ranks nodes for :func:`discover`: with ``rank="effect"`` it
    is the estimate signed so that positive means "corrupting this node moves the metric
    toward the corrupted run" (the node carries the behaviour); with ``rank="magnitude"``
    it is ``|estimate|``, which also ranks high the nodes that work against the behaviour
    (a complete circuit has both kinds; a faithful small one mostly the first); with
    ``rank="mean_abs"`` it is the mean over rows of each row's ``|estimate|``, which also ranks
    high a node whose effect changes sign from row to row.
    ``per_position=True`` scores every node at every token position (a ``position`` column):
    a circuit may then keep a head at some positions only. It needs prompts of one length
    (e.g. IOI prompts of one template, ``ioi(n, templates=(0,))``). ``progress=False`` hides
    the progress bar of the attribution passes.
    """
    model = as_model(model, one_stack="rg.circuits.scores")
    _check(data, nodes)
    positions = "all"
    if per_position:
        positions = tuple(range(one_length(model, data)))
    if method not in ("atp", "ig"):
        raise DataError(f"method must be 'atp' or 'ig', got {method!r}")
    if rank not in RANKS:
        raise DataError(f"rank must be one of {RANKS}, got {rank!r}")
    components = ["head_out"] + (["mlp_out"] if nodes == "heads+mlps" else [])
    df = attribute(model, data.swap(), components, positions=positions, metric=metric,
                   ig_steps=ig_steps if method == "ig" else 0, progress=progress)
    out = pd.DataFrame({"kind": df["component"].map({"head_out": "head", "mlp_out": "mlp"}),
                        "layer": df["layer"], "head": df["head"], "estimate": df["estimate"]})
    if per_position:
        out.insert(3, "position", df["position"].astype(int))
    toward = 1.0 if df.attrs["source"] >= df.attrs["base"] else -1.0      # clean -> corrupted
    out["score"] = {"magnitude": out["estimate"].abs(), "mean_abs": df["mean_abs"],
                    "effect": out["estimate"] * toward}[rank]
    out.attrs.update(df.attrs, nodes=nodes, method=method, rank=rank)
    return out


def _check(data, nodes):
    if not isinstance(data, Counterfactual):
        raise DataError(f"circuits take a rg.patching.Counterfactual (base = corrupted, source = clean), "
                        f"got {type(data).__name__}")
    if nodes not in NODES:
        raise DataError(f"nodes must be one of {NODES}, got {nodes!r}")


def _size(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 1 if isinstance(v, int) else 0 < v <= 1):
        return f"must be a count (an int >= 1) or a fraction in (0, 1], got {v!r}"
    return None


@dataclass(frozen=True)
class CircuitConfig(Settings):
    """The settings of :func:`discover`, with their help.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d"], ["ab d c"], correct=["c"], wrong=["d"])
    >>> len(discover(lm, data, progress=False, **CircuitConfig(size=2).kwargs()).kept)
    2
    """

    size: Union[int, float] = option(0.05, "nodes (or edges, features) kept: a count, or a fraction in (0, 1]", _size)
    nodes: str = option("heads", "what a node is: 'heads' (MLPs stay as they are) or 'heads+mlps'", one_of(*NODES))
    method: str = option("atp", "scores: 'atp' (attribution patching; EAP for edges) or 'ig' (integrated "
                         "gradients; EAP-IG on the inputs for edges); edges also take 'exact' (a run per edge)",
                         one_of("atp", "ig", "exact"))
    ig_steps: int = option(5, "integrated-gradient steps (method 'ig')", number(1, integer=True))
    ablate: str = option("corrupt", "what the nodes outside carry: their corrupted run ('corrupt') or its mean "
                         "('mean')", one_of(*ABLATE))
    metric: str = option("logit_diff", "what the scores and faithfulness measure", one_of(*METRICS))
    rank: str = option("effect", "order nodes by signed 'effect', by 'magnitude' (|mean|) or by 'mean_abs' (the "
                       "mean of each row's |effect|)", one_of(*RANKS))
    per_position: bool = option(False, "a node per head and token position (equal-length prompts)",
                                one_of(True, False))
    level: str = option("node", "'node' (heads, MLPs), 'edge' (sender -> receiver) or 'feature' (needs "
                        "dictionaries)", one_of("node", "edge", "feature"))
    errors: str = option("keep", "feature circuits: the dictionaries' error terms 'keep' their clean value or "
                         "are 'ablate'd", one_of("keep", "ablate"))


def discover(model, data: Counterfactual, size: Union[int, float] = 0.05, nodes: str = "heads",
             method: str = "atp", ig_steps: int = 5, ablate: str = "corrupt", metric="logit_diff",
             rank: str = "effect", per_position: bool = False, table: Optional[pd.DataFrame] = None,
             progress: bool = True, level: str = "node", dictionaries=None, errors: str = "keep") -> "Circuit":
    """The circuit of the ``size`` top-scoring nodes, as a graph that patches all the others.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> print(discover(lm, data, size=0.25))                # 25% of 8 heads
    Circuit: keeps 2 of 8 heads, best first: L1H1, L0H0
      runs as 2 patch nodes; the heads outside read the corrupted run (stream 'corrupt')
      outside0: Patch head_out[0].h1+h2+h3 pos=all
      outside1: Patch head_out[1].h0+h2+h3 pos=all

    ``size``: a number of nodes (int) or a fraction of them (float in (0, 1]); ``nodes``:
    ``"heads"`` (MLPs stay as they are) or ``"heads+mlps"`` (MLPs are scored and kept or
    patched like heads); ``ablate``: ``"corrupt"`` (outside nodes read stream ``"corrupt"``,
    the corrupted prompts) or ``"mean"`` (their mean over the corrupted prompts, stored in
    the graph); ``rank`` and ``per_position``: see :func:`scores`. ``table``: scores from
    :func:`scores`, to reuse them across sizes. Returns a :class:`Circuit`: the graph, with
    the nodes it keeps (``circuit.kept``, their scores included) and these settings.

    ``level="edge"``: an edge circuit instead (:func:`discover_edges`; ``method`` ``"atp"`` is
    EAP, ``"ig"`` EAP-IG on the inputs with ``ig_steps`` steps, or any method of
    :func:`edge_scores`), an :class:`EdgeCircuit`. ``level="feature"``: a feature circuit over
    ``dictionaries`` (``{rg.Site(component, layer): dictionary}``; ``errors`` ``"keep"`` or
    ``"ablate"``; ``method`` ``"atp"`` or ``"ig"``), a :class:`~reftgraph.features.FeatureCircuit` (see
    :func:`reftgraph.features.discover`).
    """
    if level not in ("node", "edge", "feature"):
        raise DataError(f"level must be 'node', 'edge' or 'feature', got {level!r}")
    if level == "feature":
        if dictionaries is None:
            raise DataError("level='feature' needs dictionaries={rg.Site(component, layer): dictionary}")
        return discover_features(model, data, dictionaries, size, errors=errors, ablate=ablate, metric=metric,
                                 method=method, steps=ig_steps, table=table, progress=progress,
                                 per_position=per_position, rank=rank)
    if level == "edge":
        method = {"atp": "eap", "ig": "eap-ig-inputs"}.get(method, method)
        return discover_edges(model, data, size, method, ig_steps, metric, table, progress, ablate, per_position)
    model = as_model(model, one_stack="rg.circuits.discover")
    _check(data, nodes)
    if ablate not in ABLATE:
        raise DataError(f"ablate must be one of {ABLATE}, got {ablate!r}")
    settings = dict(size=size, nodes=nodes, ablate=ablate, per_position=per_position)
    if table is None:
        _count(size, _n_nodes(model, data, nodes, per_position))      # a bad size fails before any forward
        table = scores(model, data, nodes, method, ig_steps, metric, rank, per_position, progress)
        settings.update(method=method, ig_steps=ig_steps if method == "ig" else None, rank=rank,
                        metric=metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"))
    kept = table.sort_values("score", ascending=False, kind="stable").head(_count(size, len(table)))
    circuit = circuit_graph(model, data, kept, nodes, ablate)
    circuit.settings.update(settings)
    return circuit


def _n_nodes(model, data, nodes, per_position) -> int:
    arch = model.arch
    n = sum(arch.heads("head_out", layer) for layer in range(arch.n_layers))
    n += arch.n_layers if nodes == "heads+mlps" else 0
    return n * (len(model.tokenizer(data.source[0])["input_ids"]) if per_position else 1)


def _count(size, n: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise DataError(f"size must be a number of nodes (int) or a fraction (float), got {size!r}")
    count = size if isinstance(size, int) else round(size * n)
    if isinstance(size, float) and not 0 < size <= 1:
        raise DataError(f"a circuit size given as a fraction must be in (0, 1], got {size}")
    if not 1 <= count <= n:
        raise DataError(f"circuit size {size} keeps {count} nodes; valid sizes: 1..{n} nodes "
                        f"(or a fraction of the {n}, at least {1 / n:.3g})")
    return count


def circuit_graph(model, data: Optional[Counterfactual], kept: pd.DataFrame, nodes: str = "heads",
                  ablate: str = "corrupt") -> "Circuit":
    """The graph that keeps the nodes of ``kept`` (rows with ``kind``, ``layer``, ``head``)
    and patches every other one (see :func:`discover`), as a :class:`Circuit`.

    >>> import pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> kept = pd.DataFrame({"kind": ["head", "head"], "layer": [0, 1], "head": [2, 3]})
    >>> [n.site.head for n in circuit_graph(lm, None, kept).nodes]
    [(0, 1, 3), (0, 1, 2)]
    """
    arch = model.arch
    per_position = "position" in kept and len(kept) > 0
    if per_position and data is None:
        raise DataError("a per-position circuit needs the data: its prompts' length gives the positions")
    positions = range(len(model.tokenizer(data.source[0])["input_ids"])) if per_position else ["all"]
    where = (lambda r: int(r.position)) if per_position else (lambda r: "all")
    heads = {(int(r.layer), int(r.head), where(r)) for r in kept.itertuples() if r.kind == "head"}
    mlps = {(int(r.layer), where(r)) for r in kept.itertuples() if r.kind == "mlp"}
    as_site = (lambda ps: tuple(ps)) if per_position else (lambda ps: "all")
    sites = []
    for layer in range(arch.n_layers):
        groups: dict = {}  # the heads outside the circuit -> the positions where they are
        for p in positions:
            outside = tuple(h for h in range(arch.heads("head_out", layer)) if (layer, h, p) not in heads)
            if outside:
                groups.setdefault(outside, []).append(p)
        for i, (outside, ps) in enumerate(groups.items()):
            name = f"outside{layer}_{i}" if per_position else f"outside{layer}"
            sites.append((name, Site("head_out", layer, positions=as_site(ps), head=outside)))
        ps = [p for p in positions if (layer, p) not in mlps]
        if nodes == "heads+mlps" and ps:
            sites.append((f"outside_mlp{layer}", Site("mlp_out", layer, positions=as_site(ps))))
    units = sum(arch.heads("head_out", layer) for layer in range(arch.n_layers))
    units = (units + (arch.n_layers if nodes == "heads+mlps" else 0)) * len(positions)
    kept = kept.reset_index(drop=True)
    circuit = Circuit(kept=kept, settings=dict(nodes=nodes, ablate=ablate, per_position=per_position), total=units)
    means = _means(model, data, [s for _, s in sites]) if ablate == "mean" else {}
    for name, site in sites:
        op = Patch(STREAM) if ablate == "corrupt" else Ablate("mean", value=means[site])
        circuit.add(site, op, name=name)
    return circuit


class Circuit(Graph):
    """A circuit as a graph: the nodes it keeps (``kept``), the settings that found it, and
    the patch nodes that run it (every node outside the circuit patched).

    >>> import pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> circuit = circuit_graph(lm, None, pd.DataFrame({"kind": ["head"], "layer": [1], "head": [2]}))
    >>> circuit.kept.values.tolist(), circuit.total, circuit.settings["ablate"]
    ([['head', 1, 2]], 8, 'corrupt')
    >>> print(circuit)
    Circuit: keeps 1 of 8 heads: L1H2
      runs as 2 patch nodes; the heads outside read the corrupted run (stream 'corrupt')
      outside0: Patch head_out[0].h0+h1+h2+h3 pos=all
      outside1: Patch head_out[1].h0+h1+h3 pos=all

    It runs, saves, draws and composes like any :class:`~reftgraph.Graph` (a saved circuit
    loads as a plain Graph: :func:`members` reads the kept nodes back from its nodes).
    In a notebook it shows the kept nodes as a table, scores included.
    """

    def __init__(self, nodes=(), kept: Optional[pd.DataFrame] = None, settings: Optional[dict] = None,
                 total: int = 0):
        super().__init__(nodes)
        self.kept = pd.DataFrame(columns=["kind", "layer", "head"]) if kept is None else kept
        self.settings = dict(settings or {})
        self.total = total

    def _headline(self) -> str:
        what = "heads" if self.settings.get("nodes", "heads") == "heads" else "heads and MLPs"
        per_position = "position" in self.kept
        names = [(f"L{int(r.layer)}H{int(r.head)}" if r.kind == "head" else f"MLP{int(r.layer)}")
                 + (f"@{int(r.position)}" if per_position else "") for r in self.kept.itertuples()]
        shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
        counted = f"{len(self.kept)} of {self.total} {what}" if self.total else f"{len(self.kept)} {what}"
        if per_position:
            counted += " (at positions)"
        if "score" in self.kept and len(self.kept) > 1:
            counted += ", best first"
        return f"Circuit: keeps {counted}" + (f": {shown}" if shown else "")

    def _outside(self) -> str:
        how = ("take their mean over the corrupted prompts" if self.settings.get("ablate") == "mean"
               else f"read the corrupted run (stream {STREAM!r})")
        what = "heads" if self.settings.get("nodes", "heads") == "heads" else "heads and MLPs"
        return f"runs as {len(self)} patch nodes; the {what} outside {how}"

    def __repr__(self) -> str:
        return "\n".join([self._headline(), f"  {self._outside()}"] + [f"  {n}" for n in self.nodes])

    def _repr_html_(self) -> str:
        found = ", ".join(f"{k}={v}" for k, v in self.settings.items() if v is not None)
        kept = self.kept.copy()
        for column in ("estimate", "score"):
            if column in kept:
                kept[column] = kept[column].astype(float).round(4)
        return (f"<p><b>{html.escape(self._headline())}</b><br>{html.escape(self._outside())}"
                + (f"<br><small>{html.escape(found)}</small>" if found else "") + "</p>"
                + kept.to_html(index=False, na_rep="", max_rows=40)
                + f"<details><summary>{len(self)} patch nodes</summary>"
                + self.summary().to_html(index=False, na_rep="", max_rows=60) + "</details>")


def _means(model, data, sites) -> dict:
    """Each site's mean over the corrupted prompts: over rows and positions for a site at
    all positions, per position for a site at listed positions."""
    if data is None:
        raise DataError("ablate='mean' needs the data, whose corrupted prompts give the means")
    g = Graph()
    for i, site in enumerate(sites):
        g.add(site, Collect(), name=str(i))
    out = run(g, model, data.base, grad=False, logits="last")
    means = {}
    for i, site in enumerate(sites):
        over = (0,) if isinstance(site.positions, tuple) else (0, 1)
        means[site] = masked_mean(out[str(i)], out.valid[str(i)], over)
    return means


def members(graph: Graph, model) -> pd.DataFrame:
    """The nodes a circuit graph keeps: ``kind`` (``"head"``/``"mlp"``), ``layer``, ``head``.

    >>> import pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> kept = pd.DataFrame({"kind": ["head"], "layer": [1], "head": [2]})
    >>> members(circuit_graph(lm, None, kept), lm).values.tolist()
    [['head', 1, 2]]
    """
    model = as_model(model)
    arch = model.arch
    per_position = any(isinstance(n.site.positions, tuple) for n in graph.nodes)
    universe = sorted({p for n in graph.nodes for p in n.site.positions}) if per_position else [None]
    patched, scored_mlps = set(), False
    for node in graph.nodes:
        site = node.site
        layer = arch.layer_index(site.layer)
        positions = site.positions if per_position else [None]
        if site.component == "head_out":
            heads = site.head if isinstance(site.head, tuple) else (site.head,)
            patched |= {("head", layer, h, p) for h in heads for p in positions}
        elif site.component == "mlp_out":
            scored_mlps = True
            patched |= {("mlp", layer, None, p) for p in positions}
    rows = [("head", layer, h, p) for layer in range(arch.n_layers) for h in range(arch.heads("head_out", layer))
            for p in universe]
    if scored_mlps:
        rows += [("mlp", layer, None, p) for layer in range(arch.n_layers) for p in universe]
    out = pd.DataFrame([r for r in rows if r not in patched], columns=["kind", "layer", "head", "position"])
    return out if per_position else out.drop(columns="position")


def faithfulness(graph: Graph, model, data: Counterfactual, metric="logit_diff", progress: bool = True) -> dict:
    """Run a circuit graph on the clean prompts and compare it with the full model.

    >>> import pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> everything = pd.DataFrame({"kind": "head", "layer": [0] * 4 + [1] * 4, "head": list(range(4)) * 2})
    >>> round(faithfulness(circuit_graph(lm, data, everything), lm, data)["faithfulness"], 6)    # nothing patched
    1.0

    Returns ``circuit`` (the metric with the graph), ``full`` (the clean run), ``empty``
    (every node of the graph's kind patched), ``faithfulness = circuit / full`` and
    ``normalised = (circuit - empty) / (full - empty)``, with ``size`` the nodes kept.
    ``progress=False`` hides the progress bar of the three runs.
    """
    model = as_model(model)
    _check(data, "heads")
    kept = members(graph, model)
    nodes = "heads+mlps" if (kept["kind"] == "mlp").any() or any(n.site.component == "mlp_out" for n in graph.nodes) \
        else "heads"
    ablate = "mean" if any(isinstance(n.op, Ablate) for n in graph.nodes) else "corrupt"
    empty = circuit_graph(model, data, kept.iloc[:0], nodes, ablate)
    full, (circuit, nothing) = metric_runs(model, data, [graph, empty], metric, progress)
    return _summary(len(kept), circuit, full, nothing)


def _summary(size: int, circuit: float, full: float, empty: float) -> dict:
    return {"size": size, "circuit": circuit, "full": full, "empty": empty,
            "faithfulness": circuit / full, "normalised": (circuit - empty) / (full - empty)}


def curve(model, data: Counterfactual, sizes: Sequence = (1, 2, 4, 8), nodes: str = "heads",
          methods: Sequence[str] = ("atp",), ig_steps: int = 5, ablate: str = "corrupt",
          metric="logit_diff", rank: str = "effect", per_position: bool = False,
          progress: bool = True) -> pd.DataFrame:
    """Faithfulness against circuit size, one circuit per size and method, each one run.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> df = curve(lm, data, sizes=[2, 8], methods=["atp", "ig"], ig_steps=2)
    >>> df[["method", "size"]].values.tolist(), round(float(df["faithfulness"].iloc[-1]), 6)
    ([['atp', 2], ['atp', 8], ['ig', 2], ['ig', 8]], 1.0)

    Columns: ``method``, ``size`` (nodes kept), ``fraction`` (of all nodes), ``circuit``,
    ``full``, ``empty``, ``faithfulness``, ``normalised``. Draw it with :func:`plot_curve`.
    Progress bars count the attribution passes and the runs (``progress=False`` hides them).
    """
    model = as_model(model, one_stack="rg.circuits.curve")
    _check(data, nodes)
    rows = []
    for size in sizes:
        _count(size, _n_nodes(model, data, nodes, per_position))
    for method in methods:
        table = scores(model, data, nodes, method, ig_steps, metric, rank, per_position, progress)
        counts = [_count(s, len(table)) for s in sizes]
        order = table.sort_values("score", ascending=False, kind="stable")
        graphs = [circuit_graph(model, data, order.head(k), nodes, ablate) for k in counts]
        empty = circuit_graph(model, data, order.head(0), nodes, ablate)
        full, values = metric_runs(model, data, graphs + [empty], metric, progress)
        nothing = values.pop()
        for k, value in zip(counts, values):
            rows.append({"method": method, "size": k, "fraction": k / len(table), **_summary(k, value, full, nothing)})
    return pd.DataFrame(rows)


def draw(graph: Graph, model, table: Optional[pd.DataFrame] = None, ax=None):
    """Draw a circuit graph's kept nodes by layer (see :func:`reftgraph.viz.circuits.draw_circuit`);
    returns the figure. A :class:`Circuit` found by :func:`discover` colours them by score.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> kept = pd.DataFrame({"kind": ["head", "head"], "layer": [0, 1], "head": [2, 3]})
    >>> draw(circuit_graph(lm, None, kept), lm).axes[0].get_title()
    'circuit: 2 heads'
    """
    model = as_model(model)
    if table is None and isinstance(graph, Circuit) and "score" in graph.kept:
        table = graph.kept
    return draw_circuit(members(graph, model), model.arch.n_layers, model.arch.n_heads, table, ax)


def top_layers(table: pd.DataFrame, k: int) -> list:
    """The ``k`` layers with the largest summed attribution score, in layer order: sites for
    :func:`reftgraph.reft_graph` chosen by attribution (an "automatic ReFT").

    >>> import pandas as pd
    >>> top_layers(pd.DataFrame({"layer": [0, 0, 1, 2], "score": [0.1, 0.2, 0.9, 0.05]}), 2)
    [0, 1]
    """
    if "score" not in table:
        table = table.assign(score=table["estimate"].abs())
    per_layer = table.groupby("layer")["score"].sum().sort_values(ascending=False, kind="stable")
    if not 1 <= k <= len(per_layer):
        raise DataError(f"top_layers: k={k}; valid 1..{len(per_layer)} (the layers scored)")
    return sorted(int(x) for x in per_layer.index[:k])


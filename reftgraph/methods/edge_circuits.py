"""Edge circuits as graphs you run: each receiver reads the stream with the writes of the
senders outside the circuit replaced by their corrupted writes, in the same forward.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
>>> circuit = discover_edges(lm, data, size=10)
>>> circuit.total, len(circuit.kept), sorted(circuit.streams)
(82, 10, ['base', 'corrupt'])
>>> out = circuit.run(lm, data.source, sources={"corrupt": data.base})

The circuit runs on the clean prompts (``data.source``) beside the corrupted ones (stream
``"corrupt"``, ``data.base``). Every sender's write is recorded in both streams as the
forward reaches it (a head's through its slice of the output projection); a receiver with
senders outside the circuit reads ``its stream + sum over those senders of (corrupted write -
live write)`` through its own copy (``q_in``, ``k_in``, ``v_in``, ``mlp_in``, ``logits_in``). The
live write is the one of this run: a sender whose own inputs were changed writes its changed
value. With every edge kept the run is the clean run; with none, the corrupted run. (As MIB's
``evaluate_graph`` in ``hannamw/EAP-IG``.)
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.graph import Graph
from ..core.masks import masked_mean
from ..core.ops.base import Op
from ..core.sites import Site
from ..engine import as_model, run
from ..errors import DataError, GraphFileError
from ..files import atomic_dir
from ..training.counterfactual import Counterfactual
from ..viz.circuits import draw_edges as _draw, plot_mib
from ..viz.progress import progress_bar
from .edges import edge_scores, edges, out_maps, receiver_site, sender_graph, sender_sites, units
from .patching.attribution import positions_in
from .patching.metrics import Reference, get_metric

__all__ = ["EdgeCircuit", "carrying", "edge_circuit", "discover_edges", "edge_faithfulness", "load_edge_circuit",
           "mean_writes", "metric_runs", "mib", "mib_areas", "MIB_FRACTIONS", "draw_edges", "node_edges", "plot_mib"]

STREAM = "corrupt"
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)   # MIB's circuit sizes


class _Wiring:
    """The writes of every sender in one forward, per stream, as the forward reaches them; and,
    per sender site (in forward order: ``keys``), its ablated write less its live one (the
    corrupted write, or the mean: ``means``) and the running sum of those, each computed once
    per forward when a receiver first needs it."""

    def __init__(self, keys, means=None):
        self.keys, self.means = list(keys), means
        self.writes, self.valid = {}, {}
        self.diffs, self.sums = {}, []

    def clear(self):
        """Let go of this forward's writes and what was derived from them."""
        self.writes, self.valid, self.diffs, self.sums = {}, {}, {}, []

    def record(self, key, write, valid):
        if key == ("base", self.keys[0]):      # a new forward (after one that stopped early, too)
            self.clear()
        self.writes[key] = write
        self.valid[key[0]] = valid

    def diff(self, key) -> torch.Tensor:
        """``[B, k, (heads,) d]``: what sender site ``key`` wrote ablated, less what it wrote live."""
        if key not in self.diffs:
            live, corrupt = self.valid.get("base"), self.valid.get(STREAM)
            if live is not None and corrupt is not None and not torch.equal(live, corrupt):
                raise DataError("an edge circuit gives each receiver the corrupted writes token for token: the "
                                "clean prompts and the corrupted ones (stream 'corrupt') must have equal lengths, "
                                "row by row")
            live = self.writes[("base", key)]
            ablated = self.writes[(STREAM, key)] if self.means is None else self.means[key].to(live.dtype)
            self.diffs[key] = ablated - live
        return self.diffs[key]

    def upstream(self, n: int) -> torch.Tensor:
        """``[B, k, d]``: the sum of :meth:`diff` over the first ``n`` sender sites (all heads)."""
        while len(self.sums) < n:
            d = self.diff(self.keys[len(self.sums)])
            d = d.sum(2) if d.dim() == 4 else d
            self.sums.append(d if not self.sums else self.sums[-1] + d)
        return self.sums[n - 1]


class _Send(Op):
    """Records what the senders at its site wrote (``[B, k, (senders,) d]``); changes nothing."""

    def __init__(self, wiring, key, out_map=None):
        super().__init__()
        self.wiring, self.key, self.out_map = wiring, key, out_map

    def forward(self, h, source=None, valid=None):
        self.wiring.record(self.key, h if self.out_map is None else self.out_map(h), valid)
        return h


class _Release(Op):
    """The circuit's last node: the forward is past every receiver, so the wiring lets go of its
    writes (a circuit kept for later holds no activations)."""

    def __init__(self, wiring):
        super().__init__()
        self.wiring = wiring

    def forward(self, h, source=None, valid=None):
        self.wiring.clear()
        return h


class _Read(Op):
    """A receiver's copy of the stream with its outside senders' live writes replaced by their
    ablated ones (corrupted, or means). ``groups`` lists ``(sender site key, weights)``:
    ``weights`` ``[heads]`` for a layer's heads, ``[]`` otherwise, with a last dim of tokens
    in per-position circuits. With ``upstream`` None the weights mark the senders outside,
    and the copy moves by ``sum of weights * diff``; otherwise they mark the senders kept, and
    the copy moves by the sum of the ``upstream`` sender sites' diffs less that (fewer sums
    either way: the builder picks the shorter list). ``tokens``: the prompts' length, for a
    per-position circuit."""

    def __init__(self, wiring, groups, upstream: Optional[int] = None, tokens: Optional[int] = None):
        super().__init__()
        self.wiring, self.groups, self.upstream, self.tokens = wiring, groups, upstream, tokens

    def forward(self, h, source=None, valid=None):
        picked = 0
        for key, weights in self.groups:
            diff = self.wiring.diff(key)
            if self.tokens and self.tokens != diff.shape[1]:
                raise DataError(f"this edge circuit keeps edges per position for prompts of {self.tokens} "
                                f"tokens; these prompts have {diff.shape[1]}")
            w = weights.to(diff.dtype)
            if diff.dim() == 4:          # a layer's heads: [B, k, H, d] by [H] or [H, tokens]
                part = (diff * (w[:, None] if w.dim() == 1 else w.T[None, :, :, None])).sum(2)
            else:
                part = diff * (w[None, :, None] if w.dim() else w)
            picked = picked + part
        shift = picked if self.upstream is None else self.wiring.upstream(self.upstream) - picked
        if valid is not None:
            shift = shift * valid[..., None].to(shift.dtype)
        return h + (shift[:, :, None] if h.dim() == 4 else shift).to(h.dtype)


class EdgeCircuit(Graph):
    """An edge circuit as a graph: the edges it keeps (``kept``: sender, receiver, scores if
    found by :func:`discover_edges`), how many edges the model has (``total``) and the settings.

    >>> import pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> circuit = edge_circuit(lm, pd.DataFrame({"sender": ["a0.h1"], "receiver": ["logits"]}))
    >>> print(circuit)
    EdgeCircuit: keeps 1 of 82 edges: a0.h1 -> logits
      runs as 30 nodes: 10 record the senders' writes (both streams), 19 receivers read the corrupted writes of the senders outside

    It runs like any :class:`~reftgraph.Graph` (with ``sources={"corrupt": corrupted prompts}``;
    a mean-ablated circuit, ``settings["ablate"] == "mean"``, reads no other stream: its outside
    senders write ``means``); :meth:`save` writes it as what it is, its edges, settings and
    means, and :func:`load_edge_circuit` rebuilds it for a model.
    """

    def __init__(self, nodes=(), kept: Optional[pd.DataFrame] = None, total: int = 0,
                 settings: Optional[dict] = None, means: Optional[dict] = None):
        super().__init__(nodes)
        self.kept = pd.DataFrame(columns=["sender", "receiver"]) if kept is None else kept
        self.total = total
        self.settings = dict(settings or {})
        self.means = means

    def save(self, path, model=None) -> Path:
        """Write ``path/edge_circuit.json``: the kept edges (with their scores when found),
        the model's edge count and the settings; the folder is replaced whole, or not at all.

        >>> import tempfile, pandas as pd, reftgraph as rg
        >>> lm = rg.models.tiny("llama")
        >>> path = edge_circuit(lm, pd.DataFrame({"sender": ["a0.h1"], "receiver": ["logits"]})).save(
        ...     tempfile.mkdtemp() + "/c", model=lm)
        >>> load_edge_circuit(path, lm).kept.values.tolist()
        [['a0.h1', 'logits']]
        """
        columns = [c for c in ("sender", "receiver", "position", "score") if c in self.kept]
        kind = {"score": float, "position": int}
        kept = {c: [kind.get(c, str)(v) for v in self.kept[c]] for c in columns}
        info = {"family": model.arch.family.name, "name": model.name} if model is not None else None
        text = json.dumps({"format": "reftgraph edge circuit", "version": 1, "model": info, "total": self.total,
                           "settings": self.settings, "kept": kept}, allow_nan=False)
        with atomic_dir(path) as tmp:
            (tmp / EDGE_FILE).write_text(text)
            if self.means is not None:
                save_file({k: v.detach().float().contiguous() for k, v in self.means.items()}, str(tmp / MEANS_FILE))
        return Path(path)

    def _lines(self) -> tuple:
        at = [f" @{p}" for p in self.kept.position] if "position" in self.kept else [""] * len(self.kept)
        names = [f"{s} -> {r}{p}" for s, r, p in zip(self.kept.sender, self.kept.receiver, at)]
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        sends = sum(isinstance(n.op, _Send) for n in self.nodes)
        reads = sum(isinstance(n.op, _Read) for n in self.nodes)
        streams, what = ("the clean stream", "mean") if self.means is not None else ("both streams", "corrupted")
        unit = "(edge, token) pairs" if "position" in self.kept else "edges"
        return (f"EdgeCircuit: keeps {len(self.kept)} of {self.total} {unit}" + (f": {shown}" if shown else ""),
                f"runs as {len(self)} nodes: {sends} record the senders' writes ({streams}), "
                f"{reads} receivers read the {what} writes of the senders outside")

    def __repr__(self) -> str:
        head, runs = self._lines()
        return f"{head}\n  {runs}"

    def _repr_html_(self) -> str:
        head, runs = self._lines()
        kept = self.kept.copy()
        if "score" in kept:
            kept["score"] = kept["score"].astype(float).round(4)
        count = f"EdgeCircuit: keeps {len(self.kept)} of {self.total} edges"     # the edges: the table below
        return (f"<p><b>{html.escape(count)}</b><br>{html.escape(runs)}</p>"
                + kept.to_html(index=False, na_rep="", max_rows=30))


def _site_key(sender) -> tuple:
    """``(site name, index)`` of a sender: its writes are recorded per site (all heads at once)."""
    if sender.kind == "head":
        return f"a{sender.layer}", sender.head
    return sender.name, None


def edge_circuit(model, kept: pd.DataFrame, settings: Optional[dict] = None, ablate: str = "corrupt",
                 data: Optional[Counterfactual] = None, means: Optional[dict] = None) -> EdgeCircuit:
    """The graph that runs the edges of ``kept`` (rows with ``sender`` and ``receiver`` names
    from :func:`~reftgraph.circuits.edges`) and gives every other edge its corrupted write.

    >>> import pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> len(edge_circuit(lm, rg.circuits.edges(lm)).nodes)      # every edge kept: the senders are only recorded
    11

    ``ablate="mean"``: every other edge gives its receiver the sender's mean write over the
    corrupted prompts of ``data`` (over rows and positions; or ``means``, as
    :func:`mean_writes` gives them) instead, so the circuit runs on the clean prompts alone.
    """
    model = as_model(model)
    if ablate not in ("corrupt", "mean"):
        raise DataError(f"ablate must be 'corrupt' or 'mean', got {ablate!r}")
    settings = dict(settings or {})
    tokens = settings.get("positions")            # per-position circuits: (edge, token) units over this many tokens
    if "position" in kept and tokens is None:
        raise DataError("a circuit of edges per position needs settings={'positions': the prompts' token count}")
    if ablate == "mean" and means is None:
        if data is None:
            raise DataError("ablate='mean' needs data (its corrupted prompts give the senders' mean writes)")
        means = mean_writes(model, data)
    arch = model.arch
    table = edges(model)
    everything = set(zip(table.sender, table.receiver))
    wanted = set(zip(kept.sender, kept.receiver))
    unknown = sorted(wanted - everything)
    if unknown:
        raise DataError(f"{len(unknown)} edges of the circuit are not edges of this model, e.g. "
                        f"{unknown[0][0]} -> {unknown[0][1]} (rg.circuits.edges(model) lists them)")
    senders, receivers = units(arch)
    sites = sender_sites(arch)
    wiring, maps = _Wiring([name for name, _ in sites], means if ablate == "mean" else None), out_maps(model)
    circuit = EdgeCircuit(kept=kept.reset_index(drop=True), total=len(table) * (tokens or 1),
                          settings={**settings, "ablate": ablate}, means=means if ablate == "mean" else None)
    for stream in ("base",) if ablate == "mean" else ("base", STREAM):
        for name, site in sites:
            out_map = maps[site.layer] if site.component == "head_out" else None
            circuit.add(site, _Send(wiring, (stream, name), out_map), name=f"send {stream} {name}", stream=stream)
    # kept[e, t]: edge e kept (at token t); then per receiver, per sender site, weights over its
    # heads (and tokens) for the senders outside, or for those kept where they are fewer
    row = {pair: i for i, pair in enumerate(zip(table.sender, table.receiver))}
    held = np.zeros((len(table), tokens or 1), dtype=np.float32)
    if tokens:
        held[[row[pair] for pair in zip(kept.sender, kept.receiver)], kept.position.to_numpy(dtype=int)] = 1
    else:
        held[[row[pair] for pair in wanted], 0] = 1
    site = {name: i for i, (name, _) in enumerate(sites)}
    where = {s.name: (site[_site_key(s)[0]], -1 if s.head is None else s.head) for s in senders}
    key_of = np.array([where[s][0] for s in table.sender])
    head_of = np.array([where[s][1] for s in table.sender])
    names = table.receiver.to_numpy()
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]])     # (the table runs receiver by receiver)
    by_receiver = {names[a]: slice(a, b) for a, b in zip(starts, np.r_[starts[1:], len(names)])}
    for r in receivers:
        rows = by_receiver[r.name]
        held_r, keys_r, heads_r = held[rows], key_of[rows], head_of[rows]
        out_keys = np.unique(keys_r[(held_r < 1).any(1)])
        if not len(out_keys):              # every sender kept: the receiver reads its stream as it is
            continue
        in_keys = np.unique(keys_r[(held_r > 0).any(1)])
        kept_side = len(in_keys) < len(out_keys)
        groups = []
        for k in (in_keys if kept_side else out_keys):
            mine = keys_r == k
            w = held_r[mine] if kept_side else 1 - held_r[mine]          # [senders here, tokens or 1]
            if heads_r[mine][0] >= 0:       # a layer's heads: [H, (tokens)]
                full = np.zeros((arch.heads("head_out", sites[k][1].layer), w.shape[1]), dtype=np.float32)
                full[heads_r[mine]] = w
                w = full
            w = torch.from_numpy(w if tokens else w[..., 0])
            groups.append((sites[k][0], w[0] if w.dim() and heads_r[mine][0] < 0 else w))
        read = _Read(wiring, groups, int(keys_r.max()) + 1 if kept_side else None, tokens)
        circuit.add(receiver_site(r), read, name=f"read {r.name.replace('.', ' ')}")
    circuit.add(Site("logits_in"), _Release(wiring), name="release")
    return circuit


def mean_writes(model, data: Counterfactual) -> dict:
    """Each sender's mean write over the corrupted prompts (``data.base``; rows and positions):
    ``{"input": [d], "a{L}": [heads, d], "m{L}": [d]}``.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d"], ["ab d c"], correct=["c"], wrong=["d"])
    >>> {k: list(v.shape) for k, v in mean_writes(lm, data).items() if k in ("input", "a0")}
    {'input': [32], 'a0': [4, 32]}
    """
    model = as_model(model, one_stack="rg.circuits.mean_writes")
    arch, maps = model.arch, out_maps(model)
    out = run(sender_graph(arch), model, data.base, grad=False, logits="last")
    means = {}
    for name, site in sender_sites(arch):
        value, valid = out[name].float(), out.valid[name]
        if site.component == "head_out":
            write = maps[site.layer]
            means[name] = torch.einsum("he,hed->hd", masked_mean(write.scaled(value), valid, (0, 1)), write.maps)
        else:
            means[name] = masked_mean(value, valid, (0, 1))
    return means


EDGE_FILE, MEANS_FILE = "edge_circuit.json", "means.safetensors"
MAX_EDGE_BYTES = 256 * 2**20


def load_edge_circuit(path, model) -> EdgeCircuit:
    """The edge circuit saved at ``path`` (:meth:`EdgeCircuit.save`), rebuilt for ``model``.

    >>> import tempfile, pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> path = edge_circuit(lm, rg.circuits.edges(lm).head(4)).save(tempfile.mkdtemp() + "/c")
    >>> len(load_edge_circuit(path, lm).kept)
    4

    Refused, with the reason: a folder without the file, a file that is not an edge circuit,
    and a model of another family, or with another edge count, than the one it was saved for.
    """
    model = as_model(model)
    file = Path(path) / EDGE_FILE
    if not file.is_file():
        raise GraphFileError(f"{path} holds no edge circuit ({EDGE_FILE} is missing)")
    if file.stat().st_size > MAX_EDGE_BYTES:
        raise GraphFileError(f"{file} is {file.stat().st_size} bytes; an edge circuit is at most {MAX_EDGE_BYTES}")
    try:
        saved = json.loads(file.read_text())
        kept = pd.DataFrame(saved["kept"])
        total, settings = int(saved["total"]), dict(saved["settings"])
        if saved.get("format") != "reftgraph edge circuit" or not {"sender", "receiver"} <= set(kept.columns):
            raise ValueError("not an edge circuit")
    except (ValueError, KeyError, TypeError) as e:
        raise GraphFileError(f"{file} is not a saved edge circuit ({e})") from None
    info, family = saved.get("model") or {}, model.arch.family.name
    if info.get("family") not in (None, family):
        raise GraphFileError(f"{file} was saved for a {info['family']} model ({info.get('name')}); "
                             f"{model.name or 'this model'} is {family}")
    n = len(edges(model)) * int(settings.get("positions") or 1)
    if total != n:
        raise GraphFileError(f"{file} was saved for a model with {total} edges; {model.name or 'this model'} has {n}")
    means = None
    if settings.get("ablate") == "mean":
        try:
            with safe_open(str(Path(path) / MEANS_FILE), "pt") as f:
                means = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise GraphFileError(f"{path}: a mean-ablated circuit needs {MEANS_FILE} ({e})") from None
    return edge_circuit(model, kept, settings, settings.get("ablate", "corrupt"), means=means)


def draw_edges(circuit: EdgeCircuit, model, ax=None):
    """Draw an edge circuit's kept edges by layer (line widths by score when it has them); the figure.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> draw_edges(edge_circuit(lm, rg.circuits.edges(lm).head(3)), lm).axes[0].get_title()
    'edge circuit: 3 edges'
    """
    arch = as_model(model).arch
    return _draw(circuit.kept, arch.n_layers, arch.n_heads, max(1, arch.n_heads // max(1, arch.n_kv_heads)), ax)


def _size(size, n: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise DataError(f"size must be a number of edges (int) or a fraction of them (float), got {size!r}")
    if isinstance(size, float) and not 0 < size <= 1:
        raise DataError(f"a circuit size given as a fraction must be in (0, 1], got {size}")
    count = size if isinstance(size, int) else max(1, int(size * n))
    if not 0 <= count <= n:
        raise DataError(f"circuit size {size} keeps {count} edges; valid sizes: 0..{n} edges (or a fraction)")
    return count


def discover_edges(model, data: Counterfactual, size: Union[int, float] = 0.05, method: str = "eap",
                   steps: int = 5, metric="logit_diff", table: Optional[pd.DataFrame] = None,
                   progress: bool = True, ablate: str = "corrupt", per_position: bool = False) -> EdgeCircuit:
    """The edge circuit of the ``size`` edges with the largest absolute scores.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> discover_edges(lm, data, size=0.05).kept.columns.tolist()[:3]
    ['sender', 'receiver', 'sender_kind']

    ``size``: a number of edges or a fraction of all of them; ``method``, ``steps``, ``metric``:
    see :func:`~reftgraph.circuits.edge_scores`; ``table``: its scores, to reuse them;
    ``ablate``: what the edges outside carry, as in :func:`edge_circuit`. ``per_position=True``
    keeps (edge, token) pairs (prompts of one length): an edge may carry its clean write at some
    tokens and its ablated one at the others; ``size`` then counts such pairs.
    """
    model = as_model(model, one_stack="rg.circuits.discover_edges")
    if table is None:
        _size(size, len(edges(model)))            # a bad size fails before any forward
        table = edge_scores(model, data, method, metric, steps, progress, per_position=per_position)
    count = _size(size, len(table))
    order = table.reindex(table.score.abs().sort_values(ascending=False, kind="stable").index)
    settings = dict(size=size, method=table.attrs.get("method", method))
    if "position" in table:
        settings["positions"] = positions_in(table)
    return edge_circuit(model, order.head(count), settings, ablate, data)


def metric_runs(model, data, graphs: Sequence, metric, progress: bool = True) -> tuple:
    """``(clean, [value per graph])``: the metric's mean on the clean prompts, for the clean run
    and for each graph (a graph that reads stream ``"corrupt"`` gets the corrupted prompts).
    A function in ``graphs`` builds its graph when its run comes.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d"], ["ab d c"], correct=["c"], wrong=["d"])
    >>> clean, (same,) = metric_runs(lm, data, [rg.Graph()], "logit_diff", progress=False)
    >>> clean == same
    True
    """
    _, metric_fn = get_metric(metric)
    correct, wrong = data.answer_ids(model, required=False)
    with progress_bar(total=len(graphs) + 1, desc="circuit runs", progress=progress, unit="run") as bar:
        clean = run(Graph(), model, data.source, grad=False, logits="last").next_token_logits
        bar.update(1)
        ref = Reference(correct, wrong, clean)
        values = []
        for g in graphs:
            g = g if isinstance(g, Graph) else g()
            sources = {STREAM: data.base} if STREAM in g.streams else None
            logits = run(g, model, data.source, sources=sources, grad=False, logits="last").next_token_logits
            values.append(metric_fn(logits, ref).mean().item())
            bar.update(1)
    return metric_fn(clean, ref).mean().item(), values


def _metric(model, data, graphs, metric, progress, means=None) -> tuple:
    """``(clean, empty, [value per graph])``: the empty circuit has every edge ablated
    (corrupted, or with ``means`` mean-ablated)."""
    empty = edge_circuit(model, edges(model).iloc[:0], ablate="corrupt" if means is None else "mean", means=means)
    full, values = metric_runs(model, data, [empty, *graphs], metric, progress)
    return full, values[0], values[1:]


def edge_faithfulness(circuit: EdgeCircuit, model, data: Counterfactual, metric="logit_diff",
                      progress: bool = True) -> dict:
    """Run an edge circuit on the clean prompts: ``circuit``, ``full`` (the clean run), ``empty``,
    ``faithfulness = circuit / full``, ``normalised = (circuit - empty) / (full - empty)``
    (MIB's faithfulness) and ``size`` (the edges kept).

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> everything = edge_circuit(lm, rg.circuits.edges(lm))
    >>> round(edge_faithfulness(everything, lm, data, progress=False)["normalised"], 4)
    1.0

    ``empty`` is the corrupted run, or for a mean-ablated circuit the circuit with every edge
    mean-ablated.
    """
    model = as_model(model)
    full, empty, (value,) = _metric(model, data, [circuit], metric, progress, circuit.means)
    return {"size": len(circuit.kept), "circuit": value, "full": full, "empty": empty,
            "faithfulness": value / full, "normalised": (value - empty) / (full - empty)}


def node_edges(model, nodes: pd.DataFrame) -> pd.DataFrame:
    """The edges between kept nodes (rows with ``kind`` ``"head"``/``"mlp"``, ``layer``, ``head``,
    as :func:`~reftgraph.circuits.scores` gives): the embeddings and the logits always kept,
    a key-value head's inputs kept with any of its query heads.

    >>> import pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> node_edges(lm, pd.DataFrame({"kind": ["head"], "layer": [1], "head": [2]})).receiver.tolist()
    ['a1.h2<q>', 'a1.h1<k>', 'a1.h1<v>', 'logits', 'logits']
    """
    model = as_model(model, one_stack="rg.circuits.node_edges")
    arch, table = model.arch, edges(model)
    heads = {(int(layer), int(head)) for kind, layer, head in nodes[["kind", "layer", "head"]].values if kind == "head"}
    mlps = {int(layer) for kind, layer in nodes[["kind", "layer"]].values if kind == "mlp"}
    group = lambda layer: max(1, arch.heads("q_in", layer) // max(1, arch.heads("k_in", layer)))  # noqa: E731

    def kept_sender(kind, layer, head):
        return kind == "input" or (kind == "head" and (layer, head) in heads) or (kind == "mlp" and layer in mlps)

    def kept_receiver(kind, layer, head):
        if kind == "logits":
            return True
        if kind == "mlp":
            return layer in mlps
        if kind == "q":
            return (layer, head) in heads
        return any((layer, head * group(layer) + i) in heads for i in range(group(layer)))

    keep = [kept_sender(sk, sl, sh) and kept_receiver(rk, rl, rh) for sk, sl, sh, rk, rl, rh in
            table[["sender_kind", "sender_layer", "sender_head", "receiver_kind", "receiver_layer",
                   "receiver_head"]].itertuples(index=False)]
    return table[keep].reset_index(drop=True)


def mib_areas(fractions: Sequence[float], faithfulness: Sequence[float], log_scale: bool = False) -> tuple:
    """MIB's ``(CPR, CMD)`` of a faithfulness curve: the areas under ``faithfulness`` and under
    ``|1 - faithfulness|``, by the trapezoid rule over the circuit sizes ``fractions``.

    >>> mib_areas((0.5, 1.0), (0.5, 1.0))
    (0.375, 0.125)

    Over the fractions' natural log with ``log_scale=True``. As ``evaluate_area_under_curve`` in
    MIB's ``MIB_circuit_track/evaluation.py``.
    """
    x = [math.log(f) if log_scale else f for f in fractions]
    cpr = cmd = 0.0
    for i in range(len(x) - 1):
        width = x[i + 1] - x[i]
        cpr += width * (faithfulness[i] + faithfulness[i + 1]) / 2
        cmd += width * (abs(1 - faithfulness[i]) + abs(1 - faithfulness[i + 1])) / 2
    return float(cpr), float(cmd)


def carrying(scores: pd.DataFrame) -> pd.Series:
    """How much each scored edge (or node) carries the behaviour: its estimated effect of
    being corrupted, signed so that positive moves the metric toward the corrupted run.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> table = rg.circuits.edge_scores(lm, data, progress=False)
    >>> table.attrs["corrupted"] > table.attrs["clean"], carrying(table).equals(table.score)  # (here corrupted scores higher)
    (True, True)

    Edge scores (:func:`~reftgraph.circuits.edge_scores`) are the change of the metric when the
    edge is corrupted, node scores (:func:`~reftgraph.circuits.scores`) carry it as
    ``estimate``; which way is toward the corrupted run comes from the metric of the clean and
    corrupted runs the scoring kept in the table's ``attrs``.
    """
    attrs = scores.attrs
    if "estimate" in scores and {"source", "base"} <= set(attrs):   # node scores: their source is the corrupted run
        effect, toward = scores.estimate, attrs["source"] - attrs["base"]
    elif "score" in scores and {"clean", "corrupted"} <= set(attrs):
        effect, toward = scores.score, attrs["corrupted"] - attrs["clean"]
    else:
        raise DataError("ranking by signed effect needs the scores' direction: a table from rg.circuits.edge_scores or "
                        "rg.circuits.scores (its attrs keep the clean and corrupted metric); or rank='absolute'")
    return effect * (1.0 if toward >= 0 else -1.0)


def mib(model, data: Counterfactual, scores: pd.DataFrame, fractions: Sequence[float] = MIB_FRACTIONS,
        metric="logit_diff", progress: bool = True, ablate: str = "corrupt", log_scale: bool = False,
        rank: str = "mib") -> dict:
    """MIB's circuit metrics for edge (or node) ``scores``: the faithfulness curves at
    ``fractions`` of all edges (or nodes), CPR and CMD.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> result = mib(lm, data, rg.circuits.edge_scores(lm, data, progress=False), fractions=(0.1, 0.5, 1.0), progress=False)
    >>> sorted(result), result["curve"].columns.tolist()
    (['cmd', 'cpr', 'cpr_curve', 'curve'], ['fraction', 'kept', 'edges', 'faithfulness'])

    As MIB's ``MIB_circuit_track/evaluation.py`` (``hannamw/MIB-circuit-track``,
    ``evaluate_area_under_curve``): a fraction f keeps the top ``int(f * n)`` of the ``n``
    scored edges (none at all when that is 0: the corrupted run). CMD ranks them by absolute
    score (``curve``); CPR, which rewards the edges that carry the behaviour, by signed effect
    (``cpr_curve``: :func:`carrying`, the top first; MIB's ``absolute=False``), so a partial
    circuit that leaves out edges working against the behaviour can beat the full model.
    ``rank="absolute"`` takes both from the absolute ranking (one curve). CPR / CMD are
    :func:`mib_areas` of their curves over the fractions themselves, linear as MIB's default
    (``log_scale=True``: over their log). Node scores (a table of
    :func:`~reftgraph.circuits.scores` with ``nodes="heads+mlps"``) keep the top fraction of the
    nodes, as MIB's ``level="node"``, and the circuit is the edges between them
    (:func:`node_edges`; ``edges`` in the curve counts them). ``ablate="mean"``: the edges
    outside carry their senders' mean writes (:func:`edge_circuit`). Per-position scores
    (``edge_scores(..., per_position=True)``) keep (edge, token) pairs. Unlike MIB, the circuits
    are not pruned: edges from senders no path reaches, or into receivers that reach nothing,
    stay in, which changes no run (their senders write their ablated values anyway, or their
    receivers' writes are ablated everywhere).
    """
    model = as_model(model, one_stack="rg.circuits.mib")
    if rank not in ("mib", "absolute"):
        raise DataError(f"rank must be 'mib' (CPR by signed effect, CMD by absolute score) or 'absolute', got {rank!r}")
    rankings = [scores.score.abs()] + ([carrying(scores)] if rank == "mib" else [])
    orders = [scores.reindex(value.sort_values(ascending=False, kind="stable").index) for value in rankings]
    counts = [int(f * len(scores)) for f in fractions]
    means = mean_writes(model, data) if ablate == "mean" else None
    per_token = {"positions": positions_in(scores)} if "position" in scores else None
    sizes = []          # the edges each circuit keeps, as it is built

    def circuit(order, k):      # built when its run comes: one circuit (and its edges) in memory at a time
        def build():
            kept = node_edges(model, order.head(k)) if "sender" not in scores else order.head(k)
            sizes.append(len(kept))
            return edge_circuit(model, kept, per_token, ablate=ablate, means=means)
        return build
    full, empty, values = _metric(model, data, [circuit(o, k) for o in orders for k in counts], metric, progress,
                                  means)
    faith = [(v - empty) / (full - empty) for v in values]
    n = len(counts)
    curves = [pd.DataFrame({"fraction": list(fractions), "kept": counts, "edges": sizes[i:i + n],
                            "faithfulness": faith[i:i + n]}) for i in range(0, len(values), n)]
    cmd = mib_areas(fractions, curves[0].faithfulness.tolist(), log_scale)[1]
    cpr = mib_areas(fractions, curves[-1].faithfulness.tolist(), log_scale)[0]
    return {"curve": curves[0], "cpr_curve": curves[-1], "cpr": cpr, "cmd": cmd}

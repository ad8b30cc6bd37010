"""What a trained node's subspace does: effects of ablating or steering each of its dims,
activations projected onto it, and principal angles between two nodes' subspaces.

>>> import torch, reftgraph as rg
>>> from reftgraph import subspace
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), rg.LoReFT(width=32, rank=3, seed=0), name="r")
>>> table = subspace.effects(g, "r", lm, ["ab", "cde"], metric=lambda logits: logits[:, 7])
>>> table[["node", "mode", "dims"]].values.tolist()[:4]
[['r', 'ablate', '0'], ['r', 'ablate', '1'], ['r', 'ablate', '2'], ['r', 'ablate', '0,1,2']]
>>> float(subspace.overlap(g["r"], g["r"]))
1.0

A node's basis (:func:`basis`) is the rows of R for the ReFT family (the site's
``subspace`` dims), the interchanged rows of R for ``Rotate``, the unit vector of ``Add``,
and the neuron basis for other ops (the site's ``subspace`` dims, or every dim).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

import pandas as pd
import torch

from ..core.graph import Graph, Node
from ..core.ops import Add, Collect, Without
from ..core.ops.reft import ReFT, orthonormal_columns
from ..core.ops.rotate import Rotate
from ..engine import Job, compile_graph, executor, inference_mode, last_token, prompt_list, run, tokenize
from ..viz.figure import new_figure
from .forwards import run_jobs


def basis(node: Node, model=None) -> tuple[list, torch.Tensor]:
    """``(dims, B)``: the node's basis dims and their directions as rows ``[n, width]`` in
    the coordinates the op sees (the site's subspace cut out for ops without a learned
    basis). ``model`` is needed only for the neuron basis of ops without a width.

    >>> import reftgraph as rg
    >>> node = rg.Node("r", rg.Site("resid_post", 0, subspace=(1, 3)), rg.LoReFT(width=8, rank=4))
    >>> dims, B = basis(node)
    >>> dims, tuple(B.shape)
    ([1, 3], (2, 8))
    """
    op, site = node.op, node.site
    with torch.no_grad():
        if isinstance(op, ReFT):
            dims = list(range(op.rank)) if site.subspace is None else list(site.subspace)
            return dims, op.R(dims).detach().float()
        if isinstance(op, Rotate):
            dims = op.dims(site.subspace)
            return dims, op.R(dims).detach().float()
        if isinstance(op, Add):
            v = op.vector.detach().float()
            return [0], (v / v.norm()).reshape(1, -1)
    if site.subspace is not None:
        return list(site.subspace), torch.eye(len(site.subspace))
    width = op.expected_width() or (model.arch.width(site.component) if model is not None else None)
    if width is None:
        raise ValueError(f"node {node.name!r} at {site}: {type(op).__name__} has no width; pass model=")
    return list(range(width)), torch.eye(width)


def _replace(graph: Graph, name: str, node: Optional[Node]) -> Graph:
    """The graph with node ``name`` replaced by ``node`` (or removed), order kept."""
    return Graph(node if n.name == name else n for n in graph.nodes if n.name != name or node is not None)


def _scores(graphs: list, model, prompts, sources, metric, remote=None, progress: bool = True) -> list:
    """The metric's mean over rows for each graph, on the source streams it reads (with
    ``remote``: one nnsight session, the means computed on the server)."""
    ex = executor(model, remote, graphs[0])
    prompts = prompt_list(prompts, "prompts")
    jobs = []
    for graph in graphs:
        streams = {"base": prompts}
        for name, src in (sources or {}).items():
            if name in graph.streams:
                src = prompt_list(src, f"sources[{name!r}]")
                streams[name] = src * len(prompts) if len(src) == 1 < len(prompts) else src
        inputs, batch = tokenize(model, streams)
        jobs.append(Job(compile_graph(graph, model.arch).bind(batch), inputs, lambda logits, _, batch=batch: float(
            torch.as_tensor(metric(last_token(logits, batch))).float().mean())))
    with torch.no_grad(), inference_mode(graphs[0]):
        return run_jobs(ex, jobs, progress=progress, desc="subspace effects")


def effects(graph: Graph, name: str, model, prompts, metric: Callable, sources: Optional[dict] = None,
            modes: Sequence[str] = ("ablate", "steer"), groups: Optional[Sequence] = None,
            scale: float = 4.0, remote=None, progress: bool = True) -> pd.DataFrame:
    """Effect of each dim (and group of dims) of node ``name``'s subspace on ``metric``.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="r")
    >>> table = effects(g, "r", rg.models.tiny("llama"), ["ab", "cd"], metric=lambda logits: logits[:, 5])
    >>> table["mode"].tolist(), table["dims"].tolist()
    (['ablate', 'ablate', 'ablate', 'steer', 'steer', 'steer'], ['0', '1', '0,1', '0', '1', '0,1'])

    ``metric(next_token_logits [B, vocab])`` returns one value per row (or one number);
    its mean is reported. ``ablate``: the graph with the node's edit along the group's
    directions removed, against the whole graph. ``steer``: the graph without the node
    plus ``Add(scale * sum of the group's directions)`` at its site, against the graph
    without the node. ``groups`` are tuples of basis dims (default: each dim, then all).
    Returns columns ``node, mode, dims, metric, reference, effect`` (metric - reference).
    ``remote`` as in :func:`reftgraph.patching.sweep`: every graph is a trace of one nnsight
    session and only the metric's means come back. ``progress=False`` hides the progress bar.
    """
    node = graph[name]
    dims, B = basis(node, model)
    index = {d: i for i, d in enumerate(dims)}
    if groups is None:
        groups = [(d,) for d in dims] + ([tuple(dims)] if len(dims) > 1 else [])
    for grp in groups:
        bad = [d for d in grp if d not in index]
        if bad:
            raise ValueError(f"node {name!r} at {node.site}: dim {bad[0]} is not in its subspace {dims}")
    unknown = set(modes) - {"ablate", "steer"}
    if unknown:
        raise ValueError(f"modes must be 'ablate' and/or 'steer', got {sorted(unknown)}")
    steer_site = replace(node.site, subspace=None) if node.op.learned_basis else node.site
    graphs, labels = [], []
    for mode in modes:
        graphs.append(graph if mode == "ablate" else _replace(graph, name, None))
        labels.append((mode, None))
        for grp in groups:
            directions = B[[index[d] for d in grp]]
            if mode == "ablate":
                op, site = Without(node.op, orthonormal_rows(directions)), node.site
            else:
                op, site = Add(scale * directions.sum(0)), steer_site
            graphs.append(_replace(graph, name, Node(name, site, op, node.stream)))
            labels.append((mode, grp))
    rows = []
    for (mode, grp), value in zip(labels, _scores(graphs, model, prompts, sources, metric, remote, progress)):
        if grp is None:
            reference = value
            continue
        rows.append({"node": name, "mode": mode, "dims": ",".join(map(str, grp)), "metric": value,
                     "reference": reference, "effect": value - reference})
    return pd.DataFrame(rows, columns=["node", "mode", "dims", "metric", "reference", "effect"])


def orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the rows' span (rows in, rows out).

    >>> q = orthonormal_rows(torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    >>> torch.allclose(q @ q.T, torch.eye(2)), torch.allclose(q.abs(), torch.eye(3)[:2])
    (True, True)
    """
    return orthonormal_columns(rows.T).T


def plot_effects(table: pd.DataFrame, ax=None):
    """Bars of ``effect`` per dims group (one colour per mode) for one node; a heatmap
    (rows ``node/mode``, columns dims) for several nodes. Returns the figure.

    >>> table = pd.DataFrame({"node": "r", "mode": ["ablate", "ablate", "steer", "steer"],
    ...                       "dims": ["0", "1"] * 2, "effect": [-1.0, 0.1, 2.0, 0.0]})
    >>> [t.get_text() for t in plot_effects(table).axes[0].get_xticklabels()]
    ['0', '1']
    """
    nodes = list(dict.fromkeys(table["node"]))
    if len(nodes) == 1:
        wide = table.pivot_table(index="dims", columns="mode", values="effect", sort=False)
        fig, ax = new_figure(ax, figsize=(max(4, 0.6 * len(wide) + 2), 3))
        wide.plot.bar(ax=ax)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel=f"dims of {nodes[0]!r}", ylabel="effect on metric")
        return fig
    wide = table.assign(row=table["node"] + "/" + table["mode"]).pivot_table(
        index="row", columns="dims", values="effect", sort=False)
    fig, ax = new_figure(ax, figsize=(max(4, 0.6 * wide.shape[1] + 2), 0.5 * len(wide) + 1.5))
    lim = float(wide.abs().max().max()) or 1.0
    im = ax.imshow(wide.values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(wide.shape[1]), wide.columns)
    ax.set_yticks(range(len(wide)), wide.index)
    fig.colorbar(im, ax=ax, label="effect on metric")
    return fig


def project(graph: Graph, name: str, model, prompts, labels: Optional[Sequence] = None,
            dims: Optional[Sequence[int]] = None, remote=None) -> pd.DataFrame:
    """Clean activations at node ``name``'s site (no edits) projected onto its basis.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Add(torch.ones(32)), name="v")
    >>> project(g, "v", lm, ["ab", "cd"], labels=["x", "y"]).columns.tolist()
    ['row', 'slot', 'label', 'd0']

    One row per prompt, selected position (and head): ``row, slot, (head,) label`` and a
    column ``d{i}`` per basis dim (``dims`` picks some). ``labels`` gives one per prompt.
    ``remote`` as in :func:`reftgraph.run` (the site's activations come back).
    """
    node = graph[name]
    all_dims, B = basis(node, model)
    keep = all_dims if dims is None else list(dims)
    B = B[[all_dims.index(d) for d in keep]]
    site = replace(node.site, subspace=None) if node.op.learned_basis else node.site
    probe = Graph()
    probe.add(site, Collect(), name="x", stream="base")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    with torch.no_grad():
        out = run(probe, model, prompts, grad=False, remote=remote)
    x, valid = out["x"].float(), out.valid["x"]
    coords = x @ B.T.to(x.device)                       # [N, k, (H,) n]
    rows = []
    for r, k in valid.nonzero().tolist():
        per_head = coords[r, k] if coords.dim() == 4 else coords[r, k][None]
        for j, c in enumerate(per_head):
            row = {"row": r, "slot": k}
            if coords.dim() == 4:
                row["head"] = node.site.head[j]
            row["label"] = None if labels is None else labels[r]
            row.update({f"d{d}": float(v) for d, v in zip(keep, c)})
            rows.append(row)
    return pd.DataFrame(rows)


def plot_projection(table: pd.DataFrame, x: Optional[str] = None, y: Optional[str] = None, ax=None):
    """A scatter of two projection columns (default the first two ``d*``), coloured by label.

    >>> table = pd.DataFrame({"label": ["a", "a", "b"], "d0": [0.0, 1.0, 2.0], "d1": [1.0, 0.0, 1.0]})
    >>> ax = plot_projection(table).axes[0]
    >>> ax.get_xlabel(), ax.get_ylabel(), [t.get_text() for t in ax.get_legend().get_texts()]
    ('d0', 'd1', ['a', 'b'])

    :func:`project` makes such tables.
    """
    cols = [c for c in table.columns if c.startswith("d") and c[1:].isdigit()]
    x = x or cols[0]
    y = y or (cols[1] if len(cols) > 1 else None)
    fig, ax = new_figure(ax, figsize=(4.5, 4))
    for label, part in table.groupby(table["label"].astype(str), sort=True):
        ax.scatter(part[x], part[y] if y else [0.0] * len(part), s=14, alpha=0.7, label=label)
    ax.set(xlabel=x, ylabel=y or "")
    if table["label"].notna().any():
        ax.legend(title="label", fontsize=7)
    return fig


def _full_basis(item, model) -> torch.Tensor:
    """Orthonormal rows in the site's full width (neuron dims of a cut subspace embedded)."""
    if torch.is_tensor(item):
        return orthonormal_rows(item.float())
    dims, B = basis(item, model)
    site = item.site
    if not item.op.learned_basis and site.subspace is not None:
        width = model.arch.width(site.component) if model is not None else None
        if width is None:
            raise ValueError(f"node {item.name!r} at {site}: pass model= to place its subspace dims")
        full = torch.zeros(B.shape[0], width)
        full[:, list(site.subspace)] = B
        B = full
    return orthonormal_rows(B)


def principal_angles(a, b, model=None) -> pd.DataFrame:
    """Principal angles between two subspaces (nodes or ``[n, width]`` row bases):
    columns ``k, cosine, degrees``, smallest angle first.

    >>> a, b = torch.eye(4)[:2], torch.eye(4)[1:3]
    >>> principal_angles(a, b)["degrees"].round(1).tolist()
    [0.0, 90.0]
    """
    A, B = _full_basis(a, model), _full_basis(b, model)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"the subspaces live in different widths ({A.shape[1]} and {B.shape[1]})")
    cos = torch.linalg.svdvals(A @ B.T).clamp(0, 1)
    return pd.DataFrame({"k": range(len(cos)), "cosine": cos.tolist(),
                         "degrees": torch.rad2deg(torch.arccos(cos)).tolist()})


def overlap(a, b, model=None) -> float:
    """``||A B^T||_F^2 / min(n, m)`` for orthonormal bases A, B: 1 when one subspace
    contains the other, 0 when orthogonal; about ``max(n, m) / width`` for random ones.

    >>> overlap(torch.eye(4)[:2], torch.eye(4)[1:])
    0.5
    """
    A, B = _full_basis(a, model), _full_basis(b, model)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"the subspaces live in different widths ({A.shape[1]} and {B.shape[1]})")
    return float((A @ B.T).pow(2).sum() / min(A.shape[0], B.shape[0]))

"""Matplotlib figures of graphs and training histories (each a :class:`~reftgraph.viz.figure.Figure`,
shown once in a notebook).

>>> import reftgraph as rg
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_pre", layer=3, positions="last"), rg.Patch("source"), name="p")
>>> fig = g.draw()
"""

from __future__ import annotations

import matplotlib

from .figure import new_figure


def draw_graph(graph, ax=None):
    """Nodes in forward order along x (one column per layer and component, ticks name the
    layer) and one row per stream, coloured by stream; arrows are "reads from" edges.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=3, positions="last"), rg.Patch("source"), name="p")
    >>> ax = draw_graph(g).axes[0]
    >>> [t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()]
    (['3'], ['base', 'source'])
    """
    import networkx as nx

    from ..core.graph import site_order

    nodes = graph.nodes
    columns = sorted({site_order(n.site) for n in nodes})
    fig, ax = new_figure(ax, figsize=(max(5, 1.5 * len(columns) + 2), 1.6 + 1.4 * len(graph.streams)))
    streams = sorted(graph.streams, key=lambda s: (s != "base", s))
    colours = matplotlib.colormaps["tab10"]
    pos, seen = {}, {}
    for node in nodes:
        x, y = columns.index(site_order(node.site)), -streams.index(node.stream)
        k = seen.get((x, y), 0)
        seen[(x, y)] = k + 1
        pos[node.name] = (x, y - 0.3 * k)
    colour = [colours(streams.index(n.stream) % 10) for n in nodes]
    labels = {n.name: f"{n.name}\n{type(n.op).__name__}\n{str(n.site).split(' pos=')[0]}" for n in nodes}
    nx.draw_networkx_nodes(graph.dag, pos, ax=ax, node_color=colour, node_size=900, alpha=0.35)
    nx.draw_networkx_labels(graph.dag, pos, ax=ax, labels=labels, font_size=7)
    nx.draw_networkx_edges(graph.dag, pos, ax=ax, edge_color="grey", arrows=True, node_size=900,
                           connectionstyle="arc3,rad=0.2")
    layer_of = {}
    for n in nodes:
        layer_of.setdefault(columns.index(site_order(n.site)), n.site.layer)
    ax.set_xticks(range(len(columns)), [str(layer_of[i]) for i in range(len(columns))])
    ax.set_xlabel("layer (forward order)")
    ax.set_yticks([-i for i in range(len(streams))], streams)
    ax.tick_params(left=True, bottom=True, labelleft=True, labelbottom=True)
    ax.margins(0.15, 0.35)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{len(graph)} nodes, {graph.num_parameters():,d} trainable parameters")
    fig.tight_layout()
    return fig


def plot_history(history, ax=None):
    """The training curve: loss per optimizer step (and evaluation metrics, if any, per epoch).

    >>> import pandas as pd
    >>> history = pd.DataFrame({"epoch": [0, 0, 1], "step": [0, 1, 2], "loss": [3.0, 2.0, 1.5], "lr": 0.01,
    ...                         "accuracy": [None, 0.5, 0.75], "temperature": float("nan")})
    >>> [ax.get_ylabel() for ax in plot_history(history).axes]
    ['loss', 'accuracy']
    """
    fig, ax = new_figure(ax, figsize=(6, 3.5))
    ax.plot(history["step"], history["loss"], label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    extra = [c for c in history.columns if c not in ("epoch", "step", "loss", "lr") and history[c].notna().any()]
    if extra:
        twin = ax.twinx()
        for c in extra:
            rows = history[history[c].notna()]
            twin.plot(rows["step"], rows[c], "o--", label=c)
        twin.set_ylabel(", ".join(extra))
        twin.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("training")
    fig.tight_layout()
    return fig

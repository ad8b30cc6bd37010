"""Matplotlib figures.

>>> import reftgraph as rg
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_pre", layer=3, positions="last"), rg.Patch("source"), name="p")
>>> fig = g.draw()
"""

from __future__ import annotations

import matplotlib

from .arch import STAGES


def draw_graph(graph, ax=None):
    """Nodes laid out by layer (x; stage within the layer as a fraction) and stream (y),
    coloured by stream; edges are "reads from" arrows."""
    import matplotlib.pyplot as plt
    import networkx as nx

    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(graph) + 2), 3))
    else:
        fig = ax.figure
    streams = sorted(graph.streams, key=lambda s: (s != "base", s))
    colours = matplotlib.colormaps["tab10"]
    pos, seen = {}, {}
    for node in graph.nodes:
        x = node.site.layer + STAGES[node.site.component] / 10
        y = -streams.index(node.stream)
        k = seen.get((x, y), 0)
        seen[(x, y)] = k + 1
        pos[node.name] = (x, y - 0.25 * k)
    colour = [colours(streams.index(n.stream) % 10) for n in graph.nodes]
    labels = {n.name: f"{n.name}\n{type(n.op).__name__}\n{n.site.component}[{n.site.layer}]" for n in graph.nodes}
    nx.draw_networkx(graph.dag, pos, ax=ax, labels=labels, node_color=colour, node_size=1400,
                     font_size=7, arrows=True, edge_color="grey")
    ax.set_xlabel("layer")
    ax.set_yticks([-i for i in range(len(streams))], streams)
    ax.tick_params(left=True, bottom=True, labelleft=True, labelbottom=True)
    ax.margins(0.2)
    ax.set_title(f"{len(graph)} nodes")
    return fig


def plot_history(history, ax=None):
    """The training curve: loss per optimizer step (and evaluation metrics, if any, per epoch)."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    ax.plot(history["step"], history["loss"], label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    extra = [c for c in history.columns if c not in ("epoch", "step", "loss", "lr")]
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

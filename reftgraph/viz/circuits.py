"""Figures of circuits: the kept nodes (or edges) by layer, and faithfulness against circuit size.

>>> import matplotlib; matplotlib.use("Agg")
>>> import pandas as pd
>>> kept = pd.DataFrame({"kind": ["head", "head", "mlp"], "layer": [0, 2, 1], "head": [1, 3, None]})
>>> draw_circuit(kept, n_layers=3, n_heads=4).axes[0].get_title()
'circuit: 2 heads, 1 MLP'
"""

from __future__ import annotations

import pandas as pd

from .figure import new_figure


def draw_circuit(kept: pd.DataFrame, n_layers: int, n_heads: int, scores: pd.DataFrame = None, ax=None):
    """A circuit's kept nodes on the grid of every head (layer up, head across), MLPs in a
    column at the right. Returns the figure.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> kept = pd.DataFrame({"kind": ["head"], "layer": [1], "head": [0]})
    >>> len(draw_circuit(kept, n_layers=2, n_heads=2).axes[0].collections)      # all heads, kept heads
    2

    Kept nodes are filled, coloured by their score when ``scores`` (a table of
    :func:`reftgraph.circuits.scores`) is given. Lines join each kept node to the kept nodes
    of later layers, which read what it writes to the residual stream.
    """
    fig, ax = new_figure(ax, figsize=(max(4, 0.45 * n_heads + 2), max(3, 0.22 * n_layers + 1.5)),
                         was_axes="draw_circuit")
    mlp_x = n_heads + 0.5
    grid = [(h, layer) for layer in range(n_layers) for h in range(n_heads)]
    ax.scatter([x for x, _ in grid], [y for _, y in grid], s=12, color="0.85", zorder=1)
    xy = [(mlp_x if k == "mlp" else int(h), int(layer)) for k, layer, h in kept[["kind", "layer", "head"]].values]
    for i, (x0, y0) in enumerate(xy):
        for x1, y1 in xy:
            if y1 > y0:
                ax.plot([x0, x1], [y0, y1], color="0.55", lw=0.5, alpha=0.3, zorder=2)
    colour = "tab:red"
    if scores is not None and len(kept):
        lookup = {(k, int(layer), None if pd.isna(h) else int(h)): s
                  for k, layer, h, s in scores[["kind", "layer", "head", "score"]].values}
        colour = [lookup.get((k, int(layer), None if pd.isna(h) else int(h)), 0.0)
                  for k, layer, h in kept[["kind", "layer", "head"]].values]
    style = {"c": colour, "cmap": "YlOrRd", "vmin": 0} if isinstance(colour, list) else {"color": colour}
    markers = ax.scatter([x for x, _ in xy], [y for _, y in xy], s=60, zorder=3, edgecolors="black",
                         linewidths=0.5, **style)
    if scores is not None and len(kept):
        fig.colorbar(markers, ax=ax, label="score")
    for (x, y), h in zip(xy, kept["head"]):
        if not pd.isna(h):
            ax.annotate(f"{y}.{int(h)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ticks = list(range(n_heads)) + ([mlp_x] if (kept["kind"] == "mlp").any() else [])
    ax.set_xticks(ticks, [str(t) for t in range(n_heads)] + (["MLP"] if len(ticks) > n_heads else []))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    n_kept = int((kept["kind"] == "head").sum())
    n_mlp = int((kept["kind"] == "mlp").sum())
    ax.set_title(f"circuit: {n_kept} heads" + (f", {n_mlp} MLP{'s' if n_mlp != 1 else ''}" if n_mlp else ""))
    return fig


def plot_curve(df: pd.DataFrame, value: str = "normalised", ax=None):
    """Faithfulness (``value``: ``"normalised"`` or ``"faithfulness"``) against circuit size,
    one line per method, from :func:`reftgraph.circuits.curve`. Returns the figure.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> df = pd.DataFrame({"method": ["atp", "atp"], "size": [1, 4], "fraction": [0.1, 0.4], "normalised": [0.2, 0.9]})
    >>> plot_curve(df).axes[0].get_ylabel()
    'normalised faithfulness'
    """
    fig, ax = new_figure(ax, figsize=(5, 3.5), was_axes="plot_curve")
    for method, part in df.groupby("method", sort=False):
        ax.plot(part["size"], part[value], marker="o", label=method)
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("nodes kept")
    ax.set_ylabel(f"{value} faithfulness" if value == "normalised" else value)
    ax.legend()
    return fig


def _edge_xy(name: str, n_layers: int, n_heads: int, group: int) -> tuple:
    """Where a sender or receiver name sits: heads across, layers up, MLPs in a column at the right."""
    mlp_x = n_heads + 0.5
    if name == "input":
        return (n_heads - 1) / 2, -1.0
    if name == "logits":
        return (n_heads - 1) / 2, float(n_layers)
    if name.startswith("m"):
        return mlp_x, int(name[1:]) + 0.3
    layer, rest = name[1:].split(".h")
    if rest.endswith(">"):           # a receiver: a head's q, k or v input, a little below the head
        head, kind = int(rest[:-3]), rest[-2]
        head = head * (group if kind in "kv" else 1)
        return head + {"q": -0.2, "k": 0.0, "v": 0.2}[kind], int(layer) - 0.3
    return int(rest), float(layer)


def draw_edges(kept: pd.DataFrame, n_layers: int, n_heads: int, group: int = 1, ax=None):
    """An edge circuit: each kept edge a line from its sender to its receiver (heads across,
    layers up; a head's q/k/v inputs just below it, key-value heads at their first query head;
    MLPs at the right; the embeddings below, the logits above). Returns the figure.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> kept = pd.DataFrame({"sender": ["input", "a0.h1"], "receiver": ["a1.h0<k>", "logits"], "score": [0.5, -1.0]})
    >>> draw_edges(kept, n_layers=2, n_heads=4).axes[0].get_title()
    'edge circuit: 2 edges'

    Line widths follow ``|score|`` when the table has scores (blue: positive, red: negative).
    """
    fig, ax = new_figure(ax, figsize=(max(4, 0.45 * n_heads + 2), max(3, 0.3 * n_layers + 1.5)),
                         was_axes="draw_edges")
    grid = [(h, layer) for layer in range(n_layers) for h in range(n_heads)]
    ax.scatter([x for x, _ in grid], [y for _, y in grid], s=10, color="0.85", zorder=1)
    biggest = float(kept["score"].abs().max()) if "score" in kept and len(kept) else 0.0
    used = set()
    for i, (s, r) in enumerate(zip(kept["sender"], kept["receiver"])):
        (x0, y0), (x1, y1) = _edge_xy(s, n_layers, n_heads, group), _edge_xy(r, n_layers, n_heads, group)
        score = float(kept["score"].iloc[i]) if biggest else 1.0
        width = 0.4 + 2.6 * abs(score) / biggest if biggest else 0.8
        ax.plot([x0, x1], [y0, y1], lw=width, alpha=0.7, zorder=2,
                color="tab:blue" if score >= 0 else "tab:red")
        used |= {(x0, y0), (x1, y1)}
    ax.scatter([x for x, _ in used], [y for _, y in used], s=25, color="black", zorder=3)
    ax.set_xticks(list(range(n_heads)) + [n_heads + 0.5], [str(h) for h in range(n_heads)] + ["MLP"])
    ax.set_yticks([-1] + list(range(n_layers)) + [n_layers], ["emb"] + [str(i) for i in range(n_layers)] + ["logits"])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"edge circuit: {len(kept)} edges")
    return fig


def plot_mib(results: dict, ax=None):
    """MIB's faithfulness curves, one colour per method: ``results`` maps a method's name to
    what :func:`reftgraph.circuits.mib` returned. Returns the figure.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> curve = pd.DataFrame({"fraction": [0.1, 1.0], "edges": [8, 82], "faithfulness": [0.4, 1.0]})
    >>> plot_mib({"eap": {"curve": curve, "cpr": 1.6, "cmd": 0.7}}).axes[0].get_xscale()
    'log'

    Solid lines: the circuits ranked by absolute score (CMD's); dashed: by signed effect
    (CPR's). The x axis is the circuit's size as a fraction of the scored edges (of the nodes,
    for node scores), on a log scale.
    """
    fig, ax = new_figure(ax, figsize=(5, 3.5), was_axes="plot_mib")
    for name, result in results.items():
        curve = result["curve"]
        line, = ax.plot(curve["fraction"], curve["faithfulness"], marker="o",
                        label=f"{name} (CPR {result['cpr']:.2f}, CMD {result['cmd']:.2f})")
        signed = result.get("cpr_curve")
        if signed is not None and not signed.equals(curve):     # CPR's curve, by signed effect: dashed
            ax.plot(signed["fraction"], signed["faithfulness"], marker=".", ls="--", color=line.get_color())
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("fraction kept (of edges; of nodes for node scores)")
    ax.set_ylabel("normalised faithfulness")
    ax.legend(fontsize=8)
    return fig

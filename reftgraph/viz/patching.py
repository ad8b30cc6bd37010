"""Heatmaps of sweep tables.

>>> import matplotlib; matplotlib.use("Agg")
>>> import pandas as pd
>>> df = pd.DataFrame({"component": "resid_pre", "layer": [0, 0, 1, 1], "position": [-2, -1, -2, -1],
...                    "token": ["' a'", "' b'"] * 2, "head": None, "restoration": [0.0, 0.1, 0.5, 1.0]})
>>> ax = heatmap(df).axes[0]
>>> [t.get_text() for t in ax.get_xticklabels()], ax.get_xlabel()
(["-2\\n' a'", "-1\\n' b'"], 'position (token of base prompt 0)')
"""

from __future__ import annotations

import pandas as pd

from .figure import new_figure


def _column_label(row, varying) -> str:
    parts = []
    if "component" in varying:
        parts.append(row["component"])
    if "head" in varying:
        parts.append(f"h{int(row['head'])}")
    if "position" in varying:
        parts.append(str(row["position"]) + ("" if row["position"] == "all" else "\n" + row["token"]))
    return " ".join(parts)


def _axis_label(df, varying) -> str:
    """What the columns are: the varying parts, and whose tokens label the positions."""
    parts = [c for c in ("component", "head") if c in varying]
    if "position" in varying:
        tokens = "token" in df and (df["position"] != "all").any()
        parts.append("position (token of base prompt 0)" if tokens else "position")
    return ", ".join(parts)


def heatmap(df: pd.DataFrame, value: str = "restoration", ax=None, title=None, cmap: str = "RdBu_r"):
    """Draw a sweep table as layers (rows) x conditions (columns: positions labelled with
    their tokens, heads, or components, whichever vary), centred on 0. Returns the figure.

    >>> df = pd.DataFrame({"component": "head_out", "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
    ...                    "position": "all", "value": [0.1, 0.2, 0.3, 0.4]})
    >>> ax = heatmap(df, value="value", title="heads").axes[0]
    >>> [t.get_text() for t in ax.get_xticklabels()], ax.get_xlabel(), ax.get_title()
    (['h0', 'h1'], 'head', 'heads')

    Positions are counted per prompt (negative: from its end); their token labels are the
    first base prompt's (rows of other lengths or wordings have other tokens there).
    """
    varying = [c for c in ("component", "head", "position") if c in df and df[c].astype(str).nunique() > 1]
    if "position" not in varying and "head" not in varying and "component" not in varying:
        varying = ["position"]
    df = df.copy()
    df["column"] = [_column_label(r, varying) for _, r in df.iterrows()]
    order = list(dict.fromkeys(df.sort_values([c for c in ("component", "head") if c in varying] or ["layer"],
                                              kind="stable")["column"]))
    grid = df.pivot_table(index="layer", columns="column", values=value, sort=False)[order].sort_index()
    fig, ax = new_figure(ax, figsize=(max(4, 0.6 * len(order) + 2), max(3, 0.25 * len(grid) + 1)),
                         was_axes="heatmap")
    limit = float(abs(grid.values).max()) or 1.0
    image = ax.imshow(grid.values, aspect="auto", cmap=cmap, vmin=-limit, vmax=limit, origin="lower")
    ax.set_xticks(range(len(order)), order, fontsize=8)
    ax.set_yticks(range(len(grid)), grid.index)
    ax.set_xlabel(_axis_label(df, varying))
    ax.set_ylabel("layer")
    metric = df.attrs.get("metric") or (df["metric"].iloc[0] if "metric" in df else "")
    fig.colorbar(image, ax=ax, label=f"{value} ({metric})" if metric else value)
    ax.set_title(title or f"{df['component'].iloc[0] if 'component' in df else ''} patching".strip())
    return fig

"""Draw the pictures of docs/concepts.md into docs/img/ (no model files needed).

    .venv/bin/python docs/make_images.py
"""

from pathlib import Path

import matplotlib
import torch

import reftgraph as rg
from reftgraph.core.sites import resolve_positions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).parent / "img"
ROWS = [["The", " cat", " sat", " on", " the", " mat"], ["Hello"], ["A", " long", " time", " ago", " in", " a", " galaxy"]]
SELECTORS = ["last", (0, -1), "f2+l2", "prompt"]


def positions_figure(path):
    """Each selector on three prompts of different lengths, left- and right-padded."""
    width = max(map(len, ROWS))
    length = torch.tensor([len(r) for r in ROWS])
    fig, axes = plt.subplots(len(SELECTORS), 2, figsize=(11, 1.1 * len(SELECTORS) + 0.6))
    for i, sel in enumerate(SELECTORS):
        for j, side in enumerate(("left", "right")):
            start = width - length if side == "left" else torch.zeros_like(length)
            s = resolve_positions(sel, start, length)
            ax = axes[i, j]
            for b, row in enumerate(ROWS):
                picked = {int(k) for k, ok in zip(s.index[b], s.valid[b]) if ok}
                for t in range(width):
                    k = t - int(start[b])
                    real = 0 <= k < len(row)
                    colour = "#f4a261" if t in picked else ("#e9ecef" if real else "white")
                    ax.add_patch(plt.Rectangle((t, -b), 0.95, 0.9, color=colour, ec="#adb5bd", lw=0.5))
                    ax.text(t + 0.47, -b + 0.45, row[k].strip() if real else "pad", ha="center", va="center",
                            fontsize=7, color="black" if real else "#adb5bd")
            ax.set_xlim(0, width)
            ax.set_ylim(-len(ROWS) + 1, 1)
            ax.axis("off")
            ax.set_title(f"positions={sel!r}, {side} padding", fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def schematic_graph():
    g = rg.Graph()
    g.add(rg.Site("mlp_out", layer=0, positions="prompt"), rg.Ablate("zero"), name="src_ablate", stream="source")
    g.add(rg.Site("head_out", layer=7, head=8, positions=[0]), rg.Patch(source="source"), name="a")
    g.add(rg.Site("head_out", layer=8, head=3, positions="last"), rg.Patch(source="source"), name="b")
    g.add(rg.Site("resid_post", layer=12, positions="last"), rg.Add(torch.zeros(576), scale=4.0), name="steer")
    g.add(rg.Site("mlp_out", layer=-1, positions="last"), rg.Collect(), name="end")
    return g


def main():
    OUT.mkdir(exist_ok=True)
    positions_figure(OUT / "positions.png")
    schematic_graph().draw().savefig(OUT / "graph.png", dpi=110, bbox_inches="tight")
    lm = rg.models.tiny("llama", num_hidden_layers=4)
    g = rg.patching.path_graph(lm, senders=[(0, 1)], receivers=[rg.Site("q", 3, head=2, positions="last")])
    g.draw().savefig(OUT / "path_graph.png", dpi=110, bbox_inches="tight")
    print("wrote", sorted(p.name for p in OUT.glob("*.png")))


if __name__ == "__main__":
    main()

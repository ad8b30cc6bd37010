"""The IOI circuit of SmolLM2-135M found by attribution, proved by running it.

Scores every head by attribution (plain AtP and integrated gradients, 5 steps) on IOI
prompts, keeps the top ones, and runs each circuit as a graph on clean prompts with every
other head taking its corrupted value: faithfulness against circuit size, for the prompts
the scores came from and for held-out prompts (another seed). Compares the 5% circuit's
heads with exact path patching to the logits. Writes the curve and the circuit's picture
and ends with a line of JSON.

    python benchmarks/circuits.py [--prompts 24] [--path-prompts 8] [--out docs/img]
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib
import pandas as pd

import reftgraph as rg
from reftgraph.datasets import ioi

matplotlib.use("Agg")

SIZES = [3, 5, 8, 13, 20, 27, 54, 108, 270]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--path-prompts", type=int, default=8)
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    lm = rg.load()
    data, held_out = ioi(args.prompts, seed=0), ioi(args.prompts, seed=1)
    n_heads = lm.arch.n_layers * lm.arch.n_heads
    figures = {"prompts": len(data), "heads": n_heads}
    tables = {}
    for method in ("atp", "ig"):  # scored once, on `data`; run on both prompt sets
        t = time.perf_counter()
        tables[method] = rg.circuits.scores(lm, data, method=method, ig_steps=5)
        figures[f"scores_s_{method}"] = round(time.perf_counter() - t, 2)
    curves = {}
    for name, part in (("same prompts", data), ("held-out prompts", held_out)):
        rows = []
        for method, table in tables.items():
            order = table.sort_values("score", ascending=False, kind="stable")
            for k in SIZES:
                f = rg.circuits.faithfulness(rg.circuits.circuit_graph(lm, part, order.head(k)), lm, part)
                rows.append({"method": method, "size": k, "fraction": k / n_heads, **f})
        curves[name] = rows
        print(f"\n{name}: normalised faithfulness (circuit / full logit difference)")
        print(f"{'heads':>6} {'share':>6} " + " ".join(f"{m:>14}" for m in ("atp", "ig")))
        for k in SIZES:
            cells = [next(r for r in rows if r["method"] == m and r["size"] == k) for m in ("atp", "ig")]
            print(f"{k:>6} {k / n_heads:>6.1%} " + " ".join(f"{c['normalised']:>6.3f} ({c['faithfulness']:.3f})"
                                                           for c in cells))
    figures["curves"] = curves
    five = round(0.05 * n_heads)
    best = {}
    for method, table in tables.items():
        circuit = rg.circuits.discover(lm, data, size=five, table=table)
        kept = rg.circuits.members(circuit, lm)
        best[method] = (circuit, table, [(int(r.layer), int(r.head)) for r in kept.itertuples()])
        figures[f"circuit_5pct_{method}"] = {"heads": best[method][2],
                                             "held_out": rg.circuits.faithfulness(circuit, lm, held_out)}
    paths = rg.patching.path_sweep(lm, data.rows(range(args.path_prompts)))
    top = paths.reindex(paths["restoration"].abs().sort_values(ascending=False).index).head(five)
    exact = [(int(r.layer), int(r.head)) for r in top.itertuples()]
    figures["path_patching_top"] = exact
    for method in ("atp", "ig"):
        shared = sorted(set(exact) & set(best[method][2]))
        figures[f"shared_with_path_patching_{method}"] = len(shared)
        print(f"\n5% circuit ({five} heads), {method}: {best[method][2]}")
        print(f"   held-out faithfulness {figures[f'circuit_5pct_{method}']['held_out']['faithfulness']:.3f}, "
              f"{len(shared)} of them among the top {five} heads of exact path patching to the logits")
    print(f"\npath patching top {five}: {exact}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curve = pd.DataFrame(curves["held-out prompts"])
    fig = rg.circuits.plot_curve(curve.assign(method=curve["method"].map({"atp": "AtP", "ig": "IG (5 steps)"})))
    fig.axes[0].set_xscale("log")
    fig.axes[0].set_title("IOI, SmolLM2-135M: circuits run on held-out prompts")
    fig.savefig(out / "ioi_circuit_curve.png", dpi=120, bbox_inches="tight")
    circuit, table, _ = best["ig"]
    fig = rg.circuits.draw(circuit, lm, table)
    fig.axes[0].set_title(f"IOI circuit: {five} heads by integrated-gradient attribution")
    fig.savefig(out / "ioi_circuit.png", dpi=120, bbox_inches="tight")
    print(json.dumps(figures, default=float))


if __name__ == "__main__":
    main()

"""MIB's circuit metrics for edge methods (and node-level IG, its circuits run as the edges
between the kept nodes) on SmolLM2-135M and MIB's IOI, arithmetic and MCQA tasks: scores from one set of prompts, the faithfulness curve, CPR and CMD on held-out prompts of another seed. Prints a
table (one row per method) and saves the curves' figure; last line JSON.

    python benchmarks/mib.py [--prompts 16] [--steps 5] [--fractions 0.001 0.01 0.1 1] [--tasks ioi mcqa]
    python benchmarks/mib.py --tasks ioi --per-position      # edges kept per token

CPR is the area under the normalised faithfulness curve and CMD the area under
|1 - faithfulness|, over the log of the edge count (MIB's ``MIB_circuit_track/evaluation.py``);
circuits are not pruned.
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import reftgraph as rg  # noqa: E402
from reftgraph.datasets import arithmetic, ioi, mcqa  # noqa: E402

from common import set_threads  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TASKS = {"ioi": ioi, "arithmetic": arithmetic, "mcqa": mcqa}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fractions", type=float, nargs="*", default=list(rg.circuits.MIB_FRACTIONS))
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="*", default=["eap", "eap-ig-inputs", "node-ig"],
                        choices=["eap", "eap-ig-inputs", "eap-ig-activations", "node-ig"],
                        help="eap-ig-activations runs (2 layers + 1) x steps forwards and backwards")
    parser.add_argument("--ablate", default="corrupt", choices=["corrupt", "mean"])
    parser.add_argument("--per-position", action="store_true",
                        help="edge methods score and keep (edge, token) pairs (prompts of one length)")
    args = parser.parse_args()
    set_threads()
    lm = rg.load()
    figures = {"edges": len(rg.circuits.edges(lm)), "prompts": args.prompts, "ablate": args.ablate,
               "per_position": args.per_position}
    for task in args.tasks:
        figures[task] = run_task(lm, task, args)
    print(json.dumps(figures))


def run_task(lm, task, args) -> dict:
    make = TASKS[task]
    train, held_out = make(args.prompts, seed=0), make(args.prompts, seed=1)
    results, figures = {}, {}
    node_ig = f"node IG ({args.steps} steps)"
    for method in [node_ig if m == "node-ig" else m for m in args.methods]:
        start = time.perf_counter()
        if method == node_ig:   # heads and MLPs scored, their circuits run as the edges between them
            scores = rg.circuits.scores(lm, train, nodes="heads+mlps", method="ig", ig_steps=args.steps, progress=False)
        else:
            scores = rg.circuits.edge_scores(lm, train, method=method, steps=args.steps, progress=False,
                                             per_position=args.per_position)
        scored = time.perf_counter() - start
        results[method] = rg.circuits.mib(lm, held_out, scores, fractions=args.fractions, progress=False,
                                          ablate=args.ablate)
        figures[f"{method} CPR"] = round(results[method]["cpr"], 3)
        figures[f"{method} CMD"] = round(results[method]["cmd"], 3)
        figures[f"{method} scoring s"] = round(scored, 1)
        figures[f"{method} curve"] = [round(f, 3) for f in results[method]["curve"].faithfulness]
    for name in ("cpr", "cmd"):     # the goal: EAP-IG's CPR >= 2x and CMD <= 0.5x node-level IG's
        for ig in ("eap-ig-inputs", "eap-ig-activations"):
            if ig in results and node_ig in results:
                figures[f"{ig} / node IG {name.upper()}"] = round(results[ig][name] / results[node_ig][name], 2)
    RESULTS.mkdir(exist_ok=True)
    suffix = ("" if args.ablate == "corrupt" else f"_{args.ablate}") + ("_per_position" if args.per_position else "")
    rg.circuits.plot_mib(results).savefig(RESULTS / f"mib_smollm2_{task}{suffix}.png", dpi=120, bbox_inches="tight")
    print(f"{task}: {'method':>18} {'CPR':>8} {'CMD':>8}   curve at {args.fractions}")
    for method, result in results.items():
        curve = " ".join(f"{f:.2f}" for f in result["curve"].faithfulness)
        print(f"{task}: {method:>18} {result['cpr']:8.3f} {result['cmd']:8.3f}   {curve}")
    return figures


if __name__ == "__main__":
    main()

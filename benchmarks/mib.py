"""MIB's circuit metrics for edge methods (and node-level IG, its circuits run as the edges
between the kept nodes) on SmolLM2-135M or Gemma 3 270M and MIB's IOI, arithmetic and MCQA
tasks: scores from one set of prompts, the faithfulness curve, CPR and CMD on held-out prompts
of another seed. Prints a table (one row per method) and saves the curves' figure; last line
JSON.

    python benchmarks/mib.py [--model smollm2|gemma3] [--prompts 16] [--steps 5] [--tasks ioi mcqa]
    python benchmarks/mib.py --tasks ioi --per-position      # edges kept per token

CPR is the area under the normalised faithfulness curve and CMD the area under
|1 - faithfulness|, over the circuit sizes as fractions, linear (MIB's default) and over their
log (``CPR log``, ``CMD log``), as MIB's ``MIB_circuit_track/evaluation.py``; circuits are not
pruned.
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
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma-3-270m"}
TASKS = {"ioi": ioi, "arithmetic": arithmetic, "mcqa": mcqa}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=list(MODELS))
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
    lm = rg.load(MODELS[args.model])
    figures = {"model": args.model, "edges": len(rg.circuits.edges(lm)), "prompts": args.prompts, "ablate": args.ablate,
               "per_position": args.per_position}
    for task in args.tasks:
        figures[task] = run_task(lm, task, args)
    (RESULTS / f"mib_{args.model}{suffix(args)}.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


def suffix(args) -> str:
    """What the results' file names add for the settings: ``_mean``, ``_per_position``."""
    return ("" if args.ablate == "corrupt" else f"_{args.ablate}") + ("_per_position" if args.per_position else "")


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
        result = results[method]     # CPR over the signed ranking's curve, CMD over the absolute one's (MIB's)
        result["cpr log"] = rg.circuits.mib_areas(args.fractions, result["cpr_curve"].faithfulness, log_scale=True)[0]
        result["cmd log"] = rg.circuits.mib_areas(args.fractions, result["curve"].faithfulness, log_scale=True)[1]
        figures[f"{method} CPR log"] = round(result["cpr log"], 3)
        figures[f"{method} CMD log"] = round(result["cmd log"], 3)
        figures[f"{method} scoring s"] = round(scored, 1)
        figures[f"{method} curve"] = [round(f, 3) for f in result["curve"].faithfulness]
        figures[f"{method} CPR curve"] = [round(f, 3) for f in result["cpr_curve"].faithfulness]
    for name in ("cpr", "cmd", "cpr log", "cmd log"):   # the goal: EAP-IG's CPR >= 2x, CMD <= 0.5x node IG's
        for ig in ("eap-ig-inputs", "eap-ig-activations"):
            if ig in results and node_ig in results:
                figures[f"{ig} / node IG {name.upper()}"] = round(results[ig][name] / results[node_ig][name], 2)
    RESULTS.mkdir(exist_ok=True)
    rg.circuits.plot_mib(results).savefig(RESULTS / f"mib_{args.model}_{task}{suffix(args)}.png", dpi=120, bbox_inches="tight")
    print(f"{task}: {'method':>18} {'CPR':>8} {'CMD':>8} {'CPR log':>8} {'CMD log':>8}   curve at {args.fractions}")
    for method, result in results.items():
        curves = [" ".join(f"{f:.2f}" for f in result[c].faithfulness) for c in ("curve", "cpr_curve")]
        print(f"{task}: {method:>18} {result['cpr']:8.3f} {result['cmd']:8.3f} {result['cpr log']:8.3f} "
              f"{result['cmd log']:8.3f}   by |score|: {curves[0]}; by signed effect: {curves[1]}")
    return figures


if __name__ == "__main__":
    main()

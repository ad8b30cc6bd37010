"""Attribution patching against exact patching sweeps on IOI with SmolLM2-135M: the same
data, components and positions, side by side. Prints, per component, the Pearson
correlation of the estimated and exact effects, the seconds each took, the speed-up and
the peak memory growth; for heads the recall of the exact top-10 among the estimate's
top-10 and top-20; last line JSON.

    python benchmarks/attribution.py [--prompts 16] [--repeats 3] [--quick]

Effects are ``value - base`` (the metric's change, logit difference, denoising: clean
activations patched into the corrupted run); GradDrop's score is a magnitude, compared with
``|value - base|``. ``head_out x positions`` is every head at
every position of the shortest prompt, counted from the end.
"""

import argparse
import json
import time

import numpy as np
import torch

import reftgraph as rg
from reftgraph.datasets import ioi

from common import PeakRSS

CASES = [  # (label, component, positions, attribute options)
    ("head_out x positions", "head_out", "each", {}),
    ("head_out", "head_out", "all", {}),
    ("head_out IG5", "head_out", "all", {"ig_steps": 5}),
    ("head_out GradDrop", "head_out", "all", {"grad_drop": True}),
    ("attn_out", "attn_out", "all", {}),
    ("mlp_out", "mlp_out", "all", {}),
    ("mlp_out IG5", "mlp_out", "all", {"ig_steps": 5}),
    ("resid_pre x positions", "resid_pre", "each", {}),
    ("resid_pre x positions IG5", "resid_pre", "each", {"ig_steps": 5}),
    ("q (QK fix)", "q", "all", {}),
    ("q (plain AtP)", "q", "all", {"qk_fix": False}),
    ("k (QK fix)", "k", "all", {}),
    ("k (plain AtP)", "k", "all", {"qk_fix": False}),
    ("k x positions (QK fix)", "k", "each", {}),
    ("k x positions (plain AtP)", "k", "each", {"qk_fix": False}),
    ("v", "v", "all", {}),
]
QUICK = ("head_out", "attn_out", "mlp_out")


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def recall(exact, estimate, k, among):
    top = set(np.argsort(-np.abs(exact))[:k])
    return len(top & set(np.argsort(-np.abs(estimate))[:among])) / k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only head_out, attn_out and mlp_out at all positions")
    ap.add_argument("--only", nargs="+", help="run only these cases (labels as printed)")
    args = ap.parse_args()
    lm = rg.load()
    data = ioi(args.prompts, seed=0)
    shortest = min(len(ids) for ids in lm.tokenizer(data.base)["input_ids"])
    figures = {"prompts": len(data), "layers": lm.arch.n_layers, "heads": lm.arch.n_heads,
               "positions": shortest, "threads": torch.get_num_threads()}
    exact_cache = {}
    for label, component, positions, options in CASES:
        if (args.quick and label not in QUICK) or (args.only and label not in args.only):
            continue
        pos = list(range(-shortest, 0)) if positions == "each" else "all"
        key = (component, positions)
        if key not in exact_cache:
            with PeakRSS() as mem:
                exact, t_exact = timed(lambda: rg.patching.sweep(lm, data, component, positions=pos), 1)
            exact_cache[key] = (exact, t_exact, mem.growth)
        exact, t_exact, mem_exact = exact_cache[key]
        with PeakRSS() as mem:
            est, t_est = timed(lambda: rg.patching.attribute(lm, data, component, positions=pos, **options), args.repeats)
        effect = (exact["value"] - exact.attrs["base"]).to_numpy()
        guess = est["estimate"].to_numpy()
        if options.get("grad_drop"):  # a magnitude: compared with the exact effect's magnitude
            effect, guess = np.abs(effect), est["grad_drop"].to_numpy()
        r = float(np.corrcoef(effect, guess)[0, 1])
        row = {"conditions": len(est), "pearson_r": round(r, 3), "exact_s": round(t_exact, 2),
               "attribute_s": round(t_est, 2), "speedup": round(t_exact / t_est, 1),
               "peak_mb_exact": round(mem_exact, 1), "peak_mb_attribute": round(mem.growth, 1)}
        if component in ("head_out", "q", "k", "v"):
            row["recall_top10_in_top10"] = recall(effect, guess, 10, 10)
            row["recall_top10_in_top20"] = recall(effect, guess, 10, 20)
        if component == "mlp_out":
            row["pearson_r_layers_1_on"] = round(float(np.corrcoef(effect[1:], guess[1:])[0, 1]), 3)
        print(f"{label:>28}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        figures[label] = row
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

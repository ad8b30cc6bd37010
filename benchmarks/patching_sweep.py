"""A resid_pre patching sweep (every layer x the last 8 positions) on a batch of IOI prompts:
reftgraph's batched sweep vs the naive loop (one forward per condition, plain PyTorch hooks).
Both must give the same values; prints times, speedup, peak memory and a last line of JSON.

    python benchmarks/patching_sweep.py [--prompts 16] [--repeats 3] [--memory-mb 1024]
"""

import argparse
import torch

import reftgraph as rg
from reftgraph.datasets import ioi
from reftgraph.patching import Reference, logit_diff

from common import PeakRSS, interleaved, report

POSITIONS = list(range(-8, 0))


def naive(lm, data, ref, layers):
    """One forward per (layer, position): a forward pre-hook writes the clean value."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    base = tok(data.base, return_tensors="pt", padding=True)
    clean = tok(data.source, return_tensors="pt", padding=True)
    blocks = lm.hf.model.layers
    acts = {}
    hooks = [blocks[i].register_forward_pre_hook(
        lambda m, args, kw, i=i: acts.__setitem__(i, args[0] if args else kw["hidden_states"]), with_kwargs=True)
        for i in layers]
    lm.hf(**clean)
    for h in hooks:
        h.remove()
    values = {}
    for layer in layers:
        for pos in POSITIONS:
            def patch(m, args, kw, layer=layer, pos=pos):
                hidden = (args[0] if args else kw["hidden_states"]).clone()
                hidden[:, pos] = acts[layer][:, pos]
                return ((hidden,) + args[1:], kw) if args else (args, {**kw, "hidden_states": hidden})
            h = blocks[layer].register_forward_pre_hook(patch, with_kwargs=True)
            try:
                logits = lm.hf(**base).logits[:, -1]
            finally:
                h.remove()
            values[(layer, pos)] = logit_diff(logits, ref).mean().item()
    return values


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-mb", type=float, default=1024)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = rg.load()
    data = ioi(args.prompts, seed=0)
    ref = Reference(*data.answer_ids(lm))
    layers = list(range(lm.arch.n_layers))
    out = {}

    def ours():
        out["ours"] = rg.patching.sweep(lm, data, "resid_pre", positions=POSITIONS, memory_mb=args.memory_mb)

    def loop():
        out["naive"] = naive(lm, data, ref, layers)

    with PeakRSS() as mem_ours:
        ours()
    with PeakRSS() as mem_naive:
        loop()
    times = interleaved({"ours": ours, "naive": loop}, repeats=args.repeats, warmup=0)
    df = out["ours"]
    diff = max(abs(row.value - out["naive"][(row.layer, row.position)]) for row in df.itertuples())
    report({
        "conditions": len(df),
        "prompts": len(data),
        "tokens_per_prompt": len(lm.tokenizer(data.base[0])["input_ids"]),
        "threads": torch.get_num_threads(),
        "ours_s": round(times["ours"], 3),
        "naive_s": round(times["naive"], 3),
        "memory_budget_mb": args.memory_mb,
        "peak_rss_growth_mb_ours": round(mem_ours.growth, 1),
        "peak_rss_growth_mb_naive": round(mem_naive.growth, 1),
        "speedup": round(times["naive"] / times["ours"], 2),
        "max_abs_diff": float(f"{diff:.3g}"),
    })


if __name__ == "__main__":
    main()

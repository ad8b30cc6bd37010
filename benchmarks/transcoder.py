"""A TopK transcoder on SmolLM2-135M's MLP of one layer, trained here with EleutherAI's sparsify
(``transcode=True``; ``pip install .[bench]``) on *Alice's Adventures in Wonderland*, then used
through reftgraph: quality, and IOI feature circuits whose outside features are patched from
the corrupted run or mean-ablated, scored by AtP and by integrated gradients. Prints the
figures; last line JSON.

    .venv/bin/python benchmarks/transcoder.py [--layer 0] [--epochs 40] [--latents 4608] [--k 32] [--retrain]
        [--rank effect|magnitude] [--fractions ...]

1. Pairs (the MLP's own input, its output) at every token but the first of each 128-token
   window of the book (plain hooks on the MLP module), the last 10% of windows held out.
2. Training: ``sparsify.SparseCoder`` with ``transcode=True``, its FVU against the MLP output
   plus AuxK on dead latents, as ``benchmarks/features.py`` trains the SAE; saved with
   ``save_to_disk`` under the hookpoint ``layers.N.mlp`` and read with ``rg.features.load``.
3. Quality on held-out windows: the fraction of the MLP output's variance explained, L0, and
   the next-token loss clean / with the transcoder spliced in / with the MLP's output zeroed.
4. IOI (24 prompts to score, 24 held out to run): features kept at 1 / 5 / 25% of the
   transcoder's, the others patched from the corrupted run (errors kept or ablated) or set to
   their mean, scored by AtP and by IG (5 steps); faithfulness by running each circuit, and
   the metric with the whole MLP output patched from the corrupted run (what the site can move).
"""

import argparse
import json

import torch

import reftgraph as rg
from common import set_threads
from features import CACHE, losses, train, windows
from reftgraph.methods.edge_circuits import metric_runs


def pairs(lm, texts, layer: int, batch: int = 16) -> tuple:
    """``(MLP input, MLP output)`` of every real token but each window's first, as rows."""
    mlp, seen = lm.hf.model.layers[layer].mlp, {}
    handle = mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    xs, ys = [], []
    tok = lm.tokenizer
    try:
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True)
            with torch.no_grad():
                lm.hf(**enc)
            keep = enc["attention_mask"].bool().clone()
            keep[torch.arange(len(keep)), keep.float().argmax(1)] = False      # each window's first token
            xs.append(seen["x"][keep].float())
            ys.append(seen["y"][keep].float())
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(ys)


def ioi(lm, tc, layer: int, fractions, rank: str = "effect") -> dict:
    data, held = rg.datasets.ioi(24, seed=0), rg.datasets.ioi(24, seed=1)
    site = rg.Site("mlp_out", layer)
    sites = {site: tc}
    whole = rg.Graph()
    whole.add(site, rg.Patch("corrupt"), name="mlp")
    clean, (patched,) = metric_runs(lm, held, [whole], "logit_diff", progress=False)
    print(f"  IOI logit difference, held out: clean {clean:.3f}, MLP {layer} patched from the corrupted run "
          f"{patched:.3f}", flush=True)
    out, rows = {"ioi_clean": round(clean, 3), "ioi_mlp_patched": round(patched, 3)}, []
    for method in ("atp", "ig"):
        table = rg.features.attribute(lm, data, sites, method=method, progress=False)
        for fraction in fractions:
            size = max(1, round(fraction * tc.d_sae))
            row = {"method": method, "fraction": fraction, "features": size}
            for name, kw in (("corrupt_errors_keep", {}), ("corrupt_errors_ablate", {"errors": "ablate"}),
                             ("mean", {"ablate": "mean"})):
                c = rg.features.discover(lm, data, sites, size=size, table=table, progress=False, rank=rank, **kw)
                row[name] = round(rg.features.faithfulness(c, lm, held, progress=False)["faithfulness"], 3)
            rows.append(row)
            print(f"  {method} {fraction:>4.0%} = {size} features: corrupted, errors kept "
                  f"{row['corrupt_errors_keep']}, ablated {row['corrupt_errors_ablate']}; mean {row['mean']}", flush=True)
    out.update(ioi_rank=rank, ioi_curve=rows)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=0,
                        help="the MLP (layer 0's: patching it from the corrupted IOI run takes the logit "
                             "difference from 4.90 to -0.42; no other layer's moves it by more than 0.9)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.01, 0.05, 0.25])
    parser.add_argument("--rank", default="effect", choices=("effect", "magnitude"),
                        help="keep the largest signed effects, or the largest |effects| (Marks et al.)")
    args = parser.parse_args()
    set_threads()
    lm = rg.load()
    texts = windows(lm)
    split = int(0.9 * len(texts))
    folder = CACHE / f"transcoder{args.layer}-topk{args.k}-{args.latents}" / f"layers.{args.layer}.mlp"
    figures = {"layer": args.layer}
    x, y = pairs(lm, texts[:split], args.layer)
    if args.retrain or not (folder / "sae.safetensors").exists():
        figures.update(train(x, args.latents, args.k, args.epochs, folder, target=y))
    tc = rg.features.load(folder)
    hx, hy = pairs(lm, texts[split:], args.layer)
    with torch.no_grad():
        f = tc.encode(hx)
        recon = tc.decode(f)
    figures["fve_held_out"] = round(float(1 - (hy - recon).pow(2).sum() / (hy - hy.mean(0)).pow(2).sum()), 4)
    figures["l0"] = round(float((f != 0).sum(-1).float().mean()), 2)
    spliced, zeroed = rg.Graph(), rg.Graph()
    spliced.add(rg.Site("mlp_out", args.layer, positions=slice(1, None)), tc, name="tc")
    zeroed.add(rg.Site("mlp_out", args.layer, positions=slice(1, None)), rg.Ablate("zero"), name="zero")
    held = texts[split:]
    clean, with_tc, zero = (losses(lm, held, g) for g in (rg.Graph(), spliced, zeroed))
    figures.update(loss_clean=round(clean, 4), loss_spliced=round(with_tc, 4), loss_mlp_zeroed=round(zero, 4),
                   loss_increase=round(with_tc - clean, 4), loss_recovered=round((zero - with_tc) / (zero - clean), 4))
    print({k: v for k, v in figures.items()}, flush=True)
    figures.update(ioi(lm, tc, args.layer, args.fractions, args.rank))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

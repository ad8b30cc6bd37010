"""The ``reftgraph`` command line.

``reftgraph demo`` runs the main job on the default model: it asks where the model keeps
the answer to "The capital of France is the city of" by patching the residual stream
from "... Italy ..." one layer and one position at a time, then runs a two-node
schematic graph in one pass and prints what changed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

SUBJECT_BASE = "The capital of France is the city of"
SUBJECT_SOURCE = "The capital of Italy is the city of"


def _top(lm, logits) -> str:
    return lm.tokenizer.decode(int(logits.argmax()))


def demo(args) -> int:
    import reftgraph as rg

    t0 = time.time()
    lm = rg.load(args.model)
    print(f"loaded {lm} in {time.time() - t0:.1f}s")
    ids = lm.tokenizer(SUBJECT_BASE)["input_ids"]
    subject = next(i for i, t in enumerate(ids) if "France" in lm.tokenizer.decode(t))
    clean = rg.Graph().run(lm, [SUBJECT_BASE, SUBJECT_SOURCE]).next_token_logits
    print(f"\nbase   {SUBJECT_BASE!r} -> {_top(lm, clean[0])!r}")
    print(f"source {SUBJECT_SOURCE!r} -> {_top(lm, clean[1])!r}")
    print(f"\npatch resid_pre from source into base, one layer at a time (subject token = position {subject}):")
    print(f"{'layer':>5}  {'at subject':>12}  {'at last':>12}")
    for layer in range(lm.arch.n_layers):
        row = []
        for pos in ([subject], "last"):
            g = rg.Graph()
            g.add(rg.Site("resid_pre", layer=layer, positions=pos), rg.Patch("source"))
            row.append(_top(lm, g.run(lm, SUBJECT_BASE, sources={"source": SUBJECT_SOURCE}).next_token_logits[0]))
        print(f"{layer:>5}  {row[0]!r:>12}  {row[1]!r:>12}")

    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=3, positions=[subject]), rg.Patch("source"), name="subject_L3")
    g.add(rg.Site("head_out", layer=20, head=(0, 1, 2), positions="last"), rg.Ablate("zero"), name="heads_L20")
    g.add(rg.Site("resid_post", layer=-1, positions="last"), rg.Collect(), name="final")
    out = g.run(lm, SUBJECT_BASE, sources={"source": SUBJECT_SOURCE})
    print("\na multi-path graph, run in one pass:")
    print(g.summary().drop(columns=["params"]).to_string(index=False))
    print(f"edges (reads from): {list(g.edges)}")
    probs = out.next_token_logits.softmax(-1)[0]
    base_probs = clean[0].softmax(-1)
    for word in (" Paris", " Rome"):
        tok = lm.tokenizer(word)["input_ids"][0]
        print(f"p({word!r}): {float(base_probs[tok]):.3f} -> {float(probs[tok]):.3f}")
    print(f"collected 'final': shape {tuple(out['final'].shape)}, norm {float(out['final'].norm()):.1f}")
    print(f"\ndone in {time.time() - t0:.1f}s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reftgraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the main job on the default model (patching where the answer lives)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or path (default: %(default)s)")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

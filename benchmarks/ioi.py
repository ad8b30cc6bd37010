"""Indirect-object identification on the default model: clean accuracy and logit difference,
a resid_pre (layer x position) restoration heatmap, and the (layer x head) maps of heads
whose activation patching and path patching (to the logits) move the logit difference most.

    python benchmarks/ioi.py [--prompts 32] [--out docs/img]
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch

import reftgraph as rg
from reftgraph.datasets import ioi
from reftgraph.datasets.ioi import TEMPLATES
from reftgraph.patching import Reference, logit_diff

matplotlib.use("Agg")


def top(df, n=8):
    best = df.reindex(df["restoration"].abs().sort_values(ascending=False).index).head(n)
    return [(int(r.layer), int(r.head), round(float(r.restoration), 3)) for r in best.itertuples()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--path-prompts", type=int, default=8, help="rows for the path-patching sweep")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = rg.load()
    figures = {}
    for t in range(len(TEMPLATES)):  # the clean task, per template
        data = ioi(args.prompts, seed=t, templates=(t,))
        logits = rg.run(rg.Graph(), lm, data.source).next_token_logits
        ref = Reference(*data.answer_ids(lm))
        ld = logit_diff(logits, ref)
        figures[f"template{t}"] = {"logit_diff": round(ld.mean().item(), 3),
                                   "accuracy_io_over_s": round((ld > 0).float().mean().item(), 3),
                                   "top1_is_io": round((logits.argmax(-1) == ref.correct).float().mean().item(), 3)}
        print(f"template {t}: {TEMPLATES[t]!r}: {figures[f'template{t}']}")
    data = ioi(args.prompts, seed=0)
    t0 = time.perf_counter()
    resid = rg.patching.sweep(lm, data, "resid_pre")
    figures["resid_pre_sweep_s"] = round(time.perf_counter() - t0, 1)
    print(f"clean logit diff {resid.attrs['source']:.3f}, corrupted (ABC) {resid.attrs['base']:.3f}")
    grid = resid.pivot(index="layer", columns="position", values="restoration")
    print(grid.round(2).to_string())
    fig = rg.patching.heatmap(resid, title="IOI: resid_pre patching (clean -> ABC)")
    fig.savefig(out / "ioi_resid_pre.png", dpi=120, bbox_inches="tight")
    t0 = time.perf_counter()
    heads = rg.patching.sweep(lm, data, "head_out")
    figures["head_out_sweep_s"] = round(time.perf_counter() - t0, 1)
    figures["top_heads_activation_patching"] = top(heads)
    fig = rg.patching.heatmap(heads, title="IOI: head_out patching, all positions")
    fig.savefig(out / "ioi_heads.png", dpi=120, bbox_inches="tight")
    t0 = time.perf_counter()
    paths = rg.patching.path_sweep(lm, data.rows(slice(0, args.path_prompts)))
    figures["path_sweep_s"] = round(time.perf_counter() - t0, 1)
    figures["top_heads_path_patching_to_logits"] = top(paths)
    fig = rg.patching.heatmap(paths.assign(component="head_out", position="all", token="all"),
                             title="IOI: path patching, head -> logits")
    fig.savefig(out / "ioi_paths.png", dpi=120, bbox_inches="tight")
    figures.update(clean_logit_diff=round(resid.attrs["source"], 3), corrupted_logit_diff=round(resid.attrs["base"], 3),
                   prompts=len(data))
    for k in ("top_heads_activation_patching", "top_heads_path_patching_to_logits"):
        print(k, figures[k])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

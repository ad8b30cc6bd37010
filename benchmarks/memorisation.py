"""The ReFT memorisation test on SmolLM2-135M: a rank-1 ConsReFT at the last token of a fixed
prompt, trained until greedy decoding recovers the opening of Alice's Adventures in Wonderland.

    python benchmarks/memorisation.py [--layers 1 8 15 21 28] [--tokens 32 64 ... 2048]
        [--variant text shuffled random] [--csv PATH] [--plot PATH] [--max-steps N] [--lr X]
    python benchmarks/memorisation.py --speed [--layer 15 20 25] [--speed-tokens 256] [--repeats 5]

Each (variant, layer, tokens) cell is one run; cells already in the CSV are kept (rerun
them with --redo), so a large grid can be filled over several sessions. Prints the recovery
table (share of the target recovered as an exact prefix), writes the CSV and a plot
(recovery vs tokens, one line per layer, one panel per variant), and ends with JSON.
``--speed`` times one training step with and without the frozen-prefix cache.
"""

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import reftgraph as rg
from reftgraph.engine import Batch, compile_graph
from reftgraph.memorisation import memorisation_graph, memorise, random_tokens, shuffled_words, target_ids
from reftgraph.engine import PrefixCache
from reftgraph.training import final_hidden

from common import interleaved, report

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT.parent / "shared" / "data" / "alice_in_wonderland.txt"
KEY = ["variant", "layer", "n_tokens"]
COUNTS = ["layer", "n_tokens", "rank", "recovered", "first_mismatch", "teacher_forced", "steps"]


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Counts as integers (first_mismatch may be empty), rows sorted by variant, layer, tokens."""
    return frame.astype({k: "Int64" for k in COUNTS if k in frame}).sort_values(KEY, ignore_index=True)


def target_for(lm, variant: str, text: str, n: int):
    if variant == "text":
        return target_ids(lm, text, n)
    if variant == "shuffled":
        return target_ids(lm, shuffled_words(text, seed=0), n)
    if variant == "random":
        return random_tokens(lm, n, seed=0)
    raise ValueError(f"unknown variant {variant!r}; choose text, shuffled or random")


def sweep(args, lm, text):
    csv = Path(args.csv)
    done = tidy(pd.read_csv(csv)) if csv.is_file() else pd.DataFrame(columns=KEY)
    rows = []
    for variant in args.variant:
        for n in args.tokens:
            for layer in args.layers:
                hit = done[(done.variant == variant) & (done.layer == layer) & (done.n_tokens == n)]
                if len(hit) and not args.redo:
                    continue
                result = memorise(lm, target_for(lm, variant, text, n), layer=layer, rank=args.rank, lr=args.lr,
                                  max_steps=args.max_steps, margin=args.margin, greedy=not args.no_greedy,
                                  schedule=args.schedule, max_seconds=args.max_seconds, progress=True)
                row = {"variant": variant, **result.row(), "model": args.model, "lr": args.lr,
                       "schedule": args.schedule}
                print(json.dumps(row), flush=True)
                rows.append(row)
                keep = done[~((done.variant == variant) & (done.layer == layer) & (done.n_tokens == n))]
                done = tidy(pd.concat([keep, pd.DataFrame([row])], ignore_index=True) if len(keep) else
                            pd.DataFrame([row]))
                csv.parent.mkdir(parents=True, exist_ok=True)
                tmp = csv.with_suffix(".tmp")
                done.to_csv(tmp, index=False)
                tmp.replace(csv)
    return done, rows


def plot(done: pd.DataFrame, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted(done.variant.unique())
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.6), squeeze=False, sharey=True)
    for ax, variant in zip(axes[0], variants):
        part = done[done.variant == variant]
        for layer, rows in part.groupby("layer"):
            rows = rows.sort_values("n_tokens")
            ax.plot(rows.n_tokens, rows.rate, marker="o", label=f"layer {layer}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("target tokens")
        ax.set_title(variant)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("recovery (exact prefix share)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def flop_ratio(lm, layer: int) -> float:
    """The cached/uncached step ratio that counting matmul work per token predicts at ``layer``:
    the cached step still runs the blocks from ``layer`` up forward and
    backward (input gradients only: the weights are frozen) and the head forward and backward."""
    block = sum(p.numel() for p in lm.hf.model.layers[0].parameters() if p.dim() > 1)
    head = lm.hf.get_output_embeddings().weight.numel()
    n = lm.arch.n_layers
    upper = (n - layer) * block
    return (2 * upper + 2 * head) / (n * block + upper + 2 * head)


def step_times(args, lm, text, layer):
    """Median seconds of one training step (forward, loss, backward, Adam) with and without the cache."""
    n = args.speed_tokens
    ids = target_ids(lm, text, n)
    prompt = lm.tokenizer("Recite the book:")["input_ids"]
    seq = torch.tensor([prompt + ids])
    inputs = {"input_ids": seq, "attention_mask": torch.ones_like(seq), "position_ids": torch.arange(seq.shape[1])[None]}
    batch = Batch.single([len(prompt)], seq.shape[1])
    head, targets, start = lm.hf.get_output_embeddings(), torch.tensor(ids), len(prompt) - 1
    graphs = {k: memorisation_graph(lm, layer) for k in ("cached", "uncached")}
    cache = PrefixCache(lm)

    def step(name):
        g = graphs[name]
        plan, opt = compile_graph(g, lm.arch), torch.optim.Adam(g.parameters(), lr=args.lr)

        def run():
            hidden, _ = final_hidden(plan, lm, inputs, batch, cache if name == "cached" else None)
            loss = torch.nn.functional.cross_entropy(head(hidden[0, start:start + n]).float(), targets)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return float(loss)
        return run

    steps = {k: step(k) for k in graphs}
    with torch.enable_grad():
        assert abs(steps["cached"]() - steps["uncached"]()) < 1e-4  # same first loss
        return interleaved(steps, args.repeats, warmup=1)


def speed(args, lm, text):
    """Step times at each ``--layer`` (the first is the headline figure) beside the ratio matmul counts predict."""
    rows = []
    for layer in args.layer:
        times = step_times(args, lm, text, layer)
        rows.append({"layer": layer, "cached_step_s": round(times["cached"], 3),
                     "uncached_step_s": round(times["uncached"], 3),
                     "ratio": round(times["cached"] / times["uncached"], 3), "flop_ratio": round(flop_ratio(lm, layer), 3)})
        print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False))
    first = rows[0]
    report({"model": args.model, "layer": first["layer"], "n_layers": lm.arch.n_layers, "tokens": args.speed_tokens,
            "cached_step_s": first["cached_step_s"], "uncached_step_s": first["uncached_step_s"],
            "flop_ratio": first["flop_ratio"], "by_layer": rows,
            "ratio_cached_uncached": first["ratio"]})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--text", default=str(BOOK), help="the text to memorise (default: the shared Alice book)")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: 5 layers spread over the depth")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32 * 2 ** i for i in range(7)])
    ap.add_argument("--variant", nargs="+", default=["text"], choices=["text", "shuffled", "random"])
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--schedule", choices=["constant", "linear"], default="constant",
                    help="learning rate: constant, or decaying linearly to zero over --max-steps")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop training a cell after this many seconds (the step count is in the CSV)")
    ap.add_argument("--margin", type=float, default=0.5)
    ap.add_argument("--no-greedy", action="store_true", help="report the teacher-forced prefix (no decoding)")
    ap.add_argument("--redo", action="store_true", help="rerun cells already in the CSV")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "memorisation.csv"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "memorisation.png"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--layer", type=int, nargs="+", default=None,
                    help="--speed: the layers (default: the middle one; the first is the headline figure)")
    ap.add_argument("--speed-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = Path(args.text).read_text(encoding="utf-8")
    lm = rg.load(args.model)
    n = lm.arch.n_layers
    if args.speed:
        args.layer = args.layer or [n // 2]
        return speed(args, lm, text)
    args.layers = args.layers or sorted({round(1 + i * (n - 3) / 4) for i in range(5)})
    clock = time.perf_counter()
    done, rows = sweep(args, lm, text)
    if done.empty:
        print("no cells")
        return
    for variant, part in done.groupby("variant"):
        print(f"\nrecovery, {variant} (rows: layer, columns: target tokens; steps in the CSV)")
        print(part.pivot_table(index="layer", columns="n_tokens", values="rate").round(3).to_string())
    plot(done, Path(args.plot))
    print(json.dumps({"cells_run": len(rows), "cells_total": len(done), "seconds": time.perf_counter() - clock,
                      "mean_rate_text": float(done[done.variant == "text"].rate.mean()) if (done.variant == "text").any()
                      else None, "csv": args.csv, "plot": args.plot}))


if __name__ == "__main__":
    main()

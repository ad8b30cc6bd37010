"""An "automatic ReFT": LoReFT layers chosen by attribution against the demo's hand-picked ones.

Attribution on a contrast the demo task is about: each held-in question as the base prompt,
the same question asking for capital letters as the source, and as the metric the
probability mass the next token puts on tokens written in capitals (log scale). The layers
whose residual stream (last five prompt tokens) carries most of that difference are the
LoReFT layers; then the demo's training (rank 4, f5+l5, 90 examples, 6 epochs) runs with
them and with the demo's layers, and both are scored on the held-out questions.

    python benchmarks/auto_reft.py [--k 4] [--epochs 6]
"""

import argparse
import json
import time

import torch

import reftgraph as rg
from reftgraph import datasets
from reftgraph.cli.main import caps_experiment

INSTRUCTION = "Answer in capital letters only. "
HAND_PICKED = [4, 10, 16, 22]


def chat(lm, question: str) -> str:
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                            add_generation_prompt=True)


def caps_metric(lm):
    """log P(next token is written in capitals), per row."""
    vocab = [lm.tokenizer.decode([i]) for i in range(len(lm.tokenizer))]
    upper = torch.tensor([sum(c.isalpha() for c in t) >= 1 and all(c.isupper() for c in t if c.isalpha())
                          for t in vocab])

    def caps_mass(logits, ref):
        logp = logits.float().log_softmax(-1)
        return logp[:, upper[: logits.shape[-1]]].logsumexp(-1)

    return caps_mass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4, help="layers to choose")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--questions", type=int, default=32, help="training questions for the attribution")
    args = ap.parse_args()
    lm = rg.load()
    train, _ = datasets.caps()
    questions = [p for p, _ in train[: args.questions]]
    data = rg.patching.Counterfactual([chat(lm, q) for q in questions], [chat(lm, INSTRUCTION + q) for q in questions])
    t = time.perf_counter()
    table = rg.patching.attribute(lm, data, "resid_post", positions=[-5, -4, -3, -2, -1], metric=caps_metric(lm))
    seconds = time.perf_counter() - t
    layers = rg.circuits.top_layers(table, args.k)
    per_layer = table.assign(score=table["estimate"].abs()).groupby("layer")["score"].sum()
    print(f"attribution: {len(table)} sites in {seconds:.1f}s; base {table.attrs['base']:.3f}, "
          f"source {table.attrs['source']:.3f} (log caps mass)")
    print("per-layer score:", per_layer.round(3).to_dict())
    print("chosen layers:", layers)
    figures = {"attribution_s": round(seconds, 2), "chosen_layers": layers, "hand_picked_layers": HAND_PICKED}
    for name, picked in (("attribution", layers), ("hand-picked", HAND_PICKED)):
        r = caps_experiment(lm, picked, epochs=args.epochs, lr=2e-3, progress=False)   # the recipe it was measured with
        row = {"layers": list(picked), "final_loss": round(float(r["history"]["loss"].iloc[-1]), 3),
               "caps_rate_held_out": r["rate_after"], "train_s": round(r["train_seconds"], 1)}
        print(f"{name:>12}: {row}", flush=True)
        figures[name] = row
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

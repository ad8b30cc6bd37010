"""Edge scores over every edge of SmolLM2-135M on IOI, against the cost of one forward and
backward of the same batch (the issue's speed goal: EAP at most 3x, EAP-IG with k steps at
most (k + 2)x), as users call the model (logits at every position) and with the head on the
last position alone (as the edge scores run it). Prints the seconds of each (medians, runs interleaved), the ratios, the edge
count and the peak memory growth of each method; last line JSON.

    python benchmarks/edges.py [--prompts 16] [--steps 5] [--repeats 3]
"""

import argparse

import torch

import reftgraph as rg
from reftgraph.datasets import ioi

from common import PeakRSS, interleaved, report, set_threads


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_threads()
    lm = rg.load()
    data = ioi(args.prompts)
    ids = lm.tokenizer(data.source, return_tensors="pt", padding=True)

    def forward_backward(**kwargs):   # the weights are frozen: the gradient reaches the input embeddings
        emb = lm.hf.get_input_embeddings()(ids["input_ids"]).detach().requires_grad_()
        logits = lm.hf(inputs_embeds=emb, attention_mask=ids["attention_mask"], **kwargs).logits
        torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), emb)

    methods = {"eap": lambda: rg.circuits.edge_scores(lm, data, progress=False),
               f"eap-ig-inputs {args.steps}": lambda: rg.circuits.edge_scores(
                   lm, data, method="eap-ig-inputs", steps=args.steps, progress=False)}
    # the model as users call it (logits at every position), and with the head on the last
    # (left-padded) position alone, as the edge scores run it
    baselines = {"forward+backward": forward_backward,
                 "forward+backward last logits": lambda: forward_backward(logits_to_keep=1)}
    times = interleaved({**baselines, **methods}, args.repeats, warmup=1)
    figures = {"edges": len(rg.circuits.edges(lm)), "prompts": args.prompts}
    for name, seconds in times.items():
        figures[f"{name} s"] = round(seconds, 3)
    for name in methods:
        for base in baselines:
            figures[f"{name} / {base}"] = round(times[name] / times[base], 2)
        with PeakRSS() as peak:
            methods[name]()
        figures[f"{name} peak MB"] = round(peak.growth, 1)
    report(figures)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

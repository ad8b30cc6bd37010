"""Greedy generation with a prompt-only LoReFT graph (reftgraph through nnsight) divided by
plain transformers generation (no intervention), and by the same edit as plain hooks.

    python benchmarks/generate.py [--repeats 5] [--new-tokens 32]
"""

import argparse

import torch

import reftgraph as rg

from common import interleaved, report

PROMPTS = ["What is the capital of France, and what is it famous for?",
           "Name three colours of the rainbow and say where rainbows come from.",
           "Why is the sky blue during the day and red at sunset?",
           "How do bees make honey, and why do they need it in winter?"]  # >= 10 tokens each (f5+l5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = rg.load(args.model)
    layers = [3, 9, 15, 21][: lm.arch.n_layers]
    g = rg.reft_graph(lm, layers=layers, positions="f5+l5", rank=4)
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    n = args.new_tokens
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)

    def ours():
        return g.generate(lm, PROMPTS, **kw)

    def plain():
        return lm.hf.generate(**enc, **kw)

    S = enc["input_ids"].shape[1]
    start = enc["attention_mask"].argmax(1)

    def hook_for(layer):
        op_first, op_last = g[f"L{layer}_first"].op, g[f"L{layer}_last"].op
        first = start[:, None] + torch.arange(5)
        last = torch.arange(S - 5, S).expand(len(PROMPTS), 5)
        rows = torch.arange(len(PROMPTS))[:, None]

        def hook(mod, args, out):
            if out.shape[1] == 1:  # decoding steps: prompt-only edit
                return out
            out = out.clone()
            out[rows, first] = op_first(out[rows, first])
            out[rows, last] = op_last(out[rows, last])
            return out
        return hook

    def plain_hooks():
        handles = [lm.hf.model.layers[L].register_forward_hook(hook_for(L)) for L in layers]
        try:
            return lm.hf.generate(**enc, **kw)
        finally:
            for h in handles:
                h.remove()

    same = torch.equal(ours().ids, plain_hooks())
    times = interleaved({"reftgraph": ours, "plain": plain, "plain_hooks": plain_hooks}, args.repeats, warmup=1)
    report({
        "model": args.model, "prompts": len(PROMPTS), "new_tokens": n, "same_ids_as_hooks": same,
        "reftgraph_s": times["reftgraph"], "plain_generate_s": times["plain"],
        "plain_hooks_s": times["plain_hooks"],
        "ratio_vs_hooks": times["reftgraph"] / times["plain_hooks"],
        "ratio": times["reftgraph"] / times["plain"],
    })


if __name__ == "__main__":
    main()

"""The fixed cost of one call: what reftgraph adds above a bare nnsight trace.

A tiny 4-layer Llama (width 32), batch 2, one thread, so the forward itself is cheap
and every fixed cost shows: a plain forward, the same edit as plain PyTorch hooks, a
bare nnsight trace (nnsight's own cost), the same 1 and 8 edits written by hand in
nnsight (what nnsight costs for those edits), ``g.run`` with 0, 1 and 8 nodes, and the
cost per generated token of ``g.generate`` vs plain ``generate``.

    python benchmarks/overhead.py [--repeats 300] [--rounds 5]

Each figure is the median over ``rounds`` of the median over ``repeats`` interleaved
calls (``repeats / 20`` for the calls that generate ``--new-tokens``), in milliseconds.
"""

import argparse
import statistics

import torch

import reftgraph as rg

from common import interleaved, report

PROMPTS = ["The cat sat on the mat", "A dog ran"]


def graph_with(n: int) -> "rg.Graph":
    g = rg.Graph()
    for i in range(n):
        g.add(rg.Site("resid_post", layer=i % 4, positions="last"), rg.Add(torch.full((32,), 0.01 * (i + 1))),
              name=f"add{i}")
    return g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    lm = rg.models.tiny("llama", num_hidden_layers=4)
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    inputs = dict(enc, position_ids=(enc["attention_mask"].cumsum(1) - 1).clamp(min=0))
    last = torch.full((2,), enc["input_ids"].shape[1] - 1)
    vec = torch.full((32,), 0.01)
    rows = torch.arange(2)

    def plain():
        return lm.hf(**inputs).logits

    def hook(module, args, out):
        out = out.clone()
        out[rows, last] = out[rows, last] + vec
        return out

    def hooks():
        handle = lm.hf.model.layers[0].register_forward_hook(hook)
        try:
            return lm.hf(**inputs).logits
        finally:
            handle.remove()

    def bare():
        with lm.nn.trace(inputs):
            logits = lm.nn.output.logits.save()
        return logits

    vecs = [torch.full((32,), 0.01 * (i + 1)) for i in range(8)]

    def hand(n):
        """The same n edits written by hand in nnsight: the floor of what nnsight costs for them."""
        def call():
            with lm.nn.trace(inputs):
                for layer in range(4):
                    mine = [vecs[i] for i in range(n) if i % 4 == layer]
                    if mine:
                        block = lm.nn.model.layers[layer]
                        out = block.output.clone()
                        for v in mine:
                            out[:, -1] = out[:, -1] + v
                        block.output = out
                logits = lm.nn.output.logits.save()
            return logits
        return call

    graphs = {n: graph_with(n) for n in (0, 1, 8)}
    calls = {"plain": plain, "hooks": hooks, "bare_trace": bare, "hand_1": hand(1), "hand_8": hand(8)}
    for n, g in graphs.items():
        calls[f"run_{n}"] = (lambda g=g: g.run(lm, PROMPTS).logits)

    n_new = args.new_tokens
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)
    g1 = graph_with(1)
    calls["plain_gen_1"] = lambda: lm.hf.generate(**enc, max_new_tokens=1, min_new_tokens=1, **kw)
    calls["gen_1"] = lambda: g1.generate(lm, PROMPTS, max_new_tokens=1, min_new_tokens=1, **kw)
    gen_calls = {
        "plain_gen_n": lambda: lm.hf.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, **kw),
        "gen_n": lambda: g1.generate(lm, PROMPTS, max_new_tokens=n_new, min_new_tokens=n_new, **kw),
    }
    rounds = {k: [] for k in [*calls, *gen_calls]}
    for _ in range(args.rounds):
        for k, v in interleaved(calls, args.repeats, warmup=20).items():
            rounds[k].append(v)
        for k, v in interleaved(gen_calls, max(5, args.repeats // 20), warmup=2).items():
            rounds[k].append(v)
    ms = {k: 1000 * statistics.median(v) for k, v in rounds.items()}
    per_token_plain = (ms["plain_gen_n"] - ms["plain_gen_1"]) / (n_new - 1)
    per_token_ours = (ms["gen_n"] - ms["gen_1"]) / (n_new - 1)
    figures = {
        "plain_forward_ms": ms["plain"], "plain_hooks_ms": ms["hooks"], "bare_trace_ms": ms["bare_trace"],
        "nnsight_cost_ms": ms["bare_trace"] - ms["plain"],
        "run_0_ms": ms["run_0"], "run_1_ms": ms["run_1"], "run_8_ms": ms["run_8"],
        "run_0_above_trace_ms": ms["run_0"] - ms["bare_trace"],
        "run_1_above_trace_ms": ms["run_1"] - ms["bare_trace"],
        "run_8_above_trace_ms": ms["run_8"] - ms["bare_trace"],
        "per_node_ms": (ms["run_8"] - ms["run_1"]) / 7,
        "hand_nnsight_1_ms": ms["hand_1"], "hand_nnsight_8_ms": ms["hand_8"],
        "run_1_above_hand_ms": ms["run_1"] - ms["hand_1"], "run_8_above_hand_ms": ms["run_8"] - ms["hand_8"],
        "goal_1_ms": 0.6, "goal_8_ms": 1.3,
        "per_token_plain_ms": per_token_plain, "per_token_reftgraph_ms": per_token_ours,
        "generate_call_1_token_ms": ms["gen_1"], "plain_generate_call_1_token_ms": ms["plain_gen_1"],
        "run_1_over_hand_1": ms["run_1"] / ms["hand_1"], "run_8_over_hand_8": ms["run_8"] / ms["hand_8"],
        "generate_1_over_plain": ms["gen_1"] / ms["plain_gen_1"], "goal_run_ratio": 1.2, "goal_generate_ratio": 1.3,
    }
    report(figures)


if __name__ == "__main__":
    main()

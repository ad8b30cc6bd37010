"""Median time of one LoReFT training step through reftgraph (nnsight) divided by the same
step written with plain PyTorch hooks. SmolLM2-135M, 4 layers, f5+l5 untied, rank 4,
batch 8 x 64 tokens.

    python benchmarks/train_step.py [--repeats 10] [--model NAME]
"""

import argparse

import torch

import reftgraph as rg
from reftgraph.engine import Batch, compile_graph, executor
from reftgraph.training import lm_loss

from common import interleaved, report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    lm = rg.load(args.model)
    layers = [3, 9, 15, 21][: lm.arch.n_layers]
    g = rg.reft_graph(lm, layers=layers, positions="f5+l5", rank=4)
    B, S = args.batch, args.tokens
    ids = torch.randint(100, 10000, (B, S), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(S).expand(B, S)}
    labels = ids.clone()
    labels[:, : S // 2] = -100
    batch = Batch.full(B, S)
    plan, ex = compile_graph(g, lm.arch), executor(lm)
    opt = torch.optim.AdamW(g.parameters(), lr=1e-3)
    head = lm.hf.get_output_embeddings()  # both steps run the LM head on response tokens only

    def ours():
        hidden, _ = ex.forward(plan.bind(batch), inputs, output="hidden")
        lm_loss(hidden, labels, head).backward()
        opt.step()
        opt.zero_grad()

    first, last = torch.arange(5), torch.arange(S - 5, S)

    def hook_for(layer):
        op_first, op_last = g[f"L{layer}_first"].op, g[f"L{layer}_last"].op

        def hook(mod, args, out):
            out = out.clone()
            out[:, first] = op_first(out[:, first])
            out[:, last] = op_last(out[:, last])
            return out
        return hook

    def plain():
        handles = [lm.hf.model.layers[L].register_forward_hook(hook_for(L)) for L in layers]
        try:
            hidden = lm.hf.model(**inputs).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        lm_loss(hidden, labels, head).backward()
        opt.step()
        opt.zero_grad()

    times = interleaved({"reftgraph": ours, "plain_hooks": plain}, args.repeats)
    report({
        "model": args.model, "batch": f"{B}x{S}", "layers": str(layers),
        "trainable_params": g.num_parameters(),
        "reftgraph_step_s": times["reftgraph"], "plain_hooks_step_s": times["plain_hooks"],
        "ratio": times["reftgraph"] / times["plain_hooks"],
    })


if __name__ == "__main__":
    main()

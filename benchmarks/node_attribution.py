"""Node attribution (AtP) on SmolLM2-135M: ``rg.patching.attribute`` over ``head_out``,
``attn_out``, ``mlp_out`` and ``resid_pre`` (every layer; ``resid_pre`` per position, the others
all positions summed) against the
plain formula written with PyTorch hooks on the Hugging Face model (one clean forward, one
corrupted forward and backward, every site at once). Prints both times (medians, interleaved),
their ratio and the largest difference of the estimates; last line JSON.

    .venv/bin/python benchmarks/node_attribution.py [--prompts 16] [--repeats 3]
"""

import argparse
import json
import statistics
import time

import torch

import reftgraph as rg
from reftgraph.datasets import ioi
from common import set_threads

COMPONENTS = ("head_out", "attn_out", "mlp_out", "resid_pre")


def plain(lm, data) -> dict:
    """``{(component, layer): estimate [(heads)]}``: ``sum (a_clean - a_corrupt) . dM/da`` on the corrupted run."""
    hf, tok = lm.hf, lm.tokenizer
    layers = hf.model.layers
    n_heads = hf.config.num_attention_heads
    side, tok.padding_side = tok.padding_side, "right"
    clean_in = tok(list(data.source), return_tensors="pt", padding=True)
    base_in = tok(list(data.base), return_tensors="pt", padding=True)
    tok.padding_side = side
    correct = torch.tensor([tok(a)["input_ids"][-1] for a in data.correct])
    wrong = torch.tensor([tok(a)["input_ids"][-1] for a in data.wrong])

    def hooks(store, probe):
        def out_hook(key):
            def fn(module, args, out):
                t = out[0] if isinstance(out, tuple) else out
                store[key] = t.detach()
                if probe:
                    delta = torch.zeros_like(t, requires_grad=True)
                    store[key + ("delta",)] = delta
                    t = t + delta
                return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t
            return fn

        def in_hook(key):
            def fn(module, args, kwargs):
                t = args[0] if args else kwargs["hidden_states"]
                store[key] = t.detach()
                if probe:
                    delta = torch.zeros_like(t, requires_grad=True)
                    store[key + ("delta",)] = delta
                    t = t + delta
                if args:
                    return (t,) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": t}
            return fn

        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(in_hook(("resid_pre", i)), with_kwargs=True))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(in_hook(("head_out", i)), with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(out_hook(("attn_out", i))))
            handles.append(layer.mlp.register_forward_hook(out_hook(("mlp_out", i))))
        return handles

    clean = {}
    handles = hooks(clean, probe=False)
    with torch.no_grad():
        hf(**clean_in)
    for h in handles:
        h.remove()
    corrupt = {}
    handles = hooks(corrupt, probe=True)
    logits = hf(**base_in).logits
    for h in handles:
        h.remove()
    last = base_in["attention_mask"].sum(1) - 1
    nxt = logits[torch.arange(len(last)), last]
    metric = (nxt.gather(1, correct[:, None]) - nxt.gather(1, wrong[:, None])).sum()
    keys = [k for k in corrupt if len(k) == 2]
    grads = torch.autograd.grad(metric, [corrupt[k + ("delta",)] for k in keys])
    mask = base_in["attention_mask"][..., None].float()
    out = {}
    for k, g in zip(keys, grads):
        prod = (clean[k] - corrupt[k]) * g * mask
        if k[0] == "head_out":
            prod = prod.view(*prod.shape[:2], n_heads, -1).sum(-1)
            out[k] = prod.sum((0, 1)) / len(last)
        else:
            out[k] = prod.sum() / len(last)
    return out


def ours(lm, data):
    return rg.patching.attribute(lm, data, list(COMPONENTS), progress=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_threads()
    lm = rg.load()
    data = ioi(args.prompts, seed=0)
    table, ref = ours(lm, data), plain(lm, data)
    diff = 0.0    # (resid_pre comes per position: summed here)
    summed = table.fillna({"head": -1}).groupby(["component", "layer", "head"]).estimate.sum()
    for (component, layer, head), estimate in summed.items():
        want = ref[(component, int(layer))]
        want = float(want[int(head)]) if component == "head_out" else float(want)
        diff = max(diff, abs(want - estimate))
    times = {"reftgraph": [], "plain": []}
    for _ in range(args.repeats):
        for name, fn in (("reftgraph", ours), ("plain", plain)):
            start = time.perf_counter()
            fn(lm, data)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    figures = {"prompts": args.prompts, "sites": len(table), "reftgraph_s": round(med["reftgraph"], 3),
               "plain_s": round(med["plain"], 3), "ratio": round(med["reftgraph"] / med["plain"], 3),
               "max_estimate_diff": diff}
    for k, v in figures.items():
        print(f"{k:>20}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

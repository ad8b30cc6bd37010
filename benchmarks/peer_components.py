"""Peer check of component values: what reftgraph collects at each component of a real model
against TransformerLens 4.3's ``TransformerBridge`` hook values on the same prompts, the same
weights (SmolLM2-135M-Instruct and Gemma 3 270M, from their offline caches). TransformerLens
is a benchmark-only dependency in a venv of its own; the sides exchange safetensors files.
Last line JSON.

    python3 -m venv /tmp/tlvenv && /tmp/tlvenv/bin/pip install torch==2.13.0 'transformer-lens==4.3.*'
    .venv/bin/python benchmarks/peer_components.py --prepare /tmp/peer-comp     # token ids, model folders
    /tmp/tlvenv/bin/python benchmarks/peer_components.py --write /tmp/peer-comp  # TransformerLens's hook values
    .venv/bin/python benchmarks/peer_components.py --check /tmp/peer-comp        # reftgraph's, compared

What the bridge's hook names mean against reftgraph's components (layer L, per head h):

| reftgraph | TransformerLens 4.3 bridge hook |
|---|---|
| ``resid_pre[L]`` | ``blocks.L.hook_resid_pre`` (the block's input) |
| ``resid_mid[L]`` | ``blocks.L.hook_resid_mid`` (what the MLP's norm reads) |
| ``resid_post[L]`` | ``blocks.L.hook_resid_post`` (the block's output) |
| ``attn_out[L]`` | ``blocks.L.hook_attn_out``: the attention output; in Gemma 3 after the norm that follows attention, what is added (reftgraph's ``post_norm`` style) |
| ``mlp_out[L]`` | ``blocks.L.hook_mlp_out``, likewise |
| ``head_out[L]`` | ``blocks.L.attn.hook_z`` (each head's output before the output projection) |
| ``q`` / ``k`` / ``v[L]`` | ``blocks.L.attn.hook_q`` / ``hook_k`` / ``hook_v``: reftgraph's are the projections' outputs, before rotary embeddings and any q/k norm; the bridge's are compared where they are the same tensors |

Each pair is compared over every layer and token (one prompt at a time, unpadded); the table
prints the largest absolute difference, whether it is within ``--atol`` (1e-4), the largest
value compared and the difference relative to it (float32 keeps about 7 digits: a stream
whose values reach 1,000 cannot agree to 1e-4 between two kernels). A hook the bridge does not
have is reported as missing, not skipped silently.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

PROMPTS = ["The capital of France is the city of", "When Mary and John went to the store, John gave a drink to"]
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma-3-270m"}
PAIRS = {   # reftgraph component -> bridge hook, per layer
    "resid_pre": "blocks.{L}.hook_resid_pre", "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post", "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out", "head_out": "blocks.{L}.attn.hook_z",
    "q": "blocks.{L}.attn.hook_q", "k": "blocks.{L}.attn.hook_k", "v": "blocks.{L}.attn.hook_v",
}


def prepare(root: Path) -> None:
    import reftgraph as rg
    from reftgraph.arch.hub import offline_model, offline_model_folder

    root.mkdir(parents=True, exist_ok=True)
    meta = {}
    for key, name in MODELS.items():
        lm = rg.load(name)
        ids = [lm.tokenizer(p, return_tensors="pt")["input_ids"][0].tolist() for p in PROMPTS]
        meta[key] = {"folder": str(offline_model_folder(offline_model(name))), "ids": ids,
                     "layers": lm.arch.n_layers}
    (root / "meta.json").write_text(json.dumps(meta))
    print(json.dumps({"prepared": str(root)}))


def write(root: Path) -> None:
    """The TransformerLens side: every hook of PAIRS, per model and prompt, to safetensors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file
    from transformer_lens.model_bridge import TransformerBridge

    meta = json.loads((root / "meta.json").read_text())
    for key, m in meta.items():
        bridge = TransformerBridge.boot_transformers(m["folder"], device="cpu", dtype=torch.float32)
        out = {}
        for i, ids in enumerate(m["ids"]):
            _, cache = bridge.run_with_cache(torch.tensor([ids]))
            for component, hook in PAIRS.items():
                for layer in range(m["layers"]):
                    name = hook.format(L=layer)
                    if name in cache:
                        out[f"{i}/{component}/{layer}"] = cache[name][0].float().clone()   # (hooks share tensors)
        save_file(out, str(root / f"{key}-transformer_lens.safetensors"))
        print(key, len(out), "tensors", flush=True)


def check(root: Path, atol: float) -> dict:
    from safetensors.torch import load_file

    import reftgraph as rg

    meta = json.loads((root / "meta.json").read_text())
    figures = {}
    for key, m in meta.items():
        theirs = load_file(str(root / f"{key}-transformer_lens.safetensors"))
        lm = rg.load(MODELS[key])
        worst = {}
        for i, ids in enumerate(m["ids"]):
            g = rg.Graph()
            for component in PAIRS:
                for layer in range(m["layers"]):
                    if lm.arch.refusal(component, layer) is None:
                        g.add(rg.Site(component, layer=layer), rg.Collect(), name=f"{component}/{layer}")
            ours = g.run(lm, [PROMPTS[i]])
            assert ours.logits.shape[1] == len(ids), "reftgraph tokenized the prompt differently"
            for component in PAIRS:
                for layer in range(m["layers"]):
                    name = f"{component}/{layer}"
                    if name not in ours.collected:
                        worst.setdefault(component, "refused by reftgraph")
                        continue
                    other = theirs.get(f"{i}/{name}")
                    if other is None:
                        worst.setdefault(component, "no such bridge hook")
                        continue
                    mine = ours[name][0].float()
                    if mine.shape != other.shape:
                        worst[component] = f"shapes differ: ours {list(mine.shape)}, bridge {list(other.shape)}"
                        continue
                    gap, scale = float((mine - other).abs().max()), float(other.abs().max())
                    if not isinstance(worst.get(component), str):
                        old = worst.get(component, (0.0, 0.0, 0.0))
                        worst[component] = (max(old[0], gap), max(old[1], scale), max(old[2], gap / scale))
        for component, got in worst.items():
            if isinstance(got, str):
                print(f"{key:>8} {component:>10}: {got}", flush=True)
                continue
            gap, scale, rel = got
            print(f"{key:>8} {component:>10}: max |difference| {gap:.2e} ({'within' if gap <= atol else 'over'} "
                  f"{atol:g}); largest |value| {scale:.3g}; relative {rel:.1e}", flush=True)
        figures[key] = {c: (g if isinstance(g, str) else {"max_abs_diff": round(g[0], 8), "max_abs_value": round(g[1], 3),
                                                          "relative": float(f"{g[2]:.2e}")}) for c, g in worst.items()}
    print(json.dumps(figures))
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prepare", type=Path)
    group.add_argument("--write", type=Path)
    group.add_argument("--check", type=Path)
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
    elif args.write:
        write(args.write)
    else:
        check(args.check, args.atol)


if __name__ == "__main__":
    sys.exit(main())

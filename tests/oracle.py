"""The correctness oracle: the same edits written as plain PyTorch hooks on the unwrapped
model, with Python loops over rows and positions (slow, obvious, independent of
reftgraph's compiler)."""

from __future__ import annotations

import re

import torch


def positions_of(selector, length: int) -> list:
    """Relative prompt positions a selector picks in a prompt of ``length`` tokens."""
    if isinstance(selector, int):
        selector = [selector]
    if isinstance(selector, (list, tuple)):
        return [p if p >= 0 else length + p for p in selector]
    if isinstance(selector, slice):
        return list(range(length))[selector]
    if selector == "last":
        return [length - 1]
    if selector in ("all", "prompt"):
        return list(range(length))
    n, m = map(int, re.match(r"f(\d+)\+l(\d+)", selector).groups())
    first = list(range(min(n, length)))
    return first + [p for p in range(max(length - m, 0), length) if p not in first]


def padded(lm, prompts, side):
    """``(model inputs, each row's real token indices)`` of ``prompts`` padded by hand on ``side``."""
    tok = lm.tokenizer
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id or 0)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, at], mask[i, at] = torch.tensor(r), 1
    return lm.arch.inputs(ids, mask), [m.nonzero().flatten().tolist() for m in mask]


def last_logits_with(lm, inputs, real, handle):
    """Each row's logits at its last real token (``real``: as :func:`padded` gives) from one
    forward of ``inputs`` with the plain hook ``handle`` installed; the hook is removed after."""
    try:
        logits = lm.hf(**inputs).logits
    finally:
        handle.remove()
    return torch.stack([logits[row, idx[-1]] for row, idx in enumerate(real)])


def encode(tok, prompts, side):
    old = tok.padding_side
    tok.padding_side = side
    enc = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = old
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"], "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def real_positions(mask: torch.Tensor) -> list:
    """Per row, the padded indices of the real tokens."""
    return [row.nonzero().flatten().tolist() for row in mask]


# Written by hand from each architecture's transformers source, independently of the resolver.
# attn_add / mlp_add: the module whose output the block adds to the stream; qkv: "q_proj"-style
# separate projections (a format string) or a fused projection with its layout.
# norm: the norm before attention; mlp_norm: the norm only the MLP reads.
PATHS = {
    "llama": dict(embed="model.embed_tokens", final_norm="model.norm", layers="model.layers", attn="self_attn", mlp="mlp", down="mlp.down_proj", o="self_attn.o_proj",
                  qkv="self_attn.{}_proj", norm="input_layernorm", mlp_norm="post_attention_layernorm"),
    "gpt2": dict(embed="transformer.wte", final_norm="transformer.ln_f", layers="transformer.h", attn="attn", mlp="mlp", down="mlp.c_proj", o="attn.c_proj",
                 fused="attn.c_attn", layout="concat", norm="ln_1", mlp_norm="ln_2"),
    "gpt_neox": dict(embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
                     layers="gpt_neox.layers", attn="attention", mlp="mlp", down="mlp.dense_4h_to_h",
                     o="attention.dense", fused="attention.query_key_value", layout="per_head", parallel=True,
                     norm="input_layernorm", mlp_norm="post_attention_layernorm"),
    "gemma3_text": dict(embed="model.embed_tokens", final_norm="model.norm", layers="model.layers", attn="self_attn", mlp="mlp", down="mlp.down_proj", o="self_attn.o_proj",
                        qkv="self_attn.{}_proj", attn_add="post_attention_layernorm",
                        mlp_add="post_feedforward_layernorm", norm="input_layernorm",
                        mlp_norm="pre_feedforward_layernorm"),
    "phi3": dict(embed="model.embed_tokens", final_norm="model.norm", layers="model.layers", attn="self_attn", mlp="mlp", down="mlp.down_proj", o="self_attn.o_proj",
                 fused="self_attn.qkv_proj", layout="concat", norm="input_layernorm",
                 mlp_norm="post_attention_layernorm"),
    "gptj": dict(embed="transformer.wte", final_norm="transformer.ln_f", layers="transformer.h", attn="attn", mlp="mlp", down="mlp.fc_out", o="attn.out_proj",
                 qkv="attn.{}_proj", parallel=True, norm="ln_1"),
    "qwen2_moe": dict(embed="model.embed_tokens", final_norm="model.norm", layers="model.layers", attn="self_attn", mlp="mlp", o="self_attn.o_proj", qkv="self_attn.{}_proj",
                      norm="input_layernorm", mlp_norm="post_attention_layernorm"),
}
# what each architecture has no definition for (the library must refuse these)
ABSENT = {"gpt_neox": {"resid_mid"}, "gptj": {"resid_mid"}, "qwen2_moe": {"mlp_act"}}
ABSENT = {family: ABSENT.get(family, set()) | {"mixer_out", "cross_attn_out"} for family in PATHS}
#          (mixer_out: tests/test_mixer.py; cross_attn_out: tests/test_seq2seq.py)


def module(hf, family: str, layer: int, path: str):
    root = hf
    for part in PATHS[family]["layers"].split("."):
        root = getattr(root, part)
    root = root[layer]
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root


COPIES: dict = {}   # (block, receiver input) -> the block input and the heads' copies, in one forward


def install(hf, family, component, layer, edit, cfg):
    """Hooks that call ``edit(t)`` on the component's ``[B, S, ...]`` tensor and write the result.

    Returns the hook handles."""
    p = PATHS[family]
    H, Hkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    handles = []
    block = module(hf, family, layer, "")
    attn_add, mlp_add = p.get("attn_add", p["attn"]), p.get("mlp_add", p["mlp"])

    def first_out(fn):
        def hook(mod, args, out):
            if isinstance(out, tuple):
                return (fn(out[0]),) + out[1:]
            return fn(out)
        return hook

    def first_in(fn):
        def hook(mod, args, kwargs):
            if args:
                return (fn(args[0]),) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return hook

    def proj_of(c):   # (projection module, its part for c: [B, S, heads, dh], and the inverse)
        if "qkv" in p:
            n = H if c == "q" else Hkv
            return (module(hf, family, layer, p["qkv"].format(c)),
                    lambda out: out.reshape(*out.shape[:-1], n, dh), lambda out, new: new.reshape(out.shape))
        i = "qkv".index(c)
        if p["layout"] == "concat":
            sizes = [H * dh, Hkv * dh, Hkv * dh]

            def part(out):
                return out.split(sizes, -1)[i].reshape(*out.shape[:-1], H if i == 0 else Hkv, dh)

            def put(out, new):
                parts = list(out.split(sizes, -1))
                parts[i] = new.reshape(parts[i].shape)
                return torch.cat(parts, -1)
        else:
            def part(out):
                return out.reshape(*out.shape[:-1], H, 3 * dh).split(dh, -1)[i]

            def put(out, new):
                parts = list(out.reshape(*out.shape[:-1], H, 3 * dh).split(dh, -1))
                parts[i] = new
                return torch.cat(parts, -1).reshape(out.shape)
        return module(hf, family, layer, p["fused"]), part, put

    if component in ("embed", "logits_in", "logits"):   # outside the blocks: paths from the root
        path = {"embed": p["embed"], "logits_in": p["final_norm"], "logits": p.get("head", "lm_head")}[component]
        target = hf
        for part in path.split("."):
            target = getattr(target, part)
        if component == "logits_in":
            handles.append(target.register_forward_pre_hook(first_in(edit), with_kwargs=True))
        else:
            handles.append(target.register_forward_hook(first_out(edit)))
        return handles
    if component in ("q_in", "k_in", "v_in"):
        # each head's query/key/value recomputed from its own copy of the block input, by its
        # norm; the copies are shared by every node on this input (each edits what the last wrote)
        c = component[0]
        proj, part, put = proj_of(c)
        norm = module(hf, family, layer, p["norm"])
        key = (id(block), component)

        def start(x):
            COPIES[key] = {"x": x}
            return x

        def hook(m, a, out):
            state = COPIES[key]
            x = state["x"]
            n = part(out).shape[2]
            copies = edit(state.get("copies", x.unsqueeze(2).expand(*x.shape[:2], n, x.shape[-1])))
            state["copies"] = copies
            # .forward: the modules' own computation, without the hooks installed on them
            heads = [part(proj.forward(norm.forward(copies[:, :, h])))[:, :, h] for h in range(n)]
            return put(out, torch.stack(heads, 2))
        handles.append(block.register_forward_pre_hook(first_in(start), with_kwargs=True))
        handles.append(proj.register_forward_hook(hook))
        return handles
    if component == "mlp_in" and "mlp_norm" not in p:
        # attention and the MLP read one norm: the MLP reads the norm of its own copy of the block
        # input (shared by every node on it, each editing what the last wrote)
        norm, key = module(hf, family, layer, p["norm"]), (id(block), component)

        def start_mlp(x):
            COPIES[key] = {"x": x}
            return x

        def read(m, a):
            state = COPIES[key]
            state["copies"] = edit(state.get("copies", state["x"]))
            return (norm.forward(state["copies"]),) + a[1:]
        handles.append(block.register_forward_pre_hook(first_in(start_mlp), with_kwargs=True))
        handles.append(module(hf, family, layer, p["mlp"]).register_forward_pre_hook(read))
        return handles
    if component == "mlp_in":
        handles.append(module(hf, family, layer, p["mlp_norm"]).register_forward_pre_hook(first_in(edit),
                                                                                           with_kwargs=True))
        return handles
    if component == "resid_pre":
        handles.append(block.register_forward_pre_hook(first_in(edit), with_kwargs=True))
    elif component == "resid_post":
        handles.append(block.register_forward_hook(first_out(edit)))
    elif component == "attn_out":
        handles.append(module(hf, family, layer, attn_add).register_forward_hook(first_out(edit)))
    elif component == "mlp_out":
        handles.append(module(hf, family, layer, mlp_add).register_forward_hook(first_out(edit)))
    elif component == "resid_mid":
        seen = {}
        handles.append(block.register_forward_pre_hook(first_in(lambda x: seen.update(x=x) or x), with_kwargs=True))
        handles.append(module(hf, family, layer, attn_add).register_forward_hook(
            first_out(lambda a: edit(seen["x"] + a) - seen["x"])))
    elif component == "mlp_act":
        handles.append(module(hf, family, layer, p["down"]).register_forward_pre_hook(
            lambda m, a: (edit(a[0]),) + a[1:]))
    elif component == "head_out":
        def pre(m, a):
            B, S, _ = a[0].shape
            return (edit(a[0].reshape(B, S, H, dh)).reshape(B, S, H * dh),) + a[1:]
        handles.append(module(hf, family, layer, p["o"]).register_forward_pre_hook(pre))
    elif "qkv" in p:
        proj = module(hf, family, layer, p["qkv"].format(component))
        n = H if component == "q" else Hkv
        handles.append(proj.register_forward_hook(
            lambda m, a, out: edit(out.reshape(*out.shape[:2], n, dh)).reshape(out.shape)))
    elif p["layout"] == "concat":
        i = "qkv".index(component)
        sizes = [H * dh, Hkv * dh, Hkv * dh]

        def hook(m, a, out):
            parts = list(out.split(sizes, -1))
            parts[i] = edit(parts[i].reshape(*out.shape[:2], H if i == 0 else Hkv, dh)).reshape(parts[i].shape)
            return torch.cat(parts, -1)
        handles.append(module(hf, family, layer, p["fused"]).register_forward_hook(hook))
    else:
        i = "qkv".index(component)

        def hook(m, a, out):
            per_head = out.reshape(*out.shape[:2], H, 3 * dh)
            parts = list(per_head.split(dh, -1))
            parts[i] = edit(parts[i])
            return torch.cat(parts, -1).reshape(out.shape)
        handles.append(module(hf, family, layer, p["fused"]).register_forward_hook(hook))
    return handles


def capture(hf, family, component, layer, inputs, cfg):
    """The component's ``[B, S, ...]`` tensor in a clean run on ``inputs``."""
    store = {}

    def keep(t):
        store["t"] = t.detach().clone()
        return t

    handles = install(hf, family, component, layer, keep, cfg)
    try:
        with torch.no_grad():
            hf(**inputs)
    finally:
        for h in handles:
            h.remove()
    return store["t"]


def run_with(hf, family, component, layer, inputs, edit, cfg):
    handles = install(hf, family, component, layer, edit, cfg)
    try:
        return hf(**inputs).logits
    finally:
        for h in handles:
            h.remove()


def add_at_last_token(lm, prompts, side, component, layer, module, divide=1.0, scale=1.5, seed=1):
    """``(ours, our gradient, the hook's, its gradient)``: ``rg.Add(scale * v)`` at ``component``
    of the last real token (compiled), and ``scale * v / divide`` added to ``module``'s output by
    a plain hook (a block that adds ``divide * module`` moves its stream by the same); the
    gradients are of the squared next-token logits with respect to ``v`` (random, ``seed``)."""
    import reftgraph as rg

    vector = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(seed))
    op = rg.Add(vector.clone(), scale=scale, trainable=True)
    g = rg.Graph()
    g.add(rg.Site(component, layer=layer, positions="last"), op, name="a")
    ours = g.run(lm, prompts, padding_side=side).next_token_logits
    (grad,) = torch.autograd.grad(ours.square().sum(), [op.vector])
    v = vector.clone().requires_grad_(True)
    inputs, real = padded(lm, prompts, side)

    def edit(m, a, out):
        t = (out[0] if isinstance(out, tuple) else out).clone()
        for row, idx in enumerate(real):
            t[row, idx[-1]] = t[row, idx[-1]] + scale * v / divide
        return (t,) + out[1:] if isinstance(out, tuple) else t
    want = last_logits_with(lm, inputs, real, module.register_forward_hook(edit))
    (want_grad,) = torch.autograd.grad(want.square().sum(), [v])
    return ours, grad, want, want_grad


def logits_with_hook(lm, prompts, side, module, fn):
    """``(logits, each row's real token indices)`` of ``prompts`` padded on ``side``, with
    ``fn(output, real) -> output`` as a plain forward hook on ``module``."""
    inputs, real = padded(lm, prompts, side)
    handle = module.register_forward_hook(lambda m, a, out: fn(out, real))
    try:
        return lm.hf(**inputs).logits, real
    finally:
        handle.remove()

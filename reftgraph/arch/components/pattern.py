"""``attn_pattern``: each head's attention probabilities, one row of keys per query.

>>> import reftgraph as rg
>>> arch = rg.models.tiny("llama").arch
>>> hook = arch.hook("attn_pattern", 0)
>>> hook.path, hook.inner, arch.heads("attn_pattern")
('self_attn', ('attention_interface_1', 'nn_functional_softmax_0'), 4)

The value is the output of the softmax inside the attention function (after the mask,
before dropout), ``[batch, heads, query, key]`` in the model; a site views it as
``[batch, query, heads, key]``: positions select queries, ``head=`` selects heads, and the
last axis holds one probability per key token, counted from each row's first prompt token
(as positions are). It exists only in eager attention: the engine runs a plan that
touches it with ``attn_implementation="eager"`` and puts the model's own back after.

Proof, on a tiny instance in eager attention: the value equals transformers'
``output_attentions`` weights, every row sums to 1, and replacing the pattern of head h at
query p moves ``head_out`` of head h at p alone.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional

import torch

from .base import Address, Component, Context, no_module, walk
from .heads import POS   # the position locality checks edit

__all__ = ["Pattern", "eager"]


@contextmanager
def eager(hf):
    """Run ``hf`` (a transformers model) with eager attention inside the block; its own after.

    >>> import reftgraph as rg
    >>> hf = rg.models.tiny("llama").hf
    >>> with eager(hf):
    ...     hf.config._attn_implementation
    'eager'
    >>> hf.config._attn_implementation
    'sdpa'
    """
    before = getattr(hf.config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf.set_attn_implementation(before)


def _core(lm, block: str, paths) -> str:
    """The path of the module whose forward computes the attention probabilities: the
    attention module, or the parent of its query projection (BERT's ``attention.self``)."""
    q = paths.qkv if isinstance(paths.qkv, str) else (paths.qkv or (None,))[0]
    names = walk(lm, block + paths.attn).source.names
    if q and "." in q and not any("softmax" in n or n.startswith("attention_interface") for n in names):
        return q.rsplit(".", 1)[0]
    return paths.attn


def _prove(ctx: Context) -> tuple[str, Optional[tuple]]:
    """``(why it is refused or '', the inner operation names)``, on the tiny model in eager attention."""
    from nnsight import NNsight

    model, paths = ctx.model, ctx.paths
    block = {m: n for n, m in model.named_modules()}[ctx.blocks[ctx.layer]]
    with eager(model):
        with warnings.catch_warnings():    # (a submodule named `output` is served as `E_output`: see walk)
            warnings.simplefilter("ignore")
            lm = NNsight(model)
        proj = walk(lm, f"{block}.{paths.attn_proj}")
        core = _core(lm, f"{block}.", paths)
        attn = walk(lm, f"{block}.{core}")
        names = attn.source.names
        inner = next(((n,) for n in names if "softmax" in n), None)
        calls = [n for n in names if n.startswith("attention_interface")]
        if inner is None and calls:
            found = []
            with lm.trace(ctx.ids):
                found.append(tuple(getattr(attn.source, calls[-1]).source.names))
            inner = next(((calls[-1], n) for n in found[0] if "softmax" in n), None)
        if inner is None:
            return f"no softmax found in the forward of {core!r} (its operations: {', '.join(names)})", None

        def reach():
            envoy = attn
            for name in inner:
                envoy = getattr(envoy.source, name)
            return envoy

        with lm.trace(ctx.ids):
            pattern = reach().output.save()
            heads_in = proj.input.save()
        with torch.no_grad():
            out = model(input_ids=ctx.ids, output_attentions=True, use_cache=False)
        weights, at = _attentions(out, model, ctx.blocks), ctx.layer
        if len(weights) != len(ctx.blocks):    # a hybrid returns the weights of its attention layers alone
            kind = type(walk(ctx.blocks[ctx.layer], paths.attn))
            at = sum(any(type(m) is kind for m in b.modules()) for b in ctx.blocks[:ctx.layer])
        weights = weights[at] if at < len(weights) else None
        if weights is None or not ctx.rec.close(pattern, weights):
            return (f"the softmax in {core!r} is not the attention weights transformers returns "
                    f"({ctx.rec.gap(pattern, weights)})"), None
        if not ctx.rec.close(pattern.sum(-1), torch.ones_like(pattern.sum(-1))):
            return "the attention probabilities of a query do not sum to 1", None
        head, dh = pattern.shape[1] - 1, ctx.widths["head_out"]
        with lm.trace(ctx.ids):
            envoy = reach()
            new = envoy.output.clone()
            new[:, head, POS] = 0
            new[:, head, POS, 0] = 1          # all of the head's attention on the first token
            envoy.output = new
            edited = proj.input.save()
    diff = (edited - heads_in)[0]
    moved = {(p, c // dh) for p, c in (diff.abs() > 1e-5 * (1 + heads_in.abs().max())).nonzero().tolist()}
    if moved != {(POS, head)}:
        return (f"replacing the pattern of head {head} at query {POS} should move head_out of that head at that "
                f"position alone; it moved (position, head) {sorted(moved)}"), None
    return "", (core, inner)


class Pattern(Component):
    """``attn_pattern``: each head's attention probabilities (the softmax inside the attention).

    >>> import reftgraph as rg
    >>> Pattern().address("attn_pattern", rg.models.tiny("gpt2").arch.blocks[0]).inner
    ('attention_interface_1', 'nn_functional_softmax_0')
    """
    names = ("attn_pattern",)
    has_heads = True
    needs_proof = True

    def address(self, name, block) -> Address:
        return Address(block.inner.get("attn_pattern_module", block.paths.attn), "output", block.inner.get(name, ()))

    def view(self, name, arch, block, layer):
        return (lambda raw, pre: raw.transpose(1, 2), lambda raw, new, pre: new.transpose(1, 2))

    def width(self, name, arch, block):
        return None          # one entry per key: the batch's token count

    def fallback_width(self, name, arch):
        return None

    def heads(self, name, arch, block) -> int:
        return block.heads[0] if block is not None and block.heads[0] else arch.n_heads

    def stage(self, name, ctx, stages):
        head_out = stages.get((ctx.paths.attn_proj, "input"))
        return None if head_out is None else head_out - 0.5     # inside the attention, before its projection

    def prove(self, ctx: Context) -> None:
        if not ctx.paths.attn:
            ctx.refused["attn_pattern"] = no_module("attention", ctx.paths)
            return
        if "head_out" in ctx.refused:
            ctx.refused["attn_pattern"] = f"needs head_out, which is refused: {ctx.refused['head_out']}"
            return
        try:
            why, inner = _prove(ctx)
        except Exception as err:  # noqa: BLE001 - a pattern the checks cannot reach is refused, not trusted
            why, inner = f"the attention probabilities could not be reached ({type(err).__name__}: {err})", None
        if why:
            ctx.refused["attn_pattern"] = why
        else:
            ctx.inner["attn_pattern_module"], ctx.inner["attn_pattern"] = inner


def _attentions(out, model, blocks) -> tuple:
    """The attention weights transformers returns for the stack ``blocks`` belong to (an
    encoder-decoder returns each stack's apart)."""
    if hasattr(out, "attentions"):
        return out.attentions
    encoder = callable(getattr(model, "get_encoder", None)) and any(b is blocks[0] for b in model.get_encoder().modules())
    return out.encoder_attentions if encoder else out.decoder_attentions

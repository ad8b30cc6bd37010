"""What the block adds to the stream: ``attn_out`` (the attention sub-layer's output),
``mlp_out`` (the MLP's) and, in an encoder-decoder's decoder blocks, ``cross_attn_out`` (the
cross-attention's, which reads the encoder's output).

>>> import reftgraph as rg
>>> arch = rg.models.tiny("gemma3_text").arch      # norms after attention and MLP
>>> arch.hook("attn_out", 0).path, arch.hook("mlp_out", 0).path
('post_attention_layernorm', 'post_feedforward_layernorm')

Which module's output is what the block adds depends on the block style
(:mod:`reftgraph.arch.styles`: after a post-norm, the norm's output; with a scaled addition,
the module's output times the block's scale). Proof: the style's
identities hold, and adding to the component moves the stream it feeds by exactly the
addition. Blocks that flatten tokens around the MLP are viewed back per token. Where a block
adds its MLP's output together with a module beside it (GraniteMoeHybrid's shared MLP),
``mlp_out`` is read at the operation in the block's forward that adds the two: proven on the
tiny instance to be their sum, and adding to it moves the block's output by the addition.
"""

from __future__ import annotations

import warnings

import torch

from .base import Address, Component, Context, first, no_module, walk, with_first

__all__ = ["SublayerOutputs", "per_token", "scaled"]


def scaled(c):
    """``(get, put)`` for what a block adds as ``c`` times a module's output (``c`` a number, or
    one weight per dimension).

    >>> import torch
    >>> get, put = scaled(0.5)
    >>> get(torch.ones(2), None).tolist(), put(torch.ones(2), torch.ones(2), None).tolist()
    ([0.5, 0.5], [2.0, 2.0])
    """
    def on(t):     # a measured weight per dimension (styles.weighted) goes where the value is
        return c.to(t.device, t.dtype) if isinstance(c, torch.Tensor) else c

    return (lambda raw, pre: on(first(raw)) * first(raw),
            lambda raw, new, pre: with_first(raw, new / on(new)))


def per_token():
    """``(get, put)`` for a value whose tokens a block flattens to ``[batch * tokens, width]``.

    >>> import torch
    >>> get, put = per_token()
    >>> get(torch.zeros(6, 4), torch.zeros(2, 3, 8)).shape        # viewed back per token
    torch.Size([2, 3, 4])
    """
    return (lambda raw, pre: first(raw).view(pre.shape[0], pre.shape[1], -1),
            lambda raw, new, pre: with_first(raw, new.reshape(first(raw).shape)))


class SublayerOutputs(Component):
    """What attention, cross-attention and the MLP add to the stream: ``attn_out``,
    ``cross_attn_out`` and ``mlp_out``.

    >>> import reftgraph as rg
    >>> SublayerOutputs().address("mlp_out", rg.models.tiny("llama").arch.blocks[0])
    Address(path='mlp', io='output', inner=())
    """
    names = ("attn_out", "cross_attn_out", "mlp_out")

    def address(self, name, block) -> Address:
        if name in block.inner:      # the sum of the MLP's output and a module's beside it, inside the block
            return Address("", "output", block.inner[name])
        return Address({"attn_out": block.attn_out, "cross_attn_out": block.cross}.get(name, block.mlp_out), "output")

    def stage(self, name, ctx, stages):
        if name in ctx.inner:        # once both parts of the sum have run
            return max(stages[(ctx.mlp_out, "output")], stages[(ctx.beside[name], "output")]) + 0.5
        return super().stage(name, ctx, stages)

    def view(self, name, arch, block, layer):
        if name in block.scales:
            return scaled(block.scales[name][1])
        return per_token() if name in block.flat else super().view(name, arch, block, layer)

    def needs_pre(self, name, block) -> bool:
        return name in block.flat

    def prove(self, ctx: Context) -> None:
        for name, found, what in (("attn_out", ctx.attn_out, "attention"), ("mlp_out", ctx.mlp_out, "MLP")):
            if ctx.style_problem:
                ctx.refused[name] = ctx.style_problem
            elif not found:
                ctx.refused[name] = no_module(what, ctx.paths)
        for name, side in ctx.beside.items():
            if name not in ctx.refused:
                try:
                    why = _sum_operation(ctx, name, side)
                except Exception as err:  # noqa: BLE001 - a sum the checks cannot reach is refused, not trusted
                    why = f"the operation adding {ctx.mlp_out!r} and {side!r} could not be reached ({err})"
                if why:
                    ctx.refused[name] = why
        if not ctx.cross:
            ctx.refused["cross_attn_out"] = ctx.style_problem or (
                "this block has no cross-attention (only an encoder-decoder's decoder blocks read the encoder)")


def _sum_operation(ctx: Context, name: str, side: str) -> str:
    """Why no operation in the block's forward is proven to add the MLP's output and ``side``'s
    ('' when one is: ``ctx.inner[name]`` names it). Tried in order after the calls of the two
    modules, on the tiny model: its output must be their sum, and adding ``d / c`` to it must
    move the block's output by ``d``."""
    from nnsight import NNsight

    rec, mlp = ctx.rec, ctx.mlp_out
    path = {m: n for n, m in ctx.model.named_modules()}[ctx.blocks[ctx.layer]]
    with warnings.catch_warnings():    # (a submodule named `output` is served as `E_output`: see walk)
        warnings.simplefilter("ignore")
        lm = NNsight(ctx.model)
    block = walk(lm, path)
    names = list(block.source.names)   # (reached before a trace: the forward is then instrumented)
    calls = [next((i for i, n in enumerate(names) if n == f"self_{p}_0"), None) for p in (mlp, side)]
    if None in calls:
        return f"the block's forward does not call {mlp!r} and {side!r} itself (its operations: {', '.join(names)})"
    want = rec.out(mlp) + rec.out(side)
    c = ctx.scales.get(name, (None, 1.0))[1]
    delta = torch.randn(want.shape[-1], generator=torch.Generator().manual_seed(3))
    tried = names[max(calls) + 1:max(calls) + 4]
    for op in tried:
        try:
            with lm.trace(ctx.ids):
                value = getattr(block.source, op).output.save()
            if not isinstance(value, torch.Tensor) or not rec.close(value, want):
                continue
            with lm.trace(ctx.ids):
                envoy = getattr(block.source, op)
                envoy.output = envoy.output + delta / c
                moved = first(block.output).save()
        except Exception:  # noqa: BLE001 - an operation that did not run, or gave no tensor: the next one
            continue
        if not rec.close(moved, rec.post + delta):
            return (f"the operation {op!r} adds {mlp!r} and {side!r}, but adding to it does not move the block's "
                    f"output by the same amount ({rec.gap(moved, rec.post + delta)})")
        ctx.inner[name] = (op,)
        return ""
    return f"none of the operations after the calls of {mlp!r} and {side!r} ({', '.join(tried)}) is their sum"

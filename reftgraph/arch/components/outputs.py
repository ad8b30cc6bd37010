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
addition. Blocks that flatten tokens around the MLP are viewed back per token.
"""

from __future__ import annotations

import torch

from .base import Address, Component, Context, first, no_module, with_first

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
        return Address({"attn_out": block.attn_out, "cross_attn_out": block.cross}.get(name, block.mlp_out), "output")

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
        if not ctx.cross:
            ctx.refused["cross_attn_out"] = ctx.style_problem or (
                "this block has no cross-attention (only an encoder-decoder's decoder blocks read the encoder)")

"""The residual stream: ``resid_pre`` (the block's input), ``resid_mid`` (after attention,
before the MLP) and ``resid_post`` (the block's output).

>>> import reftgraph as rg
>>> arch = rg.models.tiny("llama").arch
>>> arch.hook("resid_pre", 1).path, arch.hook("resid_post", 1).io, arch.hook("resid_mid", 1).path
('', 'output', 'self_attn')

``resid_mid`` is read through the attention output: ``resid_pre + attn_out`` (in Post-LN
blocks, the output of the norm after that sum); a block style without a stream between
attention and MLP (parallel blocks) refuses it. A stream laid out otherwise (tokens first,
several vectors per token: :mod:`reftgraph.arch.streams`) is viewed as ``[batch, tokens, width]``.
Proof: ``resid_post[L] == resid_pre[L+1]``; ``resid_mid`` exists when the block style's
identities hold (:mod:`reftgraph.arch.styles`), and (where no cross-attention comes between)
its value is what the MLP reads.
"""

from __future__ import annotations

from .base import Address, Component, Context, first, no_module, with_first

__all__ = ["Residual"]


class Residual(Component):
    """The residual stream: ``resid_pre``, ``resid_mid`` and ``resid_post``.

    >>> Residual().address("resid_post", None)
    Address(path='', io='output', inner=())
    """
    names = ("resid_pre", "resid_mid", "resid_post")

    def address(self, name, block) -> Address:
        if name == "resid_mid":     # Post-LN: the output of the norm after attention's addition
            return Address(block.norms.get("attn_out") or block.attn_out or block.mixer, "output")
        return Address("", "input" if name == "resid_pre" else "output")

    def view(self, name, arch, block, layer):
        stream = getattr(block, "stream", None)
        if stream is not None:     # laid out otherwise (reftgraph.arch.streams): resid_pre / resid_post only
            n = block.widths.get("resid", arch.d_model) // arch.d_model
            return (lambda raw, pre: stream.get(first(raw), n),
                    lambda raw, new, pre: with_first(raw, stream.put(first(raw), new, n)))
        if name != "resid_mid" or block.norms:
            return super().view(name, arch, block, layer)
        scaled = block.scales.get("attn_out") or block.scales.get("mixer_out")
        c = scaled[1] if scaled else 1.0      # a scaled addition: resid_pre + c * attention (or the mixer)
        return (lambda raw, pre: pre + c * first(raw), lambda raw, new, pre: with_first(raw, (new - pre) / c))

    def width(self, name, arch, block):
        return block.widths.get("resid", arch.d_model) if block is not None else arch.d_model

    def needs_pre(self, name, block) -> bool:
        return name == "resid_mid" and not block.norms

    def prove(self, ctx: Context) -> None:
        if ctx.next_input is not None and not ctx.rec.close(ctx.rec.post, ctx.next_input):
            ctx.refused["resid_post"] = (f"check resid_post[{ctx.layer}] == resid_pre[{ctx.layer + 1}] failed "
                                         f"({ctx.rec.gap(ctx.rec.post, ctx.next_input)})")
        if ctx.style_problem:
            ctx.refused["resid_mid"] = ctx.style_problem
        elif not ctx.attn_out and not (ctx.mixer and ctx.mlp_out):     # (a mixer then an MLP: after the mixer)
            ctx.refused["resid_mid"] = no_module("attention", ctx.paths)
        elif ctx.style.no_mid:
            ctx.refused["resid_mid"] = ctx.style.no_mid
        elif not ctx.norms and ctx.paths.mlp and not ctx.cross:     # its view is what the MLP reads
            rec, get = ctx.rec, self.view("resid_mid", None, ctx, ctx.layer)[0]
            got, want = get(rec.out(self.address("resid_mid", ctx).path), rec.pre), rec.mid(ctx.paths.mlp_in)
            if not rec.close(got, want):
                ctx.refused["resid_mid"] = f"check resid_mid == what the MLP reads failed ({rec.gap(got, want)})"

"""``mlp_act``: the MLP's hidden activations, the input of its down projection.

>>> import reftgraph as rg
>>> arch = rg.models.tiny("gpt2").arch
>>> arch.hook("mlp_act", 1).path, arch.width("mlp_act")
('mlp.c_proj', 48)

Proof: the down projection's output equals the MLP's output (nothing after it), so an
edit of its input is an edit of what the MLP adds. A mixture of experts (one down
projection per expert) refuses it.
"""

from __future__ import annotations

from .base import Address, Component, Context, no_module
from .outputs import per_token

__all__ = ["MLPActivations"]


class MLPActivations(Component):
    """``mlp_act``: the input of the MLP's down projection.

    >>> import reftgraph as rg
    >>> MLPActivations().address("mlp_act", rg.models.tiny("gpt2").arch.blocks[0]).path
    'mlp.c_proj'
    """
    names = ("mlp_act",)

    def address(self, name, block) -> Address:
        return Address(block.paths.mlp_down, "input")

    def view(self, name, arch, block, layer):
        return per_token() if name in block.flat else super().view(name, arch, block, layer)

    def needs_pre(self, name, block) -> bool:
        return name in block.flat

    def width(self, name, arch, block):
        return block.widths.get("mlp_act")

    def fallback_width(self, name, arch):
        return arch.d_mlp

    def prove(self, ctx: Context) -> None:
        paths, rec = ctx.paths, ctx.rec
        if not paths.mlp:
            ctx.refused["mlp_act"] = no_module("MLP", paths)
        elif not paths.mlp_down or "mlp_act" not in ctx.widths:
            ctx.refused["mlp_act"] = (f"no single down projection in {paths.mlp!r} (a mixture of experts has one "
                                      "per expert); use mlp_out")
        elif ctx.mlp_out != paths.mlp_down and not rec.close(rec.out(paths.mlp_down), rec.out(paths.mlp)):
            ctx.refused["mlp_act"] = (f"check {paths.mlp_down} output == the output of {paths.mlp} failed "
                                      f"({rec.gap(rec.out(paths.mlp_down), rec.out(paths.mlp))})")

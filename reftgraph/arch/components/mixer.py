"""What a block's sequence mixer adds to the stream: ``mixer_out``, the output of its one
sequence mixer besides any MLP (Mamba's and Mamba-2's selective state space, the mixer layers
of hybrids, xLSTM's mLSTM, RecurrentGemma's temporal block).

>>> import reftgraph as rg
>>> arch = rg.models.tiny("mamba").arch
>>> arch.hook("mixer_out", 0).path, arch.refusal("mixer_out", 0) is None
('mixer', True)

Proof, on the tiny instance: the block has exactly one module besides its norms (and its MLP),
it runs once, ``resid_pre + mixer_out`` is the stream after it (``resid_post``, or with an MLP
``resid_mid``, what the MLP's norm reads), and adding ``d`` to ``mixer_out`` moves that stream
by exactly ``d``. Where the block scales the mixer's output by a number it holds (Granite
4.0's ``residual_multiplier``), ``mixer_out`` is the output times that number, read from each
real block as :mod:`reftgraph.arch.styles.scaled` reads its scales. Blocks with attention
refuse it (their component is ``attn_out``); so does a block whose mixer is not added to the
stream.
"""

from __future__ import annotations

import torch

from ..recording import record
from ..styles import Record
from ..styles.scaled import attribute, fit
from .base import Address, Component, Context
from .outputs import scaled

__all__ = ["MixerOutput"]


class MixerOutput(Component):
    """``mixer_out``: what a block's sequence mixer adds to the stream.

    >>> import reftgraph as rg
    >>> MixerOutput().address("mixer_out", rg.models.tiny("mamba").arch.blocks[0])
    Address(path='mixer', io='output', inner=())
    """
    names = ("mixer_out",)
    needs_proof = True

    def address(self, name, block) -> Address:
        return Address(block.mixer or "", "output")

    def view(self, name, arch, block, layer):
        return scaled(block.scales[name][1]) if name in block.scales else super().view(name, arch, block, layer)

    def stage(self, name, ctx, stages):
        return stages.get((ctx.mixer, "output")) if ctx.mixer else None

    def prove(self, ctx: Context) -> None:
        why = _why_not(ctx)
        if why:
            ctx.refused["mixer_out"] = why


def _why_not(ctx: Context) -> str:
    """Why block ``ctx.layer`` has no mixer_out ('' when it has, and ``ctx.mixer`` is set)."""
    paths = ctx.paths
    if paths.attn:
        return "this block has attention, not a sequence mixer: use attn_out"
    if paths.mlp and (ctx.style is None or ctx.mlp_out is None):
        return f"a mixer before an MLP needs the block's MLP identities: {ctx.style_problem or 'no style holds'}"
    mlp_parts = {p.split(".")[0] for p in (paths.mlp, paths.mlp_in, paths.mlp_down, *ctx.beside.values()) if p}
    block = ctx.blocks[ctx.layer]
    others = [name for name, module in block.named_children() if not _is_norm(name, module) and name not in mlp_parts]
    if len(others) != 1:
        return (f"this block has {len(others)} modules besides its norms{' and MLP' if paths.mlp else ''} "
                f"({', '.join(others) or 'none'}), not one sequence mixer")
    path, rec = others[0], ctx.rec
    out = rec.out(path)
    if rec.calls.get(path, 0) != 1 or not isinstance(out, torch.Tensor) or out.shape != rec.pre.shape:
        return f"the module {path!r} does not run once per block on [batch, tokens, width]"

    def after(r):            # the stream the mixer adds to: what the MLP reads, else the block output
        return r.mid(paths.mlp_in) if paths.mlp else r.post
    stream = "resid_mid" if paths.mlp else "resid_post"
    c = 1.0
    if not Record.close(after(rec), rec.pre + out):
        c = fit(None if after(rec) is None else after(rec) - rec.pre, out)    # a scaled addition (Granite 4.0's)
        held = None if c is None else attribute(rec.scales, c)
        if held is None:
            return f"check resid_pre + {path} output == {stream} failed ({Record.gap(after(rec), rec.pre + out)})" + (
                "" if c is None else f"; it is added times {c:.4g}, which no attribute of the block holds")
        ctx.scales["mixer_out"] = (held, c)
    delta = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(1))
    moved, _, _ = record(ctx.model, ctx.blocks, ctx.layer, ctx.ids, edit=(path, lambda t: t + delta / c))
    if not Record.close(after(moved), after(rec) + delta):
        return f"adding to {path}'s output does not move {stream} by the same amount " \
               f"({Record.gap(after(moved), after(rec) + delta)})"
    ctx.mixer = path
    return ""


def _is_norm(name: str, module) -> bool:
    return "norm" in type(module).__name__.lower() or "norm" in name.lower() or name.lower().startswith("ln")

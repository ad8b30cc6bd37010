"""What a block without attention or MLP adds to the stream: ``mixer_out``, the output of its
one sequence mixer (Mamba's and Mamba-2's selective state space, the mixer layers of hybrids).

>>> import reftgraph as rg
>>> arch = rg.models.tiny("mamba").arch
>>> arch.hook("mixer_out", 0).path, arch.refusal("mixer_out", 0) is None
('mixer', True)

Proof, on the tiny instance: the block has exactly one module besides its norms, it runs
once, ``resid_pre + mixer_out == resid_post``, and adding ``d`` to the mixer's output moves
``resid_post`` by exactly ``d``. Blocks with attention or an MLP refuse it (their components
are ``attn_out`` / ``mlp_out``); so does a block whose single module is not added to the stream.
"""

from __future__ import annotations

import torch

from ..recording import record
from ..styles import Record
from .base import Address, Component, Context

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

    def stage(self, name, ctx, stages):
        return stages.get((ctx.mixer, "output")) if ctx.mixer else None

    def prove(self, ctx: Context) -> None:
        why = _why_not(ctx)
        if why:
            ctx.refused["mixer_out"] = why


def _why_not(ctx: Context) -> str:
    """Why block ``ctx.layer`` has no mixer_out ('' when it has, and ``ctx.mixer`` is set)."""
    if ctx.paths.attn or ctx.paths.mlp:
        return "this block has attention or an MLP, not a single sequence mixer: use attn_out / mlp_out"
    block = ctx.blocks[ctx.layer]
    others = [name for name, module in block.named_children() if not _is_norm(name, module)]
    if len(others) != 1:
        return (f"this block has {len(others)} modules besides its norms ({', '.join(others) or 'none'}), "
                "not one sequence mixer")
    path, rec = others[0], ctx.rec
    out = rec.out(path)
    if rec.calls.get(path, 0) != 1 or not isinstance(out, torch.Tensor) or out.shape != rec.pre.shape:
        return f"the module {path!r} does not run once per block on [batch, tokens, width]"
    if not Record.close(rec.post, rec.pre + out):
        return f"check resid_pre + {path} output == resid_post failed ({Record.gap(rec.post, rec.pre + out)})"
    delta = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(1))
    moved, _, _ = record(ctx.model, ctx.blocks, ctx.layer, ctx.ids, edit=(path, lambda t: t + delta))
    if not Record.close(moved.post, rec.post + delta):
        return f"adding to {path}'s output does not move resid_post by the same amount " \
               f"({Record.gap(moved.post, rec.post + delta)})"
    ctx.mixer = path
    return ""


def _is_norm(name: str, module) -> bool:
    return "norm" in type(module).__name__.lower() or "norm" in name.lower() or name.lower().startswith("ln")

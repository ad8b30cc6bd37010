"""Per-head components: ``head_out`` (each head's output, the input of the attention's
output projection, one slice per head) and ``q``, ``k``, ``v`` (each head's query, key and
value, in the projections' outputs; ``k`` and ``v`` index key-value heads).

>>> import reftgraph as rg
>>> arch = rg.models.tiny("llama").arch      # grouped-query: 4 query heads, 2 key-value heads
>>> arch.hook("head_out", 0).path, arch.heads("q"), arch.heads("k"), arch.width("head_out")
('self_attn.o_proj', 4, 2, 8)

Proofs: the output projection's output equals the attention output (``head_out`` is all
that reaches it); locality proves the q/k/v layout (:mod:`reftgraph.arch.qkv`): adding to
``q`` of head h at position p moves ``head_out`` of head h at p alone; adding to ``k``/``v``
of key-value head g moves ``head_out`` of g's query heads alone, at p and later; ``v`` acts
linearly.
"""

from __future__ import annotations

import torch

from ..qkv import FUSED_LAYOUTS, slicer
from ..recording import record
from .base import Address, Component, Context, first, no_module, walk, with_first

__all__ = ["Heads", "POS", "qkv_slicer"]

POS = 2          # the position that locality checks edit


def _head_changes(ctx: Context, base, proj_path, get_put, index, scale=1.0):
    """How head_out moves (and where) when ``index`` of the q/k/v view is edited; ``base`` is the clean record."""
    get, put = get_put
    delta_gen = torch.Generator().manual_seed(2)

    def fn(t):
        view = get(t).clone()
        view[index] = view[index] + scale * torch.randn(view[index].shape, generator=delta_gen) * (1 + t.std())
        return put(t, view)

    new, _, _ = record(ctx.model, ctx.blocks, ctx.layer, ctx.ids, edit=(proj_path, fn))
    b, n = base.inp(ctx.paths.attn_proj), new.inp(ctx.paths.attn_proj)
    diff = (n - b)[0]
    return diff, (diff.abs() > 1e-5 * (1 + b.abs().max())).nonzero().tolist()


def _locality(ctx: Context, layout: str) -> dict:
    """component -> failure ('' when its locality checks pass) for one q/k/v layout."""
    paths, widths = ctx.paths, ctx.widths
    nq, nkv = ctx.heads
    dh = widths["head_out"]
    result = {}
    base = ctx.rec
    for component in "qkv":
        if component not in widths:
            continue
        proj = paths.qkv if isinstance(paths.qkv, str) else paths.qkv["qkv".index(component)]
        try:
            view = slicer(layout, component, ctx.heads, (widths["q"], widths.get("k", widths["q"])))
        except ValueError as err:
            result[component] = str(err)
            continue
        n = nq if component == "q" else nkv
        head = n - 1
        diff, changed = _head_changes(ctx, base, proj, view, (0, POS, head))
        moved = {(p, c // dh) for p, c in changed}   # (position, head) of head_out that moved
        if component == "q":
            want = {(POS, head)}
            ok = moved == want
            expect = f"only head {head} at position {POS}"
        else:
            group = {h for h in range(nq) if h // (nq // nkv) == head}
            positions = {p for p, _ in moved}
            causal = all(p >= POS for p in positions) and any(p > POS for p in positions)
            both_ways = positions == set(range(ctx.ids.shape[1]))    # bidirectional attention (encoders)
            ok = bool(moved) and {h for _, h in moved} == group and (causal or both_ways)
            expect = f"heads {sorted(group)} at positions >= {POS} (or at all positions, attending both ways)"
            if ok and component == "v":
                twice, _ = _head_changes(ctx, base, proj, view, (0, POS, head), scale=2.0)
                ok = base.close(twice, 2 * diff)
                expect += " (linearly)"
        got = sorted({h for _, h in moved})
        result[component] = "" if ok else (f"editing {component} of {'head' if component == 'q' else 'key-value head'} "
                                           f"{head} at position {POS} should move head_out of {expect}; it moved heads "
                                           f"{got} at positions {sorted({p for p, _ in moved})}")
    return result


def _widths_agree(widths: dict) -> dict:
    """Reasons to refuse q/k/v whose per-head widths cannot be a query, key and value."""
    out = {}
    if "q" in widths and "k" in widths and widths["q"] != widths["k"]:
        out["q"] = out["k"] = (f"q has {widths['q']} dims per head but k {widths['k']}: the projection carries "
                               "more than the query (e.g. a gate)")
    if "v" in widths and widths.get("head_out") not in (None, widths["v"]):
        out["v"] = f"v has {widths['v']} dims per head but head_out {widths['head_out']}"
    return out


def qkv_slicer(component: str, arch, block, layer: int):
    """``(get, put)`` of ``component`` (``q``, ``k`` or ``v``) in its projection's output on a proven block.

    >>> import torch, reftgraph as rg
    >>> arch = rg.models.tiny("gpt2").arch
    >>> get, _ = qkv_slicer("v", arch, arch.blocks[0], 0)
    >>> get(torch.zeros(1, 3, 96)).shape
    torch.Size([1, 3, 4, 8])
    """
    heads = (arch.heads("q", layer), arch.heads("k", layer))
    widths = (arch.width("q", layer), arch.width("k", layer) if "k" in block.widths else arch.width("q", layer))
    return slicer(block.qkv_layout or "separate", component, heads, widths)


class Heads(Component):
    """Per-head components: ``head_out``, ``q``, ``k`` and ``v``.

    >>> import reftgraph as rg
    >>> Heads().address("k", rg.models.tiny("llama").arch.blocks[0]).path
    'self_attn.k_proj'
    """
    names = ("head_out", "q", "k", "v")
    has_heads = True

    def address(self, name, block) -> Address:
        paths = block.paths
        if name == "head_out":
            return Address(paths.attn_proj, "input")
        qkv = paths.qkv
        return Address(qkv if isinstance(qkv, str) else qkv["qkv".index(name)] if qkv else None, "output")

    def width(self, name, arch, block):
        return block.widths.get(name)

    def fallback_width(self, name, arch):
        return arch.head_dim

    def heads(self, name, arch, block) -> int:
        nq, nkv = block.heads if block is not None and block.heads[0] else (arch.n_heads, arch.n_kv_heads)
        return nkv if name in ("k", "v") else nq

    def view(self, name, arch, block, layer):
        heads = arch.heads(name, layer)
        if name == "head_out":
            dh = arch.width("head_out", layer)
            return (lambda raw, pre: raw.unflatten(-1, (heads, dh)), lambda raw, new, pre: new.flatten(-2))
        get, put = qkv_slicer(name, arch, block, layer)
        return (lambda raw, pre: get(first(raw)), lambda raw, new, pre: with_first(raw, put(first(raw), new)))

    def prove(self, ctx: Context) -> None:
        paths, rec, widths, refused = ctx.paths, ctx.rec, ctx.widths, ctx.refused
        if not paths.attn:
            refused["head_out"] = no_module("attention", paths)
        elif not paths.attn_proj or "head_out" not in widths:
            refused["head_out"] = (f"no output projection from {ctx.heads[0]} heads back to the model width found "
                                   f"in {paths.attn!r}")
        elif ctx.attn_out != paths.attn_proj and not rec.close(rec.out(paths.attn_proj), rec.out(paths.attn)):
            refused["head_out"] = (f"check head_out through {paths.attn_proj} == the output of {paths.attn} failed "
                                   f"({rec.gap(rec.out(paths.attn_proj), rec.out(paths.attn))})")
        if "head_out" in refused:
            for c in "qkv":
                refused[c] = f"needs head_out, which is refused: {refused['head_out']}"
        else:
            layouts = ["separate"] if isinstance(paths.qkv, tuple) else list(FUSED_LAYOUTS) if paths.qkv else []
            results = [(lay, _locality(ctx, lay)) for lay in layouts]
            best = max(results, key=lambda r: sum(not v for v in r[1].values()), default=None)
            mismatch = _widths_agree(widths)
            projections = dict(zip("qkv", paths.qkv)) if isinstance(paths.qkv, tuple) else dict.fromkeys("qkv", paths.qkv)
            for c in "qkv":
                runs = rec.calls.get(projections.get(c), 1)
                if c in mismatch:
                    refused[c] = mismatch[c]
                elif runs != 1:    # (T5Gemma 2's merged attention projects the encoder's output too)
                    refused[c] = (f"its projection {projections[c]!r} runs {runs} times per block, so an edit of "
                                  "its output would reach one of them only")
                elif best is None or c not in best[1]:
                    children = ", ".join(n for n, _ in walk(ctx.blocks[ctx.layer], paths.attn).named_children())
                    refused[c] = f"no {c} projection found in {paths.attn!r} (children: {children})"
                elif best[1][c]:
                    refused[c] = f"locality check failed ({best[0]} layout): {best[1][c]}"
            if best is not None and any(not v for v in best[1].values()):
                ctx.layout = best[0]
        for c in self.names:
            if c not in refused and c not in widths:
                refused[c] = f"its width could not be read off {paths}"

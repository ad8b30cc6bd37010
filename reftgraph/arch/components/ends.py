"""The ends of the stream, outside the blocks: ``embed``, ``logits_in`` and ``logits``.

>>> import reftgraph as rg
>>> arch = rg.models.tiny("llama").arch
>>> arch.hook("embed", 0).path, arch.hook("logits_in", -1).path, arch.width("logits")
('model.embed_tokens', 'model.norm', 259)

``embed`` is the token embeddings as the stream receives them: the input embedding's
output, times the scale the model applies before the first block (Gemma's sqrt(d)); a site
at layer 0. ``logits_in`` is the final residual stream before the final norm (what the
unembedding reads, a copy of ``resid_post`` of the last block), and ``logits`` the output
layer's output, ``[batch, tokens, vocab]``; both at the last layer. ``Site("logits")``
leaves the layer out.

Proofs, once per model on the tiny instance: adding d to the embedding output moves
``resid_pre[0]`` by exactly ``scale * d`` (no norm or mixing in between; position
embeddings are added, not mixed); the final norm reads the last block's output and feeds
the output layer; the output layer's output is the model's logits (no soft cap after it).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..positions import token_output
from ..styles import Record
from ..tree import is_norm
from .base import Address, Component, Context, first, with_first

__all__ = ["Ends", "prove_ends"]


def _path_of(model, module) -> Optional[str]:
    return next((name for name, m in model.named_modules() if m is module and name), None)


def _unreachable(path: Optional[str]) -> str:
    """Why nnsight cannot reach the module at ``path`` by attribute ('' when it can): a part
    named like an envoy's own attribute (GIT's output layer is called ``output``)."""
    from nnsight import Envoy

    if path is None:
        return "its module has no path below the model"
    clash = [part for part in path.split(".") if hasattr(Envoy, part)]
    return f"its module path {path!r} has a part nnsight reads as its own ({clash[0]!r})" if clash else ""


def _hooked(model, ids, hooks: list):
    """The model's logits with forward (pre) hooks ``[(module, kind, fn)]`` installed."""
    handles = []
    try:
        for module, kind, fn in hooks:
            handles.append(module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn))
        with torch.no_grad():
            return token_output(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                                      output_hidden_states=True))
    finally:
        for h in handles:
            h.remove()


def prove_ends(model, blocks, ids) -> dict:
    """``{name: (Address, extra) or the reason it is refused}`` for the three ends of a tiny
    ``model``; ``extra`` is the embedding scale, or the vocabulary size for ``logits``.

    >>> import torch, reftgraph as rg
    >>> from reftgraph.arch.tree import blocks_of
    >>> hf = rg.models.tiny("gpt2").hf
    >>> ends = prove_ends(hf, blocks_of(hf)[1], torch.tensor([[5, 6, 7]]))
    >>> ends["embed"], ends["logits_in"][0].path
    ((Address(path='transformer.wte', io='output', inner=(), root=True), 1.0), 'transformer.ln_f')
    """
    seen = {}

    def keep(name, io):
        def fn(module, *args):
            value = args[0][0] if io == "input" else first(args[-1])
            seen.setdefault(name, value.detach().clone())
        return fn

    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    inside = {id(m) for b in blocks for m in b.modules()}
    norms = [m for name, m in model.named_modules() if name and is_norm(m) and id(m) not in inside]   # final norms
    hooks = [(embedding, "out", keep("embed", "output")), (blocks[0], "pre", keep("pre0", "input")),
             (blocks[-1], "out", keep("last", "output"))]
    hooks += [(m, "pre", keep(("norm_in", i), "input")) for i, m in enumerate(norms)]
    hooks += [(m, "out", keep(("norm_out", i), "output")) for i, m in enumerate(norms)]
    if head is not None:
        hooks += [(head, "pre", keep("head_in", "input")), (head, "out", keep("logits", "output"))]
    logits = _hooked(model, ids, hooks)
    out = {"embed": _prove_embed(model, blocks, ids, embedding, seen)}
    if head is None or "head_in" not in seen:
        out["logits_in"] = out["logits"] = "the model has no output layer (get_output_embeddings) that runs"
        return out
    head_path = _path_of(model, head)
    if _unreachable(head_path):
        out["logits_in"] = out["logits"] = _unreachable(head_path)
        return out
    found = next((i for i in range(len(norms)) if Record.close(seen.get(("norm_in", i)), seen["last"])
                  and Record.close(seen.get(("norm_out", i)), seen["head_in"])), None)
    if found is not None:
        path = _path_of(model, norms[found])
        out["logits_in"] = _unreachable(path) or (Address(path, "input", root=True), None)
    elif Record.close(seen["head_in"], seen["last"]):
        out["logits_in"] = (Address(head_path, "input", root=True), None)
    else:
        out["logits_in"] = ("the output layer reads neither the last block's output nor one norm of it "
                            f"({Record.gap(seen['head_in'], seen['last'])})")
    big = torch.randn(logits.shape[-1], generator=torch.Generator().manual_seed(8)) * 10 * (1 + logits.abs().max())
    moved = _hooked(model, ids, [(head, "out", lambda m, a, o: o + big)])   # large: a soft cap bends it
    if not Record.close(seen["logits"], logits) or not Record.close(moved, logits + big):
        out["logits"] = ("the model changes the logits after its output layer (a soft cap or a scale: "
                         f"{Record.gap(moved, logits + big)} when they move); collect them from the run's logits")
    else:
        out["logits"] = (Address(head_path, "output", root=True), seen["logits"].shape[-1])
    return out


def _prove_embed(model, blocks, ids, embedding, seen):
    if "embed" not in seen or "pre0" not in seen:
        return "the input embedding or the first block did not run"
    embed, pre0 = seen["embed"], seen["pre0"]
    if embed.shape != pre0.shape:
        return f"the embedding gives {list(embed.shape)}, the first block reads {list(pre0.shape)}"
    delta = torch.randn(embed.shape[-1], generator=torch.Generator().manual_seed(6)) * (1 + embed.std())
    moved = {}
    _hooked(model, ids, [(embedding, "out", lambda m, a, o: o + delta),
                         (blocks[0], "pre", lambda m, a: moved.setdefault("x", a[0].detach().clone()))])
    if "x" not in moved:
        return "the first block reads its input by keyword; the embedding's effect could not be traced"
    shift = moved["x"] - pre0
    scale = float((shift * delta).sum() / (delta * delta).sum() / shift[..., :1].numel())
    if not Record.close(shift, scale * delta.expand_as(shift)):
        return ("the model transforms the embeddings before the first block (a norm or a mixing: moving them by d "
                f"does not move resid_pre[0] by a multiple of d; {Record.gap(shift, scale * delta.expand_as(shift))}); "
                "use resid_pre at layer 0")
    path = _path_of(model, embedding)
    return _unreachable(path) or (Address(path, "output", root=True), round(scale, 6))


class Ends(Component):
    """``embed``, ``logits_in`` and ``logits``: the stream's ends, outside the blocks.

    >>> import reftgraph as rg
    >>> Ends().address("logits", rg.models.tiny("gpt2").arch.blocks[-1])
    Address(path='lm_head', io='output', inner=(), root=True)
    """
    names = ("embed", "logits_in", "logits")
    needs_proof = True

    def address(self, name, block) -> Address:
        found = block.ends.get(name)
        return found[0] if found else Address(None, "output", root=True)

    def view(self, name, arch, block, layer):
        scale = block.ends[name][1] if name == "embed" else None
        if not scale or scale == 1:
            return super().view(name, arch, block, layer)
        return (lambda raw, pre: first(raw) * scale, lambda raw, new, pre: with_first(raw, new / scale))

    def width(self, name, arch, block):
        if name == "logits":
            found = block.ends.get("logits") if block is not None else None
            return found[1] if found else None
        return arch.d_model

    def stage(self, name, ctx, stages):
        return None     # set per layer by the proofs (before the first block, after the last)

    def prove(self, ctx: Context) -> None:
        return None     # proven once per model: :func:`prove_ends`


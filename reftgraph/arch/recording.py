"""One forward of a tiny model with every module of one block recorded by plain PyTorch
hooks: what the proofs (:mod:`reftgraph.arch.proofs`, :mod:`reftgraph.arch.components`)
check the components against.

>>> import torch, reftgraph as rg
>>> from reftgraph.arch.tree import blocks_of
>>> hf = rg.models.tiny("llama").hf
>>> rec, after, order = record(hf, blocks_of(hf)[1], 0, torch.tensor([[3, 4, 5]]))
>>> rec.pre.shape, torch.equal(rec.post, after), order[:2]
(torch.Size([1, 3, 32]), True, [('', 'input'), ('input_layernorm', 'input')])

``edit = (path, fn)`` replaces the first tensor of that module's output by ``fn(t)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .styles import Record
from .styles.scaled import block_scales
from .tree import child_attn, is_norm

__all__ = ["record"]


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _hidden_in(args, kwargs):
    """The hidden states a module is called with: its first positional tensor, else ``hidden_states=``."""
    t = _first_tensor(args) if args else None
    if t is None:
        t = kwargs.get("hidden_states", next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None))
    return t


def _copy(t):
    return None if t is None else t.detach().clone()   # blocks may edit a sub-layer's output in place (Falcon)


def record(model, blocks, layer: int, ids, edit=None) -> tuple[Record, Optional[torch.Tensor], list]:
    """One forward with every module of block ``layer`` recorded (and ``edit`` applied):
    ``(the record, the next block's input, the order of the accesses)``.

    >>> import torch, reftgraph as rg
    >>> from reftgraph.arch.tree import blocks_of
    >>> hf = rg.models.tiny("gpt2").hf
    >>> rec, _, _ = record(hf, blocks_of(hf)[1], 1, torch.tensor([[3, 4]]), edit=("mlp", lambda t: 0 * t))
    >>> float(rec.out("mlp").abs().max())
    0.0

    ``edit = (path, fn)`` replaces the first tensor of that module's output by ``fn(t)``."""
    from .components.base import with_first   # (here: the components import this module)

    block = blocks[layer]
    attention = frozenset(path.split(".")[0] for path in child_attn(block) if path)   # the resolver's choice
    norms = frozenset(name for name, m in block.named_modules() if "." in name and is_norm(m))
    rec = Record(pre=None, post=None, scales=block_scales(block), attention=attention, nested_norms=norms)
    order, handles, nxt = [], [], {}

    def pre_hook(path):
        def hook(module, args, kwargs):
            t = _hidden_in(args, kwargs)
            rec.calls[path] = rec.calls.get(path, 0) + 1
            if path not in rec.inputs:
                rec.inputs[path] = _copy(t)
                order.append((path, "input"))
        return hook

    def post_hook(path):
        def hook(module, args, kwargs, out):
            if edit is not None and edit[0] == path and rec.calls.get(path) == 1:
                out = with_first(out, edit[1](_first_tensor(out)))
            if path not in rec.outputs:
                rec.outputs[path] = _copy(_first_tensor(out))
                if path == "" and isinstance(out, tuple) and type(out) is not tuple:
                    rec.outputs[path] = type(out).__name__   # a named output the engine cannot rebuild
                order.append((path, "output"))
            return out
        return hook

    try:
        for path, module in block.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(path), with_kwargs=True))
        if layer + 1 < len(blocks):
            def next_input(module, args, kwargs):
                nxt.setdefault("x", _copy(_hidden_in(args, kwargs)))

            handles.append(blocks[layer + 1].register_forward_pre_hook(next_input, with_kwargs=True))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    rec.pre, rec.post = rec.inputs.get(""), rec.outputs.get("")
    return rec, nxt.get("x"), order

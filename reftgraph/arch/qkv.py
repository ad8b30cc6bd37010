"""Where ``q``, ``k`` and ``v`` of each head sit in a projection's output.

>>> import torch
>>> get, put = slicer("concat", "k", heads=(4, 2), dims=(8, 8))   # [q (4 heads) | k (2) | v (2)]
>>> raw = torch.randn(1, 3, 64)
>>> get(raw).shape, torch.equal(put(raw, get(raw)), raw)
(torch.Size([1, 3, 2, 8]), True)

A layout is a claim; :mod:`reftgraph.arch.proofs` checks it on a tiny instance of the
architecture (editing ``q`` of one head must move that head's output alone) before a graph
may use it. The layouts:

- ``separate``: one projection per component, heads side by side (Llama, GPT-J, Gemma);
- ``concat``: one fused projection, ``[q | k | v]`` each with its heads side by side
  (GPT-2, Phi-3, GPT-BigCode, DBRX, Falcon multi-query);
- ``per_head``: one fused projection, per head ``[q_h | k_h | v_h]`` (GPT-NeoX, Bloom);
- ``grouped``: one fused projection, per key-value group ``[q of its heads | k_g | v_g]``
  (Falcon's new decoder architecture).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["LAYOUTS", "FUSED_LAYOUTS", "slicer"]

FUSED_LAYOUTS = ("concat", "per_head", "grouped")
LAYOUTS = ("separate",) + FUSED_LAYOUTS


def _separate(i, nq, nkv, dq, dkv):
    n, d = (nq, dq) if i == 0 else (nkv, dkv)
    return (lambda raw: raw.unflatten(-1, (n, d)), lambda raw, new: new.flatten(-2))


def _concat(i, nq, nkv, dq, dkv):
    sizes = [nq * dq, nkv * dkv, nkv * dkv]
    n, d = (nq, dq) if i == 0 else (nkv, dkv)

    def get(raw):
        return raw.split(sizes, -1)[i].unflatten(-1, (n, d))

    def put(raw, new):
        parts = list(raw.split(sizes, -1))
        parts[i] = new.flatten(-2)
        return torch.cat(parts, -1)

    return get, put


def _grouped(i, nq, nkv, dq, dkv):
    per = nq // nkv  # query heads per key-value group; per_head is the case per == 1
    sizes = [per * dq, dkv, dkv]

    def get(raw):
        part = raw.unflatten(-1, (nkv, sum(sizes))).split(sizes, -1)[i]   # [..., G, per*dq | dkv]
        return part.flatten(-2).unflatten(-1, (nq, dq)) if i == 0 else part

    def put(raw, new):
        parts = list(raw.unflatten(-1, (nkv, sum(sizes))).split(sizes, -1))
        parts[i] = new.flatten(-2).unflatten(-1, (nkv, per * dq)) if i == 0 else new
        return torch.cat(parts, -1).flatten(-2)

    return get, put


def slicer(layout: str, component: str, heads: tuple, dims: tuple) -> tuple[Callable, Callable]:
    """``(get, put)`` for ``component`` of a projection output in ``layout``.

    >>> import torch
    >>> get, _ = slicer("per_head", "v", heads=(2, 2), dims=(3, 3))
    >>> get(torch.arange(18.).view(1, 1, 18))[0, 0].tolist()     # per head [q_h | k_h | v_h]
    [[6.0, 7.0, 8.0], [15.0, 16.0, 17.0]]

    ``heads`` is ``(query heads, key-value heads)``, ``dims`` the head width of ``q`` and
    of ``k``/``v``. ``get(raw)`` gives ``[..., heads, dim]``; ``put(raw, new)`` the raw value
    with that part replaced.
    """
    i = "qkv".index(component)
    nq, nkv = heads
    dq, dkv = dims
    if layout == "separate":
        return _separate(i, nq, nkv, dq, dkv)
    if layout == "concat":
        return _concat(i, nq, nkv, dq, dkv)
    if layout in ("per_head", "grouped"):
        if nkv == 0 or nq % nkv or (layout == "per_head" and nq != nkv):
            raise ValueError(f"layout {layout!r} needs query heads a multiple of key-value heads, got {heads}")
        return _grouped(i, nq, nkv, dq, dkv)
    raise ValueError(f"unknown q/k/v layout {layout!r}; known: {', '.join(LAYOUTS)}")

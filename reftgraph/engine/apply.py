"""Apply a bound plan: the nnsight edits, hook by hook in forward order.

Each hook point is read once; every step at it gathers its slice (rows x positions, heads,
subspace dims), runs its op and scatters the result back out of place (autograd-safe), and
source values are read where the model first reaches them. See :func:`apply`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..arch.structure import first
from ..errors import SiteError
from .bind import Bound
from .plan import Plan, Step, where


_HALF = (torch.bfloat16, torch.float16)


def _gather(full: torch.Tensor, index: torch.Tensor, heads: Optional[torch.Tensor]) -> torch.Tensor:
    h = full.flatten(0, 1)[index]                    # [B, k, ...] (a copy)
    return h if heads is None else h.index_select(2, heads.to(h.device))


def _edit(step: Step, b: Bound, full: torch.Tensor, source_value, collected: dict) -> Optional[torch.Tensor]:
    """The full ``[N, S, ...]`` tensor after ``step``'s edit (None when it only collects)."""
    op = step.node.op
    whole = _gather(full, b.index, None)             # [B, k, (H,) w]
    h = whole if step.heads is None else _gather(full, b.index, step.heads)
    dims = None if step.dims is None else step.dims.to(h.device)
    sub = h if dims is None else h.index_select(-1, dims)
    src = source_value
    if src is not None and dims is not None:
        src = src.index_select(-1, dims)
    if sub.dtype in _HALF and not op.half_precision:    # the edit in float32, rounded back below
        sub = sub.float()
        src = src.float() if src is not None else None
    if op.collects:
        collected[step.node.name] = (op(sub, source=src, valid=b.valid.to(h.device)), b.valid)
        return None
    extra = {"subspace": step.node.site.subspace} if op.learned_basis else {}
    if b.rows is not None:
        extra["rows"] = b.rows.to(h.device)
    new = op(sub, source=src, valid=b.valid.to(h.device), **extra)
    if new.shape != sub.shape:
        raise SiteError(f"{where(step.node)}{type(op).__name__} returned shape {list(new.shape)} for a slice of "
                        f"shape {list(sub.shape)}; it must keep the shape (check the shape of its tensors)")
    if dims is not None:
        new = h.index_copy(-1, dims, new.to(h.dtype))
    if step.heads is not None:
        new = whole.index_copy(2, step.heads.to(h.device), new.to(h.dtype))
    flat = full.flatten(0, 1)
    mask = b.mask.to(flat.device).reshape(-1, *([1] * (flat.dim() - 1)))
    out = torch.where(mask, new.flatten(0, 1).to(flat.dtype)[b.slot.to(flat.device)], flat)
    return out.view_as(full)


def apply(plan: Plan, bound: list[Bound], root, collected: dict) -> None:
    """Run the plan's edits on ``root`` (an nnsight envoy inside a trace).

    >>> import reftgraph as rg
    >>> from reftgraph.engine import bind, compile_graph, tokenize
    >>> lm, g, collected = rg.models.tiny("llama"), rg.Graph(), {}
    >>> _ = g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="m")
    >>> plan = compile_graph(g, lm.arch)
    >>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
    >>> with lm.nn.trace(inputs):
    ...     apply(plan, bind(plan, batch), lm.nn, collected)
    >>> value, valid = collected["m"]
    >>> value.shape, valid.tolist()
    (torch.Size([2, 1, 32]), [[True], [True]])

    Collected values land in ``collected[name] = (value, valid)``.
    """
    pre = {}
    sources = {}
    for hook in plan.hooks:
        envoy = plan.arch.envoy(root, hook)
        raw = getattr(envoy, hook.io)
        changed = False
        for i in plan.edits.get(hook, ()):
            step, b = plan.steps[i], bound[i]
            full = step.get(raw, pre.get(hook.layer))
            src = sources.pop(step.node.name, None)
            if step.source_hook == hook:
                src = _gather(step.source_get(raw, pre.get(hook.layer)), b.source_index, step.source_heads)
            new = _edit(step, b, full, src, collected)
            if new is not None:
                raw = step.put(raw, new, pre.get(hook.layer))
                changed = True
        if hook.stage == 0 and hook.path == "":
            pre[hook.layer] = first(raw)
        for i in plan.reads.get(hook, ()):
            step, b = plan.steps[i], bound[i]
            sources[step.node.name] = _gather(step.source_get(raw, pre.get(hook.layer)), b.source_index,
                                              step.source_heads)
        if changed:
            setattr(envoy, hook.io, raw)

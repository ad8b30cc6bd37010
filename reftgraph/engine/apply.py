"""Apply a bound plan: the nnsight edits, hook by hook in forward order.

Each hook point is read once. Consecutive steps at a hook that share a view (one
component's get and put) and the same slots (stream and positions) form a run: the run
gathers its slice (rows x positions) once, each step edits it in plan order (heads and
subspace dims taken from the slice and put back), and the result is written back once, out
of place (autograd-safe). Each step sees exactly what it would see if every step gathered
and wrote back on its own: after an edit, a slot whose position another slot of the run
writes takes that slot's new value (see :class:`~reftgraph.engine.bind.Layout`). Source
values are read where the model first reaches them. See :func:`apply`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..arch.structure import first
from ..errors import SiteError
from .bind import Bound
from .plan import Plan, Step, where


_HALF = (torch.bfloat16, torch.float16)
FUSE = True   # False: every step gathers and writes back on its own (a reference for the tests)


def _gather(full: torch.Tensor, at: tuple, heads: Optional[torch.Tensor]) -> torch.Tensor:
    """``full[N, S, ...]`` at ``(row, pos)`` index tensors ``[B, k]``: ``[B, k, ...]`` (a copy), ``heads`` selected."""
    h = full[at]
    return h if heads is None else h.index_select(2, heads)


def _joins(plan: Plan, bound: list, hook, i: int, j: int) -> bool:
    """Whether step ``j`` can edit the slice that step ``i`` gathered: one view, one layout
    (so one stream), and no source read at this hook from that stream (a source here is read
    before the run's edits: rows of another stream, which the run does not touch)."""
    a, b = plan.steps[i], plan.steps[j]
    return (FUSE and a.get is b.get and a.put is b.put and bound[i].layout is bound[j].layout
            and (b.source_hook != hook or b.node.reads[0] != a.node.stream))


def _step(step: Step, b: Bound, m, whole: torch.Tensor, src, collected: dict, inp=None,
          src_inp=None) -> Optional[torch.Tensor]:
    """``whole`` (the run's slice ``[B, k, (H,) w]``) after ``step``'s edit (None when it only collects)."""
    op = step.node.op
    h = whole if m.heads is None else whole.index_select(2, m.heads)
    sub = h if m.dims is None else h.index_select(-1, m.dims)
    if src is not None and m.dims is not None:
        src = src.index_select(-1, m.dims)
    if b.keys is not None:    # a key axis (attn_pattern): keys in each row's prompt order, those selected
        keys = b.keys.to_prompt(sub)
        sub = b.keys.pick(keys)
        src = src if src is None else b.source_keys.pick(b.source_keys.to_prompt(src))
    if sub.dtype in _HALF and not op.half_precision:    # the edit in float32, rounded back below
        sub = sub.float()
        src = src.float() if src is not None else None
        inp = inp.float() if inp is not None else None
        src_inp = src_inp.float() if src_inp is not None else None
    new = op.edit(sub, source=src, valid=m.valid, subspace=step.node.site.subspace if op.indexes_basis else None,
                  rows=None if b.rows is None else b.rows.to(sub.device), inputs=inp, source_inputs=src_inp)
    if op.collects:   # (a copy: the slice may be the model's own tensor)
        collected[step.node.name] = (new.clone() if new is whole else new, b.valid)
        return None
    if new.shape != sub.shape:
        raise SiteError(f"{where(step.node)}{type(op).__name__} returned shape {list(new.shape)} for a slice of "
                        f"shape {list(sub.shape)}; it must keep the shape (check the shape of its tensors)")
    if b.keys is not None:
        keys = keys.to(new.dtype)
        new = b.keys.from_prompt(b.keys.unpick(new, keys), keys)
    if m.dims is not None:
        new = h.index_copy(-1, m.dims, new.to(h.dtype))
    if m.heads is not None:
        new = whole.index_copy(2, m.heads, new.to(h.dtype))
    return new if new.dtype == whole.dtype else new.to(whole.dtype)


def _modules(plan: Plan, root, hook, paths: tuple) -> tuple:
    """The envoys of a step's ``modules`` (block paths; None stays None) at ``hook``'s layer."""
    return tuple(None if p is None else plan.arch.envoy(root, hook.at(p, "output")) for p in paths)


def _read(step: Step, hook, raw, pre, copies: dict):
    """The source value a step reads at ``hook``: a receiver input's copies as its last edit
    left them (the raw value cannot give them back), else the view of the raw value."""
    key = (hook, step.source_get)
    return copies[key] if key in copies else step.source_get(raw, pre)


def _run(plan: Plan, bound: list, steps: list, hook, raw, pre, sources: dict, collected: dict, root=None,
         copies: Optional[dict] = None, inputs: Optional[dict] = None):
    """Gather the slice of the steps ``steps`` (indices into the plan) once, edit it step by
    step, write it back once: the new raw hook value, or None when every step only collects.

    A receiver input (a step with ``modules``) is a copy of the stream that the raw value
    cannot give back: ``copies`` keeps what its last edit wrote, for the next edit to start from."""
    first_step = plan.steps[steps[0]]
    key = (hook, first_step.get)
    recomputed = bool(first_step.modules)
    full = copies[key] if recomputed and key in copies else first_step.get(raw, pre)
    m = bound[steps[0]].on(first_step, full.device)
    grid = m.whole and tuple(full.shape[:2]) == m.shape    # the slice is the full tensor: no gather, no scatter
    whole = full if grid else _gather(full, m.at, None)     # [B, k, (H,) w]
    edited = False
    for i in steps:
        step, b = plan.steps[i], bound[i]
        src = sources.pop(step.node.name, None)
        if step.source_hook == hook:   # the raw value before the run's edits (see _joins)
            value = _read(step, hook, raw, pre, copies)
            ms = b.on(step, value.device)
            src = _gather(value, ms.source_at, ms.source_heads)
        new = _step(step, b, b.on(step, full.device), whole, src, collected,
                    *(None if inputs is None else inputs.pop((k, step.node.name), None) for k in ("own", "source")))
        if new is None:
            continue
        if m.follow is not None:   # slots reading a position another slot writes
            keep = m.keep.view(*m.shape, *([1] * (new.dim() - 2)))
            new = torch.where(keep, new.flatten(0, 1)[m.follow].view_as(new), whole)
        elif whole.requires_grad:  # (every slot valid) earlier edits stay in the autograd graph even
            # when this one overwrites them, with a zero gradient: as when each step wrote back alone
            new = torch.where(m.valid.view(*m.shape, *([1] * (new.dim() - 2))), new, whole)
        whole, edited = new, True
    if not edited:
        return None
    if grid:
        out = whole
    elif m.written is None:    # every slot writes its own position
        out = full.index_put(m.at, whole)
    else:
        out = full.index_put(m.written, whole.flatten(0, 1)[m.taken])
    if recomputed:
        copies[key] = out
        return first_step.put(raw, out, full, *_modules(plan, root, hook, first_step.modules))
    return first_step.put(raw, out, pre)


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
    pre, sources, copies, inputs = {}, {}, {}, {}
    for hook in plan.hooks:
        envoy = plan.arch.envoy(root, hook)
        raw = getattr(envoy, hook.io)
        changed = False
        todo = plan.edits.get(hook, ())
        start = 0
        while start < len(todo):
            end = start + 1
            while end < len(todo) and _joins(plan, bound, hook, todo[start], todo[end]):
                end += 1
            new = _run(plan, bound, todo[start:end], hook, raw, pre.get(hook.block), sources, collected, root, copies,
                       inputs)
            if new is not None:
                raw, changed = new, True
            start = end
        if hook.stage == 0 and hook.path == "":
            pre[hook.block] = first(raw)
        for i in plan.reads.get(hook, ()):
            step, b = plan.steps[i], bound[i]
            value = _read(step, hook, raw, pre.get(hook.block), copies)
            m = b.on(step, value.device)
            sources[step.node.name] = _gather(value, m.source_at, m.source_heads)
        for kind, steps in (("own", plan.inputs), ("source", plan.source_inputs)):
            for i in steps.get(hook, ()):   # what a step's dictionary reads in its own (or source) stream: a transcoder
                value, m = first(raw), bound[i].on(plan.steps[i], first(raw).device)
                inputs[kind, plan.steps[i].node.name] = _gather(value, m.at if kind == "own" else m.source_at, None)
        if changed:
            setattr(envoy, hook.io, raw)

"""Bind a plan to one tokenized batch: every step's positions as flat index tensors.

>>> import torch, reftgraph as rg
>>> from reftgraph.engine.plan import compile_graph
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect())
>>> plan = compile_graph(g, rg.models.tiny("llama").arch)
>>> batch = Batch({"base": slice(0, 2)}, start=torch.tensor([0, 1]), length=torch.tensor([3, 2]), seq_len=3)
>>> bind(plan, batch)[0].index.tolist()
[[2], [5]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core.graph import Node
from ..core.sites import Selection, Site, resolve_positions
from ..errors import SiteError
from .plan import Plan, where


@dataclass
class Batch:
    """Rows of every stream in one padded batch: ``rows[stream]`` is a slice of rows;
    ``start``/``length`` give each row's first prompt token and prompt length.

    >>> from reftgraph.engine import compile_graph, tokenize
    >>> import reftgraph as rg
    >>> _, batch = tokenize(rg.models.tiny("llama"), {"base": ["abc", "a"], "source": ["ab"]}, "left")
    >>> batch.rows, batch.start.tolist(), batch.length.tolist(), batch.seq_len
    ({'base': slice(0, 2, None), 'source': slice(2, 3, None)}, [0, 2, 1], [3, 1, 2], 3)
    """

    rows: dict
    start: torch.Tensor
    length: torch.Tensor
    seq_len: int


@dataclass
class Bound:
    """A step's positions in one batch, as flat indices into ``[rows * seq_len]``.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect())
    >>> from reftgraph.engine import compile_graph
    >>> plan = compile_graph(g, rg.models.tiny("llama").arch)
    >>> batch = Batch({"base": slice(0, 2)}, start=torch.tensor([0, 1]), length=torch.tensor([3, 2]), seq_len=3)
    >>> bind(plan, batch)[0].index.tolist()      # row 0 at 0 * 3 + 2, row 1 at 1 * 3 + 2
    [[2], [5]]
    """

    index: torch.Tensor      # [B, k] flat index of the written (or collected) slots
    valid: torch.Tensor      # [B, k]
    slot: torch.Tensor       # [N * S] which slot a flat position takes (where mask)
    mask: torch.Tensor       # [N * S]
    source_index: Optional[torch.Tensor] = None


def _flat(sel: Selection, rows: slice, seq_len: int) -> torch.Tensor:
    row_ids = torch.arange(rows.start, rows.stop)[:, None]
    return row_ids * seq_len + sel.index


def _select(node: Node, site: Site, stream: str, batch: Batch, what: str = "") -> Selection:
    if stream not in batch.rows:
        raise SiteError(f"{where(node)}{what}stream {stream!r} was not given; "
                        f"pass sources={{{stream!r}: [...]}} (given: {sorted(batch.rows)})")
    rows = batch.rows[stream]
    return resolve_positions(site.positions, batch.start[rows], batch.length[rows], where(node) + what)


def bind(plan: Plan, batch: Batch) -> list[Bound]:
    """Resolve every step's positions in ``batch``; raises :class:`SiteError` before any forward.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions=[3]), rg.Collect(), name="c")
    >>> from reftgraph.engine import compile_graph
    >>> plan = compile_graph(g, rg.models.tiny("llama").arch)
    >>> bind(plan, Batch({"base": slice(0, 1)}, torch.tensor([0]), torch.tensor([2]), 2))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: node 'c' at resid_pre[0] pos=[3]: positions [3] are beyond the prompt of row 0 ...
    """
    key = (tuple((k, r.start, r.stop) for k, r in batch.rows.items()), batch.seq_len,
           tuple(batch.start.tolist()), tuple(batch.length.tolist()))
    if key not in plan.bound:
        if len(plan.bound) >= MAX_BOUND:
            plan.bound.pop(next(iter(plan.bound)))
        plan.bound[key] = _bind(plan, batch)
    return plan.bound[key]


MAX_BOUND = 64  # batch layouts remembered per plan


def _bind(plan: Plan, batch: Batch) -> list:
    n_flat = (max(r.stop for r in batch.rows.values())) * batch.seq_len
    bound = []
    for step in plan.steps:
        node = step.node
        sel = _select(node, node.site, node.stream, batch)
        problem = node.op.check_selection(sel.valid)
        if problem:
            raise SiteError(f"{where(node)}{problem}")
        index = _flat(sel, batch.rows[node.stream], batch.seq_len)
        target = torch.where(sel.valid, index, torch.full_like(index, n_flat))  # invalid -> a spare slot
        k = index.shape[1]
        slot = torch.zeros(n_flat + 1, dtype=torch.long).scatter_(
            0, target.flatten(), torch.arange(index.numel()))[:n_flat]
        mask = torch.zeros(n_flat + 1, dtype=torch.bool).scatter_(0, target.flatten(), sel.valid.flatten())[:n_flat]
        b = Bound(index, sel.valid, slot, mask)
        if step.source_hook is not None:
            stream, site = node.reads
            src = _select(node, site, stream, batch, f"source {stream!r} ")
            if src.valid.shape[0] != sel.valid.shape[0]:
                raise SiteError(f"{where(node)}the source stream {stream!r} has {src.valid.shape[0]} rows, "
                                f"the {node.stream!r} stream {sel.valid.shape[0]}: give one source per row")
            if src.valid.shape[1] != k or not torch.equal(src.valid, sel.valid):
                counts = (sel.valid.sum(1).tolist(), src.valid.sum(1).tolist())
                raise SiteError(f"{where(node)}selects {counts[0]} positions per row in {node.stream!r} but "
                                f"{counts[1]} in source {stream!r}; patches need the same count per row")
            b.source_index = _flat(src, batch.rows[stream], batch.seq_len)
        bound.append(b)
    return bound

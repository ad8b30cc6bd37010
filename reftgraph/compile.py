"""Graph -> plan -> nnsight edits.

``compile_graph`` checks every node against the model (layers, heads, widths,
subspaces, source order) and orders the edits by the model's forward order.
``bind`` resolves positions against one tokenized batch (rows of several streams).
``apply`` performs the edits inside ``model.trace(...)`` (or on plain modules).

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("mlp_out", layer=-1, positions="last"), rg.Collect(), name="m")
>>> [str(s.hook) for s in compile_graph(g, lm.arch).steps]
["Hook(layer=1, stage=7, path='mlp', io='output')"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .arch import Arch, Hook, _first
from .graph import Graph, Node
from .sites import Selection, Site, SiteError, resolve_positions


@dataclass
class Step:
    """One node resolved against a model: its hook, view functions, heads and dims.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("k", layer=0, head=1, positions="last"), rg.Patch("source"), name="p")
    >>> step = compile_graph(g, rg.models.tiny("llama").arch).steps[0]
    >>> step.hook.path, step.heads.tolist(), step.source_hook == step.hook
    ('self_attn.k_proj', [1], True)
    """

    node: Node
    hook: Hook
    get: Callable
    put: Callable
    heads: Optional[torch.Tensor]
    dims: Optional[torch.Tensor]
    source_hook: Optional[Hook] = None
    source_get: Optional[Callable] = None
    source_heads: Optional[torch.Tensor] = None


@dataclass
class Plan:
    """Steps in forward order; ``hooks`` lists every hook point the plan touches.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_mid", layer=1), rg.Collect(), name="late")
    >>> _ = g.add(rg.Site("q", layer=0), rg.Collect(), name="early")
    >>> plan = compile_graph(g, rg.models.tiny("llama").arch)
    >>> [s.node.name for s in plan.steps], [(h.layer, h.path, h.io) for h in plan.hooks]
    (['early', 'late'], [(0, 'self_attn.q_proj', 'output'), (1, '', 'input'), (1, 'self_attn', 'output')])
    """

    arch: Arch
    steps: list
    hooks: list = field(default_factory=list)


def _where(node: Node) -> str:
    return f"node {node.name!r} at {node.site}: "


def _check_site(node: Node, site: Site, arch: Arch, what: str = "") -> tuple[int, Optional[torch.Tensor]]:
    where = _where(node) + what
    layer = arch.layer_index(site.layer)
    if layer is None:
        raise SiteError(f"{where}layer {site.layer} out of range; valid layers 0..{arch.n_layers - 1} "
                        f"(or -{arch.n_layers}..-1)")
    heads = None
    if site.is_head:
        n = arch.heads(site.component)
        kind = "key-value heads (grouped-query attention)" if (
            site.component in ("k", "v") and arch.n_kv_heads != arch.n_heads) else "heads"
        if site.head is not None:
            bad = [h for h in site.head if not 0 <= h < n]
            if bad:
                raise SiteError(f"{where}head {bad[0]} out of range; {site.component} has {n} {kind}: "
                                f"valid heads 0..{n - 1}")
            heads = torch.tensor(site.head)
    return layer, heads


def _slice_width(node: Node, site: Site, arch: Arch) -> int:
    width = arch.width(site.component)
    if site.subspace is None:
        return width
    if node.op.learned_basis:
        size = node.op.basis_size()
        bad = [d for d in site.subspace if d >= size]
        if bad:
            raise SiteError(f"{_where(node)}subspace dim {bad[0]} beyond the rank of {type(node.op).__name__} "
                            f"({size}: valid dims 0..{size - 1})")
        return width
    bad = [d for d in site.subspace if d >= width]
    if bad:
        raise SiteError(f"{_where(node)}subspace dim {bad[0]} beyond the width of {site.component} "
                        f"({width}: valid dims 0..{width - 1})")
    return len(site.subspace)


def compile_graph(graph: Graph, arch: Arch) -> Plan:
    """Check ``graph`` against ``arch`` and order its nodes in forward order.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("head_out", layer=0, head=4), rg.Collect(), name="h")
    >>> compile_graph(g, rg.models.tiny("llama").arch)     # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.sites.SiteError: node 'h' at head_out[0].h4 pos=all: head 4 out of range; ... valid heads 0..3
    """
    steps = []
    for node in graph.nodes:
        site = node.site
        layer, heads = _check_site(node, site, arch)
        width = _slice_width(node, site, arch)
        need = node.op.expected_width()
        if need is not None and need != width:
            raise SiteError(f"{_where(node)}{type(node.op).__name__} has width {need}, the site needs {width} "
                            + ("(the subspace's dims)" if site.subspace else f"({site.component} width)"))
        hook = arch.hook(site.component, layer)
        get, put = arch.view(site.component)
        step = Step(node, hook, get, put, heads,
                    None if site.subspace is None or node.op.learned_basis else torch.tensor(site.subspace))
        if node.op.source is not None:
            src_site = node.reads[1]
            src_layer, step.source_heads = _check_site(node, src_site, arch, f"source site {src_site}: ")
            if arch.width(src_site.component) != arch.width(site.component) or (
                    (src_site.head is None) != (site.head is None)) or (
                    src_site.head is not None and len(src_site.head) != len(site.head)):
                raise SiteError(f"{_where(node)}source site {src_site} has another shape than the site")
            step.source_hook = arch.hook(src_site.component, src_layer)
            step.source_get = arch.view(src_site.component)[0]
            if (step.source_hook.layer, step.source_hook.stage) > (hook.layer, hook.stage):
                raise SiteError(f"{_where(node)}source site {src_site} comes after the site in the forward "
                                "pass; a patch can only read a place the model reaches first")
        steps.append(step)
    order = {n: i for i, n in enumerate(graph.dag)}
    steps.sort(key=lambda s: (s.hook.layer, s.hook.stage, order[s.node.name]))
    hooks = {s.hook for s in steps} | {s.source_hook for s in steps if s.source_hook}
    hooks |= {Hook(s.hook.layer, 0, "", "input") for s in steps if s.node.site.component == "resid_mid"}
    hooks |= {Hook(s.source_hook.layer, 0, "", "input") for s in steps
              if s.source_hook and s.node.reads[1].component == "resid_mid"}
    return Plan(arch, steps, sorted(hooks, key=lambda h: (h.layer, h.stage)))


@dataclass
class Batch:
    """Rows of every stream in one padded batch: ``rows[stream]`` is a slice of rows;
    ``start``/``length`` give each row's first prompt token and prompt length.

    >>> from reftgraph.runtime import tokenize
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
        raise SiteError(f"{_where(node)}{what}stream {stream!r} was not given; "
                        f"pass sources={{{stream!r}: [...]}} (given: {sorted(batch.rows)})")
    rows = batch.rows[stream]
    return resolve_positions(site.positions, batch.start[rows], batch.length[rows], _where(node) + what)


def bind(plan: Plan, batch: Batch) -> list[Bound]:
    """Resolve every step's positions in ``batch``; raises :class:`SiteError` before any forward.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions=[3]), rg.Collect(), name="c")
    >>> plan = compile_graph(g, rg.models.tiny("llama").arch)
    >>> bind(plan, Batch({"base": slice(0, 1)}, torch.tensor([0]), torch.tensor([2]), 2))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.sites.SiteError: node 'c' at resid_pre[0] pos=[3]: positions [3] are beyond the prompt of row 0 ...
    """
    n_flat = (max(r.stop for r in batch.rows.values())) * batch.seq_len
    bound = []
    for step in plan.steps:
        node = step.node
        sel = _select(node, node.site, node.stream, batch)
        if getattr(node.op, "mode", None) == "resample" and (
                sel.valid.shape[0] < 2 or not bool((sel.valid == sel.valid[:1]).all())):
            raise SiteError(f"{_where(node)}Ablate('resample') takes each slot from another row: it needs at least "
                            f"2 rows with the same number of selected positions; the {node.stream!r} stream has "
                            f"{sel.valid.shape[0]} rows selecting {sel.valid.sum(1).tolist()} positions")
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
                raise SiteError(f"{_where(node)}the source stream {stream!r} has {src.valid.shape[0]} rows, "
                                f"the {node.stream!r} stream {sel.valid.shape[0]}: give one source per row")
            if src.valid.shape[1] != k or not torch.equal(src.valid, sel.valid):
                counts = (sel.valid.sum(1).tolist(), src.valid.sum(1).tolist())
                raise SiteError(f"{_where(node)}selects {counts[0]} positions per row in {node.stream!r} but "
                                f"{counts[1]} in source {stream!r}; patches need the same count per row")
            b.source_index = _flat(src, batch.rows[stream], batch.seq_len)
        bound.append(b)
    return bound


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
    if op.collects:
        collected[step.node.name] = (op(sub, source=src, valid=b.valid.to(h.device)), b.valid)
        return None
    extra = {"subspace": step.node.site.subspace} if op.learned_basis else {}
    new = op(sub, source=src, valid=b.valid.to(h.device), **extra)
    if new.shape != sub.shape:
        raise SiteError(f"{_where(step.node)}{type(op).__name__} returned shape {list(new.shape)} for a slice of "
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
    >>> from reftgraph.runtime import tokenize
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
    by_hook = {}
    for step, b in zip(plan.steps, bound):
        by_hook.setdefault(step.hook, []).append((step, b))
    reads = {}
    for step, b in zip(plan.steps, bound):
        if step.source_hook is not None and step.source_hook != step.hook:
            reads.setdefault(step.source_hook, []).append((step, b))
    for hook in plan.hooks:
        envoy = plan.arch.envoy(root, hook)
        raw = getattr(envoy, hook.io)
        changed = False
        for step, b in by_hook.get(hook, ()):
            full = step.get(raw, pre.get(hook.layer))
            src = sources.pop(step.node.name, None)
            if step.source_hook == hook:
                src = _gather(step.source_get(raw, pre.get(hook.layer)), b.source_index, step.source_heads)
            new = _edit(step, b, full, src, collected)
            if new is not None:
                raw = step.put(raw, new, pre.get(hook.layer))
                changed = True
        if hook.stage == 0 and hook.path == "":
            pre[hook.layer] = _first(raw)
        for step, b in reads.get(hook, ()):
            sources[step.node.name] = _gather(step.source_get(raw, pre.get(hook.layer)), b.source_index,
                                              step.source_heads)
        if changed:
            setattr(envoy, hook.io, raw)

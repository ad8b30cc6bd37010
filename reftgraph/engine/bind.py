"""Bind a plan to one tokenized batch: every step's positions as flat index tensors.

>>> import torch, reftgraph as rg
>>> from reftgraph.engine.plan import compile_graph
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect())
>>> plan = compile_graph(g, rg.models.tiny("llama").arch)
>>> bind(plan, Batch.single([3, 2], 3, start=[0, 1]))[0].index.tolist()
[[2], [5]]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..core.graph import Node
from ..core.sites import KEY_COMPONENTS, Selection, Site, marked_positions, resolve_positions
from ..errors import SiteError
from .keys import KeyOrder


def where(node: Node) -> str:
    """The start of every error about ``node``: its name and site.

    >>> import reftgraph as rg
    >>> where(rg.Node("n", rg.Site("resid_pre", layer=1), rg.Collect()))
    "node 'n' at resid_pre[1] pos=all: "
    """
    return f"node {node.name!r} at {node.site}: "


@dataclass(frozen=True, eq=False)
class Batch:
    """Rows of every stream in one padded batch: ``rows[stream]`` is a slice of rows;
    ``start``/``length`` give each row's first prompt token and prompt length.

    >>> from reftgraph.engine import tokenize
    >>> import reftgraph as rg
    >>> _, batch = tokenize(rg.models.tiny("llama"), {"base": ["abc", "a"], "source": ["ab"]}, "left")
    >>> batch.rows, batch.start.tolist(), batch.length.tolist(), batch.seq_len
    ({'base': slice(0, 2, None), 'source': slice(2, 3, None)}, [0, 2, 1], [3, 1, 2], 3)

    Made by :func:`~reftgraph.engine.tokens.tokenize` (prompts of several streams), or for
    token ids built by hand by :meth:`single` (one stream), :meth:`full` (rows of one length)
    and :meth:`from_mask` (an attention mask).
    """

    rows: dict
    start: torch.Tensor
    length: torch.Tensor
    seq_len: int
    marks: dict = field(default_factory=dict)   # selector -> [N, S] bool: the tokens it selects ("image")
    stacks: dict = field(default_factory=dict)  # an encoder-decoder: "encoder" -> the encoder's Batch (this one
    #                                             is the decoder's tokens, which the logits follow)

    def of(self, stack: str) -> "Batch":
        """The token layout of a stack: an encoder-decoder's encoder has its own, the decoder
        (and a model with one stack) this one.

        >>> b = Batch.full(1, 2)
        >>> b.of("encoder") is b
        True
        """
        return self.stacks.get(stack, self)

    @classmethod
    def single(cls, length, seq_len: int, start=None) -> "Batch":
        """One stream, ``base``, of rows whose prompts are ``length`` tokens from ``start``
        (default 0: right padding, or tokens after the prompt that positions do not count).

        >>> b = Batch.single([3, 2], 4)
        >>> b.rows, b.start.tolist(), b.length.tolist(), b.seq_len
        ({'base': slice(0, 2, None)}, [0, 0], [3, 2], 4)
        """
        length = torch.as_tensor(length, dtype=torch.long).reshape(-1)
        start = torch.zeros_like(length) if start is None else torch.as_tensor(start, dtype=torch.long).reshape(-1)
        if start.shape != length.shape or bool((start + length > seq_len).any()) or bool((start < 0).any()):
            raise ValueError(f"a batch of seq_len {seq_len} cannot hold prompts of lengths {length.tolist()} "
                             f"starting at {start.tolist()} (each row's prompt lies within its seq_len tokens)")
        return cls({"base": slice(0, len(length))}, start, length, int(seq_len))

    @classmethod
    def full(cls, n: int, width: int) -> "Batch":
        """``n`` rows of ``width`` prompt tokens each (no padding).

        >>> Batch.full(2, 3).length.tolist()
        [3, 3]
        """
        return cls.single([width] * n, width)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "Batch":
        """One stream of the rows of an attention mask ``[N, S]`` (1 on each prompt's tokens, either padding side).

        >>> Batch.from_mask(torch.tensor([[0, 1, 1], [1, 1, 1]])).start.tolist()
        [1, 0]
        """
        mask = torch.as_tensor(mask)
        return cls.single(mask.sum(1), mask.shape[1], mask.argmax(1))


@dataclass(frozen=True, eq=False)
class BoundPlan:
    """A plan bound to one batch (:meth:`Plan.bind <reftgraph.engine.plan.Plan.bind>`): it
    owns every step's positions (``steps``, one :class:`Bound` per plan step), checked
    before any forward, and the index tensors moved to each device.

    >>> import reftgraph as rg
    >>> from reftgraph.engine import compile_graph
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect(), name="c")
    >>> bound = compile_graph(g, rg.models.tiny("llama").arch).bind(Batch.full(2, 3))
    >>> bound.batch.seq_len, [b.index.tolist() for b in bound.steps]
    (3, [[[2], [5]]])
    """

    plan: object
    batch: Batch
    steps: tuple


@dataclass
class Bound:
    """A step's positions in one batch, as flat indices into ``[rows * seq_len]``.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect())
    >>> from reftgraph.engine import compile_graph
    >>> plan = compile_graph(g, rg.models.tiny("llama").arch)
    >>> bind(plan, Batch.single([3, 2], 3, start=[0, 1]))[0].index.tolist()  # rows 0 and 1 at 0 * 3 + 2, 1 * 3 + 2
    [[2], [5]]

    Steps of one stream with the same positions share one :class:`Layout` (``layout``):
    the engine edits them on one gathered slice (see :mod:`reftgraph.engine.apply`).
    """

    index: torch.Tensor      # [B, k] flat index of the written (or collected) slots
    valid: torch.Tensor      # [B, k]
    slot: torch.Tensor       # [N * S] which slot a flat position takes (where mask)
    mask: torch.Tensor       # [N * S]
    source_index: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None   # [B, basis]: the dims each row uses (per-row subspaces)
    keys: Optional[KeyOrder] = None        # a key axis (attn_pattern): each row's keys in prompt order
    source_keys: Optional[KeyOrder] = None
    layout: Optional["Layout"] = field(default=None, repr=False)
    moved: dict = field(default_factory=dict, repr=False)   # device -> _Moved (kept across calls)

    def on(self, step, device: torch.device) -> "_Moved":
        """The index tensors :func:`~reftgraph.engine.apply.apply` needs for ``step`` on
        ``device``, moved once per device and kept (bound plans are cached per batch layout).

        >>> import reftgraph as rg
        >>> from reftgraph.engine import compile_graph
        >>> g = rg.Graph()
        >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect())
        >>> plan = compile_graph(g, rg.models.tiny("llama").arch)
        >>> b = bind(plan, Batch.single([3, 2], 3, start=[0, 1]))[0]
        >>> [t.tolist() for t in b.on(plan.steps[0], torch.device("cpu")).at]    # (rows, positions)
        [[[0], [1]], [[2], [2]]]
        """
        moved = self.moved.get(device)
        if moved is None:
            moved = self.moved[device] = _Moved(self, step, device)
        return moved

    def __getstate__(self):   # a remote request carries no tensors moved here
        return {**self.__dict__, "moved": {}}


@dataclass
class Layout:
    """Where one selection sits in the padded batch, for edits done on the gathered slice
    ``full[row, pos]`` (``[B, k, ...]``) and written back once.

    >>> lay = Layout.of(torch.tensor([[0, 1], [5, 3]]), torch.tensor([[True, True], [True, False]]), 6, 3)
    >>> lay.written.tolist(), lay.taken.tolist()      # flat positions written back, from which slots
    ([0, 1, 5], [0, 1, 2])
    >>> lay.follow.tolist(), lay.keep.tolist()        # slot 3 (invalid) reads position 3: unwritten
    ([0, 1, 2, 0], [True, True, True, False])

    After an edit, slot ``j`` holds what the full tensor now has at ``index[j]``: the new
    value of slot ``follow[j]`` where ``keep[j]``, else its own value (a position no valid
    slot writes). ``follow``, ``keep``, ``written`` and ``taken`` are None when every slot
    is valid and writes a position of its own (the common case): the slice is then written
    back where it was gathered. ``whole``: the slots are the whole batch in order (every
    position of every row, no padding), so the slice is the full tensor itself: nothing to
    gather or scatter.
    """

    index: torch.Tensor      # [B, k] flat index (row * seq_len + position)
    valid: torch.Tensor      # [B, k]
    slot: torch.Tensor       # [N * S] which slot a flat position takes (where mask)
    mask: torch.Tensor       # [N * S]
    seq_len: int
    written: Optional[torch.Tensor] = None   # [W] the flat positions the slots write (each once)
    taken: Optional[torch.Tensor] = None     # [W] the slot each takes its value from
    follow: Optional[torch.Tensor] = None    # [B * k]
    keep: Optional[torch.Tensor] = None      # [B * k]
    whole: bool = False                      # the slots are every position of every row, in order

    @classmethod
    def of(cls, index: torch.Tensor, valid: torch.Tensor, n_flat: int, seq_len: int) -> "Layout":
        """The layout of flat ``index`` / ``valid`` ``[B, k]`` in a batch of ``n_flat`` positions.

        >>> Layout.of(torch.tensor([[2], [5]]), torch.tensor([[True], [True]]), 6, 3).written is None
        True
        """
        target = torch.where(valid, index, torch.full_like(index, n_flat))  # invalid -> a spare slot
        slot = torch.zeros(n_flat + 1, dtype=torch.long).scatter_(
            0, target.flatten(), torch.arange(index.numel()))[:n_flat]
        mask = torch.zeros(n_flat + 1, dtype=torch.bool).scatter_(0, target.flatten(), valid.flatten())[:n_flat]
        lay = cls(index, valid, slot, mask, seq_len)
        lay.whole = index.numel() == n_flat and bool(valid.all()) and torch.equal(index.flatten(), torch.arange(n_flat))
        follow, keep = slot[index.flatten()], mask[index.flatten()]
        if not (bool(keep.all()) and torch.equal(follow, torch.arange(index.numel()))):
            lay.written = mask.nonzero().flatten()
            lay.taken, lay.follow, lay.keep = slot[lay.written], follow, keep
        return lay


class _Moved:
    """A bound step's index tensors on one device (see :meth:`Bound.on`)."""

    def __init__(self, b: Bound, step, device: torch.device):
        lay = b.layout
        to = (lambda t: None if t is None else t.to(device))
        self.shape = tuple(lay.index.shape)
        self.whole = lay.whole
        self.valid = to(lay.valid)
        seq_len = lay.seq_len
        self.at = (to(lay.index // seq_len), to(lay.index % seq_len))     # the slice: full[row, pos]
        self.written = None if lay.written is None else (to(lay.written // seq_len), to(lay.written % seq_len))
        self.taken, self.follow = to(lay.taken), to(lay.follow)
        self.keep = None if lay.keep is None else to(lay.keep).view(self.shape)
        self.heads, self.dims = to(step.heads), to(step.dims)
        self.source_at = None if b.source_index is None else (to(b.source_index // seq_len),
                                                              to(b.source_index % seq_len))
        self.source_heads = to(step.source_heads)


def _flat(sel: Selection, rows: slice, seq_len: int) -> torch.Tensor:
    row_ids = torch.arange(rows.start, rows.stop)[:, None]
    return row_ids * seq_len + sel.index


def _select(node: Node, site: Site, stream: str, batch: Batch, what: str = "") -> Selection:
    if stream not in batch.rows:
        raise SiteError(f"{where(node)}{what}stream {stream!r} was not given; "
                        f"pass sources={{{stream!r}: [...]}} (given: {sorted(batch.rows)})")
    rows = batch.rows[stream]
    marks = batch.marks.get(site.positions) if isinstance(site.positions, str) else None
    if marks is not None and bool(marks[rows].any(1).all()):
        return marked_positions(marks[rows])
    if marks is not None:
        row = int((~marks[rows].any(1)).nonzero()[0])
        raise SiteError(f"{where(node)}{what}positions={site.positions!r}: row {row} has no {site.positions} token")
    return resolve_positions(site.positions, batch.start[rows], batch.length[rows], where(node) + what,
                             cap=batch.seq_len)


def bind(plan, batch: Batch) -> list[Bound]:
    """Resolve every step's positions in ``batch``; raises :class:`SiteError` before any forward.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions=[3]), rg.Collect(), name="c")
    >>> from reftgraph.engine import compile_graph
    >>> plan = compile_graph(g, rg.models.tiny("llama").arch)
    >>> bind(plan, Batch.full(1, 2))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: node 'c' at resid_pre[0] pos=[3]: positions [3] are beyond the prompt of row 0 ...
    """
    key = tuple(_layout_key(b) for b in (batch, *batch.stacks.values()))
    memo = plan.memo
    if key not in memo:
        if len(memo) >= MAX_BOUND:
            memo.pop(next(iter(memo)))
        memo[key] = _bind(plan, batch)
    return memo[key]


MAX_BOUND = 64  # batch layouts remembered per plan


def _layout_key(batch: Batch) -> tuple:
    return (tuple((k, r.start, r.stop) for k, r in batch.rows.items()), batch.seq_len,
            tuple(batch.start.tolist()), tuple(batch.length.tolist()),
            tuple((k, tuple(m.flatten().tolist())) for k, m in sorted(batch.marks.items())))


def _bind(plan, given: Batch) -> list:
    layouts = {}   # (stack, stream, positions) -> Layout: steps selecting the same slots share one
    bound = []
    for step in plan.steps:
        node = step.node
        batch = given.of(step.hook.stack)
        key = (step.hook.stack, node.stream, repr(node.site.positions))
        lay = layouts.get(key)
        if lay is None:
            n_flat = (max(r.stop for r in batch.rows.values())) * batch.seq_len
            sel = _select(node, node.site, node.stream, batch)
            lay = layouts[key] = Layout.of(_flat(sel, batch.rows[node.stream], batch.seq_len), sel.valid, n_flat,
                                            batch.seq_len)
        problem = node.op.check_selection(lay.valid)
        if problem:
            raise SiteError(f"{where(node)}{problem}")
        b = Bound(lay.index, lay.valid, lay.slot, lay.mask, layout=lay, keys=_keys(node, node.site, node.stream, batch))
        if step.source_hook is not None:
            stream, site = node.reads
            batch = given.of(step.source_hook.stack)
            src = _select(node, site, stream, batch, f"source {stream!r} ")
            if src.valid.shape[0] != lay.valid.shape[0]:
                raise SiteError(f"{where(node)}the source stream {stream!r} has {src.valid.shape[0]} rows, "
                                f"the {node.stream!r} stream {lay.valid.shape[0]}: give one source per row")
            if src.valid.shape[1] != lay.index.shape[1] or not torch.equal(src.valid, lay.valid):
                counts = (lay.valid.sum(1).tolist(), src.valid.sum(1).tolist())
                raise SiteError(f"{where(node)}selects {counts[0]} positions per row in {node.stream!r} but "
                                f"{counts[1]} in source {stream!r}; patches need the same count per row")
            b.source_index = _flat(src, batch.rows[stream], batch.seq_len)
            b.source_keys = _keys(node, site, stream, batch)
            if b.keys is not None and b.keys.picked is not None and (
                    b.source_keys.picked.shape[1] != b.keys.picked.shape[1]):
                raise SiteError(f"{where(node)}selects {b.keys.picked.shape[1]} keys per row but "
                                f"{b.source_keys.picked.shape[1]} in source {stream!r}; patches need the same count")
        bound.append(b)
    return bound


def _keys(node: Node, site: Site, stream: str, batch: Batch) -> Optional[KeyOrder]:
    """The key order of a site whose last axis is the key tokens (and the keys its ``keys=``
    selects, counted in each row's prompt), else None."""
    if site.component not in KEY_COMPONENTS:
        return None
    rows = batch.rows[stream]
    length = batch.length[rows]
    if site.keys == "all":
        return KeyOrder(batch.start[rows], length, batch.seq_len)
    sel = resolve_positions(site.keys, torch.zeros_like(length), length, f"{where(node)}key selection: ", cap=batch.seq_len)
    return KeyOrder(batch.start[rows], length, batch.seq_len, sel.index, sel.valid)


def with_subspaces(plan, bound: list, batch: Batch, subspaces) -> list:
    """``bound`` with per-row subspaces: for each row, the dims of a node's learned basis it uses.

    >>> import reftgraph as rg
    >>> from reftgraph.engine import compile_graph, tokenize
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), rg.LoReFT(width=32, rank=4), name="r")
    >>> plan = compile_graph(g, rg.models.tiny("llama").arch)
    >>> _, batch = tokenize(rg.models.tiny("llama"), {"base": ["ab", "cd"]})
    >>> with_subspaces(plan, bind(plan, batch), batch, [[0, 1], [2, 3]])[0].rows.tolist()
    [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]

    ``subspaces``: dims for every row (``[0, 1]``), one entry per row (``[[0, 1], [2, 3]]``;
    ``None`` for all of a row's dims; an entry may be a dict ``{node: dims}``), or a dict
    ``{node: either of those}`` for some nodes. Without a dict, every node whose op takes
    per-row subspaces (``Op.per_row_subspaces``: the ReFT family, ``Rotate``) gets them.
    Dims are checked against each op's basis and the node's own ``subspace``."""
    if subspaces is None:
        return bound
    names = {step.node.name for step in plan.steps}
    per_node = isinstance(subspaces, dict) and all(isinstance(k, str) for k in subspaces)
    if per_node:
        unknown = sorted(set(subspaces) - names)
        if unknown:
            raise SiteError(f"subspaces name nodes {unknown} that are not in the graph (nodes: {sorted(names)})")
    out = list(bound)
    for i, step in enumerate(plan.steps):
        node = step.node
        if per_node and node.name not in subspaces or node.op.collects:
            continue
        if not node.op.per_row_subspaces:
            if per_node:
                raise SiteError(f"{where(node)}{type(node.op).__name__} takes no per-row subspaces; they are dims of "
                                "a learned basis (the ReFT family, Rotate)")
            continue
        spec = subspaces[node.name] if per_node else subspaces
        out[i] = replace(bound[i], rows=_row_mask(node, spec, batch.rows[node.stream], names))
    return out


def _row_mask(node: Node, spec, rows: slice, names: set) -> torch.Tensor:
    n = rows.stop - rows.start
    size = node.op.basis_size()
    if hasattr(node.op, "dims"):   # an op that picks its dims itself (Rotate: its first k)
        allowed = list(node.op.dims(node.site.subspace))
    else:
        allowed = list(node.site.subspace) if node.site.subspace is not None else list(range(size))
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(d, int) for d in spec):
        spec = [spec] * n
    if not isinstance(spec, (list, tuple)) or len(spec) != n:
        raise SiteError(f"{where(node)}per-row subspaces need dims for every row or one entry per row "
                        f"({n} rows), got {spec!r}")
    mask = torch.zeros(n, size)
    for r, dims in enumerate(spec):
        if isinstance(dims, dict):   # {node: dims} for this row
            unknown = sorted(set(dims) - names)
            if unknown:
                raise SiteError(f"subspaces name nodes {unknown} that are not in the graph (nodes: {sorted(names)})")
            dims = dims.get(node.name)
        dims = allowed if dims is None else dims
        bad = [d for d in dims if not isinstance(d, int) or d not in allowed]
        if bad:
            raise SiteError(f"{where(node)}row {r} asks for dim {bad[0]!r}; the node's dims are {allowed}")
        mask[r, list(dims)] = 1.0
    return mask

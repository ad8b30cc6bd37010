"""Where an intervention acts: :class:`Site`, position selectors and their resolution.

>>> from reftgraph import Site
>>> print(Site("head_out", layer=7, head=8, positions=[0]))
head_out[7].h8 pos=[0]
>>> print(Site("resid_post", layer=9, positions="f5+l5", subspace=(0, 1)))
resid_post[9] pos=f5+l5 dims=[0,1]
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..errors import SiteError

COMPONENTS = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "cross_attn_out",
    "mlp_out",
    "mlp_act",
    "head_out",
    "q",
    "k",
    "v",
    "attn_pattern",
    "q_in",
    "k_in",
    "v_in",
    "mlp_in",
    "mixer_out",
    "embed",
    "logits_in",
    "logits",
)
END_COMPONENTS = {"embed": 0, "logits_in": -1, "logits": -1}   # outside the blocks: their only layer
HEAD_COMPONENTS = ("head_out", "q", "k", "v", "attn_pattern", "q_in", "k_in", "v_in")
KEY_COMPONENTS = ("attn_pattern",)   # the last axis is the key tokens: no fixed width
STACKS = ("encoder", "decoder")   # an encoder-decoder's stacks, in the order it runs them
NAMED_POSITIONS = ("last", "prompt", "all", "generated", "image")
_FIRST_LAST = re.compile(r"^f(\d+)\+l(\d+)$")

Positions = Union[str, int, slice, tuple]

# forward order of the hook points inside one block
STAGES = {
    "embed": -1,
    "resid_pre": 0,
    "q_in": 1,        # a receiver input comes before what its reader computes from it
    "q": 2,
    "k_in": 3,
    "k": 4,
    "v_in": 5,
    "v": 6,
    "attn_pattern": 7,
    "head_out": 8,
    "attn_out": 9,
    "mixer_out": 9,    # (blocks with a sequence mixer have no attention)
    "resid_mid": 10,   # read through the attention output, after attn_out's edits
    "cross_attn_out": 10.5,   # an encoder-decoder's cross-attention, between attention and MLP
    "mlp_in": 11,
    "mlp_act": 12,
    "mlp_out": 13,
    "resid_post": 14,
    "logits_in": 15,
    "logits": 16,
}


# no prompt, layer, head or dim comes near this: larger numbers in a site are refused
# (they would overflow int64 index arithmetic, or ask for memory in proportion to them)
MAX_INDEX = 2**31 - 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _in_range(x) -> bool:
    return _is_int(x) and -MAX_INDEX <= x <= MAX_INDEX


def normalise_positions(positions: Any) -> Positions:
    """A position selector in its canonical form (lists become tuples), else a SiteError.

    >>> normalise_positions([0, -1]), normalise_positions("f2+l2")
    ((0, -1), 'f2+l2')
    """
    if isinstance(positions, bool):
        raise SiteError(f"positions must be ints, a slice or one of {NAMED_POSITIONS}, got {positions!r}")
    if isinstance(positions, int):
        return (positions,)
    if isinstance(positions, (list, tuple)):
        if not positions or not all(map(_is_int, positions)):
            raise SiteError(f"a position list must be a non-empty list of ints, got {positions!r}")
        if not all(map(_in_range, positions)):
            raise SiteError(f"positions must lie in -{MAX_INDEX}..{MAX_INDEX}, got {_short(positions)}")
        if len(set(positions)) != len(positions):
            raise SiteError(f"positions {list(positions)} repeat an entry")
        return tuple(positions)
    if isinstance(positions, slice):
        if not all(v is None or _is_int(v) for v in (positions.start, positions.stop, positions.step)):
            raise SiteError(f"a position slice takes ints or None, got {positions!r}")
        if not all(v is None or _in_range(v) for v in (positions.start, positions.stop, positions.step)):
            raise SiteError(f"a position slice takes ints in -{MAX_INDEX}..{MAX_INDEX}, got {positions!r}")
        if positions.step is not None and positions.step <= 0:
            raise SiteError(f"position slices need a positive step, got {positions!r}")
        return positions
    if isinstance(positions, str):
        if positions in NAMED_POSITIONS:
            return positions
        first_last = _FIRST_LAST.match(positions)
        if first_last and first_last.groups() == ("0", "0"):
            raise SiteError("positions 'f0+l0' select no token; use N >= 1 or M >= 1 in 'fN+lM'")
        if first_last and not all(int(n) <= MAX_INDEX for n in first_last.groups()):
            raise SiteError(f"positions {_short(positions)}: N and M of 'fN+lM' must be at most {MAX_INDEX}")
        if first_last:
            return positions
        raise SiteError(
            f"unknown position selector {_short(positions)}; use ints, a slice, "
            f"{', '.join(map(repr, NAMED_POSITIONS))} or 'fN+lM' (first N and last M prompt tokens)"
        )
    raise SiteError(f"positions must be ints, a slice or a string, got {type(positions).__name__}")


def _short(value, n: int = 80) -> str:
    """``repr(value)``, cut to ``n`` characters (a crafted file may hold huge values)."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


def _did_you_mean(component) -> str:
    """``"did you mean 'resid_post'? "`` for a near miss of a component name, else ``""``.

    >>> _did_you_mean("resid_psot"), _did_you_mean("Q"), _did_you_mean("attention")
    ("did you mean 'resid_post'? ", "did you mean 'q' or 'q_in'? ", '')
    """
    if not isinstance(component, str) or len(component) > 40:
        return ""
    key = component.lower()
    score = {c: difflib.SequenceMatcher(None, key, c).ratio() for c in COMPONENTS}
    best = max(score.values())
    near = [c for c in COMPONENTS if score[c] >= 0.6 and score[c] > best - 0.05   # the nearest, ties kept
            or c.startswith(key + "_")]                                          # and a family's names
    if not near:
        return ""
    return f"did you mean {', '.join(map(repr, near[:-1])) + ' or ' if len(near) > 1 else ''}{near[-1]!r}? "


def _positions_json(p: Positions):
    """A selector as a saved graph stores it (lists, ``{"slice": [start, stop, step]}``)."""
    if isinstance(p, tuple):
        return list(p)
    if isinstance(p, slice):
        return {"slice": [p.start, p.stop, p.step]}
    return p


def _positions_str(p: Positions) -> str:
    if isinstance(p, tuple):
        return "[" + ",".join(map(str, p)) + "]"
    if isinstance(p, slice):
        parts = ["" if v is None else str(v) for v in (p.start, p.stop)]
        return "[" + ":".join(parts) + ("" if p.step in (None, 1) else f":{p.step}") + "]"
    return p


@dataclass(frozen=True)
class Site:
    """One place in a model: component, layer, token positions, heads and subspace dims.

    >>> Site("resid_pre", layer=-1, positions="last").component
    'resid_pre'

    ``positions`` are relative to each row's prompt (0 = first real token, -1 = last),
    whatever the padding side. ``head`` is only for ``head_out``, ``q``, ``k``, ``v``
    (for grouped-query models ``k`` and ``v`` index key-value heads). ``subspace`` is a
    tuple of dims in the op's basis (the neuron basis for ops without a learned one).
    ``keys`` selects key tokens of ``attn_pattern`` (positions select its queries), with
    the same selectors as ``positions``: ``Site("attn_pattern", 3, positions="last",
    keys=[0])`` is the last token's attention to the first. ``stack`` names an
    encoder-decoder's stack, ``"encoder"`` or ``"decoder"`` (None: the decoder; positions
    count that stack's tokens).
    """

    component: str
    layer: Optional[int] = None
    positions: Positions = "all"
    head: Union[int, tuple, None] = None
    subspace: Union[tuple, None] = None
    keys: Positions = "all"
    stack: Optional[str] = None

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise SiteError(f"unknown component {_short(self.component)}; {_did_you_mean(self.component)}"
                            f"valid components: {', '.join(COMPONENTS)}")
        if self.layer is None and self.component in END_COMPONENTS:
            object.__setattr__(self, "layer", END_COMPONENTS[self.component])
        if self.layer is None:
            raise SiteError(f"{self.component} needs a layer, e.g. Site({self.component!r}, layer=0)")
        if not _in_range(self.layer):
            raise SiteError(f"layer must be an int in -{MAX_INDEX}..{MAX_INDEX}, got {_short(self.layer)}")
        object.__setattr__(self, "positions", normalise_positions(self.positions))
        head = self.head
        if head is not None:
            if self.component not in HEAD_COMPONENTS:
                raise SiteError(
                    f"{self.component} has no heads; head= is only for {', '.join(HEAD_COMPONENTS)}"
                )
            head = (head,) if isinstance(head, int) else tuple(head) if isinstance(head, (tuple, list)) else None
            if not head or len(set(head)) != len(head) or not all(map(_in_range, head)):
                raise SiteError(f"head must be an int or a tuple of distinct ints, got {_short(self.head)}")
            object.__setattr__(self, "head", head)
        if self.subspace is not None:
            dims = self.subspace
            dims = (dims,) if isinstance(dims, int) else tuple(dims) if isinstance(dims, (tuple, list)) else None
            if not dims or len(set(dims)) != len(dims) or any(not _in_range(d) or d < 0 for d in dims):
                raise SiteError(f"subspace must be distinct non-negative dims, got {_short(self.subspace)}")
            object.__setattr__(self, "subspace", dims)
        object.__setattr__(self, "keys", normalise_positions(self.keys))
        if self.keys != "all" and self.component not in KEY_COMPONENTS:
            raise SiteError(f"{self.component} has no key axis; keys= is only for {', '.join(KEY_COMPONENTS)}")
        if self.keys in ("generated", "prompt"):
            raise SiteError(f"keys={self.keys!r}: key tokens are selected by ints, a slice, 'last', 'all' or 'fN+lM'")
        if self.stack not in (None, *STACKS):     # (None: the decoder, or a model's only stack)
            raise SiteError(f"stack must be 'encoder', 'decoder' or None (the decoder of an encoder-decoder; a model "
                            f"with one stack), got {_short(self.stack)}")

    def __repr__(self) -> str:   # keys and stack only when set, as the site reprs before them were
        keys = f", keys={self.keys!r}" if self.keys != "all" else ""
        stack = f", stack={self.stack!r}" if self.stack else ""
        return (f"Site(component={self.component!r}, layer={self.layer!r}, positions={self.positions!r}, "
                f"head={self.head!r}, subspace={self.subspace!r}{keys}{stack})")

    def __hash__(self) -> int:  # slices are unhashable before Python 3.12
        key = [("slice", p.start, p.stop, p.step) if isinstance(p, slice) else p for p in (self.positions, self.keys)]
        return hash((self.component, self.layer, *key, self.head, self.subspace, self.stack))

    @property
    def is_head(self) -> bool:
        """Whether the component has heads (``head_out``, ``q``, ``k``, ``v``).

        >>> Site("head_out", layer=0).is_head, Site("mlp_out", layer=0).is_head
        (True, False)
        """
        return self.component in HEAD_COMPONENTS

    def replace(self, **changes) -> "Site":
        """A copy with some fields changed (checked like a new site).

        >>> print(Site("resid_post", layer=1, positions="last").replace(layer=3))
        resid_post[3] pos=last
        """
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        s = (f"{self.stack}." if self.stack else "") + f"{self.component}[{self.layer}]"
        if self.head is not None:
            s += "." + "+".join(f"h{h}" for h in self.head)
        s += f" pos={_positions_str(self.positions)}"
        if self.subspace is not None:   # (a long list, e.g. the features outside a circuit, shortened)
            dims = self.subspace if len(self.subspace) <= 16 else (*self.subspace[:8], "...", self.subspace[-1])
            s += " dims=[" + ",".join(map(str, dims)) + "]" + (f" ({len(self.subspace)} dims)" if len(dims) < len(
                self.subspace) else "")
        if self.keys != "all":
            s += f" keys={_positions_str(self.keys)}"
        return s

    def to_dict(self) -> dict:
        """A JSON-able dict (what a saved graph stores); :meth:`from_dict` reads it back.

        >>> Site("head_out", layer=7, head=8, positions=slice(0, 2)).to_dict()
        {'component': 'head_out', 'layer': 7, 'positions': {'slice': [0, 2, None]}, 'head': [8], 'subspace': None}
        """
        out = {
            "component": self.component,
            "layer": self.layer,
            "positions": _positions_json(self.positions),
            "head": None if self.head is None else list(self.head),
            "subspace": None if self.subspace is None else list(self.subspace),
        }
        if self.keys != "all":   # (written only when set: files without it read as before)
            out["keys"] = _positions_json(self.keys)
        if self.stack:
            out["stack"] = self.stack
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Site":
        """The inverse of :meth:`to_dict`; anything else raises :class:`SiteError`.

        >>> site = Site("q", layer=1, head=(0, 2), positions=[0, -1], subspace=(3,))
        >>> Site.from_dict(site.to_dict()) == site
        True
        >>> pattern = Site("attn_pattern", layer=1, positions="last", keys=slice(0, 2))
        >>> Site.from_dict(pattern.to_dict()) == pattern
        True
        """
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict) or not {"component", "layer"} <= set(d) or not set(d) <= set(fields):
            raise SiteError(f"a site must be a mapping with 'component' and 'layer' and optionally "
                            f"{', '.join(map(repr, fields[2:]))}; got {str(d)[:200]}")
        d = dict(d)
        for key in ("positions", "keys"):
            p = d.get(key, "all")
            if isinstance(p, dict):
                bounds = p.get("slice") if set(p) == {"slice"} else None
                if not isinstance(bounds, list) or len(bounds) != 3:
                    raise SiteError(f"a slice of {key} is saved as {{'slice': [start, stop, step]}}, got {p!r}")
                d[key] = slice(*bounds)
        for key in ("head", "subspace"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class Selection:
    """Resolved positions of one stream: ``index[b, j]`` is the padded token index of the
    j-th selected position of row b; ``valid[b, j]`` is False where row b has fewer.

    >>> s = resolve_positions("prompt", start=torch.tensor([0, 1]), length=torch.tensor([3, 2]))
    >>> s.index.tolist(), s.valid.tolist()     # row 1 is left-padded by one token
    ([[0, 1, 2], [1, 2, 1]], [[True, True, True], [True, True, False]])
    """

    index: torch.Tensor
    valid: torch.Tensor


def marked_positions(marks: torch.Tensor) -> Selection:
    """The positions where each row of ``marks [B, S]`` is True (image tokens), padded to the
    longest row's count (``valid`` False past a row's own).

    >>> import torch
    >>> s = marked_positions(torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))
    >>> s.index.tolist(), s.valid.tolist()
    ([[1, 2], [0, 0]], [[True, True], [True, False]])
    """
    marks = marks.bool()
    count = marks.sum(1)
    k = max(int(count.max()) if count.numel() else 0, 1)
    order = torch.sort((~marks).to(torch.uint8), dim=1, stable=True).indices[:, :k]   # marked positions first
    valid = torch.arange(k)[None, :] < count[:, None]
    return Selection(index=torch.where(valid, order, torch.zeros_like(order)), valid=valid)


def resolve_positions(positions: Positions, start: torch.Tensor, length: torch.Tensor, where: str = "",
                      cap: Optional[int] = None) -> Selection:
    """Resolve a selector per row, without Python loops over the batch.

    >>> import torch
    >>> s = resolve_positions("f1+l1", torch.tensor([0, 2]), torch.tensor([4, 2]))
    >>> s.index.tolist(), s.valid.tolist()
    ([[0, 3], [2, 3]], [[True, True], [True, True]])

    ``start[b]`` is the padded index of row b's first prompt token, ``length[b]`` its
    number of prompt tokens. Explicit ints outside a row's prompt raise :class:`SiteError`.
    What a selector allocates is bounded by the prompt, never by its numbers: ``N`` and
    ``M`` of ``"fN+lM"`` count at most ``cap`` positions each (default: the longest row;
    streams bound together pass the batch width, so their selections have one shape).

    >>> resolve_positions("f30000000+l1", torch.tensor([0]), torch.tensor([3])).index.shape
    torch.Size([1, 4])
    """
    start = start.long()
    length = length.long()
    longest = int(length.max()) if length.numel() else 0
    cap = max(longest, 1) if cap is None else max(cap, longest, 1)
    if isinstance(positions, tuple):
        rel = torch.tensor(positions, dtype=torch.long).expand(len(length), -1)
        rel = torch.where(rel < 0, rel + length[:, None], rel)
        ok = (rel >= 0) & (rel < length[:, None])
        if not bool(ok.all()):
            bad_row = int((~ok).any(1).nonzero()[0])
            raise SiteError(
                f"{where}positions {list(positions)} are beyond the prompt of row {bad_row} "
                f"({int(length[bad_row])} tokens: valid positions 0..{int(length[bad_row]) - 1} "
                f"or -{int(length[bad_row])}..-1)"
            )
        valid = ok
    elif isinstance(positions, slice):
        step = min(positions.step or 1, cap)   # a longer step reaches one position either way

        def bound(v, default):
            if v is None:
                return default
            v = torch.full_like(length, v)
            return torch.where(v < 0, v + length, v).clamp(min=torch.zeros_like(length), max=length)

        lo = bound(positions.start, torch.zeros_like(length))
        hi = bound(positions.stop, length)
        j = torch.arange(max(longest, 1)) * step
        rel = lo[:, None] + j[None, :]
        valid = rel < hi[:, None]
    elif positions == "last":
        rel = (length - 1)[:, None]
        valid = length[:, None] > 0
    elif positions in ("prompt", "all"):
        rel = torch.arange(max(longest, 1)).expand(len(length), -1)
        valid = rel < length[:, None]
    elif positions == "generated":
        raise SiteError(f"{where}positions='generated' only applies during generation")
    elif positions == "image":
        raise SiteError(f"{where}positions='image' selects a vision-language model's image tokens, and these inputs "
                        "hold none: run the graph on the model inputs a processor makes (a dict with input_ids, "
                        "attention_mask and pixel_values) of a model whose config names an image token")
    else:
        n_first, n_last = (min(int(n), cap) for n in _FIRST_LAST.match(positions).groups())
        first = torch.arange(n_first).expand(len(length), -1)
        first_ok = first < length[:, None]
        last = (length[:, None] - n_last) + torch.arange(n_last)[None, :]
        # a last-token position already covered by the first N is dropped, never repeated
        last_ok = (last >= 0) & (last >= torch.minimum(length, torch.tensor(n_first))[:, None])
        rel = torch.cat([first, last], 1)
        valid = torch.cat([first_ok, last_ok], 1)
    rel = torch.where(valid, rel, torch.zeros_like(rel))
    return Selection(index=start[:, None] + rel, valid=valid)

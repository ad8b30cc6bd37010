"""Ops without learned bases: Patch, Add, Set, Ablate, Collect, Classify, and Without (an op minus some directions).

>>> import torch, reftgraph as rg
>>> rg.Add(torch.ones(4), scale=2.0)(torch.zeros(1, 1, 4)).tolist()
[[[2.0, 2.0, 2.0, 2.0]]]
"""

from __future__ import annotations


import torch
from torch import nn

from ..masks import masked_mean
from ..sites import Site
from .base import Op, positive_int


def _tensor(value, name: str, trainable: bool, module: nn.Module) -> None:
    value = torch.as_tensor(value, dtype=torch.float32) if not torch.is_tensor(value) else value.detach().clone()
    if trainable:
        module.register_parameter(name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


def _width(value: torch.Tensor):
    """The width a value broadcast to the slice needs (None for a scalar: any)."""
    return value.shape[-1] if value.dim() else None


def _with_basis(op: Op, config: dict) -> dict:
    """``config`` with the op's basis (a dictionary, saved as an op inside the op) when it has one."""
    if op.basis is not None:
        config["basis"] = {"type": type(op.basis).__name__, "config": op.basis.config()}
    return config


class Patch(Op):
    """Interchange: write the activation of stream ``source`` at the same site (or at
    ``site``, e.g. other positions of the source prompt) into this node's stream.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=1, positions="last"), rg.Patch(source="source"))
    >>> g.run(lm, ["a b"], sources={"source": ["c d"]}).logits.shape
    torch.Size([1, 3, 259])

    In a dictionary's basis (``basis=sae``) it writes the source's activations of the node's
    features; ``error=True`` also takes the source's reconstruction error (the site's error
    node, in feature circuits), ``features=False`` leaves the features alone (the error only).
    """

    reads_stream = True

    def __init__(self, source: str = "source", site=None, basis=None, error: bool = False, features: bool = True):
        super().__init__()
        self.source = source
        self.site = Site.from_dict(site) if isinstance(site, dict) else site
        self.error, self.features = bool(error), bool(features)
        self.use_basis(basis)
        if self.check_config():
            raise ValueError(f"Patch: {self.check_config()}")

    def config(self) -> dict:
        config = {"source": self.source, "site": None if self.site is None else self.site.to_dict()}
        if self.basis is not None:
            config.update(error=self.error, features=self.features)
        return _with_basis(self, config)

    def check_config(self):
        if self.basis is None and (self.error or not self.features):
            return "error= and features= are for a patch in a dictionary's basis (give basis=)"
        return None

    def forward(self, h, source=None, valid=None):
        return source.to(h.dtype)


class Add(Op):
    """Steering: ``h + scale * vector`` (``vector`` of the site's width; trainable if asked).

    >>> import torch
    >>> Add(torch.tensor([1.0, -1.0]), scale=3.0)(torch.zeros(1, 1, 2)).tolist()
    [[[3.0, -3.0]]]
    """

    def __init__(self, vector, scale: float = 1.0, trainable: bool = False, basis=None):
        super().__init__()
        _tensor(vector, "vector", trainable, self)
        self.scale = float(scale)
        self.trainable = trainable
        self.use_basis(basis)

    def config(self) -> dict:
        return _with_basis(self, {"scale": self.scale, "trainable": self.trainable})

    def expected_width(self):
        return _width(self.vector)

    def forward(self, h, source=None, valid=None):
        return h + self.scale * self.vector.to(h)


class Set(Op):
    """Write a given tensor, broadcast to the slice ``[B, k, (heads,) width]``.

    >>> import torch
    >>> Set(torch.tensor([5.0, 6.0]))(torch.zeros(2, 1, 2)).tolist()
    [[[5.0, 6.0]], [[5.0, 6.0]]]
    >>> Set(torch.ones(1, 2, 1), mask=torch.tensor([[[True], [False]]]))(torch.zeros(1, 2, 1)).flatten().tolist()
    [1.0, 0.0]

    With ``mask`` (broadcast to the slice too) the value is written only where it is True;
    elsewhere the slice keeps its own value. Patching sweeps write their batched cells so.
    """

    def __init__(self, value, trainable: bool = False, mask=None, basis=None):
        super().__init__()
        _tensor(value, "value", trainable, self)
        self.trainable = trainable
        if mask is None:
            self.mask = None
        else:  # stored as 0/1 floats: saved graphs hold floating-point tensors only
            self.register_buffer("mask", torch.as_tensor(mask).to(torch.float32))
        self.use_basis(basis)

    def config(self) -> dict:
        return _with_basis(self, {"trainable": self.trainable})

    def expected_width(self):
        return _width(self.value)

    def forward(self, h, source=None, valid=None):
        value = self.value.to(h).expand_as(h)
        return value if self.mask is None else torch.where(self.mask.to(h.device) > 0, value, h)


class Ablate(Op):
    """Knock out the slice: ``"zero"``, ``"mean"`` or ``"resample"``.

    >>> import torch
    >>> h = torch.tensor([[[1.0], [3.0]], [[5.0], [7.0]]])        # [B=2, k=2, width=1]
    >>> valid = torch.ones(2, 2, dtype=torch.bool)
    >>> Ablate("mean")(h, valid=valid).flatten().tolist(), Ablate("resample")(h).flatten().tolist()
    ([4.0, 4.0, 4.0, 4.0], [5.0, 7.0, 1.0, 3.0])

    ``"zero"``; ``"mean"`` (of ``value`` if given, else of the batch's selected positions);
    ``"resample"`` (the same slot of another row, a seeded derangement of the batch rows).
    """

    MODES = ("zero", "mean", "resample")

    def __init__(self, mode: str = "zero", value=None, seed: int = 0, basis=None):
        super().__init__()
        self.mode, self.seed = mode, seed
        if self.check_config():
            raise ValueError(f"Ablate {self.check_config()}")
        if value is not None:
            _tensor(value, "value", False, self)
        else:
            self.value = None
        self.use_basis(basis)

    def config(self) -> dict:
        return _with_basis(self, {"mode": self.mode, "seed": self.seed})

    def check_config(self):
        if self.mode not in self.MODES:
            return f"mode must be one of {self.MODES}, got {self.mode!r}"
        return None

    def check_selection(self, valid):
        if self.mode == "resample" and (valid.shape[0] < 2 or not bool((valid == valid[:1]).all())):
            return (f"Ablate('resample') takes each slot from another row: it needs at least 2 rows with the "
                    f"same number of selected positions; the stream has {valid.shape[0]} rows selecting "
                    f"{valid.sum(1).tolist()} positions")
        return None

    def expected_width(self):
        return None if self.value is None else _width(self.value)

    def forward(self, h, source=None, valid=None):
        if self.mode == "zero":
            return torch.zeros_like(h)
        if self.mode == "mean":
            if self.value is not None:
                return self.value.to(h).expand_as(h)
            return masked_mean(h, valid, (0, 1)).expand_as(h)
        n = h.shape[0]
        if n < 2:
            raise ValueError("Ablate('resample') needs a batch of at least 2 rows")
        g = torch.Generator().manual_seed(self.seed)
        shift = int(torch.randint(1, n, (1,), generator=g))
        perm = torch.randperm(n, generator=g)
        derangement = torch.empty_like(perm)
        derangement[perm] = perm.roll(shift)  # row perm[i] takes row perm[i - shift]: never itself
        return h[derangement]


class Collect(Op):
    """Record the slice (after earlier edits at the same place) under the node's name.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("head_out", layer=0, head=(1, 2), positions="f1+l1"), rg.Collect(), name="heads")
    >>> g.run(rg.models.tiny("llama"), ["abc", "de"])["heads"].shape     # [B, k, heads, head_dim]
    torch.Size([2, 2, 2, 8])
    """

    collects = True
    half_precision = True

    def __init__(self, basis=None):
        super().__init__()
        self.use_basis(basis)

    def config(self) -> dict:
        return _with_basis(self, {})

    def forward(self, h, source=None, valid=None):
        return h


class Classify(Op):
    """A classification head on the slice (``Linear(width, n_classes)``, mean over the
    selected positions); collects its logits ``[B, n_classes]`` under the node's name.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=-1, positions="last"), rg.Classify(32, 3), name="cls")
    >>> g.run(rg.models.tiny("llama"), ["good", "bad"])["cls"].shape
    torch.Size([2, 3])

    Put it at ``resid_post[-1]`` with ``positions="last"`` for sequence classification.
    """

    collects = True

    def __init__(self, width: int, n_classes: int):
        super().__init__()
        self.width = positive_int("Classify", "width", width)
        self.n_classes = positive_int("Classify", "n_classes", n_classes)
        self.head = nn.Linear(width, n_classes)

    def config(self) -> dict:
        return {"width": self.width, "n_classes": self.n_classes}

    def expected_width(self):
        return self.width

    def forward(self, h, source=None, valid=None):
        pooled = masked_mean(h, valid, 1)
        return self.head(pooled.to(self.head.weight.dtype))


def _inner_trait(name: str, example: str, value: bool) -> property:
    """A trait of :class:`Without` that is its inner op's (read live)."""
    made = {"LoReFT": "rg.LoReFT(width=2, rank=1)", "Collect": "rg.Collect()", "Patch": "rg.Patch('s')"}[example]
    doc = (f"The wrapped op's ``{name}``.\n\n"
           f">>> import torch, reftgraph as rg\n"
           f">>> Without({made}, torch.eye(2)[:1]).{name}\n{value}\n")
    return property(lambda self: getattr(self.inner, name), doc=doc)


class Without(Op):
    """Wrap ``inner``: its edit with the components along ``directions`` (orthonormal rows)
    removed, i.e. ``out - ((out - h) @ D^T) @ D``.

    >>> import torch
    >>> op = Without(Add(torch.tensor([1.0, 2.0, 3.0])), directions=torch.eye(3)[1:2])
    >>> op(torch.zeros(1, 1, 3)).tolist()       # the edit along dim 1 is gone
    [[[1.0, 0.0, 3.0]]]
    """

    def __init__(self, inner: Op, directions: torch.Tensor):
        super().__init__()
        if not isinstance(inner, Op):
            raise ValueError(f"Without: inner must be a reftgraph op, got {type(inner).__name__}")
        if inner.basis is not None:
            raise ValueError("Without: the directions it removes are directions of the activation; an op with a "
                             "basis edits features (leave those features out of the node's subspace instead)")
        self.inner = inner
        self.register_buffer("directions", torch.as_tensor(directions, dtype=torch.float32).detach().clone())

    # what the engine asks of an op is what the inner op says (followed live)
    learned_basis = _inner_trait("learned_basis", "LoReFT", True)
    collects = _inner_trait("collects", "Collect", True)
    reads_stream = _inner_trait("reads_stream", "Patch", True)
    per_row_subspaces = _inner_trait("per_row_subspaces", "LoReFT", True)
    half_precision = _inner_trait("half_precision", "Collect", True)

    @property
    def source(self):
        """The stream the inner op reads (followed live: setting it on the inner op shows here).

        >>> import torch
        >>> Without(Patch("s1"), torch.eye(2)[:1]).source
        's1'
        """
        return self.inner.source

    @property
    def site(self):
        """The site of that stream the inner op reads, or None for its own.

        >>> import torch
        >>> Without(Patch("s1"), torch.eye(2)[:1]).site is None
        True
        """
        return self.inner.site

    def config(self) -> dict:
        return {"inner": {"type": type(self.inner).__name__, "config": self.inner.config()}}

    def check_config(self):
        return self.inner.check_config()

    def check_selection(self, valid):
        return self.inner.check_selection(valid)

    def basis_size(self):
        return self.inner.basis_size()

    def expected_width(self):
        return self.inner.expected_width()

    def forward(self, h, source=None, valid=None, subspace=None, rows=None):
        out = self.inner.edit(h, source=source, valid=valid, subspace=subspace, rows=rows)
        if self.collects:      # a collecting op records; nothing to take out of an edit
            return out
        d = self.directions.to(h.dtype)
        return out - ((out - h) @ d.T) @ d

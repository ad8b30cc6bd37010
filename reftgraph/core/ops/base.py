"""The op interface: a ``torch.nn.Module`` that maps the selected slice ``h`` to ``h'``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def positive_int(op: str, name: str, value) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ValueError naming the op and argument.

    >>> positive_int("LoReFT", "rank", 4)
    4
    >>> positive_int("LoReFT", "width", "32")
    Traceback (most recent call last):
    ...
    ValueError: LoReFT: width must be an int >= 1, got '32'
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")
    return value


class Op(nn.Module):
    """Base class of node ops: subclass it and write ``forward``.

    >>> import torch
    >>> class Double(Op):
    ...     def forward(self, h, source=None, valid=None):
    ...         return 2 * h
    >>> Double()(torch.ones(1, 1, 2)).tolist()
    [[[2.0, 2.0]]]

    ``forward(h, source=None, valid=None)`` gets the selected slice ``h`` of shape
    ``[B, k, width]`` (``[B, k, heads, head_dim]`` for head components), the matching slice
    of the source stream for ops that read one, and ``valid[B, k]`` (False where a row has
    fewer selected positions). For ops without a learned basis (``learned_basis = False``)
    a site's ``subspace`` dims are cut out before the op sees ``h``, so widths are
    ``len(subspace)``; ops with a learned basis get the full slice and ``subspace=`` (the
    node's dims of their basis). ``config()`` returns the constructor kwargs that rebuild
    the op (tensors live in its state dict).

    On a half-precision model (bfloat16, float16) the op computes in float32 (``h`` and
    ``source`` arrive in float32, its parameters stay float32: master weights, as mixed
    precision training keeps them) and the engine rounds the result to the activation's
    dtype; set ``half_precision = True`` for an op that should see the activation's own
    dtype (:class:`Collect` does: collected values keep the model's dtype).

    An op with ``per_row_subspaces = True`` (the ReFT family and ``Rotate``) also takes
    ``rows``, a ``[B, basis]`` mask: row ``b`` edits along the dims of its basis where
    ``rows[b]`` is 1, as pyreft's per-example subspaces do (``subspaces=`` of ``run``,
    ``generate`` and the training data).
    """

    learned_basis = False   # True: the op has its own basis; a site's subspace indexes its dims
    collects = False        # True: the op records a value instead of editing the stream
    reads_stream = False    # True: the op reads another stream (``source``, at ``site`` or its own)
    half_precision = False  # True: the op sees half-precision slices as they are (else in float32)
    per_row_subspaces = False  # True: forward takes rows=[B, basis] (1 where a row uses a dim of its basis)
    source: Optional[str] = None  # the stream it reads (ops with ``reads_stream``)
    site = None                   # the Site of that stream it reads, when not its own

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name != "training" and not name.startswith("_"):
            self.__dict__["_revision"] = self.__dict__.get("_revision", 0) + 1

    @property
    def revision(self) -> tuple:
        """Changes each time an attribute of the op (or of an op inside it) is set: a graph
        compiles a new plan for the new settings (see :meth:`reftgraph.Graph.state`).

        >>> import torch, reftgraph as rg
        >>> op = rg.Add(torch.ones(4))
        >>> before = op.revision
        >>> op.scale = 2.0
        >>> op.revision != before
        True
        """
        inner = tuple(m.revision for m in self.children() if isinstance(m, Op))
        return (self.__dict__.get("_revision", 0),) + inner

    @property
    def basis(self):
        """The :class:`~reftgraph.Dictionary` whose feature activations the op edits (its
        ``basis=``), or None: the op edits the activation itself.

        >>> import torch, reftgraph as rg
        >>> rg.Collect().basis is None, rg.Collect(basis=rg.Dictionary(4, 8)).basis.d_sae
        (True, 8)
        """
        return self._modules.get("basis")

    @basis.setter
    def basis(self, value) -> None:   # (nn.Module registers a dictionary itself; this takes None)
        self._modules.pop("basis", None)

    def use_basis(self, basis) -> None:
        """Make ``basis`` (a :class:`~reftgraph.Dictionary`, or None) the op's basis; the
        ``basis=`` argument of the built-in ops calls it.

        >>> import torch, reftgraph as rg
        >>> op = rg.Ablate("zero")
        >>> op.use_basis(rg.Dictionary(4, 8))
        >>> op.indexes_basis
        True
        """
        if basis is not None and (not isinstance(basis, Op) or not hasattr(basis, "around")):
            raise ValueError(f"{type(self).__name__}: basis must be a reftgraph.Dictionary (an SAE or transcoder; "
                             f"reftgraph.features.load reads one), got {type(basis).__name__}")
        self.basis = basis

    @property
    def indexes_basis(self) -> bool:
        """Whether a site's ``subspace`` names dims of the op's own basis (a learned basis,
        or a dictionary's features given as ``basis=``) rather than dims of the activation.

        >>> import torch, reftgraph as rg
        >>> rg.Add(torch.ones(4)).indexes_basis, rg.LoReFT(width=4, rank=2).indexes_basis
        (False, True)
        >>> rg.Add(torch.ones(8), basis=rg.Dictionary(4, 8)).indexes_basis
        True
        """
        return self.learned_basis or self.basis is not None

    def check_config(self) -> Optional[str]:
        """A problem with the op's settings, or None; checked when the op joins a graph and
        again before a run when its settings changed.

        >>> import reftgraph as rg
        >>> op = rg.Ablate("zero")
        >>> op.mode = "sideways"
        >>> op.check_config()
        "mode must be one of ('zero', 'mean', 'resample'), got 'sideways'"
        """
        return None

    def check_selection(self, valid: torch.Tensor) -> Optional[str]:
        """A problem with the positions bound in one batch (``valid[B, k]``), or None.

        >>> import torch, reftgraph as rg
        >>> rg.Add(torch.ones(4)).check_selection(torch.ones(1, 1, dtype=torch.bool)) is None
        True

        The engine calls it before any forward and raises the message as a SiteError.
        """
        return None

    def config(self) -> dict:
        """The constructor kwargs that rebuild the op (its tensors live in the state dict).

        >>> import reftgraph as rg
        >>> rg.LoReFT(width=8, rank=2, seed=0).config()
        {'width': 8, 'rank': 2, 'act': 'identity', 'dropout': 0.0, 'seed': 0}
        """
        return {}

    def basis_size(self) -> Optional[int]:
        """For ops with a learned basis: how many dims it has (subspace dims index these).

        >>> import torch, reftgraph as rg
        >>> rg.LoReFT(width=8, rank=2).basis_size(), rg.Add(torch.ones(8)).basis_size()
        (2, None)
        """
        return None

    def expected_width(self) -> Optional[int]:
        """The last-dim width this op needs, or None when any width fits.

        >>> import torch, reftgraph as rg
        >>> rg.Add(torch.ones(8)).expected_width(), rg.Collect().expected_width()
        (8, None)
        """
        return None

    def forward(self, h: torch.Tensor, source: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The edited slice ``h'`` (same shape as ``h``; collecting ops return what they record).

        >>> import torch, reftgraph as rg
        >>> rg.Patch("source")(torch.zeros(1, 1, 2), source=torch.ones(1, 1, 2)).tolist()
        [[[1.0, 1.0]]]
        """
        raise NotImplementedError

    def edit(self, h: torch.Tensor, *, source: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
             subspace: Optional[tuple] = None, rows: Optional[torch.Tensor] = None,
             inputs: Optional[torch.Tensor] = None, source_inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The one way the engine calls an op: every op is handed the same inputs and its
        ``forward`` receives those it names (all of them with ``**kwargs``).

        >>> import torch, reftgraph as rg
        >>> rg.Add(torch.ones(2)).edit(torch.zeros(1, 1, 2), valid=None, subspace=(0,), rows=None).tolist()
        [[[1.0, 1.0]]]

        ``source``: the source stream's slice (ops that read one); ``valid[B, k]``: False
        where a row has fewer positions; ``subspace``: the site's dims of the op's own basis
        (ops with ``learned_basis``); ``rows[B, basis]``: per-row subspaces (ops with
        ``per_row_subspaces``). A wrapper (``Without``) passes them all to the op it wraps.
        An op with a ``basis`` (a :class:`~reftgraph.Dictionary`) edits in feature space:
        ``subspace`` names the features it sees (see :meth:`Dictionary.around`); ``inputs``
        is what a transcoder reads (the MLP's own input at the node's positions), and
        ``source_inputs`` the same in the source stream (a ``Patch`` in a transcoder's basis).
        """
        if self.basis is not None:
            return self.basis.around(self, h, source=source, valid=valid, subspace=subspace, rows=rows, inputs=inputs,
                                     source_inputs=source_inputs)
        return self.forward_with(h, source=source, valid=valid, subspace=subspace, rows=rows, inputs=inputs)

    def forward_with(self, h: torch.Tensor, **given) -> torch.Tensor:
        """Call the op on ``h`` with those of ``given`` that its ``forward`` names (all of
        them when it takes ``**kwargs``); :meth:`edit` without the op's ``basis``.

        >>> import torch, reftgraph as rg
        >>> rg.Add(torch.ones(2)).forward_with(torch.zeros(1, 1, 2), rows=None).tolist()
        [[[1.0, 1.0]]]
        """
        takes = _accepted(type(self))
        return self(h, **(given if takes is None else {k: v for k, v in given.items() if k in takes}))

    def extra_repr(self) -> str:
        """The op's :meth:`config`, as ``torch.nn.Module`` prints it.

        >>> import torch, reftgraph as rg
        >>> rg.Add(torch.ones(4), scale=2.0)
        Add(scale=2.0, trainable=False)
        """
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())


def _accepted(cls) -> Optional[frozenset]:
    """The keyword inputs ``cls.forward`` names, or None when it takes ``**kwargs`` (all);
    kept on the class (not in a module-level table, which a remote request would carry)."""
    if "_forward_inputs" not in cls.__dict__:
        import inspect

        params = inspect.signature(cls.forward).parameters.values()
        cls._forward_inputs = (None if any(p.kind is p.VAR_KEYWORD for p in params)
                               else frozenset(p.name for p in params))
    return cls._forward_inputs

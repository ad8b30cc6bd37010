"""The ReFT family (Wu, Arora et al. 2024) as node ops.

=========  =================================  ============
op         edit                               R
=========  =================================  ============
LoReFT     ``h + R^T(act(W h + b) - R h)``    orthonormal
NoReFT     ``h + R^T(act(W h + b) - R h)``    free
DiReFT     ``h + R^T act(W h + b)``           orthonormal
NoDiReFT   ``h + R^T act(W h + b)``           free
ConsReFT   ``h + R^T(b - R h)``               orthonormal
LoBiReFT   ``h + R^T b``                      orthonormal
=========  =================================  ============

>>> import torch, reftgraph as rg
>>> op = rg.LoReFT(width=16, rank=4)
>>> R = op.R()
>>> torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)
True
>>> op(torch.randn(2, 3, 16)).shape
torch.Size([2, 3, 16])

A node's ``subspace`` picks rows of R (and of W, b): dims ``(0, 1, 2, 3)`` of a rank-8
LoReFT use and train only those four directions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Op, positive_int

ACTIVATIONS = {
    "identity": nn.Identity,
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """The Q of ``a = QR`` with R's diagonal made positive: unique, and ``a`` itself when
    ``a`` already has orthonormal columns.

    >>> q = orthonormal_columns(torch.randn(6, 2))
    >>> torch.allclose(q.T @ q, torch.eye(2), atol=1e-6), torch.allclose(orthonormal_columns(q), q, atol=1e-6)
    (True, True)

    Differentiable; a plain function, so modules using it pickle and serialise
    (``torch.nn.utils.parametrizations`` do not).
    """
    q, r = torch.linalg.qr(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs.unsqueeze(-2)).to(a.dtype)


def row_mask(rows: torch.Tensor, dims, h: torch.Tensor) -> torch.Tensor:
    """``[B, 1, (1,) len(dims)]``: the per-row mask ``rows[B, basis]`` restricted to ``dims`` (all
    when None), shaped to scale the basis coordinates of a slice like ``h``.

    >>> row_mask(torch.tensor([[1, 0, 1], [0, 1, 1]]), [0, 2], torch.zeros(2, 1, 4)).tolist()
    [[[1.0, 1.0]], [[0.0, 1.0]]]
    """
    rows = rows if dims is None else rows[:, list(dims)]
    return rows.to(h.dtype).reshape(rows.shape[0], *([1] * (h.dim() - 2)), rows.shape[-1])


class ReFT(Op):
    """Shared machinery of the ReFT ops; a node's ``subspace`` picks rows of R, W and b.

    >>> op = LoReFT(width=8, rank=2)
    >>> tuple(op.rotate.shape), tuple(op.weight.shape), tuple(op.bias.shape)
    ((8, 2), (2, 8), (2,))

    ``rotate`` is ``R^T`` (``[width, rank]``, pyreft's ``rotate_layer``), ``weight``/``bias``
    are W ``[rank, width]`` and b ``[rank]`` (pyreft's ``learned_source``).

    ``within`` (``[width, n]``, fixed): R's rows are kept in the span of its columns, e.g. the
    decoder directions of chosen features (:func:`reftgraph.features.reft`); ``rotate`` is
    then ``[n, rank]`` and ``R^T = Q(within) rotate`` (orthonormalised for the ``Lo``
    variants), trained like any other.
    """

    learned_basis = True
    per_row_subspaces = True
    orthogonal = True
    uses_w = True      # act(W h + b) (else the learned bias b alone)
    subtracts = True   # - R h

    def __init__(self, width: int, rank: int = 4, act: str = "identity", dropout: float = 0.0,
                 seed: Optional[int] = None, within: Optional[torch.Tensor] = None):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
        name = type(self).__name__
        positive_int(name, "width", width)
        span = width
        if within is None:
            self.within = None
        else:
            within = torch.as_tensor(within, dtype=torch.float32).detach().clone()
            if within.dim() != 2 or within.shape[0] != width or not 1 <= within.shape[1] <= width:
                raise ValueError(f"{name}: within must be [width, n] with n in 1..{width}, got {list(within.shape)}")
            self.register_buffer("within", within)
            span = within.shape[1]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= span:
            what = "the width" if within is None else "the directions in within"
            raise ValueError(f"{name}: rank must be an int in 1..{span} ({what}), got {rank!r}")
        self.width, self.rank, self.act_name, self.p_drop, self.seed = width, rank, act, dropout, seed
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        rotate = torch.empty(span, rank)
        nn.init.orthogonal_(rotate, generator=g) if g is not None else nn.init.orthogonal_(rotate)
        self.rotate = nn.Parameter(rotate)
        if self.uses_w:
            w = torch.empty(rank, width)
            bound = 1 / width ** 0.5
            nn.init.uniform_(w, -bound, bound, generator=g) if g is not None else nn.init.uniform_(w, -bound, bound)
            self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(rank))
        self.act = ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout)

    def config(self) -> dict:
        return {"width": self.width, "rank": self.rank, "act": self.act_name, "dropout": self.p_drop,
                "seed": self.seed}

    def expected_width(self):
        return self.width

    def basis_size(self):
        return self.rank

    def Rt(self, dims=None) -> torch.Tensor:
        """``R^T`` (``[width, rank]`` or ``[width, len(dims)]``): orthonormal columns for the
        ``Lo``/``Di``/``Cons``/``LoBi`` variants.

        >>> rt = LoReFT(width=8, rank=4).Rt(dims=(0, 2))
        >>> tuple(rt.shape), torch.allclose(rt.T @ rt, torch.eye(2), atol=1e-6)
        ((8, 2), True)
        """
        rt = orthonormal_columns(self.rotate) if self.orthogonal else self.rotate
        if self.within is not None:
            rt = orthonormal_columns(self.within) @ rt
        return rt if dims is None else rt[:, list(dims)]

    def R(self, dims=None) -> torch.Tensor:
        """R (``[rank, width]`` or ``[len(dims), width]``): the transpose of :meth:`Rt`.

        >>> op = LoReFT(width=8, rank=4)
        >>> tuple(op.R().shape), torch.equal(op.R((1,)), op.Rt((1,)).T)
        ((4, 8), True)
        """
        return self.Rt(dims).T

    def forward(self, h, source=None, valid=None, subspace=None, rows=None):
        dims = None if subspace is None else list(subspace)
        rt = self.Rt(dims).to(h.dtype)
        b = (self.bias if dims is None else self.bias[dims]).to(h.dtype)
        if self.uses_w:
            w = (self.weight if dims is None else self.weight[dims]).to(h.dtype)
            target = self.act(h @ w.T + b)
        else:
            target = b
        if self.subtracts:
            target = target - h @ rt
        if rows is not None:   # each row edits along its own dims of the basis: the others' terms drop
            target = target * row_mask(rows, dims, h)
        return h + self.dropout(target @ rt.T)


class LoReFT(ReFT):
    """``h + R^T(act(W h + b) - R h)``, R with orthonormal rows.

    >>> op, h = LoReFT(width=8, rank=2, seed=0), torch.randn(1, 3, 8)
    >>> torch.allclose(op(h) @ op.Rt(), h @ op.weight.T + op.bias, atol=1e-5)  # R h' = W h + b
    True
    """


class NoReFT(ReFT):
    """LoReFT without the orthonormality constraint on R.

    >>> op = NoReFT(width=8, rank=2)
    >>> torch.equal(op.Rt(), op.rotate), op(torch.randn(1, 3, 8)).shape
    (True, torch.Size([1, 3, 8]))
    """

    orthogonal = False


class DiReFT(ReFT):
    """``h + R^T act(W h + b)``: no ``- R h`` term.

    >>> op, h = DiReFT(width=8, rank=2, seed=0), torch.randn(1, 3, 8)
    >>> torch.allclose(op(h) - h, (h @ op.weight.T + op.bias) @ op.R(), atol=1e-5)
    True
    """

    subtracts = False


class NoDiReFT(DiReFT):
    """DiReFT with R unconstrained.

    >>> op = NoDiReFT(width=8, rank=2)
    >>> torch.equal(op.R(), op.rotate.T), op(torch.randn(1, 3, 8)).shape
    (True, torch.Size([1, 3, 8]))
    """

    orthogonal = False


class ConsReFT(ReFT):
    """``h + R^T(b - R h)``: sets the subspace coordinates to the learned constant b.

    >>> op = ConsReFT(width=8, rank=2)
    >>> with torch.no_grad():
    ...     _ = op.bias.copy_(torch.tensor([1.0, -2.0]))
    >>> (op(torch.randn(3, 1, 8)) @ op.Rt()).round(decimals=4).tolist()
    [[[1.0, -2.0]], [[1.0, -2.0]], [[1.0, -2.0]]]
    """

    uses_w = False


class LoBiReFT(ReFT):
    """``h + R^T b``: a learned bias inside the subspace.

    >>> op, h = LoBiReFT(width=8, rank=2), torch.randn(1, 3, 8)
    >>> torch.equal(op(h), h)     # b starts at zero: the identity until trained
    True
    """

    uses_w = False
    subtracts = False


REFT_OPS = {cls.__name__: cls for cls in (LoReFT, NoReFT, DiReFT, NoDiReFT, ConsReFT, LoBiReFT)}

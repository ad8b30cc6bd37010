"""Distributed alignment search (Geiger et al. 2023): interchange inside a learned rotation.

``Rotate`` reads a source stream like :class:`~reftgraph.ops.Patch`, but swaps only the
coordinates of a few dims of a learned orthonormal basis R::

    h' = h + R^T M (R s - R h)

with ``M`` a 0/1 mask on the interchanged dims (the first ``k``, or the node's
``subspace``), or, for Boundless DAS (Wu et al. 2023), a learned soft mask
``m_i = sigmoid((boundary - i - 1/2) / temperature)`` whose temperature is annealed during
training (see :func:`reftgraph.das.train_das`).

>>> import torch, reftgraph as rg
>>> from reftgraph.core.ops.rotate import Rotate
>>> op = Rotate(width=8, k=2, seed=0)
>>> h, s = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
>>> out = op(h, source=s)
>>> R = op.R((0, 1))
>>> torch.allclose(out @ R.T, s @ R.T, atol=1e-5)   # the first 2 rotated dims come from s
True
>>> torch.allclose(out - out @ R.T @ R, h - h @ R.T @ R, atol=1e-5)  # the rest from h
True

R's rows are the Q of a QR factorisation of a free parameter (``orthonormal_columns``,
shared with the ReFT family): exactly orthonormal, differentiable, and plain tensors in
the state dict. Only the first ``max(dim) + 1`` columns are factorised, which for a hard
mask on the first k dims is a ``[width, k]`` QR, however wide the basis.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..sites import Site
from .base import Op, positive_int
from .reft import orthonormal_columns, row_mask


class Rotate(Op):
    """Interchange the first ``k`` dims (or the node's ``subspace`` dims) of a learned
    orthonormal basis of ``rank`` directions (default: a full rotation of ``width``).

    >>> op = Rotate(width=6, k=2, boundless=True, temperature=0.1)
    >>> [round(m, 3) for m in op.mask().tolist()]   # boundary 2: dims 0, 1 in, the rest out
    [1.0, 0.993, 0.007, 0.0, 0.0, 0.0]

    ``boundless=True`` replaces the 0/1 mask by the learned soft mask of Boundless DAS
    (its ``boundary`` starts at ``k``); set ``temperature`` (a buffer, saved) while training.
    ``source`` names the stream it reads; ``site`` optionally another site of it (as Patch).
    """

    learned_basis = True
    per_row_subspaces = True
    reads_stream = True

    def __init__(self, width: int, k: int = 1, rank: Optional[int] = None, source: str = "source", site=None,
                 boundless: bool = False, temperature: float = 1.0, seed: Optional[int] = None):
        super().__init__()
        positive_int("Rotate", "width", width)
        rank = width if rank is None else positive_int("Rotate", "rank", rank)
        positive_int("Rotate", "k", k)
        if not 0 < rank <= width:
            raise ValueError(f"Rotate: rank must be in 1..{width} (the width), got {rank}")
        if not 0 < k <= rank:
            raise ValueError(f"Rotate: k must be in 1..{rank} (the rank), got {k}")
        self.width, self.rank, self.k, self.boundless, self.seed = width, rank, k, boundless, seed
        self.source = source
        self.site = Site.from_dict(site) if isinstance(site, dict) else site
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        weight = torch.empty(width, rank)
        if not weight.is_meta:   # (a loader checks shapes on the meta device: nothing to draw there)
            nn.init.orthogonal_(weight, generator=g)
        self.rotate = nn.Parameter(weight)
        if boundless:
            self.boundary = nn.Parameter(torch.tensor(float(k)))
        self.register_buffer("temperature", temperature.detach().clone().float() if torch.is_tensor(temperature)
                             else torch.tensor(float(temperature)))

    def config(self) -> dict:
        return {"width": self.width, "k": self.k, "rank": self.rank, "source": self.source,
                "site": None if self.site is None else self.site.to_dict(), "boundless": self.boundless,
                "seed": self.seed}

    def expected_width(self):
        return self.width

    def basis_size(self):
        return self.rank

    def dims(self, subspace=None) -> list:
        """The interchanged dims: ``subspace``, else the first k (all of them when boundless).

        >>> Rotate(width=6, k=2).dims(), Rotate(width=6, k=2).dims((3, 4))
        ([0, 1], [3, 4])
        """
        if subspace is not None:
            return list(subspace)
        return list(range(self.rank if self.boundless else self.k))

    def Rt(self, dims=None) -> torch.Tensor:
        """``R^T`` restricted to ``dims`` (``[width, len(dims)]``, orthonormal columns).

        >>> rt = Rotate(width=6, k=2).Rt((0, 1))
        >>> tuple(rt.shape), torch.allclose(rt.T @ rt, torch.eye(2), atol=1e-6)
        ((6, 2), True)
        """
        dims = list(range(self.rank)) if dims is None else list(dims)
        return orthonormal_columns(self.rotate[:, :max(dims) + 1])[:, dims]

    def R(self, dims=None) -> torch.Tensor:
        """R restricted to ``dims`` (``[len(dims), width]``): the transpose of :meth:`Rt`.

        >>> tuple(Rotate(width=6, k=2).R().shape)
        (6, 6)
        """
        return self.Rt(dims).T

    def mask(self, dims=None) -> torch.Tensor:
        """The weight of each interchanged dim: ones, or Boundless DAS's soft mask.

        >>> Rotate(width=6, k=2).mask().tolist()
        [1.0, 1.0]
        """
        dims = self.dims(dims)
        if not self.boundless:
            return torch.ones(len(dims), device=self.rotate.device)
        i = torch.tensor(dims, dtype=self.boundary.dtype, device=self.boundary.device)
        return torch.sigmoid((self.boundary - i - 0.5) / self.temperature)

    def forward(self, h, source=None, valid=None, subspace=None, rows=None):
        if source is None:
            raise ValueError("Rotate reads a source stream: call it with source= (a graph node passes it)")
        dims = self.dims(subspace)
        rt = self.Rt(dims).to(h.dtype)
        diff = (source.to(h.dtype) - h) @ rt * self.mask(dims).to(h.dtype)
        if rows is not None:   # each row interchanges its own dims
            diff = diff * row_mask(rows, dims, h)
        return h + diff @ rt.T

"""The op interface: a ``torch.nn.Module`` that maps the selected slice ``h`` to ``h'``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class Op(nn.Module):
    """Base class of node ops.

    ``forward(h, source=None, valid=None)`` gets the selected slice ``h`` of shape
    ``[B, k, width]`` (``[B, k, heads, head_dim]`` for head components), the matching slice
    of the source stream for ops that read one, and ``valid[B, k]`` (False where a row has
    fewer selected positions). For ops without a learned basis (``learned_basis = False``)
    a site's ``subspace`` dims are cut out before the op sees ``h``, so widths are
    ``len(subspace)``; ops with a learned basis get the full slice and ``subspace=`` (the
    node's dims of their basis). ``config()`` returns the constructor kwargs that rebuild
    the op (tensors live in its state dict).
    """

    learned_basis = False
    collects = False
    source: Optional[str] = None

    def config(self) -> dict:
        return {}

    def basis_size(self) -> Optional[int]:
        """For ops with a learned basis: how many dims it has (subspace dims index these)."""
        return None

    def expected_width(self) -> Optional[int]:
        """The last-dim width this op needs, or None when any width fits."""
        return None

    def forward(self, h: torch.Tensor, source: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

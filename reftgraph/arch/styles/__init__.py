"""Block styles: how a block adds attention and MLP to the residual stream, one per module.

>>> [s.name for s in STYLES]
['sequential', 'post_norm', 'parallel', 'inner_residual', 'post_ln', 'scaled', 'weighted']

Each style says which modules' outputs are ``attn_out`` and ``mlp_out`` (what the block
*adds* to the stream), whether ``resid_mid`` exists, and which stream an edit of
``attn_out`` must move. :mod:`reftgraph.arch.proofs` tries the styles in order on a
recorded forward of a tiny instance and keeps the first whose identities hold.
"""

from __future__ import annotations

from . import inner_residual, parallel, post_ln, post_norm, scaled, sequential, weighted
from .base import Record, Style

__all__ = ["STYLES", "Style", "Record"]

STYLES = [sequential.STYLE, post_norm.STYLE, parallel.STYLE, inner_residual.STYLE, post_ln.STYLE,
          scaled.STYLE, weighted.STYLE]
